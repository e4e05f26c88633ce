"""The notebooks in notebooks/: committed without outputs, and each runs top to bottom in small mode.

Each notebook is executed by `nbclient` in a fresh `python3` kernel with `QWQ_NOTEBOOK_SMALL=1`, in a
temporary working directory (also its TMPDIR, so what the notebooks write goes away with it), with this
checkout first on PYTHONPATH (so the install cell finds qwq_jax and installs nothing). The kernel inherits
the rest of the test environment, including conftest's 8 fake CPU devices, so the notebooks' meshes and
sharded paths run as they would on an 8-chip host. Notebook 01 uses the demo model: the `demo_checkpoint`
fixture converts it (once per machine) before the kernel starts, so the notebook only loads it.
Needs nbformat, nbclient, ipykernel and matplotlib (all in the `test` extra).
"""

import os
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("01_quickstart.ipynb", "02_grpo.ipynb", "03_long_context.ipynb")
CELL_TIMEOUT = 600  # seconds per cell; a small-mode notebook takes 1-3 minutes in all on 2 CPU cores

import nbformat  # noqa: E402
import nbclient  # noqa: E402


def read(name: str):
    return nbformat.read(str(NOTEBOOKS / name), as_version=4)


def test_notebooks_are_committed_clean():
    """Every notebook: valid nbformat, a python3 kernel, no outputs, no execution counts, a small mode."""
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert set(NAMES) <= set(found), found
    for name in found:
        nb = read(name)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3", name
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{name} cell {i} has outputs: clear them before committing"
                assert cell.execution_count is None, f"{name} cell {i} has an execution count"
        assert any("QWQ_NOTEBOOK_SMALL" in c.source for c in nb.cells if c.cell_type == "code"), name


def execute(name: str, tmp_path: Path, monkeypatch):
    """Run the notebook in small mode; returns the executed notebook (its wall time goes to stdout)."""
    monkeypatch.setenv("QWQ_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let ipykernel pick the inline backend (figures as PNG)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = read(name)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the traceback) if a cell fails
    print(f"{name}: {time.perf_counter() - t0:.1f} s in small mode")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            errors = [o for o in cell.outputs if o.output_type == "error"]
            assert not errors, f"{name} cell {i}: {errors[0].ename}: {errors[0].evalue}"
    return nb


def text_of(nb, tag: str) -> str:
    """The stdout / stderr text of the code cell tagged `tag`."""
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return "".join(o.get("text", "") for o in cells[0].outputs if o.output_type == "stream")


def has_image(nb, tag: str) -> bool:
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return any("image/png" in o.get("data", {}) for c in cells for o in c.outputs)


@pytest.mark.slow
def test_01_quickstart(demo_checkpoint, tmp_path, monkeypatch):
    nb = execute("01_quickstart.ipynb", tmp_path, monkeypatch)
    assert "already installed" in text_of(nb, "install")
    stream = text_of(nb, "stream")
    m = re.search(r"\[(\d+) prompt tokens, (\d+) new, finish: (\w+)", stream)
    assert m, stream
    assert int(m.group(2)) > 0
    # The streamed reply itself: the text between the printed prompt and the summary line.
    reply = stream.split("<|im_start|>assistant\n", 1)[1].rsplit("\n[", 1)[0]
    assert reply.strip(), stream
    chat = text_of(nb, "chat")
    assert chat.count("[thinking]") == 2 and chat.count("[answer]") == 2, chat
    found = re.findall(r"--- reasoning: (\d+) characters; answer: (\d+) characters", chat)
    sizes = [(int(r), int(a)) for r, a in found]
    assert len(sizes) == 2 and all(r > 0 for r, _ in sizes) and any(a > 0 for _, a in sizes), chat
    weights = text_of(nb, "weights")
    assert "layers.attn.q_proj" in weights and "'tensor'" in weights, weights


@pytest.mark.compile_bound
@pytest.mark.slow
def test_02_grpo_reward_rises(tmp_path, monkeypatch):
    nb = execute("02_grpo.ipynb", tmp_path, monkeypatch)
    curve = text_of(nb, "curve")
    m = re.search(r"mean reward: first \d+ steps ([\d.]+) -> last \d+ steps ([\d.]+)", curve)
    assert m, curve
    first, last = float(m.group(1)), float(m.group(2))
    assert last > first + 0.2, curve
    assert has_image(nb, "curve")


@pytest.mark.compile_bound
@pytest.mark.slow
def test_03_long_context(tmp_path, monkeypatch):
    nb = execute("03_long_context.ipynb", tmp_path, monkeypatch)
    compare = text_of(nb, "compare")
    short, _, long = compare.partition("== long prompt")
    # Inside the original context auto uses plain RoPE (= off); past it, YaRN (= static), off differs.
    assert "auto == off: True, auto == static: False" in short, compare
    assert "auto == off: False, auto == static: True" in long, compare
    planner = text_of(nb, "planner")
    rows = re.findall(r"(h100x8|v5p-8)\s+data=\d+,fsdp=\d+,tensor=\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
                      planner)
    assert len(rows) == 6, planner
    assert all(float(total) > float(kv) > 0 for _, _, kv, _, total in rows), planner
    # One 131k-token call, chunks of 4,096, chunks of 2,048: every variant fits (blockwise attention
    # against the cache), and the activations shrink with the chunk.
    assert "fits" in planner and "does not fit" not in planner
    for topo in ("h100x8", "v5p-8"):
        acts = [float(a) for t, _, _, a, _ in rows if t == topo]
        assert acts[0] > acts[1] > acts[2] > 0, planner
