"""python -m convert: HF -> Orbax -> qwq_jax.load / export-hf, multi-process, and every bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM

import sharding as sh
from convert.__main__ import main as convert_main
from convert.hf import HFSource
from convert.safetensors_io import SafetensorsFile
from convert.synthetic import write_random_hf_checkpoint
from helpers import hf_logits, hf_model
from qwq_jax import QwenConfig, forward, load
from qwq_jax.checkpoint import param_shardings, restore_params, stored_layers

pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)

ROOT = Path(__file__).resolve().parents[1]
TOKENS = np.random.default_rng(0).integers(0, 512, (2, 130)).astype(np.int32)


def hf_dir(tmp_path_factory, preset, *, sharded=False, dtype=torch.float32, seed=0):
    model = hf_model(QwenConfig.preset(preset), seed=seed)
    path = tmp_path_factory.mktemp(f"{preset}-{'sharded' if sharded else 'single'}-{str(dtype)[6:]}")
    model.to(dtype).save_pretrained(path, max_shard_size="150KB" if sharded else "5GB")
    return path, model.float()


def all_tensors(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        st = SafetensorsFile(f)
        out.update({name: st.read(name) for name in st.tensors})
    return out


def run_cli(*args, env=None, timeout=300):
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, env=e,
                          timeout=timeout)


@pytest.mark.parametrize("preset", ["tiny", "tiny-tied"])
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_to_orbax_to_load_matches_hf_logits(tmp_path_factory, tmp_path, preset, sharded):
    src, ref = hf_dir(tmp_path_factory, preset, sharded=sharded)
    if sharded:
        assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 1
    assert convert_main(["hf", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    out = tmp_path / "out"
    for name in ("config.json", "generation_config.json"):
        assert (out / name).is_file()
    model = load(out)
    assert model.config == QwenConfig.preset(preset).replace(bos_token_id=model.config.bos_token_id,
                                                             eos_token_id=model.config.eos_token_id)
    err = np.abs(np.asarray(forward(model, jnp.asarray(TOKENS))) - hf_logits(ref, TOKENS)).max()
    print(f"{preset} {'sharded' if sharded else 'single'}: max |dlogit| = {err:.2e}")
    assert err <= 1e-4


def test_restore_onto_2x4_mesh_equals_unsharded(tmp_path_factory, tmp_path):
    src, _ = hf_dir(tmp_path_factory, "tiny", seed=1)
    assert convert_main(["hf", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    assert stored_layers(tmp_path / "out") == 2  # one subtree per layer on disk
    want = np.asarray(forward(load(tmp_path / "out"), jnp.asarray(TOKENS)))
    two = sh.make_mesh("fsdp=2", devices=jax.devices()[:2])
    model = load(tmp_path / "out", mesh=two, rules="train")
    assert len(model.layers.mlp.up_proj[...].sharding.device_set) == 2
    got = forward(model, sh.put_global(TOKENS, sh.batch_sharding(two, "train")))
    assert np.abs(np.asarray(got) - want).max() <= 1e-5
    for rules in ("generate", "train"):
        mesh = sh.make_mesh("fsdp=2,tensor=4")
        model = load(tmp_path / "out", mesh=mesh, rules=rules)
        up = model.layers.mlp.up_proj[...]
        assert len(up.sharding.device_set) == 8 and up.addressable_shards[0].data.shape[2] == 160 // 4
        got = forward(model, sh.put_global(TOKENS, sh.batch_sharding(mesh, rules)))
        assert np.abs(np.asarray(got) - want).max() <= 1e-5


def test_stacked_layers_filled_on_host_or_on_device_are_the_same(tmp_path_factory, tmp_path, monkeypatch):
    """The CPU backend assembles stacked layers in host buffers; other backends fill them on the devices a
    layer at a time. Forced down the second path here, both give the same arrays bit for bit, on one
    device and on a 2x4 mesh (both rule sets), cast to float32 on the way from bfloat16."""
    from qwq_jax import checkpoint

    src, _ = hf_dir(tmp_path_factory, "tiny", dtype=torch.bfloat16, seed=3)
    assert convert_main(["hf", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    cfg = checkpoint.read_config(tmp_path / "out")
    mesh = sh.make_mesh("fsdp=2,tensor=4")
    for target_mesh, rules in ((None, "generate"), (mesh, "generate"), (mesh, "train")):
        target = param_shardings(cfg, target_mesh, rules, "float32")
        got = {}
        for on_host in (True, False):
            monkeypatch.setattr(checkpoint, "_in_host_memory", lambda devices, v=on_host: v)
            got[on_host] = jax.tree.leaves(restore_params(tmp_path / "out", target))
        for a, b, want in zip(got[True], got[False], jax.tree.leaves(target)):
            assert a.sharding.is_equivalent_to(want.sharding, a.ndim) and a.dtype == b.dtype == jnp.float32
            assert b.sharding.is_equivalent_to(want.sharding, b.ndim)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("preset,dtype", [("tiny", torch.float32), ("tiny", torch.bfloat16),
                                          ("tiny-tied", torch.bfloat16)])
def test_export_hf_is_bit_identical_and_loads_in_transformers(tmp_path_factory, tmp_path, preset, dtype):
    src, ref = hf_dir(tmp_path_factory, preset, sharded=True, dtype=dtype, seed=2)
    out, exp = tmp_path / "out", tmp_path / "exported"
    assert convert_main(["hf", str(src), str(out), "--quiet"]) == 0  # keeps the source dtype
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(dtype)[6:]
    assert convert_main(["export-hf", str(out), str(exp), "--max-shard-size", "100KB", "--quiet"]) == 0
    assert (exp / "model.safetensors.index.json").is_file()
    source, exported = all_tensors(src), all_tensors(exp)
    assert set(source) == set(exported)
    for name, x in source.items():
        assert exported[name].dtype == x.dtype and exported[name].shape == x.shape, name
        np.testing.assert_array_equal(exported[name].view(np.uint8), x.view(np.uint8), err_msg=name)
    back = Qwen2ForCausalLM.from_pretrained(exp, dtype=torch.float32, attn_implementation="eager")
    ref = Qwen2ForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    np.testing.assert_array_equal(hf_logits(back, TOKENS), hf_logits(ref, TOKENS))


def test_dtype_flag_upcasts_exactly(tmp_path_factory, tmp_path):
    src, _ = hf_dir(tmp_path_factory, "tiny-tied", dtype=torch.bfloat16, seed=3)
    assert convert_main(["hf", str(src), str(tmp_path / "out"), "--dtype", "float32", "--quiet"]) == 0
    model = load(tmp_path / "out")
    assert model.embed[...].dtype == jnp.float32
    source = all_tensors(src)
    np.testing.assert_array_equal(np.asarray(model.embed[...]), source["model.embed_tokens.weight"].astype(np.float32))
    # And a bf16 restore of the fp32 checkpoint casts on the way in.
    assert load(tmp_path / "out", dtype="bfloat16").embed[...].dtype == jnp.bfloat16


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_convert_like_one(tmp_path):
    cfg = QwenConfig.preset("tiny").replace(num_layers=8)
    src = write_random_hf_checkpoint(cfg, tmp_path / "src", dtype="bfloat16", max_shard_bytes=200_000)
    assert convert_main(["hf", str(src), str(tmp_path / "single"), "--quiet"]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "QWQ_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "convert", "hf", str(src), str(tmp_path / "multi"), "--quiet",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=dict(env, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert "converted" in outs[0] and "converted" not in outs[1]  # only process 0 reports
    target = param_shardings(cfg, None, dtype="bfloat16")
    single, multi = restore_params(tmp_path / "single", target), restore_params(tmp_path / "multi", target)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_stacked_layout_of_earlier_versions_still_loads(tmp_path_factory, tmp_path):
    """Checkpoints written before the per-layer layout (layers stacked on disk) restore as before."""
    import orbax.checkpoint.experimental.v1 as ocp

    src, _ = hf_dir(tmp_path_factory, "tiny", seed=4)
    assert convert_main(["hf", str(src), str(tmp_path / "new"), "--quiet"]) == 0
    target = param_shardings(QwenConfig.preset("tiny"), None, dtype="float32")
    params = restore_params(tmp_path / "new", target)
    ocp.save(tmp_path / "old", params)  # what the converter wrote before: one stacked array per parameter
    (tmp_path / "old" / "config.json").write_bytes((tmp_path / "new" / "config.json").read_bytes())
    assert stored_layers(tmp_path / "old") is None
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restore_params(tmp_path / "old", target))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mesh = sh.make_mesh("fsdp=2,tensor=4")
    got = forward(load(tmp_path / "old", mesh=mesh), sh.put_global(TOKENS, sh.batch_sharding(mesh, "generate")))
    want = forward(load(tmp_path / "new", mesh=mesh), sh.put_global(TOKENS, sh.batch_sharding(mesh, "generate")))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


_RSS_CHILD = """
import json, sys
import jax
from convert.hf import HFSource, convert_source
jax.devices()
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
idle = kib("VmRSS")
convert_source(HFSource(sys.argv[1]), sys.argv[2], progress=False, group_bytes=int(sys.argv[3]))
print(json.dumps({"above": (kib("VmHWM") - idle) * 1024}))
"""


@pytest.mark.slow
def test_peak_memory_flat_in_depth(tmp_path):
    """Converting 48 layers instead of 12 (same layer size, 4x the bytes; each in a fresh process, peak =
    the kernel's high-water mark VmHWM, exact) raises the peak by under a quarter of the 36 layers' bytes
    (a converter holding the model would add all of them; per-array bookkeeping adds ~10 MiB here), and
    each peak stays within 1 GiB + 2x the largest tensor."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    group = 24 * 2**20  # per partial save (the default is 256 MiB; these models are smaller than that)
    procs, largest, total = {}, {}, {}
    for layers in (12, 48):  # both children at once: each measures only itself
        cfg = QwenConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=layers, num_heads=8,
                         num_kv_heads=2, head_dim=64, dtype="bfloat16")
        src = write_random_hf_checkpoint(cfg, tmp_path / f"src{layers}", dtype="bfloat16")
        source = HFSource(src)
        largest[layers] = max(source.nbytes(n) for n in source.names())
        total[layers] = sum(source.nbytes(n) for n in source.names())
        procs[layers] = subprocess.Popen([sys.executable, "-c", _RSS_CHILD, str(src), str(tmp_path / f"out{layers}"),
                                          str(group)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=env)
    above = {}
    for layers, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        above[layers] = json.loads(out.strip().splitlines()[-1])["above"]
        assert above[layers] <= 2**30 + 2 * largest[layers]
    print({k: f"{v / 2**20:.0f} MiB" for k, v in above.items()})
    assert above[48] - above[12] < 0.25 * (total[48] - total[12]), (above, total)


_RESTORE_CHILD = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
import tensorstore
import qwq_jax
import sharding as sh
from flax import nnx
jax.devices()
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
idle = kib("VmRSS")
model = qwq_jax.load(sys.argv[1], mesh=sh.make_mesh("fsdp=8"), rules="train", quant=(sys.argv[2:] or [None])[0])
held = sum(s.data.nbytes for x in jax.tree.leaves(nnx.state(model)) for s in x.addressable_shards)
print(json.dumps({"above": (kib("VmHWM") - idle) * 1024, "held": held}))
"""


@pytest.mark.slow
def test_restore_holds_the_device_shards_plus_one_layer(tmp_path):
    """`qwq_jax.load` onto 8 devices (fsdp, each holding an eighth) peaks at what the devices hold plus at
    most one layer and a fixed 128 MiB (the runtime's and TensorStore's own), with 8 layers and with 32, and
    the same above the shards for both: the Orbax restore this replaced (a group of layers per call, two
    copies of what it read) failed both (146 MiB above the shards with 8 layers).
    Fresh processes, peak = the kernel's high-water mark VmHWM above the idle process (exact)."""
    from convert.hf import convert_source

    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    extra = {}
    for layers in (8, 32):
        cfg = QwenConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=layers, num_heads=8,
                         num_kv_heads=2, head_dim=64, dtype="bfloat16")
        src = write_random_hf_checkpoint(cfg, tmp_path / f"src{layers}", dtype="bfloat16")
        layer_bytes = sum(HFSource(src).nbytes(n) for n in HFSource(src).names() if ".layers.0." in n)
        convert_source(HFSource(src), tmp_path / f"out{layers}", progress=False)
        proc = subprocess.run([sys.executable, "-c", _RESTORE_CHILD, str(tmp_path / f"out{layers}")],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        extra[layers] = got["above"] - got["held"]
        assert got["held"] >= 0.95 * sum(HFSource(src).nbytes(n) for n in HFSource(src).names())
        assert extra[layers] <= layer_bytes + 128 * 2**20, (layers, got, layer_bytes)
    print({k: f"{v / 2**20:.0f} MiB above the shards" for k, v in extra.items()})
    assert abs(extra[32] - extra[8]) < 24 * layer_bytes / 4, (extra, layer_bytes)

    # quant="int8": the layers' matmul weights quantized as they are read, never the float model held.
    # Above the int8 model: ~100 MiB with 8 layers (compiling the quantizer, once per process), growing by
    # less than half of the 24 more layers' float weights (measured: 105 and 145 MiB); quantizing after a
    # float restore held the whole float model beside it (32 layers: 228 MiB above).
    int8 = {}
    for layers in (8, 32):
        proc = subprocess.run([sys.executable, "-c", _RESTORE_CHILD, str(tmp_path / f"out{layers}"), "int8"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        int8[layers] = got["above"] - got["held"]
    print({k: f"int8: {v / 2**20:.0f} MiB above the shards" for k, v in int8.items()})
    assert int8[32] - int8[8] < 24 * layer_bytes / 2, (int8, layer_bytes)


# ---- bad input: exit 1, one line naming the problem, OUT absent or untouched ----------------

def _assert_fails(args, capsys, message, out: Path | None = None, before: dict | None = None):
    code = convert_main(args)
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("python -m convert: error: "), err
    assert message in err, err
    if out is not None:
        if before is None:
            assert not out.exists()
        else:
            assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
        assert not list(out.parent.glob(out.name + ".*")), list(out.parent.glob(out.name + ".*"))


@pytest.fixture
def good_src(tmp_path):
    return write_random_hf_checkpoint(QwenConfig.preset("tiny"), tmp_path / "src", dtype="float32",
                                      max_shard_bytes=150_000)


def test_bad_source_directories(tmp_path, capsys):
    out = tmp_path / "out"
    _assert_fails(["hf", str(tmp_path / "nope"), str(out)], capsys, "nope: no such directory", out)
    (tmp_path / "empty").mkdir()
    _assert_fails(["hf", str(tmp_path / "empty"), str(out)], capsys, "empty: no config.json", out)


def test_missing_shard(good_src, tmp_path, capsys):
    shard = sorted(good_src.glob("*.safetensors"))[1]
    shard.unlink()
    _assert_fails(["hf", str(good_src), str(tmp_path / "out")], capsys,
                  f"{shard.name}: shard named in model.safetensors.index.json is missing", tmp_path / "out")


def test_truncated_safetensors(good_src, tmp_path, capsys):
    shard = sorted(good_src.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    _assert_fails(["hf", str(good_src), str(tmp_path / "out")], capsys,
                  f"{shard.name}: truncated safetensors file", tmp_path / "out")


def test_shape_disagrees_with_config(good_src, tmp_path, capsys):
    cfg = json.loads((good_src / "config.json").read_text())
    (good_src / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=128)))
    _assert_fails(["hf", str(good_src), str(tmp_path / "out")], capsys,
                  "tensor model.layers.0.mlp.gate_proj.weight has shape (160, 64), config.json implies (128, 64)",
                  tmp_path / "out")


def test_missing_and_unexpected_tensor_names(good_src, tmp_path, capsys):
    cfg = json.loads((good_src / "config.json").read_text())
    (good_src / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    _assert_fails(["hf", str(good_src), str(tmp_path / "out")], capsys,
                  "missing tensors (12): model.layers.2.input_layernorm.weight", tmp_path / "out")
    (good_src / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    _assert_fails(["hf", str(good_src), str(tmp_path / "out")], capsys,
                  "unexpected tensors (12): model.layers.1.input_layernorm.weight", tmp_path / "out")


def test_unsupported_architecture(good_src, tmp_path, capsys):
    cfg = json.loads((good_src / "config.json").read_text())
    (good_src / "config.json").write_text(json.dumps(dict(cfg, model_type="llama",
                                                          architectures=["LlamaForCausalLM"])))
    _assert_fails(["hf", str(good_src), str(tmp_path / "out")], capsys, "model_type='llama' is not supported",
                  tmp_path / "out")


def test_out_exists_without_overwrite_then_with(good_src, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert_main(["hf", str(good_src), str(out), "--quiet"]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _assert_fails(["hf", str(good_src), str(out)], capsys, "already exists (pass --overwrite", out, before)
    assert convert_main(["hf", str(good_src), str(out), "--quiet", "--overwrite"]) == 0
    assert load(out).config.num_layers == 2


def test_usage_errors_exit_2(good_src, tmp_path, capsys):
    """Usage errors in-process through `main` (exit 2, the message on stderr), then one real run of
    the module from the outside: exit 0 and the summary line."""
    def usage_error(*args) -> str:
        try:
            code = convert_main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, err
        return err

    assert "(see python -m convert hf --help)" in usage_error("hf", str(good_src))
    assert "invalid choice: 'int4'" in usage_error("hf", str(good_src), str(tmp_path / "o"), "--dtype", "int4")
    assert "--mesh" in usage_error("hf", str(good_src), str(tmp_path / "o"), "--mesh", "tensor=3")
    assert not (tmp_path / "o").exists()
    r = run_cli("hf", str(good_src), str(tmp_path / "o2"), "--quiet")
    assert r.returncode == 0 and r.stdout.startswith("converted ") and "peak RSS" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True])
def test_killed_mid_write_leaves_out_absent_or_untouched(tmp_path, existing):
    cfg = QwenConfig.preset("tiny").replace(hidden_size=512, intermediate_size=2048, num_heads=8, num_kv_heads=4,
                                            head_dim=64, num_layers=12, vocab_size=4096)
    src = write_random_hf_checkpoint(cfg, tmp_path / "src", dtype="float32")
    out = tmp_path / "out"
    before = None
    if existing:
        r = run_cli("hf", str(write_random_hf_checkpoint(QwenConfig.preset("tiny"), tmp_path / "small")),
                    str(out), "--quiet")
        assert r.returncode == 0, r.stderr
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "convert", "hf", str(src), str(out)] + (["--overwrite"] if existing else [])
    proc = subprocess.Popen(args, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / "out.converting.partial_save"
    deadline = time.time() + 120
    while not staging.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "conversion finished before it could be killed"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if existing:
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
        assert load(out).config.num_layers == 2
    else:
        assert not out.exists()
    # A new run cleans up the stale staging directories and succeeds.
    r = run_cli("hf", str(src), str(out), "--quiet", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert load(out).config.num_layers == 12
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]


def test_arrays_stored_whole_are_read_straight_into_their_buffers(tmp_path):
    """What `qwq_jax.stored` reads with preadv from the OCDBT data files (arrays stored whole, in the
    dtype asked for, contiguous boxes) equals what was saved, bit for bit, and so does what it leaves to
    TensorStore (inline arrays, casts, boxes that are not one run); a damaged shard index or a cut data
    file is an error naming the array."""
    import ml_dtypes

    from convert.hf import _save_context
    from qwq_jax.checkpoint import save_params
    from qwq_jax.stored import NotStored, StoredArrays, _contiguous, aligned_empty, crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720, B.4)
    assert _contiguous((3, 40, 24), ((1, 2), (5, 9), (0, 24))) == ((1 * 40 + 5) * 24, 4 * 24)
    assert _contiguous((3, 40, 24), ((0, 3), (0, 40), (0, 24))) == (0, 3 * 40 * 24)
    assert _contiguous((3, 40, 24), ((0, 2), (5, 9), (0, 24))) is None
    assert _contiguous((3, 40, 24), ((1, 2), (0, 40), (0, 12))) is None

    rng = np.random.default_rng(0)
    saved = {"a": rng.standard_normal((3, 40, 24)).astype(np.float32),
             "b": rng.standard_normal((70, 33)).astype(ml_dtypes.bfloat16),
             "c": rng.integers(-128, 128, 3000).astype(np.int8),
             "tiny": rng.standard_normal(5).astype(np.float32)}  # 20 bytes: stored inline, not in a data file
    def bits(x: np.ndarray) -> np.ndarray:
        return x.view(np.uint8)

    save_params(tmp_path / "zstd", saved)  # Orbax's default: compressed, so all through TensorStore
    arrays = StoredArrays(tmp_path / "zstd" / "state")
    assert arrays._located == {}
    assert all(np.array_equal(bits(arrays.read(name)), bits(want)) for name, want in saved.items())
    assert arrays.direct_reads == 0

    with _save_context():  # uncompressed, as `python -m convert` writes
        save_params(tmp_path / "ck", saved)
    arrays = StoredArrays(tmp_path / "ck" / "state")
    assert sorted(arrays._located) == ["a", "b", "c"]
    for name, want in saved.items():
        assert np.array_equal(bits(arrays.read(name)), bits(want)), name
    assert arrays.direct_reads == 3
    assert np.array_equal(arrays.read("a", dtype=ml_dtypes.bfloat16), saved["a"].astype(ml_dtypes.bfloat16))
    assert arrays.direct_reads == 3  # a cast goes through TensorStore
    store = arrays._open_all({"a": None})["a"]
    for box, direct in ((((1, 2), (5, 9), (0, 24)), True), (((0, 2), (5, 9), (0, 24)), False)):
        out = aligned_empty(tuple(b - a for a, b in box), np.float32)
        before = arrays.direct_reads
        arrays._fill("a", store, out, box).result()
        assert arrays.direct_reads == before + direct
        assert np.array_equal(out, saved["a"][tuple(slice(a, b) for a, b in box)])

    at = arrays._located["a"]
    data = bytearray(at.path.read_bytes())
    data[at.offset + at.length - 5] ^= 1  # a bit of the shard index
    at.path.write_bytes(bytes(data))
    with pytest.raises(NotStored, match=r"cannot read a: its shard index fails its CRC-32C check"):
        StoredArrays(tmp_path / "ck" / "state").read("a")
    with open(at.path, "r+b") as f:
        f.truncate(at.offset + at.length - 10)
    with pytest.raises(NotStored, match=r"cannot read a: .* ends 10 bytes early"):
        StoredArrays(tmp_path / "ck" / "state").read("a")
