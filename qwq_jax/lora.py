"""LoRA adapters on the decoder's matmul weights (the first step of LoRA / QLoRA GRPO).

    model = init_model(cfg, lora=LoraConfig(rank=64, alpha=128, targets=("q_proj", "v_proj")))
    y = x W + (alpha / rank) (x A) B       # every targeted projection, A [in, r], B [r, out]

A target's weight `W` keeps its shape and logical axes (and may be int8: `quant="int8"` makes the
QLoRA layout, a frozen int8 base with float adapters). Beside it the module holds `<name>_lora_a`
(axes: the weight's contracted axes, then `lora`) and `<name>_lora_b` (`lora`, then the weight's
output axes), stacked over `layers` like every layer weight, as `LoRAParam` variables: `B` starts at
zero, so a new adapter leaves the model's outputs exactly as the base's; `A` starts normal with
std 1/sqrt(fan_in). Filters on `LoRAParam` pick the adapters alone (gradients, the optimizer, what
a LoRA checkpoint saves); `merge` folds them into a float base (`W + (alpha/r) A B`) for
export or for an engine that runs plain weights; `attach` puts new adapters on a loaded (or
quantized) base, which is how `python -m qwq_jax.train` builds a LoRA run ([lora], qwq_jax/rl/grpo.py
trains it).
"""

from __future__ import annotations

import dataclasses
import functools
import string
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAParam(nnx.Param):
    """An adapter matrix: the only trainable parameters of a LoRA model."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"lora rank={self.rank!r} must be an int >= 1")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ValueError(f"lora alpha={self.alpha!r} must be a number > 0")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"lora targets {list(self.targets)} must be a non-empty subset of {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


def declare(module: nnx.Module, name: str, sizes: dict[str, int], rngs: nnx.Rngs, prefix: tuple[str, ...],
            axes: tuple[str, ...], contract: int, dtype: Any, lora: LoraConfig) -> None:
    """`module.<name>_lora_a` / `_lora_b` for the weight `module.<name>` (axes `prefix + axes`, the
    first `contract` contracted)."""
    sizes = {**sizes, "lora": lora.rank}
    a_axes = prefix + axes[:contract] + ("lora",)
    b_axes = prefix + ("lora",) + axes[contract:]
    fan_in = 1
    for ax in axes[:contract]:
        fan_in *= sizes[ax]
    a = nnx.initializers.normal(fan_in ** -0.5)(rngs.params(), tuple(sizes[x] for x in a_axes), dtype)
    b = jnp.zeros(tuple(sizes[x] for x in b_axes), dtype)
    setattr(module, name + "_lora_a", LoRAParam(a, out_sharding=a_axes, eager_sharding=False))
    setattr(module, name + "_lora_b", LoRAParam(b, out_sharding=b_axes, eager_sharding=False))
    setattr(module, name + "_lora_scale", lora.scale)


def _specs(spec: str) -> tuple[str, str]:
    """For `einsum(spec, x, W)`: the specs of `x A` and of `(x A) B`."""
    inputs, out = spec.replace(" ", "").split("->")
    x, w = inputs.split(",")
    r = next(c for c in string.ascii_letters if c not in spec)
    contracted = "".join(c for c in w if c not in out)
    kept = "".join(c for c in x if c not in contracted)
    w_out = "".join(c for c in w if c in out)
    return f"{x},{contracted}{r}->{kept}{r}", f"{kept}{r},{r}{w_out}->{out}"


def delta(spec: str, x: jnp.ndarray, module: nnx.Module, name: str, dtype: Any) -> jnp.ndarray | None:
    """`(alpha/r) (x A) B` for `einsum(spec, x, W)`, in `dtype`; None when `name` has no adapter."""
    a = getattr(module, name + "_lora_a", None)
    if a is None:
        return None
    first, second = _specs(spec)
    xa = jnp.einsum(first, x, a[...].astype(dtype))
    scale = getattr(module, name + "_lora_scale")
    return (jnp.einsum(second, xa, getattr(module, name + "_lora_b")[...].astype(dtype)) * scale).astype(dtype)


def weight_delta(a: jnp.ndarray, b: jnp.ndarray, contract: int, scale: float, stacked: int = 0) -> jnp.ndarray:
    """`(alpha/r) A B` shaped as the weight: A `[*stack, *in, r]`, B `[*stack, r, *out]`."""
    letters = iter(string.ascii_letters)
    stack = "".join(next(letters) for _ in range(stacked))
    ins = "".join(next(letters) for _ in range(contract))
    r = next(letters)
    outs = "".join(next(letters) for _ in range(b.ndim - stacked - 1))
    return jnp.einsum(f"{stack}{ins}{r},{stack}{r}{outs}->{stack}{ins}{outs}", a, b) * scale


CONTRACT = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def merged_weight(w, scale, a, b, contract: int, out_dtype: Any, lora_scale: float, stacked: int) -> jnp.ndarray:
    """`w + lora_scale A B` in float32, stored as `out_dtype`: `w` float, or int8 with its float32 `scale`
    (`q * scale`, one per output channel); `a` None: `w` alone. `stacked` leading layer axes."""
    if scale is None:
        w = w.astype(jnp.float32)
    else:  # int8 [*stack, *in, *out] x float32 scale [*stack, *out]
        w = w.astype(jnp.float32) * jnp.expand_dims(scale, tuple(range(stacked, stacked + contract)))
    if a is not None:
        w = w + weight_delta(a.astype(jnp.float32), b.astype(jnp.float32), contract, lora_scale, stacked=stacked)
    return w.astype(out_dtype)


def merge(model: Any, dtype: Any = None) -> Any:
    """A model without adapters whose float weights are `W + (alpha/r) A B` (the model is unchanged),
    computed in float32 and stored in `dtype` (default: the base's float dtype; every parameter is
    cast to it). An int8 base (QLoRA) merges only with a float `dtype` given: its weights are first
    dequantized (`q * scale`, qwq_jax.quant.dequantize), so the merged model holds what the int8
    matmul computes, up to `dtype`'s rounding. Else ValueError (int8 cannot hold the sum)."""
    from qwq_jax.model import Qwen2, as_dtype

    if getattr(model, "lora", None) is None:
        raise ValueError("merge: the model has no LoRA adapters")
    if model.quant is not None and dtype is None:
        raise ValueError("merge: an int8 base cannot hold the merged weights; dequantize it first "
                         "(merge(model, dtype=jnp.float32) does)")
    param_dtype = as_dtype(dtype) if dtype is not None else model.embed[...].dtype
    plain = nnx.eval_shape(lambda: Qwen2(model.config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=model.dtype,
                                         remat=model.remat, attention_backend=model.attention_backend))
    state = nnx.state(model)
    graphdef, target = nnx.split(plain)
    flat = dict(nnx.to_flat_state(state))

    def get(var):
        return var.get_value() if hasattr(var, "get_value") else var.value

    out = {}
    for path, var in nnx.to_flat_state(target):
        value = get(flat[path])
        name = path[-1]
        parent = path[:-1]
        a = flat.get(parent + (f"{name}_lora_a",))
        scale = flat.get(parent + (f"{name}_scale",))
        if a is not None or scale is not None:
            value = merged_weight(value, None if scale is None else get(scale), None if a is None else get(a),
                                  None if a is None else get(flat[parent + (f"{name}_lora_b",)]), CONTRACT[name],
                                  jnp.dtype(param_dtype), model.lora.scale, 1)
        elif value.dtype != param_dtype and jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(param_dtype)
        out[path] = value
    new_state = nnx.from_flat_state([(p, v.replace(out[p])) for p, v in nnx.to_flat_state(target)])
    return nnx.merge(graphdef, new_state)


def attach(model: Any, lora: LoraConfig, seed: int = 0, mesh: Any = None, rules: Any = "train") -> Any:
    """`model`'s weights (float or int8, shared, not copied) with new adapters on `lora.targets`: the
    LoRA model to train on a loaded (or quantized) base. The adapters are those `Qwen2(..., lora=lora)`
    draws with `nnx.Rngs(seed)` (B = 0), laid out by `rules` on `mesh` when given; no base weight is
    initialised to draw them (the compiler drops the unused draws)."""
    from qwq_jax.model import Qwen2

    if getattr(model, "lora", None) is not None:
        raise ValueError("attach: the model already has LoRA adapters")

    def make():
        return Qwen2(model.config, rngs=nnx.Rngs(seed), param_dtype=model.embed[...].dtype, dtype=model.dtype,
                     remat=model.remat, attention_backend=model.attention_backend, quant=model.quant, lora=lora)

    graphdef, state = nnx.split(nnx.eval_shape(make))
    shardings = None
    if mesh is not None:
        from sharding import state_shardings

        shardings = state_shardings(nnx.state(nnx.eval_shape(make), LoRAParam), mesh, rules)
    adapters = jax.jit(lambda: nnx.state(make(), LoRAParam), out_shardings=shardings)()
    pure = nnx.to_pure_dict(nnx.state(model))
    for path, value in nnx.to_flat_state(adapters):
        holder = pure
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = value.get_value() if hasattr(value, "get_value") else value.value
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
