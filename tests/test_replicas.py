"""Data-parallel generation (qwq_jax/replicas.py): one Engine per replica of the weights on a mesh
with data x fsdp > 1, against one Engine on one replica's own devices (a `tensor`-only mesh: the
same programs per row, so the same tokens), and the pages, buffers and devices each replica holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharding as sh
from qwq_jax import QwenConfig, init_model
from qwq_jax.generate import Engine
from qwq_jax.replicas import ReplicatedEngine, build_engine, replica_meshes
from qwq_jax.sampling import SamplingParams

CFG = QwenConfig.preset("tiny")  # 4 KV heads: tensor=2 divides them
pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)
SETTINGS = dict(max_num_seqs=8, page_size=16, chunk=4, prefill_chunk=32, max_model_len=96)


def _model(mesh, rules="generate"):
    return sh.shard_model(init_model(CFG, seed=5, param_dtype=jnp.float32, dtype=jnp.float32), mesh, rules)


@pytest.fixture(scope="module")
def replicated():
    mesh = sh.make_mesh("data=2,tensor=2", jax.devices()[:4])
    model = _model(mesh)
    engine = build_engine(model, mesh=mesh, prefix_caching=False, **SETTINGS)
    return model, engine


@pytest.fixture(scope="module")
def reference():
    """One Engine on a tensor=2 mesh of two other devices: what each replica is."""
    mesh = sh.make_mesh("tensor=2", jax.devices()[4:6])
    return Engine(_model(mesh), mesh=mesh, prefix_caching=False, **SETTINGS)


def _workload(seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, CFG.vocab_size, n).tolist() for n in (5, 17, 9, 30, 3)]
    params = [SamplingParams(temperature=0.8, max_tokens=m, n=n, seed=11 * i + 1, logprobs=0)
              for i, (m, n) in enumerate([(12, 3), (20, 1), (7, 4), (16, 2), (9, 1)])]
    return prompts, params


def test_replicas_give_one_engines_tokens_and_hold_half_the_pages_each(replicated, reference):
    model, engine = replicated
    assert isinstance(engine, ReplicatedEngine) and len(engine.replicas) == 2
    prompts, params = _workload()
    got, want = engine.generate(prompts, params), reference.generate(prompts, params)
    # 11 samples over 2 replicas: 6 and 5, so request 2 (n=4) is split between them; sample k of a
    # seeded request draws with seed + k wherever it runs.
    for g_row, w_row in zip(got, want):
        assert [c.token_ids for c in g_row] == [c.token_ids for c in w_row]
        for g, w in zip(g_row, w_row):
            np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
    stats = engine.stats()
    assert stats["replicas"] == 2 and stats["prompt_tokens"] == sum(map(len, prompts)) + 9  # request 2's twice
    assert stats["generated_tokens"] == sum(p.max_tokens * p.n for p in params)
    # Each replica's engine runs on its own two devices: its page pool is there alone, and each
    # holds half of the slots and pages asked for; its weights are the model's own buffers there.
    meshes = replica_meshes(engine.mesh)
    for r, sub in engine.replicas.items():
        devices = set(meshes[r].devices.flat)
        assert {d for x in jax.tree.leaves(sub.pool) for d in x.sharding.device_set} == devices
        assert (sub.max_num_seqs, sub.num_pages) == (4, engine.num_pages // 2)
        for full, view in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(sub.params)):
            assert view.sharding.mesh == meshes[r] and view.sharding.spec == full.sharding.spec
            mine = {s.device: s.data.unsafe_buffer_pointer() for s in full.addressable_shards if s.device in devices}
            assert {s.device: s.data.unsafe_buffer_pointer() for s in view.addressable_shards} == mine
    assert engine.max_num_seqs == SETTINGS["max_num_seqs"]


def test_step_api_requests_arriving_abort_and_every_page_back(replicated, reference):
    _, engine = replicated
    prompts, params = _workload(seed=1)
    want = reference.generate(prompts, params)
    got, ids = {}, {}
    ids[0] = engine.add_request(prompts[0], params[0])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(prompts[1], params[1], request_id=ids[0])
    steps = 0
    while engine.has_unfinished() or len(ids) < len(prompts):
        if steps < len(prompts) and steps not in ids:  # one more request before each of the first steps
            ids[steps] = engine.add_request(prompts[steps], params[steps], request_id=f"r{steps}")
        if steps == 2:
            assert engine.abort(ids[1]) and not engine.abort("nobody")
        for e in engine.step():
            got.setdefault((e.request_id, e.sample_index), []).extend(e.token_ids)
            if e.finished:
                got[(e.request_id, e.sample_index, "reason")] = e.finish_reason
        steps += 1
    assert got[(ids[1], 0, "reason")] == "abort"
    for i, rid in ids.items():
        if i != 1:
            for k in range(params[i].n):
                assert got[(rid, k)] == want[i][k].token_ids, (i, k)
    # The two replicas both ran requests, and every page came back.
    assert all(sub.stats()["steps"] > 0 for sub in engine.replicas.values())
    assert engine.stats()["pages_used"] == 0 and not engine.has_unfinished()


def test_build_engine_one_engine_where_replicas_cannot_run():
    tensor_only = sh.make_mesh("tensor=2", jax.devices()[:2])
    assert type(build_engine(_model(tensor_only), mesh=tensor_only, **SETTINGS)) is Engine
    assert type(build_engine(init_model(CFG, seed=5), **SETTINGS)) is Engine  # no mesh
    # Weights sharded over fsdp (the update's layout) are not replicated: one engine reads them in place.
    fsdp = sh.make_mesh("fsdp=2,tensor=2", jax.devices()[:4])
    assert type(build_engine(_model(fsdp, "train"), mesh=fsdp, **SETTINGS)) is Engine
    with pytest.raises(ValueError, match="has one replica"):
        ReplicatedEngine(_model(tensor_only), mesh=tensor_only)


@pytest.mark.slow
def test_four_processes_replicas_spanning_two_each(tmp_path):
    """Four real processes (jax.distributed on 127.0.0.1, 2 CPU devices each) on data=2,tensor=4: each
    replica spans two processes, which run its engine together; every process gets every sample, as
    one engine on one replica's mesh gives it (the two-process case, a replica per process, is in
    tests/test_multihost.py)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from _procs import free_port, wait_all

    root = Path(__file__).resolve().parents[1]
    coordinator = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "QWQ_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # compiling dominates (conftest)
    procs = [subprocess.Popen([sys.executable, str(root / "tests" / "_replicas_worker.py"), coordinator, str(i),
                               str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(4)]
    wait_all(procs, 300, "four-process replicas")
    cfg = QwenConfig.preset("tiny")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 40))
    prompts = [tokens[i, : 5 + 7 * i].tolist() for i in range(3)]
    sampled = [SamplingParams(temperature=0.8, max_tokens=8, n=3, seed=7 + i, logprobs=0) for i in range(3)]
    one = sh.make_mesh("tensor=4", jax.devices()[:4])
    model = sh.shard_model(init_model(cfg, seed=0, param_dtype=jnp.float32, dtype=jnp.float32), one, "generate")
    want = Engine(model, mesh=one).generate(prompts, sampled)
    for pid in range(4):
        got = json.loads((tmp_path / f"replicas_{pid}.json").read_text())
        assert [[c[0] for c in row] for row in got] == [[c.token_ids for c in row] for row in want], pid
        for g_row, w_row in zip(got, want):
            for g, w in zip(g_row, w_row):
                np.testing.assert_allclose(g[1], w.logprobs, atol=1e-5)


def test_server_on_replicas_answers_concurrent_requests_as_one_engine(replicated, reference):
    """`python -m qwq_jax.serve`'s server on the replicated engine (its steps on two threads, first
    tokens handed over from both): concurrent completions and a sampled n=3, each as one engine gives it."""
    import concurrent.futures

    import openai

    from qwq_jax.serve import start_in_thread
    from qwq_jax.tokenizer import ByteTokenizer

    _, engine = replicated
    tok = ByteTokenizer()
    url, stop = start_in_thread(engine, tok, name="tiny")
    try:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        texts = ["replicas", "one engine per replica of the weights", "qwq", "data parallel decoding!"]

        def ask(text):
            return client.completions.create(model="tiny", prompt=text, max_tokens=10, temperature=0.0, logprobs=0)

        def same(choice, completion):  # the same tokens: the same log-probs, token by token
            return np.allclose(choice.logprobs.token_logprobs, completion.logprobs, atol=1e-5)

        with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
            answers = list(pool.map(ask, texts))
        for text, answer in zip(texts, answers):
            (want,) = reference.generate([tok.encode(text)], SamplingParams(temperature=0.0, max_tokens=10,
                                                                           logprobs=0))[0]
            assert answer.usage.completion_tokens == 10 and same(answer.choices[0], want), text
        sampled = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0.8, n=3, seed=4,
                                            logprobs=0)
        want = reference.generate([tok.encode("abc")], SamplingParams(temperature=0.8, max_tokens=6, n=3, seed=4,
                                                                      logprobs=0))[0]
        assert all(same(c, w) for c, w in zip(sorted(sampled.choices, key=lambda c: c.index), want))
    finally:
        stop()
    assert engine.stats()["pages_used"] == 0


def test_split_layers_donated_replica_by_replica(reference):
    """layer_loop="split" with donate_weights (what sample and serve pass): each replica splits its own
    view of the stacks and frees its devices' part of them; the tokens are one engine's."""
    mesh = sh.make_mesh("data=2,tensor=2", jax.devices()[:4])
    model = _model(mesh)
    engine = build_engine(model, mesh=mesh, layer_loop="split", donate_weights=True, prefix_caching=False,
                          **SETTINGS)
    stacks = [x for x in jax.tree.leaves(nnx.state(model.layers))]
    assert stacks and all(x.is_deleted() for x in stacks)
    prompts, params = _workload(seed=2)
    got, want = engine.generate(prompts, params), reference.generate(prompts, params)
    assert [[c.token_ids for c in row] for row in got] == [[c.token_ids for c in row] for row in want]
