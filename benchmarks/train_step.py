"""GRPO train-step MFU: qwq-jax's GRPOTrainer update vs HF transformers (bf16, SDPA) + torch AdamW.

Times the update only (forward + backward over the micro-batches and the optimizer step) on a
synthetic GRPO batch: `--prompts` x `--group-size` rows, prompts of random length in
[prompt-len/2, prompt-len] right-aligned (left padding, as `GRPOTrainer.make_batch` lays them out),
completions of `--completion-len` tokens. Rollouts are decoding (benchmarks/decode.py). Random
weights of a preset's shape (`--random-weights` is the only mode for now).

    ours  GRPOTrainer as `python -m qwq_jax.train` builds it: fp32 master weights, bf16 compute,
          AdamW with fp32 moments, `--remat` (default full), `--attention` (default auto:
          cuDNN flash on a GPU); its jitted `_update` on the batch of `make_batch` (kl_beta=0, so
          no reference model is held; the rollout-policy log-probs are computed once, untimed).
    hf    Qwen2ForCausalLM in bf16 (weights, gradients and torch.optim.AdamW moments all bf16, no
          fp32 master), SDPA attention with the padding mask, gradient checkpointing when
          `--remat` is not "none"; the same micro-batches and a policy-gradient loss of the same
          shape (exp(logp - logp.detach()) x advantage over completion tokens; ours adds PPO
          clipping and the entropy, which cost nothing measurable), clip_grad_norm_ and AdamW.

FLOPs: model FLOPs = 3 x forward (6 x matmul weights x tokens, logits at the completion's positions
(both implementations compute only those: ours `completion_logprobs`, HF `logits_to_keep`; before
2026-12-04 both computed, and this count included, logits at every position), causal attention); hardware FLOPs add the recomputed layer forward under full remat (and HF's gradient
checkpointing). MFU and HFU divide them by time and the device's dense bf16 peak. A backend other
than xla is checked in the same run: `check_vs_xla` holds the largest and mean |log-prob
difference| against the xla reference on one micro-batch (left-padded rows included).

Memory: ours holds about 20 bytes per parameter during a step (fp32 weights, two AdamW moments,
the gradient accumulator and a micro-batch's gradient), so the 7B shape (~150 GB) fits no single
GPU: `--layers auto` (default) keeps the preset's widths (vocabulary included) and takes as many
layers as fit the device, found by compiling the update at 2 and 4 layers and reading XLA's peak
(`gpu_aot.compiled_layer_fit`; for one H100 with JAX at 0.95 of its memory this predicts 11 of the
7B's 28 layers: `gpu_aot.py --preset qwen2.5-7b --phase train --layers 4 8 28` compiles 22.8 GB
+ 4.8 GB per layer); the JSON says how many, and the HF peer gets the same number.

    python benchmarks/train_step.py --preset qwen2.5-7b        # one H100 / H200
    python benchmarks/train_step.py --tiny                      # CPU smoke run (CI)
"""

from __future__ import annotations

import argparse
import json
import sys

from _common import (IMPL_NAMES, HelpFormatter, add_common_args, apply_tiny, build_hf, build_ours,
                     collect_attention_fallbacks, device_kind, emit, error_line, forward_flops, graphdef_with_attention,
                     layer_matmul_params, peak_flops, preset_config, ratio, run_child, timed)

RECOMPUTING = ("full", "nothing_saveable")  # remat policies that recompute each layer's whole forward


def synthetic_rows(args, vocab: int):
    """Prompts (ragged), completions (full length), rewards: the same for both implementations."""
    import numpy as np

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, int(n)).tolist()
               for n in rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1, args.prompts)]
    prompts[0] = rng.integers(0, vocab, args.prompt_len).tolist()  # the widest row sets the width
    rows = args.prompts * args.group_size
    completions = rng.integers(0, vocab, (rows, args.completion_len))
    rewards = rng.normal(size=rows).astype(np.float32)
    return prompts, completions, rewards


def fit_layers(args, cfg) -> int:
    """Layers of the preset's shape whose training step fits this device (all of them if its memory is
    unknown): the update compiled (not run) at 2 and 4 layers gives XLA's peak per layer and the
    layers fitting 97% of the memory JAX may use; if compiling fails, an estimate by hand."""
    import jax

    if args.layers != "auto":
        return int(args.layers)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return cfg.num_layers
    try:
        from gpu_aot import compiled_layer_fit

        fit = compiled_layer_fit(cfg, device, int(0.97 * limit), dtype="float32" if args.tiny else "bfloat16",
                                 attention=args.attention, remat=args.remat, rows=args.prompts * args.group_size,
                                 prompt_len=args.prompt_len, completion_len=args.completion_len,
                                 micro_batches=args.micro_batches, compute_copy=args.compute_copy)
        print(f"layers that fit (compiled at {[n for n, _ in fit['points']]} layers): {fit['max_layers']}",
              file=sys.stderr)
        return max(1, min(cfg.num_layers, fit["max_layers"]))
    except Exception as e:  # the estimate below still gives a usable count
        print(f"fitting layers by compiling failed ({error_line(e)}); estimating by hand", file=sys.stderr)
    rows = args.prompts * args.group_size // args.micro_batches
    logits = 4 * rows * args.completion_len * cfg.vocab_size * 4  # fp32 logits, log-softmax, their gradients
    per_param = 20  # fp32 weights, AdamW mu and nu, gradient accumulator, one micro-batch's gradient
    per_layer = per_param * (layer_matmul_params(cfg) + 4 * cfg.hidden_size)
    fixed = per_param * cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    budget = 0.85 * limit - logits - 2 * 2**30
    return max(1, min(cfg.num_layers, int((budget - fixed) // per_layer)))


def run_ours(args) -> dict:
    import jax
    import jax.numpy as jnp

    from qwq_jax.attention import resolve_auto
    from qwq_jax.generate import Completion
    from qwq_jax.rl.grpo import GRPOConfig, GRPOTrainer

    fallbacks = collect_attention_fallbacks()
    cfg = preset_config(args.preset)
    cfg = cfg.replace(num_layers=fit_layers(args, cfg))
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    model = build_ours(cfg, dtype, attention=args.attention, remat=args.remat)
    grpo = GRPOConfig(group_size=args.group_size, max_tokens=args.completion_len, micro_batches=args.micro_batches,
                      kl_beta=0.0, compute_copy=args.compute_copy)
    trainer = GRPOTrainer(model, grpo, reward_fn=lambda idx, comps: [0.0] * len(comps))
    del model
    trainer.engine = None  # no rollouts here: drop the engine's copy of the weights

    prompts, completions, rewards = synthetic_rows(args, cfg.vocab_size)
    comps = [Completion(token_ids=c.tolist(), finish_reason="length", prompt_tokens=len(prompts[r // args.group_size]),
                        logprobs=[-1.0] * len(c)) for r, c in enumerate(completions)]
    batch, _ = trainer.make_batch(prompts, comps, rewards)
    arrays, ref_logp, _ = trainer._device_batch(batch)  # rollout-policy log-probs: once, untimed

    def step():
        trainer.params, trainer.opt_state, metrics = trainer._update(trainer.params, trainer.opt_state, arrays,
                                                                     ref_logp)
        return trainer.params, metrics

    t = timed(step, args.warmup, args.iters, jax.block_until_ready)
    loss = float(jax.device_get(step()[1]["loss"]))
    resolved = resolve_auto(jnp.zeros((1, 2, 1, cfg.head_dim), dtype)) if args.attention == "auto" else args.attention
    check = None
    if resolved != "xla":  # the fast backend against the xla reference, on one micro-batch's log-probs
        try:
            check = check_vs_xla(args, trainer, cfg, dtype, arrays, int(batch["tokens"].shape[1] - args.completion_len))
        except Exception as e:
            check = {"error": error_line(e)}
    return {"time_s": t, "layers": cfg.num_layers, "width": int(batch["tokens"].shape[1]), "loss": loss,
            "device": device_kind("ours"), "attention": args.attention, "attention_resolved": resolved,
            "attention_fallbacks": sorted(set(fallbacks)), "check_vs_xla": check}


def check_vs_xla(args, trainer, cfg, dtype, arrays, prompt_len: int) -> dict:
    """Completion log-probs of one micro-batch under our backend and under the xla reference."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qwq_jax.rl.grpo import completion_logprobs

    state = trainer.weights.as_state(trainer.params)
    n = args.micro_batches
    tokens, segments, mask = arrays["tokens"][::n], arrays["segments"][::n], arrays["mask"][::n]
    logps = []
    for graphdef in (trainer.weights.graphdef, graphdef_with_attention(cfg, dtype, "xla", args.remat)):
        fn = jax.jit(lambda st, tok, seg: completion_logprobs(nnx.merge(graphdef, st), tok, seg, prompt_len)[0])
        logps.append(fn(state, tokens, segments))
    diff = jnp.abs(logps[0] - logps[1]) * mask
    return {"max_abs_logprob_diff_vs_xla": float(diff.max()),
            "mean_abs_logprob_diff_vs_xla": float(diff.sum() / jnp.maximum(mask.sum(), 1))}


def run_hf(args, layers: int) -> dict:
    import numpy as np
    import torch

    cfg = preset_config(args.preset, layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_hf(cfg, torch.float32 if args.tiny else torch.bfloat16, device).train()
    if args.remat != "none":
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99), fused=device == "cuda")

    prompts, completions, rewards = synthetic_rows(args, cfg.vocab_size)
    from qwq_jax.rl.grpo import prompt_bucket

    p_len, n = prompt_bucket(args.prompt_len), args.micro_batches  # the width make_batch pads ours to
    rows = len(completions)
    tokens = np.zeros((rows, p_len + args.completion_len), np.int64)
    segments = np.ones_like(tokens)
    for r in range(rows):
        p = prompts[r // args.group_size]
        tokens[r, p_len - len(p): p_len] = p
        segments[r, : p_len - len(p)] = 0
        tokens[r, p_len:] = completions[r]
    adv = rewards.reshape(-1, args.group_size)
    adv = ((adv - adv.mean(1, keepdims=True)) / (adv.std(1, keepdims=True) + 1e-6)).reshape(-1)
    positions = np.maximum(np.cumsum(segments, 1) - 1, 0)
    t = {k: torch.from_numpy(v).to(device) for k, v in
         dict(tokens=tokens, segments=segments, positions=positions, adv=adv.astype(np.float32)).items()}
    total = float(rows * args.completion_len)

    def step():
        for i in range(n):  # strided micro-batches, as ours
            ids, seg, pos = t["tokens"][i::n], t["segments"][i::n], t["positions"][i::n]
            logits = model(input_ids=ids[:, :-1], attention_mask=seg[:, :-1], position_ids=pos[:, :-1],
                           use_cache=False, logits_to_keep=args.completion_len).logits.float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, p_len:, None])[..., 0]
            loss = -(torch.exp(logp - logp.detach()) * t["adv"][i::n, None]).sum() / total
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync(x):
        if device == "cuda":
            torch.cuda.synchronize()
        return x

    try:
        return {"time_s": timed(step, args.warmup, args.iters, sync), "layers": layers, "device": device_kind("hf")}
    except Exception as e:  # torch.OutOfMemoryError included
        return {"error": error_line(e), "layers": layers, "device": device_kind("hf")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(p, preset="qwen2.5-7b")
    p.add_argument("--layers", default="auto", help="decoder layers: a number, or 'auto' (as many as fit)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (rows = prompts x this)")
    p.add_argument("--prompt-len", type=int, default=512, help="longest prompt; others are 1/2..1 of it")
    p.add_argument("--completion-len", type=int, default=1536, help="tokens per completion")
    p.add_argument("--micro-batches", type=int, default=8, help="gradient accumulation steps")
    p.add_argument("--remat", default="full", help="our remat policy (HF: gradient checkpointing unless 'none')")
    p.add_argument("--attention", default="auto", help="our attention backend (qwq_jax.attention)")
    p.add_argument("--compute-copy", choices=("split", "step", "micro_batch"), default="split",
                   help="GRPOConfig.compute_copy: our fp32 masters cast to bf16 once per update (split: one array "
                        "per layer; step: stacked), or in every micro-batch where used")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps (the first compiles; the second can recompile for the updated weights' layout)")
    p.add_argument("--iters", type=int, default=3, help="timed steps (the median is reported)")
    p.add_argument("--hf-layers", type=int, help=argparse.SUPPRESS)  # set by the parent: ours' layer count
    args = p.parse_args()
    if args.tiny:
        apply_tiny(p, args, preset="tiny", prompts=2, group_size=2, prompt_len=8, completion_len=8, micro_batches=2,
                   iters=2)
    if (args.prompts * args.group_size) % args.micro_batches:
        p.error(f"--prompts x --group-size ({args.prompts * args.group_size}) must divide into "
                f"--micro-batches ({args.micro_batches})")
    if args.child:
        out = run_ours(args) if args.child == "ours" else run_hf(args, args.hf_layers or int(
            args.layers if args.layers != "auto" else preset_config(args.preset).num_layers))
        print(json.dumps(out))
        return

    results = {}
    for impl in args.impl:
        extra = ["--hf-layers", str(results["ours"]["layers"])] if impl == "hf" and "ours" in results else []
        results[impl] = run_child(__file__, impl, sys.argv[1:] + extra)
    summary = {}
    for impl, res in results.items():
        cfg = preset_config(args.preset, res["layers"])
        from qwq_jax.rl.grpo import prompt_bucket

        # model input: make_batch pads prompts to their bucket (HF gets the same width)
        rows, width = args.prompts * args.group_size, prompt_bucket(args.prompt_len) + args.completion_len - 1
        model_flops = 3 * forward_flops(cfg, rows, width, logit_positions=args.completion_len)
        recompute = args.remat in RECOMPUTING
        hw_flops = model_flops + (forward_flops(cfg, rows, width, 0) if recompute else 0)
        peak = peak_flops(res["device"])
        rec = {"bench": "train_step", "impl": IMPL_NAMES[impl], "preset": args.preset, "layers": res["layers"],
               "rows": rows, "prompt_len": args.prompt_len, "completion_len": args.completion_len,
               "micro_batches": args.micro_batches, "remat": args.remat, "device": res["device"],
               "dtype": "float32" if args.tiny else "bfloat16"}
        if impl == "ours":
            rec.update({k: res[k] for k in ("attention", "attention_resolved", "attention_fallbacks", "loss",
                                            "check_vs_xla")})
            rec["compute_copy"] = args.compute_copy
        if "error" in res:
            rec["error"] = res["error"]
        else:
            t = res["time_s"]
            rec.update(step_s=t, tokens_per_s=rows * width / t, model_tflops=model_flops / t / 1e12,
                       mfu=model_flops / t / peak if peak else None,
                       hfu=(hw_flops / t / peak if peak else None) if recompute or args.remat == "none" else None,
                       peak_tflops=peak / 1e12 if peak else None)
        summary[IMPL_NAMES[impl]] = {k: rec.get(k) for k in ("step_s", "tokens_per_s", "mfu", "hfu")}
        emit(rec)
    if set(results) == set(IMPL_NAMES):
        r = ratio(summary["qwq-jax"]["tokens_per_s"], summary["hf-transformers-sdpa"]["tokens_per_s"])
        emit({"bench": "train_step", "ratio": "qwq-jax/hf", "preset": args.preset, "layers": results["ours"]["layers"],
              "tokens_per_s": r})
        summary["ratio_tokens_per_s"] = r
    emit({"bench": "train_step", "summary": True, "preset": args.preset, **summary})
    print(f"train_step benchmark done: {args.preset}", file=sys.stderr)


if __name__ == "__main__":
    main()
