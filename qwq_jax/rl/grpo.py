"""GRPO-family training on any mesh: rollouts with the generation engine, group advantages,
and a jitted train step (fp32 master weights, compute in the model dtype, AdamW with warmup +
cosine decay, global-norm clipping, gradient accumulation over micro-batches).

    trainer = GRPOTrainer(model, tokenizer=None, config=GRPOConfig(...), reward_fn=...)
    metrics = trainer.step(prompts)        # one rollout + one update; returns a metrics dict

`reward_fn(prompt_index, completion_token_ids, completion_text) -> float` scores one completion;
rewards are composed in qwq_jax/rl/rewards.py. Losses (GRPO, DAPO, Dr.GRPO) live in losses.py.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qwq_jax.generate import Engine
from qwq_jax.model import Qwen2
from qwq_jax.rl.losses import LossConfig, dynamic_sampling_keep, group_advantages, policy_loss
from qwq_jax.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    loss: str = "grpo"               # grpo | dapo | dr_grpo
    group_size: int = 4              # completions per prompt
    max_tokens: int = 32             # completion length
    temperature: float = 1.0
    top_p: float = 1.0
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    total_steps: int = 1000
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    micro_batches: int = 1           # gradient accumulation
    kl_beta: float | None = None     # default: the loss kind's
    dynamic_sampling: bool | None = None  # drop all-equal groups (default: on for dapo)
    seed: int = 0

    def loss_config(self) -> LossConfig:
        overrides = {"kl_beta": self.kl_beta} if self.kl_beta is not None else {}
        if self.loss in ("dr_grpo",):
            overrides.setdefault("max_len_normalizer", self.max_tokens)
        return LossConfig.for_kind(self.loss, **overrides)

    def optimizer(self) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if self.warmup_steps else self.learning_rate, peak_value=self.learning_rate,
            warmup_steps=self.warmup_steps, decay_steps=max(self.total_steps, self.warmup_steps + 1),
            end_value=self.learning_rate * 0.1)
        return optax.chain(optax.clip_by_global_norm(self.clip_norm),
                           optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=self.weight_decay))


def completion_logprobs(model: Qwen2, tokens: jax.Array, segments: jax.Array, prompt_len: int
                        ) -> tuple[jax.Array, jax.Array]:
    """Log-probs `[B, T]` of tokens[:, prompt_len:] under `model`, and the per-token entropy `[B, T]`.

    `tokens [B, prompt_len + T]` hold each prompt right-aligned at `prompt_len` (left padding has
    segment 0) followed by its completion; positions count from each row's first real token, as
    in generation.
    """
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0).astype(jnp.int32)
    logits = model(tokens[:, :-1], positions[:, :-1], segments[:, :-1])[:, prompt_len - 1:]  # [B, T, V]
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    target = tokens[:, prompt_len:]
    logp = jnp.take_along_axis(logp_all, target[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


class GRPOTrainer:
    """Rollouts + updates for one model (params kept in float32; compute in `model.dtype`)."""

    def __init__(self, model: Qwen2, config: GRPOConfig, reward_fn: Callable[[int, list[int], str | None], float],
                 tokenizer: Any = None, reference: Qwen2 | None = None):
        self.config = config
        self.loss_cfg = config.loss_config()
        self.reward_fn = reward_fn
        self.tokenizer = tokenizer
        self.graphdef, params = nnx.split(model)
        self.params = jax.tree.map(lambda x: x.astype(jnp.float32), params)  # fp32 master copy
        self.ref_params = nnx.state(reference) if reference is not None else (
            params if self.loss_cfg.kl_beta > 0 else None)
        self.optimizer = config.optimizer()
        self.opt_state = self.optimizer.init(self.params)
        self.engine = Engine(model, tokenizer)
        self.step_count = 0
        self._update = jax.jit(self._update_fn, donate_argnums=(0, 1))
        self._logprobs = jax.jit(self._logprobs_fn, static_argnames=("prompt_len",))

    def _model(self, params) -> Qwen2:
        return nnx.merge(self.graphdef, params)

    def _logprobs_fn(self, params, tokens, segments, prompt_len: int):
        return completion_logprobs(self._model(params), tokens, segments, prompt_len)

    def _update_fn(self, params, opt_state, batch, ref_logp):
        cfg, lcfg = self.config, self.loss_cfg
        prompt_len = batch["prompt_len"].shape[0]

        def loss_fn(p, mb, mb_ref):
            logp, entropy = completion_logprobs(self._model(p), mb["tokens"], mb["segments"], prompt_len)
            loss, metrics = policy_loss(logp, mb["old_logp"], mb_ref, mb["advantages"], mb["mask"], lcfg,
                                        row_weight=mb["row_weight"])
            ent = jnp.sum(entropy * mb["mask"]) / jnp.maximum(jnp.sum(mb["mask"]), 1.0)
            return loss, dict(metrics, entropy=ent)

        n = cfg.micro_batches
        split = jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]),
                             {k: v for k, v in batch.items() if k != "prompt_len"})
        ref_split = ref_logp.reshape((n, ref_logp.shape[0] // n) + ref_logp.shape[1:]) if ref_logp is not None else None

        def accumulate(carry, i):
            grads, metrics = carry
            mb = jax.tree.map(lambda x: x[i], split)
            (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params, mb, ref_split[i] if ref_split is not None
                                                                  else None)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, metrics, m)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (_, m0), _ = jax.eval_shape(lambda: jax.value_and_grad(loss_fn, has_aux=True)(
            params, jax.tree.map(lambda x: x[0], split), ref_split[0] if ref_split is not None else None))
        m_zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
        (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, m_zero), jnp.arange(n))
        grads = jax.tree.map(lambda g: g / n, grads)
        metrics = jax.tree.map(lambda m: m / n, metrics)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return params, opt_state, metrics

    def rollout(self, prompts: Sequence[Sequence[int]]):
        """`group_size` completions per prompt with the current weights; rewards per completion."""
        cfg = self.config
        self.engine.params = jax.tree.map(lambda m, p: p.astype(m.dtype), self.engine.params, self.params)
        sp = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                            n=cfg.group_size, seed=cfg.seed * 1_000_003 + self.step_count * 7919)
        outs = self.engine.generate(prompts, sp)
        completions = [c for group in outs for c in group]
        rewards = np.array([self.reward_fn(i // cfg.group_size, c.token_ids, c.text)
                            for i, c in enumerate(completions)], np.float32)
        return completions, rewards

    def step(self, prompts: Sequence[Sequence[int]]) -> dict[str, float]:
        """One rollout and one optimizer update; returns metrics (rewards, loss, KL, clip fraction, ...)."""
        cfg = self.config
        t0 = time.perf_counter()
        completions, rewards = self.rollout(prompts)
        t_rollout = time.perf_counter() - t0
        g, b = cfg.group_size, len(completions)
        prompt_len = max(len(p) for p in prompts)
        tokens = np.zeros((b, prompt_len + cfg.max_tokens), np.int32)
        segments = np.ones((b, prompt_len + cfg.max_tokens), np.int32)
        mask = np.zeros((b, cfg.max_tokens), np.float32)
        lengths = np.zeros(b, np.int32)
        for r, c in enumerate(completions):
            p = prompts[r // g]
            # Right-align prompts so every completion starts at `prompt_len`; left padding is segment 0.
            tokens[r, prompt_len - len(p): prompt_len] = p
            segments[r, : prompt_len - len(p)] = 0
            tokens[r, prompt_len: prompt_len + len(c.token_ids)] = c.token_ids
            mask[r, : len(c.token_ids)] = 1.0
            lengths[r] = len(c.token_ids)
        lcfg = self.loss_cfg
        shaped = rewards.copy()
        if lcfg.overlong_buffer:
            from qwq_jax.rl.losses import overlong_penalty

            shaped = shaped + np.asarray(overlong_penalty(jnp.asarray(lengths), lcfg.max_tokens or cfg.max_tokens,
                                                          lcfg.overlong_buffer, lcfg.overlong_penalty))
        advantages = group_advantages(jnp.asarray(shaped), g, std_normalize=lcfg.std_normalize)
        use_dynamic = cfg.dynamic_sampling if cfg.dynamic_sampling is not None else cfg.loss == "dapo"
        keep = dynamic_sampling_keep(jnp.asarray(shaped), g) if use_dynamic else jnp.ones(b, bool)
        tok, seg = jnp.asarray(tokens), jnp.asarray(segments)
        old_logp, _ = self._logprobs(self.params, tok, seg, prompt_len=prompt_len)
        ref_logp = self._logprobs(self.ref_params, tok, seg, prompt_len=prompt_len)[0] \
            if self.ref_params is not None else None
        batch = {"tokens": tok, "segments": seg, "mask": jnp.asarray(mask), "old_logp": old_logp, "advantages": advantages,
                 "row_weight": keep.astype(jnp.float32), "prompt_len": jnp.zeros(prompt_len)}
        self.params, self.opt_state, m = self._update(self.params, self.opt_state, batch, ref_logp)
        self.step_count += 1
        m = {k: float(v) for k, v in m.items()}
        m.update(step=self.step_count, reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                 response_length=float(lengths.mean()), kept_fraction=float(np.asarray(keep).mean()),
                 rollout_s=t_rollout, step_s=time.perf_counter() - t0,
                 tokens_per_s=float(lengths.sum()) / max(time.perf_counter() - t0, 1e-9))
        return m
