"""Every escape class of issue 13, tried against the sandbox and checked from outside it.

Each program below got out of the previous sandbox (an audit hook in the program's interpreter, a process
group and rlimits). The checks never trust what the program prints: marker files outside the run's folder,
a victim process started here, the pid namespace seen from the host, the files of a victim folder.
``audit=False`` and the ``gc`` attack take the audit hook away: what is refused then is refused by the kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from distill.sandbox import run_python
from distill.sandbox.kernel import read_paths

SRC = str(Path(__file__).resolve().parent.parent / "src")
NOBODY = 65534

# Prints the run's pid namespace (its inode), so the host can look for survivors in it afterwards.
REPORT_NAMESPACE = "import os\nprint('NS', os.stat('/proc/self/ns/pid').st_ino, flush=True)\n"

# The audit hook's state emptied through gc: every table in its closure cleared, every check made true.
DISABLE_AUDIT_HOOK = """
import gc
for obj in gc.get_objects():
    if type(obj).__name__ == "function" and obj.__name__ == "hook" and obj.__closure__:
        for cell in obj.__closure__:
            value = cell.cell_contents
            if isinstance(value, set):
                value.clear()
            elif isinstance(value, list):
                value[:] = [10**9]
            elif value is False:
                cell.cell_contents = True
            elif callable(value) and getattr(value, "__name__", "") == "inside":
                cell.cell_contents = lambda path: True
import ctypes  # refused by the hook while it works
print("HOOK-OFF", flush=True)
"""

ATTEMPT = """
def attempt(name, action):
    try:
        action()
        print(name, "DONE", flush=True)
    except BaseException as error:
        print(name, "refused", type(error).__name__, flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def _survivors(stdout: str, grace_s: float = 1.0) -> list[int]:
    """Live host processes in the run's pid namespace (reported by REPORT_NAMESPACE), after up to ``grace_s``.

    The kernel tears a namespace down asynchronously; on a loaded machine its last processes can take a moment
    to go. The grace stays below the escapees' 2 s lifetime, so a process that really escaped is still caught.
    """
    end = time.monotonic() + grace_s
    while True:
        found = _namespace_members(stdout)
        if not found or time.monotonic() > end:
            return found
        time.sleep(0.05)


def _namespace_members(stdout: str) -> list[int]:
    namespace = int(next(line.split()[1] for line in stdout.splitlines() if line.startswith("NS ")))
    assert namespace != os.stat("/proc/self/ns/pid").st_ino, "the run shared the host's pid namespace"
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}/ns/pid").st_ino == namespace and _alive(int(entry)):
                found.append(int(entry))
        except OSError:
            pass
    return found


def _escapee(marker: Path, seconds: float = 2.0) -> str:
    """A program that keeps trying to write ``marker`` (outside the run) for ``seconds``."""
    return (
        f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n"
        f"    try:\n        open({str(marker)!r}, 'w').write('escaped')\n    except OSError:\n        pass\n"
        "    time.sleep(0.05)\n"
    )


@pytest.fixture
def marker():
    path = Path(tempfile.gettempdir()) / f"sandbox_escape_{uuid.uuid4().hex}"
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def victim_process():
    """A process outside the sandbox with a secret in its environment."""
    secret = f"sk-{uuid.uuid4().hex}"
    process = subprocess.Popen(["sleep", "60"], env={"PATH": "/usr/bin:/bin", "DISTILL_SECRET": secret})
    yield process, secret
    process.kill()
    process.wait()


@pytest.fixture
def victim_folder():
    """A folder outside the run with one file; yields (folder, file, snapshot of both)."""
    folder = Path(tempfile.mkdtemp(prefix="sandbox_victim_"))
    keep = folder / "keep.txt"
    keep.write_text("precious")
    os.chmod(keep, 0o644)
    os.utime(keep, (1_000_000, 1_000_000))

    def snapshot():
        return sorted(os.listdir(folder)), keep.read_text(), stat.S_IMODE(keep.stat().st_mode), keep.stat().st_mtime

    yield folder, keep, snapshot
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("max_processes", [1, 4])
def test_low_level_spawn_neither_escapes_nor_outlives_the_run(marker, max_processes):
    # Before: _posixsubprocess.fork_exec ran with no checks and its child (in a new session) outlived the run.
    code = REPORT_NAMESPACE + (
        "import _posixsubprocess, os, sys\n"
        f"argv = [sys.executable, '-c', {_escapee(marker)!r}]\n"
        "r, w = os.pipe()\n"
        "common = ([a.encode() for a in argv], [argv[0].encode()], True, (), None, None, -1, -1, -1, -1, -1, -1,"
        " r, w, True, True, -1, None, None, None, -1, None)\n"
        "try:\n    pid = _posixsubprocess.fork_exec(*common, False)\n"
        "except TypeError:\n    pid = _posixsubprocess.fork_exec(*common)\n"
        "print('spawned', pid, flush=True)\n"
    )
    result = run_python(code, max_processes=max_processes, timeout_s=5)
    if max_processes > 1:
        assert "spawned" in result.stdout  # it did start: the kernel, not a refusal, keeps it in
    time.sleep(0.5)
    assert _survivors(result.stdout) == [] and not marker.exists()


def test_forked_child_that_calls_setsid_dies_with_the_run(marker):
    # Before: a child that left the process group with setsid() survived the cleanup kill.
    code = REPORT_NAMESPACE + (
        f"if os.fork() == 0:\n    os.setsid()\n    exec({_escapee(marker)!r})\n    os._exit(0)\nprint('forked')\n"
    )
    result = run_python(code, max_processes=2, timeout_s=5)
    assert result.passed and "forked" in result.stdout
    time.sleep(0.5)
    assert _survivors(result.stdout) == [] and not marker.exists()


FORK_COUNT = (
    "import os, time\nmade = 0\nfor _ in range(12):\n    try:\n        pid = os.fork()\n    except OSError:\n"
    "        break\n    if pid == 0:\n        time.sleep(3)\n        os._exit(0)\n    made += 1\nprint(made)\n"
)


@pytest.mark.parametrize("max_processes", [1, 2, 3])
def test_process_limit_is_exact_without_the_audit_hook(max_processes):
    # Before: the limit left room for one more process than asked (and none as root without the hook).
    result = run_python(FORK_COUNT, max_processes=max_processes, audit=False, timeout_s=10)
    assert result.passed and int(result.stdout) == max_processes - 1
    assert result.limits["processes"] == max_processes


def test_c_library_handle_writes_deletes_and_signals_nothing_outside(marker, victim_folder, victim_process):
    # Before: a ctypes CDLL left in __main__ by the launcher wrote anywhere. Here the program holds one
    # itself (audit hook off), which is the same position.
    folder, keep, snapshot = victim_folder
    before = snapshot()
    process, _ = victim_process
    code = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
print("open", libc.open({str(marker).encode()!r}, 0o101, 0o644))
print("unlink", libc.unlink({str(keep).encode()!r}))
print("chmod", libc.chmod({str(keep).encode()!r}, 0o777))
print("kill", libc.kill({process.pid}, 9))
print("kill-init", libc.kill(1, 9))
print("ptrace", libc.ptrace(16, {process.pid}, 0, 0))
print("unshare", libc.unshare(0x10000000))
print("mount", libc.mount(b"none", os.getcwd().encode(), b"tmpfs", 0, None))
print("setns", libc.syscall(308, 0, 0))
"""
    result = run_python(code, audit=False)
    assert result.passed, result.stderr
    outcomes = dict(line.split() for line in result.stdout.splitlines())
    assert set(outcomes.values()) == {"-1"}, outcomes  # every call failed
    assert not marker.exists() and snapshot() == before and process.poll() is None


@pytest.mark.parametrize("audit", [True, False])
def test_descriptor_relative_calls_change_nothing_outside(victim_folder, audit):
    # Before: dir_fd / src_dir_fd arguments and fd chmod went around the audit hook's path checks.
    folder, keep, snapshot = victim_folder
    before = snapshot()
    code = (
        ATTEMPT
        + f"""
import os
open("mine", "w").write("x")
folder = os.open({str(folder)!r}, os.O_PATH)  # O_PATH is not an access: it opens
attempt("create", lambda: os.close(os.open("new.txt", os.O_WRONLY | os.O_CREAT, dir_fd=folder)))
attempt("unlink", lambda: os.unlink("keep.txt", dir_fd=folder))
attempt("link-in", lambda: os.link("keep.txt", "stolen", src_dir_fd=folder))
attempt("link-out", lambda: os.link("mine", "planted", dst_dir_fd=folder))
attempt("rename", lambda: os.rename("keep.txt", "moved", src_dir_fd=folder))
attempt("symlink", lambda: os.symlink("/etc/passwd", "link", dir_fd=folder))
attempt("mkdir", lambda: os.mkdir("made", dir_fd=folder))
attempt("chmod", lambda: os.chmod("keep.txt", 0o777, dir_fd=folder))
attempt("fchmod", lambda: os.fchmod(os.open({str(keep)!r}, os.O_PATH), 0o777))
attempt("utime", lambda: os.utime("keep.txt", (0, 0), dir_fd=folder))
attempt("truncate", lambda: os.truncate({str(keep)!r}, 0))
attempt("rmdir", lambda: os.rmdir({str(folder)!r}))
"""
    )
    result = run_python(code, audit=audit)
    assert result.passed, result.stderr
    assert "DONE" not in result.stdout and result.stdout.count("refused") == 12, result.stdout
    assert snapshot() == before


@pytest.mark.parametrize("audit", [True, False])
def test_sqlite_creates_no_file_outside(marker, audit):
    # Before: sqlite3.connect(path) created files anywhere (the hook did not know the event).
    code = f"import sqlite3\nc = sqlite3.connect({str(marker)!r})\nc.execute('create table t (x)')\nc.commit()"
    result = run_python(code, audit=audit)
    assert not result.passed and not marker.exists()
    assert run_python("import sqlite3\nsqlite3.connect('ok.db').execute('create table t (x)')").passed


@pytest.mark.parametrize("audit", [True, False])
def test_signals_do_not_reach_processes_outside(victim_process, audit):
    # Before: signal.pidfd_send_signal killed processes outside the sandbox.
    process, _ = victim_process
    code = (
        ATTEMPT
        + f"""
import os, signal
attempt("kill", lambda: os.kill({process.pid}, 9))
attempt("killpg", lambda: os.killpg({process.pid}, 9))
attempt("pidfd", lambda: signal.pidfd_send_signal(os.pidfd_open({process.pid}), 9))
attempt("init", lambda: os.kill(1, 9))  # the run's own init: outside the program's Landlock domain
"""
    )
    result = run_python(code, audit=audit)
    assert result.passed and "DONE" not in result.stdout, result.stdout
    time.sleep(0.1)
    assert process.poll() is None


def test_no_environment_of_another_process_is_readable(victim_process, monkeypatch):
    # Before: /proc/<parent pid>/environ gave the parent's whole environment (tokens, keys).
    process, secret = victim_process
    monkeypatch.setenv("DISTILL_PARENT_SECRET", secret)
    code = (
        ATTEMPT
        + f"""
import os
for pid in ({process.pid}, {os.getpid()}, os.getppid(), 1):
    attempt(f"environ-{{pid}}", lambda: print(open(f"/proc/{{pid}}/environ", "rb").read()))
attempt("list", lambda: print(os.listdir("/proc")))
print(dict(os.environ))
"""
    )
    result = run_python(code, audit=False)
    assert secret not in result.stdout + result.stderr
    assert str(process.pid) not in result.stdout.split("list")[-1]  # the host's processes are not listed


def test_escapes_stay_contained_after_the_audit_hook_is_emptied_through_gc(marker, victim_folder, victim_process):
    # Before: the hook's state could be emptied through gc, and then nothing was checked.
    folder, keep, snapshot = victim_folder
    before = snapshot()
    process, secret = victim_process
    code = (
        REPORT_NAMESPACE
        + DISABLE_AUDIT_HOOK
        + ATTEMPT
        + f"""
import os, signal, sqlite3, socket
libc = ctypes.CDLL(None, use_errno=True)
attempt("write", lambda: open({str(marker)!r}, "w").write("x"))
attempt("libc-open", lambda: libc.open({str(marker).encode()!r}, 0o101, 0o644) >= 0 or 1 / 0)
attempt("unlink", lambda: os.unlink({str(keep)!r}))
attempt("chmod", lambda: os.chmod({str(keep)!r}, 0o777))
attempt("sqlite", lambda: sqlite3.connect({str(marker)!r}).execute("create table t (x)"))
attempt("kill", lambda: os.kill({process.pid}, 9))
attempt("environ", lambda: print(open("/proc/{process.pid}/environ").read()))
attempt("connect", lambda: socket.create_connection(("1.1.1.1", 53), timeout=1))
attempt("spawn", lambda: os.posix_spawn("/bin/sh", ["sh", "-c", "touch {marker}"], {{}}))
if os.fork() == 0:
    os.setsid()
    exec({_escapee(marker)!r})
"""
    )
    result = run_python(code, max_processes=2, timeout_s=5)
    assert "HOOK-OFF" in result.stdout, result.stderr  # the hook really is off
    assert "DONE" not in result.stdout, result.stdout
    time.sleep(0.5)
    assert not marker.exists() and snapshot() == before and process.poll() is None
    assert secret not in result.stdout and _survivors(result.stdout) == []


def test_host_unix_sockets_and_other_socket_families_are_out_of_reach():
    # A daemon's socket file (ssh-agent, dbus, docker) is reachable by path whatever the network namespace,
    # and Landlock does not govern connect(); seccomp refuses AF_UNIX sockets (socketpair stays).
    import socket

    folder = Path(tempfile.mkdtemp(prefix="sandbox_socket_"))
    os.chmod(folder, 0o755)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "daemon.sock"))
    os.chmod(folder / "daemon.sock", 0o777)
    server.listen()
    server.settimeout(0.3)
    try:
        code = (
            ATTEMPT
            + f"""
import socket
attempt("unix", lambda: socket.socket(socket.AF_UNIX).connect({str(folder / "daemon.sock")!r}))
attempt("vsock", lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).connect((2, 22)))
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
socket.socketpair()
"""
        )
        result = run_python(code, audit=False)
        assert result.passed and "DONE" not in result.stdout and result.stdout.count("refused") == 4, result.stdout
        with pytest.raises(TimeoutError):
            server.accept()  # nobody connected
    finally:
        server.close()
        shutil.rmtree(folder)


# ---- as an unprivileged user ---------------------------------------------------------------------------------------

NOBODY_SCRIPT = """
import json, sys
from distill.sandbox import run_python
legit = run_python("print(sum(range(10)))")
count = run_python(sys.argv[1], max_processes=3, audit=False, timeout_s=10)
escape = run_python(sys.argv[2], audit=False)
print(json.dumps([[r.passed, r.stdout, r.stderr[-500:], r.layers] for r in (legit, count, escape)]))
"""


def _run_as_nobody(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` with this Python as uid/gid 65534 (from root), its folders reachable in a private mount ns."""
    driver = f"""
import os, sys
sys.path.insert(0, {SRC!r})
from distill.sandbox import _launcher as L
from distill.sandbox.kernel import read_paths
python, paths = read_paths()
L.check(L.libc.unshare(L.CLONE_NEWNS), "unshare")
L.check(L.libc.mount(None, b"/", None, L.MS_REC | L.MS_PRIVATE, None), "make-rprivate")
L.make_reachable([p for p, _ in paths] + [{SRC!r}])
os.setgroups([])
os.setresgid({NOBODY}, {NOBODY}, {NOBODY})
os.setresuid({NOBODY}, {NOBODY}, {NOBODY})
env = {{"PATH": "/usr/bin:/bin", "PYTHONPATH": {SRC!r}, "LANG": "C.UTF-8"}}
os.execve(python, [python, "-B", "-c", sys.argv[1], *sys.argv[2:]], env)
"""
    return subprocess.run(
        [read_paths()[0], "-I", "-S", "-B", "-c", driver, script, *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root")
def test_as_an_unprivileged_user_runs_work_and_escapes_fail(victim_folder):
    # As a normal user the program owns that user's files, so file permissions stop nothing: the victim
    # folder belongs to the same user (65534) and only the kernel layers keep it intact.
    folder, keep, snapshot = victim_folder
    for path in (folder, keep):
        os.chown(path, NOBODY, NOBODY)
    before = snapshot()
    escape = (
        ATTEMPT
        + f"""
import os
attempt("write", lambda: open({str(keep)!r}, "w").write("gone"))
attempt("chmod", lambda: os.chmod({str(keep)!r}, 0o777))
attempt("utime", lambda: os.utime({str(keep)!r}, (0, 0)))
attempt("unlink", lambda: os.unlink({str(keep)!r}))
attempt("create", lambda: open({str(folder / "new")!r}, "w"))
"""
    )
    done = _run_as_nobody(NOBODY_SCRIPT, FORK_COUNT, escape)
    assert done.returncode == 0, done.stderr[-3000:]
    (legit_ok, legit_out, _, layers), (count_ok, count_out, _, _), (_, escape_out, _, _) = json.loads(done.stdout)
    assert legit_ok and legit_out == "45\n"
    assert "nobody" not in layers and {"userns", "nproc", "landlock-fs", "ro-root", "seccomp"} <= set(layers)
    assert count_ok and int(count_out) == 2  # max_processes=3: exactly two children
    assert "DONE" not in escape_out and escape_out.count("refused") == 5, escape_out
    assert snapshot() == before


def test_timeout_kills_a_namespace_that_ignores_signals(marker):
    code = REPORT_NAMESPACE + (
        "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        f"if os.fork() == 0:\n    os.setsid()\n    exec({_escapee(marker, 5)!r})\nwhile True:\n    pass\n"
    )
    start = time.monotonic()
    result = run_python(code, max_processes=2, timeout_s=1)
    assert result.timed_out and result.returncode == -signal.SIGKILL and time.monotonic() - start < 5
    assert _survivors(result.stdout) == [] and not marker.exists()


def test_the_read_only_view_is_what_python_needs():
    python, paths = read_paths()
    assert python == os.path.realpath(sys.executable) and (python, "rx") in paths
    readable = {path for path, _ in paths}
    assert os.path.realpath(sys.base_prefix) in readable
    assert not {"/", "/root", "/home", "/proc", "/sys", "/etc", "/tmp", "/work"} & readable
    assert not any(path.startswith(("/proc/", "/sys/", "/home/")) for path in readable)
    assert {kind for path, kind in paths if kind != "r"} == {"rx", "rw"}  # rw: /dev/null only
    assert [path for path, kind in paths if kind == "rw"] == ["/dev/null"]
