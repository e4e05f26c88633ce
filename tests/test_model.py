"""Logit parity with transformers' Qwen2ForCausalLM in fp32, same weights through the name map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import hf_logits, hf_model, our_model_from_hf
from qwq_jax import QwenConfig, abstract_model, forward, init_model
from qwq_jax.model import REMAT_POLICIES

pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)

TOL = 1e-4
BASE = QwenConfig.preset("tiny")
CASES = {
    # untied, GQA 4 query heads on 2 KV heads
    "untied-gqa": BASE,
    # tied embeddings, a single KV head, 3 query heads (odd)
    "tied-mqa-odd": QwenConfig.preset("tiny-tied"),
    # plain multi-head attention with an odd head count, head_dim != hidden / heads
    "mha-odd-headdim": BASE.replace(num_heads=5, num_kv_heads=5, head_dim=8, hidden_size=48, intermediate_size=72),
    # 6 query heads on 3 KV heads (odd group count), rms eps like QwQ
    "gqa-3kv": BASE.replace(num_heads=6, num_kv_heads=3, hidden_size=96, head_dim=16, rms_norm_eps=1e-5,
                            rope_theta=1e6),
}


def rand_tokens(cfg, shape, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_match_hf_512_tokens(name):
    cfg = CASES[name]
    ref = hf_model(cfg, seed=1)
    ours = our_model_from_hf(cfg, ref)
    tokens = rand_tokens(cfg, (2, 520))
    want, want_hidden = hf_logits(ref, tokens, hidden=True)
    got, hidden = forward(ours, jnp.asarray(tokens), return_hidden=True)
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == (2, 520, cfg.vocab_size)
    assert np.abs(want).max() > 1.0  # logits large enough that the comparison means something
    err = np.abs(got - want).max()
    print(f"{name}: max |dlogit| = {err:.2e}")
    assert err <= TOL
    # Per-layer residual stream (HF's hidden_states[i + 1] is the output of layer i, the last one normed).
    for i in range(cfg.num_layers - 1):
        np.testing.assert_allclose(np.asarray(hidden[i]), want_hidden[i + 1], atol=TOL, rtol=0)


def test_yarn_beyond_original_length():
    cfg = QwenConfig.preset("tiny-yarn")  # 256 original positions, factor 4
    assert cfg.original_max_position_embeddings == 256
    ref = hf_model(cfg, seed=2)
    ours = our_model_from_hf(cfg, ref)
    tokens = rand_tokens(cfg, (1, 600), seed=3)
    want = hf_logits(ref, tokens)
    got = np.asarray(forward(ours, jnp.asarray(tokens)))
    err = np.abs(got - want).max()
    # Same again at positions 424..1023, far past the original length.
    positions = np.arange(424, 1024)[None].astype(np.int32)
    want_far = hf_logits(ref, tokens, position_ids=positions)
    got_far = np.asarray(forward(ours, jnp.asarray(tokens), jnp.asarray(positions)))
    err_far = np.abs(got_far - want_far).max()
    print(f"yarn: max |dlogit| = {err:.2e}, at positions 424..1023: {err_far:.2e}")
    assert err <= TOL and err_far <= TOL
    # And YaRN actually matters there: plain RoPE gives different logits.
    plain = our_model_from_hf(cfg.replace(rope_scaling=None), ref)
    assert np.abs(np.asarray(forward(plain, jnp.asarray(tokens))) - want).max() > 100 * TOL


def test_right_padded_batch():
    cfg = CASES["untied-gqa"]
    ref = hf_model(cfg, seed=4)
    ours = our_model_from_hf(cfg, ref)
    lengths = [512, 301, 37]
    tokens = rand_tokens(cfg, (3, 512), seed=5)
    mask = (np.arange(512)[None] < np.array(lengths)[:, None]).astype(np.int32)
    tokens = np.where(mask == 1, tokens, 0)
    want = hf_logits(ref, tokens, attention_mask=mask)
    got = np.asarray(forward(ours, jnp.asarray(tokens), None, jnp.asarray(mask)))
    assert np.isfinite(got).all()
    errs = [np.abs(got[i, :n] - want[i, :n]).max() for i, n in enumerate(lengths)]
    print("padded batch: max |dlogit| per row", [f"{e:.2e}" for e in errs])
    assert max(errs) <= TOL
    # Each row equals that prompt run alone, unpadded.
    for i, n in enumerate(lengths):
        alone = np.asarray(forward(ours, jnp.asarray(tokens[i:i + 1, :n])))
        np.testing.assert_allclose(got[i, :n], alone[0], atol=1e-5, rtol=0)


def test_packed_segments_equal_separate_sequences():
    cfg = CASES["tied-mqa-odd"]
    model = init_model(cfg, param_dtype=jnp.float32, dtype=jnp.float32)
    a, b = rand_tokens(cfg, (1, 20), 6), rand_tokens(cfg, (1, 12), 7)
    packed = np.concatenate([a, b], axis=1)
    segments = np.array([[1] * 20 + [2] * 12], np.int32)
    positions = np.array([list(range(20)) + list(range(12))], np.int32)
    got = np.asarray(forward(model, jnp.asarray(packed), jnp.asarray(positions), jnp.asarray(segments)))
    np.testing.assert_allclose(got[:, :20], np.asarray(forward(model, jnp.asarray(a))), atol=1e-5)
    np.testing.assert_allclose(got[:, 20:], np.asarray(forward(model, jnp.asarray(b))), atol=1e-5)


def test_bf16_compute_close_to_fp32():
    cfg = CASES["untied-gqa"]
    ref = hf_model(cfg, seed=8)
    tokens = jnp.asarray(rand_tokens(cfg, (1, 64)))
    f32 = np.asarray(forward(our_model_from_hf(cfg, ref), tokens))
    bf16 = forward(our_model_from_hf(cfg, ref, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16), tokens)
    assert bf16.dtype == jnp.float32  # logits stay float32
    assert np.abs(np.asarray(bf16) - f32).max() < 0.1 * np.abs(f32).max()


@pytest.mark.parametrize("policy", sorted(set(REMAT_POLICIES) - {"none"}))
def test_remat_policies_same_loss_and_grads(policy):
    cfg = CASES["tied-mqa-odd"]
    tokens = jnp.asarray(rand_tokens(cfg, (2, 16)))

    def loss_and_grads(remat):
        model = init_model(cfg, seed=3, param_dtype=jnp.float32, dtype=jnp.float32, remat=remat)

        def loss(m):
            logp = jax.nn.log_softmax(m(tokens)[:, :-1])
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return value, jax.tree.leaves(nnx.state(grads))

    v0, g0 = loss_and_grads("none")
    v1, g1 = loss_and_grads(policy)
    assert abs(float(v0) - float(v1)) < 1e-6
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_remat_of_unrolled_layers_keeps_its_recomputation_apart():
    """Layers run unrolled (`layers=split_layers(...)`, the trainer's default compute copy) under remat:
    the gradient program must keep each layer's recomputation apart from its forward (an optimization
    barrier), or the compiler merges the two and holds every layer's activations, as if there were no
    remat. Measured with the real compilers (qwq_jax.plan's AOT path): QwQ-32B's QLoRA update for one
    H200 compiled to 174 GiB of which 136 temporaries before, 64 GiB after; an 8-layer model's update at
    2,048 tokens for a TPU v5e, 711 MiB of temporaries (757 without remat) before, 464 after. Under
    `scan` the loop keeps them apart already, and the barrier, which costs fusion, stays out. The same
    loss and gradients either way."""
    from qwq_jax.model import split_layers

    cfg = CASES["tied-mqa-odd"]
    tokens = jnp.asarray(rand_tokens(cfg, (2, 16)))
    model = init_model(cfg, seed=3, param_dtype=jnp.float32, dtype=jnp.float32, remat="full")
    graphdef, state = nnx.split(model)

    def loss(state, layers):
        m = nnx.merge(graphdef, state)
        x, _, _ = m.hidden_states(tokens, layers=layers)
        logp = jax.nn.log_softmax(m.logits(x)[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    layers = split_layers(nnx.state(model.layers))
    assert "optimization_barrier" in grad.lower(state, layers).as_text()
    assert "optimization_barrier" not in grad.lower(state, None).as_text()
    (v_split, (_, g_split)), (v_scan, (g_scan, _)) = grad(state, layers), grad(state, None)
    assert abs(float(v_split) - float(v_scan)) < 1e-6
    for i, layer in enumerate(g_split):  # the unrolled layers' gradients are the scanned stack's rows
        for a, b in zip(jax.tree.leaves(layer), jax.tree.leaves(g_scan["layers"])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b)[i], atol=1e-6)


def test_parameters_declared_with_logical_axes():
    model = abstract_model(QwenConfig.preset("qwq-32b"), param_dtype="bfloat16")
    specs = nnx.get_partition_spec(nnx.state(model))
    assert tuple(specs["layers"]["attn"]["q_proj"].get_value()) == ("layers", "embed", "heads", "head_dim")
    assert tuple(specs["layers"]["mlp"]["down_proj"].get_value()) == ("layers", "mlp", "embed")
    assert tuple(specs["lm_head"].get_value()) == ("vocab", "embed")
    q = nnx.state(model)["layers"]["attn"]["q_proj"].get_value()
    assert q.shape == (64, 5120, 40, 128) and q.dtype == jnp.bfloat16
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert total == QwenConfig.preset("qwq-32b").num_params()


def test_bad_model_options():
    with pytest.raises(ValueError, match="unknown remat policy 'some'"):
        init_model(BASE, remat="some")
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'"):
        init_model(BASE, attention_backend="flash3")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        init_model(BASE, dtype="fp8")
