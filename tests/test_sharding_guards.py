"""Guards on sharding a teacher (issue 17's GPU-only defects that a CPU reproduces)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers.integrations import deepspeed as hf_deepspeed

from distill.teachers.sharding import (
    is_quantized_model,
    loading_whole_on_every_rank,
    ram_efficient_loading,
    weight_rows,
)
from distill.testing import tiny_llama


def test_a_bitsandbytes_teacher_is_recognised(tmp_path) -> None:
    """teacher_sharding='auto' keeps such a teacher whole ('fsdp' refuses): FSDP would drop its quantization state."""
    pytest.importorskip("bitsandbytes")
    from distill.models import load_causal_lm

    tiny_llama(512, hidden_size=64, num_layers=2, intermediate_size=128, seed=0).save_pretrained(tmp_path)
    quantized = load_causal_lm(str(tmp_path), dtype=torch.float32, quantization="4bit", device=torch.device("cpu"))
    assert is_quantized_model(quantized)
    assert not is_quantized_model(tiny_llama(512, hidden_size=64, num_layers=2, intermediate_size=128, seed=0))


def test_a_zero3_placeholder_reports_its_full_rows() -> None:
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_shape = torch.Size([512, 64])  # what DeepSpeed ZeRO-3 leaves on a partitioned parameter
    assert weight_rows(placeholder) == 512
    assert weight_rows(torch.empty(7, 3)) == 7


def test_the_teacher_loads_outside_zero_init_and_ram_efficient_loading(monkeypatch) -> None:
    class Zero3Config:
        def is_zero3(self) -> bool:
            return True

    config = Zero3Config()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", lambda: config)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    assert hf_deepspeed.is_deepspeed_zero3_enabled() and ram_efficient_loading()
    with loading_whole_on_every_rank():
        assert not hf_deepspeed.is_deepspeed_zero3_enabled()  # from_pretrained would not enter zero.Init
        assert not ram_efficient_loading() and "FSDP_CPU_RAM_EFFICIENT_LOADING" not in os.environ
    assert hf_deepspeed.is_deepspeed_zero3_enabled() and ram_efficient_loading()  # the student's switches are back
