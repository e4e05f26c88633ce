"""Serving: continuous batching vs static batching (the same engine) vs HF transformers generate.

A seeded workload of `--requests` prompts whose prompt and output lengths follow a skewed
(lognormal) distribution -- output max / median = `--output-len MAX` / `--output-len MEDIAN`
(the lengths are the distribution's quantiles, shuffled, so the skew does not depend on luck) --
arriving all at once and as a Poisson process (`--arrival all poisson`), once with one sample per
request and once with groups of `--n 16` samples of one prompt (`--groups` prompts). Every
sequence generates exactly its request's `max_tokens` tokens (EOS disabled in the model config, as
every benchmark here), so runs generate the same tokens and compare.

Each implementation runs in its own child process with random weights of a preset's shape:

- ours: `Engine(policy="continuous")` (admits waiting requests whenever slots and pages free up)
  and `Engine(policy="static")` (admits a new batch only when the whole previous batch finished:
  the old engine's behaviour) with the same `--max-num-seqs`, `--page-size` and `--num-pages`
  (the same KV memory). Each engine first runs a warm-up workload (compilation; reported as
  `warmup_s` and `compilations_warmup`), then every workload; `compilations_during_run` shows
  what the warm-up missed. The driver: add the requests whose arrival time has come, call
  `engine.step()`, record the time of every token its events carry (the first tokens of requests admitted
  beside running ones as the engine hands them over, before the step's decode chunk: `step(on_events=...)`,
  as the server streams them); repeat until all finished.
- hf: `model.generate` on static batches of up to `--max-num-seqs` rows (a group's n samples are n
  rows), padded left, `max_new_tokens` = the batch's largest, sampled at temperature 1; a batch
  starts when the previous one finished, with the requests that have arrived. Each row counts
  only its own request's `max_tokens` tokens; per-token times come from a logits processor that
  notes the clock at every step.

Per run: generated tokens/s (tokens / time from the first arrival to the last token), TTFT
(first token - arrival, per sequence) and inter-token latency p50 / p99 (a delivery of k tokens
after a gap g counts as k gaps of g / k: the engine decodes `--chunk` steps per device call, so
tokens come in bursts; `delivery_gap_p99_s` is the raw gap between deliveries), page utilisation
(pages used / pages in the pool, mean and max over engine steps), prompt tokens vs prefill tokens
computed (a group of n shares one prefill of its prompt: equal when sharing works), preemptions.
`full_occupancy`: `--max-num-seqs` requests of equal lengths, all at once: `decode_step_s` is the
time per decode step with every slot busy (median over sequences of the time from the first
delivery to the last over the tokens after the first delivery).

`--http`: the continuous engine also serves every workload through `python -m qwq_jax.serve`'s
server (started in the same process on 127.0.0.1, `qwq_jax.serve.start_in_thread`), driven by the
real `openai` client: each request a streamed `/v1/completions` call sent at its arrival time, its
tokens counted from the chunks' logprobs and timed as they reach the client (policy "http"; ratio
lines http/continuous: what HTTP, JSON and server-sent events cost).

Lines: one per (impl, policy, workload, arrival, n); ratio lines continuous/static and
continuous/hf (generated tokens/s; decode_step_s for full_occupancy); a summary line with the
targets (reported, not asserted): continuous >= 2x static on the skewed workloads, groups' prefill
tokens computed == prompt tokens.

    python benchmarks/serving.py --preset qwq-32b                    # one GPU / TPU
    python benchmarks/serving.py --tiny                              # CPU smoke run (CI)
    python benchmarks/serving.py --preset qwq-32b --impl ours --http  # in-process and through HTTP
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from typing import Any, Iterable

import numpy as np

from _common import (IMPL_NAMES, ROOT, HelpFormatter, add_common_args, apply_tiny, build_hf, build_ours, device_kind,
                     emit, error_line, preset_config, ratio)

POLICIES = ("continuous", "static")
ARRIVALS = ("all", "poisson")
TARGET_CONTINUOUS_OVER_STATIC = 2.0


# ---- workload --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Request:
    request_id: str
    arrival_s: float     # after the start of the run
    prompt: list[int]
    max_tokens: int      # every sample generates exactly this many tokens (EOS is off)
    n: int               # samples of this prompt


def lognormal_lengths(rng: np.random.Generator, count: int, median: int, maximum: int) -> np.ndarray:
    """`count` lengths at the quantiles (i + 0.5) / count of a lognormal whose median is `median`
    and whose largest quantile is `maximum`, shuffled: skewed, with the sample's max / median =
    maximum / median (exactly for an odd count; for an even one the sample's median is the mean of
    the middle two, close to `median` for all but the smallest counts)."""
    z = np.array([statistics.NormalDist().inv_cdf((i + 0.5) / count) for i in range(count)])
    sigma = np.log(maximum / median) / z[-1] if count > 1 else 0.0
    lengths = np.clip(np.rint(median * np.exp(sigma * z)), 1, maximum).astype(int)
    return rng.permutation(lengths)


def arrival_times(rng: np.random.Generator, count: int, arrival: str, rate: float | None) -> np.ndarray:
    """Seconds after the start: all zero, or a Poisson process of `rate` requests/s starting at 0."""
    if arrival == "all":
        return np.zeros(count)
    gaps = rng.exponential(1.0 / rate, count - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def make_workload(*, seed: int, count: int, n: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                  vocab: int, arrival: str, rate: float | None = None, tag: str = "") -> list[Request]:
    """Requests with skewed prompt / output lengths. Lengths and arrival gaps depend on (seed, count, n)
    only, so every policy and implementation gets the same workload; the prompt tokens also depend on
    `tag` (a fresh prompt per run, so no run finds another's prompts in the prefix cache)."""
    rng = np.random.default_rng([seed, count, n])
    prompts = lognormal_lengths(rng, count, *prompt_len)
    outputs = lognormal_lengths(rng, count, *output_len)
    arrivals = arrival_times(rng, count, arrival, rate)
    tokens = np.random.default_rng([seed, count, n, *tag.encode()])
    return [Request(f"{tag}{i}", float(arrivals[i]), tokens.integers(0, vocab, int(p)).tolist(), int(o), n)
            for i, (p, o) in enumerate(zip(prompts, outputs))]


def full_occupancy_workload(args, vocab: int, tag: str) -> list[Request]:
    """`--max-num-seqs` requests of the median prompt length and `--occupancy-tokens` tokens, all at once."""
    rng = np.random.default_rng([args.seed, 7, *tag.encode()])
    return [Request(f"{tag}{i}", 0.0, rng.integers(0, vocab, args.prompt_len[0]).tolist(), args.occupancy_tokens, 1)
            for i in range(args.max_num_seqs)]


def workloads(args) -> list[tuple[str, str, int]]:
    """(workload, arrival, n) of every run, in order: `all` before `poisson` (auto rates come from it)."""
    runs = [("skewed", a, n) for n in args.n for a in ARRIVALS if a in args.arrival]
    return runs + ([("full_occupancy", "all", 1)] if args.occupancy_tokens else [])


def workload_for(args, vocab: int, workload: str, arrival: str, n: int, rates: dict, tag: str) -> list[Request]:
    if workload == "full_occupancy":
        return full_occupancy_workload(args, vocab, tag)
    return make_workload(seed=args.seed, count=args.requests if n == 1 else args.groups, n=n,
                         prompt_len=tuple(args.prompt_len), output_len=tuple(args.output_len), vocab=vocab,
                         arrival=arrival, rate=rates.get(str(n)), tag=tag)


def max_model_len(args) -> int:
    longest = max(args.prompt_len[1] + args.output_len[1], args.prompt_len[0] + args.occupancy_tokens)
    return -(-longest // args.page_size) * args.page_size


# ---- measurements ----------------------------------------------------------------------------
def percentiles(values: Iterable[float]) -> tuple[float | None, float | None]:
    """(p50, p99) of `values`, linear interpolation; (None, None) when empty."""
    v = np.asarray(list(values), dtype=float)
    return (None, None) if v.size == 0 else tuple(float(x) for x in np.percentile(v, [50, 99]))


class Timeline:
    """When each sequence's tokens arrived (perf_counter seconds) and how each finished."""

    def __init__(self, requests: list[Request], start: float):
        self.start = start
        self.arrival = {r.request_id: start + r.arrival_s for r in requests}
        self.expected = {(r.request_id, s): r.max_tokens for r in requests for s in range(r.n)}
        self.deliveries: dict[tuple[str, int], list[tuple[float, int]]] = collections.defaultdict(list)
        self.finish: dict[tuple[str, int], str | None] = {}

    def record(self, event: Any, at: float) -> None:
        key = (event.request_id, event.sample_index)
        if event.token_ids:
            self.deliveries[key].append((at, len(event.token_ids)))
        if event.finished:
            self.finish[key] = event.finish_reason

    def metrics(self) -> dict:
        ttft, itl, gaps, spans = [], [], [], []
        for key, deliveries in self.deliveries.items():
            first = deliveries[0][0]
            ttft.append(first - self.arrival[key[0]])
            itl += [0.0] * (deliveries[0][1] - 1)  # tokens that came with the first one
            for (prev, _), (at, count) in zip(deliveries, deliveries[1:]):
                gaps.append(at - prev)
                itl += [(at - prev) / count] * count
            # tokens after the first delivery, over their time (sequences that end in the step that
            # streamed their first token, all at one time, say nothing about the step time)
            if self.expected[key] > deliveries[0][1] and deliveries[-1][0] > first:
                spans.append((deliveries[-1][0] - first) / (self.expected[key] - deliveries[0][1]))
        generated = sum(c for d in self.deliveries.values() for _, c in d)
        end = max((d[-1][0] for d in self.deliveries.values()), default=self.start)
        wrong = sum(sum(c for _, c in self.deliveries.get(k, [])) != want or self.finish.get(k) != "length"
                    for k, want in self.expected.items())
        (ttft50, ttft99), (itl50, itl99) = percentiles(ttft), percentiles(itl)
        return {"sequences": len(self.expected), "generated_tokens": generated, "duration_s": end - self.start,
                "generated_tokens_per_s": generated / (end - self.start) if end > self.start else None,
                "ttft_p50_s": ttft50, "ttft_p99_s": ttft99, "itl_p50_s": itl50, "itl_p99_s": itl99,
                "delivery_gap_p99_s": percentiles(gaps)[1],
                "decode_step_s": statistics.median(spans) if spans else None,
                "sequences_not_of_their_length": wrong}


def serve(engine: Any, requests: list[Request], params_of, label: str) -> tuple[Timeline, dict]:
    """Drive `engine` through `requests` in real time: admit what has arrived, step, record. Returns the
    timeline and the engine's figures over the run (stats deltas, page utilisation per step)."""
    from tqdm import tqdm

    before = engine.stats()
    pending = collections.deque(sorted(requests, key=lambda r: r.arrival_s))
    utilisation = []
    bar = tqdm(total=sum(r.max_tokens * r.n for r in requests), desc=label, unit="tok", file=sys.stderr,
               leave=False, mininterval=0.5)
    start = time.perf_counter()
    timeline = Timeline(requests, start)
    try:
        while pending or engine.has_unfinished():
            now = time.perf_counter() - start
            while pending and pending[0].arrival_s <= now:  # admit
                r = pending.popleft()
                engine.add_request(r.prompt, params_of(r), request_id=r.request_id)
            if not engine.has_unfinished():  # idle until the next arrival
                time.sleep(max(0.0, pending[0].arrival_s - now))
                continue
            def record(events):
                at = time.perf_counter()
                for e in events:
                    timeline.record(e, getattr(e, "at", None) or at)
                    bar.update(len(e.token_ids))

            record(engine.step(on_events=record))  # step; first tokens are recorded before its decode chunk
            s = engine.stats()
            if s.get("pages_total"):
                utilisation.append(s["pages_used"] / s["pages_total"])
    except BaseException:
        for r in requests:  # leave the engine empty for the next run
            engine.abort(r.request_id)
        raise
    finally:
        bar.close()
    after = engine.stats()
    figures = {k: after[k] - before[k] for k in ("prompt_tokens", "prefill_tokens_computed", "prefix_cache_hit_tokens",
                                                  "preemptions", "steps", "compilations") if after.get(k) is not None}
    figures["compilations_during_run"] = figures.pop("compilations", None)
    figures.update(page_utilisation_mean=float(np.mean(utilisation)) if utilisation else None,
                   page_utilisation_max=float(np.max(utilisation)) if utilisation else None,
                   num_pages=after.get("pages_total"), page_size=after.get("page_size"))
    return timeline, figures


def run_all(args, engine: Any, impl_label: str, params_of, vocab: int, rates: dict) -> dict:
    """Every workload through one engine; `rates` gets the auto Poisson rates of the first all-at-once runs."""
    rows = {}
    for workload, arrival, n in workloads(args):
        key = row_key(workload, arrival, n)
        try:
            if arrival == "poisson" and str(n) not in rates:
                raise ValueError("--rate auto needs an all-at-once run of the same n first (--arrival all poisson)")
            requests = workload_for(args, vocab, workload, arrival, n, rates, tag=f"{workload}-{arrival}-n{n}-")
            timeline, figures = serve(engine, requests, params_of, f"{impl_label} {key}")
            row = rows[key] = {"requests": len(requests), **timeline.metrics(), **figures,
                               "rate_per_s": rates.get(str(n)) if arrival == "poisson" else None,
                               **length_figures(requests)}
            if workload == "skewed" and arrival == "all" and str(n) not in rates:
                rates[str(n)] = len(requests) / row["duration_s"]
        except Exception as e:  # out of memory, a refused request: the other runs still go
            rows[key] = {"error": error_line(e)}
            gc.collect()
    return rows


def length_figures(requests: list[Request]) -> dict:
    prompts, outputs = [len(r.prompt) for r in requests], [r.max_tokens for r in requests]
    return {"prompt_len_median": statistics.median(prompts), "prompt_len_max": max(prompts),
            "output_len_median": statistics.median(outputs), "output_len_max": max(outputs),
            "output_max_over_median": max(outputs) / statistics.median(outputs)}


def row_key(workload: str, arrival: str, n: int) -> str:
    return f"{workload}/{arrival}/n{n}"


def serve_http(url: str, engine: Any, requests: list[Request], params_of, label: str) -> tuple[Timeline, dict]:
    """`serve`, through the HTTP server at `url` on `engine`: one streamed /v1/completions call per
    request at its arrival time (the real `openai` client); tokens timed as the client gets them."""
    import asyncio
    import types

    import openai
    from tqdm import tqdm

    before = engine.stats()
    bar = tqdm(total=sum(r.max_tokens * r.n for r in requests), desc=label, unit="tok", file=sys.stderr,
               leave=False, mininterval=0.5)

    async def one(client, r: Request, timeline: Timeline) -> None:
        await asyncio.sleep(max(0.0, timeline.start + r.arrival_s - time.perf_counter()))
        p = params_of(r)
        stream = await client.completions.create(model="bench", prompt=r.prompt, max_tokens=p.max_tokens, n=p.n,
                                                 seed=p.seed, temperature=p.temperature, stream=True, logprobs=0)
        async for chunk in stream:
            at = time.perf_counter()
            for c in chunk.choices:
                k = len(c.logprobs.tokens) if c.logprobs is not None else 0
                timeline.record(types.SimpleNamespace(request_id=r.request_id, sample_index=c.index, token_ids=[0] * k,
                                                      finished=c.finish_reason is not None,
                                                      finish_reason=c.finish_reason), at)
                bar.update(k)

    async def drive() -> Timeline:
        # the client's own HTTP stack (httpx or, from openai 3, httpx2), its default pool (1000 connections)
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=None) as client:
            timeline = Timeline(requests, time.perf_counter())
            await asyncio.gather(*(one(client, r, timeline) for r in requests))
            return timeline

    try:
        timeline = asyncio.run(drive())
    finally:
        bar.close()
    after = engine.stats()
    figures = {k: after[k] - before[k] for k in ("prompt_tokens", "prefill_tokens_computed", "prefix_cache_hit_tokens",
                                                  "preemptions", "steps", "compilations")}
    figures["compilations_during_run"] = figures.pop("compilations")
    figures.update(num_pages=after["pages_total"], page_size=after["page_size"])
    return timeline, figures


def run_http(args, engine: Any, vocab: int, params_of, rates: dict) -> dict:
    """Every workload through the HTTP server on `engine` (the continuous one, warmed up)."""
    from qwq_jax.serve import start_in_thread
    from qwq_jax.tokenizer import ByteTokenizer

    url, stop = start_in_thread(engine, ByteTokenizer(), name="bench")
    rows = {}
    try:
        for workload, arrival, n in workloads(args):
            key = row_key(workload, arrival, n)
            try:
                requests = workload_for(args, vocab, workload, arrival, n, rates, tag=f"http-{workload}-{arrival}-n{n}-")
                timeline, figures = serve_http(url, engine, requests, params_of, f"http {key}")
                rows[key] = {"requests": len(requests), **timeline.metrics(), **figures,
                             "rate_per_s": rates.get(str(n)) if arrival == "poisson" else None,
                             **length_figures(requests)}
            except Exception as e:  # noqa: BLE001 - the other runs still go
                rows[key] = {"error": error_line(e)}
    finally:
        stop()
    return rows


# ---- ours ------------------------------------------------------------------------------------
def warm_up(engine: Any, args, vocab: int, params_of, rates: dict) -> None:
    """Compile what the runs will use: every run's requests (the same prompt lengths and n, so the same
    prefill shapes, page copies and slot fills), all at once, each with at most `--chunk` + 2 tokens and
    fresh prompt tokens (the prefix cache gains nothing)."""
    requests = [dataclasses.replace(r, arrival_s=0.0, max_tokens=min(r.max_tokens, args.chunk + 2))
                for w, n in dict.fromkeys((w, n) for w, _, n in workloads(args))  # lengths: arrival aside
                for r in workload_for(args, vocab, w, "all", n, rates, tag=f"warm-{w}-n{n}-")]
    print(f"warm-up: {len(requests)} requests (compiling the engine's programs) ...", file=sys.stderr, flush=True)
    serve(engine, requests, params_of, "warm-up")


def run_ours(args) -> dict:
    import jax.numpy as jnp

    from qwq_jax.generate import Engine
    from qwq_jax.sampling import SamplingParams

    cfg = preset_config(args.preset)
    model = build_ours(cfg, jnp.dtype(args.dtype))

    def params_of(r: Request) -> SamplingParams:
        return SamplingParams(temperature=1.0, max_tokens=r.max_tokens, n=r.n,
                              seed=zlib.crc32(f"{args.seed}/{r.request_id}".encode()))  # fixed per request

    rows, rates, engines = {}, dict(args.rates or {}), {}
    for policy in args.policy:
        try:
            engine = Engine(model, max_num_seqs=args.max_num_seqs, page_size=args.page_size, num_pages=args.num_pages,
                            max_model_len=max_model_len(args), chunk=args.chunk, prefill_chunk=args.prefill_chunk,
                            policy=policy, seed=args.seed)
            t0 = time.perf_counter()
            warm_up(engine, args, cfg.vocab_size, params_of, rates)
            engines[policy] = {"warmup_s": time.perf_counter() - t0,
                               "compilations_warmup": engine.stats().get("compilations")}
            runs = run_all(args, engine, policy, params_of, cfg.vocab_size, rates)
            http = run_http(args, engine, cfg.vocab_size, params_of, rates) if args.http and policy == "continuous" \
                else {}
        except Exception as e:
            engines[policy] = {"error": error_line(e)}
            runs = {row_key(*w): {"error": error_line(e)} for w in workloads(args)}
            http = {}
        rows.update({f"{policy}/{k}": {**engines[policy], **v} for k, v in runs.items()})
        rows.update({f"http/{k}": {**engines[policy], **v} for k, v in http.items()})
        engine = None
        gc.collect()
    return {"rows": rows, "rates": rates, "device": device_kind("ours")}


# ---- HF transformers -------------------------------------------------------------------------
@dataclasses.dataclass
class _HFEvent:  # the fields of a StreamEvent the driver reads, and when the token was computed
    request_id: str
    sample_index: int
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    at: float


class HFStatic:
    """`model.generate` behind the engine's driving interface: each `step()` runs one whole static batch
    (up to `max_num_seqs` rows, in arrival order, whole groups) and returns every token with its time."""

    def __init__(self, model: Any, max_num_seqs: int, device: str):
        self.model, self.max_num_seqs, self.device = model, max_num_seqs, device
        self.waiting: collections.deque = collections.deque()
        self.counts = dict(prompt_tokens=0, prefill_tokens_computed=0, steps=0)

    def add_request(self, prompt: list[int], params: Any, request_id: str) -> str:
        if params.n > self.max_num_seqs:
            raise ValueError(f"n={params.n} samples do not fit a batch of {self.max_num_seqs} rows")
        self.waiting.append((request_id, prompt, params))
        self.counts["prompt_tokens"] += len(prompt)
        return request_id

    def has_unfinished(self) -> bool:
        return bool(self.waiting)

    def abort(self, request_id: str) -> bool:
        kept = collections.deque(w for w in self.waiting if w[0] != request_id)
        found, self.waiting = len(kept) < len(self.waiting), kept
        return found

    def stats(self) -> dict:
        return dict(self.counts)

    def step(self, on_events: Any = None) -> list[_HFEvent]:
        """(`on_events`: unused, every token carries its own time.)"""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        batch = []
        while self.waiting and sum(p.n for _, _, p in batch) + self.waiting[0][2].n <= self.max_num_seqs:
            batch.append(self.waiting.popleft())
        rows = [(rid, s, prompt, p.max_tokens) for rid, prompt, p in batch for s in range(p.n)]
        width = max(len(prompt) for _, _, prompt, _ in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (_, _, prompt, _) in enumerate(rows):  # padded left
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        new = max(m for *_, m in rows)
        times: list[float] = []
        cuda = self.device == "cuda"

        class Clock(LogitsProcessor):  # called once per step, when that step's logits are ready
            def __call__(self, input_ids, scores):
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter())
                return scores

        with torch.no_grad():
            out = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                      eos_token_id=None, pad_token_id=0,
                                      logits_processor=LogitsProcessorList([Clock()]))
        tokens = out[:, width:].tolist()
        self.counts["prefill_tokens_computed"] += len(rows) * width  # padding included: HF computes it
        self.counts["steps"] += 1
        return [_HFEvent(rid, s, [tokens[i][k]], k == m - 1, "length" if k == m - 1 else None, times[k])
                for i, (rid, s, _, m) in enumerate(rows) for k in range(m)]


def run_hf(args) -> dict:
    import torch

    from qwq_jax.sampling import SamplingParams

    torch.manual_seed(args.seed)
    if args.tiny:  # a smoke run on a loaded CI machine: torch's spinning threads stall for seconds there
        torch.set_num_threads(1)
    cfg = preset_config(args.preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_hf(cfg, getattr(torch, args.dtype), device).eval()
    engine = HFStatic(model, args.max_num_seqs, device)

    def params_of(r: Request) -> SamplingParams:
        return SamplingParams(max_tokens=r.max_tokens, n=r.n)

    # one full batch of prompts of two lengths (padding, so the attention mask's path too)
    warm = [Request(f"warm-{i}", 0.0, [1] * (args.prompt_len[0] if i % 2 else 2), 4, 1)
            for i in range(args.max_num_seqs)]
    print("warm-up ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    serve(engine, warm, params_of, "warm-up")
    warmup_s = time.perf_counter() - t0
    rows = run_all(args, engine, "hf", params_of, cfg.vocab_size, dict(args.rates or {}))
    return {"rows": {f"static/{k}": {**v, "warmup_s": warmup_s} for k, v in rows.items()}, "device": device_kind("hf")}


# ---- command line ----------------------------------------------------------------------------
def run_child_live(impl: str, argv: list[str]) -> Any:
    """`_common.run_child`, with the child's progress bars on our stderr as they happen."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    print(f"running {IMPL_NAMES[impl]} ...", file=sys.stderr, flush=True)
    r = subprocess.run([sys.executable, __file__, *argv, "--child", impl], stdout=subprocess.PIPE, text=True, env=env)
    if r.returncode != 0 or not r.stdout.strip():
        raise SystemExit(f"{IMPL_NAMES[impl]} failed (exit code {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(p, preset="qwq-32b")
    p.add_argument("--policy", nargs="+", choices=POLICIES, default=list(POLICIES),
                   help="our engine's scheduler policies (Engine(policy=...)), each with the same KV memory")
    p.add_argument("--arrival", nargs="+", choices=ARRIVALS, default=list(ARRIVALS),
                   help="all requests at time 0, and/or a Poisson process of --rate requests/s")
    p.add_argument("--rate", default="auto",
                   help="Poisson arrivals per second; auto: the request rate the first all-at-once run of the same "
                        "n served (ours: the continuous engine), so arrivals span about that run's time")
    p.add_argument("--n", type=int, nargs="+", default=[1, 16], help="samples per request, a run each")
    p.add_argument("--requests", type=int, default=128, help="requests per run with n=1")
    p.add_argument("--groups", type=int, default=8, help="requests (groups of n samples) per run with n>1")
    p.add_argument("--prompt-len", type=int, nargs=2, default=[128, 1024], metavar=("MEDIAN", "MAX"),
                   help="prompt tokens: median and maximum of the lognormal")
    p.add_argument("--output-len", type=int, nargs=2, default=[64, 1024], metavar=("MEDIAN", "MAX"),
                   help="max_tokens per request: median and maximum of the lognormal (max/median >= 8: skewed)")
    p.add_argument("--occupancy-tokens", type=int, default=128,
                   help="tokens per sequence of the full_occupancy run (every slot busy, equal lengths); 0: skip")
    p.add_argument("--max-num-seqs", type=int, default=32, help="decode slots; HF's batch rows")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--num-pages", type=int, default=None,
                   help="KV pages of both policies (default: the engine's, enough for every slot at the longest "
                        "request)")
    p.add_argument("--chunk", type=int, default=16, help="our decode steps per device call")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="our prompt tokens per prefill call")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="weights, activations and KV cache on both sides (--tiny: float32)")
    p.add_argument("--seed", type=int, default=0, help="workload, weights and sampling seed")
    p.add_argument("--http", action="store_true",
                   help="also serve every workload through the OpenAI-compatible HTTP server on the continuous "
                        "engine, driven by the openai client (policy 'http')")
    p.add_argument("--rates", type=json.loads, default=None, help=argparse.SUPPRESS)  # the parent's resolved rates
    args = p.parse_args()
    if args.tiny:
        args.dtype = "float32"
        apply_tiny(p, args, preset="tiny", requests=24, groups=3, prompt_len=[8, 48], output_len=[4, 40],
                   occupancy_tokens=16, max_num_seqs=16, page_size=4, chunk=4, prefill_chunk=32)
    problems = [f"--n {n} is more than --max-num-seqs {args.max_num_seqs}" for n in args.n if n > args.max_num_seqs]
    problems += [f"{name} MEDIAN {m} must be between 1 and MAX {x}" for name, (m, x) in
                 (("--prompt-len", args.prompt_len), ("--output-len", args.output_len)) if not 1 <= m <= x]
    if args.rate != "auto":
        try:
            rate = float(args.rate)
            assert rate > 0
            args.rates = args.rates or {str(n): rate for n in args.n}
        except (ValueError, AssertionError):
            problems.append(f"--rate {args.rate!r} must be a positive number of requests/s or auto")
    if problems:
        p.error(problems[0])
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_ours(args) if args.child == "ours" else run_hf(args)))
        return

    results, rates = {}, dict(args.rates or {})
    # ours first: the all-at-once runs of its continuous engine set the auto rates
    for impl in [i for i in IMPL_NAMES if i in args.impl]:
        argv = sys.argv[1:] + (["--rates", json.dumps(rates)] if rates and "--rates" not in sys.argv else [])
        results[impl] = run_child_live(impl, argv)
        rates = rates or results[impl].get("rates", {})
    common = {"bench": "serving", "preset": args.preset, "dtype": args.dtype, "max_num_seqs": args.max_num_seqs}
    for impl, res in results.items():
        for key, row in res["rows"].items():
            policy, workload, arrival, n = key.split("/")
            emit({**common, "impl": IMPL_NAMES[impl], "policy": policy, "workload": workload, "arrival": arrival,
                  "n": int(n[1:]), "device": res["device"], **row})

    def figure(impl: str, policy: str, w: tuple, name: str) -> float | None:
        return results.get(impl, {}).get("rows", {}).get(f"{policy}/{row_key(*w)}", {}).get(name)

    summary = {"continuous_over_static": {}, "continuous_over_hf": {}, "groups_prefill_equals_prompt": {}}
    for w in workloads(args):
        name = "decode_step_s" if w[0] == "full_occupancy" else "generated_tokens_per_s"
        label = row_key(*w)
        r = ratio(figure("ours", "http", w, name), figure("ours", "continuous", w, name))
        if r is not None:
            emit({**common, "ratio": "http/continuous", "workload": w[0], "arrival": w[1], "n": w[2], name: r})
        for other, impl, policy in (("static", "ours", "static"), ("hf", "hf", "static")):
            r = ratio(figure("ours", "continuous", w, name), figure(impl, policy, w, name))
            if r is not None:
                summary[f"continuous_over_{other}"][f"{label}/{name}"] = r
                emit({**common, "ratio": f"continuous/{other}", "workload": w[0], "arrival": w[1], "n": w[2],
                      name: r})
        computed, prompt = (figure("ours", "continuous", w, k) for k in ("prefill_tokens_computed", "prompt_tokens"))
        if w[2] > 1 and prompt is not None:
            summary["groups_prefill_equals_prompt"][label] = computed == prompt
    skewed = [v for k, v in summary["continuous_over_static"].items() if k.startswith("skewed/")]
    emit({**common, "summary": True, "rates_per_s": rates, **summary,
          "target_continuous_over_static": TARGET_CONTINUOUS_OVER_STATIC,
          "meets_target": min(skewed) >= TARGET_CONTINUOUS_OVER_STATIC if skewed else None})
    print(f"serving benchmark done: {args.preset}, n {args.n}, arrivals {args.arrival}", file=sys.stderr)


if __name__ == "__main__":
    main()
