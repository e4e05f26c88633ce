"""benchmarks/hlo_buffers.py: weight-sized buffers of compiled programs, counted per loop trip,
on HLO written by hand and on programs XLA compiles here."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from hlo_buffers import model_weight_shapes, weight_sized_buffers  # noqa: E402

# A decode-like program: an outer loop (7 trips: "steps") around a layer loop (4 trips) whose body
# materialises one layer's f32[96,200] weight slice (a fusion; its body is not materialised) before
# the dot, and, once per call outside both loops, a bf16 copy of the whole stacked weight.
HLO = """HloModule handwritten, entry_computation_layout={(f32[4,96,200]{2,1,0}, f32[1,96]{1,0})->f32[1,96]{1,0}}

%fused_slice (p0: f32[4,96,200], p1: s32[]) -> f32[96,200] {
  %p0 = f32[4,96,200]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  %ds = f32[1,96,200]{2,1,0} dynamic-slice(%p0, %p1, %zero, %zero), dynamic_slice_sizes={1,96,200}
  ROOT %b = f32[96,200]{1,0} bitcast(%ds)
}

%layer_body (arg: (s32[], f32[1,96], f32[4,96,200])) -> (s32[], f32[1,96], f32[4,96,200]) {
  %arg = (s32[], f32[1,96]{1,0}, f32[4,96,200]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %x = f32[1,96]{1,0} get-tuple-element(%arg), index=1
  %w = f32[4,96,200]{2,1,0} get-tuple-element(%arg), index=2
  %slice_fusion = f32[96,200]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %dot = f32[1,200]{1,0} dot(%x, %slice_fusion), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %y = f32[1,96]{1,0} slice(%dot), slice={[0:1], [0:96]}
  ROOT %t = (s32[], f32[1,96]{1,0}, f32[4,96,200]{2,1,0}) tuple(%i, %y, %w)
}

%layer_cond (arg: (s32[], f32[1,96], f32[4,96,200])) -> pred[] {
  %arg = (s32[], f32[1,96]{1,0}, f32[4,96,200]{2,1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

%step_body (arg: (s32[], f32[1,96], f32[4,96,200])) -> (s32[], f32[1,96], f32[4,96,200]) {
  %arg = (s32[], f32[1,96]{1,0}, f32[4,96,200]{2,1,0}) parameter(0)
  ROOT %layers = (s32[], f32[1,96]{1,0}, f32[4,96,200]{2,1,0}) while(%arg), condition=%layer_cond, body=%layer_body, backend_config={"known_trip_count":{"n":"4"},"known_init_step":{"init":"0","step":"1"}}
}

ENTRY %main (w: f32[4,96,200], x: f32[1,96]) -> f32[1,96] {
  %w = f32[4,96,200]{2,1,0} parameter(0)
  %x = f32[1,96]{1,0} parameter(1)
  %as_bf16 = bf16[4,96,200]{2,1,0} convert(%w)
  %zero = s32[] constant(0)
  %t0 = (s32[], f32[1,96]{1,0}, f32[4,96,200]{2,1,0}) tuple(%zero, %x, %w)
  %steps = (s32[], f32[1,96]{1,0}, f32[4,96,200]{2,1,0}) while(%t0), condition=%layer_cond, body=%step_body, backend_config={"known_trip_count":{"n":"7"}}
  ROOT %out = f32[1,96]{1,0} get-tuple-element(%steps), index=1
}
"""


def test_handwritten_program_counted_by_hand():
    report = weight_sized_buffers(HLO, {"gate": (4, 96, 200)})
    bufs = {b["instruction"]: b for b in report["buffers"]}
    assert set(bufs) == {"slice_fusion", "as_bf16"}  # not the fusion body's dynamic-slice, not parameters
    assert bufs["slice_fusion"]["times"] == 4 and bufs["slice_fusion"]["in_loop"]
    assert bufs["slice_fusion"]["matches"] == ["gate, one layer"]
    assert bufs["as_bf16"]["bytes"] == 4 * 96 * 200 * 2 and not bufs["as_bf16"]["in_loop"]
    assert report["copied_bytes_in_loops"] == 96 * 200 * 4 * 4  # one layer's f32 slice, 4 layers per step
    assert report["copied_bytes_outside"] == 4 * 96 * 200 * 2
    # Counting the outer loop's 7 trips too (a program whose outermost loop is not the unit):
    assert weight_sized_buffers(HLO, {"gate": (4, 96, 200)},
                                outer_loop_is_unit=False)["copied_bytes_in_loops"] == 96 * 200 * 4 * 4 * 7
    # A weight of another size matches nothing; small sizes are ignored.
    assert weight_sized_buffers(HLO, {"other": (4, 97, 200)})["buffers"] == []
    assert weight_sized_buffers(HLO, {"gate": (4, 96, 200)}, min_elements=10**6)["buffers"] == []


# One token's keys written into a cache-sized buffer per step: a fusion whose root is a
# dynamic-update-slice (XLA does it in place), beside a real copy of the cache (a transpose).
HLO_CACHE = """HloModule cache_update

%fused_dus (p0: bf16[2,8,64,16], p1: bf16[2,8,1,16], p2: s32[]) -> bf16[2,8,64,16] {
  %p0 = bf16[2,8,64,16]{3,2,1,0} parameter(0)
  %p1 = bf16[2,8,1,16]{3,2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = bf16[2,8,64,16]{3,2,1,0} dynamic-update-slice(%p0, %p1, %z, %z, %p2, %z)
}

%step (arg: (s32[], bf16[2,8,64,16], bf16[2,8,1,16])) -> (s32[], bf16[2,8,64,16], bf16[2,8,1,16]) {
  %arg = (s32[], bf16[2,8,64,16]{3,2,1,0}, bf16[2,8,1,16]{3,2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %c = bf16[2,8,64,16]{3,2,1,0} get-tuple-element(%arg), index=1
  %new = bf16[2,8,1,16]{3,2,1,0} get-tuple-element(%arg), index=2
  %write = bf16[2,8,64,16]{3,2,1,0} fusion(%c, %new, %i), kind=kLoop, calls=%fused_dus
  %moved = bf16[2,8,16,64]{3,2,1,0} transpose(%write), dimensions={0,1,3,2}
  ROOT %t = (s32[], bf16[2,8,64,16]{3,2,1,0}, bf16[2,8,1,16]{3,2,1,0}) tuple(%i, %write, %new)
}

%cond (arg: (s32[], bf16[2,8,64,16], bf16[2,8,1,16])) -> pred[] {
  %arg = (s32[], bf16[2,8,64,16]{3,2,1,0}, bf16[2,8,1,16]{3,2,1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (c: bf16[2,8,64,16], new: bf16[2,8,1,16]) -> bf16[2,8,64,16] {
  %c = bf16[2,8,64,16]{3,2,1,0} parameter(0)
  %new = bf16[2,8,1,16]{3,2,1,0} parameter(1)
  %zero = s32[] constant(0)
  %t0 = (s32[], bf16[2,8,64,16]{3,2,1,0}, bf16[2,8,1,16]{3,2,1,0}) tuple(%zero, %c, %new)
  %loop = (s32[], bf16[2,8,64,16]{3,2,1,0}, bf16[2,8,1,16]{3,2,1,0}) while(%t0), condition=%cond, body=%step
  ROOT %out = bf16[2,8,64,16]{3,2,1,0} get-tuple-element(%loop), index=1
}
"""


def test_in_place_updates_are_not_copies():
    report = weight_sized_buffers(HLO_CACHE, {"kv_cache": (2, 8, 64, 16)}, stacked=False)
    bufs = {b["instruction"]: b for b in report["buffers"]}
    assert set(bufs) == {"write", "moved"}
    assert bufs["write"]["in_place"] and not bufs["moved"]["in_place"]
    cache_bytes = 2 * 8 * 64 * 16 * 2
    assert report["copied_bytes_in_loops"] == cache_bytes  # the transpose only
    assert report["updated_in_place_bytes"] == cache_bytes
    assert report["buffers"][-1]["instruction"] == "write"  # copies are listed first


def test_programs_xla_compiles_here():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 64, 96)), jnp.float32)

    def in_place(w, x):  # reads one layer's weight as it is: nothing weight-sized is written
        return x @ w[0]

    def sorted_layers(w):  # each layer's sort result must be materialised, once per layer
        return jax.lax.scan(lambda c, wl: (c + jnp.sort(wl, axis=0)[0, 0], None), 0.0, w)[0]

    x = jnp.ones(64, jnp.float32)
    text = jax.jit(in_place).lower(w[:1], x).compile().as_text()
    assert weight_sized_buffers(text, {"w": (64, 96)}, min_elements=1000)["buffers"] == []
    text = jax.jit(sorted_layers).lower(w).compile().as_text()
    report = weight_sized_buffers(text, {"w": (3, 64, 96)}, min_elements=1000, outer_loop_is_unit=False)
    sorts = [b for b in report["buffers"] if b["opcode"] == "sort"]
    assert sorts and all(b["in_loop"] and b["times"] == 3 and b["bytes"] == 64 * 96 * 4 for b in sorts), report


def test_model_weight_shapes_are_the_matmul_weights_and_embeddings():
    from qwq_jax import QwenConfig

    shapes = model_weight_shapes(QwenConfig.preset("qwq-32b"))
    assert shapes["layers.mlp.gate_proj"] == (64, 5120, 27648)
    assert shapes["layers.attn.o_proj"] == (64, 40, 128, 5120)
    assert shapes["embed"] == (152064, 5120) and shapes["lm_head"] == (152064, 5120)
    assert not any("bias" in k or "scale" in k for k in shapes)
