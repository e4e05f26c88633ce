"""The benchmark scripts run end to end on CPU (`--tiny`): every JSON line parses, both
implementations report positive figures, the ratio and summary lines are there. Prefill and the
train step run our `blockwise` backend, so their in-run check against the xla reference runs too."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, *args: str) -> list[dict]:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), "--tiny", *args], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert lines, r.stderr[-3000:]
    return lines


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict:
    """`benchmarks/device_suite.sh --tiny`, run once: its parts are the decode, int8 decode, prefill,
    train-step and serving scripts' own smoke runs (`--tiny` and the settings below), whose JSON lines
    the tests read from the suite's one file (`parts[name]["records"]`)."""
    tmp = tmp_path_factory.mktemp("device-suite")
    out = tmp / "suite.json"
    # Compiling dominates these tiny runs: at XLA's lowest optimization level the suite takes 13% less
    # (227 s instead of 261 s alone on 2 cores; the serving part alone is 4 s slower).
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_suite.sh"), "--tiny", str(out)],
                       capture_output=True, text=True, timeout=1500, cwd=tmp,
                       env=dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1"))
    return {"returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr,
            "json": json.loads(out.read_text()) if out.exists() else None}


def suite_part(suite: dict, name: str) -> list[dict]:
    """The JSON lines of one part of the suite (what the script printed on stdout)."""
    assert suite["json"] is not None, suite["stderr"][-3000:]
    part = suite["json"]["parts"][name]
    assert part["status"] == "ok", (part.get("stderr_tail"), suite["stderr"][-3000:])
    assert part["records"], part
    return part["records"]


def split(lines):
    rows = [x for x in lines if "impl" in x]
    ratios = [x for x in lines if "ratio" in x]
    return rows, ratios


@pytest.mark.xdist_group("device_suite")
def test_prefill_tiny(suite):
    lines = suite_part(suite, "prefill_8k")  # prefill.py --tiny --attention blockwise
    rows, ratios = split(lines)
    assert {r["impl"] for r in rows} == {"qwq-jax", "hf-transformers-sdpa"}
    assert len(rows) == 4 and {r["seq"] for r in rows} == {32, 64}
    for r in rows:
        assert "error" not in r, r
        assert r["time_s"] > 0 and r["tokens_per_s"] > 0 and r["tflops"] > 0
        assert r["mfu"] is None and r["device"] == "cpu"  # no known peak for a CPU
    ours = [r for r in rows if r["impl"] == "qwq-jax"]
    assert all(r["attention_resolved"] == "blockwise" and r["attention_fallbacks"] == [] for r in ours)
    check = ours[0]["check_vs_xla"]  # at the shortest length
    assert check["seq"] == 32 and check["max_abs_logit_diff_vs_xla"] < 1e-4 and check["same_argmax"]
    assert len(ratios) == 2 and all(r["tokens_per_s"] > 0 for r in ratios)
    summary = lines[-1]
    assert summary["summary"] and summary["seq"] == [32, 64] and len(summary["ratio_tokens_per_s"]) == 2


@pytest.mark.xdist_group("device_suite")
def test_train_step_tiny(suite):
    lines = suite_part(suite, "grpo_7b")  # train_step.py --tiny --attention blockwise
    rows, ratios = split(lines)
    assert {r["impl"] for r in rows} == {"qwq-jax", "hf-transformers-sdpa"}
    for r in rows:
        assert "error" not in r, r
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["model_tflops"] > 0
        assert r["layers"] == 2 and r["rows"] == 4
    ours = next(r for r in rows if r["impl"] == "qwq-jax")
    assert abs(ours["loss"]) < 1e3 and ours["attention_resolved"] == "blockwise"
    assert ours["check_vs_xla"]["max_abs_logprob_diff_vs_xla"] < 1e-4
    assert len(ratios) == 1 and ratios[0]["tokens_per_s"] > 0
    assert lines[-1]["summary"] and lines[-1]["ratio_tokens_per_s"] > 0


@pytest.mark.xdist_group("device_suite")
def test_decode_tiny(suite):
    lines = suite_part(suite, "decode_bf16")  # decode.py --tiny --batch 4: one decode program per layer loop
    rows, ratios = split(lines)
    assert {r["impl"] for r in rows} == {"qwq-jax", "hf-transformers-sdpa"}
    assert len(rows) == 6  # (our 2 layer loops + hf) x prompt lengths 16, 40 x batch 4
    for r in rows:
        assert "error" not in r, r
        assert r["decode_tokens_per_s"] > 0 and r["prefill_s"] > 0 and r["decode_s"] > 0
    ours = [r for r in rows if r["impl"] == "qwq-jax"]
    assert [r["layer_loop"] for r in ours] == ["scan"] * 2 + ["split"] * 2
    # One prompt per prefill call, 16 tokens at a time: 4 prompts of 16 take 4 calls, of 40 tokens 12.
    assert [r["prefill_chunks"] for r in ours] == [4, 12] * 2
    assert [r["decode_slots"] for r in ours] == [4, 4] * 2  # max_num_seqs = the batch
    assert all(r["same_tokens_as_scan"] for r in ours)  # split's greedy tokens = the scan's
    for r in ours:  # every setting's decode program was searched for weight copies
        copies = r["weight_copies"]
        assert copies["programs"] >= 1 and copies["copied_bytes_per_step"] >= 0, r
    per_step = {(r["layer_loop"], r["prompt_len"], r["batch"]): r["weight_copies"]["copied_bytes_per_step"] for r in ours}
    assert all(per_step["split", p, b] <= per_step["scan", p, b] for _, p, b in per_step)  # nothing to slice
    assert all(r["roofline_tokens_per_s"] is None for r in ours)  # no bandwidth figure for a CPU
    settings = [(16, 4), (40, 4)]
    assert [(r["layer_loop"], r["prompt_len"], r["batch"]) for r in ratios] == \
        [(loop, *s) for loop in ("scan", "split") for s in settings]
    assert all(r["decode_tokens_per_s"] > 0 for r in ratios)
    summary = lines[-1]
    assert summary["summary"] and {k: len(v) for k, v in summary["ratio_decode_tokens_per_s"].items()} == \
        {"scan": 2, "split": 2}


@pytest.mark.xdist_group("device_suite")
def test_decode_tiny_int8_weights(suite):
    lines = suite_part(suite, "decode_int8")  # decode.py --tiny --quantize int8 --layer-loop split --impl ours --batch 4
    rows, ratios = split(lines)
    assert len(rows) == 2 and not ratios  # our engine only: no ratio lines
    from qwq_jax import QwenConfig

    c = QwenConfig.preset("tiny")
    e, hd, kd, f = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    matmul = c.num_layers * (2 * e * hd + 2 * e * kd + 3 * e * f)
    scales = c.num_layers * (hd + 2 * kd + 2 * e + 2 * f)
    for r in rows:
        assert "error" not in r, r
        assert r["weights"] == "int8 weight-only (quantized)" and r["layer_loop"] == "split"
        assert r["decode_tokens_per_s"] > 0 and r["same_tokens_as_split"]
        assert r["fraction_of_unquantized_roofline"] is None  # no bandwidth figure for a CPU
    float_bytes = rows[0]["weight_bytes"] + 3 * matmul - 4 * scales  # --tiny is float32: 4 bytes -> 1
    assert float_bytes == 4 * c.num_params()


def test_decode_roofline_by_hand():
    """The issue's figure: QwQ-32B's bf16 weights read once per token at 3.0 TB/s = about 46 tok/s."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _common
    import decode

    from qwq_jax import QwenConfig

    cfg = QwenConfig.preset("qwq-32b")
    weights = 32_763_876_352 * 2
    per_token = 2 * 64 * 8 * 128 * 2  # k and v, bf16: 256 KiB
    top = decode.roofline(cfg, weights, 128, 1, 128, 3.0e12, 2)
    assert top == 3.0e12 / (weights + per_token * (128 + 64))
    assert 45 < top < 46
    assert decode.roofline(cfg, weights, 128, 16, 128, 3.0e12, 2) > 15 * top  # batching amortises the weights
    assert decode.roofline(cfg, weights, 128, 1, 128, None, 2) is None
    assert _common.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12 and _common.peak_bandwidth("cpu") is None


def test_random_weights_are_drawn_one_layer_at_a_time():
    """`build_ours` fills a layer-stacked weight layer by layer into a donated buffer: the compiled
    fill's temporaries are a small fraction of the stacked array (one jitted init of the whole
    model held several stacked weights' worth, which is what ran QwQ-32B out of memory on an H100)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _common

    from qwq_jax import QwenConfig

    stacked = jax.ShapeDtypeStruct((128, 256, 512), jnp.bfloat16)  # 32 MiB; one layer 256 KiB
    stats = _common.fill_layer().lower(stacked, jax.random.key(0), 3).compile().memory_analysis()
    whole = 128 * 256 * 512 * 2
    assert stats.alias_size_in_bytes == whole  # updated in place
    assert stats.temp_size_in_bytes < whole / 4  # one layer's draw (f32 normals and their bits), not the stack

    cfg = QwenConfig.preset("tiny")
    model = _common.build_ours(cfg, jnp.float32, attention="xla")
    q = np.asarray(model.layers.attn.q_proj[...])
    assert q.shape[0] == cfg.num_layers and abs(q.std() - 0.02) < 2e-3
    assert not np.allclose(q[0], q[1])  # each layer its own draw
    assert (np.asarray(model.layers.input_norm.scale[...]) == 1).all()
    assert (np.asarray(model.layers.attn.q_bias[...]) == 0).all()


@pytest.mark.compile_bound
def test_gpu_aot_tiny_compiles_every_setting_for_the_cpu():
    """benchmarks/gpu_aot.py's machinery (abstract engine, lowering, HLO search, memory analysis)
    on the CPU target; the GPU targets need JAX's CUDA plugin, whose absence is a clear error."""
    lines = run_bench("gpu_aot.py")
    rows, summary = lines[:-1], lines[-1]
    assert len(rows) == 8 and summary["summary"] and summary["compiled"] == 8 and summary["failed"] == 0
    assert [(r["phase"], r["layer_loop"], r["batch"]) for r in rows] == \
        [(ph, lp, b) for ph in ("decode", "prefill") for lp in ("scan", "split") for b in (1, 4)]
    from qwq_jax import QwenConfig

    c = QwenConfig.preset("tiny")
    for r in rows:
        assert "error" not in r, r
        mem = r["memory"]
        assert mem["peak"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
        # The page pool: batch x 128 / 16 pages of 16 tokens, k and v, float32.
        assert r["cache_bytes"] == r["batch"] * 8 * 16 * 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
        # Both take the pool and every weight (the prefill computes its last token's logits: the head too).
        assert mem["argument"] >= r["cache_bytes"] + r["weight_bytes"]
        assert r["fits"] is None and r["capacity_bytes"] is None  # no memory figure for a CPU
        if r["phase"] == "decode":
            assert 0 < r["max_fraction_of_roofline"] <= 1
            assert r["weight_copies"]["copied_bytes_per_step"] >= 0
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_aot.py"), "--target", "h100", "--batch", "1",
                        "--phase", "decode", "--layer-loop", "split"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    from qwq_jax.plan import _cuda_plugin_available

    if not _cuda_plugin_available():
        assert r.returncode != 0 and "needs JAX's CUDA plugin" in r.stderr, r.stderr[-2000:]
    else:  # the plugin is installed: the H100 compile itself must work
        assert r.returncode == 0, r.stderr[-2000:]
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_aot.py"), "--target", "tpu9"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "unknown target 'tpu9' (known: h100, h200, cpu)" in bad.stderr


def test_gpu_aot_tiny_forward_and_train():
    """gpu_aot's forward (prefill.py's program) and train (train_step.py's GRPO update, abstract
    trainer) phases on the CPU target: argument bytes by hand, and the layer fit of the summary."""
    lines = run_bench("gpu_aot.py", "--phase", "forward", "train", "--layers", "1", "2", "--layer-loop", "scan",
                      "split")
    rows, summary = lines[:-1], lines[-1]
    assert summary["compiled"] == 6 and summary["failed"] == 0, rows
    assert summary["train_layers_that_fit"] is None  # no memory capacity for a CPU
    from qwq_jax import QwenConfig

    c = QwenConfig.preset("tiny")
    per_layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim
                 * c.hidden_size + 3 * c.hidden_size * c.intermediate_size  # matmuls
                 + (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + 2 * c.hidden_size)  # qkv bias, two norms
    rest = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) + c.hidden_size
    forward = [r for r in rows if r["phase"] == "forward"]
    assert [(r["layer_loop"], r["batch"], r["seq"]) for r in forward] == \
        [("scan", 1, 64), ("scan", 4, 64), ("split", 1, 64), ("split", 4, 64)]
    for r in forward:
        assert r["weight_bytes"] == 4 * (rest + c.num_layers * per_layer)
        assert r["memory"]["argument"] == r["weight_bytes"] + 4 * r["batch"] * r["seq"]  # + int32 tokens
    train = [r for r in rows if r["phase"] == "train"]
    assert [r["layers"] for r in train] == [1, 2]
    for r in train:
        assert r["master_weight_bytes"] == 4 * (rest + r["layers"] * per_layer)
        batch = 2 * 4 * 16 * 4 + 2 * 4 * 8 * 4 + 2 * 4 * 4  # 4 rows: tokens, segments [4, 16]; mask, old [4, 8]
        assert 0 <= r["memory"]["argument"] - (3 * r["master_weight_bytes"] + batch) <= 64
        assert r["weight_copies"]["copied_bytes_per_micro_batch"] >= 0


@pytest.mark.compile_bound
def test_layers_that_fit_by_hand_and_by_compiling():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_aot import compiled_layer_fit, layers_that_fit, memory_of

    fit = layers_that_fit([(2, 10 + 2 * 5), (4, 10 + 4 * 5), (8, 10 + 8 * 5)], capacity=42)
    assert fit == {"fixed_bytes": 10.0, "bytes_per_layer": 5.0, "max_layers": 6}
    assert layers_that_fit([(2, 20), (2, 20)], 100) is None and layers_that_fit([(2, 20), (4, 30)], None) is None

    # The fit of compiled peaks predicts the most layers whose compiled update fits (CPU compiles).
    import jax

    from qwq_jax import QwenConfig
    from gpu_aot import lower_train

    cfg = QwenConfig.preset("tiny").replace(num_layers=8)
    train = dict(dtype="float32", attention="xla", remat="full", rows=4, prompt_len=8, completion_len=8,
                 micro_batches=2)
    device = jax.devices("cpu")[0]
    peak = lambda n: memory_of(lower_train(cfg, device, layers=n, **train)[0].compile())["peak"]  # noqa: E731
    capacity = (peak(3) + peak(4)) // 2
    fit = compiled_layer_fit(cfg, device, capacity, counts=(1, 2), **train)
    assert fit["max_layers"] == 3, fit


@pytest.mark.xdist_group("device_suite")
def test_device_suite_tiny_writes_one_json_with_every_part(suite):
    """benchmarks/device_suite.sh --tiny: the GPU suite's every part as a CPU smoke run, one JSON file."""
    assert suite["returncode"] == 0, suite["stderr"][-3000:]
    r = SimpleNamespace(stdout=suite["stdout"], stderr=suite["stderr"])
    suite = suite["json"]
    assert suite["mode"] == "tiny" and suite["device"] == "cpu" and suite["date"]
    parts = suite["parts"]
    assert list(parts) == ["decode_bf16", "decode_int8", "prefill_8k", "grpo_7b", "cudnn_check", "serving"]
    serving = (ROOT / "benchmarks" / "serving.py").exists()
    for name, part in parts.items():
        if name == "serving" and not serving:
            assert part["status"] == "skipped" and "does not exist" in part["reason"]
            continue
        assert part["status"] == "ok" and part["seconds"] > 0 and part["records"], (name, part)
        numbers = [v for v in part["figures"].values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        assert numbers and all(v >= 0 for v in numbers), (name, part["figures"])
    figs = {name: part.get("figures", {}) for name, part in parts.items()}
    assert figs["decode_bf16"]["b4_p16_tokens_per_s"] > 0 and figs["decode_int8"]["b4_p16_tokens_per_s"] > 0
    assert figs["prefill_8k"]["seq32_tokens_per_s"] > 0
    assert figs["grpo_7b"]["step_s"] > 0 and figs["grpo_7b"]["max_abs_logprob_diff_vs_xla"] < 1e-4
    check = figs["cudnn_check"]  # on a CPU the blockwise backend stands in for cuDNN
    assert check["max_abs_logit_diff_vs_xla"] < 1e-4 and check["same_argmax"] and check["attention_fallbacks"] == 0
    assert "| part | status | seconds | figures |" in r.stdout and "| grpo_7b | ok |" in r.stdout
    for name in parts:
        assert f"[{name}]" in r.stderr  # progress per part


def test_device_suite_bad_usage_is_one_line():
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_suite.sh"), "--fast"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown option --fast" in r.stderr


@pytest.mark.xdist_group("device_suite")
def test_serving_tiny(suite):
    """benchmarks/serving.py: our engine's continuous and static policies and HF generate on the same
    skewed workloads (all at once, Poisson; n=1, groups of 16) and the full-occupancy run."""
    lines = suite_part(suite, "serving")  # serving.py --tiny --http
    rows, ratios = split(lines)
    runs = [("skewed", a, n) for n in (1, 16) for a in ("all", "poisson")] + [("full_occupancy", "all", 1)]
    http = [r for r in rows if r["policy"] == "http"]
    ours = [r for r in rows if r["impl"] == "qwq-jax" and r["policy"] != "http"]
    hf = [r for r in rows if r["impl"] == "hf-transformers-sdpa"]
    assert [(r["policy"], r["workload"], r["arrival"], r["n"]) for r in ours] == \
        [(p, *w) for p in ("continuous", "static") for w in runs]
    # --http: the same workloads through the server and the openai client, every token counted
    assert [(r["impl"], r["workload"], r["arrival"], r["n"]) for r in http] == [("qwq-jax", *w) for w in runs]
    for r in http:
        assert r["prefill_tokens_computed"] == r["prompt_tokens"] and r["compilations_during_run"] == 0, r
    assert [(r["policy"], r["workload"], r["arrival"], r["n"]) for r in hf] == [("static", *w) for w in runs]
    for r in rows:
        assert "error" not in r, r
        assert r["sequences_not_of_their_length"] == 0, r  # EOS off: every sequence its max_tokens, "length"
        assert r["generated_tokens_per_s"] > 0 and r["decode_step_s"] > 0 and r["device"] == "cpu"
        assert 0 <= r["ttft_p50_s"] <= r["ttft_p99_s"] and 0 <= r["itl_p50_s"] <= r["itl_p99_s"]
        assert r["sequences"] == r["requests"] * r["n"]
        if r["workload"] == "skewed":
            assert r["output_max_over_median"] >= 8  # skewed: max / median output length
        same = [x for x in rows if (x["workload"], x["arrival"], x["n"]) == (r["workload"], r["arrival"], r["n"])]
        # the same workload for every policy and implementation
        assert {(x["generated_tokens"], x["prompt_tokens"], x["rate_per_s"]) for x in same} == \
            {(r["generated_tokens"], r["prompt_tokens"], r["rate_per_s"])}
        assert (r["rate_per_s"] or 0) > 0 if r["arrival"] == "poisson" else r["rate_per_s"] is None
    for r in ours:
        assert r["compilations_during_run"] == 0, r  # the warm-up compiled everything
        assert r["warmup_s"] > 0 and r["compilations_warmup"] > 0
        assert 0 < r["page_utilisation_mean"] <= r["page_utilisation_max"] <= 1
        assert r["num_pages"] == ours[0]["num_pages"] and r["page_size"] == 4  # the same KV memory
        assert r["preemptions"] == 0 and r["prefix_cache_hit_tokens"] == 0  # fresh prompts, room for all
        assert r["prefill_tokens_computed"] == r["prompt_tokens"]  # a group of 16 prefills its prompt once
    for r in hf:
        assert r["prefill_tokens_computed"] >= r["prompt_tokens"] * r["n"]  # each row its own (padded) prompt
    assert [(r["ratio"], r["workload"], r["arrival"], r["n"]) for r in ratios] == \
        [(q, *w) for w in runs for q in ("http/continuous", "continuous/static", "continuous/hf")]
    assert all((r.get("generated_tokens_per_s") or r.get("decode_step_s")) > 0 for r in ratios)
    summary = lines[-1]
    assert summary["summary"] and summary["groups_prefill_equals_prompt"] == \
        {"skewed/all/n16": True, "skewed/poisson/n16": True}
    assert isinstance(summary["meets_target"], bool) and set(summary["rates_per_s"]) == {"1", "16"}
    assert len(summary["continuous_over_static"]) == len(summary["continuous_over_hf"]) == 5


def test_serving_workload_and_latencies_by_hand():
    """serving.py's workload generator (skewed lengths, Poisson arrivals, fresh prompts per tag) and its
    latency figures from a timeline written by hand."""
    from types import SimpleNamespace

    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serving

    kw = dict(seed=0, count=25, n=1, prompt_len=(8, 48), output_len=(4, 40), vocab=512)
    a = serving.make_workload(**kw, arrival="poisson", rate=10.0, tag="a-")
    b = serving.make_workload(**kw, arrival="poisson", rate=10.0, tag="b-")
    outputs = [r.max_tokens for r in a]
    assert np.median(outputs) == 4 and max(outputs) == 40 and min(outputs) >= 1  # max / median = 10
    assert max(len(r.prompt) for r in a) == 48 and np.median([len(r.prompt) for r in a]) == 8
    assert outputs != sorted(outputs)  # shuffled
    shape = [(len(x.prompt), x.max_tokens, x.arrival_s) for x in a]
    assert shape == [(len(y.prompt), y.max_tokens, y.arrival_s) for y in b]
    assert all(x.prompt != y.prompt for x, y in zip(a, b))  # fresh tokens per run: no prefix cache hits
    arrivals = [r.arrival_s for r in a]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals) and 0.03 < arrivals[-1] / 24 < 0.3  # mean gap 0.1 s
    assert {r.arrival_s for r in serving.make_workload(**kw, arrival="all")} == {0.0}

    requests = [serving.Request("r0", 0.0, [1, 2], 5, 1), serving.Request("r1", 1.0, [3], 1, 1)]
    timeline = serving.Timeline(requests, start=100.0)

    def event(rid, count, finished):
        return SimpleNamespace(request_id=rid, sample_index=0, token_ids=[7] * count, finished=finished,
                               finish_reason="length" if finished else None)

    timeline.record(event("r0", 2, False), 100.5)  # TTFT 0.5; its second token came with the first
    timeline.record(event("r0", 3, True), 101.0)   # 3 tokens after a 0.5 s gap: 1/6 s each
    timeline.record(event("r1", 1, True), 102.0)   # TTFT 1.0
    m = timeline.metrics()
    assert m["generated_tokens"] == 6 and m["duration_s"] == 2.0 and m["generated_tokens_per_s"] == 3.0
    assert m["ttft_p50_s"] == 0.75 and abs(m["ttft_p99_s"] - 0.995) < 1e-9
    assert m["itl_p50_s"] == 1 / 6 and m["itl_p99_s"] == 1 / 6 and m["delivery_gap_p99_s"] == 0.5
    assert m["decode_step_s"] == 1 / 6 and m["sequences_not_of_their_length"] == 0
    timeline.record(SimpleNamespace(request_id="r1", sample_index=0, token_ids=[], finished=True,
                                    finish_reason="stop"), 102.5)
    assert timeline.metrics()["sequences_not_of_their_length"] == 1


def test_sandbox_tiny():
    """benchmarks/sandbox.py: the strongest isolation here and the "none" peer, a few runs each."""
    lines = run_bench("sandbox.py")
    modes = {x["mode"]: x for x in lines if "mode" in x}
    assert set(modes) == {"strongest", "none"} and modes["none"]["isolation"].startswith("none")
    for row in modes.values():
        assert "error" not in row and row["runs"] == 3 and 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"]
    assert lines[-1]["summary"] and lines[-1]["isolation"] == modes["strongest"]["isolation"]


def test_convert_tiny():
    """benchmarks/convert.py: HF -> ours, the restore onto 8 devices and export-hf of two synthetic depths,
    each against a plain copy (a plain read for the restore)."""
    lines = run_bench("convert.py")
    rows = [x for x in lines if "mb_per_s" in x]
    assert [r["op"] for r in rows] == ["hf", "restore", "export-hf"] * 2, lines
    for r in rows:
        peer = "plain_read" if r["op"] == "restore" else "plain_copy"
        assert r["mb_per_s"] > 0 and r[f"{peer}_mb_per_s"] > 0 and r["peak_rss_above_idle_mb"] > 0, r
        assert r["within_bound"], r


def test_grpo_step_tiny():
    """A whole GRPO step's split on the tiny model (ours only: the peer revision is for manual runs), LoRA
    on a data=2,tensor=2 mesh of 4 CPU devices."""
    lines = run_bench("grpo_step.py", "--prompts", "2", "--group-size", "4", "--max-tokens", "8", "--warmup", "0",
                      "--iters", "1", "--devices", "4", "--mesh", "data=2,tensor=2", "--lora-rank", "4")
    (row,) = [x for x in lines if "impl" in x]
    assert row["impl"] == "ours" and row["model"] == "tiny" and lines[-1]["summary"]
    assert row["mesh"] == "data=2,tensor=2" and row["lora_rank"] == 4
    assert row["prefill_tokens_computed"] == row["prompt_tokens"]  # each group prefills its prompt once
    assert 0 < row["generated_tokens"] <= 2 * 4 * 8 and row["rollout_tokens_per_s"] > 0
    phases = [row[k] for k in ("generate_s", "reward_s", "logprob_s", "update_s")]
    assert all(t >= 0 for t in phases) and sum(phases) <= row["step_s"] * 1.01


def test_replicas_tiny():
    """benchmarks/replicas.py: one engine per replica vs one engine on the whole data=2,tensor=2 mesh, the
    same tokens, half the KV pool on each device."""
    lines = run_bench("replicas.py")
    rows = {x["engine"]: x for x in lines if "engine" in x}
    assert set(rows) == {"whole_mesh", "replicas"}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["rollout_s"] > 0 and r["rows"] == 8, r
    (ratio,) = [x for x in lines if "ratio" in x]
    assert ratio["same_tokens"] is True and ratio["kv_pool_bytes_per_device"] == 0.5 and ratio["tokens_per_s"] > 0


def test_startup_tiny(demo_checkpoint):
    """benchmarks/startup.py: `python -m qwq_jax.sample` processes on the demo checkpoint, timed to the
    reply's first byte and to the end (one untimed run stores the programs, one timed run reads them)."""
    lines = run_bench("startup.py", "--checkpoint", str(demo_checkpoint))
    (row,) = [x for x in lines if "impl" in x]
    assert row["impl"] == "ours" and row["cache"] == "warm" and row["runs"] == 1 and row["max_tokens"] == 2
    assert 0 < row["first_byte_s"] < row["whole_s"] and row["same_reply_every_run"], row
    assert lines[-1]["summary"] and lines[-1]["warm_first_byte_s"] == row["first_byte_s"]

