"""Ranks agree: a failure on one rank stops every rank at the same step, with one checkpoint and one message.

Real ``accelerate launch`` runs with 2 gloo processes; the failure is injected on rank 1 only. Without the
agreement, rank 0 would wait in its next all-reduce for ever (the subprocess timeout catches that hang).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.trainer.agreement import describe
from distill.trainer.checkpoints import checkpoint_problem

SCRIPT = Path(__file__).parent / "scripts" / "fail_on_rank.py"
AT_STEP = 2  # finished steps when rank 1 fails: the failure is in optimizer step 3


def _launch(out: Path, kind: str, ensemble: bool = False) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1] / "src")
    )
    launcher = Path(sys.executable).parent / "accelerate"
    port = str(20000 + (os.getpid() * 13 + len(kind) * 101 + ensemble * 7) % 20000)
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port]
    command += [str(SCRIPT), "--out", str(out), "--kind", kind, "--rank", "1", "--at-step", str(AT_STEP)]
    command += ["--ensemble"] if ensemble else []
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "error", "checkpoint", "phrase"),
    [
        ("nan", "NonFiniteLossError", AT_STEP, "Non-finite distillation loss at optimizer step 3 on rank 1: "),
        ("server", "ServerError", AT_STEP, "failed at optimizer step 3 after its retries on rank 1:"),
        ("sigterm", "TrainingPreempted", AT_STEP + 1, "Stopped by SIGTERM (received by rank 1) after step 3"),
    ],
)
def test_failure_on_one_rank_stops_every_rank_together(tmp_path, kind, error, checkpoint, phrase) -> None:
    _check_stopped_together(tmp_path, _launch(tmp_path, kind), error, checkpoint, phrase)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "error", "phrase"),
    [
        ("nan", "NonFiniteLossError", "Non-finite distillation loss at optimizer step 3 on rank 1: teacher 'b': "),
        ("server", "ServerError", "failed at optimizer step 3 after its retries on rank 1: teacher 'b': "),
    ],
)
def test_one_teacher_of_several_failing_on_one_rank_stops_every_rank_together(tmp_path, kind, error, phrase) -> None:
    """Multi-teacher: the second of two teachers fails on rank 1 only; the same agreement as one teacher."""
    _check_stopped_together(tmp_path, _launch(tmp_path, kind, ensemble=True), error, AT_STEP, phrase)


def _check_stopped_together(
    tmp_path: Path, result: subprocess.CompletedProcess, error: str, checkpoint: int, phrase: str
) -> None:
    reports = [(tmp_path / f"stopped-rank{rank}.txt").read_text().split("\n", 1) for rank in (0, 1)]
    assert len(reports) == 2, result.stderr[-3000:]
    # Both ranks stopped at the same step, with the same message naming rank 1.
    assert reports[0] == reports[1], reports
    step, message = reports[0]
    assert message.startswith(f"{error}: ") and phrase in message, message
    assert ".." not in message, message  # one sentence end, not the problem's period and ours
    assert int(step) == checkpoint, message
    # One checkpoint, complete: the weights before the failing step (after the last finished one for SIGTERM).
    folders = sorted(path.name for path in tmp_path.glob("checkpoint-*"))
    assert folders == [f"checkpoint-{checkpoint}"], folders
    assert checkpoint_problem(tmp_path / folders[0]) is None


def test_describe_names_the_ranks() -> None:
    assert describe({1: "NaN"}) == "on rank 1: NaN"
    assert describe({3: "b", 0: "a"}) == "on ranks 0: a; 3: b"
