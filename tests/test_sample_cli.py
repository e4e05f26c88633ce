"""python -m qwq_jax.sample: sampling defaults (which, and where from), every --n sample printed,
and the engine's timings that keep compilation apart from decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from qwq_jax import QwenConfig, init_model
from qwq_jax.generate import Engine
from qwq_jax.sample import _sampling, build_parser
from qwq_jax.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]

# The families' published recommendations, typed from the model cards / Hub generation_config.json
# files (not from qwq_jax.sampling.RECOMMENDED).
QWEN25_INSTRUCT = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
QWQ = {"temperature": 0.6, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.0}

# Qwen/QwQ-32B's config.json (the fields our config reads), and Qwen/Qwen2.5-32B-Instruct's: the same
# architecture, told apart by their position count.
QWQ_32B_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
                  "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
                  "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 40960,
                  "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "tie_word_embeddings": False,
                  "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16"}
QWEN25_32B_CONFIG = dict(QWQ_32B_CONFIG, max_position_embeddings=32768, rms_norm_eps=1e-06)
# The end of QwQ-32B's chat template: the generation prompt opens the reasoning block.
QWQ_TEMPLATE_TAIL = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
QWEN_TEMPLATE_TAIL = "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"


def fake_checkpoint(tmp_path: Path, config: dict, template: str | None, generation: dict | None) -> Path:
    """A directory `qwq_jax.checkpoint` takes for a converted checkpoint: config, tokenizer config and
    (optionally) generation_config.json; no weights (the sampling defaults never read them)."""
    d = tmp_path / "ckpt"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    (d / "_CHECKPOINT_METADATA").write_text("{}")
    if template is not None:
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation))
    return d


def defaults(ckpt: Path, *flags: str) -> tuple[SamplingParams, dict]:
    args = build_parser().parse_args(["--checkpoint", str(ckpt), "--prompt", "hi", *flags])
    return _sampling(args, ckpt)


def values(params: SamplingParams) -> dict:
    return {k: getattr(params, k) for k in QWQ}


def test_demo_checkpoint_gets_qwen25_instruct_defaults(demo_checkpoint):
    params, info = defaults(demo_checkpoint)
    assert values(params) == QWEN25_INSTRUCT and info["family"] == "qwen2.5-instruct"
    # Converted before or after the converter wrote them into generation_config.json: the same values.
    assert info["temperature"]["source"] in ("generation_config.json", "recommended for qwen2.5-instruct")
    assert info["max_tokens"] == {"value": 512, "source": "default"}


@pytest.mark.parametrize("config, template, family", [
    (QWQ_32B_CONFIG, QWQ_TEMPLATE_TAIL, "qwq"),         # QwQ-32B as released
    (QWQ_32B_CONFIG, None, "qwq"),                      # no template to tell: QwQ-32B's config fields
    (QWEN25_32B_CONFIG, None, "qwen2.5-instruct"),      # same shape, 32,768 positions: Qwen2.5-32B
    (QWEN25_32B_CONFIG, QWQ_TEMPLATE_TAIL, "qwq"),      # a model that thinks (e.g. an R1 distill)
    (QWQ_32B_CONFIG, QWEN_TEMPLATE_TAIL, "qwen2.5-instruct"),  # the template says it does not think
])
def test_family_from_config_and_template(tmp_path, config, template, family):
    params, info = defaults(fake_checkpoint(tmp_path, config, template, None))
    assert info["family"] == family
    assert values(params) == (QWQ if family == "qwq" else QWEN25_INSTRUCT)
    assert all(info[k]["source"] == f"recommended for {family}" for k in ("temperature", "top_p", "top_k"))


def test_generation_config_wins_and_is_not_mixed_with_recommendations(tmp_path):
    ckpt = fake_checkpoint(tmp_path, QWQ_32B_CONFIG, QWQ_TEMPLATE_TAIL, {"temperature": 0.3, "eos_token_id": 1})
    params, info = defaults(ckpt)
    # The checkpoint states its sampling: taken as it is, HF's meaning for the rest (top_p 1, top_k off).
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.3, 1.0, 0, 1.0)
    assert info["temperature"] == {"value": 0.3, "source": "generation_config.json"}
    assert info["top_p"]["source"] == "default"
    greedy, info = defaults(fake_checkpoint(tmp_path / "g", QWQ_32B_CONFIG, None, {"do_sample": False}))
    assert greedy.temperature == 0 and info["temperature"]["source"] == "generation_config.json"


def test_flags_win_over_generation_config_and_recommendation(tmp_path):
    ckpt = fake_checkpoint(tmp_path, QWEN25_32B_CONFIG, None, {"temperature": 0.3, "top_p": 0.5})
    params, info = defaults(ckpt, "--temperature", "0.9", "--top-k", "5", "--max-tokens", "7")
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.9, 0.5, 5, 7)
    assert [info[k]["source"] for k in ("temperature", "top_p", "top_k", "max_tokens")] == \
        ["flag", "generation_config.json", "flag", "flag"]
    params, info = defaults(fake_checkpoint(tmp_path / "r", QWEN25_32B_CONFIG, None, None), "--top-p", "0.3")
    assert values(params) == dict(QWEN25_INSTRUCT, top_p=0.3) and info["top_p"]["source"] == "flag"


def test_help_states_the_recommendations():
    text = build_parser().format_help()
    for fragment in ("temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05",
                     "temperature 0.6, top_p 0.95, top_k 40", "--xla-cache"):
        assert fragment in " ".join(text.split()), fragment


def test_engine_timings_keep_compilation_apart():
    """The first stream compiles prefill, insert (a slot's state) and decode once each (a decode loop
    of several chunks must not compile again for its own output state); a second identical stream
    compiles nothing;
    tok/s is the new tokens over the decode time without compiling."""
    cfg = QwenConfig.preset("tiny")
    model = init_model(cfg, seed=3, param_dtype=jnp.float32, dtype=jnp.float32)
    events = []
    engine = Engine(model, chunk=4, on_compile=lambda *e: events.append(e))
    prompt = np.random.default_rng(0).integers(1, cfg.vocab_size, 9).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=13)
    engine.generate([prompt], params)
    first = dict(engine.last_timings)
    programs = sorted(c["program"] for c in first["compiled"])
    # decode: once for 4 chunks; insert (a slot's state, one small program for every engine in the
    # process) unless another engine here compiled it already
    assert programs in (["decode", "insert", "prefill"], ["decode", "prefill"]), first["compiled"]
    names = [p for p in ("prefill", "insert", "decode") if p in programs]
    assert [e[:2] for e in events] == [(when, p) for p in names for when in ("start", "end")]
    assert all(c["cache"] in ("hit", "miss", "off") and c["seconds"] > 0 for c in first["compiled"])
    assert first["compile_s"] == pytest.approx(first["prefill_compile_s"] + first["decode_compile_s"])
    assert first["compile_s"] >= sum(c["seconds"] for c in first["compiled"]) * 0.999
    assert first["decode_tokens"] == 13 and first["decode_s"] > 0 and first["prefill_s"] > 0
    assert first["decode_tokens_per_s"] == pytest.approx(13 / first["decode_s"])
    engine.generate([prompt], params)
    second = engine.last_timings
    assert second["compiled"] == [] and second["compile_s"] == 0.0
    assert len(events) == 2 * len(programs)


@pytest.mark.slow  # a real CLI run on the demo model (load and compile: ~15 s idle, ~50 s on a busy 2 cores)
def test_n_samples_all_printed_with_headers_and_compile_apart(demo_checkpoint):
    """Text mode with --n 2 prints both samples, each under its header; the stats line counts both,
    and reports compilation apart from tok/s."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "qwq_jax.sample", "--checkpoint", str(demo_checkpoint), "--prompt",
                        "Name a color.", "--n", "2", "--max-tokens", "3", "--seed", "1", "--temperature", "1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines.count("[sample 1/2]") == 1 and lines.count("[sample 2/2]") == 1, r.stdout
    first, second = r.stdout.split("[sample 2/2]\n")
    assert first.split("[sample 1/2]\n")[1].strip() and second.strip()  # each sample has text
    stats = [l for l in r.stderr.splitlines() if l.startswith("[")][-1]
    assert "new tokens" in stats and "compile" in stats and "tok/s without compiling" in stats, stats
    n_new = int(stats.split(" + ")[1].split(" new tokens")[0])
    assert 2 <= n_new <= 6  # both samples counted (each 1..3 tokens)
    assert "finish: " in stats and stats.count(",", stats.index("finish: ")) == 1  # two finish reasons
    assert any(l.startswith(f"loading {demo_checkpoint} ...") for l in r.stderr.splitlines()), r.stderr[-2000:]


def test_loading_line_says_what_compiled_meanwhile():
    """`load_engine`'s status detail for the programs readied while the weights were read."""
    from qwq_jax.sample import _compiled_meanwhile

    def of(*caches):
        return _compiled_meanwhile([{"program": p, "cache": c} for p, c in zip(("prefill", "insert", "decode"), caches)])

    assert of("hit", "hit", "hit") == "prefill, insert, decode loaded from the compilation cache meanwhile"
    assert of("miss", "miss") == "prefill, insert compiled meanwhile, cached for next time"
    assert of("hit", "miss", "miss") == "prefill, insert, decode compiled meanwhile (1 of 3 from the cache)"
    assert of("off", "off") == "prefill, insert compiled meanwhile"
