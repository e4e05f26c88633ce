"""The generation engine: continuous batching over a paged KV cache.

    engine = Engine(model, tokenizer)
    rid = engine.add_request(prompt_ids, SamplingParams(temperature=0.6, max_tokens=256, n=4))
    while engine.has_unfinished():
        for event in engine.step():       # new tokens of every sequence that produced some
            ...
    outs = engine.generate([prompt_ids, ...], params)   # or all at once: n completions per prompt
    for events in engine.stream(prompts, params): ...   # the same, streamed

Each `step()`: admit waiting requests while slots and pages allow -> prefill prompt chunks within
the step's token budget (a prefilled sequence draws its first token as it takes its slot: it
streams before any decode call) -> decode every running sequence for `chunk` steps on the device
(no host round trip per token) -> emit the new tokens, end what finished (EOS, stop ids, max_tokens, stop strings on the host)
and give its pages back. The scheduler (qwq_jax/scheduler.py) and the page allocator with its
prefix cache (qwq_jax/pages.py) are plain host Python; the device programs are in
qwq_jax/programs.py, the paged attention in qwq_jax/paged_attention.py.

The KV cache is a pool of `num_pages` pages of `page_size` tokens per layer; a sequence holds the
pages its tokens need. The `n` samples of a request share its prompt's pages (prefilled once);
whole prompt pages stay in a prefix cache (LRU) for later prompts with the same prefix (a system
prompt, a GRPO prompt in the next epoch). When pages run out a sequence is preempted and later
recomputed (scheduler.py); `add_request` refuses what could never fit.

Exact: with a seed, a request's tokens do not depend on what else runs or when it was admitted.
Sample k of a seeded request draws with seed + k; row keys `fold_in(key(seed), count)`; the
decode program always runs all `max_num_seqs` slots (one shape) and nothing in it mixes rows; a
prompt's chunk boundaries depend on the prompt alone.

Layer loop (`layer_loop`; same tokens either way):
    scan   the decoder layers' stacked `[L, ...]` weights and pages, run by `lax.scan` (compiles
           once per layer shape, whatever the depth)
    split  each layer's weights copied into arrays of their own at construction (one layer at a
           time; `donate_weights=True` frees the stacks as it goes, leaving `model` unusable), and
           one page pool per layer: no slice of a stack exists for a compiler to copy before its
           matmul (XLA for an H100 copies `scan`'s, `benchmarks/gpu_aot.py`)

Long context: with a YaRN config, `rope_scaling="auto"` (default) uses plain RoPE for a
request whose prompt + max_tokens fits the original context and YaRN only for longer ones
(what the model card recommends); `"static"` always applies YaRN, `"off"` never.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwq_jax import rope as rope_lib
from qwq_jax.compile_cache import CLOCK
from qwq_jax.model import Qwen2, split_layers
from qwq_jax.pages import PageAllocator
from qwq_jax.paged_attention import PagePool
from qwq_jax.programs import LENGTH, STOP, Programs, SlotInputs, SlotState, unpack
from qwq_jax.sampling import SamplingParams, batch_params
from qwq_jax.scheduler import POLICIES, Request, Scheduler, Sequence as Seq

ROPE_MODES = ("auto", "static", "off")
LAYER_LOOPS = ("scan", "split")
PREFILL_CHUNK = 2048  # tokens per prefill call by default (Engine(prefill_chunk=...))
PAGE_SIZE = 16        # tokens per page by default (Engine(page_size=...))
CPU_KV_BYTES = 256 << 20  # the page pool's default size on CPU (Engine(kv_cache_bytes=...))
KV_MEMORY_FRACTION = 0.9  # of the accelerator memory left free after the weights, by default
FINISH_REASONS = {STOP: "stop", LENGTH: "length"}
_IDLE = SamplingParams(temperature=0.0)  # an empty slot's: greedy, so an all-greedy batch skips the sort


def _bucket(n: int, most: int) -> int:
    """Prefill chunk shapes: 64, 128, 256, ... (at most `most`, the chunk size) so prompts of
    similar lengths share a compilation."""
    return min(1 << max(6, math.ceil(math.log2(max(n, 1)))), most)


def _positive_int(name: str, value: Any, none_ok: bool = False) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive int" + (" (or None)" if none_ok else ""))


# The engine's own programs (jit function names) and what the status lines call them.
_PROGRAMS = {"_prefill_fn": "prefill", "_decode_fn": "decode", "_insert_fn": "insert", "_copy_fn": "copy"}


class _CompileWatch:
    """Reports each compilation of the engine's programs to `on_compile` while a `stream` runs:
    `on_compile("start", program, {})` when tracing ends (XLA compilation or a cache load follows),
    `on_compile("end", program, {"seconds": s, "cache": "hit" | "miss" | "off"})` when it is done."""

    def __init__(self, on_compile: Callable[[str, str, dict], None] | None):
        self.on_compile = on_compile
        self.thread = threading.get_ident()  # the caller's: engines stepping beside it on other threads compile alike
        self.current: tuple[str, float, int, int] | None = None
        self.compiled: list[dict] = []

    def __enter__(self) -> "_CompileWatch":
        CLOCK.watchers.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        CLOCK.watchers.remove(self)

    def __call__(self, event: str, fun_name: str, duration: float) -> None:
        program = next((label for name, label in _PROGRAMS.items() if name in fun_name), None)
        if program is None or threading.get_ident() != self.thread:
            return
        if event == CLOCK.EVENTS[0]:  # traced: lowering and the backend compile follow
            self.current = (program, duration, CLOCK.hits, CLOCK.misses)
            if self.on_compile is not None:
                self.on_compile("start", program, {})
        elif self.current is not None and self.current[0] == program:
            name, seconds, hits, misses = self.current
            self.current = (name, seconds + duration, hits, misses)
            if event == CLOCK.EVENTS[2]:
                cache = "hit" if CLOCK.hits > hits else "miss" if CLOCK.misses > misses else "off"
                info = {"program": name, "seconds": seconds + duration, "cache": cache}
                self.compiled.append(info)
                self.current = None
                if self.on_compile is not None:
                    self.on_compile("end", name, info)


def _to_host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@dataclasses.dataclass
class Completion:
    """One generated sequence."""

    token_ids: list[int]
    finish_reason: str                # "stop" (EOS, stop token or stop string), "length" or "abort"
    prompt_tokens: int
    text: str | None = None           # decoded, when the engine has a tokenizer
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[float] | None = None   # log-prob of each token under the model (before temperature etc.)
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, the `params.logprobs` likeliest


@dataclasses.dataclass
class StreamEvent:
    """New tokens of one sequence (sample `sample_index` of request `request_id`) since its last event."""

    request_id: str
    sample_index: int
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_index: int | None = None        # the prompt's index in `stream()`'s list; None from add_request
    completion: Completion | None = None   # on the finishing event
    logprobs: list[float] = dataclasses.field(default_factory=list)  # of token_ids, under the model
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)  # when asked for


def prompt_list(prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None
                ) -> tuple[list[list[int]], list[SamplingParams]]:
    """`stream`'s arguments as (token id lists, one SamplingParams per prompt)."""
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("prompts is empty")
    plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
    return prompts, plist


def stream_timings(spent: dict, compile_s: float, compiled: list[dict], first_token: float | None) -> dict:
    """`last_timings` of a `stream` (see there) from the engine counters it moved (`spent`: prefill_s,
    decode_s, prefill_chunks, generated_tokens), its compile seconds and compilations."""
    decode_compile = sum(c["seconds"] for c in compiled if c["program"] == "decode")
    return {"prefill_s": spent["prefill_s"], "decode_s": spent["decode_s"], "compile_s": compile_s,
            "prefill_compile_s": compile_s - decode_compile, "decode_compile_s": decode_compile,
            "compiled": compiled, "first_token_s": first_token, "prefill_chunks": spent["prefill_chunks"],
            "decode_tokens": spent["generated_tokens"],
            "decode_tokens_per_s": spent["generated_tokens"] / max(spent["decode_s"], 1e-9)}


class Engine:
    """Continuous batching over a paged KV cache (see the module docstring); on `mesh`, weights by
    the `generate` rules and pages over `tensor` by KV head."""

    def __init__(self, model: Qwen2, tokenizer: Any = None, *, mesh: Any = None, rules: Any = "generate",
                 max_num_seqs: int = 8, page_size: int = PAGE_SIZE, num_pages: int | None = None,
                 kv_cache_bytes: int | None = None, max_model_len: int | None = None, kv_cache_dtype: Any = None,
                 chunk: int = 16, prefill_chunk: int | None = PREFILL_CHUNK, max_prefill_tokens: int | None = None,
                 prefix_caching: bool = True, policy: str = "continuous", rope_scaling: str = "auto",
                 layer_loop: str = "scan", donate_weights: bool = False,
                 on_compile: Callable[[str, str, dict], None] | None = None, seed: int | None = None,
                 max_logprobs: int = 0):
        if rope_scaling not in ROPE_MODES:
            raise ValueError(f"rope_scaling={rope_scaling!r} must be one of {', '.join(ROPE_MODES)}")
        if layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop={layer_loop!r} must be one of {', '.join(LAYER_LOOPS)}")
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} must be one of {', '.join(POLICIES)}")
        for name, value in (("max_num_seqs", max_num_seqs), ("page_size", page_size), ("chunk", chunk)):
            _positive_int(name, value)
        for name, value in (("num_pages", num_pages), ("kv_cache_bytes", kv_cache_bytes), ("max_model_len", max_model_len),
                            ("prefill_chunk", prefill_chunk), ("max_prefill_tokens", max_prefill_tokens)):
            _positive_int(name, value, none_ok=True)
        if page_size & (page_size - 1):
            raise ValueError(f"page_size={page_size} must be a power of two")
        self.config = model.config  # the weights live in self.params only (the caller may free `model`)
        self.tokenizer, self.mesh, self.rules = tokenizer, mesh, rules
        self.rope_scaling, self.layer_loop, self.chunk = rope_scaling, layer_loop, chunk
        self.prefill_chunk, self.page_size, self.max_num_seqs = prefill_chunk, page_size, max_num_seqs
        self.compute_dtype = jnp.dtype(model.dtype)
        self.kv_int8 = isinstance(kv_cache_dtype, str) and kv_cache_dtype == "int8"
        self.cache_dtype = self.compute_dtype if kv_cache_dtype is None or self.kv_int8 else jnp.dtype(kv_cache_dtype)
        context = self.max_context()
        if max_model_len is not None and max_model_len > context:
            raise ValueError(f"max_model_len={max_model_len} is longer than the model's context of {context}")
        self.max_model_len = max_model_len or context
        self.max_pages = -(-self.max_model_len // page_size)  # page-table width
        if prefill_chunk is None:  # every prompt in one call
            self.prefill_chunk = prefill_chunk = self.max_model_len

        self.donate_weights = donate_weights
        self._take(model)
        if num_pages is None:
            per_page = PagePool.bytes_per_token(self.config, self.cache_dtype, int8=self.kv_int8) * page_size
            budget = kv_cache_bytes if kv_cache_bytes is not None else self._default_kv_bytes()
            num_pages = max(1, min(max_num_seqs * self.max_pages, budget // per_page))
        replicated = None
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            replicated = NamedSharding(mesh, PartitionSpec())
        elif isinstance(self._one_device_placement(), jax.sharding.NamedSharding):
            replicated = self._one_device_placement()  # the state comes back as placed: P(), not P(None, None)
        if not isinstance(max_logprobs, int) or max_logprobs < 0:
            raise ValueError(f"max_logprobs={max_logprobs!r} must be an int >= 0")
        self.max_logprobs = max_logprobs  # SamplingParams.logprobs at most (0: only the chosen tokens')
        self.programs = Programs(self.graphdef, chunk, page_size, replicated, top_logprobs=max_logprobs)
        self.prefix_caching, self.policy = prefix_caching, policy
        self.max_prefill_tokens = max_prefill_tokens or self.prefill_chunk
        self.eos_token_ids = self._eos_ids()
        self._seeds = np.random.default_rng(self._engine_seed(seed))
        self._ids = itertools.count()
        self._undelivered: list[StreamEvent] = []
        self._counters = dict(generated_tokens=0, steps=0, prefill_s=0.0, decode_s=0.0, prefill_chunks=0)
        self.resize(max_num_seqs=max_num_seqs, num_pages=num_pages)
        # Called as on_compile("start" | "end", program, info) around each compilation of the engine's
        # programs (see _CompileWatch); `last_timings` reports them either way.
        self.on_compile = on_compile
        CLOCK.register()

    # ---- the cache ---------------------------------------------------------------------------
    def resize(self, *, max_num_seqs: int | None = None, num_pages: int | None = None) -> None:
        """New slot and page counts (an idle engine only); the cache is emptied (`free_cache`).
        A new slot count is a new decode shape (compiled once)."""
        if getattr(self, "scheduler", None) is not None and self.has_unfinished():
            raise RuntimeError("resize: the engine still has unfinished requests")
        self.max_num_seqs = max_num_seqs or self.max_num_seqs
        self.num_pages = num_pages or self.num_pages
        self.free_cache()

    def free_cache(self) -> None:
        """Give the page pool's device memory back and forget the prefix cache (an idle engine
        only; the next `step()` allocates a fresh pool). For when the weights change (cached
        keys/values belong to the old ones) or another phase needs the memory (a GRPO update)."""
        if getattr(self, "scheduler", None) is not None and self.has_unfinished():
            raise RuntimeError("free_cache: the engine still has unfinished requests")
        hits = self.pages.hit_tokens if getattr(self, "pages", None) is not None else 0
        self.pages = PageAllocator(self.num_pages, self.page_size, self.prefix_caching)
        self.pages.hit_tokens = hits
        old = getattr(self, "scheduler", None)
        self.scheduler = Scheduler(self.pages, self.max_num_seqs, self.prefill_chunk, self.max_prefill_tokens,
                                   self.policy)
        if old is not None:  # the counters run on
            self.scheduler.preemptions, self.scheduler.prefill_tokens = old.preemptions, old.prefill_tokens
            self.scheduler.prompt_tokens = old.prompt_tokens
        self.pool = self.slot_state = None
        self._slots = self._empty_slots()

    def _allocate(self) -> None:
        """The page pool and the slots' device state (zeros)."""
        self.pool = PagePool.init(self.config, self.num_pages, self.page_size, self.cache_dtype, int8=self.kv_int8,
                                  per_layer=self.layer_loop == "split", mesh=self.mesh, rules=self.rules)
        if self.mesh is None:  # committed, as the programs return it: their second call compiles nothing new
            self.pool = jax.device_put(self.pool, self._one_device_placement())
        b, v = self.max_num_seqs, self.config.vocab_size
        self.slot_state = SlotState(self._put(np.zeros(b, np.int32)), self._put(np.zeros((b, v), np.int32)),
                                    self._put(np.zeros((b, v), bool)), self._put(np.zeros(b, np.int32)),
                                    self._put(np.zeros(b, np.int32)))

    # ---- weights ------------------------------------------------------------------------------
    def _take(self, model: Qwen2) -> None:
        """The engine's weights from `model`: its state, and with the `split` loop each layer's own arrays."""
        self.graphdef, self.params = nnx.split(model)
        self._weight_specs = [(jax.tree_util.keystr(k), tuple(x.shape), jnp.dtype(x.dtype))
                              for k, x in jax.tree_util.tree_leaves_with_path(self.params)]
        self.layer_params = None
        if self.layer_loop == "split":
            self.layer_params = split_layers(self.params["layers"], donate=self.donate_weights)
            # The graph still has `layers`; give it layer 0's arrays (the same buffers, no copy).
            self.params["layers"] = self.layer_params[0]
        self.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.params))
        self._placement = self._one_device = None

    def set_model(self, model: Qwen2) -> None:
        """Give an engine built on an abstract model (`qwq_jax.checkpoint.abstract_load`) its weights,
        e.g. once they are read while `precompile` readied the programs. `model` must have the
        engine's parameters, shapes and dtypes (ValueError naming the first that differs); with
        `donate_weights` its stacked arrays are consumed as at construction."""
        if self.scheduler.requests:
            raise RuntimeError("set_model: the engine has requests")
        _, state = nnx.split(model)
        specs = [(jax.tree_util.keystr(k), tuple(x.shape), jnp.dtype(x.dtype))
                 for k, x in jax.tree_util.tree_leaves_with_path(state)]
        if specs != self._weight_specs:
            theirs, ours = dict((k, v) for k, *v in specs), dict((k, v) for k, *v in self._weight_specs)
            name = next((k for k in {**ours, **theirs} if ours.get(k) != theirs.get(k)), "?")
            raise ValueError(f"set_model: parameter {name} is {theirs.get(name, 'missing')} in the model, "
                             f"{ours.get(name, 'missing')} in the engine (shape, dtype)")
        self._take(model)
        self.free_cache()

    # ---- set-up -----------------------------------------------------------------------------
    def _eos_ids(self) -> tuple[int, ...]:
        ids = list(getattr(self.tokenizer, "eos_token_ids", None) or ())
        eos = self.config.eos_token_id
        ids += list(eos) if isinstance(eos, tuple) else ([eos] if eos is not None else [])
        return tuple(dict.fromkeys(int(i) for i in ids))

    @staticmethod
    def _engine_seed(seed: int | None) -> int:
        """Where unseeded requests' seeds come from: the same on every process of a multi-host run."""
        if seed is not None:
            return int(seed)
        seed = int(np.random.SeedSequence().generate_state(1)[0])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            seed = int(multihost_utils.broadcast_one_to_all(np.uint32(seed)))
        return seed

    def _default_kv_bytes(self) -> int:
        """CPU: CPU_KV_BYTES. An accelerator: KV_MEMORY_FRACTION of what its memory has left."""
        device = jax.local_devices()[0] if self.mesh is None else self.mesh.devices.flat[0]
        try:
            stats = device.memory_stats() if device.platform != "cpu" else None
        except Exception:  # noqa: BLE001 - a compile-only device has no memory to ask about
            stats = None
        if not stats or "bytes_limit" not in stats:
            return CPU_KV_BYTES
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        if self.abstract:  # the weights are still to come (read while `precompile` runs): their room
            free -= self._weight_bytes(device)
        shards = 1 if self.mesh is None else self.mesh.shape.get("tensor", 1)
        return int(free * KV_MEMORY_FRACTION) * shards

    def _weight_bytes(self, device: Any) -> int:
        """Bytes of the weights on `device` (layer 0 of a split model counted twice: an upper bound)."""
        total = 0
        for x in jax.tree.leaves((self.params, self.layer_params)):
            sh = getattr(x, "sharding", None)
            if sh is None or device in sh.device_set:
                shape = sh.shard_shape(x.shape) if sh is not None else x.shape
                total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
        return total

    def _put(self, x: np.ndarray) -> jax.Array:
        """A host array onto the engine's device(s), replicated (committed: a second call of a
        program sees the same placement and does not compile again)."""
        if self.mesh is None:
            return jax.device_put(x, self._one_device_placement())
        from jax.sharding import NamedSharding, PartitionSpec

        from sharding import put_global

        return put_global(np.asarray(x), NamedSharding(self.mesh, PartitionSpec()))

    def _one_device_placement(self) -> jax.sharding.Sharding:
        """Where an engine without a mesh keeps its own arrays: as its programs return them. Weights
        placed on a one-device mesh (NamedSharding: `sharding.shard_model`, the benchmarks' models)
        make the programs return arrays on that mesh; arrays put on the bare device instead differ
        in placement from the second call on, and every program would compile twice."""
        if getattr(self, "_placement", None) is None:
            from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

            leaf = jax.tree.leaves(self.params)[0]
            on = getattr(leaf, "sharding", None)
            if isinstance(on, NamedSharding) and on.num_devices == 1:
                self._placement = NamedSharding(on.mesh, PartitionSpec())
            else:
                self._placement = SingleDeviceSharding(self._device())
        return self._placement

    def _device(self) -> Any:
        """The one device of an engine without a mesh: where the weights are (else the default)."""
        if getattr(self, "_one_device", None) is None:
            on = getattr(jax.tree.leaves(self.params)[0], "sharding", None)  # abstract leaves: where they will be
            self._one_device = min(on.device_set, key=lambda d: d.id) if on is not None else jax.devices()[0]
        return self._one_device

    def _scaled(self, needs: np.ndarray) -> np.ndarray:
        """Which rows (by prompt + max_tokens) run the config's scaled rotary tables (YaRN)."""
        if self.config.rope_scaling is None or self.rope_scaling == "off":
            return np.zeros(needs.shape, bool)
        if self.rope_scaling == "static":
            return np.ones(needs.shape, bool)
        return needs > self.config.original_max_position_embeddings

    def _rope_for(self, needs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row rotary frequencies `[B, 1, D/2]` and attention factors `[B, 1, 1]`."""
        plain, _ = rope_lib.inv_frequencies(self.config, scaled=False)
        scaled, factor = rope_lib.inv_frequencies(self.config)
        use = self._scaled(needs)
        inv = np.where(use[:, None, None], scaled[None, None], plain[None, None]).astype(np.float32)
        att = np.where(use, factor, 1.0).astype(np.float32)[:, None, None]
        return inv, att

    @property
    def sequence_capacity(self) -> int:
        """The most tokens one sequence can hold: the pool less a page (copy-on-write for n > 1)."""
        return (self.num_pages - 1) * self.page_size

    def max_context(self) -> int:
        return self.config.max_position_embeddings if self.rope_scaling == "off" else self.config.max_context

    def _weights(self):
        """What the programs take as weights: the model's state and the split layers (or None)."""
        return self.params, self.layer_params

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, token_ids: Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None, *, _tag: Any = None) -> str:
        """Queue a request (`params.n` samples of one prompt); returns its id. Raises ValueError,
        naming the limit, for what could never run."""
        self._check_request(token_ids, params, request_id)
        params = params or SamplingParams()
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        while request_id is None and rid in self.scheduler.requests:
            rid = f"req-{next(self._ids)}"
        seeds = [(params.seed + k) % 2**32 if params.seed is not None else int(self._seeds.integers(2**32))
                 for k in range(params.n)]
        # Keys/values under YaRN differ from plain RoPE's: the prefix cache keeps them apart.
        yarn = int(self._scaled(np.array([len(token_ids) + params.max_tokens]))[0])
        self.scheduler.add(Request(rid, [int(t) for t in token_ids], params, tag=_tag, salt=yarn), seeds)
        return rid

    def _check_request(self, token_ids: Sequence[int], params: SamplingParams | None, request_id: str | None,
                       what: str = "the prompt") -> None:
        ids = list(token_ids)
        if not ids:
            raise ValueError(f"{what} is empty")
        if min(ids) < 0 or max(ids) >= self.config.vocab_size:
            raise ValueError(f"{what} has token ids outside 0..{self.config.vocab_size - 1}")
        params = params or SamplingParams()
        params.validate(prompt_tokens=len(ids), max_context=self.max_model_len, vocab_size=self.config.vocab_size)
        if params.logprobs > self.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} is more than this engine's max_logprobs="
                             f"{self.max_logprobs} (Engine(max_logprobs=...))")
        need = self.pages.pages_for(len(ids) + params.max_tokens - 1) + (1 if params.n > 1 else 0)
        if need > self.num_pages:
            raise ValueError(f"{what} ({len(ids)} tokens) with max_tokens={params.max_tokens} needs {need} pages "
                             f"of {self.page_size} tokens, more than the page pool's {self.num_pages} "
                             "(raise num_pages or kv_cache_bytes)")
        if request_id is not None and request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")

    def abort(self, request_id: str) -> bool:
        """Stop a request; its pages go back to the pool, its unfinished samples end with a
        finished event (reason "abort") from the next `step()`. False if it is not known."""
        return self.scheduler.abort(request_id, on_finish=lambda seq: self._undelivered.append(
            self._event(seq, [], finished=True)))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._undelivered)

    def stats(self) -> dict:
        s = self.scheduler
        return {"prefill_tokens_computed": s.prefill_tokens, "prompt_tokens": s.prompt_tokens,
                "prefix_cache_hit_tokens": self.pages.hit_tokens, "pages_used": self.pages.used,
                "pages_cached": self.pages.cached, "pages_total": self.num_pages, "page_size": self.page_size,
                "running": len(s.running), "waiting": len(s.waiting), "preemptions": s.preemptions,
                "compilations": self.programs.compilations(), "generated_tokens": self._counters["generated_tokens"],
                "steps": self._counters["steps"]}

    # ---- one engine step ---------------------------------------------------------------------
    def _on_mesh(self):
        """The engine's mesh as the current one while its programs are traced: kernels that run per
        shard (the Pallas paged attention) find it there. Nothing without a mesh."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def step(self, on_events: Callable[[list[StreamEvent]], None] | None = None) -> list[StreamEvent]:
        """admit -> prefill -> decode -> emit; returns the events of this step.

        `on_events`, if given, is called with the events ready before the step's decode chunk (the first
        tokens of the sequences admitted beside running ones), while that chunk runs on the device; a
        server streams them a whole chunk sooner (16 decode steps by default). They are not returned
        again."""
        if self.abstract:
            raise RuntimeError("this engine has abstract weights: it can only lower its programs")
        with self._on_mesh():
            return self._step(on_events)

    def _step(self, on_events: Callable[[list[StreamEvent]], None] | None = None) -> list[StreamEvent]:
        if self.pool is None:
            self._allocate()
        events, self._undelivered = self._undelivered, []
        self._counters["steps"] += 1
        self._run_prefills()
        fresh = set()
        for adm in self.scheduler.admit():  # each draws its first token here: it streams at once
            events += self._load_slot(adm)
            fresh.add(id(adm.seq))
        if fresh and all(id(seq) in fresh for seq in self.scheduler.running):
            # Every running sequence was admitted now: their first tokens go to the caller before any
            # decoding (a lone request's reply starts a whole decode chunk sooner: 2.6 s on the CPU
            # demo). With others running, they decode this step as usual (no step without decoding).
            return events
        if self.scheduler.running:
            self.scheduler.grow(self.chunk)  # preempted sequences leave their slots (inactive below)
            decoding = self._start_decode(self.chunk)
            if on_events is not None and events:
                on_events(events)
                events = []
            events += self._finish_decode(*decoding)
        return events

    def _run_prefills(self) -> None:
        t0, c0, ran = time.perf_counter(), CLOCK.seconds, False
        for chunk in self.scheduler.prefill_work():
            job = chunk.job
            n = chunk.end - chunk.start
            width = _bucket(n, self.prefill_chunk)
            tokens = np.zeros((1, width), np.int32)
            tokens[0, :n] = job.tokens[chunk.start:chunk.end]
            table = np.zeros((1, self.max_pages), np.int32)
            table[0, :len(job.pages)] = job.pages
            seq = job.seq or job.request.samples[0]
            inv, att = self._rope_for(np.array([self._needs(seq)]))
            self.pool, logits = self.programs.prefill(
                self._weights(), self.pool, self._put(tokens), self._put(np.array([chunk.start], np.int32)),
                self._put(np.array([n], np.int32)), self._put(table), (self._put(inv), self._put(att)))
            self._counters["prefill_chunks"] += 1
            ran = True
            if chunk.last:
                self.scheduler.prefilled(job, logits)
        if ran:  # the prefill's device time counts as prefill, not as the next decode call's
            jax.block_until_ready(self.pool)
        self._counters["prefill_s"] += time.perf_counter() - t0 - (CLOCK.seconds - c0)

    @staticmethod
    def _needs(seq: Seq) -> int:
        return len(seq.prompt) + seq.request.params.max_tokens

    # ---- slots -------------------------------------------------------------------------------
    def _empty_slots(self) -> dict[str, np.ndarray]:
        b, half = self.max_num_seqs, self.config.head_dim // 2
        self._inputs, self._inputs_key = None, None  # the SlotInputs on the device, and whose they are
        return {"active": np.zeros(b, bool), "max_tokens": np.ones(b, np.int32), "seeds": np.zeros(b, np.uint32),
                "stop_ids": np.full((b, self._stop_width()), -1, np.int32),
                "params": [_IDLE] * b, "inv": np.zeros((b, 1, half), np.float32),
                "att": np.ones((b, 1, 1), np.float32), "page_tables": np.zeros((b, self.max_pages), np.int32)}

    def _stop_width(self, extra: int = 0) -> int:
        return 1 << max(3, math.ceil(math.log2(len(self.eos_token_ids) + extra + 1)))

    def _load_slot(self, adm) -> list[StreamEvent]:
        seq, b, sl = adm.seq, adm.slot, self._slots
        params = seq.request.params
        stops = tuple(self.eos_token_ids) + tuple(params.stop_token_ids)
        if len(stops) > sl["stop_ids"].shape[1]:  # a wider stop list (one new decode shape)
            wider = np.full((self.max_num_seqs, self._stop_width(len(params.stop_token_ids))), -1, np.int32)
            wider[:, :sl["stop_ids"].shape[1]] = sl["stop_ids"]
            sl["stop_ids"] = wider
        sl["stop_ids"][b] = -1
        sl["stop_ids"][b, :len(stops)] = stops
        sl["max_tokens"][b], sl["seeds"][b], sl["params"][b] = params.max_tokens, seq.seed, params
        inv, att = self._rope_for(np.array([self._needs(seq)]))
        sl["inv"][b], sl["att"][b] = inv[0], att[0]
        v = self.config.vocab_size
        counts = np.bincount(np.asarray(seq.tokens, np.int64), minlength=v).astype(np.int32)[:v]
        mask = np.zeros(v, bool)
        mask[np.asarray(seq.prompt)] = True
        if adm.copy is not None:
            self.pool = self.programs.copy(self.pool, np.int32(adm.copy[0]), np.int32(adm.copy[1]))
        arrays = jax.tree.map(self._put, batch_params([params]))
        self.slot_state, first = self.programs.insert(
            self.slot_state, np.int32(b), adm.logits, self._put(counts), self._put(mask), np.int32(len(seq.tokens)),
            np.int32(seq.length), arrays, self._put(np.array([seq.seed], np.uint32)))
        self._inputs_key = None  # the slot's settings changed
        first = _to_host(first)
        token, logp = int(first[0]), float(first[1:2].view(np.float32)[0])
        finish = STOP if token in stops else LENGTH if len(seq.tokens) + 1 >= params.max_tokens else 0
        top = None
        if params.logprobs:
            k = self.max_logprobs
            top = [self._top(first[2:2 + k], first[2 + k:].view(np.float32), params.logprobs)]
        return self._emit(seq, [token], [logp], seq.length, finish, top)

    @staticmethod
    def _top(ids: np.ndarray, logprobs: np.ndarray, count: int) -> list[tuple[int, float]]:
        return [(int(i), float(v)) for i, v in zip(ids[:count], logprobs[:count])]

    def _slot_inputs(self) -> SlotInputs:
        """The slots' inputs for a decode call: a slot is active only while a running sequence holds
        it (finished, aborted and preempted ones write nowhere); page tables as now held. Sent to
        the device again only when who holds which slot, with how many pages, has changed."""
        running = self.scheduler.running
        who = tuple((id(seq), seq.slot) for seq in running)
        pages = tuple(len(seq.pages) for seq in running)
        if self._inputs_key == (who, pages):
            return self._inputs
        sl, put = self._slots, self._put
        sl["page_tables"][:] = 0
        for seq in running:
            sl["page_tables"][seq.slot, :len(seq.pages)] = seq.pages
        if self._inputs_key is not None and self._inputs_key[0] == who:  # only pages were added
            self._inputs = self._inputs._replace(page_tables=put(sl["page_tables"]))
        else:
            sl["active"][:] = False
            sl["active"][[seq.slot for seq in running]] = True
            self._inputs = SlotInputs(put(sl["active"]), put(sl["max_tokens"]), put(sl["seeds"]), put(sl["stop_ids"]),
                                      jax.tree.map(put, batch_params([p if on else _IDLE for p, on in
                                                                      zip(sl["params"], sl["active"])])),
                                      (put(sl["inv"]), put(sl["att"])),
                                      put(sl["page_tables"]))
        self._inputs_key = (who, pages)
        return self._inputs

    # ---- decoding ----------------------------------------------------------------------------
    def _start_decode(self, steps: int) -> tuple[jax.Array, float, float]:
        """Dispatch a decode call of up to `steps` steps (it runs on the device; `_finish_decode` waits)."""
        t0, c0 = time.perf_counter(), CLOCK.seconds
        self.pool, self.slot_state, packed = self.programs.decode(self._weights(), self.pool, self.slot_state,
                                                                  self._slot_inputs(), np.int32(steps))
        return packed, t0, c0

    def _finish_decode(self, packed: jax.Array, t0: float, c0: float) -> list[StreamEvent]:
        out, logp, new, length, finish, *top = unpack(_to_host(packed), self.chunk, self.max_logprobs)
        self._counters["decode_s"] += time.perf_counter() - t0 - (CLOCK.seconds - c0)
        events = []
        for seq in self.scheduler.running:
            b = seq.slot
            k = int(new[b])
            if k:
                want = seq.request.params.logprobs
                tops = [self._top(top[0][b, j], top[1][b, j], want) for j in range(k)] if want else None
                events += self._emit(seq, out[b, :k].tolist(), logp[b, :k].tolist(), int(length[b]), int(finish[b]),
                                     tops)
        return events

    def _emit(self, seq: Seq, tokens: list[int], logprobs: list[float], length: int, finish: int,
              top: list | None = None) -> list[StreamEvent]:
        """Record a sequence's new tokens; end it on a finish code (STOP, LENGTH) or a stop string."""
        self.scheduler.advance(seq, tokens, logprobs, length)
        if top is not None:
            seq.top_logprobs += top
        self._counters["generated_tokens"] += len(tokens)
        reason = FINISH_REASONS.get(finish)
        stop_reason = seq.tokens[-1] if reason == "stop" else None
        if seq.request.params.stop and self.tokenizer is not None:
            cut = self._find_stop(seq.tokens, seq.emitted, seq.request.params.stop)
            if cut is not None:
                keep, stop_reason = cut
                del seq.tokens[keep:], seq.logprobs[keep:], seq.top_logprobs[keep:]
                reason = "stop"
        if reason is not None:
            self.scheduler.finish(seq, reason, stop_reason)
        event = self._event(seq, seq.tokens[seq.emitted:], finished=reason is not None,
                            logprobs=seq.logprobs[seq.emitted:], top=seq.top_logprobs[seq.emitted:])
        seq.emitted = len(seq.tokens)
        return [event]

    def _event(self, seq: Seq, new: list[int], finished: bool, logprobs: Sequence[float] = (),
               top: Sequence = ()) -> StreamEvent:
        return StreamEvent(seq.request.id, seq.index, list(new), finished, seq.finish_reason if finished else None,
                           seq.request.tag, self._completion(seq) if finished else None, list(logprobs), list(top))

    def _completion(self, seq: Seq) -> Completion:
        ids = list(seq.tokens)
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode([t for t in ids if t not in self.eos_token_ids], skip_special_tokens=True)
            if isinstance(seq.stop_reason, str) and seq.stop_reason in text:
                text = text[: text.index(seq.stop_reason)]
        return Completion(ids, seq.finish_reason, len(seq.prompt), text, seq.stop_reason, list(seq.logprobs),
                          list(seq.top_logprobs) if seq.request.params.logprobs else None)

    # ---- all at once -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] = None,
                 ) -> list[list[Completion]]:
        """Completions for each prompt (a list of `n` per prompt)."""
        for _ in self.stream(prompts, params):
            pass
        return self.last_completions

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] = None,
               ) -> Iterator[list[StreamEvent]]:
        """Adds every prompt as a request and yields, after each engine step, the events of those
        that produced tokens (`prompt_index` tells whose); other requests in the engine run along,
        their events kept for the next `step()`.

        When the iterator is exhausted, `self.last_completions` holds the completions (`n` per
        prompt) and `self.last_timings` the timings: `prefill_s` and `decode_s` are wall time in
        prefill and decode calls without compilation, `compile_s` the time spent tracing,
        lowering and compiling programs (or loading them from the persistent cache) in the call,
        `compiled` one entry per compilation (`program`, `seconds`, `cache`: hit, miss or off),
        `first_token_s` the time to the first token, `decode_tokens_per_s` new tokens over
        `decode_s`.
        """
        prompts, plist = prompt_list(prompts, params)
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            self._check_request(p, sp, None, what=f"prompt {i}")
        with _CompileWatch(self.on_compile) as watch:
            yield from self._stream(prompts, plist, watch)

    def _stream(self, prompts, plist, watch: _CompileWatch) -> Iterator[list[StreamEvent]]:
        before = dict(self._counters)
        c0, t0 = CLOCK.seconds, time.perf_counter()
        ids = [self.add_request(p, sp, _tag=i) for i, (p, sp) in enumerate(zip(prompts, plist))]
        mine = set(ids)
        completions: list[list[Completion | None]] = [[None] * sp.n for sp in plist]
        first_token = None
        try:
            while any(c is None for row in completions for c in row):
                ours = []
                for event in self.step():
                    if event.request_id not in mine:
                        self._undelivered.append(event)
                        continue
                    ours.append(event)
                    if event.completion is not None:
                        completions[event.prompt_index][event.sample_index] = event.completion
                if ours:
                    if first_token is None and any(e.token_ids for e in ours):
                        first_token = time.perf_counter() - t0
                    yield ours
        finally:
            for rid in ids:  # a caller that stops early leaves nothing running
                if rid in self.scheduler.requests:
                    self.abort(rid)
                    self._undelivered = [e for e in self._undelivered if e.request_id != rid]
        self.last_completions = completions
        self.last_timings = stream_timings({k: self._counters[k] - before[k] for k in before}, CLOCK.seconds - c0,
                                           list(watch.compiled), first_token)

    # ---- ahead-of-time lowering --------------------------------------------------------------
    def _spec(self, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        """An abstract argument, placed as `_put` would place it."""
        if self.mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            sharding = NamedSharding(self.mesh, PartitionSpec())
        else:
            sharding = self._one_device_placement()
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)

    def _abstract_pool(self, sequences: int, max_len: int) -> tuple[PagePool, int]:
        """A pool for `sequences` sequences of `max_len` tokens, abstract, and its page-table width."""
        if sequences < 1 or max_len < 1:
            raise ValueError(f"need positive sequences and max_len, got {sequences}, {max_len}")
        width = -(-max_len // self.page_size)
        pool = PagePool.abstract(self.config, sequences * width, self.page_size, self.cache_dtype,
                                 int8=self.kv_int8, per_layer=self.layer_loop == "split", mesh=self.mesh,
                                 rules=self.rules)
        return pool, width

    def _pool_spec(self) -> PagePool:
        """The engine's own page pool, as `_allocate` makes and places it, abstract."""
        pool = PagePool.abstract(self.config, self.num_pages, self.page_size, self.cache_dtype, int8=self.kv_int8,
                                 per_layer=self.layer_loop == "split", mesh=self.mesh, rules=self.rules)
        if self.mesh is None:
            pool = jax.tree.map(lambda x: self._spec(x.shape, x.dtype), pool)
        return pool

    def precompile(self, prompt_tokens: int = 1, params: SamplingParams | None = None,
                   decode: bool | Callable[[], bool] = True) -> list[dict]:
        """Compile (or load from the persistent compilation cache) the programs a first request of
        `prompt_tokens` tokens with `params` runs: prefill at each of its chunks' widths, copy
        (n > 1), insert, then decode (`decode`: a callable is asked once the others are ready), from
        their arguments' shapes alone, fed to each other as the engine will. An engine built on an
        abstract model (`qwq_jax.checkpoint.abstract_load`) so readies them while the weights are
        read (`set_model` then); that request compiles nothing it was given here. Returns the
        compilations (as `last_timings["compiled"]`; reported to `on_compile`)."""
        params = params or SamplingParams()
        self._check_request([0] * prompt_tokens, params, None)
        i32, c = jnp.int32, self.prefill_chunk
        widths = {_bucket(min(c, prompt_tokens - start), c) for start in range(0, prompt_tokens, c)}

        def like(tree):  # arrays or a program's outputs as arguments: shape, dtype, placement (no layout)
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

        with self._on_mesh(), _CompileWatch(self.on_compile) as watch:
            weights, pool = self._weights(), self.pool if self.pool is not None else self._pool_spec()
            for width in sorted(widths):
                pool, logits = like(self.programs.prefill.lower(
                    weights, pool, self._spec((1, width), i32), self._spec((1,), i32), self._spec((1,), i32),
                    self._spec((1, self.max_pages), i32), self._rope_spec(1)).compile().out_info)
            b, v = self.max_num_seqs, self.config.vocab_size
            state = SlotState(self._spec((b,), i32), self._spec((b, v), i32), self._spec((b, v), bool),
                              self._spec((b,), i32), self._spec((b,), i32))
            if self.slot_state is not None:
                state = like(self.slot_state)
            if params.n > 1:
                pool = like(self.programs.copy.lower(pool, np.int32(0), np.int32(0)).compile().out_info)
            arrays = jax.tree.map(lambda x: self._spec(x.shape, x.dtype), batch_params([params]))
            state, _ = like(self.programs.insert.lower(
                state, np.int32(0), logits, self._spec((v,), i32), self._spec((v,), bool), np.int32(0),
                np.int32(0), arrays, self._spec((1,), jnp.uint32)).compile().out_info)
            if not (decode() if callable(decode) else decode):
                return list(watch.compiled)
            stops = len(self.eos_token_ids) + len(params.stop_token_ids)
            width = self._slots["stop_ids"].shape[1]
            width = width if stops <= width else self._stop_width(len(params.stop_token_ids))
            slots = SlotInputs(self._spec((b,), bool), self._spec((b,), i32), self._spec((b,), jnp.uint32),
                               self._spec((b, width), i32),
                               jax.tree.map(lambda x: self._spec((b,) + x.shape[1:], x.dtype), arrays),
                               self._rope_spec(b), self._spec((b, self.max_pages), i32))
            self.programs.decode.lower(weights, pool, state, slots, np.int32(self.chunk)).compile()
        return list(watch.compiled)

    def _rope_spec(self, b: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        return self._spec((b, 1, self.config.head_dim // 2), jnp.float32), self._spec((b, 1, 1), jnp.float32)

    def lower_prefill(self, batch: int, tokens: int, max_len: int) -> jax.stages.Lowered:
        """One prefill call (a `tokens`-token chunk of one sequence) with a page pool sized for
        `batch` sequences of `max_len` tokens, lowered with abstract arguments: `.compile()` it for
        the mesh's devices (compile-only ones from `jax.experimental.topologies` included) to read
        its memory and cost analyses or its optimised HLO without running it. Works on an
        abstract model (`abstract_model` with sharded `jax.ShapeDtypeStruct` leaves)."""
        pool, width = self._abstract_pool(batch, max_len)
        i32 = jnp.int32
        with self._on_mesh():
            return self.programs.prefill.lower(self._weights(), pool, self._spec((1, tokens), i32),
                                               self._spec((1,), i32), self._spec((1,), i32),
                                               self._spec((1, width), i32), self._rope_spec(1))

    def lower_decode(self, batch: int, max_len: int) -> jax.stages.Lowered:
        """The decode program (up to `chunk` steps per call) for `batch` slots over a page pool
        sized for `batch` sequences of `max_len` tokens, lowered with abstract arguments (see
        `lower_prefill`)."""
        pool, width = self._abstract_pool(batch, max_len)
        b, v, i32 = batch, self.config.vocab_size, jnp.int32
        arrays = jax.tree.map(lambda x: self._spec(x.shape, x.dtype), batch_params([SamplingParams()] * b))
        slots = SlotInputs(self._spec((b,), bool), self._spec((b,), i32), self._spec((b,), jnp.uint32),
                           self._spec((b, self._stop_width()), i32), arrays, self._rope_spec(b), self._spec((b, width), i32))
        state = SlotState(self._spec((b,), i32), self._spec((b, v), i32), self._spec((b, v), bool),
                          self._spec((b,), i32), self._spec((b,), i32))
        with self._on_mesh():
            return self.programs.decode.lower(self._weights(), pool, state, slots, np.int32(self.chunk))

    def _find_stop(self, ids: list[int], emitted: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
        """(tokens to keep, stop string) when a stop string appears in the text of `ids`."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [(text.find(s), s) for s in stops if s in text]
        if not hits:
            return None
        pos, which = min(hits)
        for n in range(max(emitted, 1), len(ids) + 1):  # the first prefix whose text contains it
            if which in self.tokenizer.decode(ids[:n], skip_special_tokens=True):
                return n, which
        return len(ids), which
