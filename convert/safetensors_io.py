"""Streaming reader and writer for the safetensors format (8-byte header length, JSON header, data).

Reading goes one tensor at a time by byte range, so nothing forces the whole file into memory,
and a truncated file is caught from its header before any tensor is used.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from convert.source import ConversionError

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
          "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
          "BOOL": np.dtype(np.bool_)}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Header of one .safetensors file; `read(name)` loads a single tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) < 8:
                    raise ConversionError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER or 8 + n > size:
                    raise ConversionError(f"{self.path}: truncated or corrupt safetensors file "
                                          f"(header of {n} bytes, file of {size})")
                header = json.loads(fh.read(n))
        except OSError as e:
            raise ConversionError(f"{self.path}: cannot read: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConversionError(f"{self.path}: corrupt safetensors header") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.start = 8 + n
        self.tensors: dict[str, dict] = header
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise ConversionError(f"{self.path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            if self.start + end > size:
                raise ConversionError(f"{self.path}: truncated safetensors file: tensor {name} needs "
                                      f"bytes up to {self.start + end}, the file has {size}")
            if end - begin != DTYPES[info["dtype"]].itemsize * int(np.prod(info["shape"], dtype=np.int64)):
                raise ConversionError(f"{self.path}: tensor {name}: byte range does not match its shape")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.tensors[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        begin, end = self.tensors[name]["data_offsets"]
        return end - begin

    def read(self, name: str) -> np.ndarray:
        shape = self.shape(name)
        return self.read_rows(name, 0, shape[0]) if shape else self._read(name, 0, self.nbytes(name), ())

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of tensor `name` (its first dimension): one contiguous byte range."""
        shape = self.shape(name)
        row = self.dtype(name).itemsize * int(np.prod(shape[1:], dtype=np.int64))
        return self._read(name, start * row, stop * row, (stop - start,) + shape[1:])

    def _read(self, name: str, first: int, last: int, shape: tuple[int, ...]) -> np.ndarray:
        begin, end = self.tensors[name]["data_offsets"]
        begin, end = begin + first, begin + last
        out = np.empty(shape, self.dtype(name))
        with open(self.path, "rb") as fh:
            fh.seek(self.start + begin)
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = fh.readinto(view)
        if got != end - begin:
            raise ConversionError(f"{self.path}: truncated while reading tensor {name}")
        return out


def write_safetensors(path: str | os.PathLike, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[int], None] | None = None, sync: bool = False) -> None:
    """Write tensors named by `specs` (name, shape, dtype), producing each one only when written.

    sync: fsync the file before returning (it is on disk, not only in the page cache)."""
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align data to 8 bytes
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape, dtype in specs:
            x = np.ascontiguousarray(produce(name), dtype=dtype)
            if x.shape != tuple(shape):
                raise ValueError(f"tensor {name}: produced shape {x.shape}, declared {tuple(shape)}")
            fh.write(memoryview(x.reshape(-1).view(np.uint8)))
            if on_tensor:
                on_tensor(x.nbytes)
            del x
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
