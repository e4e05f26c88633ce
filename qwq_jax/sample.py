"""python -m qwq_jax.sample: chat with a converted checkpoint (or the offline demo model).

    python -m qwq_jax.sample --demo --prompt "Write a haiku about JAX."
    python -m qwq_jax.sample --checkpoint OUT --prompt "How many r in strawberry?" --json
    python -m qwq_jax.sample --checkpoint OUT --interactive
    python -m qwq_jax.sample --checkpoint OUT --prompt "..." --quantize int8   # int8 weight-only weights

Sampling defaults come from the checkpoint's generation_config.json; when it sets none, from the
model family's published recommendation (Qwen2.5 instruct: temperature 0.7, top_p 0.8, top_k 20,
repetition_penalty 1.05; QwQ, i.e. a chat template with a <think> block or QwQ-32B's config:
temperature 0.6, top_p 0.95, top_k 40). Every flag overrides them; --json says which were used
and where each came from. The reply streams to stdout (reasoning, when the model thinks, is shown
apart from the answer); status lines (loading, compiling) and timings go to stderr. Compiled
programs are kept in a persistent cache (--xla-cache), so only the first run of a shape compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qwq_jax import compile_cache

DEMO_NAME = "qwen2.5-coder-0.5b-instruct-q4km-f32"


def build_parser() -> argparse.ArgumentParser:
    from qwq_jax.attention import BACKENDS
    from qwq_jax.cli import OneLineParser
    from qwq_jax.generate import LAYER_LOOPS
    from qwq_jax.model import QUANT_MODES
    from sharding import add_distributed_args

    p = OneLineParser(prog="python -m qwq_jax.sample", description=__doc__,
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
    g = p.add_argument_group(
        "sampling", "default: the checkpoint's generation_config.json; when it sets none, the family's published "
                    "recommendation (Qwen2.5 instruct: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty "
                    "1.05; QwQ: temperature 0.6, top_p 0.95, top_k 40); other fields: temperature 1, top_p 1, "
                    "top_k off, min_p 0, penalties off")
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float, help="nucleus mass in (0, 1]")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p times the most likely one's probability")
    g.add_argument("--presence-penalty", type=float, help="over output tokens, in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, help="over output tokens, in [-2, 2]")
    g.add_argument("--repetition-penalty", type=float, help="over prompt and output tokens, > 0 (1 = off)")
    g.add_argument("--max-tokens", type=int, default=None, help="new tokens at most (default 512)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--n", type=int, default=None, help="samples per prompt (default 1; text mode prints each)")
    m = p.add_argument_group("model")
    m.add_argument("--mesh", default=None, help="device mesh, e.g. 'tensor=4' (default: one device)")
    m.add_argument("--rope-scaling", choices=("auto", "static", "off"), default="auto",
                   help="YaRN: auto = only for requests longer than the original context")
    m.add_argument("--prefill-chunk", type=_positive_int, default=2048,
                   help="prompt tokens per prefill call (long prompts go in several; memory grows with this)")
    m.add_argument("--kv-cache-dtype", choices=("auto", "int8"), default="auto",
                   help="KV cache pages: auto = the model's dtype; int8 = int8 with a scale per token and KV head "
                        "(half the bytes of bf16: longer or more sequences in the same memory)")
    m.add_argument("--layer-loop", choices=LAYER_LOOPS, default="split",
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
    compile_cache.add_args(p)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number of tokens, got {text!r}")
    return value


def demo_checkpoint(cache_dir: str | None = None, xla_cache: str | None = None) -> Path:
    """The demo GGUF converted to a checkpoint (once; reused afterwards); `xla_cache` goes to the converter."""
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
    cache_args = ["--xla-cache", str(xla_cache)] if xla_cache is not None else []
    r = subprocess.run([sys.executable, "-m", "convert", "gguf", str(gguf), str(out), "--dtype", "float32",
                        "--overwrite", *cache_args], env=env, stdout=_stderr_fd())  # stdout: the reply only
    if r.returncode != 0:
        raise RuntimeError("converting the demo model failed (see above)")
    return out


def _stderr_fd() -> int | None:
    """Our stderr's file descriptor, for a child's output (None: inherit, e.g. under a capturing test)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def checkpoint_sampling(ckpt: Path, **overrides):
    """(SamplingParams, {field: {"value", "source"}}, family) of a checkpoint: `overrides` that are not
    None, else its generation_config.json, else the family's recommendation
    (`qwq_jax.sampling.recommended_sampling`), else the defaults."""
    from qwq_jax import checkpoint
    from qwq_jax.sampling import SamplingParams, chat_template_text, recommended_sampling

    files = checkpoint.tokenizer_dir(ckpt) or ckpt
    gen = ckpt if (ckpt / "generation_config.json").is_file() else files
    family = recommended_sampling(checkpoint.read_config(ckpt), chat_template_text(files))
    return (*SamplingParams.resolve(gen, family, **overrides), family)


def mesh_from_args(parser, args):
    """`--mesh` as a Mesh (None without it) and `--attention` checked; usage errors name the flag."""
    from qwq_jax.attention import check_backend
    from sharding import make_mesh

    try:
        mesh = make_mesh(args.mesh) if args.mesh else None
    except ValueError as e:
        parser.error(f"--mesh: {e}")
    try:
        check_backend(args.attention)
    except ValueError as e:
        parser.error(f"--attention: {e}")
    return mesh


def _sampling(args, ckpt: Path):
    """(SamplingParams, {field: {"value", "source"}}): flags, else the checkpoint's (`checkpoint_sampling`)."""
    params, sources, family = checkpoint_sampling(
        ckpt, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
        max_tokens=args.max_tokens if args.max_tokens is not None else 512,
        stop=tuple(args.stop) if args.stop else None, seed=args.seed, n=args.n)
    if args.max_tokens is None:
        sources["max_tokens"]["source"] = "default"
    return params, {"family": family, **sources}


class _Status:
    """Status lines on stderr (`qwq_jax.cli`): loading, and each compilation of the engine's programs."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._compiling = None

    def on_compile(self, event: str, program: str, info: dict) -> None:
        """Engine(on_compile=...): a line for each prefill/decode compilation that takes over a second."""
        from qwq_jax.cli import Phase

        if program == "logits":  # tiny: counted in the stats line only
            return
        if event == "start":
            self._compiling = Phase(f"compiling the {program} program", self.enabled)
        elif self._compiling is not None:
            detail = {"hit": "from cache", "miss": "cached for next time", "off": "compilation cache off"}
            self._compiling.end(detail[info["cache"]], seconds=info["seconds"])  # tracing included
            self._compiling = None


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


def _prompt(tokenizer, messages, raw_prompt=None) -> tuple[str, list[int]]:
    """The prompt text (`raw_prompt`, else the chat template over `messages`) and its token ids."""
    prompt = raw_prompt if raw_prompt is not None else tokenizer.apply_chat_template(messages,
                                                                                   add_generation_prompt=True)
    return prompt, tokenizer.encode(prompt)


def _prompt_tokens(tokenizer, messages, raw_prompt=None) -> int:
    """The prompt's length, for the programs to compile while the weights load; 1 where the prompt
    cannot be made (the reply says why, after a checkpoint problem if there is one)."""
    try:
        return len(_prompt(tokenizer, messages, raw_prompt)[1])
    except ValueError:
        return 1


def _reply(engine, tokenizer, messages, args, params, raw_prompt=None) -> dict:
    from qwq_jax.tokenizer import IncrementalDecoder, split_reasoning

    prompt, ids = _prompt(tokenizer, messages, raw_prompt)
    in_think = tokenizer.prompt_ends_in_think(prompt)
    text_mode = not args.json
    printer = _Printer(in_think) if text_mode else None
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    started = time.perf_counter()
    first_token_s = None
    header = params.n > 1 and text_mode
    for events in engine.stream([ids], params):
        for ev in events:
            if first_token_s is None and ev.token_ids:
                first_token_s = time.perf_counter() - started
            if printer is not None and ev.sample_index == 0:
                if header:  # sample 0 streams live; the others print when all are done
                    print(f"[sample 1/{params.n}]", flush=True)
                    header = False
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
    if text_mode:
        for k, c in enumerate(choices[1:], start=2):
            print(f"[sample {k}/{len(choices)}]", flush=True)
            rest = _Printer(in_think)
            if c["text"]:
                rest.write(c["text"])
            rest.close()
    t = engine.last_timings
    result = dict(choices[0])
    result["usage"] = {"prompt_tokens": len(ids), "completion_tokens": sum(len(c["token_ids"]) for c in choices)}
    result["timings"] = {
        "first_token_s": round(first_token_s, 4) if first_token_s is not None else None,
        "compile_s": round(t["compile_s"], 4),        # tracing + XLA compile (or persistent-cache loads)
        "prefill_s": round(t["prefill_s"], 4),        # without compilation
        "decode_s": round(t["decode_s"], 4),          # without compilation
        "decode_tokens_per_s": round(t["decode_tokens_per_s"], 2),  # new tokens / decode_s
        "compiled": [{"program": c["program"], "seconds": round(c["seconds"], 3), "cache": c["cache"]}
                     for c in t["compiled"]],
    }
    if len(choices) > 1:
        result["choices"] = choices
    return result


def load_engine(ckpt: Path, args, mesh, status: _Status, prompt_tokens: int, params, **engine_kwargs):
    """(engine, compilations): the engine (`build_engine`) for the checkpoint's model, under one
    status line. The weights are read in a background thread while this one compiles (or loads
    from the compilation cache) the programs of a first request of `prompt_tokens` tokens with
    `params`, on an engine built from the config alone (`Engine.precompile`) that then takes the
    weights (`Engine.set_model`); the compilations are returned. The decode program joins them
    only if the restore is still running once prefill and insert are ready: compiling it from
    scratch (~4 s for the demo on 2 cores) would otherwise hold back the first token."""
    import threading

    import qwq_jax
    from qwq_jax import checkpoint
    from qwq_jax.cli import phase
    from qwq_jax.replicas import build_engine

    how = dict(mesh=mesh, dtype=args.dtype, quant=args.quantize, attention_backend=args.attention)
    abstract = checkpoint.abstract_load(ckpt, **how)  # None: a LoRA training step (read, then compile)
    read: dict = {}

    def restore() -> None:
        try:
            read["model"] = qwq_jax.load(ckpt, **how)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            read["error"] = e

    with phase(f"loading {ckpt}", status.enabled) as p:
        reader = threading.Thread(target=restore, name="qwq-jax-restore", daemon=True)
        reader.start()
        compiled, engine = [], None
        if abstract is not None:
            engine = build_engine(abstract, mesh=mesh, **engine_kwargs)
            # decode too while the restore still runs (else after the first token, as without this)
            compiled = engine.precompile(prompt_tokens, params, decode=reader.is_alive)
        reader.join()
        if "error" in read:
            raise read["error"]
        model = read.pop("model")
        if engine is None:
            engine = build_engine(model, mesh=mesh, **engine_kwargs)
        else:
            engine.set_model(model)
        size = f"{model.config.num_params() / 1e6:.0f}M parameters"
        del model
        p.end(f"{size}; {_compiled_meanwhile(compiled)}" if compiled else size)
    engine.on_compile = status.on_compile
    return engine, compiled


def _compiled_meanwhile(compiled: list[dict]) -> str:
    """`load_engine`'s status detail: which programs, and whether the compilation cache had them."""
    programs = ", ".join(dict.fromkeys(c["program"] for c in compiled))
    hits, misses = (sum(c["cache"] == kind for c in compiled) for kind in ("hit", "miss"))
    if hits == len(compiled):
        return f"{programs} loaded from the compilation cache meanwhile"
    if misses == len(compiled):
        return f"{programs} compiled meanwhile, cached for next time"
    return f"{programs} compiled meanwhile" + (f" ({hits} of {len(compiled)} from the cache)" if hits else "")


def _stats_line(result: dict) -> str:
    t, usage = result["timings"], result["usage"]
    finish = ", ".join(c["finish_reason"] for c in result.get("choices", [result]))
    cached = sum(c["cache"] == "hit" for c in t["compiled"])
    compiled = f"compile {t['compile_s']:.1f} s" + (f" ({cached} of {len(t['compiled'])} from cache)"
                                                    if t["compiled"] else "")
    first = f"first token {t['first_token_s']:.1f} s, " if t["first_token_s"] is not None else ""
    return (f"[{usage['prompt_tokens']} prompt + {usage['completion_tokens']} new tokens, {first}{compiled}, "
            f"prefill {t['prefill_s']:.2f} s, {t['decode_tokens_per_s']:.1f} tok/s without compiling, "
            f"finish: {finish}]")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.interactive and args.prompt is None:
        parser.error("--prompt is required unless --interactive")
    from qwq_jax.sampling import MAX_N

    if args.n is not None and args.n > MAX_N:
        parser.error(f"--n {args.n}: at most {MAX_N} samples per prompt (each takes a decode slot)")
    from sharding import init_distributed

    try:
        init_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
    except ValueError as e:
        parser.error(str(e))
    try:
        xla_dir = compile_cache.enable(args.xla_cache)
    except ValueError as e:
        print(f"python -m qwq_jax.sample: error: {e}", file=sys.stderr)
        return 2
    import jax

    from qwq_jax import checkpoint

    mesh = mesh_from_args(parser, args)
    status = _Status(enabled=jax.process_index() == 0)
    try:
        ckpt = demo_checkpoint(args.cache_dir, args.xla_cache) if args.demo else Path(args.checkpoint)
        checkpoint.require_checkpoint(ckpt)  # a convert output or a training step; else one line naming the fix
        checkpoint.require_weights(ckpt)
        params, sampling_info = _sampling(args, ckpt)
        tokenizer = checkpoint.load_tokenizer(ckpt)
        messages = [{"role": "system", "content": args.system}] if args.system else []
        if not args.interactive:
            messages.append({"role": "user", "content": args.prompt})
        raw = args.prompt if args.raw else None
        first = _prompt_tokens(tokenizer, messages, raw) if not args.interactive else 1
        # one engine per replica of the weights on a mesh with data x fsdp > 1 (qwq_jax/replicas.py)
        engine, precompiled = load_engine(
            ckpt, args, mesh, status, first, params, tokenizer=tokenizer, rope_scaling=args.rope_scaling,
            prefill_chunk=args.prefill_chunk, layer_loop=args.layer_loop, donate_weights=True,
            max_num_seqs=params.n, kv_cache_dtype=None if args.kv_cache_dtype == "auto" else "int8")
    except ValueError as e:
        print(f"python -m qwq_jax.sample: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        print(f"python -m qwq_jax.sample: error: {e}", file=sys.stderr)
        return 1
    primary = jax.process_index() == 0
    try:
        if not args.interactive:
            result = _reply(engine, tokenizer, messages, args, params, raw_prompt=raw)
            result["timings"]["compiled_while_loading"] = [
                {"program": c["program"], "seconds": round(c["seconds"], 3), "cache": c["cache"]} for c in precompiled]
            if primary:
                if args.json:
                    result["sampling"] = sampling_info
                    result["compile_cache"] = {"dir": str(xla_dir) if xla_dir else None, **compile_cache.counts()}
                    print(json.dumps(result, ensure_ascii=False))
                else:
                    print(_stats_line(result), file=sys.stderr)
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
    from qwq_jax.cli import run_main

    run_main(main)
