"""Generation engine: cached decode vs recompute, ragged batches, meshes, YaRN auto, HF greedy parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sharding as sh
from helpers import hf_model, our_model_from_hf
from qwq_jax import QwenConfig, forward, init_model
from qwq_jax.generate import Engine
from qwq_jax.sampling import SamplingParams

pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)

CFG = QwenConfig.preset("tiny")


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=5, param_dtype=jnp.float32, dtype=jnp.float32)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, CFG.vocab_size, n).tolist() for n in lengths]


def greedy_by_recompute(model, prompt, steps):
    """Reference: full forward over the whole sequence for every new token (no cache)."""
    seq = np.zeros((1, len(prompt) + steps), np.int32)  # one shape: causal, so the padding is never seen
    seq[0, : len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + steps):
        logits = forward(model, jnp.asarray(seq))
        seq[0, n] = int(jnp.argmax(logits[0, n - 1]))
    return seq[0, len(prompt):].tolist()


def test_cached_greedy_equals_full_recompute_ragged_batch(model):
    ps = prompts([5, 33, 17])
    engine = Engine(model, chunk=4)
    outs = engine.generate(ps, SamplingParams(temperature=0.0, max_tokens=12))
    for p, out in zip(ps, outs):
        assert out[0].token_ids == greedy_by_recompute(model, p, 12)
        assert out[0].finish_reason == "length" and out[0].prompt_tokens == len(p)


def test_ragged_batch_equals_each_prompt_alone_when_sampling(model):
    ps = prompts([9, 40, 3, 21], seed=1)
    sp = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=10, seed=100 + i) for i in range(4)]
    engine = Engine(model, chunk=3)
    together = engine.generate(ps, sp)
    for i, p in enumerate(ps):
        alone = engine.generate([p], sp[i])
        assert alone[0][0].token_ids == together[i][0].token_ids


def test_n_samples_share_prefill_are_distinct_and_seeded(model):
    engine = Engine(model)
    sp = SamplingParams(temperature=1.0, max_tokens=16, n=4, seed=7)
    a = engine.generate(prompts([6]), sp)[0]
    b = engine.generate(prompts([6]), sp)[0]
    assert len(a) == 4
    assert [c.token_ids for c in a] == [c.token_ids for c in b]  # seed reproduces
    assert len({tuple(c.token_ids) for c in a}) == 4  # samples differ
    c = engine.generate(prompts([6]), SamplingParams(temperature=1.0, max_tokens=16, n=4, seed=8))[0]
    assert [x.token_ids for x in c] != [x.token_ids for x in a]


@pytest.mark.parametrize("prefill_chunk", [1, 7, 16])
def test_chunked_prefill_equals_full_recompute(model, prefill_chunk):
    """Prompts longer than `prefill_chunk` go in several calls (ragged: some rows end early, one
    mid-chunk); greedy tokens equal the no-cache recompute, log-probs equal a one-call prefill."""
    ps = prompts([5, 33, 16, 40], seed=11)
    sp = SamplingParams(temperature=0.0, max_tokens=10)
    engine = Engine(model, chunk=4, prefill_chunk=prefill_chunk)
    outs = engine.generate(ps, sp)
    assert engine.last_timings["prefill_chunks"] == sum(-(-len(p) // prefill_chunk) for p in ps)  # one row a call
    whole = Engine(model, chunk=4, prefill_chunk=None).generate(ps, sp)
    for p, out, one in zip(ps, outs, whole):
        assert out[0].token_ids == greedy_by_recompute(model, p, 10)
        np.testing.assert_allclose(out[0].logprobs, one[0].logprobs, atol=1e-5)


def test_chunked_prefill_on_a_mesh_and_when_sampling(model):
    ps = prompts([7, 30, 12], seed=12)
    sp = SamplingParams(temperature=0.9, top_k=40, max_tokens=8, seed=4)
    want = Engine(model, prefill_chunk=None).generate(ps, sp)
    mesh = sh.make_mesh("data=2,tensor=4")
    sharded = sh.shard_model(init_model(CFG, seed=5, param_dtype=jnp.float32, dtype=jnp.float32), mesh, "generate")
    got = Engine(sharded, mesh=mesh, prefill_chunk=8).generate(ps, sp)
    assert [o[0].token_ids for o in got] == [o[0].token_ids for o in want]


def test_split_layer_loop_equals_full_recompute_and_the_scan(model):
    ps = prompts([5, 21], seed=3)
    sp = SamplingParams(temperature=0.0, max_tokens=10)
    got = Engine(model, chunk=4, prefill_chunk=8, layer_loop="split").generate(ps, sp)
    scanned = Engine(model, chunk=4, prefill_chunk=8).generate(ps, sp)
    for p, out, ref in zip(ps, got, scanned):
        assert out[0].token_ids == greedy_by_recompute(model, p, 10)
        np.testing.assert_allclose(out[0].logprobs, ref[0].logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="layer_loop='vmap' must be one of scan, split"):
        Engine(model, layer_loop="vmap")


def test_split_layers_on_a_mesh_keep_shardings_and_free_the_stacks():
    from flax import nnx

    mesh = sh.make_mesh("data=2,tensor=4")
    sharded = sh.shard_model(init_model(CFG, seed=5, param_dtype=jnp.float32, dtype=jnp.float32), mesh, "generate")
    stacked = nnx.to_pure_dict(nnx.state(sharded.layers))
    want = {k: np.asarray(v) for k, v in stacked["mlp"].items()}
    ps = prompts([7, 30, 12], seed=12)
    sp = SamplingParams(temperature=0.9, top_k=40, max_tokens=8, seed=4)
    ref = Engine(sharded, mesh=mesh).generate(ps, sp)
    engine = Engine(sharded, mesh=mesh, layer_loop="split", donate_weights=True, prefill_chunk=8)
    assert stacked["mlp"]["gate_proj"].is_deleted()  # donated: the stacks are gone
    assert len(engine.layer_params) == CFG.num_layers
    for i, layer in enumerate(engine.layer_params):
        gate = layer["mlp"]["gate_proj"]
        assert gate.shape == (CFG.hidden_size, CFG.intermediate_size)
        assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")  # the stack's, minus layers
        np.testing.assert_array_equal(np.asarray(gate), want["gate_proj"][i])
    assert [o[0].token_ids for o in engine.generate(ps, sp)] == [o[0].token_ids for o in ref]


def test_split_layers_through_host_memory_frees_the_device_stacks():
    from flax import nnx

    from qwq_jax.model import split_layers

    model = init_model(CFG, seed=2, param_dtype=jnp.float32, dtype=jnp.float32)
    stacked = nnx.state(model.layers)
    copies = jax.tree.map(np.asarray, stacked)
    layers = split_layers(stacked, donate=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(stacked))
    for i, layer in enumerate(layers):
        jax.tree.map(lambda got, full: np.testing.assert_array_equal(np.asarray(got), full[i]), layer, copies)


@pytest.mark.parametrize("layer_loop", ["scan", "split"])
def test_lowering_with_abstract_weights(model, layer_loop):
    """Engine.lower_decode / lower_prefill on an abstract model (no weights) compile here; their
    argument bytes are the weights + the page pool (+ small per-slot state) counted by hand."""
    from flax import nnx

    from qwq_jax.model import abstract_model

    abstract = abstract_model(CFG, param_dtype=jnp.float32, dtype=jnp.float32)
    engine = Engine(abstract, layer_loop=layer_loop, chunk=4)
    decode = engine.lower_decode(2, 64).compile()
    prefill = engine.lower_prefill(2, 32, 64).compile()
    weights = sum(x.size * 4 for x in jax.tree.leaves(nnx.state(model)))
    cache = 2 * CFG.num_layers * 2 * 64 * CFG.num_kv_heads * CFG.head_dim * 4  # 2 x 4 pages of 16 tokens, k + v
    small = 2 * CFG.vocab_size * (4 + 1) + 2 * 3 * 4  # the slots: counts, prompt mask, 3 ints (decode only)
    for compiled in (decode, prefill):
        used = weights
        args = compiled.memory_analysis().argument_size_in_bytes
        assert used + cache <= args <= used + cache + small + 8192, (args, used, cache)


def test_engine_rejects_bad_chunk_sizes(model):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk="):
            Engine(model, prefill_chunk=bad)
    with pytest.raises(ValueError, match="chunk=0"):
        Engine(model, chunk=0)


def test_eight_device_mesh_equals_one_device(model):
    ps = prompts([7, 30, 12], seed=2)
    sp = SamplingParams(temperature=0.7, max_tokens=9, seed=3)
    want = Engine(model).generate(ps, sp)
    mesh = sh.make_mesh("data=2,tensor=4")
    sharded = sh.shard_model(init_model(CFG, seed=5, param_dtype=jnp.float32, dtype=jnp.float32), mesh, "generate")
    got = Engine(sharded, mesh=mesh).generate(ps, sp)
    assert [o[0].token_ids for o in got] == [o[0].token_ids for o in want]


def test_stop_token_ids_and_streaming_chunks_concatenate(model):
    p = prompts([11], seed=4)
    free = Engine(model, chunk=2).generate(p, SamplingParams(temperature=0.0, max_tokens=20))[0][0].token_ids
    stop_at = free[6]
    engine = Engine(model, chunk=2)
    streamed = []
    for events in engine.stream(p, SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=(stop_at,))):
        for ev in events:
            streamed += ev.token_ids
    final = engine.last_completions[0][0]
    assert final.token_ids == streamed == free[: free.index(stop_at) + 1]
    assert final.finish_reason == "stop" and final.stop_reason == stop_at
    assert engine.last_timings["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("prefill_chunk", [None, 5])
def test_greedy_equals_hf_generate_tiny(prefill_chunk):
    cfg = QwenConfig.preset("tiny-tied")
    ref = hf_model(cfg, seed=9)
    ours = our_model_from_hf(cfg, ref)
    ps = prompts([13, 4], seed=5)
    outs = Engine(ours, prefill_chunk=prefill_chunk).generate(ps, SamplingParams(temperature=0.0, max_tokens=24))
    for p, out in zip(ps, outs):
        with torch.no_grad():
            hf = ref.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert out[0].token_ids == hf[0, len(p):].tolist()


def test_yarn_auto_short_equals_plain_long_equals_hf_yarn():
    cfg = QwenConfig.preset("tiny-yarn")  # original context 256, YaRN x4
    ref = hf_model(cfg, seed=10)
    ours = our_model_from_hf(cfg, ref)
    plain = our_model_from_hf(cfg.replace(rope_scaling=None), ref)
    short = prompts([40], seed=6)
    sp = SamplingParams(temperature=0.0, max_tokens=20)
    auto = Engine(ours, rope_scaling="auto").generate(short, sp)[0][0].token_ids
    assert auto == Engine(plain).generate(short, sp)[0][0].token_ids
    static = Engine(ours, rope_scaling="static").generate(short, sp)[0][0].token_ids
    assert static != auto  # YaRN does change a short request: that is why "auto" exists
    long = prompts([300], seed=7)  # 300 + 20 > 256: YaRN under auto
    got = Engine(ours, rope_scaling="auto", prefill_chunk=64).generate(long, sp)[0][0].token_ids  # 5 chunks
    with torch.no_grad():
        hf = ref.generate(torch.tensor(long), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == hf[0, 300:].tolist()
    # One batch may mix both: each row gets its own rotary tables.
    mixed = Engine(ours, rope_scaling="auto").generate(short + long, sp)
    assert mixed[0][0].token_ids == auto and mixed[1][0].token_ids == got


def test_invalid_requests_name_the_field(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.generate(prompts([10]), SamplingParams(max_tokens=CFG.max_position_embeddings))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="outside 0..511"):
        engine.generate([[1, 512]], SamplingParams())
    with pytest.raises(ValueError, match="rope_scaling='dynamic'"):
        Engine(model, rope_scaling="dynamic")


def test_stop_strings_cut_the_text_and_the_tokens():
    """A stop string found on the host ends the row at the first token whose text contains it; the
    text ends before it (vLLM semantics); the tokens are a prefix of the unstopped run."""
    from qwq_jax.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    model = init_model(QwenConfig.preset("tiny"), seed=3, param_dtype=jnp.float32, dtype=jnp.float32)
    engine = Engine(model, tok)
    prompt = [[72, 105, 33]]
    sp = dict(temperature=1.0, seed=0, max_tokens=40)
    free = engine.generate(prompt, SamplingParams(**sp))[0][0]
    text = tok.decode(free.token_ids)
    stop = next(ch for ch in text[2:] if ch.isascii() and ch.isprintable())  # a character it will write
    got = engine.generate(prompt, SamplingParams(**sp, stop=(stop,)))[0][0]
    assert got.finish_reason == "stop" and got.stop_reason == stop
    ids = got.token_ids
    assert ids == free.token_ids[: len(ids)] and len(ids) < len(free.token_ids)
    assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])
    assert got.text == tok.decode(ids).split(stop)[0] and stop not in got.text
