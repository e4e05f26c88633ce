"""Tokenizer, chat template and reasoning split for Qwen2.5 / QwQ.

Three pieces, all offline and independent of HF transformers at run time:

- `Tokenizer`: a `tokenizers` fast tokenizer read from `tokenizer.json`, plus the special tokens and
  chat template from `tokenizer_config.json` (a `chat_template.jinja` file wins) and the extra EOS ids
  of `generation_config.json`. `apply_chat_template` renders like transformers does: a sandboxed
  jinja2 environment with `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML,
  `{% generation %}` blocks, and the special tokens as variables.
- `IncrementalDecoder`: streaming detokenization that never emits half a UTF-8 character. For
  byte-level BPE (every Qwen model) it maps each token to its bytes and feeds them to an incremental
  UTF-8 decoder, so each push costs O(new tokens); other decoders use a small re-decoded window.
- `split_reasoning`: `<think>...</think>` -> (reasoning_content, content).

    tok = Tokenizer.from_dir("/path/to/checkpoint")
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])
    ids = tok.encode(prompt)
    dec = IncrementalDecoder(tok)
    for new_ids in generated_chunks:      # ids as the sampler produces them
        print(dec.push(new_ids), end="")  # only completed characters
    print(dec.flush())
    reasoning, answer = split_reasoning(tok.decode(all_ids),
                                        prompt_ends_in_think=tok.prompt_ends_in_think(prompt))
"""

from __future__ import annotations

import codecs
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers

THINK_START = "<think>"
THINK_END = "</think>"
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
# Names a message's reasoning may come under; templates read `reasoning_content` (transformers aliases them too).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A `tokenizer.json` tokenizer with the special tokens and chat template of its model directory."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, chat_template: str | dict[str, str] | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, extra_eos_token_ids: Sequence[int] = ()):
        self._tok = tokenizer
        self.chat_template = chat_template  # one template, or {name: template} with a "default" entry
        self.special_tokens = {key: value for key, value in zip(
            _SPECIAL_TOKEN_KEYS, (bos_token, eos_token, unk_token, pad_token)) if value is not None}
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = self.token_id(bos_token) if bos_token is not None else None
        self.pad_token_id: int | None = self.token_id(pad_token) if pad_token is not None else None
        eos = [self.token_id(eos_token)] if eos_token is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(
            int(i) for i in [*eos, *extra_eos_token_ids] if i is not None))
        added = tokenizer.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        # Byte-level BPE: token -> bytes is a fixed table, which makes streaming exact and cheap.
        self._byte_level = isinstance(tokenizer.decoder, tokenizers.decoders.ByteLevel)
        self._token_bytes: dict[int, bytes] = {}

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (required), `tokenizer_config.json`, `chat_template.jinja`,
        `special_tokens_map.json` and `generation_config.json` (all optional) from `path`."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (expected {tokenizer_file}): point at a model "
                                    "directory with its tokenizer files (a `python -m convert` output holds them)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"cannot read {tokenizer_file}: {e}") from e
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        generation = _read_json(path / "generation_config.json")

        def special(key: str) -> str | None:
            value = config.get(key, special_map.get(key))
            if isinstance(value, Mapping):  # serialized AddedToken
                value = value.get("content")
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{path / 'tokenizer_config.json'}: {key} must be a string, got {value!r}")
            return value

        template: str | dict[str, str] | None = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            try:
                template = {t["name"]: t["template"] for t in template}
            except (TypeError, KeyError) as e:
                raise ValueError(f"{path / 'tokenizer_config.json'}: chat_template list entries need "
                                 f"'name' and 'template'") from e
        template_file = path / "chat_template.jinja"
        if template_file.is_file():
            try:
                template = template_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{template_file} is not UTF-8 text: {e}") from e

        extra_eos = generation.get("eos_token_id") or []
        extra_eos = [extra_eos] if isinstance(extra_eos, int) else extra_eos
        if not isinstance(extra_eos, list) or not all(isinstance(i, int) for i in extra_eos):
            raise ValueError(f"{path / 'generation_config.json'}: eos_token_id must be an int or a list of ints, "
                             f"got {generation.get('eos_token_id')!r}")
        out = cls(tok, chat_template=template, bos_token=special("bos_token"), eos_token=special("eos_token"),
                  pad_token=special("pad_token"), unk_token=special("unk_token"), extra_eos_token_ids=extra_eos)
        for key, value in out.special_tokens.items():
            if key != "unk_token" and out.token_id(value) is None:
                raise ValueError(f"{path}: {key} {value!r} is not in the vocabulary of {tokenizer_file}")
        return out

    # ------------------------------------------------------------------------------ encoding/decoding
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token decodes to (byte-level BPE only): what `decode` joins before UTF-8 decoding."""
        if not self._byte_level:
            raise ValueError("token_bytes needs a byte-level BPE tokenizer")
        token_id = int(token_id)
        cached = self._token_bytes.get(token_id)
        if cached is None:
            token = self._tok.id_to_token(token_id)
            if token is None:  # unknown ids decode to nothing, as in `decode`
                cached = b""
            else:
                try:
                    cached = bytes(_UNICODE_TO_BYTE[c] for c in token)
                except KeyError:  # added tokens such as "中文" are kept as written
                    cached = token.encode("utf-8")
            self._token_bytes[token_id] = cached
        return cached

    # ----------------------------------------------------------------------------------- chat template
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            chat_template: str | None = None, **kwargs: Any) -> str | list[int]:
        """Render `messages` with the chat template, as transformers' `apply_chat_template` does.

        `chat_template` overrides the tokenizer's template (a template string, or the name of one of
        its named templates). Extra keyword arguments become template variables (and override the
        special tokens). With `tokenize=True` the rendered text is encoded without adding special tokens.
        """
        template = self._select_template(chat_template, tools)
        if tools is not None:
            tools = [_plain(t) for t in tools]
            if not all(isinstance(t, dict) for t in tools):
                raise ValueError("tools must be JSON-schema dicts")
        chat = [_normalize_message(m) for m in messages]
        variables = {"documents": None, **self.special_tokens, **{k: _plain(v) for k, v in kwargs.items()}}
        text = _render(template, messages=chat, tools=tools, add_generation_prompt=add_generation_prompt,
                       **variables)
        return self.encode(text) if tokenize else text

    def _select_template(self, chat_template: str | None, tools: Sequence | None) -> str:
        named = self.chat_template if isinstance(self.chat_template, dict) else {}
        if chat_template is not None:
            return named.get(chat_template, chat_template)
        if isinstance(self.chat_template, str):
            return self.chat_template
        if named:
            if tools is not None and "tool_use" in named:
                return named["tool_use"]
            if "default" in named:
                return named["default"]
            raise ValueError(f"the tokenizer has named chat templates {sorted(named)} but no 'default'; "
                             f"pass chat_template=<name>")
        raise ValueError("the tokenizer has no chat template (neither tokenizer_config.json 'chat_template' "
                         "nor chat_template.jinja); pass chat_template=")

    @staticmethod
    def prompt_ends_in_think(prompt: str) -> bool:
        """True when the rendered prompt opens the reasoning block itself (QwQ: ends with "<think>\\n")."""
        return prompt.endswith(THINK_START + "\n")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse {file}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data


def _plain(value: Any) -> Any:
    """A fresh copy built from dicts, lists and tuples, so a template never holds the caller's objects."""
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def _normalize_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """As transformers does: drop keys set to None and fill `reasoning_content`/`thinking` from each other."""
    if not isinstance(message, Mapping):
        raise TypeError(f"chat messages must be dicts, got {message!r}")
    out = {k: _plain(v) for k, v in message.items() if v is not None}
    reasoning = next((out[k] for k in _REASONING_KEYS if k in out), None)
    if reasoning is not None:
        out.setdefault("thinking", reasoning)
        out["reasoning_content"] = reasoning
    return out


# ------------------------------------------------------------------------------------ jinja2 set-up
class _TemplateRaised(Exception):
    """What the template's `raise_exception(message)` raises; surfaces as ValueError(message)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _render(template: str, **variables: Any) -> str:
    import jinja2

    try:
        return _compile_template(template).render(**variables)
    except _TemplateRaised as e:
        raise ValueError(e.message) from None
    except jinja2.TemplateError as e:
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise ValueError(f"chat template error{where}: {e.message or type(e).__name__}") from e
    except TypeError as e:  # e.g. a template adding a string to a number
        raise ValueError(f"chat template error: {e}") from e


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text; rendered unchanged here."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """jinja's `namespace()` that refuses underscore names (no reaching into Python internals)."""

        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")

    class DictFactory:
        """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the `dict` type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise _TemplateRaised(str(message))

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=DictFactory(),
                       namespace=Namespace)
    return env.from_string(template)


# -------------------------------------------------------------------------------- streaming decode
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2 scheme), inverted: char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    char_of = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in char_of:
            char_of[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in char_of.items()}


_UNICODE_TO_BYTE = _byte_level_alphabet()


class IncrementalDecoder:
    """Streaming detokenization: `push` returns only newly completed text, `flush` the rest.

    The deltas concatenate to `tokenizer.decode(all_ids)`. A character split over several tokens
    (CJK, emoji under byte-level BPE) is held back until its last byte arrives; bytes that can never
    form a character come out as U+FFFD exactly as `decode` writes them.
    """

    _WINDOW = 6  # tokens of left context kept by the generic (non byte-level) path

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer._byte_level else None
        # Generic path: a window of ids whose first `_read` were already emitted; the rest are pending.
        self._ids: list[int] = []
        self._read = 0

    def push(self, ids: Sequence[int] | int) -> str:
        try:
            ids = [int(i) for i in ids]
        except TypeError:  # a single id (int, numpy scalar)
            ids = [int(ids)]
        if self.skip_special_tokens:
            ids = [i for i in ids if i not in self.tokenizer.special_token_ids]
        if not ids:
            return ""
        if self._utf8 is not None:
            return self._utf8.decode(b"".join(self.tokenizer.token_bytes(i) for i in ids))
        return self._push_generic(ids)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character becomes U+FFFD); resets the decoder."""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        rest = self._decode(self._ids)[len(self._decode(self._ids[: self._read])):]
        self._ids, self._read = [], 0
        return rest

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _push_generic(self, ids: list[int]) -> str:
        # Decode a short window with and without the pending tokens; the difference is the delta.
        # The window starts at a token already emitted, so decoders that treat the first token
        # specially (e.g. stripping a leading space) do the same on both sides.
        self._ids.extend(ids)
        done = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) <= len(done) or text.endswith("\ufffd") or not text.startswith(done):
            return ""
        delta = text[len(done):]
        # Keep a few emitted tokens as left context for the next window; drop older ones.
        start = max(0, len(self._ids) - self._WINDOW)
        del self._ids[:start]
        self._read = len(self._ids)
        return delta


# -------------------------------------------------------------------------------------- reasoning
def split_reasoning(text: str, *, prompt_ends_in_think: bool = False) -> tuple[str | None, str]:
    """Split generated text into (reasoning_content, content) at `</think>`.

    - `<think>R</think>C` or, when the prompt ended in "<think>\\n", `R</think>C` -> (R, C)
    - `<think>R` with no closing tag, or any text without `</think>` when the prompt ended in
      "<think>\\n" -> (R, ""): reasoning cut off before it finished
    - no tags and a prompt without `<think>` -> (None, text)
    Newlines next to the tags are dropped (R is stripped of newlines at both ends, C at its start);
    empty reasoning gives "" rather than None. Text before an opening `<think>` stays in content.
    """
    head, closed, tail = text.partition(THINK_END)
    before, opened, reasoning = head.partition(THINK_START)
    if not opened:  # no opening tag: everything before </think> is reasoning (the tag was in the prompt)
        before, reasoning = "", head
    if not closed and not opened and not prompt_ends_in_think:
        return None, text
    content = before.lstrip("\n") + tail.lstrip("\n")
    return reasoning.strip("\n"), content


class ByteTokenizer:
    """Token id = UTF-8 byte (0..255), end of text = 256: for tiny random models (tests, the synthetic
    task) where no trained tokenizer exists. Needs a vocabulary of at least 257; has no chat template."""

    eos_token_ids: tuple[int, ...] = (256,)
    special_token_ids = frozenset({256})
    chat_template = None
    vocab_size = 257
    _byte_level = True  # IncrementalDecoder: token_bytes gives each id's bytes
    prompt_ends_in_think = staticmethod(Tokenizer.prompt_ends_in_think)

    def token_bytes(self, i: int) -> bytes:
        return bytes([i]) if 0 <= i < 256 else b""

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> str:
        raise ValueError("the byte tokenizer (tiny models) has no chat template: send the prompt as is "
                         "(python -m qwq_jax.sample --raw)")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"
