"""Decode throughput: qwq-jax Engine vs HF transformers generate (bf16, SDPA) on the same device.

Each implementation runs in its own child process (so neither holds the other's memory), with
random weights of a preset's shape, greedy decoding of `--new-tokens` tokens after a prompt of
`--prompt-len` tokens, EOS disabled. Prints one JSON line per (impl, batch) and the ratios.

    python benchmarks/decode.py --preset qwen2.5-7b --batch 1 16      # on a GPU
    python benchmarks/decode.py --tiny                                  # CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cfg(preset: str):
    from qwq_jax.config import QwenConfig

    return QwenConfig.preset(preset).replace(eos_token_id=None, bos_token_id=None)


def run_ours(args, batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwq_jax.generate import Engine
    from qwq_jax.sampling import SamplingParams

    cfg = _cfg(args.preset)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    # Built under jit straight into its final buffers (an eager init leaves large temporaries behind).
    from flax import nnx

    from qwq_jax import Qwen2
    from sharding import init_sharded, make_mesh

    model = init_sharded(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype),
                         make_mesh("fsdp=1", jax.devices()[:1]), "generate")
    engine = Engine(model, chunk=args.chunk)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
    sp = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    engine.generate(prompts, sp)  # compile
    t0 = time.perf_counter()
    outs = engine.generate(prompts, sp)
    total = time.perf_counter() - t0
    assert all(len(o[0].token_ids) == args.new_tokens for o in outs)
    t = engine.last_timings
    return {"prefill_s": t["prefill_s"], "decode_s": t["decode_s"], "total_s": total,
            "decode_tokens_per_s": batch * args.new_tokens / t["decode_s"], "device": str(jax.devices()[0])}


def run_hf(args, batch: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = _cfg(args.preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(Qwen2Config(**cfg.to_hf()), dtype=dtype,
                                              attn_implementation="sdpa").eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), device=device)

    def gen(n: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == args.prompt_len + n
        return time.perf_counter() - t0

    gen(4)  # warm-up
    prefill = gen(1)
    total = gen(args.new_tokens)
    decode = max(total - prefill, 1e-9)
    return {"prefill_s": prefill, "decode_s": decode, "total_s": total,
            "decode_tokens_per_s": batch * (args.new_tokens - 1) / decode,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen2.5-7b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--chunk", type=int, default=32, help="decode steps per jitted chunk")
    p.add_argument("--tiny", action="store_true", help="tiny fp32 model, short run: a CPU smoke test")
    p.add_argument("--random-weights", action="store_true", default=True, help="(always) random weights")
    p.add_argument("--child", choices=("ours", "hf"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tiny:
        args.preset, args.batch, args.prompt_len, args.new_tokens = "tiny", [1, 4], 16, 16
    if args.child:
        fn = run_ours if args.child == "ours" else run_hf
        print(json.dumps({b: fn(args, b) for b in args.batch}))
        return
    results = {}
    for impl in ("ours", "hf"):
        cmd = [sys.executable, __file__, "--child", impl, "--preset", args.preset, "--prompt-len",
               str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--chunk", str(args.chunk),
               "--batch", *map(str, args.batch)] + (["--tiny"] if args.tiny else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise SystemExit(f"{impl} failed:\n{r.stderr[-4000:]}")
        results[impl] = json.loads(r.stdout.strip().splitlines()[-1])
        for b, row in results[impl].items():
            print(json.dumps({"bench": "decode", "impl": "qwq-jax" if impl == "ours" else "hf-transformers-sdpa",
                              "preset": args.preset, "batch": int(b), "prompt_len": args.prompt_len,
                              "new_tokens": args.new_tokens, **{k: (round(v, 4) if isinstance(v, float) else v)
                                                                for k, v in row.items()}}), flush=True)
    for b in results["ours"]:
        ours, hf = results["ours"][b]["decode_tokens_per_s"], results["hf"][b]["decode_tokens_per_s"]
        print(json.dumps({"bench": "decode", "ratio": "qwq-jax/hf", "preset": args.preset, "batch": int(b),
                          "decode_tokens_per_s": round(ours / hf, 3)}))
    print(f"decode benchmark done: {args.preset}, batches {args.batch}", file=sys.stderr)


if __name__ == "__main__":
    main()
