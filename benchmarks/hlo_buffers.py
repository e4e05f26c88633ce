"""Weight-sized buffers in a compiled program: does a decode step read its weights in place?

A decode step is memory bound: it should read each weight once, where it lies. If the compiler
instead materialises a copy of a weight (a layer's slice of the stacked `[L, ...]` arrays before
its matmul, a dtype conversion, a re-layout), each copy costs an extra read and write and the
step slows accordingly. This module reads XLA's optimised HLO text (what
`XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"` writes as `*_after_optimizations.txt`, or
`jax.jit(f).lower(...).compile().as_text()`) and finds every materialised result (an instruction
outside fusion bodies that is not a parameter, tuple, bitcast, constant or loop) with as many
elements as a weight, per layer or stacked. Each is counted as many times as it runs per call
of its enclosing loops with a known trip count (a layer scan: L), so

    copied_bytes_in_loops    bytes of weight-sized buffers written per iteration of the
                             outermost loop (per decode step), summed over inner loops' trips
    copied_bytes_outside     those written once per call, outside every loop

A step that reads weights in place has copied_bytes_in_loops == 0. A scatter or
dynamic-update-slice (or a fusion whose root is one) writes into its operand's buffer, e.g. a
token's keys into the KV cache: such buffers are listed with `in_place: true` and counted apart
(`updated_in_place_bytes`), not as copies. `benchmarks/decode.py` and `benchmarks/gpu_aot.py`
report this for every decode program they compile.

    python benchmarks/hlo_buffers.py FILE_after_optimizations.txt --preset qwq-32b
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:calls|to_apply|condition|body|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_NOT_MATERIALISED = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "while",
                     "call", "conditional"}
_IN_PLACE = {"scatter", "dynamic-update-slice"}  # write into their operand's buffer


def _itemsize(dtype: str) -> int:
    if dtype in ("pred", "bf16") or dtype.startswith("f8"):
        return 2 if dtype == "bf16" else 1
    return max(1, int(dtype[1:]) // 8)


def parse(hlo_text: str) -> tuple[dict[str, list[dict]], str | None]:
    """(computation name -> its instructions, the entry computation's name)."""
    comps: dict[str, list[dict]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line[:1].isspace():
            current = comps.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
            continue
        m = _INSTR.match(line) if current is not None else None
        if m:
            rest = m.group(5)
            called = _CALLED.findall(rest) + [c.strip().lstrip("%") for group in _BRANCHES.findall(rest)
                                              for c in group.split(",") if c.strip()]
            body, trip = _BODY.search(rest), _TRIP.search(rest)
            current.append({"name": m.group(2), "opcode": m.group(4), "called": called, "root": bool(m.group(1)),
                            "body": body.group(1) if body else None, "trip": int(trip.group(1)) if trip else None,
                            "arrays": [(dt, tuple(int(d) for d in dims.split(",") if d))
                                       for dt, dims in _ARRAY.findall(m.group(3))]})
    return comps, entry


def _weight_sizes(weight_shapes: dict[str, tuple[int, ...]], min_elements: int) -> dict[int, list[str]]:
    sizes: dict[int, list[str]] = {}
    for name, shape in weight_shapes.items():
        for n, what in ((math.prod(shape), name), (math.prod(shape[1:]), f"{name}, one layer")):
            if n >= min_elements and what not in sizes.setdefault(n, []):
                sizes[n].append(what)
            if len(shape) < 3:
                break
    return sizes


def weight_sized_buffers(hlo_text: str, weight_shapes: dict[str, tuple[int, ...]], *,
                         stacked: bool = True, min_elements: int = 4096, outer_loop_is_unit: bool = True) -> dict:
    """`{"buffers": [...], "copied_bytes_in_loops": int, "copied_bytes_outside": int}` (module doc).

    weight_shapes: name -> shape; with `stacked`, a shape of 3+ dims is `[L, ...]` and its
    one-layer size counts too. Sizes under `min_elements` are ignored (biases, norms: too small to
    matter and too easily confused with activations). Each buffer: instruction, opcode, dtype,
    shape, bytes, `times` (runs per outermost-loop iteration, or per call outside loops),
    `in_loop`, and the weights of its size (`matches`). `outer_loop_is_unit=False` counts the
    outermost loop's known trip count too (a program without a decode loop, e.g. a prefill).
    """
    comps, entry = parse(hlo_text)
    fused = {c for instrs in comps.values() for i in instrs if i["opcode"] == "fusion" for c in i["called"]}
    root_op = {name: next((i["opcode"] for i in instrs if i["root"]), None) for name, instrs in comps.items()}

    def in_place(i: dict) -> bool:
        if i["opcode"] in _IN_PLACE:
            return True
        return i["opcode"] == "fusion" and any(root_op.get(c) in _IN_PLACE for c in i["called"])

    # Runs per call of the entry: loops multiply by their known trip counts, except the outermost
    # loop, which is the unit ("per step"); unknown trip counts count once.
    times: dict[str, int] = {}
    in_loop: dict[str, bool] = {}

    def visit(comp: str, n: int, looped: bool) -> None:
        if comp in fused or comp not in comps or times.get(comp, -1) >= n:
            return
        times[comp], in_loop[comp] = n, looped
        for i in comps[comp]:
            for c in i["called"]:
                if i["opcode"] == "while" and c == i["body"]:
                    unit = not looped and outer_loop_is_unit
                    visit(c, n if unit else n * (i["trip"] or 1), True)
                else:
                    visit(c, n, looped)

    if entry is not None:
        visit(entry, 1, False)
    sizes = _weight_sizes(weight_shapes if stacked else {k: (1,) + tuple(v) for k, v in weight_shapes.items()},
                          min_elements)
    found = []
    for comp, n in times.items():
        for i in comps[comp]:
            if i["opcode"] in _NOT_MATERIALISED:
                continue
            for dtype, shape in i["arrays"]:
                count = math.prod(shape)
                if count in sizes:
                    found.append({"instruction": i["name"], "opcode": i["opcode"], "dtype": dtype,
                                  "shape": list(shape), "bytes": count * _itemsize(dtype), "times": n,
                                  "in_loop": in_loop[comp], "in_place": in_place(i), "matches": sizes[count]})
    found.sort(key=lambda b: -b["bytes"] * b["times"])
    copies = [b for b in found if not b["in_place"]]
    return {"buffers": copies + [b for b in found if b["in_place"]],
            "copied_bytes_in_loops": sum(b["bytes"] * b["times"] for b in copies if b["in_loop"]),
            "copied_bytes_outside": sum(b["bytes"] * b["times"] for b in copies if not b["in_loop"]),
            "updated_in_place_bytes": sum(b["bytes"] * b["times"] for b in found if b["in_place"])}


def model_weight_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Our model's matmul weights and embeddings for a config: path -> shape (stacked `[L, ...]`)."""
    from flax import nnx

    from qwq_jax.model import abstract_model

    flat = nnx.to_flat_state(nnx.state(abstract_model(cfg)))
    return {".".join(map(str, path)): tuple(leaf.shape) for path, leaf in flat
            if len(leaf.shape) >= 2 and not str(path[-1]).endswith(("bias", "scale"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hlo", help="an optimised HLO text file")
    p.add_argument("--preset", default="qwq-32b", help="the model shape whose weights to look for")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from qwq_jax import QwenConfig

    report = weight_sized_buffers(Path(args.hlo).read_text(), model_weight_shapes(QwenConfig.preset(args.preset)))
    for b in report["buffers"]:
        print(json.dumps(b))
    print(json.dumps({k: v for k, v in report.items() if k != "buffers"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
