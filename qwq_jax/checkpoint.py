"""Orbax save / restore of model parameters, straight onto any mesh.

A qwq-jax checkpoint directory is an Orbax checkpoint of the model's parameters plus `config.json`,
tokenizer files and `generation_config.json` beside it, so the directory alone is enough to sample.

On disk each layer is its own subtree, `layers/<i>/...` (`embed`, `final_norm`, `lm_head` beside),
so a converter writes, and an exporter reads, one layer at a time. In memory the model holds the
layers stacked (`layers/...` with a leading `layers` axis, for scan): `restore_params` allocates each
stacked parameter on its target sharding and fills it a layer at a time (each process reads only its
devices' part of that layer), so a restore holds the device shards plus one layer's tensors.
Checkpoints of the earlier stacked layout (and training steps, which store the stacked state) restore
as before, straight onto the target sharding.

A training checkpoint (`RUN_DIR/checkpoints/STEP`, written by `python -m qwq_jax.train`) loads the
same way: its float32 master weights are the `params` of its `state` item, and the model's config
and tokenizer are found through its `meta` item. `inspect_path` says what any path is (ours, a
training step or run, a Hugging Face directory, a GGUF file, empty, missing); every entry point
asks it before loading, so a wrong path is one line naming the command that fixes it.

A step of a LoRA run holds its adapters alone: `load` rebuilds the run's base from its model.path
(`lora_run` reads what the trainer built it from), restores the adapters onto it and merges them
(`lora.merge`) unless the base is int8; sample, serve and export-hf all go through it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from qwq_jax.config import QwenConfig
from qwq_jax.model import Qwen2, abstract_model, as_dtype
from qwq_jax.stored import NotStored, StoredArrays, Unreadable, release_host_memory

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json")


def _ocp():
    import orbax.checkpoint.experimental.v1 as ocp

    return ocp


def _partial_load_context():
    """An Orbax context that restores only the leaves named in the abstract tree."""
    ocp = _ocp()
    ctx = ocp.Context()
    try:
        ctx.pytree.loading.partial_load = True
        return ctx
    except AttributeError:  # older orbax: options passed to the constructor
        loading = ocp.options.PyTreeOptions.Loading(partial_load=True)
        return ocp.Context(pytree_options=ocp.options.PyTreeOptions(loading=loading))


def param_shardings(cfg: QwenConfig, mesh: Mesh | None = None, rules: str | Mapping = "generate",
                    dtype: Any = "bfloat16") -> dict:
    """Nested dict of `jax.ShapeDtypeStruct` (with shardings) for every parameter of `cfg`."""
    from sharding import state_shardings

    state = nnx.state(abstract_model(cfg, param_dtype=dtype))
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, state)
    else:
        shardings = state_shardings(state, mesh, rules)
    return nnx.to_pure_dict(jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings))


def per_layer(params: Mapping) -> dict:
    """The on-disk form of a parameter tree: stacked `layers` leaves split into `layers/<i>/...`."""
    params = dict(params)
    if "layers" in params:
        stacked = params["layers"]
        num_layers = jax.tree.leaves(stacked)[0].shape[0]
        params["layers"] = {str(i): jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)}
    return params


def save_params(path: str | os.PathLike, params: Mapping) -> None:
    """Write a parameter tree (nested dict of arrays, layers stacked) as a checkpoint at `path`.

    Holds the whole tree: for small models and tests (`python -m convert` writes a layer at a time).
    """
    _ocp().save(os.fspath(path), per_layer(params))


ORBAX_ITEM = "state"  # the directory Orbax keeps a saved pytree in, inside a checkpoint


def require_weights(path: str | os.PathLike) -> None:
    """CheckpointError unless the checkpoint at `path` has its weights directory (its config alone is
    enough for what reads only the config: sampling defaults, the model's shape)."""
    if not (Path(path) / ORBAX_ITEM).is_dir():
        raise CheckpointError(f"{path} has a config.json but no weights (no {ORBAX_ITEM}/ directory: the conversion "
                              "did not finish, or the weights were moved); convert the model again with "
                              "`python -m convert`")


def _stored_arrays(path: str | os.PathLike) -> StoredArrays:
    """The arrays of the checkpoint at `path` as stored (CheckpointError if they cannot be read so)."""
    require_weights(path)
    try:
        return StoredArrays(Path(path) / ORBAX_ITEM)
    except NotStored as e:
        raise CheckpointError(f"{e}; re-convert the model with python -m convert") from None


def stored_layers(path: str | os.PathLike) -> int | None:
    """How many per-layer subtrees the checkpoint at `path` stores (None: the stacked layout)."""
    require_weights(path)
    try:
        names = StoredArrays(Path(path) / ORBAX_ITEM).names
    except Unreadable as e:  # Orbax could not read it either (it would only log a warning)
        raise CheckpointError(f"{e}; re-convert the model with python -m convert") from None
    except NotStored:  # whatever else Orbax reads
        tree = _ocp().pytree_metadata(os.fspath(path)).metadata
        names = list(flatten(tree)) if isinstance(tree, Mapping) else []
    layers = {n.split(".")[1] for n in names if n.startswith("layers.")}
    if layers and all(k.isdigit() for k in layers):
        return len(layers)
    return None


def _drop_layer_axis(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer of an array stacked with `sharding` (the leading axis dropped)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    if isinstance(sharding, SingleDeviceSharding):
        return sharding
    raise ValueError(f"cannot restore a stacked parameter onto {type(sharding).__name__}; "
                     "use a NamedSharding or SingleDeviceSharding")


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: dict, layer: dict, i: jax.Array) -> dict:
    """stacked[k][i] = layer[k] for every k, in place (the stacked buffers are donated)."""
    return {k: jax.lax.dynamic_update_index_in_dim(stacked[k], layer[k].astype(stacked[k].dtype), i, 0)
            for k in stacked}


def _to_devices(arrays: StoredArrays, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    missing = [name for name in targets if name not in arrays.names]
    if missing:
        raise CheckpointError(f"{arrays.dir.parent}: the checkpoint has no parameter {missing[0]}")
    try:
        return arrays.to_devices(targets)
    except NotStored as e:
        raise CheckpointError(str(e)) from None


def _in_host_memory(devices: set) -> bool:
    """Whether `devices` keep their arrays in this process's own memory (the CPU backend): stacked
    arrays are then assembled in host buffers the devices adopt, elsewhere filled on the devices."""
    return all(d.platform == "cpu" for d in devices)


def _restore_stacked(arrays: StoredArrays, target: dict[str, jax.ShapeDtypeStruct], num_layers: int) -> dict:
    """Stacked leaves (flat `rest -> ShapeDtypeStruct` under `layers`) from per-layer arrays.

    On the CPU backend each device's part is allocated once and the layers read into it
    (`StoredArrays.stacked_to_devices`). Elsewhere each stacked array is allocated on its target
    sharding, then filled a layer at a time: the layer's arrays are read onto the stacked sharding less
    its leading axis (each process reads only its devices' part), written into place (the stacked
    buffers are donated: no second copy) and freed. Either way a restore holds the devices' arrays
    plus one layer.
    """
    depths = {v.shape[0] for v in target.values()}
    if depths != {num_layers}:
        raise CheckpointError(f"{arrays.dir.parent}: the checkpoint stores {num_layers} layers, the config asks "
                              f"for {', '.join(map(str, sorted(depths)))}")
    if _in_host_memory({d for v in target.values() for d in v.sharding.addressable_devices}):
        try:
            stacked = arrays.stacked_to_devices(target, num_layers, lambda i, k: f"layers.{i}.{k}")
        except NotStored as e:
            raise CheckpointError(str(e)) from None
        release_host_memory()
        return stacked
    shardings = {k: v.sharding for k, v in target.items()}
    stacked = jax.jit(lambda: {k: jnp.zeros(v.shape, v.dtype) for k, v in target.items()},
                      out_shardings=shardings)()
    one = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype, sharding=_drop_layer_axis(v.sharding))
           for k, v in target.items()}
    for i in range(num_layers):
        layer = _to_devices(arrays, {f"layers.{i}.{k}": v for k, v in one.items()})
        layer = {k: layer[f"layers.{i}.{k}"] for k in one}
        stacked = jax.block_until_ready(_set_layer(stacked, layer, jnp.int32(i)))
        del layer
        release_host_memory()
    return stacked


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """A nested mapping as {"a.b.c": leaf}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(flat: Mapping) -> dict:
    """The inverse of `flatten`."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


class CheckpointError(FileNotFoundError):
    """A path that is not a loadable checkpoint; the message names what it is and the fix."""


@dataclasses.dataclass(frozen=True)
class PathKind:
    """What a path holds. kind: checkpoint (ours), training_step (RUN/checkpoints/STEP),
    training_run (RUN, or RUN/checkpoints), hf (a Hugging Face model directory), gguf, empty,
    missing, file (some other file), unknown (some other directory)."""

    kind: str
    path: Path
    newest_step: Path | None = None  # training_run: its newest complete checkpoint


def _steps(checkpoints: Path) -> list[Path]:
    """Complete step directories of a CheckpointManager directory, oldest first."""
    steps = [p for p in checkpoints.iterdir() if p.name.isdigit() and p.is_dir()
             and (p / "_CHECKPOINT_METADATA").is_file()] if checkpoints.is_dir() else []
    return sorted(steps, key=lambda p: int(p.name))


def inspect_path(path: str | os.PathLike) -> PathKind:
    """What `path` is, from the files it holds (nothing is loaded)."""
    path = Path(path)
    if not path.exists():
        return PathKind("missing", path)
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
        return PathKind("gguf" if magic == b"GGUF" or path.suffix == ".gguf" else "file", path)
    names = {p.name for p in path.iterdir()}
    if not names:
        return PathKind("empty", path)
    if "config.json" in names and names & {"_CHECKPOINT_METADATA", "_METADATA", "state", "manifest.ocdbt"}:
        return PathKind("checkpoint", path)
    if {"state", "meta"} <= names:
        return PathKind("training_step", path)
    if "config.json" in names and any(n.endswith((".safetensors", ".safetensors.index.json")) or
                                      (n.startswith("pytorch_model") and n.endswith(".bin")) for n in names):
        return PathKind("hf", path)
    if (path / "checkpoints").is_dir() or (path.name == "checkpoints" and any(n.isdigit() for n in names)):
        steps = _steps(path / "checkpoints" if path.name != "checkpoints" else path)
        return PathKind("training_run", path, steps[-1] if steps else None)
    return PathKind("unknown", path)


def describe_problem(info: PathKind, wanted: str = "a qwq-jax checkpoint") -> str | None:
    """One line saying why `info.path` is not `wanted` and what to run instead (None: it is loadable)."""
    p = info.path
    if info.kind == "missing":
        return f"{p} does not exist"
    if info.kind == "hf":
        return (f"{p} looks like a Hugging Face model directory; convert it with "
                f"`python -m convert hf {p} OUT` and use OUT")
    if info.kind == "gguf":
        return f"{p} is a GGUF file; convert it with `python -m convert gguf {p} OUT` and use OUT"
    if info.kind == "training_run":
        if info.newest_step is None:
            return f"{p} is a training run directory with no complete checkpoint yet"
        return (f"{p} is a training run directory, not one checkpoint; use a step of it, e.g. the newest: "
                f"{info.newest_step}")
    if info.kind == "empty":
        return f"{p} is an empty directory, not {wanted} (write one with `python -m convert hf SRC {p}`)"
    if info.kind == "file":
        return f"{p} is a file, not {wanted} (a directory written by `python -m convert`)"
    if info.kind == "unknown":
        return (f"{p} is not {wanted} (no config.json beside Orbax weights); convert a model with "
                f"`python -m convert hf SRC OUT` (or `gguf FILE OUT`) and use OUT")
    return None


def require_checkpoint(path: str | os.PathLike, wanted: str = "a qwq-jax checkpoint") -> PathKind:
    """`inspect_path(path)`, or CheckpointError (one line naming the fix) unless it can be loaded."""
    info = inspect_path(path)
    problem = describe_problem(info, wanted)
    if problem is not None:
        raise CheckpointError(problem)
    return info


def _training_meta(step_dir: Path) -> dict:
    try:
        meta = json.loads((step_dir / "meta" / "metadata").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{step_dir}: unreadable training checkpoint metadata ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{step_dir}: unreadable training checkpoint metadata (not a JSON object)")
    return meta


def _quantized_leaf(key: str) -> str | None:
    """The matmul weight a flat `layers.` key names (`attn.q_proj` -> `q_proj`), if int8 quantizes it."""
    from qwq_jax.quant import KERNELS

    name = key.rsplit(".", 1)[-1]
    return name if name in KERNELS else None


def _restore_quantized(arrays: StoredArrays, targets: dict[str, jax.ShapeDtypeStruct], num_layers: int) -> dict:
    """Stacked matmul weights (flat `rest -> ShapeDtypeStruct`, float, under `layers`) read a layer at a
    time and quantized as they arrive (`qwq_jax.quant`): `rest` int8 and `rest_scale`. What is held is
    the int8 stacks plus one layer's float weights, never the float model."""
    from qwq_jax.quant import KERNELS, StackedInt8

    depths = {v.shape[0] for v in targets.values()}
    if depths != {num_layers}:
        raise CheckpointError(f"{arrays.dir.parent}: the checkpoint stores {num_layers} layers, the config asks "
                              f"for {', '.join(map(str, sorted(depths)))}")
    out = {k: StackedInt8(v, KERNELS[_quantized_leaf(k)]) for k, v in targets.items()}
    one = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype, sharding=_drop_layer_axis(v.sharding))
           for k, v in targets.items()}
    for i in range(num_layers):
        layer = _to_devices(arrays, {f"layers.{i}.{k}": v for k, v in one.items()})
        for k in targets:
            out[k].set_layer(i, layer.pop(f"layers.{i}.{k}"))
        jax.block_until_ready([(q.q, q.scale) for q in out.values()])
    release_host_memory()
    return {name: leaf for k, q in out.items() for name, leaf in ((k, q.q), (k + "_scale", q.scale))}


def restore_params(path: str | os.PathLike, target: Mapping, quant: str | None = None) -> dict:
    """Restore the leaves of `target` (a nested dict of ShapeDtypeStruct, possibly a subset).

    Each process reads only its devices' part of each array; arrays are cast to the target dtype.
    `path` is one of our checkpoints (read with `qwq_jax.stored`: one array at a time, each straight
    into the buffers the devices keep) or a training step (whose `state` item holds the params beside
    the optimizer state: restored by Orbax). With `quant="int8"` the decoder layers' matmul weights
    come back quantized (`qwq_jax.quant`: `name` int8 and `name_scale` beside it, `target` giving their
    float shape, dtype and sharding); from our checkpoints a layer at a time as they are read, so a
    restore never holds the float weights of more than one layer.
    """
    path = Path(path)
    if quant is not None:
        from qwq_jax.quant import check_mode

        check_mode(quant)
    if inspect_path(path).kind == "training_step":
        with _partial_load_context():
            state = _ocp().load_checkpointables(os.fspath(path.absolute()), {"state": {"params": dict(target)}})
        return _quantize_after(state["state"]["params"], quant)  # the optimizer state beside them is not read
    arrays = _stored_arrays(path)
    num_layers = stored_layers(path)
    flat = flatten(target)
    if num_layers is None:  # the earlier stacked layout: every array as it is
        return _quantize_after(unflatten(_to_devices(arrays, flat)), quant)
    out = {}
    for k, v in flat.items():  # one at a time: the embedding and lm_head are the largest tensors
        if not k.startswith("layers."):
            out.update(_to_devices(arrays, {k: v}))
    release_host_memory()
    stacked = {k[len("layers."):]: v for k, v in flat.items() if k.startswith("layers.")}
    quantized = {k: v for k, v in stacked.items() if quant is not None and _quantized_leaf(k)}
    stacked = {k: v for k, v in stacked.items() if k not in quantized}
    for part, restore in ((stacked, _restore_stacked), (quantized, _restore_quantized)):
        if part:
            out.update({f"layers.{k}": v for k, v in restore(arrays, part, num_layers).items()})
    return unflatten(out)


def _quantize_after(params: dict, quant: str | None) -> dict:
    """`params` (restored in float) with the layers' matmul weights quantized, each float stack freed."""
    if quant is None:
        return params
    from qwq_jax.quant import KERNELS, quantize_stacked

    flat = flatten(params)
    for k in [k for k in flat if k.startswith("layers.") and _quantized_leaf(k)]:
        flat[k], flat[k + "_scale"] = quantize_stacked(flat[k], KERNELS[_quantized_leaf(k)], donate=True)
    return unflatten(flat)


def read_stored(path: str | os.PathLike, names: list[str], dtype: Any = None) -> dict[str, np.ndarray]:
    """Arrays of a per-layer checkpoint named as they lie on disk (`layers.3.mlp.gate_proj`), whole, on
    the host, in `dtype` (default: as stored)."""
    arrays = _stored_arrays(path)
    missing = [n for n in names if n not in arrays.names]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint has no parameter {missing[0]}")
    return {n: arrays.read(n, dtype) for n in names}


def read_config(path: str | os.PathLike) -> QwenConfig:
    """The model config of a checkpoint or training step (CheckpointError for anything else)."""
    info = require_checkpoint(path)
    if info.kind == "checkpoint":
        return QwenConfig.from_hf(info.path / "config.json")
    meta = _training_meta(info.path)
    if "model_config" in meta:  # written by python -m qwq_jax.train
        cfg = QwenConfig.from_hf(meta["model_config"])
    else:  # older runs: the model it started from
        model_path = str(meta.get("config", {}).get("model", {}).get("path", ""))
        if model_path.startswith("preset:"):
            cfg = QwenConfig.preset(model_path.split(":", 1)[1])
        elif (Path(model_path) / "config.json").is_file():
            cfg = QwenConfig.from_hf(Path(model_path) / "config.json")
        else:
            raise CheckpointError(f"{info.path}: the training run's model.path {model_path!r} is not reachable "
                                  "from here, and the checkpoint carries no model config")
    return dataclasses.replace(cfg, dtype="float32")  # the float32 master weights


def tokenizer_dir(path: str | os.PathLike) -> Path | None:
    """Where the tokenizer files of a checkpoint are (None: the byte tokenizer of tiny models)."""
    info = require_checkpoint(path)
    if info.kind == "checkpoint":
        return info.path
    meta = _training_meta(info.path)
    tok = meta.get("tokenizer")
    if tok is None:  # older runs: from the run's config
        model = meta.get("config", {}).get("model", {})
        tok = model.get("tokenizer") or model.get("path")
        if tok is None or str(tok).startswith("preset:"):
            tok = "bytes"
    return None if tok == "bytes" else Path(tok)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer a checkpoint was converted or trained with."""
    from qwq_jax.tokenizer import ByteTokenizer, Tokenizer

    where = tokenizer_dir(path)
    return ByteTokenizer() if where is None else Tokenizer.from_dir(where)


def lora_run(path: str | os.PathLike) -> dict | None:
    """For a training step of a LoRA run ([lora] rank >= 1: its `state` holds the adapters alone):
    {"lora": LoraConfig, "base": model.path, "dtype": model.dtype, "quantize": model.quantize,
    "seed": run.seed}, what the trainer built its frozen base from; None for any other path."""
    info = inspect_path(path)
    if info.kind != "training_step":
        return None
    config = _training_meta(info.path).get("config") or {}
    section = config.get("lora") or {}
    rank = section.get("rank") or 0
    if not rank:
        return None
    from qwq_jax.lora import LoraConfig

    alpha = section.get("alpha")
    lora = LoraConfig(rank=int(rank), alpha=float(alpha) if alpha is not None else 2.0 * rank,
                      targets=tuple(section.get("targets") or ()))
    model = config.get("model") or {}
    return {"lora": lora, "base": str(model.get("path", "preset:tiny")), "dtype": model.get("dtype", "bfloat16"),
            "quantize": model.get("quantize"), "seed": int((config.get("run") or {}).get("seed", 0))}


def _lora_base(step: Path, run: dict, mesh: Mesh | None, rules: str | Mapping, compute_dtype: Any,
               model_kwargs: dict) -> Qwen2:
    """The frozen base of a LoRA run, built as `python -m qwq_jax.train` built it (model.path in
    model.dtype, quantized with model.quantize; a preset drawn with run.seed), without adapters."""
    base = run["base"]
    kwargs = dict(model_kwargs, dtype=compute_dtype)
    if base.startswith("preset:"):
        try:
            qcfg = QwenConfig.preset(base.split(":", 1)[1])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{step}: the LoRA run's base model.path={base!r}: {e}") from None

        def factory():
            return Qwen2(qcfg, rngs=nnx.Rngs(run["seed"]), param_dtype=as_dtype(run["dtype"]), **kwargs)

        if mesh is not None:
            from sharding import init_sharded

            model = init_sharded(factory, mesh, rules)
        else:
            graphdef, _ = nnx.split(nnx.eval_shape(factory))
            model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(factory()))())
        if run["quantize"] is not None:
            from qwq_jax.quant import quantize

            model = quantize(model, run["quantize"], donate=True)
        return model
    problem = describe_problem(inspect_path(base), "a qwq-jax checkpoint")
    if problem is not None:
        raise CheckpointError(f"{step} holds LoRA adapters only; its base, the run's model.path {base!r}, is needed "
                              f"to load it and is not usable here: {problem}")
    return load(base, mesh=mesh, dtype=run["dtype"], rules=rules, compute_dtype=compute_dtype,
                quant=run["quantize"], **model_kwargs)


def _load_lora_step(step: Path, run: dict, mesh: Mesh | None, dtype: Any, rules: str | Mapping, compute_dtype: Any,
                    quant: str | None, merge: bool | None, model_kwargs: dict) -> Qwen2:
    """`load` of a LoRA run's training step: its base rebuilt (`_lora_base`), its trained adapters (float32
    in `state.params`) attached, then merged into the weights unless `merge` is False (None: merged
    unless the base is int8)."""
    from qwq_jax.lora import LoRAParam, attach
    from qwq_jax.lora import merge as merge_lora

    int8_base = run["quantize"] is not None
    if merge is None:
        merge = not int8_base
    if dtype is not None:
        param_dtype = as_dtype(dtype)
    else:  # merged: float32 (the sum of a base and float32 adapters); else the base as the run held it
        param_dtype = jnp.dtype(jnp.float32) if merge else as_dtype(run["dtype"])
    compute = as_dtype(compute_dtype) if compute_dtype is not None else param_dtype
    model = _lora_base(step, run, mesh, rules, compute, model_kwargs)
    model = attach(model, run["lora"], mesh=mesh, rules=rules)
    adapters = nnx.state(model, LoRAParam)
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, adapters)
    else:
        from sharding import state_shardings

        shardings = state_shardings(adapters, mesh, rules)
    # float32, as trained (the masters): merged in float32, or cast to the compute dtype by the matmul
    target = nnx.to_pure_dict(jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=s),
                                           adapters, shardings))
    try:
        restored = restore_params(step, target)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{step}: its adapters do not match the run's [lora] {run['lora']} ({e})") from None
    nnx.replace_by_pure_dict(adapters, restored)
    nnx.update(model, adapters)
    if merge:
        model = merge_lora(model, dtype=param_dtype)
        if quant is not None:
            from qwq_jax.quant import quantize

            model = quantize(model, quant, donate=True)
    elif quant is not None and quant != run["quantize"]:
        raise ValueError(f"{step}: quant={quant!r} on a LoRA model whose base is {run['quantize'] or 'float'}; "
                         "merge the adapters first (merge_lora=True)")
    elif dtype is not None:  # the base's float parameters (not int8 weights, scales or adapters) in `dtype`
        def cast(path, var):
            value = var.get_value()
            if str(path[-1]).endswith("_scale") or not jnp.issubdtype(value.dtype, jnp.floating):
                return var
            return var.replace(value.astype(param_dtype))

        state = nnx.state(model, nnx.Not(LoRAParam))
        nnx.update(model, nnx.from_flat_state([(p, cast(p, v)) for p, v in nnx.to_flat_state(state)]))
    return model


class MergedLoRA:
    """A LoRA run's step merged into its base an array at a time, for readers that go a layer at a time
    (`convert export-hf`): each array is what `load(step, merge_lora=True, dtype=dtype)` holds (the
    base read as the trainer read it, in model.dtype; an int8 base quantized as the trainer quantized
    it, a layer at a time, then dequantized; W + (alpha/r) A B in float32, stored in `dtype`). The
    adapters (megabytes) are read once, the base only as asked. `of()` is None where the base is not a
    checkpoint stored an array per layer (a preset base, the earlier stacked layout)."""

    @classmethod
    def of(cls, step: str | os.PathLike, dtype: Any) -> "MergedLoRA | None":
        run = lora_run(step)
        base = run["base"] if run is not None else ""
        if run is None or base.startswith("preset:") or inspect_path(base).kind != "checkpoint" \
                or stored_layers(base) is None:
            return None
        return cls(Path(step), run, dtype)

    def __init__(self, step: Path, run: dict, dtype: Any):
        from qwq_jax.lora import LoRAParam
        from qwq_jax.quant import quantize_array

        self.run, self.base, self.dtype = run, run["base"], np.dtype(as_dtype(dtype))
        self.config = read_config(self.base)
        self.num_layers = stored_layers(self.base)
        abstract = nnx.eval_shape(lambda: Qwen2(self.config, rngs=nnx.Rngs(0), param_dtype=jnp.float32,
                                                lora=run["lora"]))
        device = SingleDeviceSharding(jax.local_devices()[0])
        target = nnx.to_pure_dict(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=device),
                                               nnx.state(abstract, LoRAParam)))
        try:
            restored = restore_params(step, target)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{step}: its adapters do not match the run's [lora] {run['lora']} ({e})") from None
        self.adapters = {k: np.asarray(v) for k, v in flatten(restored).items()}  # [layers, ...] float32
        self._quantize = jax.jit(quantize_array, static_argnums=1)  # as quant.quantize_stacked, a layer

    def read(self, names: list[str]) -> dict[str, np.ndarray]:
        """The merged arrays `names`, named as a per-layer checkpoint stores them (`layers.3.attn.q_proj`,
        `embed`), on the host in `dtype`."""
        from qwq_jax.lora import CONTRACT, merged_weight

        out = {}
        for name, w in read_stored(self.base, names, as_dtype(self.run["dtype"])).items():
            parts = name.split(".")
            kind = parts[-1]
            if parts[0] != "layers" or kind not in CONTRACT:  # embeddings, norms, biases: cast only
                out[name] = w.astype(self.dtype)
                continue
            layer, stacked = int(parts[1]), ".".join(["layers", *parts[2:]])
            scale = None
            if self.run["quantize"] is not None:
                w, scale = self._quantize(w, CONTRACT[kind])
            a, b = self.adapters.get(stacked + "_lora_a"), self.adapters.get(stacked + "_lora_b")
            out[name] = np.asarray(merged_weight(w, scale, None if a is None else a[layer],
                                                 None if b is None else b[layer], CONTRACT[kind], self.dtype,
                                                 self.run["lora"].scale, 0))
        return out


def placed_abstract_model(cfg: QwenConfig, mesh: Mesh | None = None, rules: str | Mapping = "generate",
                          **kwargs: Any) -> Qwen2:
    """`abstract_model(cfg, **kwargs)` (no weights exist) with each leaf placed where a restore puts
    it: on `mesh` by `rules`, else on this process's first device."""
    from sharding import state_shardings

    graphdef, state = nnx.split(abstract_model(cfg, **kwargs))
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, state)
    else:
        shardings = state_shardings(state, mesh, rules)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state, shardings)
    return nnx.merge(graphdef, state)


def abstract_load(path: str | os.PathLike, mesh: Mesh | None = None, dtype: Any = None,
                  rules: str | Mapping = "generate", compute_dtype: Any = None, **model_kwargs: Any) -> Qwen2 | None:
    """What `load` with the same arguments returns, with `jax.ShapeDtypeStruct` leaves placed where
    `load` puts its arrays, from the config alone: an engine on it compiles its programs while `load`
    runs (`Engine.precompile`, `Engine.set_model`). None for a LoRA training step (its base is
    rebuilt from the run's own model.path)."""
    if inspect_path(path).kind == "training_step" and lora_run(path) is not None:
        return None
    cfg = read_config(path)
    param_dtype = as_dtype(dtype if dtype is not None else cfg.dtype)
    model_kwargs["dtype"] = as_dtype(compute_dtype) if compute_dtype is not None else param_dtype
    return placed_abstract_model(cfg, mesh, rules, param_dtype=param_dtype, **model_kwargs)


def load(path: str | os.PathLike, mesh: Mesh | None = None, dtype: Any = None, rules: str | Mapping = "generate",
         compute_dtype: Any = None, merge_lora: bool | None = None, **model_kwargs: Any) -> Qwen2:
    """The model stored at `path` (a `python -m convert` output or a training step), optionally sharded
    on `mesh`.

    dtype: parameter dtype (default: the dtype stored in the checkpoint; float32 for a training
    step); compute_dtype: the activations' dtype (default: the parameter dtype). The config is
    `model.config`; tokenizer files sit in the same directory (`load_tokenizer(path)`). model_kwargs
    go to `Qwen2` (remat, attention_backend); with `quant="int8"` the decoder layers' matmul weights
    are quantized as they are read (`qwq_jax.quant`; `restore_params`): the restore holds the int8
    model plus one layer's float weights, never the float model. A path that is not a checkpoint
    raises CheckpointError.

    A training step of a LoRA run holds its adapters alone: its base is rebuilt as the trainer built it
    (the run's model.path in model.dtype, int8 with model.quantize; CheckpointError naming model.path
    when that is gone), the adapters restored onto it, and by default merged into its weights
    (`lora.merge`: `W + (alpha/r) A B` in float32, or `dtype`). An int8 base (QLoRA) is kept as it is,
    the adapters beside it, unless `merge_lora=True` (then dequantized and merged: what export-hf
    writes); `merge_lora=False` keeps any base with its adapters (`model.lora`), in model.dtype
    unless `dtype` is given.
    """
    quant = model_kwargs.pop("quant", None)
    run = lora_run(path) if inspect_path(path).kind == "training_step" else None
    if run is not None:
        return _load_lora_step(Path(path), run, mesh, dtype, rules, compute_dtype, quant, merge_lora, model_kwargs)
    cfg = read_config(path)
    param_dtype = as_dtype(dtype if dtype is not None else cfg.dtype)
    model_kwargs["dtype"] = as_dtype(compute_dtype) if compute_dtype is not None else param_dtype
    target = param_shardings(cfg, mesh, rules, param_dtype)
    params = restore_params(Path(path), target, quant=quant)
    graphdef, state = nnx.split(abstract_model(cfg, param_dtype=param_dtype, quant=quant, **model_kwargs))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
