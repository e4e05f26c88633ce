"""Token sampling: request parameters, penalties, temperature / top-k / top-p / min-p, and the draw.

Semantics follow vLLM's sampler, row by row, so one batch can mix requests with different settings:

1. `apply_penalties`: repetition penalty over prompt *and* output tokens (a seen token's logit is
   divided by the penalty when positive, multiplied when not, as HF and vLLM do), then frequency
   and presence penalties over *output* tokens only (`logit -= frequency * count + presence * [count > 0]`).
2. `filter_logits`: divide by the temperature, keep the top-k, then the top-p nucleus of what is
   left, then min-p (drop tokens whose probability is below `min_p` times the largest). Removed
   entries become `-inf`.
3. `sample`: one categorical draw per row with that row's own key; greedy rows (temperature below
   `GREEDY_TEMPERATURE`, i.e. 0) take the argmax of the penalised logits instead.

Everything is pure `jnp` on `[B, V]` arrays with per-row parameters in `SamplingArrays`, so it jits
once for any mix of settings (no Python branching on values). The filters find their thresholds
by bisection over each row's values (no sort of the vocabulary).

Ties: top-k keeps every logit >= the k-th largest, and top-p keeps every logit >= the smallest
logit of the nucleus, so tokens tied at a boundary are all kept (vLLM breaks such ties by sort
order, i.e. arbitrarily). Both are thresholds, which makes the result independent of sort order.

Keys are typed PRNG keys (`jax.random.key`), one per row: `row_keys(seeds, step)` folds the decode
step into the row's seed, so a seeded request draws the same tokens whatever else is in its batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS); validation only allows 0 or positive values.
GREEDY_TEMPERATURE = 1e-5

GENERATION_CONFIG = "generation_config.json"

# HF generation_config.json key -> SamplingParams field.
_HF_KEYS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "max_new_tokens": "max_tokens",
}


# The families' published sampling recommendations, used when a checkpoint's generation_config.json
# sets no sampling field (`recommended_sampling` picks one from the config and chat template).
RECOMMENDED = {
    # QwQ-32B's model card: temperature 0.6, top_p 0.95, top_k 20..40 (its generation_config: 40).
    "qwq": {"temperature": 0.6, "top_p": 0.95, "top_k": 40},
    # Every Qwen2.5 *-Instruct generation_config.json (Coder included).
    "qwen2.5-instruct": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05},
}
# generation_config.json keys that make a checkpoint's own sampling choice (max_new_tokens does not).
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "do_sample")


def recommended_sampling(config: Any, chat_template: str | None) -> str:
    """Which entry of `RECOMMENDED` fits a model (a `QwenConfig`, or None, and its chat template text).

    "qwq" for a reasoning model: its chat template handles a `<think>` block (QwQ-32B's opens one
    in the generation prompt; its older template strips `</think>` from the history), or, with no
    template to tell, the config has QwQ-32B's own fields (its 64x5120 shape with 40,960 positions,
    where Qwen2.5-32B has 32,768). Everything else of the Qwen2/2.5 architecture: "qwen2.5-instruct".
    Fields and template, never the checkpoint's name.
    """
    if chat_template:
        return "qwq" if "<think>" in chat_template or "</think>" in chat_template else "qwen2.5-instruct"
    if config is not None:
        from qwq_jax.config import QwenConfig

        qwq = QwenConfig.preset("qwq-32b")
        fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings")
        if all(getattr(config, f) == getattr(qwq, f) for f in fields):
            return "qwq"
    return "qwen2.5-instruct"


def chat_template_text(directory: str | os.PathLike) -> str | None:
    """Every chat template a model directory holds (`chat_template.jinja`, `tokenizer_config.json`), as one text."""
    directory = Path(directory)
    parts = []
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        parts.append(jinja.read_text(encoding="utf-8"))
    try:
        template = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        template = None
    if isinstance(template, str):
        parts.append(template)
    elif isinstance(template, list):
        parts += [t.get("template", "") for t in template if isinstance(t, dict)]
    return "\n".join(parts) or None


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: Any) -> bool:
    return (_is_int(x) or isinstance(x, (float, np.floating))) and math.isfinite(float(x))


def _read_generation_config(source: str | os.PathLike | dict | None) -> dict[str, Any]:
    """An HF generation_config as a dict: given as one, or the JSON file, or a directory holding it
    (missing: {})."""
    if isinstance(source, dict):
        return source
    if source is None:
        return {}
    path = Path(source)
    if path.is_dir():
        path = path / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object of sampling settings, not {type(config).__name__}")
    return config


MAX_N = 128  # samples per request at most, in the server and the sample CLI (each takes a decode slot)


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings (vLLM names and meanings). `validate()` checks them."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 or -1 = off
    top_p: float = 1.0  # in (0, 1]
    min_p: float = 0.0  # in [0, 1]
    presence_penalty: float = 0.0  # over output tokens only, in [-2, 2]
    frequency_penalty: float = 0.0  # over output tokens only, in [-2, 2]
    repetition_penalty: float = 1.0  # over prompt and output tokens, > 0
    max_tokens: int = 256  # >= 1
    stop: tuple[str, ...] = ()  # stop strings, matched by the generator on the host
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # in [0, 2**32); None = the generator picks one
    n: int = 1  # completions per prompt
    logprobs: int = 0  # the most likely tokens' log-probs to return per step (the chosen one's always)

    def __post_init__(self) -> None:
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, (str, int, np.integer)):
                value = (value,)
            elif isinstance(value, (list, tuple)):
                value = tuple(value)
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self, *, prompt_tokens: int | None = None, max_context: int | None = None,
                 vocab_size: int | None = None) -> SamplingParams:
        """Return self, or raise ValueError naming the first bad field and its value.

        With `prompt_tokens` and `max_context`, also checks the prompt plus `max_tokens` fits the context;
        with `vocab_size`, that every stop token id is one of the vocabulary's.
        """

        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} must be {rule}")

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not _is_real(getattr(self, name)):
                raise bad(name, "a finite number")
        for name in ("top_k", "max_tokens", "n", "logprobs"):
            if not _is_int(getattr(self, name)):
                raise bad(name, "an int")
        if self.temperature < 0:
            raise bad("temperature", ">= 0")
        if self.top_k < -1:
            raise bad("top_k", ">= -1 (0 or -1 turn it off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0")
        if self.max_tokens < 1:
            raise bad("max_tokens", ">= 1")
        if self.n < 1:
            raise bad("n", ">= 1")
        if self.logprobs < 0:
            raise bad("logprobs", ">= 0")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a tuple of non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a tuple of token ids >= 0")
        top_id = vocab_size if vocab_size is not None else 2**31  # the decode program holds them as int32
        if any(t >= top_id for t in self.stop_token_ids):
            raise bad("stop_token_ids", f"token ids below {top_id}" + (" (the vocabulary's size)" if vocab_size else ""))
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**32):
            raise bad("seed", "None or an int in [0, 2**32)")
        if prompt_tokens is not None and max_context is not None and prompt_tokens + self.max_tokens > max_context:
            raise ValueError(f"max_tokens={self.max_tokens} with a {prompt_tokens}-token prompt needs "
                             f"{prompt_tokens + self.max_tokens} positions, more than the context of {max_context}")
        return self

    @classmethod
    def from_generation_config(cls, source: str | os.PathLike | dict | None, **overrides: Any) -> SamplingParams:
        """Defaults from an HF generation_config (a dict, the JSON file, or a directory holding it).

        Reads temperature, top_k, top_p, min_p, the three penalties and max_new_tokens (-> max_tokens);
        `do_sample: false` means greedy (temperature 0). As in vLLM, a missing `do_sample` does not
        mean greedy, and eos ids are left to the generator. A missing file gives the defaults.
        Overrides whose value is not None win. The result is validated.
        """
        config = _read_generation_config(source)
        fields: dict[str, Any] = {ours: config[hf] for hf, ours in _HF_KEYS.items() if config.get(hf) is not None}
        if config.get("do_sample") is False:
            fields["temperature"] = 0.0
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown SamplingParams field(s): {', '.join(unknown)}")
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields).validate()

    @classmethod
    def resolve(cls, generation_config: str | os.PathLike | dict | None, family: str | None = None,
                **overrides: Any) -> tuple[SamplingParams, dict[str, dict[str, Any]]]:
        """The settings a request runs with, and where each came from.

        First match wins, field by field: an override that is not None ("flag"), then the
        checkpoint's generation_config.json ("generation_config.json"); when that file sets no
        sampling field at all (`SAMPLING_KEYS`), the family's `RECOMMENDED` values ("recommended for
        <family>"); else the SamplingParams default ("default"). A checkpoint that states its
        sampling is taken as it is: recommendations never mix into it. Returns the validated
        params and {field: {"value": v, "source": s}} for the sampling fields and max_tokens.
        """
        config = _read_generation_config(generation_config)
        own = {k for k in SAMPLING_KEYS if config.get(k) is not None}
        base = cls.from_generation_config(config)
        sources = {ours: "generation_config.json" for hf, ours in _HF_KEYS.items() if config.get(hf) is not None}
        if config.get("do_sample") is False:
            sources["temperature"] = "generation_config.json"
        if not own and family is not None:
            if family not in RECOMMENDED:
                raise ValueError(f"unknown sampling family {family!r} (known: {', '.join(RECOMMENDED)})")
            base = dataclasses.replace(base, **RECOMMENDED[family])
            sources.update({k: f"recommended for {family}" for k in RECOMMENDED[family]})
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown SamplingParams field(s): {', '.join(unknown)}")
        params = dataclasses.replace(base, **given).validate()
        sources.update({k: "flag" for k in given})
        shown = [ours for ours in _HF_KEYS.values()]
        return params, {k: {"value": getattr(params, k), "source": sources.get(k, "default")} for k in shown}


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters for a batch, each `[B]` (a pytree: pass it straight into jit)."""

    temperature: jax.Array  # f32
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # f32
    min_p: jax.Array  # f32
    presence_penalty: jax.Array  # f32
    frequency_penalty: jax.Array  # f32
    repetition_penalty: jax.Array  # f32
    logprobs: jax.Array  # int32: top log-probs wanted per step (0 = none)


def batch_params(params: Sequence[SamplingParams]) -> SamplingArrays:
    """Stack one SamplingParams per row into `SamplingArrays` of host (NumPy) arrays, which jit
    takes as they are (top_k -1 becomes 0)."""
    if not params:
        raise ValueError("batch_params needs at least one SamplingParams")

    def col(name: str, dtype: Any) -> np.ndarray:
        return np.array([getattr(p, name) for p in params], dtype=dtype)

    f32 = np.float32
    return SamplingArrays(
        temperature=col("temperature", f32),
        # a top_k past the vocabulary keeps every token, as 0 does; int32 holds any vocabulary's size
        top_k=np.array([max(min(p.top_k, 2**31 - 1), 0) for p in params], np.int32),
        top_p=col("top_p", f32),
        min_p=col("min_p", f32),
        presence_penalty=col("presence_penalty", f32),
        frequency_penalty=col("frequency_penalty", f32),
        repetition_penalty=col("repetition_penalty", f32),
        logprobs=col("logprobs", np.int32),
    )


def token_counts(tokens: jax.Array, valid: jax.Array | None, vocab_size: int) -> jax.Array:
    """How often each vocab id occurs per row: tokens `[B, T]`, valid `[B, T]` bool -> `[B, V]` int32."""
    tokens = jnp.asarray(tokens, jnp.int32)
    ones = jnp.ones(tokens.shape, jnp.int32) if valid is None else jnp.asarray(valid).astype(jnp.int32)
    rows = jnp.arange(tokens.shape[0])[:, None]
    return jnp.zeros((tokens.shape[0], vocab_size), jnp.int32).at[rows, tokens].add(ones)


def add_tokens(counts: jax.Array, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Count one new token per row: counts `[B, V]`, tokens `[B]`, valid `[B]` bool -> `[B, V]`."""
    inc = jnp.ones(tokens.shape, counts.dtype) if valid is None else jnp.asarray(valid).astype(counts.dtype)
    return counts.at[jnp.arange(counts.shape[0]), tokens].add(inc)


def apply_penalties(logits: jax.Array, arrays: SamplingArrays, output_counts: jax.Array | None,
                    prompt_mask: jax.Array | None) -> jax.Array:
    """Repetition (prompt + output), then frequency and presence (output only) penalties.

    logits `[B, V]`, output_counts `[B, V]` int (times each token was generated), prompt_mask `[B, V]`
    bool (token occurs in the prompt); None for either means no such tokens. Returns `[B, V]` f32.
    """
    logits = jnp.asarray(logits, jnp.float32)
    seen = jnp.zeros(logits.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
    if output_counts is None:
        counts = jnp.zeros(logits.shape, jnp.float32)
    else:
        counts = jnp.asarray(output_counts).astype(jnp.float32)
        seen = seen | (counts > 0)
    rep = arrays.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - arrays.frequency_penalty[:, None] * counts
    return logits - arrays.presence_penalty[:, None] * (counts > 0).astype(jnp.float32)


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys in the order of float32 `x` (-inf included; -0.0 counts as +0.0): `a < b` iff
    `key(a) < key(b)`, and every value has its own key."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.int32)
    ordered = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)  # negative floats: magnitude reversed
    return jax.lax.bitcast_convert_type(ordered, jnp.uint32) ^ jnp.uint32(0x80000000)


def _bisect(lo: jax.Array, hi: jax.Array, holds: Any, largest: bool) -> jax.Array:
    """Per row, the largest key in [lo, hi] where the monotone predicate `holds(t [B, 1]) -> [B]`
    is true (it holds at `lo`), or the smallest (it holds at `hi`): 32 halvings cover every uint32."""
    def body(_, bounds):
        lo, hi = bounds
        span = hi - lo
        if largest:
            mid = lo + (span >> 1) + (span & 1)
            ok = holds(mid[:, None])
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
        mid = lo + (span >> 1)
        ok = holds(mid[:, None])
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def filter_logits(logits: jax.Array, arrays: SamplingArrays) -> jax.Array:
    """Temperature, then top-k, top-p and min-p, per row; removed entries are `-inf`. `[B, V]` f32.

    Greedy rows are filtered at temperature 1 (their argmax, which `sample` takes, is always kept).
    Top-p follows vLLM: in ascending order, drop the tokens whose cumulative probability is
    <= 1 - top_p (always keeping the largest); top_p >= 1 turns it off. See the module docstring on
    ties. Both thresholds are found by bisection over the values' order (32 masked counts or sums
    of each row), not by sorting the vocabulary: XLA's CPU sort of 8 rows of 152k logits takes
    ~0.4 s, most of a sampled decode step there.
    """
    logits = jnp.asarray(logits, jnp.float32)
    vocab = logits.shape[-1]
    neg_inf = jnp.float32(-jnp.inf)
    greedy = arrays.temperature < GREEDY_TEMPERATURE
    temperature = jnp.where(greedy, 1.0, arrays.temperature).astype(jnp.float32)
    logits = logits / temperature[:, None]
    keys = _order_keys(logits)
    low = jnp.zeros(logits.shape[:1], jnp.uint32)
    top = jnp.max(keys, axis=-1)  # the largest logit's key: always kept

    # Top-k: the k-th largest logit, i.e. the largest key t with at least k logits >= t (ties kept).
    k = arrays.top_k.astype(jnp.int32)
    use_k = (k > 0) & (k < vocab)

    def kth() -> jax.Array:
        t = _bisect(low, top, lambda t: jnp.sum(keys >= t, axis=-1, dtype=jnp.int32) >= k, largest=True)
        return jnp.where(use_k, t, low)

    t_k = jax.lax.cond(jnp.any(use_k), kth, lambda: low)
    # Top-p on what top-k left: the smallest logit v whose cumulative probability (every logit <= v)
    # exceeds 1 - top_p; the largest logit when none does.
    use_p = arrays.top_p < 1.0

    def pth() -> jax.Array:
        probs = jax.nn.softmax(jnp.where(keys >= t_k[:, None], logits, neg_inf), axis=-1)
        drop = 1.0 - arrays.top_p
        t = _bisect(low, top, lambda t: jnp.sum(jnp.where(keys <= t, probs, 0.0), axis=-1) > drop, largest=False)
        return jnp.where(use_p, jnp.minimum(t, top), low)  # (a total that rounds to <= 1 - top_p: the largest)

    t_p = jax.lax.cond(jnp.any(use_p), pth, lambda: low)
    logits = jnp.where(keys >= jnp.maximum(t_k, t_p)[:, None], logits, neg_inf)
    # Min-p relative to the most likely token.
    probs = jax.nn.softmax(logits, axis=-1)
    threshold = arrays.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < threshold, neg_inf, logits)


def sample(logits: jax.Array, arrays: SamplingArrays, keys: jax.Array, output_counts: jax.Array | None = None,
           prompt_mask: jax.Array | None = None) -> jax.Array:
    """Next token per row, `[B]` int32: penalties, filters, then a draw with the row's key `keys[b]`.

    keys: `[B]` typed PRNG keys (see `row_keys`). Greedy rows return the argmax of the penalised
    logits and ignore their key. The same keys and inputs give the same tokens.
    """
    penalised = apply_penalties(logits, arrays, output_counts, prompt_mask)
    greedy = jnp.argmax(penalised, axis=-1).astype(jnp.int32)
    is_greedy = arrays.temperature < GREEDY_TEMPERATURE

    def draw() -> jax.Array:
        filtered = filter_logits(penalised, arrays)
        drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered)
        return jnp.where(is_greedy, greedy, drawn.astype(jnp.int32))

    # An all-greedy batch skips the filters and the draw (a decode step's largest
    # non-matmul cost at small batches).
    return jax.lax.cond(jnp.all(is_greedy), lambda: greedy, draw)


def row_keys(seeds: jax.Array, step: int | jax.Array, sample_index: jax.Array | None = None) -> jax.Array:
    """Typed keys `[B]`: `fold_in(key(seed_b), step_b)`, jittable with a traced step.

    seeds: `[B]` in [0, 2**32) (int32 or uint32 bits). step: one decode step for all rows, or `[B]`
    (each row's own count of generated tokens). The key depends only on the row's own seed and step
    (and `sample_index[b]`, if given: `fold_in(fold_in(key(seed), index), step)`, for the n > 1
    completions of one seeded request), so a request samples the same tokens in any batch.
    """
    seeds = jnp.asarray(seeds).astype(jnp.uint32)
    steps = jnp.broadcast_to(jnp.asarray(step).astype(jnp.uint32), seeds.shape)
    base = jax.vmap(jax.random.key)(seeds)
    if sample_index is not None:
        base = jax.vmap(jax.random.fold_in)(base, jnp.asarray(sample_index).astype(jnp.uint32))
    return jax.vmap(jax.random.fold_in)(base, steps)
