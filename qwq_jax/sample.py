"""`python -m qwq_jax.sample`: sampling from a checkpoint (KV-cached generation is issue #5)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwq_jax.sample", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", help="converted checkpoint directory")
    parser.add_argument("--demo", action="store_true", help="use the offline demo weights")
    parser.add_argument("--prompt", default="Hello", help="user message")
    parser.parse_args(argv)
    print("qwq_jax.sample: generation is not built yet (issue #5: KV cache, sampling, --demo). "
          "The model, config and sharding are ready: see README.md 'The model in Python'.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
