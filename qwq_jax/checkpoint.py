"""Orbax save / restore of model parameters, straight onto any mesh.

A qwq-jax checkpoint directory is an Orbax checkpoint of the model's parameter tree (the
nested dict of `nnx.state(model)`, layers stacked) plus `config.json`, tokenizer files and
`generation_config.json` beside it, so the directory alone is enough to sample.
"""

from __future__ import annotations

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


def restore_params(path: str | os.PathLike, target: Mapping) -> dict:
    """Restore the leaves of `target` (a nested dict of ShapeDtypeStruct, possibly a subset).

    Each device reads only its own shard; arrays are cast to the target dtype.
    """
    ocp = _ocp()
    with _partial_load_context():
        return ocp.load(os.fspath(path), dict(target))


def read_config(path: str | os.PathLike) -> QwenConfig:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a qwq-jax checkpoint (convert one with "
                                "`python -m convert hf SRC OUT`)")
    return QwenConfig.from_hf(path / "config.json")


def load(path: str | os.PathLike, mesh: Mesh | None = None, dtype: Any = None, rules: str | Mapping = "generate",
         compute_dtype: Any = None, **model_kwargs: Any) -> Qwen2:
    """The model stored at `path` (a `python -m convert` output), optionally sharded on `mesh`.

    dtype: parameter dtype (default: the dtype stored in the checkpoint); compute_dtype: the
    activations' dtype (default: the parameter dtype). The config is `model.config`; tokenizer
    files sit in the same directory. model_kwargs go to `Qwen2` (remat, attention_backend); with
    `quant="int8"` the restored weights are then quantized (`qwq_jax.quant`, the float matmul
    weights freed one by one: peak memory is the float model plus one int8 weight).
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
