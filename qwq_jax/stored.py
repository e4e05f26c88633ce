"""The arrays of a checkpoint as they lie on disk, read with TensorStore: one array (or one part of one)
at a time, straight into buffers JAX adopts.

Our checkpoints are Orbax pytrees in its default storage: an OCDBT key-value store in the item's
directory (`OUT/state`) holding one zarr3 array per leaf, named by the leaf's path joined with dots
(`layers.3.mlp.gate_proj`). Orbax restores a tree per call: it reads every requested leaf into host
memory, then copies it onto the devices, and each call costs ~80 ms of its own work. Restoring a
model a layer at a time through it held two copies of what a call restored and paid that cost per
layer. Reading the arrays ourselves, each array is read once per process (the box covering what its
devices hold), into a 64-byte-aligned buffer: the CPU backend adopts such a buffer without a copy,
an accelerator copies it to the device and the buffer is freed. So a restore holds the device arrays
plus one array's part in flight, and no per-call cost.

Only reads. Writing stays with Orbax (`python -m convert`, `save_params`, the trainer), which also
restores the checkpoints this module does not read (training steps, the earlier stacked layout).
"""

from __future__ import annotations

import ast
import functools
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np


@functools.cache
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_host_memory() -> None:
    """Hand freed host buffers back to the OS. Orbax/TensorStore read and write on worker threads whose
    glibc arenas keep freed buffers (hundreds of MB by the end of a restore); trimming after each group
    of layers keeps resident memory at what is live."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class NotStored(ValueError):
    """The directory is not an Orbax item this module reads (no `_METADATA`, or not OCDBT + zarr3)."""


class Unreadable(NotStored):
    """The item's `_METADATA` is there but is not valid JSON: no reader can restore it."""


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary (JAX's CPU client
    adopts such a buffer in `device_put` instead of copying it)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class StoredArrays:
    """The leaves of one Orbax pytree item (`item_dir`, e.g. `OUT/state`), by dotted name."""

    def __init__(self, item_dir: str | Path):
        item_dir = Path(item_dir).absolute()
        try:
            meta = json.loads((item_dir / "_METADATA").read_text(encoding="utf-8"))
        except ValueError as e:  # there, but not JSON (UnicodeDecodeError included)
            raise Unreadable(f"{item_dir}: unreadable Orbax metadata ({e})") from None
        except OSError as e:
            raise NotStored(f"{item_dir}: no readable Orbax metadata ({e})") from None
        if not (isinstance(meta, dict) and meta.get("use_ocdbt") and meta.get("use_zarr3")):
            raise NotStored(f"{item_dir}: not stored as OCDBT + zarr3")
        self.names: list[str] = []
        for key in meta.get("tree_metadata", {}):
            try:
                path = ast.literal_eval(key)
            except (ValueError, SyntaxError):
                raise NotStored(f"{item_dir}: unreadable leaf name {key!r}") from None
            self.names.append(".".join(map(str, path)))
        import tensorstore as ts

        self._ts = ts
        # No chunk cache: every byte is read once, into the buffer that becomes the device array. The
        # OCDBT index (a few MB at most) is cached: without it each array's read walks it from disk again.
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                                    "cache_pool#index": {"total_bytes_limit": 64 << 20}})
        self._kvstore = {"driver": "ocdbt", "base": item_dir.as_uri() + "/", "cache_pool": "cache_pool#index"}
        self.dir = item_dir

    def _open_all(self, shapes: dict[str, tuple[int, ...] | None]) -> dict[str, Any]:
        """The arrays named in `shapes`, opened concurrently (one at a time, the demo's 291 arrays took
        0.85 s of metadata reads; together 0.04 s), each checked against its expected shape (None: any)."""
        futures = {name: self._ts.open({"driver": "zarr3", "kvstore": dict(self._kvstore, path=name + "/")},
                                       context=self._context, open=True, read=True) for name in shapes}
        stores = {}
        for name, future in futures.items():
            try:
                stores[name] = store = future.result()
            except ValueError as e:  # tensorstore reports missing or corrupt arrays as ValueError
                raise NotStored(f"{self.dir}: cannot read {name}: {e}") from None
            shape = shapes[name]
            if shape is not None and tuple(store.shape) != tuple(shape):
                raise NotStored(f"{self.dir}: {name} is stored with shape {tuple(store.shape)}, expected "
                                f"{tuple(shape)}")
        return stores

    def _write(self, out: np.ndarray, view) -> Any:
        """Start filling `out` from the TensorStore `view` (cast on the way when the dtypes differ)."""
        if view.dtype.numpy_dtype != out.dtype:
            view = self._ts.cast(view, out.dtype)
        return self._ts.array(out).write(view)

    def _start_read(self, store, box: tuple[tuple[int, int], ...], dtype: Any) -> tuple[np.ndarray, Any]:
        """Start reading `store[box]` into a new aligned host array of `dtype`: the array and its future."""
        out = aligned_empty(tuple(b - a for a, b in box), dtype)
        return out, self._write(out, store[tuple(slice(a, b) for a, b in box)])

    def read(self, name: str, dtype: Any = None) -> np.ndarray:
        """The whole array `name` on the host (in `dtype`, default as stored)."""
        store = self._open_all({name: None})[name]
        out, done = self._start_read(store, tuple((0, n) for n in store.shape), dtype or store.dtype.numpy_dtype)
        done.result()
        return out

    def to_devices(self, targets: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
        """The arrays named in `targets` as their targets (shape, dtype, sharding), read concurrently.
        This process reads the smallest box holding its devices' parts of each array once; each device
        gets its part as a buffer of its own."""
        stores = self._open_all({name: target.shape for name, target in targets.items()})
        reads = {}
        for name, target in targets.items():
            boxes, covering = _layout(target)
            reads[name] = (boxes, covering, *self._start_read(stores[name], covering, target.dtype))
        out = {}
        for name, (boxes, covering, host, done) in reads.items():
            done.result()
            arrays, adopted = [], False
            for device, box in boxes.items():
                if box == covering and not adopted:  # the whole read: the device takes the buffer itself
                    part, adopted = host, True
                else:  # a part, or the same part again (replicated): a buffer of its own
                    part = aligned_empty(tuple(b - a for a, b in box), host.dtype)
                    part[...] = _part(host, box, covering)
                arrays.append(jax.device_put(part, device))
            out[name] = jax.make_array_from_single_device_arrays(targets[name].shape, targets[name].sharding,
                                                                 arrays)
        return out

    def stacked_to_devices(self, targets: dict[str, jax.ShapeDtypeStruct], num_layers: int,
                           name_of: Any) -> dict[str, jax.Array]:
        """Leaves stacked over a leading layer axis (`targets`, by key; that axis unsharded), from the
        per-layer arrays `name_of(i, key)`, assembled in host buffers that the devices then adopt.

        For the CPU backend, whose device memory is this process's memory: each device's part is
        allocated once, at its final size, and each layer is read straight into its slice (through one
        layer's covering box when several devices split or repeat it): no zero-filled arrays, no second
        copy, at most one layer in flight beside the parts."""
        plans = {}
        for key, target in targets.items():
            boxes, covering = _layout(target)
            boxes, covering = {d: box[1:] for d, box in boxes.items()}, covering[1:]
            parts = {d: aligned_empty((num_layers, *(b - a for a, b in box)), target.dtype)
                     for d, box in boxes.items()}
            plans[key] = (boxes, covering, parts)

        # Where this process has one device, each layer's arrays are opened together and their reads go
        # straight into their slices (the demo's restore here: 3.6-4.0 s opening one array at a time,
        # 2.8-3.3 s). With several devices each array is opened as its read starts: concurrent opens
        # put more reads in flight at once on more of TensorStore's I/O threads, whose glibc arenas kept
        # ~40 MB more at the peak (48 layers onto 8 devices), past the restore's bound.
        together = all(len(parts) == 1 for _, _, parts in plans.values())
        direct = []  # reads straight into their final slices: all in flight at once
        for i in range(num_layers):
            shapes = {name_of(i, key): targets[key].shape[1:] for key in plans}
            stores = self._open_all(shapes) if together else {}
            through = []  # reads through a covering box, copied into the devices' parts
            for key, (boxes, covering, parts) in plans.items():
                name = name_of(i, key)
                store = stores[name] if together else self._open_all({name: shapes[name]})[name]
                if len(parts) == 1:  # this process's one device: its box of the layer, into its slice
                    (part,) = parts.values()
                    direct.append(self._write(part[i], store[tuple(slice(a, b) for a, b in covering)]))
                else:
                    through.append((key, *self._start_read(store, covering, targets[key].dtype)))
            for key, host, done in through:
                done.result()
                boxes, covering, parts = plans[key]
                for device, box in boxes.items():
                    parts[device][i] = _part(host, box, covering)
            if through:
                del host, through
                release_host_memory()
        for done in direct:
            done.result()
        return {key: jax.make_array_from_single_device_arrays(
                    targets[key].shape, targets[key].sharding, [jax.device_put(parts[d], d) for d in boxes])
                for key, (boxes, covering, parts) in plans.items()}


def _layout(target: jax.ShapeDtypeStruct) -> tuple[dict[Any, tuple[tuple[int, int], ...]], tuple[tuple[int, int], ...]]:
    """This process's devices' boxes of `target` (`(start, stop)` per axis) and the smallest box covering them."""
    shape = tuple(target.shape)
    boxes = {d: tuple(s.indices(n)[:2] for s, n in zip(index, shape))
             for d, index in target.sharding.addressable_devices_indices_map(shape).items()}
    covering = tuple((min(b[a][0] for b in boxes.values()), max(b[a][1] for b in boxes.values()))
                     for a in range(len(shape)))
    return boxes, covering


def _part(host: np.ndarray, box: tuple[tuple[int, int], ...], covering: tuple[tuple[int, int], ...]) -> np.ndarray:
    """The view of `box` inside `host`, which holds `covering`."""
    return host[tuple(slice(a - c, b - c) for (a, b), (c, _) in zip(box, covering))]
