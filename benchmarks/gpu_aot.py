"""What would a decode step copy on an H100, and does it fit? Compile for the GPU without one.

JAX compiles for an NVIDIA GPU with no GPU present ("deviceless" ahead-of-time compilation:
`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)` with the CUDA
PJRT plugin installed, `pip install "jax[cuda12]"` at this jax version, which needs no driver).
This script builds the engine on an abstract model of a preset (no weights exist), lowers its
decode loop (`Engine.lower_decode`) and prefill (`Engine.lower_prefill`) for each layer loop,
batch and context, compiles them for the target described in `sharding/gpu_targets/<name>.txtpb`
and reports, per program, from XLA's own output:

    weight_copies   bytes written per decode step into weight-sized buffers (benchmarks/hlo_buffers.py):
                    a layer's weight slice copied out of the stacked arrays, a re-layout, a conversion
    cache_copies    the same for KV-cache-sized buffers (a whole cache or one layer of it); in-place
                    writes of the new token (scatter / dynamic-update-slice) are counted apart
    memory          compiled memory analysis per device (argument, output, alias, temp; peak =
                    argument + output - alias + temp) and whether the peak fits the target's memory
    max_fraction_of_roofline
                    decode only: (weight + cache bytes) / (those + 2 x copied bytes per step), the
                    ceiling the copies alone leave (each copy is written, then read again)

Nothing here is a timing: it says what the compiler planned, so it can run in CI and on a
laptop, and it tells which settings are worth a GPU's time. `--target cpu` compiles the same
programs for this machine's CPU (the smoke test, `--tiny`).

    python benchmarks/gpu_aot.py --preset qwq-32b --target h100 --batch 1 16 --context 4352
    python benchmarks/gpu_aot.py --tiny                # CPU target, tiny model: CI smoke run
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from _common import HelpFormatter, emit, preset_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharding.plan import GPU_TARGETS_DIR  # noqa: E402  (the planner's GPU descriptions)

LAYER_LOOPS = ("scan", "unrolled", "split")
PHASES = ("decode", "prefill")


def target_names() -> list[str]:
    return sorted(p.stem for p in GPU_TARGETS_DIR.glob("*.txtpb")) + ["cpu"]


def target_config(target: str) -> str:
    path = GPU_TARGETS_DIR / f"{target}.txtpb"
    if not path.exists():
        raise SystemExit(f"unknown target {target!r} (known: {', '.join(target_names())})")
    return path.read_text()


def target_memory(target: str) -> int | None:
    """Device memory of a GPU target in bytes (None for the CPU)."""
    if target == "cpu":
        return None
    m = re.search(r"device_memory_size:\s*(\d+)", target_config(target))
    return int(m.group(1)) if m else None


def target_device(target: str):
    """One compile-only device of the target (or this machine's first CPU device)."""
    import jax

    if target == "cpu":
        return jax.devices("cpu")[0]
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=target_config(target), topology="1x1x1")
    except Exception as e:  # no CUDA plugin, or one too old for deviceless compilation
        raise SystemExit(f"compiling for {target} without a GPU needs JAX's CUDA plugin (pip install "
                         f"'jax[cuda12]=={jax.__version__}'; no GPU or driver is needed): {type(e).__name__}: "
                         f"{str(e)[:300]}") from None
    return topo.devices[0]


def abstract_engine(cfg, device, *, dtype: str, quantize: str | None, layer_loop: str, attention: str,
                    chunk: int, prefill_chunk: int):
    """An Engine over an abstract model placed on `device` (a one-device mesh): no weights exist."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh

    from qwq_jax.generate import Engine
    from qwq_jax.model import abstract_model
    from sharding.mesh import MESH_AXES
    from sharding.rules import state_shardings

    mesh = Mesh(np.array([device]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
    graphdef, state = nnx.split(abstract_model(cfg, param_dtype=dtype, dtype=dtype, quant=quantize,
                                               attention_backend=attention))
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state,
                         state_shardings(state, mesh, "generate"))
    weight_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    engine = Engine(nnx.merge(graphdef, state), mesh=mesh, layer_loop=layer_loop, chunk=chunk,
                    prefill_chunk=prefill_chunk)
    return engine, weight_bytes


def _largest(report: dict, n: int = 3) -> list[dict]:
    return [{k: b[k] for k in ("instruction", "opcode", "dtype", "shape", "times", "in_place")}
            for b in report["buffers"][:n]]


def analyse(compiled, cfg, batch: int, context: int, decode: bool) -> dict:
    """Weight and cache copies and the memory analysis of one compiled program."""
    from hlo_buffers import model_weight_shapes, weight_sized_buffers

    from qwq_jax.cache import KVCache

    hlo = compiled.as_text()
    weights = weight_sized_buffers(hlo, model_weight_shapes(cfg), outer_loop_is_unit=decode)
    k_shape, v_shape = KVCache.shapes(cfg, batch, context)
    cache = weight_sized_buffers(hlo, {"keys": k_shape, "values": v_shape}, outer_loop_is_unit=decode)
    stats = compiled.memory_analysis()
    memory = {"argument": int(stats.argument_size_in_bytes), "output": int(stats.output_size_in_bytes),
              "alias": int(stats.alias_size_in_bytes), "temp": int(stats.temp_size_in_bytes)}
    memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    per = "step" if decode else "call"
    return {"weight_copies": {f"copied_bytes_per_{per}": weights["copied_bytes_in_loops"] if decode else
                              weights["copied_bytes_in_loops"] + weights["copied_bytes_outside"],
                              **({"copied_bytes_per_call": weights["copied_bytes_outside"]} if decode else {}),
                              "largest": _largest(weights)},
            "cache_copies": {f"copied_bytes_per_{per}": cache["copied_bytes_in_loops"] if decode else
                             cache["copied_bytes_in_loops"] + cache["copied_bytes_outside"],
                             **({"copied_bytes_per_call": cache["copied_bytes_outside"]} if decode else {}),
                             "updated_in_place_bytes": cache["updated_in_place_bytes"], "largest": _largest(cache)},
            "memory": memory}


def run_one(args, cfg, device, phase: str, loop: str, batch: int, context: int) -> dict:
    import jax.numpy as jnp

    from qwq_jax.cache import KVCache

    row = {"bench": "gpu_aot", "target": args.target, "device": getattr(device, "device_kind", str(device)),
           "preset": args.preset, "phase": phase, "layer_loop": loop, "quantize": args.quantize,
           "dtype": args.dtype, "attention": args.attention, "batch": batch, "context": context}
    t0 = time.perf_counter()
    try:
        engine, weight_bytes = abstract_engine(cfg, device, dtype=args.dtype, quantize=args.quantize,
                                               layer_loop=loop, attention=args.attention, chunk=args.chunk,
                                               prefill_chunk=args.prefill_chunk)
        if phase == "decode":
            lowered = engine.lower_decode(batch, context, max_new=min(context, 128))
        else:
            lowered = engine.lower_prefill(batch, min(args.prefill_chunk, context), context)
        compiled = lowered.compile()
    except Exception as e:  # one setting failing to compile is reported; the rest still run
        return dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    row["compile_s"] = time.perf_counter() - t0
    row.update(analyse(compiled, cfg, batch, context, phase == "decode"))
    cache_bytes = batch * context * KVCache.bytes_per_token(cfg, jnp.dtype(args.dtype))
    row.update(weight_bytes=weight_bytes, cache_bytes=cache_bytes)
    if phase == "decode":
        ideal = weight_bytes + cache_bytes
        copied = (row["weight_copies"]["copied_bytes_per_step"] + row["cache_copies"]["copied_bytes_per_step"]
                  + (row["weight_copies"]["copied_bytes_per_call"] + row["cache_copies"]["copied_bytes_per_call"])
                  / args.chunk)
        row["max_fraction_of_roofline"] = ideal / (ideal + 2 * copied)
    capacity = target_memory(args.target)
    row["capacity_bytes"] = capacity
    row["fits"] = None if capacity is None else row["memory"]["peak"] <= capacity
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="qwq-32b", help="model shape (qwq_jax.config presets)")
    p.add_argument("--target", default="h100", help=f"what to compile for: {', '.join(target_names())}")
    p.add_argument("--phase", nargs="+", choices=PHASES, default=list(PHASES), help="programs to compile")
    p.add_argument("--layer-loop", nargs="+", choices=LAYER_LOOPS, default=list(LAYER_LOOPS),
                   help="Engine(layer_loop=...) settings")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="rows")
    p.add_argument("--context", type=int, nargs="+", default=[4352],
                   help="KV cache slots (prompt + new tokens; the engine rounds up to 1024s past 1024)")
    p.add_argument("--dtype", default="bfloat16", help="weights, activations and KV cache")
    p.add_argument("--quantize", choices=("int8",), default=None, help="int8 weight-only matmul weights")
    p.add_argument("--attention", default="xla", help="the model's attention backend (decoding takes the "
                                                       "decode path with any backend but xla)")
    p.add_argument("--chunk", type=int, default=16, help="decode steps per call (Engine chunk)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill call")
    p.add_argument("--tiny", action="store_true", help="tiny float32 model for the CPU target: a smoke test (CI)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.preset, args.target, args.dtype, args.batch, args.context = "tiny", "cpu", "float32", [1, 4], [128]
    if args.target != "cpu":
        target_config(args.target)  # an unknown name fails before jax starts
    import jax

    if args.target != "cpu":
        jax.config.update("jax_platforms", "cpu")  # compile for the target; run nothing on a GPU here
    from tqdm import tqdm

    cfg = preset_config(args.preset)
    device = target_device(args.target)
    settings = [(ph, lp, b, c) for ph in args.phase for lp in args.layer_loop for b in args.batch
                for c in args.context]
    rows = []
    for phase, loop, batch, context in tqdm(settings, desc=f"compiling for {args.target}", file=sys.stderr):
        rows.append(run_one(args, cfg, device, phase, loop, batch, context))
        emit(rows[-1])
    ok = [r for r in rows if "error" not in r]
    decode = [r for r in ok if r["phase"] == "decode"]
    best = max(decode, key=lambda r: r["max_fraction_of_roofline"], default=None)
    emit({"bench": "gpu_aot", "summary": True, "target": args.target, "preset": args.preset,
          "compiled": len(ok), "failed": len(rows) - len(ok),
          "decode_weight_copies_per_step": {f"{r['layer_loop']}/b{r['batch']}/s{r['context']}":
                                            r["weight_copies"]["copied_bytes_per_step"] for r in decode},
          "best_decode": best and {k: best[k] for k in ("layer_loop", "batch", "context", "max_fraction_of_roofline")},
          "all_fit": all(r["fits"] is not False for r in ok)})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
