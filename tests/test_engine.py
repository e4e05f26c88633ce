"""The paged continuous-batching Engine's request API (add_request / step / abort / stats): requests
arriving while others decode, preemption, abort, n samples on shared pages, the prefix cache,
determinism, compilations, the static policy, bad input and int8 pages, against transformers'
greedy choices, a no-cache greedy recompute and counts made by hand."""

import contextlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

from qwq_jax import QwenConfig, forward, init_model
from qwq_jax.generate import Engine
from qwq_jax.sampling import SamplingParams

CFG = QwenConfig.preset("tiny")  # vocab 512, 2 layers, 4 KV heads of 8 dims, no EOS: rows end by length
MAX_LEN = 128                    # max_model_len of the tiny engines (and the reference's one shape)
# The tiny engines share programs (and the module's engine) on one xdist worker; the demo test joins
# test_demo.py's group, which holds transformers' demo model.
TINY = pytest.mark.xdist_group("engine_tiny")
GREEDY = dict(temperature=0.0)
pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)
# (the demo test compiles at full optimization: conftest leaves tests on the demo model out)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=5, param_dtype=jnp.float32, dtype=jnp.float32)


def tiny_engine(model, **kwargs) -> Engine:
    return Engine(model, **{**dict(max_num_seqs=4, page_size=16, chunk=4, prefill_chunk=32, max_model_len=MAX_LEN),
                            **kwargs})


@pytest.fixture(scope="module")
def engine(model):
    """One engine for the tests that leave it empty (no prefix cache: pages_used returns to 0)."""
    return tiny_engine(model, prefix_caching=False)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, CFG.vocab_size, n).tolist() for n in lengths]


def greedy_reference(model, prompt, steps):
    """Greedy tokens by a full no-cache forward over the sequence for every new token (one shape:
    causal, so the zeros after the sequence are never seen)."""
    seq = np.zeros((1, max(MAX_LEN, len(prompt) + steps)), np.int32)
    seq[0, : len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + steps):
        seq[0, n] = int(jnp.argmax(forward(model, jnp.asarray(seq))[0, n - 1]))
    return seq[0, len(prompt): len(prompt) + steps].tolist()


def drive(engine, schedule=None, *, added=None, on_step=None, max_steps=400):
    """Run `engine` until nothing is left: before step s, add schedule[s] (a list of
    (token_ids, params, request_id) tuples; s = 0 is before the first step); `added` maps the ids of
    requests added before the call to their n. `on_step(s, events)` is called after each step.
    Returns {request_id: {sample_index: Completion}} after checking the event stream: each sample
    finishes exactly once, last, with a Completion whose tokens are the ones streamed and whose
    reason is the event's. A bound on the steps turns a hang into a failure."""
    schedule = dict(schedule or {})
    n_of = dict(added or {})
    streamed, done = {}, {rid: {} for rid in n_of}
    s = 0
    while True:
        for token_ids, params, rid in schedule.pop(s, []):
            rid = engine.add_request(token_ids, params, request_id=rid)
            n_of[rid] = (params or SamplingParams()).n
            done.setdefault(rid, {})
        if not engine.has_unfinished():
            if not schedule:
                break
            s = min(schedule)  # nothing runs: the next arrival comes now
            continue
        assert s < max_steps, f"engine still unfinished after {max_steps} steps: {engine.stats()}"
        events = engine.step()
        for ev in events:
            key = (ev.request_id, ev.sample_index)
            assert ev.request_id in done, f"event for unknown request {ev.request_id!r}"
            assert ev.sample_index not in done[ev.request_id], f"event after the end of {key}"
            assert ev.prompt_index is None  # add_request, not stream()
            streamed.setdefault(key, []).extend(ev.token_ids)
            if ev.finished:
                assert ev.finish_reason in ("stop", "length", "abort"), ev
                c = ev.completion
                assert c is not None and c.token_ids == streamed[key] and c.finish_reason == ev.finish_reason, ev
                done[ev.request_id][ev.sample_index] = c
            else:
                assert ev.finish_reason is None and ev.completion is None, ev
        if on_step is not None:
            on_step(s, events)
        s += 1
    for rid, samples in done.items():
        if samples and all(c.finish_reason == "abort" for c in samples.values()):
            continue
        assert sorted(samples) == list(range(n_of[rid])), f"{rid}: finished samples {sorted(samples)}"
    return done


def tokens(done, rid, k=0):
    return done[rid][k].token_ids


def assert_empty(engine, pages_total=None):
    st = engine.stats()
    assert not engine.has_unfinished() and st["running"] == 0 and st["waiting"] == 0, st
    if pages_total is not None:
        assert st["pages_used"] == 0 and st["pages_total"] == pages_total, st


# ---- the demo model against transformers ------------------------------------------------------------
ASKS = ["Hi!", "What is 2 + 2?", "Name three prime numbers.", "Write a haiku about the sea.",
        "Explain recursion to a child in two sentences.", "用一句话介绍你自己。",
        "Translate 'good morning' into French, Spanish and German.",
        "Write a Python one-liner that reverses a string, then explain how slicing with a negative step works."]


@pytest.mark.slow
@pytest.mark.xdist_group("demo_hf")
def test_demo_requests_arriving_while_others_decode_equal_transformers_greedy(demo_checkpoint, demo_hf_model):
    """8 chat requests (31..51 tokens, prefilled 32 at a time: rows ending mid-chunk) into 4 decode
    slots, 3 before the first step, 2 after step 2, 3 after step 5, on the model the CLIs build
    (attention "auto"): each one's greedy tokens are transformers' fp32 greedy choices for its prompt
    alone. transformers' choice at each step comes from one teacher-forced forward over prompt + our
    tokens (what its `generate(do_sample=False)` picks step by step: our tokens are its greedy
    tokens iff each is the argmax of its logits after the ones before; cheaper than 8 generates);
    a row ends at 8 tokens or at an EOS, which must then be transformers' choice too."""
    import torch

    from qwq_jax import load
    from qwq_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(demo_checkpoint)
    ours = load(demo_checkpoint, attention_backend="auto")  # as the CLIs build it (on a CPU: blockwise prefill)
    ps = [tok.apply_chat_template([{"role": "user", "content": a}], add_generation_prompt=True, tokenize=True)
          for a in ASKS]
    page = 16
    assert len({tuple(p[:page]) for p in ps}) == 1  # the system prompt: one shared first page
    engine = Engine(ours, tok, max_num_seqs=4, chunk=4, page_size=page, prefill_chunk=32, max_model_len=128)
    sp = SamplingParams(temperature=0.0, max_tokens=8)
    reqs = [(p, sp, f"chat-{i}") for i, p in enumerate(ps)]
    seen = {"running": [], "tokens_at_late_adds": []}
    got_tokens = {}

    def on_step(s, events):
        st = engine.stats()
        seen["running"].append(st["running"])
        assert st["running"] <= 4 and st["pages_used"] <= st["pages_total"], st
        for ev in events:
            got_tokens[ev.request_id] = got_tokens.get(ev.request_id, 0) + len(ev.token_ids)
        if s + 1 in (2, 5):  # requests arrive before the next step: some are mid-decode
            seen["tokens_at_late_adds"].append(sum(got_tokens.values()))

    done = drive(engine, {0: reqs[:3], 2: reqs[3:5], 5: reqs[5:]}, on_step=on_step)
    assert all(n > 0 for n in seen["tokens_at_late_adds"]), seen  # they did arrive while others ran
    assert max(seen["running"]) >= 2, seen
    eos = set(tok.eos_token_ids)
    outs = [tokens(done, f"chat-{i}") for i in range(len(ps))]
    for i, new in enumerate(outs):
        c = done[f"chat-{i}"][0]
        assert c.prompt_tokens == len(ps[i])
        assert (len(new) == 8 and c.finish_reason == "length") or (c.finish_reason == "stop" and new[-1] in eos
                                                                   and len(new) <= 8), (i, c)
    # One right-padded batch through transformers' decoder (causal: the padding after a row is never
    # seen), its lm_head only where a token was chosen (the 151,936-row head would dominate otherwise).
    seqs = [p + new[:-1] for p, new in zip(ps, outs)]
    batch = np.zeros((len(seqs), max(map(len, seqs))), np.int64)
    for i, seq in enumerate(seqs):
        batch[i, : len(seq)] = seq
    with torch.no_grad():
        hidden = demo_hf_model.model(torch.from_numpy(batch)).last_hidden_state  # after the final norm
        for i, (p, new) in enumerate(zip(ps, outs)):
            want = demo_hf_model.lm_head(hidden[i, len(p) - 1: len(p) - 1 + len(new)]).argmax(-1).tolist()
            assert new == want, (ASKS[i], tok.decode(new), tok.decode(want))
    st = engine.stats()
    assert st["prompt_tokens"] == sum(map(len, ps))
    assert st["generated_tokens"] == sum(map(len, outs))
    # Requests 5..7 arrive after requests 0 and 1 finished: their first (system prompt) page is cached.
    assert st["prefix_cache_hit_tokens"] >= 3 * page and st["prefix_cache_hit_tokens"] % page == 0, st
    assert st["prefill_tokens_computed"] + st["prefix_cache_hit_tokens"] == st["prompt_tokens"], st
    assert st["preemptions"] == 0 and st["running"] == st["waiting"] == 0, st


# ---- tiny models -----------------------------------------------------------------------------------
@TINY
def test_tiny_pool_preempts_and_recomputes_the_same_greedy_tokens(model):
    """12 pages of 8 tokens for 5 requests needing 4..6 pages each (prompt + 20 tokens), 4 slots: the
    prompts fit together (10 pages) but their growth does not, so running sequences are preempted,
    re-prefilled later, and still produce the no-cache greedy tokens."""
    engine = tiny_engine(model, page_size=8, num_pages=12)
    assert engine.stats()["pages_total"] == 12
    ps = prompts([13, 21, 9, 17, 25], seed=1)
    sp = SamplingParams(**GREEDY, max_tokens=20)

    def on_step(s, events):
        st = engine.stats()
        assert st["pages_used"] <= 12 and st["running"] <= 4, st

    done = drive(engine, {0: [(p, sp, f"r{i}") for i, p in enumerate(ps)]}, on_step=on_step)
    st = engine.stats()
    assert st["preemptions"] > 0, st
    for i, p in enumerate(ps):
        assert done[f"r{i}"][0].finish_reason == "length"
        assert tokens(done, f"r{i}") == greedy_reference(model, p, 20), i
    assert st["generated_tokens"] == 5 * 20 and st["prompt_tokens"] == sum(map(len, ps))
    # Recompute: the preempted sequences prefill their prompt and generated tokens again.
    assert st["prefill_tokens_computed"] + st["prefix_cache_hit_tokens"] > st["prompt_tokens"], st
    assert_empty(engine)


@TINY
def test_abort_running_and_waiting_requests_returns_their_pages(model, engine):
    """5 requests for 4 slots: once a0 has a token, abort it and a4 (still waiting): each ends with
    one "abort" event (a0's tokens so far: a prefix of its greedy tokens; a4: none), a0's pages go
    back at once and a4 leaves the queue, the others finish unchanged, and the pool ends empty.
    Unknown and already-ended ids: False."""
    total = engine.stats()["pages_total"]
    assert_empty(engine, total)
    ps = prompts([10, 12, 7, 9, 11], seed=2)
    sp = SamplingParams(**GREEDY, max_tokens=16)
    aborted = {}
    streamed = {}

    def on_step(s, events):
        for ev in events:
            streamed[ev.request_id] = streamed.get(ev.request_id, 0) + len(ev.token_ids)
        if not aborted and streamed.get("a0", 0) > 0:
            st = engine.stats()
            assert st["waiting"] >= 1 and streamed.get("a4", 0) == 0, st  # a4 waits for a slot
            assert engine.abort("a0") is True
            assert engine.abort("a4") is True
            after = engine.stats()
            aborted["pages"] = (st["pages_used"], after["pages_used"])
            aborted["waiting"] = (st["waiting"], after["waiting"])
            assert engine.abort("a0") is False  # already ended
            assert engine.abort("nope") is False

    done = drive(engine, {0: [(p, sp, f"a{i}") for i, p in enumerate(ps)]}, on_step=on_step)
    before, after = aborted["pages"]
    assert after < before, aborted  # a0's pages are free again
    assert aborted["waiting"][1] == aborted["waiting"][0] - 1, aborted  # a4 left the queue
    for rid in ("a0", "a4"):
        assert done[rid][0].finish_reason == "abort", done[rid]
    got = tokens(done, "a0")
    assert 0 < len(got) < 16 and got == greedy_reference(model, ps[0], len(got))
    assert tokens(done, "a4") == []
    for i in (1, 2, 3):
        assert done[f"a{i}"][0].finish_reason == "length"
        assert tokens(done, f"a{i}") == greedy_reference(model, ps[i], 16), i
    assert engine.abort("a1") is False  # finished
    assert_empty(engine, total)


@TINY
def test_n_samples_share_the_prompt_pages_and_sample_k_uses_seed_plus_k(model, engine):
    """A 40-token prompt, n=4, 8 tokens each, pages of 16: the prompt is prefilled once (40 tokens
    computed, not 160); the samples share its 2 full pages and each has its own copy of the third
    (tokens 32..47: 8 of the prompt, then its own 8), so the pool holds 2 + 4 = 6 pages at most,
    where 4 separate requests would hold 4 * 3 = 12. Sample k draws what the same request alone with
    n=1 and seed + k draws; the 4 differ."""
    total = engine.stats()["pages_total"]
    assert_empty(engine, total)
    (p,) = prompts([40], seed=3)
    sp = dict(temperature=1.0, max_tokens=8, seed=21)
    before = engine.stats()
    used = []
    done = drive(engine, {0: [(p, SamplingParams(**sp, n=4), "n4")]},
                 on_step=lambda s, events: used.append(engine.stats()["pages_used"]))
    after = engine.stats()
    shared_full, own_partial, alone = 40 // 16, 4, -(-(40 + 8) // 16)
    assert max(used) == shared_full + own_partial < 4 * alone, used
    assert after["prefill_tokens_computed"] - before["prefill_tokens_computed"] == 40
    assert after["prompt_tokens"] - before["prompt_tokens"] == 40  # once per request
    assert after["generated_tokens"] - before["generated_tokens"] == 4 * 8
    samples = [tokens(done, "n4", k) for k in range(4)]
    assert all(len(t) == 8 for t in samples) and len({tuple(t) for t in samples}) == 4, samples
    for k in range(4):
        alone_k = drive(engine, {0: [(p, SamplingParams(**{**sp, "seed": 21 + k}), f"n1-{k}")]})
        assert tokens(alone_k, f"n1-{k}") == samples[k], k
    assert_empty(engine, total)


@TINY
def test_prefix_cache_computes_only_the_uncached_tokens(model, engine):
    """After a 50-token prompt (3 full pages of 16 cached), prompts sharing its first 48 tokens skip
    them: the counters move by hand-counted amounts and the greedy tokens are the no-cache ones.
    Pages are keyed by all tokens up to and including them: sharing 40 tokens hits 2 pages only, and
    the same 32 tokens after a different first page hit nothing."""
    cached = tiny_engine(model)  # prefix_caching=True (the default)
    (a,) = prompts([50], seed=4)
    rest = prompts([10, 10], seed=5)
    sp = SamplingParams(**GREEDY, max_tokens=4)
    drive(cached, {0: [(a, sp, "a")]})

    def counted(prompt, rid):
        st0 = cached.stats()
        out = tokens(drive(cached, {0: [(prompt, sp, rid)]}), rid)
        st1 = cached.stats()
        assert st1["prompt_tokens"] - st0["prompt_tokens"] == len(prompt)
        assert out == greedy_reference(model, prompt, 4), rid
        return (st1["prefill_tokens_computed"] - st0["prefill_tokens_computed"],
                st1["prefix_cache_hit_tokens"] - st0["prefix_cache_hit_tokens"], out)

    b = a[:48] + rest[0]  # 58 tokens: 3 cached pages, then 10 new
    computed, hits, out_b = counted(b, "b")
    assert (computed, hits) == (10, 48)
    assert tokens(drive(engine, {0: [(b, sp, "b-nocache")]}), "b-nocache") == out_b  # Engine(prefix_caching=False)
    # All 48 tokens cached: the last prompt token is computed anyway (its logits pick the first token).
    computed, hits, _ = counted(a[:48], "c")
    assert computed >= 1 and hits >= 32 and computed + hits == 48, (computed, hits)
    d = a[:40] + rest[1]  # page 2 (tokens 32..47) differs from a's: 2 pages hit
    computed, hits, _ = counted(d, "d")
    assert (computed, hits) == (len(d) - 32, 32)
    e = [(a[0] + 1) % CFG.vocab_size] + a[1:48]  # pages 1, 2 hold a's tokens, after another page 0
    computed, hits, _ = counted(e, "e")
    assert (computed, hits) == (48, 0)
    assert_empty(cached)


@TINY
def test_seeded_requests_same_tokens_alone_or_admitted_mid_run(model, engine):
    """A seeded sampled request (temperature 0.8, top_p 0.9) and a greedy one, each alone in the
    engine, then both arriving after step 2 while 3 other requests (5, 33, 60 tokens; sampled and
    greedy) decode, one of them waiting for a slot: the same tokens."""
    assert_empty(engine)
    sampled, greedy = prompts([19, 27], seed=6)
    sp_s = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=10, seed=1234)
    sp_g = SamplingParams(**GREEDY, max_tokens=10)
    alone_s = tokens(drive(engine, {0: [(sampled, sp_s, "s")]}), "s")
    alone_g = tokens(drive(engine, {0: [(greedy, sp_g, "g")]}), "g")
    others = [(p, SamplingParams(temperature=t, max_tokens=m, seed=7), f"o{i}")
              for i, (p, t, m) in enumerate(zip(prompts([5, 33, 60], seed=7), (1.0, 0.0, 0.7), (14, 20, 9)))]
    streamed, finished, at_arrival = {}, set(), []

    def on_step(s, events):
        for ev in events:
            streamed[ev.request_id] = streamed.get(ev.request_id, 0) + len(ev.token_ids)
            if ev.finished:
                finished.add(ev.request_id)
        if s == 1:
            at_arrival.append((dict(streamed), set(finished)))

    done = drive(engine, {0: others, 2: [(sampled, sp_s, "s2"), (greedy, sp_g, "g2")]}, on_step=on_step)
    decoding, ended = at_arrival[0]
    assert decoding and not ended, at_arrival  # they arrived while the others ran
    assert tokens(done, "s2") == alone_s
    assert tokens(done, "g2") == alone_g == greedy_reference(model, greedy, 10)
    assert_empty(engine)


@TINY
def test_first_tokens_reach_the_caller_before_a_decode_chunk(model, engine):
    """A lone request (n=2): the step that prefills it returns each sample's first token alone (no
    decode chunk ran before the caller saw it); the next step returns a whole chunk. A request arriving
    while the first decodes: its step hands its first token to `on_events` before the decode chunk's
    tokens exist (once, that token alone), then returns the chunk. The tokens are the greedy reference's."""
    assert_empty(engine)
    a, b = prompts([20, 9], seed=11)
    engine.add_request(a, SamplingParams(**GREEDY, max_tokens=16, n=2), request_id="a")
    steps, early, streamed, done = [], [], {}, {}

    def take(events):
        for ev in events:
            streamed.setdefault((ev.request_id, ev.sample_index), []).extend(ev.token_ids)
            if ev.finished:
                done[ev.request_id, ev.sample_index] = ev.completion.token_ids
        return {(ev.request_id, ev.sample_index): len(ev.token_ids) for ev in events if ev.token_ids}

    while engine.has_unfinished():
        if len(steps) == 3:
            engine.add_request(b, SamplingParams(**GREEDY, max_tokens=12), request_id="b")
        generated = engine.stats()["generated_tokens"]

        def before_decode(events, at=len(steps), generated=generated):
            early.append((at, engine.stats()["generated_tokens"] - generated, take(events)))

        steps.append(take(engine.step(on_events=before_decode)))
    first = next(i for i, got in enumerate(steps) if got)
    assert steps[first] == {("a", 0): 1, ("a", 1): 1}
    assert steps[first + 1] == {("a", 0): engine.chunk, ("a", 1): engine.chunk}
    (arrival, generated, handed), = early  # b's step alone: one token generated so far, its own
    assert handed == {("b", 0): 1} and generated == 1
    assert steps[arrival][("a", 0)] == engine.chunk and steps[arrival][("b", 0)] >= 1
    assert done == streamed and done["a", 0] == done["a", 1] == greedy_reference(model, a, 16)
    assert done["b", 0] == greedy_reference(model, b, 12)
    assert_empty(engine)


@TINY
def test_no_recompilation_for_new_lengths_counts_and_arrival_times(model, engine):
    """After a warm-up, requests of other prompt lengths (5..31 tokens: one prefill chunk) and
    max_tokens, greedy and sampled, arriving at other steps, compile nothing."""
    assert_empty(engine)
    warm = prompts([20, 9, 30], seed=8)
    drive(engine, {0: [(warm[0], SamplingParams(**GREEDY, max_tokens=6), "w0"),
                       (warm[1], SamplingParams(temperature=0.9, max_tokens=3, seed=1), "w1")],
                   1: [(warm[2], SamplingParams(temperature=0.7, top_k=20, max_tokens=5, seed=2), "w2")]})
    compiled = engine.stats()["compilations"]
    ps = prompts([17, 25, 11, 31, 5], seed=9)
    params = [SamplingParams(**GREEDY, max_tokens=7), SamplingParams(temperature=1.0, top_p=0.8, max_tokens=2, seed=3),
              SamplingParams(**GREEDY, max_tokens=9), SamplingParams(temperature=0.5, min_p=0.1, max_tokens=4, seed=4),
              SamplingParams(**GREEDY, max_tokens=6)]
    reqs = [(p, sp, f"x{i}") for i, (p, sp) in enumerate(zip(ps, params))]
    drive(engine, {0: reqs[:1], 1: reqs[1:3], 3: reqs[3:]})
    assert engine.stats()["compilations"] == compiled, engine.stats()
    assert_empty(engine)


@TINY
def test_weights_on_a_one_device_mesh_compile_each_program_once(model):
    """Weights placed on a one-device mesh (`sharding.shard_model`, as the benchmarks build theirs) and
    an engine without a mesh: the pool and slot state sit where the programs return them, so the
    second and third `generate` compile nothing (they compiled prefill, insert and decode twice when
    the engine put its arrays on the bare device), and the tokens equal the unsharded engine's."""
    import jax

    from sharding import make_mesh, shard_model

    placed = shard_model(init_model(CFG, seed=5, param_dtype=jnp.float32, dtype=jnp.float32),
                         make_mesh("fsdp=1", jax.devices()[:1]), "generate")
    assert isinstance(placed.embed[...].sharding, jax.sharding.NamedSharding)
    eng = tiny_engine(placed, prefix_caching=False)
    ps, sp = prompts([20, 9]), SamplingParams(**GREEDY, max_tokens=6)
    first = eng.generate(ps, sp)  # `last_timings["compiled"]`: each program traced and compiled (or loaded)
    assert sorted(c["program"] for c in eng.last_timings["compiled"]) == ["decode", "insert", "prefill"]
    again = eng.generate(ps, sp)
    assert eng.last_timings["compiled"] == []
    eng.generate(prompts([31, 5], seed=1), sp)
    assert eng.last_timings["compiled"] == []
    want = tiny_engine(model, prefix_caching=False).generate(ps, sp)
    assert [o[0].token_ids for o in first] == [o[0].token_ids for o in again] == [o[0].token_ids for o in want]


@TINY
@pytest.mark.parametrize("loop, quant, mesh", [("split", None, "data=2,tensor=2"), ("scan", "int8", None)])
def test_engine_built_before_its_weights_compiles_nothing_once_they_come(model, tmp_path, loop, quant, mesh):
    """What `python -m qwq_jax.sample` and `serve` do while the weights are read: an engine on
    `checkpoint.abstract_load` (the config alone), `precompile` for the first request (a 150-token
    prompt in prefill chunks of 128 and 22 -> widths 128 and 64; copy for n = 2; insert; decode),
    then `set_model`. That request compiles nothing; its tokens equal an engine built on the loaded
    model, and greedy ones the no-cache reference (float weights). Replicated over `data` on a mesh.
    Weights of another dtype are refused by name."""
    import json

    import jax
    from flax import nnx

    import qwq_jax
    from qwq_jax import checkpoint
    from qwq_jax.replicas import build_engine
    from sharding import make_mesh

    ckpt = tmp_path / "ckpt"
    checkpoint.save_params(ckpt, nnx.to_pure_dict(nnx.state(model)))
    (ckpt / "config.json").write_text(json.dumps(dict(CFG.to_hf(), torch_dtype="float32")))
    on = make_mesh(mesh, jax.devices()[:4]) if mesh else None
    # shapes of this test's own (a program another test compiled in this process is not compiled again)
    kw = dict(mesh=on, layer_loop=loop, max_num_seqs=2, page_size=8, chunk=4, prefill_chunk=128,
              max_model_len=200, donate_weights=True)
    prompt = prompts([150], seed=3)
    sampled = SamplingParams(temperature=0.8, top_k=50, max_tokens=7, n=2, seed=11)
    eng = build_engine(checkpoint.abstract_load(ckpt, mesh=on, quant=quant), **kw)
    replicas = 2 if mesh else 1
    compiled = sorted(c["program"] for c in eng.precompile(len(prompt[0]), sampled))
    assert compiled == sorted(["prefill", "prefill", "copy", "insert", "decode"] * replicas)
    with pytest.raises(ValueError, match=r"set_model: parameter .* in the model"):
        eng.set_model(qwq_jax.load(ckpt, mesh=on, dtype="bfloat16", quant=quant))
    eng.set_model(qwq_jax.load(ckpt, mesh=on, quant=quant))
    got = eng.generate(prompt, sampled)
    assert eng.last_timings["compiled"] == []
    want = build_engine(qwq_jax.load(ckpt, mesh=on, quant=quant), **kw).generate(prompt, sampled)
    assert [c.token_ids for c in got[0]] == [c.token_ids for c in want[0]]
    if quant is None:
        greedy = eng.generate(prompt, SamplingParams(**GREEDY, max_tokens=5))
        assert eng.last_timings["compiled"] == []
        assert greedy[0][0].token_ids == greedy_reference(model, prompt[0], 5)


@TINY
def test_static_policy_same_tokens_and_admits_only_when_the_batch_finished(model, engine):
    """6 greedy requests, 4 slots, max_tokens 10, 24, 14, 18, 6, 5: policy="static" gives the tokens of
    policy="continuous"; it starts requests 4 and 5 only once requests 0..3 have all finished (and
    its running count never grows while that batch drains), where the continuous engine starts
    request 4 as soon as request 0 is done."""
    static = tiny_engine(model, prefix_caching=False, policy="static")
    ps = prompts([8, 14, 6, 11, 9, 13], seed=10)
    maxes = [10, 24, 14, 18, 6, 5]  # request 0 ends after every prefill of the batch
    reqs = [(p, SamplingParams(**GREEDY, max_tokens=m), f"q{i}") for i, (p, m) in enumerate(zip(ps, maxes))]

    def run(eng):
        first, last, running = {}, {}, []

        def on_step(s, events):
            running.append(eng.stats()["running"])
            assert running[-1] <= 4
            for ev in events:
                if ev.token_ids:
                    first.setdefault(ev.request_id, s)
                if ev.finished:
                    last[ev.request_id] = s

        done = drive(eng, {0: reqs}, on_step=on_step)
        return done, first, last, running

    done_s, first_s, last_s, running_s = run(static)
    done_c, first_c, last_c, _ = run(engine)
    for i in range(6):
        assert tokens(done_s, f"q{i}") == tokens(done_c, f"q{i}"), i
        assert len(tokens(done_s, f"q{i}")) == maxes[i]
    batch_end = max(last_s[f"q{i}"] for i in range(4))
    assert min(first_s["q4"], first_s["q5"]) >= batch_end, (first_s, last_s)
    drain = running_s[last_s["q0"]: batch_end]
    assert all(b <= a for a, b in zip(drain, drain[1:])), running_s
    assert first_c["q4"] < max(last_c[f"q{i}"] for i in range(4)), (first_c, last_c)  # the contrast
    assert_empty(static, static.stats()["pages_total"])
    assert_empty(engine)


@TINY
def test_add_request_rejects_bad_input_naming_the_limit(model):
    """Each refusal is a ValueError at add_request, whose message names the limit, and queues
    nothing; a request exactly at the limits is taken and finishes (no hang)."""
    long = tiny_engine(model, max_num_seqs=2, prefix_caching=False)  # pool: 2 x 128 tokens
    (p100,) = prompts([100], seed=11)
    with pytest.raises(ValueError) as e:  # 140 > 128 (the pool would hold it)
        long.add_request(p100, SamplingParams(max_tokens=40))
    assert re.search(r"max_model_len|model len|context", str(e.value)) and "128" in str(e.value), str(e.value)
    assert_empty(long)

    eng = tiny_engine(model, max_num_seqs=2, num_pages=4, prefix_caching=False)  # pool: 64 tokens < 128
    assert eng.stats()["pages_total"] == 4 and eng.stats()["page_size"] == 16
    queued = 0

    def refused(pattern, token_ids, params=None, request_id=None):
        with pytest.raises(ValueError) as e:
            eng.add_request(token_ids, params, request_id=request_id)
        assert re.search(pattern, str(e.value), re.IGNORECASE), str(e.value)
        st = eng.stats()
        assert st["waiting"] + st["running"] == queued, st

    (p50,) = prompts([50], seed=12)
    refused(r"page|pool", p50, SamplingParams(max_tokens=20))  # 70 <= 128, but > 4 pages x 16
    refused(r"empty", [])
    refused(r"vocab|outside|512|511", [1, 2, CFG.vocab_size])
    refused(r"vocab|outside|negative|-1|>= 0", [1, -1, 2])
    refused(r"top_p", [1, 2, 3], SamplingParams(top_p=1.5))
    rid = eng.add_request(p50, SamplingParams(**GREEDY, max_tokens=14), request_id="r1")  # 64: the whole pool
    assert rid == "r1"
    queued = 1
    refused(r"r1|duplicate|already", [4, 5, 6], SamplingParams(max_tokens=2), request_id="r1")
    done = drive(eng, added={"r1": 1})
    assert tokens(done, "r1") == greedy_reference(model, p50, 14)
    assert_empty(eng, 4)


# ---- int8 pages --------------------------------------------------------------------------------------
@contextlib.contextmanager
def int8_rounded_kv():
    """The model's keys and values rounded as int8 pages store them (per token and KV head: scale =
    max|x| / 127 over head_dim, round(x / scale) * scale; scale 0: zeros), for a no-cache reference."""
    from qwq_jax import model as model_lib

    qkv = model_lib.Attention.qkv

    def rounded(x):
        scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
        safe = jnp.where(scale == 0, 1.0, scale)
        return jnp.where(scale == 0, 0.0, jnp.round(x / safe) * safe).astype(x.dtype)

    def int8_qkv(self, x, cos, sin):
        q, k, v = qkv(self, x, cos, sin)
        return q, rounded(k), rounded(v)

    model_lib.Attention.qkv = int8_qkv
    try:
        yield
    finally:
        model_lib.Attention.qkv = qkv


def token_logprobs(model, prompt, new):
    """log p(new[i] | prompt + new[:i]) and the log-probs of the whole vocabulary there (eager, no
    cache: runs the patched attention when called inside int8_rounded_kv)."""
    logits = np.asarray(model(jnp.asarray([prompt + new[:-1]], jnp.int32)), np.float64)[0, len(prompt) - 1:]
    lp = logits - logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    return lp[np.arange(len(new)), new], lp


@TINY
def test_int8_pages_match_an_int8_rounded_reference(model, engine):
    """kv_cache_dtype="int8" on the float32 tiny model, 12 greedy tokens after 30. Every key and value
    the engine attends to comes out of the pages (write_pages, then paged_attention, prefill included),
    so each token's log-prob equals, within 2e-5, a no-cache forward whose keys and values are rounded
    the same way; it is within 2e-3 of the float forward yet more than 5e-5 from it. Measured on this
    model and prompt: the rounding moves these log-probs by up to 2.2e-4 (the int8 engine sits 2e-7
    from the rounded reference, the float engine 3e-7 from the float one); changing one prompt token
    moves them by up to 3e-2. Each token is the rounded reference's argmax, or within 2e-3 of it.
    Pages: hand-counted bytes per token; under the same kv_cache_bytes the int8 pool has more pages."""
    from qwq_jax.paged_attention import PagePool

    (p,) = prompts([30], seed=12)
    sp = SamplingParams(**GREEDY, max_tokens=12)
    int8 = tiny_engine(model, max_num_seqs=2, kv_cache_dtype="int8", prefix_caching=False)
    got = drive(int8, {0: [(p, sp, "i8")]})["i8"][0]
    flt = drive(engine, {0: [(p, sp, "f32")]})["f32"][0]
    new = got.token_ids
    assert len(new) == 12 and got.logprobs is not None and len(got.logprobs) == 12
    float_lp, _ = token_logprobs(model, p, new)
    with int8_rounded_kv():
        rounded_lp, rounded_all = token_logprobs(model, p, new)
    got_lp = np.asarray(got.logprobs, np.float64)
    np.testing.assert_allclose(got_lp, rounded_lp, atol=2e-5)
    np.testing.assert_allclose(got_lp, float_lp, atol=2e-3)
    assert np.abs(got_lp - float_lp).max() > 5e-5, "int8 pages give the float log-probs"
    assert np.all(rounded_all.max(-1) - rounded_lp <= 2e-3), "a token far from the rounded reference's argmax"
    # The float engine: its reference's greedy tokens and log-probs.
    assert flt.token_ids == greedy_reference(model, p, 12)
    f_lp, _ = token_logprobs(model, p, flt.token_ids)
    np.testing.assert_allclose(np.asarray(flt.logprobs, np.float64), f_lp, atol=1e-4)
    assert_empty(int8, int8.stats()["pages_total"])
    # Bytes per token, all layers, k + v (+ an f32 scale per token and KV head for int8).
    L, K, D = CFG.num_layers, CFG.num_kv_heads, CFG.head_dim
    assert PagePool.bytes_per_token(CFG, jnp.float32) == L * 2 * K * D * 4 == 512
    assert PagePool.bytes_per_token(CFG, jnp.bfloat16) == L * 2 * K * D * 2 == 256
    assert PagePool.bytes_per_token(CFG, jnp.bfloat16, int8=True) == L * 2 * K * (D + 4) == 192
    budget = 16 * 16 * 512  # 16 float32 pages of 16 tokens; 4 x 128 tokens would need 32
    f_pages = tiny_engine(model, kv_cache_bytes=budget).stats()["pages_total"]
    i_pages = tiny_engine(model, kv_cache_bytes=budget, kv_cache_dtype="int8").stats()["pages_total"]
    assert 0 < f_pages <= 16 and f_pages < i_pages and i_pages * 16 * 192 <= budget, (f_pages, i_pages)


@TINY
def test_top_logprobs_are_the_reference_distributions_top(model):
    """SamplingParams(logprobs=3) on an engine with max_logprobs=4: at each of 10 sampled steps the
    three likeliest tokens and their log-probs of a float64 no-cache forward (ties aside), the chosen
    token's log-prob beside them; a request beside it that asks for none gets none, and asking for
    more than max_logprobs is refused with the limit named."""
    (p, q) = prompts([20, 9], seed=31)
    eng = tiny_engine(model, max_logprobs=4, prefix_caching=False)
    sp = SamplingParams(temperature=1.0, seed=3, max_tokens=10, logprobs=3)
    out = drive(eng, {0: [(p, sp, "top"), (q, SamplingParams(**GREEDY, max_tokens=6), "plain")]})
    got, plain = out["top"][0], out["plain"][0]
    assert plain.top_logprobs is None
    chosen, ref = token_logprobs(model, p, got.token_ids)
    assert len(got.top_logprobs) == len(got.token_ids) == 10
    for step, top in enumerate(got.top_logprobs):
        want = np.argsort(-ref[step])[:3]
        assert [t for t, _ in top] == want.tolist(), step
        np.testing.assert_allclose([v for _, v in top], ref[step][want], atol=1e-4)
    np.testing.assert_allclose(got.logprobs, chosen, atol=1e-4)
    with pytest.raises(ValueError, match="max_logprobs=4"):
        eng.add_request(p, SamplingParams(logprobs=5, max_tokens=4))
