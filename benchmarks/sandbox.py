"""Per-program cost of the code-reward sandbox (`qwq_jax/rl/sandbox.py`): wall time of one
`run_python` call of a trivial program, in the strongest isolation mode this machine offers and,
as the peer, in the "none" mode (no namespaces, no view).

A GRPO step with code rewards runs thousands of such programs (rollouts x test cases); the
difference between the two lines is what the isolation costs per program. Output: one JSON line
per mode (`isolation`, `runs`, `mean_ms`, `p50_ms`, `p90_ms`, `min_ms`), then the added cost
(`added_ms_p50`: strongest minus none, medians). Runs are sequential (one core busy) and the two
modes alternate, so that load from elsewhere slows both alike.

    python benchmarks/sandbox.py                  # 50 runs of print(1) per mode
    python benchmarks/sandbox.py --tiny           # 3 runs (CI smoke run)
    python benchmarks/sandbox.py --runs 200 --code "import json, re, math"
    python benchmarks/sandbox.py --packages numpy --code "import numpy"
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import HelpFormatter, emit

from qwq_jax.rl import sandbox


def summary(times: list[float], isolation: str) -> dict:
    times = sorted(times)
    return {"isolation": isolation, "runs": len(times), "mean_ms": statistics.fmean(times),
            "p50_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))], "min_ms": times[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--runs", type=int, default=50, help="timed runs per mode")
    p.add_argument("--code", default="print(1)", help="the program")
    p.add_argument("--packages", nargs="*", default=[], help="allow-listed packages (run_python(packages=...))")
    p.add_argument("--tiny", action="store_true", help="3 runs per mode (CI smoke run)")
    args = p.parse_args()
    if args.tiny:
        args.runs = 3
    extra = {"packages": args.packages}
    modes = {"strongest": {}, "none": {"use_namespaces": False}}
    isolation, times = {}, {name: [] for name in modes}
    for name, kwargs in list(modes.items()):  # probes the mode (once per process): not timed
        first = sandbox.run_python(args.code, **kwargs, **extra)
        if not first.ok:  # e.g. a package the "none" mode's nobody cannot read
            emit({"mode": name, "code": args.code, "isolation": first.isolation,
                  "error": (first.stderr.strip().splitlines() or [str(first.returncode)])[-1]})
            del modes[name]
        isolation[name] = first.isolation
    for _ in range(args.runs):  # interleaved: a busy machine slows both alike
        for name, kwargs in modes.items():
            start = time.perf_counter()
            r = sandbox.run_python(args.code, **kwargs, **extra)
            times[name].append((time.perf_counter() - start) * 1e3)
            assert r.ok, r
    rows = {name: summary(times[name], isolation[name]) for name in modes}
    for name, row in rows.items():
        emit({"mode": name, "code": args.code, **row})
    if len(rows) == 2:
        strong, peer = rows["strongest"], rows["none"]
        emit({"summary": True, "isolation": strong["isolation"], "added_ms_p50": strong["p50_ms"] - peer["p50_ms"],
              "added_ms_mean": strong["mean_ms"] - peer["mean_ms"]})


if __name__ == "__main__":
    main()
