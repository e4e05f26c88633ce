"""The memory planner against hand arithmetic (every expected number is written out here)."""

import json
import subprocess
import sys

import jax
import pytest

from qwq_jax import QwenConfig
from qwq_jax import plan as planner
from qwq_jax.plan import Topology, best_mesh, get_topology, main, param_bytes, plan
from sharding import make_mesh

GIB = 2**30
TINY = QwenConfig.preset("tiny")  # V 512, E 64, I 160, L 2, H 8, K 4, D 8, untied
QWQ = QwenConfig.preset("qwq-32b")
# QwQ-32B: hidden 5120, 64 layers, 40 heads, 8 KV heads of 128, MLP 27648, vocab 152064, untied.
E, L, H, K, D, I, V = 5120, 64, 40, 8, 128, 27648, 152064


def sizes(data=1, fsdp=1, tensor=1):
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def custom(devices, gib=16.0):
    return get_topology(None, devices=devices, hbm_gib=gib)


# ---- topologies ---------------------------------------------------------------------------------------
def test_topology_table():
    v5p = get_topology("v5p-64")  # v5p-N counts TensorCores: 64 cores = 32 chips (2x4x4), 95 GiB each
    assert (v5p.devices, v5p.hbm_bytes, v5p.aot_name, v5p.chip_config) == (32, 95 * GIB, "v5:2x4x4", "megacore")
    assert get_topology("v5p-8").devices == 4 and get_topology("v4-8").devices == 4
    assert (get_topology("v5e-8").devices, get_topology("v5e-8").hbm_bytes) == (8, 16 * GIB)  # v5e-N counts chips
    assert get_topology("v5e-256").devices == 256 and get_topology("v5e-8").aot_name == "v5e:2x4"
    assert (get_topology("v6e-8").devices, get_topology("v6e-8").hbm_bytes) == (8, 32 * GIB)
    h100 = get_topology("h100x16")
    assert (h100.devices, h100.hbm_bytes, h100.devices_per_host) == (16, 81559 * 2**20, 8)
    assert get_topology("h200x8").hbm_bytes == 143771 * 2**20 and get_topology("a100x8").hbm_bytes == 80 * GIB
    mine = get_topology(None, devices=12, hbm_gib=40)
    assert (mine.devices, mine.hbm_bytes) == (12, 40 * GIB)
    assert get_topology("h100x8", hbm_gib=70).hbm_bytes == 70 * GIB
    with pytest.raises(ValueError, match="unknown topology 'v9-8'"):
        get_topology("v9-8")
    with pytest.raises(ValueError, match="--devices and --hbm-gib"):
        get_topology(None, devices=8)


# ---- parameters -------------------------------------------------------------------------------------------
def test_tiny_param_bytes_by_hand():
    # generate, tensor=4: heads 8/4, kv heads 4/4, mlp 160/4, vocab 512/4 split; embed never split.
    per_layer = (64 * 2 * 8 + 2 * 8       # q_proj [E, H/4, D] + q_bias
                 + 2 * (64 * 1 * 8 + 1 * 8)  # k_proj, v_proj [E, K/4, D] + biases
                 + 2 * 8 * 64               # o_proj [H/4, D, E]
                 + 3 * 64 * 40              # gate, up, down [E, I/4]
                 + 2 * 64)                  # two norm scales, whole
    elems = 2 * per_layer + 2 * 128 * 64 + 64  # layers, embed + lm_head [V/4, E], final norm
    assert elems == 38272
    assert param_bytes(TINY, "generate", sizes(data=2, tensor=4), "bfloat16") == elems * 2
    # train, fsdp=2 x tensor=4: embed also split over fsdp (64/2 = 32).
    per_layer = (32 * 2 * 8 + 2 * 8 + 2 * (32 * 1 * 8 + 1 * 8) + 2 * 8 * 32 + 3 * 32 * 40 + 2 * 32)
    elems = 2 * per_layer + 2 * 128 * 32 + 32
    assert elems == 19168
    assert param_bytes(TINY, "train", sizes(fsdp=2, tensor=4), "float32") == elems * 4


def test_qwq32b_param_bytes_by_hand():
    matrices = E * H * D + 2 * E * K * D + H * D * E + 3 * E * I  # q, k, v, o, gate, up, down per layer
    biases, norms = H * D + 2 * K * D, 2 * E
    total = L * (matrices + biases + norms) + 2 * V * E + E
    assert total == 32_763_876_352  # the published parameter count
    assert param_bytes(QWQ, "generate", sizes(), "bfloat16") == total * 2
    # generate, tensor=8: every matrix and bias split 8 ways, norms whole.
    tp8 = L * (matrices // 8 + biases // 8 + norms) + 2 * V * E // 8 + E
    assert param_bytes(QWQ, "generate", sizes(tensor=8), "bfloat16") == tp8 * 2 == 8_192_124_928
    # train, fsdp=4 x tensor=8: matrices 32 ways, biases 8 (no embed dim), norms 4 (embed only).
    train = L * (matrices // 32 + biases // 8 + norms // 4) + 2 * V * E // 32 + E // 4
    assert param_bytes(QWQ, "train", sizes(fsdp=4, tensor=8), "float32") == train * 4
    assert param_bytes(QWQ, "train", sizes(data=4, tensor=8), "float32") == tp8 * 4  # data replicates


def test_int8_weight_only_param_bytes_by_hand():
    # qwq_jax.quant: the seven matmuls of each layer 1 byte per weight + a float32 scale per output
    # channel (q: H D, k and v: K D each, o: E, gate and up: I each, down: E); the rest in bf16.
    matrices = E * H * D + 2 * E * K * D + H * D * E + 3 * E * I
    scales = H * D + 2 * K * D + E + 2 * I + E
    rest = L * (H * D + 2 * K * D + 2 * E) + 2 * V * E + E  # biases, norms; embed, lm_head, final norm
    one = L * matrices + 4 * L * scales + 2 * rest
    assert one == 34_340_743_168  # 31.98 GiB: QwQ-32B fits one H100 with room for a long cache
    assert param_bytes(QWQ, "generate", sizes(), "bfloat16", "int8") == one
    # tensor=8: matrices, scales and biases split 8 ways (every scale has a head / KV head / MLP
    # axis, except o's and down's, which are over embed: whole), norms whole, vocab split.
    tp8 = (L * matrices // 8 + 4 * L * (H * D // 8 + 2 * K * D // 8 + E + 2 * I // 8 + E)
           + 2 * (L * ((H * D + 2 * K * D) // 8 + 2 * E) + 2 * V * E // 8 + E))
    assert param_bytes(QWQ, "generate", sizes(tensor=8), "bfloat16", "int8") == tp8
    p = plan(QWQ, "generate", "h100x1", 65536, 1, mesh="tensor=1", quantize="int8")
    assert p.phases["generate"]["params"] == one and p.settings["quantize"] == "int8" and p.fits
    assert not plan(QWQ, "generate", "h100x1", 65536, 1, mesh="tensor=1").fits  # bf16 weights: no room
    with pytest.raises(ValueError, match="trains only with LoRA"):
        plan(QWQ, "train", "h100x8", 1024, 8, quantize="int8")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        plan(QWQ, "generate", "h100x8", 1024, 8, quantize="int4")


def test_non_dividing_mesh_is_rejected_with_a_working_one():
    with pytest.raises(ValueError, match=r"kv_heads=8\) is not divisible by mesh axis tensor of size 16 .*"
                                         r"a mesh that works: data=2,fsdp=1,tensor=8"):
        param_bytes(QWQ, "generate", sizes(tensor=16), "bfloat16")
    with pytest.raises(ValueError, match="has 4 devices but 8"):
        plan(QWQ, "generate", "h100x8", 1024, 1, mesh="data=1,tensor=4")


# ---- KV cache, fit ------------------------------------------------------------------------------------------
def test_kv_cache_by_hand():
    # The engine's page pool: b sequences x ceil(seq / 16) pages of 16 tokens, k and v, every layer,
    # KV heads split over `tensor`, replicated over data and fsdp (every decode slot runs everywhere).
    seq = 131072
    one_row = 2 * L * seq * K * D * 2  # k and v, bf16: 32 GiB per sequence
    assert one_row == 32 * GIB
    p = plan(QWQ, "generate", "h100x1", seq, 1, mesh="tensor=1", prefill_chunk=1024)
    assert p.phases["generate"]["kv_cache"] == one_row
    p = plan(QWQ, "generate", "h100x8", seq, 1, mesh="tensor=8", prefill_chunk=1024)
    assert p.phases["generate"]["kv_cache"] == one_row // 8 == 4 * GIB
    # batch 3 on data=2 x tensor=4: one engine per replica (qwq_jax.replicas), each with slots for
    # ceil(3 / 2) = 2 sequences (not padded), KV heads 8 / tensor 4.
    p = plan(QWQ, "generate", "h100x8", seq, 3, mesh="data=2,tensor=4", prefill_chunk=1024)
    assert p.phases["generate"]["kv_cache"] == 2 * L * 2 * seq * (K // 4) * D * 2
    assert p.settings["rows_per_device"] == 2 and p.settings["replicas"] == 2
    assert not any("padded" in n for n in p.notes)
    # Whole pages: 1000 tokens take 63 pages of 16 = 1008 tokens per sequence.
    p = plan(QWQ, "generate", "h100x8", 1000, 2, mesh="tensor=8", prefill_chunk=512)
    assert p.phases["generate"]["kv_cache"] == 2 * L * 2 * 1008 * 1 * D * 2
    # The decode slots' carried state: token counts int32, prompt mask bool [2, V], pending token,
    # tokens generated, lengths int32 [2]; + one decode call's outputs (16 steps of tokens int32 and
    # log-probs float32 per slot).
    assert p.phases["generate"]["logits"] == 2 * (V * (4 + 1) + 3 * 4) + 2 * 16 * (4 + 4)


def test_fits_and_does_not_fit():
    capacity = int(81559 * 2**20 * 0.9)  # H100 as nvidia-smi reports it, 10% headroom
    weights, cache = 32_763_876_352 * 2, 2 * L * 131072 * K * D * 2
    assert weights + cache > capacity  # one H100 cannot hold QwQ-32B and a 131k cache, whatever else
    p = plan(QWQ, "generate", "h100x1", 131072, 1, prefill_chunk=4096)
    assert (p.capacity_bytes, p.mesh, p.fits) == (capacity, sizes(), False)
    assert p.total > weights + cache
    # Eight H100s, tensor=8, one prompt prefilled 4096 tokens at a time (one sequence per call) into
    # its pages. The paged reference attention loops over blocks of 256 keys (16 pages of 16 tokens),
    # whatever the sequence length. One layer's intermediates, per GPU (5 heads, 1 KV head, 3456 MLP
    # columns), bf16 unless noted:
    t, blk = 4096, 256
    act = t * 5120 * 2
    layer = (6 * act                        # x, norm1, o_proj out, x_mid, norm2, down_proj out
             + t * 5 * 128 * 2 + 2 * t * 128 * 2  # q; k and v
             + 2 * 5 * t * blk * 4          # one block's scores and probabilities, float32
             + t * 5 * 128 * 4              # attention output, float32
             + 3 * t * 3456 * 2)            # gate, up, silu*up
    per_call = t * blk + 2 * t * 128 * 4    # one block's mask (bool), rope cos/sin (float32)
    pages = 2 * blk * 128 * 2               # one gathered block of k and v pages (1 KV head)
    p = plan(QWQ, "generate", "h100x8", 131072, 1, mesh="tensor=8", prefill_chunk=4096)
    assert p.phases["generate"]["activations"] == layer + per_call + pages == 401_735_680
    assert p.fits and p.phases["generate"]["kv_cache"] == cache // 8
    assert p.phases["generate"]["logits"] == 5 * V + 12 + 8 * 16
    # Without --prefill-chunk the engine's default, 2048 tokens per call, is planned.
    import inspect

    from qwq_jax.generate import Engine
    assert inspect.signature(Engine).parameters["prefill_chunk"].default == 2048
    assert inspect.signature(Engine).parameters["page_size"].default == 16
    assert plan(QWQ, "generate", "h100x8", 131072, 1, mesh="tensor=8").settings["prefill_chunk"] == 2048
    # Even the whole 131k prompt in one call stays bounded (blockwise), though its activations dominate.
    p = plan(QWQ, "generate", "h100x8", 131072, 1, mesh="tensor=8", prefill_chunk=131072)
    assert p.fits and any("activations dominate the generate phase" in n for n in p.notes)
    assert planner.prefill_key_width(QWQ, 1, 512, 4096) == planner.prefill_key_width() == 256
    # Many slots: one decode step of 256 slots (256 tokens, 256 keys each) outweighs a 64-token
    # prefill call, so it is the activations' count: W(256, 1, 256) + mask + rope + gathered pages.
    b = 256
    step = (6 * b * 5120 * 2 + b * 5 * 128 * 2 + 2 * b * 128 * 2 + 2 * b * 5 * blk * 4 + b * 5 * 128 * 4
            + 3 * b * 3456 * 2) + (b * blk + 2 * b * 128 * 4) + 2 * b * blk * 128 * 2
    p = plan(QWQ, "generate", "h100x8", 4096, b, mesh="tensor=8", prefill_chunk=64)
    assert p.phases["generate"]["activations"] == step
    assert p.phases["generate"]["kv_cache"] == 2 * L * b * 4096 * 1 * D * 2  # 32 GiB: 256 x 4096 tokens


def test_train_categories_by_hand():
    topo = custom(8)
    mesh = "fsdp=2,tensor=4"
    master = 19168 * 4  # tiny, train rules, fsdp=2 x tensor=4 (see test_tiny_param_bytes_by_hand)
    p = plan(TINY, "train", topo, 64, 8, mesh=mesh)
    upd = p.phases["update"]
    assert upd["params"] == master and upd["optimizer"] == 2 * master and upd["gradients"] == master
    assert upd["reference"] == master // 2 and upd["engine_params"] == 38272 * 2  # bf16, generate rules
    # The update's bf16 copy of every weight but the embedding (512 x 64 / 8 devices = 4096 of them).
    assert upd["compute_copy"] == p.phases["logprobs"]["compute_copy"] == (19168 - 512 * 64 // 8) * 2
    assert p.phases["rollout"]["compute_copy"] == 0
    assert plan(TINY, "train", topo, 64, 8, mesh=mesh, compute_copy="micro_batch").phases["update"]["compute_copy"] == 0
    from qwq_jax.rl import grpo
    assert grpo.GRPOConfig().compute_copy == "split" == p.settings["compute_copy"]
    with pytest.raises(ValueError, match="compute_copy must be one of split, step, micro_batch"):
        plan(TINY, "train", topo, 64, 8, mesh=mesh, compute_copy="once")
    # logits, log_softmax, cotangent: 8 rows / (data x fsdp = 2) = 4 rows, vocab 512 / 4.
    assert upd["logits"] == 3 * 4 * 64 * 128 * 4
    # Rollout from the split copy: one engine per replica (fsdp = 2), each with a pool for 4 of the 8
    # sequences, 64 tokens, 4 / 4 KV heads of 8, bf16; its 4 slots' state [4, 512] (logits, counts,
    # prompt mask). From the fp32 masters (sharded over fsdp) one engine runs all 8 on every device.
    assert p.phases["rollout"]["kv_cache"] == 2 * 2 * 4 * 64 * 1 * 8 * 2
    assert p.phases["rollout"]["logits"] == 4 * (5 * 512 + 12) + 8 * 4 * 16
    from_master = plan(TINY, "train", topo, 64, 8, mesh=mesh, rollout_weights="master").phases["rollout"]
    assert from_master["kv_cache"] == 2 * 2 * 8 * 64 * 1 * 8 * 2
    assert from_master["logits"] == 8 * (5 * 512 + 12) + 8 * 8 * 16
    # On data=2 x tensor=4 the masters are replicated over data: one engine per data index, each
    # with 4 of the 8 sequences (as a LoRA base's).
    for kw in ({"rollout_weights": "master"}, {"lora_rank": 2}):
        dp = plan(TINY, "train", topo, 64, 8, mesh="data=2,tensor=4", **kw)
        assert dp.settings["rollout_replicas"] == 2 and dp.settings["rollout_slots_per_device"] == 4
        assert dp.phases["rollout"]["kv_cache"] == 2 * 2 * 4 * 64 * 1 * 8 * 2
    assert p.phases["rollout"]["gradients"] == 0 and upd["kv_cache"] == 0
    assert p.total == max(sum(ph.values()) for ph in p.phases.values())

    p = plan(TINY, "train", topo, 64, 8, mesh=mesh, mu_dtype="bfloat16", reference=False, micro_batches=2)
    upd = p.phases["update"]
    assert upd["optimizer"] == master // 2 + master and upd["reference"] == 0
    assert upd["gradients"] == 2 * master  # accumulator + one micro-batch's
    assert upd["logits"] == 3 * 2 * 64 * 128 * 4  # micro-batch of 4 rows, 2 per device
    # The log-prob pass (GRPOTrainer._prepare) runs per micro-batch too: logits + log_softmax of
    # 2 rows, plus the old / reference log-probs [4 rows, 64] float32 of the whole batch.
    assert p.phases["logprobs"]["logits"] == 2 * 2 * 64 * 128 * 4 + 2 * 4 * 64 * 4
    # Rollouts from the float32 master weights: no engine copy, per-layer cast copies instead.
    p = plan(TINY, "train", topo, 64, 8, mesh=mesh, rollout_weights="master")
    assert p.phases["update"]["engine_params"] == 0 and p.phases["rollout"]["layer_weights"] > 0
    # The default: the bf16 copy, one array per layer (generate rules, see test_tiny_param_bytes_by_hand).
    split = plan(TINY, "train", topo, 64, 8, mesh=mesh, rollout_weights="split").phases["update"]
    assert split["engine_params"] == 38272 * 2 and split == plan(TINY, "train", topo, 64, 8, mesh=mesh).phases["update"]
    with pytest.raises(ValueError, match="rollout_weights must be one of split, master"):
        plan(TINY, "train", topo, 64, 8, mesh=mesh, rollout_weights="copy")
    with pytest.raises(ValueError, match="does not split over the 2 batch shards"):
        plan(TINY, "train", topo, 64, 6, mesh=mesh, micro_batches=2)


def test_lora_train_categories_by_hand():
    """LoRA (rank 2, all seven projections) on the tiny model, fsdp=2 x tensor=4, train rules: only the
    adapters are masters / AdamW state / gradients / reference / engine copy; the base is held once in
    bf16 (or int8 with quantize)."""
    L, E, I, H, K, D, r, f, t = 2, 64, 160, 8, 4, 8, 2, 2, 4
    per_target = {  # A (contracted axes, lora) + B (lora, output axes); embed over fsdp, heads / mlp over tensor
        "q": E * r // f + r * H * D // t, "k": E * r // f + r * K * D // t, "v": E * r // f + r * K * D // t,
        "o": H * D * r // t + r * E // f, "gate": E * r // f + r * I // t, "up": E * r // f + r * I // t,
        "down": I * r // t + r * E // f}
    a = L * sum(per_target.values())
    p = plan(TINY, "train", custom(8), 64, 8, mesh="fsdp=2,tensor=4", lora_rank=2)
    upd = p.phases["update"]
    assert p.settings["lora_adapter_elements"] == a
    assert (upd["params"], upd["optimizer"], upd["gradients"]) == (4 * a, 8 * a, 4 * a)
    assert (upd["reference"], upd["engine_params"], upd["compute_copy"]) == (2 * a, 2 * a, 2 * a)
    assert upd["base"] == 19168 * 2  # the tiny model's train-rules elements per device (above), in bf16
    assert p.phases["rollout"]["base"] == upd["base"] and plan(TINY, "train", custom(8), 64, 8,
                                                                 mesh="fsdp=2,tensor=4").phases["update"]["base"] == 0
    q = plan(TINY, "train", custom(8), 64, 8, mesh="fsdp=2,tensor=4", lora_rank=2, quantize="int8")
    assert q.phases["update"]["base"] == param_bytes(TINY, "train", {"data": 1, "fsdp": 2, "tensor": 4}, "bfloat16",
                                                     "int8") < upd["base"]
    assert "rank 2" in planner.format_plan(q)
    with pytest.raises(ValueError, match="trains only with LoRA"):
        plan(TINY, "train", custom(8), 64, 8, mesh="fsdp=2,tensor=4", quantize="int8")
    with pytest.raises(ValueError, match="lora_rank is for training"):
        plan(TINY, "generate", custom(8), 64, 8, lora_rank=2)


def test_full_remat_saves_one_activation_per_layer():
    # With remat "full" each extra layer adds exactly its saved input [rows, seq, hidden] in bf16.
    topo, mesh = custom(8), "fsdp=2,tensor=4"
    two = plan(TINY, "train", topo, 64, 8, mesh=mesh).phases["update"]["activations"]
    four = plan(TINY.replace(num_layers=4), "train", topo, 64, 8, mesh=mesh).phases["update"]["activations"]
    assert four - two == 2 * (4 * 64 * 64 * 2)
    acts = {r: plan(TINY, "train", topo, 64, 8, mesh=mesh, remat=r).phases["update"]["activations"]
            for r in ("full", "dots_with_no_batch_dims_saveable", "dots_saveable", "none")}
    assert acts["full"] < acts["dots_with_no_batch_dims_saveable"] < acts["dots_saveable"] < acts["none"]


# ---- mesh search -----------------------------------------------------------------------------------------------
def test_best_mesh_is_the_lowest_and_fits_when_one_does():
    kw = dict(prefill_chunk=2048)
    best = best_mesh(QWQ, "generate", "h100x8", 32768, 1, **kw)
    assert best.fits and best.mesh == sizes(tensor=8)
    assert not plan(QWQ, "generate", "h100x8", 65536, 1, mesh="fsdp=8", **kw).fits  # weights whole per GPU
    totals = []
    for cand in planner.mesh_candidates(8):
        try:
            totals.append(plan(QWQ, "generate", "h100x8", 32768, 1, mesh=cand, **kw).total)
        except ValueError:
            pass
    assert best.total == min(totals)

    best = best_mesh(QWQ, "train", "v5p-64", 8192, 8)
    assert best.fits and 8 % (best.mesh["data"] * best.mesh["fsdp"]) == 0
    assert K % best.mesh["tensor"] == 0
    assert plan(QWQ, "train", "v5p-64", 8192, 8).mesh == best.mesh  # mesh=None plans on the best mesh


def test_best_mesh_keeps_tensor_within_a_gpu_host():
    best = best_mesh(TINY, "generate", "h100x16", 256, 16)
    assert best.mesh["tensor"] <= 8
    with pytest.raises(ValueError, match="no data x fsdp x tensor mesh"):
        best_mesh(QWQ, "train", "h100x16", 1024, 1)  # one row: data x fsdp = 1, so tensor = 16 > 8


# ---- AOT --------------------------------------------------------------------------------------------------------
def test_aot_without_libtpu_says_so(monkeypatch):
    monkeypatch.setattr(planner, "_libtpu_available", lambda: False)
    p = plan(TINY, "generate", "v5e-8", 64, 8, mesh="tensor=4,data=2", aot=True)
    assert p.method == "analytic" and any("libtpu is not installed" in n for n in p.notes)
    monkeypatch.setattr(planner, "_cuda_plugin_available", lambda: False)
    p = plan(TINY, "generate", "h100x8", 64, 8, mesh="tensor=4,data=2", aot=True)
    assert p.method == "analytic" and any("CUDA plugin is not installed" in n for n in p.notes)
    p = plan(TINY, "generate", "a100x8", 64, 8, mesh="tensor=4,data=2", aot=True)
    assert p.method == "analytic" and any("no GPU target description for a100x8" in n for n in p.notes)
    assert get_topology("h100x16").gpu_target == "h100" and get_topology("h200x8").gpu_target == "h200"
    for name in ("h100", "h200"):  # the target descriptions the GPU path hands to the compiler
        text = (planner.GPU_TARGETS_DIR / f"{name}.txtpb").read_text()
        memory = get_topology(name + "x1").hbm_bytes
        assert "cuda_compute_capability" in text and f"device_memory_size: {memory}" in text


@pytest.mark.slow  # three plans compiled by libtpu (about 15-30 s on 2 cores)
def test_aot_compiles_with_the_real_tpu_compiler():
    # libtpu compiles for a TPU topology on this CPU host (no TPU): `pip install "jax[tpu]==<jax version>"`.
    assert planner._libtpu_available(), f'libtpu is missing: pip install "jax[tpu]=={jax.__version__}"'
    # Head dim 128, hidden 256: TPU tiles (8 x 128) fit the weights and the cache without padding.
    cfg = TINY.replace(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, head_dim=128,
                       vocab_size=1024)
    p = plan(cfg, "generate", "v5e-4", 256, 2, mesh="data=2,tensor=2", prefill_chunk=64, aot=True)
    assert p.method == "aot-tpu", p.notes
    programs = p.aot["programs"]
    assert set(programs) == {"prefill", "decode"} and p.aot["program"] in programs
    # Per device: bf16 weights under tensor=2 (q [256, 2, 128] + bias, k and v [256, 1, 128] + biases,
    # o [2, 128, 256], gate / up / down [256, 256], two norms; embed and lm_head [1024 / 2, 256], final
    # norm) and one replica's page pool (data = 2: one engine per replica, each with one of the 2
    # sequences) for 1 sequence of 256 tokens (16 pages of 16): k and v [2 layers, 1 KV head, 16
    # pages, 16, 128] bf16.
    per_layer = 256 * 2 * 128 + 2 * 128 + 2 * (256 * 128 + 128) + 2 * 128 * 256 + 3 * 256 * 256 + 2 * 256
    weights = (2 * per_layer + 2 * 512 * 256 + 256) * 2
    cache = 2 * (2 * 1 * 16 * 16 * 128 * 2)
    state = 1 * (1024 * (4 + 1) + 3 * 4)  # the slot's token counts, prompt mask [1, 1024]; 3 ints
    assert p.phases["generate"]["params"] == weights and p.phases["generate"]["kv_cache"] == cache
    # The prefill takes every weight (it computes its last token's logits: final norm and lm_head too),
    # the pool, and small arrays (one row's tokens [1, 64], start, length, page table [1, 16], rope
    # tables); the decode also the slot state and the slots' small inputs (flags, counts, lengths,
    # seeds, stop ids, 7 sampling parameters, rope tables, page tables [1, 16], the step count). The
    # TPU pads each small array to its tiles (at most 4 KiB each here, the state's rows to 8 or 32).
    # While a prefill runs, the slot state stays on the device: its `extra`.
    assert p.aot["extra"] == (state if p.aot["program"] == "prefill" else 0)
    for name, fixed in (("prefill", weights + cache), ("decode", weights + cache + state)):
        assert fixed < programs[name]["argument"] < fixed + 4 * state + 16 * 4096, (name, programs)
        assert programs[name]["temp"] > 0
    assert p.total == max(programs["prefill"]["peak"] + state, programs["decode"]["peak"]) and p.fits
    # Training: the trainer's update and its rollout engine's programs, with what each does not hold.
    t = plan(TINY, "train", "v5e-4", 64, 4, mesh="fsdp=2,tensor=2", micro_batches=2, aot=True)
    assert t.method == "aot-tpu", t.notes
    assert set(t.aot["programs"]) == {"update", "prefill", "decode"}
    upd = t.phases["update"]
    assert t.aot["programs"]["update"]["argument"] >= upd["params"] + upd["optimizer"]  # masters + AdamW, donated
    assert t.aot["programs"]["update"]["alias"] >= upd["params"] + upd["optimizer"]
    extra = {"update": upd["reference"] + upd["engine_params"],
             "decode": upd["params"] + upd["optimizer"] + upd["reference"]}
    extra["prefill"] = extra["decode"] + 2 * (5 * 512 + 12)  # + a replica's 2 rollout slots' state (V = 512)
    assert t.total == max(m["peak"] + extra[n] for n, m in t.aot["programs"].items())
    assert t.aot["extra"] == extra[t.aot["program"]]
    # LoRA on an int8 base: the trainer of the adapters alone (their masters and AdamW state donated to
    # the update), the frozen base an argument it does not donate, the rollout engine on base + adapters.
    q = plan(TINY, "train", "v5e-4", 64, 4, mesh="fsdp=2,tensor=2", micro_batches=2, aot=True, lora_rank=8,
             quantize="int8")
    assert q.method == "aot-tpu", q.notes
    assert set(q.aot["programs"]) == {"update", "prefill", "decode"}
    upd, compiled = q.phases["update"], q.aot["programs"]["update"]
    assert compiled["alias"] >= upd["params"] + upd["optimizer"]
    assert compiled["argument"] - compiled["alias"] >= upd["base"]
    assert compiled["argument"] < t.aot["programs"]["update"]["argument"]  # adapters, not full masters + AdamW
    lora_extra = {"update": upd["reference"] + upd["engine_params"],
                  "decode": upd["params"] + upd["optimizer"] + upd["reference"]}
    lora_extra["prefill"] = lora_extra["decode"] + 4 * (5 * 512 + 12)
    assert q.total == max(m["peak"] + lora_extra[n] for n, m in q.aot["programs"].items())


def test_aot_gpu_path_compiles_on_cpu_devices(monkeypatch):
    # The GPU path (JAX's CUDA plugin's compile-only devices) with CPU devices standing in.
    monkeypatch.setattr(planner, "_cuda_plugin_available", lambda: True)
    monkeypatch.setattr(planner, "_gpu_mesh", lambda topo, s: make_mesh(s, jax.devices()[:2]))
    # --attention flash compiles the model's "auto" backend, chosen for the mesh's devices
    # (qwq_jax.attention.compile_for: cuDNN for an H100's compile-only devices, xla for these CPUs).
    backends = []
    placed = planner.placed_abstract_model
    monkeypatch.setattr(planner, "placed_abstract_model",
                        lambda *a, **kw: (backends.append(kw["attention_backend"]), placed(*a, **kw))[1])
    topo = Topology("fake-gpu", "gpu", 2, 16 * GIB, devices_per_host=2, gpu_target="h100")
    p = plan(TINY, "generate", topo, 64, 2, mesh="tensor=2", prefill_chunk=16, aot=True, attention="flash",
             quantize="int8")
    assert p.method == "aot-gpu", p.notes
    assert backends == ["auto"] and any(n.startswith("AOT: fake-gpu (h100) compiler peaks") for n in p.notes)
    # The engine's prefill takes, per device: the int8 weights (the analytic count; the output head
    # included: it computes its last token's logits), the page pool for 2 sequences of 64 tokens
    # (2 x 4 pages of 16): k and v [2 layers, 4/2 KV heads, 8 pages, 16, 8] bf16; one row's tokens
    # [1, 16], start [1], length [1] and page table [1, 4] int32, rope frequencies [1, 1, 4] and
    # factor [1, 1, 1] float32.
    cache = 2 * (2 * 2 * 8 * 16 * 8 * 2)
    small = 16 * 4 + 4 + 4 + 4 * 4 + 4 * 4 + 4
    params = p.phases["generate"]["params"]
    assert p.phases["generate"]["kv_cache"] == cache
    assert p.aot["programs"]["prefill"]["argument"] == params + cache + small
    # The decode: also the 2 slots' state (int32 counts and bool prompt mask [2, 512]; pending token,
    # tokens generated, length [2] int32) and their inputs: active [2] bool; max_tokens, seeds [2]
    # 4-byte; stop ids [2, 8]; 7 sampling parameters [2]; rope [2, 1, 4], [2, 1, 1] float32; page
    # tables [2, 4]; the step count (XLA's CPU compiler adds a few bytes of its own: at most 64).
    state = 2 * (512 * 5 + 3 * 4)
    slots = 2 + 2 * 2 * 4 + 2 * 8 * 4 + 7 * 2 * 4 + 2 * 4 * 4 + 2 * 4 + 2 * 4 * 4 + 4
    assert 0 <= p.aot["programs"]["decode"]["argument"] - (params + cache + state + slots) <= 64
    assert p.aot["extra"] == (state if p.aot["program"] == "prefill" else 0)
    assert p.phases["generate"]["params"] < param_bytes(TINY, "generate", sizes(tensor=2), "bfloat16")


# ---- CLI --------------------------------------------------------------------------------------------------------
def test_cli_json():
    out = subprocess.run([sys.executable, "-m", "qwq_jax.plan", "--preset", "qwq-32b", "--task", "generate",
                          "--topology", "h100x8", "--seq", "131072", "--batch", "1", "--prefill-chunk", "4096",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    p = json.loads(lines[0])
    assert p["mesh_spec"] == "data=1,fsdp=1,tensor=8" and p["fits"] is True and p["method"] == "analytic"
    assert p["categories"]["kv_cache"] == 4 * GIB and p["best_mesh"]["mesh_spec"] == p["mesh_spec"]
    assert p["total"] == sum(p["categories"].values()) and p["capacity_bytes"] == int(81559 * 2**20 * 0.9)


def test_cli_bad_topology_exits_2():
    out = subprocess.run([sys.executable, "-m", "qwq_jax.plan", "--topology", "v9-8"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "unknown topology 'v9-8'" in out.stderr and "Traceback" not in out.stderr


def test_cli_table_and_bad_input(capsys):
    assert main(["--preset", "qwq-32b", "--task", "train", "--topology", "v5p-64", "--seq", "8192",
                 "--batch", "8", "--no-aot"]) == 0
    text = capsys.readouterr().out
    for want in ("GiB per device", "optimizer", "verdict: FITS", "best mesh: data=1,fsdp=4,tensor=8", "summary:"):
        assert want in text
    assert main(["--topology", "h100x1", "--seq", "32768", "--quantize", "int8"]) == 0
    text = capsys.readouterr().out
    assert "31.98   weights (int8 weight-only matmuls, the rest bfloat16)" in text and "verdict: FITS" in text
    for argv, msg in [(["--preset", "qwq-99b", "--topology", "v5e-8"], "unknown preset 'qwq-99b'"),
                      (["--topology", "h100x16", "--mesh", "tensor=16"], "not divisible"),
                      (["--topology", "h100x8", "--task", "train", "--batch", "4", "--mesh", "fsdp=8"],
                       "does not split"),
                      (["--topology", "h100x8", "--seq", "0"], "seq must be >= 1"),
                      (["--topology", "h100x8", "--task", "train", "--quantize", "int8"], "trains only with LoRA")]:
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err
