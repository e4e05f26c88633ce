"""Data-parallel rollouts: one engine per replica of the weights vs one engine on the whole mesh.

On a mesh with `data` x `fsdp` > 1 the `generate` rules replicate the weights over those axes. One
`Engine` on that mesh (what GRPO rollouts, `python -m qwq_jax.sample` and `python -m qwq_jax.serve`
ran before `qwq_jax.replicas`) replicates its page pool and slots as well: every replica computes
every row. `build_engine` gives a `ReplicatedEngine` there: each replica decodes its own share of
the rows on its own devices. Both run here in one process on the same weights (random, of a
preset's shape, EOS off so every row generates exactly `--max-tokens`), with the same workload, a
GRPO rollout of `--prompts` prompts x `--n` samples: first a warm-up call (compilation), then
`--iters` timed calls. The two must give the same tokens (`same_tokens`; they run the same
programs per row, with the same seeds).

Lines: one per engine (generated tokens/s, wall seconds per rollout, the KV page pool's bytes on
one device), and a ratio line replicas / whole-mesh.

    python benchmarks/replicas.py                                        # data=4,tensor=2 on 8 CPU devices (forced)
    python benchmarks/replicas.py --preset qwen2.5-7b --mesh data=2,tensor=4 --max-tokens 512   # 8 GPUs
    python benchmarks/replicas.py --tiny                                  # CI smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import HelpFormatter, emit, preset_config, ratio  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="qwen2.5-0.5b", help="model shape (qwq_jax.config presets)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (fewer than the preset's: faster)")
    p.add_argument("--mesh", default="data=4,tensor=2", help="the mesh (data x fsdp replicas)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4, help="samples per prompt (a GRPO group)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--iters", type=int, default=2, help="timed rollouts (medians reported)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--tiny", action="store_true", help="tiny preset, data=2,tensor=2: a CPU smoke run (CI)")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.layers, args.mesh, args.prompts, args.n, args.max_tokens, args.iters = \
            "tiny", None, "data=2,tensor=2", 4, 2, 8, 1
    try:
        devices = 1
        for part in args.mesh.split(","):
            devices *= int(part.split("=", 1)[1])
        assert devices > 0
    except (IndexError, ValueError, AssertionError):
        p.error(f"--mesh {args.mesh!r}: give every axis's size, e.g. data=2,tensor=4")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:  # a CPU host: as many devices as the mesh
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    import sharding as sh
    from qwq_jax import init_model
    from qwq_jax.generate import Engine
    from qwq_jax.replicas import ReplicatedEngine, build_engine
    from qwq_jax.sampling import SamplingParams

    cfg = preset_config(args.preset, args.layers)
    dtype = jnp.dtype(args.dtype)
    mesh = sh.make_mesh(args.mesh, jax.devices()[:devices])
    print(f"building {args.preset} ({cfg.num_layers} layers) on {args.mesh} ...", file=sys.stderr, flush=True)
    model = sh.shard_model(init_model(cfg, seed=0, param_dtype=dtype, dtype=dtype), mesh, "generate")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.prompts)]
    params = [SamplingParams(temperature=1.0, max_tokens=args.max_tokens, n=args.n, seed=1000 * i)
              for i in range(args.prompts)]
    rows = args.prompts * args.n
    page_size = 16
    pages = rows * -(-(args.prompt_len + args.max_tokens + 1) // page_size)
    common = dict(max_num_seqs=rows, num_pages=pages, page_size=page_size,
                  max_model_len=args.prompt_len + args.max_tokens + 1)
    engines = {"whole_mesh": lambda: Engine(model, mesh=mesh, **common),
               "replicas": lambda: build_engine(model, mesh=mesh, streaming=False, **common)}
    tokens, records = {}, {}
    for name, make in engines.items():
        engine = make()
        if name == "replicas" and not isinstance(engine, ReplicatedEngine):
            raise SystemExit(f"mesh {args.mesh} has one replica: nothing to compare")
        times = []
        for i in tqdm(range(1 + args.iters), desc=name, file=sys.stderr):
            t0 = time.perf_counter()
            outs = engine.generate(prompts, params)
            times.append(time.perf_counter() - t0)
        pool = engine.pool if isinstance(engine, Engine) else engine.replicas[engine.local[0]].pool
        pool_bytes = sum(s.data.nbytes for x in jax.tree.leaves(pool) for s in x.addressable_shards[:1])
        generated = sum(len(c.token_ids) for row in outs for c in row)
        wall = statistics.median(times[1:])
        tokens[name] = [c.token_ids for row in outs for c in row]
        records[name] = dict(bench="replicas", engine=name, preset=args.preset, layers=cfg.num_layers,
                             mesh=args.mesh, rows=rows, max_tokens=args.max_tokens, warmup_s=times[0],
                             rollout_s=wall, tokens_per_s=generated / wall, kv_pool_bytes_per_device=pool_bytes,
                             device=jax.devices()[0].device_kind)
        emit(records[name])
        del engine
    same = tokens["whole_mesh"] == tokens["replicas"]
    emit(dict(bench="replicas", ratio="replicas/whole_mesh", mesh=args.mesh, same_tokens=same,
              tokens_per_s=ratio(records["replicas"]["tokens_per_s"], records["whole_mesh"]["tokens_per_s"]),
              kv_pool_bytes_per_device=ratio(records["replicas"]["kv_pool_bytes_per_device"],
                                             records["whole_mesh"]["kv_pool_bytes_per_device"])))
    print(f"replicas: {records['replicas']['tokens_per_s']:.1f} tok/s vs one engine on the whole mesh "
          f"{records['whole_mesh']['tokens_per_s']:.1f} tok/s; same tokens: {same}", file=sys.stderr)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
