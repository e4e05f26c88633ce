"""Attention backends behind one switch, plus the mask every backend shares.

`attention(q, k, v, mask, backend=...)` takes queries `[B, T, H, D]`, keys/values `[B, S, K, D]`
with `H = K * G` (GQA: query head h reads KV head h // G, as HF's `repeat_kv`) and a `Mask`
(segment ids and positions; a dense boolean `[B, T, S]` array, True = may attend, also works).
KV heads are never repeated in memory. This is attention over one call's own tokens (training,
scoring, a forward without a cache); generation attends over the paged KV cache with
qwq_jax/paged_attention.py instead.

    backend      runs on        what it does
    xla          anywhere       the reference: einsums, float32 softmax, any mask
    cudnn        GPU            jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash
                                attention, bf16/fp16, head_dim a multiple of 8 up to 128 (256 on Hopper)
    splash       TPU            Pallas splash attention (jax.experimental.pallas.ops.tpu)
    blockwise    anywhere       flash-style in plain XLA: keys/values in blocks with an online float32
                                softmax, so no [T, S] score matrix exists
    auto         anywhere       gpu -> cudnn, tpu -> splash, else xla; `QWQ_ATTENTION=<name>` overrides

The fast kernels index causality by position in the row, so they assume positions increase with
the index inside each segment (true of every caller here: 0..T-1, GRPO's left-padded rows, packed
rows that restart at 0). What they cannot express falls back to `xla` with a logged reason:

- cudnn: `is_causal`; with segment ids each row must hold one sequence with padding
  at either end (plain, right- or left-padded): the row is rolled so its sequence starts at 0
  and cuDNN gets per-row lengths. A packed row (two or more sequences) comes out NaN, so the
  mistake cannot pass silently: pack with `xla`, `blockwise` or `splash`. An odd length gets one
  padding position appended (jax refuses cuDNN's backward for odd lengths while tracing, e.g. a
  GRPO step's 512 + 1536 - 1 = 2047 input tokens).
- cudnn with a dense mask: the mask as a cuDNN bias (forward only: cuDNN's bias gradient needs
  batch 1); "auto" uses blockwise there.
- splash: causal mask + segment ids (packing included), sequence padded to a multiple of 128.
  Under `jax.set_mesh(mesh)` the kernel runs in `shard_map` (batch over data/fsdp, heads over
  tensor).

blockwise memory: per block, scores and probabilities `[B, H, T, block]` in float32 plus the
float32 running output `[B, H, T, D]`; `block` is the largest of 1024, 512, ..., 64 dividing S
(S is padded to a multiple of 64 otherwise). With a `Mask` the loop is a `scan` over all blocks
(differentiable, but the backward keeps every block's probabilities, so train long sequences
with cudnn or splash); with a dense mask it stops after the last block any row may attend to
(a `while` loop: forward only).

Queries that may attend to nothing (padding) get finite but unspecified outputs in every backend.

Backends are chosen, and their platform checked, for this process's platform, or inside
`compile_for(device)` for that device's: ahead-of-time compilation for an H100 from a CPU host
(`benchmarks/gpu_aot.py`, the planner's GPU AOT) then gets cuDNN where the GPU would.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import os
from typing import Callable, Iterator

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

# Large negative instead of -inf: a fully masked row (a padding query) gives a uniform, finite
# softmax instead of NaN, and NaNs never reach gradients.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
ENV_OVERRIDE = "QWQ_ATTENTION"  # overrides what "auto" picks
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_PLATFORMS = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu", "cpu": "cpu"}
_TARGET: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("qwq_attention_target", default=None)


@contextlib.contextmanager
def compile_for(target) -> Iterator[None]:
    """Choose and check backends for `target` instead of this process's platform, while inside.

    For ahead-of-time compilation on a host without the accelerator (`jax.experimental.topologies`
    gives compile-only devices): with an H100's compile-only device, "auto" picks cuDNN and
    "cudnn" passes its platform check although `jax.default_backend()` is "cpu" here. `target` is a
    device (its `platform` and `compute_capability` are read) or a platform name ("gpu", "tpu",
    "cpu"; a GPU given by name counts as Hopper, compute capability 9.0).
    """
    if isinstance(target, str):
        platform, capability = target, "9.0" if _PLATFORMS.get(target) == "gpu" else "0"
    else:
        platform, capability = getattr(target, "platform", ""), str(getattr(target, "compute_capability", "0"))
    if platform not in _PLATFORMS:
        raise ValueError(f"compile_for: unknown platform {platform!r} (known: {', '.join(_PLATFORMS)})")
    token = _TARGET.set((_PLATFORMS[platform], capability))
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> tuple[str, str]:
    """(platform, compute capability) that backends are chosen for: `compile_for`'s target if one is
    active, else this process's default backend and its first device."""
    target = _TARGET.get()
    if target is not None:
        return target
    platform = jax.default_backend()
    capability = str(getattr(jax.devices()[0], "compute_capability", "0")) if platform == "gpu" else "0"
    return platform, capability


def attention_mask(q_segments: jnp.ndarray, q_positions: jnp.ndarray,
                   kv_segments: jnp.ndarray, kv_positions: jnp.ndarray) -> jnp.ndarray:
    """Causal, segment-aware mask `[B, T, S]`.

    A query sees a key of the same segment whose position is not later than its own. Segment 0
    is padding and sees nothing; ids > 0 may pack several sequences into one row (a plain HF
    0/1 attention mask is a valid segment-id array).
    """
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    causal = kv_positions[:, None, :] <= q_positions[:, :, None]
    return same & causal & (kv_segments[:, None, :] != 0)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("q_segments", "q_positions", "kv_segments", "kv_positions"),
                   meta_fields=("segmented",))
@dataclasses.dataclass(frozen=True)
class Mask:
    """Causal self-attention over one call's tokens as segment ids and positions (S == T);
    `dense()` gives the `[B, T, S]` array of `attention_mask`.

    segmented: False when every segment id is 1 (no padding, no packing): plain causal.
    """

    q_segments: jnp.ndarray    # [B, T]
    q_positions: jnp.ndarray   # [B, T]
    kv_segments: jnp.ndarray   # [B, S]
    kv_positions: jnp.ndarray  # [B, S]
    segmented: bool = True

    @classmethod
    def causal(cls, segments: jnp.ndarray, positions: jnp.ndarray, *, segmented: bool = True) -> "Mask":
        """Self-attention over one call's tokens `[B, T]`."""
        return cls(segments, positions, segments, positions, segmented=segmented)

    def dense(self) -> jnp.ndarray:
        return attention_mask(self.q_segments, self.q_positions, self.kv_segments, self.kv_positions)


def _dense(mask: Mask | jnp.ndarray) -> jnp.ndarray:
    return mask.dense() if isinstance(mask, Mask) else mask


_logged: set[str] = set()


def _fallback(backend: str, reason: str) -> None:
    """Log (once per reason) why `backend` uses the xla reference for a call."""
    msg = f"attention backend {backend!r}: {reason}; using the xla reference"
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)


# ---- the reference ----------------------------------------------------------------------------
def xla_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: Mask | jnp.ndarray) -> jnp.ndarray:
    """Reference attention in plain XLA ops: scores and softmax in float32."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    mask = _dense(mask)  # [B, T, S]
    q = q.reshape(b, t, kv_heads, h // kv_heads, d)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


# ---- blockwise (flash-style) attention in plain XLA ------------------------------------------
_BLOCKS = (1024, 512, 256, 128, 64)


def _kv_block(s: int, block: int | None) -> tuple[int, int]:
    """(block size, padded S): the largest preferred block dividing S, else S padded to a multiple of 64."""
    if block is not None:
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        return min(block, s), -(-s // min(block, s)) * min(block, s)
    for b in _BLOCKS:
        if s % b == 0:
            return b, s
    if s < _BLOCKS[-1]:
        return s, s
    return _BLOCKS[-1], -(-s // _BLOCKS[-1]) * _BLOCKS[-1]


def blockwise_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: Mask | jnp.ndarray,
                        *, block: int | None = None) -> jnp.ndarray:
    """Attention over key/value blocks with an online (running max and sum) float32 softmax.

    Same result as `xla_attention` up to float rounding; memory per step is one block's scores
    (see the module docstring for the trip count and gradients).
    """
    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    blk, s_pad = _kv_block(s, block)
    if isinstance(mask, Mask):
        kv_seg, kv_pos = mask.kv_segments, mask.kv_positions
        if s_pad != s:  # padded slots get segment 0: masked for every query
            kv_seg = jnp.pad(kv_seg, ((0, 0), (0, s_pad - s)))
            kv_pos = jnp.pad(kv_pos, ((0, 0), (0, s_pad - s)))

        def block_mask(start):
            seg = jax.lax.dynamic_slice_in_dim(kv_seg, start, blk, axis=1)
            pos = jax.lax.dynamic_slice_in_dim(kv_pos, start, blk, axis=1)
            return attention_mask(mask.q_segments, mask.q_positions, seg, pos)

        dynamic = False
    else:
        dense = jnp.pad(mask, ((0, 0), (0, 0), (0, s_pad - s))) if s_pad != s else mask

        def block_mask(start):
            return jax.lax.dynamic_slice_in_dim(dense, start, blk, axis=2)

        valid = jnp.any(dense, axis=1)
        dynamic = True
    if s_pad != s:
        def pad_seq(x, axis):
            return jnp.pad(x, [(0, s_pad - s) if i == axis else (0, 0) for i in range(4)])

        k, v = pad_seq(k, 1), pad_seq(v, 1)

    qg = q.reshape(b, t, kv_heads, g, d)
    scale = d ** -0.5

    def step(j, carry):
        m, l, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, D]
        start = j * blk
        kb = jax.lax.dynamic_slice_in_dim(k, start, blk, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(v, start, blk, axis=1)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, kb, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(block_mask(start)[:, None, None, :, :], scores, _MASKED)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        p = jnp.exp(scores - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, l, acc * correction[..., None] + pv

    init = (jnp.full((b, kv_heads, g, t), _MASKED, jnp.float32), jnp.zeros((b, kv_heads, g, t), jnp.float32),
            jnp.zeros((b, kv_heads, g, t, d), jnp.float32))
    n_blocks = s_pad // blk
    if dynamic:  # a dense mask: stop after the last block any row may attend to
        extent = jnp.max(jnp.where(valid, jnp.arange(s_pad, dtype=jnp.int32)[None, :] + 1, 0))
        n_blocks = jnp.clip((extent + blk - 1) // blk, 1, n_blocks)
    _, l, acc = jax.lax.fori_loop(0, n_blocks, step, init)
    out = acc / l[..., None]  # l >= 1: the running max's own term is exp(0)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


# ---- jax.nn.dot_product_attention: cuDNN on GPU ----------------------------------------------
# `_sdpa(..., implementation="xla")` feeds the same call to XLA on any device: tests/test_attention.py
# registers that as a test-only `dot_product` backend, so CPU tests cover cuDNN's plumbing.
def _roll_rows(x: jnp.ndarray, shift: jnp.ndarray) -> jnp.ndarray:
    """`out[b, i] = x[b, (i + shift[b]) % T]` for x `[B, T, ...]`."""
    t = x.shape[1]
    index = (jnp.arange(t)[None, :] + shift[:, None]) % t
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _sdpa(q, k, v, mask, implementation: str, name: str, allow_bias: bool) -> jnp.ndarray:
    """Attention through `jax.nn.dot_product_attention`, the mask given as a causal flag and per-row lengths."""
    call = functools.partial(jax.nn.dot_product_attention, implementation=implementation)
    if not isinstance(mask, Mask):  # an arbitrary mask: an additive bias [B, 1, T, S]
        if not allow_bias:
            return blockwise_attention(q, k, v, mask)
        return call(q, k, v, mask=_dense(mask)[:, None])
    t = q.shape[1]
    seg = mask.q_segments if mask.segmented else None
    if t % 2:  # cuDNN trains on even lengths only (jax refuses an odd one while tracing the gradient):
        # one padding position at the end, which no real query sees (causal; segment 0)
        q, k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
        seg = None if seg is None else jnp.pad(seg, ((0, 0), (0, 1)))
    return _sdpa_causal(call, q, k, v, seg)[:, :t]


def _sdpa_causal(call, q, k, v, seg: jnp.ndarray | None) -> jnp.ndarray:
    """Causal self-attention through `call`; `seg` [B, T] (None: every row one full sequence)."""
    if seg is None:
        return call(q, k, v, is_causal=True)
    # One sequence per row, padding at either end: roll it to the front, pass its length.
    real = seg != 0
    lengths = jnp.sum(real, axis=1, dtype=jnp.int32)  # [B]
    start = jnp.argmax(real, axis=1).astype(jnp.int32)  # first real token (0 for an empty row)
    idx = jnp.arange(seg.shape[1])[None, :]
    inside = (idx >= start[:, None]) & (idx < (start + lengths)[:, None])
    first_id = jnp.take_along_axis(seg, start[:, None], axis=1)
    one_sequence = jnp.all(jnp.where(inside, seg == first_id, seg == 0), axis=1)  # [B]
    lengths = jnp.maximum(lengths, 1)  # an all-padding row attends to one slot: finite, unused
    out = call(_roll_rows(q, start), _roll_rows(k, start), _roll_rows(v, start), is_causal=True,
               query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    out = jnp.where(real[:, :, None, None], _roll_rows(out, -start), 0)  # padding queries: 0, whatever cuDNN left
    # A packed row cannot be expressed this way: make it loud instead of silently wrong.
    return jnp.where(one_sequence[:, None, None, None], out, jnp.asarray(jnp.nan, out.dtype))


def _cudnn_unsupported(q: jnp.ndarray) -> str | None:
    """Why cuDNN flash attention cannot take these queries, or None."""
    d = q.shape[-1]
    if jnp.dtype(q.dtype) not in _HALF:
        return f"cuDNN flash attention needs bfloat16/float16, got {jnp.dtype(q.dtype).name}"
    capability = target_platform()[1]
    hopper = tuple(int(x) for x in capability.split(".") if x.isdigit()) >= (9, 0)
    if d % 8 or d > (256 if hopper else 128):
        return f"cuDNN flash attention does not support head_dim {d}"
    return None


def cudnn_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: Mask | jnp.ndarray,
                    *, allow_bias: bool = True, name: str = "cudnn") -> jnp.ndarray:
    """cuDNN flash attention (GPU) through `jax.nn.dot_product_attention(implementation="cudnn")`.

    allow_bias: a dense mask goes to cuDNN as a bias (else the call runs blockwise).
    """
    if reason := _cudnn_unsupported(q):
        _fallback(name, reason)
        return xla_attention(q, k, v, mask)
    return _sdpa(q, k, v, mask, "cudnn", name, allow_bias=allow_bias)


# ---- splash attention (TPU) -------------------------------------------------------------------
_SPLASH_BLOCK = 128  # sequence lengths are padded to a multiple of this


@functools.lru_cache(maxsize=32)
def _splash_kernel(t: int, heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    block = next(b for b in (512, 256, 128) if t % b == 0)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(heads)])
    with jax.ensure_compile_time_eval():  # concrete mask tables even when first built inside a trace
        return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: Mask | jnp.ndarray,
                     *, interpret: bool = False) -> jnp.ndarray:
    """Pallas splash attention (TPU; `interpret=True` runs it anywhere, slowly, for tests)."""
    if not isinstance(mask, Mask):
        _fallback("splash", "splash attention takes a Mask (segment ids), not a dense mask")
        return xla_attention(q, k, v, mask)
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, h, d = q.shape
    pad = -t % _SPLASH_BLOCK  # appended at the end: causality keeps them out of every real row
    scale = d ** -0.5  # the kernel does not scale the scores

    def heads_first(x: jnp.ndarray) -> jnp.ndarray:
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, N, T', D]

    qs = heads_first((q.astype(jnp.float32) * scale).astype(q.dtype))
    ks, vs = heads_first(k), heads_first(v)
    seg = jnp.pad(mask.q_segments, ((0, 0), (0, pad))).astype(jnp.int32)

    def run(qs, ks, vs, seg):
        kernel = _splash_kernel(t + pad, qs.shape[1], interpret)
        if mask.segmented:
            return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(s1, s1)))(
                qs, ks, vs, seg)
        return jax.vmap(kernel)(qs, ks, vs)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # a Mosaic kernel cannot be partitioned automatically: run it per shard
        from jax.sharding import PartitionSpec as P

        from sharding.rules import get_rules

        rules = get_rules("train")
        axes = [rules["batch"]] if isinstance(rules["batch"], str) else list(rules["batch"])
        batch = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1) or None
        heads = rules["heads"] if rules["heads"] in mesh.axis_names and mesh.shape[rules["heads"]] > 1 else None
        spec = P(batch, heads, None, None)
        run = jax.shard_map(run, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec, check_vma=False)
    out = run(qs, ks, vs, seg)  # [B, H, T', D]
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)


# ---- choosing -------------------------------------------------------------------------------
def resolve_auto(q: jnp.ndarray | None = None) -> str:
    """The backend "auto" stands for here: `$QWQ_ATTENTION` if set, else by platform (and dtype)."""
    override = os.environ.get(ENV_OVERRIDE, "").strip()
    if override and override != "auto":
        get_backend(override)  # unknown name or wrong platform: a clear error
        return override
    platform = target_platform()[0]
    if platform == "gpu" and (q is None or _cudnn_unsupported(q) is None):
        return "cudnn"
    if platform == "tpu":
        return "splash"
    return "xla"


def auto_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: Mask | jnp.ndarray) -> jnp.ndarray:
    """The platform's fast backend where it applies, else the reference."""
    name = resolve_auto(q)
    if name == "cudnn":
        try:  # jax checks cuDNN's presence and limits while tracing
            return cudnn_attention(q, k, v, mask, allow_bias=False, name="auto")
        except (NotImplementedError, RuntimeError) as e:
            _fallback("auto", f"cuDNN unavailable ({e})")
            return xla_attention(q, k, v, mask)
    return BACKENDS[name](q, k, v, mask)


BACKENDS: dict[str, Callable[..., jnp.ndarray]] = {
    "xla": xla_attention,
    "cudnn": cudnn_attention,
    "splash": splash_attention,
    "blockwise": blockwise_attention,
    "auto": auto_attention,
}
_PLATFORM = {"cudnn": "gpu", "splash": "tpu"}


def get_backend(name: str) -> Callable[..., jnp.ndarray]:
    """The attention function registered under `name`; an error if it cannot run on this platform."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (known: {', '.join(BACKENDS)})")
    need = _PLATFORM.get(name)
    if need is not None and (platform := target_platform()[0]) != need:
        where = "compiles for" if _TARGET.get() is not None else "runs on"
        raise ValueError(f"attention backend {name!r} needs a {need.upper()}, but this process {where} "
                         f"{platform!r} (use 'auto' or 'xla')")
    return BACKENDS[name]


def check_backend(name: str) -> str:
    """What `name` runs as here (for "auto": the backend it picks, `$QWQ_ATTENTION` included); a
    ValueError naming the problem for an unknown name or one this platform cannot run. Call it
    before loading weights, so that a bad choice costs nothing."""
    get_backend(name)
    return resolve_auto() if name == "auto" else name


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: Mask | jnp.ndarray,
              backend: str = "xla") -> jnp.ndarray:
    """Attention output `[B, T, H, D]` by the named backend (see the module docstring); keys and
    values `[B, S, K, D]`."""
    return get_backend(backend)(q, k, v, mask)
