"""Verifiable rewards: math answers (math-verify), reply format, code against test cases.

    with MathVerifier(num_workers=4, timeout=5.0) as verifier:
        r_math = math_reward(completions, references, verifier)     # [N] in {0, 1}
    r_fmt = format_reward(completions)                               # [N] in {0, 1}
    r_code = code_reward(completions, tests)                         # [N] in [0, 1]
    rewards = combine({"math": r_math, "format": r_fmt}, {"math": 1.0, "format": 0.1})

Graders run outside the training process (STYLE.md): math-verify in `MathVerifier`'s pool of worker
processes, programs in `qwq_jax/rl/sandbox.py`.

MathVerifier workers. sympy can hang or eat memory on hostile input (math-verify's own SIGALRM timeout
cannot interrupt long C-level work such as huge integer powers), so every answer has a deadline in the
parent; a worker that misses it is SIGKILLed and replaced (`restarts` counts them) and the answer
scores 0. Workers are started as multiprocessing's "spawn" would start them (fork+exec of a fresh
interpreter: safe next to the trainer's JAX threads), but through subprocess, executing this file as a
script and talking over a `multiprocessing.Pipe`. Unlike multiprocessing's spawn this neither re-imports
the trainer's `__main__` nor imports the `qwq_jax` package (and with it JAX) in every grader: this file
therefore imports only the standard library at the top (the sandbox is imported inside code_reward).
Test hook: with QWQ_REWARD_TEST_HOOKS=1 in the environment a worker is started with, a reference
"__sleep__:<seconds>" makes it sleep that long (the timeout path).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import subprocess
import sys
import time
import weakref
from collections import deque
from typing import Mapping, Sequence

# ---- answer extraction ---------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "The (final) answer is 42", "Answer: 42", "**Final Answer**: 42", "Final answer = 42" (the rest of the line).
_PLAIN = re.compile(r"\banswer\b\s*(?:\*\*)?\s*(?:is(?=[\s:])\s*:?|:|=)\s*(?:\*\*)?[ \t]*(?P<ans>[^\n]*)",
                    re.IGNORECASE)
# "**Final Answer**" on its own line, the answer on the next non-empty line.
_PLAIN_NEXT_LINE = re.compile(r"\bfinal\s+answer\b\s*(?:\*\*)?\s*:?\s*(?:\*\*)?[ \t]*\n\s*(?P<ans>[^\n]+)",
                              re.IGNORECASE)


def reply_part(text: str) -> str:
    """What follows the last "</think>" (the whole text when there is none)."""
    head, sep, tail = text.rpartition("</think>")
    return tail if sep else text


def extract_answer(text: str) -> str | None:
    """The final answer of a reply (only after "</think>" if present): the content of the last
    \\boxed{...} / \\fbox{...} (braces balanced; escaped \\{ \\} ignored; an unclosed last box gives
    None), else the last plain "The answer is X" / "Answer: X" / "**Final Answer**: X" form, else None."""
    text = reply_part(text)
    boxes = list(_BOXED.finditer(text))
    if boxes:
        content = _balanced(text, boxes[-1].end())
        return (content.strip() or None) if content is not None else None
    found = None
    for pattern in (_PLAIN, _PLAIN_NEXT_LINE):
        for m in pattern.finditer(text):
            if found is None or m.start() > found.start():
                found = m
    return _clean_plain(found.group("ans")) if found else None


def _balanced(text: str, start: int) -> str | None:
    """text[start:] up to the brace closing the one just before `start`; None when it never closes."""
    depth, i = 1, start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _clean_plain(ans: str) -> str | None:
    ans = ans.strip()
    for _ in range(3):
        ans = ans.strip().strip("*").strip().rstrip(".").strip()
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if ans.startswith(left) and ans.endswith(right) and len(ans) >= len(left) + len(right):
                ans = ans[len(left):len(ans) - len(right)]
    return ans or None


# ---- math: math-verify in worker processes ---------------------------------------------------------

_TEST_HOOKS_ENV = "QWQ_REWARD_TEST_HOOKS"
_STARTUP_TIMEOUT = 120.0  # seconds for a fresh worker to import math-verify
_START_DEATHS = 3  # workers in one slot dying before they are ready, in a row, that mean none ever will


class MathVerifier:
    """math-verify in a pool of worker processes with a per-answer timeout; a worker that hangs is
    killed and replaced; the caller never blocks longer than the timeout (+ small overhead) per answer
    in flight (a batch of n answers on w workers: about ceil(n / w) timeouts at worst). One verify() at
    a time (not thread-safe); the trainer process only waits on pipes.

    memory_bytes: RLIMIT_AS of each worker (None: unlimited); a worker that runs out scores 0.
    """

    def __init__(self, num_workers: int = 2, timeout: float = 5.0, *, memory_bytes: int | None = 4 * 2**30):
        if num_workers < 1 or timeout <= 0:
            raise ValueError(f"need num_workers >= 1 and timeout > 0, got {num_workers}, {timeout}")
        self.num_workers, self.timeout, self.memory_bytes = num_workers, float(timeout), memory_bytes
        self.restarts = 0  # workers killed (timeout) or found dead, and replaced
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        for _ in range(num_workers):
            self._workers.append(_Worker.start(self.timeout, memory_bytes))

    def verify(self, answers: Sequence[str | None], references: Sequence[str]) -> list[float]:
        """1.0 where answers[i] is equivalent to references[i], else 0.0 (None, unparsable, timeout)."""
        if len(answers) != len(references):
            raise ValueError(f"{len(answers)} answers but {len(references)} references")
        if not self._workers:
            raise RuntimeError("MathVerifier is closed")
        scores = [0.0] * len(answers)
        todo = deque(i for i, (a, r) in enumerate(zip(answers, references))
                     if isinstance(a, str) and a.strip() and isinstance(r, str) and r.strip())
        busy: dict[_Worker, tuple[int, float]] = {}  # worker -> (answer index, deadline)
        while todo or busy:
            for w in self._workers:
                if todo and w.ready and w not in busy:
                    i = todo.popleft()
                    if w.send((answers[i], references[i])):
                        busy[w] = (i, time.monotonic() + self.timeout)
                    else:  # died while idle
                        todo.appendleft(i)
                        self._replace(w)
            now = time.monotonic()
            waits = [d - now for _, d in busy.values()] + [w.startup_deadline - now for w in self._workers
                                                           if not w.ready]
            conns = {w.conn: w for w in self._workers}
            for conn in multiprocessing.connection.wait(list(conns), timeout=max(0.0, min(waits, default=0.0))):
                w = conns[conn]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    message = None
                if w in busy:
                    i, _ = busy.pop(w)
                    scores[i] = float(message) if isinstance(message, float) else 0.0
                    if message is None:  # died on this answer (e.g. out of memory)
                        self._replace(w)
                elif w.ready:  # an idle worker can only have died
                    self._replace(w)
                elif message == "ready":
                    w.ready = True
                elif message is None:  # died while starting (killed, out of memory): start another
                    if w.start_deaths + 1 >= _START_DEATHS:
                        code = w.proc.wait()
                        self.close()
                        raise RuntimeError(f"math-verify worker died while starting {_START_DEATHS} times in a row "
                                           f"(last exit code {code})")
                    self._replace(w, start_deaths=w.start_deaths + 1)
                else:  # a fresh worker failed to import math-verify: nothing will work
                    self.close()
                    raise RuntimeError(f"math-verify worker failed to start: {message!r}")
            now = time.monotonic()
            for w, (i, deadline) in list(busy.items()):
                if now >= deadline:
                    del busy[w]
                    scores[i] = 0.0
                    self._replace(w)
            for w in self._workers:
                if not w.ready and now >= w.startup_deadline:
                    self.close()
                    raise RuntimeError(f"math-verify worker not ready after {_STARTUP_TIMEOUT:.0f} s")
        return scores

    def _replace(self, worker: _Worker, start_deaths: int = 0) -> None:
        worker.stop()
        fresh = _Worker.start(self.timeout, self.memory_bytes)
        fresh.start_deaths = start_deaths
        self._workers[self._workers.index(worker)] = fresh
        self.restarts += 1

    def close(self) -> None:
        _stop_all(self._workers)

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass(eq=False)
class _Worker:
    proc: subprocess.Popen
    conn: multiprocessing.connection.Connection
    startup_deadline: float
    ready: bool = False
    start_deaths: int = 0  # predecessors in this slot that died before they were ready

    @classmethod
    def start(cls, timeout: float, memory_bytes: int | None) -> _Worker:
        ours, theirs = multiprocessing.Pipe(duplex=True)
        args = [sys.executable, "-P", os.path.abspath(__file__), "--math-worker", str(theirs.fileno()),
                str(timeout), str(memory_bytes or 0)]
        # Own session: a Ctrl-C meant for the trainer does not hit graders; they exit on EOF when it dies.
        proc = subprocess.Popen(args, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        return cls(proc, ours, time.monotonic() + _STARTUP_TIMEOUT)

    def send(self, task: tuple[str, str]) -> bool:
        try:
            self.conn.send(task)
            return True
        except (OSError, EOFError):
            return False

    def stop(self) -> None:
        self.conn.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.kill()  # math-verify handles no signals, SIGTERM already ends it: SIGKILL for certain
        self.proc.wait()


def _stop_all(workers: list[_Worker]) -> None:
    while workers:
        workers.pop().stop()


def _as_math(s: str) -> str:
    """What math_verify.parse reads best: LaTeX in $...$ unless the string already delimits itself."""
    return s if ("$" in s or "\\boxed" in s or "\\(" in s or "\\[" in s) else f"${s}$"


def _worker_main(fd: int, timeout: float, memory_bytes: int) -> None:
    """Runs in the worker process: answer (answer, reference) tasks from the pipe with 0.0 / 1.0."""
    conn = multiprocessing.connection.Connection(fd)
    try:
        if memory_bytes:
            import resource
            resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        import logging

        import math_verify
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # no "Timeout during comparison" spam
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send(f"{type(e).__name__}: {e}")
        return
    hooks = os.environ.get(_TEST_HOOKS_ENV) == "1"
    inner = max(1, math.ceil(timeout))  # math-verify's own (SIGALRM) limit; the parent's kill is the backstop
    conn.send("ready")
    while True:
        try:
            answer, reference = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe or died
        score = 0.0
        try:
            if hooks and reference.startswith("__sleep__:"):
                time.sleep(float(reference.split(":", 1)[1]))
            else:
                gold = math_verify.parse(_as_math(reference), parsing_timeout=inner)
                pred = math_verify.parse(_as_math(answer), parsing_timeout=inner)
                score = float(bool(gold) and bool(pred) and math_verify.verify(gold, pred, timeout_seconds=inner))
        except BaseException:  # noqa: BLE001 - any failure (MemoryError, RecursionError, ...) scores 0
            score = 0.0
        conn.send(score)


def math_reward(completions: Sequence[str], references: Sequence[str], verifier: MathVerifier) -> list[float]:
    """1.0 per completion whose extracted final answer is equivalent to its reference, else 0.0."""
    return verifier.verify([extract_answer(c) for c in completions], references)


# ---- format ---------------------------------------------------------------------------------------

def format_reward(completions: Sequence[str], *, prompt_ends_in_think: bool = True) -> list[float]:
    """1.0 for exactly one reasoning block followed by a non-empty answer, else 0.0.

    prompt_ends_in_think (QwQ's chat template opens "<think>\\n" in the prompt): the completion has no
    "<think>", exactly one "</think>", and non-whitespace after it. Otherwise: the completion starts
    (after whitespace) with the only "<think>", has exactly one "</think>" after it, and an answer after that.
    """
    scores = []
    for c in completions:
        head, sep, tail = c.partition("</think>")
        ok = bool(sep) and "</think>" not in tail and "<think>" not in tail and bool(tail.strip())
        if prompt_ends_in_think:
            ok = ok and "<think>" not in head
        else:
            ok = ok and head.lstrip().startswith("<think>") and head.count("<think>") == 1
        scores.append(1.0 if ok else 0.0)
    return scores


# ---- code -----------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.IGNORECASE | re.DOTALL)


def extract_code(text: str) -> str | None:
    """The last ```python fenced block (after "</think>" if present), or None."""
    blocks = _FENCE.findall(reply_part(text))
    return blocks[-1] if blocks else None


def _normalize_output(s: str) -> str:
    return "\n".join(line.rstrip() for line in s.strip().splitlines())


def code_reward(completions: Sequence[str], tests: Sequence[Sequence[dict]], *, max_workers: int | None = None,
                allow_weaker: bool = False, **sandbox_kwargs) -> list[float]:
    """Fraction of its test cases ({"input": stdin, "output": expected stdout}) that each completion's
    last ```python block passes in the sandbox (stripped stdout, trailing spaces per line ignored; a
    crash, timeout or output cut-off fails the case). No code block -> 0.0.

    Only the program enters the sandbox: each case's input is fed on its stdin and its stdout is compared
    here, outside, so no expected output (nor any other task file) is in the program's filesystem view.
    Refuses to start (SandboxUnavailable, one line saying what is missing) where the sandbox cannot build
    that private view (no user namespaces, use_namespaces=False), unless allow_weaker (config:
    `sandbox.allow_weaker`; what is then no longer guaranteed: `qwq_jax/rl/sandbox.py`).

    max_workers: sandboxed runs in flight at once (default: the CPU count). sandbox_kwargs go to
    `qwq_jax.rl.sandbox.run_python` (timeout, memory_bytes, packages, ...).
    """
    from concurrent.futures import ThreadPoolExecutor

    from qwq_jax.rl.sandbox import check_isolation, run_python  # not at the top: graders run this file standalone

    if len(completions) != len(tests):
        raise ValueError(f"{len(completions)} completions but {len(tests)} test lists")
    check_isolation(allow_weaker, sandbox_kwargs.get("use_namespaces"))
    codes = [extract_code(c) for c in completions]
    jobs = [(i, case) for i, code in enumerate(codes) if code is not None for case in tests[i]]

    def passes(job: tuple[int, dict]) -> bool:
        i, case = job
        result = run_python(codes[i], case.get("input", ""), **sandbox_kwargs)
        return result.ok and _normalize_output(result.stdout) == _normalize_output(case["output"])

    with ThreadPoolExecutor(max_workers or os.cpu_count() or 1) as pool:
        passed = list(pool.map(passes, jobs))
    scores = [0.0] * len(completions)
    for (i, _), ok in zip(jobs, passed):
        scores[i] += ok / len(tests[i])
    return scores


# ---- combining ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RewardSpec:
    name: str
    weight: float


def combine(rewards: Mapping[str, Sequence[float]], weights: Mapping[str, float] | Sequence[RewardSpec]) -> list[float]:
    """Weighted sum per completion: sum over weighted names of weight * rewards[name][i]. Every weighted
    name must be in `rewards`; rewards without a weight (e.g. logged-only metrics) are ignored."""
    if not isinstance(weights, Mapping):
        weights = {spec.name: spec.weight for spec in weights}
    missing = [name for name in weights if name not in rewards]
    if missing:
        raise KeyError(f"weights for unknown rewards {missing}; have {sorted(rewards)}")
    lengths = {len(rewards[name]) for name in weights}
    if len(lengths) > 1:
        raise ValueError(f"rewards of different lengths: { {n: len(rewards[n]) for n in weights} }")
    n = lengths.pop() if lengths else 0
    return [sum(w * float(rewards[name][i]) for name, w in weights.items()) for i in range(n)]


if __name__ == "__main__" and sys.argv[1:2] == ["--math-worker"]:
    _worker_main(int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
