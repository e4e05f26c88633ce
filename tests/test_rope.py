"""RoPE / YaRN tables against transformers' Qwen2RotaryEmbedding (fp32)."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

from helpers import hf_config
from qwq_jax.config import QwenConfig, RopeScaling
from qwq_jax.rope import apply_rope, inv_frequencies, rope_tables

QWQ_YARN = QwenConfig.preset("qwq-32b-yarn")
CONFIGS = {
    "qwq-32b-yarn": QWQ_YARN,
    "qwq-32b": QwenConfig.preset("qwq-32b"),
    "qwen2.5-0.5b": QwenConfig.preset("qwen2.5-0.5b"),
    "tiny": QwenConfig.preset("tiny"),
    "tiny-yarn": QwenConfig.preset("tiny-yarn"),
    "linear": QwenConfig.preset("tiny").replace(rope_scaling=RopeScaling("linear", 2.5)),
    "yarn-explicit-attention-factor": QWQ_YARN.replace(
        rope_scaling=RopeScaling("yarn", 4.0, 32768, attention_factor=1.25, beta_fast=16.0, beta_slow=2.0)),
    "yarn-mscale": QWQ_YARN.replace(
        rope_scaling=RopeScaling("yarn", 8.0, 4096, mscale=1.0, mscale_all_dim=0.707)),
    "yarn-no-truncate": QWQ_YARN.replace(rope_scaling=RopeScaling("yarn", 4.0, 32768, truncate=False)),
}
# 4,096 positions spread over 0..131071, the ends and the 32,768 boundary included.
SAMPLED = np.unique(np.concatenate([np.arange(0, 64), np.arange(32700, 32840), np.arange(131008, 131072),
                                    np.random.default_rng(0).integers(0, 131072, 3828)]))


def hf_rotary(cfg):
    rot = Qwen2RotaryEmbedding(hf_config(cfg))
    return rot, rot.inv_freq.numpy(), rot.attention_scaling


def hf_tables(rot, positions):
    cos, sin = rot(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions[None].astype(np.int64)))
    return cos[0].numpy(), sin[0].numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_frequencies_and_attention_factor(name):
    cfg = CONFIGS[name]
    rot, hf_inv, hf_factor = hf_rotary(cfg)
    inv, factor = inv_frequencies(cfg)
    assert inv.dtype == np.float32 and inv.shape == hf_inv.shape
    assert factor == pytest.approx(hf_factor, rel=1e-12)
    # Equal, except where torch's float32 SIMD pow is not correctly rounded: there by 1 ulp.
    ulps = np.abs(inv.view(np.int32).astype(np.int64) - hf_inv.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1 and (ulps == 0).mean() >= 0.95, ulps


def test_qwq_yarn_attention_factor_is_0_1_ln4_plus_1():
    assert inv_frequencies(QWQ_YARN)[1] == pytest.approx(0.1 * math.log(4.0) + 1, abs=1e-12)
    assert inv_frequencies(QWQ_YARN)[1] == pytest.approx(1.13863, abs=1e-5)
    assert inv_frequencies(QWQ_YARN, scaled=False)[1] == 1.0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tables_match_hf(name):
    cfg = CONFIGS[name]
    positions = SAMPLED if cfg.head_dim == 128 else np.arange(0, 4096)
    rot, hf_inv, hf_factor = hf_rotary(cfg)
    hf_cos, hf_sin = hf_tables(rot, positions)
    inv, factor = inv_frequencies(cfg)
    cos, sin = (np.asarray(t) for t in rope_tables(jnp.asarray(positions, jnp.int32), inv, factor))
    half = cfg.head_dim // 2
    same = np.concatenate([inv == hf_inv] * 2)
    # Columns whose frequency is bit-identical to HF's: equal to 1e-6 at every position.
    assert np.abs(cos - hf_cos)[:, same].max() <= 1e-6
    assert np.abs(sin - hf_sin)[:, same].max() <= 1e-6
    # The (at most few) columns 1 ulp apart: the angle differs by position * delta, no more.
    if not same.all():
        delta = np.abs(inv.astype(np.float64) - hf_inv)[np.tile(np.arange(half), 2)][~same]
        bound = 1e-6 + factor * (positions[:, None] * delta[None] + 2 * np.spacing(
            (positions[:, None] * inv[np.tile(np.arange(half), 2)][~same][None]).astype(np.float32)))
        assert (np.abs(cos - hf_cos)[:, ~same] <= bound).all()
        assert (np.abs(sin - hf_sin)[:, ~same] <= bound).all()


def test_yarn_changes_only_low_frequencies():
    plain, _ = inv_frequencies(QWQ_YARN, scaled=False)
    yarn, _ = inv_frequencies(QWQ_YARN)
    assert yarn[0] == plain[0]  # fastest rotations extrapolate
    assert yarn[-1] == pytest.approx(plain[-1] / 4, rel=1e-6)  # slowest interpolate by the factor
    assert (yarn <= plain).all()


def test_apply_rope_matches_hf_rotate_half():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 7, 4, 16)).astype(np.float32)
    k = rng.standard_normal((2, 7, 2, 16)).astype(np.float32)
    positions = rng.integers(0, 5000, (2, 7))
    cfg = QwenConfig.preset("tiny-yarn")
    inv, factor = inv_frequencies(cfg)
    cos, sin = rope_tables(jnp.asarray(positions), inv, factor)
    ours_q, ours_k = apply_rope(jnp.asarray(q), cos, sin), apply_rope(jnp.asarray(k), cos, sin)
    # HF layout is [B, H, T, D] with tables [B, T, D].
    hq, hk = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2),
                                  torch.from_numpy(np.array(cos)), torch.from_numpy(np.array(sin)))
    np.testing.assert_allclose(np.asarray(ours_q), hq.transpose(1, 2).numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours_k), hk.transpose(1, 2).numpy(), atol=1e-6)
