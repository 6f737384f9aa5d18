"""The one resumable sharded writer (distill.shards) and the cache / generation across processes.

The multi-process tests run a REAL ``accelerate launch --num_processes 2`` (torchrun underneath, gloo on a
CPU) of ``tests/scripts/shards_across_ranks.py``, SIGKILL one rank mid-build, resume with another number of
processes, and compare every file byte for byte with a one-process build.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.checks import InputError
from distill.shards import Ranks, ShardFolder, file_sha256, json_bytes, write_atomically

SCRIPTS = Path(__file__).parent / "scripts"
SCRIPT = SCRIPTS / "shards_across_ranks.py"


def _folder(path: Path) -> ShardFolder:
    return ShardFolder(path, what="test output", settings_file="run.json")


def _read_run(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


# ---- the writer, in one process -------------------------------------------------------------------------


def test_a_failed_write_leaves_the_old_file_and_only_our_temp_files_are_removed(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    folder.check(_read_run)
    write_atomically(tmp_path / "run.json", json_bytes({"a": 1}))

    def killed_mid_write(temp: Path) -> None:
        temp.write_bytes(b"half a file")
        raise KeyboardInterrupt  # as a kill would stop it: after the temporary file, before the rename

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "run.json", killed_mid_write)
    assert json.loads((tmp_path / "run.json").read_text()) == {"a": 1}  # the old file, whole
    ours = ["run.json.distill-partial", "shard-00003.parquet.distill-partial", ".shard-00001.json.tmp"]
    for name in ours[1:]:
        (tmp_path / name).write_bytes(b"x")
    assert folder.check(_read_run) == {"a": 1}  # temporary files are ours: accepted
    folder.clear_temps()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_folder_holding_other_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "shard-00000.parquet.distill-partial").write_bytes(b"x")
    with pytest.raises(InputError, match="not a test output: it holds notes.txt"):
        _folder(tmp_path).check(_read_run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "shard-00000.parquet.distill-partial"]
    # Without the settings file (written first) a shard cannot be ours: someone else's folder.
    other = tmp_path / "other"
    other.mkdir()
    (other / "shard-00000.parquet").write_bytes(b"x")
    with pytest.raises(InputError, match="holds shard-00000.parquet"):
        _folder(other).check(_read_run)


def test_a_shard_is_done_only_with_its_record_and_matching_bytes(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    record = folder.write_shard(0, b"parquet bytes", {"rows": 3})
    assert record == {
        "rows": 3,
        "file": "shard-00000.parquet",
        "bytes": 13,
        "sha256": file_sha256(tmp_path / record["file"]),
    }
    assert folder.done(0) == record
    assert folder.write_shard(1, None, {"rows": 0}) == {"rows": 0, "file": None, "bytes": None, "sha256": None}
    assert folder.done(1) == {"rows": 0, "file": None, "bytes": None, "sha256": None}
    assert folder.done(2) is None  # no record
    (tmp_path / "shard-00000.parquet").write_bytes(b"parquet bytez")  # same size, other bytes
    assert folder.done(0) is None and folder.done(0, check_sha256=False) == record
    (tmp_path / "shard-00000.parquet").write_bytes(b"parquet")  # truncated
    assert folder.done(0, check_sha256=False) is None


def test_begin_lists_the_missing_shards_and_finish_writes_the_manifest_in_shard_order(tmp_path: Path) -> None:
    folder, ranks = _folder(tmp_path), Ranks()
    folder.check(_read_run)
    assert folder.begin(ranks, 4, {"settings": 1}) == [0, 1, 2, 3]
    folder.write_shard(2, b"two", {"n": 2})
    folder.write_shard(0, b"zero", {"n": 0})
    (tmp_path / "shard-00001.parquet.distill-partial").write_bytes(b"half")  # a killed write
    assert folder.begin(ranks, 4, None) == [1, 3]
    assert not (tmp_path / "shard-00001.parquet.distill-partial").exists()
    with pytest.raises(InputError, match="shard-00001.json, shard-00003.json is missing"):
        folder.finish(ranks, 4, lambda records: {"shards": records})
    folder.write_shard(3, None, {"n": 3})
    folder.write_shard(1, b"one", {"n": 1})
    manifest = folder.finish(ranks, 4, lambda records: {"shards": records})
    assert [record["n"] for record in manifest["shards"]] == [0, 1, 2, 3]
    assert (tmp_path / "manifest.json").read_bytes() == json_bytes(manifest)
    assert _read_run(tmp_path) == {"settings": 1}


def test_one_process_raises_its_own_error_and_returns_its_own_result() -> None:
    ranks = Ranks.join(distributed=None)
    assert (ranks.rank, ranks.world) == (0, 1)
    assert ranks.on_main(lambda: 7) == 7
    ranks.agree(None)
    with pytest.raises(ValueError, match="boom"):
        ranks.agree(ValueError("boom"))


# ---- across processes: real accelerate launch, 2 ranks --------------------------------------------------


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    return dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1] / "src")
    )


def _launch(log: Path, processes: int, *args: str) -> subprocess.Popen:
    """The script under ``accelerate launch`` with ``processes`` ranks (plain ``python`` for 1); stderr to ``log``."""
    command = [sys.executable, str(SCRIPT), *args]
    if processes > 1:
        # --multi_gpu picks the torchrun launcher; without CUDA every process falls back to the CPU and gloo.
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(_free_port()), str(SCRIPT), *args]  # fmt: skip
    with open(log, "w") as stderr:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=_env())


def _run(log: Path, processes: int, *args: str) -> None:
    process = _launch(log, processes, *args)
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0, log.read_text()[-3000:]
    # Ranks share the pipe: their lines may run together, so find the markers anywhere.
    assert sorted(re.findall(r"done rank=(\d+)", out)) == [str(rank) for rank in range(processes)]


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _gone(pid: int, wait_s: float = 30.0) -> bool:
    """Whether process ``pid`` has ended within ``wait_s`` (a zombie counts: it has ended, unreaped)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":  # ended, not yet reaped
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def _ready_pids(process: subprocess.Popen, processes: int) -> dict[int, int]:
    pids: dict[int, int] = {}
    while len(pids) < processes:
        line = process.stdout.readline()
        assert line, "the launch ended before every rank was ready"
        for rank, pid in re.findall(r"ready rank=(\d+) pid=(\d+)", line):  # lines of two ranks may run together
            pids[int(rank)] = int(pid)
    return pids


@pytest.mark.slow
def test_cache_across_two_ranks_is_byte_identical_and_a_killed_rank_resumes_with_one(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    manifest = _load("build_cache_tiny").build(str(reference))
    num_shards = manifest["num_shards"]
    assert num_shards == 8

    two = tmp_path / "two"
    _run(tmp_path / "two.log", 2, "cache", str(two))
    assert _files(two) == _files(reference)  # shards, records and manifest, byte for byte

    killed = tmp_path / "killed"
    process = _launch(tmp_path / "killed.log", 2, "cache", str(killed), "--delay", "0.2")
    pids = _ready_pids(process, 2)
    deadline = time.monotonic() + 600
    while True:  # until each rank has finished a shard (rank 0 owns the even ones, rank 1 the odd ones)
        done = {int(p.name[6:11]) for p in killed.glob("shard-*.json")} if killed.exists() else set()
        if {n % 2 for n in done} == {0, 1} or process.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    os.kill(pids[1], signal.SIGKILL)
    assert process.wait(timeout=300) != 0  # the launcher stops rank 0 too
    process.stdout.close()
    assert _gone(pids[0])
    done_at_kill = sorted(p.name for p in killed.glob("shard-*.json"))
    assert 2 <= len(done_at_kill) < num_shards, done_at_kill  # the kill landed mid-build, after both ranks wrote
    assert json.loads((killed / "manifest.json").read_text())["complete"] is False
    for record in done_at_kill:  # every record names a whole shard
        shard = json.loads((killed / record).read_text())
        assert file_sha256(killed / shard["file"]) == shard["sha256"]

    _run(tmp_path / "resumed.log", 1, "cache", str(killed))
    assert _files(killed) == _files(reference)


@pytest.mark.slow
def test_generation_killed_alone_resumes_on_two_ranks_and_a_failing_rank_stops_both(tmp_path: Path) -> None:
    script = _load("generate_tiny")
    reference = tmp_path / "reference"
    script.generate(*script.tiny_generation(), str(reference))
    num_shards = len(list(reference.glob("shard-*.json")))
    assert num_shards == 12

    out = tmp_path / "out"
    process = _launch(tmp_path / "alone.log", 1, "generate", str(out), "--delay", "0.01")
    pids = _ready_pids(process, 1)
    while len(list(out.glob("shard-*.json"))) < 2 and process.poll() is None:
        time.sleep(0.02)
    os.kill(pids[0], signal.SIGKILL)
    process.wait()
    process.stdout.close()
    assert 2 <= len(list(out.glob("shard-*.json"))) < num_shards

    failing = _launch(tmp_path / "failing.log", 2, "generate", str(out), "--fail-rank", "1")
    failing.communicate(timeout=900)
    log = (tmp_path / "failing.log").read_text()
    assert failing.returncode != 0
    # Rank 0 names the rank that failed and why (logged by every rank before any exits).
    assert "rank 0 of 2: stopping. rank 1 of 2 failed: RuntimeError: injected teacher failure" in log, log[-3000:]
    assert not (out / "manifest.json").exists()

    _run(tmp_path / "two.log", 2, "generate", str(out))
    assert _files(out) == _files(reference)
