"""Int8 weight-only quantization: the rounding by hand, the quantized model against HF transformers
running the same int8 x scale weights (computed here in numpy, in HF's layout), the engine's cached
decode, a tensor-parallel mesh, memory (donation), and the trainer refusing a quantized model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import sharding as sh
from helpers import hf_logits, hf_model, our_model_from_hf
from qwq_jax import QwenConfig, forward, init_model
from qwq_jax.generate import Engine
from qwq_jax.quant import dequantize, quantize, quantize_array, weight_bytes
from qwq_jax.sampling import SamplingParams

pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)

CFG = QwenConfig.preset("tiny")
HF_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def test_quantize_array_by_hand():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 3, 4)).astype(np.float32)  # contract the first axis: 12 output channels
    w[:, 1, 2] = 0.0                                     # an all-zero channel
    w[2, 0, 0] = -5.0                                    # a channel whose largest |w| is negative
    q, s = (np.asarray(a) for a in quantize_array(jnp.asarray(w), 1))
    assert q.dtype == np.int8 and q.shape == w.shape and s.shape == (3, 4) and s.dtype == np.float32
    for j in range(3):
        for k in range(4):
            col = w[:, j, k]
            amax = np.abs(col).max()
            scale = amax / 127 if amax > 0 else 1.0
            assert np.isclose(s[j, k], scale, rtol=1e-6)
            np.testing.assert_array_equal(q[:, j, k], np.round(col / scale).astype(np.int8))
            assert np.abs(col - q[:, j, k] * s[j, k]).max() <= scale / 2 * (1 + 1e-5)
    assert q[2, 0, 0] == -127 and np.all(q[:, 1, 2] == 0) and s[1, 2] == 1.0
    np.testing.assert_allclose(np.asarray(dequantize(jnp.asarray(q), jnp.asarray(s))), q * s)
    # Two contracted axes (o_proj [heads, head_dim, embed]): one scale per embed channel.
    q2, s2 = quantize_array(jnp.asarray(w), 2)
    assert s2.shape == (4,)
    np.testing.assert_allclose(np.asarray(s2), np.abs(w).max(axis=(0, 1)) / 127, rtol=1e-6)


def hf_with_int8_weights(cfg: QwenConfig, seed: int):
    """A HF model and a copy whose seven linear weights per layer are replaced by their int8 x scale
    values, quantized here in numpy per output row of HF's [out, in] layout."""
    model = hf_model(cfg, seed)
    ref = hf_model(cfg, seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".weight") and any(f".{lin}." in name for lin in HF_LINEARS):
                w = p.numpy().astype(np.float64)
                scale = np.abs(w).max(axis=1, keepdims=True) / 127
                p.copy_(torch.from_numpy((np.round(w / scale) * scale).astype(np.float32)))
    return model, ref


@pytest.fixture(scope="module")
def models():
    model, ref = hf_with_int8_weights(CFG, seed=3)
    ours = our_model_from_hf(CFG, model)
    return ours, quantize(ours), ref


def test_quantized_logits_equal_hf_running_the_int8_weights(models):
    ours, qmodel, ref = models
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 19))
    want = hf_logits(ref, tokens)
    got = np.asarray(forward(qmodel, jnp.asarray(tokens, jnp.int32)))
    assert np.abs(got - want).max() < 1e-4
    # ... and quantization did change the model (the comparison above can tell the two apart).
    assert np.abs(np.asarray(forward(ours, jnp.asarray(tokens, jnp.int32))) - want).max() > 1e-3


def test_quantized_model_layout_and_bytes(models):
    ours, qmodel, _ = models
    attn = nnx.to_pure_dict(nnx.state(qmodel))["layers"]["attn"]
    L, E, H, K, D = CFG.num_layers, CFG.hidden_size, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    assert attn["q_proj"].dtype == jnp.int8 and attn["q_proj"].shape == (L, E, H, D)
    assert attn["q_proj_scale"].shape == (L, H, D) and attn["k_proj_scale"].shape == (L, K, D)
    assert attn["o_proj_scale"].shape == (L, E) and attn["q_bias"].dtype == jnp.float32
    mlp = nnx.to_pure_dict(nnx.state(qmodel))["layers"]["mlp"]
    assert mlp["down_proj_scale"].shape == (L, E) and mlp["gate_proj_scale"].shape == (L, CFG.intermediate_size)
    # float32 -> int8: each matmul weight element drops from 4 bytes to 1, plus one float32 per channel.
    linear = L * (E * H * D + 2 * E * K * D + H * D * E + 3 * E * CFG.intermediate_size)
    scales = L * (H * D + 2 * K * D + E + 2 * CFG.intermediate_size + E)
    assert weight_bytes(ours) - weight_bytes(qmodel) == 3 * linear - 4 * scales
    assert ours.quant is None and qmodel.quant == "int8"


def test_engine_decode_with_int8_weights_equals_recompute(models):
    _, qmodel, _ = models
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, CFG.vocab_size, n).tolist() for n in (6, 23)]
    outs = Engine(qmodel, chunk=4, prefill_chunk=8).generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    for p, out in zip(prompts, outs):
        seq = np.zeros((1, len(p) + 8), np.int32)
        seq[0, : len(p)] = p
        for n in range(len(p), len(p) + 8):  # no cache: the whole sequence every step
            seq[0, n] = int(jnp.argmax(forward(qmodel, jnp.asarray(seq))[0, n - 1]))
        assert out[0].token_ids == seq[0, len(p):].tolist()


def test_quantize_a_tensor_parallel_model_keeps_shardings_and_tokens():
    model = init_model(CFG, seed=7, param_dtype=jnp.float32, dtype=jnp.float32)
    want_model = quantize(model)
    mesh = sh.make_mesh("data=2,tensor=4")
    sharded = quantize(sh.shard_model(init_model(CFG, seed=7, param_dtype=jnp.float32, dtype=jnp.float32),
                                      mesh, "generate"), donate=True)
    state = nnx.to_pure_dict(nnx.state(sharded))["layers"]
    want = nnx.to_pure_dict(nnx.state(sh.shard_model(quantize(init_model(CFG, seed=7, param_dtype=jnp.float32,
                                                                            dtype=jnp.float32)),
                                                     mesh, "generate")))["layers"]
    for part in ("attn", "mlp"):
        for name, x in state[part].items():
            assert x.sharding.is_equivalent_to(want[part][name].sharding, x.ndim), (part, name)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(want[part][name]))
    assert state["attn"]["q_proj_scale"].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(1, CFG.vocab_size, n).tolist() for n in (5, 12, 9)]
    sp = SamplingParams(temperature=0.8, top_k=20, max_tokens=6, seed=1)
    got = Engine(sharded, mesh=mesh).generate(prompts, sp)
    ref = Engine(want_model).generate(prompts, sp)
    assert [o[0].token_ids for o in got] == [o[0].token_ids for o in ref]


@pytest.mark.parametrize("mesh", [None, "data=2,tensor=4"])
def test_load_quantizes_as_it_reads_what_quantize_gives(tmp_path, mesh):
    """`qwq_jax.load(path, quant="int8")` quantizes each layer as it is read (tests/test_convert.py bounds
    its memory): the same int8 weights, scales and shardings as quantizing the float model it loads."""
    from convert.hf import HFSource, convert_source
    from convert.synthetic import write_random_hf_checkpoint
    from qwq_jax import load

    src = write_random_hf_checkpoint(CFG, tmp_path / "src", dtype="float32", seed=4)
    convert_source(HFSource(src), tmp_path / "out", progress=False)
    mesh = sh.make_mesh(mesh) if mesh else None
    got = nnx.to_pure_dict(nnx.state(load(tmp_path / "out", mesh=mesh, quant="int8")))
    want = nnx.to_pure_dict(nnx.state(quantize(load(tmp_path / "out", mesh=mesh), donate=True)))
    got, want = (dict(jax.tree_util.tree_leaves_with_path(x)) for x in (got, want))
    assert got.keys() == want.keys() and any("q_proj_scale" in jax.tree_util.keystr(k) for k in got)
    for k, x in got.items():
        assert x.dtype == want[k].dtype and x.sharding.is_equivalent_to(want[k].sharding, x.ndim), k
        np.testing.assert_array_equal(np.asarray(x), np.asarray(want[k]), err_msg=jax.tree_util.keystr(k))
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        load(tmp_path / "out", quant="int4")


def test_donate_frees_the_float_weights_and_bad_calls_are_refused():
    model = init_model(CFG, seed=1, param_dtype=jnp.float32, dtype=jnp.float32)
    gate = model.layers.mlp.gate_proj[...]
    embed = model.embed[...]
    qmodel = quantize(model, donate=True)
    assert gate.is_deleted() and not embed.is_deleted()
    assert qmodel.embed[...] is embed  # shared, not copied
    with pytest.raises(ValueError, match="already quantized"):
        quantize(qmodel)
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize(init_model(CFG), "int4")
    with pytest.raises(ValueError, match="unknown quantization 'fp8'"):
        init_model(CFG, quant="fp8")


def test_grpo_trainer_refuses_a_quantized_model():
    from qwq_jax.rl.grpo import GRPOConfig, GRPOTrainer

    qmodel = quantize(init_model(CFG, seed=1, param_dtype=jnp.float32, dtype=jnp.float32))
    with pytest.raises(ValueError, match="int8 weight-only"):
        GRPOTrainer(qmodel, GRPOConfig(), reward_fn=lambda *a: [0.0])
