"""Prefill throughput and MFU: qwq-jax vs HF transformers (bf16, SDPA) on the same device.

One forward pass over `--batch` x `--seq` random tokens with logits at the last position only (what
a server's prefill computes; no KV cache is written on either side), random weights of a preset's
shape (`--random-weights` is the only mode for now). Ours is jitted with the attention backend of
`--attention` ("auto": cuDNN flash attention on a GPU, splash on a TPU); HF runs
`attn_implementation="sdpa"` under `torch.inference_mode`. Each implementation runs in its own
child process. Prints one JSON line per (impl, seq), a ratio line per seq and a summary line.
This is the model's dense forward (no pages); the engine's own prefill (one prompt per call,
`--prefill-chunk` tokens at a time, into its paged KV cache through the blockwise reference
paged attention) is timed by benchmarks/decode.py (`prefill_s`) and benchmarks/serving.py.
A backend other than xla is also checked against the xla reference in the same run: the row of
the shortest length carries `check_vs_xla` (max |logit difference|, same argmax).

FLOPs per pass: 2 x (decoder matmul weights) x tokens + 2·E·V per row for the last logits +
causal attention 4·L·T²·H·D/2 per row. MFU = FLOPs / time / dense bf16 peak of the device
(null where the peak is unknown, e.g. CPU).

    python benchmarks/prefill.py --preset qwq-32b --seq 2048 8192 32768     # one H100
    python benchmarks/prefill.py --tiny                                      # CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import sys

from _common import (IMPL_NAMES, HelpFormatter, add_common_args, apply_tiny, build_hf, build_ours,
                     collect_attention_fallbacks, device_kind, emit, error_line, forward_flops, graphdef_with_attention,
                     peak_flops, preset_config, ratio, run_child, timed)


def run_ours(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qwq_jax.attention import resolve_auto

    fallbacks = collect_attention_fallbacks()
    cfg = preset_config(args.preset)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    graphdef, params = nnx.split(build_ours(cfg, dtype, attention=args.attention))
    layers = None
    if args.layer_loop == "split":  # one array per layer: no slice of a stack to copy (as the engine's split)
        from qwq_jax.model import split_layers

        layers = split_layers(params["layers"], donate=True)
        params["layers"] = layers[0]  # the graph keeps `layers`: layer 0's buffers, no copy

    def make_prefill(graphdef):
        @jax.jit
        def prefill(params, tokens):
            model = nnx.merge(graphdef, params)
            x, _, _ = model.hidden_states(tokens, layers=layers)
            return model.logits(x[:, -1:])[:, 0]  # [B, V]

        return prefill

    def random_tokens(seq):
        return jnp.asarray(np.random.default_rng(seq).integers(0, cfg.vocab_size, (args.batch, seq)), jnp.int32)

    prefill = make_prefill(graphdef)
    resolved = resolve_auto(jnp.zeros((1, 2, 1, cfg.head_dim), dtype)) if args.attention == "auto" else args.attention
    rows = {}
    for seq in args.seq:
        tokens = random_tokens(seq)
        try:
            t = timed(lambda: prefill(params, tokens), args.warmup, args.iters, jax.block_until_ready)
            rows[seq] = {"time_s": t}
        except Exception as e:  # out of memory at one length should not lose the others
            rows[seq] = {"error": error_line(e)}
    # A fast backend is checked against the xla reference here, where it runs (at the shortest
    # length, if the reference's [B, H, T, T] float32 scores fit).
    check = None
    seq = min(args.seq)
    if resolved != "xla" and seq <= args.check_max_seq:
        tokens = random_tokens(seq)
        try:
            got = np.asarray(prefill(params, tokens), np.float32)
            want = np.asarray(make_prefill(graphdef_with_attention(cfg, dtype, "xla"))(params, tokens), np.float32)
            check = {"seq": seq, "max_abs_logit_diff_vs_xla": float(np.abs(got - want).max()),
                     "max_abs_logit": float(np.abs(want).max()),
                     "same_argmax": bool((got.argmax(-1) == want.argmax(-1)).all())}
        except Exception as e:
            check = {"seq": seq, "error": error_line(e)}
    return {"rows": rows, "device": device_kind("ours"), "attention": args.attention, "attention_resolved": resolved,
            "layer_loop": args.layer_loop,
            "attention_fallbacks": sorted(set(fallbacks)), "check_vs_xla": check}


def run_hf(args) -> dict:
    import torch

    cfg = preset_config(args.preset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_hf(cfg, torch.float32 if args.tiny else torch.bfloat16, device).eval()

    def sync(x):
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    rows = {}
    for seq in args.seq:
        ids = torch.randint(0, cfg.vocab_size, (args.batch, seq), device=device)

        def once():
            with torch.inference_mode():
                return model(ids, use_cache=False, logits_to_keep=1).logits

        try:
            rows[seq] = {"time_s": timed(once, args.warmup, args.iters, sync)}
        except Exception as e:  # torch.OutOfMemoryError included
            rows[seq] = {"error": error_line(e)}
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"rows": rows, "device": device_kind("hf")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(p, preset="qwq-32b")
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 32768], help="prompt lengths")
    p.add_argument("--batch", type=int, default=1, help="prompts per pass")
    p.add_argument("--layer-loop", choices=("scan", "split"), default="split",
                   help="our decoder layers (qwq_jax.generate.LAYER_LOOPS): lax.scan over the stacked weights, or "
                        "one array per layer (split_layers; what Engine(layer_loop='split') and the sample CLI "
                        "prefill with). XLA for an H100 copies every layer's weight slice out of the stacks "
                        "per forward with scan: 62 GB for the QwQ-32B shape (benchmarks/gpu_aot.py --phase forward)")
    p.add_argument("--attention", default="auto", help="our attention backend (qwq_jax.attention)")
    p.add_argument("--check-max-seq", type=int, default=8192,
                   help="compare a non-xla backend's logits with the xla reference at the shortest --seq, up to this")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes (the first compiles)")
    p.add_argument("--iters", type=int, default=3, help="timed passes (the median is reported)")
    args = p.parse_args()
    if args.tiny:
        apply_tiny(p, args, preset="tiny", seq=[32, 64], batch=2, warmup=1, iters=2)
    if args.child:
        print(json.dumps(run_ours(args) if args.child == "ours" else run_hf(args)))
        return

    cfg = preset_config(args.preset)
    results, summary = {}, {"tokens_per_s": {}, "mfu": {}}
    for impl in args.impl:
        res = results[impl] = run_child(__file__, impl)
        peak = peak_flops(res["device"])
        name = IMPL_NAMES[impl]
        for seq in args.seq:
            row = res["rows"][str(seq)]
            rec = {"bench": "prefill", "impl": name, "preset": args.preset, "batch": args.batch, "seq": seq,
                   "device": res["device"], "dtype": "float32" if args.tiny else "bfloat16"}
            if impl == "ours":
                rec.update({k: res[k] for k in ("attention", "attention_resolved", "attention_fallbacks",
                                                "layer_loop")})
                if res["check_vs_xla"] and res["check_vs_xla"]["seq"] == seq:
                    rec["check_vs_xla"] = res["check_vs_xla"]
            if "error" in row:
                rec["error"] = row["error"]
                row["tokens_per_s"] = row["mfu"] = None
            else:
                flops = forward_flops(cfg, args.batch, seq, logit_positions=1)
                row["tokens_per_s"] = args.batch * seq / row["time_s"]
                row["mfu"] = flops / row["time_s"] / peak if peak else None
                rec.update(time_s=row["time_s"], tokens_per_s=row["tokens_per_s"], tflops=flops / row["time_s"] / 1e12,
                           mfu=row["mfu"], peak_tflops=peak / 1e12 if peak else None)
            emit(rec)
            summary["tokens_per_s"].setdefault(name, []).append(row["tokens_per_s"])
            summary["mfu"].setdefault(name, []).append(row["mfu"])
    if set(results) == set(IMPL_NAMES):
        summary["ratio_tokens_per_s"] = []
        for seq in args.seq:
            ours, hf = (results[i]["rows"][str(seq)]["tokens_per_s"] for i in ("ours", "hf"))
            r = ratio(ours, hf)
            summary["ratio_tokens_per_s"].append(r)
            emit({"bench": "prefill", "ratio": "qwq-jax/hf", "preset": args.preset, "batch": args.batch, "seq": seq,
                  "tokens_per_s": r})
    emit({"bench": "prefill", "summary": True, "preset": args.preset, "batch": args.batch, "seq": args.seq, **summary})
    print(f"prefill benchmark done: {args.preset}, seq {args.seq}", file=sys.stderr)


if __name__ == "__main__":
    main()
