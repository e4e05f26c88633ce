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

`weight_copies` (ours, `--inspect-hlo`, on by default): XLA's optimised HLO of each decode
program is searched for weight-sized buffers it materialises (a layer's weight slice copied out
of the stacked arrays, a dtype conversion, a re-layout; benchmarks/hlo_buffers.py):
`copied_bytes_per_step` > 0 means the step does not read every weight in place, which alone
keeps it from the roofline.

`--quantize int8` runs our engine on int8 weight-only weights (qwq_jax.quant; HF stays bf16):
every row says so, its roofline counts the bytes it reads, and `fraction_of_unquantized_roofline`
compares it with the bf16 weights' ceiling.

Our engine (continuous batching over a paged KV cache, qwq_jax/generate.py) runs once per
`--layer-loop` (`Engine(layer_loop=...)`): `scan` over the stacked weights and `split` (each
layer's weights in arrays of their own, nothing to slice); `same_tokens_as_scan` checks they
agree. A batch of B is B requests on an engine of `max_num_seqs=B` decode slots (its decode
program runs exactly B slots), its page pool sized for B sequences of the longest prompt +
`--new-tokens`, prefix caching off (the timed run prefills its prompts again). Timings are the
engine's `last_timings`: `prefill_s` / `decode_s` (device calls, compilation excluded),
`prefill_chunks` (one call per `--prefill-chunk` tokens of each prompt), `decode_tokens_per_s`.

    python benchmarks/decode.py --preset qwq-32b --batch 1 16 64 --prompt-len 128 4096   # one H100
    python benchmarks/decode.py --tiny                                                      # CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import shutil
import sys
import time

from _common import (IMPL_NAMES, HelpFormatter, add_common_args, apply_tiny, build_hf, build_ours, device_kind,
                     emit, error_line, peak_bandwidth, preset_config, ratio, run_child)


LAYER_LOOPS = ("scan", "split")  # qwq_jax.generate.LAYER_LOOPS (not imported: jax starts later)


def settings(args) -> list[tuple[int, int]]:
    return [(p, b) for p in args.prompt_len for b in args.batch]


def _dump_decode_hlo(keep_in: str | None) -> str:
    """Have XLA write the optimised HLO of every decode program (before jax is first used), into
    `keep_in` or a temporary directory."""
    import tempfile

    out = os.path.abspath(keep_in) if keep_in else tempfile.mkdtemp(prefix="qwq_decode_hlo_")
    # A program read from the persistent compilation cache is never compiled, so never dumped.
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), f"--xla_dump_to={out}",
                                                     "--xla_dump_hlo_as_text",
                                                     "--xla_dump_hlo_module_re=.*_decode_fn.*"]))
    return out


def _decode_programs(dump: str | None) -> set[str]:
    return set(glob.glob(os.path.join(dump, "*_decode_fn*_after_optimizations.txt"))) if dump else set()


def weight_copies(files: set[str], cfg) -> dict:
    """What `hlo_buffers` finds in the decode programs compiled for one setting."""
    from hlo_buffers import model_weight_shapes, weight_sized_buffers

    shapes = model_weight_shapes(cfg)
    reports = [weight_sized_buffers(open(f).read(), shapes) for f in sorted(files)]
    top = sorted((b for r in reports for b in r["buffers"]), key=lambda b: -b["bytes"] * b["times"])[:3]
    return {"programs": len(reports),
            "copied_bytes_per_step": sum(r["copied_bytes_in_loops"] for r in reports),
            "copied_bytes_per_call": sum(r["copied_bytes_outside"] for r in reports),
            "largest": [{k: b[k] for k in ("instruction", "opcode", "dtype", "shape", "times")} for b in top]}


def _watch_decode_calls(engine) -> dict:
    """Record the shapes of the engine's last call of its jitted decode program
    (`engine.programs.decode`) in `["shapes"]`: settings that reuse a compiled decode program are
    matched to the program compiled for the first of them."""
    import jax

    last, inner = {}, engine.programs.decode

    def watched(*a, **k):
        last["shapes"] = str(jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") else x, (a, k)))
        return inner(*a, **k)

    engine.programs.decode = watched
    return last


def run_ours(args) -> dict:
    dump = _dump_decode_hlo(args.hlo_dir) if args.inspect_hlo else None
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qwq_jax.generate import Engine
    from qwq_jax.sampling import SamplingParams

    cfg = preset_config(args.preset)
    dtype = jnp.dtype(args.dtype)
    model = build_ours(cfg, dtype, attention=args.attention)
    float_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    if args.quantize:
        from qwq_jax.quant import quantize

        model = quantize(model, args.quantize, donate=True)  # peak: the float weights + one int8 weight
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    sp = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    cases = [(p, b, np.random.default_rng(p).integers(0, cfg.vocab_size, (b, p)).tolist()) for p, b in settings(args)]
    rows, first = {}, {}  # first: (loop, tokens) of the first loop that ran each setting; the others must agree
    copies = {}  # (layer loop, decode call shapes) -> what hlo_buffers found in that compiled program
    # One loop at a time, `split` last: it copies the layers out of the stacks and frees those.
    for loop in sorted(args.layer_loop, key=lambda name: name == "split"):
        try:
            engine = Engine(model, chunk=args.chunk, prefill_chunk=args.prefill_chunk, layer_loop=loop,
                            donate_weights=loop == "split", max_model_len=max(args.prompt_len) + args.new_tokens,
                            prefix_caching=False)
        except Exception as e:  # e.g. out of memory while splitting
            rows.update({row_key(loop, p, b): {"error": error_line(e)} for p, b, _ in cases})
            continue
        last_call = _watch_decode_calls(engine)
        for batch in args.batch:
            mine = [(p, prompts) for p, b, prompts in cases if b == batch]
            # `batch` decode slots and a pool for `batch` whole sequences (a new decode shape)
            engine.resize(max_num_seqs=batch, num_pages=batch * engine.max_pages)
            for prompt_len, prompts in mine:
                try:
                    before = _decode_programs(dump)
                    engine.generate(prompts, sp)  # compile
                    programs = _decode_programs(dump) - before
                    t0 = time.perf_counter()
                    outs = engine.generate(prompts, sp)
                    total = time.perf_counter() - t0
                    assert all(len(o[0].token_ids) == args.new_tokens for o in outs)
                    tokens = [o[0].token_ids for o in outs]
                    ref_loop, ref_tokens = first.setdefault((prompt_len, batch), (loop, tokens))
                    t = engine.last_timings
                    row = rows[row_key(loop, prompt_len, batch)] = {
                        "prefill_s": t["prefill_s"], "prefill_chunks": t["prefill_chunks"], "decode_s": t["decode_s"],
                        "total_s": total, "decode_tokens_per_s": t["decode_tokens_per_s"],
                        "decode_slots": engine.max_num_seqs, "same_tokens_as_" + ref_loop: tokens == ref_tokens}
                    if programs:
                        copies[loop, last_call["shapes"]] = weight_copies(programs, cfg)
                    if (loop, last_call.get("shapes")) in copies:
                        row["weight_copies"] = copies[loop, last_call["shapes"]]
                except Exception as e:  # out of memory at one setting should not lose the others
                    rows[row_key(loop, prompt_len, batch)] = {"error": error_line(e)}
                    gc.collect()
            engine.free_cache()
            gc.collect()
        del engine
        gc.collect()
    if dump and not args.hlo_dir:
        shutil.rmtree(dump, ignore_errors=True)
    return {"rows": rows, "device": device_kind("ours"), "float_weight_bytes": float_bytes, "hlo_dump": args.hlo_dir,
            "weight_bytes": weight_bytes}


def run_hf(args) -> dict:
    import torch

    cfg = preset_config(args.preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_hf(cfg, getattr(torch, args.dtype), device).eval()
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
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64],
                   help="requests decoded together (our engine: that many decode slots, max_num_seqs)")
    p.add_argument("--prompt-len", type=int, nargs="+", default=[128, 4096], help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--chunk", type=int, default=32, help="decode steps per jitted chunk")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="our engine's prompt tokens per prefill call (one prompt per call)")
    p.add_argument("--attention", default="auto", help="our attention backend (qwq_jax.attention)")
    p.add_argument("--layer-loop", nargs="+", choices=LAYER_LOOPS, default=list(LAYER_LOOPS),
                   help="our engine's layer loop (Engine(layer_loop=...)): each is measured, split last (it "
                        "frees the stacked weights), and their greedy tokens compared")
    p.add_argument("--hlo-dir", help="keep the decode programs' HLO dumps here (default: a temporary "
                                      "directory, removed after the run)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="weights, activations and KV cache on both sides (--tiny: float32)")
    p.add_argument("--inspect-hlo", action=argparse.BooleanOptionalAction, default=True,
                   help="dump our decode programs' optimised HLO and report the weight-sized buffers they "
                        "write per step (benchmarks/hlo_buffers.py): 0 means weights are read in place")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="our model's decoder matmul weights int8 weight-only (qwq_jax.quant): changes the "
                        "numbers, reported in each row; HF stays in the float dtype")
    args = p.parse_args()
    if args.tiny:
        args.dtype = "float32"
        # the 40-token prompts go in 3 prefill calls each
        apply_tiny(p, args, preset="tiny", batch=[1, 4], prompt_len=[16, 40], new_tokens=16, prefill_chunk=16)
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
                       "dtype": args.dtype,
                       **({"attention": args.attention, "prefill_chunk": args.prefill_chunk, "layer_loop": loop,
                           "weights": f"{args.quantize} weight-only (quantized)" if args.quantize else "as dtype",
                           "weight_bytes": res["weight_bytes"], "hlo_dump": res["hlo_dump"]}
                          if impl == "ours" else {}), **row}
                if impl == "ours" and "error" not in row:
                    cache_itemsize = 4 if args.dtype == "float32" else 2
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
