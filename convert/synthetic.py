"""Random HF-format checkpoints of any config: for tests and the conversion benchmark."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from convert.names import hf_names, param_shapes
from convert.safetensors_io import write_safetensors
from qwq_jax.config import QwenConfig
from qwq_jax.model import as_dtype


def write_random_hf_checkpoint(cfg: QwenConfig, path: str | os.PathLike, *, dtype: str = "bfloat16",
                               max_shard_bytes: int | None = None, seed: int = 0) -> Path:
    """A HF model directory (config.json + safetensors, sharded with an index past `max_shard_bytes`).

    Tensors are generated one at a time, so memory stays at one tensor however large the model.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(as_dtype(dtype))
    shapes = param_shapes(cfg)
    specs = []
    for name, rule, _ in hf_names(cfg):
        full = shapes[rule.ours]
        specs.append((name, rule.hf_shape(full[1:] if rule.per_layer else full), np_dtype))
    limit = max_shard_bytes or math.inf
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        n = math.prod(spec[1]) * np_dtype.itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    rng = np.random.default_rng(seed)

    def produce(name: str) -> np.ndarray:
        shape = next(s for n, s, _ in specs if n == name)
        if name.endswith("norm.weight"):
            return (1.0 + 0.1 * rng.standard_normal(shape, np.float32)).astype(np_dtype)
        return (0.05 * rng.standard_normal(shape, np.float32)).astype(np_dtype)

    if len(shards) == 1:
        write_safetensors(path / "model.safetensors", shards[0], produce)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(path / fname, shard, produce)
            weight_map.update({name: fname for name, _, _ in shard})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(dict(cfg.to_hf(), torch_dtype=dtype), indent=2))
    return path
