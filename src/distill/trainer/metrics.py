"""KD metrics accumulated over the micro-batches between two log lines."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from distill.losses import DistillationOutput, HiddenStateOutput


@dataclass
class KDMetrics:
    """Token-weighted running sums of the loss diagnostics, and the token throughput.

    ``kd_loss``, ``ce_loss``, ``top1_agreement`` and ``teacher_entropy`` are means over the tokens
    that carry loss; ``tokens_per_second`` counts every non-padding input token the student
    processed (prompts and completions, generated ones included) per second of wall time since the
    previous log; ``on_policy_fraction`` is the fraction of micro-batches trained on generated text.
    ``hidden_loss`` and ``hidden_loss/layer_<i>`` (intermediate-layer distillation; ``i`` the student
    layer) are means over the tokens that loss counts.
    """

    sums: dict[str, float] = field(default_factory=dict)
    loss_tokens: int = 0
    input_tokens: int = 0
    micro_batches: int = 0
    generated_batches: int = 0
    started: float = field(default_factory=time.perf_counter)
    hidden_sums: dict[str, float] = field(default_factory=dict)
    hidden_tokens: int = 0
    teacher_sums: dict[str, float] = field(default_factory=dict)

    def add(self, output: DistillationOutput, input_tokens: int, generated: bool) -> None:
        """Record one micro-batch's :class:`DistillationOutput` and its non-padding input tokens."""
        n = output.num_tokens
        values = {"kd_loss": output.kd_loss, "top1_agreement": output.top1_agreement}
        if output.teacher_entropy is not None:
            values["teacher_entropy"] = output.teacher_entropy
        ce = float(output.ce_loss)
        if not math.isnan(ce):
            values["ce_loss"] = output.ce_loss
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value) * n
        self.loss_tokens += n
        self.input_tokens += input_tokens
        self.micro_batches += 1
        self.generated_batches += int(generated)

    def add_hidden(self, output: HiddenStateOutput, layer_names: list[str]) -> None:
        """Record one micro-batch's hidden-state loss: the total and one value per mapped layer."""
        n = output.num_tokens
        values = dict(zip(layer_names, output.layer_losses.tolist(), strict=True))
        values["hidden_loss"] = float(output.loss.detach())
        for name, value in values.items():
            self.hidden_sums[name] = self.hidden_sums.get(name, 0.0) + value * n
        self.hidden_tokens += n

    def add_teachers(self, per_teacher: dict[str, tuple[int, float, float]]) -> None:
        """Record several teachers' ``(tokens, KD, top-1 agreement)``: logged as ``kd_loss/<name>``, ...

        Each is a mean over the tokens that teacher taught (its routed rows, or all of them in a mixture).
        """
        for name, (tokens, kd, agreement) in per_teacher.items():
            for key, value in ((f"kd_loss/{name}", kd * tokens), (f"top1_agreement/{name}", agreement * tokens),
                               (f"tokens/{name}", float(tokens))):  # fmt: skip
                self.teacher_sums[key] = self.teacher_sums.get(key, 0.0) + value

    def pop(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The metrics since the last call (summed over processes by ``reduce_sum``), then reset."""
        names = sorted(self.sums)
        hidden_names = sorted(self.hidden_sums)  # the same on every process: one layer map per run
        teacher_names = sorted(self.teacher_sums)
        totals = (
            [self.sums[name] for name in names]
            + [self.hidden_sums[name] for name in hidden_names]
            + [self.teacher_sums[name] for name in teacher_names]
            + [self.hidden_tokens, self.loss_tokens, self.input_tokens, self.micro_batches, self.generated_batches]
        )
        if reduce_sum is not None:
            totals = reduce_sum(torch.tensor(totals, dtype=torch.float64)).tolist()
        *sums, hidden_tokens, loss_tokens, input_tokens, micro_batches, generated_batches = totals
        teacher_values = dict(zip(teacher_names, sums[len(names) + len(hidden_names) :], strict=True))
        sums, hidden_sums = sums[: len(names)], sums[len(names) : len(names) + len(hidden_names)]
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        logs = {name: value / max(loss_tokens, 1) for name, value in zip(names, sums, strict=True)}
        logs.update(
            {name: value / max(hidden_tokens, 1) for name, value in zip(hidden_names, hidden_sums, strict=True)}
        )
        for key, value in teacher_values.items():
            if not key.startswith("tokens/"):
                logs[key] = value / max(teacher_values["tokens/" + key.split("/", 1)[1]], 1)
        if micro_batches:
            logs["tokens_per_second"] = input_tokens / elapsed
            logs["loss_tokens"] = loss_tokens
            logs["on_policy_fraction"] = generated_batches / micro_batches
        self.reset()
        return logs

    def reset(self) -> None:
        """Forget everything recorded and restart the clock."""
        self.sums.clear()
        self.hidden_sums.clear()
        self.teacher_sums.clear()
        self.hidden_tokens = 0
        self.loss_tokens = self.input_tokens = self.micro_batches = self.generated_batches = 0
        self.started = time.perf_counter()
