"""The one table between HF `Qwen2ForCausalLM` tensor names and qwq-jax parameter paths.

Each `Rule` names an HF tensor (with `{layer}` for per-layer tensors, which we store stacked
along a leading `layers` axis), our dotted parameter path, and how the layout changes:

    copy    same layout (embeddings, norm scales; lm_head is kept as [vocab, embed] like HF)
    linear  HF nn.Linear weight [out, in] -> ours [*in_dims, *out_dims] (transpose + reshape);
            `in_dims` says how many of our (per-layer) dims belong to the input side
    bias    HF [out] -> ours [*out_dims] (reshape)

Import (`to_ours`) and export (`to_hf`) read the same table in opposite directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np

from qwq_jax.checkpoint import flatten, unflatten
from qwq_jax.config import QwenConfig


@dataclass(frozen=True)
class Rule:
    hf: str
    ours: str
    kind: str  # "copy" | "linear" | "bias"
    in_dims: int = 1

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf

    def to_ours(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """HF tensor -> our layout `shape` (per layer: without the stacked `layers` dim)."""
        if self.kind == "linear":
            x = transpose(x)
        return x.reshape(shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Our (per-layer) array -> the HF tensor."""
        if self.kind == "linear":
            rows = math.prod(x.shape[: self.in_dims])
            return transpose(x.reshape(rows, -1))
        if self.kind == "bias":
            return x.reshape(-1)
        return x

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor shape for our (per-layer) `shape`."""
        if self.kind == "linear":
            return (math.prod(shape[self.in_dims:]), math.prod(shape[: self.in_dims]))
        if self.kind == "bias":
            return (math.prod(shape),)
        return tuple(shape)


def transpose(x: np.ndarray, block: int = 64) -> np.ndarray:
    """`x.T` of a 2-D array as a new C-contiguous array, copied in bands of `block` rows: about twice
    numpy's plain transposed copy, whose strided reads miss the cache (the converter's main CPU cost)."""
    rows, cols = x.shape
    out = np.empty((cols, rows), x.dtype)
    for i in range(0, rows, block):
        out[:, i:i + block] = x[i:i + block].T
    return out


_L = "model.layers.{layer}."
RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embed", "copy"),
    Rule(_L + "input_layernorm.weight", "layers.input_norm.scale", "copy"),
    Rule(_L + "self_attn.q_proj.weight", "layers.attn.q_proj", "linear"),
    Rule(_L + "self_attn.q_proj.bias", "layers.attn.q_bias", "bias"),
    Rule(_L + "self_attn.k_proj.weight", "layers.attn.k_proj", "linear"),
    Rule(_L + "self_attn.k_proj.bias", "layers.attn.k_bias", "bias"),
    Rule(_L + "self_attn.v_proj.weight", "layers.attn.v_proj", "linear"),
    Rule(_L + "self_attn.v_proj.bias", "layers.attn.v_bias", "bias"),
    Rule(_L + "self_attn.o_proj.weight", "layers.attn.o_proj", "linear", in_dims=2),
    Rule(_L + "post_attention_layernorm.weight", "layers.post_attn_norm.scale", "copy"),
    Rule(_L + "mlp.gate_proj.weight", "layers.mlp.gate_proj", "linear"),
    Rule(_L + "mlp.up_proj.weight", "layers.mlp.up_proj", "linear"),
    Rule(_L + "mlp.down_proj.weight", "layers.mlp.down_proj", "linear"),
    Rule("model.norm.weight", "final_norm.scale", "copy"),
    Rule("lm_head.weight", "lm_head", "copy"),
)


def rules_for(cfg: QwenConfig) -> tuple[Rule, ...]:
    """The rules that apply to `cfg` (no lm_head when embeddings are tied)."""
    return tuple(r for r in RULES if not (r.ours == "lm_head" and cfg.tie_word_embeddings))


def hf_names(cfg: QwenConfig) -> Iterator[tuple[str, Rule, int | None]]:
    """Every HF tensor name `cfg` has, with its rule and layer index (None if not per layer)."""
    for rule in rules_for(cfg):
        if rule.per_layer:
            for i in range(cfg.num_layers):
                yield rule.hf.format(layer=i), rule, i
        else:
            yield rule.hf, rule, None


def param_shapes(cfg: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes by dotted path, from the model's own declaration."""
    from flax import nnx

    from qwq_jax.model import abstract_model

    flat = flatten(nnx.to_pure_dict(nnx.state(abstract_model(cfg, param_dtype="float32"))))
    return {path: tuple(x.shape) for path, x in flat.items()}


def check_names(cfg: QwenConfig, names: set[str] | list[str]) -> None:
    """Raise ValueError listing a few missing and unexpected HF tensor names."""
    expected = {name for name, _, _ in hf_names(cfg)}
    names = set(names)
    if cfg.tie_word_embeddings:
        names.discard("lm_head.weight")  # some tied checkpoints store the shared tensor twice
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:4])}"
                        + (", ..." if len(missing) > 4 else ""))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:4])}"
                        + (", ..." if len(unexpected) > 4 else ""))
    if problems:
        raise ValueError("; ".join(problems))


def state_from_hf(cfg: QwenConfig, tensors: Mapping[str, np.ndarray], dtype=None) -> dict:
    """Nested pure dict of our parameters (stacked layers) from a dict of HF tensors.

    Holds the whole model in host memory: for tests and small models. The converter streams
    the same rules one tensor at a time.
    """
    check_names(cfg, set(tensors))
    shapes = param_shapes(cfg)
    flat: dict[str, np.ndarray] = {}
    for name, rule, layer in hf_names(cfg):
        full = shapes[rule.ours]
        shape = full[1:] if rule.per_layer else full
        x = np.asarray(tensors[name])
        if x.shape != rule.hf_shape(shape):
            raise ValueError(f"tensor {name} has shape {tuple(x.shape)}, config.json implies "
                             f"{rule.hf_shape(shape)}")
        x = rule.to_ours(x, shape)
        if dtype is not None:
            x = x.astype(dtype)
        if layer is None:
            flat[rule.ours] = x
        else:
            if rule.ours not in flat:
                flat[rule.ours] = np.empty(full, x.dtype)
            flat[rule.ours][layer] = x
    return unflatten(flat)


def hf_from_state(cfg: QwenConfig, state: dict) -> dict[str, np.ndarray]:
    """HF tensors from our nested pure dict (the inverse of `state_from_hf`)."""
    flat = flatten(state)
    out = {}
    for name, rule, layer in hf_names(cfg):
        x = np.asarray(flat[rule.ours])
        out[name] = rule.to_hf(x if layer is None else x[layer])
    return out
