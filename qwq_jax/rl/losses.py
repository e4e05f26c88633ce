"""Policy-gradient losses of the GRPO family, as pure jittable functions.

    cfg = LossConfig.for_kind("dapo")                       # or "grpo", "dr_grpo", "gspo"
    adv = group_advantages(rewards, group_size, cfg.std_normalize)          # [B]
    keep = dynamic_sampling_keep(rewards, group_size)                       # [B] bool
    loss, metrics = policy_loss(logp, old_logp, ref_logp, adv, mask, cfg, row_weight=keep)
    # with truncated importance sampling (cfg.tis_cap set): the engine's own log-probs as well
    loss, metrics = policy_loss(logp, old_logp, ref_logp, adv, mask, cfg, behaviour_logp=engine_logp)

Layout: B completions, groups of `group_size` contiguous rows (rows [g*G:(g+1)*G] answer one
prompt); T padded completion tokens; `mask [B, T]` is 1.0 on real completion tokens.

The four kinds differ only in config fields (nothing dispatches on the name but the defaults):

- GRPO (DeepSeekMath, arXiv 2402.03300): advantage (r - mean) / std within the group; the
  clipped surrogate min(rho*A, clip(rho, 1-eps, 1+eps)*A) averaged over each sequence's tokens,
  then over sequences; k3 KL estimate to the reference, exp(q) - q - 1 with q = ref - logp,
  weighted by beta = 0.04.
- DAPO (arXiv 2503.14476): clip-higher (eps_low 0.2, eps_high 0.28), token-level aggregation
  (sum over every token of the batch / number of tokens), no KL, dynamic sampling (groups whose
  rewards are all equal carry no signal and are dropped) and a soft overlong punishment added
  to the reward.
- Dr.GRPO (arXiv 2503.20783): no std normalisation of advantages and no per-sequence length
  normalisation; summed token losses are divided by a constant (`max_len_normalizer`, the
  generation budget; the padded length T if unset), then averaged over sequences; no KL.
- GSPO (Group Sequence Policy Optimization, arXiv 2507.18071): one importance ratio per sequence,
  the length-normalised geometric mean of its token ratios,
  s_i = exp((1/|y_i|) * sum_t (logp - old_logp)), clipped to [1 - 3e-4, 1 + 4e-4] (the paper's
  left and right ranges); objective the mean over sequences of min(s_i*A_i, clip(s_i)*A_i); no
  KL. Computed in the paper's GSPO-token form, s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)] (sg: stop
  gradient) at each token: its value is s_i, and with a per-sequence advantage (as here) and no
  TIS its gradient is GSPO's (d s_i / d logp_t = s_i / |y_i|, summed over the |y_i| equal token
  terms), under every aggregation. With TIS each token's gradient carries its own weight.

Truncated importance sampling (TIS, "Your efficient RL framework secretly brings you off-policy
RL training", Yao et al. 2025), any kind, on when `tis_cap` is set: the rollout engine's
log-probs mu (the behaviour policy, its own kernels / dtype / int8) differ from the trainer's
recomputed old log-probs; each token's policy-gradient term is multiplied by the constant
w_t = min(exp(old_logp - mu), C) (stop-gradient; C = `tis_cap`, 2 by default). With GSPO it
multiplies each token's s_i,t term, so the loss value carries, per sequence, the mean weight of
its tokens, and each token's gradient its own weight. The KL term is not weighted.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

KINDS = ("grpo", "dapo", "dr_grpo", "gspo")

# Published defaults per kind; `LossConfig.for_kind(kind, **overrides)` starts from these.
_DEFAULTS: dict[str, dict] = {
    "grpo": dict(clip_low=0.2, clip_high=0.2, kl_beta=0.04, std_normalize=True, token_level=False,
                 sequence_ratio=False),
    "dapo": dict(clip_low=0.2, clip_high=0.28, kl_beta=0.0, std_normalize=True, token_level=True,
                 sequence_ratio=False),
    "dr_grpo": dict(clip_low=0.2, clip_high=0.2, kl_beta=0.0, std_normalize=False, token_level=False,
                    sequence_ratio=False),
    "gspo": dict(clip_low=3e-4, clip_high=4e-4, kl_beta=0.0, std_normalize=True, token_level=False,
                 sequence_ratio=True),
}
TIS_CAP = 2.0  # the default truncation C of the TIS weights (a common choice: weights above 2 are rare noise)


@dataclass(frozen=True)
class LossConfig:
    kind: str = "grpo"          # "grpo" | "dapo" | "dr_grpo" | "gspo"
    clip_low: float = 0.2       # epsilon_low: ratios below 1 - clip_low are clipped (A < 0)
    clip_high: float = 0.2      # epsilon_high: ratios above 1 + clip_high are clipped (A > 0)
    kl_beta: float = 0.04       # weight of the k3 KL to the reference (0: no KL term)
    std_normalize: bool = True  # divide advantages by the group's reward std
    token_level: bool = False   # True: sum over all tokens / total tokens; False: per-sequence mean, then mean
    max_len_normalizer: int | None = None  # constant divisor of each sequence's summed token losses (dr_grpo)
    overlong_buffer: int = 0    # DAPO soft overlong punishment: buffer length L_cache (0: off)
    overlong_penalty: float = 1.0  # the punishment at (and beyond) L_max
    max_tokens: int | None = None  # L_max for the overlong punishment (None: the generation budget)
    sequence_ratio: bool = False   # GSPO: one length-normalised importance ratio per sequence
    tis_cap: float | None = None   # truncated importance sampling cap C (None: off); see policy_loss

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown loss kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"clip_low and clip_high must be >= 0, got {self.clip_low}, {self.clip_high}")
        if self.token_level and self.max_len_normalizer is not None:
            raise ValueError("token_level and max_len_normalizer are two different aggregations; set one")
        if self.max_len_normalizer is not None and self.max_len_normalizer <= 0:
            raise ValueError(f"max_len_normalizer must be positive, got {self.max_len_normalizer}")
        if self.overlong_buffer < 0:
            raise ValueError(f"overlong_buffer must be >= 0, got {self.overlong_buffer}")
        if self.tis_cap is not None:
            check_tis_cap(self.tis_cap)

    @classmethod
    def for_kind(cls, kind: str, **overrides) -> "LossConfig":
        """The published defaults of `kind` ("grpo", "dapo", "dr_grpo", "gspo"), with `overrides` on top."""
        if kind not in _DEFAULTS:
            raise ValueError(f"unknown loss kind {kind!r}; expected one of {', '.join(KINDS)}")
        return cls(kind=kind, **{**_DEFAULTS[kind], **overrides})

    @property
    def aggregation(self) -> str:
        """"token" (DAPO), "constant" (Dr.GRPO) or "sequence" (GRPO)."""
        if self.token_level:
            return "token"
        if self.max_len_normalizer is not None or self.kind == "dr_grpo":
            return "constant"
        return "sequence"


def check_tis_cap(cap) -> None:
    """ValueError unless `cap` is a number >= 1 (the TIS weights' expectation is 1: a cap below it
    would shrink every token's weight)."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap >= 1.0 or cap == float("inf"):
        raise ValueError(f"tis_cap must be a finite number >= 1, got {cap!r}")


def tis_default(trainer_dtype, engine_dtypes, int8: bool = False) -> bool:
    """Whether truncated importance sampling is on when not set: the engine computes (or keeps its
    KV cache) in a dtype other than the trainer's compute dtype, or runs on int8 weights or cache."""
    if not isinstance(engine_dtypes, (list, tuple)):
        engine_dtypes = (engine_dtypes,)
    return bool(int8) or any(jnp.dtype(d) != jnp.dtype(trainer_dtype) for d in engine_dtypes)


def tis_weights(old_logp: jax.Array, behaviour_logp: jax.Array, mask: jax.Array, cap: float) -> jax.Array:
    """Truncated importance weights `[B, T]`: min(exp(old_logp - behaviour_logp), cap) on real
    tokens, 0 on padding (whatever it holds); constants for the gradient (stop-gradient)."""
    old, mu, mask = _float(old_logp), _float(behaviour_logp), _float(mask)
    valid = mask > 0
    w = jnp.minimum(jnp.exp(jnp.where(valid, old - mu, 0.0)), cap)
    return jax.lax.stop_gradient(jnp.where(valid, w, 0.0))


def _float(x) -> jax.Array:
    """`x` as a float array of at least float32 (bf16 log-probs are upcast)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den, and 0 where den == 0 (e.g. every row dropped)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _groups(x: jax.Array, group_size: int) -> jax.Array:
    if x.ndim != 1:
        raise ValueError(f"expected a [B] vector, got shape {x.shape}")
    if group_size <= 0 or x.shape[0] % group_size:
        raise ValueError(f"batch of {x.shape[0]} is not a whole number of groups of {group_size}")
    return x.reshape(-1, group_size)  # [B/G, G]


def group_advantages(rewards: jax.Array, group_size: int, std_normalize: bool = True,
                     eps: float = 1e-6, ddof: int = 1) -> jax.Array:
    """Advantages `[B]`: r - mean of its group, divided by (group std + eps) when `std_normalize`.

    The std is the sample std (`ddof=1`, as torch.std computes it in the published trainers);
    `ddof=0` gives the population std. A group of identical rewards gets advantage 0.
    """
    r = _groups(_float(rewards), group_size)  # [B/G, G]
    centred = r - jnp.mean(r, axis=1, keepdims=True)
    if std_normalize:
        var = jnp.sum(centred**2, axis=1, keepdims=True) / max(group_size - ddof, 1)
        centred = centred / (jnp.sqrt(var) + eps)
    return centred.reshape(-1)


def overlong_penalty(lengths: jax.Array, max_tokens: int, buffer: int, penalty: float = 1.0) -> jax.Array:
    """DAPO's soft overlong punishment `[B]`, added to the rewards.

    0 up to L_max - L_cache tokens, then falling linearly to -penalty at L_max, and -penalty
    beyond L_max (L_max = `max_tokens`, L_cache = `buffer`).
    """
    n = _float(lengths)
    if buffer <= 0:
        return jnp.where(n > max_tokens, -penalty, 0.0).astype(n.dtype)
    start = max_tokens - buffer
    ramp = (start - n) / buffer * penalty
    return jnp.where(n <= start, 0.0, jnp.where(n <= max_tokens, ramp, -penalty)).astype(n.dtype)


def dynamic_sampling_keep(rewards: jax.Array, group_size: int) -> jax.Array:
    """`[B]` bool: False for every row of a group whose rewards are all equal (zero advantage)."""
    r = _groups(jnp.asarray(rewards), group_size)
    varied = jnp.max(r, axis=1) != jnp.min(r, axis=1)  # [B/G]
    return jnp.repeat(varied, group_size)


def batch_normalizers(mask: jax.Array, row_weight: jax.Array | None, cfg: LossConfig) -> dict[str, jax.Array]:
    """The denominators of the loss over a whole batch: {"loss": ..., "tokens": ...}.

    Passed to `policy_loss(..., normalizers=)` for each micro-batch of that batch, they make the
    micro-batch losses (and gradients) partial sums that add up exactly to the full batch's:
    token-level aggregation divides by the batch's total token count, not each micro-batch's.
    """
    mask = _float(mask)
    w = jnp.ones(mask.shape[:1], mask.dtype) if row_weight is None else _float(row_weight)
    tokens = jnp.sum(mask * w[:, None])
    return {"loss": tokens if cfg.aggregation == "token" else jnp.sum(w), "tokens": tokens}


def _aggregate(token_values: jax.Array, valid: jax.Array, w: jax.Array, cfg: LossConfig,
               denominator: jax.Array | None = None) -> jax.Array:
    """Reduce per-token values `[B, T]` to a scalar as `cfg` prescribes.

    `valid [B, T]` is the mask (0 on padding), `w [B]` the row weights; weights scale each row's
    contribution and also count in the normalisers (a row of weight 0 is as if absent).
    `denominator` replaces this batch's own (see `batch_normalizers`).
    """
    x = jnp.where(valid > 0, token_values, 0.0) * valid  # [B, T]
    agg = cfg.aggregation
    if agg == "token":
        total = jnp.sum(x * w[:, None])
        return _safe_div(total, jnp.sum(valid * w[:, None]) if denominator is None else denominator)
    if agg == "constant":
        per_row = jnp.sum(x, axis=1) / float(cfg.max_len_normalizer or x.shape[1])
    else:
        per_row = _safe_div(jnp.sum(x, axis=1), jnp.sum(valid, axis=1))
    return _safe_div(jnp.sum(per_row * w), jnp.sum(w) if denominator is None else denominator)


def policy_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None, advantages: jax.Array,
                mask: jax.Array, cfg: LossConfig, row_weight: jax.Array | None = None,
                normalizers: dict[str, jax.Array] | None = None, behaviour_logp: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped-surrogate loss (to minimise) and its metrics.

    logp, old_logp, ref_logp: `[B, T]` log-probs of the sampled tokens under the current,
    rollout and reference policies (ref_logp None: no KL term). advantages `[B]`, mask `[B, T]`,
    row_weight `[B]` (e.g. the dynamic-sampling keep mask as 0/1; None: all ones).
    behaviour_logp `[B, T]`: the sampler's own log-probs of the tokens; required when
    `cfg.tis_cap` is set (truncated importance sampling), refused otherwise.

    Per token: -w * min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) + beta * k3, with
    rho = exp(logp - old_logp) (`cfg.sequence_ratio`, GSPO: rho = s_i = exp of the mean of
    logp - old_logp over the sequence's tokens at each of them, in the GSPO-token form: its
    gradient at token t only through logp_t, d rho / d logp_t = s_i), w = 1 or, with TIS,
    `tis_weights(old_logp, behaviour_logp, mask, cfg.tis_cap)`, and k3 = exp(q) - q - 1,
    q = ref_logp - logp; then aggregated per `cfg.aggregation`. Padding tokens contribute neither
    values nor gradients, whatever they hold.

    Metrics: "loss"; "pg_loss" and "kl" (aggregated like the loss, so loss = pg_loss + beta*kl);
    "clip_fraction" (share of real tokens where the clip is active, i.e. the gradient is cut) and
    "ratio_mean", both token means over the kept rows; with TIS also "tis_weight_mean" and
    "tis_capped_fraction" (share of real tokens whose weight is the cap), token means likewise.

    `normalizers` (from `batch_normalizers` over the full batch) makes the loss and every metric
    this micro-batch's share of the full-batch value: summing them over micro-batches gives the
    full-batch loss, metrics and gradient exactly.
    """
    logp, old_logp, mask, adv = _float(logp), _float(old_logp), _float(mask), _float(advantages)
    if logp.ndim != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(f"logp {logp.shape}, old_logp {old_logp.shape} and mask {mask.shape} must be equal [B, T]")
    if adv.shape != logp.shape[:1]:
        raise ValueError(f"advantages {adv.shape} must be [B] = {logp.shape[:1]}")
    w = jnp.ones(logp.shape[:1], logp.dtype) if row_weight is None else _float(row_weight)
    if w.shape != logp.shape[:1]:
        raise ValueError(f"row_weight {w.shape} must be [B] = {logp.shape[:1]}")
    valid = mask > 0
    if (cfg.tis_cap is None) != (behaviour_logp is None):
        raise ValueError("behaviour_logp is needed exactly when cfg.tis_cap is set (truncated importance sampling); "
                         f"tis_cap={cfg.tis_cap}, behaviour_logp {'given' if behaviour_logp is not None else 'None'}")

    # Padding may hold anything (even inf): select before exp so neither value nor gradient leaks.
    log_ratio = jnp.where(valid, logp - old_logp, 0.0)  # [B, T]
    if cfg.sequence_ratio:  # GSPO-token: log s_i,t = sg[log s_i] + logp_t - sg[logp_t] (value log s_i)
        seq = _safe_div(jnp.sum(log_ratio, axis=1), jnp.sum(mask, axis=1))  # [B]: log s_i, the mean
        sg = jax.lax.stop_gradient
        log_ratio = jnp.where(valid, sg(seq)[:, None] + log_ratio - sg(log_ratio), 0.0)
    ratio = jnp.exp(log_ratio)
    a = adv[:, None]
    unclipped = ratio * a
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * a
    pg_tokens = -jnp.minimum(unclipped, clipped)  # [B, T]
    if cfg.tis_cap is not None:
        if behaviour_logp.shape != logp.shape:
            raise ValueError(f"behaviour_logp {behaviour_logp.shape} must be [B, T] = {logp.shape}")
        tis = tis_weights(old_logp, behaviour_logp, mask, cfg.tis_cap)  # [B, T], constants
        pg_tokens = pg_tokens * tis

    if ref_logp is not None:
        q = jnp.where(valid, _float(ref_logp) - logp, 0.0)
        kl_tokens = jnp.exp(q) - q - 1.0  # k3 estimate of KL(pi || pi_ref), >= 0
    else:
        kl_tokens = jnp.zeros_like(logp)

    den = normalizers or {}
    pg_loss = _aggregate(pg_tokens, mask, w, cfg, den.get("loss"))
    kl = _aggregate(kl_tokens, mask, w, cfg, den.get("loss"))
    loss = pg_loss + cfg.kl_beta * kl if (cfg.kl_beta and ref_logp is not None) else pg_loss

    def token_mean(x):
        m = mask * w[:, None]
        return _safe_div(jnp.sum(jnp.where(valid, x, 0.0) * m), den.get("tokens", jnp.sum(m)))

    metrics = {
        "loss": loss,
        "pg_loss": pg_loss,
        "kl": kl,
        "clip_fraction": jax.lax.stop_gradient(token_mean((clipped < unclipped).astype(logp.dtype))),
        "ratio_mean": jax.lax.stop_gradient(token_mean(ratio)),
    }
    if cfg.tis_cap is not None:
        metrics["tis_weight_mean"] = token_mean(tis)
        metrics["tis_capped_fraction"] = token_mean((tis >= cfg.tis_cap).astype(logp.dtype))
    return loss, metrics
