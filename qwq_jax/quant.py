"""Int8 weight-only quantization for inference.

    qmodel = quantize(model)                 # a new Qwen2(quant="int8"); `model` is left as it was
    qmodel = quantize(model, donate=True)    # frees each float weight once quantized (bounded memory)
    Engine(qmodel, tokenizer).generate(...)  # same API; decode reads half the weight bytes of bf16

The decoder layers' seven matmul weights (q/k/v/o, gate/up/down) become int8 with one float32
scale per output channel, symmetric round-to-nearest: `scale = max|w| / 127` over the contracted
axes, `q = round(w / scale)`, so |w - q * scale| <= scale / 2 everywhere. The matmul converts q
to the compute dtype (exact) and applies the scale to its output (qwq_jax.model.matmul).
Embeddings, the lm_head, norms and biases stay as they were (about 4% of QwQ-32B's bytes).

Memory: quantization runs one layer of one weight at a time (one jitted call per layer, written
into a donated int8 buffer), each weight keeps its sharding (the scale takes the sharding of the
weight's output axes), so the temporaries are one layer's float copy. With `donate=True` the
peak is the float model plus one int8 weight: QwQ-32B (61 GiB in bf16 -> 32.5 GiB) fits an H100.
`qwq_jax.load(path, quant="int8")` does better: it quantizes each layer as the restore reads it
(`StackedInt8.set_layer`), so the float model is never held, only one layer of it.

This is weight-only post-training quantization without calibration: it changes the model's
numbers (tests bound the error by hand); it is reported as such wherever it is used. Training
takes the float weights (GRPOTrainer refuses a quantized model).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qwq_jax.model import QUANT_MODES, Qwen2, drop_axes_sharding

# Matmul weights of a decoder layer -> how many of their (per-layer) leading axes are contracted.
KERNELS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}
QMAX = 127


def quantize_array(w: jnp.ndarray, contract: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`(q int8, scale float32)` for `w` whose first `contract` axes are contracted: one scale per
    output channel (`w.shape[contract:]`), `w ~= q * scale`. An all-zero channel gets scale 1."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=tuple(range(contract)))
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)
    q = jnp.clip(jnp.round(wf / scale), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize(q: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """float32 `q * scale` (scale broadcast over the trailing output axes)."""
    return q.astype(jnp.float32) * scale


def _quantize_into(q_buf, s_buf, w, i, contract: int):
    """Layer `i` of the int8 buffers set from one layer's float weight `w`."""
    q, s = quantize_array(w, contract)
    return (jax.lax.dynamic_update_index_in_dim(q_buf, q, i, 0),
            jax.lax.dynamic_update_index_in_dim(s_buf, s, i, 0))


def _quantize_layer(q_buf, s_buf, w, i, contract: int):
    return _quantize_into(q_buf, s_buf, jax.lax.dynamic_index_in_dim(w, i, 0, keepdims=False), i, contract)


@functools.lru_cache(maxsize=None)
def _layer_fn(contract: int, q_sharding: Any, s_sharding: Any, stacked: bool):
    return jax.jit(functools.partial(_quantize_layer if stacked else _quantize_into, contract=contract),
                   donate_argnums=(0, 1), out_shardings=(q_sharding, s_sharding))


class StackedInt8:
    """The int8 weight and per-channel scales of a layer-stacked float weight `w` (an array or a
    `jax.ShapeDtypeStruct`: shape `[L, ...]` and sharding), filled one layer at a time. The int8 array
    keeps `w`'s sharding, the scales that of its layer and output axes; `contract` counts the
    contracted per-layer axes (KERNELS)."""

    def __init__(self, w: Any, contract: int):
        self.contract = contract
        self.q_sharding = w.sharding
        self.s_sharding = drop_axes_sharding(w, tuple(range(1, 1 + contract)))
        s_shape = (w.shape[0],) + tuple(w.shape[1 + contract:])
        self.q = jax.jit(lambda: jnp.zeros(w.shape, jnp.int8), out_shardings=self.q_sharding)()
        self.scale = jax.jit(lambda: jnp.ones(s_shape, jnp.float32), out_shardings=self.s_sharding)()

    def set_layer(self, i: int, w: jax.Array) -> None:
        """Quantize layer `i` from `w`, one layer's float weight (sharded as a layer of the stack)."""
        fn = _layer_fn(self.contract, self.q_sharding, self.s_sharding, False)
        self.q, self.scale = fn(self.q, self.scale, w, i)

    def set_layers_from(self, w: jax.Array) -> None:
        """Quantize every layer from the stacked float weight `w` (one call per layer, no slice copies)."""
        fn = _layer_fn(self.contract, self.q_sharding, self.s_sharding, True)
        for i in range(w.shape[0]):
            self.q, self.scale = fn(self.q, self.scale, w, i)


def quantize_stacked(w: jax.Array, contract: int, donate: bool = False) -> tuple[jax.Array, jax.Array]:
    """Quantize a layer-stacked weight `[L, ...]` one layer at a time (`contract` counts per-layer
    axes). The int8 result keeps `w`'s sharding. `donate=True` deletes `w` afterwards."""
    if not isinstance(w, jax.Array):  # a host array (e.g. loaded with set_params): the default device
        w = jnp.asarray(w)
    out = StackedInt8(w, contract)
    out.set_layers_from(w)
    if donate:
        w.delete()
    return out.q, out.scale


def check_mode(mode: str) -> None:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r} (known: {', '.join(QUANT_MODES)})")


def quantize(model: Qwen2, mode: str = "int8", *, donate: bool = False) -> Qwen2:
    """A `Qwen2(quant=mode)` holding `model`'s weights, its matmul weights quantized (module doc).

    The other parameters are shared with `model`, not copied. `donate=True` deletes each float
    matmul weight of `model` once quantized (then `model` must not be used again).
    """
    check_mode(mode)
    if not isinstance(model, Qwen2):
        raise TypeError(f"quantize takes a qwq_jax Qwen2 model, got {type(model).__name__}")
    if model.quant is not None:
        raise ValueError(f"the model is already quantized ({model.quant})")
    param_dtype = model.embed[...].dtype
    abstract = nnx.eval_shape(lambda: Qwen2(model.config, rngs=nnx.Rngs(0), param_dtype=param_dtype,
                                            dtype=model.dtype, remat=model.remat,
                                            attention_backend=model.attention_backend, quant=mode))
    graphdef, state = nnx.split(abstract)
    params = nnx.to_pure_dict(nnx.state(model))
    for part, names in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                        ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        holder = params["layers"][part]
        for name in names:
            holder[name], holder[name + "_scale"] = quantize_stacked(holder[name], KERNELS[name], donate)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def weight_bytes(model: Qwen2) -> int:
    """Bytes of all the model's parameters (as stored)."""
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
