"""qwq_jax.openai_api without a server: streamed fields add up to the final ones, tool-call parsing."""

import json

import numpy as np
import pytest

from qwq_jax.openai_api import ChoiceStream, OutputFields, parse_tool_calls

CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
CASES = [  # (text, in_think, tools, stops, (reasoning, content) by hand)
    ("Let me see.\n\nIt is 4.\n</think>\n\nThe answer is 4.", True, False, (), ("Let me see.\n\nIt is 4.", "The answer is 4.")),
    ("<think>\nhmm\n</think>\nyes", False, False, (), ("hmm", "yes")),
    ("still thinking when cut off", True, False, (), ("still thinking when cut off", "")),
    ("plain answer with </thin in it", False, False, (), (None, "plain answer with </thin in it")),
    ("a <b> c", False, False, (), (None, "a <b> c")),
    ("ok</think>Sure.\n\n" + CALL, True, True, (), ("ok", "Sure.")),
    # With stops, the engine ends the sequence with the token that completes the earliest stop string
    # and cuts the completion's text before it: no delta may carry any of the stop string.
    ("Answer: 42. STOP here", False, False, ("STOP",), (None, "Answer: 42. ")),
    ("Two plus two</think>Four", True, False, ("plus",), ("Two ", "")),
    ("Two plus two", False, False, ("o",), (None, "Tw")),
    ("a b c d e", False, False, ("zz", " c", "d"), (None, "a b")),
    ("Hm</think>The end.", True, False, ("end",), ("Hm", "The ")),
]


def _engine_cut(tokenizer, ids: list[int], stops: tuple[str, ...]) -> tuple[list[int], str]:
    """What the engine returns for `ids` under `stops`, worked out independently of it: the tokens up
    to the first one whose text holds a stop string, and the text before the earliest stop."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return ids[:n], text[:min(hits)]
    return ids, tokenizer.decode(ids)


@pytest.fixture(scope="module")
def tokenizer(demo_tokenizer_dir):
    from qwq_jax.tokenizer import Tokenizer

    return Tokenizer.from_dir(demo_tokenizer_dir)


@pytest.mark.parametrize("text,in_think,tools,stops,want", CASES)
def test_streamed_deltas_concatenate_to_the_final_fields(tokenizer, text, in_think, tools, stops, want):
    fields = OutputFields(in_think=in_think, tools=tools)
    ids, text = _engine_cut(tokenizer, tokenizer.encode(text), stops)
    reasoning, content, calls = fields.final(text)
    assert (reasoning, content) == want
    rng = np.random.default_rng(0)
    for _ in range(5):  # random event boundaries
        cuts = sorted(set(rng.integers(0, len(ids) + 1, size=4).tolist()) | {0, len(ids)})
        s = ChoiceStream(tokenizer, fields, stops, eos=())
        got = ["", ""]
        for a, b in zip(cuts, cuts[1:]):
            r, c = s.push(ids[a:b])
            got[0] += r
            got[1] += c
        r, c, final_calls = s.finish(text)
        got[0] += r
        got[1] += c
        assert got == [reasoning or "", content or ""]
        assert [x["function"] for x in final_calls] == [x["function"] for x in calls]


def test_tool_calls_parse_and_bad_ones_stay_text():
    before, calls = parse_tool_calls("I'll look.\n" + CALL + CALL.replace('"f"', '"g"'))
    assert before == "I'll look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("f", {"x": 1}),
                                                                                                   ("g", {"x": 1})]
    assert parse_tool_calls(CALL)[0] is None
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_tool_calls(broken) == (broken, [])
    assert parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')[1] == []  # no name
    # A block cut off by max_tokens after complete JSON still parses (as vLLM's hermes parser does).
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}')[1][0]["function"]["name"] == "f"
