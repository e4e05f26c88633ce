"""Start-up of `python -m qwq_jax.sample`: time to the reply's first byte and to the end of the run,
each run a fresh process, against another revision of this repository in the same run.

Two compilation-cache states: `warm` (every run reads the programs an untimed run of the same
revision stored in its own cache directory) and `cold` (an empty cache directory for every run:
everything compiles). Runs alternate between the revisions so that a slow spell of a shared machine
falls on both. Greedy (`--temperature 0`), so every run of a revision writes the same tokens.

    python benchmarks/startup.py --peer-rev HEAD~1                 # the demo model, 5 runs per cell
    python benchmarks/startup.py --tiny                            # ours, 1 warm run of 2 tokens (smoke)
    python benchmarks/startup.py --checkpoint /ckpt/qwen2.5-7b --peer-rev v0.1 --cache cold

Output: one JSON line per (implementation, cache) with `first_byte_s` and `whole_s` (medians) and
their min and max over the runs, a line of ratios ours/peer per cache state, then a summary line;
each run's figures on stderr as it ends. The peer's tree is checked out with `git worktree` into
--peer-dir; both read the same checkpoint (the demo's, converted once into qwq-jax's cache, unless
--checkpoint is given).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, emit, peer_tree, ratio

PROMPT = "Write a haiku about JAX."


def one_run(tree: Path, checkpoint: Path, xla_cache: Path, max_tokens: int) -> dict:
    """One `python -m qwq_jax.sample` process of `tree`: seconds to its first byte on stdout and to its end."""
    cmd = [sys.executable, "-m", "qwq_jax.sample", "--checkpoint", str(checkpoint), "--prompt", PROMPT,
           "--temperature", "0", "--max-tokens", str(max_tokens), "--xla-cache", str(xla_cache)]
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(1)
    first_byte = time.perf_counter() - t0
    out, err = proc.communicate()
    whole = time.perf_counter() - t0
    if proc.returncode != 0 or not first:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"{tree}: python -m qwq_jax.sample failed (exit code {proc.returncode}): {tail[0]}")
    return {"first_byte_s": first_byte, "whole_s": whole, "reply": (first + out).decode(errors="replace")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default: the demo model's)")
    p.add_argument("--cache", nargs="+", choices=("warm", "cold"), default=["warm", "cold"],
                   help="compilation-cache states to measure")
    p.add_argument("--runs", type=int, default=5, help="timed runs per (implementation, cache state)")
    p.add_argument("--max-tokens", type=int, default=32, help="reply length cap (greedy)")
    p.add_argument("--peer-rev", help="a revision of this repository to compare with; none: ours only")
    p.add_argument("--peer-dir", type=Path, default=Path("/tmp/qwq-jax-peer"),
                   help="where --peer-rev is checked out (git worktree)")
    p.add_argument("--tiny", action="store_true", help="smoke run: one warm run of 2 tokens, ours only")
    args = p.parse_args()
    if args.tiny:
        args.runs, args.cache, args.max_tokens, args.peer_rev = 1, ["warm"], 2, None
    if args.runs < 1 or args.max_tokens < 1:
        p.error("--runs and --max-tokens must be at least 1")
    if args.checkpoint is None:
        from qwq_jax.sample import demo_checkpoint

        args.checkpoint = demo_checkpoint()
    if not (args.checkpoint / "config.json").is_file():
        p.error(f"--checkpoint {args.checkpoint}: not a checkpoint directory (no config.json)")
    trees = {"ours": ROOT}
    if args.peer_rev:
        trees[f"peer@{args.peer_rev}"] = peer_tree(args.peer_rev, args.peer_dir)
    scratch = Path(tempfile.mkdtemp(prefix="qwq-startup-"))
    try:
        results = {}
        for cache in args.cache:
            warm = {name: scratch / f"{name}-warm" for name in trees}
            if cache == "warm":  # each revision's programs stored once, untimed
                for name, tree in trees.items():
                    print(f"[{name} warm] storing the programs (untimed run) ...", file=sys.stderr, flush=True)
                    one_run(tree, args.checkpoint, warm[name], args.max_tokens)
            for i in range(args.runs):
                for name, tree in trees.items():
                    where = warm[name] if cache == "warm" else scratch / f"{name}-cold-{i}"
                    r = one_run(tree, args.checkpoint, where, args.max_tokens)
                    if cache == "cold":
                        shutil.rmtree(where, ignore_errors=True)
                    results.setdefault((name, cache), []).append(r)
                    print(f"[{name} {cache} {i + 1}/{args.runs}] first byte {r['first_byte_s']:.2f} s, "
                          f"whole {r['whole_s']:.2f} s", file=sys.stderr, flush=True)
        rows = {}
        for (name, cache), runs in results.items():
            row = {"impl": name, "cache": cache, "runs": len(runs), "checkpoint": str(args.checkpoint),
                   "max_tokens": args.max_tokens, "same_reply_every_run": len({r["reply"] for r in runs}) == 1}
            for key in ("first_byte_s", "whole_s"):
                values = [r[key] for r in runs]
                row.update({key: statistics.median(values), key.replace("_s", "_min_s"): min(values),
                            key.replace("_s", "_max_s"): max(values)})
            rows[(name, cache)] = row
            emit(row)
        if args.peer_rev:
            peer = f"peer@{args.peer_rev}"
            for cache in args.cache:
                ours, theirs = rows[("ours", cache)], rows[(peer, cache)]
                emit({"ratio": "ours/peer", "cache": cache,
                      "first_byte_s": ratio(ours["first_byte_s"], theirs["first_byte_s"]),
                      "whole_s": ratio(ours["whole_s"], theirs["whole_s"])})
        emit({"summary": True, **{f"{cache}_first_byte_s": rows[("ours", cache)]["first_byte_s"]
                                  for cache in args.cache}})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
