"""qwq_jax/paged_attention.py against a float64 NumPy reference that gathers each row's tokens through
its page table and takes a dense masked softmax. Tiny shapes; GQA (H = 2 K) throughout."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from qwq_jax import attention
from qwq_jax.config import QwenConfig
from qwq_jax.paged_attention import BLOCK_TOKENS, PagePool, pages_per_block, paged_attention, write_pages
from sharding import make_mesh

pytestmark = pytest.mark.compile_bound  # tiny models: XLA compiling dominates (conftest)

L, K, H, D = 2, 2, 4, 8
CFG = QwenConfig(vocab_size=16, hidden_size=32, intermediate_size=32, num_layers=L, num_heads=H,
                 num_kv_heads=K, head_dim=D)
attend = jax.jit(paged_attention, static_argnames="backend")
write = jax.jit(write_pages)


def random_pool(rng: np.random.Generator, pages: int, page: int, per_layer: bool = False, d: int = D) -> PagePool:
    k, v = (rng.standard_normal((L, K, pages, page, d)).astype(np.float32) for _ in range(2))
    if per_layer:
        return PagePool(tuple(jnp.asarray(x) for x in k), tuple(jnp.asarray(x) for x in v))
    return PagePool(jnp.asarray(k), jnp.asarray(v))


def layer_arrays(pool: PagePool, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """One layer's keys and values [K, P, page, D] in float64 (int8 pools dequantized)."""
    def get(x, s):
        x = np.asarray(x[layer], np.float64)
        return x if s is None else x * np.asarray(s[layer], np.float64)[..., None]
    return get(pool.k, pool.k_scale), get(pool.v, pool.v_scale)


def reference(q, k, v, tables, q_positions, kv_lengths) -> np.ndarray:
    """Float64 paged attention: q [B, T, H, D]; k, v one layer [K, P, page, D]. NaN where a query sees nothing."""
    q, tables, q_positions = np.asarray(q, np.float64), np.asarray(tables), np.asarray(q_positions)
    b, t, h, d = q.shape
    page, g = k.shape[2], h // k.shape[0]
    out = np.full(q.shape, np.nan)
    for row in range(b):
        j = np.arange(int(kv_lengths[row]))
        pages, offsets = tables[row, j // page], j % page
        keys, values = k[:, pages, offsets], v[:, pages, offsets]  # [K, n, D]
        for i in range(t):
            seen = j <= q_positions[row, i]
            if not seen.any():
                continue
            for head in range(h):
                s = keys[head // g, seen] @ q[row, i, head] / np.sqrt(d)
                p = np.exp(s - s.max())
                out[row, i, head] = (p / p.sum()) @ values[head // g, seen]
    return out


def tables_for(rng: np.random.Generator, lengths, page: int, width: int, pages: int) -> np.ndarray:
    """Page tables [B, width] over distinct random pages; unused entries hold junk (-1 and past the pool)."""
    free = iter(rng.permutation(pages))
    tables = np.where(rng.random((len(lengths), width)) < 0.5, -1, pages + 7).astype(np.int32)
    for row, n in enumerate(lengths):
        for col in range(-(-n // page)):
            tables[row, col] = next(free)
    return tables


def test_block_constant():
    assert pages_per_block(16) == BLOCK_TOKENS // 16 and pages_per_block(12) == 21 and pages_per_block(1000) == 1


def test_decode_ragged_lengths():
    # page 16: blocks of 16 pages = 256 tokens. One token, just under / exactly / just over one page,
    # around the first block boundary, and several blocks.
    rng = np.random.default_rng(0)
    page, width, pages = 16, 40, 100
    lengths = np.array([1, 15, 16, 17, 255, 256, 257, 600], np.int32)
    pool = random_pool(rng, pages, page)
    tables = tables_for(rng, lengths, page, width, pages)
    q = rng.standard_normal((len(lengths), 1, H, D)).astype(np.float32)
    positions = (lengths - 1)[:, None]
    positions[3] = 200  # a query past its row's length sees only the row's kv_lengths keys
    out = attend(q, pool, jnp.int32(1), tables, positions, lengths)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference(q, *layer_arrays(pool, 1), tables, positions, lengths),
                               rtol=1e-5, atol=1e-5)


def test_chunked_prefill_causal_and_padding_queries():
    # page 12: blocks of 21 pages = 252 tokens. Chunks of T = 8 at their positions against their own
    # pages (already written): from 0, across the first block boundary, and one with 3 real tokens
    # followed by padding (position -1); plus a row that is all padding (length 0).
    rng = np.random.default_rng(1)
    page, width, pages, t = 12, 30, 60, 8
    starts, real = np.array([0, 248, 5, 0]), np.array([8, 8, 3, 0])
    lengths = (starts + real).astype(np.int32)
    pool = random_pool(rng, pages, page, per_layer=True)
    tables = tables_for(rng, lengths, page, width, pages)
    positions = np.where(np.arange(t)[None, :] < real[:, None], starts[:, None] + np.arange(t), -1).astype(np.int32)
    q = rng.standard_normal((len(starts), t, H, D)).astype(np.float32)
    out = np.asarray(attend(q, pool.layer(0), None, tables, positions, lengths))
    assert np.isfinite(out).all()
    want = reference(q, *layer_arrays(pool, 0), tables, positions, lengths)
    valid = positions >= 0
    np.testing.assert_allclose(out[valid], want[valid], rtol=1e-5, atol=1e-5)


def test_prefill_chunk_in_query_tiles_on_cpu(monkeypatch):
    # A chunk of T = 2 CPU_QUERY_TILE queries runs as two tiles here, each with its own trip count: a
    # row whose second tile crosses block boundaries, one whose last real query is in the first tile
    # (then padding), one starting mid-page; equal to the float64 reference and to the chunk at once.
    from qwq_jax import paged_attention as pa

    t = 2 * pa.CPU_QUERY_TILE
    assert pa._query_tile(t) == pa.CPU_QUERY_TILE and pa._query_tile(pa.CPU_QUERY_TILE) is None
    rng = np.random.default_rng(7)
    page, pages = 16, 120
    starts, real = np.array([300, 0, 13]), np.array([t, 200, t - 5])
    lengths = (starts + real).astype(np.int32)
    width = -(-int(lengths.max()) // page)
    pool = random_pool(rng, pages, page)
    tables = tables_for(rng, lengths, page, width, pages)
    positions = np.where(np.arange(t)[None, :] < real[:, None], starts[:, None] + np.arange(t), -1).astype(np.int32)
    q = rng.standard_normal((len(starts), t, H, D)).astype(np.float32)
    tiled = np.asarray(jax.jit(pa.xla_paged_attention)(q, pool, jnp.int32(1), tables, positions, lengths))
    valid = positions >= 0
    want = reference(q, *layer_arrays(pool, 1), tables, positions, lengths)
    np.testing.assert_allclose(tiled[valid], want[valid], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(pa, "_query_tile", lambda t: None)
    whole = np.asarray(jax.jit(pa.xla_paged_attention)(q, pool, jnp.int32(1), tables, positions, lengths))
    np.testing.assert_allclose(tiled[valid], whole[valid], rtol=1e-6, atol=1e-6)


def test_rows_sharing_prefix_pages():
    rng = np.random.default_rng(2)
    page, pages = 16, 12
    pool = random_pool(rng, pages, page)
    shared = [3, 7, 1]  # three full prompt pages in both rows, then each row's own pages
    tables = np.array([shared + [5, 0, 0], shared + [9, 2, 11]], np.int32)
    lengths = np.array([60, 85], np.int32)
    positions = np.array([[20, 59], [20, 84]], np.int32)
    q = np.broadcast_to(rng.standard_normal((1, 2, H, D)), (2, 2, H, D)).astype(np.float32)
    out = np.asarray(attend(q, pool, jnp.int32(0), tables, positions, lengths))
    np.testing.assert_allclose(out, reference(q, *layer_arrays(pool, 0), tables, positions, lengths),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[0, 0], out[1, 0])  # the same query over the same pages


def test_int8_pool():
    rng = np.random.default_rng(3)
    page, pages, b = 16, 24, 3
    lengths = np.array([5, 16, 300], np.int32)
    tables = tables_for(rng, lengths, page, 20, pages)
    n = int(lengths.max())
    keys, values = (rng.standard_normal((b, n, K, D)).astype(np.float32) for _ in range(2))
    j = np.arange(n)
    slots = np.where(j[None] < lengths[:, None], np.take_along_axis(tables, j[None] // page, 1) * page + j % page, -1)
    pool = write(PagePool.init(CFG, pages, page, int8=True), jnp.int32(1), keys, values, slots.astype(np.int32))
    q = rng.standard_normal((b, 1, H, D)).astype(np.float32)
    positions = (lengths - 1)[:, None]
    out = np.asarray(attend(q, pool, jnp.int32(1), tables, positions, lengths))
    # Against the dequantized pool: float32 rounding only.
    np.testing.assert_allclose(out, reference(q, *layer_arrays(pool, 1), tables, positions, lengths),
                               rtol=1e-5, atol=1e-5)
    # Against the float keys and values: rounding to int8 moves each element by at most scale / 2
    # (scale = max|x| / 127 per token and head), so a score moves by at most
    # delta = sum_d |q_d| * max_scale_k / 2 / sqrt(D). Perturbing every score by at most delta changes
    # the softmax probabilities by at most exp(2 delta) - 1 in L1 norm, and the output by at most
    # (exp(2 delta) - 1) * max|v| + max_scale_v / 2.
    exact = PagePool(*(np.zeros((L, K, pages, page, D), np.float32) for _ in range(2)))
    exact = write(exact, jnp.int32(1), keys, values, slots.astype(np.int32))
    want = reference(q, *layer_arrays(exact, 1), tables, positions, lengths)
    s_k, s_v = np.abs(keys).max() / 127, np.abs(values).max() / 127
    delta = np.abs(q).sum(-1).max() * s_k / 2 / np.sqrt(D)
    bound = np.expm1(2 * delta) * np.abs(values).max() + s_v / 2
    assert np.abs(out - want).max() <= bound + 1e-5, (np.abs(out - want).max(), bound)


def test_write_pages_by_hand():
    rng = np.random.default_rng(4)
    page, pages = 4, 3
    # slot 6 = page 1 offset 2, slot 10 = page 2 offset 2; -1 dropped (padding: it must not wrap around to
    # the last slot), 12 past the pool dropped
    slots = np.array([[0, 6, -1], [10, 12, 5]], np.int32)
    k_new, v_new = (rng.standard_normal((2, 3, K, D)).astype(np.float32) for _ in range(2))
    placed = {(0, 0): (0, 0), (0, 1): (1, 2), (1, 0): (2, 2), (1, 2): (1, 1)}  # (b, t) -> (page, offset)

    def expected(new):
        out = np.zeros((K, pages, page, D), np.float32)
        for (b, t), (p, o) in placed.items():
            out[:, p, o] = new[b, t]
        return out

    stacked = write(PagePool.init(CFG, pages, page, jnp.float32), jnp.int32(1), k_new, v_new, slots)
    np.testing.assert_array_equal(stacked.k[1], expected(k_new))
    np.testing.assert_array_equal(stacked.v[1], expected(v_new))
    assert not np.asarray(stacked.k[0]).any() and not np.asarray(stacked.v[0]).any()
    per_layer = PagePool.init(CFG, pages, page, jnp.float32, per_layer=True)
    one = write(per_layer.layer(1), None, k_new, v_new, slots)
    assert one.k.shape == (K, pages, page, D)
    np.testing.assert_array_equal(one.k, expected(k_new))
    np.testing.assert_array_equal(one.v, expected(v_new))
    # int8: round(x / scale) with scale = max|x| / 127 per token and head; an all-zero vector: scale 0, zeros
    k_new[1, 2] = 0.0
    q8 = write(PagePool.init(CFG, pages, page, int8=True), jnp.int32(0), k_new, v_new, slots)
    assert q8.k.dtype == jnp.int8 and q8.k_scale.shape == (L, K, pages, page)
    scale = np.abs(k_new).max(-1) / 127  # [B, T, K]
    for (b, t), (p, o) in placed.items():
        np.testing.assert_allclose(q8.k_scale[0, :, p, o], scale[b, t], rtol=1e-6)
        want = np.round(k_new[b, t] / np.where(scale[b, t] > 0, scale[b, t], 1)[:, None])
        np.testing.assert_array_equal(q8.k[0, :, p, o], want)
    assert not np.asarray(q8.k[0, :, 1, 1]).any() and not np.asarray(q8.k_scale[0, :, 1, 1]).any()
    with pytest.raises(ValueError, match="layer"):
        write_pages(stacked, None, k_new, v_new, slots)


def test_rows_are_bitwise_independent():
    # Row 0's output is identical whether row 1 ends in row 0's first block or four blocks later:
    # the extra blocks are exact no-ops for row 0.
    rng = np.random.default_rng(5)
    page, width, pages = 16, 60, 64
    pool = random_pool(rng, pages, page)
    q = rng.standard_normal((2, 1, H, D)).astype(np.float32)
    outs = []
    for other in (3, 900):
        lengths = np.array([40, other], np.int32)
        tables = tables_for(np.random.default_rng(6), lengths, page, width, pages)
        outs.append(np.asarray(attend(q, pool, jnp.int32(0), tables, (lengths - 1)[:, None], lengths)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert not np.array_equal(outs[0][1], outs[1][1])
    # Nothing to see in any row (all padding): one fully masked block, still finite.
    empty = attend(q, pool, jnp.int32(0), tables, np.full((2, 1), -1, np.int32), np.zeros(2, np.int32))
    assert np.isfinite(np.asarray(empty)).all()


def test_bfloat16_and_backend_names():
    rng = np.random.default_rng(7)
    page, pages = 8, 16
    pool = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_pool(rng, pages, page))
    lengths = np.array([9, 70], np.int32)
    tables = tables_for(rng, lengths, page, 10, pages)
    q = rng.standard_normal((2, 1, H, D)).astype(jnp.bfloat16)
    out = attend(q, pool, jnp.int32(0), tables, (lengths - 1)[:, None], lengths, backend="xla")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               reference(q, *layer_arrays(pool, 0), tables, (lengths - 1)[:, None], lengths),
                               atol=3e-2)
    with pytest.raises(ValueError, match="unknown"):
        paged_attention(q, pool, jnp.int32(0), tables, (lengths - 1)[:, None], lengths, backend="nope")
    with pytest.raises(ValueError, match="TPU"):
        paged_attention(q, pool, jnp.int32(0), tables, (lengths - 1)[:, None], lengths, backend="pallas")


def test_pool_init_abstract_and_bytes():
    for kw in ({}, {"int8": True}, {"per_layer": True}, {"per_layer": True, "int8": True}):
        pool = PagePool.init(CFG, 5, 4, jnp.bfloat16, **kw)
        abstract = PagePool.abstract(CFG, 5, 4, jnp.bfloat16, **kw)
        assert jax.tree.structure(pool) == jax.tree.structure(abstract)
        assert [(x.shape, x.dtype) for x in jax.tree.leaves(pool)] == \
               [(x.shape, x.dtype) for x in jax.tree.leaves(abstract)]
        assert (pool.num_pages, pool.page_size, pool.int8, pool.per_layer) == \
               (5, 4, kw.get("int8", False), kw.get("per_layer", False))
        nbytes = sum(x.nbytes for x in jax.tree.leaves(pool))
        assert PagePool.bytes_per_token(CFG, jnp.bfloat16, kw.get("int8", False)) * 5 * 4 == nbytes
        if pool.per_layer:
            assert pool.layer(1).k.shape == (K, 5, 4, D) and pool.layer(1).int8 == pool.int8
        else:
            assert pool.k.shape == (L, K, 5, 4, D)
            with pytest.raises(ValueError, match="per-layer"):
                pool.layer(0)


def test_sharded_pool_matches_unsharded():
    mesh = make_mesh("data=4,tensor=2", jax.devices()[:8])
    rng = np.random.default_rng(8)
    page, pages, b = 8, 16, 4
    lengths = np.array([1, 8, 30, 61], np.int32)
    tables = tables_for(rng, lengths, page, 8, pages)
    n = int(lengths.max())
    j = np.arange(n)
    slots = np.where(j[None] < lengths[:, None], np.take_along_axis(tables, j[None] // page, 1) * page + j % page, -1)
    keys, values = (rng.standard_normal((b, n, K, D)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((b, 1, H, D)).astype(np.float32)
    outs = []
    for m in (None, mesh):
        pool = write(PagePool.init(CFG, pages, page, jnp.float32, mesh=m), jnp.int32(1), keys, values,
                     slots.astype(np.int32))
        if m is not None:
            assert pool.k.sharding.spec == P(None, "tensor", None, None, None)
            assert pool.k.sharding.is_equivalent_to(PagePool.abstract(CFG, pages, page, jnp.float32,
                                                                      mesh=m).k.sharding, 5)
        args = (q, pool, jnp.int32(1), tables, (lengths - 1)[:, None], lengths)
        outs.append(np.asarray(attend(*args)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    # Each device gathers its own KV heads' pages: the pool is never gathered across devices.
    assert "all-gather" not in attend.lower(*args).compile().as_text()


def test_pallas_kernel_in_tpu_interpret_mode():
    # The Pallas path run on CPU by Pallas's TPU interpreter ("auto" chooses it for a TPU target):
    # empty, one-token, one-page and two-block rows (page 16: compute blocks of 16 pages), a stacked pool
    # with a traced layer, one layer's pool, and in shard_map under a mesh (rows over data, KV heads
    # over tensor). Out-of-bounds reads raise in the interpreter, so the clamped page indices are checked too.
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(9)
    page, width, pages = 16, 20, 24
    lengths = np.array([0, 1, 16, 257], np.int32)
    pool = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_pool(rng, pages, page, d=128))
    tables = tables_for(rng, lengths, page, width, pages)
    q = rng.standard_normal((len(lengths), 1, H, 128)).astype(np.float32)
    positions = (lengths - 1)[:, None]
    mesh = make_mesh("data=2,tensor=2", jax.devices()[:4])
    with attention.compile_for("tpu"), pltpu.force_tpu_interpret_mode():
        stacked = attend(q, pool, jnp.int32(1), tables, positions, lengths)
        one = attend(q, PagePool(pool.k[0], pool.v[0]), None, tables, positions, lengths)
        with jax.set_mesh(mesh):
            sharded = jax.device_put(pool, NamedSharding(mesh, P(None, "tensor")))
            in_mesh = attend(q, sharded, jnp.int32(1), tables, positions, lengths)
    real = lengths > 0
    for layer, out in ((1, stacked), (0, one), (1, in_mesh)):
        out = np.asarray(out)
        assert np.isfinite(out).all()
        want = reference(q, *layer_arrays(pool, layer), tables, positions, lengths)
        np.testing.assert_allclose(out[real], want[real], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(in_mesh, stacked)


def _tpu_devices():
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip('libtpu is not installed (pip install "jax[tpu]"): no offline TPU compiler')
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # as qwq_jax.plan: other processes may hold it
    return topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu", chip_config_name="default").devices


# The persistent compilation cache stores libtpu's executables but cannot load them without a TPU client.
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
def test_pallas_path_compiles_with_the_real_tpu_compiler():
    # The Pallas kernel lowers to a Mosaic "tpu_custom_call" that libtpu compiles here without a TPU.
    # Head dim 128 and pages of 16 tokens (the kernel's tiles); a stacked pool indexed by a traced layer,
    # one layer's pool, and under a mesh (the kernel in shard_map, KV heads over tensor).
    devices = _tpu_devices()
    cfg = CFG.replace(head_dim=128)
    b, width, pages, page = 4, 6, 32, 16

    def args(sharding, pool):
        spec = lambda shape, dtype, s=sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=s)  # noqa: E731
        return (spec((b, 1, H, 128), jnp.bfloat16), pool, spec((b, width), jnp.int32), spec((b, 1), jnp.int32),
                spec((b,), jnp.int32))

    def compiled(fn, q, pool, *rest):
        with attention.compile_for(devices[0]):
            return jax.jit(fn).lower(q, pool, *rest).compile().as_text()

    one = jax.sharding.SingleDeviceSharding(devices[0])
    pool = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                        PagePool.abstract(cfg, pages, page, jnp.bfloat16))
    q, pool, tables, positions, lengths = args(one, pool)
    layer = jax.ShapeDtypeStruct((), jnp.int32, sharding=one)
    stacked = compiled(lambda q, pool, layer, *r: paged_attention(q, pool, layer, *r), q, pool, layer, tables,
                       positions, lengths)
    assert "tpu_custom_call" in stacked
    per_layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                             PagePool.abstract(cfg, pages, page, jnp.bfloat16, per_layer=True))
    assert "tpu_custom_call" in compiled(lambda q, pool, *r: paged_attention(q, pool, None, *r),
                                         q, per_layer.layer(1), tables, positions, lengths)
    # int8 pages and prefill chunks take the reference: no kernel.
    int8 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                        PagePool.abstract(cfg, pages, page, jnp.bfloat16, int8=True))
    assert "tpu_custom_call" not in compiled(lambda q, pool, layer, *r: paged_attention(q, pool, layer, *r),
                                             q, int8, layer, tables, positions, lengths)
    # Under a mesh: rows over data, KV heads over tensor, the kernel per shard.
    mesh = make_mesh("data=2,tensor=2", devices)
    pool = PagePool.abstract(cfg, pages, page, jnp.bfloat16, mesh=mesh)
    rows = NamedSharding(mesh, P("data"))
    q, _, tables, positions, lengths = args(rows, pool)
    q = jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=NamedSharding(mesh, P("data", None, "tensor", None)))
    layer = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        text = compiled(lambda q, pool, layer, *r: paged_attention(q, pool, layer, *r), q, pool, layer, tables,
                        positions, lengths)
    assert "tpu_custom_call" in text and "all-gather" not in text
