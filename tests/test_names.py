"""The HF <-> qwq-jax name map: complete, invertible, and loud about mismatches."""

import numpy as np
import pytest

from convert.names import check_names, hf_from_state, hf_names, param_shapes, state_from_hf
from helpers import hf_model, hf_tensors
from qwq_jax import QwenConfig


@pytest.mark.parametrize("preset", ["tiny", "tiny-tied"])
def test_every_hf_tensor_maps_and_round_trips_bit_exact(preset):
    cfg = QwenConfig.preset(preset)
    tensors = hf_tensors(hf_model(cfg))
    state = state_from_hf(cfg, tensors)
    back = hf_from_state(cfg, state)
    expected = set(tensors) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert set(back) == expected
    for name in expected:
        assert back[name].shape == tensors[name].shape, name
        np.testing.assert_array_equal(back[name], tensors[name], err_msg=name)


def test_layouts_by_hand():
    cfg = QwenConfig.preset("tiny")
    tensors = hf_tensors(hf_model(cfg))
    state = state_from_hf(cfg, tensors)
    h, k, d, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    q_hf = tensors["model.layers.1.self_attn.q_proj.weight"]  # [H*D, E] (out, in)
    q = state["layers"]["attn"]["q_proj"][1]  # [E, H, D]
    assert q.shape == (e, h, d)
    assert q[3, 2, 5] == q_hf[2 * d + 5, 3]
    o_hf = tensors["model.layers.0.self_attn.o_proj.weight"]  # [E, H*D]
    assert state["layers"]["attn"]["o_proj"][0][2, 5, 7] == o_hf[7, 2 * d + 5]
    assert state["layers"]["attn"]["k_bias"][1][k - 1, 3] == tensors["model.layers.1.self_attn.k_proj.bias"][
        (k - 1) * d + 3]
    down_hf = tensors["model.layers.0.mlp.down_proj.weight"]  # [E, F]
    assert state["layers"]["mlp"]["down_proj"][0][11, 4] == down_hf[4, 11]
    assert set(param_shapes(cfg)) == {r.ours for _, r, _ in hf_names(cfg)}


def test_mismatches_are_named():
    cfg = QwenConfig.preset("tiny")
    tensors = hf_tensors(hf_model(cfg))
    missing = {k: v for k, v in tensors.items() if "layers.1.mlp" not in k}
    with pytest.raises(ValueError, match=r"missing tensors \(3\): model.layers.1.mlp.down_proj.weight"):
        state_from_hf(cfg, missing)
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): model.layers.7.mlp.foo"):
        check_names(cfg, set(tensors) | {"model.layers.7.mlp.foo"})
    bad = dict(tensors)
    bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, cfg.hidden_size), np.float32)
    with pytest.raises(ValueError, match=r"tensor model.layers.0.self_attn.k_proj.weight has shape \(3, 64\), "
                                         r"config.json implies \(32, 64\)"):
        state_from_hf(cfg, bad)
    # A tied checkpoint that stores lm_head anyway is accepted.
    tied = QwenConfig.preset("tiny-tied")
    t = hf_tensors(hf_model(tied))
    t["lm_head.weight"] = t["model.embed_tokens.weight"]
    state_from_hf(tied, t)
