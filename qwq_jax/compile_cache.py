"""The persistent XLA compilation cache every entry point uses.

A compiled program is written to disk the first time and read back on later runs, so only the
first run of a command pays for compilation (`~/.cache/qwq-jax/xla` by default).

    from qwq_jax import compile_cache
    compile_cache.enable()              # $QWQ_JAX_XLA_CACHE, else $JAX_COMPILATION_CACHE_DIR, else the default
    compile_cache.enable("off")         # disabled for this process
    compile_cache.counts()              # {"hits": 3, "misses": 1} since this process started

Where it lives, first match wins: the argument (a CLI's `--xla-cache DIR|off`), `$QWQ_JAX_XLA_CACHE`
(`off` disables), `$JAX_COMPILATION_CACHE_DIR`, `$QWQ_JAX_CACHE/xla`, `~/.cache/qwq-jax/xla`.
Test processes, their subprocesses and notebook kernels share one through the environment.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

ENV = "QWQ_JAX_XLA_CACHE"
OFF = ("off", "none", "0", "false", "no")


def default_dir() -> Path:
    from qwq_jax.demo import default_cache_dir

    return default_cache_dir() / "xla"


def resolve(path: str | os.PathLike | None = None) -> Path | None:
    """The cache directory `enable(path)` would use; None when the cache is off."""
    for value in (path, os.environ.get(ENV), os.environ.get("JAX_COMPILATION_CACHE_DIR")):
        if value is None or str(value).strip() == "":
            continue
        if str(value).strip().lower() in OFF:
            return None
        return Path(value).expanduser()
    return default_dir()


class CompileClock:
    """Seconds this process spends tracing, lowering and compiling jitted programs (an XLA compile or a
    load from the persistent compilation cache), from `jax.monitoring`'s time-span events: the union
    of their intervals, since a trace nests the traces of the functions it calls. They run
    synchronously in the calling thread before a program is dispatched, so subtracting them from a
    call's wall time leaves the time spent running it."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")
    HIT, MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"

    def __init__(self) -> None:
        self.seconds = 0.0
        self.hits = self.misses = 0
        self.watchers: list[Callable[[str, str, float], None]] = []
        self._lock = threading.Lock()
        self._registered = False
        self._open: list[list[float]] = []  # recent merged [start, end] intervals, newest last

    def register(self) -> None:
        import jax

        if not self._registered:
            spans = getattr(jax.monitoring, "register_event_time_span_listener", None)
            if spans is not None:
                spans(self._on_span)
            else:  # a duration is recorded as its span ends: the same interval
                jax.monitoring.register_event_duration_secs_listener(
                    lambda event, duration, **kw: self._on_span(event, time.time() - duration, time.time(), **kw))
            jax.monitoring.register_event_listener(self._on_event)
            self._registered = True

    def _on_span(self, event: str, start: float, end: float, **kwargs: Any) -> None:
        if event not in self.EVENTS:
            return
        with self._lock:
            # Add what [start, end] covers beyond the intervals seen so far (nested spans end first).
            new, lo = 0.0, start
            for iv in sorted(self._open):
                if iv[1] <= lo or iv[0] >= end:
                    continue
                new += max(0.0, iv[0] - lo)
                lo = max(lo, iv[1])
            new += max(0.0, end - lo)
            self.seconds += new
            kept = [iv for iv in self._open if iv[1] < start or iv[0] > end]
            covered = [iv for iv in self._open if not (iv[1] < start or iv[0] > end)]
            merged = [min([start] + [iv[0] for iv in covered]), max([end] + [iv[1] for iv in covered])]
            self._open = (kept + [merged])[-64:]
        for watch in list(self.watchers):
            watch(event, str(kwargs.get("fun_name", "")), end - start)

    def _on_event(self, event: str, **_: Any) -> None:
        if event in (self.HIT, self.MISS):
            with self._lock:
                if event == self.HIT:
                    self.hits += 1
                else:
                    self.misses += 1



CLOCK = CompileClock()  # one per process: every program's compile time and cache hits


def enable(path: str | os.PathLike | None = None) -> Path | None:
    """Turn the persistent cache on (or off) for this process; returns the directory, or None when off.

    Every compilation is cached (no minimum compile time): on a CPU many small programs together
    cost as much as one large one. An unwritable directory is one clear error.
    """
    import jax

    where = resolve(path)
    CLOCK.register()
    if where is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compilation cache {where}: cannot create it ({e.strerror}); "
                         f"pass another with --xla-cache DIR or ${ENV}, or 'off'") from None
    if not os.access(where, os.W_OK):
        raise ValueError(f"compilation cache {where}: not writable; pass another with --xla-cache DIR "
                         f"or ${ENV}, or 'off'")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where


def counts() -> dict[str, int]:
    """Persistent-cache hits and misses in this process so far (after `enable`)."""
    return {"hits": CLOCK.hits, "misses": CLOCK.misses}


def add_args(parser: argparse.ArgumentParser) -> None:
    """`--xla-cache DIR|off` for a CLI (pass `args.xla_cache` to `enable`)."""
    parser.add_argument("--xla-cache", default=None, metavar="DIR|off",
                        help=f"persistent compilation cache: compiled programs are kept here and reused by "
                             f"later runs (default ${ENV}, else ~/.cache/qwq-jax/xla; 'off' disables)")
