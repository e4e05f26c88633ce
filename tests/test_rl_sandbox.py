"""qwq_jax/rl/sandbox.py: one test per escape; each is contained and this process survives it.

Where a guarantee depends on the isolation mode (module docstring of sandbox.py), the strict
assertion runs whenever the mode provides it, and `test_namespaces_used_where_available` makes sure
that on a machine where `unshare` works the strict mode is the one that ran.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from qwq_jax.rl.sandbox import (NOBODY, RUN_DIR, SandboxResult, SandboxUnavailable, check_isolation, run_python,
                                view_entries)

# Every program here runs as one uid (nobody), and RLIMIT_NPROC counts that uid's processes host-wide: the
# fork bombs below would make programs of a test running beside them in another worker fail to start.
# One group: one worker runs these one after another (with the code-reward tests that run programs).
pytestmark = pytest.mark.xdist_group("sandbox")

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, stdin: str = "", **kwargs) -> SandboxResult:
    return run_python(textwrap.dedent(code), stdin, **kwargs)


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "true"],
                              capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _tag() -> str:
    """A process name (at most 15 characters) that a program gives itself and its children inherit."""
    return "qwq" + uuid.uuid4().hex[:12]


def _named(tag: str) -> list[int]:
    """Live pids (zombies aside) named `tag` (/proc/PID/stat): what is left of a program that named itself so."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            name, state = stat[stat.find(b"(") + 1:stat.rfind(b")")], stat[stat.rfind(b")") + 2:][:1]
            if name == tag.encode() and state not in (b"Z", b"X"):
                found.append(int(entry))
    return found


def _fsview() -> bool:
    return "fsview" in _run("pass").isolation


def _needs_fsview() -> None:
    if not _fsview():
        pytest.skip("no private filesystem view here (no user/mount namespaces): the code reward refuses to "
                    "run without sandbox.allow_weaker")


def test_basic_run_stdin_exit_code_and_stderr():
    r = _run("""
        import sys
        n = int(input())
        print(n * 2)
        print("to stderr", file=sys.stderr)
        sys.exit(3)
    """, "21\n")
    assert (r.returncode, r.stdout, r.stderr, r.timed_out, r.killed_reason) == (3, "42\n", "to stderr\n", False, None)
    assert not r.ok
    ok = _run("print('hi')")
    assert ok.ok and ok.stdout == "hi\n"
    lone = _run("print(input())", "\ud800\n")  # unencodable text is replaced, not an error
    assert lone.ok and lone.stdout == "?\n"
    killed = _run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert killed.returncode == -signal.SIGKILL  # the program's own status, not unshare's


def test_namespaces_used_where_available():
    r = _run("print(1)")
    if _unshare_works():
        assert r.isolation.startswith("userns+netns+pidns+mountns+fsview"), r.isolation
    else:
        assert r.isolation.startswith("none"), r.isolation
    if os.geteuid() == 0:
        assert r.isolation.endswith(f"+uid{NOBODY}"), r.isolation
    fallback = _run("print(1)", use_namespaces=False)
    assert fallback.stdout == "1\n" and fallback.isolation.startswith("none")


def test_cannot_connect_to_localhost():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        r = _run(f"""
            import socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
                print("connected")
            except OSError as e:
                print("failed", e.errno)
        """)
        if "netns" not in r.isolation:
            assert r.isolation.startswith("none") and not _unshare_works()
            pytest.skip("no network namespace here: the sandbox does not isolate the network (documented)")
        assert r.stdout.startswith("failed"), r
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever arrived
    finally:
        server.close()


def test_fork_bomb_is_contained():
    start = time.monotonic()
    tag = _tag()
    r = _run(f"""
        import os
        open("/proc/self/comm", "w").write("{tag}")
        print(os.getcwd(), flush=True)
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """, timeout=2.0)
    assert time.monotonic() - start < 6.0
    assert r.timed_out and r.killed_reason == "timeout" and r.returncode is None
    workdir = r.stdout.splitlines()[0]
    assert workdir == RUN_DIR or not os.path.exists(workdir)
    assert _named(tag) == []


def test_fork_limit_enforced():
    # Where RLIMIT_NPROC is enforced (not for real root: see the module docstring), forks stop at the cap.
    r = _run("""
        import os, time
        n = 0
        try:
            for _ in range(100):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
        except OSError as e:
            print("refused after", n, e.errno)
        else:
            print("forked", n)
    """, timeout=5.0, max_processes=16)
    if f"uid{NOBODY}" in r.isolation or os.geteuid() != 0:  # the program's real uid is not the host's root
        assert r.stdout.startswith("refused after"), r
        assert int(r.stdout.split()[2]) < 16
    assert not r.timed_out  # the program exited; its sleeping children died with it


def test_memory_bomb_fails():
    r = _run("""
        x = bytearray(2 * 2**30)
        print("allocated", len(x))
    """, memory_bytes=512 * 2**20)
    assert "allocated" not in r.stdout
    assert r.returncode != 0 and "MemoryError" in r.stderr, r


def test_infinite_loop_times_out_and_group_is_killed():
    start = time.monotonic()
    tag = _tag()
    r = _run(f"""
        import os
        open("/proc/self/comm", "w").write("{tag}")
        if os.fork() == 0:   # a child that leaves the process group
            os.setsid()
        while True:
            pass
    """, timeout=1.0)
    elapsed = time.monotonic() - start
    assert r.timed_out and r.killed_reason == "timeout" and r.returncode is None
    assert elapsed < 3.0, elapsed
    leftovers = _named(tag)
    if "pidns" in r.isolation:
        assert leftovers == []
    else:  # documented: setsid escapes the group kill without a pid namespace; clean up ourselves
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        pytest.skip("no pid namespace: a setsid child survives the group kill (documented)")


def test_cpu_limit():
    r = _run("while True: pass", timeout=10.0, cpu_seconds=1)
    assert not r.timed_out
    assert r.returncode in (-signal.SIGXCPU, -signal.SIGKILL), r


def test_writes_outside_are_contained(tmp_path):
    target = tmp_path / "escaped.txt"
    r = _run(f"""
        import os
        print(os.getcwd())
        try:
            with open("big.bin", "wb") as f:
                f.write(b"x" * (2 * 2**20))
            print("big: written")
        except OSError as e:
            print("big: failed", e.errno)
        try:
            with open({str(target)!r}, "w") as f:
                f.write("escaped")
            print("outside: written")
        except OSError as e:
            print("outside: failed", e.errno)
    """, max_file_bytes=2**20)
    lines = r.stdout.splitlines()
    workdir = lines[0]
    assert lines[1].startswith("big: failed"), r  # RLIMIT_FSIZE
    if "fsview" in r.isolation:  # a tmpfs of the run's own, gone with its mount namespace
        assert workdir == RUN_DIR
    else:  # the run's directory is removed
        assert not os.path.exists(workdir)
        assert os.path.isabs(workdir) and os.path.basename(workdir).startswith("qwq-sandbox-")
    if f"uid{NOBODY}" in r.isolation:  # the program cannot write the caller's (root's, 0700) directories
        assert lines[2].startswith("outside: failed"), r
        assert not target.exists()
    else:  # documented: as the caller's own user it can write what the caller can
        target.unlink(missing_ok=True)


def test_parent_environment_is_not_visible(monkeypatch):
    secret = "qwq-secret-9f3c1b"
    monkeypatch.setenv("QWQ_SANDBOX_SECRET", secret)
    r = _run(f"""
        import os
        print(sorted(os.environ))
        print(os.environ.get("QWQ_SANDBOX_SECRET"))
        try:
            print(open("/proc/{os.getpid()}/environ", "rb").read())
        except OSError as e:
            print("proc: failed", e.errno)
    """)
    assert r.returncode == 0, r
    assert secret not in r.stdout.splitlines()[1]
    names = eval(r.stdout.splitlines()[0])
    assert set(names) <= {"PATH", "LANG", "HOME", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "PYTHONIOENCODING"}
    if "mountns" in r.isolation or f"uid{NOBODY}" in r.isolation:
        assert secret not in r.stdout and "proc: failed" in r.stdout


def test_cannot_signal_the_parent():
    isolation = _run("pass").isolation
    if "pidns" not in isolation and f"uid{NOBODY}" not in isolation:
        pytest.skip("documented: without a pid namespace or the uid drop the program can signal its caller")
    r = _run("""
        import os, signal
        pid = int(input())
        for target in (pid, os.getppid()):
            try:
                os.kill(target, signal.SIGKILL)
                print("sent", target)
            except OSError as e:
                print("failed", target, e.errno)
    """, f"{os.getpid()}\n")
    # Reaching this line is the test: this process was not killed.
    assert r.stdout.splitlines()[0].startswith("failed"), r  # our pid is invisible / not ours to signal
    assert len(r.stdout.splitlines()) == 2  # and the program itself went on


def test_printing_gigabytes_is_cut_off():
    start = time.monotonic()
    r = _run("""
        import sys
        chunk = "x" * 65536
        for _ in range(32768):  # 2 GiB
            sys.stdout.write(chunk)
    """, max_output_bytes=64 * 1024, timeout=30.0)
    assert time.monotonic() - start < 15.0  # stopped at the cap, well before the 30 s timeout
    assert r.killed_reason == "output limit" and not r.timed_out and r.returncode is None
    assert len(r.stdout) == 64 * 1024


def test_stderr_is_capped_too():
    r = _run("import sys\nwhile True: sys.stderr.write('e' * 4096)", max_output_bytes=10_000)
    assert r.killed_reason == "output limit" and len(r.stderr) == 10_000


def test_large_stdin_and_unread_stdin():
    data = "".join(f"{i}\n" for i in range(200_000))  # ~1.3 MB: more than a pipe buffer
    r = _run("import sys\nprint(sum(int(x) for x in sys.stdin))", data)
    assert r.stdout == f"{sum(range(200_000))}\n"
    r = _run("print('ignored stdin')", data)  # exits without reading: no hang, no error
    assert r.ok and r.stdout == "ignored stdin\n"


def test_no_site_packages():
    r = _run("import math_verify")
    assert r.returncode == 1 and "ModuleNotFoundError" in r.stderr
    with pytest.raises(ValueError, match="not installed"):
        _run("pass", packages=["no_such_package_qwq"])


# ---- the private filesystem view -------------------------------------------------------------------

def test_task_files_on_the_host_are_out_of_reach():
    """A world-readable task file in the host's temp dir, the user's home and the project tree: a program
    that looks there (and walks its whole view) finds nothing of it."""
    _needs_fsview()
    secret, name = uuid.uuid4().hex, f"qwq-task-{uuid.uuid4().hex[:8]}.json"
    places = [Path(tempfile.gettempdir()), Path.home(), ROOT]
    files = [place / name for place in places]
    try:
        for f in files:
            f.write_text(f'{{"tests": [{{"input": "1", "output": "{secret}"}}]}}')
            f.chmod(0o644)
        r = _run("""
            import os, sys
            places = sys.stdin.read().split()
            for place in places:
                try:
                    print("listed", place, len(os.listdir(place)), "task" in str(os.listdir(place)))
                except OSError as e:
                    print("cannot list", place, e.errno)
                try:
                    print("read", open(os.path.join(place, "NAME")).read())
                except OSError as e:
                    print("cannot read", place, e.errno)
            for top, dirs, names in os.walk("/"):
                if top == "/":
                    dirs.remove("proc")
                for n in names:
                    if n == "NAME":
                        print("found", os.path.join(top, n))
            print("done")
        """.replace("NAME", name), "\n".join(map(str, places)))
        assert r.ok and r.stdout.endswith("done\n"), r
        assert secret not in r.stdout and "found" not in r.stdout and "True" not in r.stdout, r.stdout
        assert r.stdout.count("cannot read") == 3, r.stdout
    finally:
        for f in files:
            f.unlink(missing_ok=True)


def test_tmp_and_run_dir_are_private_and_fresh():
    _needs_fsview()
    name = f"qwq-leak-{uuid.uuid4().hex[:8]}"
    first = _run(f"""
        import os, tempfile
        for d in ("/tmp", "."):
            with open(os.path.join(d, "{name}"), "w") as f:
                f.write("left for the next one")
        print(tempfile.gettempdir(), sorted(os.listdir("/tmp")), sorted(os.listdir(".")))
    """)
    assert first.stdout == f"/tmp ['{name}'] ['main.py', '{name}']\n", first
    assert not (Path(tempfile.gettempdir()) / name).exists()
    second = _run("import os; print(sorted(os.listdir('/tmp')), sorted(os.listdir('.')))")
    assert second.stdout == "[] ['main.py']\n", second


def test_root_holds_only_the_allowed_entries():
    _needs_fsview()
    r = _run("""
        import os
        print(sorted(os.listdir("/")))
        print(sorted(os.listdir("/dev")))
        print(sorted(os.listdir("/etc")))
        print(os.getcwd(), os.environ["HOME"], os.environ["TMPDIR"], os.getuid(), os.getgid())
        for path in ("/", "/usr", "/dev/null"):
            try:
                open(os.path.join(path, "x") if path != "/dev/null" else path, "w").close()
                print("wrote", path)
            except OSError as e:
                print("cannot write", path, e.errno)
    """)
    lines = r.stdout.splitlines()
    top = eval(lines[0])
    assert top == sorted(view_entries()), r
    interpreter = {Path(p).parts[1] for p in (sys.executable, os.path.realpath(sys.executable), sys.base_prefix)}
    assert set(top) <= {"dev", "etc", "proc", "sandbox", "tmp", "usr", "bin", "lib", "lib32", "lib64", "libx32",
                        *interpreter}, top
    assert {"dev", "proc", "sandbox", "tmp"} <= set(top) and not {"home", "work", "var", "mnt", "srv"} & set(top)
    assert eval(lines[1]) == ["fd", "null", "random", "stderr", "stdin", "stdout", "urandom", "zero"]
    assert set(eval(lines[2])) <= {"ld.so.cache"}
    assert lines[3] == f"{RUN_DIR} {RUN_DIR} /tmp {NOBODY} {NOBODY}"
    assert lines[4:] == ["cannot write / 30", "cannot write /usr 30", "wrote /dev/null"], r  # EROFS


def test_disk_is_capped():
    _needs_fsview()
    r = _run("""
        import os
        for d in ("/tmp", "."):
            try:
                for i in range(4):
                    with open(os.path.join(d, f"f{i}"), "wb") as f:
                        f.write(b"x" * 400_000)
                print(d, "wrote all")
            except OSError as e:
                print(d, "full after", i, e.errno)
    """, disk_bytes=2**20, max_file_bytes=2**20)
    assert r.stdout == "/tmp full after 2 28\n. full after 2 28\n", r  # ENOSPC


def test_stdlib_and_allowed_packages():
    code = """
        import collections, heapq, itertools, json, math, re
        h = [5, 1, 3]
        heapq.heapify(h)
        print(json.dumps([math.isqrt(17), re.sub("a", "b", "aa"), list(itertools.islice(itertools.count(), 3)),
                          collections.Counter("aab")["a"], heapq.heappop(h)]))
    """
    r = _run(code)
    assert r.ok and r.stdout == '[4, "bb", [0, 1, 2], 2, 1]\n', r
    numpy = "import numpy as np\nprint(int(np.arange(10).sum()), np.linalg.inv(np.eye(2))[0, 0])"
    r = _run(numpy, packages=["numpy"], memory_bytes=2**30, timeout=30.0)
    assert r.ok and r.stdout == "45 1.0\n", r
    r = _run("import numpy")  # not allow-listed
    assert r.returncode == 1 and "ModuleNotFoundError" in r.stderr, r
    if "fsview" in r.isolation:  # only what was allowed is there: not jax (site-packages is an empty overlay)
        r = _run("import numpy, sys\nprint(numpy.__file__)\nimport jax", packages=["numpy"], memory_bytes=2**30,
                 timeout=30.0)
        assert r.returncode == 1 and "No module named 'jax'" in r.stderr, r


def test_weaker_hosts_need_allow_weaker():
    """use_namespaces=False: the sandbox's own switch, as on a host without user namespaces."""
    with pytest.raises(SandboxUnavailable) as e:
        check_isolation(use_namespaces=False)
    message = str(e.value)
    assert "\n" not in message and "use_namespaces=False" in message and "sandbox.allow_weaker = true" in message
    assert check_isolation(allow_weaker=True, use_namespaces=False).startswith("none")
    if _fsview():
        assert "fsview" in check_isolation()
