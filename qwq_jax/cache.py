"""KV cache pytree: `k`, `v` of shape `[layers, batch, max_len, kv_heads, head_dim]` plus per-row lengths.

Prompts are stored left-aligned: slot s of a row holds position s, and `lengths[b]` is the
number of valid slots (the next write goes there). Sharded by the `generate` rules: batch
over `data`/`fsdp`, KV heads over `tensor`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from qwq_jax.config import QwenConfig

CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array        # [L, B, S, K, D]
    v: jax.Array        # [L, B, S, K, D]
    lengths: jax.Array  # [B] int32: valid slots per row

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def replace(self, **changes: Any) -> "KVCache":
        return dataclasses.replace(self, **changes)

    def slot_segments(self, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Segment ids (1 = valid, 0 = empty) and positions `[B, S]` of the cache slots."""
        slots = jnp.arange(self.max_len, dtype=jnp.int32)[None, :]
        b = lengths.shape[0]
        return (slots < lengths[:, None]).astype(jnp.int32), jnp.broadcast_to(slots, (b, self.max_len))

    @classmethod
    def init(cls, cfg: QwenConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16,
             mesh: Mesh | None = None, rules: Any = "generate") -> "KVCache":
        """An empty cache, sharded on `mesh` by `rules` when given."""
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        if mesh is None:
            # Two buffers (the engine donates the cache: k and v must not alias).
            return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))
        from sharding import logical_to_mesh

        kv_sharding = NamedSharding(mesh, logical_to_mesh(CACHE_AXES, mesh, rules))
        len_sharding = NamedSharding(mesh, logical_to_mesh(("batch",), mesh, rules))
        make = jax.jit(lambda: cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32)),
                       out_shardings=cls(kv_sharding, kv_sharding, len_sharding))
        return make()

    @staticmethod
    def bytes_per_token(cfg: QwenConfig, dtype: Any = jnp.bfloat16) -> int:
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize
