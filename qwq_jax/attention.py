"""Attention backends behind one switch, plus the mask every backend shares.

`attention(q, k, v, mask, backend=...)` takes queries `[B, T, H, D]`, keys/values
`[B, S, K, D]` with `H = K * G` (GQA: query head h reads KV head h // G, as HF's `repeat_kv`)
and a boolean mask `[B, T, S]` (True = may attend). KV heads are never repeated in memory.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Large negative instead of -inf: a fully masked row (a padding query) gives a uniform, finite
# softmax instead of NaN, and NaNs never reach gradients.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_segments: jnp.ndarray, q_positions: jnp.ndarray,
                   kv_segments: jnp.ndarray, kv_positions: jnp.ndarray) -> jnp.ndarray:
    """Causal, segment-aware mask `[B, T, S]`.

    A query sees a key of the same segment whose position is not later than its own. Segment 0
    is padding and sees nothing; ids > 0 may pack several sequences into one row (a plain HF
    0/1 attention mask is a valid segment-id array).
    """
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return same & causal & (kv_segments[:, None, :] != 0)


def xla_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Reference attention in plain XLA ops: scores and softmax in float32."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


BACKENDS: dict[str, Callable[..., jnp.ndarray]] = {"xla": xla_attention}


def get_backend(name: str) -> Callable[..., jnp.ndarray]:
    """The attention function registered under `name`."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r} (known: {', '.join(BACKENDS)})") from None


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray,
              backend: str = "xla") -> jnp.ndarray:
    return get_backend(backend)(q, k, v, mask)
