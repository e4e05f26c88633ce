"""python -m qwq_jax.serve: a real server on 127.0.0.1 (a free port), driven by the real `openai` client.

Two servers, each shared by the tests of its xdist group:
- the demo model (Qwen2.5-Coder-0.5B-Instruct): greedy answers against `python -m qwq_jax.sample`,
  prompt token counts against transformers' tokenizer, seeded n=2, the full waiting queue;
- a tiny checkpoint built here whose replies are known by construction: a "bigram" model (every
  layer's weights small, the embedding of a few chosen tokens a basis vector whose lm_head row
  picks the next token), so greedy decoding from the end of a thinking prompt writes
  "Two plus two</think>Four" and from the end of a prompt with tools writes one Qwen2.5
  `<tool_call>` block; other tokens get random rows, so other prompts give varied text. Its chat
  template opens `<think>` unless tools are given. Reasoning, tools, every error path, 64
  concurrent streams, disconnects, SIGTERM and the two-process server run on it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx  # the test extra's (raw requests); a missing one fails the run rather than skipping it
import numpy as np
import openai  # the test extra's: the real client
import pytest

from _procs import free_port

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
THINK_REPLY = "Two plus two</think>Four"
TOOL_REPLY = '<tool_call>{"name":"get_weather","arguments":{"city": "Paris"}}</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou can call these tools:\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% if not tools %}<think>\n{% endif %}{% endif %}")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Served:
    """A `python -m qwq_jax.serve` process and clients for it."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, key: str | None = None):
        self.port = free_port()
        self.log = log
        self.key = key
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "qwq_jax.serve", "--port", str(self.port), *args],
                                         env=env or _env(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            self.proc.kill()
            pytest.fail(f"the server did not come up:\n{log.read_text()[-3000:]}")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id

    def post(self, path: str, body: dict, key: str | None = "default", **kw) -> httpx.Response:
        key = self.key if key == "default" else key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.url + path, json=body, headers=headers, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {name: float(value) for name, value in re.findall(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def sse(response: httpx.Response) -> list:
    """The data of each server-sent event ("[DONE]" kept as the string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ------------------------------------------------------------------------------- demo server
@pytest.fixture(scope="module")
def demo_server(demo_checkpoint, tmp_path_factory):
    s = Served(["--checkpoint", str(demo_checkpoint), "--served-model-name", "demo", "--max-num-seqs", "2",
                "--max-model-len", "1024", "--max-waiting", "1"], tmp_path_factory.mktemp("demo") / "server.log")
    yield s
    assert s.stop() == 0, s.log.read_text()[-2000:]


MESSAGES = [{"role": "user", "content": "Name three prime numbers."}]


@pytest.mark.xdist_group("serve_demo")
def test_chat_greedy_equals_the_sample_cli_and_counts_like_transformers(demo_server, demo_checkpoint,
                                                                        demo_hf_tokenizer, capsys):
    from qwq_jax.sample import main  # the CLI's main in this process: the server is the process under test

    code = main(["--checkpoint", str(demo_checkpoint), "--prompt", MESSAGES[0]["content"], "--temperature", "0",
                 "--max-tokens", "12", "--json"])
    r = capsys.readouterr()
    assert code == 0, r.err[-2000:]
    want = json.loads(r.out)
    c = demo_server.client
    got = c.chat.completions.create(model="demo", messages=MESSAGES, temperature=0, max_tokens=12)
    assert got.choices[0].message.content == want["content"]
    assert got.choices[0].finish_reason == want["finish_reason"]
    prompt_ids = demo_hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    prompt_ids = prompt_ids["input_ids"] if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys") else prompt_ids
    assert got.usage.prompt_tokens == len(prompt_ids)
    assert got.usage.completion_tokens == len(want["token_ids"])
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens

    chunks = list(c.chat.completions.create(model="demo", messages=MESSAGES, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want["content"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want["finish_reason"]
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens

    # The same prompt rendered by transformers, through /v1/completions: the same text.
    prompt = demo_hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    plain = c.completions.create(model="demo", prompt=prompt, temperature=0, max_tokens=12, logprobs=0)
    assert plain.choices[0].text == want["content"]
    assert len(plain.choices[0].logprobs.token_logprobs) == len(want["token_ids"]) - (want["finish_reason"] == "stop")
    assert all(lp <= 0 for lp in plain.choices[0].logprobs.token_logprobs)


@pytest.mark.xdist_group("serve_demo")
def test_n2_with_a_seed_is_reproducible_streamed_or_not(demo_server):
    c = demo_server.client
    kw = dict(model="demo", messages=MESSAGES, n=2, seed=1234, temperature=1.0, top_p=1.0, max_tokens=12,
              extra_body={"top_k": 0})
    a = c.chat.completions.create(**kw)
    b = c.chat.completions.create(**kw)
    assert len(a.choices) == 2 and [ch.index for ch in a.choices] == [0, 1]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    streamed = ["", ""]
    for ch in c.chat.completions.create(stream=True, **kw):
        for choice in ch.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [ch.message.content for ch in a.choices]


@pytest.mark.xdist_group("serve_demo")
def test_full_waiting_queue_is_503_with_retry_after(demo_server):
    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": "demo", "prompt": "Count to one hundred:", "max_tokens": 12, "temperature": 0}
            return await asyncio.gather(*[client.post(demo_server.url + "/v1/completions", json=body)
                                          for _ in range(6)])

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"]
    err = busy.json()["error"]
    assert err["code"] == "queue_full" and "waiting queue" in err["message"]


# ------------------------------------------------------------------------------- tiny server
def _tiny_checkpoint(root: Path, demo_tokenizer_dir: Path) -> Path:
    """The bigram checkpoint described in the module docstring, written as HF files and converted."""
    from safetensors.numpy import save_file

    from qwq_jax.tokenizer import Tokenizer

    src = root / "hf"
    src.mkdir()
    shutil.copy(demo_tokenizer_dir / "tokenizer.json", src / "tokenizer.json")
    tok_config = json.loads((demo_tokenizer_dir / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = TEMPLATE
    (src / "tokenizer_config.json").write_text(json.dumps(tok_config))
    tok = Tokenizer.from_dir(src)
    vocab, hidden, heads, kv, head_dim, mlp, layers = 151936, 64, 2, 2, 32, 128, 2
    eos = tok.token_id("<|im_end|>")
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
              "bos_token_id": tok.token_id("<|endoftext|>"), "eos_token_id": eos, "torch_dtype": "float32"}
    (src / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    w = {"model.embed_tokens.weight": rng.normal(0, 1, (vocab, hidden)),
         "lm_head.weight": rng.normal(0, 0.3, (vocab, hidden)), "model.norm.weight": np.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (heads * head_dim, hidden)), ("self_attn.k_proj", (kv * head_dim, hidden)),
                            ("self_attn.v_proj", (kv * head_dim, hidden)), ("self_attn.o_proj", (hidden, heads * head_dim)),
                            ("mlp.gate_proj", (mlp, hidden)), ("mlp.up_proj", (mlp, hidden)),
                            ("mlp.down_proj", (hidden, mlp))):
            w[p + name + ".weight"] = rng.normal(0, 0.05, shape)
        for name, size in (("self_attn.q_proj", heads * head_dim), ("self_attn.k_proj", kv * head_dim),
                           ("self_attn.v_proj", kv * head_dim)):
            w[p + name + ".bias"] = np.zeros(size)
        w[p + "input_layernorm.weight"] = np.ones(hidden)
        w[p + "post_attention_layernorm.weight"] = np.ones(hidden)
    # The chains: the last token of each kind of prompt, then the reply's tokens, then <|im_end|>.
    think_end = tok.encode(tok.apply_chat_template([{"role": "user", "content": "x"}]))[-1]
    tools_end = tok.encode(tok.apply_chat_template([{"role": "user", "content": "x"}], tools=TOOLS))[-1]
    chains = [[think_end, *tok.encode(THINK_REPLY), eos], [tools_end, *tok.encode(TOOL_REPLY), eos]]
    sources = [t for chain in chains for t in chain[:-1]]
    assert len(set(sources)) == len(sources), "a chain token repeats: the bigram cannot tell them apart"
    targets = {t for chain in chains for t in chain[1:]}
    for t in targets:
        w["lm_head.weight"][t] = 0
    w["model.embed_tokens.weight"][:, :32] = 0  # other tokens never lead into a chain (or to <|im_end|>)
    slot = 0
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            w["model.embed_tokens.weight"][a] = 0
            w["model.embed_tokens.weight"][a, slot] = 6.0
            w["lm_head.weight"][b, slot] += 4.0
            slot += 1
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in w.items()}, str(src / "model.safetensors"))
    out = root / "ckpt"
    r = subprocess.run([sys.executable, "-m", "convert", "hf", str(src), str(out)], capture_output=True, text=True,
                       env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def tiny(demo_tokenizer_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-serve")
    ckpt = _tiny_checkpoint(root, demo_tokenizer_dir)
    s = Served(["--checkpoint", str(ckpt), "--served-model-name", "tiny", "--api-key", KEY, "--max-num-seqs", "8",
                "--max-model-len", "4096", "--max-waiting", "128", "--shutdown-timeout", "3"],
               root / "server.log", key=KEY)
    s.checkpoint = ckpt
    yield s
    s.stop()


@pytest.mark.xdist_group("serve_tiny")
def test_reasoning_and_answer_in_their_fields(tiny, demo_hf_tokenizer):
    msgs = [{"role": "user", "content": "What is two plus two?"}]
    got = tiny.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=32)
    m = got.choices[0].message
    assert (m.reasoning_content, m.content) == ("Two plus two", "Four")
    assert got.choices[0].finish_reason == "stop"
    reply_tokens = len(demo_hf_tokenizer.encode(THINK_REPLY, add_special_tokens=False))
    assert got.usage.completion_tokens == reply_tokens + 1  # and <|im_end|>
    assert got.usage.completion_tokens_details.reasoning_tokens == len(
        demo_hf_tokenizer.encode("Two plus two</think>", add_special_tokens=False))
    prompt_ids = demo_hf_tokenizer.apply_chat_template(msgs, chat_template=TEMPLATE, add_generation_prompt=True,
                                                       tokenize=False)
    assert got.usage.prompt_tokens == len(demo_hf_tokenizer.encode(prompt_ids, add_special_tokens=False))

    # logprobs with top_logprobs: the chain's tokens are each step's likeliest by far.
    got = tiny.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=32,
                                              logprobs=True, top_logprobs=2)
    steps = got.choices[0].logprobs.content
    assert "".join(s.token for s in steps) == THINK_REPLY
    for s in steps:
        assert [t.token for t in s.top_logprobs][0] == s.token and len(s.top_logprobs) == 2
        assert s.top_logprobs[0].logprob == pytest.approx(s.logprob) and s.top_logprobs[1].logprob < s.logprob - 5

    reasoning = content = ""
    for ch in tiny.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=32,
                                                  stream=True):
        delta = ch.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
    assert (reasoning, content) == ("Two plus two", "Four")


@pytest.mark.xdist_group("serve_tiny")
def test_tool_call_is_parsed(tiny, demo_hf_tokenizer):
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    got = tiny.client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, temperature=0, max_tokens=40)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    # The tools went through the template: the prompt counts as transformers renders it.
    text = demo_hf_tokenizer.apply_chat_template(msgs, tools=TOOLS, chat_template=TEMPLATE, add_generation_prompt=True,
                                                 tokenize=False)
    assert got.usage.prompt_tokens == len(demo_hf_tokenizer.encode(text, add_special_tokens=False))

    chunks = list(tiny.client.chat.completions.create(model="tiny", messages=msgs, tools=TOOLS, temperature=0,
                                                      max_tokens=40, stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [("get_weather", {"city": "Paris"})]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


ERRORS = [  # (body changes, status, param)
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 2}, 400, "top_p"),
    ({"n": 0}, 400, "n"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"presence_penalty": 3}, 400, "presence_penalty"),
    ({"stop": 5}, 400, "stop"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "word " * 5000}]}, 400, "messages"),
    ({"model": "gpt-4"}, 404, "model"),
    # values the engine thread could not take: a 400 each, never an engine that stops for everyone
    ({"stop_token_ids": [2**31]}, 400, "stop_token_ids"),
    ({"stop_token_ids": [151936]}, 400, "stop_token_ids"),
    ({"chat_template_kwargs": {"tools": 5}}, 400, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_generation_prompt": "no"}}, 400, "chat_template_kwargs"),
]


@pytest.mark.xdist_group("serve_tiny")
def test_every_error_is_an_openai_error_object(tiny):
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for change, status, param in ERRORS:
        r = tiny.post("/v1/chat/completions", {**base, **change})
        assert r.status_code == status, (change, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"], (change, err)
        if change.get("max_tokens") == 100000 or "word" in str(change):
            assert err["code"] == "context_length_exceeded" and "maximum context length is 4096" in err["message"]
    for key in (None, "wrong"):
        r = tiny.post("/v1/chat/completions", base, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(tiny.url + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {}
                         ).status_code == 401
    r = httpx.post(tiny.url + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(tiny.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.post(tiny.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},  # JSON allows it
                   content=b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = tiny.post("/v1/completions", {"model": "tiny", "prompt": ["x"] * 129, "max_tokens": 1})  # --max-waiting 128
    assert r.status_code == 400 and "--max-waiting" in r.json()["error"]["message"], r.text
    r = tiny.post("/v1/chat/completions", {**base, "top_k": 2**40, "temperature": 0})  # past the vocabulary: off
    assert r.status_code == 200, r.text
    # The real client raises the matching exception classes.
    with pytest.raises(openai.NotFoundError):
        tiny.client.chat.completions.create(model="gpt-4", messages=base["messages"])
    with pytest.raises(openai.BadRequestError):
        tiny.client.chat.completions.create(model="tiny", messages=base["messages"], temperature=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(tiny.url + "/health").json()["status"] == "ok"  # none of that hurt the server


@pytest.mark.xdist_group("serve_tiny")
def test_streams_never_send_the_stop_string_and_offsets_run_on(tiny):
    msgs = [{"role": "user", "content": "What is two plus two?"}]
    # The bigram model replies "Two plus two</think>Four"; each stop string cuts it where it first appears.
    for stop, want in (("plus", ("Two ", "")), (" t", ("Two plus", "")), (["Four"], ("Two plus two", "")),
                       ("o", ("Tw", "")), (["zz", "ur"], ("Two plus two", "Fo"))):
        plain = tiny.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=32,
                                                    stop=stop).choices[0]
        assert (plain.message.reasoning_content, plain.message.content) == want, stop
        assert plain.finish_reason == "stop"
        got = ["", ""]
        for ch in tiny.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=32,
                                                      stop=stop, stream=True):
            delta = ch.choices[0].delta
            got[0] += (delta.model_extra or {}).get("reasoning_content") or ""
            got[1] += delta.content or ""
        assert tuple(got) == want, stop
    # Completions' text_offset: where each token starts in the choice's text, across a stream's chunks,
    # after an echoed prompt.
    prompt = "the quick brown fox"
    tokens, offsets = [], []
    for ch in tiny.client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=8, logprobs=1,
                                             stream=True):
        if ch.choices[0].logprobs:
            tokens += ch.choices[0].logprobs.tokens
            offsets += ch.choices[0].logprobs.text_offset
    assert len(tokens) == 8 and offsets == [sum(map(len, tokens[:i])) for i in range(8)]
    echoed = tiny.client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=8, logprobs=1,
                                            echo=True).choices[0]
    assert echoed.logprobs.tokens == tokens
    assert echoed.logprobs.text_offset == [len(prompt) + o for o in offsets]
    assert echoed.text[len(prompt) + offsets[3]:].startswith(tokens[3])


PROMPTS = ["the quick brown fox", "one two three four five", "JAX compiles", "paged attention",
           "a b c d e f g", "continuous batching", "hello world", "tokens per second"]


@pytest.mark.xdist_group("serve_tiny")
def test_64_concurrent_streams_equal_each_request_alone_and_disconnects_free_the_pool(tiny):
    alone = {p: tiny.client.completions.create(model="tiny", prompt=p, temperature=0, max_tokens=12).choices[0].text
             for p in PROMPTS}
    assert len(set(alone.values())) > 1  # the prompts give different texts

    async def one(client, prompt):
        text, done, finish = "", False, None
        stream = await client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=12, stream=True)
        async for ch in stream:
            text += ch.choices[0].text
            finish = ch.choices[0].finish_reason or finish
        return text, finish

    async def main():
        client = openai.AsyncOpenAI(base_url=tiny.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*[one(client, PROMPTS[i % len(PROMPTS)]) for i in range(64)])

    results = asyncio.run(main())
    for i, (text, finish) in enumerate(results):
        assert text == alone[PROMPTS[i % len(PROMPTS)]], i
        assert finish in ("stop", "length")
    # Every raw stream ends in [DONE].
    with httpx.stream("POST", tiny.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "x", "max_tokens": 4, "stream": True}, timeout=60) as r:
        assert sse(r)[-1] == "[DONE]"

    # Clients that walk away mid-stream: their requests are aborted and their pages freed.
    async def leave(client):
        async with client.stream("POST", tiny.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                                 json={"model": "tiny", "prompt": "never ending", "max_tokens": 3000,
                                       "temperature": 0.8, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return True

    async def walk_away():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[leave(client) for _ in range(8)])

    assert all(asyncio.run(walk_away()))
    deadline = time.time() + 30
    while time.time() < deadline:
        m = tiny.metrics()
        if m["qwq_kv_pages_used"] == 0 and m["qwq_requests_running"] == 0:
            break
        time.sleep(0.2)
    assert m["qwq_kv_pages_used"] == 0 and m["qwq_requests_running"] == 0, m
    assert m['qwq_requests_finished_total{finish_reason="abort"}'] >= 8
    assert m["qwq_time_to_first_token_seconds_count"] >= 64


@pytest.mark.slow
@pytest.mark.xdist_group("serve_tiny")
def test_two_processes_serve_what_one_serves(tiny, tmp_path):
    want = [tiny.client.completions.create(model="tiny", prompt=p, temperature=0, max_tokens=16).choices[0].text
            for p in PROMPTS[:3]]
    port, coordinator = free_port(), f"127.0.0.1:{free_port()}"
    env = _env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    procs = []
    for pid in range(2):
        with open(tmp_path / f"p{pid}.log", "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "qwq_jax.serve", "--checkpoint", str(tiny.checkpoint), "--served-model-name",
                 "tiny", "--port", str(port), "--mesh", "tensor=2", "--max-model-len", "1024", "--coordinator",
                 coordinator, "--num-processes", "2", "--process-id", str(pid)],
                env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        while time.time() < deadline:
            assert all(p.poll() is None for p in procs), (tmp_path / "p0.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        got = [client.completions.create(model="tiny", prompt=p, temperature=0, max_tokens=16).choices[0].text
               for p in PROMPTS[:3]]
        assert got == want
        procs[0].send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(120) == 0, [(tmp_path / f"p{i}.log").read_text()[-2000:] for i in range(2)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.xdist_group("serve_tiny")
def test_sigterm_finishes_streams_cleanly_and_exits_0(tiny):
    """Last of its group: it stops the shared tiny server."""
    with httpx.stream("POST", tiny.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "long", "max_tokens": 3000, "temperature": 0.8,
                            "stream": True}, timeout=120) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    tiny.proc.send_signal(signal.SIGTERM)
    assert events[-1] == "[DONE]"
    finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes[-1] in ("length", "abort") and all(f is None for f in finishes[:-1])
    assert tiny.proc.wait(60) == 0
    assert "shutting down" in tiny.log.read_text()
