"""Plans as text: the full table for one GPU type, and one line per GPU type for comparing them."""

from __future__ import annotations

from distill.planning.memory import GIB, host_bytes_per_node
from distill.planning.plan import Plan
from distill.planning.setup import RunSetup

__all__ = ["describe_setup", "format_comparison", "format_plan", "human_count"]


def human_count(value: float) -> str:
    """``1.2K``, ``3.4M``, ``5.6B``: a count with a metric suffix."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            return f"{value / size:.1f}{suffix}"
    return f"{value:.0f}"


def _hours(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:,.1f} h"


def describe_setup(setup: RunSetup) -> str:
    """Two lines naming the models, how each is held, and the batch and loss settings."""
    student = setup.student
    if setup.training == "full":
        trained = f"full fine-tune ({setup.precision})"
    else:
        trained = f"{'QLoRA' if setup.qlora else 'LoRA'} r={setup.lora_rank}"
    teacher = setup.teacher.name if setup.teacher is not None else "(no model)"
    sharding = "" if setup.sharding == "none" else f", {setup.sharding}"
    if setup.teacher_sharded:
        sharding += " (teacher sharded)"
    loss = "dense loss" if setup.loss_implementation == "dense" else f"fused loss (chunk {setup.chunk_size})"
    checkpointing = "gradient checkpointing" if setup.gradient_checkpointing else "no checkpointing"
    return (
        f"student {student.name} ({human_count(student.num_params)} params, {trained}); "
        f"teacher {teacher} ({setup.teacher_mode})\n"
        f"{_gpus(setup)}{sharding}; {setup.per_device_train_batch_size} x {setup.max_length} "
        f"tokens per GPU, accumulation {setup.gradient_accumulation_steps}; {loss}, {setup.loss}; {checkpointing}; "
        f"{setup.optim}"
    )


def _gpus(setup: RunSetup) -> str:
    """``8 x H100-80GB``, or ``2 nodes x 8 x H100-80GB (16 GPUs)``."""
    gpus = f"{setup.num_gpus} x {setup.gpu.name}"
    return gpus if setup.nodes == 1 else f"{setup.nodes} nodes x {gpus} ({setup.world_size} GPUs)"


def _distributed_lines(plan: Plan) -> list[str]:
    """Per node (several GPUs): host memory while loading, and, over several nodes, each node's share of the speed."""
    setup, speed = plan.setup, plan.throughput
    lines = []
    if speed.regather_seconds_per_token:
        where = "within the node" if setup.nodes == 1 else "across nodes"
        lines.append(
            f"  re-gathering      {1e3 * speed.regather_seconds_per_token:.3f} ms per trained token: a sharded model "
            f"that generates all-gathers its weights for every new token ({where})"
        )
    if setup.world_size > 1:
        lines.append(
            f"  host RAM at load  {host_bytes_per_node(setup) / GIB:.1f} GiB per node ({setup.num_gpus} processes each"
            " read the models to the CPU; fsdp_cpu_ram_efficient_loading: rank 0 alone)"
        )
    if setup.nodes > 1:
        per_node = speed.tokens_per_second / setup.nodes
        lines.append(
            f"  per node          {per_node:,.0f} tokens/s, ${setup.num_gpus * setup.gpu.hourly_usd:.2f}/hour "
            f"({setup.num_gpus} GPUs)"
        )
    return lines


def format_plan(plan: Plan) -> str:
    """The readable report of one plan: memory items in GiB, peak against capacity, speed, cost, advice."""
    setup, memory, speed = plan.setup, plan.memory, plan.throughput
    width = max(len(item.name) for item in memory.items) + 4
    lines = [describe_setup(setup), "", f"{'memory per GPU':<{width}}{'GiB':>8}  detail"]
    for item in memory.items:
        name = item.name if item.at_peak else f"({item.name})"
        note = "" if item.at_peak else f"  [{item.phase}, not at the peak]"
        lines.append(f"  {name:<{width - 2}}{item.gib:>8.2f}  {item.detail}{note}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [
        f"  {'-' * (width + 20)}",
        f"  {'peak (' + memory.peak_phase + ')':<{width - 2}}{memory.total_bytes / GIB:>8.2f}  of "
        f"{setup.gpu.memory_gib:.2f} GiB ({100 * memory.utilisation:.0f}%): {verdict}",
        "",
        f"time ({setup.gpu.bf16_tflops:g} dense bf16 TFLOP/s per GPU; MFU student {speed.student_mfu:.2f}, "
        f"teacher {speed.teacher_mfu:.2f})",
        f"  FLOPs per token   {human_count(speed.flops_per_token)} "
        + "("
        + ", ".join(f"{name} {human_count(value)}" for name, value in speed.flops.items() if value)
        + ")",
        f"  throughput        {speed.tokens_per_second:,.0f} tokens/s over {setup.world_size} GPU(s)",
        f"  optimizer step    {speed.step_seconds:.2f} s for {setup.tokens_per_step:,} tokens",
    ]
    if speed.generation_seconds_per_token:
        lines.append(f"  generation        {1e3 * speed.generation_seconds_per_token:.3f} ms per trained token")
    lines += _distributed_lines(plan)
    if plan.cost is not None:
        cost = plan.cost
        lines.append(
            f"  budget            {human_count(cost.tokens)} tokens: {_hours(cost.wall_hours)} wall, "
            f"{cost.gpu_hours:,.1f} GPU-hours, ${cost.usd:,.2f} at ${cost.hourly_usd:.2f}/GPU-hour"
        )
    lines += ["", plan.message]
    return "\n".join(lines)


def format_comparison(plans: list[Plan]) -> str:
    """One line per plan (one GPU type each): peak against capacity, fits, tokens/s, GPU-hours and dollars."""
    header = f"{'GPU':<14}{'need GiB':>9}{'has GiB':>9}  {'fits':<5}{'tokens/s':>11}{'GPU-hours':>11}{'USD':>11}"
    lines = [describe_setup(plans[0].setup).split("\n")[0], "", header]
    for plan in plans:
        cost = plan.cost
        hours = f"{cost.gpu_hours:,.1f}" if cost else "-"
        usd = f"{cost.usd:,.2f}" if cost else "-"
        lines.append(
            f"{plan.setup.gpu.name:<14}{plan.memory.total_bytes / GIB:>9.1f}{plan.setup.gpu.memory_gib:>9.1f}  "
            f"{'yes' if plan.fits else 'no':<5}{plan.throughput.tokens_per_second:>11,.0f}{hours:>11}{usd:>11}"
        )
    return "\n".join(lines)
