"""Test set-up: 8 fake CPU devices, set before anything imports jax."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _keep_freed_memory() -> None:
    """glibc hands every freed block over 128 KB-32 MB back to the kernel (munmap, heap trims). On a VM
    with free page reporting (these 2-core machines: virtio-balloon, reporting at once) the host takes
    those pages back, and touching memory again costs a host fault per page: 3 GiB of new numpy memory
    took 48 s here (0.9 s the second time in the same process). The test processes load the demo model
    (2.5 GB) and transformers' reference (2.4 GB) again and again: they keep what they free for reuse
    (big blocks from the heap, no trimming of its top). Only this process: CLIs and servers the tests
    start run as users run them."""
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)


_keep_freed_memory()

# One persistent XLA compilation cache (qwq_jax/compile_cache.py) for this process, the CLIs it starts
# as subprocesses, the multi-process workers and the notebook kernels: a program compiled once is
# read back everywhere else, in this run and the next. Apart from the users' cache; every program
# is cached, however quick its compile. QWQ_JAX_XLA_CACHE=off runs the suite without it.
from qwq_jax import compile_cache  # noqa: E402  (imports jax: after the flags above)

os.environ.setdefault(compile_cache.ENV, str(compile_cache.default_dir().with_name("xla-tests")))
_xla_cache = compile_cache.enable()
if _xla_cache is not None:  # for processes that never call enable() themselves
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_xla_cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# ---- the offline demo model (DESIGN.md): shared by every test that needs the real weights ------
import contextlib  # noqa: E402
import fcntl  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@contextlib.contextmanager
def _machine_lock(name: str):
    """One test process at a time (pytest-xdist workers, parallel runs) builds a shared cached file."""
    from qwq_jax.demo import default_cache_dir

    root = default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_GGUF_READERS: dict = {}


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers' GGUF loader builds a fresh `gguf.GGUFReader` for the config, the weights and the
    tokenizer (~15 s each for the demo's 151k-token vocabulary): while building its reference copies,
    one reader per file, parsed once and shared (read-only: a memory map and the parsed fields)."""
    import gguf

    original = gguf.GGUFReader

    def shared(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in _GGUF_READERS:
            _GGUF_READERS[key] = original(path, mode)
        return _GGUF_READERS[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


@pytest.fixture(scope="session")
def demo_path() -> Path:
    """The demo GGUF, assembled once per machine into the default cache dir (491 MB)."""
    from qwq_jax import demo

    with _machine_lock("demo-gguf"):
        return demo.demo_gguf_path(progress=False)


@pytest.fixture(scope="session")
def demo_hf_model(demo_path):
    """transformers' float32 model of the demo GGUF (dequantized by its own GGUF loader, ~25 s), kept
    once per machine as transformers' own `save_pretrained` output so later loads take seconds (not
    under CI, whose clean clone runs the suite once)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from qwq_jax.demo import default_cache_dir

    saved = default_cache_dir() / "demo-hf-f32"
    with _machine_lock("demo-hf"):
        if not (saved / "config.json").is_file():
            with _one_gguf_parse():
                model = AutoModelForCausalLM.from_pretrained(str(demo_path.parent), gguf_file=demo_path.name,
                                                             dtype=torch.float32, attn_implementation="eager")
            if os.environ.get("CI"):  # a clean clone's one run: nothing would read the copy (2.4 GB of writes)
                return model.eval()
            tmp = saved.with_name(saved.name + ".tmp")  # (save_pretrained refuses GGUF-loaded models)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            config = model.config.to_dict()
            config.pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(config))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
            os.replace(tmp, saved)
            return model.eval()  # the same weights as the copy just written: no need to read them back
    model = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def demo_hf_tokenizer(demo_path):
    """transformers' tokenizer of the demo GGUF (built by its GGUF reader, ~20 s), kept once per machine
    as its own `save_pretrained` output."""
    from transformers import AutoTokenizer

    from qwq_jax.demo import default_cache_dir

    saved = default_cache_dir() / "demo-hf-tokenizer"
    with _machine_lock("demo-hf-tokenizer"):
        if not (saved / "tokenizer_config.json").is_file():
            tmp = saved.with_name(saved.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            with _one_gguf_parse():
                AutoTokenizer.from_pretrained(str(demo_path.parent), gguf_file=demo_path.name).save_pretrained(tmp)
            os.replace(tmp, saved)
    return AutoTokenizer.from_pretrained(str(saved))


@pytest.fixture(scope="session")
def demo_tokenizer_dir(demo_path, tmp_path_factory) -> Path:
    """Only the demo model's tokenizer files (tokenizer.json, tokenizer_config.json,
    generation_config.json), as the converter writes them from the GGUF: the converted checkpoint's
    when it is there, else written here without converting the weights (a minute or more on a fresh
    machine, which another worker may be spending): for tests that need no weights."""
    from convert.gguf import GGUFSource
    from qwq_jax.demo import default_cache_dir
    from qwq_jax.sample import DEMO_NAME

    converted = default_cache_dir() / DEMO_NAME  # the same files, where the checkpoint is already complete
    if (converted / "config.json").is_file() and (converted / "commit_success.txt").is_file():
        return converted
    out = tmp_path_factory.mktemp("demo-tokenizer")  # the GGUF's metadata only: ~2 s
    for name, data in GGUFSource(demo_path).extra_files.items():
        (out / name).write_bytes(data)
    return out


@pytest.fixture(scope="session")
def demo_checkpoint(demo_path):
    """The demo GGUF converted to a float32 qwq-jax checkpoint, once per machine (like `sample --demo`)."""
    from qwq_jax.sample import demo_checkpoint

    with _machine_lock("demo-checkpoint"):
        return demo_checkpoint()


@pytest.fixture(autouse=True)
def _compile_bound(request, monkeypatch):
    """Tests marked `compile_bound` (modules of tiny models, where XLA's CPU compiler takes most of the
    time, not running) compile with jax's switch for that case, `jax_disable_most_optimizations` (LLVM
    at -O0, no expensive passes), in-process and in the processes they start: a GRPO update of the tiny
    model compiles in 5 s instead of 10 (the marked modules: ~15% less time in all). Tests that run long
    (servers, the 41K-token prefill, anything on the demo model, whose forward is 1.5x slower at -O0:
    a test taking `demo_checkpoint` is left out even in a marked module) keep full optimization, which
    is jax's default. tests/test_train.py's training runs start their processes at -O0 themselves."""
    if request.node.get_closest_marker("compile_bound") is None or "demo_checkpoint" in request.fixturenames:
        yield
        return
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
