"""Long context on CPU, against HF transformers fp32: positions past 131,000, a 41,000-token prompt
through the engine's chunked prefill (21 chunks of 2,048, a 43,008-slot cache), and the exact
length at which `rope_scaling="auto"` switches from plain RoPE to YaRN.

The models are tiny with random weights, with one change to `helpers.hf_model`: the q and k
projections are scaled up (`_sharp_hf_model`) so attention scores span several units. At the
helper's scale attention over thousands of keys is nearly uniform, the logits hardly depend on
where any key sits, and a position bug would pass unseen; every test here also shows that a
plausible wrong answer (plain RoPE for YaRN, positions ignored) misses the reference by far more
than the tolerance.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from helpers import hf_logits, hf_model, our_model_from_hf
from qwq_jax import QwenConfig, forward
from qwq_jax.config import RopeScaling
from qwq_jax.generate import Engine
from qwq_jax.sampling import SamplingParams

TOL = 1e-4  # fp32 on both sides; what remains is summation order (measured: ~1e-6)
QWQ_YARN = RopeScaling("yarn", 4.0, original_max_position_embeddings=32768)  # QwQ-32B's rope_scaling


def _sharp_hf_model(cfg: QwenConfig, seed: int, gain: float):
    """`hf_model` with q/k projection weights times `gain`: sharp, position-dependent attention."""
    model = hf_model(cfg, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(gain)
    return model


def _plain_hf_model(cfg: QwenConfig, like):
    """An HF model with `like`'s weights and plain RoPE (no rope_scaling)."""
    plain = hf_model(cfg.replace(rope_scaling=None))
    plain.load_state_dict(like.state_dict())
    return plain


def _teacher_forced_logprobs(model, prompt: list[int], generated: list[int]) -> np.ndarray:
    """HF's float64 log-softmax `[len(generated), V]` at the positions that chose each generated token."""
    ids = torch.tensor([prompt + generated[:-1]])
    with torch.no_grad():
        logits = model(ids, logits_to_keep=len(generated)).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def _check_greedy(lp: np.ndarray, generated: list[int], logprobs: list[float]) -> float:
    """Each of our greedy tokens is the reference's argmax (up to TOL: a near tie may go either way)
    and its log-prob matches the reference's; returns the largest log-prob difference."""
    chosen = lp[np.arange(len(generated)), generated]
    assert (chosen >= lp.max(axis=-1) - TOL).all(), (lp.argmax(-1).tolist(), generated)
    return float(np.abs(chosen - np.asarray(logprobs)).max())


@pytest.mark.compile_bound
def test_yarn_logits_match_hf_past_position_131000():
    """QwQ's rotary tables (head_dim 128, theta 1e6, YaRN x4 from 32,768) on 512-token rows at
    explicit positions: row 0 sorted with gaps inside 129,000..131,071 (ending at the 131,072
    window's last position), row 1 contiguous from 131,000 (RoPE has no table end: HF computes any position)."""
    cfg = QwenConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6,
                     max_position_embeddings=131072, rope_scaling=QWQ_YARN, dtype="float32")
    ref = _sharp_hf_model(cfg, seed=11, gain=4.0)
    assert ref.model.rotary_emb.attention_scaling == pytest.approx(0.1 * np.log(4) + 1)  # HF runs YaRN x4
    ours = our_model_from_hf(cfg, ref)
    rng = np.random.default_rng(0)
    t = 512
    gaps = np.sort(rng.choice(np.arange(129_000, 131_071), t - 1, replace=False))
    positions = np.stack([np.append(gaps, 131_071), 131_000 + np.arange(t)]).astype(np.int32)
    tokens = rng.integers(0, cfg.vocab_size, (2, t)).astype(np.int32)

    want, want_hidden = hf_logits(ref, tokens, position_ids=positions, hidden=True)
    got, hidden = forward(ours, jnp.asarray(tokens), jnp.asarray(positions), return_hidden=True)
    err = float(np.abs(np.asarray(got) - want).max())
    print(f"positions >= 131,000: max |dlogit| = {err:.2e} (logits up to {np.abs(want).max():.1f})")
    assert err <= TOL
    for i in range(cfg.num_layers - 1):  # HF's hidden_states[i + 1]: layer i's output
        np.testing.assert_allclose(np.asarray(hidden[i]), want_hidden[i + 1], atol=TOL, rtol=0)

    # The test can fail: plain RoPE, or positions left at 0..T-1, miss by far more than TOL.
    plain = our_model_from_hf(cfg.replace(rope_scaling=None), ref)
    err_plain = float(np.abs(np.asarray(forward(plain, jnp.asarray(tokens), jnp.asarray(positions))) - want).max())
    err_ignored = float(np.abs(np.asarray(forward(ours, jnp.asarray(tokens)))[0] - want[0]).max())
    print(f"plain RoPE misses by {err_plain:.2e}, positions 0..T-1 by {err_ignored:.2e}")
    assert err_plain > 100 * TOL and err_ignored > 100 * TOL


def test_41k_token_prompt_chunked_prefill_matches_hf():
    """A 41,000-token prompt (> 32,768: YaRN under "auto") through the default 2,048-token prefill
    chunks, blockwise attention against the cache, then 3 greedy decode steps; the reference is HF
    fp32 with SDPA attention (bounded memory) on the prompt plus our tokens. One layer with one
    head keeps it to ~20 s (GQA is covered at short lengths elsewhere): the last token's attention
    reads all 41,000 cached keys and values written by 21 calls, so a chunk written to the wrong
    slots, rotated at the wrong positions or masked wrongly moves the logits. Tolerance TOL on
    log-probs: both sides fp32, they differ only in summation order over 41K keys (blocks of 1,024
    with an online softmax against torch's kernel); measured ~3e-7, while plain RoPE misses by ~0.5."""
    cfg = QwenConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=1,
                     num_kv_heads=1, head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6,
                     max_position_embeddings=131072, rope_scaling=QWQ_YARN, dtype="float32")
    ref = _sharp_hf_model(cfg, seed=3, gain=10.0)
    ours = our_model_from_hf(cfg, ref, attention_backend="auto")  # what `sample` uses: blockwise here
    n = 41_000
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, n).tolist()
    engine = Engine(ours)  # prefill_chunk=2048, rope_scaling="auto"
    assert engine.prefill_chunk == 2048
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3))[0][0]
    # 21 chunks: 20 full ones and 40 tokens; every chunk writes 2,048 slots, so 43,008 of them.
    assert engine.last_timings["prefill_chunks"] == 21 and len(out.token_ids) == 3
    print(f"41,000-token prompt: prefill {engine.last_timings['prefill_s']:.1f} s")

    ref.set_attn_implementation("sdpa")
    lp = _teacher_forced_logprobs(ref, prompt, out.token_ids)
    err = _check_greedy(lp, out.token_ids, out.logprobs)
    plain = _plain_hf_model(cfg, ref)
    plain.set_attn_implementation("sdpa")
    lp_plain = _teacher_forced_logprobs(plain, prompt, out.token_ids)
    err_plain = float(np.abs(lp_plain - lp).max())
    print(f"max |dlogprob| vs HF YaRN = {err:.2e}; plain RoPE would miss by {err_plain:.2e}")
    assert err <= TOL and err_plain > 100 * TOL


@pytest.mark.compile_bound
def test_yarn_auto_switches_one_token_past_the_original_length():
    """`rope_scaling="auto"`: prompt + max_tokens == original_max_position_embeddings (1,024 here)
    runs plain RoPE; one more max token runs YaRN. Checked against HF built each way."""
    cfg = QwenConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
                     rope_scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=1024),
                     dtype="float32")
    yarn_ref = _sharp_hf_model(cfg, seed=5, gain=4.0)
    plain_ref = _plain_hf_model(cfg, yarn_ref)
    engine = Engine(our_model_from_hf(cfg, yarn_ref), rope_scaling="auto")
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, 1000).tolist()
    for max_tokens, want, other in ((24, plain_ref, yarn_ref), (25, yarn_ref, plain_ref)):
        assert len(prompt) + max_tokens - cfg.original_max_position_embeddings == max_tokens - 24
        out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens))[0][0]
        assert len(out.token_ids) == max_tokens
        err = _check_greedy(_teacher_forced_logprobs(want, prompt, out.token_ids), out.token_ids, out.logprobs)
        lp_other = _teacher_forced_logprobs(other, prompt, out.token_ids)
        err_other = float(np.abs(lp_other[np.arange(max_tokens), out.token_ids] - np.asarray(out.logprobs)).max())
        print(f"prompt + max_tokens = {len(prompt) + max_tokens}: max |dlogprob| {err:.2e} vs the expected "
              f"reference, {err_other:.2e} vs the other")
        assert err <= TOL and err_other > 100 * TOL


@pytest.mark.slow
def test_passkey_benchmark_tiny_finds_the_key(demo_checkpoint):
    """`benchmarks/passkey.py --tiny` end to end on the demo model (a 512-token prompt under YaRN):
    JSON lines out, the real model finds the passkey, a bar on stderr; a length past the context
    is one line and exit 2."""
    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "passkey.py")
    r = subprocess.run([sys.executable, script, "--tiny", "--checkpoint", str(demo_checkpoint)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(rows) == 2 and rows[1]["summary"] and rows[1]["runs"] == 1, rows
    row = rows[0]
    assert 400 < row["tokens"] <= 512 and row["depth"] == 0.5 and row["rope"] == "yarn" and row["seconds"] > 0
    assert row["found"] and row["passkey"] in row["answer"] and rows[1]["accuracy"] == 1.0, row
    assert "passkey" in r.stderr and "100%" in r.stderr
    assert 0 < row["first_token_s"] <= row["seconds"] and "prefill: 100%" in r.stderr  # the prompt's own bar

    bad = subprocess.run([sys.executable, script, "--lengths", "131072", "--checkpoint", str(demo_checkpoint)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and not bad.stdout
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--lengths" in lines[0] and "131072-token context" in lines[0], bad.stderr
