"""`distill.Trainer`: a `transformers.Trainer` whose loss is the distillation loss from a teacher.

The trainer orchestrates; it owns no math. One step reads top to bottom as the data flows:
(maybe generate completions) -> student decoder -> final hidden states -> teacher targets for the
same tokens -> fused loss over token chunks -> backward. Neither model's ``[tokens x vocab]``
logits exist at once on the default (fused) path.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
import transformers
from torch import Tensor, nn

from distill import transformers_compat
from distill.config import DistillConfig
from distill.data import DistillCollator
from distill.data.collator import NUM_INPUT_TOKENS_KEY
from distill.losses import (
    DistillationOutput,
    NonFiniteInputError,
    TeacherHead,
)
from distill.losses.dense import dense_objective_loss
from distill.losses.fused import fused_objective_loss
from distill.models import (
    check_tokenizers_match,
    eos_token_ids,
    load_causal_lm,
    resolve_dtype,
)
from distill.models.decoder import final_hidden_states, full_logits, output_head_of
from distill.models.merge import is_adapter_folder, load_snippet
from distill.teachers import ModelTeacher, Teacher, TeacherTargets, catch_layer_outputs
from distill.teachers.server import ServerError
from distill.teachers.sharding import (
    broadcast_from_rank0,
    fill_shards_from,
    head_unsharded_through_loss,
    is_quantized_model,
    ram_efficient_loading,
    shard_teacher,
    student_head,
    whole_weights,
)
from distill.trainer.accumulation import (
    HIDDEN_TOKENS_KEY,
    LOSS_TOKENS_KEY,
    StepTokens,
    check_counted,
    count_tokens,
    step_tokens,
)
from distill.trainer.agreement import RankFailures, describe
from distill.trainer.batching import GENERATED_KEY, completion_batch, next_token_labels
from distill.trainer.checkpoints import check_resume_settings, remove_incomplete, resolve_resume, write_marker
from distill.trainer.cross_tokenizer import CrossTokenizer, uses_cross_tokenizer
from distill.trainer.hidden import PROJECTIONS_FILE, HiddenDistillation, build_hidden_distillation, hidden_token_mask
from distill.trainer.metrics import KDMetrics
from distill.trainer.model_card import card_for_trainer, describe_data, write_model_card
from distill.trainer.multi_teacher import TeacherEnsemble, named_teachers
from distill.trainer.preemption import SigtermCheckpoint, TrainingPreempted
from distill.trainer.prefetch import PREFETCHED_KEY, TargetPrefetcher
from distill.trainer.setup import (
    checked_args,
    may_shard_teacher,
    pick_teacher,
    prepare_splits,
    prepared_student,
    resolve_teacher,
    rows_to_check,
    shared_vocabulary,
    student_and_teacher_tokenizers,
    teacher_device,
)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good weights were saved before this was raised."""


# What _stop_together raises: (headline with {step}, what to do).
_NONFINITE = (
    "Non-finite distillation loss at optimizer step {step}",
    "Common causes: fp16 overflow (use bf16), a learning rate too high, a teacher giving NaN logits. Resume with "
    "trainer.train(resume_from_checkpoint=True) after fixing it.",
)
_SERVER_FAILED = (
    "The teacher server failed at optimizer step {step} after its retries",
    "Restart the server (or point the ServerTeacher at another), then resume with "
    "trainer.train(resume_from_checkpoint=True): no step is lost or repeated.",
)


class Trainer(transformers.Trainer):
    """Distil a teacher into a student, with everything ``transformers.Trainer`` does.

    Args:
        model: the student: a ``PreTrainedModel`` or a path / hub name (loaded in
            ``args.student_dtype``).
        teacher: a ``PreTrainedModel`` (frozen and wrapped in :class:`~distill.teachers.ModelTeacher`),
            a path / hub name (loaded with ``args.teacher_dtype`` / ``teacher_quantization`` /
            ``teacher_device``), or any :class:`~distill.teachers.Teacher`; or several of these as a list or a
            ``{name: teacher}`` dict (see :mod:`distill.trainer.multi_teacher`). ``teacher_model=`` (TRL's name)
            is the same argument; without either, ``args.teacher_model_name_or_path``.
        args: a :class:`~distill.DistillConfig`.
        train_dataset, eval_dataset: ``datasets.Dataset`` with ``messages``, ``prompt``/``completion``,
            ``text`` or ``input_ids`` rows (see :mod:`distill.data`); checked and tokenized here, so
            bad rows fail before any training.
        processing_class: the student's tokenizer (loaded from ``model`` when that is a path).
        teacher_processing_class: the teacher's tokenizer, checked to be the student's (loaded from
            ``teacher`` when that is a path); with ``args.cross_tokenizer="auto"`` a different one is aligned
            instead (docs/cross_tokenizer.md). A list or dict, one per teacher, for several teachers.
        peft_config: a ``peft`` config (e.g. ``LoraConfig``) to train adapters instead of the full
            student; required for a 4-bit / 8-bit student (QLoRA).
        kwargs: passed to ``transformers.Trainer`` (``callbacks``, ``optimizers``, ...).
    """

    # Each micro-batch's loss is already its token-weighted share of the step (distill.trainer.accumulation).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module | str,
        teacher: nn.Module | Teacher | str | None = None,
        args: DistillConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        teacher_processing_class: Any = None,
        peft_config: Any = None,
        data_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        # Everything that can be checked without the weights is checked before loading them: a bad row
        # or a mismatched tokenizer costs seconds, not a model load (or a run).
        args = checked_args(args, model)
        teacher = self._pick_teacher(teacher, kwargs.pop("teacher_model", None), args)
        tokenizer, teacher_tokenizer = student_and_teacher_tokenizers(
            model, teacher, processing_class, teacher_processing_class, args
        )
        teachers, teacher_tokenizers = self._set_up_teacherstudent_and_teacher_tokenizers(
            teacher, teacher_tokenizer, tokenizer, args
        )
        prepared = self._prepare_data(args, tokenizer, train_dataset, eval_dataset)
        if isinstance(model, str):
            model = load_causal_lm(model, dtype=resolve_dtype(args.student_dtype), **args.load_kwargs("student"))
        self._resolve_teachers(teachers, teacher_tokenizers, model, args, prepared)
        model = prepared_student(model, peft_config, args)
        # Intermediate-layer distillation: layer map and projections now (a teacher without hidden states refuses).
        self.hidden: HiddenDistillation | None = build_hidden_distillation(model, self.teacher, args)
        self._bind_vocabulary(model, tokenizer, args)
        self._preemption = SigtermCheckpoint(self._ranks_with) if args.save_on_sigterm else None
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if self._preemption is not None:
            callbacks.append(self._preemption)
        # transformers 4.x reads it from the environment when building the Accelerator.
        transformers_compat.point_mixed_precision_at(args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator if data_collator is not None else self._default_collator(tokenizer),
            train_dataset=prepared["train"],
            eval_dataset=prepared["eval"],
            processing_class=tokenizer,
            callbacks=callbacks,
            **kwargs,
        )
        # The engine must not count items nor rescale: get_batch_samples counts the step's tokens itself.
        self.model_accepts_loss_kwargs = False
        self._failures = RankFailures(self.accelerator)
        self._place_teacher(args)
        if self.hidden is not None:
            self.hidden.to(args.device)
        self._train_metrics, self._eval_metrics = KDMetrics(), KDMetrics()
        self._micro_step, self._micro_step_of = 0, -1
        self._eos_token_ids = eos_token_ids(tokenizer, model)
        self._prefetcher: TargetPrefetcher | None = None

    # ---- setup --------------------------------------------------------------------------------------

    def _pick_teacher(self, teacher: Any, teacher_model: Any, args: DistillConfig) -> Any:
        """The one teacher argument (see :func:`~distill.trainer.setup.pick_teacher`), checked against ``args``
        when it is already a :class:`Teacher` (e.g. a cache: no generation, no packing)."""
        teacher = pick_teacher(teacher, teacher_model, args)
        self._teacher_given = teacher  # for the model card: a name or path names the teacher best
        if isinstance(teacher, Teacher):
            teacher.check_config(args)
            teacher.check_objective(args.objective(None))
        return teacher

    def _set_up_teacherstudent_and_teacher_tokenizers(
        self, teacher: Any, teacher_tokenizer: Any, tokenizer: Any, args: DistillConfig
    ) -> tuple[list[Any], list[Any]]:
        """Several teachers (``self.ensemble``), a teacher with another tokenizer (``self.cross``), or one
        checked to share the student's; returns the teachers and their tokenizers as lists (one for one)."""
        self.cross: CrossTokenizer | None = None
        self.ensemble: TeacherEnsemble | None = None
        if not isinstance(teacher, list | tuple | dict):
            teachers, teacher_tokenizers = [teacher], [teacher_tokenizer]
        else:
            names, teachers, teacher_tokenizers = named_teachers(teacher, teacher_tokenizer)
            if len(teachers) > 1:
                self.ensemble = TeacherEnsemble(names, teacher_tokenizers, tokenizer, args)
        if self.ensemble is None and teacher_tokenizers[0] is not None:
            if uses_cross_tokenizer(args, tokenizer, teacher_tokenizers[0]):
                self.cross = CrossTokenizer(tokenizer, teacher_tokenizers[0], args)
            else:
                check_tokenizers_match(tokenizer, teacher_tokenizers[0])
        return teachers, teacher_tokenizers

    def _prepare_data(self, args: DistillConfig, tokenizer: Any, train: Any, evaluation: Any) -> dict[str, Any]:
        """Both splits checked and tokenized, with each teacher's own columns when its tokenizer differs."""
        prepared, self.data_reports = prepare_splits(args, tokenizer, train, evaluation)
        self._data_description = describe_data(train, self.data_reports.get("train"))
        for split, raw in (("train", train), ("eval", evaluation)):
            if prepared[split] is not None and self.cross is not None:
                prepared[split] = self.cross.add_teacher_columns(prepared[split], raw)
            elif prepared[split] is not None and self.ensemble is not None:
                prepared[split] = self.ensemble.add_columns(prepared[split], raw)
        return prepared

    def _resolve_teachers(
        self,
        teachers: list[Any],
        tokenizers: list[Any],
        model: nn.Module,
        args: DistillConfig,
        prepared: dict[str, Any],
    ) -> None:
        """``self.teacher`` (and ``self.teachers`` for several) as :class:`Teacher` objects, each checked on the rows
        it will see. A model teacher that may be sharded stays on the CPU (or meta) until :meth:`_place_teacher`."""
        # A Teacher object given as such stays where its owner put it (as before); models distill wraps may wait.
        defer = may_shard_teacher(args) and not isinstance(teachers[0], Teacher)
        empty = defer and ram_efficient_loading() and args.process_index != 0  # its shards come from rank 0
        self.teacher = resolve_teacher(teachers[0], model, args, tokenizers[0], place=not defer, empty=empty)
        self._teacher_built_empty = empty
        self._teacher_device = teacher_device(teachers[0], args) if defer else None
        if self.ensemble is not None:
            self._resolve_ensemble(teachers, tokenizers, model, args, prepared)
            return
        # Teachers with limits (a cache: its rows and loss positions; sampled targets: the forward KL) refuse now.
        self.teacher.check_objective(args.objective(None))
        if self.cross is not None:
            self.cross.check_teacher(self.teacher)
        for split in ("train", "eval"):
            if prepared[split] is not None:
                rows = prepared[split] if self.cross is None else self.cross.teacher_rows(prepared[split])
                self.teacher.check_dataset(rows_to_check(rows))

    def _resolve_ensemble(
        self,
        teachers: list[Any],
        tokenizers: list[Any],
        model: nn.Module,
        args: DistillConfig,
        prepared: dict[str, Any],
    ) -> None:
        """Resolve every teacher of a multi-teacher run and run each one's checks on the rows it will see."""
        assert self.ensemble is not None
        self.teachers = [self.teacher] + [
            resolve_teacher(t, model, args, tok) for t, tok in zip(teachers[1:], tokenizers[1:], strict=True)
        ]
        for index, teacher in enumerate(self.teachers):
            teacher.check_objective(args.objective(None))
            for split in ("train", "eval"):
                if prepared[split] is not None:
                    teacher.check_dataset(self.ensemble.teacher_rows(index, prepared[split]))

    def _bind_vocabulary(self, model: nn.Module, tokenizer: Any, args: DistillConfig) -> None:
        """``self.vocab_size`` (the head rows student and teacher(s) share) and ``self.objective`` over it."""
        if self.ensemble is not None:
            self.ensemble.bind(self.teachers, model)
            self.vocab_size = self.ensemble.vocab_size or int(model.get_output_embeddings().weight.shape[0])
        elif self.cross is not None:
            self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
            self.cross.bind(self.vocab_size, self.teacher.vocab_rows)
        else:
            self.vocab_size = shared_vocabulary(model, self.teacher, tokenizer, args)
        self.objective = args.objective(self.vocab_size)
        if args.loss_implementation == "fused":
            output_head_of(model)  # fail now, not at step 1, if the head cannot be fused

    def _default_collator(self, tokenizer: Any) -> Any:
        """Pads with the tokenizer's pad id; adds the cross-tokenizer / ensemble columns."""
        collator = DistillCollator(pad_token_id=tokenizer.pad_token_id)
        if self.cross is not None:
            return self.cross.collator(collator)
        if self.ensemble is not None:
            return self.ensemble.collator(collator)
        return collator

    def _place_teacher(self, args: DistillConfig) -> None:
        """Put a model teacher on this process's device: sharded over the processes (FSDP2) when asked to or when
        the student is sharded, else whole.

        A teacher to shard is still on the CPU here (see :meth:`_resolve_teachers`): ``shard_teacher`` moves one
        group at a time and keeps this process's ``1/N``, so no GPU holds the whole teacher. Under
        ``fsdp_cpu_ram_efficient_loading`` only rank 0 holds real weights; they fill every process's shards.
        """
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if zero3 and args.loss_implementation == "fused":
            raise ValueError(
                "DeepSpeed ZeRO-3 partitions the student's LM head, which the fused loss reads directly. Use FSDP2 "
                "(recipes/accelerate/fsdp.yaml), or set loss_implementation='dense' to keep ZeRO-3."
            )
        self._student_sharded = self.is_fsdp_enabled or zero3
        self._teacher_sharded = False
        if not isinstance(self.teacher, ModelTeacher):
            if args.teacher_sharding == "fsdp" and self.accelerator.num_processes > 1:
                raise ValueError(
                    f"teacher_sharding applies to in-process model teachers, not {type(self.teacher).__name__}."
                )
            return
        model, device = self.teacher.model, self.accelerator.device
        from_rank0 = self.accelerator.num_processes > 1 and ram_efficient_loading()
        if self._shards_teacher(args, zero3):
            whole = whole_weights(model) if from_rank0 and self.accelerator.process_index == 0 else None
            shard_teacher(model, device)
            if from_rank0:
                fill_shards_from(model, whole, device)
            self._teacher_sharded = True
            return
        if self._teacher_built_empty:  # on meta for shards it does not get after all: whole, filled from rank 0
            model.to_empty(device=self._teacher_device)
        self.teacher.place(self._teacher_device)  # where it would have gone at load time (None: it is there)
        if from_rank0:  # a teacher object loaded under it is real on local rank 0 only
            broadcast_from_rank0(model)

    def _shards_teacher(self, args: DistillConfig, zero3: bool) -> bool:
        """Whether the (model) teacher is FSDP2-sharded: ``"fsdp"``, or ``"auto"`` with a sharded student; never a
        4-bit / 8-bit one (``"fsdp"`` refuses it) nor in one process."""
        wanted = args.teacher_sharding == "fsdp" or (
            args.teacher_sharding == "auto" and (self.is_fsdp_enabled or zero3)
        )
        if not wanted or self.accelerator.num_processes == 1:
            return False
        if is_quantized_model(self.teacher.model):  # type: ignore[attr-defined]
            if args.teacher_sharding == "fsdp":
                raise ValueError(
                    "teacher_sharding='fsdp' cannot shard a 4-bit / 8-bit (bitsandbytes) teacher: FSDP would drop its "
                    "quantization state. Use teacher_sharding='none' (each GPU holds the quantized teacher, already "
                    "small), or a bf16 teacher to shard."
                )
            return False  # "auto": a quantized teacher is kept whole on each process
        return True

    def _ranks_with(self, flag: bool) -> list[int]:
        """The ranks on which ``flag`` is set (every process gets the same list; a collective)."""
        return self._failures.ranks_with(flag)

    # ---- one step -----------------------------------------------------------------------------------

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """The engine's step (forward, backward) on one micro-batch that :meth:`get_batch_samples` built."""
        step = self.state.global_step
        self._micro_step = self._micro_step + 1 if step == self._micro_step_of else 0
        self._micro_step_of = step
        return super().training_step(model, inputs, num_items_in_batch)

    def _build_step(self, batches: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], StepTokens]:
        """One optimizer step's micro-batches as they will train, and the loss tokens they hold on every process.

        On-policy micro-batches are generated here, before any of the step trains (the weights are the same
        until the step ends), so the step's token count includes the generated tokens.
        """
        hidden_mask = None
        if self.hidden is not None:
            which = self.args.hidden_loss_tokens
            hidden_mask = lambda attention_mask, targets: hidden_token_mask(which, attention_mask, targets)  # noqa: E731
        built, problem = [], None
        for micro, inputs in enumerate(batches):
            try:
                inputs = self._maybe_generated(inputs, micro)
            except ServerError as error:  # the teacher server generating seq-KD text: stop with every rank
                problem = str(error)
            count_tokens(inputs, hidden_mask)
            built.append(inputs)
        failures = self._failures.gather(problem)
        if failures:
            self._stop_together(self.model_wrapped, failures, ServerError, _SERVER_FAILED)
        reduce_sum = lambda totals: self.accelerator.reduce(totals.to(self.accelerator.device), "sum").cpu()  # noqa: E731
        return built, step_tokens(built, self.accelerator.num_processes, reduce_sum)

    def _maybe_generated(self, inputs: dict[str, Any], micro: int) -> dict[str, Any]:
        """``inputs``, or its prompts completed by the teacher (seq-KD) and/or the student (this micro-batch's
        on-policy coin: the same on every process, and again after a resume, keyed by step and micro-batch).

        Sampling draws from its own seed (step, micro-batch, rank): the engine restores the RNG of a resumed run
        only after it has fetched the first step's batches, so the global RNG would differ there.
        """
        key = f"{self.args.seed}/{self.state.global_step}/{micro}"
        if self.args.seq_kd:
            with _seeded_rng(f"{key}/teacher/{self.accelerator.process_index}", self.args.device):
                inputs = self._generated_batch(inputs, generator=None)
            inputs[GENERATED_KEY] = True
        if self.args.lmbda > 0 and random.Random(key).random() < self.args.lmbda:
            with _seeded_rng(f"{key}/student/{self.accelerator.process_index}", self.args.device):
                inputs = self._generated_batch(inputs, generator=self.model_wrapped)
            inputs[GENERATED_KEY] = True
        return inputs

    @torch.no_grad()
    def _generated_batch(self, inputs: dict[str, Any], generator: nn.Module | None) -> dict[str, Any]:
        """The batch's prompts completed by the student (``generator``) or, if ``None``, by the teacher."""
        tokenizer = self.processing_class
        prompt_ids = inputs["prompt_input_ids"].to(self.args.device)
        prompt_mask = inputs["prompt_attention_mask"].to(self.args.device)
        kwargs = self.args.generation_kwargs(tokenizer.pad_token_id, self._eos_token_ids)
        # A sharded model runs collectives in every forward: all processes must take the same number of
        # generation steps, even those whose rows have all finished.
        kwargs["synced_gpus"] = self.accelerator.num_processes > 1 and (
            self._teacher_sharded if generator is None else self._student_sharded
        )
        if generator is None:
            sequences = self.teacher.generate(prompt_ids, prompt_mask, **kwargs)
        else:
            student = self.accelerator.unwrap_model(generator)
            was_training = student.training
            student.eval()  # no dropout while sampling; KV cache on even with gradient checkpointing
            try:
                sequences = student.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
            finally:
                student.train(was_training)
        batch = completion_batch(prompt_ids, prompt_mask, sequences, self._eos_token_ids, tokenizer.pad_token_id)
        batch["prompt_input_ids"], batch["prompt_attention_mask"] = prompt_ids, prompt_mask
        return batch

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """Distillation loss of one micro-batch: mean over its loss tokens of ``kd_weight * D + ce_weight * CE``.

        In training (``num_items_in_batch`` is the step's :class:`~distill.trainer.accumulation.StepTokens`) the
        mean is scaled to the micro-batch's share of the step's tokens, so the step's gradient is one big batch's.
        A teacher-server failure or a non-finite loss on any process stops every process here, together.
        """
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        position_ids = inputs.get("position_ids")
        targets = next_token_labels(inputs["labels"], position_ids)
        if self.ensemble is None:
            teacher_targets, problem = self._teacher_targets(inputs)
        else:
            teacher_targets, problem = self.ensemble.targets(inputs)
        remote = self.teacher.prefetchable or (self.ensemble is not None and self.ensemble.remote)
        if remote:  # a remote teacher can fail on one rank: agree before the student's collectives
            failures = self._failures.gather(problem)
            if failures:
                self._stop_together(model, failures, ServerError, _SERVER_FAILED)
        hidden = self.hidden
        loss, problem = None, None
        try:
            # The student's mapped layer outputs are caught in the same (outer) forward that gives its logits; an
            # FSDP2 student keeps its head and final norm unsharded until the backward (the fused loss reads them).
            with (
                head_unsharded_through_loss(model),
                catch_layer_outputs(model, hidden.student_layers if hidden else ()) as student_states,
            ):
                if self.ensemble is not None:
                    output, per_teacher = self.ensemble.loss(model, inputs, self.objective, teacher_targets)
                elif self.cross is not None:
                    output = self.cross.loss(model, inputs, teacher_targets, self.objective)
                else:
                    output = self._loss(model, input_ids, attention_mask, position_ids, targets, teacher_targets)
            loss = self._step_share(output.loss, output.num_tokens, inputs, num_items_in_batch, hidden=False)
            if hidden is not None:
                mask = hidden_token_mask(self.args.hidden_loss_tokens, attention_mask, targets)
                hidden_output = hidden(student_states, getattr(teacher_targets, "layer_states", None) or (), mask)
                hidden_loss = self.args.hidden_loss_weight * hidden_output.loss
                loss = loss + self._step_share(hidden_loss, hidden_output.num_tokens, inputs, num_items_in_batch, True)
        except NonFiniteInputError as error:  # NaN hidden states / logits, caught before the loss math
            problem = str(error)
        # Host-device sync (one per micro-batch, on purpose): a NaN loss must stop the run before the optimizer
        # applies it. The fused loss syncs too: its finiteness checks and the count of loss tokens (nonzero).
        if problem is None and not torch.isfinite(loss.detach()).item():
            problem = f"the loss is {float(loss)}"
        failures = self._failures.gather(None if problem is None else self._nonfinite_problem(inputs, problem))
        if failures:
            self._stop_together(model, failures, NonFiniteLossError, _NONFINITE)
        metrics = self._train_metrics if model.training else self._eval_metrics
        metrics.add(output, _input_tokens(inputs), generated=bool(inputs.get(GENERATED_KEY, False)))  # no sync
        if self.ensemble is not None:
            metrics.add_teachers(per_teacher)
        if hidden is not None:
            metrics.add_hidden(hidden_output, hidden.names)
        if transformers_compat.ENGINE_DIVIDES_BY_MICRO_BATCHES and isinstance(num_items_in_batch, StepTokens):
            loss = loss * self.current_gradient_accumulation_steps  # undone by transformers 4.x's training_step
        return (loss, output) if return_outputs else loss

    @staticmethod
    def _step_share(
        mean: Tensor, tokens: int, inputs: dict[str, Any], step: Tensor | int | StepTokens | None, hidden: bool
    ) -> Tensor:
        """A micro-batch's mean loss over ``tokens`` scaled to its share of the step (training), else as is."""
        if not isinstance(step, StepTokens):  # evaluation, or a loss computed outside the training loop
            return mean
        check_counted(inputs[HIDDEN_TOKENS_KEY if hidden else LOSS_TOKENS_KEY], tokens,
                      "hidden-state loss" if hidden else "distillation loss")  # fmt: skip
        return mean * step.scale(tokens, hidden)

    def _teacher_targets(self, inputs: dict[str, Any]) -> tuple[TeacherTargets | None, str | None]:
        """The batch's teacher targets: prefetched (see :mod:`distill.trainer.prefetch`) or asked for now.

        Returns:
            ``(targets, None)``, or ``(None, problem)`` when the teacher server failed after its retries.
        """
        input_ids = inputs["input_ids"]
        prefetched = inputs.get(PREFETCHED_KEY)
        try:
            if prefetched is not None:
                return prefetched.result().to(input_ids.device), None
            if self.cross is not None:
                return self.cross.teacher_targets(self.teacher, inputs), None
            return self.teacher.targets(input_ids, inputs["attention_mask"], inputs.get("position_ids")), None
        except ServerError as error:
            return None, str(error)

    def _loss(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None,
        targets: Tensor,
        teacher_targets: TeacherTargets,
    ) -> DistillationOutput:
        if self.args.loss_implementation == "fused":
            hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)
            head = student_head(output_head_of(model))  # plain, unsharded (see head_unsharded_through_loss)
            return fused_objective_loss(
                hidden, head, teacher_targets, targets, self.objective, chunk_size=self.args.loss_chunk_size
            )
        student_logits = full_logits(model, input_ids, attention_mask, position_ids)
        return dense_objective_loss(student_logits, _materialize(teacher_targets), targets, self.objective)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Tensor, None, None]:
        """Evaluation: the distillation loss only (KD metrics go to the ``eval_`` log line)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _nonfinite_problem(self, inputs: dict[str, Any], problem: str) -> str:
        """``problem`` with where it happened: the micro-batch, its shape and first input ids."""
        rows, length = inputs["input_ids"].shape
        first_ids = inputs["input_ids"][0, :8].tolist()
        return (
            f"{problem} (micro-batch {self._micro_step + 1}, a batch of {rows} rows x {length} tokens; first input "
            f"ids {first_ids})"
        )

    def _stop_together(
        self, model: nn.Module, failures: dict[int, str], error: type[Exception], text: tuple[str, str]
    ) -> NoReturn:
        """Every process: save the last good weights (this step is not applied) in one checkpoint, then raise
        the same ``error`` naming the failing ranks. ``text``: a headline with ``{step}``, and advice."""
        headline, advice = text
        step = self.state.global_step
        where = self._save_last_good(model)
        if self.accelerator.num_processes > 1:
            located = f" {describe(failures).rstrip('.')}. Every process stopped at this step"
        else:
            located = f": {next(iter(failures.values())).rstrip('.')}"
        raise error(
            f"{headline.format(step=step + 1)}{located}. The weights before this step were saved to {where}. {advice}"
        )

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """transformers' save, then a marker that says the folder is complete (:mod:`distill.trainer.checkpoints`).

        A folder a killed save left unfinished at this step is removed first, so the new save does not mix with it.
        """
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            remove_incomplete(folder)
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)
        if self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()  # every process's files are written before the folder is marked
        if self.args.should_save and folder.is_dir():
            write_marker(folder, self.args)

    def _save_last_good(self, model: nn.Module) -> str:
        """Checkpoint the weights before the step in flight (none of it is applied yet); returns the folder.

        Resuming from it replays this optimizer step from its first micro-batch: nothing is lost or repeated.
        """
        self._save_checkpoint(model, trial=None)
        return f"{self.args.output_dir}/checkpoint-{self.state.global_step}"

    # ---- the learned hidden-state projections: optimised with the student, kept in checkpoints ------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The engine's optimizer, plus a parameter group for the learned hidden-state projections (if any)."""
        optimizer = transformers_compat.engine_optimizer(super().create_optimizer, model)
        projections = self.hidden.projections if self.hidden is not None else None
        if projections is not None:
            known = {id(p) for group in optimizer.param_groups for p in group["params"]}
            params = [p for p in projections.parameters() if id(p) not in known]
            if params:
                # No weight decay: the maps only translate between widths; decaying them shrinks the student's target.
                optimizer.add_param_group({"params": params, "weight_decay": 0.0})
                if self.accelerator.num_processes > 1:
                    # They live outside the wrapped (DDP/FSDP) student, so nothing averages their gradients: do it
                    # once per optimizer step, before it.
                    optimizer.register_step_pre_hook(lambda *_: self._average_projection_gradients())
                # The engine zeroes the model's gradients only (model.zero_grad()): clear the maps' after each step.
                optimizer.register_step_post_hook(lambda *_: projections.zero_grad(set_to_none=True))
        return optimizer

    def _average_projection_gradients(self) -> None:
        for param in self.hidden.projections.parameters():  # type: ignore[union-attr]
            if param.grad is not None:
                param.grad = self.accelerator.reduce(param.grad, reduction="mean")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.hidden is not None and self.hidden.projections is not None and self.args.should_save:
            torch.save(self.hidden.projections.state_dict(), os.path.join(output_dir, PROJECTIONS_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.hidden is not None and self.hidden.projections is not None:
            path = os.path.join(checkpoint, PROJECTIONS_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{checkpoint} has no {PROJECTIONS_FILE}: it was saved without learned hidden-state projections "
                    "(another hidden_loss_weight / hidden_projection / layer map?). Resume with the settings it was "
                    "trained with, or start a new run."
                )
            self.hidden.projections.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))
        super()._load_optimizer_and_scheduler(checkpoint)

    # ---- logging and the outer loop -----------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the KD metrics (KD/CE loss, top-1 agreement, teacher entropy, tokens/s) to each log line."""
        reduce_sum = None
        if self.accelerator.num_processes > 1:

            def reduce_sum(totals: Tensor) -> Tensor:
                return self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()

        if "loss" in logs:
            logs.update(self._train_metrics.pop(reduce_sum))
        elif any(key.startswith("eval_") for key in logs):
            logs.update({f"eval_{k}": v for k, v in self._eval_metrics.pop(reduce_sum).items()})
        super().log(logs, start_time)

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], StepTokens]:
        """The next optimizer step's micro-batches, on-policy ones generated, and the step's token counts (passed
        on as ``num_items_in_batch``); a remote teacher is asked for the following batches meanwhile."""
        if self._prefetcher is not None:
            epoch_iterator = self._prefetcher.wrap(epoch_iterator)
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return self._build_step(batches)

    def _make_prefetcher(self) -> TargetPrefetcher | None:
        """A prefetcher when the teacher answers remotely and every batch's tokens are known before its step."""
        args = self.args
        if not self.teacher.prefetchable or args.teacher_prefetch == 0 or args.seq_kd or args.lmbda > 0:
            return None
        if self.cross is not None or self.ensemble is not None:  # the prefetcher asks with the student's ids
            return None
        return TargetPrefetcher(self.teacher, args.teacher_prefetch)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``transformers.Trainer.save_model``; when you call it (not for a checkpoint), it writes the model card
        (``README.md``: teacher, loss, data, budget; a README.md of your own is kept), prints where the student
        is and three lines that load it."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            folder = Path(output_dir or self.args.output_dir)
            write_model_card(folder, card_for_trainer(self, folder))
            kind = "LoRA adapters" if is_adapter_folder(folder) else "model"
            print(
                f"The student ({kind} and tokenizer) is in {folder.resolve()}. Load it with:\n{load_snippet(folder)}"
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``transformers.Trainer.train``; raises :class:`TrainingPreempted` after a SIGTERM checkpoint.

        ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint (newer ones a killed save left
        unfinished are skipped, with a warning naming them); a checkpoint saved with other settings (loss, beta,
        temperature, learning rate, ...) is refused unless ``allow_resume_changes=True``.
        """
        resume = resolve_resume(self.args.output_dir, resume_from_checkpoint)
        if resume is not None:
            check_resume_settings(resume, self.args)
        self._prefetcher = self._make_prefetcher()
        try:
            result = super().train(resume, *args, **kwargs)
        finally:
            if self._prefetcher is not None:
                self._prefetcher.shutdown()
                self._prefetcher = None
        if self._preemption is not None and self._preemption.stopped_at_step is not None:
            ranks = self._preemption.signalled_ranks
            received = f" (received by rank {', '.join(map(str, ranks))})" if len(ranks) and ranks != [0] else ""
            raise TrainingPreempted(
                f"Stopped by SIGTERM{received} after step {self._preemption.stopped_at_step}; checkpoint saved in "
                f"{self.args.output_dir}. Run again with trainer.train(resume_from_checkpoint=True) to continue."
            )
        return result


@contextlib.contextmanager
def _seeded_rng(key: str, device: torch.device) -> Iterator[None]:
    """Run the block with torch's RNG (CPU and ``device``) seeded from ``key``, then restore it as it was."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if device.type != "cpu" else None):
        torch.manual_seed(random.Random(key).getrandbits(63))
        yield


def _input_tokens(inputs: dict[str, Any]) -> Tensor:
    """0-d tensor: non-padding tokens of a batch (packed batches carry a 4D mask; the collator counts theirs).

    Left on the device (no sync): :class:`~distill.trainer.metrics.KDMetrics` reads it back once per log line.
    """
    if NUM_INPUT_TOKENS_KEY in inputs:
        return inputs[NUM_INPUT_TOKENS_KEY]
    return inputs["attention_mask"].sum()


def _materialize(targets: TeacherTargets) -> Tensor:
    """``[batch, seq, V]`` teacher logits from dense targets (the dense path only)."""
    if not isinstance(targets, TeacherHead):
        raise ValueError("loss_implementation='dense' needs a dense teacher; sparse targets use the fused path.")
    return targets.logits()


__all__ = ["NonFiniteLossError", "Trainer", "TrainingPreempted"]
