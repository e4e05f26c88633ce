"""Paged KV cache: a pool of fixed-size pages shared by all sequences, and attention through page tables.

Layout (what the Pallas TPU kernel reads, `jax.experimental.pallas.ops.tpu.paged_attention`): per
layer, keys and values `[K, P, page, D]` (KV heads, pages, tokens per page, head dim); stacked over
layers `[L, K, P, page, D]`, or per layer a tuple of L such arrays (one buffer per layer). Token j of
a sequence lives in page `page_table[j // page]` at offset `j % page`: its flat slot index is
`page_table[j // page] * page + j % page`. Sharded by KV head over `tensor` (logical axes
`("layers", "kv_heads", None, None, "head_dim")`, the `generate` rules). An int8 pool stores
`round(x / scale)` with one float32 scale per token and KV head (`scale = max|x| / 127` over D),
`[L, K, P, page]`.

    backend      runs on     paged attention
    xla          anywhere    the reference: a while loop over blocks of `pages_per_block(page)` =
                             max(1, BLOCK_TOKENS // page) pages gathered through the page tables, an
                             online float32 softmax; int8 pages are dequantized per block in float32
    blockwise    anywhere    the same (the reference is blockwise already)
    cudnn        GPU         the reference (there is no paged cuDNN kernel)
    pallas,      TPU         decoding (T == 1) with the Pallas paged-attention kernel where it applies
    splash                   (bfloat16 pages: the kernel rounds others to bfloat16, and int8 would need
                             its scales broadcast over head_dim; head_dim a multiple of 128; page a
                             multiple of 8); else the reference, with a logged reason
    auto         anywhere    TPU -> pallas, else the reference; `QWQ_ATTENTION=<name>` overrides (as
                             for qwq_jax.attention)

The reference's trip count is `ceil(max_b min(kv_lengths[b], max_t q_positions[b, t] + 1) / block)`
(at least one block); the block size is a constant, never derived from the batch. On a CPU a prefill
chunk runs as tiles of `CPU_QUERY_TILE` queries, one after another, each with its own trip count. A block wholly
masked for a row is an exact no-op for that row (the running max stays, the correction is exp(0) = 1,
the added terms are exp(-huge) = 0), so a row's output is bitwise independent of the other rows'
lengths. Table entries past a row's length (unused, or the padding of a short table) are clamped into
the pool and masked, so any value there is safe. Memory per block: keys and values gathered
`[B, pages_per_block, K, page, D]` and float32 scores `[B, K, G, T, block]`.

The Pallas kernel gets the pool as it lies: the stacked pool viewed as `[1, L * K * P, page, D]` (a
free reshape) with each (row, KV head) one row of the kernel's batch, its page indices offset to its
layer and head, so no layer is copied out; compute blocks of `pages_per_block(page)` pages (the page
tables padded to whole blocks). It gets `q / sqrt(D)` in float32 and computes in float32 from
bfloat16 pages. Under `jax.set_mesh(mesh)` it runs in `shard_map` (rows over the `batch` mesh axes,
KV heads over `tensor`, by the `generate` rules); with a sharded pool but no mesh set, XLA would
gather the pool first. The tests run it on CPU in Pallas's TPU interpret mode.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from qwq_jax import attention as attn
from qwq_jax.config import QwenConfig

POOL_AXES = ("layers", "kv_heads", None, None, "head_dim")   # keys and values [L, K, P, page, D]
SCALE_AXES = ("layers", "kv_heads", None, None)              # int8 scales [L, K, P, page]
BLOCK_TOKENS = 256   # tokens per block of the reference loop (rounded down to whole pages, at least one)
CPU_QUERY_TILE = 256  # queries per tile of a prefill chunk in the reference on a CPU (`_query_tile`)
_PALLAS_NAMES = ("pallas", "splash")


def pages_per_block(page_size: int) -> int:
    """Pages per block of the reference loop (and per compute block of the Pallas kernel)."""
    return max(1, BLOCK_TOKENS // page_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagePool:
    k: Any                 # [L, K, P, page, D], or per layer: a tuple of L arrays [K, P, page, D]
    v: Any                 # same
    k_scale: Any = None    # int8 only: [L, K, P, page] float32, or a tuple of L arrays [K, P, page]
    v_scale: Any = None

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    def _first(self) -> Any:  # a keys array whose last four dims are [K, P, page, D]
        return self.k[0] if self.per_layer else self.k

    @property
    def num_pages(self) -> int:
        return self._first().shape[-3]

    @property
    def page_size(self) -> int:
        return self._first().shape[-2]

    @property
    def int8(self) -> bool:
        return self.k_scale is not None

    def layer(self, i: int) -> "PagePool":
        """Layer i of a per-layer pool, as a pool of plain `[K, P, page, D]` arrays (`layer=None` below)."""
        if not self.per_layer:
            raise ValueError("PagePool.layer: only for per-layer pools; index a stacked pool with the "
                             "`layer` argument of write_pages / paged_attention instead")
        pick = (lambda x: None) if not self.int8 else (lambda x: x[i])
        return PagePool(self.k[i], self.v[i], pick(self.k_scale), pick(self.v_scale))

    @staticmethod
    def _specs(cfg: QwenConfig, num_pages: int, page_size: int, dtype: Any, int8: bool,
               per_layer: bool) -> tuple[tuple, Any, tuple | None]:
        """(keys shape, keys dtype, scales shape or None) of one array (one layer's when per_layer)."""
        k = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
        if not per_layer:
            k = (cfg.num_layers,) + k
        return k, (jnp.int8 if int8 else jnp.dtype(dtype)), (k[:-1] if int8 else None)

    @staticmethod
    def _shardings(mesh: Mesh, rules: Any, per_layer: bool) -> tuple[NamedSharding, NamedSharding]:
        """Shardings of one keys/values array and of one scales array."""
        from sharding import logical_to_mesh

        drop = 1 if per_layer else 0
        return (NamedSharding(mesh, logical_to_mesh(POOL_AXES[drop:], mesh, rules)),
                NamedSharding(mesh, logical_to_mesh(SCALE_AXES[drop:], mesh, rules)))

    @classmethod
    def _build(cls, cfg, num_pages, page_size, dtype, int8, per_layer, mesh, rules, leaf) -> "PagePool":
        """The pool's structure with `leaf(shape, dtype, sharding)` at every array."""
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"PagePool: num_pages ({num_pages}) and page_size ({page_size}) must be >= 1")
        k_shape, k_dtype, s_shape = cls._specs(cfg, num_pages, page_size, dtype, int8, per_layer)
        kv_sh, s_sh = cls._shardings(mesh, rules, per_layer) if mesh is not None else (None, None)

        def arrays(shape, dt, sh):
            if per_layer:
                return tuple(leaf(shape, dt, sh) for _ in range(cfg.num_layers))
            return leaf(shape, dt, sh)

        scales = (lambda: arrays(s_shape, jnp.float32, s_sh)) if int8 else (lambda: None)
        return cls(arrays(k_shape, k_dtype, kv_sh), arrays(k_shape, k_dtype, kv_sh), scales(), scales())

    @classmethod
    def init(cls, cfg: QwenConfig, num_pages: int, page_size: int, dtype: Any = jnp.bfloat16, *,
             int8: bool = False, per_layer: bool = False, mesh: Mesh | None = None,
             rules: Any = "generate") -> "PagePool":
        """A pool of zeros, sharded on `mesh` by `rules` when given (`int8`: int8 pages and float32
        scales, `dtype` unused). Every array is its own buffer (the engine donates the pool: nothing
        may alias)."""
        def make():
            return cls._build(cfg, num_pages, page_size, dtype, int8, per_layer, None, rules,
                              lambda shape, dt, sh: jnp.zeros(shape, dt))

        if mesh is None:
            return make()
        shardings = cls._build(cfg, num_pages, page_size, dtype, int8, per_layer, mesh, rules,
                               lambda shape, dt, sh: sh)
        return jax.jit(make, out_shardings=shardings)()

    @staticmethod
    def abstract(cfg: QwenConfig, num_pages: int, page_size: int, dtype: Any = jnp.bfloat16, *,
                 int8: bool = False, per_layer: bool = False, mesh: Mesh | None = None,
                 rules: Any = "generate") -> "PagePool":
        """The pool as `jax.ShapeDtypeStruct` leaves (with shardings on `mesh`), for AOT lowering."""
        return PagePool._build(cfg, num_pages, page_size, dtype, int8, per_layer, mesh, rules,
                               lambda shape, dt, sh: jax.ShapeDtypeStruct(shape, dt, sharding=sh))

    @staticmethod
    def bytes_per_token(cfg: QwenConfig, dtype: Any = jnp.bfloat16, int8: bool = False) -> int:
        """Pool bytes one token takes over all layers: keys and values (and their int8 scales)."""
        per_head = 2 * (cfg.head_dim + 4) if int8 else 2 * cfg.head_dim * jnp.dtype(dtype).itemsize
        return cfg.num_layers * cfg.num_kv_heads * per_head


# ---- writing ---------------------------------------------------------------------------------
def _check_layer(pool: PagePool, layer: Any, what: str) -> None:
    if pool.per_layer:
        raise ValueError(f"{what}: pass one layer of a per-layer pool, pool.layer(i), with layer=None")
    if (pool.k.ndim == 5) != (layer is not None):
        raise ValueError(f"{what}: a stacked pool [L, K, P, page, D] needs a layer index, one layer's pool "
                         f"(pool.layer(i)) takes layer=None; got keys {pool.k.shape} and layer={layer!r}")


def quantize_int8(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x `[..., D]` -> (int8 `round(x / scale)`, float32 scale `[...]` = max|x| / 127; 0 for all-zero x)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / safe[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def write_pages(pool: PagePool, layer: Any, k_new: jnp.ndarray, v_new: jnp.ndarray,
                slots: jnp.ndarray) -> PagePool:
    """Write keys and values `[B, T, K, D]` at the flat slots `[B, T]` (`page * page_size + offset`)
    of layer `layer` (a stacked pool; None for `pool.layer(i)`). Slots < 0 (padding) and past the pool
    are dropped. One scatter per array into the whole pool, never a copy of the layer's slice."""
    _check_layer(pool, layer, "write_pages")
    page = pool.page_size
    slots = slots.astype(jnp.int32)
    # A negative index would wrap around: send it past the pool instead, where mode="drop" drops it.
    pages = jnp.where(slots < 0, pool.num_pages, slots // page)  # [B, T]
    offsets = slots % page
    if layer is None:  # [K, P, page, D][:, pages, offsets]: the window is [K, B, T] (+ [D])
        where = (slice(None), pages, offsets)
        k_new, v_new = jnp.moveaxis(k_new, 2, 0), jnp.moveaxis(v_new, 2, 0)
    else:  # [L, K, P, page, D][layer, :, pages, offsets]: advanced indices apart, window [B, T, K] (+ [D])
        where = (layer, slice(None), pages, offsets)

    def put(dest, new):
        return dest.at[where].set(new.astype(dest.dtype), mode="drop")

    if not pool.int8:
        return PagePool(put(pool.k, k_new), put(pool.v, v_new))
    (kq, ks), (vq, vs) = quantize_int8(k_new), quantize_int8(v_new)
    return PagePool(put(pool.k, kq), put(pool.v, vq), put(pool.k_scale, ks), put(pool.v_scale, vs))


# ---- attention -------------------------------------------------------------------------------
def _lengths(kv_lengths: jnp.ndarray, q_positions: jnp.ndarray, table_tokens: int) -> jnp.ndarray:
    """Keys any query of a row can see `[B]`: min(kv_length, last query position + 1), within the table."""
    last = jnp.max(q_positions, axis=1).astype(jnp.int32) + 1
    return jnp.clip(jnp.minimum(kv_lengths.astype(jnp.int32), last), 0, table_tokens)


def _gather(x: jnp.ndarray, layer: Any, pages: jnp.ndarray) -> jnp.ndarray:
    """Pages `[B, n]` of one layer: `[B, n, K, ...]` from a stacked array (advanced indices apart), or
    `[K, B, n, ...]` from one layer's array."""
    return x[:, pages] if layer is None else x[layer, :, pages]


def _query_tile(t: int) -> int | None:
    """Queries per tile of a prefill chunk in the reference, or None for the chunk at once: on a CPU,
    tiles of CPU_QUERY_TILE, each with the blocks its own last query needs (a 2,048-token chunk of the
    demo model's shape, one layer: 1.54 -> 0.82 s at 8K tokens of context, 6.15 -> 3.40 s at 32K;
    its scores fit the caches). Elsewhere the whole chunk (not measured there)."""
    if t > CPU_QUERY_TILE and t % CPU_QUERY_TILE == 0 and attn.target_platform()[0] == "cpu":
        return CPU_QUERY_TILE
    return None


def xla_paged_attention(q: jnp.ndarray, pool: PagePool, layer: Any, page_tables: jnp.ndarray,
                        q_positions: jnp.ndarray, kv_lengths: jnp.ndarray) -> jnp.ndarray:
    """The reference: blocks of `pages_per_block(page)` pages gathered through the page tables, an
    online float32 softmax, in a while loop over the blocks any row still needs (on a CPU, for each
    tile of `_query_tile` queries in turn)."""
    _check_layer(pool, layer, "paged_attention")
    b, t, h, d = q.shape
    if (tile := _query_tile(t)) is not None:
        n = t // tile
        tiles = (q.reshape(b, n, tile, h, d).swapaxes(0, 1), q_positions.reshape(b, n, tile).swapaxes(0, 1))
        out = jax.lax.map(lambda a: _xla_paged_attention(a[0], pool, layer, page_tables, a[1], kv_lengths), tiles)
        return out.swapaxes(0, 1).reshape(b, t, h, d)
    return _xla_paged_attention(q, pool, layer, page_tables, q_positions, kv_lengths)


def _xla_paged_attention(q: jnp.ndarray, pool: PagePool, layer: Any, page_tables: jnp.ndarray,
                         q_positions: jnp.ndarray, kv_lengths: jnp.ndarray) -> jnp.ndarray:
    b, t, h, d = q.shape
    kv_heads, page = pool.k.shape[-4], pool.page_size
    g = h // kv_heads
    n_pages = pages_per_block(page)
    blk = n_pages * page
    table_pages = page_tables.shape[1]
    tables = jnp.clip(page_tables.astype(jnp.int32), 0, pool.num_pages - 1)  # unused entries: any valid page
    lengths = _lengths(kv_lengths, q_positions, table_pages * page)  # [B]
    q_pos = q_positions.astype(jnp.int32)
    qg = q.reshape(b, t, kv_heads, g, d)
    # Gathered blocks: [B, n, K, page, D] from a stacked pool, [K, B, n, page, D] from one layer's.
    kv_letters = "kbpod" if layer is None else "bpkod"
    scale = d ** -0.5

    def block(i, carry):
        m, l, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, D]
        cols = i * n_pages + jnp.arange(n_pages, dtype=jnp.int32)  # table columns of this block
        pages = jnp.take(tables, jnp.minimum(cols, table_pages - 1), axis=1)  # [B, n]
        kb, vb = _gather(pool.k, layer, pages), _gather(pool.v, layer, pages)
        if pool.int8:  # dequantize in float32, per token and head
            ks, vs = _gather(pool.k_scale, layer, pages), _gather(pool.v_scale, layer, pages)
            kb = kb.astype(jnp.float32) * ks[..., None]
            vb = vb.astype(jnp.float32) * vs[..., None]
        scores = jnp.einsum(f"btkgd,{kv_letters}->bkgtpo", qg, kb, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kv_heads, g, t, blk) * scale
        pos = i * blk + jnp.arange(blk, dtype=jnp.int32)  # [blk] token positions of this block
        visible = (pos[None, None, :] <= q_pos[:, :, None]) & (pos[None, None, :] < lengths[:, None, None])
        scores = jnp.where(visible[:, None, None], scores, attn._MASKED)  # [B, K, G, T, blk]
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        p = jnp.exp(scores - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1)
        p = p.reshape(b, kv_heads, g, t, n_pages, page).astype(vb.dtype)
        pv = jnp.einsum(f"bkgtpo,{kv_letters}->bkgtd", p, vb, preferred_element_type=jnp.float32)
        return m_new, l, acc * correction[..., None] + pv

    init = (jnp.full((b, kv_heads, g, t), attn._MASKED, jnp.float32), jnp.zeros((b, kv_heads, g, t), jnp.float32),
            jnp.zeros((b, kv_heads, g, t, d), jnp.float32))
    max_blocks = -(-table_pages // n_pages)
    n_blocks = jnp.clip((jnp.max(lengths) + blk - 1) // blk, 1, max_blocks)  # >= 1: l > 0 for every query
    _, l, acc = jax.lax.fori_loop(0, n_blocks, block, init)
    out = acc / l[..., None]  # l >= 1 for a query that sees a key: the running max's own term is exp(0)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


# ---- the Pallas TPU kernel ---------------------------------------------------------------------
def _pallas_unsupported(q: jnp.ndarray, pool: PagePool) -> str | None:
    """Why the Pallas paged-attention kernel cannot take this call, or None."""
    if q.shape[1] != 1:
        return f"the Pallas paged-attention kernel decodes one token per row (T == 1), got T = {q.shape[1]}"
    if pool.int8:  # the kernel wants scales [K, P, page, D]: a float32 copy of the whole pool
        return "the Pallas paged-attention kernel would need int8 scales broadcast over head_dim"
    if (dtype := jnp.dtype(pool.k.dtype).name) != "bfloat16":  # it rounds float32 pages to bfloat16
        return f"the Pallas paged-attention kernel computes with bfloat16 pages, got {dtype}"
    if q.shape[-1] % 128:
        return f"the Pallas paged-attention kernel needs head_dim a multiple of 128, got {q.shape[-1]}"
    if pool.page_size % 8:
        return f"the Pallas paged-attention kernel needs a page size that is a multiple of 8, got {pool.page_size}"
    return None


def _pallas_local(q, k, v, layer, page_tables, q_positions, kv_lengths):
    """The kernel on one device's arrays: q `[B, 1, H, D]`, pool `[(L,) K, P, page, D]`."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as kernel

    b, _, h, d = q.shape
    kv_heads, num_pages, page = k.shape[-4], k.shape[-3], k.shape[-2]
    table_pages = page_tables.shape[1]
    per_block = min(pages_per_block(page), table_pages)
    width = -(-table_pages // per_block) * per_block  # the kernel wants whole compute blocks per row
    tables = jnp.clip(page_tables.astype(jnp.int32), 0, num_pages - 1)
    tables = jnp.pad(tables, ((0, 0), (0, width - table_pages)))
    # Every (row, KV head) is one row of the kernel's batch, reading pool pages of the flat
    # [L * K * P] axis: page p of head k in layer l is page (l * K + k) * P + p.
    heads = jnp.arange(kv_heads, dtype=jnp.int32)
    first = (heads if layer is None else jnp.asarray(layer, jnp.int32) * kv_heads + heads) * num_pages
    indices = (tables[:, None, :] + first[None, :, None]).reshape(b * kv_heads, width)
    lengths = _lengths(kv_lengths, q_positions, table_pages * page)
    lengths = jnp.repeat(lengths, kv_heads)  # [B * K]
    qs = (q.astype(jnp.float32) * d ** -0.5).reshape(b * kv_heads, h // kv_heads, d)  # float32: no rounding

    def flat(x):  # a free reshape: [(L,) K, P, page, D] -> [1, (L *) K * P, page, D]
        return x.reshape(1, -1, page, d)

    out = kernel(qs, flat(k), flat(v), lengths, indices, mask_value=attn._MASKED, pages_per_compute_block=per_block)
    return out.reshape(b, 1, h, d).astype(q.dtype)


def pallas_paged_attention(q: jnp.ndarray, pool: PagePool, layer: Any, page_tables: jnp.ndarray,
                           q_positions: jnp.ndarray, kv_lengths: jnp.ndarray) -> jnp.ndarray:
    """Decoding with the Pallas TPU kernel (the caller checks `_pallas_unsupported` first)."""
    _check_layer(pool, layer, "paged_attention")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _pallas_local(q, pool.k, pool.v, layer, page_tables, q_positions, kv_lengths)
    # A Mosaic kernel is not partitioned automatically: run it per shard.
    from jax.sharding import PartitionSpec as P

    from sharding.rules import get_rules

    rules = get_rules("generate")

    def axes(name: str, size: int) -> Any:
        names = rules[name] if isinstance(rules[name], tuple) else (rules[name],)
        used = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
        if not used or size % math.prod(mesh.shape[a] for a in used):
            return None
        return used if len(used) > 1 else used[0]

    rows, heads = axes("batch", q.shape[0]), axes("kv_heads", pool.k.shape[-4])
    pool_spec = P(*([None] * (pool.k.ndim - 4)), heads, None, None, None)
    layer_args = () if layer is None else (jnp.asarray(layer, jnp.int32),)

    def local(q, k, v, page_tables, q_positions, kv_lengths, *layer_args):
        return _pallas_local(q, k, v, layer_args[0] if layer_args else None, page_tables, q_positions, kv_lengths)

    spec_q = P(rows, None, heads, None)
    run = jax.shard_map(local, mesh=mesh, check_vma=False, out_specs=spec_q,
                        in_specs=(spec_q, pool_spec, pool_spec, P(rows, None), P(rows, None), P(rows))
                        + ((P(),) if layer_args else ()))
    return run(q, pool.k, pool.v, page_tables, q_positions, kv_lengths, *layer_args)


# ---- choosing --------------------------------------------------------------------------------
def resolve_backend(backend: str) -> str:
    """"pallas" or "xla": what `backend` (a qwq_jax.attention name, or "pallas") runs as for paged
    attention here; a ValueError for an unknown name or one this platform cannot run."""
    if backend == "pallas":
        if (platform := attn.target_platform()[0]) != "tpu":
            raise ValueError(f"paged attention backend 'pallas' needs a TPU, but this process targets {platform!r} "
                             f"(use 'auto' or 'xla')")
        return "pallas"
    return "pallas" if attn.check_backend(backend) in _PALLAS_NAMES else "xla"


def paged_attention(q: jnp.ndarray, pool: PagePool, layer: Any, page_tables: jnp.ndarray,
                    q_positions: jnp.ndarray, kv_lengths: jnp.ndarray, *, backend: str = "auto") -> jnp.ndarray:
    """Attention of queries `[B, T, H, D]` at positions `[B, T]` to the keys and values of layer `layer`
    (stacked pool: an int32 scalar; `pool.layer(i)`: None) that the page tables `[B, max_pages]` point
    to. Key j of row b is seen by query (b, t) iff `j <= q_positions[b, t]` and `j < kv_lengths[b]`.
    Returns `[B, T, H, D]` in q's dtype; a query that sees no key gives a finite, unspecified output."""
    if resolve_backend(backend) == "pallas":
        reason = _pallas_unsupported(q, pool)
        if reason is None:
            return pallas_paged_attention(q, pool, layer, page_tables, q_positions, kv_lengths)
        if q.shape[1] == 1:  # prefill chunks always take the reference: nothing to report
            attn._fallback(backend, reason)
    return xla_paged_attention(q, pool, layer, page_tables, q_positions, kv_lengths)
