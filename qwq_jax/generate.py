"""Batched generation: one prefill for a batch of ragged prompts, then a jitted decode loop.

    engine = Engine(model, tokenizer)
    outs = engine.generate([prompt_ids, ...], SamplingParams(temperature=0.6, max_tokens=256, n=4))
    for event in engine.stream(...):  # chunks of new tokens per row, as they are produced

Prompts longer than `prefill_chunk` tokens (default 2048) are prefilled in chunks of that many
tokens, each written into the (donated) cache before the next attends to it blockwise, so memory
grows with the chunk, not the prompt: a 131,072-token prompt is 64 calls of one compiled shape.

The decode loop runs inside `jax.lax.while_loop` in chunks of `chunk` tokens (no Python per
token; the first call stops after one token so it streams at once, the step count being a runtime
bound of one compiled program); the host only looks at the output between chunks, for streaming
and stop strings.
Each of the `n` samples of a prompt reuses that prompt's prefill. Row b draws with the key
`fold_in(key(seed_b), step)`, so a seed gives the same text whatever else is in the batch.

Layer loop (`layer_loop`; same tokens every way):
    scan      the decoder layers' stacked `[L, ...]` weights, run by `lax.scan` (compiles once
              per layer shape, whatever the depth)
    unrolled  the decode step as straight-line code over static slices of the stacks
    split     each layer's weights copied into arrays of their own at construction (one layer at a
              time; `donate_weights=True` frees the stacks as it goes, leaving `model` unusable),
              prefill and decode run straight through them: no slice of a stack exists, so none
              can be copied before its matmul, and a decode step reads every weight where it lies
A compiler may copy each layer's slice of a stack out before its matmul: XLA for an H100 does for
`scan` (one to three extra writes and reads of every weight per decode step for the QwQ-32B
shape, `benchmarks/gpu_aot.py`), XLA on CPU for `scan` and `unrolled` alike. With `split` the KV
cache is one buffer per layer as well (`KVCache.init(per_layer=True)`), so attention reads its
layer's cache in place too. `benchmarks/decode.py --layer-loop scan unrolled split` times all
three and reports the copies it finds in each compiled decode step.

Long context: with a YaRN config, `rope_scaling="auto"` (default) uses plain RoPE for a
request whose prompt + max_tokens fits the original context and YaRN only for longer ones
(what the model card recommends); `"static"` always applies YaRN, `"off"` never.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwq_jax import rope as rope_lib
from qwq_jax.cache import KVCache
from qwq_jax.compile_cache import CLOCK
from qwq_jax.model import Qwen2, split_layers
from qwq_jax.sampling import SamplingParams, batch_params, sample

ROPE_MODES = ("auto", "static", "off")
LAYER_LOOPS = ("scan", "unrolled", "split")
PREFILL_CHUNK = 2048  # tokens per prefill call by default (Engine(prefill_chunk=...))
_RUNNING, _STOP, _LENGTH = 0, 1, 2
FINISH_REASONS = {_STOP: "stop", _LENGTH: "length"}


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


def _bucket(n: int) -> int:
    """Shape buckets so requests of similar lengths share compilations: 64, 128, 256, ... then steps of 1024."""
    if n <= 1024:
        return 1 << max(6, math.ceil(math.log2(max(n, 1))))
    return _round_up(n, 1024)


# The engine's own programs (jit function names) and what the status lines call them.
_PROGRAMS = {"_prefill_fn": "prefill", "_logits_fn": "logits", "_decode_fn": "decode"}


class _CompileWatch:
    """Reports each compilation of the engine's programs to `on_compile` while a `stream` runs:
    `on_compile("start", program, {})` when tracing ends (XLA compilation or a cache load follows),
    `on_compile("end", program, {"seconds": s, "cache": "hit" | "miss" | "off"})` when it is done."""

    def __init__(self, on_compile: Callable[[str, str, dict], None] | None):
        self.on_compile = on_compile
        self.current: tuple[str, float, int, int] | None = None
        self.compiled: list[dict] = []

    def __enter__(self) -> "_CompileWatch":
        CLOCK.watchers.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        CLOCK.watchers.remove(self)

    def __call__(self, event: str, fun_name: str, duration: float) -> None:
        program = next((label for name, label in _PROGRAMS.items() if name in fun_name), None)
        if program is None:
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
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@dataclasses.dataclass
class Completion:
    """One generated sequence."""

    token_ids: list[int]
    finish_reason: str                # "stop" (EOS, stop token or stop string) or "length"
    prompt_tokens: int
    text: str | None = None           # decoded, when the engine has a tokenizer
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[float] | None = None   # log-prob of each token under the model (before temperature etc.)


@dataclasses.dataclass
class StreamEvent:
    """New tokens of one row since the last event."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    finished: bool
    finish_reason: str | None


@dataclasses.dataclass
class _Rows:
    prompt_of: np.ndarray      # [B] prompt index of each row (-1 = padding row)
    sample_of: np.ndarray      # [B] sample index within its prompt
    params: list[SamplingParams]
    prompt_lens: np.ndarray    # [B]


class Engine:
    """Generation over a model (optionally sharded on `mesh` by the `generate` rules)."""

    def __init__(self, model: Qwen2, tokenizer: Any = None, *, mesh: Any = None, rules: Any = "generate",
                 cache_dtype: Any = None, chunk: int = 16, rope_scaling: str = "auto",
                 prefill_chunk: int | None = PREFILL_CHUNK, layer_loop: str = "scan", donate_weights: bool = False,
                 on_compile: Callable[[str, str, dict], None] | None = None):
        if rope_scaling not in ROPE_MODES:
            raise ValueError(f"rope_scaling={rope_scaling!r} must be one of {', '.join(ROPE_MODES)}")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk={prefill_chunk!r} must be a positive number of tokens (or None: "
                             "every prompt in one call)")
        if layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop={layer_loop!r} must be one of {', '.join(LAYER_LOOPS)}")
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r} must be a positive number of decode steps")
        self.prefill_chunk = prefill_chunk
        self.config = model.config  # the weights live in self.params only (the caller may free `model`)
        self.tokenizer = tokenizer
        self.mesh, self.rules = mesh, rules
        self.cache_dtype = jnp.dtype(cache_dtype) if cache_dtype is not None else model.dtype
        self.compute_dtype = jnp.dtype(model.dtype)
        self.chunk = chunk
        self.layer_loop = layer_loop
        self.rope_scaling = rope_scaling
        self.graphdef, self.params = nnx.split(model)
        self.layer_params = None
        if layer_loop == "split":
            self.layer_params = split_layers(self.params["layers"], donate=donate_weights)
            # The graph still has `layers`; give it layer 0's arrays (the same buffers, no copy).
            self.params["layers"] = self.layer_params[0]
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(4,))
        self._last_logits = jax.jit(self._logits_fn)
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))  # steps: a runtime bound, one program
        self.eos_token_ids = self._eos_ids()
        # Called as on_compile("start" | "end", program, info) around each compilation of the
        # prefill/logits/decode programs (see _CompileWatch); `last_timings` reports them either way.
        self.on_compile = on_compile
        CLOCK.register()

    # ---- set-up -----------------------------------------------------------------------------
    def _eos_ids(self) -> tuple[int, ...]:
        ids = list(getattr(self.tokenizer, "eos_token_ids", None) or ())
        eos = self.config.eos_token_id
        ids += list(eos) if isinstance(eos, tuple) else ([eos] if eos is not None else [])
        return tuple(dict.fromkeys(int(i) for i in ids))

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        from sharding.rules import batch_shards

        return batch_shards(self.mesh, self.rules)

    def _put(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            # Committed to the device, as the decode loop's outputs are: an uncommitted input would
            # make the second decode call compile the loop again for the committed state it returns.
            return jax.device_put(x, self._device())
        from sharding import batch_sharding, put_global

        return put_global(x, batch_sharding(self.mesh, self.rules, x.ndim))

    def _device(self) -> Any:
        """The one device of an engine without a mesh: where the weights are (else the default)."""
        if getattr(self, "_one_device", None) is None:
            leaf = jax.tree.leaves(self.params)[0]
            self._one_device = next(iter(leaf.devices())) if isinstance(leaf, jax.Array) else jax.devices()[0]
        return self._one_device

    def _rope_for(self, needs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-row rotary frequencies `[B, 1, D/2]` and attention factors `[B, 1, 1]`."""
        plain, _ = rope_lib.inv_frequencies(self.config, scaled=False)
        scaled, factor = rope_lib.inv_frequencies(self.config)
        has_scaling = self.config.rope_scaling is not None
        if self.rope_scaling == "static" or (self.rope_scaling == "auto" and has_scaling):
            use = np.full(needs.shape, True) if self.rope_scaling == "static" else \
                needs > self.config.original_max_position_embeddings
            use &= has_scaling
        else:
            use = np.zeros(needs.shape, bool)
        inv = np.where(use[:, None, None], scaled[None, None], plain[None, None]).astype(np.float32)
        att = np.where(use, factor, 1.0).astype(np.float32)[:, None, None]
        return inv, att

    def max_context(self) -> int:
        return self.config.max_position_embeddings if self.rope_scaling == "off" else self.config.max_context

    # ---- jitted pieces ----------------------------------------------------------------------
    def _prefill_fn(self, params, tokens, remaining, rope, cache, last):
        """One prefill chunk `tokens [B, T]`: row b has `remaining[b]` prompt tokens from this chunk's
        start on (<= 0: none left; > T: more chunks follow). Writes them into the cache and keeps, in
        `last [B, 1, E]`, the hidden state of each row's final prompt token once it has been seen."""
        model, layers = self._merge(params)
        t = tokens.shape[1]
        here = jnp.clip(remaining, 0, t)
        segments = (jnp.arange(t)[None, :] < here[:, None]).astype(jnp.int32)
        x, cache, _ = model.hidden_states(tokens, segment_ids=segments, cache=cache, rope=rope, layers=layers)
        final = jnp.take_along_axis(x, jnp.maximum(here - 1, 0)[:, None, None], axis=1)  # [B, 1, E]
        ends_here = (remaining >= 1) & (remaining <= t)
        return cache, jnp.where(ends_here[:, None, None], final.astype(last.dtype), last)

    def _weights(self):
        """What the jitted pieces take as weights: the model's state and the split layers (or None)."""
        return self.params, self.layer_params

    def _merge(self, weights):
        params, layers = weights
        return nnx.merge(self.graphdef, params), layers

    def _logits_fn(self, weights, last):
        return self._merge(weights)[0].logits(last)[:, 0]

    def _decode_fn(self, weights, state, consts, steps: jax.Array):
        model, layers = self._merge(weights)
        arrays, seeds, max_tokens, stop_ids, prompt_mask, rope = consts
        max_new = state["out"].shape[1]

        def cond(carry):
            i, s = carry
            return (i < steps) & ~jnp.all(s["done"])

        def body(carry):
            i, s = carry
            done, count = s["done"], s["count"]
            # Row b's key at its own step: fold_in(key(seed_b), count_b) (= sampling.row_keys per row).
            keys = jax.vmap(lambda seed, c: jax.random.fold_in(jax.random.key(seed), c))(seeds, count.astype(jnp.uint32))
            tok = sample(s["logits"], arrays, keys, s["counts"], prompt_mask).astype(jnp.int32)
            tok = jnp.where(done, 0, tok)
            rows = jnp.arange(tok.shape[0])
            out = s["out"].at[rows, jnp.where(done, max_new, count)].set(tok, mode="drop")
            lp = jnp.take_along_axis(jax.nn.log_softmax(s["logits"].astype(jnp.float32), axis=-1), tok[:, None],
                                     axis=1)[:, 0]
            logp = s["logp"].at[rows, jnp.where(done, max_new, count)].set(lp, mode="drop")
            counts = s["counts"].at[rows, tok].add(jnp.where(done, 0, 1))
            new_count = count + jnp.where(done, 0, 1)
            hit = jnp.any(tok[:, None] == stop_ids, axis=1) & ~done
            full = (new_count >= max_tokens) & ~done & ~hit
            finish = jnp.where(hit, _STOP, jnp.where(full, _LENGTH, s["finish"]))
            x, cache, _ = model.hidden_states(tok[:, None], cache=s["cache"], rope=rope, layers=layers,
                                              unroll_layers=self.layer_loop == "unrolled")
            logits = model.logits(x)[:, 0]
            s = dict(s, out=out, logp=logp, counts=counts, count=new_count, done=done | hit | full, finish=finish,
                     cache=cache, logits=logits)
            return i + 1, s

        _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
        return state

    # ---- ahead-of-time lowering --------------------------------------------------------------
    def _spec(self, shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        """An abstract `[batch, ...]` argument, placed as `_put` would place it."""
        sharding = None
        if self.mesh is not None:
            from sharding import batch_sharding

            sharding = batch_sharding(self.mesh, self.rules, len(shape))
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)

    def _abstract_cache(self, batch: int, max_len: int) -> KVCache:
        per_layer = self.layer_loop == "split"
        shapes = KVCache.shapes(self.config, batch, max_len, per_layer)
        shardings = KVCache.shardings(self.mesh, self.rules, per_layer)[:2] if self.mesh is not None else (None, None)
        k, v = (jax.ShapeDtypeStruct(shape, self.cache_dtype, sharding=sh) for shape, sh in zip(shapes, shardings))
        if per_layer:
            k, v = (k,) * self.config.num_layers, (v,) * self.config.num_layers
        return KVCache(k, v, self._spec((batch,), jnp.int32))

    def _check_rows(self, batch: int, max_len: int) -> None:
        if batch < 1 or batch % self._batch_multiple():
            raise ValueError(f"batch={batch} must be a positive multiple of {self._batch_multiple()} (the mesh's "
                             "batch shards)")
        if max_len < 1:
            raise ValueError(f"max_len={max_len} must be a positive number of cache slots")

    def lower_prefill(self, batch: int, tokens: int, max_len: int) -> jax.stages.Lowered:
        """The prefill call for `batch` rows of a `tokens`-token chunk into a `max_len`-slot cache,
        lowered with abstract arguments: `.compile()` it for the mesh's devices (compile-only ones
        from `jax.experimental.topologies` included) to read its memory and cost analyses or its
        optimised HLO without running it. Works on an abstract model (`abstract_model` with
        sharded `jax.ShapeDtypeStruct` leaves)."""
        self._check_rows(batch, max_len)
        b, c = batch, self.config
        rope = (self._spec((b, 1, c.head_dim // 2), jnp.float32), self._spec((b, 1, 1), jnp.float32))
        return self._prefill.lower(self._weights(), self._spec((b, tokens), jnp.int32), self._spec((b,), jnp.int32),
                                   rope, self._abstract_cache(b, max_len),
                                   self._spec((b, 1, c.hidden_size), self.compute_dtype))

    def lower_decode(self, batch: int, max_len: int, max_new: int | None = None) -> jax.stages.Lowered:
        """The decode loop (up to a runtime number of steps per call) for `batch` rows with a
        `max_len`-slot cache and room for `max_new` new tokens, lowered with abstract arguments
        (see `lower_prefill`)."""
        self._check_rows(batch, max_len)
        b, c = batch, self.config
        max_new = max_len if max_new is None else max_new
        logits = jax.eval_shape(self._logits_fn, self._weights(),
                                self._spec((b, 1, c.hidden_size), self.compute_dtype))
        arrays = jax.tree.map(lambda x: self._spec(x.shape, x.dtype), batch_params([SamplingParams()] * b))
        rope = (self._spec((b, 1, c.head_dim // 2), jnp.float32), self._spec((b, 1, 1), jnp.float32))
        stop_width = max(1, len(self.eos_token_ids))
        consts = (arrays, self._spec((b,), jnp.uint32), self._spec((b,), jnp.int32),
                  self._spec((b, stop_width), jnp.int32), self._spec((b, c.vocab_size), bool), rope)
        state = {"cache": self._abstract_cache(b, max_len), "logits": self._spec(logits.shape, logits.dtype),
                 "out": self._spec((b, max_new), jnp.int32), "logp": self._spec((b, max_new), jnp.float32),
                 "count": self._spec((b,), jnp.int32), "done": self._spec((b,), bool),
                 "finish": self._spec((b,), jnp.int32), "counts": self._spec((b, c.vocab_size), jnp.int32)}
        return self._decode.lower(self._weights(), state, consts, steps=np.int32(self.chunk))

    # ---- public API -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] = None,
                 ) -> list[list[Completion]]:
        """Completions for each prompt (a list of `n` per prompt)."""
        for _ in self.stream(prompts, params):
            pass
        return self.last_completions

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] = None,
               ) -> Iterator[list[StreamEvent]]:
        """Yields, after each decode chunk, the new tokens of every row that produced some.

        When the iterator is exhausted, `self.last_completions` holds the final completions and
        `self.last_timings` the timings: `prefill_s` and `decode_s` are wall time without
        compilation, `compile_s` (= `prefill_compile_s` + `decode_compile_s`) the time spent
        tracing, lowering and compiling programs (or loading them from the persistent cache) in
        the call, `compiled` one entry per compilation of the prefill/logits/decode programs
        (`program`, `seconds`, `cache`: hit, miss or off), and `decode_tokens_per_s` the new
        tokens over `decode_s`.
        """
        with _CompileWatch(self.on_compile) as watch:
            yield from self._stream(prompts, params, watch)

    def _stream(self, prompts, params, watch: _CompileWatch) -> Iterator[list[StreamEvent]]:
        c0 = CLOCK.seconds
        t0 = time.perf_counter()
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise ValueError("prompts is empty")
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if max(p) >= self.config.vocab_size or min(p) < 0:
                raise ValueError(f"prompt {i} has token ids outside 0..{self.config.vocab_size - 1}")
            sp.validate(prompt_tokens=len(p), max_context=self.max_context())

        # Rows: n samples per prompt, padded to the batch sharding.
        prompt_of, sample_of = [], []
        for i, sp in enumerate(plist):
            prompt_of += [i] * sp.n
            sample_of += list(range(sp.n))
        b_real = len(prompt_of)
        b = _round_up(b_real, self._batch_multiple())
        prompt_of += [-1] * (b - b_real)
        sample_of += [0] * (b - b_real)
        rows = _Rows(np.array(prompt_of), np.array(sample_of),
                     [plist[i] if i >= 0 else SamplingParams(max_tokens=1) for i in prompt_of],
                     np.array([len(prompts[i]) if i >= 0 else 1 for i in prompt_of]))
        max_new = max(sp.max_tokens for sp in rows.params)
        longest = max(len(p) for p in prompts)
        step = _bucket(longest)
        if self.prefill_chunk is not None and longest > self.prefill_chunk:
            step = self.prefill_chunk
        n_chunks = math.ceil(longest / step)
        # Every chunk writes `step` slots from each row's length on: the cache holds them all.
        max_len = max(_bucket(max(len(p) + sp.max_tokens for p, sp in zip(prompts, plist))), n_chunks * step)

        # Prefill every row (rows of one prompt are identical; XLA work is per row either way, and
        # batched calls keep shapes static). Padding rows get a one-token prompt.
        tokens = np.zeros((b, n_chunks * step), np.int32)
        for r, i in enumerate(rows.prompt_of):
            if i >= 0:
                tokens[r, : len(prompts[i])] = prompts[i]
        needs = np.array([len(prompts[i]) + plist[i].max_tokens if i >= 0 else 1 for i in rows.prompt_of])
        inv, att = self._rope_for(needs)
        rope = (self._put(inv), self._put(att))
        cache = KVCache.init(self.config, b, max_len, self.cache_dtype, self.mesh, self.rules,
                             per_layer=self.layer_loop == "split")
        last = self._put(np.zeros((b, 1, self.config.hidden_size), self.compute_dtype))
        for c in range(n_chunks):
            remaining = self._put((rows.prompt_lens - c * step).astype(np.int32))
            cache, last = self._prefill(self._weights(), self._put(tokens[:, c * step:(c + 1) * step]), remaining,
                                        rope, cache, last)
        logits = self._last_logits(self._weights(), last)
        jax.block_until_ready(logits)
        c1, t_decode = CLOCK.seconds, time.perf_counter()  # decoding (its set-up included) starts here
        self.last_timings = {"prefill_s": time.perf_counter() - t0 - (c1 - c0), "prefill_compile_s": c1 - c0,
                             "prefill_chunks": n_chunks}

        # Per-row constants.
        seeds = np.zeros(b, np.uint32)
        entropy = np.random.SeedSequence().generate_state(b)
        for r, sp in enumerate(rows.params):
            seeds[r] = (sp.seed + int(rows.sample_of[r])) % 2**32 if sp.seed is not None else entropy[r]
        stops = [tuple(self.eos_token_ids) + tuple(sp.stop_token_ids) for sp in rows.params]
        stop_ids = np.full((b, max(1, max(len(s) for s in stops))), -1, np.int32)
        for r, s in enumerate(stops):
            stop_ids[r, : len(s)] = s
        prompt_mask = np.zeros((b, self.config.vocab_size), bool)
        for r in range(b):
            prompt_mask[r, tokens[r, : rows.prompt_lens[r]]] = True
        max_tokens = np.array([sp.max_tokens for sp in rows.params], np.int32)
        arrays = jax.tree.map(lambda x: self._put(np.asarray(x)), batch_params(rows.params))
        consts = (arrays, self._put(seeds), self._put(max_tokens), self._put(stop_ids),
                  self._put(prompt_mask), rope)
        done0 = rows.prompt_of < 0
        state = {"cache": cache, "logits": logits, "out": self._put(np.zeros((b, max_new), np.int32)),
                 "logp": self._put(np.zeros((b, max_new), np.float32)),
                 "count": self._put(np.zeros(b, np.int32)), "done": self._put(done0),
                 "finish": self._put(np.where(done0, _LENGTH, _RUNNING).astype(np.int32)),
                 "counts": self._put(np.zeros((b, self.config.vocab_size), np.int32))}

        # Decode in chunks; stream what each chunk produced; apply stop strings on the host.
        emitted = np.zeros(b, np.int64)
        finished = done0.copy()
        stop_reason: dict[int, Any] = {}
        steps = 1  # the first call stops after one token, so it streams at once; then `chunk` per call
        while not finished.all():
            state = self._decode(self._weights(), state, consts, steps=np.int32(steps))
            steps = self.chunk
            out, count, done, finish = (np.array(_to_host(state[k])) for k in ("out", "count", "done", "finish"))
            events, host_stopped = [], []
            for r in range(b):
                if finished[r]:
                    continue
                new = out[r, emitted[r]:count[r]].tolist()
                reason = FINISH_REASONS.get(int(finish[r])) if done[r] else None
                if done[r] and finish[r] == _STOP and new and new[-1] in stop_ids[r]:
                    stop_reason[r] = new[-1]
                stop_strs = rows.params[r].stop
                if stop_strs and self.tokenizer is not None and new:
                    cut = self._find_stop(out[r, : count[r]].tolist(), int(emitted[r]), stop_strs)
                    if cut is not None:
                        n_keep, which = cut
                        new = out[r, emitted[r]:n_keep].tolist()
                        count[r] = n_keep
                        reason, stop_reason[r] = "stop", which
                        host_stopped.append(r)
                emitted[r] += len(new)
                if reason is not None:
                    finished[r] = True
                if rows.prompt_of[r] >= 0 and (new or reason):
                    events.append(StreamEvent(int(rows.prompt_of[r]), int(rows.sample_of[r]), new,
                                              reason is not None, reason))
            if host_stopped:
                mask = np.zeros(b, bool)
                mask[host_stopped] = True
                state["done"] = state["done"] | self._put(mask)
                state["count"] = self._put(count.astype(np.int32))
            if events:
                yield events
        out = _to_host(state["out"])
        logp = _to_host(state["logp"])
        finish = _to_host(state["finish"])
        c2 = CLOCK.seconds
        decode_s = time.perf_counter() - t_decode - (c2 - c1)
        self.last_timings.update(decode_s=decode_s, decode_compile_s=c2 - c1, compile_s=c2 - c0,
                                 compiled=list(watch.compiled), decode_tokens=int(emitted.sum()),
                                 decode_tokens_per_s=float(emitted[: b_real].sum() / max(decode_s, 1e-9)))

        completions: list[list[Completion]] = [[None] * sp.n for sp in plist]  # type: ignore[list-item]
        for r in range(b_real):
            i, j = int(rows.prompt_of[r]), int(rows.sample_of[r])
            ids = out[r, : emitted[r]].tolist()
            reason = "stop" if r in stop_reason else FINISH_REASONS.get(int(finish[r]), "length")
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode([t for t in ids if t not in self.eos_token_ids],
                                             skip_special_tokens=True)
                stop = stop_reason.get(r)
                if isinstance(stop, str) and stop in text:
                    text = text[: text.index(stop)]
            completions[i][j] = Completion(ids, reason, len(prompts[i]), text, stop_reason.get(r),
                                           logp[r, : emitted[r]].tolist())
        self.last_completions = completions

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
