"""What every command line shares: one-line usage errors, and status lines on stderr for the slow
phases of a command (loading, compiling, converting).

    parser = OneLineParser(prog="python -m qwq_jax.sample", ...)   # a usage error: one line, exit 2

    with phase("loading OUT"):            # after 1 s: "loading OUT ..."; at the end: " 12.3 s"
        model = qwq_jax.load(OUT)

A phase that ends within `after` seconds prints nothing, so quick steps (and a mistake caught
at once, which must stay a one-line error) stay silent; a slow one shows what is happening
while it happens and ends its own line with the time it took (and a detail, when given).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from typing import Iterator

AFTER_S = 1.0  # phases shorter than this print nothing


def run_main(main) -> None:
    """`sys.exit(main())` for a `python -m` entry point, quiet when the reader of stdout goes away
    (`... --json | head -1`): no BrokenPipeError traceback, from the write or from the exit's flush
    (Python's documented remedy: point stdout at /dev/null), exit 1."""
    import os

    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    sys.exit(code)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the problem, and where the usage is), exit 2;
    its subcommands' parsers too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Phase:
    """One phase's status line: shown once it has run `after` seconds, finished by `end`."""

    def __init__(self, what: str, enabled: bool = True, after: float = AFTER_S):
        self.what, self.enabled = what, enabled
        self.started = time.perf_counter()
        self._shown = self._done = False
        self._lock = threading.Lock()
        self._timer = None
        if enabled:
            self._timer = threading.Timer(after, self._show)
            self._timer.daemon = True
            self._timer.start()

    def _show(self) -> None:
        with self._lock:
            if not self._shown and self._timer is not None:
                print(f"{self.what} ...", end="", file=sys.stderr, flush=True)
                self._shown = True

    def end(self, detail: str = "", failed: bool = False, seconds: float | None = None) -> float:
        """Stop the phase (once; later calls do nothing); finish its line if it was shown, with `seconds`
        (default: since the phase started; pass the whole when it began earlier). Returns the seconds."""
        seconds = time.perf_counter() - self.started if seconds is None else seconds
        with self._lock:
            if self._done:
                return seconds
            self._done = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._shown:
                tail = " failed" if failed else f" {seconds:.1f} s" + (f" ({detail})" if detail else "")
                print(tail, file=sys.stderr, flush=True)
        return seconds


@contextlib.contextmanager
def phase(what: str, enabled: bool = True, after: float = AFTER_S) -> Iterator[Phase]:
    """`Phase` as a context: the line ends (" failed" on an exception) when the block does."""
    p = Phase(what, enabled, after)
    try:
        yield p
    except BaseException:
        p.end(failed=True)
        raise
    p.end()
