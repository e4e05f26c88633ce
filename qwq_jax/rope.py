"""Rotary position embeddings, default and scaled (linear, YaRN), as HF transformers computes them.

Frequencies are config constants computed on the host in float64 and rounded once to float32
(HF computes `base ** x` in float32 with torch's SIMD pow, which can be 1 ulp off the correctly
rounded value; see tests/test_rope.py). Tables are built in float32 from integer positions with
the same float32 arithmetic HF uses (`angle = float32(position) * inv_freq`), so they agree with
HF bit for bit wherever the frequencies do. Convention: rotate-half (not interleaved).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from qwq_jax.config import QwenConfig


def _default_pos_freqs(theta: float, dim: int) -> np.ndarray:
    """`theta ** (2i/dim)` for i < dim/2, exponent in float32 as HF builds it, power in float64."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)


def _yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, theta: float,
                           original: int, truncate: bool) -> tuple[float, float]:
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_frequencies(cfg: QwenConfig, scaled: bool = True) -> tuple[np.ndarray, float]:
    """Inverse frequencies `[head_dim // 2]` (float32) and the attention factor for cos/sin.

    `scaled=False` ignores `cfg.rope_scaling` (plain RoPE, e.g. for short requests under YaRN "auto").
    """
    dim, theta = cfg.head_dim, cfg.rope_theta
    pos_freqs = _default_pos_freqs(theta, dim)
    one = np.float32(1.0)
    rs = cfg.rope_scaling if scaled else None
    if rs is None:
        return one / pos_freqs, 1.0
    factor = np.float32(rs.factor)
    if rs.rope_type == "linear":
        return (one / pos_freqs) / factor, 1.0
    if rs.rope_type != "yarn":
        raise ValueError(f"rope_type={rs.rope_type!r} is not supported")

    attention_factor = rs.attention_factor
    if attention_factor is None:
        if rs.mscale and rs.mscale_all_dim:
            attention_factor = _yarn_mscale(rs.factor, rs.mscale) / _yarn_mscale(rs.factor, rs.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(rs.factor)
    low, high = _yarn_correction_range(rs.beta_fast or 32, rs.beta_slow or 1, dim, theta,
                                       cfg.original_max_position_embeddings,
                                       True if rs.truncate is None else rs.truncate)
    if low == high:
        high += 0.001  # HF: avoid a zero-width ramp
    extrapolation = one / pos_freqs
    interpolation = one / (factor * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = one - ramp.astype(np.float32)
    inv_freq = interpolation * (one - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_tables(positions: jnp.ndarray, inv_freq: jnp.ndarray | np.ndarray,
                attention_factor: float | jnp.ndarray = 1.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables `[..., T, head_dim]` in float32 for integer `positions [..., T]`.

    `inv_freq` is `[head_dim // 2]`, or `[B, 1, head_dim // 2]` for per-row frequencies;
    `attention_factor` a scalar or `[B, 1, 1]`.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [..., T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [..., T, D]
    factor = jnp.asarray(attention_factor, jnp.float32)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate `x [B, T, H, D]` by tables `[B, T, D]` in float32 (rotate-half); returns x's dtype."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
