"""Run untrusted Python (model-written programs) in a throwaway, resource-limited process that sees
nothing of the host but the interpreter.

    result = run_python("print(int(input()) * 2)", "21\\n", timeout=5.0)
    result.stdout == "42\\n"; result.returncode == 0
    result.isolation == "userns+netns+pidns+mountns+fsview+uid65534"

Every run gets:
- a private filesystem view ("fsview", below): a fresh run directory (/sandbox: cwd and HOME) and an
  empty private /tmp, nothing else writable, nothing of the host's files but the interpreter's;
- a scrubbed environment (PATH=/usr/bin:/bin, LANG, HOME, TMPDIR, PYTHONDONTWRITEBYTECODE; nothing of
  the caller's) and an isolated interpreter (`python -I -S -B`: no site-packages, no PYTHON* variables),
  plus the allow-listed `packages` (import names, e.g. "numpy": a one-line launcher puts their
  directories on sys.path and runs main.py);
- rlimits: RLIMIT_CPU (SIGXCPU at cpu_seconds, SIGKILL a second later), RLIMIT_AS, RLIMIT_NPROC,
  RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0;
- its own session and process group; on the wall-clock timeout or when stdout/stderr passes
  max_output_bytes the whole group is SIGKILLed (killed_reason "timeout" / "output limit"); once the
  program exits, anything it left in the group is SIGKILLed too.
Test data never enters the sandbox: `code_reward` feeds each test's input on stdin and compares the
output outside.

The private filesystem view. The program runs in a mount namespace whose root is a read-only tmpfs
holding only:
- /sandbox: its run directory, a fresh tmpfs of disk_bytes (4096 inodes) holding main.py, owned by it;
- /tmp: an empty private tmpfs of disk_bytes (mode 1777); both vanish with the run (their pages count
  against the host's memory, not RLIMIT_AS: up to 2 x disk_bytes per run);
- read-only binds, each at its host path (symlinks on the way recreated, e.g. /lib -> usr/lib): the
  interpreter (`sys.executable`), its standard library (the directories of `python -I -S`'s sys.path,
  lib-dynload included; a site-packages or dist-packages inside them covered by an empty read-only
  tmpfs), the allow-listed packages (their directory, or module file, and an auditwheel "NAME.libs"
  beside it), the shared libraries that ldd lists for the interpreter and those extension modules (each
  file, not its directory; libgcc_s too), /etc/ld.so.cache;
- /dev/null, /dev/zero, /dev/random, /dev/urandom (binds) and /dev/fd, /dev/stdin, /dev/stdout,
  /dev/stderr (links into /proc); a /proc of its own pid namespace.
No home, no project tree, no dataset, no host temp directory, no shell or other program (subprocess
works with sys.executable only). A pyenv interpreter under /root shows as /root/.pyenv/versions/X/{bin,
lib} and nothing else of /root. What is bound is planned once per process (and package list: ldd of
the interpreter's modules, ~1 s); each run builds its view in its supervisor with mount(2) (~50 binds)
and pivot_root(2), then detaches the host's root: nothing of it stays mounted below (a chroot would
leave it there for a nested namespace to reach). bubblewrap would do the same; it is not installed on
these machines and the view needs nothing beyond those two calls, so the supervisor builds it itself
(ctypes on libc): one code path wherever `unshare` works. Cost, measured on the 2-core CI machine
with the modes interleaved (`python benchmarks/sandbox.py`): a print(1) program takes ~35 ms (median)
with the view, the same as with the namespaces alone before it and ~3 ms more than with none; the
view is ~5 ms of the supervisor's time (importing ctypes ~2 ms, ~110 mkdir/symlink/mount calls
~2.5 ms). So no prepared roots are kept.

Who builds it, and how the program loses every privilege over it:
- root callers: `unshare --net --pid --fork --kill-child --mount` as root (no user namespace for the
  supervisor: as root it binds whatever the trainer's interpreter needs, e.g. a pyenv under a 0700
  /root). The program's process then drops to nobody:nogroup with no supplementary groups, enters a
  user namespace of its own (uid and gid 65534 mapped to themselves), sets PR_SET_NO_NEW_PRIVS and
  execs: it holds no capability anywhere the view's mounts are owned.
- other callers: `unshare --user --map-root-user --net --pid --fork --kill-child --mount`: the supervisor
  is root inside that user namespace (the caller outside) with the capabilities to mount; the program
  enters a user namespace of its own below it, as uid 65534 mapped to that root, i.e. the caller's uid on
  the host (no "+uid65534" tag: that names the host uid).
Either way its execve as a non-root uid clears the capabilities it had in its own namespace: it cannot
unmount, remount read-write or look under a mount; a user+mount namespace it creates itself gets locked
copies of the same mounts. The supervisor holds capabilities the program lacks, so the program cannot
ptrace it or read its /proc entries.

Isolation modes, probed once per process and cached (the first that works is used); the mode that ran
is recorded in `SandboxResult.isolation`, "+"-joined tags:

- "userns+netns+pidns+mountns+fsview" (this machine, as root or not; needs `unshare` from util-linux,
  and user namespaces for non-root callers): the view above, plus what the next mode gives.
- "userns+netns+pidns+mountns" (the view cannot be built, e.g. mounting refused; needs unprivileged
  user namespaces): `unshare --user --map-current-user --net --pid --fork --kill-child --mount
  --mount-proc` (`--map-root-user` where util-linux is older than 2.38: root inside the namespace, with
  capabilities there only). With --map-current-user the program holds no capabilities at all.
  netns: only a down loopback, so no socket reaches anything, not even the caller's 127.0.0.1
  (filesystem Unix sockets stay reachable where their permissions allow; with the uid drop below that
  means world-writable ones only). pidns: the supervisor is pid 1; when it dies the kernel kills and
  reaps everything in the namespace, so a program that calls setsid() or double-forks cannot outlive
  the run, and the caller's processes are invisible (`os.getppid()` is 1; `kill()` of a caller's pid
  finds nothing, or at worst a sandbox process that happens to have that number). mountns: a private
  /proc listing only the sandbox, so /proc/<caller>/environ is unreachable. Lesser variants (older
  util-linux, restricted kernels) drop "mountns", then "pidns". Without "fsview" the program's cwd and
  HOME are a fresh host temporary directory, deleted afterwards, and it sees the host's filesystem.
- "none": no namespaces (unshare missing or refused, or use_namespaces=False). Guarantees only the
  rlimits, the cwd/env scrubbing, the process-group kill and the timeouts. Network: NOT isolated.
  A program that leaves the process group (setsid + fork) survives the group kill. Killed orphans are
  reaped by init: under a PID 1 that does not reap (a container started without --init) their zombies
  pile up and, counting against RLIMIT_NPROC, eventually make forks fail. Without the uid drop below,
  the program runs as the caller's user: it can signal the caller (kill(-1) included), read
  /proc/<caller>/environ, and write whatever the caller can.
- "+uid65534" (added when the caller is root): the program runs as nobody:nogroup with no
  supplementary groups. Without "fsview" it can write only its directory and world-writable places
  (/tmp, /var/tmp, /dev/shm: not cleaned up afterwards; each file at most max_file_bytes), cannot touch
  the caller's files and cannot signal root's processes. Outside the view the interpreter must be
  runnable by nobody: sys.executable if it is, else the first of /usr/bin/python3,
  /usr/local/bin/python3 that is (a pyenv python under a 0700 /root is not). If none is, the program
  runs as root (and the tag is absent).

Weaker hosts. Without "fsview" a program reads every world-readable file of the host (task data: hidden
tests, reference outputs, a math set's answers; the trainer's code and config) and, without namespaces,
/proc of every process; what it writes in world-writable places stays for the next program. RL finds
such shortcuts, so `check_isolation` (and with it `code_reward` and `python -m qwq_jax.train` with
rewards.code) refuses to start there with one line saying what is missing, unless allow_weaker (config:
`sandbox.allow_weaker = true`), which accepts exactly that. The rlimits, timeouts, group kill, output
caps and (with namespaces) the network and pid isolation hold in every mode.

RLIMIT_NPROC counts processes *and threads* per real uid and is never enforced for processes whose
real uid is the host's root (also when mapped into a user namespace). Inside a user namespace it is
counted per (namespace, uid), so with namespaces it is a per-run cap on processes + threads (without
"fsview" the supervisor counts as one; with it the program's user namespace holds only the program).
Dropping to uid 65534 as root is what makes it enforced: a fork bomb stops at max_processes and then
only burns CPU until the wall timeout kills the namespace. In "none+uid65534" mode all concurrent
sandboxes share one nobody budget; as root without the uid drop a fork bomb is stopped only by the wall
timeout and the group/namespace kill (pids or memory can run out first on a small machine). RLIMIT_AS
is per process: the worst case is max_processes * memory_bytes.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from typing import Sequence

NOBODY = 65534  # uid and gid the program runs as when the caller is root (and inside its own user namespace)
RUN_DIR = "/sandbox"  # the program's cwd and HOME inside the private filesystem view

# pid 1 of the sandbox: build the private filesystem view (when `view` is given), fork the program with the
# rlimits set (and, in the view, in a user namespace of its own as NOBODY), wait, report its exit status.
_SUPERVISOR = r"""
import os, resource, sys
status_fd, limits, view, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND = 1, 2, 4, 8, 32, 4096

def build_view(ops, disk, drop):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def ok(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    def mount(src, dst, fstype, flags, data=None):
        ok(libc.mount(src, dst.encode(), fstype, ctypes.c_ulong(flags), data), "mount " + dst)
    def read_only(path, flags=RDONLY | NOSUID | NODEV):  # noexec kept where the host has it (it is locked)
        mount(None, path, None, REMOUNT | BIND | flags | (os.statvfs(path).f_flag & NOEXEC))
    os.umask(0o022)
    with open("main.py", "rb") as f:
        code = f.read()
    root = os.getcwd()  # the run's host directory: the view's root is a tmpfs over it, in this mount namespace
    mount(b"tmpfs", root, b"tmpfs", NOSUID | NODEV, b"size=1m,nr_inodes=4096,mode=755")
    overlays = []
    for line in ops:
        op, path, *target = line.split("\t")
        at = root + path
        if op == "d":
            os.makedirs(at, exist_ok=True)
        elif op == "l":
            os.symlink(target[0], at)
        elif op == "t":  # an empty directory over the host's (site-packages), read-only once filled
            mount(b"tmpfs", at, b"tmpfs", NOSUID | NODEV, b"size=64k,nr_inodes=1024,mode=755")
            overlays.append(at)
        else:  # "b": the host's file or directory, read-only; "v": a device node
            if not os.path.lexists(at):
                if os.path.isdir(path):
                    os.mkdir(at)
                else:
                    os.close(os.open(at, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            mount(path.encode(), at, None, BIND)
            read_only(at, (RDONLY | NOSUID | NODEV) if op == "b" else (NOSUID | NOEXEC))
    owner = os.getuid() if drop < 0 else drop  # the program's uid here
    for path, mode in (("/sandbox", b"755"), ("/tmp", b"1777")):
        os.mkdir(root + path)
        mount(b"tmpfs", root + path, b"tmpfs", NOSUID | NODEV,
              b"size=%d,nr_inodes=4096,mode=%s,uid=%d,gid=%d" % (disk, mode, owner, owner))
    with open(root + "/sandbox/main.py", "wb") as f:
        f.write(code)
    os.chown(root + "/sandbox/main.py", owner, owner)
    os.mkdir(root + "/proc")
    mount(b"proc", root + "/proc", b"proc", NOSUID | NODEV | NOEXEC)  # while the host's /proc is still seen
    for at in overlays:
        read_only(at)
    machine = os.uname().machine  # glibc has no pivot_root(): the syscall by number
    number = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203, "s390x": 217}.get(machine)
    if number is None:
        raise OSError("pivot_root: no syscall number known for " + machine)
    os.chdir(root)
    ok(libc.syscall(number, b".", b"."), "pivot_root")
    ok(libc.umount2(b".", 2), "umount the host's root")  # MNT_DETACH: nothing of the host stays reachable
    os.chdir("/")
    read_only("/")
    os.chdir("/sandbox")
    return libc

def own_user_namespace(libc, drop):
    # As nobody (a root supervisor drops first), in a user namespace of its own: NPROC counts per run, and
    # the program holds no capability over the view's mounts (execve as a non-root uid clears them).
    if drop >= 0:
        os.setgroups([])
        os.setresgid(drop, drop, drop)
        os.setresuid(drop, drop, drop)
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE (a uid change clears it): /proc/self/uid_map is ours again
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(__import__("ctypes").get_errno(), "unshare(CLONE_NEWUSER)")
    for name, data in (("setgroups", "deny"), ("uid_map", "NOBODY %d 1" % uid), ("gid_map", "NOBODY %d 1" % gid)):
        fd = os.open("/proc/self/" + name, os.O_WRONLY)
        os.write(fd, data.encode())
        os.close(fd)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS

libc = None
if view:
    try:
        head, *ops = view.split("\n")
        disk, drop = map(int, head.split())
        libc = build_view(ops, disk, drop)
    except BaseException as e:
        os.write(2, ("sandbox: cannot build the filesystem view: %s\n" % (e,)).encode())
        os._exit(125)
pid = os.fork()
if pid == 0:
    try:
        os.close(status_fd)
        for item in limits.split(","):
            name, soft, hard = item.split(":")
            which = getattr(resource, name)
            cap = resource.getrlimit(which)[1]
            soft, hard = int(soft), int(hard)
            if cap != resource.RLIM_INFINITY:
                soft, hard = min(soft, cap), min(hard, cap)
            resource.setrlimit(which, (soft, hard))
        if libc is not None:
            own_user_namespace(libc, drop)
        os.execv(argv[0], argv)
    except BaseException as e:
        os.write(2, ("sandbox: cannot start the program: %r\n" % (e,)).encode())
    os._exit(127)
_, status = os.waitpid(pid, 0)
os.write(status_fd, str(os.waitstatus_to_exitcode(status)).encode())
""".replace("NOBODY", str(NOBODY)).replace("/sandbox", RUN_DIR)

# Runs the program when allow-listed packages are on its path (`python -I -S` has no other way to get them).
_LAUNCHER = ("import sys; sys.path += {!r}; sys.argv[:] = ['main.py']; __file__ = 'main.py'; "
             "exec(compile(open('main.py', 'rb').read(), 'main.py', 'exec'))")


@dataclasses.dataclass
class SandboxResult:
    returncode: int | None  # the program's exit code, -N if killed by signal N; None if we killed it
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None  # "timeout" | "output limit" | None
    isolation: str  # the mode that ran (module docstring), e.g. "userns+netns+pidns+mountns+fsview+uid65534"

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed_reason is None


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot give the guarantees asked for on this host (the message says what is missing)."""


@dataclasses.dataclass(frozen=True)
class _Mode:
    prefix: tuple[str, ...]  # the unshare command line, or ()
    supervisor: str  # interpreter of the supervisor (runnable on the host by `uid`)
    python: str  # interpreter of the program (in the view: sys.executable, bound at its host path)
    uid: int | None  # run as this uid/gid (root callers) or as the caller (None)
    pid_namespace: bool  # the unshare forks: its child is the namespace's pid 1
    view: bool  # the program sees only the private filesystem view
    drop: int | None  # (view, root supervisor) the uid/gid the program drops to before its own user namespace
    isolation: str
    missing: str = ""  # what a stronger mode lacked here (empty for the strongest)


@dataclasses.dataclass(frozen=True)
class _View:
    spec: str  # the view's construction, one operation a line (see _SUPERVISOR's build_view)
    sys_path: tuple[str, ...]  # directories of allow-listed packages, appended to the program's sys.path
    entries: tuple[str, ...]  # the names in the view's "/"


def run_python(code: str, stdin: str = "", *, timeout: float = 5.0, cpu_seconds: int = 5,
               memory_bytes: int = 512 * 2**20, max_processes: int = 64, max_file_bytes: int = 1 * 2**20,
               max_open_files: int = 64, max_output_bytes: int = 64 * 1024, disk_bytes: int = 16 * 2**20,
               packages: Sequence[str] = (), use_namespaces: bool | None = None) -> SandboxResult:
    """Run `code` as a Python program with `stdin`; see the module docstring for the guarantees.

    disk_bytes: size of the run directory and of /tmp (each a tmpfs) in the private filesystem view.
    packages: import names (e.g. "numpy") the program may import besides the standard library.
    use_namespaces: None = use them when available, True = require them (SandboxUnavailable if not),
    False = never.
    """
    mode = _mode(use_namespaces)
    limits = ",".join(f"{name}:{soft}:{hard}" for name, soft, hard in [
        ("RLIMIT_CPU", cpu_seconds, cpu_seconds + 1), ("RLIMIT_AS", memory_bytes, memory_bytes),
        ("RLIMIT_NPROC", max_processes, max_processes), ("RLIMIT_FSIZE", max_file_bytes, max_file_bytes),
        ("RLIMIT_NOFILE", max_open_files, max_open_files), ("RLIMIT_CORE", 0, 0)])
    view = _view(mode.python, tuple(packages), mode.view)
    return _run(mode, view, code, stdin.encode("utf-8", "replace"), limits, timeout, max_output_bytes, disk_bytes)


def check_isolation(allow_weaker: bool = False, use_namespaces: bool | None = None,
                    packages: Sequence[str] = ()) -> str:
    """The isolation tag programs run under here. Without the private filesystem view ("fsview": the
    program could read the host's world-readable files, e.g. a task's expected outputs) this raises
    SandboxUnavailable, one line saying what is missing, unless allow_weaker. ValueError: a package of
    `packages` is not installed."""
    mode = _mode(use_namespaces)
    if "fsview" not in mode.isolation and not allow_weaker:
        raise SandboxUnavailable(f"code sandbox: {mode.missing}, so a program could read the host's files (task "
                                 f"data, expected outputs); set sandbox.allow_weaker = true to run it anyway "
                                 f"(isolation {mode.isolation!r}, see qwq_jax/rl/sandbox.py)")
    _view(mode.python, tuple(packages), mode.view)
    return mode.isolation


def view_entries(packages: Sequence[str] = ()) -> tuple[str, ...]:
    """The names a program sees in "/" of the private filesystem view (empty where there is none)."""
    mode = _mode(None)
    return _view(mode.python, tuple(packages), True).entries if mode.view else ()


def _run(mode: _Mode, view: _View, code: str, stdin: bytes, limits: str, timeout: float, max_output: int,
         disk_bytes: int) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="qwq-sandbox-")
    status_r, status_w = os.pipe()
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        if mode.uid is not None:
            os.chown(workdir, mode.uid, mode.uid)
        home, tmp = (RUN_DIR, "/tmp") if mode.view else (workdir, workdir)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": tmp,
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
        program = [mode.python, "-I", "-S", "-B"]
        program += ["-c", _LAUNCHER.format(list(view.sys_path))] if view.sys_path else ["main.py"]
        spec = f"{disk_bytes} {-1 if mode.drop is None else mode.drop}\n{view.spec}" if mode.view else ""
        argv = [*mode.prefix, mode.supervisor, "-I", "-S", "-B", "-c", _SUPERVISOR, str(status_w), limits, spec,
                *program]
        drop = {} if mode.uid is None else {"user": mode.uid, "group": mode.uid, "extra_groups": []}
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=(status_w,), start_new_session=True, **drop)
        os.close(status_w)
        status_w = -1
        try:
            out, err, reason = _communicate(proc, stdin, time.monotonic() + timeout, max_output)
        finally:
            _kill(proc, mode)  # no-op for what already exited; reaps the leader
        os.set_blocking(status_r, False)
        try:
            status = os.read(status_r, 64).decode()
        except BlockingIOError:
            status = ""
        # Stopped by us (timeout / output cap): None, even when the program died of the closed pipe first.
        returncode = None if reason else (int(status) if status else proc.returncode)
        return SandboxResult(returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                             timed_out=reason == "timeout", killed_reason=reason, isolation=mode.isolation)
    finally:
        os.close(status_r)
        if status_w >= 0:
            os.close(status_w)
        _rmtree(workdir)


def _communicate(proc: subprocess.Popen, stdin: bytes, deadline: float,
                 max_output: int) -> tuple[bytes, bytes, str | None]:
    """Feed stdin and read both streams until EOF, the deadline, or an output cap (-> reason)."""
    out_fd, err_fd, in_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in (out_fd, err_fd):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    pending = memoryview(stdin)
    if pending:
        os.set_blocking(in_fd, False)
        sel.register(in_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    reason, group_killed = None, False
    try:
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            for key, _ in sel.select(min(remaining, 0.05)):
                if key.fd == in_fd:
                    try:
                        pending = pending[os.write(in_fd, pending[:65536]):]
                    except BlockingIOError:
                        continue
                    except OSError:  # the program closed stdin / exited
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(in_fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                room = max_output - len(buf)
                buf += chunk[:room]
                if len(chunk) > room:
                    reason = "output limit"
            if reason:
                break
            if not group_killed and proc.poll() is not None:
                # The leader is gone: kill what it left behind so nothing else holds our pipes open.
                _killpg(proc.pid)
                group_killed = True
    finally:
        sel.close()
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), reason


def _kill(proc: subprocess.Popen, mode: _Mode) -> None:
    """SIGKILL the run: the pid namespace's init first (the kernel then kills the whole namespace and
    the unshare exits only once it is empty), then our process group; reap the leader. Our pipe ends
    are closed first so that nothing (unshare's own error message included) blocks writing to them."""
    for f in (proc.stdin, proc.stdout, proc.stderr):
        f.close()
    if mode.pid_namespace and proc.poll() is None:
        for child in _children(proc.pid):
            _signal(child)
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
    _killpg(proc.pid)
    proc.wait()
    # Without a pid namespace the group's other members are orphans: wait (bounded) until all are dead,
    # so that nothing of this run outlives the call (zombies wait for init to reap them; they are harmless).
    deadline = time.monotonic() + 5.0
    while _killpg(proc.pid) and _group_running(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.005)


def _killpg(pgid: int) -> bool:
    """SIGKILL the process group; False when it is empty."""
    try:
        os.killpg(pgid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _signal(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _proc_stats() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgid) of every process, from /proc/*/stat (the fields after "(comm)")."""
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            if len(fields) > 2:
                stats.append((int(entry), fields[0].decode(), int(fields[1]), int(fields[2])))
    return stats


def _children(pid: int) -> list[int]:
    return [p for p, _, ppid, _ in _proc_stats() if ppid == pid]


def _group_running(pgid: int) -> bool:
    return any(g == pgid and state not in "ZX" for _, state, _, g in _proc_stats())


def _rmtree(path: str) -> None:
    """Remove the run's directory even if the program chmod-ed things unreadable."""
    def fix(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)


# ---- the private filesystem view (built once per process and package list) --------------------------

_VIEWS: dict[tuple[str, tuple[str, ...], bool], _View] = {}
_VIEWS_LOCK = threading.Lock()
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


def _view(python: str, packages: tuple[str, ...], private: bool) -> _View:
    """What the program's view holds (`private`), or only where the packages are (no view)."""
    key = (python, packages, private)
    with _VIEWS_LOCK:
        if key not in _VIEWS:
            _VIEWS[key] = _plan_view(python, packages) if private else _View("", _package_dirs(packages)[1], ())
        return _VIEWS[key]


def _package_dirs(packages: tuple[str, ...]) -> tuple[list[str], tuple[str, ...]]:
    """(what to bind for each package: its directory or module file and an auditwheel "NAME.libs" beside
    it, the directories to put on sys.path), found from this process's import path."""
    paths, parents = [], []
    for name in packages:
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
        if spec is None or not (spec.submodule_search_locations or spec.has_location):
            raise ValueError(f"sandbox: package {name!r} is not installed here (packages are import names)")
        where = list(spec.submodule_search_locations or [spec.origin])
        for path in where:
            parent = os.path.dirname(os.path.abspath(path))
            paths.append(path)
            libs = os.path.join(parent, f"{name}.libs")
            if os.path.isdir(libs):
                paths.append(libs)
            parents.append(parent)
    return paths, tuple(dict.fromkeys(parents))


def _plan_view(python: str, packages: tuple[str, ...]) -> _View:
    """The view of `python`: its standard library (site-/dist-packages hidden), the allow-listed packages,
    the shared libraries these load (from ldd), the loader's cache, four device nodes; each at its host path."""
    out = subprocess.run([python, "-I", "-S", "-c", "import sys; print('\\n'.join(sys.path))"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    stdlib = [p for p in out.splitlines() if p and os.path.isdir(p)]
    package_paths, sys_path = _package_dirs(packages)
    view = _ViewBuilder()
    for path in stdlib:
        view.add(path)
    for path in stdlib:
        for name in ("site-packages", "dist-packages"):
            if os.path.isdir(os.path.join(path, name)):
                view.overlay(os.path.join(path, name))  # an empty read-only tmpfs
    for path in package_paths:
        view.add(path)
    view.add(python)
    binaries = [os.path.realpath(python)]
    for path in stdlib:  # lib-dynload is one of them
        binaries += glob.glob(os.path.join(path, "*.so"))
    for path in package_paths:
        if os.path.isdir(path):
            binaries += glob.glob(os.path.join(path, "**", "*.so*"), recursive=True)
    libs = _shared_libraries(binaries)
    for lib in libs:
        view.add(lib)
    # libgcc_s is dlopen()-ed by glibc (thread cancellation, backtraces); ld.so.cache finds libraries by name.
    optional = [os.path.join(os.path.dirname(lib), "libgcc_s.so.1") for lib in libs if "/libc.so" in lib]
    for path in [*optional, "/etc/ld.so.cache"]:
        if os.path.exists(path):
            view.add(path)
    for device in _DEVICES:
        view.add(device, "v")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        view.link("/dev/" + name, target)
    return view.done(sys_path)


def _shared_libraries(binaries: list[str]) -> list[str]:
    """The shared libraries (absolute paths, as the loader names them) that `binaries` load, from one ldd."""
    ldd = shutil.which("ldd", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if ldd is None:
        raise OSError("no `ldd` to list the interpreter's shared libraries")
    out = subprocess.run([ldd, *binaries], capture_output=True, text=True, timeout=120).stdout
    libs = []
    for line in out.splitlines():
        if not line.startswith("\t"):
            continue
        path = line.split("=>", 1)[1] if "=>" in line else line
        path = path.strip().split(" (", 1)[0].strip()
        if path.startswith("/"):
            libs.append(path)
    if not libs:
        raise OSError(f"ldd lists no shared library of {binaries[0]}")
    return list(dict.fromkeys(libs))


class _ViewBuilder:
    """Host paths made visible at the same paths: symlinks on the way recreated, directories created,
    the file or directory itself bound (read-only; device nodes read-write)."""

    def __init__(self):
        self.ops: list[str] = []
        self.made: set[str] = set()  # directories and symlinks created in the view's root
        self.mounts: dict[str, str] = {}  # path -> "b" (read-only bind), "v" (device), "t" (tmpfs overlay)

    def _op(self, *fields: str) -> None:
        if any("\t" in f or "\n" in f for f in fields):
            raise OSError(f"sandbox: cannot bind a path with a tab or newline: {fields[1]!r}")
        self.ops.append("\t".join(fields))

    def _covering(self, path: str) -> str | None:
        """The deepest mount at or above `path`."""
        while True:
            if path in self.mounts:
                return path
            if path == "/":
                return None
            path = os.path.dirname(path)

    def add(self, path: str, kind: str = "b", _hops: int = 0) -> None:
        if _hops > 40:
            raise OSError(f"sandbox: too many symlinks on the way to {path}")
        path = os.path.normpath(path)
        base = self._covering(path)
        if base is not None and self.mounts[base] != "t":
            return  # already visible through a bind of itself or a directory above it
        parts = path.strip("/").split("/")
        skip = 0 if base is None else len(base.strip("/").split("/"))
        cur = "" if base is None else base
        for i in range(skip, len(parts)):
            cur += "/" + parts[i]
            st = os.lstat(cur)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(cur)
                if cur not in self.made:
                    self._op("l", cur, target)
                    self.made.add(cur)
                rest = "/".join(parts[i + 1:])
                resolved = os.path.join(os.path.dirname(cur), target)
                self.add(os.path.join(resolved, rest) if rest else resolved, kind, _hops + 1)
                return
            if i < len(parts) - 1 and cur not in self.made:
                self._op("d", cur)
                self.made.add(cur)
        os.stat(cur)  # exists
        self._op(kind, cur)
        self.mounts[cur] = kind

    def overlay(self, path: str) -> None:
        path = os.path.realpath(path)
        self._op("t", path)
        self.mounts[path] = "t"

    def link(self, path: str, target: str) -> None:
        if path not in self.made:
            self._op("l", path, target)
            self.made.add(path)

    def done(self, sys_path: tuple[str, ...]) -> _View:
        entries = {op.split("\t")[1].split("/")[1] for op in self.ops} | {RUN_DIR.strip("/"), "tmp", "proc"}
        return _View("\n".join(self.ops), sys_path, tuple(sorted(entries)))


# ---- probing the isolation mode (once per process) --------------------------------------------------

_MODES: dict[bool, _Mode | None] = {}
_MISSING: list[str] = []  # why no namespace mode works here (set by the namespace probe when none does)
_MODES_LOCK = threading.Lock()
_PROBE_LIMITS = "RLIMIT_CORE:0:0"


def _mode(use_namespaces: bool | None) -> _Mode:
    with _MODES_LOCK:
        if use_namespaces is not False and True not in _MODES:
            _MODES[True] = _probe(namespaces=True)
        if use_namespaces is False or _MODES[True] is None:
            if False not in _MODES:
                _MODES[False] = _probe(namespaces=False)
        if use_namespaces is True and _MODES[True] is None:
            raise SandboxUnavailable(f"sandbox: namespaces requested but {_MISSING[0]}")
        mode = _MODES[True] if use_namespaces is not False and _MODES[True] is not None else _MODES[False]
        assert mode is not None
        if mode.prefix == ():
            why = "namespaces are switched off (use_namespaces=False)" if use_namespaces is False else _MISSING[0]
            mode = dataclasses.replace(mode, missing=why)
    return mode


def _probe(namespaces: bool) -> _Mode | None:
    """The strongest mode that runs a trivial program here (None: no namespace mode works)."""
    uid, pythons = None, [sys.executable]
    if os.geteuid() == 0:
        uid, pythons = NOBODY, [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    candidates = []
    for python in dict.fromkeys(p for p in pythons if p and os.path.exists(p)):
        candidates.append((uid, python))
    if uid is not None:
        candidates.append((None, sys.executable))  # no interpreter works for nobody: stay root
    tag = "" if uid is None else f"+uid{uid}"
    modes: list[_Mode] = []
    if not namespaces:
        modes = [_Mode((), python, python, run_uid, False, False, None, "none" + ("" if run_uid is None else tag))
                 for run_uid, python in candidates]
    unshare = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if namespaces and unshare is None:
        _MISSING.append("user namespaces are unavailable (no `unshare` from util-linux on PATH)")
        return None
    if namespaces:
        # The private view. A root caller builds it as root in new mount/pid/net namespaces (it can bind
        # whatever the trainer's interpreter needs, e.g. a pyenv under a 0700 /root); the program drops to
        # nobody, then enters a user namespace of its own. Other callers: root in a user namespace.
        fsview = "userns+netns+pidns+mountns+fsview"
        spawn = ("--net", "--pid", "--fork", "--kill-child", "--mount")
        if uid is not None:
            modes.append(_Mode((unshare, *spawn), sys.executable, sys.executable, None, True, True, uid, fsview + tag))
        for run_uid, python in candidates:
            if run_uid is not None or uid is None:
                modes.append(_Mode((unshare, "--user", "--map-root-user", *spawn), python, sys.executable, run_uid,
                                   True, True, None, fsview + ("" if run_uid is None else tag)))
        for run_uid, python in candidates:
            for user in ("--map-current-user", "--map-root-user"):
                base = (unshare, "--user", user, "--net")
                for prefix, forks, tags in [
                        (base + ("--pid", "--fork", "--kill-child", "--mount", "--mount-proc"), True,
                         "userns+netns+pidns+mountns"),
                        (base + ("--pid", "--fork", "--kill-child"), True, "userns+netns+pidns"),
                        (base + ("--pid", "--fork"), True, "userns+netns+pidns"),
                        (base, False, "userns+netns")]:
                    modes.append(_Mode(prefix, python, python, run_uid, forks, False, None,
                                       tags + ("" if run_uid is None else tag)))
    missing = []
    for mode in modes:
        try:
            view = _view(mode.python, (), mode.view)
            result = _run(dataclasses.replace(mode, missing=""), view, "print('ok')", b"", _PROBE_LIMITS, 10.0,
                          1024, 2**20)
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            result = SandboxResult(None, "", f"{type(e).__name__}: {e}", False, None, mode.isolation)
        if result.returncode == 0 and result.stdout == "ok\n":
            return dataclasses.replace(mode, missing=missing[0] if missing else "")
        if not missing and mode.prefix:
            why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
            missing.append(f"the private filesystem view cannot be built here ({why})" if mode.view else
                           f"user namespaces are unavailable (`unshare --user --net` failed: {why})")
    if namespaces:
        _MISSING.append(missing[0] if missing else "user namespaces are unavailable")
        return None
    raise RuntimeError("sandbox: cannot run a Python interpreter at all")
