"""qwq_jax/rl/losses.py against plain-Python float64 computations written out here (loops, no jax)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwq_jax.rl.grpo import GRPOConfig
from qwq_jax.rl.losses import (LossConfig, batch_normalizers, dynamic_sampling_keep, group_advantages,
                               overlong_penalty, policy_loss, tis_default, tis_weights)

GRPO = LossConfig.for_kind("grpo")
DAPO = LossConfig.for_kind("dapo")
DR = LossConfig.for_kind("dr_grpo", max_len_normalizer=6)
GSPO = LossConfig.for_kind("gspo")
GSPO_WIDE = LossConfig.for_kind("gspo", clip_low=0.05, clip_high=0.08)  # some sequences inside, some clipped


# ---- the reference: the papers' formulas, token by token -------------------------------------------

def ref_advantages(rewards, g, std_normalize=True, eps=1e-6, ddof=1):
    out = []
    for start in range(0, len(rewards), g):
        grp = [float(r) for r in rewards[start:start + g]]
        mean = sum(grp) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / max(g - ddof, 1))
        out += [(r - mean) / (std + eps) if std_normalize else r - mean for r in grp]
    return np.array(out)


def ref_tis(old, behaviour, mask, cap):
    """TIS weights min(exp(old - mu), cap) on real tokens, 0 on padding."""
    return [[min(math.exp(float(old[b][t]) - float(behaviour[b][t])), cap) if mask[b][t] else 0.0
             for t in range(len(mask[0]))] for b in range(len(mask))]


def ref_ratios(logp, old, mask, sequence_ratio):
    """Per token importance ratios: exp(logp - old), or (GSPO) each sequence's
    exp(mean over its tokens of logp - old) at every one of its tokens."""
    B, T = len(logp), len(logp[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        toks = [t for t in range(T) if mask[b][t]]
        seq = sum(float(logp[b][t]) - float(old[b][t]) for t in toks) / len(toks) if toks else 0.0
        for t in toks:
            out[b][t] = math.exp(seq if sequence_ratio else float(logp[b][t]) - float(old[b][t]))
    return out


def ref_loss(logp, old, ref, adv, mask, cfg, row_weight=None, behaviour=None):
    """Returns (loss, pg_loss, kl, clip_fraction, ratio_mean) in float64, and with TIS
    (cfg.tis_cap) also (tis_weight_mean, tis_capped_fraction)."""
    B, T = len(logp), len(logp[0])
    w = [1.0] * B if row_weight is None else [float(x) for x in row_weight]
    pg_tok = [[0.0] * T for _ in range(B)]
    kl_tok = [[0.0] * T for _ in range(B)]
    ratios = ref_ratios(logp, old, mask, cfg.sequence_ratio)
    tis = ref_tis(old, behaviour, mask, cfg.tis_cap) if cfg.tis_cap is not None else None
    n_tok = n_clip = ratio_sum = tis_sum = n_capped = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b][t] == 0:
                continue
            rho = ratios[b][t]
            a = float(adv[b])
            rho_c = min(max(rho, 1 - cfg.clip_low), 1 + cfg.clip_high)
            pg_tok[b][t] = -min(rho * a, rho_c * a) * (tis[b][t] if tis else 1.0)
            if ref is not None:
                q = float(ref[b][t]) - float(logp[b][t])
                kl_tok[b][t] = math.exp(q) - q - 1
            n_tok += w[b]
            n_clip += w[b] * (rho_c * a < rho * a)
            ratio_sum += w[b] * rho
            if tis:
                tis_sum += w[b] * tis[b][t]
                n_capped += w[b] * (tis[b][t] >= cfg.tis_cap)

    def agg(tok):
        if cfg.token_level:
            num = sum(w[b] * tok[b][t] for b in range(B) for t in range(T) if mask[b][t])
            return num / n_tok if n_tok else 0.0
        rows = []
        for b in range(B):
            s = sum(tok[b][t] for t in range(T) if mask[b][t])
            n = sum(1 for t in range(T) if mask[b][t])
            if cfg.kind == "dr_grpo" or cfg.max_len_normalizer:
                rows.append(s / (cfg.max_len_normalizer or T))
            else:
                rows.append(s / n if n else 0.0)
        return sum(w[b] * rows[b] for b in range(B)) / sum(w) if sum(w) else 0.0

    pg, kl = agg(pg_tok), agg(kl_tok)
    loss = pg + (cfg.kl_beta * kl if ref is not None else 0.0)
    out = (loss, pg, kl, (n_clip / n_tok if n_tok else 0.0), (ratio_sum / n_tok if n_tok else 0.0))
    if tis:
        out += ((tis_sum / n_tok if n_tok else 0.0), (n_capped / n_tok if n_tok else 0.0))
    return out


def ref_pg_grad(logp, old, adv, mask, cfg, row_weight=None, behaviour=None):
    """d pg_loss / d logp by hand (numpy), the GSPO-token form for cfg.sequence_ratio: token t of
    row b gets -c_b * w_t * A_b * rho_t where its unclipped term is the minimum (else 0), rho_t its
    ratio (GSPO: the sequence's s_b, whose gradient at t is s_b through logp_t alone), w_t its TIS
    weight and c_b the row's aggregation coefficient."""
    logp, old, mask = (np.asarray(x, np.float64) for x in (logp, old, mask))
    B, T = logp.shape
    w = np.ones(B) if row_weight is None else np.asarray(row_weight, np.float64)
    rho = np.array(ref_ratios(logp, old, mask, cfg.sequence_ratio))
    tis = np.array(ref_tis(old, behaviour, mask, cfg.tis_cap)) if cfg.tis_cap is not None else mask
    a = np.asarray(adv, np.float64)[:, None]
    rho_c = np.clip(rho, 1 - cfg.clip_low, 1 + cfg.clip_high)
    live = (rho * a <= rho_c * a) & (mask > 0)  # the unclipped term is the min: gradient passes
    n = mask.sum(1)
    if cfg.aggregation == "token":
        c = w / (mask * w[:, None]).sum()
    elif cfg.aggregation == "constant":
        c = w / (cfg.max_len_normalizer or T) / w.sum()
    else:
        c = w / np.maximum(n, 1) / w.sum()
    return np.where(live, -c[:, None] * tis * a * rho, 0.0)


def check(logp, old, ref, adv, mask, cfg, row_weight=None, rtol=2e-5, atol=2e-6, behaviour=None):
    f = lambda *a: policy_loss(*a, cfg, row_weight=None if row_weight is None else jnp.asarray(row_weight),
                               behaviour_logp=None if behaviour is None else jnp.asarray(behaviour, jnp.float32))
    loss, m = f(jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32),
                None if ref is None else jnp.asarray(ref, jnp.float32), jnp.asarray(adv, jnp.float32),
                jnp.asarray(mask, jnp.float32))
    want = ref_loss(logp, old, ref, adv, mask, cfg, row_weight, behaviour)
    got = [float(loss), float(m["pg_loss"]), float(m["kl"]), float(m["clip_fraction"]), float(m["ratio_mean"])]
    if cfg.tis_cap is not None:
        got += [float(m["tis_weight_mean"]), float(m["tis_capped_fraction"])]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    assert float(m["loss"]) == float(loss)
    return got


def random_case(seed, B=4, T=6):
    rng = np.random.default_rng(seed)
    old = rng.normal(-1.5, 0.5, (B, T))
    logp = old + rng.normal(0, 0.25, (B, T))  # ratios spread across both clip edges
    ref = old + rng.normal(0, 0.3, (B, T))
    adv = rng.normal(0, 1, B)
    lengths = [6, 2, 4, 1][:B]
    mask = np.array([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])
    return logp, old, ref, adv, mask


def random_behaviour(old, seed):
    """Engine log-probs off the trainer's by N(0, 0.6): some weights exp(old - mu) above a cap of 2."""
    return old + np.random.default_rng(100 + seed).normal(0, 0.6, old.shape)


# ---- group advantages, overlong punishment, dynamic sampling ---------------------------------------

def test_group_advantages_with_and_without_std():
    r = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0]
    got = group_advantages(jnp.asarray(r), 4)
    np.testing.assert_allclose(np.asarray(got), ref_advantages(r, 4), rtol=1e-5, atol=1e-6)
    # First group by hand: mean 0.5, sample std sqrt(1/3).
    s = math.sqrt(1 / 3)
    np.testing.assert_allclose(np.asarray(got[:4]), [0.5 / (s + 1e-6), -0.5 / (s + 1e-6), -0.5 / (s + 1e-6),
                                                     0.5 / (s + 1e-6)], rtol=1e-5)
    assert np.all(np.asarray(got[4:8]) == 0.0)  # identical rewards: no signal, no division blow-up
    plain = group_advantages(jnp.asarray(r), 4, std_normalize=False)
    np.testing.assert_allclose(np.asarray(plain), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 1, -2, -1, 2], atol=1e-6)
    pop = group_advantages(jnp.asarray(r), 4, ddof=0)
    np.testing.assert_allclose(np.asarray(pop), ref_advantages(r, 4, ddof=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(group_advantages(jnp.asarray(r), 2)), ref_advantages(r, 2),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(jnp.asarray(r), 5)


def test_overlong_penalty_three_regimes():
    # L_max 20, L_cache 5: free up to 15, linear ramp to -penalty at 20, -penalty beyond.
    lengths = jnp.asarray([0, 3, 15, 16, 18, 20, 21, 40])
    got = np.asarray(overlong_penalty(lengths, max_tokens=20, buffer=5, penalty=0.5))
    np.testing.assert_allclose(got, [0, 0, 0, -0.1, -0.3, -0.5, -0.5, -0.5], atol=1e-6)
    got = np.asarray(overlong_penalty(lengths, max_tokens=20, buffer=5))
    np.testing.assert_allclose(got, [0, 0, 0, -0.2, -0.6, -1.0, -1.0, -1.0], atol=1e-6)
    # No buffer: a hard cliff beyond L_max only.
    got = np.asarray(overlong_penalty(lengths, max_tokens=20, buffer=0))
    np.testing.assert_allclose(got, [0, 0, 0, 0, 0, 0, -1, -1], atol=0)


def test_dynamic_sampling_keep_drops_all_equal_groups():
    r = jnp.asarray([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.0, 0.0, 1e-3])
    keep = np.asarray(dynamic_sampling_keep(r, 3))
    assert keep.dtype == bool
    assert keep.tolist() == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3


# ---- policy loss against the reference ------------------------------------------------------------

@pytest.mark.parametrize("cfg", [GRPO, DAPO, DR, LossConfig.for_kind("dr_grpo"),
                                 LossConfig.for_kind("dapo", kl_beta=0.1), LossConfig.for_kind("grpo", kl_beta=0.0),
                                 GSPO, GSPO_WIDE, LossConfig.for_kind("gspo", kl_beta=0.1, clip_low=0.1),
                                 LossConfig.for_kind("gspo", token_level=True, clip_high=0.1),
                                 LossConfig.for_kind("grpo", tis_cap=2.0), LossConfig.for_kind("dapo", tis_cap=1.5),
                                 LossConfig.for_kind("dr_grpo", max_len_normalizer=6, tis_cap=2.0),
                                 LossConfig.for_kind("gspo", clip_low=0.05, clip_high=0.08, tis_cap=2.0)],
                         ids=["grpo", "dapo", "dr_grpo_6", "dr_grpo_T", "dapo_kl", "grpo_nokl", "gspo", "gspo_wide",
                              "gspo_kl", "gspo_token_agg", "grpo_tis", "dapo_tis", "dr_grpo_tis", "gspo_tis"])
def test_policy_loss_matches_reference(cfg):
    for seed in range(3):
        logp, old, ref, adv, mask = random_case(seed)
        mu = random_behaviour(old, seed) if cfg.tis_cap is not None else None
        check(logp, old, ref, adv, mask, cfg, behaviour=mu)
        check(logp, old, None, adv, mask, cfg, behaviour=mu)
        check(logp, old, ref, adv, mask, cfg, row_weight=[1.0, 0.0, 1.0, 1.0], behaviour=mu)


def test_masking_ignores_padding_values_and_gradients():
    logp, old, ref, adv, mask = random_case(7)
    mu = random_behaviour(old, 7)
    junk = [np.nan, np.inf, -np.inf, 1e4]
    lp2, old2, ref2, mu2 = logp.copy(), old.copy(), ref.copy(), mu.copy()
    for b in range(len(mask)):
        for t in range(len(mask[0])):
            if mask[b][t] == 0:
                lp2[b, t], old2[b, t], ref2[b, t] = junk[(b + t) % 4], junk[(b + t + 1) % 4], junk[(b + t + 2) % 4]
                mu2[b, t] = junk[(b + t + 3) % 4]
    for cfg in (GRPO, DAPO, DR, GSPO_WIDE, LossConfig.for_kind("grpo", tis_cap=2.0),
                LossConfig.for_kind("gspo", clip_low=0.05, clip_high=0.08, tis_cap=2.0)):
        tis = cfg.tis_cap is not None
        f = lambda lp, o, r, m: policy_loss(lp, o, r, jnp.asarray(adv, jnp.float32), jnp.asarray(mask, jnp.float32),
                                            cfg, behaviour_logp=m if tis else None)
        args1 = [jnp.asarray(x, jnp.float32) for x in (logp, old, ref, mu)]
        args2 = [jnp.asarray(x, jnp.float32) for x in (lp2, old2, ref2, mu2)]
        (l1, m1), g1 = jax.value_and_grad(f, has_aux=True)(*args1)
        (l2, m2), g2 = jax.value_and_grad(f, has_aux=True)(*args2)
        assert float(l1) == float(l2)
        for k in m1:
            assert float(m1[k]) == float(m2[k]), k
        np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
        assert np.all(np.asarray(g1)[mask == 0] == 0.0)
        np.testing.assert_allclose(float(l1), ref_loss(logp, old, ref, adv, mask, cfg, behaviour=mu)[0], rtol=2e-5)


def test_clip_higher_asymmetry_positive_advantage():
    # One sequence, A = +1, ratios 1.1 (free), 1.25 (between 1.2 and 1.28), 1.3 (beyond both).
    ratios = [1.1, 1.25, 1.3]
    old = np.zeros((1, 3))
    logp = np.log(np.array([ratios]))
    mask = np.ones((1, 3))
    grpo = policy_loss(jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32), None,
                       jnp.ones(1), jnp.asarray(mask, jnp.float32), GRPO)
    dapo = policy_loss(jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32), None,
                       jnp.ones(1), jnp.asarray(mask, jnp.float32), DAPO)
    np.testing.assert_allclose(float(grpo[0]), -(1.1 + 1.2 + 1.2) / 3, rtol=1e-6)   # 1.25 clipped to 1.2
    np.testing.assert_allclose(float(dapo[0]), -(1.1 + 1.25 + 1.28) / 3, rtol=1e-6)  # 1.25 kept, 1.3 -> 1.28
    np.testing.assert_allclose(float(grpo[1]["clip_fraction"]), 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(dapo[1]["clip_fraction"]), 1 / 3, rtol=1e-6)
    # The gradient is cut exactly where the clip is active.
    g_grpo = jax.grad(lambda lp: policy_loss(lp, jnp.zeros((1, 3)), None, jnp.ones(1), jnp.ones((1, 3)), GRPO)[0])(
        jnp.asarray(logp, jnp.float32))
    g_dapo = jax.grad(lambda lp: policy_loss(lp, jnp.zeros((1, 3)), None, jnp.ones(1), jnp.ones((1, 3)), DAPO)[0])(
        jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(np.asarray(g_grpo)[0], [-1.1 / 3, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_dapo)[0], [-1.1 / 3, -1.25 / 3, 0], rtol=1e-5)


def test_negative_advantages_clip_low_side():
    # A = -2: ratios below 1 - 0.2 are clipped (no more push down); ratios above 1 + eps never are.
    ratios = [0.7, 0.9, 1.25, 1.5]
    logp = np.log(np.array([ratios]))
    args = (jnp.asarray(logp, jnp.float32), jnp.zeros((1, 4)), None, jnp.asarray([-2.0]), jnp.ones((1, 4)))
    # -min(r*A, clip(r)*A) with A = -2: 0.7 -> 0.8*2, 0.9 -> 0.9*2, 1.25 -> 1.25*2, 1.5 -> 1.5*2
    want = (1.6 + 1.8 + 2.5 + 3.0) / 4
    for cfg in (GRPO, DAPO):  # clip-higher changes nothing for negative advantages
        loss, m = policy_loss(*args, cfg)
        np.testing.assert_allclose(float(loss), want, rtol=1e-6)
        np.testing.assert_allclose(float(m["clip_fraction"]), 0.25, rtol=1e-6)
        check(logp, np.zeros((1, 4)), None, [-2.0], np.ones((1, 4)), cfg)


def test_aggregations_differ_on_unequal_lengths():
    # Row 0 has one token, row 1 three; ratio 1 everywhere, so token losses are -A.
    logp = np.zeros((2, 4))
    mask = np.array([[1, 0, 0, 0], [1, 1, 1, 0]], float)
    adv = [2.0, -1.0]
    args = (jnp.zeros((2, 4)), jnp.zeros((2, 4)), None, jnp.asarray(adv), jnp.asarray(mask))
    seq = float(policy_loss(*args, GRPO)[0])
    tok = float(policy_loss(*args, DAPO)[0])
    dr = float(policy_loss(*args, LossConfig.for_kind("dr_grpo", max_len_normalizer=8))[0])
    dr_t = float(policy_loss(*args, LossConfig.for_kind("dr_grpo"))[0])
    np.testing.assert_allclose(seq, -(2.0 + -1.0) / 2, rtol=1e-6)                # mean of per-row means
    np.testing.assert_allclose(tok, -(2.0 * 1 + -1.0 * 3) / 4, rtol=1e-6)        # all tokens pooled
    np.testing.assert_allclose(dr, -(2.0 * 1 / 8 + -1.0 * 3 / 8) / 2, rtol=1e-6)  # sums / constant, mean rows
    np.testing.assert_allclose(dr_t, -(2.0 * 1 / 4 + -1.0 * 3 / 4) / 2, rtol=1e-6)  # constant = padded T
    assert len({round(x, 6) for x in (seq, tok, dr)}) == 3
    for cfg in (GRPO, DAPO, DR):
        check(logp, np.zeros((2, 4)), None, adv, mask, cfg)


def test_ratio_one_gives_minus_mean_advantage():
    adv = [0.5, -1.5, 2.0, 0.25]
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]], float)
    lp = jnp.full((4, 3), -0.7)
    for cfg, want in [(GRPO, -(0.5 - 1.5 + 2.0 + 0.25) / 4),
                      (DAPO, -(0.5 * 2 - 1.5 * 1 + 2.0 * 3 + 0.25 * 3) / 9),
                      (LossConfig.for_kind("dr_grpo", max_len_normalizer=5),
                       -(0.5 * 2 - 1.5 * 1 + 2.0 * 3 + 0.25 * 3) / 5 / 4)]:
        loss, m = policy_loss(lp, lp, lp, jnp.asarray(adv), jnp.asarray(mask), cfg)
        np.testing.assert_allclose(float(m["pg_loss"]), want, rtol=1e-6)
        np.testing.assert_allclose(float(loss), want, rtol=1e-6)  # ref == logp: KL 0
        assert float(m["kl"]) == 0.0 and float(m["clip_fraction"]) == 0.0
        np.testing.assert_allclose(float(m["ratio_mean"]), 1.0, rtol=1e-7)


def test_kl_k3_values():
    # q = ref - logp in {log 2, -log 2, 0.5, 0}: k3 = e^q - q - 1.
    qs = [math.log(2), -math.log(2), 0.5, 0.0]
    logp = np.full((1, 4), -1.0)
    ref = logp + np.array([qs])
    want_tok = [1 - math.log(2), 0.5 + math.log(2) - 1, math.exp(0.5) - 1.5, 0.0]
    cfg = LossConfig.for_kind("grpo", kl_beta=0.1)
    loss, m = policy_loss(jnp.asarray(logp, jnp.float32), jnp.asarray(logp, jnp.float32),
                          jnp.asarray(ref, jnp.float32), jnp.zeros(1), jnp.ones((1, 4)), cfg)
    np.testing.assert_allclose(float(m["kl"]), sum(want_tok) / 4, rtol=1e-6)
    np.testing.assert_allclose(float(loss), 0.1 * sum(want_tok) / 4, rtol=1e-6)
    assert all(k >= 0 for k in want_tok)
    # kl_beta 0 (DAPO default): KL still reported, not added.
    loss, m = policy_loss(jnp.asarray(logp, jnp.float32), jnp.asarray(logp, jnp.float32),
                          jnp.asarray(ref, jnp.float32), jnp.zeros(1), jnp.ones((1, 4)), DAPO)
    assert float(loss) == 0.0 and float(m["kl"]) > 0
    # No reference: no KL at all.
    loss, m = policy_loss(jnp.asarray(logp, jnp.float32), jnp.asarray(logp, jnp.float32), None,
                          jnp.zeros(1), jnp.ones((1, 4)), cfg)
    assert float(loss) == 0.0 and float(m["kl"]) == 0.0


def test_loss_ignores_dynamically_dropped_rows():
    rewards = jnp.asarray([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])  # groups of 2: keep rows 2..3, 6..7
    keep = dynamic_sampling_keep(rewards, 2)
    assert np.asarray(keep).tolist() == [False, False, True, True, False, False, True, True]
    rng = np.random.default_rng(3)
    old = rng.normal(-1, 0.5, (8, 5))
    logp = old + rng.normal(0, 0.2, (8, 5))
    ref = old + rng.normal(0, 0.2, (8, 5))
    mask = (np.arange(5)[None, :] < np.array([5, 1, 3, 4, 2, 5, 1, 2])[:, None]).astype(float)
    adv = np.asarray(group_advantages(rewards, 2))
    kept = np.asarray(keep)
    for cfg in (GRPO, DAPO, DR):
        w = jnp.asarray(keep, jnp.float32)
        full = policy_loss(*(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv, mask)), cfg, row_weight=w)
        sub = policy_loss(*(jnp.asarray(x[kept], jnp.float32) for x in (logp, old, ref, adv, mask)), cfg)
        for k in full[1]:
            np.testing.assert_allclose(float(full[1][k]), float(sub[1][k]), rtol=1e-6, err_msg=k)
        # Whatever the dropped rows hold, nothing changes and they get no gradient.
        lp2 = logp.copy()
        lp2[~kept] += 3.0
        f = lambda lp: policy_loss(lp, *(jnp.asarray(x, jnp.float32) for x in (old, ref, adv, mask)), cfg,
                                   row_weight=w)[0]
        assert float(f(jnp.asarray(lp2, jnp.float32))) == pytest.approx(float(full[0]), rel=1e-6)
        g = np.asarray(jax.grad(f)(jnp.asarray(lp2, jnp.float32)))
        assert np.all(g[~kept] == 0.0)
        check(logp, old, ref, adv, mask, cfg, row_weight=np.asarray(w))
    # Every group dropped: loss 0, finite zero gradient.
    w0 = jnp.zeros(8)
    f = lambda lp: policy_loss(lp, *(jnp.asarray(x, jnp.float32) for x in (old, ref, adv, mask)), GRPO,
                               row_weight=w0)
    loss, m = f(jnp.asarray(logp, jnp.float32))
    assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in m.values())
    assert np.all(np.asarray(jax.grad(lambda lp: f(lp)[0])(jnp.asarray(logp, jnp.float32))) == 0.0)


def test_gradient_matches_finite_differences():
    logp, old, ref, adv, mask = random_case(11)
    with jax.enable_x64(True):
        for cfg in (LossConfig.for_kind("grpo", kl_beta=0.3), DAPO, DR):
            f = lambda lp: policy_loss(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask),
                                       cfg)[0]
            lp = jnp.asarray(logp, jnp.float64)
            g = np.asarray(jax.grad(f)(lp))
            assert g.dtype == np.float64
            h = 1e-6
            fd = np.zeros_like(logp)
            fd_ref = np.zeros_like(logp)
            for b in range(logp.shape[0]):
                for t in range(logp.shape[1]):
                    e = np.zeros_like(logp)
                    e[b, t] = h
                    fd[b, t] = (float(f(lp + e)) - float(f(lp - e))) / (2 * h)
                    fd_ref[b, t] = (ref_loss(logp + e, old, ref, adv, mask, cfg)[0]
                                    - ref_loss(logp - e, old, ref, adv, mask, cfg)[0]) / (2 * h)
            np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(g, fd_ref, rtol=1e-5, atol=1e-8)
            assert np.abs(g).max() > 0 and np.all(g[mask == 0] == 0)


# ---- GSPO and truncated importance sampling ---------------------------------------------------------

def test_gspo_sequence_ratio_by_hand():
    # One sequence of 3 tokens, token log-ratios 0.1, -0.1, 0.3: s = exp(0.1), far above 1 + 4e-4.
    old = np.zeros((1, 3))
    logp = np.array([[0.1, -0.1, 0.3]])
    s = math.exp(0.1)
    f = lambda lp, a: policy_loss(lp, jnp.zeros((1, 3)), None, jnp.asarray([a]), jnp.ones((1, 3)), GSPO)
    lp = jnp.asarray(logp, jnp.float32)
    # A = +1: clipped to 1 + 4e-4, no gradient; A = -2: s*A is the min, the gradient is -A*s/|y| per token.
    (loss, m), g = jax.value_and_grad(f, has_aux=True)(lp, 1.0)
    np.testing.assert_allclose(float(loss), -(1 + 4e-4), rtol=1e-6)
    assert float(m["clip_fraction"]) == 1.0 and np.all(np.asarray(g) == 0.0)
    np.testing.assert_allclose(float(m["ratio_mean"]), s, rtol=1e-6)
    (loss, m), g = jax.value_and_grad(f, has_aux=True)(lp, -2.0)
    np.testing.assert_allclose(float(loss), 2 * s, rtol=1e-6)
    assert float(m["clip_fraction"]) == 0.0
    np.testing.assert_allclose(np.asarray(g), np.full((1, 3), 2 * s / 3), rtol=1e-6)
    # The token-level ratios exp(0.1), exp(-0.1), exp(0.3) would clip differently under GRPO: not GSPO's.
    grpo = float(policy_loss(lp, jnp.zeros((1, 3)), None, jnp.asarray([1.0]), jnp.ones((1, 3)), GRPO)[0])
    np.testing.assert_allclose(grpo, -(math.exp(0.1) + math.exp(-0.1) + 1.2) / 3, rtol=1e-6)
    # Just inside the paper's range: s = exp(2e-4), unclipped for either sign.
    lp = jnp.asarray([[3e-4, 1e-4, 2e-4]], jnp.float32) + jnp.asarray(old, jnp.float32)
    for a in (1.5, -1.5):
        loss, m = f(lp, a)
        np.testing.assert_allclose(float(loss), -a * math.exp(2e-4), rtol=1e-6)
        assert float(m["clip_fraction"]) == 0.0


def test_gspo_rows_of_unequal_length_weigh_equally():
    # Ratio 1 everywhere: the loss is -mean(A) over sequences whatever their lengths (sequence
    # aggregation), and each token's gradient -A_i / (B * |y_i|).
    adv = np.array([0.5, -1.5, 2.0, 0.25])
    mask = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]], float)
    lp = jnp.full((4, 3), -0.7)
    f = lambda x: policy_loss(x, lp, lp, jnp.asarray(adv), jnp.asarray(mask), GSPO)
    (loss, m), g = jax.value_and_grad(f, has_aux=True)(lp)
    np.testing.assert_allclose(float(loss), -adv.mean(), rtol=1e-6)
    assert float(m["kl"]) == 0.0 and float(m["clip_fraction"]) == 0.0
    np.testing.assert_allclose(np.asarray(g), -adv[:, None] / (4 * mask.sum(1, keepdims=True)) * mask, rtol=1e-6)


def test_gspo_and_tis_gradients_match_numpy():
    """jax.grad against the hand-derived gradient (ref_pg_grad) and, where the surrogate is the
    plain function of logp (no TIS, or TIS with token ratios), central finite differences of the
    plain-Python loss. GSPO with TIS: the GSPO-token form gives each token its own weight, so its
    gradient is not the derivative of the loss value (which carries each row's mean weight)."""
    logp, old, ref, adv, mask = random_case(11)
    mu = random_behaviour(old, 11)
    cfgs = [GSPO_WIDE, LossConfig.for_kind("gspo", clip_low=0.05, clip_high=0.08, token_level=True),
            LossConfig.for_kind("gspo", clip_low=0.05, clip_high=0.08, max_len_normalizer=7),
            LossConfig.for_kind("gspo", clip_low=0.05, clip_high=0.08, tis_cap=2.0),
            LossConfig.for_kind("grpo", kl_beta=0.0, tis_cap=2.0), LossConfig.for_kind("dapo", tis_cap=1.5)]
    w = np.array([1.0, 1.0, 0.0, 1.0])
    token_logp = logp
    with jax.enable_x64(True):
        for cfg in cfgs:
            tis = cfg.tis_cap is not None
            # GSPO: smaller token gaps, so that of the kept rows s is 0.929 (A < 0: clipped), 1.025 (free)
            # and 1.086 (A > 0: clipped) against the range [0.95, 1.08].
            logp = old + 0.3 * (token_logp - old) if cfg.sequence_ratio else token_logp
            f = lambda lp: policy_loss(lp, jnp.asarray(old), None, jnp.asarray(adv), jnp.asarray(mask), cfg,
                                       row_weight=jnp.asarray(w), behaviour_logp=jnp.asarray(mu) if tis else None)[0]
            g = np.asarray(jax.grad(f)(jnp.asarray(logp)))
            want = ref_pg_grad(logp, old, adv, mask, cfg, row_weight=w, behaviour=mu if tis else None)
            np.testing.assert_allclose(g, want, rtol=1e-9, atol=1e-12)
            assert np.abs(g).max() > 0 and np.all(g[mask == 0] == 0) and np.all(g[2] == 0)
            if cfg.sequence_ratio:  # one kept row free, two clipped (no gradient)
                assert (np.abs(g).sum(1) > 0).tolist() == [False, True, False, False]
            if tis and cfg.sequence_ratio:
                continue
            h = 1e-6
            fd = np.zeros_like(logp)
            for b in range(logp.shape[0]):
                for t in range(logp.shape[1]):
                    e = np.zeros_like(logp)
                    e[b, t] = h
                    fd[b, t] = (ref_loss(logp + e, old, None, adv, mask, cfg, w, mu if tis else None)[0]
                                - ref_loss(logp - e, old, None, adv, mask, cfg, w, mu if tis else None)[0]) / (2 * h)
            np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


def test_gspo_token_form_equals_sequence_gradient_without_tis():
    """Without TIS the GSPO-token surrogate's gradient is exactly d/dlogp of min(s_i A, clip(s_i) A)
    with s_i = exp(mean log-ratio): jax.grad of a direct float64 GSPO written here agrees."""
    logp, old, _, adv, mask = random_case(3)
    with jax.enable_x64(True):
        def direct(lp):  # the paper's objective, sequence by sequence
            n = mask.sum(1)
            s = jnp.exp(jnp.sum(jnp.where(mask > 0, lp - old, 0.0), 1) / n)
            a = jnp.asarray(adv)
            return -jnp.mean(jnp.minimum(s * a, jnp.clip(s, 1 - 0.05, 1 + 0.08) * a))

        ours = lambda lp: policy_loss(lp, jnp.asarray(old), None, jnp.asarray(adv), jnp.asarray(mask), GSPO_WIDE)[0]
        lp = jnp.asarray(logp)
        np.testing.assert_allclose(float(ours(lp)), float(direct(lp)), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(jax.grad(ours)(lp)), np.asarray(jax.grad(direct)(lp)), rtol=1e-10,
                                   atol=1e-14)


def test_tis_weights_match_numpy():
    rng = np.random.default_rng(0)
    old = rng.normal(-2, 1, (3, 7))
    mu = old + rng.normal(0, 1.0, (3, 7))
    mask = (np.arange(7)[None, :] < np.array([7, 3, 0])[:, None]).astype(float)
    junk = mu.copy()
    junk[mask == 0] = np.nan  # padding may hold anything
    for cap in (1.0, 2.0, 5.0):
        want = np.where(mask > 0, np.minimum(np.exp(old - mu), cap), 0.0)
        got = np.asarray(tis_weights(jnp.asarray(old, jnp.float32), jnp.asarray(junk, jnp.float32),
                                     jnp.asarray(mask, jnp.float32), cap))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        assert got.max() <= cap and (got[mask > 0] > 0).all()
    gaps = np.exp(old - mu)[mask > 0]
    assert (gaps > 2.0).any() and (gaps < 1.0).any()  # the case has both sides of the caps
    # Constants for the gradient: no derivative through either log-prob.
    g = jax.grad(lambda o, m: jnp.sum(tis_weights(o, m, jnp.asarray(mask), 2.0)), argnums=(0, 1))(
        jnp.asarray(old, jnp.float32), jnp.asarray(mu, jnp.float32))
    assert all(np.all(np.asarray(x) == 0.0) for x in g)
    # bfloat16 log-probs: weights in float32; huge gaps saturate at the cap, not inf.
    w = tis_weights(jnp.asarray([[0.0, 50.0, -50.0]], jnp.bfloat16), jnp.zeros((1, 3), jnp.bfloat16),
                    jnp.ones((1, 3)), 2.0)
    assert w.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(w), [[1.0, 2.0, math.exp(-50.0)]], rtol=1e-6)


def test_tis_weighs_each_token_term():
    # GRPO, one row, ratio 1 (logp = old), A = 1: token t contributes -w_t / 3; w = (e^0.5, 2 (capped), e^-1).
    old = jnp.zeros((1, 3))
    mu = jnp.asarray([[-0.5, -3.0, 1.0]])
    cfg = LossConfig.for_kind("grpo", tis_cap=2.0)
    f = lambda lp: policy_loss(lp, old, None, jnp.ones(1), jnp.ones((1, 3)), cfg, behaviour_logp=mu)
    (loss, m), g = jax.value_and_grad(f, has_aux=True)(old)
    wts = [math.exp(0.5), 2.0, math.exp(-1.0)]
    np.testing.assert_allclose(float(loss), -sum(wts) / 3, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), [[-x / 3 for x in wts]], rtol=1e-6)
    np.testing.assert_allclose(float(m["tis_weight_mean"]), sum(wts) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(m["tis_capped_fraction"]), 1 / 3, rtol=1e-6)
    # Engine and trainer agree: weights 1, the loss of plain GRPO.
    same = policy_loss(old, old, None, jnp.ones(1), jnp.ones((1, 3)), cfg, behaviour_logp=old)
    np.testing.assert_allclose(float(same[0]), float(policy_loss(old, old, None, jnp.ones(1), jnp.ones((1, 3)),
                                                                 GRPO)[0]), rtol=1e-7)
    # GSPO: the value carries the row's mean weight, each token's gradient its own weight.
    gs = LossConfig.for_kind("gspo", tis_cap=2.0)
    (loss, _), g = jax.value_and_grad(lambda lp: policy_loss(lp, old, None, jnp.ones(1), jnp.ones((1, 3)), gs,
                                                             behaviour_logp=mu), has_aux=True)(old)
    np.testing.assert_allclose(float(loss), -sum(wts) / 3, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g), [[-x / 3 for x in wts]], rtol=1e-6)
    # behaviour_logp exactly when TIS is on.
    with pytest.raises(ValueError, match="behaviour_logp"):
        policy_loss(old, old, None, jnp.ones(1), jnp.ones((1, 3)), cfg)
    with pytest.raises(ValueError, match="behaviour_logp"):
        policy_loss(old, old, None, jnp.ones(1), jnp.ones((1, 3)), GRPO, behaviour_logp=mu)
    with pytest.raises(ValueError, match="behaviour_logp"):
        policy_loss(old, old, None, jnp.ones(1), jnp.ones((1, 3)), cfg, behaviour_logp=mu[:, :2])


def test_gspo_and_tis_micro_batches_sum_to_the_batch():
    # With the full batch's normalizers, strided micro-batch losses, metrics and gradients add up.
    rng = np.random.default_rng(4)
    B, T = 8, 5
    old = rng.normal(-1, 0.5, (B, T))
    logp = old + rng.normal(0, 0.05, (B, T))
    mu = old + rng.normal(0, 0.6, (B, T))
    adv = rng.normal(0, 1, B)
    mask = (np.arange(T)[None, :] < rng.integers(1, T + 1, B)[:, None]).astype(float)
    w = np.array([1, 1, 0, 1, 1, 1, 0, 1], float)
    for cfg in (LossConfig.for_kind("gspo", clip_low=0.02, clip_high=0.03, tis_cap=2.0),
                LossConfig.for_kind("dapo", tis_cap=2.0), LossConfig.for_kind("gspo", token_level=True)):
        tis = cfg.tis_cap is not None
        args = [jnp.asarray(x, jnp.float32) for x in (old, adv, mask, w, mu)]
        f = lambda lp, o, a, m, rw, b, norms: policy_loss(lp, o, None, a, m, cfg, row_weight=rw, normalizers=norms,
                                                          behaviour_logp=b if tis else None)
        norms = batch_normalizers(args[2], args[3], cfg)
        vg = jax.jit(jax.value_and_grad(f, has_aux=True))
        (full, fm), g = vg(jnp.asarray(logp, jnp.float32), *args, None)
        total, tm, g_sum = 0.0, {k: 0.0 for k in fm}, np.zeros((B, T))
        for i in range(2):
            rows = np.arange(i, B, 2)
            (part, pm), pg = vg(jnp.asarray(logp[rows], jnp.float32), *(x[rows] for x in args), norms)
            total += float(part)
            tm = {k: tm[k] + float(pm[k]) for k in tm}
            g_sum[rows] = np.asarray(pg)
        np.testing.assert_allclose(total, float(full), rtol=1e-5, atol=1e-7)
        for k in fm:
            np.testing.assert_allclose(tm[k], float(fm[k]), rtol=1e-5, atol=1e-7, err_msg=k)
        np.testing.assert_allclose(g_sum, np.asarray(g), rtol=1e-5, atol=1e-8)


def test_tis_default_on_when_the_engine_numerics_differ():
    f32, bf16, f16 = jnp.float32, jnp.bfloat16, jnp.float16
    assert not tis_default(bf16, bf16)
    assert not tis_default(bf16, [bf16, bf16])
    assert not tis_default("float32", [np.float32])
    assert tis_default(f32, bf16)                      # engine in bf16, update in fp32
    assert tis_default(bf16, [bf16, f16])              # a KV cache in another dtype
    assert tis_default(bf16, [bf16, bf16], int8=True)  # int8 weights or KV cache
    # GRPOConfig: unset follows the engine; true / false win either way; the cap travels along.
    for differs in (False, True):
        assert (GRPOConfig().loss_config(engine_differs=differs).tis_cap is not None) is differs
        assert GRPOConfig(tis=True).loss_config(engine_differs=differs).tis_cap == 2.0
        assert GRPOConfig(tis=False).loss_config(engine_differs=differs).tis_cap is None
    assert GRPOConfig(tis_cap=3).loss_config(engine_differs=True).tis_cap == 3
    assert GRPOConfig(tis=True, loss="gspo").loss_config().sequence_ratio
    for bad in (0.5, 0, -1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="tis_cap"):
            GRPOConfig(tis_cap=bad)
        with pytest.raises(ValueError, match="tis_cap"):
            LossConfig.for_kind("grpo", tis_cap=bad)
    with pytest.raises(ValueError, match="tis must be true, false or unset"):
        GRPOConfig(tis="yes")


def test_gspo_config_defaults_and_overrides():
    assert (GSPO.clip_low, GSPO.clip_high, GSPO.kl_beta, GSPO.std_normalize, GSPO.sequence_ratio, GSPO.tis_cap) == (
        3e-4, 4e-4, 0.0, True, True, None)
    assert GSPO.aggregation == "sequence"
    assert not any(LossConfig.for_kind(k).sequence_ratio for k in ("grpo", "dapo", "dr_grpo"))
    lc = GRPOConfig(loss="gspo").loss_config()
    assert (lc.kind, lc.clip_low, lc.clip_high, lc.kl_beta) == ("gspo", 3e-4, 4e-4, 0.0)
    lc = GRPOConfig(loss="gspo", clip_low=1e-3, clip_high=2e-3, kl_beta=0.01).loss_config()
    assert (lc.clip_low, lc.clip_high, lc.kl_beta) == (1e-3, 2e-3, 0.01)
    assert GRPOConfig(loss="dapo", clip_high=0.3).loss_config().clip_high == 0.3
    assert GRPOConfig(loss="grpo").loss_config().clip_low == 0.2  # unset: the kind's
    with pytest.raises(ValueError, match="'gpso'.*gspo"):
        GRPOConfig(loss="gpso")
    with pytest.raises(ValueError, match="clip_low and clip_high must be >= 0"):
        GRPOConfig(loss="gspo", clip_low=-1e-4)


def test_everything_jits():
    logp, old, ref, adv, mask = random_case(5)
    r = jnp.asarray([1.0, 0.0, 1.0, 1.0])
    ga = jax.jit(group_advantages, static_argnames=("group_size", "std_normalize"))
    np.testing.assert_allclose(np.asarray(ga(r, group_size=2, std_normalize=True)),
                               np.asarray(group_advantages(r, 2)), rtol=1e-6)
    op = jax.jit(overlong_penalty, static_argnames=("max_tokens", "buffer", "penalty"))
    np.testing.assert_allclose(np.asarray(op(jnp.asarray([10, 18, 25]), max_tokens=20, buffer=4, penalty=1.0)),
                               [0, -0.5, -1.0], atol=1e-6)
    ds = jax.jit(dynamic_sampling_keep, static_argnames="group_size")
    assert np.asarray(ds(r, group_size=2)).tolist() == [True, True, False, False]
    pl = jax.jit(policy_loss, static_argnames="cfg")
    for cfg in (GRPO, DAPO, DR, GSPO, LossConfig.for_kind("gspo", tis_cap=2.0),
                LossConfig.for_kind("dapo", tis_cap=2.0)):
        args = tuple(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv, mask))
        mu = jnp.asarray(random_behaviour(old, 5), jnp.float32) if cfg.tis_cap is not None else None
        jl, jm = pl(*args, cfg=cfg, row_weight=jnp.asarray([1.0, 1.0, 0.0, 1.0]), behaviour_logp=mu)
        el, em = policy_loss(*args, cfg, row_weight=jnp.asarray([1.0, 1.0, 0.0, 1.0]), behaviour_logp=mu)
        np.testing.assert_allclose(float(jl), float(el), rtol=1e-6)
        extra = {"tis_weight_mean", "tis_capped_fraction"} if cfg.tis_cap is not None else set()
        assert set(jm) == {"loss", "pg_loss", "kl", "clip_fraction", "ratio_mean"} | extra
        jl2, _ = pl(*args[:2], None, *args[3:], cfg=cfg, behaviour_logp=mu)
        assert np.isfinite(float(jl2))
    # bfloat16 log-probs are computed in float32.
    bf = tuple(jnp.asarray(x, jnp.bfloat16) for x in (logp, old, ref))
    loss, _ = pl(*bf, jnp.asarray(adv), jnp.asarray(mask), cfg=GRPO)
    assert loss.dtype == jnp.float32


def test_config_defaults_and_errors():
    assert (GRPO.clip_low, GRPO.clip_high, GRPO.kl_beta, GRPO.std_normalize, GRPO.token_level) == (
        0.2, 0.2, 0.04, True, False)
    assert (DAPO.clip_low, DAPO.clip_high, DAPO.kl_beta, DAPO.std_normalize, DAPO.token_level) == (
        0.2, 0.28, 0.0, True, True)
    dr = LossConfig.for_kind("dr_grpo")
    assert (dr.kl_beta, dr.std_normalize, dr.token_level, dr.aggregation) == (0.0, False, False, "constant")
    assert GRPO.aggregation == "sequence" and DAPO.aggregation == "token"
    assert LossConfig.for_kind("dapo", clip_high=0.3, overlong_buffer=4).clip_high == 0.3
    assert LossConfig() == GRPO
    with pytest.raises(ValueError, match="'ppo'"):
        LossConfig.for_kind("ppo")
    with pytest.raises(ValueError, match="'ppo'"):
        LossConfig(kind="ppo")
    with pytest.raises(ValueError, match="token_level"):
        LossConfig.for_kind("dapo", max_len_normalizer=10)
    with pytest.raises(TypeError):
        LossConfig.for_kind("grpo", not_a_field=1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), None, jnp.zeros(3), jnp.ones((2, 3)), GRPO)


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_descending_the_loss_raises_reward_on_a_bandit(kind):
    """End-to-end sign check: a softmax policy over 6 arms (arms 0 and 1 pay 1) learns from the loss."""
    cfg = LossConfig.for_kind(kind)
    G, n_groups, K = 8, 4, 6

    @jax.jit
    def step(logits, actions, rewards):
        adv = group_advantages(rewards, G, cfg.std_normalize)
        keep = dynamic_sampling_keep(rewards, G).astype(jnp.float32)

        def loss_fn(lg):
            logp = jax.nn.log_softmax(lg)[actions][:, None]  # [B, 1]
            return policy_loss(logp, jax.lax.stop_gradient(logp), jax.lax.stop_gradient(logp), adv,
                               jnp.ones_like(logp), cfg, row_weight=keep)[0]

        return logits - 1.0 * jax.grad(loss_fn)(logits)

    rng = np.random.default_rng(0)
    logits = jnp.zeros(K)
    for _ in range(40):
        p = np.asarray(jax.nn.softmax(logits), np.float64)
        actions = rng.choice(K, size=G * n_groups, p=p / p.sum())
        logits = step(logits, jnp.asarray(actions), jnp.asarray((actions < 2).astype(np.float32)))
    assert float(jax.nn.softmax(logits)[:2].sum()) > 0.9  # from 1/3
