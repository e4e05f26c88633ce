"""python -m convert: HF safetensors / GGUF -> qwq-jax Orbax checkpoint, and back to HF.

  python -m convert hf SRC OUT          SRC: local HF model directory
  python -m convert gguf FILE OUT       FILE: a qwen2 GGUF file (dequantized)
  python -m convert export-hf OUT HFDIR a qwq-jax checkpoint -> HF safetensors directory
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convert.source import ConversionError
from qwq_jax import compile_cache


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    size = None
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                size = int(float(t[: -len(unit)]) * mult)
            except (ValueError, OverflowError):  # OverflowError: inf
                pass
            break
    else:
        try:
            size = int(t)
        except ValueError:
            pass
    if size is None or size < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: give a positive size (e.g. 5GB, 500MB)")
    return size


def _replaces_source(src: str, out: str) -> bool:
    """OUT is SRC or a directory holding it: --overwrite would delete what is being read."""
    src_path, out_path = Path(src).resolve(), Path(out).resolve()
    return src_path == out_path or out_path in src_path.parents



def build_parser() -> argparse.ArgumentParser:
    from qwq_jax.cli import OneLineParser
    from sharding import add_distributed_args

    parser = OneLineParser(prog="python -m convert", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    for name, src_help in (("hf", "local HF model directory (config.json, *.safetensors, tokenizer files)"),
                           ("gguf", "GGUF file of a qwen2 model")):
        p = sub.add_parser(name, help=f"{name} -> qwq-jax checkpoint", formatter_class=fmt)
        p.add_argument("src", help=src_help)
        p.add_argument("out", help="output checkpoint directory")
        p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                       help="stored parameter dtype (default: the source's; float32 for GGUF)")
        p.add_argument("--mesh", default=None,
                       help="mesh the conversion writes from, e.g. 'fsdp=-1' (default: each tensor's rows "
                            "split over all devices)")
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        p.add_argument("--quiet", action="store_true", help="no progress bar or status lines")
        add_distributed_args(p)
        compile_cache.add_args(p)
    p = sub.add_parser("export-hf", help="qwq-jax checkpoint -> HF safetensors directory", formatter_class=fmt)
    p.add_argument("ckpt", help="qwq-jax checkpoint directory")
    p.add_argument("out", help="output HF model directory")
    p.add_argument("--max-shard-size", type=_parse_size, default="5GB", help="largest safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or status lines")
    compile_cache.add_args(p)
    return parser


def _source_problem(command: str, src: str) -> str | None:
    """One line when SRC is not what `command` reads (qwq_jax.checkpoint.inspect_path says what it is)."""
    from qwq_jax.checkpoint import describe_problem, inspect_path

    info = inspect_path(src)
    if command == "export-hf":
        return describe_problem(info)
    if info.kind == command:  # hf / gguf
        return None
    if info.kind in ("checkpoint", "training_step"):
        return (f"{src} is already a qwq-jax checkpoint: sample it with `python -m qwq_jax.sample --checkpoint "
                f"{src}`, or get HF files with `python -m convert export-hf {src} OUT`")
    if info.kind in ("hf", "gguf", "training_run") or (command == "gguf" and info.kind == "missing"):
        return describe_problem(info)
    if command == "gguf":
        return f"{src} is not a GGUF file (it does not start with the bytes 'GGUF')"
    if info.kind == "file":
        return (f"{src} is a file; `python -m convert hf` reads a Hugging Face model directory "
                "(config.json, *.safetensors)")
    return None  # missing, empty or another directory: HFSource names what it lacks


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    src = args.ckpt if args.command == "export-hf" else args.src
    problem = _source_problem(args.command, src)
    if problem is None and _replaces_source(src, args.out):
        problem = (f"OUT {args.out} is the source or holds it: writing there would delete {src}; choose "
                   "another OUT")
    if problem is None and not args.overwrite and Path(args.out).exists():
        problem = f"{args.out} already exists (pass --overwrite to replace it, or choose another OUT)"
    if problem is not None:
        print(f"python -m convert: error: {problem}", file=sys.stderr)
        return 1
    try:
        compile_cache.enable(args.xla_cache)
    except ValueError as e:
        print(f"python -m convert: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "export-hf":
            from convert.hf import export_hf

            summary = export_hf(args.ckpt, args.out, overwrite=args.overwrite,
                                max_shard_bytes=args.max_shard_size, progress=not args.quiet)
            print(f"exported {args.ckpt} -> {summary['out']}: {summary['files']} file(s), "
                  f"{summary['bytes_written'] / 1e9:.2f} GB in {summary['seconds']:.1f} s, "
                  f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB")
            return 0

        from sharding import init_distributed, make_mesh

        init_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
        import jax

        from convert.hf import HFSource, convert_source
        from qwq_jax.cli import phase

        with phase(f"reading {args.src} (metadata, config, tokenizer)",
                   enabled=jax.process_index() == 0 and not args.quiet):
            if args.command == "hf":
                source = HFSource(args.src)
            else:
                from convert.gguf import GGUFSource

                source = GGUFSource(args.src)
            source.extra_files  # noqa: B018  (a GGUF's tokenizer is built here, inside this status line)
        try:
            mesh = make_mesh(args.mesh) if args.mesh else None
        except ValueError as e:
            print(f"python -m convert: error: --mesh: {e}", file=sys.stderr)
            return 2
        summary = convert_source(source, args.out, dtype=args.dtype, mesh=mesh, overwrite=args.overwrite,
                                 progress=not args.quiet)
        if jax.process_index() == 0:
            print(f"converted {args.src} -> {summary['out']}: {summary['parameters'] / 1e6:.1f}M parameters "
                  f"({summary['dtype']}, {summary['bytes_written'] / 1e9:.2f} GB) in {summary['seconds']:.1f} s, "
                  f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB")
        return 0
    except ConversionError as e:
        print(f"python -m convert: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"python -m convert: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from qwq_jax.cli import run_main

    run_main(main)
