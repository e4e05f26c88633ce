"""Logical axis -> mesh axis rules, and sharding an NNX model's state by them.

Parameters carry logical axis names (`layers, embed, heads, kv_heads, head_dim, mlp, vocab`, `lora`)
from their one declaration in the model; a rule set maps each name to mesh axes:

    generate  tensor parallel over `tensor`, weights replicated over `data`/`fsdp`
              (no weight all-gathers per decode step), batch split over `data` and `fsdp`
    train     FSDP over `fsdp` for the `embed` dimension plus tensor parallel over `tensor`

A dimension that does not divide its mesh axes raises an error naming the parameter, the
dimension, the axis and a mesh that would work: nothing is silently replicated.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.mesh import MESH_AXES, mesh_spec

MeshAxes = str | tuple[str, ...] | None

RULES: dict[str, dict[str, MeshAxes]] = {
    "generate": {"batch": ("data", "fsdp"), "seq": None, "layers": None, "embed": None,
                 "heads": "tensor", "kv_heads": "tensor", "head_dim": None, "mlp": "tensor",
                 "vocab": "tensor", "lora": None},
    "train": {"batch": ("data", "fsdp"), "seq": None, "layers": None, "embed": "fsdp",
              "heads": "tensor", "kv_heads": "tensor", "head_dim": None, "mlp": "tensor",
              "vocab": "tensor", "lora": None},
}


def get_rules(rules: str | Mapping[str, MeshAxes]) -> Mapping[str, MeshAxes]:
    if isinstance(rules, str):
        if rules not in RULES:
            raise ValueError(f"unknown sharding rules {rules!r} (known: {', '.join(RULES)})")
        return RULES[rules]
    return rules


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_mesh(logical: tuple[str | None, ...], mesh: Mesh,
                    rules: str | Mapping[str, MeshAxes]) -> P:
    """Mesh PartitionSpec for a tuple of logical axis names (size-1 mesh axes dropped)."""
    rules = get_rules(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for name in logical:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule (rules cover: {', '.join(rules)})")
        axes = tuple(a for a in _as_tuple(rules.get(name) if name else None)
                     if mesh.shape.get(a, 1) > 1 and a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(p for p in parts if p != "value")


def _logical_specs(state: nnx.State) -> list[tuple[str, tuple[int, ...], tuple[str | None, ...]]]:
    """(path, shape, logical axes) of every parameter in an (abstract or concrete) state."""
    specs = nnx.get_partition_spec(state)
    out = []

    def visit(path, spec, leaf):
        logical = tuple(spec) if spec is not None else (None,) * len(leaf.shape)
        out.append((_path_str(path), tuple(leaf.shape), logical))

    jax.tree_util.tree_map_with_path(visit, specs, state, is_leaf=lambda x: isinstance(x, P) or x is None)
    return out


def suggest_mesh(state: nnx.State, mesh: Mesh, rules: str | Mapping[str, MeshAxes]) -> str:
    """A mesh with the same device count whose axes divide every parameter dimension.

    Each of `fsdp`/`tensor` shrinks to the largest divisor of its size that divides all the
    dimensions mapped to it; the freed factor moves to `data`, which shards only the batch.
    """
    rules = get_rules(rules)
    gcds: dict[str, int] = {}
    for _, shape, logical in _logical_specs(state):
        for dim, name in zip(shape, logical):
            for axis in _as_tuple(rules.get(name) if name else None):
                gcds[axis] = math.gcd(gcds.get(axis, 0), dim)
    sizes = {a: mesh.shape.get(a, 1) for a in MESH_AXES}
    for axis in ("fsdp", "tensor"):
        if axis in gcds:
            fit = max(d for d in range(1, sizes[axis] + 1) if sizes[axis] % d == 0 and gcds[axis] % d == 0)
            sizes["data"] *= sizes[axis] // fit
            sizes[axis] = fit
    return mesh_spec(sizes)


def state_shardings(state: nnx.State, mesh: Mesh, rules: str | Mapping[str, MeshAxes]) -> nnx.State:
    """A state-shaped tree of NamedShardings; raises on any dimension its mesh axes do not divide."""
    for path, shape, logical in _logical_specs(state):
        spec = logical_to_mesh(logical, mesh, rules)
        for i, (dim, axes) in enumerate(zip(shape, spec)):
            size = math.prod(mesh.shape[a] for a in _as_tuple(axes))
            if dim % size:
                raise ValueError(
                    f"parameter {path}: dimension {i} ({logical[i]}={dim}) is not divisible by mesh "
                    f"axis {'x'.join(_as_tuple(axes))} of size {size} (mesh {mesh_spec(mesh)}); "
                    f"a mesh that works: {suggest_mesh(state, mesh, rules)}")
    specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh(tuple(s) if s else (), mesh, rules)),
                        specs, is_leaf=lambda x: isinstance(x, P) or x is None)


def shard_model(model: nnx.Module, mesh: Mesh, rules: str | Mapping[str, MeshAxes]) -> nnx.Module:
    """Move an existing model's parameters onto `mesh` by `rules` (in place; returns the model)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))
    return model


def init_sharded(factory: Callable[[], nnx.Module], mesh: Mesh,
                 rules: str | Mapping[str, MeshAxes]) -> nnx.Module:
    """Build `factory()` directly sharded: each device materialises only its own shards.

    Works the same on every host of a multi-process run (the same seed gives the same model).
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(factory))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.state(factory()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, rules: str | Mapping[str, MeshAxes], ndim: int = 2) -> NamedSharding:
    """Sharding for a `[batch, ...]` input array."""
    return NamedSharding(mesh, logical_to_mesh(("batch",) + (None,) * (ndim - 1), mesh, rules))


def batch_shards(mesh: Mesh, rules: str | Mapping[str, MeshAxes]) -> int:
    """How many ways the `batch` logical axis is split on `mesh` (batches must be a multiple)."""
    return math.prod(mesh.shape[a] for a in _as_tuple(logical_to_mesh(("batch",), mesh, rules)[0]))


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from host data every process holds in full (each device takes its slice)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
