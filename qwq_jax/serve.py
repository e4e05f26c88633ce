"""python -m qwq_jax.serve: an OpenAI-compatible HTTP server on the continuous-batching engine.

    python -m qwq_jax.serve --demo                                  # http://127.0.0.1:8000/v1
    python -m qwq_jax.serve --checkpoint OUT --mesh tensor=8 --api-key KEY --max-num-seqs 32

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics (Prometheus text). Requests and responses follow vLLM's OpenAI server: the reasoning
of a thinking model comes apart from the answer (`reasoning_content`), Qwen2.5 tool calls are
parsed into `tool_calls`, `stream: true` sends server-sent events ending in `data: [DONE]`.
Errors are OpenAI error objects (400 naming the parameter, 401, 404, 503 with Retry-After).

The engine (qwq_jax.generate) runs in a thread of its own beside the HTTP event loop: requests
are queued to it, its steps never wait on HTTP, and each step's tokens go back to the streams.
A client that disconnects aborts its request (its pages go back to the pool). SIGTERM or Ctrl-C
stops admitting, lets running requests finish for --shutdown-timeout seconds, aborts the rest
(their streams end cleanly with finish_reason "abort"), and exits 0.

Multi-host: the same command on every host (--coordinator/--num-processes/--process-id or
QWQ_* env, or --distributed). Process 0 serves HTTP; before each engine step it broadcasts the
requests admitted and aborted since the last one, so every process runs the same programs on
its devices; the other processes serve nothing and exit when process 0 does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from qwq_jax import compile_cache
from qwq_jax.openai_api import (ApiError, ChoiceStream, Context, OutputFields, Parsed, new_id, now,
                                parse_chat, parse_completion, reasoning_tokens, token_logprobs)

HEARTBEAT_S = 1.0     # multi-host: process 0 broadcasts at least this often while idle
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# ------------------------------------------------------------------------------------ metrics
class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """What GET /metrics reports (Prometheus text format, `qwq_` prefix)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.finished: collections.Counter = collections.Counter()
        self.prompt_tokens = self.generation_tokens = 0
        self.engine: dict = {}

    def text(self, waiting_extra: int) -> str:
        with self.lock:
            e = self.engine
            rows = [
                ("gauge", "qwq_requests_running", "sequences decoding in the engine's slots", e.get("running", 0)),
                ("gauge", "qwq_requests_waiting", "requests waiting for a slot or for pages",
                 e.get("waiting", 0) + waiting_extra),
                ("gauge", "qwq_kv_pages_used", "KV cache pages held by sequences", e.get("pages_used", 0)),
                ("gauge", "qwq_kv_pages_cached", "free pages still holding a cached prefix", e.get("pages_cached", 0)),
                ("gauge", "qwq_kv_pages_total", "KV cache pages in the pool", e.get("pages_total", 0)),
                ("counter", "qwq_prompt_tokens_total", "prompt tokens of admitted requests", self.prompt_tokens),
                ("counter", "qwq_generation_tokens_total", "tokens generated", self.generation_tokens),
                ("counter", "qwq_prefix_cache_hit_tokens_total", "prompt tokens served from cached pages",
                 e.get("prefix_cache_hit_tokens", 0)),
                ("counter", "qwq_preemptions_total", "sequences preempted (recomputed later) for lack of pages",
                 e.get("preemptions", 0)),
            ]
            out = []
            for kind, name, help_, value in rows:
                out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
            out += ["# HELP qwq_requests_finished_total requests finished, by finish reason",
                    "# TYPE qwq_requests_finished_total counter"]
            out += [f'qwq_requests_finished_total{{finish_reason="{k}"}} {v}' for k, v in sorted(self.finished.items())]
            for name, help_, h in (("qwq_time_to_first_token_seconds", "time from arrival to the first token", self.ttft),
                                   ("qwq_inter_token_latency_seconds", "time between a sequence's tokens", self.itl)):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram", *h.lines(name)]
            return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------- engine loop
class _Job:
    """One HTTP request's requests in the engine (a completions prompt list gives several)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rids: list[str], n: int):
        self.loop, self.rids, self.n = loop, rids, n
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrived = time.perf_counter()
        self.started = False
        self.last: dict[tuple[str, int], float] = {}
        self.open = {(rid, k) for rid in rids for k in range(n)}
        self.seen: set[str] = set()  # requests that have left the waiting queue


class Runner:
    """The engine's thread: takes requests and aborts from the HTTP side, steps the engine,
    hands each step's events to the requests' queues. On a multi-host run process 0's Runner
    broadcasts what it takes before each step, and the others' `follow()` does the same."""

    def __init__(self, engine: Any, metrics: Metrics, *, max_waiting: int, multihost: bool = False):
        self.engine, self.metrics, self.max_waiting, self.multihost = engine, metrics, max_waiting, multihost
        self.cond = threading.Condition()
        self.inbox: list[tuple] = []
        self.jobs: dict[str, _Job] = {}
        self.pending = 0             # requests taken but not yet given a first token
        self.draining = False        # no new requests (shutting down)
        self.stopping = False
        self.dead: str | None = None  # why the engine thread died
        self.thread = threading.Thread(target=self._run, name="qwq-engine", daemon=True)

    # ---- HTTP side (event loop thread) --------------------------------------------------
    def submit(self, parsed: Parsed) -> _Job:
        if self.dead:
            raise ApiError(500, f"the engine stopped: {self.dead}", code="engine_dead")
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        if len(parsed.prompts) > self.max_waiting:  # could never be taken: no point in retrying
            raise ApiError(400, f"{len(parsed.prompts)} prompts in one request, more than the server's waiting queue "
                                f"holds ({self.max_waiting}, --max-waiting); send at most that many at a time",
                           "prompt")
        with self.cond:
            if self.pending + len(parsed.prompts) > self.max_waiting:
                raise ApiError(503, f"the waiting queue is full ({self.max_waiting} requests); retry later",
                               code="queue_full", headers={"Retry-After": "1"})
            rids = [new_id("req") for _ in parsed.prompts]
            job = _Job(asyncio.get_running_loop(), rids, parsed.params.n)
            for rid, ids in zip(rids, parsed.prompts):
                self.jobs[rid] = job
                self.inbox.append(("add", rid, ids, dataclasses.asdict(parsed.params)))
            self.pending += len(rids)
            self.cond.notify()
        return job

    def abort(self, job: _Job) -> None:
        with self.cond:
            for rid in job.rids:
                if rid in self.jobs:
                    self.inbox.append(("abort", rid))
            self.cond.notify()

    def abort_all(self) -> None:
        with self.cond:
            self.inbox += [("abort", rid) for rid in self.jobs]
            self.cond.notify()

    def waiting_extra(self) -> int:
        """Requests taken that the engine has not seen yet."""
        with self.cond:
            return sum(1 for c in self.inbox if c[0] == "add")

    # ---- engine thread ------------------------------------------------------------------
    def start(self) -> None:
        self._snapshot()
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    def _take(self) -> tuple[list[tuple], bool]:
        with self.cond:
            if not self.inbox and not self.stopping and not self.engine.has_unfinished():
                self.cond.wait(HEARTBEAT_S if self.multihost else None)
            cmds, self.inbox = self.inbox, []
            return cmds, self.stopping

    def _run(self) -> None:
        try:
            while True:
                cmds, stopping = self._take()
                if self.multihost:
                    cmds, stopping = broadcast_commands(cmds, stopping)
                if stopping:
                    break
                self._apply(cmds)
                if self.engine.has_unfinished():
                    # first tokens of requests admitted beside running ones go out while the chunk decodes
                    self._deliver(self.engine.step(on_events=self._deliver))
                    self._snapshot()
        except Exception as e:  # noqa: BLE001 - report to every client, keep the server answering
            traceback.print_exc()
            self.dead = f"{type(e).__name__}: {e}"
            for rid, job in list(self.jobs.items()):
                job.loop.call_soon_threadsafe(job.queue.put_nowait, ApiError(500, f"the engine failed: {self.dead}"))
            self.jobs.clear()

    def follow(self) -> None:
        """A multi-host process other than 0: run what process 0 broadcasts until it stops."""
        while True:
            cmds, stopping = broadcast_commands(None, False)
            if stopping:
                return
            self._apply(cmds)
            if self.engine.has_unfinished():
                self.engine.step()

    def _apply(self, cmds: list) -> None:
        from qwq_jax.sampling import SamplingParams

        for cmd in cmds:
            if cmd[0] == "add":
                _, rid, ids, params = cmd
                params = SamplingParams(**params)
                try:
                    self.engine.add_request(ids, params, request_id=rid)
                except ValueError as e:  # checked before it was queued; only a race gets here
                    self._fail(rid, ApiError(400, str(e)))
                    continue
                with self.metrics.lock:
                    self.metrics.prompt_tokens += len(ids)
            elif cmd[0] == "abort":
                self.engine.abort(cmd[1])

    def _fail(self, rid: str, error: ApiError) -> None:
        job = self.jobs.pop(rid, None)
        if job is not None:
            with self.cond:
                self.pending -= 1
            job.loop.call_soon_threadsafe(job.queue.put_nowait, error)

    def _deliver(self, events: list) -> None:
        t = time.perf_counter()
        m = self.metrics
        for ev in events:
            job = self.jobs.get(ev.request_id)
            if job is None:  # process > 0, or a request already given up
                continue
            key = (ev.request_id, ev.sample_index)
            with m.lock:
                m.generation_tokens += len(ev.token_ids)
                if ev.token_ids:
                    if key not in job.last:
                        if not job.started:
                            m.ttft.observe(t - job.arrived)
                    else:
                        m.itl.observe((t - job.last[key]) / len(ev.token_ids), len(ev.token_ids))
                    job.last[key] = t
                if ev.finished:
                    m.finished[ev.finish_reason] += 1
            if ev.token_ids or ev.finished:
                job.started = True
                if ev.request_id not in job.seen:
                    job.seen.add(ev.request_id)
                    with self.cond:
                        self.pending -= 1
            if ev.finished:
                job.open.discard(key)
                if not any(k[0] == ev.request_id for k in job.open):
                    self.jobs.pop(ev.request_id, None)
            job.loop.call_soon_threadsafe(job.queue.put_nowait, ev)

    def _snapshot(self) -> None:
        stats = self.engine.stats()
        with self.metrics.lock:
            self.metrics.engine = stats


def broadcast_commands(cmds: list | None, stopping: bool) -> tuple[list, bool]:
    """Process 0's commands and stop flag, on every process (the others pass None)."""
    import numpy as np
    from jax.experimental import multihost_utils

    payload = json.dumps(cmds).encode() if cmds else b""
    header = multihost_utils.broadcast_one_to_all(np.array([len(payload), int(stopping)], np.int32))
    size, stop = int(header[0]), bool(header[1])
    if size == 0:
        return [], stop
    width = 1 << max(10, (size - 1).bit_length())  # a few buckets: few programs
    buf = np.zeros(width, np.uint8)
    if cmds:
        buf[:size] = np.frombuffer(payload, np.uint8)
    data = multihost_utils.broadcast_one_to_all(buf)
    return json.loads(bytes(np.asarray(data[:size], np.uint8)).decode()), stop


# --------------------------------------------------------------------------------- responses
class Server:
    """The HTTP side: parses requests, submits them to the Runner, writes the responses."""

    def __init__(self, runner: Runner, ctx: Context, api_key: str | None = None):
        self.runner, self.ctx, self.api_key = runner, ctx, api_key
        self.eos = tuple(runner.engine.eos_token_ids)
        self.created = now()

    def check_auth(self, headers: Any) -> None:
        if self.api_key is None:
            return
        auth = headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    def check_model(self, body: Any) -> None:
        if isinstance(body, dict) and body.get("model") not in (None, self.ctx.model_name):
            raise ApiError(404, f"The model `{body.get('model')}` does not exist. This server serves "
                                f"`{self.ctx.model_name}`.", "model", "model_not_found")

    def stop_reason(self, completion: Any) -> Any:
        """The stop string or stop token id that ended a choice; None for EOS (as vLLM)."""
        r = completion.stop_reason
        return None if isinstance(r, int) and r in self.eos else r

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.ctx.model_name, "object": "model", "created": self.created,
                                            "owned_by": "qwq-jax", "max_model_len": self.ctx.max_model_len}]}

    async def collect(self, parsed: Parsed, job: _Job) -> dict:
        """A non-streamed response once every choice has finished."""
        n = parsed.params.n
        completions: dict[tuple[int, int], Any] = {}
        while len(completions) < len(job.rids) * n:
            ev = await job.queue.get()
            if isinstance(ev, ApiError):
                raise ev
            if ev.finished:
                completions[(job.rids.index(ev.request_id), ev.sample_index)] = ev.completion
        choices, completion_tokens, reasoning = [], 0, 0
        for (p, k), c in sorted(completions.items()):
            fields = OutputFields(parsed.in_think, parsed.tools, parsed.chat)
            text = c.text or ""
            r, content, calls = fields.final(text)
            finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            completion_tokens += len(c.token_ids)
            reasoning += reasoning_tokens(self.ctx.tokenizer, c.token_ids, parsed.in_think, self.eos) if parsed.chat else 0
            logprobs = None
            if parsed.logprobs is not None:
                keep = [k for k, t in enumerate(c.token_ids) if t not in self.eos]
                logprobs = token_logprobs(self.ctx.tokenizer, [c.token_ids[k] for k in keep],
                                          [c.logprobs[k] for k in keep], parsed.chat,
                                          [c.top_logprobs[k] for k in keep] if c.top_logprobs else None,
                                          start=len(parsed.prompt_texts[p]) if parsed.echo else 0)
            index = p * n + k
            if parsed.chat:
                message = {"role": "assistant", "content": content, "reasoning_content": r,
                           "tool_calls": calls}
                choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish,
                                "stop_reason": self.stop_reason(c)})
            else:
                choices.append({"index": index, "text": (parsed.prompt_texts[p] if parsed.echo else "") + text,
                                "logprobs": logprobs, "finish_reason": finish, "stop_reason": self.stop_reason(c)})
        usage = self._usage(parsed, completion_tokens, reasoning)
        kind = "chat.completion" if parsed.chat else "text_completion"
        return {"id": new_id("chatcmpl" if parsed.chat else "cmpl"), "object": kind, "created": now(),
                "model": self.ctx.model_name, "choices": choices, "usage": usage}

    def _usage(self, parsed: Parsed, completion_tokens: int, reasoning: int) -> dict:
        prompt_tokens = sum(len(p) for p in parsed.prompts)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if parsed.chat:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return usage

    async def stream(self, parsed: Parsed, job: _Job):
        """Server-sent events: role, then deltas per choice, a finishing chunk per choice,
        the usage chunk (stream_options.include_usage), `[DONE]`."""
        n = parsed.params.n
        rid_index = {rid: p for p, rid in enumerate(job.rids)}
        cid, created = new_id("chatcmpl" if parsed.chat else "cmpl"), now()
        kind = "chat.completion.chunk" if parsed.chat else "text_completion"
        streams: dict[int, ChoiceStream] = {}
        # completions' text_offset: where each choice's next token starts in its text (after the echo)
        offsets = {p * n + k: len(parsed.prompt_texts[p]) if parsed.echo else 0
                   for p in range(len(job.rids)) for k in range(n)}
        completion_tokens = reasoning = 0

        def chunk(choices: list, usage: Any = None) -> str:
            body = {"id": cid, "object": kind, "created": created, "model": self.ctx.model_name, "choices": choices}
            if parsed.include_usage:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def piece(index: int, reasoning_delta: str, content: str, extra: dict | None = None, logprobs=None,
                  finish=None, stop_reason=None) -> dict:
            if parsed.chat:
                delta = {}
                if reasoning_delta:
                    delta["reasoning_content"] = reasoning_delta
                if content:
                    delta["content"] = content
                delta.update(extra or {})
                out = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            else:
                out = {"index": index, "text": content, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                out["stop_reason"] = stop_reason
            return out

        try:
            if parsed.chat:
                yield chunk([piece(i, "", "", {"role": "assistant", "content": ""}) for i in range(len(job.rids) * n)])
            elif parsed.echo:
                yield chunk([piece(p * n + k, "", parsed.prompt_texts[p]) for p in range(len(job.rids))
                             for k in range(n)])
            finished = 0
            while finished < len(job.rids) * n:
                ev = await job.queue.get()
                if isinstance(ev, ApiError):
                    yield f"data: {json.dumps(ev.body())}\n\n"
                    break
                index = rid_index[ev.request_id] * n + ev.sample_index
                s = streams.get(index)
                if s is None:
                    s = streams[index] = ChoiceStream(self.ctx.tokenizer, OutputFields(parsed.in_think, parsed.tools,
                                                                                        parsed.chat),
                                                      parsed.params.stop, self.eos)
                r, c = s.push(ev.token_ids)
                logprobs = None
                if parsed.logprobs is not None and ev.token_ids:
                    keep = [k for k, t in enumerate(ev.token_ids) if t not in self.eos]
                    logprobs = token_logprobs(self.ctx.tokenizer, [ev.token_ids[k] for k in keep],
                                              [ev.logprobs[k] for k in keep], parsed.chat,
                                              [ev.top_logprobs[k] for k in keep] if ev.top_logprobs else None,
                                              start=offsets.get(index, 0))
                    if not parsed.chat and logprobs["tokens"]:  # the next chunk's tokens follow these
                        offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                if r or c or logprobs:
                    yield chunk([piece(index, r, c, logprobs=logprobs)])
                if ev.finished:
                    finished += 1
                    comp = ev.completion
                    r, c, calls = s.finish(comp.text or "")
                    extra = {}
                    if calls:
                        extra["tool_calls"] = [dict(call, index=i) for i, call in enumerate(calls)]
                    finish = "tool_calls" if calls and comp.finish_reason == "stop" else comp.finish_reason
                    completion_tokens += len(comp.token_ids)
                    if parsed.chat:
                        reasoning += reasoning_tokens(self.ctx.tokenizer, comp.token_ids, parsed.in_think, self.eos)
                    yield chunk([piece(index, r, c, extra, finish=finish, stop_reason=self.stop_reason(comp))])
            else:
                if parsed.include_usage:
                    yield chunk([], self._usage(parsed, completion_tokens, reasoning))
            yield "data: [DONE]\n\n"
        finally:  # a client that went away: its requests stop and free their pages
            if any(rid in self.runner.jobs for rid in job.rids):
                self.runner.abort(job)


def build_app(server: Server):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def body_of(request: Request) -> Any:
        server.check_auth(request.headers)
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        server.check_model(body)
        return body

    async def watch_disconnect(request: Request, job: _Job) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                server.runner.abort(job)
                return

    def endpoint(parse):
        async def handle(request: Request):
            try:
                parsed = parse(await body_of(request), server.ctx)
                job = server.runner.submit(parsed)
            except ApiError as e:
                return error(e)
            except Exception as e:  # noqa: BLE001 - an error object, never a traceback
                traceback.print_exc()
                return error(ApiError(500, f"internal error: {type(e).__name__}: {e}"))
            if parsed.stream:
                return StreamingResponse(server.stream(parsed, job), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            watcher = asyncio.ensure_future(watch_disconnect(request, job))
            try:
                return JSONResponse(await server.collect(parsed, job))
            except ApiError as e:
                return error(e)
            finally:
                watcher.cancel()
        return handle

    async def models(request: Request):
        try:
            server.check_auth(request.headers)
        except ApiError as e:
            return error(e)
        return JSONResponse(server.models())

    async def health(request: Request):
        if server.runner.dead:
            return JSONResponse({"status": "engine dead", "error": server.runner.dead}, status_code=500)
        if server.runner.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request):
        return PlainTextResponse(server.runner.metrics.text(server.runner.waiting_extra()),
                                 media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, exc: Exception):
        status = getattr(exc, "status_code", 404)
        message = "not found" if status == 404 else ("method not allowed" if status == 405 else str(exc))
        return error(ApiError(status, f"{request.method} {request.url.path}: {message}"))

    routes = [Route("/v1/chat/completions", endpoint(parse_chat), methods=["POST"]),
              Route("/v1/completions", endpoint(parse_completion), methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


# ------------------------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    from qwq_jax.attention import BACKENDS
    from qwq_jax.cli import OneLineParser
    from qwq_jax.generate import LAYER_LOOPS
    from qwq_jax.model import QUANT_MODES
    from sharding import add_distributed_args

    p = OneLineParser(prog="python -m qwq_jax.serve", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory written by `python -m convert`")
    src.add_argument("--demo", action="store_true", help="the offline demo model (see python -m qwq_jax.sample)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the checkpoint directory's name)")
    p.add_argument("--api-key", default=os.environ.get("QWQ_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (env QWQ_JAX_API_KEY)")
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests queued for a slot at most; more get 503 with Retry-After")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests get to finish before they are aborted")
    e = p.add_argument_group("engine")
    e.add_argument("--max-num-seqs", type=int, default=8, help="sequences decoded at once (engine slots)")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens at most (default: the model's context)")
    e.add_argument("--kv-cache-memory", type=float, default=None,
                   help="GiB for the KV page pool (default: 90%% of free accelerator memory, 0.25 on CPU)")
    e.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                   help="KV pages in the model's dtype, or int8 with a scale per token and KV head")
    e.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill call")
    e.add_argument("--layer-loop", choices=LAYER_LOOPS, default="split", help="see python -m qwq_jax.sample")
    e.add_argument("--mesh", default=None, help="device mesh, e.g. 'tensor=4' (default: one device)")
    e.add_argument("--rope-scaling", choices=("auto", "static", "off"), default="auto",
                   help="YaRN: auto = only for requests longer than the original context")
    e.add_argument("--attention", choices=tuple(BACKENDS), default="auto")
    e.add_argument("--quantize", choices=QUANT_MODES, default=None, help="weight-only quantization after loading")
    e.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="parameter dtype")
    e.add_argument("--seed", type=int, default=None, help="seeds of requests that bring none")
    e.add_argument("--max-logprobs", type=int, default=20,
                   help="top_logprobs (chat) / logprobs (completions) a request may ask for at most")
    e.add_argument("--cache-dir", default=None, help="where --demo keeps its converted checkpoint")
    add_distributed_args(p)
    compile_cache.add_args(p)
    return p


def _context(ckpt: Path, tokenizer: Any, engine: Any, name: str) -> Context:
    from qwq_jax.sample import checkpoint_sampling

    defaults, sources, _ = checkpoint_sampling(ckpt)
    own_max = sources["max_tokens"]["source"] != "default"
    cap = engine.sequence_capacity  # one sequence alone, with a page to spare for n > 1
    return Context(name, tokenizer, defaults, engine.max_model_len, cap,
                   default_max_tokens=defaults.max_tokens if own_max else None, vocab_size=engine.config.vocab_size,
                   max_logprobs=engine.max_logprobs)


def start_in_thread(engine: Any, tokenizer: Any, *, name: str = "model", host: str = "127.0.0.1", port: int = 0,
                    max_waiting: int = 1 << 20, defaults: Any = None) -> tuple[str, Any]:
    """The server on `engine`, in this process (benchmarks, notebooks): returns (base URL ending in
    /v1, stop). `tokenizer` turns tokens into text (a ByteTokenizer will do for random weights)."""
    import socket

    import uvicorn

    from qwq_jax.sampling import SamplingParams

    if port == 0:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
    runner = Runner(engine, Metrics(), max_waiting=max_waiting)
    ctx = Context(name, tokenizer, defaults or SamplingParams(), engine.max_model_len,
                  engine.sequence_capacity, vocab_size=engine.config.vocab_size,
                  max_logprobs=engine.max_logprobs)
    server = uvicorn.Server(uvicorn.Config(build_app(Server(runner, ctx)), host=host, port=port, log_level="warning",
                                           lifespan="off"))
    runner.start()
    thread = threading.Thread(target=server.run, name="qwq-http", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            runner.stop()
            raise RuntimeError(f"the server could not start on {host}:{port}")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
        runner.stop()

    return f"http://{host}:{port}/v1", stop


class _Uvicorn:
    """uvicorn's server with our signal handling: SIGTERM/SIGINT drain, then exit 0 (uvicorn's own
    handler re-raises the signal after shutting down, which would end the process by it)."""

    def __init__(self, app: Any, host: str, port: int, runner: Runner, grace: float):
        import uvicorn

        class Quiet(uvicorn.Server):
            @staticmethod
            def capture_signals():
                import contextlib
                return contextlib.nullcontext()

        config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                                # after `grace` our timer aborts what still runs; its streams then end on their own
                                # (a final chunk and [DONE]): a busy host needs seconds for that, so uvicorn
                                # closes connections itself only well after (a CI run saw it cut one at grace + 5)
                                timeout_graceful_shutdown=grace + 60, lifespan="off")
        self.server, self.runner, self.grace = Quiet(config), runner, grace

    def _on_signal(self, *_: Any) -> None:
        if self.runner.draining:  # a second signal: stop now
            self.runner.abort_all()
            self.server.force_exit = True
            return
        print(f"shutting down: no new requests; running ones get {self.grace:g} s", file=sys.stderr, flush=True)
        self.runner.draining = True
        self.server.should_exit = True
        timer = threading.Timer(self.grace, self.runner.abort_all)
        timer.daemon = True
        timer.start()

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.server.run()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_num_seqs", "max_waiting", "prefill_chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_logprobs < 0:
        parser.error("--max-logprobs must be at least 0")
    if args.max_model_len is not None and args.max_model_len < 2:
        parser.error("--max-model-len must be at least 2")
    from sharding import init_distributed

    try:
        multihost = init_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    except ValueError as e:
        parser.error(str(e))
    try:
        xla_dir = compile_cache.enable(args.xla_cache)
    except ValueError as e:
        print(f"python -m qwq_jax.serve: error: {e}", file=sys.stderr)
        return 2
    del xla_dir
    import jax

    from qwq_jax import checkpoint
    from qwq_jax.cli import phase
    from qwq_jax.sample import _Status, demo_checkpoint, load_engine, mesh_from_args
    from qwq_jax.sampling import SamplingParams

    mesh = mesh_from_args(parser, args)
    primary = jax.process_index() == 0
    status = _Status(enabled=primary)
    try:
        ckpt = demo_checkpoint(args.cache_dir, args.xla_cache) if args.demo else Path(args.checkpoint)
        checkpoint.require_checkpoint(ckpt)
        checkpoint.require_weights(ckpt)
        tokenizer = checkpoint.load_tokenizer(ckpt)
        kv_bytes = int(args.kv_cache_memory * 2**30) if args.kv_cache_memory is not None else None
        # One engine per replica of the weights on a mesh with data x fsdp > 1 (qwq_jax/replicas.py); its
        # programs for a short prompt (one prefill bucket, insert, decode) compile while the weights load.
        engine, _ = load_engine(ckpt, args, mesh, status, 1, SamplingParams(temperature=0, max_tokens=2),
                             tokenizer=tokenizer, rope_scaling=args.rope_scaling, prefill_chunk=args.prefill_chunk,
                             layer_loop=args.layer_loop, donate_weights=True, max_num_seqs=args.max_num_seqs,
                             max_model_len=args.max_model_len, kv_cache_bytes=kv_bytes,
                             kv_cache_dtype=None if args.kv_cache_dtype == "auto" else "int8", seed=args.seed,
                             max_logprobs=args.max_logprobs)
    except ValueError as e:
        print(f"python -m qwq_jax.serve: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        print(f"python -m qwq_jax.serve: error: {e}", file=sys.stderr)
        return 1
    name = args.served_model_name or ("qwen2.5-coder-0.5b-instruct" if args.demo else ckpt.resolve().name)
    with phase("warming up the engine", primary):  # runs the programs once (nothing left to compile)
        engine.generate([[0]], SamplingParams(temperature=0, max_tokens=2))
    metrics = Metrics()
    runner = Runner(engine, metrics, max_waiting=args.max_waiting, multihost=multihost)
    if not primary:
        runner.follow()
        return 0
    server = Server(runner, _context(ckpt, tokenizer, engine, name), api_key=args.api_key)
    runner.start()
    print(f"serving {name} on http://{args.host}:{args.port}/v1 ({engine.max_num_seqs} slots, "
          f"{engine.num_pages} KV pages of {engine.page_size} tokens, context {engine.max_model_len}); "
          "Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        _Uvicorn(build_app(server), args.host, args.port, runner, args.shutdown_timeout).run()
    finally:
        runner.stop()
    print(f"stopped: {metrics.generation_tokens} tokens generated, "
          f"{sum(metrics.finished.values())} sequences finished", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    from qwq_jax.cli import run_main

    run_main(main)
