"""QwenConfig: the architecture facts of a Qwen2 / Qwen2.5 / QwQ checkpoint.

`QwenConfig.from_hf` reads a Hugging Face `config.json` (path, directory or dict) and
`to_hf` writes one back; `QwenConfig.preset(name)` gives the published sizes by name.
Everything else in the project (model, rope, sharding, converter) reads only this class.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """Rotary scaling in HF's `rope_scaling` / `rope_parameters` vocabulary."""

    rope_type: str  # "linear" or "yarn"
    factor: float
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "type": self.rope_type, "factor": self.factor}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ("rope_type", "factor") and value is not None:
                out[f.name] = value
        return out


@dataclass(frozen=True)
class QwenConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    dtype: str = "bfloat16"  # the checkpoint's stored dtype (HF `torch_dtype` / `dtype`)
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config field {f}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config field num_attention_heads={self.num_heads} is not divisible by "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"config field head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"config field rms_norm_eps={self.rms_norm_eps!r} must be > 0")
        if not self.rope_theta > 0:
            raise ValueError(f"config field rope_theta={self.rope_theta!r} must be > 0")
        rs = self.rope_scaling
        if rs is not None:
            if rs.rope_type not in SUPPORTED_ROPE_TYPES or rs.rope_type == "default":
                raise ValueError(f"config field rope_type={rs.rope_type!r} is not supported "
                                 f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
            if not isinstance(rs.factor, (int, float)) or isinstance(rs.factor, bool) or rs.factor < 1:
                raise ValueError(f"config field rope_scaling.factor={rs.factor!r} must be a number >= 1")

    # ---- derived ------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def original_max_position_embeddings(self) -> int:
        """Positions the model was pretrained on (before any rope scaling)."""
        rs = self.rope_scaling
        if rs is not None and rs.original_max_position_embeddings:
            return int(rs.original_max_position_embeddings)
        return self.max_position_embeddings

    @property
    def max_context(self) -> int:
        """Longest sequence the config supports: scaled length under YaRN/linear scaling."""
        rs = self.rope_scaling
        if rs is None:
            return self.max_position_embeddings
        return max(self.max_position_embeddings, int(self.original_max_position_embeddings * rs.factor))

    def axis_sizes(self) -> dict[str, int]:
        """Size of every logical parameter axis (the names used by model.py and sharding)."""
        return {"layers": self.num_layers, "embed": self.hidden_size, "heads": self.num_heads,
                "kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "mlp": self.intermediate_size, "vocab": self.vocab_size}

    def num_params(self) -> int:
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        q, kv = self.num_heads * h, self.num_kv_heads * h
        layer = d * q + q + 2 * (d * kv + kv) + q * d + 3 * d * f + 2 * d
        return self.num_layers * layer + v * d * (1 if self.tie_word_embeddings else 2) + d

    def replace(self, **changes: Any) -> "QwenConfig":
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ----------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any]) -> "QwenConfig":
        """Read a HF Qwen2 `config.json`: a dict, a path to the file, or a model directory."""
        if isinstance(source, dict):
            hf = dict(source)
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ValueError(f"config file not found: {path}")
            try:
                with open(path, encoding="utf-8") as fh:
                    hf = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"config file {path} is not valid JSON: {e}") from None
            if not isinstance(hf, dict):
                raise ValueError(f"config file {path} does not hold a JSON object")
        return cls._from_hf_dict(hf)

    @classmethod
    def _from_hf_dict(cls, hf: dict[str, Any]) -> "QwenConfig":
        _check_field_types(hf)
        model_type = hf.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ValueError(f"config field model_type={model_type!r} is not supported (expected 'qwen2')")
        for arch in hf.get("architectures") or []:
            if arch not in ("Qwen2ForCausalLM", "Qwen2Model"):
                raise ValueError(f"config field architectures={hf['architectures']!r} is not supported "
                                 "(expected Qwen2ForCausalLM)")
        for req in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if hf.get(req) is None:
                raise ValueError(f"config field {req} is missing")
        if hf.get("use_sliding_window"):
            raise ValueError(f"config field use_sliding_window={hf['use_sliding_window']!r} is not supported "
                             "(Qwen2.5 checkpoints ship with it false; sliding-window layers are not ported)")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config field hidden_act={act!r} is not supported (expected 'silu')")

        heads = hf["num_attention_heads"]
        kv_heads = hf.get("num_key_value_heads") or heads
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if not isinstance(heads, int) or heads < 1 or hidden % heads:
                raise ValueError(f"config field hidden_size={hidden} is not divisible by "
                                 f"num_attention_heads={heads}")
            head_dim = hidden // heads

        # rope: legacy `rope_theta` + `rope_scaling`, or transformers>=5 `rope_parameters`.
        params = hf.get("rope_parameters") or {}
        if not isinstance(params, dict):
            raise ValueError(f"config field rope_parameters={params!r} must be an object")
        if params and all(isinstance(v, dict) for v in params.values()):
            raise ValueError("config field rope_parameters is nested per layer type; Qwen2 uses one rope")
        theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling")
        if scaling is None and params:
            scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if scaling is not None and not isinstance(scaling, dict):
            raise ValueError(f"config field rope_scaling={scaling!r} must be an object or null")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"config field partial_rotary_factor={params['partial_rotary_factor']!r} "
                             "is not supported (expected 1.0)")
        rope_scaling = _parse_rope_scaling(scaling, hf)

        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=kv_heads,
            head_dim=head_dim, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_scaling=rope_scaling,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=eos, dtype=str(dtype),
            name=hf.get("_name_or_path", ""),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` dict for this config (readable by transformers 4.x and 5.x, vLLM)."""
        out: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "torch_dtype": self.dtype,
        }
        if self.head_dim != self.hidden_size // self.num_heads:
            out["head_dim"] = self.head_dim
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            out["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return out

    # ---- presets ------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "QwenConfig":
        """A named config: `qwq-32b`, `qwen2.5-{0.5b,1.5b,3b,7b,14b,32b,72b}`, or `tiny*` for tests."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
        return dataclasses.replace(PRESETS[name], name=name)


def _parse_rope_scaling(scaling: dict[str, Any] | None, hf: dict[str, Any]) -> RopeScaling | None:
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"config field rope_type={rope_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    factor = scaling.get("factor")
    original = scaling.get("original_max_position_embeddings")
    if rope_type == "yarn":
        original = original or hf.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 32768)
        if factor is None:  # HF: derived from the two lengths when omitted
            factor = hf.get("max_position_embeddings", 32768) / original
    if factor is None:
        raise ValueError(f"config field rope_scaling.factor is missing for rope_type={rope_type!r}")
    known = {f.name for f in dataclasses.fields(RopeScaling)} | {"type"}
    return RopeScaling(
        rope_type=rope_type, factor=factor, original_max_position_embeddings=original,
        **{k: v for k, v in scaling.items() if k in known and k not in
           ("rope_type", "type", "factor", "original_max_position_embeddings")})


def _qwen25(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool,
            eps: float = 1e-6) -> QwenConfig:
    return QwenConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                      num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads, rms_norm_eps=eps,
                      rope_theta=1_000_000.0, max_position_embeddings=32768, tie_word_embeddings=tied,
                      bos_token_id=151643, eos_token_id=151645)


_YARN_4X = RopeScaling("yarn", 4.0, original_max_position_embeddings=32768)

# Published configs of the Instruct checkpoints (Qwen/Qwen2.5-*-Instruct, Qwen/QwQ-32B).
PRESETS: dict[str, QwenConfig] = {
    "qwq-32b": dataclasses.replace(_qwen25(5120, 27648, 64, 40, 8, 152064, False, eps=1e-5),
                                   max_position_embeddings=40960),
    "qwq-32b-yarn": dataclasses.replace(_qwen25(5120, 27648, 64, 40, 8, 152064, False, eps=1e-5),
                                        max_position_embeddings=40960, rope_scaling=_YARN_4X),
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, 151936, True),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8, 152064, False),
    "qwen2.5-32b": _qwen25(5120, 27648, 64, 40, 8, 152064, False),
    "qwen2.5-72b": _qwen25(8192, 29568, 80, 64, 8, 152064, False),
    # Tiny configs for tests and CPU smoke runs.
    "tiny": QwenConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=8,
                       num_kv_heads=4, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                       max_position_embeddings=1024, dtype="float32"),
    "tiny-tied": QwenConfig(vocab_size=512, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=3,
                            num_kv_heads=1, head_dim=16, rope_theta=1_000_000.0, max_position_embeddings=1024,
                            tie_word_embeddings=True, dtype="float32"),
    "tiny-yarn": QwenConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=16, rope_theta=1_000_000.0, max_position_embeddings=256,
                            rope_scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=256),
                            dtype="float32"),
}


_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id")
_FLOAT_FIELDS = ("rms_norm_eps", "rope_theta")


def _check_field_types(hf: dict[str, Any]) -> None:
    """One ValueError naming the field for a value of the wrong JSON type (a hand-edited or foreign
    config.json), before any arithmetic on it."""
    import numbers

    def is_int(v: Any) -> bool:  # numbers.Integral: NumPy's integers too (a GGUF's metadata)
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    for name in _INT_FIELDS:
        v = hf.get(name)
        if v is not None and not is_int(v):
            raise ValueError(f"config field {name}={v!r} must be an integer")
    for name in _FLOAT_FIELDS:
        if name in hf and not (isinstance(hf[name], numbers.Real) and not isinstance(hf[name], bool)):
            raise ValueError(f"config field {name}={hf[name]!r} must be a number")
    arch = hf.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise ValueError(f"config field architectures={arch!r} must be a list of names, e.g. [\"Qwen2ForCausalLM\"]")
    eos = hf.get("eos_token_id")
    if eos is not None and not (is_int(eos) or (isinstance(eos, list) and all(is_int(t) for t in eos))):
        raise ValueError(f"config field eos_token_id={eos!r} must be a token id or a list of them")
