"""The fused loss with an FSDP2-sharded student (issue 17: the FSDP2 + fused-loss crash / silent-gradient defect).

Two gloo processes shard a tiny student as accelerate < 1.13 did (root ``reshard_after_forward=True``), so
after a plain forward the head is a DTensor shard; inside ``head_unsharded_through_loss`` the fused loss
gets the plain head in the compute dtype and the step's gradient equals the unsharded student's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_fused_step.py"


@pytest.mark.slow
def test_sharded_student_step_equals_unsharded(tmp_path) -> None:
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1] / "src")
    )
    port = str(20000 + (os.getpid() * 17 + 3) % 20000)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    result = subprocess.run([*command, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "result.json").read_text())
    for precision, tolerance in (("fp32", 1e-5), ("bf16", 3e-2)):  # bf16: compute in bf16, reduce in fp32
        found = results[precision]
        assert found["head_sharded_after_plain_forward"], found  # the layout that broke the old code
        assert found["head_dtype"] == found["hidden_dtype"], found  # the compute dtype, not the fp32 shard
        assert found["relative_difference"] < tolerance, (precision, found)
        assert found["head_sharded_after_step"], found  # resharded again after the backward
    assert results["bf16"]["head_dtype"] == "torch.bfloat16"
