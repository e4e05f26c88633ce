"""qwq_jax/rl/rewards.py: answer extraction, math-verify pool (timeouts, restarts), format, code, combine."""

import os
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from qwq_jax.rl.rewards import (MathVerifier, RewardSpec, combine, code_reward, extract_answer, extract_code,
                                format_reward, math_reward)
from qwq_jax.rl.sandbox import SandboxUnavailable, check_isolation


def _weaker() -> dict:
    """Where the sandbox has no private filesystem view the code reward refuses to run unless told (below)."""
    return {} if "fsview" in check_isolation(allow_weaker=True) else {"allow_weaker": True}


@pytest.fixture(scope="module")
def hooks_env():
    """Workers started while this is active honour the "__sleep__:<s>" test hook."""
    old = os.environ.get("QWQ_REWARD_TEST_HOOKS")
    os.environ["QWQ_REWARD_TEST_HOOKS"] = "1"
    yield
    if old is None:
        del os.environ["QWQ_REWARD_TEST_HOOKS"]
    else:
        os.environ["QWQ_REWARD_TEST_HOOKS"] = old


@pytest.fixture(scope="module")
def verifier(hooks_env):
    with MathVerifier(num_workers=2, timeout=5.0) as v:
        yield v


# ---- extract_answer -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{\frac{\sqrt{2}}{\left\{3\right\}}} done", r"\frac{\sqrt{2}}{\left\{3\right\}}"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not count
    (r"first \boxed{1}, then \boxed{ 2 }", "2"),  # the last box, stripped
    (r"$\fbox{7}$", "7"),
    (r"\boxed {x+1}", "x+1"),
    (r"\boxed{}", None),
    (r"a \boxed{1} then a truncated \boxed{\frac{1}{", None),  # the last box never closes
    ("The answer is 42.", "42"),
    ("Thus the final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("Answer: 17", "17"),
    ("**Final Answer**: 12", "12"),
    ("**Final Answer:** 12", "12"),
    ("**Final Answer**\n\n\\( x = 3 \\)", "x = 3"),
    ("Answer: 1\nWait, no. The answer is 2", "2"),  # the last plain form
    ("I think it's about 5 or 6", None),
    ("The answer isn't obvious", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_only_after_think():
    assert extract_answer(r"<think>maybe \boxed{1}?</think>The answer is \boxed{2}.") == "2"
    assert extract_answer(r"maybe \boxed{1}?</think>So it is \boxed{3}") == "3"
    assert extract_answer(r"<think>\boxed{1}. The answer is 1</think>I could not decide.") is None
    assert extract_answer(r"<think>reasoning \boxed{1} without an end") == "1"  # no </think>: whole text


# ---- math reward ----------------------------------------------------------------------------------

def test_math_verify_right_wrong_equivalent(verifier):
    answers = ["42", "41", "1/2", "0.5", r"\frac{1}{2}", r"\dfrac{1}{2}", r"\frac12", "x^2 + 2x + 1", r"\sqrt{8}"]
    refs = ["42", "42", "0.5", r"\frac{1}{2}", "1/2", "0.5", "0.5", "(x+1)^2", r"2\sqrt{2}"]
    assert verifier.verify(answers, refs) == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_math_verify_malformed_and_missing(verifier):
    assert verifier.verify([r"\frac{1}{", None, "", "}{", "1/2"], ["1/2", "1/2", "1/2", "1/2", r"\frac{1}{"]) == \
        [0.0, 0.0, 0.0, 0.0, 0.0]
    assert verifier.verify([], []) == []
    with pytest.raises(ValueError):
        verifier.verify(["1"], [])


def test_math_reward_on_completions(verifier):
    completions = [
        r"<think>1/2 or 0.5?</think>The result is $\boxed{\dfrac{1}{2}}$.",
        r"<think>hmm</think>The answer is 0.5",
        r"<think>hmm</think>\boxed{0.4}",
        r"<think>\boxed{0.5}</think>no idea",  # the boxed answer is inside the reasoning only
        "no answer at all",
    ]
    assert math_reward(completions, ["0.5"] * 5, verifier) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_math_verify_timeout_kills_and_replaces_the_worker(hooks_env):
    with MathVerifier(num_workers=1, timeout=1.0) as v:
        assert v.verify(["3"], ["3"]) == [1.0]  # started and warm
        pid = v._workers[0].proc.pid
        start = time.monotonic()
        assert v.verify(["1"], ["__sleep__:60"]) == [0.0]
        assert time.monotonic() - start < 1.0 + 2.0
        assert v.restarts == 1
        assert v._workers[0].proc.pid != pid
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped
        assert v.verify(["0.5", "2"], ["1/2", "3"]) == [1.0, 0.0]  # the replacement works
        # A batch with one slow answer: the others are still graded (by the replacement).
        assert v.verify(["1", "1", "2"], ["1", "__sleep__:60", "2"]) == [1.0, 0.0, 1.0]
        assert v.restarts == 2


def test_math_verify_dead_worker_is_replaced(verifier):
    victim = verifier._workers[0].proc
    before = verifier.restarts
    victim.kill()
    victim.wait()
    assert verifier.verify(["2", "3", "4"], ["2", "3", "5"]) == [1.0, 1.0, 0.0]
    assert verifier.restarts == before + 1


def test_math_verify_worker_killed_while_starting_is_replaced():
    with MathVerifier(num_workers=1, timeout=5.0) as v:
        v._workers[0].proc.kill()  # long before it has imported math-verify
        assert v.verify(["1/2"], ["0.5"]) == [1.0]
        assert v.restarts == 1


def test_math_verifier_close():
    v = MathVerifier(num_workers=1, timeout=5.0)
    procs = [w.proc for w in v._workers]
    v.close()
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(RuntimeError):
        v.verify(["1"], ["1"])


# ---- format reward --------------------------------------------------------------------------------

def test_format_reward_prompt_ends_in_think():
    completions = [
        "reasoning...\n</think>\n\nThe answer is 4.",  # good
        "</think>4",  # empty reasoning is still one block
        "reasoning</think>   \n",  # no answer
        "reasoning without an end",
        "<think>reasoning</think>answer",  # the prompt already opened <think>
        "a</think>b</think>c",  # two ends
    ]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_format_reward_full_block():
    completions = [
        "<think>\nreasoning\n</think>\nanswer",
        "  <think>r</think>a",
        "preamble <think>r</think>a",  # not at the start
        "<think>r</think>",  # no answer
        "<think>a<think>b</think>c",  # two opens
        "<think>r</think>a<think>again</think>b",
        "r</think>a",
    ]
    assert format_reward(completions, prompt_ends_in_think=False) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


# ---- code reward ----------------------------------------------------------------------------------

TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "-5 3\n", "output": "-2"},
         {"input": "10 20\n", "output": "30  \n\n"}]


def _reply(code: str) -> str:
    return f"<think>Let me write it.\n```python\nprint('draft')\n```\n</think>Here:\n```python\n{code}\n```\n"


def test_extract_code():
    assert extract_code(_reply("print(1)")) == "print(1)\n"
    assert extract_code("```py\nx=1\n```\nand\n```Python\nx=2\n```") == "x=2\n"
    assert extract_code("```\nno language\n```") is None
    assert extract_code("<think>```python\nprint(1)\n```</think>no code") is None


@pytest.mark.xdist_group("sandbox")  # runs programs: never beside tests/test_rl_sandbox.py's fork bombs
def test_code_reward():
    correct = _reply("a, b = map(int, input().split())\nprint(a + b)")
    partial = _reply("a, b = map(int, input().split())\nprint(abs(a) + abs(b))")  # wrong on negatives
    broken = _reply("def f(:\n    pass")
    crashes_after_printing = _reply("a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(1)")
    no_code = "<think>hmm</think>The answer is print(3)."
    slow = _reply("while True: pass")
    scores = code_reward([correct, partial, broken, crashes_after_printing, no_code, slow], [TESTS] * 6, timeout=1.0,
                         **_weaker())
    assert scores == pytest.approx([1.0, 2 / 3, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        code_reward([correct], [])


@pytest.mark.xdist_group("sandbox")  # runs programs: never beside tests/test_rl_sandbox.py's fork bombs
def test_code_reward_packages_and_task_data_out_of_reach():
    """Allow-listed packages import; the expected output is compared outside: a program that looks for it
    (here: in the task file it came from, world-readable in the host's temp dir) cannot print it."""
    task = Path(tempfile.gettempdir()) / f"qwq-task-{uuid.uuid4().hex[:8]}.json"
    numpy = _reply("import numpy as np\nprint(int(np.array([int(x) for x in input().split()]).sum()))")
    cheat = _reply(f"import json\nprint(json.load(open({str(task)!r}))['output'])")
    cheat_tests = [{"input": "", "output": "qwq-expected-7c1d"}]
    try:
        task.write_text('{"output": "qwq-expected-7c1d"}')
        task.chmod(0o644)
        scores = code_reward([numpy, cheat], [[{"input": "1 2\n", "output": "3"}], cheat_tests], packages=["numpy"],
                             memory_bytes=2**30, timeout=30.0, **_weaker())
        assert scores[0] == 1.0
        if not _weaker():
            assert scores[1] == 0.0
        # What the view prevents: without it the program reads the answer.
        assert code_reward([cheat], [cheat_tests], use_namespaces=False, allow_weaker=True) == [1.0]
    finally:
        task.unlink(missing_ok=True)


@pytest.mark.xdist_group("sandbox")  # runs programs: never beside tests/test_rl_sandbox.py's fork bombs
def test_code_reward_refuses_a_weaker_sandbox():
    """use_namespaces=False: the sandbox's own switch, as on a host without user namespaces."""
    ok = _reply("a, b = map(int, input().split())\nprint(a + b)")
    with pytest.raises(SandboxUnavailable, match="sandbox.allow_weaker = true") as e:
        code_reward([ok], [TESTS], use_namespaces=False)
    assert "\n" not in str(e.value)
    assert code_reward([ok], [TESTS], use_namespaces=False, allow_weaker=True) == [1.0]


# ---- combine --------------------------------------------------------------------------------------

def test_combine():
    rewards = {"math": [1.0, 0.0, 1.0], "format": [1.0, 1.0, 0.0], "length": [0.3, 0.2, 0.1]}
    assert combine(rewards, {"math": 1.0, "format": 0.5}) == pytest.approx([1.5, 0.5, 1.0])
    specs = [RewardSpec("math", 2.0), RewardSpec("length", -1.0)]
    assert combine(rewards, specs) == pytest.approx([1.7, -0.2, 1.9])
    assert combine(rewards, {}) == []
    with pytest.raises(KeyError):
        combine(rewards, {"maths": 1.0})
    with pytest.raises(ValueError):
        combine({"a": [1.0], "b": [1.0, 2.0]}, {"a": 1.0, "b": 1.0})
