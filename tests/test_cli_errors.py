"""Every CLI's user mistakes: exactly one line on stderr naming the problem and the fix, the right
exit code, never a traceback. In-process through each CLI's `main(argv)` where it stops before any
JAX work; two real subprocesses check the same from the outside (imports and exit codes included)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_arithmetic.toml"


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """One of each kind of path a user may hand a CLI by mistake (layouts only: no weights needed)."""
    root = tmp_path_factory.mktemp("kinds")
    hf = root / "hf-model"  # what `huggingface-cli download` leaves
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (hf / "model.safetensors").write_bytes(b"")
    (hf / "tokenizer.json").write_text("{}")
    run = root / "run"  # what `python -m qwq_jax.train` leaves
    for step in ("3", "6"):
        (run / "checkpoints" / step / "state").mkdir(parents=True)
        (run / "checkpoints" / step / "meta").mkdir()
        (run / "checkpoints" / step / "_CHECKPOINT_METADATA").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    empty = root / "empty"
    empty.mkdir()
    other = root / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    gguf = root / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(20))
    from qwq_jax import QwenConfig

    nostate = root / "no-state"  # a conversion's config beside no weights (interrupted, or moved)
    nostate.mkdir()
    (nostate / "config.json").write_text(json.dumps(QwenConfig.preset("tiny").to_hf()))
    (nostate / "_CHECKPOINT_METADATA").write_text("{}")
    corrupt = root / "corrupt"  # weights whose Orbax metadata is not JSON
    (corrupt / "state").mkdir(parents=True)
    (corrupt / "config.json").write_text(json.dumps(QwenConfig.preset("tiny").to_hf()))
    (corrupt / "_CHECKPOINT_METADATA").write_text("{}")
    (corrupt / "state" / "_METADATA").write_text("garbage")
    return {"hf": hf, "run": run, "empty": empty, "other": other, "gguf": gguf, "missing": root / "nope",
            "file": other / "notes.txt", "root": root, "nostate": nostate, "corrupt": corrupt}


def _call(main, argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `main(argv)`, whether it returns or exits."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str, *needles: str) -> str:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---- python -m qwq_jax.sample ------------------------------------------------------------------------
@pytest.mark.parametrize("kind, code, needles", [
    ("hf", 1, ["looks like a Hugging Face model directory", "python -m convert hf {hf} OUT"]),
    ("run", 1, ["training run directory", "{run}/checkpoints/6"]),
    ("missing", 1, ["{missing} does not exist"]),
    ("empty", 1, ["empty directory"]),
    ("other", 1, ["not a qwq-jax checkpoint", "python -m convert hf SRC OUT"]),
    ("gguf", 1, ["GGUF file", "python -m convert gguf {gguf} OUT"]),
    ("nostate", 1, ["{nostate} has a config.json but no weights (no state/ directory", "python -m convert"]),
])
def test_sample_checkpoint_mistakes(paths, capsys, kind, code, needles):
    from qwq_jax.sample import main

    got, out, err = _call(main, ["--checkpoint", str(paths[kind]), "--prompt", "hi"], capsys)
    assert got == code and out == ""
    _one_line(err, *(n.format(**paths) for n in needles))


def test_demo_cache_dir_that_is_a_file(paths, capsys):
    """--cache-dir naming a file (or a path through one): one line naming it, before anything is written."""
    from qwq_jax.sample import main

    for where in (paths["file"], paths["file"] / "sub"):
        got, out, err = _call(main, ["--demo", "--cache-dir", str(where), "--prompt", "hi"], capsys)
        assert got == 1 and out == ""
        _one_line(err, f"cannot use {where} as the cache directory (a file is in the way)", "--cache-dir DIR")
    assert paths["file"].read_text() == "x"


@pytest.mark.parametrize("argv, code, needles", [
    (["--checkpoint", "{hf}"], 1, ["looks like a Hugging Face model directory", "python -m convert hf {hf} OUT"]),
    (["--checkpoint", "{missing}"], 1, ["{missing} does not exist"]),
    (["--checkpoint", "{empty}", "--max-num-seqs", "0"], 2, ["--max-num-seqs must be at least 1"]),
    (["--checkpoint", "{empty}", "--mesh", "tensor=x"], 2, ["--mesh"]),
    (["--checkpoint", "{empty}", "--max-logprobs", "-1"], 2, ["--max-logprobs must be at least 0"]),
])
def test_serve_mistakes(paths, capsys, argv, code, needles):
    """python -m qwq_jax.serve: the same one-line errors as sample, before anything listens."""
    from qwq_jax.serve import main

    got, out, err = _call(main, [a.format(**paths) for a in argv], capsys)
    assert got == code and out == ""
    _one_line(err, *(n.format(**paths) for n in needles))


# ---- python -m qwq_jax.train -----------------------------------------------------------------------
@pytest.mark.parametrize("sets, needles", [
    (["rl.micro_batches=3"], ["rl.micro_batches=3 does not divide the 16 rows", "use one of 1, 2, 4, 8, 16"]),
    (["model.path={hf}"], ["model.path:", "Hugging Face model directory", "python -m convert hf"]),
    (["model.path={run}"], ["training run directory", "checkpoints/6"]),
    (["model.path={other}"], ["not a qwq-jax checkpoint"]),
    (["model.path=preset:huge"], ["unknown preset 'huge'"]),
    (["model.tokenizer={other}"], ["no tokenizer.json in", "set model.tokenizer"]),
    (["model.remat=some"], ["model.remat='some'; known: none, full"]),
    (["model.dtype=fp8"], ["model.dtype='fp8'; known: float32"]),
    (["rl.loss=ppo"], ["unknown loss kind"]),
    (["data.source={missing}"], ["data.source=", "file not found"]),
    (["data.source=synthetic:poetry"], ["unknown synthetic task; known: synthetic:arithmetic"]),
    (['rewards.custom="no_such_module:f"'], ["rewards.custom='no_such_module:f'", "No module named"]),
    (["rewards.math=0"], ["every reward weight is 0"]),
    (["run.steps=0"], ["run.steps must be >= 1"]),
    (["run.output_dir={file}"], ["is a file"]),
    (["run.stepz=3"], ["unknown key run.stepz; known: steps"]),
    (["steps=3"], ["expected section.key=value"]),
    (["run.output_dir="], ["run.output_dir is empty"]),
    (["run.output_dir={hf}"], ["holds files no training run writes (model.safetensors, tokenizer.json)", "choose a new or empty directory"]),
    (["rl.temperature=-1"], ["temperature=-1", "must be >= 0"]),
    (["rl.top_p=1.5"], ["top_p=1.5", "must be in (0, 1]"]),
    (["rl.max_tokens=1e9"], ["max_tokens must be an integer, got 1000000000.0"]),
    (['rl.group_size="4"'], ["group_size must be an integer, got '4'"]),
    (["rl.learning_rate=nan"], ["learning_rate must be a finite number"]),
    (["rl.warmup_steps=-5"], ["warmup_steps must be >= 0"]),
    (["rl.kl_beta=[1]"], ["kl_beta must be a finite number"]),
    (["run.seed=-1"], ["run.seed must be >= 0"]),
])
def test_train_config_mistakes_before_anything_loads(paths, capsys, sets, needles):
    from qwq_jax.train import main

    argv = ["--config", str(TINY)] + [a for s in sets for a in ("--set", s.format(**paths))]
    got, out, err = _call(main, argv, capsys)
    assert got == 2 and out == ""
    _one_line(err, "python -m qwq_jax.train: error:", *needles)


def test_train_usage_mistakes(paths, capsys):
    from qwq_jax.train import main

    (paths["root"] / "list.json").write_text("[1, 2]")
    (paths["root"] / "binary.toml").write_bytes(bytes(range(256)))
    for argv, needle in [(["--config", str(paths["missing"])], "config file not found"),
                         (["--config", str(paths["root"] / "list.json")], "a config is an object of sections"),
                         (["--config", str(paths["root"] / "binary.toml")], "not a text file (not UTF-8)"),
                         (["--bogus"], "unrecognized arguments: --bogus"),
                         (["--config", str(paths["file"])], "notes.txt")]:
        got, out, err = _call(main, argv, capsys)
        assert got == 2, (argv, err)
        _one_line(err, needle)


def test_bad_environment_variable_is_one_line(capsys, monkeypatch):
    """QWQ_NUM_PROCESSES / QWQ_PROCESS_ID feed flag defaults: a bad one is the parser's one line."""
    from convert.__main__ import main as convert_main
    from qwq_jax.sample import main as sample_main

    monkeypatch.setenv("QWQ_NUM_PROCESSES", "abc")
    got, out, err = _call(sample_main, ["--demo", "--prompt", "hi"], capsys)
    assert got == 2 and out == ""
    _one_line(err, "--num-processes: 'abc' is not an integer (from the flag or $QWQ_NUM_PROCESSES)")
    monkeypatch.delenv("QWQ_NUM_PROCESSES")
    monkeypatch.setenv("QWQ_PROCESS_ID", "x1")
    got, out, err = _call(convert_main, ["hf", "a", "b"], capsys)
    assert got == 2 and out == ""
    _one_line(err, "--process-id: 'x1' is not an integer (from the flag or $QWQ_PROCESS_ID)")


@pytest.mark.parametrize("module, argv, needle", [
    ("qwq_jax.sample", ["--prompt", "hi"], "one of the arguments --checkpoint --demo is required"),
    ("qwq_jax.sample", ["--demo", "--prompt", "hi", "--n", "two"], "--n: invalid int value: 'two'"),
    ("qwq_jax.sample", ["--demo", "--prompt", "hi", "--n", "100000"], "at most 128 samples per prompt"),
    ("qwq_jax.sample", ["--demo", "--prompt", "hi", "--process-id", "3"],  # alone it was ignored
     "multi-host start needs coordinator, num_processes as well"),
    ("qwq_jax.plan", ["--bogus"], "unrecognized arguments: --bogus"),
    ("qwq_jax.train", ["--bogus"], "unrecognized arguments: --bogus"),
    ("convert.__main__", ["gguf"], "the following arguments are required: src, out"),
])
def test_every_cli_bad_flag_is_one_line(capsys, module, argv, needle):
    """argparse's own usage errors too (qwq_jax.cli.OneLineParser): one line naming --help, exit 2."""
    import importlib

    got, out, err = _call(importlib.import_module(module).main, argv, capsys)
    assert got == 2 and out == "", err
    _one_line(err, needle, "--help)")


# ---- python -m convert -----------------------------------------------------------------------------
@pytest.mark.parametrize("argv, code, needles", [
    (["export-hf", "{hf}", "{root}/out"], 1, ["Hugging Face model directory"]),
    (["export-hf", "{run}", "{root}/out"], 1, ["training run directory", "{run}/checkpoints/6"]),
    (["export-hf", "{missing}", "{root}/out"], 1, ["does not exist"]),
    (["export-hf", "{other}", "{root}/out"], 1, ["not a qwq-jax checkpoint"]),
    (["export-hf", "{nostate}", "{root}/out"], 1, ["has a config.json but no weights"]),
    (["export-hf", "{corrupt}", "{root}/out"], 1, ["{corrupt}/state: unreadable Orbax metadata"]),
    (["gguf", "{missing}", "{root}/out"], 1, ["{missing} does not exist"]),
    (["hf", "{gguf}", "{root}/out"], 1, ["GGUF file", "python -m convert gguf"]),
    (["hf", "{run}/checkpoints/6", "{root}/out"], 1, ["already a qwq-jax checkpoint", "export-hf"]),
    (["hf", "{file}", "{root}/out"], 1, ["is a file", "Hugging Face model directory"]),
    # hf with a missing, empty or other directory: tests/test_convert.py (test_bad_source_directories)
    (["gguf", "{hf}", "{root}/out"], 1, ["Hugging Face model directory", "python -m convert hf"]),
    (["gguf", "{file}", "{root}/out"], 1, ["not a GGUF file"]),
    (["export-hf", "{run}/checkpoints/6", "{other}"], 1, ["{other} already exists (pass --overwrite"]),
    (["hf"], 2, ["required: src, out", "--help"]),
    (["export-hf", "a", "b", "--max-shard-size", "lots"], 2, ["invalid size 'lots'"]),
    (["export-hf", "a", "b", "--max-shard-size", "infGB"], 2, ["invalid size 'infGB'"]),
    (["export-hf", "a", "b", "--max-shard-size", "0"], 2, ["invalid size '0': give a positive size"]),
    # OUT that is the source, or holds it: --overwrite would delete what is being read
    (["hf", "{hf}", "{hf}", "--overwrite"], 1, ["is the source or holds it", "would delete {hf}"]),
    (["hf", "{hf}", "{root}", "--overwrite"], 1, ["is the source or holds it"]),
    (["export-hf", "{run}/checkpoints/6", "{run}", "--overwrite"], 1, ["is the source or holds it"]),
    (["gguff", "a", "b"], 2, ["invalid choice: 'gguff'"]),
])
def test_convert_mistakes(paths, capsys, argv, code, needles):
    from convert.__main__ import main

    got, out, err = _call(main, [a.format(**paths) for a in argv], capsys)
    assert got == code and out == ""
    _one_line(err, "python -m convert", *(n.format(**paths) for n in needles))
    assert (paths["hf"] / "model.safetensors").is_file() and (paths["run"] / "checkpoints" / "6").is_dir()


# ---- python -m qwq_jax.plan ------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["--preset", "qwq-32b", "--task", "generate", "--topology", "v9-1"], "unknown topology 'v9-1'"),
    (["--preset", "qwq-32b", "--task", "train", "--topology", "h100x8", "--batch", "3", "--micro-batches", "2"],
     "does not split"),
    (["--preset", "qwq-32b", "--devices", "8", "--hbm-gib", "inf"], "--hbm-gib must be a positive size in GiB"),
    (["--preset", "qwq-32b", "--no-aot", "--devices", "1000000000", "--hbm-gib", "80"],
     "--devices must be between 1 and 65536"),
    (["--preset", "qwq-32b", "--task", "train", "--topology", "h100x8", "--rollout-batch", "-4"],
     "rollout_batch=-4 must be >= 1"),
])
def test_plan_mistakes(capsys, argv, needle):
    from qwq_jax.plan import main

    got, out, err = _call(main, argv, capsys)
    assert got == 2 and out == ""
    _one_line(err, needle)


# ---- the same from the outside: real processes -----------------------------------------------------
def _subprocess(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "QWQ_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=300)


def test_real_processes_print_one_line(paths):
    p = _subprocess(["qwq_jax.sample", "--checkpoint", str(paths["hf"]), "--prompt", "hi"])
    assert p.returncode == 1 and p.stdout == ""
    _one_line(p.stderr, "looks like a Hugging Face model directory; convert it with `python -m convert hf")
    p = _subprocess(["qwq_jax.train", "--config", str(TINY), "--set", "rl.micro_batches=3"])
    assert p.returncode == 2 and p.stdout == ""
    _one_line(p.stderr, "rl.micro_batches=3 does not divide")


def test_a_reader_that_goes_away_is_no_traceback():
    """`python -m qwq_jax.train --print-config | head -1`: stdout's reader closed, exit 1 and nothing on stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "QWQ_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    for args in (["qwq_jax.train", "--config", str(TINY), "--print-config"],
                 ["qwq_jax.plan", "--preset", "tiny", "--devices", "1", "--hbm-gib", "1", "--no-aot", "--json"]):
        read, write = os.pipe()
        os.close(read)  # every write to stdout now fails with EPIPE
        try:
            p = subprocess.run([sys.executable, "-m", *args], env=env, stdout=write, stderr=subprocess.PIPE,
                               text=True, timeout=300)
        finally:
            os.close(write)
        assert p.returncode == 1 and p.stderr == "", (args, p.stderr[-2000:])
