"""KD metrics accumulated over the micro-batches between two log lines.

Values are accumulated as float64 tensors on the device they come from, so recording a micro-batch costs no
host-device sync; :meth:`KDMetrics.pop` reads them all back at once, one transfer per log line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from distill.losses import DistillationOutput, HiddenStateOutput


def _add(sums: dict[str, Tensor], name: str, value: Tensor | float, weight: float = 1.0) -> None:
    """``sums[name] += value * weight`` on the value's device (the first value starts the sum); no host-device sync.

    In float64, as the Python floats this replaced; float32 on Apple's MPS, which has no float64.
    """
    value = torch.as_tensor(value).detach()
    value = value.to(torch.float32 if value.device.type == "mps" else torch.float64) * weight
    sums[name] = sums[name] + value if name in sums else value


@dataclass
class KDMetrics:
    """Token-weighted running sums of the loss diagnostics, and the token throughput.

    ``kd_loss``, ``ce_loss``, ``top1_agreement`` and ``teacher_entropy`` are means over the tokens
    that carry loss; ``tokens_per_second`` counts every non-padding input token the student
    processed (prompts and completions, generated ones included) per second of wall time since the
    previous log; ``on_policy_fraction`` is the fraction of micro-batches trained on generated text.
    ``hidden_loss`` and ``hidden_loss/layer_<i>`` (intermediate-layer distillation; ``i`` the student
    layer) are means over the tokens that loss counts. Sums are 0-d float64 tensors (see the module docstring).
    """

    sums: dict[str, Tensor] = field(default_factory=dict)
    loss_tokens: int = 0
    input_tokens: int | Tensor = 0
    micro_batches: int = 0
    generated_batches: int = 0
    started: float = field(default_factory=time.perf_counter)
    hidden_sums: dict[str, Tensor] = field(default_factory=dict)
    hidden_tokens: int = 0
    teacher_sums: dict[str, Tensor] = field(default_factory=dict)

    def add(self, output: DistillationOutput, input_tokens: int | Tensor, generated: bool) -> None:
        """Record one micro-batch's :class:`DistillationOutput` and its non-padding input tokens (int, 0-d tensor)."""
        n = output.num_tokens
        _add(self.sums, "kd_loss", output.kd_loss, n)
        _add(self.sums, "top1_agreement", output.top1_agreement, n)
        if output.teacher_entropy is not None:
            _add(self.sums, "teacher_entropy", output.teacher_entropy, n)
        # CE is NaN when the loss had no labels: such micro-batches add nothing (and do not count as "seen").
        ce = output.ce_loss.detach()
        _add(self.sums, "ce_loss", torch.nan_to_num(ce.to(torch.float64), nan=0.0), n)
        _add(self.sums, "ce_seen", ~torch.isnan(ce))
        self.loss_tokens += n
        self.input_tokens = self.input_tokens + input_tokens
        self.micro_batches += 1
        self.generated_batches += int(generated)

    def add_hidden(self, output: HiddenStateOutput, layer_names: list[str]) -> None:
        """Record one micro-batch's hidden-state loss: the total and one value per mapped layer."""
        n = output.num_tokens
        for name, value in zip(layer_names, output.layer_losses.detach().unbind(), strict=True):
            _add(self.hidden_sums, name, value, n)
        _add(self.hidden_sums, "hidden_loss", output.loss, n)
        self.hidden_tokens += n

    def add_teachers(self, per_teacher: dict[str, tuple[int, Tensor | float, Tensor | float]]) -> None:
        """Record several teachers' ``(tokens, KD, top-1 agreement)``: logged as ``kd_loss/<name>``, ...

        Each is a mean over the tokens that teacher taught (its routed rows, or all of them in a mixture).
        """
        for name, (tokens, kd, agreement) in per_teacher.items():
            for key, value in ((f"kd_loss/{name}", kd), (f"top1_agreement/{name}", agreement),
                               (f"tokens/{name}", 1.0)):  # fmt: skip
                _add(self.teacher_sums, key, value, tokens)

    def pop(self, reduce_sum: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """The metrics since the last call (summed over processes by ``reduce_sum``), then reset.

        The only host-device sync of the metrics: every sum goes to the host in one transfer.
        """
        names = sorted(self.sums)
        hidden_names = sorted(self.hidden_sums)  # the same on every process: one layer map per run
        teacher_names = sorted(self.teacher_sums)
        values = (
            [self.sums[name] for name in names]
            + [self.hidden_sums[name] for name in hidden_names]
            + [self.teacher_sums[name] for name in teacher_names]
            + [torch.as_tensor(self.input_tokens)]
        )
        device, dtype = values[0].device, values[0].dtype
        on_host = torch.stack([v.to(device, dtype) for v in values]).to("cpu", torch.float64)  # the one sync
        counts = [self.hidden_tokens, self.loss_tokens, self.micro_batches, self.generated_batches]
        totals = torch.cat([on_host, torch.tensor(counts, dtype=torch.float64)])
        if reduce_sum is not None:
            totals = reduce_sum(totals)
        *sums, input_tokens, hidden_tokens, loss_tokens, micro_batches, generated_batches = totals.tolist()
        sum_of = dict(zip(names, sums[: len(names)], strict=True))
        hidden_sums = sums[len(names) : len(names) + len(hidden_names)]
        teacher_values = dict(zip(teacher_names, sums[len(names) + len(hidden_names) :], strict=True))
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        ce_seen = sum_of.pop("ce_seen", 0.0)
        if not ce_seen:
            sum_of.pop("ce_loss", None)
        logs = {name: value / max(loss_tokens, 1) for name, value in sum_of.items()}
        logs.update(
            {name: value / max(hidden_tokens, 1) for name, value in zip(hidden_names, hidden_sums, strict=True)}
        )
        for key, value in teacher_values.items():
            if not key.startswith("tokens/"):
                logs[key] = value / max(teacher_values["tokens/" + key.split("/", 1)[1]], 1)
        if micro_batches:
            logs["tokens_per_second"] = input_tokens / elapsed
            logs["loss_tokens"] = loss_tokens if reduce_sum is not None else int(loss_tokens)
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
