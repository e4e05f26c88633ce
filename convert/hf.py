"""HF safetensors -> Orbax (streamed, bounded memory, atomic) and Orbax -> HF safetensors.

Import: every source (HF directory, GGUF file) speaks HF names; `convert_source` validates names
and shapes before anything is written, then writes the checkpoint a group of whole layers at a time
(up to GROUP_BYTES; the embedding, and the final norm with lm_head, in groups of their own), each
layer its own subtree `layers/<i>/...` (see qwq_jax/checkpoint.py, which restacks at restore). Each
tensor is a global `jax.Array` whose per-device callback reads only the rows of the source that
device holds (one contiguous byte range of a safetensors file); a group is handed to an Orbax
partial save that writes it while the next group is read. Host memory therefore holds about two
groups (or twice the embedding, if larger) whatever the depth, and with P processes each reads and
holds 1/P of it. Output goes to a sibling directory renamed into place at the end, so an interrupted
run leaves OUT absent or untouched.

Export: a layer group restored at a time (stacked checkpoints of earlier versions and training steps:
one stacked parameter at a time), written into safetensors shards and fsync'd before the rename.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding
from tqdm import tqdm

from convert.names import Rule, check_names, flatten, hf_names, param_shapes, rules_for, unflatten
from convert.safetensors_io import SafetensorsFile, write_safetensors
from convert.source import ConversionError, Source
from qwq_jax.checkpoint import (TOKENIZER_FILES, MergedLoRA, inspect_path, load, lora_run, param_shardings,
                                 read_config, read_stored, release_host_memory, restore_params, stored_layers,
                                 tokenizer_dir)
from qwq_jax.cli import phase
from qwq_jax.config import QwenConfig
from qwq_jax.model import as_dtype

OUT_DTYPES = ("bfloat16", "float32", "float16")
EXPORT_GROUP_BYTES = 128 * 2**20  # per restore of export-hf (two in memory: one written, one restored)
GROUP_BYTES = 256 * 2**20  # per partial save: Orbax's per-save cost (barriers, metadata merges) stays small


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

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of `name` (its first dimension), read alone."""
        return self.where[name].read_rows(name, start, stop)


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


def _default_sharding(shape: tuple[int, ...], prefer: int = 0) -> jax.sharding.Sharding:
    """Split dimension `prefer` over all devices if it divides their count, else the first that does."""
    devices = jax.devices()
    if len(devices) == 1:
        return SingleDeviceSharding(devices[0])
    mesh = Mesh(np.array(devices), ("all",))
    for i in [prefer] + list(range(len(shape))):
        if shape[i] % len(devices) == 0:
            return NamedSharding(mesh, P(*([None] * i + ["all"])))
    return NamedSharding(mesh, P())


def _row_axis(rule: Rule) -> int:
    """Our (per-layer) dimension that runs along the HF tensor's first dimension (rows), and so along
    the file: a slice of it is one contiguous byte range of the source."""
    return rule.in_dims if rule.kind == "linear" else 0


class _Reader:
    """Reads source tensors (or the rows one device needs) into our layout; caches one whole tensor."""

    def __init__(self, source: Source, dtype: np.dtype):
        self.source, self.dtype = source, dtype
        self._last: tuple[str, np.ndarray] | None = None

    def ours(self, name: str, rule: Rule, shape: tuple[int, ...]) -> np.ndarray:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        x = rule.to_ours(self.source.read(name), shape).astype(self.dtype, copy=False)
        self._last = (name, x)
        return x

    def ours_slice(self, name: str, rule: Rule, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
        """`ours(...)[index]`, reading only the source rows under `index` when the source can."""
        axis = _row_axis(rule)
        start, stop, step = index[axis].indices(shape[axis])
        read_rows = getattr(self.source, "read_rows", None)
        if read_rows is None or step != 1 or (start, stop) == (0, shape[axis]):
            return self.ours(name, rule, shape)[index]
        unit = math.prod(shape[axis + 1:]) if rule.kind != "copy" else 1  # HF rows per step along `axis`
        part = shape[:axis] + (stop - start,) + shape[axis + 1:]
        x = rule.to_ours(read_rows(name, start * unit, stop * unit), part).astype(self.dtype, copy=False)
        return x[index[:axis] + (slice(None),) + index[axis + 1:]]


def _layer_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of a parameter stacked with `sharding` (its `layers` axis dropped)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    return sharding


def _groups(cfg: QwenConfig, shapes: dict[str, tuple[int, ...]], itemsize: int,
            group_bytes: int) -> list[list[tuple[Rule, int | None]]]:
    """What each partial save writes: the embedding alone, consecutive layers up to `group_bytes`
    (at least one layer), then the final norm and lm_head."""
    rules = rules_for(cfg)
    layer_rules = [r for r in rules if r.per_layer]
    layer_bytes = sum(math.prod(shapes[r.ours][1:]) for r in layer_rules) * itemsize
    per_group = max(1, group_bytes // max(layer_bytes, 1))
    groups: list[list[tuple[Rule, int | None]]] = [[(r, None) for r in rules if r.ours == "embed"]]
    for first in range(0, cfg.num_layers, per_group):
        groups.append([(r, i) for i in range(first, min(first + per_group, cfg.num_layers)) for r in layer_rules])
    groups.append([(r, None) for r in rules if not r.per_layer and r.ours != "embed"])
    return [g for g in groups if g]


def _build(rule: Rule, layer: int | None, shape: tuple[int, ...], sharding, reader: _Reader) -> jax.Array:
    """One source tensor in our layout, as a global array: each device's callback reads its slice."""
    name = rule.hf if layer is None else rule.hf.format(layer=layer)
    return jax.make_array_from_callback(shape, sharding,
                                        lambda index: reader.ours_slice(name, rule, shape, index))


def _save_context():
    """Orbax saving options: no compression (weights barely compress; zstd would halve throughput)."""
    import orbax.checkpoint.experimental.v1 as ocp

    ctx = ocp.Context()
    try:
        ctx.array.saving.use_compression = False
    except AttributeError:  # older orbax: options passed to the constructor
        try:
            return ocp.Context(array_options=ocp.options.ArrayOptions(
                saving=ocp.options.ArrayOptions.Saving(use_compression=False)))
        except (AttributeError, TypeError):
            pass
    return ctx


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
                   mesh: Mesh | None = None, overwrite: bool = False, progress: bool = True,
                   group_bytes: int = GROUP_BYTES) -> dict:
    """Write `source` as a qwq-jax checkpoint at `out`; returns a summary dict.

    group_bytes: how much each partial save writes (whole layers, at least one); peak host memory is
    about twice this (one group written while the next is read) or twice the embedding, if larger.
    """
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
    reader = _Reader(source, np_dtype)
    pending = None
    clock = {"read": 0.0, "write": 0.0, "finalize": 0.0}  # where the time goes (the summary reports it)
    try:
        with _save_context():
            # One partial save per group of layers, each layer its own subtree (`layers/<i>/...`):
            # host memory holds the group being written and the next one being read, whatever the depth.
            for group in _groups(cfg, shapes, np_dtype.itemsize, group_bytes):
                t0 = time.perf_counter()
                arrays = {}
                for rule, layer in group:
                    full = shapes[rule.ours]
                    stacked = targets[rule.ours].sharding if targets is not None else None
                    if layer is None:
                        shape, key = full, rule.ours
                        sharding = stacked or _default_sharding(shape, _row_axis(rule))
                    else:
                        shape, key = full[1:], f"layers.{layer}.{rule.ours[len('layers.'):]}"
                        sharding = (_layer_sharding(stacked) if stacked is not None
                                    else _default_sharding(shape, _row_axis(rule)))
                    arrays[key] = _build(rule, layer, shape, sharding, reader)
                    reader._last = None
                    name = rule.hf if layer is None else rule.hf.format(layer=layer)
                    bar.update(math.prod(source.shape(name)) * np.dtype(source.dtype(name)).itemsize)
                t1 = time.perf_counter()
                if pending is not None:  # the previous group's write, which ran while this one was read
                    pending.result()
                    release_host_memory()
                pending = ocp.partial.save_async(tmp, unflatten(arrays))
                del arrays
                clock["read"] += t1 - t0
                clock["write"] += time.perf_counter() - t1
            t1 = time.perf_counter()
            if pending is not None:
                bar.set_postfix_str("writing")
                pending.result()
                pending = None
            clock["write"] += time.perf_counter() - t1
        bar.close()  # the bar ends with its phase; what follows has its own line
        t1 = time.perf_counter()
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
        clock["finalize"] = time.perf_counter() - t1
    except BaseException:
        bar.close()
        if pending is not None:  # let the write in flight end before its directory goes
            try:
                pending.result()
            except BaseException:  # noqa: BLE001  (the first error is the one reported)
                pass
        if primary:
            for p in staging:
                _remove(p)
        raise
    bar.close()
    seconds = time.perf_counter() - start
    return {"out": str(out), "parameters": cfg.num_params(), "dtype": dtype,
            "bytes_read": total, "bytes_written": cfg.num_params() * np_dtype.itemsize,
            "seconds": round(seconds, 3), "peak_rss_bytes": _peak_rss_bytes(),
            # read: source reads, dequantization and layout changes; write: waiting for Orbax's writes
            # beyond that (they overlap the next group's read); finalize: Orbax's merge and the rename.
            "time_s": {k: round(v, 3) for k, v in clock.items()}}


# ---- export ---------------------------------------------------------------------------------

def export_hf(ckpt: str | os.PathLike, hfdir: str | os.PathLike, *, overwrite: bool = False,
              max_shard_bytes: int = 5 * 10**9, progress: bool = True) -> dict:
    """Write the checkpoint at `ckpt` (a converted one, or a training step `RUN/checkpoints/STEP`: its
    float32 master weights; a LoRA run's step: its base with the adapters merged, in float32) as a HF
    model directory (safetensors shards + index)."""
    start = time.perf_counter()
    ckpt, hfdir = Path(ckpt).absolute(), Path(hfdir).absolute()
    try:
        cfg = read_config(ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(str(e)) from None
    if hfdir.exists() and not overwrite:
        raise ConversionError(f"{hfdir} already exists (pass --overwrite to replace it)")
    merged, merger, lora = None, None, lora_run(ckpt) is not None
    if lora:
        # A LoRA run's step holds adapters only: its base (the run's model.path; an int8 base
        # dequantized) with the adapters merged, W + (alpha/r) A B, in float32. Where the base is a
        # checkpoint stored a layer per array, a layer group at a time as below (MergedLoRA); else
        # (a preset base) qwq_jax.load merges the whole model in memory.
        try:
            merger = MergedLoRA.of(ckpt, cfg.dtype)
        except (FileNotFoundError, ValueError) as e:
            raise ConversionError(str(e)) from None
    if lora and merger is None:
        try:
            with phase(f"merging the LoRA adapters of {ckpt} into their base", enabled=progress):
                model = load(ckpt, merge_lora=True, dtype=cfg.dtype)
        except (FileNotFoundError, ValueError) as e:
            raise ConversionError(str(e)) from None
        merged = flatten(nnx.to_pure_dict(nnx.state(model)))
        del model
    np_dtype = np.dtype(as_dtype(cfg.dtype))
    targets = flatten(param_shardings(cfg, None, "generate", cfg.dtype))
    names = list(hf_names(cfg))

    def hf_shape(rule: Rule) -> tuple[int, ...]:
        full = targets[rule.ours].shape
        return rule.hf_shape(full[1:] if rule.per_layer else full)

    if merger is not None:
        per_layer = merger.num_layers
        read_arrays = merger.read
    else:
        per_layer = stored_layers(ckpt) if inspect_path(ckpt).kind == "checkpoint" else None

        def read_arrays(wanted: list[str]) -> dict[str, np.ndarray]:
            return read_stored(ckpt, wanted, np_dtype)
    if per_layer is not None:
        # Layer by layer (embedding, layer 0, 1, ..., final norm, lm_head): groups of layers restored
        # together, up to EXPORT_GROUP_BYTES; the group being written and the next one in memory.
        layer_names = [[(n, r, i) for n, r, i in names if i == layer] for layer in range(cfg.num_layers)]
        layer_bytes = sum(math.prod(hf_shape(r)) for _, r, _ in layer_names[0]) * np_dtype.itemsize if \
            layer_names else 0
        per_group = max(1, EXPORT_GROUP_BYTES // max(layer_bytes, 1))
        names = ([x for x in names if x[1].ours == "embed"] + [x for group in layer_names for x in group]
                 + [x for x in names if not x[1].per_layer and x[1].ours != "embed"])
    # else: the stacked layout or a training step, in table order (one stacked parameter at a time).

    # Shards of at most max_shard_bytes.
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

    def group_of(name: str) -> tuple:
        """What one restore brings in for `name`: a stacked parameter, a global one, or a layer group."""
        rule, layer = lookup[name]
        if per_layer is None or layer is None:
            return (rule.ours,)
        return ("layers", layer - layer % per_group)

    def restore_group(group: tuple) -> dict[str, np.ndarray]:
        """The arrays of `group` on the host, keyed by their on-disk path (the stacked path if stacked)."""
        if merged is not None:
            return {group[0]: np.asarray(merged[group[0]])}
        if per_layer is None:
            restored = restore_params(ckpt, unflatten({group[0]: targets[group[0]]}))
            out = {k: np.asarray(v) for k, v in flatten(restored).items()}
            del restored
            release_host_memory()
            return out
        if group[0] != "layers":
            return read_arrays([group[0]])
        first = group[1]
        return read_arrays([f"layers.{i}.{r.ours[len('layers.'):]}"
                            for i in range(first, min(first + per_group, cfg.num_layers))
                            for r in rules_for(cfg) if r.per_layer])

    # The next layer group is restored on a worker thread while this one is transposed and written.
    order = list(dict.fromkeys(group_of(name) for name, _, _ in names))
    position = {g: i for i, g in enumerate(order)}
    pool = ThreadPoolExecutor(1, thread_name_prefix="export-restore")
    ahead: dict[int, Future] = {}
    current: dict = {"group": None, "arrays": {}}
    restoring = [0.0]

    def produce(name: str) -> np.ndarray:
        rule, layer = lookup[name]
        group = group_of(name)
        if current["group"] != group:
            t0 = time.perf_counter()
            current.update(group=None, arrays={})
            i = position[group]
            future = ahead.pop(i, None) or pool.submit(restore_group, group)
            current.update(group=group, arrays=future.result())
            if i + 1 < len(order) and per_layer is not None:  # stacked: one parameter at a time
                ahead[i + 1] = pool.submit(restore_group, order[i + 1])
            restoring[0] += time.perf_counter() - t0
        if per_layer is None:
            x = current["arrays"][rule.ours]
            return rule.to_hf(x if layer is None else x[layer])
        key = rule.ours if layer is None else f"layers.{layer}.{rule.ours[len('layers.'):]}"
        return rule.to_hf(current["arrays"][key])

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
            write_safetensors(tmp / fname, shard, produce, on_tensor=bar.update, sync=True)
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
        for future in ahead.values():
            future.cancel()
        pool.shutdown(wait=True)
    seconds = time.perf_counter() - start
    return {"out": str(hfdir), "files": len(shards), "bytes_written": total,
            "seconds": round(seconds, 3), "peak_rss_bytes": _peak_rss_bytes(),
            # read: waiting for restores (beyond what overlaps the writes); write: layout changes and the
            # fsync'd safetensors writes
            "time_s": {"read": round(restoring[0], 3), "write": round(seconds - restoring[0], 3)}}
