#!/usr/bin/env python
"""Side-by-side benchmark of the generalized JSD distillation loss, forward + backward.

The realistic fused setting: student hidden states ``[N, H_s]`` and head ``[V, H_s]``, teacher hidden
states ``[N, H_t]`` and head ``[V, H_t]``; gradients with respect to the student's hidden states and
head weight. Every case runs in its own subprocess (this script with ``--case NAME``) so its peak
memory is measured on a clean process. See ``benchmarks/README.md``.

``distill fused`` is the fused loss as shipped (closed-form chunk gradients, default chunk);
``distill fused (autograd, today's path)`` is the same function with ``gradient="autograd"`` at the
chunk the previous release defaulted to (``--autograd-chunk-size``, default 32 rows on a CPU at
V=151,936): the path the closed form replaced, measured in the same run. ``distill fused (compiled
chunk body)`` is ``compiled=True`` (``torch.compile`` of the objective and its gradient), compiled in
an untimed step on the first 64 positions. Under each table a line gives the closed form's speed and
memory ratios against every other case that ran.

Examples::

    PYTHONPATH=src python benchmarks/bench_losses.py --preset demo
    PYTHONPATH=src python benchmarks/bench_losses.py --vocab 32000 --tokens 256
    PYTHONPATH=src python benchmarks/bench_losses.py --preset cpu --out results.md
    PYTHONPATH=src python benchmarks/bench_losses.py --preset cpu --cases fused,fused_autograd,liger --no-reference
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (
    GIB,
    PeakMemory,
    add_common_args,
    child_env,
    cpu_model,
    emit,
    failure,
    log,
    markdown_table,
    package_versions,
    run_in_child,
    status_bytes,
    time_repeats,
)
from torch import Tensor

IGNORE_INDEX = -100
MASK_FRACTION = 0.1  # share of positions labelled IGNORE_INDEX (e.g. prompt tokens)
STUDENT_LOGIT_STD = 2.0  # head weights are scaled so logits have this standard deviation
TEACHER_LOGIT_STD = 3.0  # the teacher a little peakier than the student
LIGER_CHUNK_SIZE = 1024  # Liger's default
# The fused loss's default [chunk x V] float32 buffer before the closed form (elements): the chunk the
# autograd case runs at unless --autograd-chunk-size says otherwise.
PREVIOUS_TARGET_CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**26}
AUTO_WARMUP_MAX_ELEMENTS = 10**8  # above this many logit elements (N x V), no warm-up by default
REFERENCE = "reference"

PRESETS: dict[str, dict[str, object]] = {
    "demo": {"vocab": 8192, "tokens": [512], "hidden": 256, "teacher_hidden": 384},
    # SmolLM2-135M-like student, Qwen2.5-0.5B-like teacher, Qwen2.5 vocabulary.
    "cpu": {"vocab": 151936, "tokens": [2048, 4096], "hidden": 576, "teacher_hidden": 960},
    # Qwen2.5-0.5B-like student, Qwen2.5-1.5B-like teacher.
    "large": {"vocab": 151936, "tokens": [4096, 8192], "hidden": 896, "teacher_hidden": 1536},
}

CASE_LABELS: dict[str, str] = {
    "naive": "naive (fp32 logits, autograd)",
    "dense": "distill dense",
    "fused": "distill fused (closed form)",
    "fused_autograd": "distill fused (autograd, today's path)",
    "fused_compiled": "distill fused (compiled chunk body)",
    "trl": "TRL generalized_jsd_loss",
    "liger": "Liger fused JSD",
}

LossFn = Callable[["Inputs"], Tensor]


# --------------------------------------------------------------------------------------------------
# Sizes, inputs and the losses under test
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """Problem size of one table."""

    vocab: int
    tokens: int
    hidden: int
    teacher_hidden: int

    @property
    def logit_elements(self) -> int:
        """Elements of one ``[N, V]`` logits tensor."""
        return self.tokens * self.vocab


@dataclass
class Inputs:
    """One problem: student and teacher hidden states and heads, and the (aligned) labels."""

    hidden: Tensor  # [N, H_s], requires grad
    weight: Tensor  # [V, H_s], requires grad
    teacher_hidden: Tensor  # [N, H_t]
    teacher_weight: Tensor  # [V, H_t]
    labels: Tensor  # [N], IGNORE_INDEX where masked


def make_inputs(size: Size, seed: int, dtype: torch.dtype, device: torch.device) -> Inputs:
    """Deterministic inputs from ``seed``: generated in float32 on the CPU, then cast and moved.

    Hidden states are N(0, 1); head weights N(0, 1/H) scaled so the logits have a standard deviation
    of about 2 (student) and 3 (teacher), i.e. realistically peaky distributions.
    """
    gen = torch.Generator().manual_seed(seed)
    n, v = size.tokens, size.vocab
    hidden = torch.randn(n, size.hidden, generator=gen)
    weight = torch.randn(v, size.hidden, generator=gen) * (STUDENT_LOGIT_STD / math.sqrt(size.hidden))
    teacher_hidden = torch.randn(n, size.teacher_hidden, generator=gen)
    teacher_weight = torch.randn(v, size.teacher_hidden, generator=gen) * (
        TEACHER_LOGIT_STD / math.sqrt(size.teacher_hidden)
    )
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < MASK_FRACTION] = IGNORE_INDEX

    def cast(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype)

    return Inputs(
        cast(hidden).requires_grad_(True),
        cast(weight).requires_grad_(True),
        cast(teacher_hidden),
        cast(teacher_weight),
        labels.to(device),
    )


def materialised_logits(inp: Inputs) -> tuple[Tensor, Tensor]:
    """Both models' full ``[N, V]`` logits in float32 (the teacher's without autograd)."""
    student_logits = (inp.hidden @ inp.weight.t()).float()
    with torch.no_grad():
        teacher_logits = (inp.teacher_hidden @ inp.teacher_weight.t()).float()
    return student_logits, teacher_logits


def naive_jsd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, beta: float) -> Tensor:
    """The plain torch formula: generalized JSD with ``M = beta P + (1 - beta) Q``, masked mean.

    ``P`` is the teacher, ``Q`` the student; ``beta * KL(P || M) + (1 - beta) * KL(Q || M)`` per
    position, averaged over the positions whose label is not ``IGNORE_INDEX``.
    """
    student_logprobs = F.log_softmax(student_logits, dim=-1)
    teacher_logprobs = F.log_softmax(teacher_logits, dim=-1)
    # F.kl_div(input, target) is KL(target || input).
    if beta in (0.0, 1.0):  # the end points are defined as forward KL(P || Q) and reverse KL(Q || P)
        target, approx = (teacher_logprobs, student_logprobs) if beta == 0.0 else (student_logprobs, teacher_logprobs)
        per_token = F.kl_div(approx, target, reduction="none", log_target=True).sum(-1)
    else:
        mixture_logprobs = torch.logsumexp(
            torch.stack([teacher_logprobs + math.log(beta), student_logprobs + math.log1p(-beta)]), dim=0
        )
        kl_teacher = F.kl_div(mixture_logprobs, teacher_logprobs, reduction="none", log_target=True).sum(-1)
        kl_student = F.kl_div(mixture_logprobs, student_logprobs, reduction="none", log_target=True).sum(-1)
        per_token = beta * kl_teacher + (1.0 - beta) * kl_student
    mask = labels != IGNORE_INDEX
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def previous_default_chunk(vocab: int, device: str) -> int:
    """The fused loss's default chunk before the closed form (16 MiB per buffer on a CPU, 256 MiB on a GPU)."""
    target = PREVIOUS_TARGET_CHUNK_ELEMENTS["cpu" if device == "cpu" else "cuda"]
    return max(32, min(4096, (target // vocab) // 32 * 32))


def case_chunk(case: str, args: argparse.Namespace) -> int | None:
    """The chunk a distill fused case runs at (``None``: the library's default)."""
    if case == "fused_autograd":
        return args.autograd_chunk_size or previous_default_chunk(args.vocab, args.device)
    return args.chunk_size


def build_case(case: str, beta: float, chunk_size: int | None, device: torch.device, liger_chunk: int) -> LossFn:
    """The loss function of one case (imports its library here, before memory is measured).

    Raises:
        ImportError: when the case's library is not installed.
    """
    if case == "naive":
        return lambda inp: naive_jsd(*materialised_logits(inp), inp.labels, beta)
    if case == "dense":
        from distill.losses import distillation_loss

        return lambda inp: distillation_loss(*materialised_logits(inp), inp.labels, "jsd", beta=beta).loss
    if case in ("fused", "fused_autograd", "fused_compiled", REFERENCE):
        from distill.losses import TeacherHead, fused_distillation_loss

        gradient = "autograd" if case == "fused_autograd" else "closed_form"
        compiled = case == "fused_compiled"

        def fused(inp: Inputs) -> Tensor:
            teacher = TeacherHead(inp.teacher_hidden, inp.teacher_weight)
            return fused_distillation_loss(
                inp.hidden, inp.weight, teacher, inp.labels, "jsd", beta=beta, chunk_size=chunk_size,
                gradient=gradient, compiled=compiled,
            ).loss  # fmt: skip

        return fused
    if case == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        return lambda inp: GKDTrainer.generalized_jsd_loss(*materialised_logits(inp), inp.labels, beta=beta)
    if case == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.0,
            weight_soft_loss=1.0,
            beta=beta,
            temperature=1.0,
            compiled=device.type == "cuda",
            chunk_size=liger_chunk,
        )
        return lambda inp: liger(inp.hidden, inp.weight, inp.teacher_hidden, inp.teacher_weight, inp.labels)
    raise ValueError(f"Unknown case {case!r}.")


# --------------------------------------------------------------------------------------------------
# Measuring: time, peak memory, error against the reference
# --------------------------------------------------------------------------------------------------


def one_step(loss_fn: LossFn, inp: Inputs) -> Tensor:
    """One forward + backward from fresh gradients; returns the detached loss."""
    inp.hidden.grad = None
    inp.weight.grad = None
    loss = loss_fn(inp)
    loss.backward()
    return loss.detach()


def relative_errors(loss: Tensor, inp: Inputs, reference: dict[str, Tensor]) -> dict[str, float]:
    """Loss relative error and ``max|g - g_ref| / max|g_ref|`` of both gradients, in float64."""

    def grad_error(grad: Tensor | None, ref: Tensor) -> float:
        if grad is None:
            return math.inf
        return ((grad.detach().double().cpu() - ref).abs().max() / ref.abs().max()).item()

    ref_loss = reference["loss"].item()
    return {
        "loss": abs(loss.double().item() - ref_loss) / abs(ref_loss),
        "grad hidden": grad_error(inp.hidden.grad, reference["grad_hidden"]),
        "grad W": grad_error(inp.weight.grad, reference["grad_weight"]),
    }


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an exception is an allocation failure (CPU address-space cap or CUDA OOM)."""
    if isinstance(error, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return any(s in text for s in ("can't allocate memory", "cannot allocate memory", "out of memory"))


# --------------------------------------------------------------------------------------------------
# The child process: one case at one size
# --------------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """What a child reports back to the parent."""

    case: str
    status: str  # ok, oom, skipped, error
    seconds: float | None = None
    extra_gib: float | None = None
    loss: float | None = None
    errors: dict[str, float] = field(default_factory=dict)
    unmasked: int | None = None
    message: str = ""


def cap_address_space(mem_cap_gib: float) -> None:
    """Make allocations fail, instead of exhausting the machine, once ``mem_cap_gib`` more is mapped.

    The limit is on address space (``RLIMIT_AS``): what the process has mapped now (interpreter and
    libraries, mostly not resident) plus the cap, which then covers the inputs and the case's peak.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = status_bytes("VmSize") + int(mem_cap_gib * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def case_dtype(case: str, args: argparse.Namespace) -> torch.dtype:
    """float64 for the reference, else the benchmark's input dtype."""
    return torch.float64 if case == REFERENCE else resolve_dtype(args)


def compile_warmup(loss_fn: LossFn, inp: Inputs, device: torch.device, rows: int = 64) -> None:
    """One step on the first ``rows`` positions, so a compiled case's compilation is not timed.

    The chunk body is compiled with dynamic shapes, so the full-size run reuses what this step compiled.
    """
    small = Inputs(
        inp.hidden.detach()[:rows].clone().requires_grad_(True), inp.weight,
        inp.teacher_hidden[:rows], inp.teacher_weight, inp.labels[:rows],
    )  # fmt: skip
    timing = time_repeats(lambda: one_step(loss_fn, small), repeats=1, warmup=0, device=device)
    inp.weight.grad = None
    log(f"  [compile warm-up on {rows} rows] {timing.median:.2f} s")


def measure(
    loss_fn: LossFn, inp: Inputs, args: argparse.Namespace, device: torch.device
) -> tuple[float, float, Tensor]:
    """Warm-up(s), then timed repeats; returns (median seconds, peak extra GiB of the repeats, last loss)."""
    if args.case == "fused_compiled":
        compile_warmup(loss_fn, inp, device)
    meter = PeakMemory(device)

    def start_meter() -> None:  # after the warm-up, so one-off allocations (thread pools, caches) are not counted
        inp.hidden.grad = None
        inp.weight.grad = None
        meter.start()
        log(f"  [{args.case}] baseline {meter.baseline / GIB:.2f} GiB")

    losses: list[Tensor] = []
    timing = time_repeats(
        lambda: losses.append(one_step(loss_fn, inp)), args.repeats, args.warmup, device, args.case, start_meter
    )
    return timing.median, meter.extra_gib(), losses[-1]


def run_child(args: argparse.Namespace) -> None:
    """Run one case at one size and emit its :class:`CaseResult`."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    size = Size(args.vocab, args.tokens[0], args.hidden, args.teacher_hidden)
    try:
        loss_fn = build_case(args.case, args.beta, case_chunk(args.case, args), device, args.liger_chunk_size)
    except ImportError as error:
        emit(asdict(CaseResult(args.case, "skipped", message=f"not importable ({error})")))
        return
    if device.type == "cpu":
        cap_address_space(args.mem_cap_gib)
    try:
        inp = make_inputs(size, args.seed, case_dtype(args.case, args), device)
        seconds, extra_gib, loss = measure(loss_fn, inp, args, device)
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        emit(asdict(CaseResult(args.case, "oom", message=str(error).splitlines()[0][:200])))
        return
    unmasked = int((inp.labels != IGNORE_INDEX).sum())
    result = CaseResult(args.case, "ok", seconds, extra_gib, loss.double().item(), unmasked=unmasked)
    reference_file = Path(args.ref_dir) / "reference.pt"
    if args.case == REFERENCE:
        grads = {"grad_hidden": inp.hidden.grad.cpu(), "grad_weight": inp.weight.grad.cpu()}
        torch.save({"loss": loss.cpu(), **grads}, reference_file)
    elif reference_file.exists():
        result.errors = relative_errors(loss, inp, torch.load(reference_file))
    emit(asdict(result))


# --------------------------------------------------------------------------------------------------
# The parent process: sizes, children, tables
# --------------------------------------------------------------------------------------------------


def resolve_dtype(args: argparse.Namespace) -> torch.dtype:
    """Input dtype: ``--dtype``, or bf16 on CUDA and fp32 on the CPU."""
    name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def mem_available_gib() -> float:
    """``MemAvailable`` from ``/proc/meminfo``, in GiB."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    raise KeyError("MemAvailable")


@functools.cache
def gpu_properties() -> tuple[str, int]:
    """The GPU's name and total memory in bytes, asked in a subprocess so this one holds no CUDA context."""
    code = "import torch; p = torch.cuda.get_device_properties(0); print(p.total_memory); print(p.name)"
    total, name = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n", 1)
    return name.strip(), int(total)


def default_mem_cap_gib(device: str) -> float:
    """90% of the available RAM (CPU) or the GPU's total memory (CUDA)."""
    if device == "cuda":
        return gpu_properties()[1] / GIB
    return 0.9 * mem_available_gib()


def estimated_gib(case: str, size: Size, args: argparse.Namespace) -> float:
    """Rough peak extra memory of a case, to skip those that cannot fit without running them."""
    from distill.losses import default_chunk_size

    logits = size.logit_elements * 4  # one [N, V] float32 buffer
    grads = (size.tokens + size.vocab) * size.hidden * 4 * 2  # gradients and their float32 accumulators
    if case in ("naive", "dense"):
        return 12 * logits / GIB
    if case == "trl":
        return 17 * logits / GIB
    if case == "liger":
        rows = math.ceil(size.tokens / max(1, size.tokens // args.liger_chunk_size))
        return (18 * rows * size.vocab * 4 + grads) / GIB
    rows = min(size.tokens, case_chunk(case, args) or default_chunk_size(size.vocab, args.device))
    # The closed form keeps 2 chunk-sized buffers on a CPU (block-sized scratch), 4 on a GPU.
    buffers = {"fused_autograd": 14, "fused_compiled": 6}.get(case, 2 if args.device == "cpu" else 4)
    fused = (buffers * rows * size.vocab * 4 + grads) / GIB
    return 2 * fused if case == REFERENCE else fused


def child_command(args: argparse.Namespace, case: str, tokens: int, warmup: int, ref_dir: str) -> list[str]:
    """The command line that runs one case at one size in a fresh interpreter."""
    command = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--tokens", str(tokens)]
    for flag, value in (
        ("--vocab", args.vocab), ("--hidden", args.hidden), ("--teacher-hidden", args.teacher_hidden),
        ("--device", args.device), ("--threads", args.threads), ("--seed", args.seed), ("--beta", args.beta),
        ("--repeats", args.repeats), ("--warmup", warmup), ("--mem-cap-gib", args.mem_cap_gib),
        ("--ref-dir", ref_dir), ("--chunk-size", args.chunk_size), ("--dtype", args.dtype),
        ("--autograd-chunk-size", args.autograd_chunk_size), ("--liger-chunk-size", args.liger_chunk_size),
    ):  # fmt: skip
        if value is not None:
            command += [flag, str(value)]
    return command


def run_case(args: argparse.Namespace, case: str, size: Size, warmup: int, ref_dir: str) -> CaseResult:
    """Run one case in a subprocess (or skip it when its estimate is far over the cap)."""
    estimate = estimated_gib(case, size, args)
    if estimate > 2 * args.mem_cap_gib:
        log(f"  [{case}] skipped: estimated {estimate:.0f} GiB > 2 x cap {args.mem_cap_gib:.1f} GiB")
        return CaseResult(case, "skipped", message=f"does not fit (est. {estimate:.0f} GiB)")
    log(f"  [{case}] starting (estimated {estimate:.1f} GiB)")
    # child_env fixes glibc's mmap threshold at 1 MiB, so RSS follows the live tensors (see harness.child_env).
    result, proc = run_in_child(child_command(args, case, size.tokens, warmup, ref_dir), label=f"  [{case}]",
                             env=child_env())  # fmt: skip
    if result is not None:
        return CaseResult(**result)
    return CaseResult(case, "error", message=f"failed ({failure(proc)}; see stderr)")


def machine_description(args: argparse.Namespace) -> str:
    """CPU model and cores, or the GPU's name."""
    if args.device == "cuda":
        return f"GPU {gpu_properties()[0]}"
    cores = f"{os.cpu_count()} cores ({args.threads} threads used)"
    return f"CPU {cpu_model()}, {cores}, {mem_available_gib():.1f} GiB RAM available"


def versions() -> str:
    """Versions of torch and the peer libraries (without importing the peers)."""
    peers = package_versions("trl", "liger-kernel")
    return f"torch {torch.__version__}, python {platform.python_version()}, {peers}"


def format_seconds(seconds: float) -> str:
    """Seconds with about three significant digits."""
    return f"{seconds:.3f}" if seconds < 1 else f"{seconds:.2f}" if seconds < 100 else f"{seconds:.0f}"


def format_error(errors: dict[str, float]) -> str:
    """The worst of the relative errors, and which one it is."""
    if not errors:
        return "n/a"
    name, value = max(errors.items(), key=lambda item: item[1])
    return f"{value:.1e} ({name})"


def table_row(result: CaseResult, naive_gib: float | None, cap_gib: float) -> list[str]:
    """One table row's cells."""
    label = CASE_LABELS[result.case]
    if result.status != "ok":
        reason = {"oom": f"does not fit in {cap_gib:.1f} GiB"}.get(result.status, result.message)
        return [label, "—", reason, "—", "—"]
    assert result.seconds is not None and result.extra_gib is not None
    versus = f"{100 * result.extra_gib / naive_gib:.0f}%" if naive_gib else "n/a"
    return [label, format_seconds(result.seconds), f"{result.extra_gib:.2f}", versus, format_error(result.errors)]


def size_heading(size: Size, unmasked: int | None, args: argparse.Namespace, warmup: int) -> str:
    """The heading line of one size's table."""
    from distill.losses import default_chunk_size

    chunk = args.chunk_size or default_chunk_size(size.vocab, args.device)
    autograd_chunk = case_chunk("fused_autograd", args)
    kept = "?" if unmasked is None else f"{unmasked:,}"
    return (
        f"### V={size.vocab:,}, N={size.tokens:,} tokens ({kept} unmasked), H_s={size.hidden}, "
        f"H_t={size.teacher_hidden}; distill chunk {chunk} (closed form) / {autograd_chunk} (autograd), "
        f"Liger chunk {args.liger_chunk_size}; {args.repeats} timed repeat(s) after {warmup} warm-up(s)"
    )


def ratio_line(results: list[CaseResult]) -> str:
    """The closed form's time and memory against every other case that ran, e.g. ``1.6x faster``."""
    fused = next((r for r in results if r.case == "fused" and r.status == "ok"), None)
    if fused is None or not fused.seconds:
        return ""
    assert fused.extra_gib is not None
    parts = []
    for other in results:
        if other.case == "fused" or other.status != "ok" or other.seconds is None or other.extra_gib is None:
            continue
        parts.append(
            f"{other.seconds / fused.seconds:.2f}x faster than {CASE_LABELS[other.case]} "
            f"(peak memory {fused.extra_gib / other.extra_gib:.2f}x of it)"
        )
    return "distill fused (closed form): " + "; ".join(parts) + "." if parts else ""


def table_notes(reference: CaseResult, cap_gib: float, device: str) -> str:
    """The notes under a table."""
    if reference.status == "ok":
        ref = f"reference loss {reference.loss:.6f}"
    elif reference.status == "skipped":
        ref = f"reference not run ({reference.message})"
    else:
        ref = f"reference failed ({reference.status}: {reference.message})"
    memory = (
        "peak RSS (VmHWM after a reset) minus RSS once the inputs exist"
        if device == "cpu"
        else "torch.cuda.max_memory_allocated minus memory_allocated once the inputs exist"
    )
    return (
        "Notes: time is one forward + backward (median of the repeats), teacher logits included. "
        f"Memory: {memory}, in a fresh process per case (cap: {cap_gib:.1f} GiB of address space beyond the "
        "imports). Error: worst of the loss's relative error and max|g - g_ref| / max|g_ref| for the "
        "gradients of the student's hidden states (grad hidden) and head weight (grad W), against "
        "`distill fused` run in float64 on the same inputs (the test suite checks that float64 path "
        f"independently against a float64 implementation written from the math); {ref}. All cases compute "
        "the same quantity: mean over unmasked positions of beta*KL(P||M) + (1-beta)*KL(Q||M), "
        "M = beta*P + (1-beta)*Q (P teacher, Q student); Liger and TRL were checked to use this "
        "normalisation and beta convention, so their errors need no rescaling. distill skips masked "
        "positions before any logits are computed; the naive, TRL and Liger forms compute logits for every "
        "position. Liger runs with compiled=False on the CPU (True on CUDA)."
    )


def run_size(args: argparse.Namespace, size: Size) -> str:
    """All cases at one size; returns the markdown section."""
    warmup = args.warmup
    if warmup is None:  # on CUDA always (it also absorbs Liger's torch.compile); on a CPU only when cheap
        warmup = int(args.device == "cuda" or size.logit_elements <= AUTO_WARMUP_MAX_ELEMENTS)
    log(f"== V={size.vocab}, N={size.tokens}, H_s={size.hidden}, H_t={size.teacher_hidden}")
    with tempfile.TemporaryDirectory(prefix="bench_losses_") as ref_dir:
        if args.reference:
            reference = run_case(args, REFERENCE, size, warmup=0, ref_dir=ref_dir)
        else:
            reference = CaseResult(REFERENCE, "skipped", message="--no-reference")
        results = [run_case(args, case, size, warmup, ref_dir) for case in args.cases]
    naive = next((r for r in results if r.case == "naive" and r.status == "ok"), None)
    naive_gib = naive.extra_gib if naive else None
    unmasked = next((r.unmasked for r in (reference, *results) if r.unmasked is not None), None)
    lines = [
        size_heading(size, unmasked, args, warmup),
        "",
        *markdown_table(
            ["case", "fwd+bwd (s)", "peak extra memory (GiB)", "vs naive memory", "max rel error"],
            [table_row(r, naive_gib, args.mem_cap_gib) for r in results],
            align="lrrrl",
        ),
        "",
        ratio_line(results),
        "",
        table_notes(reference, args.mem_cap_gib, args.device),
    ]
    return "\n".join(lines)


def run_parent(args: argparse.Namespace) -> None:
    """Print (and optionally save) the header and one table per size."""
    if args.mem_cap_gib is None:
        args.mem_cap_gib = round(default_mem_cap_gib(args.device), 1)
    dtype = str(resolve_dtype(args)).removeprefix("torch.")
    header = [
        f"## Generalized JSD (beta={args.beta}, T=1) forward + backward from hidden states",
        "",
        f"- machine: {machine_description(args)}",
        f"- {versions()}",
        f"- device {args.device}, inputs {dtype} (softmax math in fp32), seed {args.seed}",
        "",
    ]
    print("\n".join(header), flush=True)
    sections = []
    for tokens in args.tokens:
        size = Size(args.vocab, tokens, args.hidden, args.teacher_hidden)
        sections.append(run_size(args, size))
        print(sections[-1] + "\n", flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(header) + "\n" + "\n\n".join(sections) + "\n")
        log(f"wrote {args.out}")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the flags and fill sizes from the preset (explicit flags win)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="demo", help="sizes (flags below override)")
    parser.add_argument("--vocab", type=int, help="vocabulary size V")
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], help="comma list, e.g. 2048,4096")
    parser.add_argument("--hidden", type=int, help="student hidden size H_s")
    parser.add_argument("--teacher-hidden", type=int, help="teacher hidden size H_t")
    parser.add_argument("--chunk-size", type=int, help="distill fused chunk (default: default_chunk_size(V))")
    parser.add_argument(
        "--autograd-chunk-size", type=int, help="chunk of the autograd case (default: the previous default chunk)"
    )
    parser.add_argument(
        "--liger-chunk-size", type=int, default=LIGER_CHUNK_SIZE, help=f"Liger's chunk (default {LIGER_CHUNK_SIZE})"
    )
    parser.add_argument("--cases", type=lambda s: s.split(","), default=list(CASE_LABELS), help=",".join(CASE_LABELS))
    add_common_args(parser, "device", "threads", "repeats")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument(
        "--warmup",
        type=int,
        choices=(0, 1),
        help="default: 1 on CUDA; on a CPU 1 up to 1e8 logit elements N*V, else 0",
    )
    parser.add_argument("--mem-cap-gib", type=float, help="per-case cap; default 90%% of MemAvailable")
    parser.add_argument("--beta", type=float, default=0.5, help="JSD beta (0 forward KL, 1 reverse KL)")
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the float64 reference for the error column (about twice the time of one fp32 case on a CPU)",
    )
    add_common_args(parser, "seed", "out")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    parser.add_argument("--ref-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    unknown = set(args.cases) - set(CASE_LABELS)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; choose from {','.join(CASE_LABELS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Parent (all cases, tables) or child (``--case``) entry point."""
    args = parse_args(argv)
    if args.case:
        run_child(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
