"""The engine's scheduler: which requests wait, which prompt chunks are prefilled this step, which
sequences decode in which of the engine's fixed slots, and whom to preempt when pages run out.

Plain host Python over `qwq_jax.pages.PageAllocator`; the engine (`qwq_jax.generate`) runs the
device work it asks for and reports back. One engine step:

    for chunk in sched.prefill_work():        # prompt chunks within the step's token budget
        ...run it...; if chunk.last: sched.prefilled(chunk.job, logits)
    for adm in sched.admit():                 # prefilled sequences into free slots
        ...copy adm.copy page, load the slot...
    for seq in sched.grow(steps):             # pages for the next decode chunk (may preempt)
        ...the slot is empty now...
    ...decode sched.running...; sched.advance(seq, tokens, logprobs); sched.finish(seq, reason)

Requests and samples. A request (`add`) has `n` samples, one `Sequence` each. Its prompt is
prefilled once, by a `PrefillJob`, into pages the request holds; each sample then holds the full
pages too, and gets its own copy of the last, partial page (the last sample admitted takes the
request's own: nothing is copied for n = 1). Whole prompt pages go into the prefix cache, so a later
prompt with the same prefix starts its job after them.

Policies. "continuous": every step admits what fits, prefills within `max_prefill_tokens`
(finishing a chunk started; at least one chunk a step), and decodes everything running.
"static": the batch-at-a-time baseline: nothing is admitted while anything runs; then a whole batch
is admitted and prefilled in one step.

Chunks. A job's chunk boundaries are multiples of `prefill_chunk` from the sequence's start
(`bucket` rounds a chunk's length up to its compiled shape), whatever else runs: the budget only
decides how many chunks a step takes, so a request computes the same numbers in any company.

Preemption: recompute. When the pages for the next decode chunk run out (after evicting unheld
cached pages), the most recently started work gives its pages back: a prefill job in progress,
then a request's held prompt (its waiting samples will prefill it again), then the most recently
admitted running sequence, which goes back to the front of the queue and later re-prefills its
prompt plus what it has generated (mostly from the prefix cache), then continues with the same
tokens it would have produced. `add` refuses what could never fit, so this always ends.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from typing import Any, Callable, Iterator

from qwq_jax.pages import PageAllocator

POLICIES = ("continuous", "static")


class State(enum.Enum):
    WAITING = "waiting"    # queued; needs its request's prompt or (preempted) its own tokens prefilled
    PREFILL = "prefill"    # its job is running (a slot is reserved for it)
    READY = "ready"        # its request's prompt is prefilled; needs a slot
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: Any                       # SamplingParams
    samples: list["Sequence"] = dataclasses.field(default_factory=list)
    pages: list[int] | None = None    # the prefilled prompt's pages, held while samples wait for slots
    logits: Any = None                # the prompt's last logits (a device array), with `pages`
    job: "PrefillJob | None" = None
    tag: Any = None                   # the caller's (the engine's stream() index)
    salt: int = 0                     # what its keys/values depend on besides tokens (prefix cache key)

    @property
    def pending(self) -> list["Sequence"]:
        """Samples still to be admitted from this request's prompt (not preempted ones)."""
        return [s for s in self.samples if s.state in (State.WAITING, State.PREFILL, State.READY) and not s.recompute]


@dataclasses.dataclass(eq=False)
class Sequence:
    request: Request
    index: int                        # sample index within the request
    seed: int
    tokens: list[int] = dataclasses.field(default_factory=list)     # generated
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # when asked for
    state: State = State.WAITING
    pages: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    length: int = 0                   # tokens with keys/values in `pages`
    recompute: bool = False           # preempted: its own prompt + tokens must be prefilled again
    admitted: int = -1                # admission order (preemption takes the latest)
    emitted: int = 0                  # tokens already reported to the caller
    finish_reason: str | None = None
    stop_reason: Any = None
    logits: Any = None                # a recomputed sequence's logits, until admitted

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def max_length(self) -> int:
        """Keys/values this sequence can ever hold: its last token is never fed back."""
        return len(self.prompt) + self.request.params.max_tokens - 1


@dataclasses.dataclass(eq=False)
class PrefillJob:
    request: Request
    seq: Sequence | None              # a preempted sequence's recompute; None: the request's prompt
    tokens: list[int]
    pages: list[int]
    slot: int                         # reserved for the sequence that runs first on it
    done: int                         # tokens already in `pages` (the prefix cache's, then computed)
    order: int


@dataclasses.dataclass
class PrefillChunk:
    job: PrefillJob
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == len(self.job.tokens)


@dataclasses.dataclass
class Admission:
    seq: Sequence
    slot: int
    logits: Any                       # the logits its first token is drawn from
    copy: tuple[int, int] | None      # (source page, destination page) to copy before it runs


class Scheduler:
    def __init__(self, pages: PageAllocator, max_num_seqs: int, prefill_chunk: int, max_prefill_tokens: int,
                 policy: str = "continuous"):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} must be one of {', '.join(POLICIES)}")
        self.pages, self.policy = pages, policy
        self.max_num_seqs, self.prefill_chunk, self.max_prefill_tokens = max_num_seqs, prefill_chunk, max_prefill_tokens
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Sequence] = deque()
        self.jobs: list[PrefillJob] = []
        self.slots: list[Sequence | None] = [None] * max_num_seqs   # running (or reserved by a job)
        self.preemptions = 0
        self.prefill_tokens = 0       # tokens computed by prefill chunks
        self.prompt_tokens = 0        # prompt tokens of the requests added (once per request)
        self._order = 0
        self._batch_open = False      # static policy: admitting the current batch

    # ---- requests ----------------------------------------------------------------------------
    def add(self, request: Request, seeds: list[int]) -> None:
        request.samples = [Sequence(request, k, seed) for k, seed in enumerate(seeds)]
        self.requests[request.id] = request
        self.waiting.extend(request.samples)
        self.prompt_tokens += len(request.prompt)

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None and s.state is State.RUNNING]

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def _free_slot(self) -> int | None:
        return next((i for i, s in enumerate(self.slots) if s is None), None)

    def _tick(self) -> int:
        self._order += 1
        return self._order

    # ---- prefill -----------------------------------------------------------------------------
    def prefill_work(self) -> Iterator[PrefillChunk]:
        """The chunks to prefill this step, in order. Jobs are started (pages allocated, a slot
        reserved) as the queue and the pool allow; a job is done when its last chunk is yielded
        and the caller has called `prefilled`."""
        static = self.policy == "static"
        if static and not self.running and not self.jobs:
            self._batch_open = True
        budget = None if static else self.max_prefill_tokens
        if not static or self._batch_open:
            self._start_jobs()
        for job in list(self.jobs):
            while job.done < len(job.tokens):
                end = min((job.done // self.prefill_chunk + 1) * self.prefill_chunk, len(job.tokens))
                if budget is not None and end - job.done > budget and budget < self.max_prefill_tokens:
                    return  # the budget is spent (the first chunk of a step always runs)
                chunk = PrefillChunk(job, job.done, end)
                yield chunk
                self.prefill_tokens += end - job.done
                job.done = end
                if budget is not None:
                    budget -= chunk.end - chunk.start

    def _start_jobs(self) -> None:
        """Start prefill jobs for queued sequences in order while slots and pages allow."""
        for seq in list(self.waiting):
            req = seq.request
            if seq.state is not State.WAITING or (not seq.recompute and req.job is not None):
                continue  # ready (admit() takes it) or its request's prompt job is running
            if not seq.recompute and req.pages is not None:
                continue
            slot = self._free_slot()
            tokens = req.prompt + seq.tokens if seq.recompute else req.prompt
            if slot is None:
                return
            hit = self.pages.match(tokens, req.salt)
            need = self.pages.pages_for(len(tokens)) - len(hit)
            if need > self.pages.available:
                self.pages.unmatch(hit)
                return  # first come, first served: nobody overtakes a request that waits for pages
            job = PrefillJob(req, seq if seq.recompute else None, tokens, hit + self.pages.allocate(need), slot,
                             len(hit) * self.pages.page_size, self._tick())
            self.jobs.append(job)
            self.slots[slot] = seq
            seq.state = State.PREFILL
            if not seq.recompute:
                req.job = job

    def prefilled(self, job: PrefillJob, logits: Any) -> None:
        """`job`'s last chunk has run; `logits` are its last token's."""
        self.jobs.remove(job)
        self.pages.register(job.tokens, job.pages, job.request.salt)
        first = job.seq if job.seq is not None else next(s for s in job.request.samples if s.state is State.PREFILL)
        if job.seq is not None:  # a recomputed sequence: all its own
            first.pages, first.logits, first.length = job.pages, logits, len(job.tokens)
        else:
            req = job.request
            req.job, req.pages, req.logits = None, job.pages, logits
            for s in req.samples:
                if s.state is State.WAITING and not s.recompute:
                    s.state = State.READY
        first.state, first.slot = State.READY, job.slot  # the slot stays reserved for it

    # ---- admission ---------------------------------------------------------------------------
    def admit(self) -> list[Admission]:
        """Ready sequences into free slots, in queue order (the one a job reserved a slot for first)."""
        out = []
        reserved = [s for s in self.waiting if s.state is State.READY and s.slot is not None]
        open_now = self.policy == "continuous" or self._batch_open
        for seq in reserved + [s for s in self.waiting if s.state is State.READY and s.slot is None]:
            if seq.state is not State.READY:
                continue  # its request gave its prompt back meanwhile (_drop_held_prompt)
            slot = seq.slot if seq.slot is not None else (self._free_slot() if open_now else None)
            if slot is None:
                break
            seq.slot = slot
            self.slots[slot] = seq  # reserved until placed
            adm = self._place(seq, slot)
            if adm is None:
                break  # no page for its copy: it keeps the slot and tries again next step
            out.append(adm)
        if self.policy == "static" and not self.jobs:
            self._batch_open = False
        return out

    def _place(self, seq: Sequence, slot: int) -> Admission | None:
        req = seq.request
        copy = None
        if seq.recompute:
            logits, seq.logits, seq.recompute = seq.logits, None, False
        else:
            full, partial = divmod(len(req.prompt), self.pages.page_size)
            last_one = len(req.pending) == 1
            if last_one or not partial:
                if last_one:
                    seq.pages, req.pages = req.pages, None  # the request's holds pass to its last sample
                else:
                    seq.pages = list(req.pages)
                    self.pages.hold(seq.pages)
            else:
                while self.pages.available < 1:
                    if self._drop_held_prompt(keep=req) is None:
                        return None
                own = self.pages.allocate(1)
                seq.pages = req.pages[:full] + own
                self.pages.hold(req.pages[:full])
                copy = (req.pages[full], own[0])
            logits = req.logits
            if last_one:
                req.logits = None
            seq.length = len(req.prompt)
        self.waiting.remove(seq)
        seq.state, seq.slot, seq.admitted = State.RUNNING, slot, self._tick()
        self.slots[slot] = seq
        return Admission(seq, slot, logits, copy)

    # ---- decoding ----------------------------------------------------------------------------
    def grow(self, steps: int) -> list[Sequence]:
        """Give every running sequence pages for `steps` more tokens (no more than it can ever
        hold), preempting as the module docstring says when the pool runs out. Returns the
        running sequences preempted (their slots are empty now)."""
        preempted = []
        for seq in sorted(self.running, key=lambda s: s.admitted):
            if seq.state is not State.RUNNING:
                continue  # preempted for an earlier one
            need = self.pages.pages_for(min(seq.length + steps, seq.max_length)) - len(seq.pages)
            while need > self.pages.available:
                victim = self._victim()
                if victim is None:
                    raise RuntimeError("the page pool cannot hold one sequence (add() should have refused it)")
                if isinstance(victim, Sequence):
                    preempted.append(victim)
                if victim is seq:
                    break
            if seq.state is State.RUNNING and need > 0:
                seq.pages += self.pages.allocate(need)
        return preempted

    def _victim(self) -> Sequence | PrefillJob | Request | None:
        """Give back the pages of the most recently started work; returns what was preempted."""
        if self.jobs:
            job = max(self.jobs, key=lambda j: j.order)
            self.jobs.remove(job)
            self.pages.release(job.pages)
            seq = self.slots[job.slot]
            self.slots[job.slot] = None
            seq.state = State.WAITING
            if job.seq is None:
                job.request.job = None
            self.preemptions += 1
            return job
        req = self._drop_held_prompt()
        if req is not None:
            return req
        running = self.running
        if not running:
            return None
        seq = max(running, key=lambda s: s.admitted)
        self._vacate(seq)
        seq.state, seq.recompute = State.WAITING, True
        self.waiting.appendleft(seq)
        self.preemptions += 1
        return seq

    def _drop_held_prompt(self, keep: Request | None = None) -> Request | None:
        """The latest request holding a prefilled prompt for samples waiting for slots (other than
        `keep`) gives its pages back; its samples will prefill the prompt again."""
        holding = [r for r in self.requests.values() if r.pages is not None and r is not keep]
        if not holding:
            return None
        req = holding[-1]
        self.pages.release(req.pages)
        req.pages = req.logits = None
        for s in req.samples:
            if s.state is State.READY and not s.recompute:
                s.state = State.WAITING
                if s.slot is not None:
                    self.slots[s.slot] = None
                    s.slot = None
        self.preemptions += 1
        return req

    def _vacate(self, seq: Sequence) -> None:
        self.pages.release(seq.pages)
        seq.pages, seq.length = [], 0
        if seq.slot is not None and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        seq.slot = None

    def advance(self, seq: Sequence, tokens: list[int], logprobs: list[float], length: int) -> None:
        seq.tokens += tokens
        seq.logprobs += logprobs
        seq.length = length

    def finish(self, seq: Sequence, reason: str, stop_reason: Any = None) -> None:
        """`seq` is done: its pages and slot are free; its request ends with its last sample."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._vacate(seq)
        seq.state, seq.finish_reason, seq.stop_reason = State.FINISHED, reason, stop_reason
        req = seq.request
        if all(s.state is State.FINISHED for s in req.samples):
            if req.pages is not None:
                self.pages.release(req.pages)
                req.pages = req.logits = None
            del self.requests[req.id]

    def abort(self, request_id: str, on_finish: Callable[[Sequence], None] | None = None) -> bool:
        req = self.requests.get(request_id)
        if req is None:
            return False
        for job in [j for j in self.jobs if j.request is req]:  # its prefill jobs: pages back, slots free
            self.jobs.remove(job)
            self.pages.release(job.pages)
            self.slots[job.slot] = None
        req.job = None
        for seq in req.samples:
            if seq.state is not State.FINISHED:
                self.finish(seq, "abort")
                if on_finish is not None:
                    on_finish(seq)
        return True
