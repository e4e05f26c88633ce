"""qwq_jax/sampling.py against independent float64 numpy references, plus a chi-square test of the draws."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwq_jax.sampling import (
    SamplingArrays,
    SamplingParams,
    add_tokens,
    apply_penalties,
    batch_params,
    filter_logits,
    row_keys,
    sample,
    token_counts,
)

pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)

NEG_INF = -np.inf

# ---------------------------------------------------------------- numpy references (float64, one row at a time)


def ref_penalties(logits: np.ndarray, params: list[SamplingParams], counts: np.ndarray,
                  prompt_mask: np.ndarray) -> np.ndarray:
    out = logits.astype(np.float64).copy()
    for b, p in enumerate(params):
        for v in range(out.shape[1]):
            if prompt_mask[b, v] or counts[b, v] > 0:
                x = out[b, v]
                out[b, v] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            out[b, v] -= p.frequency_penalty * counts[b, v]
            if counts[b, v] > 0:
                out[b, v] -= p.presence_penalty
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def ref_filter_row(row: np.ndarray, p: SamplingParams, margin: float = 1e-4) -> np.ndarray:
    """Temperature, top-k, top-p, min-p on one row; `margin` asserts no decision is a rounding call."""
    x = row.astype(np.float64)
    if p.temperature > 0:
        x = x / p.temperature
    keep = np.ones(x.shape, bool)
    if 0 < p.top_k < len(x):
        kth = np.sort(x)[::-1][p.top_k - 1]
        keep &= x >= kth
    if p.top_p < 1:
        probs = _softmax(np.where(keep, x, NEG_INF))
        order = np.argsort(-probs, kind="stable")
        mass = 0.0
        smallest_kept = None
        for i in order:  # the smallest descending prefix holding at least top_p of the mass
            smallest_kept = x[i]
            mass += probs[i]
            if mass >= p.top_p:
                assert mass - p.top_p > margin or mass - probs[i] < p.top_p - margin, "test data on a top-p edge"
                break
        keep &= x >= smallest_kept
    if p.min_p > 0:
        probs = _softmax(np.where(keep, x, NEG_INF))
        ratio = probs / probs.max()
        assert np.all((np.abs(ratio - p.min_p) > margin) | (ratio == 1)), "test data on a min-p edge"
        keep &= ratio >= p.min_p
    return np.where(keep, x, NEG_INF)


def ref_filter(logits: np.ndarray, params: list[SamplingParams]) -> np.ndarray:
    return np.stack([ref_filter_row(row, p) for row, p in zip(logits, params)])


def assert_same_filtered(got: jax.Array, want: np.ndarray) -> None:
    got = np.asarray(got)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def fixed_logits(rows: int, vocab: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 2.0, (rows, vocab)).astype(np.float32)


jit_filter = jax.jit(filter_logits)
jit_penalties = jax.jit(apply_penalties)
jit_sample = jax.jit(sample)


def check_filter(params: list[SamplingParams], logits: np.ndarray | None = None) -> np.ndarray:
    logits = fixed_logits(len(params)) if logits is None else logits
    got = jit_filter(jnp.asarray(logits), batch_params(params))
    want = ref_filter(logits, params)
    assert_same_filtered(got, want)
    return np.asarray(got)


# ---------------------------------------------------------------- filters


def test_temperature_per_row():
    params = [SamplingParams(temperature=t) for t in (1.0, 0.5, 2.0, 0.7, 0.0)]
    got = check_filter(params)
    logits = fixed_logits(len(params))
    np.testing.assert_allclose(got[1], logits[1] / 0.5, rtol=1e-6)
    np.testing.assert_array_equal(got[4], logits[4])  # greedy rows are not scaled


def test_top_k_per_row():
    ks = (0, -1, 1, 5, 31, 32, 100, 2**40)  # past the vocabulary (even past int32): every token, as vLLM
    got = check_filter([SamplingParams(top_k=k) for k in ks])
    kept = np.isfinite(got).sum(axis=1)
    np.testing.assert_array_equal(kept, [32, 32, 1, 5, 31, 32, 32, 32])


def test_top_k_keeps_ties_at_the_boundary():
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0], [3.0, 1.0, 2.0, 2.0, 0.0, 2.0]], np.float32)
    got = check_filter([SamplingParams(top_k=2), SamplingParams(top_k=1)], logits)
    np.testing.assert_array_equal(np.isfinite(got[0]), [True, False, True, True, False, True])
    np.testing.assert_array_equal(np.isfinite(got[1]), [True, False, False, False, False, False])


def test_top_p_per_row_on_the_scaled_distribution():
    params = [SamplingParams(top_p=p, temperature=t)
              for p, t in ((1.0, 1.0), (0.9, 1.0), (0.5, 1.0), (0.05, 1.0), (0.9, 0.5), (0.9, 2.0), (0.999, 1.0))]
    got = check_filter(params)
    kept = np.isfinite(got).sum(axis=1)
    assert kept[0] == 32 and kept[3] == 1
    assert kept[4] < kept[1] < kept[5]  # the nucleus is taken after temperature scaling


def test_thresholds_over_the_whole_float_range():
    """The bisection over the values' order: -inf, huge and tiny magnitudes, -0.0 tied with 0.0 at a
    top-k boundary, and a top-p so small that only the largest logit stays."""
    row = [-np.inf, -1e30, -0.0, 0.0, 3.5, -2.0, 1e-30, 7.0]
    params = [SamplingParams(top_k=3), SamplingParams(top_k=4), SamplingParams(top_k=5), SamplingParams(top_k=7),
              SamplingParams(top_p=1e-9), SamplingParams(top_p=0.9, top_k=6)]
    got = check_filter(params, np.array([row] * len(params), np.float32))
    kept = np.isfinite(got).sum(axis=1)
    np.testing.assert_array_equal(kept, [3, 5, 5, 7, 1, 1])  # -0.0 and 0.0 tie: both kept at k = 4 and 5


def test_min_p_per_row():
    got = check_filter([SamplingParams(min_p=m) for m in (0.0, 0.01, 0.1, 0.5, 1.0)])
    kept = np.isfinite(got).sum(axis=1)
    assert kept[0] == 32 and kept[4] == 1 and kept[1] > kept[2] > kept[3] >= 1


def test_combined_filters_in_vllm_order():
    params = [
        SamplingParams(temperature=0.7, top_k=10, top_p=0.8),
        SamplingParams(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=0.6, top_k=40, top_p=0.95),  # QwQ's recommended settings
        SamplingParams(top_k=3, min_p=0.3),
        SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.1),
        SamplingParams(),
    ]
    check_filter(params, fixed_logits(len(params), vocab=64, seed=1))


# ---------------------------------------------------------------- penalties


def penalty_case():
    logits = np.array([[2.0, -1.0, 0.5, -3.0, 0.0, 1.5, -0.5, 4.0]] * 5, np.float32)
    counts = np.zeros(logits.shape, np.int32)
    counts[:, 0], counts[:, 1], counts[:, 6] = 3, 1, 2  # generated tokens
    prompt = np.zeros(logits.shape, bool)
    prompt[:, [2, 3, 6]] = True  # prompt tokens: 2 and 3 only in the prompt, 6 in both
    return logits, counts, prompt


def test_penalties_against_reference():
    logits, counts, prompt = penalty_case()
    params = [
        SamplingParams(presence_penalty=0.5),
        SamplingParams(frequency_penalty=0.3),
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(repetition_penalty=0.8, presence_penalty=-1.0, frequency_penalty=-0.25),
        SamplingParams(),
    ]
    got = np.asarray(jit_penalties(jnp.asarray(logits), batch_params(params), jnp.asarray(counts), jnp.asarray(prompt)))
    np.testing.assert_allclose(got, ref_penalties(logits, params, counts, prompt), rtol=1e-6)
    # Presence/frequency ignore prompt-only tokens 2 and 3; repetition covers them (negative logit 3 is multiplied).
    np.testing.assert_array_equal(got[0, [2, 3, 4, 5, 7]], logits[0, [2, 3, 4, 5, 7]])
    np.testing.assert_allclose(got[0, [0, 1, 6]], logits[0, [0, 1, 6]] - 0.5)
    np.testing.assert_allclose(got[1, [0, 1, 6]], logits[1, [0, 1, 6]] - 0.3 * np.array([3, 1, 2]))
    np.testing.assert_allclose(got[2], [2 / 1.5, -1.5, 0.5 / 1.5, -4.5, 0.0, 1.5, -0.75, 4.0], rtol=1e-6)
    np.testing.assert_array_equal(got[4], logits[4])


def test_penalties_none_means_no_tokens_seen():
    logits, _, _ = penalty_case()
    arrays = batch_params([SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=1.0)] * 5)
    np.testing.assert_array_equal(np.asarray(apply_penalties(jnp.asarray(logits), arrays, None, None)), logits)


def test_token_counts_and_add_tokens():
    tokens = jnp.array([[1, 2, 2, 0], [3, 3, 3, 3]])
    valid = jnp.array([[True, True, True, False], [True, True, False, False]])
    counts = token_counts(tokens, valid, 5)
    np.testing.assert_array_equal(counts, [[0, 1, 2, 0, 0], [0, 0, 0, 2, 0]])
    counts = jax.jit(add_tokens)(counts, jnp.array([4, 3]), jnp.array([True, False]))
    np.testing.assert_array_equal(counts, [[0, 1, 2, 0, 1], [0, 0, 0, 2, 0]])


# ---------------------------------------------------------------- the draw


def wilson_hilferty(df: int) -> float:
    """Upper 0.001 quantile of chi-square(df) by the Wilson-Hilferty cube-root normal approximation."""
    z = 3.090232  # standard normal upper 0.001 quantile
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_critical(df: int) -> float:
    """Upper 0.001 quantile of chi-square(df): scipy if installed, else Wilson-Hilferty."""
    try:
        from scipy.stats import chi2
    except ImportError:
        return wilson_hilferty(df)
    return float(chi2.ppf(1 - 1e-3, df))


def test_wilson_hilferty_matches_the_table():
    # chi-square upper 0.001 critical values from the standard table, df = 1..9.
    table = [10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877]
    for df, want in enumerate(table, start=1):
        assert 0 < wilson_hilferty(df) - want < 0.035 * want  # a little lenient at small df
        assert abs(chi2_critical(df) - want) < 0.035 * want


def chi2_statistic(observed: np.ndarray, expected_probs: np.ndarray) -> tuple[float, int]:
    support = expected_probs > 0
    expected = observed.sum() * expected_probs[support]
    assert expected.min() >= 5, "chi-square needs >= 5 expected draws per cell"
    return float(((observed[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def test_draws_match_filtered_softmax_chi_square():
    draws = 20_000
    logits = np.array([2.0, 1.6, 1.3, 1.0, 0.7, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.8, top_k=6),
        SamplingParams(top_p=0.8),
        SamplingParams(temperature=1.3, min_p=0.2),
        SamplingParams(temperature=0.9, top_k=7, top_p=0.9, min_p=0.1),
    ]
    arrays = SamplingArrays(*(jnp.repeat(a, draws) for a in batch_params(params)))
    keys = jax.random.split(jax.random.key(1234), len(params) * draws)
    batch = jnp.broadcast_to(jnp.asarray(logits), (len(params) * draws, len(logits)))
    tokens = np.asarray(jit_sample(batch, arrays, keys, None, None)).reshape(len(params), draws)
    for row, p in enumerate(params):
        expected = _softmax(ref_filter_row(logits, p))
        observed = np.bincount(tokens[row], minlength=len(logits))
        assert observed[expected == 0].sum() == 0, f"{p}: drew a filtered-out token"
        stat, df = chi2_statistic(observed, expected)
        assert stat < chi2_critical(df), f"{p}: chi-square {stat:.1f} with df={df}"
    # The test has power: the temperature-0.8 row's draws do not fit the temperature-1 distribution.
    wrong = _softmax(np.where(np.isfinite(ref_filter_row(logits, params[1])), logits, NEG_INF))
    stat, df = chi2_statistic(np.bincount(tokens[1], minlength=len(logits)), wrong)
    assert stat > 10 * chi2_critical(df)


# The decode-style tests below share one jitted step and one shape, so it compiles once.
ROWS, VOCAB = 8, 1024
TRACES = []


@jax.jit
def draw(logits, arrays, seeds, step, index, counts, prompt):
    TRACES.append(1)
    return sample(logits, arrays, row_keys(seeds, step, sample_index=index), counts, prompt)


def draw_rows(params, seeds, step, logits=None, index=None, counts=None, prompt=None) -> np.ndarray:
    logits = np.zeros((ROWS, VOCAB), np.float32) if logits is None else logits  # uniform by default
    return np.asarray(draw(
        jnp.asarray(logits), batch_params(params), jnp.asarray(seeds, jnp.uint32), step,
        jnp.zeros(ROWS, jnp.int32) if index is None else jnp.asarray(index, jnp.int32),
        jnp.zeros((ROWS, VOCAB), jnp.int32) if counts is None else jnp.asarray(counts),
        jnp.zeros((ROWS, VOCAB), bool) if prompt is None else jnp.asarray(prompt)))


def test_temperature_zero_is_argmax_of_penalised_logits():
    logits = fixed_logits(ROWS, vocab=VOCAB, seed=3)
    counts = np.zeros(logits.shape, np.int32)
    counts[np.arange(ROWS), logits.argmax(axis=1)] = 1  # the raw argmax was generated: penalties can move it
    prompt = np.zeros(logits.shape, bool)
    prompt[:, :VOCAB // 2] = True
    params = [SamplingParams(temperature=0.0, presence_penalty=p, repetition_penalty=r, top_k=3)
              for p, r in ((0.0, 1.0), (2.0, 1.0), (0.0, 3.0), (2.0, 3.0))] * 2
    want = ref_penalties(logits, params, counts, prompt).argmax(axis=1)
    for seed in range(3):
        np.testing.assert_array_equal(draw_rows(params, [seed] * ROWS, seed, logits, None, counts, prompt), want)
    assert want[0] != want[1] and want[0] != want[2]
    # The same greedy rows in a batch with sampled rows (the sort-and-draw branch) pick the same tokens.
    mixed = params[:4] + [SamplingParams(temperature=1.0, top_p=0.9)] * 4
    np.testing.assert_array_equal(draw_rows(mixed, [0] * ROWS, 0, logits, None, counts, prompt)[:4], want[:4])


def decode(seed: int, steps: int, others: SamplingParams = SamplingParams(), other_seed: int = 100) -> list[int]:
    """Tokens for a seeded row 0 over `steps`, sharing each batch with 7 other rows."""
    params = [SamplingParams()] + [others] * (ROWS - 1)
    seeds = [seed] + [other_seed + i for i in range(ROWS - 1)]
    return [int(draw_rows(params, seeds, step)[0]) for step in range(steps)]


def test_seeds_reproduce_and_steps_differ():
    first = decode(7, 6)  # uniform over 1024 tokens: different keys almost surely disagree
    assert first == decode(7, 6)
    assert first == decode(7, 6, SamplingParams(temperature=0.0, top_k=3), other_seed=5)  # whatever shares the batch
    assert len(set(first)) > 1  # steps differ
    assert first != decode(8, 6)  # seeds differ


def test_distinct_keys_for_n_completions():
    params, seeds = [SamplingParams()] * ROWS, [42] * ROWS
    rows = np.stack([draw_rows(params, seeds, step, index=np.arange(ROWS)) for step in range(3)], axis=1)
    assert len({tuple(r) for r in rows.tolist()}) == ROWS  # n completions of one seeded request differ
    same = draw_rows(params, seeds, 0)  # same seed, same index: identical rows
    assert len(set(same.tolist())) == 1


def test_row_keys_traced_step_and_uint32_seeds():
    ints = [0, 2**31 + 5, 2**32 - 1]
    seeds = jnp.array(ints, jnp.uint32)
    keys = jax.jit(row_keys)(seeds, jnp.int32(9))
    per_row = jax.jit(row_keys)(seeds, jnp.array([9, 4, 0]))  # each row at its own step
    indexed = jax.jit(row_keys)(seeds, jnp.int32(9), jnp.array([0, 1, 2]))
    for i, s in enumerate(ints):
        want = jax.random.fold_in(jax.random.key(s), 9)
        np.testing.assert_array_equal(jax.random.key_data(keys[i]), jax.random.key_data(want))
        want = jax.random.fold_in(jax.random.key(s), [9, 4, 0][i])
        np.testing.assert_array_equal(jax.random.key_data(per_row[i]), jax.random.key_data(want))
        want = jax.random.fold_in(jax.random.fold_in(jax.random.key(s), i), 9)
        np.testing.assert_array_equal(jax.random.key_data(indexed[i]), jax.random.key_data(want))


def test_whole_pipeline_jits_once_for_any_parameters():
    logits = fixed_logits(ROWS, vocab=VOCAB, seed=5)
    counts = np.zeros((ROWS, VOCAB), np.int32)
    counts[:, 7] = 2
    prompt = np.zeros((ROWS, VOCAB), bool)
    prompt[:, 9] = True
    batches = (
        [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(top_k=5, top_p=0.7)] * 3,
        [SamplingParams(min_p=0.2, repetition_penalty=1.3), SamplingParams(top_k=-1, presence_penalty=1.0),
         SamplingParams(temperature=0.3, frequency_penalty=-0.5, top_p=0.9)] * 3,
    )
    draw_rows(batches[0][:ROWS], range(ROWS), 0, logits, None, counts, prompt)
    traced = len(TRACES)
    for params in batches:
        for step in range(3):
            out = draw_rows(params[:ROWS], range(ROWS), step, logits, np.arange(ROWS), counts, prompt)
            assert out.shape == (ROWS,) and out.dtype == np.int32
    assert len(TRACES) == traced == 1  # new parameter values, steps and seeds never retrace


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.01), ("min_p", -0.1),
    ("min_p", 1.5), ("top_k", -2), ("top_k", 2.5), ("max_tokens", 0), ("n", 0), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0), ("presence_penalty", 2.5), ("presence_penalty", -2.1),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5), ("seed", -1), ("seed", 2**32), ("stop", ("",)),
    ("stop_token_ids", (-1,)),
])
def test_invalid_field_names_itself(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


def test_edges_are_valid():
    SamplingParams(temperature=0.0, top_p=1.0, min_p=1.0, top_k=-1, presence_penalty=-2.0, frequency_penalty=2.0,
                   repetition_penalty=1e-3, max_tokens=1, seed=2**32 - 1).validate()


def test_prompt_plus_max_tokens_must_fit_the_context():
    SamplingParams(max_tokens=96).validate(prompt_tokens=4000, max_context=4096)
    with pytest.raises(ValueError, match=r"max_tokens=97.*4000.*4096"):
        SamplingParams(max_tokens=97).validate(prompt_tokens=4000, max_context=4096)


def test_stop_token_ids_must_be_in_the_vocabulary():
    SamplingParams(stop_token_ids=(151935,)).validate(vocab_size=151936)
    with pytest.raises(ValueError, match=r"stop_token_ids=\(151936,\) must be token ids below 151936"):
        SamplingParams(stop_token_ids=(151936,)).validate(vocab_size=151936)
    with pytest.raises(ValueError, match=r"stop_token_ids.*below 2147483648"):  # no vocabulary given: int32's limit
        SamplingParams(stop_token_ids=(2**31,)).validate()


def test_stop_lists_become_tuples():
    p = SamplingParams(stop="</s>", stop_token_ids=[151645, 151643])
    assert p.stop == ("</s>",) and p.stop_token_ids == (151645, 151643)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    hash(p)  # frozen and hashable


QWQ_GENERATION_CONFIG = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                         "pad_token_id": 151643, "temperature": 0.6, "top_k": 40, "top_p": 0.95,
                         "transformers_version": "4.45.2"}


def test_from_generation_config_qwq(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(QWQ_GENERATION_CONFIG))
    for source in (QWQ_GENERATION_CONFIG, tmp_path, tmp_path / "generation_config.json", str(tmp_path)):
        p = SamplingParams.from_generation_config(source)
        assert (p.temperature, p.top_k, p.top_p, p.min_p, p.max_tokens) == (0.6, 40, 0.95, 0.0, 256)
    p = SamplingParams.from_generation_config(tmp_path, temperature=0.2, top_p=None, max_tokens=1000)
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.2, 40, 0.95, 1000)


def test_from_generation_config_greedy_missing_and_bad(tmp_path):
    greedy = dict(QWQ_GENERATION_CONFIG, do_sample=False, max_new_tokens=77, repetition_penalty=1.05)
    p = SamplingParams.from_generation_config(greedy)
    assert (p.temperature, p.max_tokens, p.repetition_penalty) == (0.0, 77, 1.05)
    assert SamplingParams.from_generation_config(greedy, temperature=0.7).temperature == 0.7
    assert SamplingParams.from_generation_config(tmp_path) == SamplingParams()
    assert SamplingParams.from_generation_config(None, top_k=20) == SamplingParams(top_k=20)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config({"top_p": 0.0})
    with pytest.raises(TypeError, match="tempreature"):
        SamplingParams.from_generation_config(None, tempreature=0.5)
    (tmp_path / "generation_config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"generation_config.json must hold a JSON object .* not list"):
        SamplingParams.from_generation_config(tmp_path)
    (tmp_path / "generation_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"generation_config.json is not valid JSON"):
        SamplingParams.from_generation_config(tmp_path)
