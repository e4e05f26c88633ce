"""The engine's host side without a device: `qwq_jax.pages.PageAllocator` (reference counts, the LRU
prefix cache) and `qwq_jax.scheduler.Scheduler` (FCFS admission, prefill chunks, n samples on shared
pages, preemption by recompute, abort, the static policy), driven by hand the way `Engine.step` drives
them: prefill_work -> prefilled -> admit -> grow -> advance / finish. The "device" is a fake: logits are
strings, a decode step makes up tokens and reports the new length. No JAX here (this file imports
none; both modules are plain Python). Every expected number is counted by hand in a comment."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from qwq_jax.pages import PageAllocator
from qwq_jax.scheduler import Request, Scheduler, State

PAGES_PY = Path(__file__).resolve().parents[1] / "qwq_jax" / "pages.py"


# ---- a fake engine ----------------------------------------------------------------------------
def params(max_tokens: int):
    return SimpleNamespace(max_tokens=max_tokens)  # all the scheduler reads of SamplingParams


def add(sched: Scheduler, rid: str, prompt, n: int = 1, max_tokens: int = 8) -> Request:
    req = Request(rid, list(prompt), params(max_tokens))
    sched.add(req, list(range(n)))
    return req


def token(seq, i: int) -> int:
    """The fake model's i-th generated token of a sample: depends on nothing but who and where."""
    return 10_000 + 1000 * seq.index + i


def run_prefills(sched: Scheduler) -> list[tuple]:
    """Engine._run_prefills: every chunk asked for; the last one of a job reports its logits (a string
    naming the job and how many tokens it covered). Returns (request id, recompute?, start, end)."""
    chunks = []
    for chunk in sched.prefill_work():
        job = chunk.job
        assert chunk.end % sched.prefill_chunk == 0 or chunk.last  # boundaries: multiples of prefill_chunk
        assert sched.pages.pages_for(chunk.end) <= len(job.pages)  # the job holds pages for what it writes
        chunks.append((job.request.id, job.seq is not None, chunk.start, chunk.end))
        if chunk.last:
            sched.prefilled(job, f"logits:{job.request.id}:{len(job.tokens)}")
    return chunks


def decode(sched: Scheduler, steps: int) -> list:
    """Engine._decode with a fake device: each running sample makes up to `steps` tokens (stopping at
    max_tokens); its keys/values then cover `length + k` positions, except that the very last token
    is never fed back (capped at max_length). Finishes those that reached max_tokens."""
    finished = []
    for seq in sched.running:
        k = min(steps, seq.request.params.max_tokens - len(seq.tokens))
        new_length = min(seq.length + k, seq.max_length)
        # grow() must have given the sample pages for everything the device writes
        assert sched.pages.pages_for(new_length) <= len(seq.pages), (seq.request.id, new_length, seq.pages)
        start = len(seq.tokens)
        sched.advance(seq, [token(seq, i) for i in range(start, start + k)], [-0.5] * k, new_length)
        if len(seq.tokens) == seq.request.params.max_tokens:
            sched.finish(seq, "length")
            finished.append(seq)
    return finished


def step(sched: Scheduler, chunk: int = 4) -> dict:
    """Engine.step: prefills, admissions, grow (1 step while a sample has no token yet), decode."""
    out = {"chunks": run_prefills(sched), "admitted": sched.admit(), "preempted": [], "finished": []}
    running = sched.running
    if running:
        steps = 1 if any(not s.tokens for s in running) else chunk
        out["preempted"] = sched.grow(steps)
        out["finished"] = decode(sched, steps)
    check(sched)
    return out


def drain(sched: Scheduler, chunk: int = 4, until=None, limit: int = 200) -> None:
    """Engine steps until `until()` (default: nothing unfinished); a bounded loop, so a scheduler that
    stops making progress fails instead of hanging."""
    until = until or (lambda: not sched.has_unfinished())
    for _ in range(limit):
        if until():
            return
        step(sched, chunk)
    raise AssertionError(f"no progress in {limit} steps")


def check(sched: Scheduler) -> None:
    """Invariants: every page's reference count is the number of holders the scheduler knows of;
    every occupied slot holds a live sample that knows it (or whose job reserved it)."""
    holders = [0] * sched.pages.num_pages
    for job in sched.jobs:
        for p in job.pages:
            holders[p] += 1
    for req in sched.requests.values():
        for p in req.pages or []:
            holders[p] += 1
        for seq in req.samples:
            for p in seq.pages:
                holders[p] += 1
    assert holders == sched.pages.refs
    job_slots = {job.slot for job in sched.jobs}
    for i, seq in enumerate(sched.slots):
        if seq is not None:
            assert seq.state in (State.PREFILL, State.READY, State.RUNNING)
            assert seq.slot == i or (seq.state is State.PREFILL and i in job_slots)


def sched_of(num_pages=64, page_size=16, max_num_seqs=4, prefill_chunk=16, max_prefill_tokens=64,
             policy="continuous", prefix_caching=False) -> Scheduler:
    return Scheduler(PageAllocator(num_pages, page_size, prefix_caching), max_num_seqs, prefill_chunk,
                     max_prefill_tokens, policy)


# ---- the page allocator ------------------------------------------------------------------------
def test_allocate_hold_release_counts():
    pages = PageAllocator(4, 16, prefix_caching=False)
    assert (pages.available, pages.used) == (4, 0)
    a = pages.allocate(2)
    assert a == [0, 1] and pages.refs == [1, 1, 0, 0]
    assert (pages.available, pages.used) == (2, 2)
    pages.hold([0])                       # a second holder (a shared prompt page)
    assert pages.refs == [2, 1, 0, 0] and pages.used == 2
    pages.release([0])                    # one holder left: still used
    assert pages.refs == [1, 1, 0, 0] and pages.used == 2
    pages.release(a)
    assert pages.refs == [0, 0, 0, 0] and (pages.available, pages.used) == (4, 0)
    with pytest.raises(RuntimeError, match="released more often"):
        pages.release([0])                # nobody holds page 0
    with pytest.raises(RuntimeError, match="released more often"):
        pages.release([3])                # never allocated
    with pytest.raises(RuntimeError, match="asked for 5 pages, 4 available"):
        pages.allocate(5)
    assert pages.used == 0                # a refused allocation takes nothing
    assert sorted(pages.allocate(4)) == [0, 1, 2, 3] and pages.available == 0
    assert pages.pages_for(16) == 1 and pages.pages_for(17) == 2 and pages.pages_for(1) == 1
    with pytest.raises(ValueError):
        PageAllocator(4, 12)              # not a power of two
    with pytest.raises(ValueError):
        PageAllocator(0, 16)


def test_prefix_cache_match():
    pages = PageAllocator(8, 4)
    prompt = list(range(10))              # 2 full pages (0-3, 4-7) + 2 tokens
    own = pages.allocate(3)
    pages.register(prompt, own)
    assert pages.cached == 2              # the partial third page is never cached
    pages.release(own)
    assert pages.used == 0 and pages.available == 8  # cached unheld pages count as available

    hit = pages.match(list(range(10)) + [99])  # 11 tokens: at most (11-1)//4 = 2 pages
    assert hit == own[:2]
    assert pages.refs[own[0]] == pages.refs[own[1]] == 1 and pages.used == 2  # now held by the caller
    assert pages.hit_tokens == 8
    pages.release(hit)

    # the page holding the last token is never returned: 8 tokens -> (8-1)//4 = 1 page, though 2 are cached
    assert pages.match(list(range(8))) == own[:1]
    pages.release(own[:1])
    assert pages.match(list(range(9))) == own[:2]  # 9 tokens -> (9-1)//4 = 2
    pages.release(own[:2])
    assert pages.match(list(range(4))) == []       # (4-1)//4 = 0
    assert pages.match([5]) == []
    # stops at the first differing page
    assert pages.match([0, 1, 2, 3, 4, 5, 6, 99, 8, 9]) == own[:1]
    pages.release(own[:1])
    # a different first page: no hit, even though the second page's tokens are the cached ones
    assert pages.match([9, 9, 9, 9, 4, 5, 6, 7, 8, 9]) == []
    # hit_tokens: 8 + 4 + 8 + 0 + 0 + 4 + 0 = 24
    assert pages.hit_tokens == 24
    assert pages.used == 0
    # the key chains the prefix: with another prompt's first page cached, prompt 1's second page
    # (4-7) is not found after it
    other = pages.allocate(1)
    pages.register([9, 9, 9, 9], other)
    pages.release(other)
    assert pages.match([9, 9, 9, 9, 4, 5, 6, 7, 8]) == other  # (9-1)//4 = 2 pages asked, 1 found
    pages.release(other)
    assert pages.hit_tokens == 28 and pages.used == 0


def test_register_skips_cached_prefix_and_keeps_first_page():
    pages = PageAllocator(8, 4)
    a = pages.allocate(2)
    pages.register(list(range(8)), a)
    b = pages.allocate(2)                 # the same tokens in other pages: already cached, left out
    pages.register(list(range(8)), b)
    assert pages.cached == 2
    pages.release(a + b)
    assert pages.used == 0 and pages.cached == 2
    assert pages.match(list(range(9))) == a  # the first registration is the one found
    pages.release(a)


def test_prefix_cache_lru_eviction():
    pages = PageAllocator(4, 4)
    pa, pb, pc = pages.allocate(1), pages.allocate(1), pages.allocate(1)  # [0], [1], [2]; page 3 free
    for tokens, page in (([1] * 4, pa), ([2] * 4, pb), ([3] * 4, pc)):
        pages.register(tokens, page)
    assert pages.cached == 3
    pages.release(pb)                     # unheld, oldest
    pages.release(pa)                     # unheld, newer; pc stays held
    assert (pages.available, pages.used) == (3, 1)  # 1 free + 2 unheld cached
    # a found page moves to the most recently used end when released again
    assert pages.match([2] * 4 + [0]) == pb
    pages.release(pb)                     # unheld order now: pa (older), pb (newer)
    assert pages.allocate(1) == [3]       # the free page first: nothing evicted
    assert pages.cached == 3
    assert pages.allocate(1) == pa        # evicts the least recently released: pa
    assert pages.cached == 2 and pages.refs[pa[0]] == 1
    assert pages.match([1] * 4 + [0]) == []  # pa's prefix is gone
    assert pages.match([2] * 4 + [0]) == pb  # pb's is still there (now held)
    assert pages.available == 0
    pages.release(pb)
    assert pages.allocate(1) == pb        # the only unheld cached page
    assert pages.cached == 1              # pc: held, never evicted
    with pytest.raises(RuntimeError):
        pages.allocate(1)
    pages.release(pc)
    assert pages.match([3] * 4 + [0]) == pc


def test_prefix_caching_off():
    pages = PageAllocator(4, 4, prefix_caching=False)
    own = pages.allocate(3)
    pages.register(list(range(10)), own)
    assert pages.cached == 0
    assert pages.match(list(range(10))) == [] and pages.hit_tokens == 0
    pages.release(own)
    assert pages.used == 0 and sorted(pages.allocate(4)) == [0, 1, 2, 3]


def test_prefix_cache_salt_keeps_rotary_variants_apart():
    """Keys/values under YaRN differ from plain RoPE's for the same tokens: pages registered with
    one salt are never found with another (the engine salts by its rotary choice per request)."""
    pages = PageAllocator(8, 4)
    prompt = list(range(9))
    held = pages.allocate(3)
    pages.register(prompt, held, salt=1)
    assert pages.match(prompt, salt=0) == []
    assert pages.match(prompt, salt=1) == held[:2]  # (9 - 1) // 4 = 2 whole pages


def test_prefix_keys_are_the_same_in_every_process():
    tokens = [5, 17, 3, 9, 250, 1, 0, 42]
    first = PageAllocator(8, 4)
    own = first.allocate(2)
    first.register(tokens, own)
    second = PageAllocator(8, 4)          # a fresh allocator making the same decisions
    other = second.allocate(2)
    second.register(tokens, other)
    assert second.match(tokens + [7]) == other and first.match(tokens + [7]) == own
    # and in fresh interpreters with other hash seeds (what every host of a multi-host engine is)
    code = ("import importlib.util, json, sys\n"
            "spec = importlib.util.spec_from_file_location('pages', sys.argv[1])\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "keys = m.PageAllocator(8, 4)._keys(json.loads(sys.argv[2]), 2, 0)\n"
            "print(json.dumps([hash(k) for k in keys]))\n")
    spec = importlib.util.spec_from_file_location("pages_here", PAGES_PY)
    here = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(here)
    mine = [hash(k) for k in here.PageAllocator(8, 4)._keys(tokens, 2, 0)]
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, str(PAGES_PY), json.dumps(tokens)], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert json.loads(out.stdout) == mine


def test_hit_tokens_not_counted_for_a_job_that_could_not_start():
    sched = sched_of(num_pages=4, prefix_caching=True)
    a = add(sched, "a", range(20), max_tokens=1)   # 1 full page (cached) + 4 tokens
    step(sched)                                    # prefilled, admitted, 1 token: finished
    assert not sched.requests and sched.pages.cached == 1 and sched.pages.hit_tokens == 0
    hog = sched.pages.allocate(3)                  # only the cached page stays available
    add(sched, "b", list(range(20)) + [7] * 20)    # 40 tokens, 3 pages: 1 hit + 2 new > 1 available
    for _ in range(3):
        assert run_prefills(sched) == []           # blocked: no job ran, nothing was read from the cache
    assert sched.pages.hit_tokens == 0             # got 3 * 16 = 48
    sched.pages.release(hog)
    assert run_prefills(sched) == [("b", False, 16, 32), ("b", False, 32, 40)]
    assert sched.pages.hit_tokens == 16            # the one real hit
    del a


# ---- the scheduler -----------------------------------------------------------------------------
def test_fcfs_admission_limited_by_slots():
    sched = sched_of(max_num_seqs=2)
    for rid in "abc":
        add(sched, rid, range(10), max_tokens=3)
    out = step(sched)
    assert [c[0] for c in out["chunks"]] == ["a", "b"]  # two slots: c waits
    assert [(adm.seq.request.id, adm.slot, adm.copy, adm.logits) for adm in out["admitted"]] == \
        [("a", 0, None, "logits:a:10"), ("b", 1, None, "logits:b:10")]
    assert [s.request.id for s in sched.waiting] == ["c"]
    assert sched.slots[0].request.id == "a" and sched.slots[1].request.id == "b"
    out = step(sched)                     # tokens 2..3 of 3: a and b finish
    assert out["chunks"] == [] and len(out["finished"]) == 2
    assert sched.slots == [None, None] and sched.pages.used == 0
    out = step(sched)
    assert out["chunks"] == [("c", False, 0, 10)] and out["admitted"][0].slot == 0


def test_fcfs_admission_limited_by_pages():
    sched = sched_of(num_pages=4, max_num_seqs=4)
    add(sched, "a", range(20), max_tokens=1)     # 2 pages
    add(sched, "b", range(40), max_tokens=1)     # 3 pages: only 2 left
    add(sched, "c", range(10), max_tokens=1)     # 1 page: would fit, but does not overtake b
    chunks = run_prefills(sched)
    assert [c[0] for c in chunks] == ["a", "a"] and sched.pages.used == 2
    assert [s.request.id for s in sched.waiting] == ["a", "b", "c"]
    adm = sched.admit()
    assert [a.seq.request.id for a in adm] == ["a"]
    decode(sched, 1)                             # a's only token: finished, its 2 pages back
    assert sched.pages.used == 0
    chunks = run_prefills(sched)                 # b (3 pages) then c (1 page): 4 of 4
    assert [(c[0], c[2], c[3]) for c in chunks] == [("b", 0, 16), ("b", 16, 32), ("b", 32, 40), ("c", 0, 10)]
    assert sched.pages.used == 4
    check(sched)


def test_n_samples_share_the_prompt_and_copy_its_partial_page():
    sched = sched_of(num_pages=16, max_num_seqs=4, prefill_chunk=16, max_prefill_tokens=64, prefix_caching=True)
    req = add(sched, "r", range(40), n=3, max_tokens=2)
    chunks = run_prefills(sched)
    # one job for the 3 samples; 40 tokens in chunks at multiples of 16; budget 64: 16 + 16 + 8
    assert chunks == [("r", False, 0, 16), ("r", False, 16, 32), ("r", False, 32, 40)]
    assert sched.prefill_tokens == 40 and sched.prompt_tokens == 40
    assert req.pages == [0, 1, 2] and sched.pages.used == 3  # ceil(40/16) = 3, held by the request
    assert [s.state for s in req.samples] == [State.READY] * 3
    adm = sched.admit()
    # pages 0, 1 are full and shared; page 2 (8 tokens) is copied for all but the last sample,
    # which takes the request's own
    assert [(a.seq.index, a.slot, a.copy, a.logits) for a in adm] == [
        (0, 0, (2, 3), "logits:r:40"), (1, 1, (2, 4), "logits:r:40"), (2, 2, None, "logits:r:40")]
    assert [s.pages for s in req.samples] == [[0, 1, 3], [0, 1, 4], [0, 1, 2]]
    assert [s.length for s in req.samples] == [40, 40, 40]
    assert req.pages is None and req.logits is None
    assert sched.pages.used == 5                  # 2 shared + 3 last pages
    assert sched.pages.refs[:5] == [3, 3, 1, 1, 1]  # page 0, 1: one per sample
    check(sched)
    drain(sched)
    assert sched.pages.used == 0 and sched.pages.cached == 2  # pages 0, 1 stay in the prefix cache
    assert [s.tokens for s in req.samples] == [[10_000, 10_001], [11_000, 11_001], [12_000, 12_001]]
    # the same prompt again: its job starts after the 2 cached pages: one chunk of 8 tokens
    again = add(sched, "again", range(40), n=1)
    assert run_prefills(sched) == [("again", False, 32, 40)]
    assert again.pages[:2] == [0, 1] and sched.pages.hit_tokens == 32 and sched.prefill_tokens == 48


def test_n_samples_of_a_whole_page_prompt_copy_nothing():
    sched = sched_of()
    req = add(sched, "r", range(32), n=2)
    run_prefills(sched)
    adm = sched.admit()
    assert [a.copy for a in adm] == [None, None]
    assert [s.pages for s in req.samples] == [[0, 1], [0, 1]] and sched.pages.refs[:2] == [2, 2]
    assert sched.pages.used == 2
    check(sched)


def test_prefill_chunks_are_multiples_of_prefill_chunk_whatever_the_budget():
    # budget (8) smaller than a chunk (16): one chunk a step, the first always runs
    sched = sched_of(prefill_chunk=16, max_prefill_tokens=8)
    add(sched, "a", range(40))
    assert run_prefills(sched) == [("a", False, 0, 16)]
    assert run_prefills(sched) == [("a", False, 16, 32)]
    assert sched.admit() == []                    # not prefilled yet
    assert run_prefills(sched) == [("a", False, 32, 40)]
    assert [a.seq.request.id for a in sched.admit()] == ["a"]

    # budget 36: 16 + 16 = 32, the next chunk (8) is over the 4 left
    sched = sched_of(prefill_chunk=16, max_prefill_tokens=36)
    add(sched, "a", range(40))
    assert run_prefills(sched) == [("a", False, 0, 16), ("a", False, 16, 32)]
    assert run_prefills(sched) == [("a", False, 32, 40)]

    # the budget runs across jobs: 40 = a's 16 + 4, then b's 16 + 4 (4 left: 4 > 4 is false, it runs)
    sched = sched_of(prefill_chunk=16, max_prefill_tokens=40)
    add(sched, "a", range(20))
    add(sched, "b", range(100, 120))
    assert run_prefills(sched) == [("a", False, 0, 16), ("a", False, 16, 20), ("b", False, 0, 16),
                                   ("b", False, 16, 20)]
    # budget 30: a's 16 + 4, b's 16 > 10 left: b waits for the next step
    sched = sched_of(prefill_chunk=16, max_prefill_tokens=30)
    add(sched, "a", range(20))
    add(sched, "b", range(100, 120))
    assert run_prefills(sched) == [("a", False, 0, 16), ("a", False, 16, 20)]
    assert run_prefills(sched) == [("b", False, 0, 16), ("b", False, 16, 20)]

    # a prefix hit of one 16-token page with chunks of 32: the boundaries stay at multiples of 32
    sched = sched_of(prefill_chunk=32, max_prefill_tokens=1000, prefix_caching=True)
    add(sched, "a", range(70), max_tokens=1)
    assert run_prefills(sched) == [("a", False, 0, 32), ("a", False, 32, 64), ("a", False, 64, 70)]
    sched.admit()
    decode(sched, 1)
    add(sched, "b", list(range(16)) + [999] * 54, max_tokens=1)  # shares only the first page
    assert run_prefills(sched) == [("b", False, 16, 32), ("b", False, 32, 64), ("b", False, 64, 70)]


def test_grow_allocates_for_steps_capped_at_max_length():
    sched = sched_of(num_pages=16)
    seq = add(sched, "a", range(40), max_tokens=10).samples[0]  # max_length = 40 + 10 - 1 = 49
    run_prefills(sched)
    sched.admit()
    assert seq.max_length == 49 and seq.pages == [0, 1, 2]
    assert sched.grow(8) == [] and len(seq.pages) == 3   # 48 tokens: 3 pages
    assert sched.grow(9) == [] and len(seq.pages) == 4   # 49 tokens: 4 pages
    assert sched.grow(100) == [] and len(seq.pages) == 4  # capped at 49
    assert sched.pages.used == 4

    sched = sched_of(num_pages=16)
    seq = add(sched, "a", range(40), max_tokens=5).samples[0]  # max_length = 44: 3 pages ever
    run_prefills(sched)
    sched.admit()
    sched.grow(100)
    assert len(seq.pages) == 3 and sched.pages.used == 3

    sched = sched_of(num_pages=16)
    seq = add(sched, "a", range(15), max_tokens=40).samples[0]
    run_prefills(sched)
    sched.admit()
    sched.grow(1)                                  # 16 tokens: still 1 page
    assert seq.pages == [0]
    sched.advance(seq, [1], [0.0], 16)
    sched.grow(1)                                  # 17 tokens: 2 pages
    assert seq.pages == [0, 1]
    check(sched)


def test_preemption_by_recompute():
    sched = sched_of(num_pages=4, max_num_seqs=2, prefill_chunk=16, max_prefill_tokens=64)
    a = add(sched, "a", range(15), max_tokens=40).samples[0]
    b = add(sched, "b", range(100, 115), max_tokens=40).samples[0]
    c = add(sched, "c", range(200, 210), max_tokens=1).samples[0]  # no slot: waits behind a and b
    out = step(sched)                # a, b: 1 page each; grow(1): 16 tokens, no page; 1 token each
    assert [x.seq for x in out["admitted"]] == [a, b] and a.admitted < b.admitted
    assert (a.length, b.length, sched.pages.used) == (16, 16, 2)
    out = step(sched, chunk=16)      # grow(16): 32 tokens, 2 pages each: all 4 used; 17 tokens each
    assert out["preempted"] == [] and sched.pages.used == 4 and (a.length, b.length) == (32, 32)
    out = step(sched, chunk=16)      # grow(16): a needs a 3rd page, none left: b (admitted last) goes
    assert out["preempted"] == [b]
    assert sched.preemptions == 1
    assert b.state is State.WAITING and b.recompute and b.pages == [] and b.slot is None
    assert list(sched.waiting) == [b, c]          # the front of the queue, before c
    assert sched.slots[1] is None and len(a.pages) == 3 and sched.pages.used == 3
    assert len(b.tokens) == 17 and len(a.tokens) == 33  # b kept its tokens; a decoded on
    kept = list(b.tokens)
    out = step(sched, chunk=16)      # b's job needs ceil(32/16) = 2 pages, 1 free: waits; c does not overtake
    assert out["chunks"] == [] and list(sched.waiting) == [b, c]
    # ... while a takes its 4th (last) page, min(48 + 16, 54) = 54 -> 4 pages, and finishes: 33 + 7 = 40 tokens
    assert out["preempted"] == [] and a.state is State.FINISHED and len(a.tokens) == 40
    assert sched.pages.used == 0
    out = step(sched, chunk=16)
    # b's job covers its prompt and what it generated: 15 + 17 = 32 tokens, in chunks of 16;
    # then c's prompt; b comes back with its own logits, nothing copied
    assert out["chunks"] == [("b", True, 0, 16), ("b", True, 16, 32), ("c", False, 0, 10)]
    adm = {x.seq.request.id: x for x in out["admitted"]}
    assert adm["b"].logits == "logits:b:32" and adm["b"].copy is None
    assert not b.recompute and b.state is State.RUNNING and b.logits is None
    # c has no token yet, so this step decodes 1 token (Engine.step): b's 18th
    assert b.tokens[:17] == kept and b.tokens[17:] == [token(b, 17)]
    assert b.length == 33                          # 32 recomputed + 1 decoded
    assert [s.request.id for s in out["finished"]] == ["c"]
    drain(sched, chunk=16)
    assert b.tokens == [token(b, i) for i in range(40)]  # the same tokens as without the preemption
    assert sched.pages.used == 0 and sched.slots == [None, None] and sched.preemptions == 1


def test_preemption_drops_a_prefill_job_first():
    sched = sched_of(num_pages=5, max_num_seqs=2, prefill_chunk=16, max_prefill_tokens=16)
    a = add(sched, "a", range(15), max_tokens=40).samples[0]
    step(sched)                                    # a runs: 1 page, 1 token, length 16
    sched.grow(16)                                 # length 32: 2 pages
    decode(sched, 16)
    b = add(sched, "b", range(100, 140), max_tokens=1).samples[0]  # 3 pages: all that is left
    assert run_prefills(sched) == [("b", False, 0, 16)]  # budget 16: one chunk this step
    assert sched.pages.used == 5 and b.state is State.PREFILL
    assert sched.admit() == []
    assert sched.grow(16) == []                    # a needs a 3rd page: b's job gives its 3 back
    assert len(a.pages) == 3 and sched.pages.used == 3 and sched.preemptions == 1
    assert b.state is State.WAITING and sched.jobs == [] and sched.slots[1] is None
    assert b.request.job is None
    check(sched)


def test_abort_in_every_state():
    sched = sched_of(num_pages=16, max_num_seqs=3, prefill_chunk=16, max_prefill_tokens=16)
    run = add(sched, "run", range(10), max_tokens=50)
    step(sched)                                    # run: slot 0, running, 1 page
    ready = add(sched, "ready", range(100, 110), n=2, max_tokens=50)
    pre = add(sched, "pre", range(200, 240), max_tokens=50)
    out = step(sched)
    # both jobs start (slots 1, 2); budget 16: ready's 10 tokens, then pre's 16 > 6 left: stops
    assert out["chunks"] == [("ready", False, 0, 10)]
    # ready's sample 0 takes slot 1 (a copy of the partial page), sample 1 finds no slot: stays READY
    assert [(x.seq.request.id, x.slot) for x in out["admitted"]] == [("ready", 1)]
    wait = add(sched, "wait", range(300, 310))
    out = step(sched)
    assert out["chunks"] == [("pre", False, 0, 16)]
    assert run.samples[0].state is State.RUNNING
    assert [s.state for s in ready.samples] == [State.RUNNING, State.READY] and ready.pages is not None
    assert pre.samples[0].state is State.PREFILL and wait.samples[0].state is State.WAITING
    # pages: run 1, ready's prompt 1 + sample 0's copy 1, pre 3 = 6 (grow: nobody crossed a page)
    assert sched.pages.used == 6
    ended = []
    assert sched.abort("wait", on_finish=ended.append)
    assert sched.pages.used == 6 and wait.samples[0] not in sched.waiting
    assert sched.abort("pre", on_finish=ended.append)
    assert sched.pages.used == 3 and sched.jobs == [] and sched.slots[2] is None
    check(sched)
    assert sched.abort("ready", on_finish=ended.append)
    assert sched.pages.used == 1 and sched.slots[1] is None
    check(sched)
    assert sched.abort("run", on_finish=ended.append)
    assert sched.pages.used == 0 and sched.slots == [None, None, None]
    assert not sched.requests and not sched.waiting and not sched.running and not sched.has_unfinished()
    assert [(s.request.id, s.index, s.finish_reason) for s in ended] == [
        ("wait", 0, "abort"), ("pre", 0, "abort"), ("ready", 0, "abort"), ("ready", 1, "abort"), ("run", 0, "abort")]
    assert all(s.state is State.FINISHED for s in ended)
    assert not sched.abort("run")                  # gone
    # the engine runs on: a new request gets slot 0 and pages from the start
    add(sched, "next", range(10), max_tokens=1)
    out = step(sched)
    assert out["admitted"][0].slot == 0 and len(out["finished"]) == 1 and sched.pages.used == 0


def test_abort_between_prefill_and_admission():
    sched = sched_of(num_pages=8, max_num_seqs=2)
    req = add(sched, "r", range(20), n=2)
    run_prefills(sched)
    assert req.samples[0].state is State.READY and req.samples[0].slot == 0  # its job's reserved slot
    assert sched.pages.used == 2
    assert sched.abort("r")
    assert sched.pages.used == 0 and sched.slots == [None, None] and not sched.waiting
    assert sched.admit() == []


def test_abort_a_preempted_sample():
    sched = sched_of(num_pages=3, max_num_seqs=2)
    add(sched, "a", range(15), max_tokens=40)
    b = add(sched, "b", range(100, 115), max_tokens=40).samples[0]
    step(sched)                                    # 1 page each, length 16
    assert sched.grow(16) == [b]                   # a takes the 3rd page; b has none left for itself
    assert b.recompute and sched.pages.used == 2
    sched.abort("b")
    assert sched.pages.used == 2 and not sched.waiting and "b" not in sched.requests
    sched.abort("a")
    assert sched.pages.used == 0 and sched.slots == [None, None]


def test_static_policy_admits_batch_at_a_time():
    sched = sched_of(max_num_seqs=2, prefill_chunk=16, max_prefill_tokens=4, policy="static")
    add(sched, "a", range(40), max_tokens=1)
    add(sched, "b", range(10), max_tokens=3)
    add(sched, "c", range(10), max_tokens=1)
    out = step(sched)
    # the whole batch in one step, whatever the budget (4): every chunk of a and b
    assert out["chunks"] == [("a", False, 0, 16), ("a", False, 16, 32), ("a", False, 32, 40), ("b", False, 0, 10)]
    assert [x.seq.request.id for x in out["admitted"]] == ["a", "b"]
    assert [s.request.id for s in out["finished"]] == ["a"]  # 1 token: done; slot 0 is free
    assert sched.slots[0] is None
    out = step(sched)                              # b still runs: c is not admitted
    assert out["chunks"] == [] and out["admitted"] == [] and [s.request.id for s in sched.waiting] == ["c"]
    assert [s.request.id for s in out["finished"]] == ["b"]  # tokens 2, 3 of 3
    out = step(sched)                              # nothing runs: the next batch opens
    assert out["chunks"] == [("c", False, 0, 10)] and [x.seq.request.id for x in out["admitted"]] == ["c"]
    assert not sched.has_unfinished() and sched.pages.used == 0

    # the same under "continuous": c comes in as soon as a's slot is free
    sched = sched_of(max_num_seqs=2, prefill_chunk=16, max_prefill_tokens=64)
    add(sched, "a", range(40), max_tokens=1)
    add(sched, "b", range(10), max_tokens=3)
    add(sched, "c", range(10), max_tokens=1)
    step(sched)
    out = step(sched)
    assert out["chunks"] == [("c", False, 0, 10)] and [x.seq.request.id for x in out["admitted"]] == ["c"]


def test_static_policy_samples_beyond_the_slots_wait_for_the_next_batch():
    sched = sched_of(max_num_seqs=2, policy="static")
    req = add(sched, "r", range(20), n=3, max_tokens=2)
    out = step(sched)
    assert [(x.seq.index, x.copy) for x in out["admitted"]] == [(0, (1, 2)), (1, (1, 3))]
    assert req.samples[2].state is State.READY and req.pages == [0, 1]  # held for the third sample
    out = step(sched)                              # 0 and 1 finish (2 tokens)
    assert len(out["finished"]) == 2 and out["admitted"] == []
    out = step(sched)                              # a new batch: the third sample, taking the request's pages
    assert [(x.seq.index, x.slot, x.copy) for x in out["admitted"]] == [(2, 0, None)]
    assert req.samples[2].pages[:2] == [0, 1]
    drain(sched)
    assert sched.pages.used == 0


def test_static_policy_keeps_a_batch_closed_while_one_runs():
    sched = sched_of(max_num_seqs=3, policy="static")
    add(sched, "a", range(10), max_tokens=1)
    add(sched, "b", range(10), max_tokens=6)
    step(sched)
    add(sched, "late", range(10), max_tokens=1)    # arrives while b runs, two slots free
    for _ in range(2):
        out = step(sched)
        assert out["chunks"] == [] and out["admitted"] == []
    drain(sched, until=lambda: not sched.running)  # b: 6 tokens
    out = step(sched)
    assert [x.seq.request.id for x in out["admitted"]] == ["late"]


def test_policy_is_checked():
    with pytest.raises(ValueError, match="policy"):
        sched_of(policy="fifo")


def test_admit_after_dropping_a_held_prompt():
    # Reachable from Engine: each request needs pages_for(20 + 1 - 1) + 1 = 3 <= 4 pages (_check_request).
    sched = sched_of(num_pages=4, max_num_seqs=4, prefill_chunk=16, max_prefill_tokens=64)
    a = add(sched, "a", range(20), n=2, max_tokens=1)        # 2 pages each (1 full + 4 tokens)
    b = add(sched, "b", range(100, 120), n=2, max_tokens=1)
    run_prefills(sched)                                      # both jobs: 4 of 4 pages
    assert sched.pages.used == 4
    adm = sched.admit()  # a's sample 0 needs a page for its copy: b's prompt goes; then b's sample 0 is placed
    # expected: a's sample 0 in (a's sample 1 now or next step), b's samples back to waiting (their
    # prompt will be prefilled again); none of b's placed
    assert [(x.seq.request.id, x.seq.index) for x in adm][:1] == [("a", 0)]
    assert all(x.seq.request is a for x in adm)
    assert [s.state for s in b.samples] == [State.WAITING, State.WAITING]
    check(sched)
    drain(sched)
    assert all(s.state is State.FINISHED for s in a.samples + b.samples)
