"""Meshes, rules, and the sharded forward against the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharding as sh
from qwq_jax import Qwen2, QwenConfig, abstract_model, forward

pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)

CFG = QwenConfig.preset("tiny")  # 8 heads, 4 kv heads, mlp 160, vocab 512, embed 64


def factory(cfg=CFG):
    return lambda: Qwen2(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=jnp.float32)


def test_parse_mesh_spec():
    assert sh.parse_mesh_spec("data=1,fsdp=-1,tensor=4", 8) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert sh.parse_mesh_spec("tensor=2", 2) == {"data": 1, "fsdp": 1, "tensor": 2}
    assert sh.parse_mesh_spec({"fsdp": -1}, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    for spec, msg in [("data=2,tensor=2", "has 4 devices but 8"), ("fsdp=-1,tensor=-1", "only one axis"),
                      ("pipe=8", "unknown axis 'pipe'"), ("tensor", "not of the form"),
                      ("tensor=x", "not an integer"), ("fsdp=-1,tensor=3", "not divisible"),
                      ("tensor=0", "size 0"), ("tensor=2,tensor=4", "given twice")]:
        with pytest.raises(ValueError, match=msg):
            sh.parse_mesh_spec(spec, 8)


def test_make_mesh_uses_all_devices():
    mesh = sh.make_mesh("data=2,fsdp=-1,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.devices.size == len(jax.devices()) == 8
    assert sh.mesh_spec(mesh) == "data=2,fsdp=2,tensor=2"


def test_rules_map_logical_axes():
    mesh = sh.make_mesh("data=2,fsdp=2,tensor=2")
    assert sh.logical_to_mesh(("layers", "embed", "heads", "head_dim"), mesh, "train") == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert sh.logical_to_mesh(("layers", "embed", "heads", "head_dim"), mesh, "generate") == \
        jax.sharding.PartitionSpec(None, None, "tensor", None)
    assert sh.logical_to_mesh(("batch", "seq"), mesh, "train") == \
        jax.sharding.PartitionSpec(("data", "fsdp"), None)
    # Size-1 mesh axes are dropped.
    assert sh.logical_to_mesh(("vocab", "embed"), sh.make_mesh("fsdp=8"), "generate") == \
        jax.sharding.PartitionSpec(None, None)
    with pytest.raises(ValueError, match="logical axis 'experts' has no sharding rule"):
        sh.logical_to_mesh(("experts",), mesh, "train")
    with pytest.raises(ValueError, match="unknown sharding rules 'infer'"):
        sh.logical_to_mesh(("embed",), mesh, "infer")


@pytest.mark.parametrize("rules", ["generate", "train"])
def test_sharded_forward_equals_single_device(rules):
    mesh = sh.make_mesh("fsdp=2,tensor=4")  # 2 x 4 over 8 fake CPU devices
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 96)).astype(np.int32)
    single = jax.device_put(factory()(), jax.devices()[0])
    want = np.asarray(forward(single, jnp.asarray(tokens)))

    model = sh.init_sharded(factory(), mesh, rules)
    q = model.layers.attn.q_proj[...]
    assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape[2] == CFG.num_heads // 4
    if rules == "train":
        assert q.addressable_shards[0].data.shape[1] == CFG.hidden_size // 2  # FSDP over embed
    got = forward(model, sh.put_global(tokens, sh.batch_sharding(mesh, rules)))
    err = np.abs(np.asarray(got) - want).max()
    print(f"{rules}: max |d| sharded vs single = {err:.2e}")
    assert err <= 1e-5
    # shard_model on an existing model gives the same arrays as init_sharded.
    moved = sh.shard_model(factory()(), mesh, rules)
    assert moved.layers.mlp.up_proj[...].sharding == model.layers.mlp.up_proj[...].sharding
    np.testing.assert_allclose(np.asarray(moved.embed[...]), np.asarray(model.embed[...]), atol=1e-7)


def test_non_dividing_mesh_names_parameter_axis_and_a_mesh_that_works():
    mesh = sh.make_mesh("fsdp=1,tensor=8")  # kv_heads=4 cannot split 8 ways
    with pytest.raises(ValueError) as e:
        sh.init_sharded(factory(), mesh, "generate")
    msg = str(e.value)
    assert msg.startswith("parameter layers.attn.k_")
    assert "(kv_heads=4) is not divisible by mesh axis tensor of size 8" in msg
    assert "a mesh that works: data=2,fsdp=1,tensor=4" in msg
    # The suggestion really works.
    model = sh.init_sharded(factory(), sh.make_mesh("data=2,fsdp=1,tensor=4"), "generate")
    assert model.layers.attn.k_proj[...].addressable_shards[0].data.shape[2] == 1


def test_qwq_32b_on_v5p_style_meshes_checks_without_memory():
    """Rules are checked on the abstract 32B model: no weights are materialised."""
    state = nnx.state(abstract_model(QwenConfig.preset("qwq-32b"), param_dtype="bfloat16"))
    devices = jax.devices()
    ok = sh.state_shardings(state, sh.make_mesh("fsdp=1,tensor=8", devices), "generate")
    assert ok["layers"]["attn"]["k_proj"].get_value().spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    train = sh.state_shardings(state, sh.make_mesh("fsdp=4,tensor=2", devices), "train")
    assert train["embed"].get_value().spec == jax.sharding.PartitionSpec("tensor", "fsdp")
