"""Decode throughput: qwq-jax Engine vs HF transformers generate (bf16, SDPA) on the same device.

Each implementation runs in its own child process (so neither holds the other's memory), with
random weights of a preset's shape, greedy decoding of `--new-tokens` tokens after prompts of
`--prompt-len` tokens, EOS disabled, for every (prompt length, batch). Prints one JSON line per
(impl, prompt length, batch), a ratio line per setting and a summary line. A setting that runs
out of memory reports its error and the others still run.

Roofline: each decode step reads every weight once plus the KV cache filled so far, so at batch B
the memory-bound ceiling is B x bandwidth / (weight bytes + mean cache bytes per step);
`roofline_tokens_per_s` uses the device's peak HBM bandwidth (null where unknown, e.g. CPU) and
`fraction_of_roofline` is the measured figure over it.

`--quantize int8` runs our engine on int8 weight-only weights (qwq_jax.quant; HF stays bf16):
every row says so, its roofline counts the bytes it reads, and `fraction_of_unquantized_roofline`
compares it with the bf16 weights' ceiling.

Our engine runs once per `--layer-loop`: the decode step's layers as a scan over the stacked
weights, and unrolled (`Engine(unroll_layers=True)`), which shows whether the compiler copies
each layer's weight slice inside the loop; `same_tokens_as_scan` checks the two agree.

    python benchmarks/decode.py --preset qwq-32b --batch 1 16 64 --prompt-len 128 4096   # one H100
    python benchmarks/decode.py --tiny                                                      # CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

from _common import (IMPL_NAMES, HelpFormatter, add_common_args, build_hf, build_ours, device_kind, emit,
                     error_line, peak_bandwidth, preset_config, ratio, run_child)


LAYER_LOOPS = ("scan", "unrolled")


def settings(args) -> list[tuple[int, int]]:
    return [(p, b) for p in args.prompt_len for b in args.batch]


def run_ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flax import nnx

    from qwq_jax.generate import Engine
    from qwq_jax.sampling import SamplingParams

    cfg = preset_config(args.preset)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    model = build_ours(cfg, dtype, attention=args.attention)
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    if args.quantize:
        from qwq_jax.quant import quantize

        model = quantize(model, args.quantize, donate=True)  # peak: the float weights + one int8 weight
    engines = {loop: Engine(model, chunk=args.chunk, prefill_chunk=args.prefill_chunk,
                            unroll_layers=loop == "unrolled") for loop in args.layer_loop}  # one copy of the weights
    sp = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    rows = {}
    for prompt_len, batch in settings(args):
        prompts = np.random.default_rng(prompt_len).integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
        first = first_loop = None  # the first loop's tokens (that ran): every other must produce the same
        for loop, engine in engines.items():
            try:
                engine.generate(prompts, sp)  # compile
                t0 = time.perf_counter()
                outs = engine.generate(prompts, sp)
                total = time.perf_counter() - t0
                assert all(len(o[0].token_ids) == args.new_tokens for o in outs)
                tokens = [o[0].token_ids for o in outs]
                if first is None:
                    first, first_loop = tokens, loop
                t = engine.last_timings
                rows[row_key(loop, prompt_len, batch)] = {
                    "prefill_s": t["prefill_s"], "prefill_chunks": t["prefill_chunks"], "decode_s": t["decode_s"],
                    "total_s": total, "decode_tokens_per_s": batch * args.new_tokens / t["decode_s"],
                    "same_tokens_as_" + first_loop: tokens == first}
            except Exception as e:  # out of memory at one setting should not lose the others
                rows[row_key(loop, prompt_len, batch)] = {"error": error_line(e)}
                gc.collect()
    return {"rows": rows, "device": device_kind("ours"), "float_weight_bytes": float_bytes,
            "weight_bytes": sum(x.nbytes for x in jax.tree.leaves(next(iter(engines.values())).params))}


def run_hf(args) -> dict:
    import torch

    cfg = preset_config(args.preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_hf(cfg, torch.float32 if args.tiny else torch.bfloat16, device).eval()
    rows = {}
    for prompt_len, batch in settings(args):
        ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), device=device)

        def gen(n: int) -> float:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            assert out.shape[1] == prompt_len + n
            return time.perf_counter() - t0

        try:
            gen(4)  # warm-up
            prefill = gen(1)
            total = gen(args.new_tokens)
            decode = max(total - prefill, 1e-9)
            rows[row_key(None, prompt_len, batch)] = {"prefill_s": prefill, "decode_s": decode, "total_s": total,
                                             "decode_tokens_per_s": batch * (args.new_tokens - 1) / decode}
        except Exception as e:  # torch.OutOfMemoryError included
            rows[row_key(None, prompt_len, batch)] = {"error": error_line(e)}
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows, "device": device_kind("hf")}


def row_key(loop: str | None, prompt_len: int, batch: int) -> str:
    return (f"{loop}/" if loop else "") + f"{prompt_len}x{batch}"


def roofline(cfg, weight_bytes: int, prompt_len: int, batch: int, new_tokens: int, bandwidth: float | None,
             cache_itemsize: int) -> float | None:
    """Memory-bound tokens/s: batch x bandwidth / (weights + mean KV bytes read per step)."""
    if not bandwidth:
        return None
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * cache_itemsize
    mean_cache = batch * per_token * (prompt_len + new_tokens / 2)
    return batch * bandwidth / (weight_bytes + mean_cache)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(p, preset="qwq-32b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="rows decoded together")
    p.add_argument("--prompt-len", type=int, nargs="+", default=[128, 4096], help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--chunk", type=int, default=32, help="decode steps per jitted chunk")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="our engine's prompt tokens per prefill call")
    p.add_argument("--attention", default="auto", help="our attention backend (qwq_jax.attention)")
    p.add_argument("--layer-loop", nargs="+", choices=LAYER_LOOPS, default=list(LAYER_LOOPS),
                   help="our decode step's layer loop: a scan over the stacked weights, or unrolled "
                        "(Engine(unroll_layers=True)); each is measured and their greedy tokens compared")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="our model's decoder matmul weights int8 weight-only (qwq_jax.quant): changes the "
                        "numbers, reported in each row; HF stays in the float dtype")
    args = p.parse_args()
    if args.tiny:
        args.preset, args.batch, args.prompt_len, args.new_tokens = "tiny", [1, 4], [16, 40], 16
        args.prefill_chunk = 16  # the 40-token prompts go in 3 prefill calls
    if args.child:
        print(json.dumps(run_ours(args) if args.child == "ours" else run_hf(args)))
        return

    cfg = preset_config(args.preset)
    results, summary = {}, {"decode_tokens_per_s": {}}
    for impl in args.impl:
        res = results[impl] = run_child(__file__, impl)
        bandwidth = peak_bandwidth(res["device"])
        for loop in (args.layer_loop if impl == "ours" else [None]):
            name = IMPL_NAMES[impl] + (f"[{loop}]" if loop else "")
            for prompt_len, batch in settings(args):
                row = res["rows"][row_key(loop, prompt_len, batch)]
                rec = {"bench": "decode", "impl": IMPL_NAMES[impl], "preset": args.preset, "prompt_len": prompt_len,
                       "batch": batch, "new_tokens": args.new_tokens, "device": res["device"],
                       "dtype": "float32" if args.tiny else "bfloat16",
                       **({"attention": args.attention, "prefill_chunk": args.prefill_chunk, "layer_loop": loop,
                           "weights": f"{args.quantize} weight-only (quantized)" if args.quantize else "as dtype",
                           "weight_bytes": res["weight_bytes"]} if impl == "ours" else {}), **row}
                if impl == "ours" and "error" not in row:
                    cache_itemsize = 4 if args.tiny else 2
                    top = roofline(cfg, res["weight_bytes"], prompt_len, batch, args.new_tokens, bandwidth,
                                   cache_itemsize)
                    rec.update(roofline_tokens_per_s=top,
                               fraction_of_roofline=row["decode_tokens_per_s"] / top if top else None)
                    if args.quantize:  # against the unquantized weights' ceiling, the issue's bar
                        top = roofline(cfg, res["float_weight_bytes"], prompt_len, batch, args.new_tokens,
                                       bandwidth, cache_itemsize)
                        rec.update(unquantized_roofline_tokens_per_s=top,
                                   fraction_of_unquantized_roofline=row["decode_tokens_per_s"] / top if top else None)
                emit(rec)
                summary["decode_tokens_per_s"].setdefault(name, []).append(row.get("decode_tokens_per_s"))
    if set(results) == set(IMPL_NAMES):
        summary["ratio_decode_tokens_per_s"] = {}
        for loop in args.layer_loop:
            for prompt_len, batch in settings(args):
                ours = results["ours"]["rows"][row_key(loop, prompt_len, batch)].get("decode_tokens_per_s")
                hf = results["hf"]["rows"][row_key(None, prompt_len, batch)].get("decode_tokens_per_s")
                r = ratio(ours, hf)
                summary["ratio_decode_tokens_per_s"].setdefault(loop, []).append(r)
                emit({"bench": "decode", "ratio": "qwq-jax/hf", "preset": args.preset, "layer_loop": loop,
                      "prompt_len": prompt_len, "batch": batch, "decode_tokens_per_s": r})
    emit({"bench": "decode", "summary": True, "preset": args.preset, "settings": settings(args), **summary})
    print(f"decode benchmark done: {args.preset}, prompt lengths {args.prompt_len}, batches {args.batch}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
