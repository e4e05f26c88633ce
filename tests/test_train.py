"""`python -m qwq_jax.train`: config, data, rewards wiring, micro-batch and mesh invariance of the
update, and real runs (subprocesses): SIGKILL + resume reproduces the uninterrupted losses,
TensorBoard events are readable, two processes agree with one."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwq_jax import QwenConfig, init_model
from qwq_jax.generate import Completion
from qwq_jax.lora import LoraConfig
from qwq_jax.rl.data import DataError, PromptStream, load_jsonl, synthetic_examples
from qwq_jax.rl.grpo import GRPOConfig, GRPOTrainer
from qwq_jax.train import ConfigError, Rewards, RewardsConfig, SandboxConfig, load_config, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_arithmetic.toml"
CFG = QwenConfig.preset("tiny")


# ---- config ------------------------------------------------------------------------------------
def test_config_file_and_overrides():
    cfg = load_config(TINY, ["rl.loss=dapo", "run.steps=7", "rewards.format=0.5", "data.system_prompt=Be brief",
                             "rl.micro_batches=4"])
    assert cfg.run.steps == 7 and cfg.rewards.format == 0.5 and cfg.data.system_prompt == "Be brief"
    g = cfg.grpo()
    assert g.loss == "dapo" and g.micro_batches == 4 and g.total_steps == 7 and g.seed == cfg.run.seed
    assert g.group_size == 4 and g.max_tokens == 16  # from the file
    assert load_config(None).model.path == "preset:tiny"
    lora = load_config(TINY, ["lora.rank=8", 'lora.targets=["q_proj", "v_proj"]', 'model.quantize="int8"'])
    assert lora.lora_config() == LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))  # alpha: 2 x rank
    assert load_config(TINY).lora_config() is None  # rank 0: full fine-tuning


@pytest.mark.parametrize("name, devices", [("qwq32b_grpo_v5p64", 32), ("qwq32b_grpo_8xh100", 8),
                                           ("qwq32b_lora_8xh100", 8), ("qwq32b_qlora_h200", 1)])
def test_ready_qwq32b_configs_are_consistent(name, devices):
    """The shipped 32B configs parse, and their batches split over their meshes' batch shards."""
    from sharding import parse_mesh_spec

    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    g, sizes = cfg.grpo(), parse_mesh_spec(cfg.run.mesh, devices)
    qcfg = QwenConfig.preset("qwq-32b")
    rows = cfg.data.prompts_per_step * g.group_size
    assert rows % g.micro_batches == 0 and (rows // g.micro_batches) % (sizes["data"] * sizes["fsdp"]) == 0
    assert qcfg.num_kv_heads % sizes["tensor"] == 0 and qcfg.hidden_size % sizes["fsdp"] == 0
    assert cfg.model.remat == "full" and g.max_tokens + cfg.data.max_prompt_tokens <= qcfg.max_position_embeddings
    if "lora" in name:  # and the planner's analytic verdict for them: they fit
        from qwq_jax.plan import plan

        lora = cfg.lora_config()
        assert lora is not None and lora.rank == 64
        p = plan(qcfg, "train", "h200x1" if devices == 1 else "h100x8", g.max_tokens + cfg.data.max_prompt_tokens,
                 rows, mesh=cfg.run.mesh, micro_batches=g.micro_batches, lora_rank=lora.rank,
                 quantize=cfg.model.quantize, prefill_chunk=cfg.data.max_prompt_tokens,
                 attention="flash" if devices == 1 else "xla")
        assert p.fits, p.total


@pytest.mark.parametrize("override, message", [
    ("run.stepz=3", "unknown key run.stepz"),
    ("rl.total_steps=3", "set run.steps"),
    ("rl.loss=ppo", "unknown loss kind"),
    ("run.steps=three", "run.steps must be int"),
    ("nosection.x=1", "unknown section"),
    ("steps=3", "expected section.key=value"),
    ("rl.group_size=0", "group_size must be >= 1"),
    ("model.attention=flash3", "model.attention='flash3'; known: xla, "),
    ('model.quantize="int8"', r"model.quantize='int8' needs LoRA \(\[lora\] rank >= 1\)"),
    ('model.quantize="int4"', "model.quantize='int4'; known: int8"),
    ("lora.rank=-1", "lora.rank must be >= 0"),
    ('lora.targets=["qkv"]', r"\[lora\]: lora targets \['qkv'\] must be a non-empty subset of q_proj"),
    ("lora.alpha=0", r"\[lora\]: lora alpha=0.0 must be a number > 0"),
])
def test_config_errors_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


@pytest.mark.compile_bound
def test_model_attention_reaches_the_model_and_platform_errors_name_it():
    import jax

    from qwq_jax.train import build_model
    from sharding import make_mesh

    mesh = make_mesh("fsdp=-1", jax.devices()[:1])
    model, _ = build_model(load_config(TINY, ["model.attention=blockwise"]), mesh)
    assert model.attention_backend == "blockwise" and model.layers.attn.backend == "blockwise"
    other = "splash" if jax.default_backend() != "tpu" else "cudnn"
    with pytest.raises(ConfigError, match=f"model.attention='{other}': attention backend '{other}' needs a"):
        build_model(load_config(TINY, [f"model.attention={other}"]), mesh)
    assert load_config(TINY).model.attention == "auto"


def test_cli_bad_config_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--config", str(tmp_path / "missing.toml")])
    assert e.value.code == 2 and "config file not found" in capsys.readouterr().err
    assert main(["--config", str(TINY), "--set", "run.steps=3", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["steps"] == 3


# ---- data ----------------------------------------------------------------------------------------
def test_prompt_stream_order_and_position():
    exs = [{"prompt": str(i), "answer": str(i)} for i in range(10)]
    a = PromptStream(exs, 4, seed=3)
    batches = [a.next_batch() for _ in range(6)]  # 24 examples: more than two epochs
    seen = [e["prompt"] for b in batches for e in b]
    assert sorted(seen[:10]) == sorted(map(str, range(10))) and sorted(seen[10:20]) == sorted(map(str, range(10)))
    assert seen[:10] != seen[10:20]  # a fresh permutation per epoch
    b = PromptStream(exs, 4, seed=3, position=12)  # resumed after three batches
    assert [b.next_batch() for _ in range(3)] == batches[3:]


def test_jsonl_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1?", "answer": 2}\n\n{"prompt": "x", "tests": [{"input": "", "output": "1"}]}\n')
    exs = load_jsonl(f)
    assert exs[0]["answer"] == "2" and len(exs) == 2
    for text, message in [('{"prompt": "a"}', "needs 'answer'"), ("not json", "not JSON"),
                          ('{"prompt": "", "answer": 1}', "non-empty string 'prompt'"),
                          ('{"prompt": "a", "tests": []}', "'tests' must be")]:
        f.write_text(text + "\n")
        with pytest.raises(DataError, match=message):
            load_jsonl(f)
    with pytest.raises(DataError, match="not found"):
        load_jsonl(tmp_path / "none.jsonl")


def test_synthetic_arithmetic_answers_are_right():
    for ex in synthetic_examples("arithmetic", 50, seed=1):
        a, op, b = ex["prompt"].split("?")[0].split()[-3:]
        assert int(ex["answer"]) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


@pytest.mark.xdist_group("sandbox")  # runs programs: never beside tests/test_rl_sandbox.py's fork bombs
def test_rewards_mix_math_code_format():
    r = Rewards(RewardsConfig(math=1.0, format=0.5, code=2.0, workers=1, timeout=10.0, code_timeout=10.0),
                SandboxConfig(allow_weaker=True))  # the strongest sandbox here all the same
    try:
        r.examples = [{"prompt": "1+1?", "answer": "2"},
                      {"prompt": "echo", "tests": [{"input": "a\n", "output": "a"}, {"input": "b\n", "output": "b"}]}]
        r.think_opened = [True, True]
        texts = ["hmm</think>The answer is \\boxed{2}.", "</think>\\boxed{3}",
                 "x</think>```python\nprint(input())\n```", "no reasoning ```python\nprint('a')\n```"]
        comps = [Completion([1], "stop", 3, t) for t in texts]
        out = r([0, 0, 1, 1], comps)
    finally:
        r.close()
    assert out["math"] == [1.0, 0.0, 0.0, 0.0]
    assert out["format"] == [1.0, 1.0, 1.0, 0.0]
    assert out["code"] == [0.0, 0.0, 1.0, 0.5]
    np.testing.assert_allclose(out["reward"], [1.5, 0.5, 2.5, 1.0])


def test_sandbox_config_and_refusal(monkeypatch):
    cfg = load_config(None, ['sandbox.packages=["numpy"]', "sandbox.allow_weaker=true", "rewards.code=1"])
    assert cfg.sandbox == SandboxConfig(packages=["numpy"], allow_weaker=True)
    with pytest.raises(ConfigError, match="sandbox.packages must be a list of str"):
        load_config(None, ["sandbox.packages=numpy"])
    with pytest.raises(ConfigError, match="not installed"):
        Rewards(RewardsConfig(math=0.0, code=1.0), SandboxConfig(packages=["no_such_package_qwq"], allow_weaker=True))
    # A host without user namespaces, simulated by the sandbox's own switch (use_namespaces=False).
    from qwq_jax.rl import sandbox

    real = sandbox._mode
    monkeypatch.setattr(sandbox, "_mode", lambda use_namespaces=None: real(False))
    with pytest.raises(ConfigError, match="sandbox.allow_weaker = true"):
        Rewards(RewardsConfig(math=0.0, code=1.0))
    Rewards(RewardsConfig(math=0.0, code=1.0), SandboxConfig(allow_weaker=True)).close()
    Rewards(RewardsConfig(math=0.0, format=1.0)).close()  # no code reward: no sandbox needed


# ---- the update: micro-batches and meshes change nothing -----------------------------------------
def _digit_reward(prompt_indices, completions):
    return [float(np.mean([t < 64 for t in c.token_ids])) if c.token_ids else 0.0 for c in completions]


def _trainer(loss, micro_batches=1, mesh=None, dtype=jnp.float32, **kw):
    model = init_model(CFG, seed=0, param_dtype=jnp.float32, dtype=dtype)
    if mesh is not None:
        import sharding

        sharding.shard_model(model, mesh, "train")
    cfg = GRPOConfig(loss=loss, group_size=4, max_tokens=10, micro_batches=micro_batches, learning_rate=1e-2,
                     kl_beta=kw.pop("kl_beta", None), **kw)
    return GRPOTrainer(model, cfg, _digit_reward, mesh=mesh)


def _batch(trainer, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(64, CFG.vocab_size, rng.integers(3, 9)).tolist() for _ in range(4)]
    completions, rewards = trainer.rollout(prompts)
    # Ragged lengths (as EOS would give): token-level normalisation then differs per micro-batch.
    for k, c in enumerate(completions):
        cut = 1 + k % len(c.token_ids)
        c.token_ids, c.logprobs = c.token_ids[:cut], c.logprobs[:cut]
    batch, _ = trainer.make_batch(prompts, completions, rewards["reward"])
    assert len(set(batch["mask"].sum(1))) > 3 and np.abs(batch["advantages"]).max() > 0
    return batch


@pytest.mark.compile_bound
@pytest.mark.parametrize("loss", ["dapo", "grpo", "dr_grpo"])
def test_micro_batches_give_the_full_batch_gradient(loss):
    one, four = _trainer(loss, 1, kl_beta=0.1), _trainer(loss, 4, kl_beta=0.1)
    batch = _batch(one)
    one.params = jax.tree.map(lambda x: x * 1.01, one.params)  # policy != reference: KL term non-zero
    four.params = one.params
    g1, m1 = one.gradients(batch)
    g4, m4 = four.gradients(batch)
    for key in ("loss", "kl", "clip_fraction", "entropy"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert m1["kl"] > 0
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)


@pytest.mark.compile_bound
@pytest.mark.parametrize("compute_copy, dtype", [("step", jnp.bfloat16), ("split", jnp.float32)])
def test_weights_cast_once_per_step_give_the_per_micro_batch_gradient(compute_copy, dtype):
    """compute_copy "step" (the float32 masters cast to bfloat16 once, shared by the micro-batches)
    vs "micro_batch" (autodiff through the model's own cast of each weight, in every micro-batch):
    the same gradients of the float32 masters, the same metrics and the same update. "split" (the
    copy as one array per layer, straight-line layers, gradients restacked) likewise, in float32:
    in bfloat16 a differently fused graph rounds differently, which would hide a plumbing error."""
    runs, batch = {}, None
    for copy in ("micro_batch", compute_copy):
        t = _trainer("grpo", 2, dtype=dtype, kl_beta=0.1, compute_copy=copy)
        batch = _batch(t) if batch is None else batch
        t.params = jax.tree.map(lambda x: x * 1.01, t.params)  # policy != reference: KL term non-zero
        grads, metrics = t.gradients(batch)
        runs[copy] = grads, metrics, t.update(batch), t.params
    (g_ref, m_ref, u_ref, p_ref), (g, m, u, p) = runs["micro_batch"], runs[compute_copy]
    assert m_ref["kl"] > 0
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g))
    for key in ("loss", "kl", "entropy"):
        np.testing.assert_allclose(m[key], m_ref[key], rtol=1e-5, atol=1e-7, err_msg=key)
    np.testing.assert_allclose(u["grad_norm"], u_ref["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * np.abs(a).max())
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)
    with pytest.raises(ValueError, match="compute_copy must be one of split, step, micro_batch"):
        GRPOConfig(compute_copy="once")


@pytest.mark.compile_bound
def test_sharded_update_equals_single_device():
    import sharding

    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    single, sharded = _trainer("grpo", 2), _trainer("grpo", 2, mesh=mesh)
    assert sharded.params["layers"]["mlp"]["up_proj"].sharding.spec != jax.sharding.PartitionSpec()
    batch = _batch(single)
    g1, _ = single.gradients(batch)
    g2, _ = sharded.gradients(batch)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6 * np.abs(a).max())
    m1, m2 = single.update(batch), sharded.update(batch)
    for key in ("loss", "pg_loss", "grad_norm", "entropy"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    # Adam's first step is about lr * g / |g|: where g is ~0 (rare vocabulary rows) rounding noise
    # moves it; compare at a tenth of lr = 1e-2 (a wrong update would be off by ~lr).
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-3)
    with pytest.raises(ValueError, match="does not split over the 4 batch shards"):
        sharded.make_batch([[70]] * 3, [Completion([1], "stop", 1, None, None, [0.0])] * 12, np.zeros(12))


# ---- real runs -------------------------------------------------------------------------------------
def _env(devices: int) -> dict:
    """A training run's environment: `devices` CPU devices, the user's default caches, and XLA's
    compile-bound setting (a tiny model's few steps: compiling at -O0: these tests take 30% less time)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "QWQ_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]))
    return env


RUN_SETTINGS = ["rewards.math=0", 'rewards.custom="_train_rewards:digits"', "rl.max_tokens=8", "rl.learning_rate=1e-2"]


def _train_cmd(out: Path, *extra: str) -> list[str]:
    sets = [*RUN_SETTINGS, f"run.output_dir={json.dumps(str(out))}", *extra]
    return [sys.executable, "-m", "qwq_jax.train", "--config", str(TINY)] + [a for s in sets for a in ("--set", s)]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _run(cmd, env, timeout=600):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def _read_tensorboard(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars from TFRecord event files, parsed with the protobuf classes tensorboardX ships."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos: pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12: pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def _kill_after_a_checkpoint(cmd, env, out: Path) -> int:
    """Run `cmd` and SIGKILL it as soon as a checkpoint is complete and training has gone past it;
    the number of steps it had logged."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = [int(p.name) for p in (out / "checkpoints").glob("[0-9]*") if p.name.isdigit()
                    and (p / "_CHECKPOINT_METADATA").exists()]
            logged = (out / "metrics.jsonl").exists() and len(_metrics(out))
            if done and logged and logged > min(done):
                break
            assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint within 300 s")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return len(_metrics(out))


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    steps = ["run.steps=8", "run.save_every=3", "run.keep=2", "data.eval_every=4", "data.eval_size=4"]
    env = _env(2)
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(_train_cmd(full, *steps), env)
    want = _metrics(full)
    assert [m["step"] for m in want] == list(range(1, 9))
    assert [m["step"] for m in want if "eval_reward" in m] == [4, 8]  # greedy eval on held-out problems
    assert len({m["loss"] for m in want}) > 6 and max(abs(m["loss"]) for m in want) > 1e-4

    # Same run, SIGKILLed as soon as a checkpoint is complete (and training has gone past it).
    killed_at = _kill_after_a_checkpoint(_train_cmd(cut, *steps), env, cut)
    assert killed_at < 8

    # Without --resume the run refuses to touch the checkpoints; with it, it continues.
    p = subprocess.run(_train_cmd(cut, *steps), env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "pass --resume" in p.stderr
    _run(_train_cmd(cut, *steps) + ["--resume"], env)
    got = _metrics(cut)
    assert [m["step"] for m in got] == list(range(1, 9))
    resumed_from = max(s for s in range(0, 9, 3) if s <= killed_at)
    print(f"killed after step {killed_at}, resumed from the checkpoint of step {resumed_from}")
    for a, b in zip(want, got):
        for key in ("loss", "reward_mean", "kl", "grad_norm", "data_position", "eval_reward"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))

    # TensorBoard: every step once, equal to the JSON lines (events past the checkpoint purged).
    tb = _read_tensorboard(cut / "tensorboard")
    loss = dict(tb["train/loss"])
    assert sorted(loss) == list(range(1, 9))
    np.testing.assert_allclose([loss[s] for s in range(1, 9)], [m["loss"] for m in got], rtol=1e-6)
    assert "train/reward_custom_mean" in tb


@pytest.mark.slow
def test_lora_sigkill_and_resume_reproduce_the_uninterrupted_run(tmp_path):
    """QLoRA (rank-4 adapters on an int8 base), SIGKILLed and resumed: every step's metrics equal the
    uninterrupted run's (the base is rebuilt from model.path, adapters and AdamW state restored).
    Its checkpoints hold the adapters and their optimizer state, nothing of the base."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from qwq_jax.lora import TARGETS
    from qwq_jax.train import run

    steps = ["run.steps=8", "run.save_every=3", "run.keep=2", "lora.rank=4", "lora.alpha=8", 'model.quantize="int8"']
    env = _env(2)
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(_train_cmd(full, *steps), env)
    want = _metrics(full)
    assert [m["step"] for m in want] == list(range(1, 9)) and max(m["grad_norm"] for m in want) > 0
    killed_at = _kill_after_a_checkpoint(_train_cmd(cut, *steps), env, cut)
    assert killed_at < 8
    _run(_train_cmd(cut, *steps) + ["--resume"], env)
    got = _metrics(cut)
    assert [m["step"] for m in got] == list(range(1, 9))
    print(f"killed after step {killed_at}, resumed from the checkpoint of step {3 * (killed_at // 3)}")
    for a, b in zip(want, got):
        for key in ("loss", "reward_mean", "kl", "grad_norm", "data_position", "logp_gap"):
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))

    state_dir = cut / "checkpoints" / "8" / "state"
    state = ocp.StandardCheckpointer().restore(state_dir.absolute())
    names = {path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(state["params"])}
    assert names == {f"{t}_lora_{m}" for t in TARGETS for m in "ab"}
    adapters = sum(np.asarray(x).size for x in jax.tree.leaves(state["params"]))
    arrays = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
    assert arrays <= 3 * 4 * adapters + 64  # float32 adapters, AdamW's mu and nu, step counters
    on_disk = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file())
    full_ft = 3 * 4 * sum(x.size for x in jax.tree.leaves(nnx.state(init_model(CFG))))  # masters + mu + nu
    print(f"LoRA checkpoint: {adapters} adapter weights, {on_disk} bytes on disk; full fine-tuning's arrays: "
          f"{full_ft} bytes")
    # On disk, Orbax's metadata files add 100-270 KB (their size varies from run to run): a fraction of a full
    # fine-tuning state's arrays, which the base alone (float32, ~600 KB here) with them would pass.
    assert arrays < full_ft / 16 and on_disk < full_ft / 2
    with pytest.raises(ConfigError, match=r"written with \[lora\] .*'rank': 4.*'rank': 8"):  # before any weight loads
        run(load_config(TINY, [*RUN_SETTINGS, *steps, "lora.rank=8", f"run.output_dir={json.dumps(str(cut))}",
                               "run.steps=9"]), resume=True)


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    from _procs import free_port, wait_all

    port = free_port()
    settings = ["run.steps=3", "run.save_every=2", 'run.mesh="data=2,fsdp=2,tensor=2"', "data.prompts_per_step=4",
                "rl.micro_batches=2"]
    single = tmp_path / "single"
    multi = tmp_path / "multi"
    procs = [subprocess.Popen(_train_cmd(multi, *settings) + [
        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    _run(_train_cmd(single, *settings), _env(8))
    wait_all(procs, 600, "two-process training")
    want, got = _metrics(single), _metrics(multi)
    assert [m["step"] for m in got] == [1, 2, 3]
    for a, b in zip(want, got):
        for key in ("reward_mean", "response_length"):
            assert a[key] == b[key], (key, a[key], b[key])
        for key in ("loss", "kl", "grad_norm", "entropy"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]


# ---- after training: the checkpoint samples, exports, and the README's commands run in sequence -----
@pytest.mark.compile_bound
@pytest.mark.slow
def test_training_checkpoint_samples_and_exports_to_transformers(tmp_path, capsys):
    """One dr_grpo step (the bar says so) -> RUN/checkpoints/1; --resume on the finished run is one line;
    `python -m qwq_jax.sample --checkpoint RUN/checkpoints/1` decodes greedily what transformers decodes
    from `python -m convert export-hf RUN/checkpoints/1 OUT`, and the logits agree in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    import qwq_jax
    from convert.__main__ import main as convert_main
    from qwq_jax import sample

    out = tmp_path / "run"
    sets = [*RUN_SETTINGS, "rl.loss=dr_grpo", "rl.kl_beta=0", "run.steps=1", "rl.max_tokens=4",
            f"run.output_dir={json.dumps(str(out))}"]
    argv = ["--config", str(TINY)] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "dr_grpo:" in err and "grpo:" not in err.replace("dr_grpo:", "")
    assert main(argv + ["--resume"]) == 0
    said = capsys.readouterr()
    assert said.out.splitlines() == [said.out.strip()] and "is finished: its newest checkpoint is step 1 of " \
        "run.steps=1" in said.out and "nan" not in said.out
    step = out / "checkpoints" / "1"

    prompt = "12+7="
    assert sample.main(["--checkpoint", str(step), "--raw", "--prompt", prompt, "--max-tokens", "6", "--json",
                        "--temperature", "0", "--repetition-penalty", "1", "--presence-penalty", "0",
                        "--layer-loop", "scan"]) == 0  # scan: compiles fastest (the loops agree: test_generate)
    ours_ids = json.loads(capsys.readouterr().out)["token_ids"]
    assert convert_main(["export-hf", str(step), str(tmp_path / "hf"), "--quiet"]) == 0
    capsys.readouterr()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    ids = list(prompt.encode())
    with torch.no_grad():
        gen = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=256,
                          pad_token_id=256)[0, len(ids):].tolist()
    assert ours_ids == gen[: len(ours_ids)] and len(ours_ids) >= 1, (ours_ids, gen)

    model = qwq_jax.load(step)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 24))
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    # The trained weights, not the initial ones: one update at lr 1e-2 moved them.
    init = init_model(CFG, seed=0, param_dtype=jnp.float32)
    assert not np.allclose(np.asarray(init(jnp.asarray(tokens, jnp.int32))), ours, atol=1e-3)



@pytest.mark.compile_bound
@pytest.mark.slow
def test_lora_checkpoint_samples_and_exports_merged_to_transformers(tmp_path, capsys):
    """One QLoRA step (rank-4 adapters on an int8 base, float32 compute) -> RUN/checkpoints/1, which
    holds the adapters alone. `qwq_jax.load` rebuilds the base as the trainer did and runs int8 base +
    adapters (the same logits as train.build_model's model with the saved adapters); `python -m qwq_jax.sample
    --checkpoint` samples it; `python -m convert export-hf` writes the base dequantized with the adapters
    merged, whose transformers float32 logits equal ours within 1e-4. A step whose base is gone is one line."""
    import shutil

    import torch
    from flax import nnx
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import qwq_jax
    from convert.__main__ import main as convert_main
    from convert.names import hf_names
    from convert.synthetic import write_random_hf_checkpoint
    from qwq_jax import checkpoint, sample
    from qwq_jax.lora import LoRAParam
    from qwq_jax.train import build_model
    from sharding import make_mesh

    # The base: a converted checkpoint (random HF weights), as a real run's model.path.
    base_dir = tmp_path / "base"
    write_random_hf_checkpoint(CFG, tmp_path / "hf-base", dtype="float32", seed=3)
    assert convert_main(["hf", str(tmp_path / "hf-base"), str(base_dir), "--quiet"]) == 0
    out = tmp_path / "run"
    sets = [*RUN_SETTINGS, "run.steps=1", "rl.max_tokens=4", "rl.warmup_steps=0", "lora.rank=4", "lora.alpha=8",
            'model.quantize="int8"', 'model.tokenizer="bytes"', f"model.path={json.dumps(str(base_dir))}",
            f"run.output_dir={json.dumps(str(out))}"]
    assert main(["--config", str(TINY)] + [a for s in sets for a in ("--set", s)]) == 0
    capsys.readouterr()
    step = out / "checkpoints" / "1"

    model = qwq_jax.load(step)  # an int8 base keeps its adapters beside it (merge_lora=True merges)
    assert model.quant == "int8" and model.lora is not None and model.lora.rank == 4
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 24)), jnp.int32)
    ours = np.asarray(model(tokens))
    # The trainer's own model (train.build_model) with the saved adapters: the same base, the same logits.
    trained, _ = build_model(load_config(TINY, sets), make_mesh("fsdp=-1", jax.devices()[:1]))
    adapters = nnx.state(trained, LoRAParam)
    nnx.replace_by_pure_dict(adapters, checkpoint.restore_params(step, nnx.to_pure_dict(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), adapters))))
    nnx.update(trained, adapters)
    np.testing.assert_array_equal(ours, np.asarray(trained(tokens)))
    base = checkpoint._lora_base(step, checkpoint.lora_run(step), None, "generate", jnp.float32, {})
    assert np.abs(ours - np.asarray(base(tokens))).max() > 1e-3  # the step trained the adapters

    assert sample.main(["--checkpoint", str(step), "--raw", "--prompt", "12+7=", "--max-tokens", "4", "--json",
                        "--temperature", "0", "--layer-loop", "scan"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) >= 1

    assert checkpoint.MergedLoRA.of(step, "float32") is not None  # merged a layer group at a time
    assert convert_main(["export-hf", str(step), str(tmp_path / "hf"), "--quiet"]) == 0
    capsys.readouterr()
    # The same tensors as the whole model merged in memory (qwq_jax.load(merge_lora=True)).
    whole = checkpoint.flatten(nnx.to_pure_dict(nnx.state(qwq_jax.load(step, merge_lora=True, dtype="float32"))))
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name, rule, layer in hf_names(CFG):
        ours_w = whole[rule.ours] if layer is None else whole[rule.ours][layer]
        np.testing.assert_allclose(exported[name].numpy(), rule.to_hf(np.asarray(ours_w)), rtol=0, atol=1e-6,
                                   err_msg=name)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(tokens))).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
    capsys.readouterr()

    # The base is the run's model.path: gone, every entry point says so in one line.
    orphan = tmp_path / "orphan"
    shutil.copytree(step, orphan)
    meta = json.loads((orphan / "meta" / "metadata").read_text())
    meta["config"]["model"]["path"] = str(tmp_path / "deleted_base")
    (orphan / "meta" / "metadata").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match=r"holds LoRA adapters only; its base, the run's "
                       r"model.path '.*deleted_base', .* does not exist"):
        qwq_jax.load(orphan)
    assert convert_main(["export-hf", str(orphan), str(tmp_path / "hf2"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deleted_base" in err and not (tmp_path / "hf2").exists()
    assert sample.main(["--checkpoint", str(orphan), "--prompt", "1", "--max-tokens", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "deleted_base" in err

def test_readme_training_commands_run_in_sequence():
    """The README's training block: every fresh run has its own output dir, every --resume continues
    an earlier one, and the sample / export-hf lines name a checkpoint those runs write."""
    import shlex

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Fine-tune with GRPO"):]
    section = section[: section.index("\n## ", 4)]
    commands = [shlex.split(c.split("  #")[0]) for c in section.replace("\\\n", " ").splitlines()
                if c.startswith("python -m ") and "--distributed" not in c and "--coordinator" not in c]
    runs: dict[str, int] = {}  # output dir -> newest checkpoint step
    saved: set[str] = set()
    for cmd in commands:
        if cmd[2] == "qwq_jax.train":
            sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
            cfg = load_config(ROOT / cmd[cmd.index("--config") + 1], sets)
            out = cfg.run.output_dir
            if "--resume" in cmd:
                assert out in runs, f"{cmd}: resumes a run the README has not started"
            else:
                assert out not in runs, f"{cmd}: the output dir of an earlier command"
            start = runs.get(out, 0)
            every = cfg.run.save_every or cfg.run.steps
            saved |= {f"{out}/checkpoints/{s}" for s in range(start + 1, cfg.run.steps + 1)
                      if s % every == 0 or s == cfg.run.steps}
            runs[out] = max(start, cfg.run.steps)
        else:
            ckpt = cmd[cmd.index("--checkpoint") + 1] if cmd[2] == "qwq_jax.sample" else cmd[cmd.index("export-hf") + 1]
            assert ckpt in saved, f"{cmd}: no README command writes {ckpt}"
    assert len(runs) >= 2 and any("--resume" in c for c in commands)
