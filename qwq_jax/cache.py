"""KV cache pytree: keys `k [layers, batch, kv_heads, max_len, head_dim]`, values
`v [layers, batch, kv_heads, head_dim, max_len]`, plus per-row lengths.

Prompts are stored left-aligned: slot s of a row holds position s, and `lengths[b]` is the
number of valid slots (the next write goes there). Sharded by the `generate` rules: batch
over `data`/`fsdp`, KV heads over `tensor`.

Heads-major, keys `[S, D]` and values `[D, S]` per head: the layouts the two attention matmuls
of a decode step (scores = K q, out = V^T p) read without transposing. Stored as `[.., S, K, D]`,
the decode loop XLA compiles for an H100 transposed the whole cache into heads-major on entry
and back on exit of every decode call, holding a second cache-sized buffer meanwhile; with
values `[S, D]` it transposed each layer's values every step at batch 1
(`benchmarks/gpu_aot.py` lists what a compiled decode step copies).

Per-layer (`init(..., per_layer=True)`, what `Engine(layer_loop="split")` uses): `k` and `v` are
tuples of L arrays (`[B, K, S, D]`, `[B, K, D, S]`), one buffer per layer. Attention then reads its layer's buffer
itself: a layer of a stacked cache is a slice, which XLA for GPU copies out before the attention
matmuls (one more read and write of the whole cache per decode step).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from qwq_jax.config import QwenConfig

CACHE_AXES = ("layers", "batch", "kv_heads", "seq", "head_dim")   # keys
VALUE_AXES = ("layers", "batch", "kv_heads", "head_dim", "seq")   # values


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: Any              # [L, B, K, S, D], or per layer: a tuple of L arrays [B, K, S, D]
    v: Any              # [L, B, K, D, S], or per layer: a tuple of L arrays [B, K, D, S]
    lengths: jax.Array  # [B] int32: valid slots per row

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] if self.per_layer else self.k.shape[3]

    def replace(self, **changes: Any) -> "KVCache":
        return dataclasses.replace(self, **changes)

    def slot_segments(self, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Segment ids (1 = valid, 0 = empty) and positions `[B, S]` of the cache slots."""
        slots = jnp.arange(self.max_len, dtype=jnp.int32)[None, :]
        b = lengths.shape[0]
        return (slots < lengths[:, None]).astype(jnp.int32), jnp.broadcast_to(slots, (b, self.max_len))

    @classmethod
    def init(cls, cfg: QwenConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16,
             mesh: Mesh | None = None, rules: Any = "generate", per_layer: bool = False) -> "KVCache":
        """An empty cache, sharded on `mesh` by `rules` when given; `per_layer`: one buffer per layer."""
        k_shape, v_shape = cls.shapes(cfg, batch, max_len, per_layer)
        layers = cfg.num_layers

        def make():  # separate buffers throughout: the engine donates the cache, nothing may alias
            if per_layer:
                return cls(tuple(jnp.zeros(k_shape, dtype) for _ in range(layers)),
                           tuple(jnp.zeros(v_shape, dtype) for _ in range(layers)), jnp.zeros((batch,), jnp.int32))
            return cls(jnp.zeros(k_shape, dtype), jnp.zeros(v_shape, dtype), jnp.zeros((batch,), jnp.int32))

        if mesh is None:
            return make()
        k_sh, v_sh, len_sh = cls.shardings(mesh, rules, per_layer)
        if per_layer:
            k_sh, v_sh = (k_sh,) * layers, (v_sh,) * layers
        return jax.jit(make, out_shardings=cls(k_sh, v_sh, len_sh))()

    @staticmethod
    def shapes(cfg: QwenConfig, batch: int, max_len: int, per_layer: bool = False) -> tuple[tuple, tuple]:
        """Shapes of `k` and `v` (of each layer's arrays when `per_layer`)."""
        k = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        v = (batch, cfg.num_kv_heads, cfg.head_dim, max_len)
        return (k, v) if per_layer else ((cfg.num_layers,) + k, (cfg.num_layers,) + v)

    @staticmethod
    def shardings(mesh: Mesh, rules: Any = "generate", per_layer: bool = False) -> tuple[NamedSharding, ...]:
        """Shardings of a `k` array, a `v` array and `lengths` on `mesh` by `rules`."""
        from sharding import logical_to_mesh

        drop = 1 if per_layer else 0
        return (NamedSharding(mesh, logical_to_mesh(CACHE_AXES[drop:], mesh, rules)),
                NamedSharding(mesh, logical_to_mesh(VALUE_AXES[drop:], mesh, rules)),
                NamedSharding(mesh, logical_to_mesh(("batch",), mesh, rules)))

    @staticmethod
    def bytes_per_token(cfg: QwenConfig, dtype: Any = jnp.bfloat16) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
