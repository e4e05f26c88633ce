"""Conversion benchmark: seconds, MB/s and peak RSS of `python -m convert`, against a plain copy.

Builds synthetic bf16 HF checkpoints (12, 48 and 96 layers at hidden 1024, and one at a real Qwen2.5
1.5B shape: hidden 1536, MLP 8960, 28 layers, vocab 151936), and for each, in fresh child processes:

  hf         `convert hf SRC OUT --dtype bfloat16` (convert_source, what the CLI runs)
  restore    `qwq_jax.load(OUT, mesh=fsdp=8)` onto 8 (fake CPU) devices, each holding an eighth
  export-hf  `convert export-hf OUT HF` (safetensors shards written a layer group at a time, fsync'd)

The peer, measured in the same run on the same disk, is a plain copy of the same files (read, write,
fsync); for the restore, a plain read of the checkpoint's files. Memory is the child's peak RSS (the
kernel's high-water mark, VmHWM: exact, no sampling) above its idle RSS after the same imports and the
JAX backend's start (the clock starts there too: Orbax's import, 0.3 s, is not conversion work); the bound is the issue's: 1 GiB + 2x the largest single tensor of the source for a
conversion; for a restore, what the devices hold plus one layer or the largest other tensor, whichever
is larger (an array is stored as one chunk: a process reads a tensor whole, then hands each device its
part), plus 128 MiB of the runtime's own. `time_s` says
where a conversion's time goes (read: source reads and layout changes; write: waiting for Orbax beyond
the overlapped reads; finalize: Orbax's merge and the rename). `--gguf FILE` adds `convert gguf FILE OUT`
(dequantized to float32; also against a plain copy of as many bytes as it writes, `out_gb`). JSON lines.

    python benchmarks/convert.py                                  # the README's table (~6 GB of files)
    python benchmarks/convert.py --layers 4 8 --hidden 256 --no-real   # quick smoke run
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
    """Runs in a fresh process: import (Orbax included), start the backend, note idle RSS, convert,
    print one JSON object. The clock, like the memory, starts after the imports: a plain copy has none."""
    import jax
    import orbax.checkpoint.experimental.v1  # noqa: F401  (imported by the conversion itself, 0.3 s: not its work)

    from convert.hf import HFSource, convert_source, export_hf

    jax.devices()
    if kind == "restore":
        import tensorstore  # noqa: F401  (an import, not the restore's memory)

        import qwq_jax
        from flax import nnx
        from sharding import make_mesh

        mesh = make_mesh(f"fsdp={len(jax.devices())}")
    idle = _rss_kib("VmRSS")
    start = time.perf_counter()
    if kind == "restore":
        model = qwq_jax.load(src, mesh=mesh, rules="train")
        leaves = jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
        summary = {"held_bytes": sum(s.data.nbytes for x in leaves for s in x.addressable_shards)}
    elif kind == "hf":
        summary = convert_source(HFSource(src), out, dtype="bfloat16", progress=False)
    elif kind == "gguf":
        from convert.gguf import GGUFSource

        summary = convert_source(GGUFSource(src), out, dtype="float32", progress=False)
    else:
        summary = export_hf(src, out, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "idle_kib": idle, "peak_kib": _rss_kib("VmHWM"),
                      "time_s": summary.get("time_s"), "held_bytes": summary.get("held_bytes")}))


def measure(kind: str, src: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    if kind == "restore":  # onto 8 devices (fake CPU ones), each holding an eighth
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={RESTORE_DEVICES}"
    r = subprocess.run([sys.executable, __file__, "--child", kind, str(src), str(out)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def plain_read(files: list[Path]) -> float:
    """MB/s of reading `files` into memory (the restore's peer: the same bytes, nothing else done)."""
    start, n = time.perf_counter(), 0
    for f in files:
        with open(f, "rb") as a:
            while chunk := a.read(64 << 20):
                n += len(chunk)
    return n / 1e6 / (time.perf_counter() - start)


def plain_copy(files: list[Path], dst: Path) -> float:
    """MB/s of copying `files` into `dst` (read, write, fsync each file), like any file copy."""
    dst.mkdir(parents=True, exist_ok=True)
    start, n = time.perf_counter(), 0
    for f in files:
        with open(f, "rb") as a, open(dst / f.name, "wb") as b:
            while chunk := a.read(64 << 20):
                b.write(chunk)
                n += len(chunk)
            b.flush()
            os.fsync(b.fileno())
    seconds = time.perf_counter() - start
    shutil.rmtree(dst, ignore_errors=True)
    return n / 1e6 / seconds


def row(op: str, label: str, layers: int, nbytes: int, largest: int, m: dict, copy_mb_s: float) -> dict:
    """One JSON record. For conversions the peer is a plain copy and the bound 1 GiB + 2x the largest
    tensor; for a restore (`largest` = the larger of one layer's bytes and the largest other tensor's)
    the peer is a plain read of the checkpoint's files and the bound what the devices hold plus that
    plus RESTORE_FIXED_BYTES."""
    above = (m["peak_kib"] - m["idle_kib"]) * 1024
    bound = m["held_bytes"] + largest + RESTORE_FIXED_BYTES if op == "restore" else 2**30 + 2 * largest
    peer = "plain_read" if op == "restore" else "plain_copy"
    mb_s = nbytes / 1e6 / m["seconds"]
    return {"bench": "convert", "op": op, "shape": label, "layers": layers, "source_gb": round(nbytes / 1e9, 3),
            "seconds": round(m["seconds"], 2), "mb_per_s": round(mb_s, 1),
            f"{peer}_mb_per_s": round(copy_mb_s, 1), f"vs_{peer}": round(mb_s / copy_mb_s, 2),
            "peak_rss_above_idle_mb": round(above / 1e6, 1), "bound_mb": round(bound / 1e6, 1),
            "within_bound": above <= bound, "time_s": m.get("time_s")}


RESTORE_DEVICES = 8
RESTORE_FIXED_BYTES = 128 * 2**20  # the runtime's and TensorStore's own buffers, whatever the depth


def nbytes_per_layer(cfg) -> int:
    """Bytes of one layer's parameters in bf16 (what a restore may hold beyond the devices' arrays)."""
    from convert.names import param_shapes

    return sum(math.prod(shape[1:]) * 2 for name, shape in param_shapes(cfg).items() if name.startswith("layers."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 48, 96])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--no-real", dest="real", action="store_false", help="skip the real 1.5B shape")
    parser.add_argument("--no-export", dest="export", action="store_false", help="skip export-hf")
    parser.add_argument("--gguf", default=None, help="also convert this GGUF file (e.g. the demo model)")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: hidden 256, 2 and 8 layers, no 1.5B shape")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.layers, args.hidden, args.real = [2, 8], 256, False
    if args.child:
        child(*args.child)
        return

    from tqdm import tqdm

    from convert.hf import HFSource
    from convert.synthetic import write_random_hf_checkpoint
    from qwq_jax.config import QwenConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qwq-convert-bench-"))
    h = args.hidden
    cases = [(f"hidden {h}", QwenConfig(vocab_size=8192, hidden_size=h, intermediate_size=int(h * 2.75),
                                        num_layers=n, num_heads=h // 64, num_kv_heads=max(1, h // 256),
                                        head_dim=64, dtype="bfloat16")) for n in args.layers]
    if args.real:
        cases.append(("1.5B", QwenConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                                         num_heads=12, num_kv_heads=2, head_dim=128, dtype="bfloat16")))
    for label, cfg in tqdm(cases, desc="shapes", file=sys.stderr):
        src = write_random_hf_checkpoint(cfg, work / "src", dtype="bfloat16", max_shard_bytes=2_000_000_000)
        source = HFSource(src)
        nbytes = sum(source.nbytes(n) for n in source.names())
        largest = max(source.nbytes(n) for n in source.names())
        out, exported = work / "out", work / "exported"
        shutil.rmtree(out, ignore_errors=True)
        copy_mb_s = plain_copy(sorted(src.glob("*.safetensors")), work / "copy")
        print(json.dumps(row("hf", label, cfg.num_layers, nbytes, largest, measure("hf", src, out), copy_mb_s)),
              flush=True)
        shutil.rmtree(src, ignore_errors=True)
        layer_bytes = nbytes_per_layer(cfg)
        read_mb_s = plain_read(sorted(p for p in out.rglob("*") if p.is_file()))
        print(json.dumps(row("restore", label, cfg.num_layers, nbytes, max(layer_bytes, largest),
                             measure("restore", out, out),
                             read_mb_s)), flush=True)
        if args.export:
            shutil.rmtree(exported, ignore_errors=True)
            m = measure("export-hf", out, exported)
            files = sorted(exported.glob("*.safetensors"))
            copy_mb_s = plain_copy(files, work / "copy")
            print(json.dumps(row("export-hf", label, cfg.num_layers, nbytes, largest, m, copy_mb_s)), flush=True)
            shutil.rmtree(exported, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    if args.gguf:
        from convert.gguf import GGUFSource

        gguf = Path(args.gguf)
        source = GGUFSource(gguf)
        largest = max(math.prod(source.shape(n)) * 4 for n in source.names())  # float32 once dequantized
        out = work / "out-gguf"
        shutil.rmtree(out, ignore_errors=True)
        copy_mb_s = plain_copy([gguf], work / "copy")
        m = measure("gguf", gguf, out)
        record = row("gguf", gguf.name, source.config.num_layers, gguf.stat().st_size, largest, m, copy_mb_s)
        # Dequantizing expands the file ~5x (Q4_K_M -> float32): the disk-bound floor is writing the
        # output, so the conversion is also given against a plain copy of as many bytes as it wrote
        out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        record.update(out_gb=round(out_bytes / 1e9, 3),
                      vs_plain_copy_of_output=round(out_bytes / 1e6 / copy_mb_s / m["seconds"], 2))
        print(json.dumps(record), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"convert benchmark: {len(cases)} shapes", file=sys.stderr)


if __name__ == "__main__":
    main()
