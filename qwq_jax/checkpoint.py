"""Orbax save / restore of model parameters, straight onto any mesh.

A qwq-jax checkpoint directory is an Orbax checkpoint of the model's parameter tree (the
nested dict of `nnx.state(model)`, layers stacked) plus `config.json`, tokenizer files and
`generation_config.json` beside it, so the directory alone is enough to sample.

A training checkpoint (`RUN_DIR/checkpoints/STEP`, written by `python -m qwq_jax.train`) loads the
same way: its float32 master weights are the `params` of its `state` item, and the model's config
and tokenizer are found through its `meta` item. `inspect_path` says what any path is (ours, a
training step or run, a Hugging Face directory, a GGUF file, empty, missing); every entry point
asks it before loading, so a wrong path is one line naming the command that fixes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from qwq_jax.config import QwenConfig
from qwq_jax.model import Qwen2, abstract_model, as_dtype

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


def save_params(path: str | os.PathLike, params: Mapping) -> None:
    """Write a parameter tree (nested dict of arrays) as an Orbax checkpoint at `path`."""
    _ocp().save(os.fspath(path), dict(params))


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
        return json.loads((step_dir / "meta" / "metadata").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{step_dir}: unreadable training checkpoint metadata ({e})") from None


def restore_params(path: str | os.PathLike, target: Mapping) -> dict:
    """Restore the leaves of `target` (a nested dict of ShapeDtypeStruct, possibly a subset).

    Each device reads only its own shard; arrays are cast to the target dtype. `path` is one of our
    checkpoints or a training step (whose `state` item holds the params beside the optimizer state).
    """
    ocp = _ocp()
    path = Path(path)
    with _partial_load_context():
        if inspect_path(path).kind == "training_step":
            state = ocp.load_checkpointables(os.fspath(path.absolute()), {"state": {"params": dict(target)}})
            return state["state"]["params"]  # the optimizer state beside them is not read
        return ocp.load(os.fspath(path), dict(target))


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


def load(path: str | os.PathLike, mesh: Mesh | None = None, dtype: Any = None, rules: str | Mapping = "generate",
         compute_dtype: Any = None, **model_kwargs: Any) -> Qwen2:
    """The model stored at `path` (a `python -m convert` output or a training step), optionally sharded
    on `mesh`.

    dtype: parameter dtype (default: the dtype stored in the checkpoint; float32 for a training
    step); compute_dtype: the activations' dtype (default: the parameter dtype). The config is
    `model.config`; tokenizer files sit in the same directory (`load_tokenizer(path)`). model_kwargs
    go to `Qwen2` (remat, attention_backend); with `quant="int8"` the restored weights are then
    quantized (`qwq_jax.quant`, the float matmul weights freed one by one: peak memory is the float
    model plus one int8 weight). A path that is not a checkpoint raises CheckpointError.
    """
    quant = model_kwargs.pop("quant", None)
    cfg = read_config(path)
    param_dtype = as_dtype(dtype if dtype is not None else cfg.dtype)
    model_kwargs["dtype"] = as_dtype(compute_dtype) if compute_dtype is not None else param_dtype
    target = param_shardings(cfg, mesh, rules, param_dtype)
    params = restore_params(Path(path), target)
    graphdef, state = nnx.split(abstract_model(cfg, param_dtype=param_dtype, **model_kwargs))
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)
    if quant is not None:
        from qwq_jax.quant import quantize

        model = quantize(model, quant, donate=True)
    return model
