"""HF safetensors -> Orbax (streamed, bounded memory, atomic) and Orbax -> HF safetensors.

Import: every source (HF directory, GGUF file) speaks HF names; `convert_source` validates names
and shapes before anything is written, then builds one stacked parameter at a time as a global
`jax.Array` whose per-device callback reads only the layers that device owns, and appends it to
an Orbax partial checkpoint. Host memory therefore holds about one stacked parameter (and with
P processes, 1/P of it each). Output goes to a hidden sibling directory renamed into place at
the end, so an interrupted run leaves OUT absent or untouched.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding
from tqdm import tqdm

from convert.names import Rule, check_names, flatten, hf_names, param_shapes, rules_for, unflatten
from convert.safetensors_io import SafetensorsFile, write_safetensors
from convert.source import ConversionError, Source
from qwq_jax.checkpoint import TOKENIZER_FILES, param_shardings, read_config, restore_params, tokenizer_dir
from qwq_jax.cli import phase
from qwq_jax.config import QwenConfig
from qwq_jax.model import as_dtype

OUT_DTYPES = ("bfloat16", "float32", "float16")


class HFSource:
    """A local HF model directory: config.json, *.safetensors (+ index), tokenizer files."""

    def __init__(self, src: str | os.PathLike):
        src = Path(src)
        if not src.is_dir():
            raise ConversionError(f"{src}: no such directory")
        config_path = src / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{src}: no config.json (expected a Hugging Face model directory)")
        try:
            self.hf_config = json.loads(config_path.read_text(encoding="utf-8"))
            self.config = QwenConfig.from_hf(self.hf_config)
        except (ValueError, json.JSONDecodeError) as e:
            raise ConversionError(f"{config_path}: {e}") from None
        index_path = src / "model.safetensors.index.json"
        weight_map: dict[str, str] | None = None
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (KeyError, ValueError, TypeError):
                raise ConversionError(f"{index_path}: no valid weight_map") from None
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (src / f).is_file():
                    raise ConversionError(f"{src / f}: shard named in model.safetensors.index.json is missing")
        else:
            files = sorted(p.name for p in src.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{src}: no *.safetensors files (PyTorch .bin checkpoints are not read)")
        self.files = {f: SafetensorsFile(src / f) for f in files}
        self.where: dict[str, SafetensorsFile] = {}
        for f, st in self.files.items():
            for name in st.tensors:
                if name in self.where:
                    raise ConversionError(f"tensor {name} appears in both {self.where[name].path.name} and {f}")
                if weight_map is not None and weight_map.get(name) != f:
                    raise ConversionError(f"{src / f}: tensor {name} is not where model.safetensors.index.json "
                                          f"says ({weight_map.get(name)})")
                self.where[name] = st
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.where))
            if absent:
                raise ConversionError(f"{index_path}: {len(absent)} indexed tensors are in no shard: "
                                      + ", ".join(absent[:4]))
        self.extra_files = {name: (src / name).read_bytes() for name in TOKENIZER_FILES if (src / name).is_file()}

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self.where[name].dtype(name)

    def nbytes(self, name: str) -> int:
        return self.where[name].nbytes(name)

    def source_dtype(self) -> str:
        name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(
            self.dtype("model.embed_tokens.weight"), "bfloat16") if "model.embed_tokens.weight" in self.where \
            else "bfloat16"
        return name

    def read(self, name: str) -> np.ndarray:
        return self.where[name].read(name)


# ---- import ---------------------------------------------------------------------------------

def validate(source: Source) -> None:
    """Names and shapes of the source against its config; raises ConversionError naming the tensor."""
    cfg = source.config
    try:
        check_names(cfg, set(source.names()))
    except ValueError as e:
        raise ConversionError(str(e)) from None
    shapes = param_shapes(cfg)
    for name, rule, layer in hf_names(cfg):
        ours = shapes[rule.ours][1:] if rule.per_layer else shapes[rule.ours]
        if tuple(source.shape(name)) != rule.hf_shape(ours):
            raise ConversionError(f"tensor {name} has shape {tuple(source.shape(name))}, config.json implies "
                                  f"{rule.hf_shape(ours)}")


def _default_sharding(shape: tuple[int, ...]) -> jax.sharding.Sharding:
    """Split the first dimension (layers, for stacked parameters) that divides the device count."""
    devices = jax.devices()
    if len(devices) == 1:
        return SingleDeviceSharding(devices[0])
    mesh = Mesh(np.array(devices), ("all",))
    for i, dim in enumerate(shape):
        if dim % len(devices) == 0:
            return NamedSharding(mesh, P(*([None] * i + ["all"])))
    return NamedSharding(mesh, P())


class _Reader:
    """Reads source tensors into our layout; counts bytes for the progress bar; caches one tensor."""

    def __init__(self, source: Source, dtype: np.dtype, on_read: Callable[[int], None]):
        self.source, self.dtype, self.on_read = source, dtype, on_read
        self._last: tuple[str, np.ndarray] | None = None

    def ours(self, name: str, rule: Rule, shape: tuple[int, ...]) -> np.ndarray:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        x = self.source.read(name)
        self.on_read(x.nbytes)
        x = rule.to_ours(x, shape).astype(self.dtype, copy=False)
        self._last = (name, x)
        return x


def _build(rule: Rule, full: tuple[int, ...], sharding, reader: _Reader, num_layers: int) -> jax.Array:
    def shard(index: tuple[slice, ...]) -> np.ndarray:
        if not rule.per_layer:
            return reader.ours(rule.hf, rule, full)[index]
        layers = range(*index[0].indices(num_layers))
        out = None
        for j, i in enumerate(layers):
            piece = reader.ours(rule.hf.format(layer=i), rule, full[1:])[index[1:]]
            if out is None:
                out = np.empty((len(layers),) + piece.shape, reader.dtype)
            out[j] = piece
        return out

    return jax.make_array_from_callback(full, sharding, shard)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, replacing an existing `out` only once `tmp` is complete."""
    old = out.with_name(f"{out.name}.old")
    _remove(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    _remove(old)


def convert_source(source: Source, out: str | os.PathLike, *, dtype: str | None = None,
                   mesh: Mesh | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Write `source` as a qwq-jax checkpoint at `out`; returns a summary dict."""
    import orbax.checkpoint.experimental.v1 as ocp

    start = time.perf_counter()
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists (pass --overwrite to replace it)")
    if not out.parent.is_dir():
        raise ConversionError(f"{out.parent}: output's parent directory does not exist")
    dtype = dtype or source.source_dtype()
    if dtype not in OUT_DTYPES:
        raise ConversionError(f"unsupported --dtype {dtype!r} (choose from {', '.join(OUT_DTYPES)})")
    validate(source)
    cfg = source.config
    np_dtype = np.dtype(as_dtype(dtype))
    shapes = param_shapes(cfg)
    targets = flatten(param_shardings(cfg, mesh, "train", dtype)) if mesh is not None else None

    primary = jax.process_index() == 0
    tmp = out.with_name(f"{out.name}.converting")  # not hidden: Orbax globs its staging dirs
    staging = [tmp, tmp.with_name(tmp.name + ".partial_save")]
    if primary:
        for p in staging:
            _remove(p)
    _sync("convert:start")
    total = sum(int(np.prod(source.shape(n))) * np.dtype(source.dtype(n)).itemsize for n, _, _ in hf_names(cfg))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert -> {out.name}", file=sys.stderr,
               disable=not (progress and primary), dynamic_ncols=True)
    reader = _Reader(source, np_dtype, bar.update)
    try:
        for rule in rules_for(cfg):
            full = shapes[rule.ours]
            sharding = targets[rule.ours].sharding if targets is not None else _default_sharding(full)
            array = _build(rule, full, sharding, reader, cfg.num_layers)
            reader._last = None
            bar.set_postfix_str(f"writing {rule.ours}")
            ocp.partial.save(tmp, unflatten({rule.ours: array}))
            bar.set_postfix_str("")
            del array
        bar.close()  # the bar ends with its phase; what follows has its own line
        with phase(f"finalizing {out.name} (Orbax merges the saved pieces; config and tokenizer files)",
                   enabled=progress and primary):
            ocp.partial.finalize(tmp)
            if primary:
                hf = dict(source.hf_config, torch_dtype=dtype)
                hf.pop("dtype", None)
                (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
                for name, data in source.extra_files.items():
                    if name != "config.json":
                        (tmp / name).write_bytes(data)
                _publish(tmp, out)
            _sync("convert:done")
    except BaseException:
        bar.close()
        if primary:
            for p in staging:
                _remove(p)
        raise
    bar.close()
    seconds = time.perf_counter() - start
    return {"out": str(out), "parameters": cfg.num_params(), "dtype": dtype,
            "bytes_read": total, "bytes_written": cfg.num_params() * np_dtype.itemsize,
            "seconds": round(seconds, 3), "peak_rss_bytes": _peak_rss_bytes()}


# ---- export ---------------------------------------------------------------------------------

def export_hf(ckpt: str | os.PathLike, hfdir: str | os.PathLike, *, overwrite: bool = False,
              max_shard_bytes: int = 5 * 10**9, progress: bool = True) -> dict:
    """Write the checkpoint at `ckpt` (a converted one, or a training step `RUN/checkpoints/STEP`: its
    float32 master weights) as a HF model directory (safetensors shards + index)."""
    start = time.perf_counter()
    ckpt, hfdir = Path(ckpt).absolute(), Path(hfdir).absolute()
    try:
        cfg = read_config(ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(str(e)) from None
    if hfdir.exists() and not overwrite:
        raise ConversionError(f"{hfdir} already exists (pass --overwrite to replace it)")
    np_dtype = np.dtype(as_dtype(cfg.dtype))
    targets = flatten(param_shardings(cfg, None, "generate", cfg.dtype))
    names = list(hf_names(cfg))

    def hf_shape(rule: Rule) -> tuple[int, ...]:
        full = targets[rule.ours].shape
        return rule.hf_shape(full[1:] if rule.per_layer else full)

    # Shards of at most max_shard_bytes, in table order (one stacked parameter restored at a time).
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for name, rule, _ in names:
        shape = hf_shape(rule)
        n = math.prod(shape) * np_dtype.itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, np_dtype))
        size += n
    lookup = {name: (rule, layer) for name, rule, layer in names}
    cache: dict[str, np.ndarray] = {}

    def produce(name: str) -> np.ndarray:
        rule, layer = lookup[name]
        if rule.ours not in cache:
            cache.clear()
            restored = restore_params(ckpt, unflatten({rule.ours: targets[rule.ours]}))
            cache[rule.ours] = np.asarray(flatten(restored)[rule.ours])
        x = cache[rule.ours]
        return rule.to_hf(x if layer is None else x[layer])

    tmp = hfdir.with_name(f"{hfdir.name}.exporting")
    _remove(tmp)
    tmp.mkdir(parents=True)
    total = sum(math.prod(s) * d.itemsize for shard in shards for _, s, d in shard)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"export -> {hfdir.name}", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        files = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for fname, shard in zip(files, shards):
            write_safetensors(tmp / fname, shard, produce, on_tensor=bar.update)
            weight_map.update({name: fname for name, _, _ in shard})
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
        tok_dir = tokenizer_dir(ckpt)  # a training step: the tokenizer its run trained with (None: bytes)
        for name in TOKENIZER_FILES:
            if tok_dir is not None and (tok_dir / name).is_file():
                shutil.copyfile(tok_dir / name, tmp / name)
        _publish(tmp, hfdir)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        bar.close()
    return {"out": str(hfdir), "files": len(shards), "bytes_written": total,
            "seconds": round(time.perf_counter() - start, 3), "peak_rss_bytes": _peak_rss_bytes()}
