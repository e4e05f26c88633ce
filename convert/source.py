"""Weight sources the converter reads from, all speaking HF names and HF layouts.

A source gives the model config, the HF tensor names it holds, each tensor's HF shape and
stored dtype, and reads one tensor at a time (never the whole model). The writer in
`convert/hf.py` turns HF tensors into our stacked layout through `convert/names.py`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from qwq_jax.config import QwenConfig


class ConversionError(Exception):
    """A problem with the user's input: the CLI prints it as one line and exits 1."""


class Source(Protocol):
    config: QwenConfig
    hf_config: dict                  # the config.json content to write into OUT
    extra_files: dict[str, bytes]    # other files for OUT (tokenizer.json, generation_config.json, ...)

    def names(self) -> list[str]:
        """HF tensor names present in the source."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The HF-layout shape of `name`."""

    def dtype(self, name: str) -> np.dtype:
        """The dtype `read` returns for `name` (for GGUF: float32 after dequantization)."""

    def source_dtype(self) -> str:
        """Default output dtype name: 'bfloat16', 'float32' or 'float16'."""

    def read(self, name: str) -> np.ndarray:
        """The whole HF-layout tensor `name` as a numpy array."""

    # Optional: `read_rows(name, start, stop)` reads rows start:stop of `name` (its first dimension)
    # alone; the converter then reads only the rows each device holds (HFSource, GGUFSource have it).
