"""LoRA adapters (qwq_jax/lora.py) on the tiny model: the forward is the base plus (alpha/r) x A B
(numpy), a new adapter (B = 0) changes nothing, merged weights give the same logits, an update
through an optimizer over `LoRAParam` moves the adapters alone; int8 base (QLoRA layout) too."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qwq_jax import QwenConfig
from qwq_jax import lora as lora_lib
from qwq_jax.lora import LoraConfig, LoRAParam
from qwq_jax.model import init_model, matmul

pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)

CFG = QwenConfig.preset("tiny")
LORA = LoraConfig(rank=4, alpha=8.0)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)


@nnx.jit
def logits(model):
    return model(TOKENS)


def _randomize_b(model, seed=1):
    """Give every B a random value (a trained adapter), in place."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        if path[-1].endswith("_lora_b"):
            var.set_value(jnp.asarray(rng.normal(0, 0.05, var.get_value().shape), var.get_value().dtype))


def _base_twin(model, **kwargs):
    """The same base weights without adapters."""
    base = init_model(CFG, seed=0, param_dtype=jnp.float32, dtype=jnp.float32, **kwargs)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    state = nnx.state(base)
    nnx.update(base, nnx.from_flat_state([(p, v.replace(flat[p].get_value()))
                                          for p, v in nnx.to_flat_state(state)]))
    return base


def test_projection_is_base_plus_scaled_xab_against_numpy():
    model = init_model(CFG, seed=0, param_dtype=jnp.float32, dtype=jnp.float32, lora=LORA)
    _randomize_b(model)
    attn = model.layers.attn
    x = np.random.default_rng(2).normal(size=(2, 3, CFG.hidden_size)).astype(np.float32)
    layer0 = nnx.merge(*nnx.split(attn))  # a copy whose stacked weights we slice by hand below
    for name in ("q_proj", "o_proj"):
        w = np.asarray(getattr(attn, name)[...])[0]
        a = np.asarray(getattr(attn, name + "_lora_a")[...])[0]
        b = np.asarray(getattr(attn, name + "_lora_b")[...])[0]
        if name == "q_proj":  # [E, H, D]; A [E, r]; B [r, H, D]
            spec, xin = "btd,dhk->bthk", x
            want = np.einsum("btd,dhk->bthk", x, w) + LORA.scale * np.einsum("btr,rhk->bthk", x @ a, b)
        else:  # [H, D, E]; A [H, D, r]; B [r, E]
            xin = x.reshape(2, 3, CFG.num_heads, CFG.head_dim) if CFG.hidden_size == CFG.num_heads * CFG.head_dim \
                else np.random.default_rng(3).normal(size=(2, 3, CFG.num_heads, CFG.head_dim)).astype(np.float32)
            spec = "bthk,hkd->btd"
            want = np.einsum("bthk,hkd->btd", xin, w) + LORA.scale * np.einsum("bthk,hkr,rd->btd", xin, a, b)
        for v in (name, name + "_lora_a", name + "_lora_b"):  # layer 0's slice of each stacked weight
            getattr(layer0, v).set_value(getattr(attn, v)[...][0])
        got = np.asarray(matmul(spec, jnp.asarray(xin), layer0, name, jnp.float32))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_new_adapters_change_nothing_and_trained_ones_merge(quant):
    model = init_model(CFG, seed=0, param_dtype=jnp.float32, dtype=jnp.float32, lora=LORA, quant=quant)
    base = _base_twin(model, quant=quant)
    np.testing.assert_array_equal(np.asarray(logits(model)), np.asarray(logits(base)))  # B = 0: exactly the base
    _randomize_b(model)
    trained = np.asarray(logits(model))
    assert np.abs(trained - np.asarray(logits(base))).max() > 1e-3
    if quant is None:
        merged = lora_lib.merge(model)
        assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(nnx.state(merged)))
        np.testing.assert_allclose(np.asarray(logits(merged)), trained, rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises(ValueError, match="int8 base"):
            lora_lib.merge(model)


def test_an_update_moves_only_the_adapters():
    model = init_model(CFG, seed=0, param_dtype=jnp.float32, dtype=jnp.float32,
                       lora=LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj", "down_proj")))
    before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=LoRAParam)

    def loss(m):
        logits = m(TOKENS[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), TOKENS[:, 1:, None], axis=-1))

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(model)
        opt.update(model, grads)
        return grads

    grads = step(model, opt)
    names = {p[-1] for p, _ in nnx.to_flat_state(grads)}
    assert names == {f"{t}_lora_{m}" for t in ("q_proj", "v_proj", "down_proj") for m in "ab"}
    moved = {p[-1] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
             if not np.array_equal(np.asarray(v.get_value()), before[p])}
    assert moved and all("_lora_" in n for n in moved), moved


def test_bad_configs_are_named():
    for kwargs, word in (({"rank": 0, "alpha": 1}, "rank"), ({"rank": 2, "alpha": 0}, "alpha"),
                         ({"rank": 2, "alpha": 1, "targets": ("qkv",)}, "targets")):
        with pytest.raises(ValueError, match=word):
            LoraConfig(**kwargs)


@pytest.mark.slow
def test_the_engine_runs_base_plus_adapters():
    """The engine's greedy tokens and log-probs on a LoRA model are its merged twin's, teacher-forced
    in one no-cache forward: each token the argmax there, each log-prob within 1e-4."""
    from qwq_jax.generate import Engine
    from qwq_jax.sampling import SamplingParams

    model = init_model(CFG, seed=0, param_dtype=jnp.float32, dtype=jnp.float32, lora=LORA)
    _randomize_b(model)
    merged = lora_lib.merge(model)
    prompt = np.asarray(TOKENS[0]).tolist()
    (c,), = Engine(model, max_num_seqs=1, max_model_len=32, chunk=8, layer_loop="split").generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=8))
    seq = jnp.asarray([prompt + c.token_ids[:-1]], jnp.int32)
    lp = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, t: m(t))(merged, seq)[0, len(prompt) - 1:], axis=-1))
    assert c.token_ids == lp.argmax(-1).tolist()
    np.testing.assert_allclose(c.logprobs, lp[np.arange(8), c.token_ids], atol=1e-4)
