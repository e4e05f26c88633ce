"""What would decode, prefill and a train step copy on an H100, and do they fit? Compile without one.

JAX compiles for an NVIDIA GPU with no GPU present ("deviceless" ahead-of-time compilation:
`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)` with the CUDA
PJRT plugin installed, `pip install "jax[cuda12]"` at this jax version, which needs no driver).
This script builds, on an abstract model of a preset (no weights exist), the programs of

    decode    the engine's decode call (`Engine.lower_decode`: up to `--chunk` steps of `batch`
              decode slots, `max_num_seqs=batch`), per layer loop, batch, context
    prefill   the engine's prefill call (`Engine.lower_prefill`: one prompt's chunk of
              `--prefill-chunk` tokens into its pages)
              both over a page pool sized for `batch` sequences of `context` tokens (batch x
              ceil(context / 16) pages of 16 tokens, `[L, K, P, 16, D]` keys and values; one
              `[K, P, 16, D]` array per layer with `--layer-loop split`)
    forward   benchmarks/prefill.py's pass (no cache), per layer loop, batch and `--seq`
    train     benchmarks/train_step.py's GRPO update (`GRPOTrainer.lower_update` on an abstract
              trainer), per `--layers`; two or more counts also fit peak = fixed + per layer x
              layers and say how many layers fit (what train_step.py's `--layers auto` does)

compiles them for the target described in `qwq_jax/gpu_targets/<name>.txtpb`, with the attention
backends chosen for that target (`qwq_jax.attention.compile_for`: "auto" is cuDNN for an H100),
and reports, per program, from XLA's own output:

    weight_copies   bytes written per decode step into weight-sized buffers (benchmarks/hlo_buffers.py):
                    a layer's weight slice copied out of the stacked arrays, a re-layout, a conversion
    cache_copies    the same for page-pool-sized buffers (the whole pool or one layer of it): a copy
                    of the pool per step would cost as much as reading it; in-place writes of the
                    new tokens (scatter / dynamic-update-slice) are counted apart
    memory          compiled memory analysis per device (argument, output, alias, temp; peak =
                    argument + output - alias + temp) and whether the peak fits the share of the
                    target's memory JAX may use (`--mem-fraction`, 0.95 as the benchmarks run)
    cudnn_attention_calls
                    cuDNN fused-attention kernels in the program (0 where attention fell back)
    max_fraction_of_roofline
                    decode only: (weight + cache bytes) / (those + 2 x copied bytes per step), the
                    ceiling the copies alone leave (each copy is written, then read again)

Nothing here is a timing: it says what the compiler planned, so it can run in CI and on a
laptop, and it tells which settings are worth a GPU's time. `--target cpu` compiles the same
programs for this machine's CPU (the smoke test, `--tiny`).

    python benchmarks/gpu_aot.py --preset qwq-32b --target h100 --batch 1 16 --context 4352
    python benchmarks/gpu_aot.py --preset qwen2.5-7b --phase train --layers 4 8 28
    python benchmarks/gpu_aot.py --tiny                # CPU target, tiny model: CI smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from _common import HelpFormatter, emit, preset_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwq_jax.generate import LAYER_LOOPS  # noqa: E402
from qwq_jax.plan import GPU_TARGETS_DIR  # noqa: E402  (the planner's GPU descriptions)
from qwq_jax.rl.grpo import COMPUTE_COPIES  # noqa: E402
PHASES = ("decode", "prefill", "forward", "train")


def target_names() -> list[str]:
    return sorted(p.stem for p in GPU_TARGETS_DIR.glob("*.txtpb")) + ["cpu"]


def target_config(target: str) -> str:
    path = GPU_TARGETS_DIR / f"{target}.txtpb"
    if not path.exists():
        raise SystemExit(f"unknown target {target!r} (known: {', '.join(target_names())})")
    return path.read_text()


def target_memory(target: str, fraction: float = 1.0) -> int | None:
    """Device memory of a GPU target in bytes, times `fraction` (None for the CPU)."""
    if target == "cpu":
        return None
    m = re.search(r"device_memory_size:\s*(\d+)", target_config(target))
    return int(int(m.group(1)) * fraction) if m else None


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


def one_device_mesh(device):
    import numpy as np
    from jax.sharding import Mesh

    from sharding.mesh import MESH_AXES

    return Mesh(np.array([device]).reshape((1,) * len(MESH_AXES)), MESH_AXES)


def placed_model(cfg, device, *, dtype: str, attention: str, quantize: str | None = None, remat: str = "none",
                 rules: str = "generate"):
    """An abstract model (no weights exist) whose leaves are placed on `device`, and its weight bytes."""
    import jax
    from flax import nnx

    from qwq_jax.model import abstract_model
    from sharding.rules import state_shardings

    graphdef, state = nnx.split(abstract_model(cfg, param_dtype=dtype, dtype=dtype, quant=quantize,
                                               attention_backend=attention, remat=remat))
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state,
                         state_shardings(state, one_device_mesh(device), rules))
    weight_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))
    return nnx.merge(graphdef, state), weight_bytes


def abstract_engine(cfg, device, *, dtype: str, quantize: str | None, layer_loop: str, attention: str,
                    chunk: int, prefill_chunk: int, batch: int = 1):
    """An Engine of `batch` decode slots over an abstract model placed on `device` (a one-device
    mesh): no weights exist."""
    from qwq_jax.generate import Engine

    model, weight_bytes = placed_model(cfg, device, dtype=dtype, attention=attention, quantize=quantize)
    engine = Engine(model, mesh=one_device_mesh(device), layer_loop=layer_loop, chunk=chunk,
                    prefill_chunk=prefill_chunk, max_num_seqs=batch)
    return engine, weight_bytes


def lower_forward(cfg, device, *, dtype: str, attention: str, batch: int, seq: int, layer_loop: str = "scan"):
    """`benchmarks/prefill.py`'s program (one forward over `batch` x `seq` tokens, logits at the
    last position, no cache; its `--layer-loop`) lowered for `device`, and the weight bytes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import SingleDeviceSharding

    from qwq_jax.model import split_layers

    model, weight_bytes = placed_model(cfg, device, dtype=dtype, attention=attention)
    graphdef, params = nnx.split(model)
    layers = None
    if layer_loop == "split":
        layers = split_layers(params["layers"])
        params["layers"] = layers[0]

    @jax.jit
    def forward(params, layers, tokens):
        model = nnx.merge(graphdef, params)
        x, _, _ = model.hidden_states(tokens, layers=layers)
        return model.logits(x[:, -1:])[:, 0]

    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=SingleDeviceSharding(device))
    return forward.lower(params, layers, tokens), weight_bytes


def lower_train(cfg, device, *, layers: int, dtype: str, attention: str, remat: str, rows: int, prompt_len: int,
                completion_len: int, micro_batches: int, compute_copy: str = "split"):
    """`benchmarks/train_step.py`'s program (GRPOTrainer's update: forward + backward over the
    micro-batches, AdamW on float32 masters, no reference model) for `layers` decoder layers, lowered
    for `device` (a compile-only one, or a real one: nothing runs); also the master weight bytes."""
    import jax

    from qwq_jax.rl.grpo import GRPOConfig, GRPOTrainer

    cfg = cfg.replace(num_layers=layers)
    model, _ = placed_model(cfg, device, dtype=dtype, attention=attention, remat=remat, rules="train")
    grpo = GRPOConfig(group_size=1, max_tokens=completion_len, micro_batches=micro_batches, kl_beta=0.0,
                      compute_copy=compute_copy)
    trainer = GRPOTrainer(model, grpo, reward_fn=lambda idx, comps: [0.0] * len(comps),
                          mesh=one_device_mesh(device))
    master_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.params))
    return trainer.lower_update(rows, prompt_len, completion_len), master_bytes, cfg


def train_kwargs(args) -> dict:
    return {k: getattr(args, k) for k in ("dtype", "attention", "remat", "rows", "prompt_len", "completion_len",
                                          "micro_batches", "compute_copy")}


def _largest(report: dict, n: int = 3) -> list[dict]:
    return [{k: b[k] for k in ("instruction", "opcode", "dtype", "shape", "times", "in_place")}
            for b in report["buffers"][:n]]


def memory_of(compiled) -> dict:
    """XLA's memory analysis per device; peak = argument + output - alias + temp."""
    stats = compiled.memory_analysis()
    memory = {"argument": int(stats.argument_size_in_bytes), "output": int(stats.output_size_in_bytes),
              "alias": int(stats.alias_size_in_bytes), "temp": int(stats.temp_size_in_bytes)}
    memory["peak"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    return memory


def cudnn_attention_calls(hlo: str) -> int:
    """cuDNN fused attention custom calls in an optimised HLO module (forward and backward kernels)."""
    return len(re.findall(r'custom_call_target="__cudnn\$fmha', hlo))


def _copies(found: dict, per: str) -> dict:
    """hlo_buffers' counts as bytes per outer-loop trip (`per`) and per call outside the loops."""
    if per == "call":
        return {"copied_bytes_per_call": found["copied_bytes_in_loops"] + found["copied_bytes_outside"]}
    return {f"copied_bytes_per_{per}": found["copied_bytes_in_loops"],
            "copied_bytes_per_call": found["copied_bytes_outside"]}


def pool_shape(cfg, batch: int, context: int) -> tuple[int, ...]:
    """The engine's page pool keys (and values) `[L, K, P, page, D]` for `batch` sequences of `context`
    tokens (`Engine.lower_*`'s pool: batch x ceil(context / page) pages)."""
    from qwq_jax.generate import PAGE_SIZE

    return (cfg.num_layers, cfg.num_kv_heads, batch * -(-context // PAGE_SIZE), PAGE_SIZE, cfg.head_dim)


def analyse(compiled, cfg, batch: int, context: int | None, per: str) -> dict:
    """Weight (and KV-cache) copies, cuDNN attention calls and the memory analysis of one compiled
    program; `per` names the unit of its outermost loop ("step": a decode step, "micro_batch": a
    train micro-batch) or "call" (no loop counted apart)."""
    from hlo_buffers import model_weight_shapes, weight_sized_buffers

    hlo = compiled.as_text()
    looped = per != "call"
    weights = weight_sized_buffers(hlo, model_weight_shapes(cfg), outer_loop_is_unit=looped)
    out = {"weight_copies": dict(_copies(weights, per), largest=_largest(weights))}
    if context is not None:
        shape = pool_shape(cfg, batch, context)  # stacked: one layer's [K, P, page, D] (split's arrays) counts too
        cache = weight_sized_buffers(hlo, {"keys": shape, "values": shape}, outer_loop_is_unit=looped)
        out["cache_copies"] = dict(_copies(cache, per), updated_in_place_bytes=cache["updated_in_place_bytes"],
                                   largest=_largest(cache))
    out["cudnn_attention_calls"] = cudnn_attention_calls(hlo)
    out["memory"] = memory_of(compiled)
    return out


def _base_row(args, device, phase: str) -> dict:
    return {"bench": "gpu_aot", "target": args.target, "device": getattr(device, "device_kind", str(device)),
            "preset": args.preset, "phase": phase, "quantize": args.quantize, "dtype": args.dtype,
            "attention": args.attention}


def _fits(args, row: dict) -> dict:
    capacity = target_memory(args.target, args.mem_fraction)
    row["capacity_bytes"] = capacity
    row["fits"] = None if capacity is None else row["memory"]["peak"] <= capacity
    return row


def run_one(args, cfg, device, phase: str, loop: str, batch: int, context: int) -> dict:
    """Engine programs: a decode call (`decode`) or a prefill chunk into the page pool (`prefill`)."""
    import math

    import jax.numpy as jnp

    from qwq_jax.paged_attention import PagePool

    row = dict(_base_row(args, device, phase), layer_loop=loop, batch=batch, context=context)
    t0 = time.perf_counter()
    try:
        engine, weight_bytes = abstract_engine(cfg, device, dtype=args.dtype, quantize=args.quantize,
                                               layer_loop=loop, attention=args.attention, chunk=args.chunk,
                                               prefill_chunk=args.prefill_chunk, batch=batch)
        if phase == "decode":
            lowered = engine.lower_decode(batch, context)
        else:
            lowered = engine.lower_prefill(batch, min(args.prefill_chunk, context), context)
        compiled = lowered.compile()
    except Exception as e:  # one setting failing to compile is reported; the rest still run
        return dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    row["compile_s"] = time.perf_counter() - t0
    row.update(analyse(compiled, cfg, batch, context, "step" if phase == "decode" else "call"))
    shape = pool_shape(cfg, batch, context)  # the pool's tokens: whole pages
    cache_bytes = math.prod(shape[2:4]) * PagePool.bytes_per_token(cfg, jnp.dtype(args.dtype))
    row.update(weight_bytes=weight_bytes, cache_bytes=cache_bytes)
    if phase == "decode":
        ideal = weight_bytes + cache_bytes
        copied = (row["weight_copies"]["copied_bytes_per_step"] + row["cache_copies"]["copied_bytes_per_step"]
                  + (row["weight_copies"]["copied_bytes_per_call"] + row["cache_copies"]["copied_bytes_per_call"])
                  / args.chunk)
        row["max_fraction_of_roofline"] = ideal / (ideal + 2 * copied)
    return _fits(args, row)


def run_forward(args, cfg, device, loop: str, batch: int, seq: int) -> dict:
    """benchmarks/prefill.py's program: one forward over batch x seq tokens."""
    row = dict(_base_row(args, device, "forward"), layer_loop=loop, batch=batch, seq=seq)
    t0 = time.perf_counter()
    try:
        lowered, weight_bytes = lower_forward(cfg, device, dtype=args.dtype, attention=args.attention,
                                              batch=batch, seq=seq, layer_loop=loop)
        compiled = lowered.compile()
    except Exception as e:
        return dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    row["compile_s"] = time.perf_counter() - t0
    row.update(analyse(compiled, cfg, batch, None, "call"), weight_bytes=weight_bytes)
    return _fits(args, row)


def run_train(args, cfg, device, layers: int) -> dict:
    """benchmarks/train_step.py's program: GRPOTrainer's update for `layers` decoder layers."""
    row = dict(_base_row(args, device, "train"), layers=layers, rows=args.rows, prompt_len=args.prompt_len,
               completion_len=args.completion_len, micro_batches=args.micro_batches, remat=args.remat,
               compute_copy=args.compute_copy)
    t0 = time.perf_counter()
    try:
        lowered, master_bytes, layer_cfg = lower_train(cfg, device, layers=layers, **train_kwargs(args))
        compiled = lowered.compile()
    except Exception as e:
        return dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    row["compile_s"] = time.perf_counter() - t0
    row.update(analyse(compiled, layer_cfg, args.rows // args.micro_batches, None, "micro_batch"),
               master_weight_bytes=master_bytes)
    return _fits(args, row)


def layers_that_fit(points: list[tuple[int, int]], capacity: int | None) -> dict | None:
    """From (layers, compiled peak bytes) at two or more layer counts: peak = fixed + per_layer x
    layers (least squares), and the most layers whose predicted peak fits `capacity`."""
    points = sorted(set(points))
    if len({n for n, _ in points}) < 2 or capacity is None:
        return None
    n = len(points)
    mx, my = sum(p[0] for p in points) / n, sum(p[1] for p in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    fixed = my - slope * mx
    return {"fixed_bytes": fixed, "bytes_per_layer": slope,
            "max_layers": int((capacity - fixed) // slope) if slope > 0 else None}


def compiled_layer_fit(cfg, device, capacity: int, counts: tuple[int, ...] = (2, 4), **train) -> dict:
    """Compile the train update (`lower_train(**train)`) at `counts` layers for `device` and fit
    `layers_that_fit` to the compiled peaks: how many of the preset's layers fit `capacity`."""
    points = []
    for n in sorted({min(c, cfg.num_layers) for c in counts}):
        points.append((n, memory_of(lower_train(cfg, device, layers=n, **train)[0].compile())["peak"]))
    if len(points) < 2:  # a one- or two-layer preset
        return {"max_layers": cfg.num_layers if points[-1][1] <= capacity else 0, "points": points}
    return dict(layers_that_fit(points, capacity), points=points)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="qwq-32b", help="model shape (qwq_jax.config presets)")
    p.add_argument("--target", default="h100", help=f"what to compile for: {', '.join(target_names())}")
    p.add_argument("--phase", nargs="+", choices=PHASES, default=["decode", "prefill"],
                   help="programs to compile: the engine's decode loop and prefill chunk, prefill.py's forward, "
                        "train_step.py's GRPO update")
    p.add_argument("--layer-loop", nargs="+", choices=LAYER_LOOPS, default=list(LAYER_LOOPS),
                   help="Engine(layer_loop=...) settings (decode, prefill; forward: prefill.py's --layer-loop)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16],
                   help="decode slots (decode: Engine(max_num_seqs=...); prefill: sequences the pool holds, one "
                        "prompt per call) and forward rows")
    p.add_argument("--context", type=int, nargs="+", default=[4352],
                   help="tokens per sequence (prompt + new tokens): the page pool holds batch x ceil(context / 16) "
                        "pages of 16 tokens")
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 8192, 32768], help="forward: tokens per row")
    p.add_argument("--dtype", default="bfloat16", help="weights, activations and KV cache (train: compute)")
    p.add_argument("--quantize", choices=("int8",), default=None, help="int8 weight-only matmul weights")
    p.add_argument("--attention", default="auto",
                   help="the model's attention backend, chosen for the target (auto: cuDNN on a GPU target for "
                        "self-attention, the decode path for one token, blockwise for prefill into the cache)")
    p.add_argument("--mem-fraction", type=float, default=float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.95)),
                   help="share of the device's memory JAX may use (XLA_PYTHON_CLIENT_MEM_FRACTION; the benchmarks "
                        "run with 0.95): what 'fits' compares the compiled peak with")
    p.add_argument("--chunk", type=int, default=16, help="decode steps per call (Engine chunk)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill call (one prompt)")
    t = p.add_argument_group("train (as benchmarks/train_step.py)")
    t.add_argument("--layers", type=int, nargs="+", help="decoder layers (default: the preset's); two or more "
                                                         "counts also give the most layers that fit")
    t.add_argument("--rows", type=int, default=16, help="completions per update (prompts x group size)")
    t.add_argument("--prompt-len", type=int, default=512, help="prompt width")
    t.add_argument("--completion-len", type=int, default=1536, help="tokens per completion")
    t.add_argument("--micro-batches", type=int, default=8, help="gradient accumulation steps")
    t.add_argument("--remat", default="full", help="remat policy")
    t.add_argument("--compute-copy", choices=COMPUTE_COPIES, default=COMPUTE_COPIES[0],
                   help="GRPOConfig.compute_copy: the fp32 masters cast to the compute dtype once per update, "
                        "one array per layer (split) or stacked (step), or in every micro-batch where used "
                        "(micro_batch)")
    p.add_argument("--tiny", action="store_true", help="tiny float32 model for the CPU target: a smoke test (CI)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.preset, args.target, args.dtype, args.batch, args.context = "tiny", "cpu", "float32", [1, 4], [128]
        args.seq, args.rows, args.prompt_len, args.completion_len, args.micro_batches = [64], 4, 8, 8, 2
    if args.target != "cpu":
        target_config(args.target)  # an unknown name fails before jax starts
    if args.rows % args.micro_batches:
        raise SystemExit(f"--rows {args.rows} must divide into --micro-batches {args.micro_batches}")
    import jax

    if args.target != "cpu":
        jax.config.update("jax_platforms", "cpu")  # compile for the target; run nothing on a GPU here
    from tqdm import tqdm

    from qwq_jax.attention import compile_for

    cfg = preset_config(args.preset)
    device = target_device(args.target)
    settings = [("engine", (ph, lp, b, c)) for ph in args.phase if ph in ("decode", "prefill")
                for lp in args.layer_loop for b in args.batch for c in args.context]
    settings += [("forward", (lp, b, n)) for lp in args.layer_loop for b in args.batch for n in args.seq] \
        if "forward" in args.phase else []
    settings += [("train", (n,)) for n in (args.layers or [cfg.num_layers])] if "train" in args.phase else []
    run = {"engine": run_one, "forward": run_forward, "train": run_train}
    rows = []
    with compile_for(device):  # backends chosen for the target, not for this host
        for kind, values in tqdm(settings, desc=f"compiling for {args.target}", file=sys.stderr):
            rows.append(run[kind](args, cfg, device, *values))
            emit(rows[-1])
    ok = [r for r in rows if "error" not in r]
    decode = [r for r in ok if r["phase"] == "decode"]
    best = max(decode, key=lambda r: r["max_fraction_of_roofline"], default=None)
    summary = {"bench": "gpu_aot", "summary": True, "target": args.target, "preset": args.preset,
               "compiled": len(ok), "failed": len(rows) - len(ok),
               "decode_weight_copies_per_step": {f"{r['layer_loop']}/b{r['batch']}/s{r['context']}":
                                                 r["weight_copies"]["copied_bytes_per_step"] for r in decode},
               "best_decode": best and {k: best[k] for k in ("layer_loop", "batch", "context",
                                                             "max_fraction_of_roofline")},
               "all_fit": all(r["fits"] is not False for r in ok)}
    train = [r for r in ok if r["phase"] == "train"]
    if train:
        summary["train_layers_that_fit"] = layers_that_fit([(r["layers"], r["memory"]["peak"]) for r in train],
                                                           target_memory(args.target, args.mem_fraction))
    emit(summary)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
