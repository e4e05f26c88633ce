"""`python -m qwq_jax.train --config FILE [--set section.key=value ...] [--resume]`

GRPO / DAPO / Dr.GRPO fine-tuning with verifiable rewards; the same command runs on every host.

    python -m qwq_jax.train --config configs/tiny_arithmetic.toml --set run.steps=50
    # multi-host: add --coordinator HOST:PORT --num-processes N --process-id I (or QWQ_* env,
    # or --distributed on TPU pods / SLURM), identical otherwise on every host.

The config is TOML (or JSON) with sections [model], [data], [rl], [lora], [rewards], [sandbox], [run]; every key
has a default (see the dataclasses below) and `--set` overrides any of them. The whole config is
checked before anything loads (`validate`). Outputs under `run.output_dir`: `metrics.jsonl` (one
line per step), `tensorboard/` event files, `checkpoints/STEP` (Orbax: params, optimizer state,
step, data position, RNG seed, the config, the model's config and tokenizer location),
`config.json` (the resolved config). Only process 0 writes logs; every process takes part in
checkpoints. An output dir that already has checkpoints is only continued with `--resume`; a
finished run (its newest checkpoint at `run.steps`) says so and exits.

A training checkpoint loads like a converted one: `python -m qwq_jax.sample --checkpoint
RUN/checkpoints/STEP`, `python -m convert export-hf RUN/checkpoints/STEP OUT`, `qwq_jax.load(...)`
(the float32 master weights; `qwq_jax.checkpoint.load_tokenizer` gives its tokenizer).

LoRA ([lora] rank >= 1): adapters on a frozen base (model.dtype, or int8 with model.quantize =
"int8": QLoRA) are all that is trained; a checkpoint then holds the adapters and their optimizer
state only (megabytes), and --resume rebuilds the base from model.path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import textwrap
import time
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

from qwq_jax.rl.grpo import GRPOConfig


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


# ---- the config -------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelConfig:
    path: str = "preset:tiny"      # a `python -m convert` output dir, or preset:NAME (random weights)
    tokenizer: str | None = None   # dir with tokenizer.json; default: the checkpoint dir ("bytes" for presets)
    dtype: str = "bfloat16"        # compute dtype (master weights are float32; a LoRA run's frozen base is held in it)
    quantize: str | None = None    # "int8": the frozen base of a LoRA run in weight-only int8 (QLoRA); needs [lora]
    remat: str = "full"            # activation checkpointing policy (qwq_jax.model.REMAT_POLICIES)
    attention: str = "auto"        # attention backend (qwq_jax.attention): auto = cuDNN / splash / xla by platform


@dataclasses.dataclass
class LoraSection:
    """LoRA adapters (qwq_jax/lora.py): rank 0 = off (full fine-tuning); rank >= 1 trains only the
    adapters, y = x W + (alpha / rank) x A B on each target, on the frozen base."""
    rank: int = 0
    alpha: float | None = None      # default: 2 x rank (scale 2)
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"])


@dataclasses.dataclass
class DataConfig:
    source: str = "synthetic:arithmetic"  # JSONL of {prompt, answer} / {prompt, tests}, or synthetic:NAME
    prompts_per_step: int = 4       # prompts per step; rows = prompts_per_step x rl.group_size
    chat_template: bool = True      # wrap prompts in the tokenizer's chat template when it has one
    system_prompt: str | None = None
    max_prompt_tokens: int = 1024   # longer prompts are an error naming the example
    eval_source: str | None = None  # held-out JSONL (synthetic tasks: a held-out draw by default)
    eval_every: int = 0             # greedy evaluation every N steps (0: never)
    eval_size: int = 16


@dataclasses.dataclass
class RewardsConfig:
    math: float = 1.0       # weight of the math-verify answer check ({prompt, answer} examples)
    format: float = 0.0     # weight of "one reasoning block, then an answer"
    code: float = 0.0       # weight of the fraction of tests passed in the sandbox ({prompt, tests} examples)
    custom: str | None = None  # "module:function", fn(examples, texts) -> list of floats (your own verifier)
    custom_weight: float = 1.0
    workers: int = 2        # math-verify worker processes (per host)
    timeout: float = 5.0    # seconds per math answer
    code_timeout: float = 10.0  # seconds per sandboxed test run


@dataclasses.dataclass
class SandboxConfig:
    """The code reward's sandbox (qwq_jax/rl/sandbox.py)."""
    packages: list[str] = dataclasses.field(default_factory=list)  # importable besides the stdlib, e.g. ["numpy"]
    allow_weaker: bool = False  # run programs where the private filesystem view cannot be built (see sandbox.py)


@dataclasses.dataclass
class RunConfig:
    steps: int = 100                # optimizer steps (the learning-rate schedule spans them)
    mesh: str = "fsdp=-1"           # data=..,fsdp=..,tensor=.. over every device of every host
    output_dir: str = "runs/grpo"
    save_every: int = 50            # checkpoint every N steps (and at the end); 0: only at the end
    keep: int = 3                   # checkpoints kept
    async_checkpoint: bool = True   # write checkpoints in the background while training goes on
    seed: int = 0


RL_FIELDS = tuple(f.name for f in dataclasses.fields(GRPOConfig) if f.name not in ("total_steps", "seed"))


@dataclasses.dataclass
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rl: dict = dataclasses.field(default_factory=dict)  # GRPOConfig fields (not total_steps / seed: see run)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    rewards: RewardsConfig = dataclasses.field(default_factory=RewardsConfig)
    sandbox: SandboxConfig = dataclasses.field(default_factory=SandboxConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)

    def grpo(self) -> GRPOConfig:
        try:
            return GRPOConfig(**self.rl, total_steps=self.run.steps, seed=self.run.seed)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[rl]: {e}") from None

    def lora_config(self, rank: int | None = None):
        """The `lora.LoraConfig` of [lora] (with `rank` in place of lora.rank when given), or None
        (rank 0: full fine-tuning)."""
        from qwq_jax.lora import LoraConfig

        rank = self.lora.rank if rank is None else rank
        if not rank:
            return None
        alpha = self.lora.alpha if self.lora.alpha is not None else 2.0 * rank
        try:
            return LoraConfig(rank=rank, alpha=alpha, targets=tuple(self.lora.targets))
        except ValueError as e:
            raise ConfigError(f"[lora]: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraSection, "rewards": RewardsConfig,
            "sandbox": SandboxConfig, "run": RunConfig}


def _check_type(where: str, value: Any, hint: Any) -> Any:
    """`value` as the field type `hint` (ints widen to floats); ConfigError otherwise."""
    if typing.get_origin(hint) is list:
        kind = typing.get_args(hint)[0]
        if isinstance(value, list) and all(isinstance(v, kind) for v in value):
            return list(value)
        raise ConfigError(f"{where} must be a list of {kind.__name__}, got {value!r}")
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    kinds = [a for a in args if a is not type(None)] or [hint]
    for kind in kinds:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
    raise ConfigError(f"{where} must be {names}, got {value!r}")


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    cfg = TrainConfig()
    for section, values in data.items():
        if section == "rl":
            if not isinstance(values, Mapping):
                raise ConfigError("[rl] must be a table")
            for key in values:
                if key not in RL_FIELDS:
                    hint = " (set run.steps / run.seed instead)" if key in ("total_steps", "seed") else ""
                    raise ConfigError(f"unknown key rl.{key}{hint}; known: {', '.join(RL_FIELDS)}")
            cfg.rl.update(values)
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}]; known: {', '.join(['rl', *SECTIONS])}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"[{section}] must be a table")
        cls, target = SECTIONS[section], getattr(cfg, section)
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown key {section}.{key}; known: {', '.join(hints)}")
            setattr(target, key, _check_type(f"{section}.{key}", value, hints[key]))
    _check_values(cfg)
    return cfg


def _check_values(cfg: TrainConfig) -> None:
    """Everything about `cfg` that needs no file, device or import of the user's: enums, ranges,
    and that the batch splits into micro-batches."""
    from qwq_jax.attention import BACKENDS
    from qwq_jax.model import DTYPES, REMAT_POLICIES
    from qwq_jax.rl.data import SYNTHETIC

    m, d, r, run = cfg.model, cfg.data, cfg.rewards, cfg.run
    for key, value, low in (("data.prompts_per_step", d.prompts_per_step, 1), ("data.max_prompt_tokens",
                            d.max_prompt_tokens, 1), ("data.eval_every", d.eval_every, 0), ("data.eval_size",
                            d.eval_size, 1), ("rewards.workers", r.workers, 1), ("run.steps", run.steps, 1),
                            ("run.save_every", run.save_every, 0), ("run.keep", run.keep, 1),
                            ("lora.rank", cfg.lora.rank, 0), ("run.seed", run.seed, 0)):
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    g = cfg.grpo()  # validates [rl] (run.steps checked above: it is GRPOConfig.total_steps)
    for key, value, known in (("model.attention", m.attention, BACKENDS), ("model.remat", m.remat, REMAT_POLICIES),
                              ("model.dtype", m.dtype, DTYPES), ("rl.mu_dtype", g.mu_dtype, (None, *DTYPES))):
        if value not in known:
            raise ConfigError(f"{key}={value!r}; known: {', '.join(k for k in known if k)}")
    from qwq_jax.model import QUANT_MODES

    cfg.lora_config(rank=max(cfg.lora.rank, 1))  # validates [lora], also when off
    if m.quantize is not None and m.quantize not in QUANT_MODES:
        raise ConfigError(f"model.quantize={m.quantize!r}; known: {', '.join(QUANT_MODES)} (or unset)")
    if m.quantize is not None and not cfg.lora.rank:
        raise ConfigError(f"model.quantize={m.quantize!r} needs LoRA ([lora] rank >= 1): only adapters train on a "
                          "quantized base")
    for key, value in (("rewards.timeout", r.timeout), ("rewards.code_timeout", r.code_timeout)):
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if not any((r.math, r.format, r.code, r.custom and r.custom_weight)):
        raise ConfigError("every reward weight is 0: set rewards.math, rewards.format, rewards.code or "
                          "rewards.custom")
    for key, source in (("data.source", d.source), ("data.eval_source", d.eval_source)):
        if source and source.startswith("synthetic:") and source.split(":", 1)[1] not in SYNTHETIC:
            raise ConfigError(f"{key}={source!r}: unknown synthetic task; known: "
                              f"{', '.join('synthetic:' + n for n in sorted(SYNTHETIC))}")
    if d.eval_every and not d.eval_source and not d.source.startswith("synthetic:"):
        raise ConfigError("data.eval_every is set but there is no data.eval_source (a held-out JSONL)")
    rows = d.prompts_per_step * g.group_size
    if rows % g.micro_batches:
        fits = [n for n in range(1, rows + 1) if rows % n == 0]
        raise ConfigError(f"rl.micro_batches={g.micro_batches} does not divide the {rows} rows of a step "
                          f"(data.prompts_per_step={d.prompts_per_step} x rl.group_size={g.group_size}); "
                          f"use one of {', '.join(map(str, fits))}")


def _model_source(cfg: TrainConfig):
    """(QwenConfig of model.path, the tokenizer dir or None for the byte tokenizer); ConfigError
    naming the fix when model.path or model.tokenizer cannot be used. Reads only small files."""
    from qwq_jax import checkpoint
    from qwq_jax.config import QwenConfig

    m = cfg.model
    if m.path.startswith("preset:"):
        try:
            qcfg = QwenConfig.preset(m.path.split(":", 1)[1])
        except (KeyError, ValueError) as e:
            raise ConfigError(f"model.path={m.path!r}: {e}") from None
        tok_dir = None
    else:
        try:
            qcfg = checkpoint.read_config(m.path)
            tok_dir = checkpoint.tokenizer_dir(m.path)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"model.path: {e}") from None
    if m.tokenizer == "bytes":
        tok_dir = None
    elif m.tokenizer is not None:
        tok_dir = Path(m.tokenizer)
    if tok_dir is None:
        if qcfg.vocab_size < 257:
            raise ConfigError(f"the byte tokenizer needs a vocabulary of >= 257; the model has {qcfg.vocab_size}")
    elif not (tok_dir / "tokenizer.json").is_file():
        raise ConfigError(f"no tokenizer.json in {tok_dir}: set model.tokenizer to a directory that has one "
                          "(or \"bytes\" for a tiny model)")
    return qcfg, tok_dir


RUN_FILES = ("checkpoints", "config.json", "metrics.jsonl", "tensorboard")  # what a run writes in run.output_dir


def validate(cfg: TrainConfig) -> None:
    """Check what `config_from_dict` cannot: model.path and model.tokenizer usable, data files
    present, rewards.custom importable, the code sandbox as strong as asked (rewards.code). Reads small
    files only (no weights, no devices)."""
    from qwq_jax.rl.data import DataError, load_source

    _model_source(cfg)
    for key, source in (("data.source", cfg.data.source), ("data.eval_source", cfg.data.eval_source)):
        if source and not source.startswith("synthetic:"):
            if not Path(source).is_file():
                raise ConfigError(f"{key}={source!r}: file not found")
            try:
                load_source(source, seed=cfg.run.seed)
            except DataError as e:
                raise ConfigError(f"{key}: {e}") from None
    if cfg.rewards.custom and cfg.rewards.custom_weight:
        _import_function(cfg.rewards.custom)
    if cfg.rewards.code:
        _check_sandbox(cfg.sandbox)
    if not str(cfg.run.output_dir).strip():
        raise ConfigError("run.output_dir is empty; name the run's own directory (e.g. runs/grpo)")
    out = Path(cfg.run.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.output_dir={str(out)!r} is a file")
    if out.is_dir():  # a run writes config.json there: never into a model or another tool's directory
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))
        if foreign:
            raise ConfigError(f"run.output_dir={str(out)!r} holds files no training run writes ("
                              f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): it may be a model or "
                              "other work that the run would overwrite; choose a new or empty directory")


def _parse_value(text: str) -> Any:
    """A TOML value (`8`, `0.5`, `true`, `"x"`, `[1, 2]`), or the bare text as a string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The config in `path` (TOML or JSON; None: all defaults) with `section.key=value` overrides."""
    data: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".json":
                data = json.loads(text)
            else:
                import tomllib

                data = tomllib.loads(text)
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (not UTF-8); give a TOML or JSON config") from None
        except (ValueError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config is an object of sections ([model], [rl], [run], ...), not "
                              f"{type(data).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. run.steps=10")
        data.setdefault(section, {})[name] = _parse_value(value.strip())
    return config_from_dict(data)


# ---- the pieces of a run ------------------------------------------------------------------------
def build_model(cfg: TrainConfig, mesh):
    """(model sharded by the train rules, tokenizer) from `cfg.model`."""
    import jax.numpy as jnp
    from flax import nnx

    from qwq_jax import checkpoint
    from qwq_jax.attention import check_backend
    from qwq_jax.model import Qwen2
    from qwq_jax.tokenizer import ByteTokenizer, Tokenizer
    from sharding import init_sharded

    m = cfg.model
    qcfg, tok_dir = _model_source(cfg)
    lora = cfg.lora_config()
    try:
        check_backend(m.attention)
    except ValueError as e:
        raise ConfigError(f"model.attention={m.attention!r}: {e}") from None
    if m.path.startswith("preset:"):
        param_dtype = m.dtype if lora is not None else jnp.float32  # a frozen base is held in the compute dtype
        model = init_sharded(lambda: Qwen2(qcfg, rngs=nnx.Rngs(cfg.run.seed), param_dtype=param_dtype,
                                           dtype=m.dtype, remat=m.remat, attention_backend=m.attention),
                             mesh, "train")
        if m.quantize is not None:
            from qwq_jax.quant import quantize

            model = quantize(model, m.quantize, donate=True)
    else:
        extra = {"dtype": m.dtype, "quant": m.quantize} if lora is not None else {}
        model = checkpoint.load(m.path, mesh=mesh, rules="train", compute_dtype=m.dtype, remat=m.remat,
                                attention_backend=m.attention, **extra)
    if lora is not None:
        from qwq_jax.lora import attach

        model = attach(model, lora, seed=cfg.run.seed, mesh=mesh, rules="train")
    tokenizer = ByteTokenizer() if tok_dir is None else Tokenizer.from_dir(tok_dir)
    return model, tokenizer


class Rewards:
    """The configured reward mix over the examples of the current batch (`self.examples`)."""

    def __init__(self, cfg: RewardsConfig, sandbox: SandboxConfig | None = None):
        self.cfg, self.sandbox = cfg, sandbox or SandboxConfig()
        self.weights = {name: w for name in ("math", "format", "code") if (w := getattr(cfg, name))}
        if "code" in self.weights:
            _check_sandbox(self.sandbox)
        self.custom = None
        if cfg.custom and cfg.custom_weight:
            self.custom = _import_function(cfg.custom)
            self.weights["custom"] = cfg.custom_weight
        if not self.weights:
            raise ConfigError("every reward weight is 0: set rewards.math, rewards.format, rewards.code or "
                              "rewards.custom")
        self.verifier = None
        if "math" in self.weights:
            from qwq_jax.rl.rewards import MathVerifier

            self.verifier = MathVerifier(num_workers=cfg.workers, timeout=cfg.timeout)
        self.examples: list[dict] = []
        self.think_opened: list[bool] = []

    def __call__(self, prompt_indices, completions) -> dict[str, list[float]]:
        from qwq_jax.rl.rewards import code_reward, combine, format_reward, math_reward

        texts = [c.text or "" for c in completions]
        exs = [self.examples[i] for i in prompt_indices]
        parts: dict[str, list[float]] = {}
        if "math" in self.weights:
            rows = [k for k, ex in enumerate(exs) if "answer" in ex]
            scores = math_reward([texts[k] for k in rows], [exs[k]["answer"] for k in rows], self.verifier)
            parts["math"] = _scatter(len(exs), rows, scores)
        if "code" in self.weights:
            rows = [k for k, ex in enumerate(exs) if "tests" in ex]
            scores = code_reward([texts[k] for k in rows], [exs[k]["tests"] for k in rows],
                                 timeout=self.cfg.code_timeout, packages=self.sandbox.packages,
                                 allow_weaker=self.sandbox.allow_weaker)
            parts["code"] = _scatter(len(exs), rows, scores)
        if "format" in self.weights:
            parts["format"] = [format_reward([t], prompt_ends_in_think=self.think_opened[i])[0]
                               for t, i in zip(texts, prompt_indices)]
        if self.custom is not None:
            scores = [float(x) for x in self.custom(exs, texts)]
            if len(scores) != len(texts):
                raise ValueError(f"rewards.custom={self.cfg.custom} returned {len(scores)} scores for {len(texts)} texts")
            parts["custom"] = scores
        parts["reward"] = combine(parts, self.weights)
        return parts

    def close(self) -> None:
        if self.verifier is not None:
            self.verifier.close()


def _check_sandbox(cfg: SandboxConfig) -> None:
    """ConfigError (one line) where the code sandbox lacks its private filesystem view and
    sandbox.allow_weaker is not set, or an allow-listed package is not installed."""
    from qwq_jax.rl.sandbox import SandboxUnavailable, check_isolation

    try:
        check_isolation(cfg.allow_weaker, packages=cfg.packages)
    except (SandboxUnavailable, ValueError) as e:
        raise ConfigError(str(e)) from None


def _import_function(spec: str):
    import importlib

    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"rewards.custom={spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rewards.custom={spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"rewards.custom={spec!r} is not callable")
    return fn


def _scatter(n: int, rows: list[int], values: Sequence[float]) -> list[float]:
    out = [0.0] * n
    for k, v in zip(rows, values):
        out[k] = float(v)
    return out


def encode_prompts(examples: Sequence[dict], tokenizer, cfg: DataConfig) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each example's prompt (in the chat template when configured), and whether the
    prompt already opens a reasoning block (QwQ's template ends in "<think>\\n")."""
    from qwq_jax.tokenizer import Tokenizer

    ids, opened = [], []
    for ex in examples:
        text = ex["prompt"]
        if cfg.chat_template and getattr(tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + \
                [{"role": "user", "content": text}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        elif cfg.system_prompt:
            text = f"{cfg.system_prompt}\n\n{text}"
        tokens = tokenizer.encode(text)
        if len(tokens) > cfg.max_prompt_tokens:
            raise ConfigError(f"prompt of {len(tokens)} tokens > data.max_prompt_tokens={cfg.max_prompt_tokens}: "
                              f"{ex['prompt'][:80]!r}...")
        ids.append(tokens)
        opened.append(Tokenizer.prompt_ends_in_think(text))
    return ids, opened


class MetricsLog:
    """metrics.jsonl + TensorBoard events (process 0 only). On resume, lines past the resumed step
    are dropped from metrics.jsonl and TensorBoard purges its events past it."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        self.path = out / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self.fh = self.path.open("a")
        writer = _summary_writer_class()
        self.writer = writer(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(metrics) + "\n")
        self.fh.flush()
        step = int(metrics["step"])
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"train/{key}" if not key.startswith("eval_") else f"eval/{key[5:]}",
                                       value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            self.writer.close()


def _summary_writer_class():
    """tensorboardX's `SummaryWriter`, imported without torch: its writer module imports torch when it is
    installed (3.5 s here, most of a tiny run's start-up) only to accept torch tensors, and we log
    Python floats. Where torch is already imported it is left alone."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class Checkpoints:
    """Orbax CheckpointManager over `dir`: trainer state + JSON metadata, keep K, async."""

    def __init__(self, directory: Path, keep: int, async_save: bool):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            directory.absolute(), options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        args = self.ocp.args
        self.manager.save(step, args=args.Composite(state=args.StandardSave(state), meta=args.JsonSave(meta)),
                          force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        args = self.ocp.args
        out = self.manager.restore(step, args=args.Composite(state=args.StandardRestore(abstract_state),
                                                              meta=args.JsonRestore()))
        return out["state"], out["meta"]

    def meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint `step` alone (no arrays read)."""
        return self.manager.restore(step, args=self.ocp.args.Composite(meta=self.ocp.args.JsonRestore()))["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_resumable(cfg: TrainConfig, ckpt: Checkpoints, step: int) -> None:
    """ConfigError (before any weight loads) where checkpoint `step` is of another run: its seed or
    its [lora] (adapters of another shape, or none) differ from `cfg`'s."""
    meta = ckpt.meta(step)
    problem = None
    if meta.get("seed") != cfg.run.seed:
        problem = f"run.seed={meta.get('seed')}, the config says {cfg.run.seed}"
    saved_lora = (meta.get("config") or {}).get("lora", {"rank": 0})
    if (saved_lora.get("rank") or cfg.lora.rank) and saved_lora != cfg.to_dict()["lora"]:
        problem = f"[lora] {saved_lora}, the config says {cfg.to_dict()['lora']}"
    if problem:
        ckpt.close()
        raise ConfigError(f"the checkpoint was written with {problem}: resuming would not continue the same run")


def run(cfg: TrainConfig, resume: bool = False) -> list[dict]:
    """Train as configured; returns the metrics of the steps run (on every process)."""
    import jax
    from tqdm import tqdm

    from qwq_jax.cli import phase
    from qwq_jax.rl.data import PromptStream, load_source, synthetic_examples
    from qwq_jax.rl.grpo import GRPOTrainer
    from sharding import make_mesh

    grpo_cfg = cfg.grpo()
    validate(cfg)
    out = Path(cfg.run.output_dir)
    lead = jax.process_index() == 0
    ckpt = Checkpoints(out / "checkpoints", cfg.run.keep, cfg.run.async_checkpoint)
    latest = ckpt.latest()
    if latest is not None and not resume:
        ckpt.close()
        raise ConfigError(f"{out / 'checkpoints'} already holds checkpoints (newest: step {latest}); pass --resume to "
                          "continue that run, or choose another run.output_dir")
    if latest is None and resume and lead:
        print(f"--resume: no checkpoint in {out / 'checkpoints'} yet; starting at step 0", file=sys.stderr)
    if latest is not None and latest >= cfg.run.steps:
        ckpt.close()
        if lead:
            print(f"{out} is finished: its newest checkpoint is step {latest} of run.steps={cfg.run.steps}; "
                  f"to train further, raise run.steps (e.g. --set run.steps={cfg.run.steps * 2}); to sample from "
                  f"it: python -m qwq_jax.sample --checkpoint {out / 'checkpoints' / str(latest)}", flush=True)
        return []
    if latest is not None:
        _check_resumable(cfg, ckpt, latest)
    try:
        mesh = make_mesh(cfg.run.mesh)
    except ValueError as e:
        ckpt.close()
        raise ConfigError(f"run.mesh={cfg.run.mesh!r}: {e}") from None
    from sharding.rules import batch_shards

    rows, shards = cfg.data.prompts_per_step * grpo_cfg.group_size, batch_shards(mesh, "train")
    if (rows // grpo_cfg.micro_batches) % shards:
        ckpt.close()
        raise ConfigError(f"micro-batch of {rows // grpo_cfg.micro_batches} rows does not split over the {shards} "
                          f"batch shards of run.mesh={cfg.run.mesh!r} (data x fsdp); make data.prompts_per_step x "
                          f"rl.group_size / rl.micro_batches a multiple of {shards}")
    examples = load_source(cfg.data.source, seed=cfg.run.seed)
    eval_examples = None
    if cfg.data.eval_every:
        if cfg.data.eval_source:
            eval_examples = load_source(cfg.data.eval_source, seed=cfg.run.seed + 1)[: cfg.data.eval_size]
        elif cfg.data.source.startswith("synthetic:"):
            eval_examples = synthetic_examples(cfg.data.source.split(":", 1)[1], cfg.data.eval_size,
                                               seed=cfg.run.seed + 10_007)

    with phase(f"loading {cfg.model.path}", lead):
        model, tokenizer = build_model(cfg, mesh)
    _, tok_dir = _model_source(cfg)
    model_meta = {"model_config": model.config.to_hf(),
                  "tokenizer": str(tok_dir.absolute()) if tok_dir is not None else "bytes"}
    rewards = Rewards(cfg.rewards, cfg.sandbox)
    eval_rewards = Rewards(cfg.rewards, cfg.sandbox) if eval_examples else None
    trainer = GRPOTrainer(model, grpo_cfg, rewards, tokenizer=tokenizer, mesh=mesh)
    del model
    stream = PromptStream(examples, cfg.data.prompts_per_step, cfg.run.seed)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    if latest is not None:
        with phase(f"restoring {out / 'checkpoints' / str(latest)}", lead):
            state, meta = ckpt.restore(latest, trainer.abstract_state())
        trainer.load_state(state, meta["step"])
        stream.position = int(meta["data_position"])
    log = MetricsLog(out, lead, trainer.step_count if latest is not None else None)

    history: list[dict] = []
    t_start = time.perf_counter()
    bar = tqdm(total=cfg.run.steps, initial=trainer.step_count, disable=not lead, desc=grpo_cfg.loss, unit="step",
               dynamic_ncols=True)
    bar.set_postfix_str("compiling the first step")
    try:
        while trainer.step_count < cfg.run.steps:
            batch = stream.next_batch()
            prompts, opened = encode_prompts(batch, tokenizer, cfg.data)
            rewards.examples, rewards.think_opened = batch, opened
            metrics = trainer.step(prompts)
            metrics["data_position"] = stream.position
            step = trainer.step_count
            if eval_rewards is not None and step % cfg.data.eval_every == 0:
                eval_prompts, eval_rewards.think_opened = encode_prompts(eval_examples, tokenizer, cfg.data)
                eval_rewards.examples = eval_examples
                metrics.update(trainer.evaluate(eval_prompts, eval_rewards))
            log.write(metrics)
            history.append(metrics)
            if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == cfg.run.steps:
                ckpt.save(step, trainer.state(), {"step": step, "data_position": stream.position,
                                                  "seed": cfg.run.seed, "config": cfg.to_dict(), **model_meta})
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.4f}")
    finally:
        bar.close()
        ckpt.close()
        log.close()
        rewards.close()
        if eval_rewards is not None:
            eval_rewards.close()
    if lead:
        elapsed = time.perf_counter() - t_start
        first = history[0]["reward_mean"] if history else float("nan")
        last = history[-1]["reward_mean"] if history else float("nan")
        print(f"trained steps {trainer.step_count - len(history)}..{trainer.step_count} in {elapsed:.1f}s: "
              f"reward {first:.3f} -> {last:.3f}; checkpoints in {out / 'checkpoints'}, metrics in "
              f"{out / 'metrics.jsonl'}", flush=True)
    return history


def main(argv: Sequence[str] | None = None) -> int:
    from qwq_jax import compile_cache
    from qwq_jax.cli import OneLineParser
    from qwq_jax.rl.data import DataError
    from sharding import add_distributed_args, init_distributed

    parser = OneLineParser(prog="python -m qwq_jax.train", description="\n\n".join(__doc__.split("\n\n")[1:3]),
                            epilog=_help_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML or JSON config file (sections model, data, rl, lora, rewards, sandbox, "
                        "run)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set rl.loss=dapo --set run.steps=10")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_distributed_args(parser)
    compile_cache.add_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        validate(cfg)  # the whole config, before any device or weight
    except ConfigError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    try:
        compile_cache.enable(args.xla_cache)  # before the first jit: later runs reuse the compiled programs
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    try:
        init_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)
        run(cfg, resume=args.resume)
    except (ConfigError, DataError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # e.g. a checkpoint removed while starting
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _help_epilog() -> str:
    """The config sections and their keys (from the dataclasses), and where the defaults are."""
    lines = ["config sections and keys (defaults: `--print-config` prints the resolved config; the",
             "dataclasses ModelConfig, DataConfig, LoraSection, RewardsConfig, SandboxConfig, RunConfig in",
             "qwq_jax/train.py and GRPOConfig in qwq_jax/rl/grpo.py document each key):"]
    keys = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
    keys["rl"] = list(RL_FIELDS)
    for name in ("model", "data", "rl", "lora", "rewards", "sandbox", "run"):
        lines += textwrap.wrap(", ".join(keys[name]), 100, initial_indent=f"  [{name}] ".ljust(12),
                               subsequent_indent=" " * 12)
    lines += ["", "after training: python -m qwq_jax.sample --checkpoint RUN_DIR/checkpoints/STEP --prompt ...",
              "               python -m convert export-hf RUN_DIR/checkpoints/STEP HF_OUT"]
    return "\n".join(lines)


if __name__ == "__main__":
    from qwq_jax.cli import run_main

    run_main(main)
