"""Two real processes (jax.distributed on 127.0.0.1, gloo, 4 CPU devices each) run one sharded forward,
one engine across both, and one engine per replica (a replica per process, gathered)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _procs import free_port, wait_all
from qwq_jax import QwenConfig, forward, init_model

pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_agree_with_single_process(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "QWQ_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"  # compiling dominates (conftest)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "_multihost_worker.py"), coordinator,
                               str(i), str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    wait_all(procs, 300, "multi-process run")

    cfg = QwenConfig.preset("tiny")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 96)).astype(np.int32)
    model = jax.device_put(init_model(cfg, seed=0, param_dtype=jnp.float32, dtype=jnp.float32), jax.devices()[0])
    want = np.asarray(forward(model, jnp.asarray(tokens)))
    for rules in ("generate", "train"):
        for pid in range(2):
            got = np.load(tmp_path / f"{rules}_{pid}.npy")
            err = np.abs(got - want).max()
            print(f"{rules} process {pid}: max |d| vs single process = {err:.2e}")
            assert err <= 1e-5
    # Generation: every process gets the gathered outputs, equal to a single-process run.
    from qwq_jax.generate import Engine
    from qwq_jax.sampling import SamplingParams

    prompts = [tokens[i, : 5 + 7 * i].tolist() for i in range(3)]
    one = Engine(model)
    want_ids = [o[0].token_ids for o in one.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))]
    for pid in range(2):
        assert json.loads((tmp_path / f"generate_{pid}.json").read_text()) == want_ids
    # One engine per replica, a replica per process: every process gets every sample, each as one
    # engine gives it.
    sampled = [SamplingParams(temperature=0.8, max_tokens=8, n=3, seed=7 + i, logprobs=0) for i in range(3)]
    want = one.generate(prompts, sampled)
    for pid in range(2):
        got = json.loads((tmp_path / f"replicas_{pid}.json").read_text())
        assert [[c[0] for c in row] for row in got] == [[c.token_ids for c in row] for row in want]
        for g_row, w_row in zip(got, want):
            for g, w in zip(g_row, w_row):
                np.testing.assert_allclose(g[1], w.logprobs, atol=1e-5)
                assert g[2] == w.finish_reason
