"""The OpenAI API's request and response objects, as vLLM's OpenAI server reads and writes them
(the HTTP server and the engine loop are qwq_jax/serve.py).

    request = parse_chat(body, ctx)          # ApiError (400, naming the parameter) for bad input
    fields = OutputFields(in_think=..., tools=...)
    fields.final(text) -> (reasoning_content, content, tool_calls)
    stream = ChoiceStream(tokenizer, fields, stops); stream.push(token_ids) -> deltas; stream.finish(text)

- `reasoning_content` is the text in `<think>...</think>`; a generation that starts inside the
  block (a prompt ending in "<think>\\n", as QwQ's template writes) is reasoning up to `</think>`.
  Split as `qwq_jax.tokenizer.split_reasoning` does; the streamed deltas of each field
  concatenate to the non-streamed field.
- `tools` (OpenAI function tools) are rendered by the chat template; Qwen2.5's
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in the answer become
  `tool_calls` (content keeps the text before the first block, None if empty) and the finish
  reason "tool_calls". A block that is not a JSON object with a string "name" leaves the
  answer as text, as vLLM's hermes parser does.
- Streams hold back text that could still turn into a tag or a stop string, so what was sent
  is never taken back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import uuid
from typing import Any

from qwq_jax.sampling import MAX_N, SamplingParams
from qwq_jax.tokenizer import THINK_END, THINK_START, IncrementalDecoder, split_reasoning

TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An OpenAI error object with its HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 500: "internal_error", 503: "server_overloaded"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Context:
    """What parsing needs to know of the served model."""

    model_name: str
    tokenizer: Any
    defaults: SamplingParams          # the checkpoint's generation_config / family recommendation
    max_model_len: int                # prompt + max_tokens at most
    max_tokens_cap: int               # the most tokens one sequence can hold in the page pool
    default_max_tokens: int | None = None  # None: what is left of the context (as vLLM)
    vocab_size: int | None = None     # the model's (prompt token ids are checked against it)
    max_logprobs: int = 0             # top_logprobs at most (the engine's max_logprobs)


@dataclasses.dataclass
class Parsed:
    """One validated request."""

    prompts: list[list[int]]          # token ids; several for a completions request with a prompt list
    prompt_texts: list[str]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None       # None = off; else top_logprobs per token (0: only the chosen one)
    in_think: bool = False            # the prompt opens a <think> block
    tools: bool = False               # parse tool calls out of the answer
    echo: bool = False
    chat: bool = True


# --------------------------------------------------------------------------------- parameters
def _bad(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param)


def _field(body: dict, name: str, kinds: tuple, what: str, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:  # JSON true is not a number here
        raise _bad(f"{name} must be {what}, got {json.dumps(value)}", name)
    if not isinstance(value, kinds):
        raise _bad(f"{name} must be {what}, got {json.dumps(value)[:80]}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(f"{name} must be finite", name)
    return value


def _sampling(body: dict, ctx: Context, prompt_tokens: int) -> SamplingParams:
    """SamplingParams from the OpenAI fields; ApiError(400) naming the first bad one."""
    num = (int, float)
    fields: dict[str, Any] = {}
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = _field(body, name, num, "a number")
        if value is not None:
            fields[name] = float(value)
    for name in ("top_k", "n"):
        value = _field(body, name, (int,), "an integer")
        if value is not None:
            fields[name] = value
    if fields.get("n", 1) > MAX_N:
        raise _bad(f"n must be at most {MAX_N}, got {fields['n']}", "n")
    seed = _field(body, "seed", (int,), "an integer")
    if seed is not None:
        fields["seed"] = seed % 2**32
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop must be a string or a list of strings", "stop")
        fields["stop"] = tuple(s for s in stop if s)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
            raise _bad("stop_token_ids must be a list of token ids", "stop_token_ids")
        fields["stop_token_ids"] = tuple(stop_ids)
    max_tokens, which = None, "max_tokens"
    for name in ("max_completion_tokens", "max_tokens"):
        value = _field(body, name, (int,), "an integer")
        if value is not None:
            max_tokens, which = value, name
            break
    room = min(ctx.max_model_len, ctx.max_tokens_cap) - prompt_tokens
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {min(ctx.max_model_len, ctx.max_tokens_cap)} "
                            f"tokens. However, your prompt has {prompt_tokens} tokens, leaving no room for a reply.",
                       "messages" if "messages" in body else "prompt", "context_length_exceeded")
    if max_tokens is None:
        max_tokens = room if ctx.default_max_tokens is None else min(room, ctx.default_max_tokens)
    elif max_tokens < 1:
        raise _bad(f"{which} must be at least 1, got {max_tokens}", which)
    elif max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {min(ctx.max_model_len, ctx.max_tokens_cap)} "
                            f"tokens. However, you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} "
                            f"in the prompt, {max_tokens} for the completion). Please reduce the length of the "
                            f"prompt or {which}.", which, "context_length_exceeded")
    fields["max_tokens"] = max_tokens
    params = dataclasses.replace(ctx.defaults, **fields)
    try:
        return params.validate(vocab_size=ctx.vocab_size or ctx.tokenizer.vocab_size)
    except ValueError as e:  # "name=value must be ..."
        name = str(e).split("=", 1)[0]
        raise _bad(str(e), name if name.isidentifier() else None) from None


def _unsupported(body: dict) -> None:
    """Parameters we accept only in their no-op form."""
    bias = body.get("logit_bias")
    if bias:
        raise _bad("logit_bias is not supported", "logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        raise _bad("response_format: only {\"type\": \"text\"} is supported", "response_format")
    if body.get("suffix"):
        raise _bad("suffix is not supported", "suffix")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise _bad("best_of must equal n (or be left out)", "best_of")


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _field(body, "stream", (bool,), "true or false", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _bad("stream_options must be an object", "stream_options")
    if not stream:
        raise _bad("stream_options is only allowed with stream: true", "stream_options")
    return stream, _field(options, "include_usage", (bool,), "true or false", False)


def _text_content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}: only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"{where}: content must be a string or a list of text parts", "messages")


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"{where} must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}", "messages")
        msg = {k: v for k, v in m.items() if k not in ("role", "content")}
        msg["role"] = "system" if role == "developer" else role
        msg["content"] = _text_content(m.get("content"), where)
        calls = m.get("tool_calls")
        if calls is not None:  # the template wants arguments as objects; the API sends JSON strings
            if not isinstance(calls, list):
                raise _bad(f"{where}.tool_calls must be a list", "messages")
            fixed = []
            for call in calls:
                call = dict(call) if isinstance(call, dict) else call
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise _bad(f"{where}.tool_calls entries need function.name", "messages")
                fn = dict(fn)
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except ValueError:
                        pass
                call["function"] = fn
                fixed.append(call)
            msg["tool_calls"] = fixed
        out.append(msg)
    return out


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise _bad("tools must be a list of {\"type\": \"function\", \"function\": {\"name\": ...}}", "tools")
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return None
    if choice != "auto":
        raise _bad("tool_choice: only \"auto\" and \"none\" are supported", "tool_choice")
    return tools or None


def _logprobs_chat(body: dict, ctx: Context) -> int | None:
    on = _field(body, "logprobs", (bool,), "true or false", False)
    top = _field(body, "top_logprobs", (int,), "an integer")
    if top is not None and not on and top:
        raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    if not on:
        return None
    top = top or 0
    if not 0 <= top <= ctx.max_logprobs:
        raise _bad(f"top_logprobs must be in [0, {ctx.max_logprobs}] (the server's --max-logprobs), got {top}",
                   "top_logprobs")
    return top


def _encode(ctx: Context, text: str, field: str) -> list[int]:
    """Token ids of `text`; 400 naming `field` for text that is not valid Unicode (JSON allows a lone
    surrogate such as \\ud800, which no tokenizer can take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(f"{field} is not valid Unicode: {e.reason} at character {e.start}", field) from None
    return ctx.tokenizer.encode(text)


def parse_chat(body: Any, ctx: Context) -> Parsed:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    _unsupported(body)
    messages = _messages(body)
    tools = _tools(body)
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise _bad("chat_template_kwargs must be an object", "chat_template_kwargs")
    kwargs = {"add_generation_prompt": True, **kwargs}
    taken = sorted(set(kwargs) & {"messages", "tools", "tokenize", "chat_template"})
    if taken:
        raise _bad(f"chat_template_kwargs cannot set {', '.join(taken)}: give messages and tools as the request's "
                   "own fields", "chat_template_kwargs")
    if not isinstance(kwargs["add_generation_prompt"], bool):
        raise _bad("chat_template_kwargs.add_generation_prompt must be true or false", "chat_template_kwargs")
    try:
        prompt = ctx.tokenizer.apply_chat_template(messages, tools=tools, **kwargs)
    except (ValueError, TypeError) as e:
        raise _bad(f"the chat template cannot render these messages: {e}", "messages") from None
    ids = _encode(ctx, prompt, "messages")
    stream, usage = _stream_flags(body)
    logprobs = _logprobs_chat(body, ctx)
    params = dataclasses.replace(_sampling(body, ctx, len(ids)), logprobs=logprobs or 0)
    return Parsed([ids], [prompt], params, stream, usage, logprobs, ctx.tokenizer.prompt_ends_in_think(prompt),
                  tools is not None, chat=True)


def parse_completion(body: Any, ctx: Context) -> Parsed:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    _unsupported(body)
    prompt = body.get("prompt")
    vocab = ctx.vocab_size or ctx.tokenizer.vocab_size

    def ids_list(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        prompts = [prompt]
    elif ids_list(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                  or all(ids_list(p) for p in prompt)):
        prompts = prompt
    else:
        raise _bad("prompt must be a string, a list of strings, a list of token ids or a list of such lists",
                   "prompt")
    ids, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            if not p:
                raise _bad("prompt must not be empty", "prompt")
            ids.append(_encode(ctx, p, "prompt"))
            texts.append(p)
        else:
            if min(p) < 0 or max(p) >= vocab:
                raise _bad(f"prompt token ids must be in [0, {vocab})", "prompt")
            ids.append(list(p))
            texts.append(ctx.tokenizer.decode(p))
    stream, usage = _stream_flags(body)
    logprobs = _field(body, "logprobs", (int,), "an integer")
    if logprobs is not None and not 0 <= logprobs <= ctx.max_logprobs:
        raise _bad(f"logprobs must be in [0, {ctx.max_logprobs}] (the server's --max-logprobs), got {logprobs}",
                   "logprobs")
    echo = _field(body, "echo", (bool,), "true or false", False)
    params = dataclasses.replace(_sampling(body, ctx, max(len(i) for i in ids)), logprobs=logprobs or 0)
    return Parsed(ids, texts, params, stream, usage, logprobs, False, False, echo, chat=False)


# ----------------------------------------------------------------------------------- outputs
def parse_tool_calls(content: str) -> tuple[str | None, list[dict]]:
    """(content before the first call or None, tool_calls) from Qwen2.5's `<tool_call>` blocks;
    (content, []) when there are none or one does not parse."""
    start = content.find(TOOL_START)
    if start < 0:
        return content, []
    calls = []
    for block in re.findall(re.escape(TOOL_START) + r"(.*?)(?:" + re.escape(TOOL_END) + r"|$)",
                            content[start:], flags=re.S):
        try:
            call = json.loads(block.strip())
        except ValueError:
            return content, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return content, []
        args = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    before = content[:start].rstrip()
    return (before or None), calls


@dataclasses.dataclass
class OutputFields:
    """How a choice's text splits into reasoning, content and tool calls."""

    in_think: bool = False
    tools: bool = False
    chat: bool = True

    def final(self, text: str) -> tuple[str | None, str | None, list[dict]]:
        if not self.chat:
            return None, text, []
        reasoning, content = split_reasoning(text, prompt_ends_in_think=self.in_think)
        calls: list[dict] = []
        if self.tools:
            content, calls = parse_tool_calls(content)
        return reasoning, content, calls

    def partial(self, text: str) -> tuple[str, str]:
        """(reasoning, content) safe to have sent for `text` so far: the final fields extend them."""
        if not self.chat:
            return "", text
        reasoning, content = split_reasoning(text, prompt_ends_in_think=self.in_think)
        if self.tools:
            cut = content.find(TOOL_START)
            content = (content if cut < 0 else content[:cut]).rstrip()
        return reasoning or "", content

    def holdback(self) -> tuple[str, ...]:
        """Markers whose beginning at the end of the text must wait for the next tokens."""
        if not self.chat:
            return ()
        return (THINK_START, THINK_END) + ((TOOL_START,) if self.tools else ())


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins one of `markers` (0 if none)."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if m.startswith(text[-k:]):
                best = k
                break
    return best


class ChoiceStream:
    """One choice's stream: token ids in, (reasoning, content) deltas out."""

    def __init__(self, tokenizer: Any, fields: OutputFields, stops: tuple[str, ...], eos: tuple[int, ...]):
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.fields, self.eos, self.stops = fields, set(eos), stops
        self.text = ""
        self.sent = ("", "")

    def push(self, token_ids: list[int]) -> tuple[str, str]:
        """The new text that is safe to send: never a stop string or what follows it (the engine ends
        a sequence with the token that completes one), and an end that could begin a stop string or a
        field marker waits for the next tokens."""
        self.text += self.decoder.push([t for t in token_ids if t not in self.eos])
        hits = [self.text.find(s) for s in self.stops if s in self.text]
        safe = self.text[:min(hits)] if hits else self.text[: len(self.text) - _partial_suffix(self.text, self.stops)]
        safe = safe[: len(safe) - _partial_suffix(safe, self.fields.holdback())]
        return self._delta(*self.fields.partial(safe))

    def finish(self, text: str) -> tuple[str, str, list[dict]]:
        """The rest of each field, from the completion's final text, and its tool calls."""
        reasoning, content, calls = self.fields.final(text)
        r, c = self._delta(reasoning or "", content or "")
        return r, c, calls

    def _delta(self, reasoning: str, content: str) -> tuple[str, str]:
        out = []
        for new, old in zip((reasoning, content), self.sent):
            # A field only grows; should one ever not extend what was sent, send nothing more of it.
            out.append(new[len(old):] if new.startswith(old) else "")
        self.sent = (reasoning if reasoning.startswith(self.sent[0]) else self.sent[0],
                     content if content.startswith(self.sent[1]) else self.sent[1])
        return out[0], out[1]


def reasoning_tokens(tokenizer: Any, token_ids: list[int], in_think: bool, eos: tuple[int, ...]) -> int:
    """Tokens of a completion up to the one that closes its reasoning (all of them when it never
    closes; 0 for a completion that does not reason)."""
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    text, opened = "", in_think
    for k, t in enumerate(token_ids):
        if t in eos:
            return k if opened else 0
        text += decoder.push([t])
        if not opened and THINK_START in text:
            opened = True
        if opened and THINK_END in text:
            return k + 1
    return len(token_ids) if opened else 0


def token_logprobs(tokenizer: Any, ids: list[int], logprobs: list[float], chat: bool,
                   top: list[list[tuple[int, float]]] | None = None, start: int = 0) -> Any:
    """The `logprobs` object of a choice: the chosen tokens' log-probabilities and, with `top`, each
    step's likeliest tokens with theirs (chat: `top_logprobs` lists; completions: {token: logprob},
    and each token's `text_offset` in the choice's text, the first at `start`: the text already
    returned, an echoed prompt included)."""
    def text(t: int) -> str:
        return tokenizer.decode([t])

    strings = [text(t) for t in ids]
    if chat:
        def entry(s: str, lp: float) -> dict:
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(s, lp), "top_logprobs": [entry(text(t), v) for t, v in (top[k] if top else [])]}
                            for k, (s, lp) in enumerate(zip(strings, logprobs))]}
    offsets, at = [], start
    for s in strings:
        offsets.append(at)
        at += len(s)
    return {"tokens": strings, "token_logprobs": list(logprobs),
            "top_logprobs": [{text(t): v for t, v in step} for step in top] if top else None, "text_offset": offsets}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
