"""Setting up a distillation run: the teacher, the shared vocabulary, the data, the stop tokens.

Everything here runs in ``Trainer.__init__``, before the first step, so a mistake surfaces as an
error message rather than as a failed (or silently wrong) run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from distill.config import DistillConfig
from distill.data import prepare_dataset
from distill.losses import VocabularyMismatchError
from distill.models import load_causal_lm, resolve_dtype, shared_vocab_size
from distill.teachers import ModelTeacher, Teacher

logger = logging.getLogger(__name__)


def prepare_splits(
    args: DistillConfig, tokenizer: Any, train_dataset: Any, eval_dataset: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check and tokenize both splits; ``({split: dataset or None}, {split: DataReport})``."""
    prepared: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    for split, dataset in (("train", train_dataset), ("eval", eval_dataset)):
        if dataset is None:
            prepared[split] = None
            continue
        prepared[split], reports[split] = prepare_dataset(
            dataset,
            tokenizer,
            max_length=args.max_length,
            completion_only_loss=args.completion_only_loss,
            packing=args.packing,
            need_prompts=args.uses_generation and split == "train",
            num_proc=args.dataset_num_proc,
        )
        logger.info("%s data: %s", split, reports[split])
    return prepared, reports


def resolve_teacher(
    teacher: nn.Module | Teacher | str, student: nn.Module, args: DistillConfig, teacher_tokenizer: Any
) -> Teacher:
    """The teacher as a :class:`Teacher`: wrapped, loaded (from a path) or checked not to be the student."""
    if isinstance(teacher, Teacher):
        if teacher_tokenizer is not None:
            teacher.tokenizer = teacher_tokenizer
        return teacher
    if teacher is student or (isinstance(teacher, nn.Module) and _shares_parameters(teacher, student)):
        raise ValueError(
            "The teacher is the student model itself (they share parameters): distilling a model into itself "
            "trains nothing. Load the teacher separately, e.g. AutoModelForCausalLM.from_pretrained(...)."
        )
    device = torch.device(args.teacher_device) if args.teacher_device else args.device
    if isinstance(teacher, str):
        model = load_causal_lm(
            teacher,
            dtype=resolve_dtype(args.teacher_dtype),
            quantization=args.teacher_quantization,
            device=device,
        )
        return ModelTeacher(model, tokenizer=teacher_tokenizer, device=device)
    if args.teacher_quantization != "none":
        raise ValueError(
            "teacher_quantization applies when the teacher is given as a path; this teacher is an already "
            "loaded model. Load it quantized yourself (distill.models.load_causal_lm(..., quantization='4bit')) "
            "or pass its path."
        )
    dtype = resolve_dtype(args.teacher_dtype)
    if getattr(teacher, "hf_device_map", None) and not args.teacher_device:
        device = None  # dispatched over several devices (device_map="auto"): leave it where it is
    return ModelTeacher(teacher, tokenizer=teacher_tokenizer, device=device, dtype=None if dtype == "auto" else dtype)


def shared_vocabulary(student: nn.Module, teacher: Teacher, tokenizer: Any, args: DistillConfig) -> int:
    """The number of vocabulary rows both heads share, after checking the tokenizers agree."""
    student_rows = int(student.get_output_embeddings().weight.shape[0])
    teacher_rows = teacher.vocab_rows
    if teacher.tokenizer is not None:
        shared = shared_vocab_size(tokenizer, teacher.tokenizer, student_rows, teacher_rows)
    else:
        shared = len(tokenizer)
        for name, rows in (("student", student_rows), ("teacher", teacher_rows)):
            if rows < shared:
                raise VocabularyMismatchError(
                    f"The tokenizer has {shared:,} tokens but the {name}'s head has only {rows:,} rows: the "
                    f"tokenizer does not belong to the {name} (pass the right processing_class, or call "
                    f"{name}.resize_token_embeddings(len(tokenizer)))."
                )
    if args.vocab_size is not None:
        if args.vocab_size > min(student_rows, teacher_rows):
            raise VocabularyMismatchError(
                f"vocab_size={args.vocab_size:,} exceeds a head ({student_rows:,} student rows, "
                f"{teacher_rows:,} teacher rows)."
            )
        shared = args.vocab_size
    return shared


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    b_storage = {p.data_ptr() for p in b.parameters()}
    return any(p.data_ptr() in b_storage for p in a.parameters())
