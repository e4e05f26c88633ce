"""Attention backends against an independent numpy reference (float64, KV heads repeated as HF's
`repeat_kv` does), on GQA inputs with padding and packing (attention over the paged KV cache:
tests/test_paged_attention.py).

cuDNN and splash need a GPU / TPU: a test-only `dot_product` backend (defined here) runs cuDNN's
exact plumbing (causal flag, row rolling, per-row lengths, bias) through XLA, and splash runs in
Pallas interpret mode. The kernels themselves are compared on the accelerator by benchmarks/prefill.py.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwq_jax import QwenConfig, init_model
from qwq_jax import attention as attn
from qwq_jax.attention import Mask
from qwq_jax.generate import Engine
from qwq_jax.model import forward
from qwq_jax.sampling import SamplingParams

pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)

B, T, H, K, D = 4, 24, 6, 2, 8  # 3 query heads per KV head
CPU_BACKENDS = ["xla", "dot_product", "blockwise"]  # "auto" is "xla" on a CPU


def dot_product_attention(q, k, v, mask):
    """`jax.nn.dot_product_attention` through XLA, fed exactly as the cudnn backend feeds cuDNN
    (`attention._sdpa`), so its plumbing runs on a CPU."""
    return attn._sdpa(q, k, v, mask, "xla", "dot_product", allow_bias=True)


@pytest.fixture(autouse=True)
def dot_product_backend(monkeypatch):
    """Registers `dot_product` beside the package's backends for every test here."""
    monkeypatch.setitem(attn.BACKENDS, "dot_product", dot_product_attention)


def reference(q, k, v, segq, posq, segk, posk):
    """numpy float64: KV heads repeated, mask from loops; rows that see nothing are NaN."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    mask = np.zeros((b, t, s), bool)
    for r in range(b):
        for i in range(t):
            for j in range(s):
                mask[r, i, j] = segq[r, i] != 0 and segk[r, j] == segq[r, i] and posk[r, j] <= posq[r, i]
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None], scores, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v), mask.any(-1)  # [B, T, H, D], rows that see something


def qkv(seed=0, t=T, s=None, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    s = t if s is None else s
    return (jnp.asarray(r.normal(size=(B, t, H, D)), dtype), jnp.asarray(r.normal(size=(B, s, K, D)), dtype),
            jnp.asarray(r.normal(size=(B, s, K, D)), dtype))


def layouts():
    """Segment ids and positions [B, T] of each layout the package uses."""
    idx = np.arange(T)
    plain = np.ones((B, T), np.int32)
    right = (idx[None] < np.array([T, 17, 5, 1])[:, None]).astype(np.int32)  # generation prefill
    left = (idx[None] >= np.array([0, 3, 11, 20])[:, None]).astype(np.int32)  # GRPO: prompts right-aligned
    packed = np.array([[1] * 10 + [2] * 14, [1] * 5 + [2] * 5 + [3] * 14, [1] * T, [1] * 20 + [0] * 4], np.int32)
    both = (np.abs(idx[None] - 12) < np.array([13, 6, 9, 2])[:, None]).astype(np.int32)  # padded at both ends

    def pos_default(seg):
        return np.broadcast_to(idx, seg.shape).astype(np.int32)

    def pos_cumsum(seg):  # as grpo.completion_logprobs
        return np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)

    def pos_restart(seg):  # each packed sequence counts from 0
        out = np.zeros_like(seg)
        for r in range(seg.shape[0]):
            for i in range(1, seg.shape[1]):
                out[r, i] = out[r, i - 1] + 1 if seg[r, i] == seg[r, i - 1] else 0
        return out

    return {"plain": (plain, pos_default(plain), False), "right-padded": (right, pos_default(right), True),
            "left-padded": (left, pos_cumsum(left), True), "both-ends": (both, pos_cumsum(both), True),
            "packed": (packed, pos_restart(packed), True)}


LAYOUTS = layouts()


def run(backend, q, k, v, mask):
    """The backend's output."""
    fn = jax.jit(lambda q, k, v, m: attn.attention(q, k, v, m, backend=backend))
    return np.asarray(fn(q, k, v, mask), np.float64)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_self_attention_matches_reference(backend, layout):
    seg, pos, segmented = LAYOUTS[layout]
    q, k, v = qkv(seed=1)
    want, seen = reference(q, k, v, seg, pos, seg, pos)
    got = run(backend, q, k, v, Mask.causal(jnp.asarray(seg), jnp.asarray(pos), segmented=segmented))
    assert got.shape == (B, T, H, D)
    if backend == "dot_product" and layout == "packed":
        # cuDNN's plumbing takes one sequence per row: packed rows come out NaN, never wrong numbers.
        one_sequence = np.array([False, False, True, True])
        assert np.isnan(got[~one_sequence]).all()
        np.testing.assert_allclose(got[one_sequence][seen[one_sequence]], want[one_sequence][seen[one_sequence]],
                                   atol=1e-5)
        return
    assert np.isfinite(got).all()  # padding queries: finite, unspecified
    np.testing.assert_allclose(got[seen], want[seen], atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dense_mask_still_accepted(backend):
    seg, pos, _ = LAYOUTS["packed"]
    q, k, v = qkv(seed=2)
    want, seen = reference(q, k, v, seg, pos, seg, pos)
    dense = attn.attention_mask(*(jnp.asarray(x) for x in (seg, pos, seg, pos)))
    np.testing.assert_allclose(run(backend, q, k, v, dense)[seen], want[seen], atol=1e-5)


def blockwise(block):
    return jax.jit(lambda q, k, v, m: attn.blockwise_attention(q, k, v, m, block=block))


@pytest.mark.parametrize("block", [5, 8, 24])  # 5: the last block is padding; 24: one block
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_blockwise_self_attention_in_small_blocks(layout, block):
    seg, pos, segmented = LAYOUTS[layout]
    q, k, v = qkv(seed=11)
    want, seen = reference(q, k, v, seg, pos, seg, pos)
    got = np.asarray(blockwise(block)(q, k, v, Mask.causal(jnp.asarray(seg), jnp.asarray(pos), segmented=segmented)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[seen], want[seen], atol=1e-5)
    dense = attn.attention_mask(*(jnp.asarray(x) for x in (seg, pos, seg, pos)))
    np.testing.assert_allclose(np.asarray(blockwise(block)(q, k, v, dense))[seen], want[seen], atol=1e-5)


def test_blockwise_in_bfloat16_and_gradients():
    seg, pos, _ = LAYOUTS["left-padded"]
    q, k, v = qkv(seed=13)
    want, seen = reference(q, k, v, seg, pos, seg, pos)
    mask = Mask.causal(jnp.asarray(seg), jnp.asarray(pos))
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got16 = np.asarray(blockwise(8)(q16, k16, v16, mask), np.float64)
    assert np.abs(got16[seen] - want[seen]).max() < 0.05
    weight = jnp.asarray(seg, jnp.float32)[:, :, None, None]

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(weight * jnp.sin(fn(q, k, v, mask))), argnums=(0, 1, 2)))(
            q, k, v)

    for a, b in zip(grads(lambda *x: attn.blockwise_attention(*x, block=8)), grads(attn.xla_attention)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("layout", ["left-padded", "plain"])
@pytest.mark.parametrize("t", [T, T - 1])
def test_cudnn_plumbing_gradients_match_reference(layout, t, monkeypatch):
    """The roll + per-row-length route (dot_product) differentiates like the reference on real tokens,
    also for an odd length (cuDNN trains on even lengths only: one padding position is appended)."""
    lengths = []  # what jax.nn.dot_product_attention is given
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, *a, **kw: (lengths.append(q.shape[1]),
                                                                               real(q, *a, **kw))[1])
    seg, pos, segmented = (x[:, :t] if isinstance(x, np.ndarray) else x for x in LAYOUTS[layout])
    q, k, v = qkv(seed=5, t=t)
    mask = Mask.causal(jnp.asarray(seg), jnp.asarray(pos), segmented=segmented)
    want, seen = reference(q, k, v, seg, pos, seg, pos)
    np.testing.assert_allclose(run("dot_product", q, k, v, mask)[seen], want[seen], atol=1e-5)
    weight = jnp.asarray(seg, jnp.float32)[:, :, None, None]  # the loss reads real tokens only

    def loss(backend):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(weight * jnp.sin(attn.attention(q, k, v, mask, backend))),
                                argnums=(0, 1, 2)))(q, k, v)

    for a, b in zip(loss("dot_product"), loss("xla")):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    assert lengths and {n % 2 for n in lengths} == {0} and max(lengths) == t + t % 2


def test_splash_interpret_matches_reference():
    """Splash attention's wiring (scaling, GQA, segment ids, padding to 128) in Pallas interpret mode."""
    seg = np.concatenate([LAYOUTS["left-padded"][0][:2], LAYOUTS["packed"][0][:2]])
    pos = np.concatenate([LAYOUTS["left-padded"][1][:2], LAYOUTS["packed"][1][:2]])
    q, k, v = qkv(seed=6)
    want, seen = reference(q, k, v, seg, pos, seg, pos)
    mask = Mask.causal(jnp.asarray(seg), jnp.asarray(pos))
    got = np.asarray(jax.jit(lambda q, k, v, m: attn.splash_attention(q, k, v, m, interpret=True))(q, k, v, mask))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[seen], want[seen], atol=1e-5)
    plain, ppos, _ = LAYOUTS["plain"]
    want, _ = reference(q, k, v, plain, ppos, plain, ppos)
    mask = Mask.causal(jnp.asarray(plain), jnp.asarray(ppos), segmented=False)
    np.testing.assert_allclose(attn.splash_attention(q, k, v, mask, interpret=True), want, atol=1e-5)


def test_splash_interpret_under_a_mesh():
    """Under `jax.set_mesh` splash runs per shard (batch over data/fsdp, heads over tensor)."""
    from sharding import make_mesh

    seg, pos, _ = LAYOUTS["left-padded"]
    q, k, v = qkv(seed=7)
    want, seen = reference(q, k, v, seg, pos, seg, pos)
    mask = Mask.causal(jnp.asarray(seg), jnp.asarray(pos))
    with jax.set_mesh(make_mesh("data=2,fsdp=2,tensor=2", jax.devices()[:8])):
        got = jax.jit(lambda q, k, v, m: attn.splash_attention(q, k, v, m, interpret=True))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(got)[seen], want[seen], atol=1e-5)


def test_auto_and_override(monkeypatch):
    q = jnp.zeros((1, 2, H, D), jnp.bfloat16)
    monkeypatch.delenv(attn.ENV_OVERRIDE, raising=False)
    assert attn.resolve_auto(q) == "xla"  # this is a CPU
    monkeypatch.setenv(attn.ENV_OVERRIDE, "dot_product")
    assert attn.resolve_auto(q) == "dot_product"
    monkeypatch.setenv(attn.ENV_OVERRIDE, "cudnn")
    with pytest.raises(ValueError, match="'cudnn' needs a GPU, but this process runs on 'cpu'"):
        attn.resolve_auto(q)
    monkeypatch.setenv(attn.ENV_OVERRIDE, "flash9")
    with pytest.raises(ValueError, match="unknown attention backend 'flash9'"):
        attn.resolve_auto(q)


@pytest.mark.parametrize("name,platform", [("cudnn", "GPU"), ("splash", "TPU")])
def test_accelerator_backends_refuse_cpu(name, platform):
    with pytest.raises(ValueError, match=f"{name!r} needs a {platform}, but this process runs on 'cpu'"):
        attn.get_backend(name)
    with pytest.raises(ValueError, match=f"needs a {platform}"):
        init_model(QwenConfig.preset("tiny"), attention_backend=name)


def test_cudnn_falls_back_with_a_reason(caplog):
    seg, pos, segmented = LAYOUTS["plain"]
    q, k, v = qkv(seed=8)  # float32: not for cuDNN
    want, _ = reference(q, k, v, seg, pos, seg, pos)
    with caplog.at_level(logging.WARNING, logger="qwq_jax.attention"):
        got = attn.cudnn_attention(q, k, v, Mask.causal(jnp.asarray(seg), jnp.asarray(pos), segmented=segmented))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert "cuDNN flash attention needs bfloat16/float16, got float32; using the xla reference" in caplog.text


CFG = QwenConfig.preset("tiny")  # 8 query heads on 4 KV heads


@pytest.fixture(scope="module")
def tiny_model():
    return init_model(CFG, seed=2, param_dtype=jnp.float32, dtype=jnp.float32, attention_backend="xla")


def with_backend(model, name):
    """The same weights under another backend (the name is a static attribute of the layers)."""
    attn.get_backend(name)
    model.layers.attn.backend = name
    return model


def test_model_dot_product_matches_xla(tiny_model):
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, CFG.vocab_size, (3, 40)), jnp.int32)
    seg = (np.arange(40)[None] >= np.array([0, 7, 25])[:, None]).astype(np.int32)  # GRPO's left padding
    pos = jnp.asarray(np.maximum(np.cumsum(seg, 1) - 1, 0), jnp.int32)
    out = {}
    for b in CPU_BACKENDS:
        model = with_backend(tiny_model, b)
        out[b] = np.asarray(forward(model, tokens)), np.asarray(forward(model, tokens, pos, jnp.asarray(seg)))
    np.testing.assert_allclose(out["dot_product"][0], out["xla"][0], atol=1e-5)
    np.testing.assert_allclose(out["dot_product"][1][seg == 1], out["xla"][1][seg == 1], atol=1e-5)


def test_generation_same_logprobs_whatever_the_model_backend(tiny_model):
    """Engine generation runs the paged attention whatever the model's backend (for training): the
    same tokens and log-probs under each."""
    prompts = [[5, 9, 2, 7, 11], [3, 1], [8] * 12]
    sp = SamplingParams(temperature=0.0, max_tokens=5)
    outs = {b: [o[0] for o in Engine(with_backend(tiny_model, b), chunk=8, prefill_chunk=4).generate(prompts, sp)]
            for b in CPU_BACKENDS + ["auto"]}
    for b in ("dot_product", "blockwise", "auto"):
        for got, want in zip(outs[b], outs["xla"]):
            assert got.token_ids == want.token_ids
            np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


class _Device:
    """Stands in for a compile-only device of `jax.experimental.topologies` (platform, capability)."""

    def __init__(self, platform, compute_capability=None):
        self.platform = platform
        if compute_capability is not None:
            self.compute_capability = compute_capability


def test_compile_for_chooses_backends_for_the_target(monkeypatch):
    """Ahead-of-time compilation for a GPU from this CPU host: "auto" and the platform checks follow
    the target inside `compile_for`, and this host again outside it (also after an error)."""
    monkeypatch.delenv(attn.ENV_OVERRIDE, raising=False)
    q = jnp.zeros((1, 2, H, D), jnp.bfloat16)
    with attn.compile_for(_Device("gpu", "9.0")):
        assert attn.target_platform() == ("gpu", "9.0")
        assert attn.resolve_auto(q) == "cudnn"
        assert attn.resolve_auto(q.astype(jnp.float32)) == "xla"  # cuDNN takes half precision only
        attn.get_backend("cudnn")  # no platform error
        init_model(QwenConfig.preset("tiny"), attention_backend="cudnn")
        with pytest.raises(ValueError, match="'splash' needs a TPU, but this process compiles for 'gpu'"):
            attn.get_backend("splash")
    wide = jnp.zeros((1, 2, H, 192), jnp.bfloat16)  # head_dim 192: Hopper only
    with attn.compile_for(_Device("gpu", "8.0")):
        assert attn.resolve_auto(wide) == "xla"
    with attn.compile_for(_Device("gpu", "9.0")):
        assert attn.resolve_auto(wide) == "cudnn"
    with attn.compile_for("tpu"):
        assert attn.resolve_auto(q) == "splash"
    with attn.compile_for(jax.devices("cpu")[0]):
        assert attn.resolve_auto(q) == "xla"
    with pytest.raises(RuntimeError), attn.compile_for("gpu"):
        raise RuntimeError("boom")
    assert attn.target_platform() == ("cpu", "0") and attn.resolve_auto(q) == "xla"
    with pytest.raises(ValueError, match="'cudnn' needs a GPU, but this process runs on 'cpu'"):
        attn.get_backend("cudnn")
    with pytest.raises(ValueError, match="compile_for: unknown platform 'metal'"):
        with attn.compile_for("metal"):
            pass


def test_auto_for_a_gpu_target_without_cudnn_falls_back_to_the_reference(caplog):
    """Compiling "auto" for a GPU on a host whose jax has no cuDNN (no CUDA plugin): jax refuses the
    cuDNN call while tracing, and the layer takes the xla reference with the reason logged."""
    seg, pos, segmented = LAYOUTS["plain"]
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(seed=9))
    mask = Mask.causal(jnp.asarray(seg), jnp.asarray(pos), segmented=segmented)
    from qwq_jax.plan import _cuda_plugin_available

    if _cuda_plugin_available():  # this jax has cuDNN: the traced program calls it instead
        with attn.compile_for("gpu"):
            text = jax.jit(attn.auto_attention).lower(q, k, v, mask).as_text()
        assert "cudnn" in text
        return
    want = attn.xla_attention(q, k, v, mask)
    with caplog.at_level(logging.WARNING, logger="qwq_jax.attention"), attn.compile_for("gpu"):
        got = attn.auto_attention(q, k, v, mask)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert "attention backend 'auto': cuDNN unavailable" in caplog.text
