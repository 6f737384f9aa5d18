"""The accelerate launch configs under recipes/accelerate/ parse, and say what they claim."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).parents[1] / "recipes" / "accelerate"


@pytest.mark.parametrize(
    "name, distributed_type",
    [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("fsdp_multinode", "FSDP"), ("deepspeed_zero3", "DEEPSPEED")],
)
def test_accelerate_config_parses(name: str, distributed_type: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.name == distributed_type
    if name == "fsdp_multinode":  # 8 processes per node, one rendezvous the nodes can reach
        assert config.num_processes == 8 * config.num_machines and config.num_machines > 1
        assert config.rdzv_backend == "c10d" and config.fsdp_config["fsdp_version"] == 2
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"] is True
    if name == "deepspeed_zero3":
        assert config.deepspeed_config["zero_stage"] == 3
