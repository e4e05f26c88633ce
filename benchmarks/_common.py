"""What the benchmark scripts share: preset configs, random-weight models on both sides, child
processes, FLOP counts, peak FLOP/s by device, JSON lines.

Each script runs every implementation in a child process of its own (`--child NAME`, the same
command line otherwise), so neither holds the other's memory and both see the same device.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMPL_NAMES = {"ours": "qwq-jax", "hf": "hf-transformers-sdpa"}

# Dense bf16 peak FLOP/s per chip, by a substring of the device kind (first match wins).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),       # SXM
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),       # v5p
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
]


# Peak HBM bandwidth in bytes/s per chip, by a substring of the device kind (first match wins).
PEAK_HBM_BYTES_PER_S: list[tuple[str, float]] = [
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),      # SXM, HBM3
    ("H200", 4.8e12),
    ("H800", 3.35e12),
    ("A100", 2.0e12),       # 80 GB
    ("TPU v4", 1.2e12),
    ("TPU v5 lite", 0.819e12),
    ("TPU v5e", 0.819e12),
    ("TPU v5", 2.765e12),
    ("TPU v6 lite", 1.64e12),
    ("TPU v6e", 1.64e12),
]


def _by_kind(table: list[tuple[str, float]], device_kind: str) -> float | None:
    """The first entry of `table` whose key is a substring of `device_kind`; None if none (CPU)."""
    return next((v for key, v in table if key.lower() in device_kind.lower()), None)


def peak_bandwidth(device_kind: str) -> float | None:
    """Peak HBM bytes/s of a device kind; None if unknown (CPU)."""
    return _by_kind(PEAK_HBM_BYTES_PER_S, device_kind)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak of a device kind ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...); None if unknown (CPU)."""
    return _by_kind(PEAK_BF16_FLOPS, device_kind)


# ---- configs and FLOPs ----------------------------------------------------------------------
def preset_config(preset: str, layers: int | None = None):
    """A preset with EOS/BOS disabled (benchmarks generate fixed lengths), optionally fewer layers."""
    from qwq_jax.config import QwenConfig

    cfg = QwenConfig.preset(preset).replace(eos_token_id=None, bos_token_id=None)
    return cfg.replace(num_layers=layers) if layers else cfg


def layer_matmul_params(cfg) -> int:
    """Weights one token multiplies through in one decoder layer (q, k, v, o, gate, up, down)."""
    e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    return e * cfg.num_heads * d * 2 + 2 * e * cfg.num_kv_heads * d + 3 * e * f


def attention_flops(cfg, batch: int, seq: int) -> float:
    """Causal self-attention forward: QK^T and PV, 2 x 2·T²·H·D per layer, halved by causality."""
    return 4 * cfg.num_layers * batch * seq * seq * cfg.num_heads * cfg.head_dim / 2


def forward_flops(cfg, batch: int, seq: int, logit_positions: int) -> float:
    """Forward FLOPs of `batch` sequences of `seq` tokens with logits at `logit_positions` per row
    (the embedding lookup is free; the lm_head counts where logits are computed)."""
    layers = 2 * cfg.num_layers * layer_matmul_params(cfg) * batch * seq
    head = 2 * cfg.hidden_size * cfg.vocab_size * batch * logit_positions
    return layers + head + attention_flops(cfg, batch, seq)


# ---- models with random weights -------------------------------------------------------------
def build_ours(cfg, dtype: Any, *, param_dtype: Any = None, attention: str = "auto", remat: str = "none",
               seed: int = 0):
    """Our model with random weights on one device, built by `random_state`: peak memory is the
    weights plus one layer's draw (one jitted init of the whole model needs several stacked
    weights' worth of temporaries: QwQ-32B's bf16 weights then no longer fit next to them on an H100)."""
    import jax
    from flax import nnx

    from qwq_jax import Qwen2
    from sharding import make_mesh
    from sharding.rules import state_shardings

    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype or dtype, dtype=dtype,
                                            attention_backend=attention, remat=remat))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, make_mesh("fsdp=1", jax.devices()[:1]), "generate")
    return nnx.merge(graphdef, random_state(state, shardings, seed))


def random_state(abstract: Any, shardings: Any, seed: int = 0) -> Any:
    """Arrays for an abstract parameter tree: norm scales 1, biases 0, other weights N(0, 0.02) (as
    Qwen2 initialises them). One jitted call per parameter, and per layer for a layer-stacked one
    (written into a donated buffer), so no call's temporaries exceed one layer's draw."""
    import jax
    import jax.numpy as jnp

    root = jax.random.key(seed)
    counter = iter(range(1 << 30))

    def make(path, leaf, sharding):
        name = jax.tree_util.keystr(path)
        shape, dtype = tuple(leaf.shape), leaf.dtype
        if "scale" in name or "bias" in name:
            fill = jnp.ones if "scale" in name else jnp.zeros
            return jax.jit(lambda: fill(shape, dtype), out_shardings=sharding)()
        key = jax.random.fold_in(root, next(counter))
        if len(shape) < 3 or not name.startswith("['layers']"):
            return jax.jit(lambda: _normal(key, shape, dtype), out_shardings=sharding)()
        buf = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
        for i in range(shape[0]):
            buf = fill_layer()(buf, key, i)
        return buf

    return jax.tree_util.tree_map_with_path(make, abstract, shardings)


def _normal(key, shape, dtype):
    import jax
    import jax.numpy as jnp

    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _fill_layer(buf, key, i):
    """`buf[i] = N(0, 0.02)` drawn with `fold_in(key, i)`; `buf` is donated (updated in place)."""
    import jax

    layer = _normal(jax.random.fold_in(key, i), buf.shape[1:], buf.dtype)
    return jax.lax.dynamic_update_index_in_dim(buf, layer, i, 0)


@functools.lru_cache(maxsize=None)
def fill_layer() -> Callable[..., Any]:
    """The jitted `_fill_layer`, its buffer donated."""
    import jax

    return jax.jit(_fill_layer, donate_argnums=0)


def graphdef_with_attention(cfg, dtype: Any, attention: str, remat: str = "none"):
    """The graph of our model with another attention backend (the same parameter tree), to run
    the same weights through the reference: `nnx.merge(graphdef_with_attention(...), params)`."""
    from flax import nnx

    from qwq_jax import Qwen2

    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype,
                                            attention_backend=attention, remat=remat))
    return nnx.split(abstract)[0]


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_hf(cfg, dtype: Any, device: str):
    """transformers' Qwen2ForCausalLM with random weights of the same config, SDPA attention."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device(device):
        return Qwen2ForCausalLM._from_config(Qwen2Config(**cfg.to_hf()), dtype=dtype, attn_implementation="sdpa")


def device_kind(impl: str) -> str:
    if impl == "hf":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    import jax

    return jax.devices()[0].device_kind


def timed(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[Any], Any] = lambda x: x) -> float:
    """Median wall time of `fn()` over `iters` calls after `warmup` calls (compilation included there)."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def collect_attention_fallbacks() -> list[str]:
    """A list that fills with the attention module's fallback messages (from now on, this process)."""
    messages: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logging.getLogger("qwq_jax.attention").addHandler(Handler(logging.WARNING))
    return messages


def error_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


# ---- command line, children, output ---------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows every default."""


def add_common_args(p: argparse.ArgumentParser, preset: str) -> None:
    p.add_argument("--preset", default=preset, help="model shape (qwq_jax.config presets)")
    p.add_argument("--random-weights", action="store_true", default=True,
                   help="random weights of the preset's shape (the only mode for now: no checkpoint is read)")
    p.add_argument("--impl", nargs="+", choices=tuple(IMPL_NAMES), default=list(IMPL_NAMES),
                   help="implementations to run")
    p.add_argument("--tiny", action="store_true", help="tiny fp32 model, short run: a CPU smoke test (CI)")
    p.add_argument("--child", choices=tuple(IMPL_NAMES), help=argparse.SUPPRESS)


def apply_tiny(p: argparse.ArgumentParser, args: argparse.Namespace, **settings: Any) -> None:
    """`--tiny`'s settings, except for options the command line changed from their defaults (so a
    smoke run can be narrowed further, as benchmarks/device_suite.sh --tiny does)."""
    for name, value in settings.items():
        if getattr(args, name) == p.get_default(name):
            setattr(args, name, value)


def run_child(script: str, impl: str, argv: Sequence[str] | None = None) -> Any:
    """Run `script` again with `--child impl` (same arguments otherwise); its last stdout line, parsed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # JAX takes 75% of GPU memory by default: too little for the 32B shape's 65 GB of bf16 weights on an H100.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    print(f"running {IMPL_NAMES[impl]} ...", file=sys.stderr, flush=True)
    r = subprocess.run([sys.executable, script, *argv, "--child", impl], capture_output=True, text=True, env=env)
    if r.returncode != 0 or not r.stdout.strip():
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"{IMPL_NAMES[impl]} failed (exit code {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.5g}")
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def emit(record: dict) -> None:
    """One JSON line on stdout (floats to 5 significant digits)."""
    print(json.dumps(_clean(record)), flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def peer_tree(rev: str, where: Path) -> Path:
    """`rev` of this repository checked out at `where` (reused when it is already there)."""
    want = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True)
    if want.returncode != 0:
        raise SystemExit(f"--peer-rev {rev!r}: not a revision of {ROOT} ({want.stderr.strip()})")
    commit = want.stdout.strip()
    if (where / ".git").exists():
        have = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True)
        if have.stdout.strip() == commit:
            return where
        raise SystemExit(f"--peer-dir {where} holds another revision; remove it (`git worktree remove {where}`)")
    r = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), commit],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"git worktree add {where} {commit}: {r.stderr.strip()}")
    return where
