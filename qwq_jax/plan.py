"""Memory planner: per-device bytes of generation or GRPO training on a topology, and a mesh that fits.

    python -m qwq_jax.plan --preset qwq-32b --task train --topology v5p-64 --seq 8192 --batch 8
    python -m qwq_jax.plan --preset qwq-32b --task generate --topology h100x8 --seq 131072 --batch 1 --json

    p = plan("qwq-32b", "generate", "h100x8", seq=131072, batch=1)   # mesh=None: the best mesh
    p.fits, p.total, p.mesh, p.phases["generate"]["kv_cache"]

It needs no devices of the target: shard sizes are computed from the abstract model's logical
axes, the task's rules (`sharding.rules.RULES`) and the mesh axis sizes. It can also compile the
task's own programs for the target ahead of time, without its devices, and report the compiler's
numbers (`aot_memory`): the engine's prefill and decode (`Engine.lower_prefill`,
`Engine.lower_decode`) and, for training, the trainer's update (`GRPOTrainer.lower_update` on an
abstract model) -- TPU topologies with `libtpu` installed (`pip install "jax[tpu]"` at this jax
version), H100 / H200 machines with JAX's CUDA plugin (`pip install "jax[cuda12]"`; no GPU or
driver needed; the targets are described in qwq_jax/gpu_targets).

Notation (all per device): r rows of the batch, T tokens per call, S keys attended, L layers,
E hidden, H / K query / KV heads of dim D, I MLP width, V vocabulary, t = mesh `tensor` size,
c = bytes of the compute dtype (bfloat16: 2), b the engine's decode slots (generate: `batch`;
train: `rollout_batch`), N = ceil(seq / page) x page the pool tokens one sequence takes (pages of
`page` = 16 tokens, `qwq_jax.generate.PAGE_SIZE`), B = the reference paged attention's block of
keys (BLOCK_TOKENS = 256 rounded down to whole pages: 256), C the engine's decode steps per call
(16). Training splits its batch rows over `data` x `fsdp`, and so does generation: on a mesh with
data x fsdp = R > 1 replicas the engine is one per replica (`qwq_jax.replicas`), each with its own
page pool and slots for ceil(b / R) of the b sequences, split over `tensor` by KV head -- except
GRPO rollouts decoding from weights sharded over `fsdp` (`rollout_weights="master"`, a LoRA base),
which run one engine per `data` index (R = data), each on its `fsdp` x `tensor` devices with its
pool and slots replicated over `fsdp`. Heads / KV heads / MLP /
vocab are split over `tensor`; activations are assumed to follow (heads / MLP / vocab dims over
`tensor`, hidden dim whole) -- XLA's sharding propagation decides the real layout.

Exact (from the declarations, no approximation):
  params       sum over parameters of prod(dim / mesh axes it maps to) x dtype bytes; a dimension
               the rules leave unmapped (norm scales, biases' head_dim, ...) counts whole. A mesh
               whose axes do not divide a mapped dimension is rejected, as `state_shardings` does.
  kv_cache     the page pool one replica's engine allocates for its s = ceil(b / R) sequences of
               `seq` tokens (num_pages = s x ceil(seq / page)): 2 (k, v) x L x s x N x ceil(K/t) x D
               x c (s = b where one engine runs on the whole mesh); KV heads are split over
               `tensor`, never duplicated (`state_shardings` only accepts a `tensor` that divides K).
  optimizer    AdamW mu (`mu_dtype`) + nu (float32), laid out like the float32 master params.

Counted from the code's arrays, with named approximations:
  W(r,T,S)     one decoder layer's intermediates, summed (an upper bound on its live set):
               x, two norms, residual, o_proj and down_proj outputs 6 r T E c; q r T H/t D c;
               k, v 2 r T K/t D c; attention output r T H/t D 4 (float32); scores +
               probabilities 2 r H/t T S 4 (the `xla` backend materialises both in float32 --
               XLA's CPU compiler kept a third, layout copy in our check; `flash` assumes a
               blockwise kernel and counts 0; the engine's paged attention is always the blockwise
               reference, S = B, whatever `attention` says); gate, up, silu*up 3 r T I/t c. Per
               call also the mask r T S (bool) and rope tables 2 r T D 4.
  generate     params (param_dtype, generate rules) + kv_cache + activations + logits, where
               activations = max(prefill call, decode step):
                 prefill call: ONE sequence's chunk of T = `prefill_chunk` tokens (`Engine`
                 prefills a prompt in calls of `prefill_chunk` tokens, default 2048, so this is
                 min(that, seq)): W(1, T, B) + mask + rope + one block of gathered pages
                 2 B ceil(K/t) D c (the reference attention loops over blocks of B keys);
                 decode step: the replica's s slots, one token each: W(s, 1, B) + mask + rope + the
                 gathered blocks 2 s B ceil(K/t) D c;
               logits: the decode slots' carried state, s (5 V + 12): token counts int32 and prompt
               mask bool [s, V] (V not split, replicated), the pending token, tokens generated and
               lengths int32 [s]; + the decode call's outputs (tokens int32, log-probs float32) 8 s C.
  train        (GRPO, `qwq_jax.rl.grpo.GRPOTrainer`) three phases, each on top of the persistent
               float32 master params and AdamW state (train rules), the frozen reference (compute
               dtype, train rules; `reference=False` for losses without KL) and the rollout
               engine's copy of the weights (`param_dtype`, generate rules: replicated over
               data and fsdp, one array per layer; none with `rollout_weights="master"`):
    rollout    the generate count for b = `rollout_batch` sequences of `rollout_len` tokens (the
               same engines: s = ceil(b / R) slots per replica from the split copy; from the
               master weights or a LoRA base s = ceil(b / data), + layer_weights below).
    logprobs   `_prepare`: forward per micro-batch (as the update), m = batch/(micro_batches x
               shards): W(m,T,T) + mask + rope; logits and log_softmax 2 m T V/t 4, + the
               log-probs of the whole batch r T 4 x 2; layer_weights below.
    update     gradients: float32, 1 copy, 2 with micro_batches > 1 (accumulator + the current
               micro-batch's); the optimizer update is assumed to reuse those buffers.
               activations with m = batch/(micro_batches x shards) rows and remat policy p:
               (L - 1) x saved_p + 2 x W(m,T,T) + mask + rope, i.e. every layer's saved
               residuals plus the current layer's recomputed intermediates and their cotangents,
               where saved_p is x (r T E c) for "full"/"nothing_saveable", all of W for
               "none"/"everything_saveable", the matmul outputs for "dots_saveable" and the
               matmul outputs without batch dimensions (projections) for
               "dots_with_no_batch_dims_saveable". logits: logits, log_softmax and their
               cotangent 3 m T V/t 4 (XLA may fuse one away).
               compute_copy: the compute-dtype copy of every weight but the embedding table
               (train rules), made once per update (`GRPOConfig.compute_copy` "split"/"step";
               0 for "micro_batch"); also held by the log-prob pass.
               layer_weights: the compute-dtype copies of two layers' weights (current and
               prefetched, all-gathered over fsdp) + the lm_head's, + one layer's float32
               gradient before its reduce-scatter.
  Not counted: XLA temporaries beyond these, fragmentation, collectives' buffers, the runtime's
  own reservation -- what `headroom` (default 10% of HBM) is held back for.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp

from qwq_jax.checkpoint import placed_abstract_model
from qwq_jax.config import PRESETS, QwenConfig
from qwq_jax.generate import LAYER_LOOPS, PAGE_SIZE, PREFILL_CHUNK, Engine
from qwq_jax.model import DTYPES, QUANT_MODES, REMAT_POLICIES, abstract_model
from qwq_jax.paged_attention import pages_per_block
from qwq_jax.replicas import replicas_of
from qwq_jax.rl.grpo import COMPUTE_COPIES, ROLLOUT_WEIGHTS, GRPOConfig, GRPOTrainer
from qwq_jax.train import ModelConfig
from sharding.mesh import MESH_AXES, make_mesh, mesh_spec, parse_mesh_spec
from sharding.rules import _as_tuple, _logical_specs, logical_to_mesh, suggest_mesh

GIB = 1024**3
MIB = 1024**2
TASKS = ("generate", "train")
ATTENTION = ("xla", "flash")
DTYPE_BYTES = {name: jnp.dtype(t).itemsize for name, t in DTYPES.items()}
# Weight-only quantization (qwq_jax.quant): bytes per matmul weight element.
QUANT_BYTES = {mode: jnp.dtype(mode).itemsize for mode in QUANT_MODES}
LAYER_LOOP = Engine.__init__.__kwdefaults__["layer_loop"]  # the engine's default
DECODE_CHUNK = Engine.__init__.__kwdefaults__["chunk"]  # decode steps per call, the engine's default
# What each remat policy saves per layer for the backward pass (names of W's terms; see docstring).
_DOTS = ("x", "q", "k", "v", "scores", "attn_out", "o_out", "gate", "up", "down")
_PROJECTIONS = ("x", "q", "k", "v", "o_out", "gate", "up", "down")
REMAT_SAVES: dict[str, tuple[str, ...] | None] = {
    "full": ("x",), "nothing_saveable": ("x",), "none": None, "everything_saveable": None,
    "dots_saveable": _DOTS, "dots_with_no_batch_dims_saveable": _PROJECTIONS}
assert set(REMAT_SAVES) == set(REMAT_POLICIES), "a remat policy of qwq_jax.model without a planner count"


# ---- topologies ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Topology:
    """A machine: `devices` JAX devices (TPU chips / GPUs) of `hbm_bytes` each."""

    name: str
    kind: str                 # "tpu", "gpu" or "custom"
    devices: int
    hbm_bytes: int
    devices_per_host: int | None = None  # GPUs: tensor parallelism stays within a host (NVLink)
    aot_name: str | None = None          # TPU: topology name for `get_topology_desc`
    gpu_target: str | None = None        # GPU: target description in qwq_jax/gpu_targets
    chip_config: str = "default"          # TPU: "megacore" where one device spans 2 TensorCores


def _topologies() -> dict[str, Topology]:
    out: dict[str, Topology] = {}
    # v5e-N / v6e-N count chips (one TensorCore each); 16 / 32 GiB per chip.
    flat = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
    for gen, gib in (("v5e", 16), ("v6e", 32)):
        for n, shape in flat.items():
            out[f"{gen}-{n}"] = Topology(f"{gen}-{n}", "tpu", n, gib * GIB, aot_name=f"{gen}:{shape}")
    # v4-N / v5p-N count TensorCores, two per chip (megacore: one JAX device per chip):
    # v5p-64 is 32 chips, 2x4x4. 32 GiB (v4) / 95 GiB (v5p) per chip.
    cube = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8"}
    for gen, prefix, gib in (("v4", "v4", 32), ("v5p", "v5", 95)):
        for n, shape in cube.items():
            out[f"{gen}-{n}"] = Topology(f"{gen}-{n}", "tpu", n // 2, gib * GIB, aot_name=f"{prefix}:{shape}",
                                         chip_config="megacore")
    # GPUs, 8 per host; capacities as nvidia-smi reports them (H100 80GB: 81559 MiB, 79.6 GiB).
    for gpu, mib in (("h100", 81559), ("h200", 143771), ("a100", 81920)):
        for n in (1, 8, 16, 32, 64):
            out[f"{gpu}x{n}"] = Topology(f"{gpu}x{n}", "gpu", n, mib * MIB, devices_per_host=min(n, 8),
                                         gpu_target=gpu if gpu in ("h100", "h200") else None)
    return out


TOPOLOGIES = _topologies()


MAX_DEVICES = 1 << 16  # past any pod: every mesh of N devices is tried, so N is kept to what exists


def get_topology(name: str | None = None, devices: int | None = None, hbm_gib: float | None = None) -> Topology:
    """A known topology by name (`v5p-64`, `h100x8`, ...), optionally overridden, or a custom one."""
    if name is None:
        if devices is None or hbm_gib is None:
            raise ValueError("give a topology name (e.g. v5p-64, h100x8) or both --devices and --hbm-gib")
        topo = Topology(f"custom-{devices}", "custom", devices, 0)
    elif name in TOPOLOGIES:
        topo = TOPOLOGIES[name]
    else:
        raise ValueError(f"unknown topology {name!r} (known: {', '.join(TOPOLOGIES)}; or give --devices N "
                         "--hbm-gib X)")
    if devices is not None:
        if not 1 <= devices <= MAX_DEVICES:
            raise ValueError(f"--devices must be between 1 and {MAX_DEVICES}, got {devices}")
        if devices != topo.devices:
            topo = dataclasses.replace(topo, devices=devices, aot_name=None,
                                       devices_per_host=min(devices, topo.devices_per_host or devices)
                                       if topo.devices_per_host else None)
    if hbm_gib is not None:
        if not 0 < hbm_gib < 1 << 20:  # nan and inf too
            raise ValueError(f"--hbm-gib must be a positive size in GiB, got {hbm_gib}")
        topo = dataclasses.replace(topo, hbm_bytes=int(hbm_gib * GIB))
    return topo


# ---- parameters: exact per-device counts ----------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _param_table(cfg: Any, quant: str | None = None, lora: Any = None
                 ) -> tuple[Any, tuple[tuple[str, tuple[int, ...], tuple[str | None, ...]], ...]]:
    """(abstract state, ((path, shape, logical axes), ...)) of the model `cfg` declares (with LoRA
    adapters for a `lora.LoraConfig`)."""
    from flax import nnx

    state = nnx.state(abstract_model(cfg, quant=quant, lora=lora))
    return state, tuple(_logical_specs(state))


def _abstract_mesh(sizes: dict[str, int]):
    from jax.sharding import AbstractMesh

    return AbstractMesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def param_elements(cfg: Any, rules: str, sizes: dict[str, int], quant: str | None = None,
                   lora: Any = None) -> dict[str, int]:
    """Elements of each parameter held by one device (path -> count) under `rules` on a mesh of `sizes`
    (of the int8 weight-only model with `quant="int8"`: its matmul weights and their scales; with a
    `lora.LoraConfig`, its adapters too: paths with `_lora_`).

    Raises ValueError, naming the parameter and a mesh that works, when a mesh axis does not divide
    a dimension mapped to it.
    """
    state, table = _param_table(cfg, quant, lora)
    amesh = _abstract_mesh(sizes)
    out = {}
    for path, shape, logical in table:
        spec = logical_to_mesh(logical, amesh, rules)
        n = 1
        for i, (dim, axes) in enumerate(zip(shape, spec)):
            split = math.prod(sizes[a] for a in _as_tuple(axes))
            if dim % split:
                raise ValueError(
                    f"parameter {path}: dimension {i} ({logical[i]}={dim}) is not divisible by mesh axis "
                    f"{'x'.join(_as_tuple(axes))} of size {split} (mesh {mesh_spec(sizes)}); a mesh that "
                    f"works: {suggest_mesh(state, amesh, rules)}")
            n *= dim // split
        out[path] = n
    return out


def param_bytes(cfg: Any, rules: str, sizes: dict[str, int], dtype: str, quant: str | None = None) -> int:
    """Bytes of the parameters one device holds, in `dtype`, under `rules` on a mesh of `sizes`.
    With `quant="int8"` the decoder's matmul weights take 1 byte and their per-channel scales 4
    (`qwq_jax.quant`); the rest stays in `dtype`."""
    if quant is not None and quant not in QUANT_BYTES:
        raise ValueError(f"unknown quantization {quant!r} (known: {', '.join(QUANT_BYTES)})")
    elements = param_elements(cfg, rules, sizes, quant)
    if quant is None:
        return sum(elements.values()) * _itemsize(dtype)
    state, _ = _param_table(cfg, quant)
    int8 = {path for path, leaf in _flat_leaves(state) if str(leaf.dtype) == "int8"}
    return sum(n * (QUANT_BYTES[quant] if path in int8 else 4 if path.endswith("_scale") else _itemsize(dtype))
               for path, n in elements.items())


def _flat_leaves(state: Any) -> list[tuple[str, Any]]:
    from flax import nnx

    return [(".".join(str(k) for k in path), leaf)
            for path, leaf in nnx.to_flat_state(state)]


def _itemsize(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)})")
    return DTYPE_BYTES[dtype]


# ---- activations ------------------------------------------------------------------------------------
def layer_terms(cfg: Any, rows: int, t: int, s: int, tensor: int, c: int, attention: str) -> dict[str, int]:
    """W(r, T, S): one decoder layer's intermediates in bytes, by name (see the module docstring).
    `s` is the key width the scores span: S, or one key block when attention runs blockwise."""
    e, d = cfg.hidden_size, cfg.head_dim
    h, k, i = (-(-n // tensor) for n in (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size))
    act = rows * t * e * c
    scores = rows * h * t * s * 4 if attention == "xla" else 0
    return {"x": act, "norm1": act, "q": rows * t * h * d * c, "k": rows * t * k * d * c,
            "v": rows * t * k * d * c, "scores": scores, "probs": scores, "attn_out": rows * t * h * d * 4,
            "o_out": act, "x_mid": act, "norm2": act, "gate": rows * t * i * c, "up": rows * t * i * c,
            "act": rows * t * i * c, "down": act}


def _per_call(cfg: Any, rows: int, t: int, s: int) -> int:
    """The attention mask (bool) and the rope cos/sin tables (float32) of one call."""
    return rows * t * s + 2 * rows * t * cfg.head_dim * 4


def prefill_key_width(cfg: Any = None, global_rows: int = 1, chunk: int = 1, seq: int = 1,
                      page_size: int = PAGE_SIZE) -> int:
    """Keys the engine's attention scores span per call: one block of the reference paged attention,
    `pages_per_block(page_size)` pages (BLOCK_TOKENS = 256 tokens for 16-token pages), whatever the
    rows, the chunk or the sequence (the loop gathers a fixed block of pages per iteration; the
    other arguments are kept for the old signature and ignored)."""
    return pages_per_block(page_size) * page_size


def pool_tokens(seq: int, page_size: int = PAGE_SIZE) -> int:
    """Pool tokens one sequence of `seq` tokens takes: whole pages."""
    return -(-seq // page_size) * page_size


def replica_slots(sequences: int, replicas: int) -> int:
    """Decode slots on one device: an engine's share of `sequences` run by `replicas` replicas
    (`qwq_jax.replicas.ReplicatedEngine`: `max_num_seqs` counts all of them, each takes its share)."""
    return -(-sequences // replicas)


def _generation(cfg: Any, slots: int, seq: int, chunk: int, tensor: int, c: int) -> dict[str, int]:
    """The engine's page pool, activations (max of a prefill call and a decode step) and slot state
    per device for one engine's `slots` decode slots of `seq` tokens."""
    kv = -(-cfg.num_kv_heads // tensor)
    cache = 2 * cfg.num_layers * slots * pool_tokens(seq) * kv * cfg.head_dim * c
    block = prefill_key_width()

    def call(rows: int, t: int) -> int:  # the paged engine always runs the blockwise reference: "xla"
        w = sum(layer_terms(cfg, rows, t, block, tensor, c, "xla").values())
        return w + _per_call(cfg, rows, t, block) + 2 * rows * block * kv * cfg.head_dim * c

    return {"kv_cache": cache, "activations": max(call(1, chunk), call(slots, 1)),
            "logits": slot_state_bytes(cfg, slots) + 8 * slots * DECODE_CHUNK}


def slot_state_bytes(cfg: Any, slots: int) -> int:
    """The decode slots' carried state (`qwq_jax.programs.SlotState`): token counts int32 and prompt
    mask bool [slots, V], the pending token, tokens generated and lengths int32 [slots]."""
    return slots * (5 * cfg.vocab_size + 12)


# ---- the plan -----------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Per-device memory of one task on one mesh. Byte counts; `phases[p][category]` includes the
    persistent categories (params, optimizer, ...) in every phase; `total` is the peak phase's sum."""

    preset: str
    task: str
    topology: str
    devices: int
    mesh: dict[str, int]
    seq: int
    batch: int
    settings: dict[str, Any]
    phases: dict[str, dict[str, int]]
    peak_phase: str
    total: int
    hbm_bytes: int
    headroom: float
    capacity_bytes: int
    fits: bool
    method: str = "analytic"
    aot: dict[str, Any] | None = None  # the compiled programs' memory (see `_try_aot`)
    notes: list[str] = field(default_factory=list)

    @property
    def categories(self) -> dict[str, int]:
        """Bytes per category at the peak phase."""
        return dict(self.phases[self.peak_phase])

    @property
    def mesh_spec(self) -> str:
        return mesh_spec(self.mesh)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(mesh_spec=self.mesh_spec, categories=self.categories, total_gib=self.total / GIB,
                   capacity_gib=self.capacity_bytes / GIB)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _config(cfg: Any) -> Any:
    return QwenConfig.preset(cfg) if isinstance(cfg, str) else cfg


def _libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _cuda_plugin_available() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ImportError:  # no jax_plugins package at all
        return False


# GPU targets for deviceless compilation (XLA's GpuTargetConfigProto, text), shipped with the package.
GPU_TARGETS_DIR = Path(__file__).resolve().parent / "gpu_targets"


def plan(cfg: Any, task: str, topology: str | Topology, seq: int, batch: int, *, mesh: str | dict | None = None,
         remat: str = ModelConfig.remat, param_dtype: str = "bfloat16", compute_dtype: str = ModelConfig.dtype,
         mu_dtype: str = "float32", reference: bool = True, micro_batches: int = GRPOConfig.micro_batches,
         rollout_batch: int | None = None, rollout_len: int | None = None, prefill_chunk: int | None = None,
         rollout_weights: str = GRPOConfig.rollout_weights, attention: str = "xla", headroom: float = 0.10,
         aot: bool | None = False, quantize: str | None = None, compute_copy: str = GRPOConfig.compute_copy,
         layer_loop: str = LAYER_LOOP, lora_rank: int = 0, lora_targets: Sequence[str] | None = None) -> Plan:
    """Per-device memory of `task` ("generate" or "train") for `cfg` (a QwenConfig or preset name).

    seq: generate: the cache length (prompt + new tokens); train: the row width (prompt +
    completion). batch: generate: rows decoded together; train: completions per update.
    mesh: a spec ("data=1,fsdp=4,tensor=8"; -1 allowed) or axis sizes; None: `best_mesh`'s.
    param_dtype: generate: the weights' dtype; train: the rollout engine's copy (the dtype of the
    model handed to the trainer). rollout_weights (train, as `GRPOConfig.rollout_weights`): "split"
    (default) keeps that copy (one array per layer), "master" decodes from the float32 master
    weights (no copy). layer_loop (generate, as `Engine(layer_loop=...)`): how the compiled
    programs run over the layers (the same bytes in the analytic count). compute_copy (train, as
    `GRPOConfig.compute_copy`): "split" / "step" hold a compute-dtype copy of every weight but the
    embedding table (train rules) through the update, "micro_batch" none. aot: True compiles the
    task's programs for the topology (TPUs: needs libtpu; H100/H200: JAX's CUDA plugin), None does
    so when that is installed, False never (the analytic count only). quantize: "int8" counts the
    int8 weight-only model of `qwq_jax.quant` (the rest of it in param_dtype); for training only
    with LoRA (its frozen base). lora_rank (train): LoRA adapters of that rank on `lora_targets`
    (default all seven projections; `[lora]` of the train config): float32 masters, AdamW state,
    gradients and the reference (the initial adapters) are the adapters' alone, the frozen base is
    held once in the compute dtype (or int8), train rules, and the rollout engine reads it in place.
    """
    cfg = _config(cfg)
    topo = topology if isinstance(topology, Topology) else get_topology(topology)
    _check(task, seq, batch, remat, attention, micro_batches, headroom, quantize, lora_rank)
    if mesh is None:
        best = best_mesh(cfg, task, topo, seq, batch, remat=remat, param_dtype=param_dtype,
                         compute_dtype=compute_dtype, mu_dtype=mu_dtype, reference=reference,
                         micro_batches=micro_batches, rollout_batch=rollout_batch, rollout_len=rollout_len,
                         prefill_chunk=prefill_chunk, rollout_weights=rollout_weights, attention=attention,
                         headroom=headroom, quantize=quantize, compute_copy=compute_copy, layer_loop=layer_loop,
                         lora_rank=lora_rank, lora_targets=lora_targets)
        mesh = best.mesh
    sizes = parse_mesh_spec(mesh, topo.devices)
    rollout_len = seq if rollout_len is None else rollout_len
    chunk = min(PREFILL_CHUNK, seq if task == "generate" else rollout_len) if prefill_chunk is None \
        else prefill_chunk
    rollout_batch = batch if rollout_batch is None else rollout_batch
    for name, value in (("rollout_batch", rollout_batch), ("rollout_len", rollout_len)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    if not 1 <= chunk <= (seq if task == "generate" else rollout_len):
        raise ValueError(f"prefill_chunk={chunk} must be between 1 and the sequence length")
    c, tensor = _itemsize(compute_dtype), sizes["tensor"]
    shards = sizes["data"] * sizes["fsdp"]  # batch shards: training's, and the generation engine's replicas
    L, v = cfg.num_layers, -(-cfg.vocab_size // tensor)
    notes = []
    settings: dict[str, Any] = {"param_dtype": param_dtype, "compute_dtype": compute_dtype, "attention": attention}

    if task == "generate":
        if layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop must be one of {', '.join(LAYER_LOOPS)}, got {layer_loop!r}")
        # One engine per replica (data x fsdp), each with its share of the sequences.
        slots = replica_slots(batch, shards)
        settings.update(prefill_chunk=chunk, rows_per_device=slots, replicas=shards, quantize=quantize,
                        layer_loop=layer_loop)
        phases = {"generate": dict(params=param_bytes(cfg, "generate", sizes, param_dtype, quantize),
                                   **_generation(cfg, slots, seq, chunk, tensor, c))}
    else:
        if batch % micro_batches or (batch // micro_batches) % shards:
            raise ValueError(f"a micro-batch of {batch}/{micro_batches} rows does not split over the {shards} batch "
                             f"shards (data x fsdp) of mesh {mesh_spec(sizes)}")
        rows, mb = batch // shards, batch // micro_batches // shards
        if rollout_weights not in ROLLOUT_WEIGHTS:
            raise ValueError(f"rollout_weights must be one of {', '.join(ROLLOUT_WEIGHTS)}, got {rollout_weights!r}")
        if compute_copy not in COMPUTE_COPIES:
            raise ValueError(f"compute_copy must be one of {', '.join(COMPUTE_COPIES)}, got {compute_copy!r}")
        # The rollouts: one engine per replica (GRPOTrainer._rollout_engine): per (data, fsdp) index
        # decoding from the split copy; per data index from weights split over fsdp (the masters, a
        # LoRA base), each engine on its fsdp x tensor devices.
        replicas = shards if rollout_weights != "master" and not lora_rank else sizes["data"]
        settings.update(remat=remat, mu_dtype=mu_dtype, reference=reference, micro_batches=micro_batches,
                        rollout_batch=rollout_batch, rollout_len=rollout_len, prefill_chunk=chunk,
                        rollout_weights=rollout_weights, compute_copy=compute_copy, rows_per_device=rows,
                        micro_batch_rows_per_device=mb, rollout_replicas=replicas,
                        rollout_slots_per_device=replica_slots(rollout_batch, replicas))
        if lora_rank:
            lora = _lora_config(lora_rank, lora_targets)
            adapters = sum(n for p, n in param_elements(cfg, "train", sizes, quantize, lora).items() if "_lora_" in p)
            master = adapters * 4
            settings.update(lora_rank=lora_rank, lora_targets=list(lora.targets), quantize=quantize,
                            lora_adapter_elements=adapters)
            # The frozen base as stored (compute dtype, or int8), train rules; the engine decodes from it in
            # place with a copy of the adapters; the KL reference is the initial adapters.
            persistent = {"params": master, "optimizer": adapters * _itemsize(mu_dtype) + master,
                          "reference": adapters * c if reference else 0,
                          "base": param_bytes(cfg, "train", sizes, compute_dtype, quantize),
                          "engine_params": adapters * _itemsize(param_dtype)}
            copy = 0 if compute_copy == "micro_batch" else adapters * c
        else:
            master = param_bytes(cfg, "train", sizes, "float32")
            persistent = {"params": master,
                          "optimizer": param_bytes(cfg, "train", sizes, mu_dtype) + master,
                          "reference": param_bytes(cfg, "train", sizes, compute_dtype) if reference else 0,
                          "engine_params": param_bytes(cfg, "generate", sizes, param_dtype)
                          if rollout_weights != "master" else 0}  # split: one array per layer
            # The update's (and the log-prob pass's) compute-dtype copy: every weight but the embedding.
            copy = 0 if compute_copy == "micro_batch" else \
                sum(n for p, n in param_elements(cfg, "train", sizes).items() if p != "embed") * c
        # One layer's weights split over `tensor` only (as gathered for compute), and the output head.
        gathered = param_elements(cfg, "train", {"data": 1, "fsdp": 1, "tensor": tensor})
        layer = sum(n for p, n in gathered.items() if p.startswith("layers.")) // L
        head = gathered["embed" if cfg.tie_word_embeddings else "lm_head"]
        weights = 2 * layer * c + head * c
        full = layer_terms(cfg, mb, seq, seq, tensor, c, attention)
        saves = REMAT_SAVES[remat]
        saved = sum(full.values()) if saves is None else sum(full[k] for k in saves)
        rollout = _generation(cfg, settings["rollout_slots_per_device"], rollout_len, chunk, tensor, c)
        phases = {
            # Decoding from the master weights casts (and gathers) each layer's weights as it goes.
            "rollout": dict(persistent, **rollout,
                            layer_weights=weights if rollout_weights == "master" and not lora_rank else 0),
            "logprobs": dict(persistent, compute_copy=copy, layer_weights=weights, logits=2 * mb * seq * v * 4 + 2 * rows * seq * 4,
                             activations=sum(full.values()) + _per_call(cfg, mb, seq, seq)),
            "update": dict(persistent, compute_copy=copy, gradients=master * (2 if micro_batches > 1 else 1),
                           layer_weights=weights + layer * 4, logits=3 * mb * seq * v * 4,
                           activations=(L - 1) * saved + 2 * sum(full.values()) + _per_call(cfg, mb, seq, seq)),
        }
    order = ("params", "optimizer", "gradients", "reference", "base", "engine_params", "compute_copy", "layer_weights",
             "kv_cache",
             "activations", "logits")
    phases = {p: {k: cats.get(k, 0) for k in order} for p, cats in phases.items()}
    peak = max(phases, key=lambda p: sum(phases[p].values()))
    total = sum(phases[peak].values())
    capacity = int(topo.hbm_bytes * (1 - headroom))
    result = Plan(preset=cfg.name or "custom", task=task, topology=topo.name, devices=topo.devices, mesh=sizes,
                  seq=seq, batch=batch, settings=settings, phases=phases, peak_phase=peak, total=total,
                  hbm_bytes=topo.hbm_bytes, headroom=headroom, capacity_bytes=capacity, fits=total <= capacity,
                  notes=notes)
    _add_notes(result, cfg, topo)
    if aot is not False:
        _try_aot(result, cfg, topo, aot)
    return result


def _lora_config(rank: int, targets: Sequence[str] | None):
    from qwq_jax.lora import TARGETS, LoraConfig

    return LoraConfig(rank=rank, alpha=float(rank), targets=tuple(targets) if targets else TARGETS)


def _check(task: str, seq: int, batch: int, remat: str, attention: str, micro_batches: int,
           headroom: float, quantize: str | None = None, lora_rank: int = 0) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if quantize is not None and quantize not in QUANT_BYTES:
        raise ValueError(f"unknown quantization {quantize!r} (known: {', '.join(QUANT_BYTES)})")
    if not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an int >= 0 (0: no LoRA), got {lora_rank!r}")
    if lora_rank and task != "train":
        raise ValueError("lora_rank is for training (generation runs whatever weights it is given)")
    if quantize is not None and task != "generate" and not lora_rank:
        raise ValueError(f"quantize={quantize!r} trains only with LoRA (an int8 frozen base, --lora-rank): full "
                         "training and its rollouts use the float weights")
    if remat not in REMAT_SAVES:
        raise ValueError(f"unknown remat policy {remat!r} (known: {', '.join(REMAT_SAVES)})")
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r} (known: {', '.join(ATTENTION)})")
    for name, value in (("seq", seq), ("batch", batch), ("micro_batches", micro_batches)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")


def _add_notes(p: Plan, cfg: Any, topo: Topology) -> None:
    longest = p.settings.get("rollout_len", p.seq)
    if max(p.seq, longest) > cfg.max_context:
        p.notes.append(f"seq {max(p.seq, longest)} exceeds the config's max context {cfg.max_context} "
                       "(YaRN configs such as the qwq-32b-yarn preset reach 131072; the memory is the same)")
    acts, phase, s = p.categories["activations"], p.peak_phase, p.settings
    if phase in ("generate", "rollout") and acts > p.total / 3:
        slots = _slots(p)
        p.notes.append(f"activations dominate the {phase} phase (a prefill call of {s['prefill_chunk']} tokens of one "
                       f"sequence, or a decode step of {_count(slots, 'slot')}): a smaller --prefill-chunk "
                       "(Engine(prefill_chunk=...)) shrinks the former")
    elif s["attention"] == "xla" and acts > p.total / 3:
        why = {"logprobs": "the log-prob pass, GRPOTrainer._prepare; more --micro-batches shrink it",
               "update": f"the gradient pass with remat {s.get('remat')}; more --micro-batches shrink it"}[phase]
        p.notes.append(f"activations dominate the {phase} phase ({why}): the xla attention backend materialises "
                       "float32 [rows, heads, T, S] scores; --attention flash assumes a blockwise kernel instead")
    if topo.kind == "gpu":
        p.notes.append("JAX on GPU preallocates 75% of memory by default; set XLA_PYTHON_CLIENT_MEM_FRACTION "
                       f"to {1 - p.headroom:.2f} to use the capacity this plan assumes")


# ---- mesh search ----------------------------------------------------------------------------------------
def mesh_candidates(devices: int, max_tensor: int | None = None) -> list[dict[str, int]]:
    """Every data x fsdp x tensor factorisation of `devices` (tensor <= max_tensor when given)."""
    out = []
    for tensor in range(1, devices + 1):
        if devices % tensor or (max_tensor and tensor > max_tensor):
            continue
        for fsdp in range(1, devices // tensor + 1):
            if (devices // tensor) % fsdp == 0:
                out.append({"data": devices // tensor // fsdp, "fsdp": fsdp, "tensor": tensor})
    return out


def best_mesh(cfg: Any, task: str, topology: str | Topology, seq: int, batch: int, **kwargs: Any) -> Plan:
    """The plan of the mesh with the lowest per-device total among those the rules accept.

    Searches every data x fsdp x tensor factorisation of the device count whose axes divide the
    parameter dimensions mapped to them (so `tensor` divides the KV heads) and, for training,
    whose data x fsdp divides the micro-batch. On GPUs `tensor` stays within a host (8 GPUs,
    NVLink). Ties go to fewer tensor shards, then fewer data replicas. `kwargs` as for `plan`
    (`aot` applies to the chosen mesh only). Raises ValueError when no mesh is valid.
    """
    cfg = _config(cfg)
    topo = topology if isinstance(topology, Topology) else get_topology(topology)
    aot = kwargs.pop("aot", False)
    kwargs.pop("mesh", None)
    _check(task, seq, batch, kwargs.get("remat", ModelConfig.remat), kwargs.get("attention", "xla"),
           kwargs.get("micro_batches", GRPOConfig.micro_batches), kwargs.get("headroom", 0.10), kwargs.get("quantize"),
           kwargs.get("lora_rank", 0))
    plans, errors = [], []
    for sizes in mesh_candidates(topo.devices, topo.devices_per_host):
        try:
            plans.append(plan(cfg, task, topo, seq, batch, mesh=sizes, aot=False, **kwargs))
        except ValueError as e:
            errors.append(str(e))
    if not plans:
        raise ValueError(f"no data x fsdp x tensor mesh of {topo.devices} devices is valid for {task}: "
                         f"{errors[0] if errors else 'no candidates'}")
    best = min(plans, key=lambda p: (p.total, p.mesh["tensor"], p.mesh["data"]))
    if aot is not False:
        _try_aot(best, cfg, topo, aot)
    return best


# ---- ahead-of-time compilation of the engine's and the trainer's own programs ---------------------------
def _stats(lowered: Any) -> dict[str, int]:
    """`compiled.memory_analysis()` per device; peak = argument + output - alias + temp."""
    m = lowered.compile().memory_analysis()
    out = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out




def aot_memory(cfg: Any, task: str, mesh: Any, seq: int, batch: int, *, remat: str = ModelConfig.remat,
               param_dtype: str = "bfloat16", compute_dtype: str = ModelConfig.dtype, mu_dtype: str = "float32",
               micro_batches: int = GRPOConfig.micro_batches, prefill_chunk: int | None = None, quantize: str | None = None,
               attention: str = "xla", layer_loop: str = LAYER_LOOP, reference: bool = True,
               rollout_weights: str = GRPOConfig.rollout_weights, compute_copy: str = GRPOConfig.compute_copy,
               rollout_batch: int | None = None, rollout_len: int | None = None, lora_rank: int = 0,
               lora_targets: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    """Compile the task's own programs for `mesh` (any devices: compile-only TPU / GPU ones, or CPUs)
    and return, per program, `compiled.memory_analysis()` per device: argument, output, alias, temp
    and peak = argument + output - alias + temp. Nothing runs and no weights exist.

    generate: the engine's (`qwq_jax.generate.Engine` on an abstract model, `layer_loop`) "prefill"
    (`lower_prefill`: one call of one sequence's `prefill_chunk` tokens, default the engine's, into a
    page pool sized for `batch` sequences of `seq` tokens) and "decode" (`lower_decode`: one call of
    its `batch` decode slots over that pool), on one replica's devices with its share of `batch`
    where the mesh has several (`qwq_jax.replicas`); no padding of the batch.
    train: the trainer's "update" (`GRPOTrainer.lower_update` on an abstract model: `batch` rows of
    a one-token prompt and `seq - 1` completion tokens, so logits span the row, as the analytic
    count assumes) and its rollout engine's "prefill" and "decode" (`rollout_batch` decode slots, a
    pool for that many sequences of `rollout_len` tokens: one replica's share, on its devices, with a
    replica per (`data`, `fsdp`) index from the split copy, per `data` index from the masters or a
    LoRA base) on the weights the rollouts use (`rollout_weights`).
    With `lora_rank`, the trainer of LoRA adapters (on `lora_targets`) over a frozen base in the compute
    dtype (int8 with `quantize`), and its rollout engine on that base plus the adapters.
    attention: "flash" compiles the model's "auto" backend chosen for the mesh's devices (on a GPU:
    cuDNN flash attention, blockwise against the cache); TPU meshes compile the xla path (splash
    needs a mesh context under which it runs per shard, not tried offline here); "xla" the reference.
    """
    from qwq_jax.attention import compile_for

    device = mesh.devices.flat[0]
    backend = "auto" if attention == "flash" and device.platform != "tpu" else "xla"
    model_kw = dict(dtype=compute_dtype, attention_backend=backend)

    # One engine per replica (data x fsdp) where the weights are replicated over them: replica 0's, on
    # its own devices, with its share of the sequences (qwq_jax.replicas). From weights split over
    # fsdp (the masters, a LoRA base): one per data index, on its fsdp x tensor devices.
    replica = replicas_of(mesh)
    one = replica[0] if replica else mesh
    shards = len(replica) if replica else 1
    by_data = replicas_of(mesh, ("data",))
    in_place = (by_data[0] if by_data else mesh), (len(by_data) if by_data else 1)

    def engine_programs(model: Any, rows: int, length: int, loop: str, on: Any = mesh) -> dict[str, Any]:
        chunk = min(prefill_chunk or PREFILL_CHUNK, length)
        engine = Engine(model, mesh=on, rules="generate", layer_loop=loop, prefill_chunk=chunk,
                        max_num_seqs=rows)
        return {"prefill": lambda: engine.lower_prefill(rows, chunk, length),
                "decode": lambda: engine.lower_decode(rows, length)}

    if task == "generate":
        model = placed_abstract_model(cfg, one, "generate", param_dtype=param_dtype, quant=quantize, **model_kw)
        programs = engine_programs(model, replica_slots(batch, shards), seq, layer_loop, one)
    elif lora_rank:  # the frozen base as the trainer holds it, with the adapters beside it
        model = placed_abstract_model(cfg, mesh, "train", param_dtype=compute_dtype, remat=remat, quant=quantize,
                              lora=_lora_config(lora_rank, lora_targets), **model_kw)
        grpo = GRPOConfig(group_size=1, max_tokens=seq - 1, micro_batches=micro_batches, mu_dtype=mu_dtype,
                          kl_beta=None if reference else 0.0, compute_copy=compute_copy)
        trainer = GRPOTrainer(model, grpo, reward_fn=lambda idx, completions: [0.0] * len(completions), mesh=mesh)
        base = placed_abstract_model(cfg, in_place[0], "train", param_dtype=compute_dtype, remat=remat, quant=quantize,
                             lora=_lora_config(lora_rank, lora_targets), **model_kw)
        programs = {"update": lambda: trainer.lower_update(batch, 1, seq - 1),
                    **engine_programs(base, replica_slots(rollout_batch or batch, in_place[1]), rollout_len or seq,
                                      LAYER_LOOP, in_place[0])}
    else:
        model = placed_abstract_model(cfg, mesh, "train", param_dtype=param_dtype, remat=remat, **model_kw)
        grpo = GRPOConfig(group_size=1, max_tokens=seq - 1, micro_batches=micro_batches, mu_dtype=mu_dtype,
                          kl_beta=None if reference else 0.0, rollout_weights=rollout_weights,
                          compute_copy=compute_copy)
        trainer = GRPOTrainer(model, grpo, reward_fn=lambda idx, completions: [0.0] * len(completions), mesh=mesh)
        # The rollout engine as `GRPOTrainer.sync_engine` leaves it: a param_dtype copy in the generate
        # layout, one array per layer ("split"), or the float32 masters themselves ("master").
        master = rollout_weights == "master"
        on, count = in_place if master else (one, shards)
        weights = placed_abstract_model(cfg, on, "train" if master else "generate",
                                param_dtype="float32" if master else param_dtype, **model_kw)
        programs = {"update": lambda: trainer.lower_update(batch, 1, seq - 1),
                    **engine_programs(weights, replica_slots(rollout_batch or batch, count), rollout_len or seq,
                                      LAYER_LOOP if master else "split", on)}
    out = {}
    with compile_for(device):
        for name, lower in programs.items():
            out[name] = _stats(lower())
    return out


def _tpu_mesh(topo: Topology, sizes: dict[str, int]):
    import os

    from jax.experimental import topologies

    # Compiling only: do not fail because another process on this host holds libtpu's lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    desc = topologies.get_topology_desc(topology_name=topo.aot_name, platform="tpu",
                                        chip_config_name=topo.chip_config)
    if len(desc.devices) != topo.devices:
        raise ValueError(f"libtpu gave {len(desc.devices)} devices for {topo.aot_name}, expected {topo.devices}")
    return topologies.make_mesh(desc, tuple(sizes[a] for a in MESH_AXES), MESH_AXES)


def _gpu_mesh(topo: Topology, sizes: dict[str, int]):
    """A mesh of compile-only GPUs of `topo` (hosts x devices per host), from JAX's CUDA plugin."""
    import jax
    from jax.experimental import topologies

    jax.config.update("jax_platforms", "cpu")  # compile for the target; nothing runs on a GPU here
    per_host = topo.devices_per_host or topo.devices
    config = (GPU_TARGETS_DIR / f"{topo.gpu_target}.txtpb").read_text()
    desc = topologies.get_topology_desc(platform="cuda", target_config=config,
                                        topology=f"1x{topo.devices // per_host}x{per_host}")
    if len(desc.devices) != topo.devices:
        raise ValueError(f"the CUDA plugin gave {len(desc.devices)} devices for {topo.name}, expected {topo.devices}")
    return make_mesh(sizes, desc.devices)


def _slots(p: Plan) -> int:
    """One engine's decode slots (on every device of its replica)."""
    return p.settings.get("rollout_slots_per_device", p.settings["rows_per_device"])


def _aot_extra(p: Plan, cfg: Any, program: str) -> int:
    """Bytes a compiled program does not hold as arguments or temporaries but its phase does (analytic)."""
    s = p.settings
    # The decode slots' carried state (`slot_state_bytes`, replicated) stays on the device while a
    # prefill runs; the prefill itself reads every weight, the output head included (it returns its
    # last token's logits).
    state = slot_state_bytes(cfg, _slots(p)) if program == "prefill" else 0
    if p.task == "generate":
        return state  # prefill and decode take the weights and the pool; the slot state is decode's
    upd = p.phases["update"]
    if program == "update":  # the reference and the rollout engine's copy outlive the update
        return upd["reference"] + upd["engine_params"]
    # Rollouts: the float32 masters, AdamW state and reference stay put ("master": the engine's weights).
    return state + upd["optimizer"] + upd["reference"] + (upd["params"] if s["rollout_weights"] != "master" else 0)


def _try_aot(p: Plan, cfg: Any, topo: Topology, aot: bool | None) -> None:
    """Replace the analytic total by the compiler's where possible (TPU with libtpu, NVIDIA GPUs with
    JAX's CUDA plugin, no device needed either way); otherwise say why not."""
    if topo.kind == "gpu":
        target, where, make, compiler = topo.gpu_target, f"{topo.name} ({topo.gpu_target})", _gpu_mesh, \
            _cuda_plugin_available
        no_target = f"no GPU target description for {topo.name}"
        missing = ("JAX's CUDA plugin is not installed, so the analytic count is used (pip install "
                   "'jax[cuda12]' at this jax version compiles for GPUs offline, no GPU needed)")
    elif topo.kind == "tpu":
        target, where, make, compiler = topo.aot_name, topo.aot_name, _tpu_mesh, _libtpu_available
        no_target = f"no TPU topology name for {topo.devices} devices"
        missing = ("libtpu is not installed, so the analytic count is used (pip install 'jax[tpu]' at this "
                   "jax version enables TPU ahead-of-time compilation offline)")
    else:
        target, no_target = None, f"no offline compiler for {topo.name} (a custom machine)"
    if target is None:
        if aot:
            p.notes.append(f"AOT: {no_target}; analytic count used")
        return
    if not compiler():
        if aot is not False:
            p.notes.append(f"AOT: {missing}")
        return
    s = p.settings
    keys = ("remat", "param_dtype", "compute_dtype", "mu_dtype", "micro_batches", "prefill_chunk", "quantize",
            "attention", "layer_loop", "reference", "rollout_weights", "compute_copy", "rollout_batch",
            "rollout_len", "lora_rank", "lora_targets")
    try:
        programs = aot_memory(cfg, p.task, make(topo, p.mesh), p.seq, p.batch, **{k: s[k] for k in keys if k in s})
    except Exception as e:  # the compiler's failure is reported, the analytic plan stands
        p.notes.append(f"AOT: compiling for {where} failed ({type(e).__name__}: {str(e)[:300]}); "
                       "analytic count used")
        return
    totals = {name: stats["peak"] + _aot_extra(p, cfg, name) for name, stats in programs.items()}
    peak = max(totals, key=totals.get)
    p.aot = dict(programs[peak], extra=_aot_extra(p, cfg, peak), program=peak, programs=programs)
    p.method = f"aot-{topo.kind}"
    p.total = totals[peak]
    p.fits = p.total <= p.capacity_bytes
    each = ", ".join(f"{name} {programs[name]['peak'] / GIB:.2f}" for name in programs)
    p.notes.append(f"AOT: {where} compiler peaks (GiB) {each}; the highest with what it does not hold "
                   f"(analytic): {peak} {programs[peak]['peak'] / GIB:.2f} + {p.aot['extra'] / GIB:.2f} GiB = total")


# ---- CLI --------------------------------------------------------------------------------------------------
_DESCRIBE = {
    "params": "weights ({}), {} rules",
    "optimizer": "AdamW mu ({}) + nu (float32)",
    "gradients": "float32 gradients (+ accumulator with micro-batches)",
    "reference": "frozen reference model ({})",
    "base": "LoRA's frozen base ({}), train rules, read in place by the engine",
    "engine_params": "rollout engine's weights ({}), generate rules",
    "compute_copy": "the update's {} copy of the weights but the embedding (compute_copy={})",
    "layer_weights": "current layers' gathered weights + lm_head",
    "kv_cache": "KV page pool ({} tokens x {} on each device)",
    "activations": "layer intermediates (remat {})",
    "logits": "logits / decode slot state",
}


def _describe(p: Plan, cat: str) -> str:
    s = p.settings
    if cat == "base":
        return _DESCRIBE[cat].format(f"{s['quantize']} weight-only matmuls" if s.get("quantize") else s["compute_dtype"])
    if cat == "params" and s.get("lora_rank"):
        return f"LoRA adapters (rank {s['lora_rank']}), float32 masters"
    if cat == "params":
        if s.get("quantize"):
            return _DESCRIBE[cat].format(f"{s['quantize']} weight-only matmuls, the rest {s['param_dtype']}", p.task)
        return _DESCRIBE[cat].format(s["param_dtype"] if p.task == "generate" else "float32 master", p.task)
    if cat == "optimizer":
        return _DESCRIBE[cat].format(s["mu_dtype"])
    if cat == "reference":
        if s.get("lora_rank"):
            return f"KL reference: the initial adapters ({s['compute_dtype']})"
        return _DESCRIBE[cat].format(s["compute_dtype"])
    if cat == "engine_params" and s.get("lora_rank"):
        return f"rollout engine's adapters ({s['param_dtype']}); it reads the base in place"
    if cat == "engine_params":
        return _DESCRIBE[cat].format(s["param_dtype"])
    if cat == "compute_copy":
        return _DESCRIBE[cat].format(s["compute_dtype"], s["compute_copy"])
    if cat == "kv_cache":
        length = s.get("rollout_len", p.seq)
        return _DESCRIBE[cat].format(length, _count(_slots(p), "sequence"))
    if cat == "activations":
        return (f"a prefill call of {s['prefill_chunk']} tokens or a decode step (paged attention)"
                if p.task == "generate" else _DESCRIBE[cat].format(s["remat"]))
    return _DESCRIBE[cat]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_plan(p: Plan, best: Plan | None = None) -> str:
    """The human-readable table the CLI prints."""
    gib = lambda b: f"{b / GIB:9.2f}"  # noqa: E731
    usable = p.capacity_bytes / GIB
    s = p.settings
    train = f"remat {s['remat']} | micro-batches {s['micro_batches']} | " if p.task == "train" else ""
    lines = [f"{p.preset} {p.task} on {p.topology}: {_count(p.devices, 'device')} x {p.hbm_bytes / GIB:.1f} GiB "
             f"HBM, {usable:.1f} GiB usable ({p.headroom:.0%} held back as headroom)",
             f"mesh {p.mesh_spec} | seq {p.seq} | batch {p.batch} ({_count(s['rows_per_device'], 'slot' if p.task == 'generate' else 'row')}/device) | "
             f"{train}method {p.method}", ""]
    names = list(p.phases)
    lines.append(f"{'GiB per device':16s}" + "".join(f"{n:>10s}" for n in names))
    cats = [c for c in next(iter(p.phases.values())) if any(p.phases[n][c] for n in names)]
    for cat in cats:
        row = "".join(gib(p.phases[n][cat]) + " " if p.phases[n][cat] else f"{'-':>9s} " for n in names)
        lines.append(f"  {cat:14s}{row}  {_describe(p, cat)}")
    lines.append(f"  {'total':14s}" + "".join(gib(sum(p.phases[n].values())) + " " for n in names)
                 + f"  peak: {p.peak_phase}")
    if p.aot:
        a = {k: f"{v / GIB:.2f}" for k, v in p.aot.items() if isinstance(v, int)}
        lines.append(f"  compiler ({p.method}, {p.aot['program']}): argument {a['argument']}, output {a['output']}, "
                     f"alias {a['alias']}, temp {a['temp']} GiB")
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    lines += ["", f"verdict: {verdict}: {p.total / GIB:.2f} GiB of {usable:.2f} GiB usable per device "
                  f"({p.total / p.capacity_bytes:.0%})"]
    if best is not None:
        same = best.mesh == p.mesh
        lines.append(f"best mesh: {best.mesh_spec} ({best.total / GIB:.2f} GiB/device, "
                     f"{'fits' if best.fits else 'does not fit'})" + (" -- the one above" if same else ""))
    for note in p.notes:
        lines.append(f"note: {note}")
    lines.append(f"summary: {p.preset} {p.task} seq={p.seq} batch={p.batch} on {p.topology} mesh {p.mesh_spec}: "
                 f"{p.total / GIB:.2f}/{usable:.2f} GiB per device, {'fits' if p.fits else 'does not fit'} "
                 f"[{p.method}]")
    return "\n".join(lines)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from qwq_jax.cli import OneLineParser

    ap = OneLineParser(prog="python -m qwq_jax.plan", description=__doc__.split("\n\n")[0],
                       formatter_class=_Formatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", default="qwq-32b", help=f"model preset ({', '.join(PRESETS)})")
    src.add_argument("--config", help="a HF config.json (file or model directory) instead of a preset")
    ap.add_argument("--task", choices=TASKS, default="generate", help="KV-cached generation or GRPO training")
    ap.add_argument("--topology", help=f"machine: {', '.join(TOPOLOGIES)}; or give --devices and --hbm-gib")
    ap.add_argument("--devices", type=int, help="device count (custom machine, or override)")
    ap.add_argument("--hbm-gib", type=float, help="memory per device in GiB (custom machine, or override)")
    ap.add_argument("--seq", type=int, default=32768, help="generate: cache length; train: prompt + completion")
    ap.add_argument("--batch", type=int, default=1, help="generate: rows; train: completions per update (prompts x group size)")
    ap.add_argument("--mesh", help="mesh spec, e.g. data=1,fsdp=-1,tensor=8 (default: the best mesh found)")
    ap.add_argument("--remat", choices=list(REMAT_SAVES), default=ModelConfig.remat,
                    help="train: activation checkpointing (as the train config's model.remat)")
    ap.add_argument("--param-dtype", choices=list(DTYPE_BYTES), default="bfloat16",
                    help="generate: weights; train: the rollout engine's copy")
    ap.add_argument("--compute-dtype", choices=list(DTYPE_BYTES), default=ModelConfig.dtype,
                    help="activations, KV cache, reference model")
    ap.add_argument("--quantize", choices=list(QUANT_BYTES), default=None,
                    help="generate: int8 weight-only matmul weights (qwq_jax.quant; python -m qwq_jax.sample "
                         "--quantize int8)")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="train: LoRA adapters of this rank on a frozen base (0: full fine-tuning; with "
                         "--quantize int8 the base is int8: QLoRA)")
    ap.add_argument("--lora-targets", nargs="+", default=None,
                    help="train: the projections with adapters (default: q k v o gate up down)")
    ap.add_argument("--mu-dtype", choices=list(DTYPE_BYTES), default="float32", help="train: AdamW first moment")
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                    help="train: keep a frozen reference model (KL term)")
    ap.add_argument("--micro-batches", type=int, default=GRPOConfig.micro_batches,
                    help="train: gradient accumulation steps")
    ap.add_argument("--rollout-batch", type=int, help="train: rows generated together (default: --batch)")
    ap.add_argument("--rollout-len", type=int, help="train: rollout cache length (default: --seq)")
    ap.add_argument("--rollout-weights", choices=ROLLOUT_WEIGHTS, default=GRPOConfig.rollout_weights,
                    help="train: a param-dtype copy for rollouts, one array per layer (split), or decode from "
                         "the fp32 master weights (master)")
    ap.add_argument("--compute-copy", choices=COMPUTE_COPIES, default=GRPOConfig.compute_copy,
                    help="train: the update's compute-dtype copy of the fp32 masters, made once per update "
                         "(split, step) or none (micro_batch: cast where used)")
    ap.add_argument("--prefill-chunk", type=int,
                    help="tokens per prefill call: the engine's prefill_chunk, or the longest prompt if shorter "
                         f"(default: {PREFILL_CHUNK}, the engine's default)")
    ap.add_argument("--layer-loop", choices=LAYER_LOOPS, default=LAYER_LOOP,
                    help="generate: the engine's loop over layers, compiled by --aot (the same bytes analytically)")
    ap.add_argument("--attention", choices=ATTENTION, default="xla",
                    help="xla materialises the scores; flash assumes a blockwise kernel (AOT for a GPU topology "
                         "compiles cuDNN flash attention)")
    ap.add_argument("--headroom", type=float, default=0.10, help="fraction of HBM held back")
    ap.add_argument("--aot", action=argparse.BooleanOptionalAction, default=None,
                    help="compile for the topology offline: TPUs with libtpu, H100/H200 with JAX's CUDA plugin "
                         "(default: when that is installed)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = QwenConfig.from_hf(args.config) if args.config else QwenConfig.preset(args.preset)
        topo = get_topology(args.topology, args.devices, args.hbm_gib)
        kwargs = dict(remat=args.remat, param_dtype=args.param_dtype, compute_dtype=args.compute_dtype,
                      mu_dtype=args.mu_dtype, reference=args.reference, micro_batches=args.micro_batches,
                      rollout_batch=args.rollout_batch, rollout_len=args.rollout_len,
                      prefill_chunk=args.prefill_chunk, rollout_weights=args.rollout_weights,
                      compute_copy=args.compute_copy, layer_loop=args.layer_loop,
                      attention=args.attention, headroom=args.headroom, quantize=args.quantize,
                      lora_rank=args.lora_rank, lora_targets=args.lora_targets)
        best = best_mesh(cfg, args.task, topo, args.seq, args.batch, **kwargs)
        mesh = args.mesh if args.mesh is not None else best.mesh
        result = plan(cfg, args.task, topo, args.seq, args.batch, mesh=mesh, aot=args.aot, **kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = result.to_dict()
        out["best_mesh"] = {"mesh": best.mesh, "mesh_spec": best.mesh_spec, "total": best.total, "fits": best.fits}
        print(json.dumps(out, sort_keys=True))
    else:
        print(format_plan(result, best))
    return 0


if __name__ == "__main__":
    from qwq_jax.cli import run_main

    run_main(main)
