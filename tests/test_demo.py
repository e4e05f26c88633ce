"""The real demo model (Qwen2.5-Coder-0.5B-Instruct GGUF) end to end, against transformers in fp32."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwq_jax import forward, load
from qwq_jax.generate import Engine
from qwq_jax.sampling import SamplingParams
from qwq_jax.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo_hf")]

CHATS = {
    "code": [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
    "math": [{"role": "system", "content": "You are a careful math tutor."},
             {"role": "user", "content": "What is 17 * 23? Explain step by step."}],
    "chinese": [{"role": "user", "content": "用一句话解释什么是快速排序。"}],
    "multi-turn": [{"role": "user", "content": "Name a sorting algorithm."},
                   {"role": "assistant", "content": "Merge sort."},
                   {"role": "user", "content": "What is its time complexity?"}],
}


@pytest.fixture(scope="module")
def ours(demo_checkpoint):
    return load(demo_checkpoint)


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint):
    return Tokenizer.from_dir(demo_checkpoint)


def test_logits_match_transformers_gguf_model(ours, tokenizer, demo_hf_model):
    """Converted fp32 model vs transformers' model of the same GGUF: 3 prompts, their first 100 tokens
    (one length: one compiled forward)."""
    texts = [
        "def quicksort(xs):\n    " + "# sort the list in place, recursively, using a pivot\n    " * 12,
        "The history of the Roman Empire spans many centuries. " * 12,
        "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。" * 8,
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert len(ids) >= 100
        ids = ids[:100]
        want = demo_hf_model(torch.tensor([ids])).logits.float().detach().numpy()
        got = np.asarray(forward(ours, jnp.asarray([ids], jnp.int32)))
        err = np.abs(got - want).max()
        print(f"demo logits, {len(ids)} tokens: max |d| = {err:.2e}")
        assert err <= 5e-3


def test_greedy_equals_transformers_generate(ours, tokenizer, demo_hf_model):
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in CHATS.values()]
    outs = Engine(ours, tokenizer).generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    # (Prompts prefilled 32 tokens at a time by the model the CLIs build, attention "auto", against
    # transformers: tests/test_engine.py's demo test.)
    # transformers' greedy choice at every step, from one teacher-forced fp32 forward over prompt +
    # our tokens (what its `generate` would pick step by step, without 24 sequential calls): our
    # tokens are HF's greedy tokens iff each is the argmax of HF's logits after the ones before it.
    for name, ids, out in zip(CHATS, prompts, outs):
        new = out[0].token_ids
        assert len(new) == 24 or (out[0].finish_reason == "stop" and new[-1] in tokenizer.eos_token_ids), name
        with torch.no_grad():
            logits = demo_hf_model(torch.tensor([ids + new[:-1]])).logits[0, len(ids) - 1:].float().numpy()
        print(name, repr(out[0].text[:80]))
        assert logits.argmax(-1).tolist() == new, name


def test_int8_weights_keep_transformers_next_token_predictions(demo_checkpoint, tokenizer, demo_hf_model):
    """The demo model loaded with int8 weight-only quantization vs transformers' float32 model: the
    same next-token argmax at >= 95% of positions, mean KL(hf || ours) < 0.01 nats, half the bytes."""
    import jax

    from qwq_jax.quant import weight_bytes

    qmodel = load(demo_checkpoint, quant="int8")
    assert qmodel.quant == "int8"
    c = qmodel.config
    e, hd, kd = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    int8_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx_layers(qmodel)) if x.dtype == jnp.int8)
    assert int8_bytes == c.num_layers * (2 * e * hd + 2 * e * kd + 3 * e * c.intermediate_size)  # 1 byte each
    print(f"int8 demo: {weight_bytes(qmodel) / 2**20:.0f} MiB of weights, {int8_bytes / 2**20:.0f} MiB int8")
    texts = ["def quicksort(xs):\n    " + "# sort the list in place, recursively, using a pivot\n    " * 12,
             "The history of the Roman Empire spans many centuries. " * 12]
    for text in texts:
        ids = tokenizer.encode(text)[:100]  # one length: one compiled forward
        want = demo_hf_model(torch.tensor([ids])).logits.float().detach().numpy()[0]
        got = np.asarray(forward(qmodel, jnp.asarray([ids], jnp.int32)))[0]
        agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
        lw, lg = (torch.log_softmax(torch.tensor(x, dtype=torch.float64), -1).numpy() for x in (want, got))
        kl = float(np.mean(np.sum(np.exp(lw) * (lw - lg), axis=-1)))
        print(f"int8 demo, {len(ids)} tokens: top-1 agreement {agree:.3f}, mean KL {kl:.2e}")
        assert agree >= 0.95 and kl < 1e-2


def nnx_layers(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model))["layers"]


def test_sample_cli_json(demo_checkpoint, capsys):
    """`python -m qwq_jax.sample --json`'s main, in this process (the demo's 2.5 GB again in a new
    process costs this VM more than the test's own work; the other CLI tests here start processes)."""
    from qwq_jax.sample import main

    code = main(["--checkpoint", str(demo_checkpoint), "--prompt", "Write a one-line Python hello world.", "--json",
                 "--temperature", "0", "--max-tokens", "8", "--prefill-chunk", "8", "--layer-loop", "split",
                 "--quantize", "int8"])
    r = capsys.readouterr()
    assert code == 0, r.err[-3000:]
    out = json.loads(r.out)
    for key in ("token_ids", "text", "reasoning_content", "content", "finish_reason", "usage", "timings"):
        assert key in out
    assert out["usage"]["completion_tokens"] == len(out["token_ids"]) <= 8
    assert out["text"].strip() and out["content"] == out["text"] and out["reasoning_content"] is None
    t = out["timings"]
    assert t["decode_tokens_per_s"] == pytest.approx((len(out["token_ids"])) / t["decode_s"], rel=0.01)
    # Prefill and insert compiled (or came from the cache) while the weights were read, decode too if
    # the restore was still running then; the reply compiled the rest, nothing twice.
    loading, during = [c["program"] for c in t["compiled_while_loading"]], [c["program"] for c in t["compiled"]]
    assert {"prefill", "insert"} <= set(loading) and sorted(loading + during) == ["decode", "insert", "prefill"]
    # Sampling: what was used and where from (the flag, then the Qwen2.5 instruct recommendation).
    assert out["sampling"]["family"] == "qwen2.5-instruct"
    assert out["sampling"]["temperature"] == {"value": 0.0, "source": "flag"}
    assert out["sampling"]["top_p"]["value"] == 0.8 and out["sampling"]["top_k"]["value"] == 20
    assert out["sampling"]["max_tokens"] == {"value": 8, "source": "flag"}
    assert set(out["compile_cache"]) == {"dir", "hits", "misses"}


@pytest.mark.parametrize("args, code, message", [
    (["--temperature", "-1"], 2, "temperature=-1"),
    (["--top-p", "1.5"], 2, "top_p=1.5"),
    (["--max-tokens", "0"], 2, "max_tokens=0"),
    (["--min-p", "2"], 2, "min_p=2"),
    (["--rope-scaling", "dynamic"], 2, "invalid choice"),
    (["--prefill-chunk", "0"], 2, "--prefill-chunk: must be a positive whole number of tokens, got '0'"),
    (["--quantize", "int4"], 2, "invalid choice: 'int4'"),
    (["--layer-loop", "vmap"], 2, "invalid choice: 'vmap'"),
    (["--attention", "flash3"], 2, "invalid choice: 'flash3'"),
])
def test_sample_cli_invalid_parameters(demo_checkpoint, capsys, args, code, message):
    """Refused in `main` (in-process: no model is loaded) with one error line and exit 2."""
    from qwq_jax.sample import main

    try:
        got = main(["--checkpoint", str(demo_checkpoint), "--prompt", "hi", *args])
    except SystemExit as e:
        got = e.code
    err = capsys.readouterr().err
    assert got == code and message in err, err[-2000:]
    assert len([l for l in err.splitlines() if "error" in l]) == 1


def test_sample_cli_attention_errors_before_loading(tmp_path):
    """A backend this platform cannot run, or a bad $QWQ_ATTENTION behind "auto": one clear error,
    exit 2, before the checkpoint is even looked for (a missing one would say so, exit 1)."""
    import jax

    other = "splash" if jax.default_backend() != "tpu" else "cudnn"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "qwq_jax.sample", "--checkpoint", str(tmp_path / "nope"), "--prompt", "hi"]
    r = subprocess.run(cmd + ["--attention", other], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and f"--attention: attention backend {other!r} needs a" in r.stderr, r.stderr[-2000:]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, QWQ_ATTENTION="flash3"), timeout=300)
    assert r.returncode == 2 and "--attention: unknown attention backend 'flash3'" in r.stderr, r.stderr[-2000:]
    assert "checkpoint not found" not in r.stderr


def test_sample_cli_interactive_keeps_history(demo_checkpoint):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "qwq_jax.sample", "--checkpoint", str(demo_checkpoint), "--interactive",
                        "--system", "Answer in one short sentence.", "--temperature", "0", "--max-tokens", "10"],
                       input="My name is Ada.\nWhat is my name?\n\n", capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    replies = r.stdout.split("> ")[1:]  # prompt marks, then each streamed reply
    assert len(replies) == 3 and "Ada" in replies[1], r.stdout  # the second answer remembers the first turn
