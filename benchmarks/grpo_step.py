"""One whole GRPO step (rollout -> score -> update) and its time split, against an earlier trainer.

Runs `GRPOTrainer.rollout`, `make_batch` and `update` as `python -m qwq_jax.train` does, on the tiny
preset (random weights, `--tiny`) or on the demo model (`--demo`, its chat template around short
arithmetic questions, so completion lengths vary as a model's do), and reports per step (median of
`--iters` after `--warmup`): rollout seconds and generated tokens/s, the update's seconds (the
old/reference log-prob pass included; split into `logprob_s` and `update_s` where the trainer
reports them), the step's seconds, and the engine's prefill tokens computed against the prompt tokens
its groups hold (where the engine counts them).

The peer is the same script's child run on another revision of this repository (`--peer-rev`,
default the trainer before the continuous-batching engine: batch-at-a-time rollouts in which every
row prefills its own prompt and the batch decodes until its longest row ends), checked out once
into `--peer-dir` with `git worktree`. Both children build the same model (the tiny preset from
the same seed; the demo converted by each revision's own converter, as their checkpoint layouts
differ) and run the same prompts, seeds and settings. A `ratio` line gives ours / peer.

    python benchmarks/grpo_step.py --tiny                     # CPU smoke run (CI: ours only)
    python benchmarks/grpo_step.py --tiny --peer-rev 4093288^
    python benchmarks/grpo_step.py --demo --peer-rev 4093288^  # the demo model (minutes on a CPU)
    # LoRA on a data-parallel mesh: rollouts on one engine per data index vs one on the whole mesh
    python benchmarks/grpo_step.py --preset qwen2.5-0.5b --layers 2 --devices 8 --mesh data=4,tensor=2 \
        --lora-rank 8 --peer-rev 05e5796
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PEER_REV = "4093288^"  # the trainer before the continuous-batching engine (issue 17)


def _prompts(tokenizer, n: int, step: int, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(1000 + step)
    if tokenizer is None:  # tiny: random token prompts of 8..24 tokens
        return [rng.integers(0, vocab, int(rng.integers(8, 25))).tolist() for _ in range(n)]
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(10, 100, 2))
        messages = [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}]
        out.append(tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True)))
    return out


def _reward(prompt_indices, completions):
    """Any numbers will do for timing; these vary within a group (the fraction of even token ids)."""
    return [sum(t % 2 == 0 for t in c.token_ids) / max(len(c.token_ids), 1) for c in completions]


def child(args: argparse.Namespace) -> dict:
    """One trainer's steps (this process imports qwq_jax from `args.root`)."""
    sys.path.insert(0, str(args.root))
    import jax
    import jax.numpy as jnp

    from qwq_jax import QwenConfig, init_model
    from qwq_jax.rl.grpo import GRPOConfig, GRPOTrainer

    t0 = time.perf_counter()
    if args.demo:
        import qwq_jax
        from qwq_jax import checkpoint
        from qwq_jax.sample import demo_checkpoint

        ckpt = demo_checkpoint(args.cache_dir)
        model = qwq_jax.load(ckpt, dtype="float32", remat="full")
        tokenizer = checkpoint.load_tokenizer(ckpt)
    else:
        shape = QwenConfig.preset(args.preset).replace(eos_token_id=None, bos_token_id=None)  # fixed lengths
        shape = shape.replace(num_layers=args.layers) if args.layers else shape
        model = init_model(shape, seed=0, param_dtype=jnp.float32, dtype=jnp.float32)
        tokenizer = None
    mesh = None
    if args.mesh:  # as `python -m qwq_jax.train` places a model: the `train` rules
        import sharding

        mesh = sharding.make_mesh(args.mesh)
        model = sharding.shard_model(model, mesh, "train")
    if args.lora_rank:
        from qwq_jax.lora import LoraConfig, attach

        model = attach(model, LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank), seed=0, mesh=mesh,
                       rules="train")
    vocab = model.config.vocab_size
    cfg = GRPOConfig(group_size=args.group_size, max_tokens=args.max_tokens, temperature=1.0, kl_beta=0.0,
                     learning_rate=1e-6, micro_batches=args.micro_batches, seed=0,
                     rollout_weights=args.rollout_weights)
    trainer = GRPOTrainer(model, cfg, _reward, tokenizer=tokenizer, mesh=mesh)
    del model
    load_s = time.perf_counter() - t0
    rows = []
    for step in range(args.warmup + args.iters):
        prompts = _prompts(tokenizer, args.prompts, step, vocab)
        stats0 = trainer.engine.stats() if hasattr(trainer.engine, "stats") else None
        t0 = time.perf_counter()
        completions, rewards = trainer.rollout(prompts)
        t1 = time.perf_counter()
        batch, _ = trainer.make_batch(prompts, completions, rewards["reward"])
        metrics = trainer.update(batch)
        jax.block_until_ready(trainer.params)
        t2 = time.perf_counter()
        tokens = sum(len(c.token_ids) for c in completions)
        row = {"rollout_s": t1 - t0, "update_s_total": t2 - t1, "step_s": t2 - t0, "generated_tokens": tokens,
               "rollout_tokens_per_s": tokens / (t1 - t0), "prompt_tokens": sum(map(len, prompts)),
               "max_completion": max(len(c.token_ids) for c in completions),
               "mean_completion": tokens / len(completions)}
        for key in ("generate_s", "reward_s", "logprob_s", "update_s"):
            if key in getattr(trainer, "_times", {}):
                row[key] = trainer._times[key]
        if stats0 is not None:
            row["prefill_tokens_computed"] = trainer.engine.stats()["prefill_tokens_computed"] - \
                stats0["prefill_tokens_computed"]
        rows.append(row)
        print(f"  step {step} ({'warm-up' if step < args.warmup else 'timed'}): rollout {row['rollout_s']:.2f} s, "
              f"update {row['update_s_total']:.2f} s, {tokens} tokens", file=sys.stderr, flush=True)
        del metrics
    timed = rows[args.warmup:]
    out = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
    out.update(load_s=load_s, steps_timed=len(timed), device=jax.devices()[0].device_kind)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true", help="random weights of --preset's shape (default)")
    which.add_argument("--demo", action="store_true", help="the demo model (converted once into --cache-dir)")
    p.add_argument("--preset", default="tiny", help="--tiny: the model shape (qwq_jax.config presets)")
    p.add_argument("--layers", type=int, help="--tiny: fewer decoder layers than the preset's")
    p.add_argument("--prompts", type=int, help="prompts per step (tiny 8, demo 2)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, help="completion budget (tiny 32, demo 48)")
    p.add_argument("--micro-batches", type=int, default=1)
    p.add_argument("--mesh", help="a device mesh, e.g. data=4,tensor=2 (default: none, one device)")
    p.add_argument("--devices", type=int, help="CPU only: this many host devices (XLA's forced device count)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank on every projection")
    p.add_argument("--rollout-weights", choices=("split", "master"), default="split",
                   help="full fine-tuning: the engine's bf16 split copy or the fp32 masters in place")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (compilation)")
    p.add_argument("--iters", type=int, default=2, help="timed steps (medians reported)")
    p.add_argument("--peer-rev", help=f"a revision to compare with (e.g. {DEFAULT_PEER_REV}: the trainer before "
                                      "the continuous-batching engine); none: ours only")
    p.add_argument("--peer-dir", type=Path, default=Path("/tmp/qwq-jax-peer"),
                   help="where --peer-rev is checked out (git worktree)")
    p.add_argument("--cache-dir", help="the demo checkpoint's directory for ours (default: qwq-jax's cache); "
                                       "the peer converts its own under --peer-dir")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.prompts = args.prompts or (2 if args.demo else 8)
    args.max_tokens = args.max_tokens or (48 if args.demo else 32)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    impls = {"ours": (ROOT, args.cache_dir)}
    if args.peer_rev:
        from _common import peer_tree  # the parent only: _common puts this tree first on sys.path

        tree = peer_tree(args.peer_rev, args.peer_dir)
        impls[f"peer@{args.peer_rev}"] = (tree, str(tree / ".demo-cache"))
    results = {}
    for name, (root, cache) in impls.items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        argv = [a for a in sys.argv[1:]]
        argv += ["--child", name, "--root", str(root)] + (["--cache-dir", cache] if cache else [])
        env = dict(os.environ, PYTHONPATH=str(root))
        if args.devices:
            env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
        r = subprocess.run([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, env=env, cwd=root)
        if r.returncode != 0 or not r.stdout.strip():
            raise SystemExit(f"{name} failed (exit code {r.returncode})")
        results[name] = json.loads(r.stdout.strip().splitlines()[-1])
        row = {"impl": name, "model": "demo" if args.demo else args.preset + (f", {args.layers} layers" if args.layers else ""), "prompts": args.prompts,
               "group_size": args.group_size, "max_tokens": args.max_tokens, "mesh": args.mesh,
               "lora_rank": args.lora_rank, "rollout_weights": args.rollout_weights, **results[name]}
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if len(results) == 2:
        ours, peer = results["ours"], results[f"peer@{args.peer_rev}"]
        print(json.dumps({"ratio": "ours/peer",
                          "rollout_tokens_per_s": round(ours["rollout_tokens_per_s"] / peer["rollout_tokens_per_s"], 3),
                          "step_s": round(ours["step_s"] / peer["step_s"], 3),
                          "update_s_total": round(ours["update_s_total"] / peer["update_s_total"], 3)}), flush=True)
    ours = results["ours"]
    print(json.dumps({"summary": True, "rollout_tokens_per_s": round(ours["rollout_tokens_per_s"], 1),
                      "step_s": round(ours["step_s"], 3)}), flush=True)


if __name__ == "__main__":
    main()
