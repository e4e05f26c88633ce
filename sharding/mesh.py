"""Device meshes from short specs: `make_mesh("data=1,fsdp=-1,tensor=4")`."""

from __future__ import annotations

import math
from typing import Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")  # outermost (slowest links) to innermost (fastest)


def parse_mesh_spec(spec: str | dict[str, int], num_devices: int) -> dict[str, int]:
    """`"data=1,fsdp=-1,tensor=4"` -> `{"data": 1, "fsdp": n, "tensor": 4}` for `num_devices`.

    Axes left out have size 1; at most one axis may be -1 (the rest of the devices).
    """
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep:
                raise ValueError(f"mesh spec {spec!r}: {part!r} is not of the form axis=size")
            if name in sizes:
                raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(f"mesh spec {spec!r}: size {value.strip()!r} of axis {name!r} "
                                 "is not an integer") from None
    else:
        sizes = dict(spec)
    for name, size in sizes.items():
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
        if size < 1 and size != -1:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} has size {size}; use a positive size or -1")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {', '.join(free)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh spec {spec!r}: {num_devices} devices are not divisible by the "
                             f"fixed axes' product {fixed}")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh spec {spec!r} has {fixed} devices but {num_devices} are available")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str | dict[str, int] = "fsdp=-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes `data, fsdp, tensor` over `devices` (default: every device of every host)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_spec(mesh: Mesh | dict[str, int]) -> str:
    """The spec string of a mesh (or of axis sizes): `"data=1,fsdp=2,tensor=4"`."""
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else mesh
    return ",".join(f"{a}={sizes.get(a, 1)}" for a in MESH_AXES)
