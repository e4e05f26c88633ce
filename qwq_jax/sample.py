"""python -m qwq_jax.sample: chat with a converted checkpoint (or the offline demo model).

    python -m qwq_jax.sample --demo --prompt "Write a haiku about JAX."
    python -m qwq_jax.sample --checkpoint OUT --prompt "How many r in strawberry?" --json
    python -m qwq_jax.sample --checkpoint OUT --interactive
    python -m qwq_jax.sample --checkpoint OUT --prompt "..." --quantize int8   # int8 weight-only weights

Sampling defaults come from the checkpoint's generation_config.json; every flag overrides them.
The reply streams to stdout (reasoning, when the model thinks, is shown apart from the answer);
progress and timings go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

DEMO_NAME = "qwen2.5-coder-0.5b-instruct-q4km-f32"


def build_parser() -> argparse.ArgumentParser:
    from qwq_jax.attention import BACKENDS
    from qwq_jax.model import QUANT_MODES
    from sharding import add_distributed_args

    p = argparse.ArgumentParser(prog="python -m qwq_jax.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory written by `python -m convert`")
    src.add_argument("--demo", action="store_true",
                     help="the offline demo model (Qwen2.5-Coder-0.5B-Instruct from the `demo` extra), "
                          "converted once into the cache dir")
    p.add_argument("--prompt", help="the user message (required unless --interactive)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--raw", action="store_true", help="send --prompt as is, without the chat template")
    p.add_argument("--interactive", action="store_true", help="chat in a loop, keeping the history")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g = p.add_argument_group("sampling (default: the checkpoint's generation_config.json)")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--max-tokens", type=int, default=None, help="new tokens at most (default 512)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--n", type=int, default=None, help="samples per prompt")
    m = p.add_argument_group("model")
    m.add_argument("--mesh", default=None, help="device mesh, e.g. 'tensor=4' (default: one device)")
    m.add_argument("--rope-scaling", choices=("auto", "static", "off"), default="auto",
                   help="YaRN: auto = only for requests longer than the original context")
    m.add_argument("--prefill-chunk", type=_positive_int, default=2048,
                   help="prompt tokens per prefill call (long prompts go in several; memory grows with this)")
    m.add_argument("--layer-loop", choices=("scan", "unrolled", "split"), default="split",
                   help="how the decoder layers run (qwq_jax.generate): split (each layer's weights in arrays "
                        "of their own: decode reads them in place; compiles longer), or a scan over the stacks")
    m.add_argument("--attention", choices=tuple(BACKENDS), default="auto",
                   help="attention backend (qwq_jax.attention): auto = cuDNN flash attention on a GPU, splash "
                        "on a TPU, the XLA reference on CPU, a GQA decode path for one new token and blockwise "
                        "attention for chunked prefill ($QWQ_ATTENTION overrides what auto picks)")
    m.add_argument("--quantize", choices=QUANT_MODES, default=None,
                   help="weight-only quantization of the decoder's matmul weights after loading (changes "
                        "the model's numbers slightly; halves bf16 weight bytes)")
    m.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="parameter dtype (default: as stored)")
    m.add_argument("--cache-dir", default=None, help="where --demo keeps its converted checkpoint "
                                                     "(default $QWQ_JAX_CACHE or ~/.cache/qwq-jax)")
    add_distributed_args(p)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number of tokens, got {text!r}")
    return value


def demo_checkpoint(cache_dir: str | None = None) -> Path:
    """The demo GGUF converted to a checkpoint (once; reused afterwards)."""
    from qwq_jax.demo import default_cache_dir, demo_gguf_path

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / DEMO_NAME
    if (out / "config.json").is_file() and (out / "commit_success.txt").is_file():
        return out
    gguf = demo_gguf_path(root)
    print(f"converting the demo model once into {out} ...", file=sys.stderr)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-m", "convert", "gguf", str(gguf), str(out), "--dtype", "float32",
                        "--overwrite"], env=env)
    if r.returncode != 0:
        raise RuntimeError("converting the demo model failed (see above)")
    return out


def _sampling(args, ckpt: Path):
    from qwq_jax.sampling import SamplingParams

    return SamplingParams.from_generation_config(
        ckpt, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
        max_tokens=args.max_tokens if args.max_tokens is not None else 512,
        stop=tuple(args.stop) if args.stop else None, seed=args.seed, n=args.n)


class _Printer:
    """Streams one reply, showing reasoning apart from the answer."""

    def __init__(self, in_think: bool):
        self.in_think = in_think
        self.buffer = ""
        self.started = False

    def write(self, delta: str) -> None:
        out = sys.stdout
        if not self.started and self.in_think:
            out.write("\033[2m[thinking]\n")
            self.started = True
        self.buffer += delta
        if self.in_think and "</think>" in self.buffer:
            before, after = self.buffer.split("</think>", 1)
            out.write(before + "\033[0m\n[answer]\n" + after.lstrip("\n"))
            self.in_think, self.buffer = False, ""
        elif not self.in_think or len(self.buffer) > 16:
            keep = 8 if self.in_think else 0  # hold back a possible partial "</think>"
            out.write(self.buffer[: len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep:]
        out.flush()

    def close(self) -> None:
        sys.stdout.write(self.buffer + ("\033[0m" if self.in_think else "") + "\n")
        sys.stdout.flush()


def _reply(engine, tokenizer, messages, args, params, raw_prompt=None) -> dict:
    from qwq_jax.tokenizer import IncrementalDecoder, split_reasoning

    prompt = raw_prompt if raw_prompt is not None else tokenizer.apply_chat_template(messages,
                                                                                   add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    in_think = tokenizer.prompt_ends_in_think(prompt)
    printer = None if args.json else _Printer(in_think)
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    for events in engine.stream([ids], params):
        for ev in events:
            if printer is not None and ev.sample_index == 0:
                delta = decoder.push([t for t in ev.token_ids if t not in engine.eos_token_ids])
                if delta:
                    printer.write(delta)
    if printer is not None:
        rest = decoder.flush()
        if rest:
            printer.write(rest)
        printer.close()
    choices = []
    for c in engine.last_completions[0]:
        reasoning, content = split_reasoning(c.text or "", prompt_ends_in_think=in_think)
        choices.append({"token_ids": c.token_ids, "text": c.text, "reasoning_content": reasoning,
                        "content": content, "finish_reason": c.finish_reason})
    t = engine.last_timings
    result = dict(choices[0])
    result["usage"] = {"prompt_tokens": len(ids), "completion_tokens": sum(len(c["token_ids"]) for c in choices)}
    result["timings"] = {"prefill_s": round(t["prefill_s"], 4),
                         "decode_tokens_per_s": round(t["decode_tokens_per_s"], 2)}
    if len(choices) > 1:
        result["choices"] = choices
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.interactive and args.prompt is None:
        parser.error("--prompt is required unless --interactive")
    from sharding import init_distributed

    try:
        init_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    except ValueError as e:
        parser.error(str(e))
    import jax

    import qwq_jax
    from qwq_jax.attention import check_backend
    from qwq_jax.generate import Engine
    from qwq_jax.tokenizer import Tokenizer
    from sharding import make_mesh

    try:
        mesh = make_mesh(args.mesh) if args.mesh else None
    except ValueError as e:
        parser.error(f"--mesh: {e}")
    try:
        check_backend(args.attention)
    except ValueError as e:
        parser.error(f"--attention: {e}")
    try:
        ckpt = demo_checkpoint(args.cache_dir) if args.demo else Path(args.checkpoint)
        if not ckpt.exists():
            raise FileNotFoundError(f"checkpoint not found: {ckpt}")
        params = _sampling(args, ckpt)
        tokenizer = Tokenizer.from_dir(ckpt)
        model = qwq_jax.load(ckpt, mesh=mesh, dtype=args.dtype, quant=args.quantize,
                             attention_backend=args.attention)
    except ValueError as e:
        print(f"python -m qwq_jax.sample: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError) as e:
        print(f"python -m qwq_jax.sample: error: {e}", file=sys.stderr)
        return 1
    engine = Engine(model, tokenizer, mesh=mesh, rope_scaling=args.rope_scaling, prefill_chunk=args.prefill_chunk,
                    layer_loop=args.layer_loop, donate_weights=True)
    primary = jax.process_index() == 0
    messages = [{"role": "system", "content": args.system}] if args.system else []
    try:
        if not args.interactive:
            messages.append({"role": "user", "content": args.prompt})
            result = _reply(engine, tokenizer, messages, args, params,
                            raw_prompt=args.prompt if args.raw else None)
            if primary:
                if args.json:
                    print(json.dumps(result, ensure_ascii=False))
                else:
                    t = result["timings"]
                    print(f"[{result['usage']['prompt_tokens']} prompt + {result['usage']['completion_tokens']} "
                          f"new tokens, prefill {t['prefill_s']:.2f} s, {t['decode_tokens_per_s']:.1f} tok/s, "
                          f"finish: {result['finish_reason']}]", file=sys.stderr)
            return 0
        print("interactive chat: empty line or Ctrl-D to quit", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            result = _reply(engine, tokenizer, messages, args, params)
            messages.append({"role": "assistant", "content": result["content"]})
        return 0
    except ValueError as e:
        print(f"python -m qwq_jax.sample: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
