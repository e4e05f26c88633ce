"""Conversion benchmark: seconds, MB/s and peak RSS of `python -m convert hf` vs a load-everything peer.

Builds synthetic HF checkpoints (bf16) with the same per-layer size at two depths, converts each
in a fresh child process, and loads each with transformers `from_pretrained` (the peer, which
holds the whole model in host memory) in another child, followed by a host copy of every tensor (what a load-everything converter holds
before writing). Prints JSON lines; the last lines give
our/peer ratios. Memory is peak RSS above the child's idle RSS (after imports).

    python benchmarks/convert.py                 # 12 and 48 layers, ~1.1 GB at 48
    python benchmarks/convert.py --layers 4 8 --hidden 256   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file is named like the `convert` package: keep its own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child(kind: str, src: str, out: str) -> None:
    """Runs in a fresh process: import, note idle RSS, do the work, print one JSON object."""
    if kind == "ours":
        from convert.hf import HFSource, convert_source

        idle = _rss_kib("VmRSS")
        start = time.perf_counter()
        convert_source(HFSource(src), out, progress=False)
    else:
        import torch
        from transformers import Qwen2ForCausalLM

        idle = _rss_kib("VmRSS")
        start = time.perf_counter()
        model = Qwen2ForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        # What a load-everything converter does next: every tensor as a host array, then write.
        arrays = {k: v.detach().view(torch.int16).numpy().copy() for k, v in model.state_dict().items()}
        assert sum(a.size for a in arrays.values()) > 0
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "idle_kib": idle, "peak_kib": _rss_kib("VmHWM")}))


def measure(kind: str, src: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    r = subprocess.run([sys.executable, __file__, "--child", kind, str(src), str(out)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 48])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from tqdm import tqdm

    from convert.hf import HFSource
    from convert.names import param_shapes
    from convert.synthetic import write_random_hf_checkpoint
    from qwq_jax.config import QwenConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qwq-convert-bench-"))
    h = args.hidden
    results = []
    for layers in tqdm(args.layers, desc="depths", file=sys.stderr):
        cfg = QwenConfig(vocab_size=8192, hidden_size=h, intermediate_size=int(h * 2.75), num_layers=layers,
                         num_heads=h // 64, num_kv_heads=max(1, h // 256), head_dim=64, dtype="bfloat16")
        src = write_random_hf_checkpoint(cfg, work / f"src-{layers}", dtype="bfloat16", max_shard_bytes=500_000_000)
        source = HFSource(src)
        nbytes = sum(source.nbytes(n) for n in source.names())
        largest_stacked = max(math.prod(s) * 2 for s in param_shapes(cfg).values())
        largest_tensor = max(source.nbytes(n) for n in source.names())
        for kind in ("ours", "transformers"):
            out = work / f"out-{layers}-{kind}"
            shutil.rmtree(out, ignore_errors=True)
            m = measure(kind, src, out)
            above = (m["peak_kib"] - m["idle_kib"]) * 1024
            row = {"bench": "convert", "impl": "qwq-jax" if kind == "ours" else "transformers-from_pretrained",
                   "layers": layers, "source_bytes": nbytes, "seconds": round(m["seconds"], 3),
                   "mb_per_s": round(nbytes / 1e6 / m["seconds"], 1),
                   "peak_rss_above_idle_mb": round(above / 1e6, 1),
                   "largest_stacked_mb": round(largest_stacked / 1e6, 1),
                   "largest_tensor_mb": round(largest_tensor / 1e6, 1),
                   "bound_2x_stacked_plus_1gib_mb": round((2 * largest_stacked + 2**30) / 1e6, 1)}
            row["within_bound"] = above <= 2 * largest_stacked + 2**30
            results.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    for layers in args.layers:
        ours = next(r for r in results if r["layers"] == layers and r["impl"] == "qwq-jax")
        peer = next(r for r in results if r["layers"] == layers and r["impl"] != "qwq-jax")
        print(json.dumps({"bench": "convert", "ratio": "qwq-jax/transformers", "layers": layers,
                          "seconds": round(ours["seconds"] / peer["seconds"], 3),
                          "peak_rss_above_idle": round(ours["peak_rss_above_idle_mb"]
                                                       / max(peer["peak_rss_above_idle_mb"], 1e-9), 3)}))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"convert benchmark: {len(results)} runs, depths {args.layers}", file=sys.stderr)


if __name__ == "__main__":
    main()
