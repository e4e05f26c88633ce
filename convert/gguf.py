"""A GGUF file (llama.cpp) as a weight source: HF names, HF layouts, dequantized float32.

`GGUFSource(path)` reads the file's header (metadata and tensor directory) with its own small
parser (`_read_header`: ~1 s for a 151k-token vocabulary, where `gguf.GGUFReader` takes ~15 s),
reads tensor bytes with plain reads and dequantizes them with `gguf.quants` (chunks of a tensor on
every core), and speaks the
`Source` protocol of `convert/source.py`:

    hf_config     a HF Qwen2 config.json dict rebuilt from the `qwen2.*` metadata
    names/shape   HF tensor names and HF shapes ([out, in] for linear weights)
    read(name)    one tensor, dequantized to float32 (only that tensor is unpacked)
    extra_files   tokenizer.json, tokenizer_config.json, generation_config.json rebuilt from
                  the `tokenizer.*` metadata (byte-level BPE, Qwen2 pre-tokenizer)

Layout facts (checked against transformers' GGUF loader in tests/test_gguf.py): ggml lists a
tensor's dims fastest-first, so a GGUF shape [in, out] is the numpy/HF shape [out, in], and
`gguf.quants.dequantize` already returns the numpy order. llama.cpp permutes Q/K rows only for
llama-family architectures; qwen2 tensors are stored unpermuted, so no inverse permutation here.
"""

from __future__ import annotations

import functools
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from convert.source import ConversionError
from qwq_jax.config import QwenConfig
from qwq_jax.sampling import RECOMMENDED, recommended_sampling

# GGUF tensor name -> HF name. Per-layer names are `blk.{i}.<leaf>`.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

# The Qwen2 pre-tokenizer split (tokenizer.json of every Qwen2/2.5/QwQ checkpoint).
QWEN2_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                     r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")  # `tokenizer.ggml.pre` values using that split

# `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_CHUNK_BYTES = 4 * 2**20  # float32 dequantized per task of `GGUFSource.read_rows` (a tensor spans several)

_ROPE_SCALING_KEYS = {"type", "factor", "original_context_length", "yarn_beta_fast", "yarn_beta_slow",
                      "finetuned", "attn_factor"}


@functools.cache
def _pool():
    """The threads that dequantize, one per core up to 8 (each holds a chunk and its dequantizer's
    temporaries, a few times _CHUNK_BYTES): the demo's dequantization 8.5 -> 4.5 s on 2 cores."""
    return ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="gguf-dequantize")


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor name, or None if it is not a Qwen2 tensor."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{LAYER_NAMES[m.group(2)]}"
    return None


class GGUFSource:
    """Weights, config and tokenizer of a qwen2 GGUF file, read lazily from a memory map."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fields, tensors = _read_header(self.path)
        arch = self._fields.get("general.architecture")
        if arch != "qwen2":
            raise ConversionError(f"{self.path}: GGUF architecture is {arch!r}, only 'qwen2' "
                                  "(Qwen2, Qwen2.5, QwQ) is supported")

        self._tensors = {}  # HF name -> _TensorInfo
        unknown = []
        for t in tensors:
            name = hf_name(t.name)
            if name is None:
                unknown.append(t.name)
            else:
                self._tensors[name] = t
        if unknown:
            raise ConversionError(f"{self.path}: unexpected tensors for qwen2 ({len(unknown)}): "
                                  + ", ".join(unknown[:4]) + (", ..." if len(unknown) > 4 else ""))
        self._check_quant_types()
        self.hf_config = self._build_hf_config()
        try:
            self.config = QwenConfig.from_hf(self.hf_config)
        except ValueError as e:
            raise ConversionError(f"{self.path}: {e}") from None

    # ---- Source protocol ----------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # ggml lists dims fastest-first: reversed, they are the numpy (= HF) shape.
        return tuple(reversed(self._tensor(name).dims))

    def dtype(self, name: str) -> np.dtype:
        self._tensor(name)
        return np.dtype(np.float32)

    def source_dtype(self) -> str:
        return "float32"

    def read(self, name: str) -> np.ndarray:
        return self.read_rows(name, 0, self.shape(name)[0])

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of `name` (its first dimension), dequantized to float32.

        Each row is whole quantization blocks, so a row range is one contiguous byte range: it is
        read with plain reads (not through the memory map, whose pages would stay resident) and
        dequantized in chunks of about _CHUNK_BYTES of float32, so temporaries stay small.
        """
        import gguf.quants

        t = self._tensor(name)
        # The type's own row dequantizer over the whole chunk: gguf's `dequantize` splits a chunk into
        # groups of 16 rows first, which costs 1.1-2.7x on the demo's narrow rows (bit-identical).
        traits = getattr(gguf.quants, "_type_traits", {}).get(t.tensor_type)

        def dequantize(raw: np.ndarray) -> np.ndarray:
            if traits is not None:
                return traits.dequantize_rows(raw)
            return gguf.quants.dequantize(raw, t.tensor_type)  # float types, or a gguf without the table

        shape = self.shape(name)
        row_shape = shape[1:]
        row_bytes = int(t.n_bytes) // shape[0]
        step = max(1, _CHUNK_BYTES // (4 * max(1, int(np.prod(row_shape, dtype=np.int64)))))
        out = np.empty((stop - start,) + row_shape, np.float32)

        def chunk(first: int) -> None:
            last = min(stop, first + step)
            raw = np.empty((last - first, row_bytes), np.uint8)
            with open(self.path, "rb") as fh:
                fh.seek(int(t.data_offset) + first * row_bytes)
                if fh.readinto(memoryview(raw.reshape(-1))) != raw.size:
                    raise ConversionError(f"{self.path}: truncated while reading tensor {t.name}")
            try:
                x = dequantize(raw)
            except NotImplementedError:
                raise ConversionError(f"{self.path}: tensor {t.name} uses quantization "
                                      f"{t.tensor_type.name}, which gguf {_gguf_version()} cannot "
                                      "dequantize") from None
            out[first - start:last - start] = x.reshape((last - first,) + row_shape)

        # numpy releases the GIL in the dequantizers' array operations: chunks run on every core
        for done in [_pool().submit(chunk, first) for first in range(start, stop, step)]:
            done.result()
        return out

    def quant_type(self, name: str) -> str:
        """The GGML storage type of `name` (e.g. 'Q4_K', 'F32')."""
        return self._tensor(name).tensor_type.name

    def gguf_name(self, name: str) -> str:
        """The GGUF tensor name behind HF `name`."""
        return self._tensor(name).name

    @cached_property
    def extra_files(self) -> dict[str, bytes]:
        def dump(obj: dict) -> bytes:
            return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

        return {"tokenizer.json": self.tokenizer().to_str(pretty=True).encode("utf-8"),
                "tokenizer_config.json": dump(self._tokenizer_config()),
                "generation_config.json": dump(self._generation_config())}

    # ---- config -------------------------------------------------------------------------
    def _build_hf_config(self) -> dict:
        def key(k: str, required: bool = True):
            value = self._fields.get(f"qwen2.{k}")
            if value is None and required:
                raise ConversionError(f"{self.path}: GGUF metadata qwen2.{k} is missing")
            return value

        if "model.embed_tokens.weight" not in self._tensors:
            raise ConversionError(f"{self.path}: GGUF has no token_embd.weight tensor")
        vocab, embed = self.shape("model.embed_tokens.weight")
        hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
        if embed != hidden:
            raise ConversionError(f"{self.path}: token_embd.weight has {embed} columns, "
                                  f"qwen2.embedding_length is {hidden}")
        cfg: dict = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(key("feed_forward_length")),
            "num_hidden_layers": int(key("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(key("attention.head_count_kv", False) or heads),
            "hidden_act": "silu",
            "max_position_embeddings": int(key("context_length")),
            "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
            "rope_theta": _f32(key("rope.freq_base", False) or 10000.0),
            "rope_scaling": self._rope_scaling(),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "use_sliding_window": False,
            "attention_dropout": 0.0,
            "torch_dtype": "bfloat16",
        }
        head_dim = key("attention.key_length", False)
        if head_dim is not None and heads and int(head_dim) != hidden // heads:
            cfg["head_dim"] = int(head_dim)
        rot = key("rope.dimension_count", False)
        if rot is not None and int(rot) != cfg.get("head_dim", hidden // max(heads, 1)):
            raise ConversionError(f"{self.path}: partial rotary (qwen2.rope.dimension_count={rot}) "
                                  "is not supported")
        for field, hf in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
            value = self._fields.get(f"tokenizer.ggml.{field}")
            if value is not None:
                cfg[hf] = int(value)
        return cfg

    def _rope_scaling(self) -> dict | None:
        prefix = "qwen2.rope.scaling."
        keys = {k[len(prefix):]: v for k, v in self._fields.items() if k.startswith(prefix)}
        extra = sorted(set(keys) - _ROPE_SCALING_KEYS)
        factor = float(keys.get("factor") or 1.0)
        kind = keys.get("type") or ("linear" if factor != 1.0 else "none")  # old files: factor only
        if kind == "none":
            return None
        if kind not in ("linear", "yarn"):
            raise ConversionError(f"{self.path}: rope scaling type {kind!r} is not supported "
                                  "(supported: linear, yarn)")
        if extra or float(keys.get("attn_factor", 1.0)) != 1.0:
            bad = extra or ["attn_factor"]
            raise ConversionError(f"{self.path}: rope scaling metadata {', '.join(prefix + k for k in bad)} "
                                  "is not supported")
        out: dict = {"rope_type": kind, "type": kind, "factor": _f32(factor)}
        if keys.get("original_context_length"):
            out["original_max_position_embeddings"] = int(keys["original_context_length"])
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if keys.get(gguf_key) is not None:
                out[hf_key] = _f32(keys[gguf_key])
        return out

    # ---- tokenizer ----------------------------------------------------------------------
    @cached_property
    def _vocab(self) -> tuple[list[str], list[int], list[str]]:
        """(tokens, token types, merges) from the tokenizer metadata."""
        fields = self._fields
        if "tokenizer.ggml.tokens" not in fields:
            raise ConversionError(f"{self.path}: GGUF has no tokenizer (tokenizer.ggml.tokens)")
        tokens = fields["tokenizer.ggml.tokens"]
        types = fields.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
        merges = fields.get("tokenizer.ggml.merges", [])
        if len(types) != len(tokens):
            raise ConversionError(f"{self.path}: tokenizer.ggml.token_type has {len(types)} entries "
                                  f"for {len(tokens)} tokens")
        return tokens, types, merges

    def tokenizer(self):
        """A `tokenizers.Tokenizer` equal to the checkpoint's tokenizer.json."""
        from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                                processors)

        model = self._fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ConversionError(f"{self.path}: tokenizer model {model!r} is not supported "
                                  "(expected byte-level BPE, 'gpt2')")
        pre = self._fields.get("tokenizer.ggml.pre", "qwen2")
        if pre not in QWEN2_PRE_TOKENIZERS:
            raise ConversionError(f"{self.path}: pre-tokenizer {pre!r} is not supported "
                                  f"(supported: {', '.join(QWEN2_PRE_TOKENIZERS)})")
        tokens, types, merges = self._vocab
        vocab = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)
        pairs = []
        for m in merges:
            left, sep, right = m.partition(" ")
            if not sep or " " in right:
                raise ConversionError(f"{self.path}: malformed merge {m!r} in tokenizer.ggml.merges")
            pairs.append((left, right))

        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None,
                                   continuing_subword_prefix="", end_of_word_suffix="",
                                   fuse_unk=False, byte_fallback=False))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        # Control tokens (<|im_start|>, <|endoftext|>, ...) are special; user-defined ones
        # (<tool_call>) are added but not special, as in Qwen's own tokenizer.json. Both are
        # matched whole in text, never split by BPE.
        def added(kind: int, special: bool) -> list:
            return [AddedToken(t, special=special, normalized=False, lstrip=False, rstrip=False,
                               single_word=False) for t, ty in zip(tokens, types) if ty == kind]

        tok.add_special_tokens(added(TOKEN_CONTROL, True))
        tok.add_tokens(added(TOKEN_USER_DEFINED, False))
        return tok

    def _token(self, field: str) -> str | None:
        index = self._fields.get(f"tokenizer.ggml.{field}")
        tokens = self._vocab[0]
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    def _tokenizer_config(self) -> dict:
        tokens, types, _ = self._vocab
        specials = [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL]
        cfg = {
            "tokenizer_class": "Qwen2Tokenizer",
            "add_bos_token": bool(self._fields.get("tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(self._fields.get("tokenizer.ggml.add_eos_token", False)),
            "add_prefix_space": False,
            "bos_token": self._token("bos_token_id"),
            "eos_token": self._token("eos_token_id"),
            "pad_token": self._token("padding_token_id"),
            "unk_token": None,
            "additional_special_tokens": specials,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "model_max_length": self.config.max_position_embeddings,
            "split_special_tokens": False,
        }
        template = self._fields.get("tokenizer.chat_template")
        if template is not None:
            cfg["chat_template"] = template
        return cfg

    def _generation_config(self) -> dict:
        tokens = self._vocab[0]
        index = {t: i for i, t in enumerate(tokens) if t in ("<|im_end|>", "<|endoftext|>")}
        eos: list[int] = []
        for i in (self._fields.get("tokenizer.ggml.eos_token_id"), index.get("<|im_end|>"),
                  index.get("<|endoftext|>")):
            if i is not None and int(i) not in eos:
                eos.append(int(i))
        out: dict = {}
        for field, hf in (("bos_token_id", "bos_token_id"), ("padding_token_id", "pad_token_id")):
            if self._fields.get(f"tokenizer.ggml.{field}") is not None:
                out[hf] = int(self._fields[f"tokenizer.ggml.{field}"])
        if eos:
            out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        # A GGUF carries no sampling settings: write the family's published recommendation (what the
        # original checkpoint's generation_config.json holds), picked from the config and template.
        family = recommended_sampling(self.config, self._fields.get("tokenizer.chat_template"))
        out.update({"do_sample": True, **RECOMMENDED[family]})
        return out

    # ---- helpers ------------------------------------------------------------------------
    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r} in this GGUF") from None

    def _check_quant_types(self) -> None:
        """Fail at open, not mid-conversion, on a storage type gguf cannot dequantize."""
        from gguf.constants import GGML_QUANT_SIZES
        from gguf.quants import dequantize

        seen: dict = {}
        for t in self._tensors.values():
            seen.setdefault(t.tensor_type, t.name)
        for qtype, tensor in seen.items():
            block, size = GGML_QUANT_SIZES[qtype]
            try:
                dequantize(np.zeros((1, size), np.uint8), qtype)
            except NotImplementedError:
                raise ConversionError(f"{self.path}: tensor {tensor} uses quantization {qtype.name}, "
                                      f"which gguf {_gguf_version()} cannot dequantize") from None


class _TensorInfo(NamedTuple):
    """One entry of a GGUF's tensor directory."""

    name: str
    dims: tuple[int, ...]  # ggml order: fastest-varying first
    tensor_type: Any       # gguf.GGMLQuantizationType
    data_offset: int       # absolute, in bytes from the start of the file
    n_bytes: int


# GGUF metadata value types (the spec's gguf_metadata_value_type) -> struct format of a scalar.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


def _read_header(path: Path) -> tuple[dict[str, Any], list[_TensorInfo]]:
    """A GGUF's metadata (key -> str, int, float, bool or list of those) and tensor directory,
    parsed from one read of the header (GGUF v2/v3, little-endian); one-line errors for files that
    are not whole GGUFs."""
    import mmap
    import struct

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ConversionError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    with open(path, "rb") as fh:  # only the header's pages are touched (~10 MB for a 151k vocabulary)
        buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 4

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise _Truncated(f"{fmt} at byte {pos:,}")
        value = struct.unpack_from("<" + fmt, buf, pos)
        pos += n
        return value if len(value) > 1 else value[0]

    def string(key: str) -> str:
        nonlocal pos
        n = take("Q")
        if pos + n > size:
            raise _Truncated(f"a string of {n:,} bytes at byte {pos:,}")
        raw = buf[pos:pos + n]
        pos += n
        return decode([raw], key)[0]

    def decode(raw: list[bytes], key: str) -> list[str]:
        try:
            return [r.decode("utf-8") for r in raw]
        except UnicodeDecodeError as e:
            what = "tokenizer metadata" if key.startswith("tokenizer.") else "GGUF metadata"
            raise ConversionError(f"{path}: corrupt {what} ({key}: a string is not UTF-8: {e})") from None

    def value(kind: int, key: str):
        nonlocal pos
        if kind == _STRING:
            return string(key)
        if kind == _ARRAY:
            inner, count = take("I"), take("Q")
            if inner == _STRING:  # (a vocabulary: 151k of them; one tight loop)
                unpack, at, raw = struct.Struct("<Q").unpack_from, pos, []
                try:
                    for _ in range(count):
                        (n,) = unpack(buf, at)
                        raw.append(buf[at + 8:at + 8 + n])
                        at += 8 + n
                except struct.error:
                    at = size + 1
                if at > size:
                    raise _Truncated(f"the {count:,} strings of {key} at byte {pos:,}")
                pos = at
                return decode(raw, key)
            if inner == _ARRAY:  # nested arrays: not used by qwen2; read past, kept as None
                for _ in range(count):
                    value(_ARRAY, key)
                return None
            fmt = _SCALARS.get(inner)
            if fmt is None:
                raise ConversionError(f"{path}: corrupt GGUF metadata ({key}: unknown value type {inner})")
            n = struct.calcsize(fmt) * count
            if pos + n > size:
                raise _Truncated(f"an array of {count:,} values at byte {pos:,}")
            out = np.frombuffer(buf, "<" + fmt, count, pos).tolist()
            pos += n
            return out
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise ConversionError(f"{path}: corrupt GGUF metadata ({key}: unknown value type {kind})")
        return take(fmt)

    try:
        version = take("I")
        if version & 0xFFFF == 0 and version:
            raise ConversionError(f"{path}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise ConversionError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_fields = take("Q"), take("Q")
        fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = string("key")
            fields[key] = value(take("I"), key)
        entries = []
        for _ in range(n_tensors):
            name = string("tensor name")
            dims = tuple(int(take("Q")) for _ in range(take("I")))
            entries.append((name, dims, take("I"), take("Q")))
    except _Truncated as e:
        raise ConversionError(f"{path}: truncated or corrupt GGUF file (the header ends before {e})") from None
    finally:
        header_end = pos
        buf.close()
    alignment = int(fields.get("general.alignment", 32) or 32)
    data_start = -(-header_end // alignment) * alignment
    tensors = []
    for name, dims, kind, offset in entries:
        try:
            qtype = GGMLQuantizationType(kind)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ConversionError(f"{path}: tensor {name} has an unknown GGML type {kind}") from None
        count = int(np.prod(dims, dtype=np.int64))
        if count % block:
            raise ConversionError(f"{path}: truncated or corrupt GGUF file (tensor {name}: {count} values "
                                  f"are not whole blocks of {block})")
        n_bytes = count // block * type_size
        t = _TensorInfo(name, dims, qtype, data_start + offset, n_bytes)
        if t.data_offset + n_bytes > size:
            raise ConversionError(f"{path}: truncated GGUF file: tensor {name} ends at byte "
                                  f"{t.data_offset + n_bytes:,}, the file has {size:,}")
        tensors.append(t)
    return fields, tensors


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-06, not 9.99e-07)."""
    return float(str(np.float32(x)))


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"
