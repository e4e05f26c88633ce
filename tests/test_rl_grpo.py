"""GRPO trainer on a tiny model: logprob consistency with generation, and learning on a verifiable reward."""

import jax.numpy as jnp
import numpy as np
import pytest

from qwq_jax import QwenConfig, init_model
from qwq_jax.rl.grpo import GRPOConfig, GRPOTrainer, pool_bucket
from qwq_jax.sampling import SamplingParams

pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)

CFG = QwenConfig.preset("tiny")
TARGET = 64  # reward: the fraction of completion tokens with id < 64 (1/8 of the vocabulary at random)


def reward(prompt_indices, completions):
    return [float(np.mean([t < TARGET for t in c.token_ids])) if c.token_ids else 0.0 for c in completions]


def make_prompts(step, n=4, seed=0):
    rng = np.random.default_rng(seed * 1000 + step)
    return [rng.integers(TARGET, CFG.vocab_size, rng.integers(3, 9)).tolist() for _ in range(n)]


def test_training_logprobs_agree_with_generation():
    """Greedy completions have, under the training forward (right-aligned prompts), the top log-prob."""
    model = init_model(CFG, seed=1, param_dtype=jnp.float32, dtype=jnp.float32)
    trainer = GRPOTrainer(model, GRPOConfig(group_size=2, max_tokens=6, temperature=1e-6), reward)
    prompts = make_prompts(0)
    outs = trainer.engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6))
    prompt_len = max(map(len, prompts))
    tokens = np.zeros((len(prompts), prompt_len + 6), np.int32)
    segments = np.ones_like(tokens)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        tokens[i, prompt_len - len(p): prompt_len] = p
        segments[i, : prompt_len - len(p)] = 0
        tokens[i, prompt_len:] = o[0].token_ids
    from qwq_jax.rl.grpo import completion_logprobs

    logp, entropy = completion_logprobs(model, jnp.asarray(tokens), jnp.asarray(segments), prompt_len)
    model_logits = model(jnp.asarray(tokens[:, :-1]), jnp.asarray(np.maximum(np.cumsum(segments, 1) - 1, 0)[:, :-1]),
                         jnp.asarray(segments[:, :-1]))[:, prompt_len - 1:]
    top = np.asarray(model_logits).max(-1) - np.asarray(jnp.log(jnp.exp(model_logits).sum(-1)))
    np.testing.assert_allclose(np.asarray(logp), top, atol=1e-5)
    # The engine's own per-token log-probs (behaviour log-probs) are the same numbers.
    np.testing.assert_allclose(np.array([o[0].logprobs for o in outs]), top, atol=1e-5)
    assert (np.asarray(entropy) > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["grpo", "dapo", "dr_grpo"])
def test_mean_reward_rises(loss):
    model = init_model(CFG, seed=0, param_dtype=jnp.float32, dtype=jnp.float32)
    cfg = GRPOConfig(loss=loss, group_size=8, max_tokens=8, learning_rate=2e-2, total_steps=20, seed=0,
                     kl_beta=0.0 if loss == "grpo" else None)
    trainer = GRPOTrainer(model, cfg, reward)
    history = [trainer.step(make_prompts(step)) for step in range(20)]
    rewards = [m["reward_mean"] for m in history]
    first, last = np.mean(rewards[:5]), np.mean(rewards[-5:])
    print(f"{loss}: mean reward {first:.3f} -> {last:.3f}")
    assert last > first + 0.25
    for m in history:
        for key in ("loss", "kl", "clip_fraction", "entropy", "grad_norm", "reward_std", "response_length",
                    "tokens_per_s", "step_s", "rollout_tokens_per_s"):
            assert np.isfinite(m[key]), key
        # The step's time split: its phases, each positive, add up to no more than the step.
        phases = [m[k] for k in ("generate_s", "reward_s", "logprob_s", "update_s")]
        assert all(t > 0 for t in phases) and sum(phases) <= m["step_s"]
        assert m["generate_s"] + m["reward_s"] <= m["rollout_s"]


def test_rollout_weight_layouts_train_the_same():
    """Rollouts from the per-layer split copy and from the fp32 master weights give the same
    completions, rewards and updates, step after step (each step re-syncs the engine)."""
    runs = {}
    for layout in ("split", "master"):
        model = init_model(CFG, seed=3, param_dtype=jnp.float32, dtype=jnp.float32)
        cfg = GRPOConfig(group_size=4, max_tokens=6, learning_rate=2e-2, seed=1, rollout_weights=layout)
        trainer = GRPOTrainer(model, cfg, reward)
        runs[layout] = [trainer.step(make_prompts(step, n=2)) for step in range(3)]
        split = trainer.engine.layer_params
        assert (split is not None and len(split) == CFG.num_layers) if layout == "split" else split is None
    for want, got in zip(runs["master"], runs["split"]):
        for key in ("reward_mean", "loss", "response_length", "grad_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6, err_msg=key)
    with pytest.raises(ValueError, match="rollout_weights must be one of split, master"):
        GRPOConfig(rollout_weights="copy")


def test_split_rollout_weights_on_a_mesh():
    import jax

    import sharding as sh

    from qwq_jax.generate import Engine
    from qwq_jax.replicas import ReplicatedEngine

    mesh = sh.make_mesh("fsdp=2,tensor=4")
    model = sh.shard_model(init_model(CFG, seed=3, param_dtype=jnp.float32, dtype=jnp.float32), mesh, "generate")
    trainer = GRPOTrainer(model, GRPOConfig(group_size=4, max_tokens=4, rollout_weights="split"), reward, mesh=mesh)
    # Rollouts: one engine per replica (fsdp = 2, each on its own four devices), each group of 4 on
    # one of them; the same tokens as one engine on a tensor=4 mesh.
    assert isinstance(trainer.engine, ReplicatedEngine) and len(trainer.engine.replicas) == 2
    prompts = make_prompts(0, n=2)
    sps = [SamplingParams(temperature=1.0, max_tokens=4, n=4, seed=9 + i) for i in range(2)]
    trainer.sync_engine()
    got = trainer._generate(prompts, sps, 4)
    four = sh.make_mesh("tensor=4", jax.devices()[:4])
    want = Engine(sh.shard_model(init_model(CFG, seed=3, param_dtype=jnp.float32, dtype=jnp.float32), four,
                                 "generate"), mesh=four).generate(prompts, sps)
    assert [[c.token_ids for c in row] for row in got] == [[c.token_ids for c in row] for row in want]
    metrics = trainer.step(prompts)
    assert np.isfinite(metrics["loss"])
    trainer.sync_engine()  # the updated weights (the step's rollout ran before its update)
    gate = trainer.engine.layer_params[1]["mlp"]["gate_proj"]
    assert gate.shape == (CFG.hidden_size, CFG.intermediate_size)
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")  # generate rules, minus layers
    np.testing.assert_allclose(np.asarray(gate), np.asarray(trainer.params["layers"]["mlp"]["gate_proj"][1]),
                               rtol=1e-6)


@pytest.mark.parametrize("kind", ["master", "lora"])
def test_in_place_rollouts_run_one_engine_per_data_index(kind):
    """Rollouts that read the update's own weights (the fp32 masters, a LoRA base + adapters: split
    over `fsdp` by the `train` rules) run one engine per `data` index, each on its fsdp x tensor
    devices with views of those arrays; the same tokens as the trainer without a mesh."""
    import jax
    from flax import nnx

    import sharding as sh

    from qwq_jax.lora import LoraConfig
    from qwq_jax.replicas import ReplicatedEngine

    def trainer(mesh):
        model = init_model(CFG, seed=3, param_dtype=jnp.float32, dtype=jnp.float32,
                           lora=LoraConfig(rank=4, alpha=8.0) if kind == "lora" else None)
        if mesh is not None:
            model = sh.shard_model(model, mesh, "train")
        cfg = GRPOConfig(group_size=4, max_tokens=4, kl_beta=0.0, learning_rate=5e-2,
                         rollout_weights="master" if kind == "master" else "split")
        return GRPOTrainer(model, cfg, reward, mesh=mesh)

    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    meshed, plain = trainer(mesh), trainer(None)
    engine = meshed.engine
    assert isinstance(engine, ReplicatedEngine) and engine.axes == ("data",) and len(engine.replicas) == 2
    assert all(dict(m.shape) == {"data": 1, "fsdp": 2, "tensor": 2} for m in engine.meshes)
    prompts = make_prompts(0, n=2)
    meshed.step(prompts)  # one update first (LoRA's B no longer zero), synced to the replicas' views
    meshed.sync_engine()
    plain.params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), meshed.params)
    plain.sync_engine()
    # Replica 1's weights are the update's own buffers on its four devices (no copy).
    sub = engine.replicas[1]
    if kind == "master":
        full, view = meshed.params["layers"]["mlp"]["up_proj"], nnx.to_pure_dict(sub.params)["layers"]["mlp"]["up_proj"]
    else:
        full, view = meshed.frozen["layers"][0]["mlp"]["up_proj"], sub.layer_params[0]["mlp"]["up_proj"]
    view = view[...] if isinstance(view, nnx.Variable) else view
    devices = set(engine.meshes[1].devices.flat)
    assert "fsdp" in str(full.sharding.spec) and {d for d in view.sharding.device_set} == devices
    assert {s.device: s.data.unsafe_buffer_pointer() for s in view.addressable_shards} == {
        s.device: s.data.unsafe_buffer_pointer() for s in full.addressable_shards if s.device in devices}
    sps = [SamplingParams(temperature=1.0, max_tokens=4, n=4, seed=9 + i) for i in range(2)]
    got, want = meshed._generate(prompts, sps, 4), plain._generate(prompts, sps, 4)
    assert [[c.token_ids for c in row] for row in got] == [[c.token_ids for c in row] for row in want]
    assert all(s.stats()["steps"] > 0 for s in engine.replicas.values())


def test_abstract_trainer_lowers_the_same_update():
    """A trainer built on `abstract_model` (no weights) lowers the very program a real trainer runs:
    what benchmarks/gpu_aot.py compiles for an H100 from this CPU host. Its arguments are the fp32
    master weights, AdamW's two fp32 moments and the batch, by hand."""
    import jax

    import sharding as sh
    from qwq_jax.model import abstract_model

    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    cfg = GRPOConfig(group_size=4, max_tokens=4, micro_batches=2)
    real = GRPOTrainer(sh.shard_model(init_model(CFG, seed=3, param_dtype=jnp.float32, dtype=jnp.float32), mesh,
                                      "generate"), cfg, reward, mesh=mesh)
    abstract = GRPOTrainer(abstract_model(CFG, param_dtype=jnp.float32, dtype=jnp.float32), cfg, reward, mesh=mesh)
    assert abstract.abstract and not real.abstract
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract.state()))
    assert abstract.lower_update(8, 5).as_text() == real.lower_update(8, 5).as_text()
    with pytest.raises(ValueError, match="built on an abstract model"):
        abstract.step(make_prompts(0, n=2))
    with pytest.raises(ValueError, match="do not split into micro_batches=2"):
        abstract.lower_update(7, 5)
    with pytest.raises(ValueError, match="needs a mesh"):
        GRPOTrainer(abstract_model(CFG), cfg, reward)

    one = GRPOTrainer(init_model(CFG, seed=3, param_dtype=jnp.float32, dtype=jnp.float32), cfg, reward)
    rows, prompt_len, c = 8, 5, 4
    params = sum(x.size for x in jax.tree.leaves(one.params))
    batch = 2 * rows * (prompt_len + c) * 4 + 2 * rows * c * 4 + 2 * rows * 4  # tokens, segments; mask, old; adv, w
    ref = rows * c * 4 if one.ref_params is not None else 0
    got = one.lower_update(rows, prompt_len).compile().memory_analysis().argument_size_in_bytes
    assert 0 <= got - (3 * 4 * params + batch + ref) <= 64  # + optimizer step counters (scalars)


# ---- LoRA: adapters on a frozen base (float or int8) ---------------------------------------------
def _lora_model(quant=None):
    """Rank-4 adapters on every target of a tiny base whose lm_head is made 16x larger: a random
    init's logits have std ~0.1 (near uniform whatever the hidden state, so adapters inside the
    decoder could not steer them); these have ~2, as a trained model's."""
    from qwq_jax.lora import LoraConfig, attach
    from qwq_jax.quant import quantize

    base = init_model(CFG, seed=0, param_dtype=jnp.float32, dtype=jnp.float32)
    base.lm_head.set_value(base.lm_head[...] * 16)
    return attach(quantize(base) if quant else base, LoraConfig(rank=4, alpha=8.0), seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("quant", [None, "int8"])
def test_lora_mean_reward_rises_on_a_frozen_base(quant):
    """Only the adapters train (the trainer's params and AdamW state are theirs alone); the base,
    float32 or int8, is bit-for-bit unchanged, and the engine rolls out from the very arrays the
    update reads plus the current adapters (its log-probs equal the update's: logp_gap)."""
    import jax
    from flax import nnx

    from qwq_jax.lora import TARGETS, LoRAParam

    model = _lora_model(quant)
    base = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Not(LoRAParam))))
    trainer = GRPOTrainer(model, GRPOConfig(group_size=8, max_tokens=6, learning_rate=5e-2, total_steps=6, seed=0,
                                            kl_beta=0.0), reward)
    history = [trainer.step(make_prompts(step)) for step in range(6)]
    rewards = [m["reward_mean"] for m in history]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    print(f"LoRA on the {quant or 'float32'} base: mean reward {first:.3f} -> {last:.3f} ({np.round(rewards, 3)})")
    assert last > first + 0.3
    assert max(m["logp_gap"] for m in history) < 1e-4

    names = {p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(trainer.params)}
    assert names == {f"{t}_lora_{m}" for t in TARGETS for m in "ab"}
    adapters = sum(x.size for x in jax.tree.leaves(trainer.params))
    assert sum(x.size for x in jax.tree.leaves(trainer.opt_state)) <= 2 * adapters + 8  # AdamW's mu, nu + counts
    frozen = dict(trainer.frozen, layers=jax.tree.map(lambda *xs: np.stack(xs), *trainer.frozen["layers"]))
    for path, want in jax.tree_util.tree_leaves_with_path(base):
        got = np.asarray(_at(frozen, path))
        assert got.dtype == want.dtype and np.array_equal(got, want), path
    q_proj = trainer.frozen["layers"][1]["attn"]["q_proj"]
    assert q_proj.dtype == (jnp.int8 if quant else jnp.float32)
    assert trainer.engine.layer_params[1]["attn"]["q_proj"][...] is q_proj  # the same buffer, no copy


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_lora_update_takes_the_adapters_in_float32_and_the_base_as_it_is():
    """The compiled LoRA update's arguments: the adapters' float32 masters and AdamW moments, the
    frozen base once as it is (int8 matmul weights with float32 scales, bf16 rest), the batch; no
    float32 copy of the base, no optimizer state for it."""
    import jax

    from qwq_jax.lora import LoraConfig

    model = init_model(CFG, seed=0, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, quant="int8",
                       lora=LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")))
    trainer = GRPOTrainer(model, GRPOConfig(group_size=4, max_tokens=4, kl_beta=0.0), reward)
    adapters = sum(x.size for x in jax.tree.leaves(trainer.params))
    assert {x.dtype for x in jax.tree.leaves(trainer.params)} == {jnp.dtype(jnp.float32)}
    assert sum(x.size for x in jax.tree.leaves(trainer.opt_state)) <= 2 * adapters + 8
    base = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.frozen))
    int8 = [x for x in jax.tree.leaves(trainer.frozen) if x.dtype == jnp.int8]
    assert len(int8) == 7 * CFG.num_layers  # every matmul weight, one array per layer
    rows, prompt_len, c = 8, 5, 4
    batch = 2 * rows * (prompt_len + c) * 4 + 2 * rows * c * 4 + 2 * rows * 4
    assert trainer.loss_cfg.tis_cap is None  # the engine reads the same int8 weights: no TIS by default
    got = trainer.lower_update(rows, prompt_len).compile().memory_analysis().argument_size_in_bytes
    assert 0 <= got - (3 * 4 * adapters + base + batch) <= 64


def test_rollouts_are_the_engines_own_and_prefill_each_prompt_once():
    """A rollout is the engine's generate on the trainer's weights: each group equals the same requests run
    on an engine of their own (fixed seeds), and a group of 4 computes its prompt's prefill once (pages shared)."""
    from qwq_jax.generate import Engine

    model = init_model(CFG, seed=3, param_dtype=jnp.float32, dtype=jnp.float32)
    trainer = GRPOTrainer(model, GRPOConfig(group_size=4, max_tokens=8, temperature=1.0, seed=7), reward)
    seen = []
    generate = trainer.engine.generate
    trainer.engine.generate = lambda prompts, params: seen.append(params) or generate(prompts, params)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, CFG.vocab_size, n).tolist() for n in (5, 19, 40)]  # within, across, over pages
    before = trainer.engine.stats()["prefill_tokens_computed"]
    completions, _ = trainer.rollout(prompts)
    computed = trainer.engine.stats()["prefill_tokens_computed"] - before
    assert computed == sum(map(len, prompts)), (computed, list(map(len, prompts)))
    (params,) = seen
    assert [p.n for p in params] == [4, 4, 4] and len({p.seed for p in params}) == 3
    direct = Engine(model, max_num_seqs=2).generate(prompts, params)  # fewer slots: the groups take turns
    assert [c.token_ids for c in completions] == [c.token_ids for group in direct for c in group]
    assert len({tuple(c.token_ids) for c in completions}) > 3  # sampled: the group's members differ
    # Shorter prompts in the next rollout, and an evaluation of 2 prompts, run on the first rollout's
    # slots and pool: nothing compiles again (each of those shapes compiled prefill, insert and decode).
    trainer.rollout([rng.integers(0, CFG.vocab_size, n).tolist() for n in (3, 7, 4)])
    assert trainer.engine.last_timings["compiled"] == []
    trainer.evaluate([[70, 71], [72]], reward, max_tokens=3)
    assert trainer.engine.last_timings["compiled"] == []
    assert (trainer.engine.max_num_seqs, trainer.engine.num_pages) == (12, 12 * pool_bucket(3 + 1))
    assert [pool_bucket(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 100)] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 128]


def test_prompt_widths_are_bucketed_so_steps_reuse_one_compiled_update():
    """Update batches pad prompts to a bucket (powers of two from 16, then multiples of 1024): two steps
    whose longest prompts differ (5 and 11 tokens) run one compiled update, and the padding changes nothing."""
    from qwq_jax.generate import Completion
    from qwq_jax.rl.grpo import prompt_bucket

    assert [prompt_bucket(n) for n in (1, 16, 17, 100, 1024, 1025, 2048, 3000)] == \
        [16, 16, 32, 128, 1024, 2048, 2048, 3072]
    model = init_model(CFG, seed=2, param_dtype=jnp.float32, dtype=jnp.float32)
    cfg = GRPOConfig(group_size=2, max_tokens=4, kl_beta=0.0, learning_rate=1e-3)
    trainer = GRPOTrainer(model, cfg, reward)
    comps = [Completion([65, 3, 70], "stop", 0, logprobs=[0.0] * 3), Completion([9, 80], "stop", 0, logprobs=[0.0] * 2)]
    for prompt in ([70, 71, 72, 73, 74], list(range(80, 91))):
        batch, _ = trainer.make_batch([prompt], comps, np.array([1.0, 0.0]))
        assert batch["tokens"].shape == (2, 16 + 4) and (batch["segments"][:, : 16 - len(prompt)] == 0).all()
        trainer.update(batch)
    assert trainer._update._cache_size() == 1 and trainer._prepare._cache_size() == 1
    # The same update as with the unpadded width: the padding is masked.
    arrays, _, _ = trainer._device_batch(batch)
    logp, _ = trainer._logprobs(trainer.weights.compute(trainer.params), trainer.params, arrays["tokens"],
                                arrays["segments"], 16)
    tight, _ = trainer._logprobs(trainer.weights.compute(trainer.params), trainer.params, arrays["tokens"][:, 5:],
                                 arrays["segments"][:, 5:], 11)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(tight), atol=1e-6)
