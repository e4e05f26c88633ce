"""The Qwen2 / Qwen2.5 / QwQ decoder in Flax NNX.

    tokens [B, T] -> embed -> L x DecoderLayer (scanned) -> final RMSNorm -> lm_head -> logits [B, T, V]
    DecoderLayer: x + Attention(RMSNorm(x)); then x + MLP(RMSNorm(x))
    Attention:    q/k/v projections with bias, GQA, rotate-half RoPE (rope.py), o_proj without bias
    MLP:          down(silu(gate(x)) * up(x))

Every parameter is declared once, by `_declare`, with its logical axes; its shape comes from
`QwenConfig.axis_sizes()`. Those axes drive random init, the abstract tree for an Orbax restore
(`abstract_model`) and the shardings (`sharding.rules`). Decoder layers are stored stacked along
a leading `layers` axis and run with `jax.lax.scan`, so compile time does not grow with depth.

Numerics: parameters in `param_dtype`, matmuls in `dtype`; RMSNorm, RoPE, softmax and logits in
float32. Where the pieces live: rope.py (tables), attention.py (backends, masks),
config.py (QwenConfig), sharding/ (meshes, rules), convert/ (HF name map, converters).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwq_jax import lora as lora_lib
from qwq_jax import paged_attention as paged
from qwq_jax import rope as rope_lib
from qwq_jax.attention import Mask, attention, get_backend
from qwq_jax.config import QwenConfig

_normal = nnx.initializers.normal(0.02)  # HF initializer_range
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()

# Remat policy by name (jax.checkpoint_policies); "none" disables rematerialisation.
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Weight-only quantization modes (qwq_jax/quant.py makes such a model from a float one).
QUANT_MODES = ("int8",)


def as_dtype(dtype: Any) -> jnp.dtype:
    """A jnp dtype from a dtype or its name ('bfloat16', 'float32', 'float16')."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


def _declare(cfg: QwenConfig, rngs: nnx.Rngs, axes: tuple[str, ...], init: Callable[..., Any],
             dtype: Any) -> nnx.Param:
    """One parameter: shape from the config's axis sizes, logical axes kept as metadata."""
    sizes = cfg.axis_sizes()
    shape = tuple(sizes[a] for a in axes)
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def _declare_kernel(module: nnx.Module, name: str, cfg: QwenConfig, rngs: nnx.Rngs, prefix: tuple[str, ...],
                    axes: tuple[str, ...], contract: int, param_dtype: Any, quant: str | None,
                    lora: Any = None) -> None:
    """A matmul weight `module.<name>` with logical axes `prefix + axes`, whose first `contract` axes
    are contracted. With `quant="int8"` it is stored as int8 plus `module.<name>_scale`, float32, one
    per output channel (axes `prefix + axes[contract:]`): weight = int8 value x scale. With a
    `lora.LoraConfig` that targets `name`, LoRA adapters beside it (qwq_jax/lora.py)."""
    if quant is None:
        setattr(module, name, _declare(cfg, rngs, prefix + axes, _normal, param_dtype))
    else:
        setattr(module, name, _declare(cfg, rngs, prefix + axes, _zeros, jnp.int8))
        setattr(module, name + "_scale", _declare(cfg, rngs, prefix + axes[contract:], _ones, jnp.float32))
    if lora is not None and name in lora.targets:
        lora_lib.declare(module, name, cfg.axis_sizes(), rngs, prefix, axes, contract,
                         param_dtype if quant is None else jnp.float32, lora)


def matmul(spec: str, x: jnp.ndarray, module: nnx.Module, name: str, dtype: Any) -> jnp.ndarray:
    """`einsum(spec, x, weight)` in `dtype`. An int8 weight is converted to `dtype` (exact: |q| <= 127)
    inside the matmul, which accumulates in float32; its per-output-channel scale is applied to the
    result (it commutes with the contraction), then the result is cast to `dtype`."""
    kernel = getattr(module, name)[...]
    scale = getattr(module, name + "_scale", None)
    if scale is None:
        y = jnp.einsum(spec, x, kernel.astype(dtype))
    else:
        y = jnp.einsum(spec, x, kernel.astype(dtype), preferred_element_type=jnp.float32)
        y = (y * scale[...]).astype(dtype)
    lora = lora_lib.delta(spec, x, module, name, dtype)  # LoRA adapters, when the weight has them
    return y if lora is None else y + lora


def drop_axes(sharding: Any, ndim: int, drop: tuple[int, ...]) -> Any:
    """The sharding, for an `ndim`-dimensional array, of that array without axes `drop` (a layer
    of a stacked weight, the output channels of a weight): the same mesh and the spec without
    those axes. A placement that is not a NamedSharding (one device) is kept as it is."""
    from jax.sharding import NamedSharding, PartitionSpec

    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*(a for i, a in enumerate(spec) if i not in drop)))


def drop_axes_sharding(array: jax.Array, drop: tuple[int, ...]) -> Any:
    """`drop_axes` of `array`'s own sharding."""
    return drop_axes(array.sharding, array.ndim, drop)


@functools.lru_cache(maxsize=None)
def _take_layer(sharding: Any):
    return jax.jit(lambda w, i: jax.lax.dynamic_index_in_dim(w, i, 0, keepdims=False), out_shardings=sharding)


def split_layers(stacked: Any, donate: bool = False) -> list[Any]:
    """A layer-stacked parameter tree (`[L, ...]` leaves, e.g. `nnx.state(model.layers)`) as L trees of
    one layer's arrays each, every array in its own buffer, sharded as its stack was (minus the
    `layers` axis). Run over by `Qwen2.hidden_states(layers=...)`, each layer's weights are then read
    where they lie, with no slice of a stack for the compiler to copy.

    Copies the weights (abstract `jax.ShapeDtypeStruct` leaves give abstract layers). `donate=True`
    deletes each stacked array once split, staging it through host memory when this process holds
    all of it (device memory then never holds a weight twice); otherwise the peak is the weights
    plus one stacked array's share.
    """
    leaves, treedef = jax.tree.flatten(stacked)
    if not leaves:
        return []
    n = leaves[0].shape[0]
    columns = []
    for w in leaves:
        if isinstance(w, jax.ShapeDtypeStruct):  # abstract weights (ahead-of-time compilation)
            layer = jax.ShapeDtypeStruct(w.shape[1:], w.dtype, sharding=drop_axes(w.sharding, w.ndim, (0,))
                                         if w.sharding is not None else None)
            columns.append([layer] * n)
            continue
        if not isinstance(w, jax.Array):
            w = jnp.asarray(w)
        sharding = drop_axes_sharding(w, (0,))
        if donate and w.is_fully_addressable:
            host = np.asarray(jax.device_get(w))
            w.delete()
            columns.append([jax.device_put(host[i], sharding) for i in range(n)])
            continue
        columns.append([_take_layer(sharding)(w, i) for i in range(n)])
        if donate:
            w.delete()
    return [jax.tree.unflatten(treedef, [col[i] for col in columns]) for i in range(n)]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pages:
    """A model call's view of the paged KV cache (`qwq_jax.paged_attention`): this call's tokens
    `[B, T]` are written at flat slots `slots [B, T]` (-1: padding, not written) of `pool`, then
    attend to their rows' pages `page_tables [B, max_pages]` up to `lengths [B]` keys (causally, by
    position)."""

    pool: Any                 # paged_attention.PagePool (all layers)
    page_tables: jax.Array
    slots: jax.Array
    lengths: jax.Array


@dataclasses.dataclass(frozen=True)
class _LayerPages:
    """What one layer's attention gets: the pool (stacked, with `layer` its index; or this layer's
    own, `layer=None`), and the call's tables, slots, lengths and query positions."""

    pool: Any
    layer: Any
    pages: Pages
    positions: jax.Array


def _paged_backend(backend: str) -> str:
    """The paged attention backend for a model's attention backend: the reference unless "auto"."""
    return "auto" if backend == "auto" else "xla"


def rms_norm(x: jnp.ndarray, scale: jnp.ndarray, eps: float) -> jnp.ndarray:
    """HF Qwen2RMSNorm: normalise in float32, cast back to x's dtype, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * xf.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: QwenConfig, prefix: tuple[str, ...], *, rngs: nnx.Rngs, param_dtype: Any):
        self.eps = cfg.rms_norm_eps
        self.scale = _declare(cfg, rngs, prefix + ("embed",), _ones, param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):
    """Grouped-query self-attention with QKV bias; parameters of one layer (or a stack)."""

    def __init__(self, cfg: QwenConfig, prefix: tuple[str, ...], *, rngs: nnx.Rngs, param_dtype: Any,
                 dtype: Any, backend: str, quant: str | None = None, lora: Any = None):
        p = prefix
        _declare_kernel(self, "q_proj", cfg, rngs, p, ("embed", "heads", "head_dim"), 1, param_dtype, quant, lora)
        self.q_bias = _declare(cfg, rngs, p + ("heads", "head_dim"), _zeros, param_dtype)
        _declare_kernel(self, "k_proj", cfg, rngs, p, ("embed", "kv_heads", "head_dim"), 1, param_dtype, quant, lora)
        self.k_bias = _declare(cfg, rngs, p + ("kv_heads", "head_dim"), _zeros, param_dtype)
        _declare_kernel(self, "v_proj", cfg, rngs, p, ("embed", "kv_heads", "head_dim"), 1, param_dtype, quant, lora)
        self.v_bias = _declare(cfg, rngs, p + ("kv_heads", "head_dim"), _zeros, param_dtype)
        _declare_kernel(self, "o_proj", cfg, rngs, p, ("heads", "head_dim", "embed"), 2, param_dtype, quant, lora)
        self.dtype = dtype
        self.backend = backend

    def qkv(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray):
        """Projected, rotated q `[B, T, H, D]` and k, v `[B, T, K, D]`."""
        dt = self.dtype

        def proj(name: str, bias: nnx.Param) -> jnp.ndarray:
            return matmul("btd,dhk->bthk", x, self, name, dt) + bias[...].astype(dt)

        q = rope_lib.apply_rope(proj("q_proj", self.q_bias), cos, sin)
        k = rope_lib.apply_rope(proj("k_proj", self.k_bias), cos, sin)
        return q, k, proj("v_proj", self.v_bias)

    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, mask: Any,
                 kv: "_LayerPages | None" = None):
        """Attention over this call's tokens (`mask`), or, with `kv`, over the paged KV cache: this
        call's keys/values are first written into its pages. Returns the output and the updated
        page pool (or None)."""
        q, k, v = self.qkv(x, cos, sin)
        if kv is None:
            out = attention(q, k, v, mask, backend=self.backend)  # [B, T, H, D]
            return matmul("bthk,hkd->btd", out, self, "o_proj", self.dtype), None
        p = kv.pages
        pool = paged.write_pages(kv.pool, kv.layer, k, v, p.slots)
        out = paged.paged_attention(q, pool, kv.layer, p.page_tables, kv.positions, p.lengths,
                                    backend=_paged_backend(self.backend))
        return matmul("bthk,hkd->btd", out, self, "o_proj", self.dtype), pool


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: QwenConfig, prefix: tuple[str, ...], *, rngs: nnx.Rngs, param_dtype: Any,
                 dtype: Any, quant: str | None = None, lora: Any = None):
        _declare_kernel(self, "gate_proj", cfg, rngs, prefix, ("embed", "mlp"), 1, param_dtype, quant, lora)
        _declare_kernel(self, "up_proj", cfg, rngs, prefix, ("embed", "mlp"), 1, param_dtype, quant, lora)
        _declare_kernel(self, "down_proj", cfg, rngs, prefix, ("mlp", "embed"), 1, param_dtype, quant, lora)
        self.dtype = dtype

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dt = self.dtype
        gate = matmul("btd,df->btf", x, self, "gate_proj", dt)
        up = matmul("btd,df->btf", x, self, "up_proj", dt)
        return matmul("btf,fd->btd", jax.nn.silu(gate) * up, self, "down_proj", dt)


class DecoderLayer(nnx.Module):
    """Pre-norm decoder block. Built with `prefix=("layers",)` it holds all L layers stacked."""

    def __init__(self, cfg: QwenConfig, prefix: tuple[str, ...], *, rngs: nnx.Rngs, param_dtype: Any,
                 dtype: Any, backend: str, quant: str | None = None, lora: Any = None):
        self.input_norm = RMSNorm(cfg, prefix, rngs=rngs, param_dtype=param_dtype)
        self.attn = Attention(cfg, prefix, rngs=rngs, param_dtype=param_dtype, dtype=dtype, backend=backend,
                              quant=quant, lora=lora)
        self.post_attn_norm = RMSNorm(cfg, prefix, rngs=rngs, param_dtype=param_dtype)
        self.mlp = MLP(cfg, prefix, rngs=rngs, param_dtype=param_dtype, dtype=dtype, quant=quant, lora=lora)

    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, mask: jnp.ndarray, kv=None):
        h, new_kv = self.attn(self.input_norm(x), cos, sin, mask, kv)
        x = x + h
        return x + self.mlp(self.post_attn_norm(x)), new_kv


class Qwen2(nnx.Module):
    """Qwen2ForCausalLM. Call on int32 token ids `[B, T]`; returns float32 logits `[B, T, V]`.

    `quant="int8"`: the decoder layers' seven matmul weights are int8 with a float32 scale per
    output channel (weight-only, for inference; embeddings, norms and biases stay in `param_dtype`).
    Build one from a float model with `qwq_jax.quant.quantize`.
    """

    def __init__(self, cfg: QwenConfig, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32,
                 dtype: Any = jnp.bfloat16, remat: str = "none", attention_backend: str = "xla",
                 quant: str | None = None, lora: Any = None):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {remat!r} (known: {', '.join(REMAT_POLICIES)})")
        if quant is not None and quant not in QUANT_MODES:
            raise ValueError(f"unknown quantization {quant!r} (known: {', '.join(QUANT_MODES)}, or None)")
        get_backend(attention_backend)  # fail early on an unknown name
        param_dtype, dtype = as_dtype(param_dtype), as_dtype(dtype)
        self.config = cfg
        self.dtype = dtype
        self.remat = remat
        self.quant = quant
        self.lora = lora  # a lora.LoraConfig: adapters on its targets (qwq_jax/lora.py), or None
        self.attention_backend = attention_backend
        self.embed = _declare(cfg, rngs, ("vocab", "embed"), _normal, param_dtype)
        self.layers = DecoderLayer(cfg, ("layers",), rngs=rngs, param_dtype=param_dtype, dtype=dtype,
                                   backend=attention_backend, quant=quant, lora=lora)
        self.final_norm = RMSNorm(cfg, (), rngs=rngs, param_dtype=param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _declare(cfg, rngs, ("vocab", "embed"), _normal, param_dtype)

    def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray | None = None,
                 segment_ids: jnp.ndarray | None = None, *, rope: tuple[Any, Any] | None = None,
                 return_hidden: bool = False, layers: Sequence[Any] | None = None):
        """Forward pass without a cache: float32 logits `[B, T, V]`.

        tokens:      int32 `[B, T]`.
        positions:   int32 `[B, T]`, default 0..T-1 in every row.
        segment_ids: int32 `[B, T]`; 0 marks padding, equal ids attend to each other causally
                     (an HF 0/1 attention mask works as is). Default: all ones.
        rope:        `(inv_freq, attention_factor)` overriding the config's rotary tables
                     (`inv_freq` `[D/2]` or per row `[B, 1, D/2]`, factor scalar or `[B, 1, 1]`).
        return_hidden: also return the residual stream after each layer `[L, B, T, E]`.
        layers:      per-layer parameter trees run in place of the stacked layers (`hidden_states`).
        """
        x, _, hidden = self.hidden_states(tokens, positions, segment_ids, rope=rope, return_hidden=return_hidden,
                                          layers=layers)
        logits = self.logits(x)
        return (logits, hidden) if return_hidden else logits

    def hidden_states(self, tokens: jnp.ndarray, positions: jnp.ndarray | None = None,
                      segment_ids: jnp.ndarray | None = None, *, pages: Pages | None = None,
                      rope: tuple[Any, Any] | None = None, return_hidden: bool = False,
                      layers: Sequence[Any] | None = None):
        """The decoder stack before the final norm: `(x [B, T, E], pages or None, hidden or None)`.

        Without `pages`, attention over this call's tokens (`segment_ids` as in `__call__`). With
        `pages` (the paged KV cache, `positions` required), this call's keys/values are written into
        the pool first and its tokens attend to their rows' pages; `pages` comes back with the
        updated pool.
        `layers`: the decoder layers' parameters as one tree per layer (`split_layers`), run as
        straight-line code in place of `self.layers`' values (whose graph they share). A per-layer
        pool (`PagePool.init(per_layer=True)`) needs them.
        """
        b, t = tokens.shape
        if pages is not None and positions is None:
            raise ValueError("a call on the paged KV cache needs its tokens' positions")
        segmented = segment_ids is not None
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        inv_freq, attention_factor = rope if rope is not None else rope_lib.inv_frequencies(self.config)
        cos, sin = rope_lib.rope_tables(positions, inv_freq, attention_factor)  # [B, T, D]
        mask = Mask.causal(segment_ids, positions, segmented=segmented) if pages is None else None
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)  # [B, T, E]
        graphdef, stacked = nnx.split(self.layers)

        def run(x, pool, layer_params, index):
            layer = nnx.merge(graphdef, layer_params)
            return layer(x, cos, sin, mask, None if pages is None else _LayerPages(pool, index, pages, positions))

        if self.remat != "none":
            # Under `scan` the loop keeps XLA from merging a layer's recomputation in the backward pass
            # with its forward (prevent_cse=False is safe there, and lets it fuse more). Run unrolled
            # (`layers`, the trainer's split compute copy) nothing else does: without the barrier the
            # compiler merged them and kept every layer's activations (QwQ-32B's QLoRA update on an
            # H200 compiled to 174 GiB; 4 layers of Qwen2.5-7B at 4K tokens: 10.0 -> 7.6 GiB of temps).
            run = jax.checkpoint(run, policy=REMAT_POLICIES[self.remat], prevent_cse=layers is not None)
        pool = None if pages is None else pages.pool
        per_layer = pool is not None and pool.per_layer
        if layers is not None:
            if len(layers) != self.config.num_layers:
                raise ValueError(f"layers has {len(layers)} entries for a {self.config.num_layers}-layer model")
            outs, new = [], []
            # One trace for every layer: the layers share their shapes, so the calls after the first
            # reuse the first one's jaxpr (and lowering) instead of tracing the block again; XLA
            # inlines the calls, so the compiled program is the same.
            run = jax.jit(run)
            for i, layer_params in enumerate(layers):
                if per_layer:  # this layer's own pages: no slice of a stack to copy
                    x, layer_pool = run(x, pool.layer(i), layer_params, None)
                    new.append(layer_pool)
                else:
                    x, pool = run(x, pool, layer_params, jnp.int32(i))
                outs.append(x)
            if per_layer:
                pool = dataclasses.replace(pool, **{f.name: tuple(getattr(p, f.name) for p in new)
                                                    for f in dataclasses.fields(pool) if getattr(pool, f.name) is not None})
            hidden = jnp.stack(outs) if return_hidden else None
        else:
            if per_layer:
                raise ValueError("a per-layer page pool needs per-layer weights: pass layers=split_layers(...)")

            def body(carry, xs):
                x, pool = run(*carry, *xs)
                return (x, pool), (x if return_hidden else None)

            (x, pool), hidden = jax.lax.scan(body, (x, pool),
                                             (stacked, jnp.arange(self.config.num_layers, dtype=jnp.int32)))
        return x, (None if pages is None else dataclasses.replace(pages, pool=pool)), hidden

    def logits(self, x: jnp.ndarray) -> jnp.ndarray:
        """Final norm and lm_head (the embedding when tied), float32 `[B, T, V]`."""
        x = self.final_norm(x)
        head = self.embed if self.config.tie_word_embeddings else self.lm_head
        return jnp.einsum("btd,vd->btv", x, head[...].astype(self.dtype), preferred_element_type=jnp.float32)


def init_model(cfg: QwenConfig, seed: int = 0, **kwargs: Any) -> Qwen2:
    """A randomly initialised model on the default device (kwargs as for `Qwen2`)."""
    return Qwen2(cfg, rngs=nnx.Rngs(seed), **kwargs)


def abstract_model(cfg: QwenConfig, **kwargs: Any) -> Qwen2:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory, shapes/dtypes/axes only."""
    return nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), **kwargs))


@nnx.jit(static_argnames=("return_hidden",))
def forward(model: Qwen2, tokens: jnp.ndarray, positions: jnp.ndarray | None = None,
            segment_ids: jnp.ndarray | None = None, return_hidden: bool = False):
    """Jitted `model(tokens, positions, segment_ids)`."""
    return model(tokens, positions, segment_ids, return_hidden=return_hidden)


def set_params(model: Qwen2, params: dict) -> Qwen2:
    """Load a nested dict of arrays (the layout of `nnx.state(model).to_pure_dict()`) into `model`."""
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model
