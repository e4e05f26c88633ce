"""Data-parallel generation: one engine per replica of the weights.

    engine = build_engine(model, tokenizer, mesh=mesh)   # an Engine, or a ReplicatedEngine on it
    outs = engine.generate(prompts, params)              # the same API either way

The `generate` rules shard the weights over `tensor` and replicate them over `data` and `fsdp`.
One `Engine` on such a mesh keeps its page pool and slots replicated as well: every replica of
the weights computes every sequence, so a mesh of `data=2, tensor=4` decodes no faster than
`tensor=4` alone and holds the same KV cache twice. `ReplicatedEngine` runs one `Engine` per
replica instead: replica r is the mesh's devices at one (`data`, `fsdp`) index (a mesh whose
`data` and `fsdp` have size 1), its weights are views of the replicated arrays on those devices
(no copy), and its pages and slots are its own. Weights split over `fsdp` (the `train` rules: a
GRPO run's fp32 masters or LoRA base, read in place by its rollouts) allow one replica per `data`
index, each an engine over its `fsdp` x `tensor` devices (`replica_axes`). Each replica's engine
runs the same programs as an engine on its devices alone would; their steps run side by side (one
host thread each: dispatch releases the GIL, the devices are disjoint).

Requests are spread by their samples: `generate` gives each replica an equal share of all the
samples (a GRPO group of `n` stays whole when the groups divide evenly, and is split otherwise:
sample k of a seeded request draws with seed + k on whichever replica runs it, so the tokens are
those of one engine); `add_request` puts a whole request on the replica with the least work.
An unseeded request gets a seed from the engine's own generator.

Multi-process: every process runs the replicas its devices belong to (a replica that spans
processes, e.g. `tensor` over two hosts, runs on all of them together, as one `Engine` on a mesh
across processes does); `generate` then gathers every completion onto every process, as one
engine's `generate` returns them (what the GRPO rollouts call). Streaming (`step`, `stream`) across
processes is not offered: there `build_engine(streaming=True)` (the server) returns one `Engine`
on the whole mesh, as it does when the weights it is given are split over every batch axis of
size > 1 (e.g. `fsdp=4, tensor=2` under the `train` rules).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import math
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qwq_jax.compile_cache import CLOCK
from qwq_jax.generate import Completion, Engine, StreamEvent, _CompileWatch, prompt_list, stream_timings
from qwq_jax.sampling import SamplingParams

BATCH_AXES = ("data", "fsdp")


def replica_meshes(mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> list[Mesh]:
    """One mesh per replica: the devices at each index of the batch axes `axes` (default `data` and
    `fsdp`), in the mesh's order, with every axis kept (those of `axes` of size 1), so the sharding
    rules apply unchanged."""
    names = tuple(mesh.axis_names)
    batch = [i for i, a in enumerate(names) if a in axes]
    rest = [i for i in range(len(names)) if i not in batch]
    devices = np.transpose(mesh.devices, batch + rest)
    count = math.prod(mesh.devices.shape[i] for i in batch)
    shape = tuple(1 if i in batch else mesh.devices.shape[i] for i in range(len(names)))
    kwargs = {"axis_types": mesh.axis_types} if getattr(mesh, "axis_types", None) is not None else {}
    return [Mesh(devices.reshape((count, -1))[r].reshape(shape), names, **kwargs) for r in range(count)]


def _names(axes: Any) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry."""
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _sharded_over(sharding: NamedSharding) -> set[str]:
    """The mesh axes of size > 1 that `sharding` splits an array over."""
    return {a for axes in sharding.spec for a in _names(axes) if sharding.mesh.shape[a] > 1}


def viewable(x: Any, mesh: Mesh, axes: Sequence[str] = BATCH_AXES) -> bool:
    """Whether `x` is an array on `mesh` that each replica over `axes` can take as a view (replicated
    over those axes)."""
    return (isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
            and not _sharded_over(x.sharding) & set(axes))


def replica_axes(mesh: Mesh | None, arrays: Sequence[Any]) -> tuple[str, ...]:
    """The batch axes (`data`, `fsdp`, of size > 1) that none of `arrays` (on `mesh`) is split over:
    one replica per index of them can view the arrays (abstract ones with a sharding count alike). A mesh of `data=2, tensor=4` with weights
    under any rules: ("data",); `data=2, fsdp=4, tensor=4` with the `generate` rules: ("data", "fsdp"),
    with the `train` rules (weights split over `fsdp`): ("data",). Empty without a mesh, or where an
    array is not on `mesh`."""
    if mesh is None:
        return ()
    arrays = [x for x in arrays if isinstance(x, jax.Array) or isinstance(getattr(x, "sharding", None), NamedSharding)]
    if not all(isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh for x in arrays):
        return ()
    used = set().union(*(_sharded_over(x.sharding) for x in arrays))
    return tuple(a for a in mesh.axis_names if a in BATCH_AXES and mesh.shape[a] > 1 and a not in used)


def on_replica(x: Any, mesh: Mesh, replica: Mesh, axes: Sequence[str] = BATCH_AXES) -> Any:
    """`x` (an array on `mesh`, replicated over `axes`) as an array on `replica`: the same device
    buffers. Anything else becomes its shape on `replica` (`jax.ShapeDtypeStruct`), sharded as it
    would be without the replica axes."""
    if not viewable(x, mesh, axes):
        spec = x.sharding.spec if isinstance(getattr(x, "sharding", None), NamedSharding) else ()
        spec = PartitionSpec(*(None if set(_names(a)) & set(axes) else a for a in spec))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(replica, spec))
    devices = set(replica.devices.flat)
    shards = [s.data for s in x.addressable_shards if s.device in devices]
    return jax.make_array_from_single_device_arrays(x.shape, NamedSharding(replica, x.sharding.spec), shards)


def replicas_of(mesh: Mesh | None, axes: Sequence[str] = BATCH_AXES) -> list[Mesh] | None:
    """The replica meshes `ReplicatedEngine` runs on `mesh` over `axes`; None where there is one
    replica (or no mesh)."""
    if mesh is None or math.prod(mesh.shape.get(a, 1) for a in axes) == 1:
        return None
    return replica_meshes(mesh, axes)


def build_engine(model: Any, tokenizer: Any = None, *, mesh: Mesh | None = None, streaming: bool = True,
                 **kwargs: Any) -> "Engine | ReplicatedEngine":
    """The engine for `model` on `mesh`: a `ReplicatedEngine` over the batch axes (`data`, `fsdp`)
    the model's weights are replicated over, where they have several indices, else one `Engine`.
    `streaming`: the caller uses `step`/`stream` (then several processes get one `Engine`)."""
    axes = replica_axes(mesh, jax.tree.leaves(nnx.state(model)))
    if replicas_of(mesh, axes) is None or (streaming and jax.process_count() > 1):
        return Engine(model, tokenizer, mesh=mesh, **kwargs)
    return ReplicatedEngine(model, tokenizer, mesh=mesh, axes=axes, **kwargs)


@dataclasses.dataclass
class _Part:
    replica: int
    request_id: str   # on the replica's engine
    first: int        # its sample 0 is the request's sample `first`
    left: int         # samples not yet finished
    weight: int       # tokens per sample (prompt + max_tokens): the replica's load while it runs


class ReplicatedEngine:
    """One `Engine` per replica of the weights on `mesh` (see the module docstring), with the
    `Engine` API: `add_request`, `step`, `abort`, `has_unfinished`, `stats`, `generate`, `stream`,
    `resize`, `free_cache`, and `params` / `layer_params` (set: each replica takes its view).
    `max_num_seqs` and `num_pages` count all replicas (each gets an equal share, rounded up);
    `kv_cache_bytes` is per replica, as for an `Engine` on its devices. `axes`: the batch axes to
    run one replica per index of (default `data` and `fsdp`; `replica_axes` says which the weights
    allow: a replica over `data` alone keeps weights split over `fsdp` split on its devices)."""

    def __init__(self, model: Any, tokenizer: Any = None, *, mesh: Mesh, max_num_seqs: int = 8,
                 num_pages: int | None = None, seed: int | None = None, donate_weights: bool = False,
                 on_compile: Callable[[str, str, dict], None] | None = None, axes: Sequence[str] = BATCH_AXES,
                 **kwargs: Any):
        axes = tuple(axes)
        if not set(axes) <= set(BATCH_AXES):
            raise ValueError(f"ReplicatedEngine: axes {axes} must be among the batch axes {BATCH_AXES}")
        meshes = replicas_of(mesh, axes)
        if meshes is None:
            raise ValueError(f"ReplicatedEngine: the mesh {dict(mesh.shape) if mesh is not None else None} has one "
                             f"replica over {' x '.join(axes)}: use Engine")
        self.mesh, self.meshes, self.axes, self.tokenizer, self.config = mesh, meshes, axes, tokenizer, model.config
        self.on_compile = on_compile
        me = jax.process_index()
        self.local = [r for r, m in enumerate(meshes) if me in {d.process_index for d in m.devices.flat}]
        graphdef, state = nnx.split(model)
        self._seeds = np.random.default_rng(Engine._engine_seed(seed))  # the same on every process
        engine_seeds = self._seeds.integers(2**31, size=len(meshes))
        # Every replica's views first: an engine that splits its layers with donate_weights frees its
        # devices' part of the model's stacks.
        subs = {r: nnx.merge(graphdef, jax.tree.map(lambda x, m=meshes[r]: on_replica(x, mesh, m, axes), state))
                for r in self.local}
        self.replicas: dict[int, Engine] = {}
        for r, sub in subs.items():
            self.replicas[r] = Engine(sub, tokenizer, mesh=meshes[r], max_num_seqs=self._share(max_num_seqs),
                                      num_pages=None if num_pages is None else self._share(num_pages),
                                      seed=int(engine_seeds[r]), donate_weights=donate_weights, **kwargs)
        self._first = self.replicas[self.local[0]]
        self._parts: dict[str, list[_Part]] = {}
        self._tags: dict[str, Any] = {}
        self._load = [0] * len(meshes)  # tokens x samples each replica is running
        self._ids = itertools.count()
        self._undelivered: list[StreamEvent] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(len(self.local) - 1) if len(self.local) > 1 else None
        self._lock = threading.Lock()
        self.last_completions: list[list[Completion]] = []
        self.last_timings: dict = {}

    # ---- shape --------------------------------------------------------------------------------
    def _share(self, total: int) -> int:
        return -(-int(total) // len(self.meshes))

    def __getattr__(self, name: str) -> Any:
        # What every replica has alike: eos_token_ids, max_model_len, page_size, pages (pages_for),
        # max_logprobs, kv_int8, compute_dtype, cache_dtype, chunk, prefill_chunk, ...
        if name.startswith("__") or "_first" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self._first, name)

    @property
    def max_num_seqs(self) -> int:
        return self._first.max_num_seqs * len(self.meshes)

    @property
    def num_pages(self) -> int:
        return self._first.num_pages * len(self.meshes)

    def resize(self, *, max_num_seqs: int | None = None, num_pages: int | None = None) -> None:
        """New totals over the replicas (each gets an equal share, rounded up); as `Engine.resize`."""
        for engine in self.replicas.values():
            engine.resize(max_num_seqs=max_num_seqs and self._share(max_num_seqs),
                          num_pages=num_pages and self._share(num_pages))

    def free_cache(self) -> None:
        for engine in self.replicas.values():
            engine.free_cache()

    # ---- weights: each replica views the arrays on the whole mesh -----------------------------
    @property
    def params(self) -> Any:
        return self._first.params

    @params.setter
    def params(self, state: Any) -> None:
        for r, engine in self.replicas.items():
            engine.params = jax.tree.map(lambda x, m=self.meshes[r]: on_replica(x, self.mesh, m, self.axes), state)
            engine.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(engine.params))

    def set_model(self, model: Any) -> None:
        """`Engine.set_model` on every replica, each with its view of `model`'s arrays."""
        graphdef, state = nnx.split(model)
        subs = {r: nnx.merge(graphdef, jax.tree.map(lambda x, m=self.meshes[r]: on_replica(x, self.mesh, m, self.axes),
                                                    state)) for r in self.replicas}
        for r, sub in subs.items():  # every view first, as in __init__ (a split with donation frees the stacks)
            self.replicas[r].set_model(sub)

    def precompile(self, prompt_tokens: int = 1, params: SamplingParams | None = None,
                   decode: bool | Callable[[], bool] = True) -> list[dict]:
        """`Engine.precompile` on each replica of this process (each has its own programs)."""
        return [c for engine in self.replicas.values() for c in engine.precompile(prompt_tokens, params, decode)]

    @property
    def layer_params(self) -> Any:
        return self._first.layer_params

    @layer_params.setter
    def layer_params(self, layers: Any) -> None:
        for r, engine in self.replicas.items():
            engine.layer_params = None if layers is None else jax.tree.map(
                lambda x, m=self.meshes[r]: on_replica(x, self.mesh, m, self.axes), layers)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, token_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, *, _tag: Any = None) -> str:
        """Queue a request on the replica with the least work running; returns its id."""
        params = self._seeded(token_ids, params, request_id)
        rid = request_id if request_id is not None else self._new_id()
        replica = min(range(len(self.meshes)), key=lambda r: (self._load[r], r))
        self._submit(rid, token_ids, params, [(replica, 0, params.n)], _tag)
        return rid

    def _new_id(self) -> str:
        rid = f"req-{next(self._ids)}"
        while rid in self._parts:
            rid = f"req-{next(self._ids)}"
        return rid

    def _seeded(self, token_ids: Sequence[int], params: SamplingParams | None, request_id: str | None,
                what: str = "the prompt") -> SamplingParams:
        """`params` checked as each replica will check them, with a seed (drawn here when unset: a
        request split over replicas runs sample k with seed + k on whichever replica)."""
        self._first._check_request(token_ids, params, None, what=what)
        if request_id is not None and request_id in self._parts:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = params or SamplingParams()
        if params.seed is None:
            params = dataclasses.replace(params, seed=int(self._seeds.integers(2**31)))
        return params

    def _submit(self, rid: str, token_ids: Sequence[int], params: SamplingParams,
                spans: list[tuple[int, int, int]], tag: Any) -> None:
        """Request `rid`'s samples [first, first + n) on each (replica, first, n) of `spans`."""
        weight = len(token_ids) + params.max_tokens
        parts = []
        for replica, first, n in spans:
            part = _Part(replica, f"{rid}#{first}", first, n, weight)
            if replica in self.replicas:
                sub = dataclasses.replace(params, n=n, seed=(params.seed + first) % 2**32)
                self.replicas[replica].add_request(token_ids, sub, request_id=part.request_id)
                self._load[replica] += n * weight
            parts.append(part)
        self._parts[rid], self._tags[rid] = parts, tag

    def abort(self, request_id: str) -> bool:
        """Stop a request on every replica that runs a part of it (as `Engine.abort`)."""
        parts = self._parts.get(request_id)
        if parts is None:
            return False
        for p in parts:
            if p.replica in self.replicas:
                self.replicas[p.replica].abort(p.request_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._undelivered) or any(engine.has_unfinished() for engine in self.replicas.values())

    def stats(self) -> dict:
        """`Engine.stats` summed over this process's replicas, and their count."""
        out: dict = {}
        for engine in self.replicas.values():
            for k, v in engine.stats().items():
                out[k] = v if k == "page_size" else out.get(k, 0) + v
        out["replicas"] = len(self.meshes)
        return out

    # ---- steps --------------------------------------------------------------------------------
    def _outer(self, replica: int, event: StreamEvent) -> StreamEvent:
        """A replica's event as the caller's request's (its id, its sample index)."""
        rid, first = event.request_id.rsplit("#", 1)
        with self._lock:
            out = dataclasses.replace(event, request_id=rid, sample_index=event.sample_index + int(first),
                                      prompt_index=self._tags.get(rid))
            parts = self._parts.get(rid, [])
            part = next((p for p in parts if p.replica == replica and p.first == int(first)), None)
            if event.finished and part is not None:
                part.left -= 1
                self._load[replica] -= part.weight
                if part.left == 0:
                    parts.remove(part)
                if not any(p.replica in self.replicas for p in parts):  # nothing of it runs here
                    self._parts.pop(rid, None)
                    self._tags.pop(rid, None)
        return out

    def step(self, on_events: Callable[[list[StreamEvent]], None] | None = None) -> list[StreamEvent]:
        """One step of every replica with work, side by side (the first in this thread, so its
        compilations are reported here); their events as the requests' own."""
        events, self._undelivered = self._undelivered, []
        busy = [r for r, engine in self.replicas.items() if engine.has_unfinished()]

        def one(r: int) -> list[StreamEvent]:
            early = None
            if on_events is not None:
                def early(got, r=r):
                    outer = [self._outer(r, e) for e in got]
                    with self._lock:
                        on_events(outer)
            return [self._outer(r, e) for e in self.replicas[r].step(on_events=early)]

        if not busy:
            return events
        others = [self._pool.submit(one, r) for r in busy[1:]] if self._pool is not None else []
        events += one(busy[0])
        for future in others:
            events += future.result()
        return events

    # ---- all at once --------------------------------------------------------------------------
    def _spread(self, plist: list[SamplingParams]) -> list[list[tuple[int, int, int]]]:
        """(replica, first, n) spans of each request: each replica an equal share of all the samples,
        in order (whole requests where the shares fall between them)."""
        share = -(-sum(p.n for p in plist) // len(self.meshes))
        spans, replica, room = [], 0, share
        for p in plist:
            mine, first = [], 0
            while first < p.n:
                take = min(room, p.n - first)
                mine.append((replica, first, take))
                first, room = first + take, room - take
                if room == 0:
                    replica, room = min(replica + 1, len(self.meshes) - 1), share
            spans.append(mine)
        return spans

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] = None,
                 ) -> list[list[Completion]]:
        """Completions for each prompt (`n` per prompt), on every process."""
        for _ in self._run(prompts, params):
            pass
        return self.last_completions

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] = None,
               ) -> Iterator[list[StreamEvent]]:
        """As `Engine.stream` (in one process; across processes only `generate`)."""
        if jax.process_count() > 1:
            raise RuntimeError("ReplicatedEngine.stream runs in one process; across processes use generate")
        yield from self._run(prompts, params)

    def _run(self, prompts, params) -> Iterator[list[StreamEvent]]:
        prompts, plist = prompt_list(prompts, params)
        plist = [self._seeded(p, sp, None, what=f"prompt {i}") for i, (p, sp) in enumerate(zip(prompts, plist))]
        with _CompileWatch(self.on_compile) as watch:
            yield from self._run_checked(prompts, plist, watch)

    def _run_checked(self, prompts, plist, watch) -> Iterator[list[StreamEvent]]:
        ids = [self._new_id() for _ in prompts]
        index = {rid: i for i, rid in enumerate(ids)}
        spans = self._spread(plist)
        for i, (rid, p, sp) in enumerate(zip(ids, prompts, plist)):
            self._submit(rid, p, sp, spans[i], i)
        completions: list[list[Completion | None]] = [[None] * sp.n for sp in plist]
        before = {r: dict(e._counters) for r, e in self.replicas.items()}
        c0, t0, first_token = CLOCK.seconds, time.perf_counter(), None
        try:
            while any(p.replica in self.replicas for rid in ids for p in self._parts.get(rid, ())):
                ours = []
                for e in self.step():
                    if e.request_id not in index:  # another caller's: its next step() delivers it
                        self._undelivered.append(e)
                        continue
                    ours.append(e)
                    if e.completion is not None:
                        completions[index[e.request_id]][e.sample_index] = e.completion
                if ours:
                    if first_token is None and any(e.token_ids for e in ours):
                        first_token = time.perf_counter() - t0
                    yield ours
        finally:
            for rid in ids:  # a caller that stops early leaves nothing running
                for p in self._parts.get(rid, ()):
                    if p.replica in self.replicas:
                        engine = self.replicas[p.replica]
                        engine.abort(p.request_id)
                        engine._undelivered = [e for e in engine._undelivered if e.request_id != p.request_id]
                self._parts.pop(rid, None)
                self._tags.pop(rid, None)
        if jax.process_count() > 1:
            completions = _gather(completions)
        self.last_completions = completions
        spent = [{k: e._counters[k] - before[r][k] for k in before[r]} for r, e in self.replicas.items()]
        # the replicas run side by side: their wall times overlap, their tokens and chunks add up
        total = {k: (max if k.endswith("_s") else sum)(s[k] for s in spent) for k in spent[0]}
        self.last_timings = dict(stream_timings(total, CLOCK.seconds - c0, list(watch.compiled), first_token),
                                 replicas=len(self.meshes))


def _gather(completions: list[list[Completion | None]]) -> list[list[Completion]]:
    """Every process's completions (each holds those of its replicas) onto every process."""
    from jax.experimental import multihost_utils

    mine = {f"{i}.{k}": dataclasses.asdict(c) for i, row in enumerate(completions)
            for k, c in enumerate(row) if c is not None}
    data = np.frombuffer(json.dumps(mine).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:data.size] = data
    every = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
    out = [list(row) for row in completions]
    for p, size in enumerate(sizes):
        for key, c in json.loads(every[p, :size].tobytes().decode()).items():
            i, k = map(int, key.split("."))
            c["top_logprobs"] = [[tuple(t) for t in row] for row in c["top_logprobs"]] \
                if c.get("top_logprobs") is not None else None
            out[i][k] = Completion(**c)
    return out
