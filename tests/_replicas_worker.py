"""One process of the four-process replicas test: 2 CPU devices each, mesh data=2,tensor=4, so each
replica of the weights spans two processes; one engine per replica, completions gathered."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import sharding as sh  # noqa: E402
from qwq_jax import Qwen2, QwenConfig  # noqa: E402
from qwq_jax.replicas import ReplicatedEngine, build_engine  # noqa: E402
from qwq_jax.sampling import SamplingParams  # noqa: E402

coordinator, process_id, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
assert sh.init_distributed(coordinator, 4, process_id)
cfg = QwenConfig.preset("tiny")
mesh = sh.make_mesh("data=2,tensor=4")
model = sh.init_sharded(lambda: Qwen2(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=jnp.float32),
                        mesh, "generate")
engine = build_engine(model, mesh=mesh, streaming=False)
assert isinstance(engine, ReplicatedEngine) and list(engine.replicas) == [process_id // 2]
tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 40))
prompts = [tokens[i, : 5 + 7 * i].tolist() for i in range(3)]
sampled = [SamplingParams(temperature=0.8, max_tokens=8, n=3, seed=7 + i, logprobs=0) for i in range(3)]
outs = engine.generate(prompts, sampled)
with open(os.path.join(out_dir, f"replicas_{process_id}.json"), "w") as fh:
    json.dump([[[c.token_ids, c.logprobs] for c in row] for row in outs], fh)
print(f"process {process_id} done")
