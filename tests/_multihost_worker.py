"""One process of the two-process test: sharded forward over a mesh spanning both processes."""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import sharding as sh  # noqa: E402
from qwq_jax import Qwen2, QwenConfig, forward  # noqa: E402

coordinator, process_id, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
assert sh.init_distributed(coordinator, 2, process_id)
assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4

cfg = QwenConfig.preset("tiny")
tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 96)).astype(np.int32)
for rules in ("generate", "train"):
    mesh = sh.make_mesh("fsdp=2,tensor=4")
    model = sh.init_sharded(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=jnp.float32),
                            mesh, rules)
    logits = forward(model, sh.put_global(tokens, sh.batch_sharding(mesh, rules)))
    full = multihost_utils.process_allgather(logits, tiled=True)
    np.save(os.path.join(out_dir, f"{rules}_{process_id}.npy"), np.asarray(full))
# Generation on a mesh spanning both processes: batch over `data` (one half per process).
import json  # noqa: E402

from qwq_jax.generate import Engine  # noqa: E402
from qwq_jax.sampling import SamplingParams  # noqa: E402

mesh = sh.make_mesh("data=2,tensor=4")
model = sh.init_sharded(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=jnp.float32),
                        mesh, "generate")
prompts = [tokens[i, : 5 + 7 * i].tolist() for i in range(3)]
outs = Engine(model, mesh=mesh).generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
with open(os.path.join(out_dir, f"generate_{process_id}.json"), "w") as fh:
    json.dump([o[0].token_ids for o in outs], fh)
# One engine per replica (qwq_jax/replicas.py): each process decodes its own replica's share of the
# samples on its own 4 devices, and generate gathers them all onto both processes.
from qwq_jax.replicas import ReplicatedEngine, build_engine  # noqa: E402

replicated = build_engine(model, mesh=mesh, streaming=False)
assert isinstance(replicated, ReplicatedEngine) and list(replicated.replicas) == [process_id]
sampled = [SamplingParams(temperature=0.8, max_tokens=8, n=3, seed=7 + i, logprobs=0) for i in range(3)]
outs = replicated.generate(prompts, sampled)
with open(os.path.join(out_dir, f"replicas_{process_id}.json"), "w") as fh:
    json.dump([[[c.token_ids, c.logprobs, c.finish_reason] for c in row] for row in outs], fh)
print(f"process {process_id} done")
