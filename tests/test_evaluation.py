"""distill.evaluation: held-out KD metrics, pass@k, speed and cost, the report card and ``distill eval``."""

from __future__ import annotations

import copy
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill.data import prepare_dataset
from distill.evaluation import (
    HumanEvalPassAtK,
    ModelResult,
    SpeedResult,
    TaskMetric,
    cost_per_million_tokens,
    heldout_metrics,
    heldout_metrics_per_student,
    humaneval_problems,
    kept,
    mean_pass_at_k,
    measure_speed,
    pass_at_k,
    per_problem_pass_at_k,
    resolve_price,
    run_tasks,
    task_problem_scores,
    write_report,
)
from distill.evaluation import report as report_module
from distill.models import VocabularyMismatchError, parameter_bytes
from distill.testing import arithmetic_rows, tiny_llama

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- pass@k ---------------------------------------------------------------------------------------------------


def _comb_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # math.comb is 0 when k > n - c


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 25):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_comb_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    for n, c, k in [(200, 3, 1), (200, 3, 100), (200, 0, 50), (200, 150, 51), (1000, 1, 10)]:
        assert pass_at_k(n, c, k) == pytest.approx(_comb_pass_at_k(n, c, k), rel=1e-9, abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0  # nothing passed
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k: every draw of 3 holds a correct sample
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 is the pass rate
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_mean_pass_at_k_keeps_only_k_up_to_n():
    scores = mean_pass_at_k([1, 0, 3], 3, ks=[5, 2, 1])
    assert list(scores) == ["pass@1", "pass@2"]
    assert scores["pass@1"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert scores["pass@2"] == pytest.approx((_comb_pass_at_k(3, 1, 2) + 0 + 1) / 3)
    assert mean_pass_at_k([], 3, ks=[1]) == {}


# ---- pass@k end to end, in the sandbox -------------------------------------------------------------------------

WRONG_BODY = "    return None\n"


def test_humaneval_pass_at_k_runs_the_tests_in_the_sandbox():
    problems = humaneval_problems(task_ids=["HumanEval/0", "HumanEval/2", "HumanEval/4"])
    canonical = [p["canonical_solution"] for p in problems]
    answers = [[canonical[0], WRONG_BODY, WRONG_BODY], [WRONG_BODY] * 3, [canonical[2]] * 3]
    seen = []

    def sampler(model, tokenizer, prompts, n):
        seen.append((model, prompts, n))
        return answers

    task = HumanEvalPassAtK(problems, num_samples=3, ks=(1, 2, 10), sampler=sampler, workers=2)
    assert isinstance(task, TaskMetric)
    result = task.run("fake-model", None)
    assert seen == [("fake-model", [p["prompt"] for p in problems], 3)]
    assert result.num_correct == [1, 0, 3]
    assert result.task_ids == ["HumanEval/0", "HumanEval/2", "HumanEval/4"]
    assert result.scores == pytest.approx({"pass@1": (1 / 3 + 1) / 3, "pass@2": (2 / 3 + 1) / 3})
    assert result.sandbox["isolation"] == "strict" and {"userns", "landlock-fs"} <= set(result.sandbox["layers"])
    assert run_tasks("fake-model", None, [task]) == pytest.approx(
        {"humaneval/pass@1": (1 / 3 + 1) / 3, "humaneval/pass@2": (2 / 3 + 1) / 3}
    )
    # The per-problem scores the mean is over, kept for the report's intervals.
    assert result.per_problem["pass@1"] == pytest.approx([1 / 3, 0.0, 1.0])
    assert result.per_problem["pass@2"] == pytest.approx([2 / 3, 0.0, 1.0])
    assert task_problem_scores([task]) == {f"humaneval/{k}": v for k, v in result.per_problem.items()}


def test_pass_at_k_interval_over_problems():
    from distill.evaluation.stats import mean_interval, paired_score_difference

    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 6, (200,), generator=generator).tolist()  # 200 problems, 5 samples each
    per_problem = per_problem_pass_at_k(counts, 5, ks=(1, 5, 7))
    assert set(per_problem) == {"pass@1", "pass@5"}  # k above n is left out, as in the mean
    assert per_problem["pass@1"] == pytest.approx([pass_at_k(5, c, 1) for c in counts])
    assert mean_pass_at_k(counts, 5, ks=(1,))["pass@1"] == pytest.approx(sum(per_problem["pass@1"]) / 200)
    # The interval holds the mean and its width is near the normal approximation's 2 x 1.96 x sd / sqrt(n).
    scores = per_problem["pass@1"]
    interval = mean_interval(scores)
    assert interval.low < interval.mean < interval.high and interval.count == 200
    normal = 2 * 1.96 * torch.tensor(scores, dtype=torch.float64).std().item() / math.sqrt(200)
    assert interval.high - interval.low == pytest.approx(normal, rel=0.2)
    assert mean_interval([0.5, 0.5, 0.5]).high - mean_interval([0.5, 0.5, 0.5]).low == pytest.approx(0.0)
    assert math.isinf(mean_interval([1.0]).high) and mean_interval([1.0]).text() == "1.0000 (n=1)"
    # Paired over problems: equal scores are no difference; one model ahead on every problem is a clear one.
    same = paired_score_difference(scores, scores, "humaneval/pass@1")
    assert (same.difference, same.low, same.high, same.unit, same.num_rows) == (0.0, 0.0, 0.0, "problems", 200)
    assert not same.clear
    ahead = paired_score_difference([min(1.0, x + 0.1) for x in scores], scores, "humaneval/pass@1")
    assert ahead.clear and ahead.low > 0
    with pytest.raises(ValueError, match="problems"):
        paired_score_difference([1.0, 0.0], [1.0], "humaneval/pass@1")


def test_report_gives_pass_at_k_an_interval_and_a_paired_verdict(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "plots_unavailable", lambda: "off")
    teacher_scores = [1.0] * 15 + [0.0] * 5
    student_scores = [1.0] * 12 + [0.0] * 8
    baseline_scores = [1.0] * 11 + [0.0] * 9  # one problem apart from the student: noise on 20 problems
    teacher, student, baseline = (
        ModelResult(role, {"humaneval/pass@1": sum(s) / 20}, problem_scores={"humaneval/pass@1": s})
        for role, s in (("t", teacher_scores), ("s", student_scores), ("b", baseline_scores))
    )
    card = write_report(tmp_path, teacher, student, baseline)
    entry = card.data["kd_vs_baseline"]["humaneval/pass@1"]
    assert entry["better"] == "no clear difference" and entry["unit"] == "problems" and entry["num_rows"] == 20
    assert entry["interval_95"][0] < 0.05 < entry["interval_95"][1]
    interval = card.data["models"]["student"]["intervals_95"]["humaneval/pass@1"]
    assert interval["num_problems"] == 20 and interval["low"] < 0.6 < interval["high"]
    markdown = (tmp_path / "report.md").read_text()
    assert "0.6000 [" in markdown and "(n=20)" in markdown and "20 problems" in markdown
    # Without per-problem scores there is still no claim.
    scores = ({"humaneval/pass@1": value} for value in (0.75, 0.6, 0.55))
    plain = write_report(tmp_path / "plain", *(ModelResult(role, next(scores)) for role in "tsb"))
    assert plain.data["kd_vs_baseline"]["humaneval/pass@1"]["better"] == "not tested"


def test_humaneval_pass_at_k_with_a_real_model_generates_greedily(tokenizer):
    problems = humaneval_problems(first=1)
    model = tiny_llama(len(tokenizer))
    task = HumanEvalPassAtK(problems, num_samples=2, ks=(1, 2), temperature=0.0, max_new_tokens=6, timeout_s=5)
    result = task.run(model, tokenizer)
    assert len(result.completions) == 1 and len(result.completions[0]) == 2
    assert result.completions[0][0] == result.completions[0][1]  # greedy: one completion, repeated
    assert result.num_correct == [0] and result.scores == {"pass@1": 0.0, "pass@2": 0.0}
    assert model.training  # left as it was found


def test_humaneval_task_checks_its_settings():
    with pytest.raises(ValueError, match="No k"):
        HumanEvalPassAtK(humaneval_problems(first=1), num_samples=1, ks=(5,))
    with pytest.raises(KeyError, match="entry_point"):
        HumanEvalPassAtK([{"prompt": "def f():\n", "test": ""}])


# ---- held-out metrics ------------------------------------------------------------------------------------------


def _reference(student: nn.Module, teacher: nn.Module, tokenizer, rows, vocab_size: int) -> dict[str, float]:
    """KL, agreement and CEs from full float64 logits, one row at a time (no padding, no chunks)."""
    prepared, _ = prepare_dataset(rows, tokenizer, max_length=1024)
    totals = dict(kl=0.0, agree=0.0, student_ce=0.0, teacher_ce=0.0)
    count = 0
    for ids, labels in zip(prepared["input_ids"], prepared["labels"], strict=True):
        input_ids, targets = torch.tensor([ids]), torch.tensor(labels[1:])
        scored = targets != -100
        with torch.no_grad():
            s = student(input_ids=input_ids).logits[0, :-1][scored][:, :vocab_size].double().log_softmax(-1)
            t = teacher(input_ids=input_ids).logits[0, :-1][scored][:, :vocab_size].double().log_softmax(-1)
        targets = targets[scored]
        totals["kl"] += float((t.exp() * (t - s)).sum())
        totals["agree"] += float((s.argmax(-1) == t.argmax(-1)).sum())
        totals["student_ce"] += float(-s.gather(-1, targets[:, None]).sum())
        totals["teacher_ce"] += float(-t.gather(-1, targets[:, None]).sum())
        count += len(targets)
    return {key: value / count for key, value in totals.items()} | {"count": count}


@pytest.mark.parametrize("layout", ["messages", "prompt_completion", "text"])
def test_heldout_metrics_match_a_float64_reference(tokenizer, tiny_pair, layout):
    import datasets

    teacher, student = tiny_pair
    rows = datasets.Dataset.from_list(arithmetic_rows(7, seed=3, layout=layout))
    # Batches of 3 rows (padding), chunks of 5 tokens (many chunks per batch).
    metrics = heldout_metrics(student, teacher, tokenizer, rows, batch_size=3, chunk_size=5)
    reference = _reference(student, teacher, tokenizer, rows, len(tokenizer))
    assert metrics.num_rows == 7 and metrics.num_tokens == reference["count"] and metrics.vocab_size == 512
    assert metrics.forward_kl == pytest.approx(reference["kl"], rel=1e-4, abs=1e-6)
    assert metrics.top1_agreement == pytest.approx(reference["agree"], abs=1e-12)
    assert metrics.student_ce == pytest.approx(reference["student_ce"], rel=1e-5)
    assert metrics.teacher_ce == pytest.approx(reference["teacher_ce"], rel=1e-5)
    assert metrics.student_perplexity == pytest.approx(math.exp(reference["student_ce"]), rel=1e-5)
    assert teacher.training and student.training  # modes restored


def test_heldout_metrics_per_student_runs_the_teacher_once_and_matches_one_at_a_time(tokenizer, tiny_pair):
    teacher, student = tiny_pair
    other = copy.deepcopy(student)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    rows = arithmetic_rows(6, seed=5)
    calls = []
    hook = teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        both = heldout_metrics_per_student({"a": student, "b": other}, teacher, tokenizer, rows, batch_size=4)
    finally:
        hook.remove()
    assert len(calls) == 2  # 6 rows in batches of 4: one teacher pass per batch, not per student
    assert list(both) == ["a", "b"] and both["a"].student_ce != both["b"].student_ce
    for name, model in (("a", student), ("b", other)):
        alone = heldout_metrics(model, teacher, tokenizer, rows, batch_size=4)
        assert both[name] == alone
    with pytest.raises(ValueError, match="at least one student"):
        heldout_metrics_per_student({}, teacher, tokenizer, rows)


def test_heldout_metrics_of_a_model_against_itself(tokenizer, tiny_pair):
    teacher, _ = tiny_pair
    metrics = heldout_metrics(teacher, teacher, tokenizer, arithmetic_rows(4), max_rows=2)
    assert metrics.num_rows == 2
    assert metrics.forward_kl == pytest.approx(0.0, abs=1e-6) and metrics.top1_agreement == 1.0
    assert metrics.student_ce == pytest.approx(metrics.teacher_ce)


class FixedLogits(nn.Module):
    """A stand-in LM whose logits at every position are one fixed vector (no decoder to split off)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.register_buffer("row", torch.tensor(logits))
        self.anchor = nn.Parameter(torch.zeros(()))  # so the model has a device
        self.config = SimpleNamespace(vocab_size=len(logits))

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1).clone())


def test_heldout_metrics_by_hand_with_fixed_logits_and_padded_heads(tokenizer):
    import datasets

    vocab, head_rows = len(tokenizer), len(tokenizer) + 8
    # Teacher: logit 2 on token 0; student: logit 1 on token 1; zero elsewhere. Padding rows past the
    # tokenizer hold huge logits, which must be ignored (renormalised over the 512 shared tokens).
    teacher_row, student_row = [0.0] * head_rows, [0.0] * head_rows
    teacher_row[0], student_row[1] = 2.0, 1.0
    for row in range(vocab, head_rows):
        teacher_row[row] = student_row[row] = 50.0
    rows = datasets.Dataset.from_list(arithmetic_rows(3, layout="prompt_completion"))
    metrics = heldout_metrics(FixedLogits(student_row), FixedLogits(teacher_row), tokenizer, rows, chunk_size=4)

    log_zt, log_zs = math.log(math.exp(2) + vocab - 1), math.log(math.e + vocab - 1)
    teacher_logp = [2 - log_zt] + [-log_zt] * (vocab - 1)
    student_logp = [-log_zs, 1 - log_zs] + [-log_zs] * (vocab - 2)
    kl = sum(math.exp(t) * (t - s) for t, s in zip(teacher_logp, student_logp, strict=True))
    prepared, _ = prepare_dataset(rows, tokenizer, max_length=1024)
    targets = [label for labels in prepared["labels"] for label in labels[1:] if label != -100]
    assert metrics.num_tokens == len(targets)
    assert metrics.forward_kl == pytest.approx(kl, rel=1e-5)
    assert metrics.top1_agreement == 0.0  # teacher picks token 0, student token 1
    assert metrics.teacher_ce == pytest.approx(sum(-teacher_logp[t] for t in targets) / len(targets), rel=1e-6)
    assert metrics.student_ce == pytest.approx(sum(-student_logp[t] for t in targets) / len(targets), rel=1e-6)


def test_heldout_metrics_refuse_a_head_smaller_than_the_tokenizer(tokenizer):
    small = FixedLogits([0.0] * (len(tokenizer) - 1))
    with pytest.raises(VocabularyMismatchError, match="rows"):
        heldout_metrics(small, small, tokenizer, arithmetic_rows(2))


# ---- speed and cost --------------------------------------------------------------------------------------------


def test_cost_per_million_tokens_and_price_resolution():
    assert cost_per_million_tokens(3.6, 1000.0) == pytest.approx(1.0)  # $3.60/h at 1000 tok/s -> $1 per 1M
    assert resolve_price(2.5) == 2.5 and resolve_price() is None
    with pytest.raises(ValueError):
        cost_per_million_tokens(1.0, 0.0)
    with pytest.raises(ValueError):
        resolve_price(-1.0)


def test_gpu_price_comes_from_the_planning_catalogue():
    from distill.planning import get_gpu

    assert resolve_price(gpu="h100") == get_gpu("H100-80GB").hourly_usd > 0
    assert resolve_price(3.0, gpu="h100") == 3.0  # an explicit price wins
    with pytest.raises(ValueError, match="price"):
        resolve_price(gpu="Z9000")


def test_measure_speed_on_a_tiny_model(tokenizer):
    from distill.evaluation.memory import status_bytes

    model = tiny_llama(len(tokenizer))
    speed = measure_speed(model, tokenizer, batch_size=3, new_tokens=5, repeats=4, price_per_hour=3.6)
    assert speed.batch_size == 3 and speed.new_tokens == 5 and speed.device == "cpu"
    # Each timed run is kept; the headline rate is their median, and the runs add up to the time measured.
    assert len(speed.run_tokens_per_s) == 4 and speed.seconds == pytest.approx(
        sum(15 / r for r in speed.run_tokens_per_s)
    )
    ordered = sorted(speed.run_tokens_per_s)
    assert speed.tokens_per_s == pytest.approx((ordered[1] + ordered[2]) / 2)
    assert speed.spread.low == ordered[0] and speed.spread.high == ordered[-1] and speed.spread.count == 4
    assert speed.parameter_bytes == parameter_bytes(model)
    # The model's own memory: its weights plus what generating added, not the process (torch alone is ~300 MB).
    assert speed.activation_bytes is not None and speed.activation_bytes >= 0
    assert speed.peak_memory_bytes == speed.parameter_bytes + speed.activation_bytes
    assert speed.peak_memory_bytes < status_bytes("VmRSS") / 4
    assert speed.cost_per_million_tokens == pytest.approx(1000.0 / speed.tokens_per_s)
    assert model.training
    assert speed.as_dict()["tokens_per_s_min"] == ordered[0]


def test_speed_headline_says_when_the_runs_overlap(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "plots_unavailable", lambda: "off")
    teacher = ModelResult("t", {"ce": 1.0}, tokens_per_s=100.0, run_tokens_per_s=[90.0, 100.0, 110.0])
    clear = ModelResult("s", {"ce": 1.0}, tokens_per_s=200.0, run_tokens_per_s=[190.0, 200.0, 230.0])
    card = write_report(tmp_path, teacher, clear)
    assert card.headline.endswith("2.00x faster (1.73-2.56x over 3+ timed runs each).")
    assert card.data["speedup_range"] == pytest.approx([190 / 110, 230 / 90])
    # The issue's case: one noisy run made a 118x "speed-up"; with the runs' range overlapping, no claim.
    noisy = ModelResult("s", {"ce": 1.0}, tokens_per_s=105.0, run_tokens_per_s=[60.0, 105.0, 11800.0])
    assert "no clear speed difference (speed ratio 0.55-131.11" in write_report(tmp_path, teacher, noisy).headline
    slower = ModelResult("s", {"ce": 1.0}, tokens_per_s=50.0, run_tokens_per_s=[45.0, 50.0, 55.0])
    assert "2.00x slower (1.64-2.44x over 3+ timed runs each)" in write_report(tmp_path, teacher, slower).headline


# ---- how sure a comparison is -----------------------------------------------------------------------------------


def test_paired_bootstrap_interval_and_verdicts():
    from distill.evaluation.stats import paired_difference, spread

    # The case: 8 rows, top-1 agreement 0.002 apart, rows that vary far more than that: no clear winner.
    a = _row_sums(rows=8, tokens=50, jitter=0.1, top1_agreement=0.502)
    b = _row_sums(rows=8, tokens=50, jitter=-0.1, top1_agreement=0.500)
    small = paired_difference(a, b, "top1_agreement")
    assert small.difference == pytest.approx(0.002) and small.low < 0 < small.high and not small.clear
    assert (small.num_rows, small.num_tokens, small.resamples) == (8, 400, 2000)
    assert paired_difference(a, b, "top1_agreement") == small  # seeded: the same interval every time
    # The same rows with a large gap: the interval excludes 0.
    big = paired_difference(
        _row_sums(rows=8, tokens=50, jitter=0.1, ce=1.0), _row_sums(rows=8, tokens=50, ce=2.0), "ce"
    )
    assert big.clear and big.high < 0 and big.low <= -1.0 <= big.high
    ppl = paired_difference(_row_sums(ce=1.0), _row_sums(ce=2.0), "perplexity")
    assert ppl.difference == pytest.approx(math.e - math.e**2) and ppl.clear
    with pytest.raises(ValueError, match="same rows"):
        paired_difference(_row_sums(rows=4, ce=1.0), _row_sums(rows=6, ce=1.0), "ce")
    with pytest.raises(ValueError, match="per-row"):
        paired_difference(a, b, "humaneval/pass@1")
    runs = spread([3.0, 1.0, 2.0, 10.0])
    assert (runs.median, runs.low, runs.high, runs.count) == (2.5, 1.0, 10.0, 4)
    assert runs.text() == "2.5 (min-max 1.0-10.0, n=4)" and spread([7.0]).text() == "7.0 (n=1)"


def test_report_says_no_clear_difference_when_the_interval_holds_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "plots_unavailable", lambda: "off")
    teacher = ModelResult("t", {"ce": 1.0, "top1_agreement": 1.0})
    student = ModelResult("s", {"ce": 1.5, "top1_agreement": 0.502},
                          row_sums=_row_sums(jitter=0.1, ce=1.5, top1_agreement=0.502))  # fmt: skip
    baseline = ModelResult("b", {"ce": 1.5, "top1_agreement": 0.500},
                           row_sums=_row_sums(jitter=-0.1, ce=1.5, top1_agreement=0.500))  # fmt: skip
    card = write_report(tmp_path, teacher, student, baseline)
    assert card.data["kd_vs_baseline"]["top1_agreement"]["better"] == "no clear difference"
    markdown = (tmp_path / "report.md").read_text()
    assert "no clear difference on `ce` (" in markdown and "kd better" not in markdown


def test_heldout_row_sums_add_up_to_the_means_in_the_rows_order(tokenizer, tiny_pair):
    teacher, student = tiny_pair
    rows = arithmetic_rows(5, layout="prompt_completion")
    metrics = heldout_metrics(student, teacher, tokenizer, rows, batch_size=2)
    sums = metrics.row_sums
    assert len(sums["tokens"]) == 5 and sum(sums["tokens"]) == metrics.num_tokens
    assert sum(sums["ce"]) / metrics.num_tokens == pytest.approx(metrics.student_ce, rel=1e-9)
    assert sum(sums["teacher_ce"]) / metrics.num_tokens == pytest.approx(metrics.teacher_ce, rel=1e-9)
    assert sum(sums["kl"]) / metrics.num_tokens == pytest.approx(metrics.forward_kl, rel=1e-9)
    # Rows come back in the order given, whatever order they were batched in (by length).
    reversed_sums = heldout_metrics(student, teacher, tokenizer, rows[::-1], batch_size=2).row_sums
    assert reversed_sums["ce"] == pytest.approx(sums["ce"][::-1], rel=1e-5)
    assert reversed_sums["tokens"] == sums["tokens"][::-1]
    assert "row_sums" not in metrics.as_dict() and set(metrics.student_row_sums()) == {
        "tokens",
        "ce",
        "kl",
        "top1_agreement",
    }


# ---- the report card -------------------------------------------------------------------------------------------


def _entries(with_history: bool = True) -> tuple[ModelResult, ModelResult, ModelResult]:
    history = [{"step": s, "loss": 2.0 / s, "kd_loss": 1.5 / s, "ce_loss": 3.0 / s} for s in range(1, 6)]
    teacher = ModelResult(
        "big-teacher",
        {"ce": 1.0, "perplexity": math.e, "kl": 0.0, "top1_agreement": 1.0, "humaneval/pass@1": 0.5},
        parameter_bytes=4_000_000,
        tokens_per_s=100.0,
        peak_memory_bytes=9_000_000,
        price_per_hour=2.0,
    )
    student = ModelResult.from_results(
        "kd-student",
        {"ce": 1.5, "perplexity": math.exp(1.5), "kl": 0.3, "top1_agreement": 0.7, "humaneval/pass@1": 0.4},
        speed=SpeedResult(400.0, 1_000_000, 3_000_000, "cpu", 8, 64, 1.28, price_per_hour=2.0),
        log_history=history if with_history else None,
        row_sums=_row_sums(ce=1.5, kl=0.3, top1_agreement=0.7),
    )
    baseline = ModelResult(
        "plain-student",
        {"ce": 1.8, "perplexity": math.exp(1.8), "kl": 0.5, "top1_agreement": 0.6, "humaneval/pass@1": 0.45},
        parameter_bytes=1_000_000,
        tokens_per_s=400.0,
        price_per_hour=2.0,
        log_history=[{**entry, "kd_loss": 0.0} for entry in history] if with_history else None,
        row_sums=_row_sums(jitter=-0.05, ce=1.8, kl=0.5, top1_agreement=0.6),  # rows vary the other way
    )
    return teacher, student, baseline


def _row_sums(rows: int = 8, tokens: int = 10, jitter: float = 0.05, **means: float) -> dict[str, list[float]]:
    """Per-row sums whose token-weighted means are ``means``; rows differ by +-``jitter`` per token around them."""
    signs = [(-1) ** row for row in range(rows)]  # an even count: the jitter cancels in the mean
    sums = {key: [tokens * (mean + jitter * sign) for sign in signs] for key, mean in means.items()}
    return {"tokens": [float(tokens)] * rows, **sums}


def test_report_card_headline_numbers_and_files(tmp_path):
    teacher, student, baseline = _entries()
    card = write_report(tmp_path / "report", teacher, student, baseline)
    assert card.headline == (
        "The student keeps 80.0% of the teacher's quality at 25.0% of its size, 4.00x faster, "
        "$1.39 per million tokens instead of $5.56."
    )
    out = tmp_path / "report"
    assert sorted(p.name for p in card.files) == sorted(
        ["report.md", "report.json", "training_curves.png", "quality_vs_cost.png"]
    )
    for png in ("training_curves.png", "quality_vs_cost.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)

    data = json.loads((out / "report.json").read_text())
    assert data["headline"] == card.headline and data["primary_metric"] == "humaneval/pass@1"
    assert data["quality_kept"] == pytest.approx(0.8) and data["size_ratio"] == pytest.approx(0.25)
    assert data["speedup"] == pytest.approx(4.0)
    assert data["student_cost_per_million_tokens"] == pytest.approx(2.0 / (400 * 3600) * 1e6)
    assert data["teacher_cost_per_million_tokens"] == pytest.approx(2.0 / (100 * 3600) * 1e6)
    assert data["models"]["student"]["kept"]["ce"] == pytest.approx(math.exp(-0.5))  # exp(CE_t - CE_s)
    assert data["models"]["student"]["kept"]["perplexity"] == pytest.approx(math.exp(-0.5))
    assert data["models"]["student"]["kept"]["kl"] is None
    comparison = data["kd_vs_baseline"]
    assert comparison["ce"]["kd_minus_baseline"] == pytest.approx(-0.3) and comparison["ce"]["better"] == "kd"
    assert comparison["ce"]["num_rows"] == 8 and comparison["ce"]["num_tokens"] == 80
    low, high = comparison["ce"]["interval_95"]
    assert low <= -0.3 <= high < 0  # the rows' jitter is the same for both models: a tight interval
    # A task score without per-problem scores gets no verdict: its 0.05 difference may be noise.
    assert comparison["humaneval/pass@1"] == {"kd_minus_baseline": pytest.approx(-0.05), "better": "not tested"}
    assert comparison["top1_agreement"]["better"] == "kd" and comparison["kl"]["better"] == "kd"
    assert data["plots_skipped"] is None and "exp(-CE)" in data["metric_definitions"]["ce"]

    markdown = (out / "report.md").read_text()
    assert card.headline in markdown and "![training curves](training_curves.png)" in markdown
    row = "| `humaneval/pass@1` | fraction | 0.5000 | 0.4000 | 0.4500 | 80.0% | 90.0% | -0.0500 (not tested) |"
    assert row in markdown
    assert "`ce` (-0.3, 95% CI [" in markdown and "8 rows / 80 tokens" in markdown


def test_report_card_without_matplotlib_or_speed(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "plots_unavailable", lambda: "matplotlib is not installed")
    teacher = ModelResult("t", {"ce": 2.0, "kl": 0.0})
    student = ModelResult("s", {"ce": 2.5, "kl": 0.4})
    card = write_report(tmp_path, teacher, student)
    assert card.headline == f"The student keeps {math.exp(-0.5):.1%} of the teacher's quality."
    assert card.plots_skipped == "matplotlib is not installed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    assert "Plots skipped: matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["kd_vs_baseline"] is None
    assert json.loads((tmp_path / "report.json").read_text())["sandbox"] is None
    write_report(tmp_path, teacher, student, sandbox={"isolation": "weak", "layers": ["rlimits"]})
    assert json.loads((tmp_path / "report.json").read_text())["sandbox"]["isolation"] == "weak"
    assert "with **weak** isolation (rlimits)" in (tmp_path / "report.md").read_text()


def test_report_headline_leaves_out_what_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "plots_unavailable", lambda: "off")
    teacher = ModelResult("t", {"ce": 1.0, "kl": 0.0, "qa/exact": 0.5}, tokens_per_s=100.0)
    student = ModelResult("s", {"ce": 1.0, "kl": 0.1, "qa/exact": 0.25}, tokens_per_s=50.0)
    card = write_report(tmp_path, teacher, student)  # a task score beats ce; no sizes, no prices
    assert card.headline == "The student keeps 50.0% of the teacher's quality, 2.00x slower."
    by_ce = write_report(tmp_path, teacher, student, primary_metric="ce")
    assert by_ce.headline.startswith("The student keeps 100.0%")
    with pytest.raises(ValueError, match="against the teacher"):
        write_report(tmp_path, teacher, student, primary_metric="kl")


def test_kept_per_metric():
    assert kept("humaneval/pass@1", 0.3, 0.6) == pytest.approx(0.5)
    assert kept("humaneval/pass@1", 0.3, 0.0) is None
    assert kept("ce", 2.0, 1.0) == pytest.approx(math.exp(-1.0))
    assert kept("perplexity", 4.0, 2.0) == pytest.approx(0.5)
    assert kept("bits_per_byte", 2.5, 1.0) == pytest.approx(2.0**-1.5)
    assert kept("top1_agreement", 0.5, 1.0) is None


# ---- distill eval ----------------------------------------------------------------------------------------------


def test_distill_eval_cli_writes_the_report(tmp_path, tokenizer, capsys):
    from distill.cli import main

    paths = {}
    for name, (hidden, layers, seed) in {"teacher": (64, 2, 0), "student": (32, 1, 1), "baseline": (32, 1, 2)}.items():
        model = tiny_llama(len(tokenizer), hidden_size=hidden, num_layers=layers, intermediate_size=64, seed=seed)
        paths[name] = tmp_path / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    history = {"log_history": [{"step": 1, "loss": 3.0, "kd_loss": 2.0, "ce_loss": 4.0}]}
    (paths["student"] / "trainer_state.json").write_text(json.dumps(history))
    dataset = tmp_path / "heldout.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_rows(6, layout="prompt_completion")))

    argv = ["eval", "--student", str(paths["student"]), "--teacher", str(paths["teacher"])]
    argv += ["--baseline", str(paths["baseline"]), "--dataset", str(dataset), "--max-rows", "4"]
    argv += ["--humaneval", "1", "--samples", "1", "--k", "1,5", "--max-new-tokens", "4"]
    argv += ["--price-per-hour", "2.5", "--speed-batch-size", "2", "--speed-new-tokens", "3", "--speed-repeats", "3"]
    argv += ["--out"]
    assert main([*argv, str(tmp_path / "out")]) == 0

    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert printed.startswith(data["headline"]) and "| `kl` |" in printed
    # Random tiny models solve nothing, so the headline falls back from pass@1 (no ratio) to cross-entropy.
    assert data["models"]["teacher"]["metrics"]["humaneval/pass@1"] == 0.0 and data["primary_metric"] == "ce"
    student = data["models"]["student"]
    assert set(student["metrics"]) == {"ce", "perplexity", "kl", "top1_agreement", "humaneval/pass@1"}
    assert student["price_per_hour"] == 2.5 and student["cost_per_million_tokens"] > 0
    assert data["models"]["teacher"]["metrics"]["kl"] == 0.0 and "baseline" in data["models"]
    assert sorted(data["plots"]) == ["quality_vs_cost.png", "training_curves.png"]
    assert (tmp_path / "out" / "report.md").exists()
    # Three timed runs each, kept; every KD-vs-baseline verdict on held-out metrics has its interval and sample size.
    assert len(student["run_tokens_per_s"]) == 3 and student["tokens_per_s"] == sorted(student["run_tokens_per_s"])[1]
    assert (
        data["speedup_range"] is not None and data["speedup_range"][0] <= data["speedup"] <= data["speedup_range"][1]
    )
    for metric in ("ce", "kl", "top1_agreement"):
        entry = data["kd_vs_baseline"][metric]
        assert entry["num_rows"] == 4 and entry["num_tokens"] > 0 and len(entry["interval_95"]) == 2
    # pass@1 is compared over problems; one problem says nothing either way.
    pass1 = data["kd_vs_baseline"]["humaneval/pass@1"]
    assert (pass1["better"], pass1["unit"], pass1["num_rows"]) == ("no clear difference", "problems", 1)


def test_distill_eval_cli_fails_fast_on_a_missing_dataset(tmp_path, capsys):
    from distill.cli import main

    out = tmp_path / "out"

    # Bad input ends the command with one line and exit code 2 (distill.cli), before any model loads.
    assert main(["eval", "--student", "x", "--teacher", "y", "--dataset", str(tmp_path / "no.jsonl"),
                 "--out", str(out)]) == 2  # fmt: skip
    assert "no such file or folder" in capsys.readouterr().err
    assert not out.exists()


def test_eval_stages_show_rate_and_eta(tokenizer, tiny_pair, capsys):
    teacher, student = tiny_pair
    heldout_metrics(student, teacher, tokenizer, arithmetic_rows(3), batch_size=2)
    measure_speed(student, tokenizer, batch_size=1, new_tokens=2, repeats=2)
    bars = capsys.readouterr().err
    # tqdm's "[elapsed<remaining, rate]": the rate is "row/s", or "s/row" when a row takes more than a second.
    assert re.search(r"Held-out metrics: 100%.*3/3 \[\d\d:\d\d<\d\d:\d\d,\s*[\d.]+(row/s|s/row)\]", bars)
    assert re.search(r"Timing generation: 100%.*3/3 \[\d\d:\d\d<\d\d:\d\d,\s*[\d.]+(run/s|s/run)\]", bars)
    heldout_metrics(student, teacher, tokenizer, arithmetic_rows(3), progress=False)
    measure_speed(student, tokenizer, batch_size=1, new_tokens=2, repeats=1, progress=False)
    quiet = capsys.readouterr().err  # (the datasets library's own "Tokenizing" bar may be there)
    assert "Held-out metrics" not in quiet and "Timing generation" not in quiet


def test_training_curves_draw_identical_series_once_under_both_names(tmp_path):
    from distill.evaluation.plots import _merge_identical, plot_training_curves

    same = [(1, 3.7), (2, 3.6)]
    merged = _merge_identical({"loss": same, "kd_loss": [(1, 0.9), (2, 0.8)], "ce_loss": list(same)})
    assert merged == [(["loss", "ce_loss"], same), (["kd_loss"], [(1, 0.9), (2, 0.8)])]
    history = [{"step": s, "loss": v, "ce_loss": v} for s, v in same]
    assert plot_training_curves(tmp_path / "curves.png", {"baseline": history})
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
