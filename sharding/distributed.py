"""Multi-host start-up: one script, the same command on every host."""

from __future__ import annotations

import argparse
import os

import jax


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """`--coordinator/--num-processes/--process-id` (or QWQ_* env), `--distributed` for auto-detect."""
    g = parser.add_argument_group("multi-host")
    g.add_argument("--coordinator", default=os.environ.get("QWQ_COORDINATOR"),
                   help="host:port of process 0 (env QWQ_COORDINATOR)")
    # A string default goes through `type` at parse time, so a bad variable is the parser's one-line error.
    g.add_argument("--num-processes", type=_int_arg("QWQ_NUM_PROCESSES"), default=os.environ.get("QWQ_NUM_PROCESSES") or None,
                   help="number of processes (env QWQ_NUM_PROCESSES)")
    g.add_argument("--process-id", type=_int_arg("QWQ_PROCESS_ID"), default=os.environ.get("QWQ_PROCESS_ID") or None,
                   help="this process's index (env QWQ_PROCESS_ID)")
    g.add_argument("--distributed", action="store_true",
                   help="initialise jax.distributed from the cluster environment (TPU pods, SLURM)")


def _int_arg(env: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer (from the flag or ${env})") from None
    parse.__name__ = "int"
    return parse


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, auto: bool = False,
                     local_device_ids: list[int] | None = None) -> bool:
    """Call `jax.distributed.initialize` when asked to; returns whether it ran.

    Arguments default to the QWQ_COORDINATOR / QWQ_NUM_PROCESSES / QWQ_PROCESS_ID environment
    variables. With none of them and `auto=False` this is a single-process run and nothing
    happens. CPU collectives use gloo so CPU-only multi-process runs (tests, CI) work too.
    Must run before anything touches a JAX device.
    """
    coordinator = coordinator or os.environ.get("QWQ_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int("QWQ_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("QWQ_PROCESS_ID")
    if not (auto or coordinator or num_processes or process_id is not None):
        return False
    if not auto:
        missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is None]
        if missing:
            raise ValueError(f"multi-host start needs {', '.join(missing)} as well "
                             "(flags --coordinator/--num-processes/--process-id or QWQ_* env)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} is outside 0..{num_processes - 1}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids)
    return True
