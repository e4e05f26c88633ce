"""GRPO-family training on any mesh: rollouts with the generation engine, group advantages,
and a jitted train step (fp32 master weights, compute in the model dtype, AdamW with warmup +
cosine decay, global-norm clipping, gradient accumulation over micro-batches).

    trainer = GRPOTrainer(model, GRPOConfig(...), reward_fn, tokenizer=tok, mesh=mesh)
    metrics = trainer.step(prompts)        # one rollout + one update; returns a metrics dict

`reward_fn(prompt_indices, completions)` scores a list of completions (`Completion`s of the
generation engine; `prompt_indices[i]` is the index into `prompts` of completion i) and returns
either the rewards (a sequence of floats) or a mapping of named reward arrays with the total
under "reward" (the others are logged as components). It must accept empty lists. In a
multi-process run each process scores its own share of the completions and the results are
gathered, so a slow reward (code execution) is spread over the hosts.

The trainer reads as rollout -> score -> update: `rollout` syncs the engine and samples
`group_size` completions per prompt, `score` runs the reward, `make_batch` turns them into a
host batch (group advantages, DAPO's dynamic sampling and overlong shaping) and `update` runs the
jitted optimizer step. The weights it reads and writes are laid out by `WeightCopies`
(qwq_jax/rl/weights.py: the fp32 masters and their `train` sharding, the compute copy of an
update, the rollout engine's copy, the KL reference and a LoRA run's frozen base); the trainer
holds the masters (`params`, only the adapters with LoRA) and the AdamW state beside them, both
all a checkpoint holds (`state()`). Batches are split over `data` x `fsdp`. Micro-batches are
strided (rows i, i+n, i+2n, ...) so each is spread evenly over the batch shards, and every loss
term is normalised by the whole batch's denominators, so any number of micro-batches gives the
same update as one (see `losses.batch_normalizers`).
"""

from __future__ import annotations

import math

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qwq_jax.generate import Completion, Engine
from qwq_jax.model import Qwen2, as_dtype
from qwq_jax.replicas import BATCH_AXES, ReplicatedEngine, replica_axes, replicas_of
from qwq_jax.rl.losses import (TIS_CAP, LossConfig, batch_normalizers, check_tis_cap, dynamic_sampling_keep,
                               group_advantages, overlong_penalty, policy_loss)
from qwq_jax.rl.weights import COMPUTE_COPIES, ROLLOUT_WEIGHTS, WeightCopies
from qwq_jax.sampling import SamplingParams

RewardFn = Callable[[Sequence[int], Sequence[Completion]], "Mapping[str, Sequence[float]] | Sequence[float]"]


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    loss: str = "grpo"               # grpo | dapo | dr_grpo | gspo
    group_size: int = 4              # completions per prompt
    max_tokens: int = 32             # completion length
    temperature: float = 1.0
    top_p: float = 1.0
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.99
    mu_dtype: str | None = None      # AdamW first moment dtype (None: the params', float32)
    micro_batches: int = 1           # gradient accumulation
    kl_beta: float | None = None     # default: the loss kind's
    clip_low: float | None = None    # epsilon_low of the clipped surrogate (default: the loss kind's; gspo 3e-4)
    clip_high: float | None = None   # epsilon_high (default: the loss kind's; dapo 0.28, gspo 4e-4)
    tis: bool | None = None          # truncated importance sampling of the engine's log-probs (default: on
                                     # when the engine computes in another dtype than the update, or on int8
                                     # weights / KV cache; both sides' log-probs are of the untempered model)
    tis_cap: float = TIS_CAP         # the TIS truncation C: weights min(exp(old_logp - engine_logp), C)
    dynamic_sampling: bool | None = None  # drop all-equal groups (default: on for dapo)
    overlong_buffer: int = 0         # DAPO soft overlong punishment buffer (0: off)
    rollout_weights: str = "split"   # what the engine decodes from (qwq_jax/rl/weights.py): split, a model-dtype
                                     # copy in the generate layout, one array per layer; master, the fp32 masters
    compute_copy: str = "split"      # what the update runs on (qwq_jax/rl/weights.py): split, the masters cast
                                     # to the compute dtype once per update, one array per layer; step, that
                                     # copy stacked [L, ...]; micro_batch, each weight cast where it is used
    seed: int = 0

    def __post_init__(self):
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("group_size", "max_tokens", "micro_batches", "total_steps", "warmup_steps", "overlong_buffer",
                     "seed"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p", "learning_rate", "weight_decay", "clip_norm", "adam_b1", "adam_b2",
                     "tis_cap", "kl_beta", "clip_low", "clip_high"):
            value = getattr(self, name)
            if not (number(value) or (value is None and name in ("kl_beta", "clip_low", "clip_high"))):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("warmup_steps", "overlong_buffer", "seed", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_b1", "adam_b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        # the rollouts' sampling settings, checked as the engine will check them
        SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens).validate()
        for name in ("group_size", "max_tokens", "micro_batches", "total_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate < 0 or self.clip_norm <= 0:
            raise ValueError(f"learning_rate must be >= 0 and clip_norm > 0 (got {self.learning_rate}, "
                             f"{self.clip_norm})")
        if self.rollout_weights not in ROLLOUT_WEIGHTS:
            raise ValueError(f"rollout_weights must be one of {', '.join(ROLLOUT_WEIGHTS)}, "
                             f"got {self.rollout_weights!r}")
        if self.compute_copy not in COMPUTE_COPIES:
            raise ValueError(f"compute_copy must be one of {', '.join(COMPUTE_COPIES)}, got {self.compute_copy!r}")
        if self.tis is not None and not isinstance(self.tis, bool):
            raise ValueError(f"tis must be true, false or unset (on when the engine's numerics differ), "
                             f"got {self.tis!r}")
        check_tis_cap(self.tis_cap)
        self.loss_config()  # validates the loss kind and its overrides

    def loss_config(self, engine_differs: bool = False) -> LossConfig:
        """The loss of this config; TIS (`tis_cap` set) when `tis`, or when unset and `engine_differs`
        (the rollout engine's numerics differ from the update's: `losses.tis_default`)."""
        overrides: dict[str, Any] = {k: getattr(self, k) for k in ("kl_beta", "clip_low", "clip_high")
                                     if getattr(self, k) is not None}
        if self.tis if self.tis is not None else engine_differs:
            overrides["tis_cap"] = float(self.tis_cap)
        if self.loss == "dr_grpo":
            overrides.setdefault("max_len_normalizer", self.max_tokens)
        if self.overlong_buffer:
            overrides.update(overlong_buffer=self.overlong_buffer, max_tokens=self.max_tokens)
        return LossConfig.for_kind(self.loss, **overrides)

    def optimizer(self) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if self.warmup_steps else self.learning_rate, peak_value=self.learning_rate,
            warmup_steps=self.warmup_steps, decay_steps=max(self.total_steps, self.warmup_steps + 1),
            end_value=self.learning_rate * 0.1)
        mu_dtype = as_dtype(self.mu_dtype) if self.mu_dtype else None
        return optax.chain(optax.clip_by_global_norm(self.clip_norm),
                           optax.adamw(schedule, b1=self.adam_b1, b2=self.adam_b2,
                                       weight_decay=self.weight_decay, mu_dtype=mu_dtype))


def prompt_bucket(longest: int) -> int:
    """The width of an update batch's prompt part when its longest prompt has `longest` tokens: the next
    power of two from 16 to 1024, then the next multiple of 1024. Steps whose longest prompts differ
    then run one compiled update (and log-prob pass) instead of compiling again for each length: at most
    7 shapes up to 1024 tokens, and a padding of at most 2x (a prompt is a small part of a row that
    holds `max_tokens` of completion) or 1023 tokens beyond. Left padding is masked (segment 0), so the
    update is the same whatever the width."""
    if longest <= 1024:
        return max(16, 1 << max(longest - 1, 0).bit_length())
    return -(-longest // 1024) * 1024


def pool_bucket(pages: int) -> int:
    """Pages per sequence of a rollout's page pool when each needs `pages`: the next of 1, 2, 3, 4, 6, 8,
    12, 16, ... (powers of two and 1.5x them). The pool's size is in the shape of the engine's
    programs: steps whose longest prompts differ by a page or more would each compile prefill, insert
    and decode again; bucketed, they compile at most twice per doubling, for at most 1.5x the pages."""
    if pages <= 2:
        return max(pages, 1)
    high = 1 << (pages - 1).bit_length()  # the next power of two
    return high * 3 // 4 if high * 3 // 4 >= pages else high


def completion_logprobs(model: Qwen2, tokens: jax.Array, segments: jax.Array, prompt_len: int,
                        layers: Sequence[Any] | None = None) -> tuple[jax.Array, jax.Array]:
    """Log-probs `[B, T]` of tokens[:, prompt_len:] under `model`, and the per-token entropy `[B, T]`.

    `tokens [B, prompt_len + T]` hold each prompt right-aligned at `prompt_len` (left padding has
    segment 0) followed by its completion; positions count from each row's first real token, as
    in generation. `layers`: per-layer weights in place of the model's stacked ones (`Qwen2.__call__`).
    """
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0).astype(jnp.int32)
    x, _, _ = model.hidden_states(tokens[:, :-1], positions[:, :-1], segments[:, :-1], layers=layers)
    # The head on the completion's positions alone (XLA does not move the slice before the vocabulary
    # matmul by itself): the 0.5B shape at 2 layers, 64 prompt + 48 completion tokens, differentiated:
    # half the FLOPs, 1.6x faster, a third less temporary memory.
    logits = model.logits(x[:, prompt_len - 1:])  # [B, T, V]
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    target = tokens[:, prompt_len:]
    logp = jnp.take_along_axis(logp_all, target[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def _strided(x: jax.Array | None, n: int) -> jax.Array | None:
    """[B, ...] -> [n, B/n, ...] with micro-batch i = rows i, i+n, i+2n, ...: each micro-batch is
    spread evenly over the batch shards of the mesh (rows are split into contiguous blocks)."""
    return None if x is None else jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)


def _unstrided(x: jax.Array) -> jax.Array:
    """The inverse of `_strided`: [n, B/n, ...] -> [B, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _gather_rows(x: np.ndarray) -> np.ndarray:
    """Sum over processes of a host array (each process filled only its own rows)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)


class GRPOTrainer:
    """Rollouts + updates for one model (master weights in float32; compute in `model.dtype`).

    The trainer keeps its own copies of the weights (`weights`, a `WeightCopies`): `model` may be
    deleted by the caller. `trainer.params` / `trainer.opt_state` are nested dicts / optax states of
    global arrays; `state()` and `load_state()` give and take both (for checkpoints), with
    `step_count`. With LoRA (`model.lora`) `params` are the adapters alone and `trainer.frozen` the
    base, whose arrays the trainer takes over (split per layer, the model's stacks deleted: do not
    use `model` afterwards).
    """

    def __init__(self, model: Qwen2, config: GRPOConfig, reward_fn: RewardFn, tokenizer: Any = None,
                 reference: Qwen2 | None = None, mesh: Any = None):
        self.lora = getattr(model, "lora", None)
        for name, m in (("model", model), ("reference", reference)):
            if m is not None and getattr(m, "quant", None) is not None and (m is reference or self.lora is None):
                raise ValueError(f"GRPOTrainer: the {name} is {m.quant} weight-only quantized (qwq_jax.quant), "
                                 "which is for inference; train the float model (bfloat16 or float32), or LoRA "
                                 "adapters on the quantized one (qwq_jax.lora.attach)")
        if self.lora is not None and reference is not None:
            raise ValueError("GRPOTrainer: a LoRA run's KL reference is its frozen base; pass no reference")
        self.config = config
        self.loss_cfg = config.loss_config()  # final once the engine exists (whether TIS is on by default)
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.weights = WeightCopies(model, mesh, compute_copy=config.compute_copy,
                                    rollout_weights=config.rollout_weights)
        # An abstract model (qwq_jax.model.abstract_model, leaves ShapeDtypeStruct): no weights exist,
        # the trainer's state is shapes placed on `mesh`, and it can only lower its update.
        self.abstract = self.weights.abstract
        if self.abstract and mesh is None:
            raise ValueError("GRPOTrainer on an abstract model needs a mesh (where the update would run)")
        self.params = self.weights.masters(model)
        self.optimizer = config.optimizer()
        self.opt_shardings = self.weights.optimizer_shardings(self.optimizer, self.params)
        self.opt_state = self.weights.build(self.optimizer.init, self.params, self.opt_shardings)
        if self.loss_cfg.kl_beta > 0:
            self.weights.add_reference(self.params, reference)
        self.engine = self._rollout_engine(model, tokenizer, mesh)
        self._rollout_shape = (0, 0)  # (slots, pages) of the largest rollout so far: see `_generate`
        self.step_count = 0
        self._times: dict[str, float] = {}  # the last step's phases (see `step`)
        self.loss_cfg = config.loss_config(engine_differs=self.weights.engine_differs(self.engine))
        self.weights.freeze(model)  # LoRA: the base, split per layer (once the engine has been built on it)
        self._update = jax.jit(self._update_fn, donate_argnums=(0, 1),
                               out_shardings=(self.param_shardings, self.opt_shardings, None))
        self._grads = jax.jit(self._grads_fn)
        self._prepare = jax.jit(self._prepare_fn, static_argnames=("prompt_len",))
        if self.lora is not None and not self.abstract:
            self.sync_engine()  # the engine's own arrays were the model's stacks, now split

    def _rollout_engine(self, model: Qwen2, tokenizer: Any, mesh: Any) -> Engine | ReplicatedEngine:
        """The rollout engine: one `Engine` per replica of the rollout weights (`qwq_jax.replicas`: each
        decodes its own share of the rows on its own devices) where the mesh has several, otherwise
        one `Engine` on the whole mesh. The `split` copy is laid out by the `generate` rules
        (replicated over `data` and `fsdp`): a replica per (`data`, `fsdp`) index. The fp32 masters
        (`rollout_weights="master"`) and a LoRA run's frozen base are read in place, laid out as the
        update holds them (the `train` rules: split over `fsdp`): a replica per `data` index, each
        engine on its `fsdp` x `tensor` devices."""
        if self.abstract:
            return Engine(model, tokenizer, mesh=mesh, rules="generate")
        in_place = self.lora is not None or self.config.rollout_weights == "master"
        read = jax.tree.leaves(nnx.state(model)) + jax.tree.leaves(self.params)  # LoRA: base + adapters
        axes = replica_axes(mesh, read) if in_place else BATCH_AXES
        if replicas_of(mesh, axes) is None:
            return Engine(model, tokenizer, mesh=mesh, rules="generate")
        return ReplicatedEngine(model, tokenizer, mesh=mesh, rules="generate", axes=axes)

    @property
    def param_shardings(self) -> Any:
        """The masters' shardings (`train` rules; None without a mesh)."""
        return self.weights.param_shardings

    @property
    def ref_params(self) -> dict | None:
        """The KL reference weights (None when the loss has no KL term)."""
        return self.weights.ref

    @property
    def frozen(self) -> dict | None:
        """LoRA: the frozen base, its layers one tree per layer (read in place by update and engine)."""
        return self.weights.frozen

    def state(self) -> dict:
        """{"params", "opt_state"}: the arrays a checkpoint holds (with `step_count` beside them); with
        LoRA the adapters and their optimizer state only (the frozen base is the model's source)."""
        return {"params": self.params, "opt_state": self.opt_state}

    def abstract_state(self) -> dict:
        """`state()` as ShapeDtypeStructs with their shardings: the target to restore into."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state())

    def load_state(self, state: Mapping, step_count: int) -> None:
        self.params, self.opt_state = state["params"], state["opt_state"]
        self.step_count = int(step_count)

    # ---- one step: rollout -> score -> update ---------------------------------------------------
    def step(self, prompts: Sequence[Sequence[int]]) -> dict[str, float]:
        """One rollout and one optimizer update; returns metrics (rewards, loss, KL, clip fraction, ...)."""
        t0 = time.perf_counter()
        completions, rewards = self.rollout(prompts)
        t_rollout = time.perf_counter() - t0
        batch, stats = self.make_batch(prompts, completions, rewards["reward"])
        metrics = self.update(batch)
        step_s = time.perf_counter() - t0
        # The step's time split: rollout_s = generate_s (the engine) + reward_s (scoring); then
        # logprob_s (the old / reference log-prob pass) and update_s (gradients and the optimizer).
        metrics.update(stats, **self._times, step=self.step_count, rollout_s=t_rollout, step_s=step_s,
                       tokens_per_s=float(batch["mask"].sum()) / max(step_s, 1e-9))
        for name, values in rewards.items():
            key = "reward" if name == "reward" else f"reward_{name}"
            metrics[f"{key}_mean"], metrics[f"{key}_std"] = float(values.mean()), float(values.std())
        return metrics

    def rollout(self, prompts: Sequence[Sequence[int]]) -> tuple[list[Completion], dict[str, np.ndarray]]:
        """`group_size` completions per prompt with the current weights, and their rewards."""
        cfg = self.config
        self.sync_engine()
        base = cfg.seed * 1_000_003 + self.step_count * 7919 * max(len(prompts), 1) * cfg.group_size
        sps = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                              n=cfg.group_size, seed=(base + i * cfg.group_size) % 2**31) for i in range(len(prompts))]
        t0 = time.perf_counter()
        outs = self._generate(prompts, sps, cfg.group_size)
        completions = [c for group in outs for c in group]
        indices = [i // cfg.group_size for i in range(len(completions))]
        t1 = time.perf_counter()
        scores = self.score(self.reward_fn, indices, completions)
        tokens = sum(len(c.token_ids) for c in completions)
        self._times.update(generate_s=t1 - t0, reward_s=time.perf_counter() - t1,
                           rollout_tokens_per_s=tokens / max(t1 - t0, 1e-9))
        return completions, scores

    def sync_engine(self) -> None:
        """Give the rollout engine the current weights (`WeightCopies.sync`: a model-dtype copy, one array
        per layer, the fp32 masters themselves, or a LoRA run's frozen base with its adapters)."""
        self._check_concrete("sync_engine")
        self.weights.sync(self.engine, self.params)

    def _generate(self, prompts: Sequence[Sequence[int]], params, n: int) -> list[list[Completion]]:
        """The engine's completions, every row in a slot of its own and a page pool big enough for
        them; the pool is freed afterwards (the update needs the memory, and the next weights make
        its cached prompts stale). Slots and pages are the most any call has needed so far (pages per
        row bucketed by `pool_bucket`): an evaluation of fewer prompts, or a step of shorter ones,
        runs the programs already compiled instead of compiling for its own shape."""
        sp = params[0] if isinstance(params, (list, tuple)) else params
        engine = self.engine
        longest = max(len(p) for p in prompts) + sp.max_tokens
        slots = max(len(prompts) * n, self._rollout_shape[0])
        pages = max(slots * pool_bucket(engine.pages.pages_for(longest) + 1), self._rollout_shape[1])
        self._rollout_shape = (slots, pages)
        engine.resize(max_num_seqs=slots, num_pages=pages)
        try:
            return engine.generate(prompts, params)
        finally:
            engine.free_cache()

    def score(self, reward_fn: RewardFn, prompt_indices: Sequence[int], completions: Sequence[Completion]
              ) -> dict[str, np.ndarray]:
        """Rewards by name (the total under "reward"); each process scores every P-th completion."""
        nproc, me = jax.process_count(), jax.process_index()
        mine = [r for r in range(len(completions)) if r % nproc == me]
        out = reward_fn([prompt_indices[r] for r in mine], [completions[r] for r in mine])
        if not isinstance(out, Mapping):
            out = {"reward": out}
        if "reward" not in out:
            raise KeyError(f"reward_fn returned {sorted(out)}: the total must be under 'reward'")
        result = {}
        for name in sorted(out):
            values = np.asarray(out[name], np.float32)
            if values.shape != (len(mine),):
                raise ValueError(f"reward {name!r}: got {values.shape[0] if values.ndim else 'a scalar'} values "
                                 f"for {len(mine)} completions")
            full = np.zeros(len(completions), np.float32)
            full[mine] = values
            result[name] = _gather_rows(full)
        return result

    def evaluate(self, prompts: Sequence[Sequence[int]], reward_fn: RewardFn, max_tokens: int | None = None
                 ) -> dict[str, float]:
        """Greedy completions (one per prompt) scored by `reward_fn`: mean of each reward."""
        self.sync_engine()
        outs = self._generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens or
                                                      self.config.max_tokens), 1)
        completions = [o[0] for o in outs]
        rewards = self.score(reward_fn, list(range(len(prompts))), completions)
        result = {f"eval_{k}": float(v.mean()) for k, v in rewards.items()}
        result["eval_response_length"] = float(np.mean([len(c.token_ids) for c in completions]))
        return result

    # ---- batches and updates --------------------------------------------------------------------
    def make_batch(self, prompts: Sequence[Sequence[int]], completions: Sequence[Completion],
                   rewards: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Host arrays of one update (prompts right-aligned, completions after them) and batch stats."""
        cfg, lcfg = self.config, self.loss_cfg
        g, b = cfg.group_size, len(completions)
        n = cfg.micro_batches
        if b % n:
            raise ValueError(f"{b} completions ({len(prompts)} prompts x group_size {g}) do not split into "
                             f"micro_batches={n}")
        if self.mesh is not None:
            from sharding.rules import batch_shards

            shards = batch_shards(self.mesh, "train")
            if (b // n) % shards:
                raise ValueError(f"micro-batch of {b // n} rows does not split over the {shards} batch shards of "
                                 f"the mesh (data x fsdp); use prompts x group_size / micro_batches divisible by "
                                 f"{shards}")
        prompt_len = prompt_bucket(max(len(p) for p in prompts))
        width = prompt_len + cfg.max_tokens
        tokens = np.zeros((b, width), np.int32)
        segments = np.ones((b, width), np.int32)
        mask = np.zeros((b, cfg.max_tokens), np.float32)
        behaviour = np.zeros((b, cfg.max_tokens), np.float32)
        lengths = np.zeros(b, np.int32)
        if lcfg.tis_cap is not None and any(c.logprobs is None for c in completions):
            raise ValueError("truncated importance sampling (tis) needs the engine's log-probs of every completion; "
                             "a completion has none")
        for r, c in enumerate(completions):
            p = prompts[r // g]
            # Right-align prompts so every completion starts at `prompt_len`; left padding is segment 0.
            tokens[r, prompt_len - len(p): prompt_len] = p
            segments[r, : prompt_len - len(p)] = 0
            k = len(c.token_ids)
            tokens[r, prompt_len: prompt_len + k] = c.token_ids
            mask[r, :k] = 1.0
            if c.logprobs is not None:
                behaviour[r, :k] = c.logprobs
            lengths[r] = k
        shaped = np.asarray(rewards, np.float32)
        if lcfg.overlong_buffer:
            shaped = shaped + np.asarray(overlong_penalty(jnp.asarray(lengths), lcfg.max_tokens or cfg.max_tokens,
                                                          lcfg.overlong_buffer, lcfg.overlong_penalty))
        advantages = np.asarray(group_advantages(jnp.asarray(shaped), g, std_normalize=lcfg.std_normalize))
        use_dynamic = cfg.dynamic_sampling if cfg.dynamic_sampling is not None else cfg.loss == "dapo"
        keep = np.asarray(dynamic_sampling_keep(jnp.asarray(shaped), g)) if use_dynamic else np.ones(b, bool)
        batch = {"tokens": tokens, "segments": segments, "mask": mask, "behaviour_logp": behaviour,
                 "advantages": advantages.astype(np.float32), "row_weight": keep.astype(np.float32)}
        stats = {"response_length": float(lengths.mean()), "kept_fraction": float(keep.mean()),
                 "truncated_fraction": float(np.mean([c.finish_reason == "length" for c in completions]))}
        return batch, stats

    def update(self, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
        """One optimizer step on a host batch (from `make_batch`)."""
        t0 = time.perf_counter()
        arrays, ref_logp, gap = self._device_batch(batch)  # the log-prob pass (`gap` waits for it)
        t1 = time.perf_counter()
        self.params, self.opt_state, m = self._update(self.params, self.opt_state, arrays, ref_logp,
                                                      frozen=self.frozen)
        self.step_count += 1
        metrics = {k: float(v) for k, v in m.items()}
        metrics["logp_gap"] = gap
        self._times.update(logprob_s=t1 - t0, update_s=time.perf_counter() - t1)
        return metrics

    def gradients(self, batch: Mapping[str, np.ndarray]) -> tuple[dict, dict[str, float]]:
        """The (summed over micro-batches) gradient of the loss on a host batch, and its metrics."""
        arrays, ref_logp, _ = self._device_batch(batch)
        grads, metrics = self._grads(self.params, arrays, ref_logp, frozen=self.frozen)
        return grads, {k: float(v) for k, v in metrics.items()}

    def _device_batch(self, batch: Mapping[str, np.ndarray]) -> tuple[dict[str, jax.Array], jax.Array | None, float]:
        """Put a host batch on the mesh and add the rollout / reference log-probs (the engine's own
        log-probs stay in the batch only for truncated importance sampling)."""
        self._check_concrete("update")
        arrays = {k: self._put_batch(v) for k, v in batch.items()}
        prompt_len = batch["tokens"].shape[1] - batch["mask"].shape[1]
        behaviour = arrays["behaviour_logp"] if self.loss_cfg.tis_cap is not None else arrays.pop("behaviour_logp")
        old_logp, ref_logp, gap = self._prepare(self.params, self.ref_params, arrays["tokens"], arrays["segments"],
                                                arrays["mask"], behaviour, prompt_len=prompt_len, frozen=self.frozen)
        arrays["old_logp"] = old_logp
        return arrays, ref_logp, float(gap)

    def _put_batch(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        from sharding import batch_sharding, put_global

        return put_global(x, batch_sharding(self.mesh, "train", x.ndim))

    def _check_concrete(self, what: str) -> None:
        if self.abstract:
            raise ValueError(f"GRPOTrainer.{what}: this trainer was built on an abstract model (no weights exist); "
                             "it can only lower its update (lower_update), e.g. to compile for a device this host "
                             "does not have")

    # ---- the jitted update (log-prob pass, accumulated gradients, optimizer step) ---------------
    def _prepare_fn(self, params, ref_params, tokens, segments, mask, behaviour_logp, prompt_len: int, frozen=None):
        """Rollout-policy log-probs (recomputed by the training forward), reference log-probs,
        and the mean |training - engine| log-prob gap over real tokens (a numerics health check).
        Runs per micro-batch (strided, as the update), so it never holds more than the update.
        `frozen` (here and in `_grads_fn`, `_update_fn`): a LoRA run's frozen base, else None."""
        n = self.config.micro_batches
        compute = self.weights.compute(params)

        def one(_, mb):
            tok, seg = mb
            old, _ = self._logprobs(compute, params, tok, seg, prompt_len, frozen)
            if ref_params is None:
                ref = jnp.zeros_like(old)
            else:  # LoRA: the initial adapters on the frozen base; else the reference's own weights
                ref = self._logprobs(ref_params if frozen is None else self.weights.compute(ref_params), ref_params,
                                     tok, seg, prompt_len, frozen)[0]
            return None, (old, ref)

        _, (old_logp, ref_logp) = jax.lax.scan(one, None, (_strided(tokens, n), _strided(segments, n)))
        old_logp, ref_logp = _unstrided(old_logp), _unstrided(ref_logp)
        gap = jnp.sum(jnp.abs(old_logp - behaviour_logp) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        return old_logp, (ref_logp if ref_params is not None else None), gap

    def _grads_fn(self, params, batch, ref_logp, frozen=None):
        """Summed gradients and metrics over the micro-batches of `batch` (= the full-batch ones)."""
        cfg, lcfg = self.config, self.loss_cfg
        prompt_len = batch["tokens"].shape[1] - batch["mask"].shape[1]
        norms = batch_normalizers(batch["mask"], batch["row_weight"], lcfg)
        n = cfg.micro_batches

        split = {k: _strided(v, n) for k, v in batch.items()}
        split["ref_logp"] = _strided(ref_logp, n)

        def loss_fn(p, mb):
            logp, entropy = self._logprobs(p, params, mb["tokens"], mb["segments"], prompt_len, frozen)
            loss, metrics = policy_loss(logp, mb["old_logp"], mb["ref_logp"], mb["advantages"], mb["mask"], lcfg,
                                        row_weight=mb["row_weight"], normalizers=norms,
                                        behaviour_logp=mb.get("behaviour_logp"))
            weighted = mb["mask"] * mb["row_weight"][:, None]
            ent = jnp.where(norms["tokens"] > 0, jnp.sum(entropy * weighted) / jnp.maximum(norms["tokens"], 1e-9), 0.0)
            return loss, dict(metrics, entropy=ent)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        compute = self.weights.compute(params)

        def accumulate(carry, mb):
            grads, metrics = carry
            (_, m), g = grad_fn(compute, mb)
            grads = jax.tree.map(lambda acc, x: acc + x.astype(acc.dtype), grads, g)
            return (grads, jax.tree.map(jnp.add, metrics, m)), None

        first = jax.tree.map(lambda x: x[0], split)
        m_shape = jax.eval_shape(lambda: grad_fn(compute, first)[0][1])
        zeros = (jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), compute),
                 jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape))
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, split)
        if isinstance(grads["layers"], list):  # split: restack the per-layer sums, once per update
            grads["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *grads["layers"])
        return grads, metrics

    def _update_fn(self, params, opt_state, batch, ref_logp, frozen=None):
        grads, metrics = self._grads_fn(params, batch, ref_logp, frozen)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return params, opt_state, metrics

    def _logprobs(self, compute, masters, tokens, segments, prompt_len: int, frozen=None):
        """`completion_logprobs` of the model on `compute` (`weights.compute(masters)`); LoRA: on the
        frozen base plus the adapters `compute`, layer by layer (`WeightCopies.bind`)."""
        model, layers = self.weights.bind(compute, masters, frozen)
        return completion_logprobs(model, tokens, segments, prompt_len, layers=layers)

    # ---- ahead-of-time lowering -----------------------------------------------------------------
    def batch_shapes(self, rows: int, prompt_len: int, completion_len: int | None = None
                     ) -> tuple[dict[str, jax.ShapeDtypeStruct], jax.ShapeDtypeStruct | None]:
        """The device batch of an update (`_device_batch`'s arrays and reference log-probs) as
        ShapeDtypeStructs placed as `update` places them: `rows` completions of `completion_len`
        (default `max_tokens`) tokens after prompts padded to `prompt_len`."""
        c = completion_len or self.config.max_tokens
        layout = {"tokens": ((rows, prompt_len + c), jnp.int32), "segments": ((rows, prompt_len + c), jnp.int32),
                  "mask": ((rows, c), jnp.float32), "advantages": ((rows,), jnp.float32),
                  "row_weight": ((rows,), jnp.float32), "old_logp": ((rows, c), jnp.float32)}
        if self.loss_cfg.tis_cap is not None:
            layout["behaviour_logp"] = ((rows, c), jnp.float32)
        if self.mesh is not None:
            from sharding import batch_sharding

            place = lambda n: batch_sharding(self.mesh, "train", n)  # noqa: E731
        else:
            place = lambda n: None  # noqa: E731
        arrays = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=place(len(shape))) for k, (shape, dtype) in
                  layout.items()}
        ref = jax.ShapeDtypeStruct((rows, c), jnp.float32, sharding=place(2)) if self.ref_params is not None else None
        return arrays, ref

    def lower_update(self, rows: int, prompt_len: int, completion_len: int | None = None) -> Any:
        """The jitted optimizer step (`update`'s program) lowered for `batch_shapes(rows, ...)`, without
        running anything: `.compile()` it for its memory analysis or HLO. Works on an abstract trainer
        (built on `abstract_model` with a mesh of compile-only devices) and on a concrete one."""
        if rows % self.config.micro_batches:
            raise ValueError(f"{rows} rows do not split into micro_batches={self.config.micro_batches}")
        spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))  # noqa: E731
        arrays, ref = self.batch_shapes(rows, prompt_len, completion_len)
        return self._update.lower(jax.tree.map(spec, self.params), jax.tree.map(spec, self.opt_state), arrays, ref,
                                  frozen=jax.tree.map(spec, self.frozen))
