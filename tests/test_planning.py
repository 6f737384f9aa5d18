"""`distill.planning`: parameter counts, the memory breakdown's arithmetic, sharding, advice, cost and the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from distill.cli import main
from distill.planning import (
    GPUS,
    KNOWN_MODELS,
    ModelSpec,
    RunSetup,
    estimate_memory,
    flops_per_token,
    get_gpu,
    model_spec,
    plan_from_config,
    plan_run,
    with_prices,
)
from distill.planning.activations import layer_saved_bytes
from distill.planning.memory import NF4_BYTES_PER_PARAM
from distill.testing import tiny_llama, tiny_qwen2

GIB = 2**30

# Exactly 1e9 parameters: a tied 999,999 x 1,000 embedding plus a 1,000-wide final norm, no layers.
ONE_BILLION = ModelSpec("one-billion", 1000, 4000, 0, 8, 8, 125, 999_999, tie_word_embeddings=True)
SMALL = ModelSpec("small", 256, 688, 4, 4, 2, 64, 32768)


def _setup(**overrides: Any) -> RunSetup:
    settings = dict(student=SMALL, teacher=SMALL, gpu=get_gpu("H100"), teacher_mode="bf16", max_length=128)
    settings.update(overrides)
    return RunSetup(**settings)


# ---- model shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_catalogue_parameter_counts_match_the_model_cards(name: str) -> None:
    spec = KNOWN_MODELS[name]
    assert spec.published_params is not None
    assert spec.num_params == pytest.approx(spec.published_params, rel=0.02)


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_counts_from_a_config_equal_the_built_model(build: Callable[..., Any], tied: bool) -> None:
    model = build(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, tie_word_embeddings=tied)
    spec = model_spec(model.config.to_dict())
    assert spec.num_params == sum(p.numel() for p in model.parameters())


def test_config_json_is_read_from_a_folder_or_file(tmp_path: Path) -> None:
    qwen = KNOWN_MODELS["Qwen/Qwen2.5-Coder-7B"]
    config = {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_folder, from_file = model_spec(tmp_path), model_spec(tmp_path / "config.json")
    assert from_folder.num_params == from_file.num_params == qwen.num_params
    assert replace(from_folder, name=qwen.name) == qwen


def test_qwen3_config_has_head_dim_and_qk_norms() -> None:
    config = {
        "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    }  # fmt: skip
    spec = model_spec(config)
    assert spec.qk_norm and not spec.qkv_bias and spec.q_dim == 4096
    assert spec.num_params == KNOWN_MODELS["Qwen/Qwen3-8B"].num_params


def test_names_resolve_loosely_and_unknown_ones_fail() -> None:
    assert model_spec("Qwen2.5-Coder-14B-Instruct") is KNOWN_MODELS["Qwen/Qwen2.5-Coder-14B"]
    with pytest.raises(KeyError, match="config.json"):
        model_spec("acme/not-a-model")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        model_spec({**SMALL.__dict__, "num_local_experts": 8})


# ---- memory arithmetic -------------------------------------------------------------------------------


def test_one_billion_parameters_in_each_precision() -> None:
    assert ONE_BILLION.num_params == 10**9
    bf16 = estimate_memory(_setup(student=ONE_BILLION, precision="bf16"))
    assert bf16.get("student weights") == 2e9
    assert bf16.get("gradients") == 2e9
    assert bf16.get("optimizer states (AdamW)") == 4e9  # two bf16 states: torch keeps the parameter's dtype
    mixed = estimate_memory(_setup(student=ONE_BILLION, precision="mixed"))
    assert (mixed.get("student weights"), mixed.get("gradients")) == (4e9, 4e9)
    assert mixed.get("optimizer states (AdamW)") == 8e9
    eight_bit = estimate_memory(_setup(student=ONE_BILLION, optim="adamw_bnb_8bit"))
    assert eight_bit.get("optimizer states (8-bit AdamW)") == 2e9


def test_lora_and_qlora_state() -> None:
    rank = 8
    adapters = SMALL.num_layers * rank * sum(fan_in + fan_out for fan_in, fan_out in SMALL.linear_shapes())
    lora = estimate_memory(_setup(lora_rank=rank, precision="bf16"))
    assert lora.get("LoRA adapters") == adapters * 4
    assert lora.get("gradients") == adapters * 4
    assert lora.get("optimizer states (AdamW)") == adapters * 8
    assert lora.get("student weights") == SMALL.num_params * 2
    qlora = estimate_memory(_setup(lora_rank=rank, qlora=True))
    unquantized = SMALL.num_params - SMALL.linear_params
    assert qlora.get("student weights") == pytest.approx(SMALL.linear_params * NF4_BYTES_PER_PARAM + unquantized * 4)


def test_teacher_modes() -> None:
    def teacher_bytes(mode: str) -> float:
        memory = estimate_memory(_setup(teacher_mode=mode))
        return sum(item.bytes for item in memory.items if item.name.startswith("teacher weights"))

    assert teacher_bytes("bf16") == SMALL.num_params * 2
    assert teacher_bytes("fp32") == SMALL.num_params * 4
    unquantized = (SMALL.num_params - SMALL.linear_params) * 2
    assert teacher_bytes("4bit") == pytest.approx(SMALL.linear_params * NF4_BYTES_PER_PARAM + unquantized)
    row_scales = 4 * SMALL.num_layers * sum(fan_out for _, fan_out in SMALL.linear_shapes())  # one fp32 per row
    assert teacher_bytes("8bit") == SMALL.linear_params + row_scales + unquantized
    assert teacher_bytes("cache") == teacher_bytes("server") == 0


def test_cuda_context_is_an_item_on_gpus_only() -> None:
    assert estimate_memory(_setup()).get("CUDA context + allocator reserve") == GIB
    assert estimate_memory(_setup(gpu=get_gpu("cpu"))).get("CUDA context + allocator reserve") == 0


def test_sharding_divides_weights_gradients_and_optimizer_states_only() -> None:
    single = estimate_memory(_setup(per_device_train_batch_size=2))
    fsdp = estimate_memory(_setup(per_device_train_batch_size=2, num_gpus=4, sharding="fsdp2"))
    for name in ("student weights", "gradients", "optimizer states (AdamW)", "teacher weights (bf16)"):
        assert fsdp.get(name) == pytest.approx(single.get(name) / 4), name
    for name in ("student activations", "loss buffers (fused)"):
        assert fsdp.get(name) == single.get(name), name
    assert fsdp.get("gathered student weights") > 0 and single.get("gathered student weights") == 0
    kept = estimate_memory(_setup(num_gpus=4, sharding="fsdp2", teacher_sharding="none"))
    assert kept.get("teacher weights (bf16)") == single.get("teacher weights (bf16)")
    ddp = estimate_memory(_setup(num_gpus=4, sharding="ddp"))
    assert ddp.get("student weights") == single.get("student weights")
    assert ddp.get("DDP gradient buckets") == single.get("gradients")


def test_zero3_needs_the_dense_loss() -> None:
    with pytest.raises(ValueError, match="ZeRO-3"):
        _setup(num_gpus=2, sharding="zero3")
    assert estimate_memory(_setup(num_gpus=2, sharding="zero3", loss_implementation="dense")).total_bytes > 0


def test_peak_sums_the_items_alive_at_it() -> None:
    memory = estimate_memory(_setup(per_device_train_batch_size=4))
    assert memory.total_bytes == sum(item.bytes for item in memory.items if item.at_peak)
    assert memory.peak_phase == "forward/backward"
    # Without gradient accumulation the gradients are freed before the next forward; with it they stay.
    assert not next(item for item in memory.items if item.name == "gradients").at_peak
    accumulating = estimate_memory(_setup(per_device_train_batch_size=4, gradient_accumulation_steps=2))
    assert next(item for item in accumulating.items if item.name == "gradients").at_peak


def test_checkpointing_keeps_layer_inputs_plus_one_layer() -> None:
    tokens = 4 * 128
    plain = estimate_memory(_setup(per_device_train_batch_size=4, padded=False, precision="fp32"))
    checkpointed = estimate_memory(
        _setup(per_device_train_batch_size=4, padded=False, precision="fp32", gradient_checkpointing=True)
    )
    per_layer = layer_saved_bytes(_setup(per_device_train_batch_size=4, padded=False, precision="fp32"))
    saved = plain.get("student activations") - checkpointed.get("student activations")
    expected = tokens * (SMALL.num_layers * per_layer - SMALL.num_layers * 4 * SMALL.hidden_size - per_layer)
    assert saved == pytest.approx(expected)


def test_fused_loss_buffers_scale_with_the_chunk_and_dense_with_the_tokens() -> None:
    fused = estimate_memory(_setup(per_device_train_batch_size=4, loss_chunk_size=64, precision="fp32", padded=False))
    dense = estimate_memory(
        _setup(per_device_train_batch_size=4, loss_implementation="dense", precision="fp32", padded=False)
    )
    vocab, tokens = SMALL.vocab_size, 4 * 128
    assert dense.get("loss buffers (dense)") == 14 * tokens * vocab * 4  # jsd: 14 [tokens x V] fp32 buffers
    hidden_copies = 2 * tokens * SMALL.hidden_size * 4
    head_grad = vocab * SMALL.hidden_size * 4
    assert fused.get("loss buffers (fused)") == 4 * 64 * vocab * 4 + hidden_copies + head_grad  # closed form: 4


def _saved_bytes_per_layer(mode: str) -> float:
    """Measured bytes per token one tiny Llama layer keeps for the backward (parameters excluded).

    ``mode``: ``fp32``, ``bf16`` (a bf16 model under bf16 autocast), ``mixed`` (an fp32 model under bf16
    autocast), with ``-lora`` for rank-4 LoRA on every projection.
    """
    autocast = mode.startswith(("bf16", "mixed"))

    def saved(layers: int) -> float:
        torch.manual_seed(0)
        model = tiny_llama(vocab_size=300, hidden_size=64, num_layers=layers, num_heads=4, num_kv_heads=2)
        if mode.startswith("bf16"):
            model = model.to(torch.bfloat16)
        if mode.endswith("lora"):
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        ids = torch.randint(0, 300, (2, 32))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                model(input_ids=ids)
        return sum(storages.values()) / ids.numel()

    return saved(2) - saved(1)


@pytest.mark.parametrize(
    "mode, overrides",
    [
        ("fp32", dict(precision="fp32")),
        ("fp32-lora", dict(precision="fp32", lora_rank=4)),
        ("bf16", dict(precision="bf16")),
        ("bf16-lora", dict(precision="bf16", lora_rank=4)),
        ("mixed", dict(precision="mixed")),
    ],
)
def test_layer_activations_match_what_autograd_saves(mode: str, overrides: dict[str, Any]) -> None:
    spec = ModelSpec("tiny", 64, 128, 2, 4, 2, 16, 300)
    predicted = layer_saved_bytes(
        _setup(student=spec, max_length=32, per_device_train_batch_size=2, padded=False, **overrides)
    )
    measured = _saved_bytes_per_layer(mode)
    if mode == "mixed":  # autocast's bf16 weight copies are saved too; the planner counts them as their own item
        measured -= spec.layer_linear_params * 2 / 64
    # LoRA under autocast also keeps bf16 copies of the adapter weights: per token they vanish at real batch sizes.
    assert predicted == pytest.approx(measured, rel=0.05)


# ---- advice, speed and cost --------------------------------------------------------------------------


def test_70b_full_fine_tune_on_a_24gb_gpu_is_refused_with_advice() -> None:
    plan = plan_run("meta-llama/Llama-3.1-70B", gpu="L4", teacher_mode="cache", max_length=1024)
    assert not plan.fits
    assert plan.memory.biggest.name == "optimizer states (AdamW)"
    assert "optimizer states (AdamW)" in plan.message
    assert plan.suggestions and any(s.saves_bytes > 0 for s in plan.suggestions)
    for suggestion in plan.suggestions:
        assert suggestion.total_bytes == pytest.approx(estimate_memory(suggestion.setup).total_bytes)


def test_a_suggestion_that_fits_is_listed_first() -> None:
    plan = plan_run("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-32B", gpu="H100", lora_rank=16, max_length=4096)
    assert not plan.fits
    assert plan.suggestions[0].fits
    assert "makes it fit" in plan.message


def test_flops_per_token_follow_the_formula() -> None:
    setup = _setup(teacher_mode="cache")
    linear, head = SMALL.linear_params, SMALL.hidden_size * SMALL.vocab_size
    attention = 2 * setup.max_length * SMALL.q_dim * SMALL.num_layers
    flops = flops_per_token(setup)
    assert flops["student forward"] + flops["student backward"] == 6 * linear + 6 * head + 3 * attention
    assert flops["recompute"] == flops["teacher forward"] == 0
    checkpointed = flops_per_token(replace(setup, gradient_checkpointing=True))
    assert checkpointed["recompute"] == 2 * linear + attention
    lora = flops_per_token(replace(setup, lora_rank=8))
    assert lora["student backward"] < flops["student backward"]


def test_cost_is_gpu_hours_times_price() -> None:
    catalogue = with_prices({"A100-80GB": 2.0})
    plan = plan_run("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", gpu="A100-80GB", num_gpus=2, sharding="ddp",
                    tokens=1e8, num_train_epochs=2, catalogue=catalogue)  # fmt: skip
    cost = plan.cost
    assert cost is not None and cost.hourly_usd == 2.0 and GPUS["A100-80GB"].hourly_usd != 2.0
    assert cost.tokens == 2e8
    assert cost.wall_hours == pytest.approx(2e8 / plan.throughput.tokens_per_second / 3600)
    assert cost.gpu_hours == pytest.approx(2 * cost.wall_hours)
    assert cost.usd == pytest.approx(cost.gpu_hours * 2.0)


def test_plan_from_config_reads_the_distill_config(tmp_path: Path) -> None:
    from distill import DistillConfig

    config = DistillConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4, max_length=512,
        gradient_checkpointing=True, loss_chunk_size=256, teacher_quantization="4bit", loss="forward_kl",
        optim="adamw_bnb_8bit", lmbda=0.5, use_cpu=True, report_to=[],
    )  # fmt: skip
    plan = plan_from_config(config, "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B", gpu="L4", lora_rank=8)
    setup = plan.setup
    assert (setup.per_device_train_batch_size, setup.gradient_accumulation_steps, setup.max_length) == (2, 4, 512)
    assert setup.gradient_checkpointing and setup.loss_chunk_size == 256 and setup.loss == "forward_kl"
    assert (setup.teacher_mode, setup.optim, setup.lmbda) == ("4bit", "adamw_bnb_8bit", 0.5)
    assert setup.eight_bit_optimizer
    assert setup.lora_rank == 8 and setup.precision == "fp32"


# ---- the CLI -----------------------------------------------------------------------------------------


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    small = ["plan", "--student", "Qwen/Qwen2.5-0.5B", "--teacher", "Qwen/Qwen2.5-1.5B", "--max-length", "1024"]
    assert main([*small, "--gpu", "H100", "--tokens", "1e7"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and "GPU-hours" in out
    big = ["plan", "--student", "meta-llama/Llama-3.1-70B", "--teacher-mode", "cache", "--gpu", "RTX4090"]
    assert main(big) == 3
    assert "Does not fit" in capsys.readouterr().out
    assert main(["plan", "--student", "acme/unknown"]) == 2
    assert "acme/unknown" in capsys.readouterr().err


def test_cli_json_all_gpus_and_prices(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"H100": 1.5}))
    args = ["plan", "--student", "Qwen/Qwen2.5-0.5B", "--teacher", "Qwen/Qwen2.5-1.5B", "--tokens", "1e6"]
    assert main([*args, "--json", "--prices", str(prices)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["fits"] and payload["cost"]["hourly_usd"] == 1.5
    assert payload["memory"]["total_bytes"] == sum(i["bytes"] for i in payload["memory"]["items"] if i["at_peak"])
    assert main([*args, "--all-gpus"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(any(line.startswith(name) for line in lines) for name in GPUS)


# ---- one name per knob ---------------------------------------------------------------------------------


def test_loss_buffers_cover_exactly_the_losses_layers_divergences() -> None:
    from distill.losses import DIVERGENCE_NAMES, Divergence
    from distill.planning.activations import LOSS_BUFFERS

    assert set(LOSS_BUFFERS) == {Divergence(name).name for name in DIVERGENCE_NAMES}


@pytest.mark.parametrize("name", __import__("distill.losses", fromlist=["x"]).DIVERGENCE_NAMES)
def test_distill_plan_accepts_every_divergence_distill_config_accepts(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The round-1 bug: `distill plan --divergence skl` (and srkl, total_variation) exited 2."""
    from distill import DistillConfig
    from distill.losses import Divergence

    DistillConfig(output_dir=str(tmp_path), loss=name, use_cpu=True, report_to=[])  # the config accepts it
    args = ["plan", "--student", "Qwen/Qwen2.5-0.5B", "--teacher", "Qwen/Qwen2.5-1.5B", "--loss", name, "--json"]
    assert main([*args, "--loss-implementation", "dense"]) == 0  # dense: the divergence's own buffer count
    assert json.loads(capsys.readouterr().out)["setup"]["loss"] == Divergence(name).name


def test_an_unknown_divergence_is_refused_with_the_losses_layers_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--student", "Qwen/Qwen2.5-0.5B", "--teacher-mode", "cache", "--loss", "kld"]) == 2
    err = capsys.readouterr().err
    assert "'kld'" in err and "skew_reverse_kl" in err and "total_variation" in err


def test_every_setup_field_is_a_flag_with_its_help_and_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import fields

    from distill.planning.cli import flag_names

    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    for spec in fields(RunSetup):
        for flag in flag_names(spec.name):
            assert flag in out, flag
    # The declaration's bounds reach the flag and the keyword alike, with the same message.
    with pytest.raises(SystemExit) as exited:
        main(["plan", "--student", "Qwen/Qwen2.5-0.5B", "--teacher-mode", "cache", "--max_length", "0"])
    assert exited.value.code == 2 and "must be >= 1; got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_length must be >= 1; got 0"):
        _setup(max_length=0)
    with pytest.raises(ValueError, match="optim must be one of"):
        _setup(optim="sgd")


def test_round_one_flags_name_their_new_spelling(capsys: pytest.CaptureFixture[str]) -> None:
    from distill.planning.cli import RENAMED_FLAGS

    for old, new in RENAMED_FLAGS.items():
        with pytest.raises(SystemExit) as exited:
            main(["plan", "--student", "Qwen/Qwen2.5-0.5B", old, "1"])
        assert exited.value.code == 2
        assert f"{old} is now {new}" in capsys.readouterr().err


def test_plan_run_refuses_a_setting_that_is_not_a_field() -> None:
    with pytest.raises(TypeError, match=r"\['seq_len'\]"):
        plan_run("Qwen/Qwen2.5-0.5B", teacher_mode="cache", seq_len=1024)


def test_plan_from_config_copies_the_config_fields_by_name(tmp_path: Path) -> None:
    """Every field the planner shares with DistillConfig is read from it, whatever its value."""
    from distill import DistillConfig
    from distill.planning.setup import CONFIG_FIELDS

    changed = dict(
        max_length=777, per_device_train_batch_size=3, gradient_accumulation_steps=5, gradient_checkpointing=True,
        loss_implementation="dense", loss_chunk_size=99, loss="srkl", teacher_sharding="none",
        optim="paged_adamw_8bit", lmbda=0.25, seq_kd=True, max_new_tokens=33, num_train_epochs=3.0,
        hidden_projection="learned",
    )  # fmt: skip
    assert set(changed) == set(CONFIG_FIELDS)
    config = DistillConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **changed)
    setup = plan_from_config(config, "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", suggest=False).setup
    assert {name: getattr(setup, name) for name in CONFIG_FIELDS} == {**changed, "loss": "skew_reverse_kl"}


# ---- what FSDP2 and several nodes do (issue 17): figures against hand calculations ---------------------


def _item(memory: Any, name: str, phase: str) -> float:
    return sum(item.bytes for item in memory.items if item.name == name and item.phase == phase)


def test_fsdp2_keeps_fp32_shards_of_a_bf16_student() -> None:
    """accelerate's fsdp2_prepare_model upcasts trainable bf16 parameters to fp32 under mixed precision."""
    params = SMALL.num_params
    fsdp = estimate_memory(_setup(precision="bf16", num_gpus=4, sharding="fsdp2"))
    assert fsdp.get("student weights") == params * 4 / 4  # fp32 shards, not 2 B
    assert fsdp.get("gradients") == params * 4 / 4
    assert fsdp.get("optimizer states (AdamW)") == params * 8 / 4
    ddp = estimate_memory(_setup(precision="bf16", num_gpus=4, sharding="ddp"))  # DDP keeps the model as loaded
    assert ddp.get("student weights") == params * 2 and ddp.get("optimizer states (AdamW)") == params * 4
    lora = estimate_memory(_setup(precision="bf16", num_gpus=4, sharding="fsdp2", lora_rank=8))
    assert lora.get("student weights") == params * 2 / 4  # the frozen base is not upcast (trainable only)


def test_sharded_loss_reads_the_unsharded_head_and_its_gradient_is_counted_once() -> None:
    spec = SMALL
    layer = spec.layer_linear_params + spec.layer_other_params
    full = estimate_memory(_setup(num_gpus=2, sharding="fsdp2"))
    phase = "forward/backward"
    assert _item(full, "gathered student weights", phase) == (2 * layer + spec.embedding_params + spec.head_params) * 2
    assert full.get("head gradient (unsharded)") == spec.vocab_size * spec.hidden_size * 2  # bf16 copy for FSDP
    assert "fp32 head gradient" in next(i.detail for i in full.items if i.name == "loss buffers (fused)")
    assert estimate_memory(_setup(num_gpus=2, sharding="fsdp2", lora_rank=8)).get("head gradient (unsharded)") == 0
    # A sharded teacher's head is gathered in its own dtype: 4 B per element for an fp32 teacher.
    fp32 = estimate_memory(_setup(num_gpus=2, sharding="fsdp2", teacher_mode="fp32"))
    assert fp32.get("gathered teacher head") == spec.vocab_size * spec.hidden_size * 4
    assert full.get("gathered teacher head") == spec.vocab_size * spec.hidden_size * 2


def test_nodes_multiply_the_world_size() -> None:
    two_nodes = _setup(nodes=2, num_gpus=4, sharding="fsdp2", tokens=1e6, per_device_train_batch_size=2)
    one_node = replace(two_nodes, nodes=1, num_gpus=8)
    assert two_nodes.world_size == 8 and two_nodes.tokens_per_step == 8 * 2 * 128
    # Per GPU the memory is the same as 8 GPUs on one node: everything is split 8 ways.
    assert estimate_memory(two_nodes).items == estimate_memory(one_node).items
    assert estimate_memory(two_nodes).get("student weights") == SMALL.num_params * 4 / 8
    half = replace(two_nodes, nodes=1)
    speed, half_speed = plan_run(SMALL, SMALL, **_fields(two_nodes)), plan_run(SMALL, SMALL, **_fields(half))
    assert speed.throughput.tokens_per_second == pytest.approx(2 * half_speed.throughput.tokens_per_second)
    hours = 1e6 / speed.throughput.tokens_per_second / 3600
    assert speed.cost.gpu_hours == pytest.approx(hours * 8)


def _fields(setup: RunSetup) -> dict[str, Any]:
    skip = ("student", "teacher")
    return {name: getattr(setup, name) for name in setup.__dataclass_fields__ if name not in skip}


def test_a_sharded_generator_regathers_its_weights_for_every_new_token() -> None:
    """lmbda=1 with an FSDP2 student on H100s: each new token all-gathers (W-1)/W of its bf16 weights."""
    settings = dict(num_gpus=8, sharding="fsdp2", lmbda=1.0, max_new_tokens=64, per_device_train_batch_size=2)
    one_node = plan_run(SMALL, SMALL, **{**_fields(_setup()), **settings}).throughput
    weights = SMALL.num_params * 2
    per_new_token = weights * (7 / 8) / 450e9  # NVLink 4: 450 GB/s each way
    per_trained_token = 64 / (2 * 128)
    assert one_node.regather_seconds_per_token == pytest.approx(per_trained_token * per_new_token)
    two_nodes = plan_run(SMALL, SMALL, **{**_fields(_setup()), **settings, "nodes": 2}).throughput
    assert two_nodes.regather_seconds_per_token == pytest.approx(per_trained_token * weights * (15 / 16) / 50e9)
    kv = 2 * SMALL.num_layers * SMALL.kv_dim * 64 * 2 * 2  # half the 128 positions cached on average, 2 rows, bf16
    decode = (weights + kv) / (3.35e12 * 0.3)
    # A token costs the slower of decoding and re-gathering (FSDP prefetches the next layer's gather).
    assert two_nodes.generation_seconds_per_token == pytest.approx(
        per_trained_token * max(decode, weights * (15 / 16) / 50e9)
    )
    unsharded = plan_run(SMALL, SMALL, **{**_fields(_setup()), **settings, "sharding": "ddp"})
    assert unsharded.throughput.regather_seconds_per_token == 0
    assert unsharded.throughput.generation_seconds_per_token == pytest.approx(per_trained_token * decode)


def test_seq_kd_plans_the_teacher_generating() -> None:
    setup = _setup(num_gpus=2, sharding="fsdp2", seq_kd=True, per_device_train_batch_size=2)
    memory = estimate_memory(setup)
    spec = SMALL
    kv = 2 * spec.num_layers * spec.kv_dim * 128 * 2 * 2
    assert memory.get("teacher generation KV cache") == kv
    layer = spec.layer_linear_params + spec.layer_other_params
    gathered = (2 * layer + spec.embedding_params + spec.head_params) * 2
    assert _item(memory, "gathered teacher weights", "on-policy generation") == gathered
    speed = plan_run(SMALL, SMALL, **_fields(setup)).throughput
    assert speed.regather_seconds_per_token == pytest.approx(128 / 256 * spec.num_params * 2 * (1 / 2) / 450e9)
    with pytest.raises(ValueError, match="seq_kd"):
        _setup(seq_kd=True, teacher_mode="cache")


def test_host_memory_per_node_counts_every_process_loading() -> None:
    from distill.planning.memory import host_bytes_per_node

    setup = _setup(nodes=2, num_gpus=8, sharding="fsdp2", precision="bf16")
    assert host_bytes_per_node(setup) == 8 * (SMALL.num_params * 2 + SMALL.num_params * 2)
    assert host_bytes_per_node(replace(setup, teacher_mode="4bit")) == 8 * SMALL.num_params * 2  # loaded onto GPU


def test_cli_nodes_flag(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--student", "Qwen/Qwen2.5-0.5B", "--teacher", "Qwen/Qwen2.5-1.5B", "--gpu", "H100"]
    args += ["--nodes", "2", "--num-gpus", "8", "--sharding", "fsdp2", "--lmbda", "0.5", "--tokens", "1e8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 nodes x 8 x H100-80GB (16 GPUs)" in out and "over 16 GPU(s)" in out
    assert "per node" in out and "host RAM at load" in out and "across nodes" in out
    assert main([*args, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["setup"]["nodes"] == 2 and payload["throughput"]["regather_seconds_per_token"] > 0
    with pytest.raises(SystemExit) as exited:  # the field's bound reaches the flag
        main([*args, "--nodes", "0"])
    assert exited.value.code == 2 and "--nodes: must be >= 1; got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="nodes must be >= 1; got 0"):
        _setup(nodes=0)
