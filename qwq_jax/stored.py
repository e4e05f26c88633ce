"""The arrays of a checkpoint as they lie on disk, read from its files or with TensorStore: one array (or
one part of one) at a time, straight into buffers JAX adopts.

Our checkpoints are Orbax pytrees in its default storage: an OCDBT key-value store in the item's
directory (`OUT/state`) holding one zarr3 array per leaf, named by the leaf's path joined with dots
(`layers.3.mlp.gate_proj`). Orbax restores a tree per call: it reads every requested leaf into host
memory, then copies it onto the devices, and each call costs ~80 ms of its own work. Restoring a
model a layer at a time through it held two copies of what a call restored and paid that cost per
layer. Reading the arrays ourselves, each array is read once per process (the box covering what its
devices hold), into a 64-byte-aligned buffer: the CPU backend adopts such a buffer without a copy,
an accelerator copies it to the device and the buffer is freed. So a restore holds the device arrays
plus one array's part in flight, and no per-call cost.

Where an array is stored as Orbax writes it (one zarr3 chunk holding the whole array, uncompressed,
in one shard whose index follows the data) and a read wants a contiguous part of it in the stored
dtype, the bytes are read with `preadv` straight from the OCDBT data file into that buffer, at the
place `tensorstore.ocdbt.dump` lists for the key: TensorStore would read the whole value into a
buffer of its own first and copy it over: a second copy of every array, in fresh memory whose page
faults cost more than the copy (the demo's 2.5 GB float32 restore alone in a fresh process on a
2-core VM, 5 runs each: 430-465k page faults and 2.0-2.6 s through TensorStore; 14.6k faults and
0.5-2.1 s read directly, the rest being the kernel zeroing the arrays' own new pages). The shard
index is checked (its CRC-32C, the chunk's size) before the data is read; anything else (compressed
arrays such as `save_params` writes, arrays stored inline, casts, boxes that are not one run of the
array) goes through TensorStore.

Only reads. Writing stays with Orbax (`python -m convert`, `save_params`, the trainer), which also
restores the checkpoints this module does not read (training steps, the earlier stacked layout).
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import struct
import sys
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


# ---- direct reads: the bytes of an array read from its OCDBT data file into the caller's buffer --------
_PIECE_BYTES = 64 << 20        # a large read is split into pieces of this size, read concurrently
_UNSET = 2**64 - 1             # a zarr3 shard index's (offset, nbytes) of a chunk that was never written


@functools.cache
def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
        table.append(n)
    return tuple(table)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum zarr3's `crc32c` codec appends (for a shard index: 16 bytes)."""
    table, crc = _crc32c_table(), 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


@functools.cache
def _pool(pid: int) -> concurrent.futures.ThreadPoolExecutor:
    """This process's reader threads (by pid: a forked child has none of its parent's)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                                 thread_name_prefix="qwq-jax-read")


@dataclasses.dataclass(frozen=True)
class _Located:
    """An array stored whole in one uncompressed chunk: its shard (`length` bytes at `offset` of `path`)."""

    path: Path
    offset: int
    length: int
    shape: tuple[int, ...]
    dtype: np.dtype


def _whole_chunk_dtype(meta: dict) -> np.dtype | None:
    """The dtype of a zarr3 array that Orbax stored as one chunk of the whole array in one shard,
    uncompressed, little-endian, the shard's index at its end; None for any other layout."""
    try:
        shape = list(meta["shape"])
        (codec,) = meta["codecs"]
        conf = codec["configuration"]
        plain = (meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
                 and meta["chunk_grid"] == {"name": "regular", "configuration": {"chunk_shape": shape}}
                 and meta.get("chunk_key_encoding", {"name": "default"}) == {"name": "default"}
                 and codec["name"] == "sharding_indexed" and list(conf["chunk_shape"]) == shape
                 and conf.get("index_location", "end") == "end"
                 and [c["name"] for c in conf["codecs"]] == ["bytes"]
                 and conf["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                 and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
                 and conf["index_codecs"][0].get("configuration", {}).get("endian", "little") == "little")
        return jax.numpy.dtype(meta["data_type"]) if plain else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _location(text: str) -> tuple[str, int, int]:
    """`value:<base path>:<relative path>:<offset>:<length>` (as `tensorstore.ocdbt.dump` writes a
    value's location) -> (the data file's path within the database, offset, length)."""
    head, offset, length = text.rsplit(":", 2)
    kind, base, relative = head.split(":", 2)
    if kind not in ("value", "btreenode"):
        raise ValueError(text)
    return base + relative, int(offset), int(length)


def _contiguous(shape: tuple[int, ...], box: tuple[tuple[int, int], ...]) -> tuple[int, int] | None:
    """(first element, element count) of `box` within a C-ordered array of `shape` when the box is one
    contiguous run of it (whole trailing axes after one partial axis, single indices before it)."""
    partial = next((a for a in range(len(shape) - 1, -1, -1) if box[a] != (0, shape[a])), None)
    if partial is not None and any(b - a != 1 for a, b in box[:partial]):
        return None
    first = 0
    for (a, _), n in zip(box, shape):
        first = first * n + a
    return first, math.prod(b - a for a, b in box)


class _Reads:
    """The future of a read done in pieces on the reader threads (`result()` as TensorStore's)."""

    def __init__(self, futures: list[concurrent.futures.Future]):
        self._futures = futures

    def result(self) -> None:
        for f in self._futures:
            f.result()


def _pread_into(path: Path, offset: int, buf: memoryview, what: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(buf):
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n <= 0:
                raise NotStored(f"{what}: {path} ends {len(buf) - done} bytes early")
            done += n
    finally:
        os.close(fd)


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
        self.direct_reads = 0  # reads that took the direct path (`_direct`)

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

    @functools.cached_property
    def _located(self) -> dict[str, _Located]:
        """The arrays a direct read can take (`_whole_chunk_dtype`), by name, from the database's
        newest version as `tensorstore.ocdbt.dump` lists it; empty if the listing is not as expected."""
        try:
            base = self._ts.KvStore.open(self.dir.as_uri() + "/").result()
            manifest = self._ts.ocdbt.dump(base).result()
            newest = max(manifest["versions"], key=lambda v: v["generation_number"])
            metas, values = {}, {}
            todo = [(newest["root"]["location"], b"")]
            while todo:  # B+tree nodes: a child's keys continue its parent's common prefix
                where, prefix = todo.pop()
                for entry in self._ts.ocdbt.dump(base, where).result()["entries"]:
                    if "location" in entry:  # a child node
                        todo.append((entry["location"], prefix + entry.get("subtree_common_prefix", b"")))
                        continue
                    name = (prefix + entry["key"]).decode()
                    if name.endswith("/zarr.json") and "inline_value" in entry:
                        metas[name[:-len("/zarr.json")]] = json.loads(entry["inline_value"])
                    elif "indirect_value" in entry:
                        values[name] = _location(entry["indirect_value"])
        except Exception:  # noqa: BLE001 - any surprise: every read goes through TensorStore instead
            return {}
        out = {}
        for name, meta in metas.items():
            dtype = _whole_chunk_dtype(meta)
            where = None if dtype is None else values.get(f"{name}/" + "/".join(["c"] + ["0"] * len(meta["shape"])))
            if where is not None and sys.byteorder == "little" and hasattr(os, "preadv"):
                path, offset, length = where
                out[name] = _Located(self.dir / path, offset, length, tuple(meta["shape"]), dtype)
        return out

    def _direct(self, name: str, out: np.ndarray, box: tuple[tuple[int, int], ...]) -> _Reads | None:
        """Start reading `box` of array `name` straight into `out` when `_located` has it and the box
        is one contiguous run of it in `out`'s dtype; None otherwise."""
        at = self._located.get(name)
        run = _contiguous(at.shape, box) if at is not None and at.dtype == out.dtype else None
        if run is None or not out.flags.c_contiguous:
            return None
        what = f"{self.dir}: cannot read {name}"
        index = bytearray(20)
        _pread_into(at.path, at.offset + at.length - 20, memoryview(index), what)
        start, nbytes, check = struct.unpack("<QQI", index)
        if crc32c(bytes(index[:16])) != check:
            raise NotStored(f"{what}: its shard index fails its CRC-32C check (a damaged file?)")
        if start == nbytes == _UNSET:  # never written: TensorStore fills it with the fill value
            return None
        itemsize = at.dtype.itemsize
        if nbytes != math.prod(at.shape) * itemsize or start + nbytes > at.length - 20:
            raise NotStored(f"{what}: its shard index gives {nbytes} bytes at {start} of a {at.length}-byte "
                            f"shard, expected {math.prod(at.shape) * itemsize}")
        first, count = run
        buf = memoryview(out.reshape(-1).view(np.uint8))
        begin = at.offset + start + first * itemsize
        pieces = range(0, count * itemsize, _PIECE_BYTES)
        self.direct_reads += 1
        return _Reads([_pool(os.getpid()).submit(_pread_into, at.path, begin + i, buf[i:i + _PIECE_BYTES], what) for i in pieces])

    def _fill(self, name: str, store, out: np.ndarray, box: tuple[tuple[int, int], ...]) -> Any:
        """Start filling `out` with `store[box]` (array `name`; cast on the way when the dtypes
        differ): a direct read where one applies, else through TensorStore. A future (`result()`)."""
        direct = self._direct(name, out, box)
        if direct is not None:
            return direct
        view = store[tuple(slice(a, b) for a, b in box)]
        if view.dtype.numpy_dtype != out.dtype:
            view = self._ts.cast(view, out.dtype)
        return self._ts.array(out).write(view)

    def _start_read(self, name: str, store, box: tuple[tuple[int, int], ...], dtype: Any) -> tuple[np.ndarray, Any]:
        """Start reading `store[box]` into a new aligned host array of `dtype`: the array and its future."""
        out = aligned_empty(tuple(b - a for a, b in box), dtype)
        return out, self._fill(name, store, out, box)

    def read(self, name: str, dtype: Any = None) -> np.ndarray:
        """The whole array `name` on the host (in `dtype`, default as stored)."""
        store = self._open_all({name: None})[name]
        out, done = self._start_read(name, store, tuple((0, n) for n in store.shape),
                                     dtype or store.dtype.numpy_dtype)
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
            reads[name] = (boxes, covering, *self._start_read(name, stores[name], covering, target.dtype))
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
                    direct.append(self._fill(name, store, part[i], covering))
                else:
                    through.append((key, *self._start_read(name, store, covering, targets[key].dtype)))
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
