"""Passkey retrieval at long context: the demo model (Qwen2.5-Coder-0.5B-Instruct) with YaRN.

A random 5-digit passkey is hidden at a relative depth of a long run of filler sentences; the
model is asked for it in a chat turn whose answer is started for it ("The pass key is"), and its
greedy continuation (a few tokens) counts as found when it holds the passkey. The prompt comes to
`length` tokens (chat template included, at most one filler sentence short).

YaRN: the checkpoint's config gets the rope_scaling that the Qwen2.5 model cards give for
contexts past 32,768 tokens, `{"type": "yarn", "factor": 4.0, "original_max_position_embeddings":
32768}` (QwQ-32B's, up to 131,072 tokens). `--rope-scaling static` (default) applies it at every
length, `auto` only to requests longer than 32,768 tokens (the engine's default; plain RoPE
below), `off` never (past 32,768 tokens the model is then outside what it was trained on).

Output: one JSON line per (length, depth) on stdout with `tokens` (the prompt's), `depth`,
`passkey`, `answer`, `found`, `rope` ("yarn" or "plain"), `seconds` (prefill + decode,
compilation included) and `first_token_s`, then a summary line; progress bars on stderr (prompts,
and the prefill's tokens within one).

    python benchmarks/passkey.py                                   # 8K, 32K, 64K x 3 depths
    python benchmarks/passkey.py --lengths 8192 --depths 0.1 0.5 0.9
    python benchmarks/passkey.py --tiny                            # 512 tokens, one depth (smoke test)

On a shared 2-core CPU one 8K prompt took ~7 minutes (about 3 CPU-minutes) and one 16K prompt
~12 (9 CPU-minutes): attention's share grows with the square of the length, so 32K and 64K are
for an accelerator. The first run converts the
demo GGUF once (~/.cache/qwq-jax).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import HelpFormatter, emit

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it: you will be asked about it.\n\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key?"
ANSWER_START = "The pass key is"



def _number(text: str, kind=int):
    try:
        return kind(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _positive(text: str) -> int:
    n = _number(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return n


def _length(text: str) -> int:
    n = _number(text)
    if n < 256:
        raise argparse.ArgumentTypeError(f"must be a number of tokens >= 256, got {text!r}")
    return n


def _depth(text: str) -> float:
    d = _number(text, float)
    if not 0.0 <= d <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction of the filler between 0 and 1, got {text!r}")
    return d


def build_parser() -> argparse.ArgumentParser:
    from qwq_jax import compile_cache
    from qwq_jax.cli import OneLineParser

    p = OneLineParser(prog="python benchmarks/passkey.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--lengths", type=_length, nargs="+", default=[8192, 32768, 65536], metavar="TOKENS",
                   help="prompt lengths in tokens")
    p.add_argument("--depths", type=_depth, nargs="+", default=[0.1, 0.5, 0.9], metavar="FRACTION",
                   help="where the passkey sits in the filler (0 = start, 1 = end)")
    p.add_argument("--rope-scaling", choices=("static", "auto", "off"), default="static",
                   help="YaRN at every length, only past 32,768 tokens, or never (see above)")
    p.add_argument("--max-tokens", type=_positive, default=8, help="greedy tokens generated for the answer")
    p.add_argument("--prefill-chunk", type=_positive, default=2048, help="prompt tokens per prefill call")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkeys")
    p.add_argument("--checkpoint", default=None,
                   help="a converted checkpoint (default: the demo model, converted once into ~/.cache/qwq-jax)")
    p.add_argument("--tiny", action="store_true",
                   help="one 512-token prompt, passkey at depth 0.5 (overrides --lengths/--depths): a smoke test")
    compile_cache.add_args(p)
    return p


def build_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Chat-template prompt ids of about `length` tokens (never more), the needle at `depth`."""
    def ids(n_filler: int) -> list[int]:
        before = round(n_filler * depth)
        text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (n_filler - before) + QUESTION
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return tokenizer.encode(prompt + ANSWER_START)

    per = len(tokenizer.encode(FILLER * 8)) / 8
    n = max(0, int((length - len(ids(0))) / per))
    while n > 0 and len(ids(n)) > length:  # the estimate is close; step down to fit
        n -= max(1, int((len(ids(n)) - length) / per))
    return ids(n)


def run_one(engine, ids: list[int], max_tokens: int):
    """Greedy `max_tokens` after `ids`, step by step (the engine prefills one chunk per step), with a
    bar of the prefill's tokens: a long prompt takes minutes on a CPU. Returns the completion and the
    seconds to its first token."""
    from tqdm import tqdm

    from qwq_jax.sampling import SamplingParams

    t0, first, out = time.perf_counter(), None, None
    done = engine.stats()["prefill_tokens_computed"]
    engine.add_request(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    with tqdm(total=len(ids), desc="prefill", unit="tok", file=sys.stderr, leave=False) as bar:
        while engine.has_unfinished():
            for event in engine.step():
                if first is None and event.token_ids:
                    first = time.perf_counter() - t0
                if event.completion is not None:
                    out = event.completion
            bar.update(engine.stats()["prefill_tokens_computed"] - done - bar.n)
    return out, first


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny:
        args.lengths, args.depths = [512], [0.5]

    from qwq_jax import compile_cache

    try:
        compile_cache.enable(args.xla_cache)
    except ValueError as e:
        print(f"python benchmarks/passkey.py: error: {e}", file=sys.stderr)
        return 2
    import numpy as np
    from tqdm import tqdm

    import qwq_jax
    from qwq_jax import checkpoint
    from qwq_jax.config import RopeScaling
    from qwq_jax.generate import PAGE_SIZE, Engine
    from qwq_jax.sample import demo_checkpoint

    try:
        ckpt = Path(args.checkpoint) if args.checkpoint else demo_checkpoint()
        checkpoint.require_checkpoint(ckpt)
        cfg = checkpoint.read_config(ckpt)
        if cfg.rope_scaling is None:  # the model cards' YaRN for long contexts
            cfg = cfg.replace(rope_scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=32768))
        limit = cfg.max_position_embeddings if args.rope_scaling == "off" else cfg.max_context
        if max(args.lengths) + args.max_tokens > limit:
            print(f"python benchmarks/passkey.py: error: --lengths: {max(args.lengths)} + {args.max_tokens} answer "
                  f"tokens pass the model's {limit}-token context with --rope-scaling {args.rope_scaling}; "
                  "pass shorter lengths", file=sys.stderr)
            return 2
        tokenizer = checkpoint.load_tokenizer(ckpt)
        print(f"loading {ckpt} ...", file=sys.stderr, flush=True)
        model = qwq_jax.load(ckpt, attention_backend="auto")
    except ValueError as e:
        print(f"python benchmarks/passkey.py: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError) as e:
        print(f"python benchmarks/passkey.py: error: {e}", file=sys.stderr)
        return 1
    model.config = cfg  # the engine reads the rotary set-up from here
    longest = max(args.lengths) + args.max_tokens
    engine = Engine(model, tokenizer, rope_scaling=args.rope_scaling, prefill_chunk=args.prefill_chunk,
                    max_num_seqs=1,  # one prompt at a time: one decode slot, a pool for the longest
                    num_pages=-(-longest // PAGE_SIZE), page_size=PAGE_SIZE)
    original = cfg.original_max_position_embeddings
    rng = np.random.default_rng(args.seed)
    runs = [(n, d) for n in args.lengths for d in args.depths]
    found = 0
    t_all = time.perf_counter()
    bar = tqdm(runs, desc="passkey", unit="prompt", file=sys.stderr)
    for n, depth in bar:
        bar.set_postfix(tokens=n, depth=depth)
        key = f"{rng.integers(10_000, 100_000)}"
        ids = build_prompt(tokenizer, n, depth, key)
        t0 = time.perf_counter()
        out, first_token_s = run_one(engine, ids, args.max_tokens)
        seconds = time.perf_counter() - t0
        yarn = args.rope_scaling == "static" or (args.rope_scaling == "auto" and
                                                 len(ids) + args.max_tokens > original)
        hit = key in (out.text or "")
        found += hit
        emit({"bench": "passkey", "tokens": len(ids), "target": n, "depth": depth, "passkey": key,
              "answer": (out.text or "").strip(), "found": hit, "rope": "yarn" if yarn else "plain",
              "seconds": seconds, "first_token_s": first_token_s})
    bar.close()
    emit({"bench": "passkey", "summary": True, "found": found, "runs": len(runs),
          "accuracy": found / len(runs), "lengths": args.lengths, "depths": args.depths,
          "rope_scaling": args.rope_scaling, "seconds": time.perf_counter() - t_all})
    return 0


if __name__ == "__main__":
    sys.exit(main())
