"""qwq_jax/tokenizer.py against transformers, on the tokenizer and chat template of the demo GGUF.

The reference is transformers' tokenizer loaded from the offline demo GGUF (Qwen2.5-Coder-0.5B-Instruct);
its `save_pretrained` output is the directory our `Tokenizer.from_dir` reads. Chat templates are
compared as rendered strings; the QwQ-style template below is written here after QwQ's published
behaviour (earlier assistant turns lose their reasoning, the generation prompt opens `<think>`).
"""

from __future__ import annotations

import json
import random
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from qwq_jax.tokenizer import _UNICODE_TO_BYTE, IncrementalDecoder, Tokenizer, split_reasoning

DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tok_dir(demo_hf_tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo_tokenizer")
    demo_hf_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def hf(demo_hf_tokenizer):
    return demo_hf_tokenizer


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


# ---- corpus -----------------------------------------------------------------------------

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   \n\n\nand blank lines\r\nCRLF too\t\ttabs",
    "我们来计算一下：一加一等于二。然后，龘、𠜎、𪚥 这些字很少见。",
    "日本語のテキストと한국어 텍스트، والعربية أيضا.",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -x\n\nprint(f(12345678))\n",
    "emoji: 😀🤖🧑🏽‍💻👨‍👩‍👧‍👦🇯🇵 ❤️ ✔︎ and combining: e\u0301 a\u0308 Z\u0335\u0321",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n你好！<|im_end|><|endoftext|>",
    "call <tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call> ok "
    "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "math: ∑_{i=1}^{n} i² = n(n+1)/2, ∀ε>0 ∃δ … ≤ ≥ ≠ ∞ 𝔽𝕠𝕟𝕥",
    "",
    " ",
    "\n",
]


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_encode_matches_transformers(tok, hf, add_special_tokens):
    for text in CORPUS:
        assert tok.encode(text, add_special_tokens=add_special_tokens) == \
            hf.encode(text, add_special_tokens=add_special_tokens), text


@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_transformers(tok, hf, skip):
    for text in CORPUS:
        ids = hf.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert tok.decode(hf.encode(CORPUS[0])) == CORPUS[0]


def test_special_token_ids_are_recognised(tok):
    assert tok.encode("<|im_start|>") == [tok.token_id("<|im_start|>")] == [151644]
    assert tok.token_id("<|im_end|>") == 151645
    assert tok.token_id("no such token") is None


def test_from_dir_fields(tok, hf, tok_dir, tmp_path):
    assert tok.vocab_size == len(hf) == 151936
    assert tok.eos_token_ids == (hf.eos_token_id,) == (151645,)
    assert tok.bos_token_id == hf.bos_token_id and tok.pad_token_id == hf.pad_token_id == 151643
    # generation_config.json eos ids join, deduplicated, in order
    d = _copy_dir(tok_dir, tmp_path / "gen")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643], "bos_token_id": 1}))
    assert Tokenizer.from_dir(d).eos_token_ids == (151645, 151643)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    assert Tokenizer.from_dir(d).eos_token_ids == (151645, 151643)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|im_end|>"}))
    with pytest.raises(ValueError, match="generation_config.json"):
        Tokenizer.from_dir(d)


# ---- chat template ----------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city (°C) — <b>HTML</b> & quotes ' \" stay as written",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                       "required": ["city"]},
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "now", "description": "Time now",
                                               "parameters": {"type": "object", "properties": {}}}}

HISTORIES = {
    "single": [{"role": "user", "content": "What is 2+2?"}],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi <there> & 'you'"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "写一首诗 🌸"},
    ],
    "no_system_multi": [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "four\n\nfive"},
        {"role": "user", "content": "six"},
    ],
    "tool_calls": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Zürich, and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
            {"type": "function", "function": {"name": "now", "arguments": "{}"}},
        ]},
        {"role": "tool", "content": "18°C, sunny"},
        {"role": "tool", "content": "12°C, rain"},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "Paris 18°C, Zürich 12°C; it is noon."},
        {"role": "user", "content": "Thanks"},
    ],
    "tool_call_with_text": [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [{"name": "now", "arguments": {}}]},
        {"role": "tool", "content": "09:30"},
    ],
}


def _cases():
    for name in HISTORIES:
        for tools in (None, [WEATHER_TOOL, CLOCK_TOOL]):
            for gen in (True, False):
                yield pytest.param(name, tools, gen, id=f"{name}-{'tools' if tools else 'notools'}-{gen}")


@pytest.mark.parametrize("name,tools,add_generation_prompt", _cases())
def test_chat_template_matches_transformers(tok, hf, name, tools, add_generation_prompt):
    messages = HISTORIES[name]
    ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    ref = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == ref
    assert tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                   tokenize=True) == tok.encode(ref) == hf.encode(ref, add_special_tokens=False)
    assert not tok.prompt_ends_in_think(ours)


def test_chat_template_leaves_messages_alone(tok):
    messages = [{"role": "user", "content": "hi", "extra": None}]
    snapshot = json.dumps(messages)
    tok.apply_chat_template(messages, tools=[WEATHER_TOOL])
    assert json.dumps(messages) == snapshot


QWQ_TEMPLATE = r"""
{%- set ns = namespace(system='') -%}
{%- if messages and messages[0].role == 'system' -%}
    {%- set ns.system = messages[0].content -%}
{%- endif -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' }}
    {%- if ns.system %}{{ ns.system + '\n\n' }}{% endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools %}{{ '\n' + tool | tojson }}{% endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        '<args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif ns.system -%}
    {{- '<|im_start|>system\n' + ns.system + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if message.role == 'system' and loop.first -%}
        {%- continue -%}
    {%- elif message.role in ('user', 'system') -%}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {%- set answer = (message.content or '').split('</think>')[-1].lstrip('\n') -%}
        {{- '<|im_start|>assistant\n' + answer -}}
        {%- for call in message.tool_calls or [] -%}
            {%- set call = call.function if call.function is defined else call -%}
            {{- '\n<tool_call>\n{"name": "' + call.name + '", "arguments": ' -}}
            {{- call.arguments | tojson + '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif -%}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' -}}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\n' }}{% endif -%}
    {%- else -%}
        {{- raise_exception('unknown role: ' + message.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n<think>\n' -}}
{%- endif -%}
"""

QWQ_HISTORY = [
    {"role": "system", "content": "Think step by step."},
    {"role": "user", "content": "What is 7*6?"},
    {"role": "assistant", "content": "<think>\n7*6 = 42, easy.\n</think>\n\nThe answer is **42**."},
    {"role": "user", "content": "And 7*7?"},
    {"role": "assistant", "content": "Okay, 49.\n</think>\n\n49"},  # reasoning opened by the prompt
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "<think>\nuse the tool\n</think>\n\n", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "content": "-3°C"},
]


@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwq_template_matches_transformers(tok, hf, tools, add_generation_prompt):
    for n in (2, 4, len(QWQ_HISTORY)):
        messages = QWQ_HISTORY[:n]
        ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                       chat_template=QWQ_TEMPLATE)
        ref = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                     chat_template=QWQ_TEMPLATE, tokenize=False)
        assert ours == ref
        assert tok.prompt_ends_in_think(ours) is add_generation_prompt
        if add_generation_prompt:
            assert ours.endswith("<|im_start|>assistant\n<think>\n")
    assert "7*6 = 42" not in ours and "The answer is **42**.<|im_end|>" in ours and "\n49<|im_end|>" in ours


def test_qwq_tokenizer_dir(tok_dir, tmp_path):
    """A QwQ-like directory: template in tokenizer_config.json, <think> tokens, generation_config eos ids."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RawTokenizer

    d = _copy_dir(tok_dir, tmp_path / "qwq")
    raw = RawTokenizer.from_file(str(d / "tokenizer.json"))
    raw.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False),
                    # added tokens outside the byte-level alphabet decode as written ("héllo" does not:
                    # its é is the stand-in for byte 0xE9, so tokenizers decodes it to U+FFFD)
                    AddedToken("<｜end▁of▁sentence｜>", special=True, normalized=False),
                    AddedToken("héllo", special=False, normalized=False)])
    raw.save(str(d / "tokenizer.json"))
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.update(chat_template=QWQ_TEMPLATE, bos_token=None)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))

    qwq = Tokenizer.from_dir(d)
    assert qwq.eos_token_ids == (151645, 151643) and qwq.bos_token_id is None and qwq.pad_token_id == 151643
    prompt = qwq.apply_chat_template(QWQ_HISTORY[:4])
    assert qwq.prompt_ends_in_think(prompt)
    think, end_think = qwq.token_id("<think>"), qwq.token_id("</think>")
    assert qwq.encode(prompt)[-2:] == [think, qwq.encode("\n")[0]]

    # a streamed QwQ answer: reasoning, </think>, answer, <|im_end|>
    out_text = "好的，7乘7等于49。🧮\n</think>\n\n**49** ✅<|im_end|>"
    ids = qwq.encode(out_text)
    assert end_think in ids
    for skip in (False, True):
        dec = IncrementalDecoder(qwq, skip_special_tokens=skip)
        text = "".join(dec.push([i]) for i in ids) + dec.flush()
        assert text == qwq.decode(ids, skip_special_tokens=skip)
    assert text == out_text.removesuffix("<|im_end|>")  # </think> is not special: kept
    ids = qwq.encode("a<｜end▁of▁sentence｜>héllo 中")
    assert qwq.token_id("héllo") in ids and qwq.decode(ids) == "a<｜end▁of▁sentence｜>h\ufffdllo 中"
    for skip in (False, True):
        for chunks in ([1] * len(ids), [len(ids)]):
            assert "".join(_stream(qwq, ids, chunks, skip)) == qwq.decode(ids, skip_special_tokens=skip)
    assert split_reasoning(text, prompt_ends_in_think=True) == ("好的，7乘7等于49。🧮", "**49** ✅")


FEATURES_TEMPLATE = r"""
{%- set ns = namespace(count=0, last=none) -%}
{%- set seen = dict(a=1) -%}
{%- for m in messages -%}
    {%- if m.role == 'skip' %}{% continue %}{% endif -%}
    {%- if m.role == 'stop' %}{% break %}{% endif -%}
    {%- set ns.count = ns.count + 1 -%}
    {%- generation -%}[{{ m.role }}|{{ m.content }}|{{ m.reasoning_content | default('-') }}|{{ m.thinking | default('-') }}]{%- endgeneration %}
{% endfor -%}
count={{ ns.count }} keys={{ dict.fromkeys(['x', 'y'], 0) | tojson }} seen={{ seen | tojson }}
{{ tools | tojson(indent=2, sort_keys=True) }}
{{ tools | tojson(separators=(',', ':'), ensure_ascii=True) }}
{{ extra | tojson }} {{ "<a&b>" | tojson }} {{ bos_token }}/{{ eos_token }}/{{ pad_token }}/{{ documents }}
{{ strftime_now('%Y') }} {{ custom_flag }} {{ add_generation_prompt }}
"""


def test_template_features_match_transformers(tok, hf):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "skip", "content": "b"},
        {"role": "assistant", "content": "c", "reasoning_content": "why"},
        {"role": "assistant", "content": "d", "thinking": "aliased"},
        {"role": "stop", "content": "e"},
        {"role": "user", "content": "never"},
    ]
    kwargs = dict(tools=[WEATHER_TOOL], chat_template=FEATURES_TEMPLATE, custom_flag=True,
                  extra={"k": [1, 2.5, None, "é"]})
    ours = tok.apply_chat_template(messages, add_generation_prompt=False, **kwargs)
    ref = hf.apply_chat_template(messages, add_generation_prompt=False, tokenize=False, **kwargs)
    assert ours == ref
    assert "[assistant|c|why|why]" in ours and "[assistant|d|aliased|aliased]" in ours
    assert "count=3" in ours and str(datetime.now().year) in ours
    # kwargs override the special tokens, as in transformers
    assert tok.apply_chat_template([], chat_template="{{ eos_token }}", eos_token="X") == "X"


def test_named_and_file_templates(tok_dir, tmp_path):
    d = _copy_dir(tok_dir, tmp_path / "named")
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages | length }}"},
                               {"name": "tool_use", "template": "T{{ tools | length }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    named = Tokenizer.from_dir(d)
    assert named.apply_chat_template([{"role": "user", "content": "x"}]) == "D1"
    assert named.apply_chat_template([], tools=[CLOCK_TOOL]) == "T1"
    assert named.apply_chat_template([], chat_template="tool_use", tools=[]) == "T0"
    (d / "chat_template.jinja").write_text("F")  # the file wins over tokenizer_config.json
    assert Tokenizer.from_dir(d).apply_chat_template([]) == "F"


# ---- streaming detokenization -----------------------------------------------------------

STREAM_TEXTS = [
    "龘𠜎𪚥𩸽 — 罕见汉字，常见汉字：你好世界。",
    "🧑🏽‍💻👨‍👩‍👧‍👦🇯🇵🇫🇷🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f 🫠🪿",
    "混合 mixed テキスト 🤖 and code:\n\tx = '✓'\n",
    "<|im_start|>assistant\n答案是𝟜𝟚<|im_end|>",
]


def _stream(tok, ids, chunks, skip=False):
    dec = IncrementalDecoder(tok, skip_special_tokens=skip)
    deltas, i = [], 0
    for n in chunks:
        deltas.append(dec.push(ids[i:i + n]))
        i += n
    assert i == len(ids)
    deltas.append(dec.flush())
    return deltas


def _chunkings(n, rng):
    yield [1] * n
    yield [3] * (n // 3) + ([n % 3] if n % 3 else [])
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(rng.randint(0, 5), n - sum(sizes)))
    yield sizes
    yield [n]


def test_incremental_decoder_multibyte(tok):
    rng = random.Random(0)
    held_back = False
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        for skip in (False, True):
            full = tok.decode(ids, skip_special_tokens=skip)
            for chunks in _chunkings(len(ids), rng):
                deltas = _stream(tok, ids, chunks, skip)
                assert "".join(deltas) == full
                assert not any("\ufffd" in d for d in deltas)
                held_back |= chunks[0] == 1 and "" in deltas[:-1]
        # text split inside a character by the tokenizer: some single tokens are not valid UTF-8 alone
        assert any("\ufffd" in tok.decode([i]) for i in ids) or text.startswith("<|")
    assert held_back
    # ids as numpy arrays and scalars, as a sampler hands them over
    import numpy as np

    ids = np.asarray(tok.encode(STREAM_TEXTS[0]), dtype=np.int32)
    dec = IncrementalDecoder(tok)
    assert dec.push(ids[:2]) + "".join(dec.push(i) for i in ids[2:]) + dec.flush() == tok.decode(ids)


def test_incremental_decoder_invalid_bytes(tok):
    """Bytes that never form a character come out as U+FFFD exactly where and as often as in decode."""
    byte_token = {b: tok.token_id(c) for c, b in _UNICODE_TO_BYTE.items()}
    cases = [
        [0xE4, 0xB8, ord("a"), 0xAD],          # CJK cut short, then a stray continuation byte
        [0xF0, 0x9F, 0x98],                    # emoji cut off at the end: flush gives U+FFFD
        [0xE0, 0x80, 0x80, 0xC3, 0xA9],        # overlong prefix, then a valid é
        [0xED, 0xA0, 0x80, 0xF4, 0x90, 0x80],  # surrogate and beyond-U+10FFFF sequences
        [0xC3],
        [0xFF, 0xFE, ord("x")],
    ]
    for raw in cases:
        ids = [byte_token[b] for b in raw]
        full = tok.decode(ids)
        assert "\ufffd" in full
        for chunks in ([1] * len(ids), [2] * (len(ids) // 2) + [len(ids) % 2], [len(ids)]):
            assert "".join(_stream(tok, ids, [c for c in chunks if c])) == full, raw


def test_incremental_decoder_random_ids(tok):
    """Random token soup (many lone-byte tokens) in random chunks: deltas join to decode()."""
    rng = random.Random(1)
    byte_ids = [tok.token_id(c) for c in _UNICODE_TO_BYTE]
    specials = [151643, 151644, 151645, 151657]
    for _ in range(300):
        ids = [rng.choice(byte_ids) if rng.random() < 0.6 else
               rng.choice(specials) if rng.random() < 0.1 else rng.randrange(tok.vocab_size)
               for _ in range(rng.randint(1, 40))]
        for skip in (False, True):
            chunks = next(c for k, c in enumerate(_chunkings(len(ids), rng)) if k == 2)
            assert "".join(_stream(tok, ids, chunks, skip)) == tok.decode(ids, skip_special_tokens=skip), ids


def test_token_bytes_agree_with_decode(tok):
    for i in range(tok.vocab_size):
        assert tok.token_bytes(i).decode("utf-8", "replace") == tok.decode([i]), i


def test_incremental_decoder_generic_path(tok_dir):
    """The re-decoded-window path for non byte-level decoders, exercised on the same vocabulary."""
    generic = Tokenizer.from_dir(tok_dir)
    generic._byte_level = False
    rng = random.Random(2)
    for text in STREAM_TEXTS + CORPUS:
        ids = generic.encode(text)
        for skip in (False, True):
            full = generic.decode(ids, skip_special_tokens=skip)
            for chunks in _chunkings(len(ids), rng):
                deltas = _stream(generic, ids, chunks, skip)
                assert "".join(deltas) == full
                assert not any("\ufffd" in d for d in deltas)


# ---- reasoning split --------------------------------------------------------------------

@pytest.mark.parametrize("text,prompt_ends_in_think,expected", [
    ("<think>\nLet me add.\n2+2=4\n</think>\n\nThe answer is 4.", False, ("Let me add.\n2+2=4", "The answer is 4.")),
    ("Let me add.\n</think>\n\nThe answer is 4.", True, ("Let me add.", "The answer is 4.")),
    ("Let me add.\n</think>\n\nThe answer is 4.", False, ("Let me add.", "The answer is 4.")),
    ("Still thinking about", True, ("Still thinking about", "")),
    ("<think>\nStill thinking", False, ("Still thinking", "")),
    ("Plain answer, no reasoning.\n", False, (None, "Plain answer, no reasoning.\n")),
    ("<think>\n\n</think>\n\nDirect answer.", False, ("", "Direct answer.")),
    ("\n</think>\n\nDirect answer.", True, ("", "Direct answer.")),
    ("</think>", True, ("", "")),
    ("", True, ("", "")),
    ("", False, (None, "")),
    ("r</think>\n\nA\n\nB\n", True, ("r", "A\n\nB\n")),
    ("r</think>x</think>y", True, ("r", "x</think>y")),
])
def test_split_reasoning(text, prompt_ends_in_think, expected):
    assert split_reasoning(text, prompt_ends_in_think=prompt_ends_in_think) == expected


# ---- errors -----------------------------------------------------------------------------

def test_missing_and_broken_files(tok_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty / "tokenizer.json")):
        Tokenizer.from_dir(empty)
    d = _copy_dir(tok_dir, tmp_path / "broken")
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(d)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|no_such_token|>"}))
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer.from_dir(d)
    (d / "tokenizer_config.json").unlink()
    (d / "chat_template.jinja").unlink()
    bare = Tokenizer.from_dir(d)  # tokenizer.json alone is enough to encode
    assert bare.eos_token_ids == () and bare.encode("hi") == [6023]
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(d)


def test_template_errors(tok, hf):
    import jinja2

    raising = ("{% if messages | length > 1 %}{{ raise_exception('Only one message, please: ' ~ messages | length) }}"
               "{% endif %}ok")
    one, two = [{"role": "user", "content": "a"}], [{"role": "user", "content": "a"}] * 2
    assert tok.apply_chat_template(one, chat_template=raising) == "ok"
    with pytest.raises(ValueError) as ours:
        tok.apply_chat_template(two, chat_template=raising)
    with pytest.raises(jinja2.TemplateError) as ref:
        hf.apply_chat_template(two, chat_template=raising, tokenize=False)
    assert str(ours.value) == str(ref.value) == "Only one message, please: 2"
    with pytest.raises(ValueError, match="chat template error"):
        tok.apply_chat_template(one, chat_template="{% for m in messages %}unclosed")
    with pytest.raises(ValueError, match="unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], chat_template=QWQ_TEMPLATE)
    # the sandbox: no way into Python internals
    for escape in ("{{ messages.__class__.__mro__[1].__subclasses__() }}",
                   "{% set ns = namespace() %}{% set ns._x = 1 %}",
                   "{{ namespace(_secret=1) }}",
                   "{{ messages.append(1) }}"):
        with pytest.raises(ValueError, match="chat template error"):
            tok.apply_chat_template(one, chat_template=escape)


def _copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
