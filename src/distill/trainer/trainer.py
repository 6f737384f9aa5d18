"""`distill.Trainer`: a `transformers.Trainer` whose loss is the distillation loss from a teacher.

The trainer orchestrates; it owns no math. One step reads top to bottom as the data flows:
(maybe generate completions) -> student decoder -> final hidden states -> teacher targets for the
same tokens -> fused loss over token chunks -> backward. Neither model's ``[tokens x vocab]``
logits exist at once on the default (fused) path.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
import transformers
from torch import Tensor, nn

from distill.config import DistillConfig
from distill.data import DistillCollator
from distill.losses import (
    DistillationOutput,
    NonFiniteInputError,
    TeacherHead,
    distillation_loss,
    fused_distillation_loss,
)
from distill.models import (
    apply_peft,
    check_student_trainable,
    check_tokenizers_match,
    eos_token_ids,
    load_causal_lm,
    resolve_dtype,
)
from distill.models.loading import load_tokenizer
from distill.models.merge import is_adapter_folder, load_snippet
from distill.teachers import (
    ModelTeacher,
    Teacher,
    TeacherTargets,
    catch_layer_outputs,
    final_hidden_states,
    full_logits,
    output_head_of,
)
from distill.teachers.server import ServerError
from distill.teachers.sharding import full_tensor, shard_teacher
from distill.trainer.batching import completion_batch, next_token_labels
from distill.trainer.checkpoints import check_resume_settings, remove_incomplete, resolve_resume, write_marker
from distill.trainer.cross_tokenizer import CrossTokenizer, uses_cross_tokenizer
from distill.trainer.hidden import PROJECTIONS_FILE, HiddenDistillation, build_hidden_distillation, hidden_token_mask
from distill.trainer.metrics import KDMetrics
from distill.trainer.model_card import card_for_trainer, describe_data, write_model_card
from distill.trainer.multi_teacher import TeacherEnsemble, named_teachers
from distill.trainer.preemption import SigtermCheckpoint, TrainingPreempted
from distill.trainer.prefetch import PREFETCHED_KEY, TargetPrefetcher
from distill.trainer.setup import (
    pick_teacher,
    prepare_splits,
    resolve_teacher,
    rows_to_check,
    shared_vocabulary,
    turn_off_dropout,
)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the last good weights were saved before this was raised."""


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
        if not isinstance(args, DistillConfig):
            raise TypeError(
                f"args must be a distill.DistillConfig (it adds the loss, teacher and data fields); got "
                f"{type(args).__name__}. Build it as DistillConfig(output_dir=..., ...)."
            )
        teacher = pick_teacher(teacher, kwargs.pop("teacher_model", None), args)
        self._teacher_given = teacher  # for the model card: a name or path names the teacher best
        if isinstance(teacher, Teacher):  # what this teacher cannot train (e.g. a cache: no generation, no packing)
            teacher.check_config(args)
            teacher.check_objective(args.objective(None))
        if args.model_init_kwargs and not isinstance(model, str):
            raise ValueError("model_init_kwargs apply when the student is given as a name or path, not a model.")
        if processing_class is None:
            if not isinstance(model, str):
                raise ValueError("processing_class (the student tokenizer) is required when model is a model object.")
            processing_class = load_tokenizer(model, "model", trust_remote_code=args.trust_remote_code)
        tokenizer = processing_class
        if tokenizer.pad_token_id is None:
            # Padding is masked everywhere, so any id works; eos is what most chat models use.
            tokenizer.pad_token = tokenizer.eos_token
        if teacher_processing_class is None and isinstance(teacher, str):
            teacher_processing_class = load_tokenizer(teacher, "teacher", trust_remote_code=args.trust_remote_code)
        # Everything that can be checked without the weights is checked before loading them: a bad row
        # or a mismatched tokenizer costs seconds, not a model load (or a run).
        self.cross: CrossTokenizer | None = None
        self.ensemble: TeacherEnsemble | None = None
        if isinstance(teacher, list | tuple | dict):
            names, teachers, teacher_tokenizers = named_teachers(teacher, teacher_processing_class)
            if len(teachers) > 1:
                self.ensemble = TeacherEnsemble(names, teacher_tokenizers, tokenizer, args)
            teacher, teacher_processing_class = teachers[0], teacher_tokenizers[0]
        if self.ensemble is None and teacher_processing_class is not None:
            if uses_cross_tokenizer(args, tokenizer, teacher_processing_class):
                self.cross = CrossTokenizer(tokenizer, teacher_processing_class, args)
            else:
                check_tokenizers_match(tokenizer, teacher_processing_class)
        prepared, self.data_reports = prepare_splits(args, tokenizer, train_dataset, eval_dataset)
        self._data_description = describe_data(train_dataset, self.data_reports.get("train"))
        for split, raw in (("train", train_dataset), ("eval", eval_dataset)):
            if prepared[split] is not None and self.cross is not None:
                prepared[split] = self.cross.add_teacher_columns(prepared[split], raw)
            elif prepared[split] is not None and self.ensemble is not None:
                prepared[split] = self.ensemble.add_columns(prepared[split], raw)

        if isinstance(model, str):
            model = load_causal_lm(model, dtype=resolve_dtype(args.student_dtype), **args.load_kwargs("student"))
        self.teacher = resolve_teacher(teacher, model, args, teacher_processing_class)
        if self.ensemble is not None:
            self._resolve_ensemble(teachers, teacher_tokenizers, model, args, prepared)
        # Teachers with limits (a cache: its rows and loss positions; sampled targets: the forward KL) refuse now.
        self.teacher.check_objective(args.objective(None))
        if self.cross is not None:
            self.cross.check_teacher(self.teacher)
        for split in ("train", "eval"):
            if prepared[split] is not None and self.ensemble is None:
                rows = prepared[split] if self.cross is None else self.cross.teacher_rows(prepared[split])
                self.teacher.check_dataset(rows_to_check(rows))
        if peft_config is not None:
            model = apply_peft(model, peft_config, gradient_checkpointing=args.gradient_checkpointing)
        check_student_trainable(model, peft_config)
        if args.disable_dropout:
            turn_off_dropout(model)
        # Intermediate-layer distillation: layer map and projections now (a teacher without hidden states refuses).
        self.hidden: HiddenDistillation | None = build_hidden_distillation(model, self.teacher, args)
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
        if data_collator is None:
            data_collator = DistillCollator(pad_token_id=tokenizer.pad_token_id)
            if self.cross is not None:
                data_collator = self.cross.collator(data_collator)
            elif self.ensemble is not None:
                data_collator = self.ensemble.collator(data_collator)

        self._preemption = SigtermCheckpoint(self._any_process) if args.save_on_sigterm else None
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if self._preemption is not None:
            callbacks.append(self._preemption)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=prepared["train"],
            eval_dataset=prepared["eval"],
            processing_class=tokenizer,
            callbacks=callbacks,
            **kwargs,
        )
        # Our loss is a mean over each micro-batch's loss tokens; let the engine average micro-batches.
        self.model_accepts_loss_kwargs = False
        self._place_teacher(args)
        if self.hidden is not None:
            self.hidden.to(args.device)
        self._train_metrics, self._eval_metrics = KDMetrics(), KDMetrics()
        self._micro_step, self._micro_step_of = 0, -1
        self._eos_token_ids = eos_token_ids(tokenizer, model)
        self._prefetcher: TargetPrefetcher | None = None

    # ---- setup --------------------------------------------------------------------------------------

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

    def _place_teacher(self, args: DistillConfig) -> None:
        """Shard the teacher over the processes (FSDP2) when asked to, or when the student is sharded."""
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        if zero3 and args.loss_implementation == "fused":
            raise ValueError(
                "DeepSpeed ZeRO-3 partitions the student's LM head, which the fused loss reads directly. Use FSDP2 "
                "(recipes/accelerate/fsdp.yaml), or set loss_implementation='dense' to keep ZeRO-3."
            )
        wanted = args.teacher_sharding == "fsdp" or (
            args.teacher_sharding == "auto" and (self.is_fsdp_enabled or zero3)
        )
        self._student_sharded = self.is_fsdp_enabled or zero3
        self._teacher_sharded = False
        if not wanted or self.accelerator.num_processes == 1:
            return
        if not isinstance(self.teacher, ModelTeacher):
            raise ValueError(
                f"teacher_sharding applies to in-process model teachers, not {type(self.teacher).__name__}."
            )
        shard_teacher(self.teacher.model, self.accelerator.device)
        self._teacher_sharded = True

    def _any_process(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (every process gets the same answer)."""
        if self.accelerator.num_processes == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    # ---- one step -----------------------------------------------------------------------------------

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """Replace the batch's completions by generated ones when this step is on-policy, then train."""
        step = self.state.global_step
        self._micro_step = self._micro_step + 1 if step == self._micro_step_of else 0
        self._micro_step_of = step
        if self.args.seq_kd:
            inputs = self._generated_batch(inputs, generator=None)
            inputs["_generated"] = True
        if self.args.lmbda > 0 and self._step_rng().random() < self.args.lmbda:
            inputs = self._generated_batch(inputs, generator=model)
            inputs["_generated"] = True
        return super().training_step(model, inputs, num_items_in_batch)

    def _step_rng(self) -> random.Random:
        """The same on-policy coin flip on every process, and again after a resume.

        Keyed by the optimizer step and the micro-batch within it, both restored by a resume.
        """
        return random.Random(f"{self.args.seed}/{self.state.global_step}/{self._micro_step}")

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
        """Distillation loss of one micro-batch: mean over its loss tokens of ``kd_weight * D + ce_weight * CE``."""
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        position_ids = inputs.get("position_ids")
        targets = next_token_labels(inputs["labels"], position_ids)
        teacher_targets = self._teacher_targets(model, inputs) if self.ensemble is None else None
        hidden = self.hidden
        try:
            # The student's mapped layer outputs are caught in the same (outer) forward that gives its logits.
            with catch_layer_outputs(model, hidden.student_layers if hidden else ()) as student_states:
                if self.ensemble is not None:
                    output, per_teacher = self.ensemble.loss(model, inputs, self.objective)
                elif self.cross is not None:
                    output = self.cross.loss(model, inputs, teacher_targets, self.objective)
                else:
                    output = self._loss(model, input_ids, attention_mask, position_ids, targets, teacher_targets)
            loss = output.loss
            if hidden is not None:
                mask = hidden_token_mask(self.args.hidden_loss_tokens, attention_mask, targets)
                hidden_output = hidden(student_states, getattr(teacher_targets, "layer_states", None) or (), mask)
                loss = loss + self.args.hidden_loss_weight * hidden_output.loss
        except NonFiniteInputError as error:  # NaN hidden states / logits, caught before the loss math
            self._stop_on_nonfinite(model, inputs, str(error))
        if not torch.isfinite(loss.detach()).item():
            self._stop_on_nonfinite(model, inputs, f"the loss is {float(loss)}")
        metrics = self._train_metrics if model.training else self._eval_metrics
        metrics.add(output, _input_tokens(inputs), generated=bool(inputs.get("_generated", False)))
        if self.ensemble is not None:
            metrics.add_teachers(per_teacher)
        if hidden is not None:
            metrics.add_hidden(hidden_output, hidden.names)
        return (loss, output) if return_outputs else loss

    def _teacher_targets(self, model: nn.Module, inputs: dict[str, Any]) -> TeacherTargets:
        """The batch's teacher targets: prefetched (see :mod:`distill.trainer.prefetch`) or asked for now."""
        input_ids = inputs["input_ids"]
        prefetched = inputs.get(PREFETCHED_KEY)
        try:
            if prefetched is not None:
                return prefetched.result().to(input_ids.device)
            if self.cross is not None:
                return self.cross.teacher_targets(self.teacher, inputs)
            return self.teacher.targets(input_ids, inputs["attention_mask"], inputs.get("position_ids"))
        except ServerError as error:
            where = self._save_last_good(model)
            raise ServerError(
                f"The teacher server failed at optimizer step {self.state.global_step + 1} after its retries: {error} "
                f"The weights before this step were saved to {where}. Restart the server (or point the "
                "ServerTeacher at another), then resume with trainer.train(resume_from_checkpoint=True): no step "
                "is lost or repeated."
            ) from error

    def _loss(
        self,
        model: nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor | None,
        targets: Tensor,
        teacher_targets: TeacherTargets,
    ) -> DistillationOutput:
        objective = self.objective
        common = dict(
            divergence=objective.divergence.name,
            beta=objective.divergence.beta,
            alpha=objective.divergence.alpha,
            temperature=objective.temperature,
            kd_weight=objective.kd_weight,
            ce_weight=objective.ce_weight,
            vocab_size=self.vocab_size,
        )
        if self.args.loss_implementation == "fused":
            hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)
            head = output_head_of(model)
            return fused_distillation_loss(
                hidden,
                full_tensor(head.weight),  # an FSDP2 student's head is a DTensor shard: gather it (differentiably)
                teacher_targets,
                targets,
                student_bias=None if head.bias is None else full_tensor(head.bias),
                student_softcap=head.softcap,
                tail=objective.tail,
                chunk_size=self.args.loss_chunk_size,
                **common,
            )
        student_logits = full_logits(model, input_ids, attention_mask, position_ids)
        teacher_logits = _materialize(teacher_targets)
        return distillation_loss(student_logits, teacher_logits, targets, **common)

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

    def _stop_on_nonfinite(self, model: nn.Module, inputs: dict[str, Any], problem: str) -> NoReturn:
        """Save the last good weights (this step has not been applied), then stop with where it happened."""
        step = self.state.global_step
        where = self._save_last_good(model)
        rows, length = inputs["input_ids"].shape
        first_ids = inputs["input_ids"][0, :8].tolist()
        raise NonFiniteLossError(
            f"Non-finite distillation loss at optimizer step {step + 1} (micro-batch {self._micro_step + 1}, a "
            f"batch of {rows} rows x {length} tokens; first input ids {first_ids}): {problem}. "
            f"The weights before this step were saved to {where}. Common causes: "
            "fp16 overflow (use bf16), a learning rate too high, a teacher giving NaN logits. Resume with "
            "trainer.train(resume_from_checkpoint=True) after fixing it."
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
        optimizer = super().create_optimizer(model)
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
    ) -> tuple[list[Any], Tensor | int | None]:
        """The next optimizer step's micro-batches; a remote teacher is asked for the following ones meanwhile."""
        if self._prefetcher is not None:
            epoch_iterator = self._prefetcher.wrap(epoch_iterator)
        return super().get_batch_samples(epoch_iterator, num_batches, device)

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
            raise TrainingPreempted(
                f"Stopped by SIGTERM after step {self._preemption.stopped_at_step}; checkpoint saved in "
                f"{self.args.output_dir}. Run again with trainer.train(resume_from_checkpoint=True) to continue."
            )
        return result


def _input_tokens(inputs: dict[str, Any]) -> int:
    """Non-padding tokens of a batch (packed batches carry a 4D mask; the collator counts their tokens)."""
    if "num_input_tokens" in inputs:
        return int(inputs["num_input_tokens"])
    return int(inputs["attention_mask"].sum())


def _materialize(targets: TeacherTargets) -> Tensor:
    """``[batch, seq, V]`` teacher logits from dense targets (the dense path only)."""
    if not isinstance(targets, TeacherHead):
        raise ValueError("loss_implementation='dense' needs a dense teacher; sparse targets use the fused path.")
    logits = targets.hidden @ targets.weight.T
    if targets.bias is not None:
        logits = logits + targets.bias
    if targets.softcap is not None:
        logits = targets.softcap * torch.tanh(logits / targets.softcap)
    return logits


__all__ = ["NonFiniteLossError", "Trainer", "TrainingPreempted"]
