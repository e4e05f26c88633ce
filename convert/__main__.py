"""python -m convert: HF safetensors / GGUF -> qwq-jax Orbax checkpoint, and back to HF.

  python -m convert hf SRC OUT          SRC: local HF model directory
  python -m convert gguf FILE OUT       FILE: a qwen2 GGUF file (dequantized)
  python -m convert export-hf OUT HFDIR a qwq-jax checkpoint -> HF safetensors directory
"""

from __future__ import annotations

import argparse
import sys

from convert.source import ConversionError


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MB)") from None


def build_parser() -> argparse.ArgumentParser:
    from sharding import add_distributed_args

    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
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
                       help="mesh the conversion writes from, e.g. 'fsdp=-1' (default: layers split over "
                            "all devices)")
        p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        add_distributed_args(p)
    p = sub.add_parser("export-hf", help="qwq-jax checkpoint -> HF safetensors directory", formatter_class=fmt)
    p.add_argument("ckpt", help="qwq-jax checkpoint directory")
    p.add_argument("out", help="output HF model directory")
    p.add_argument("--max-shard-size", type=_parse_size, default="5GB", help="largest safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        from convert.hf import HFSource, convert_source

        if args.command == "hf":
            source = HFSource(args.src)
        else:
            from convert.gguf import GGUFSource

            source = GGUFSource(args.src)
        try:
            mesh = make_mesh(args.mesh) if args.mesh else None
        except ValueError as e:
            print(f"python -m convert: error: --mesh: {e}", file=sys.stderr)
            return 2
        summary = convert_source(source, args.out, dtype=args.dtype, mesh=mesh, overwrite=args.overwrite,
                                 progress=not args.quiet)
        import jax

        if jax.process_index() == 0:
            print(f"converted {args.src} -> {summary['out']}: {summary['parameters'] / 1e6:.1f}M parameters "
                  f"({summary['dtype']}, {summary['bytes_written'] / 1e9:.2f} GB) in {summary['seconds']:.1f} s, "
                  f"peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB")
        return 0
    except ConversionError as e:
        print(f"python -m convert: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m convert: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
