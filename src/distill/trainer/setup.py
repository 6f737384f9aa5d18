"""Setting up a distillation run: the teacher, the shared vocabulary, the data, the stop tokens.

Everything here runs in ``Trainer.__init__``, before the first step, so a mistake surfaces as an
error message rather than as a failed (or silently wrong) run.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn

from distill.config import DistillConfig
from distill.data import STREAM_CHECKED_ROWS, DataError, is_stream, prepare_dataset, prepare_stream
from distill.losses import VocabularyMismatchError
from distill.models import apply_peft, check_student_trainable, load_causal_lm, resolve_dtype, shared_vocab_size
from distill.models.loading import empty_causal_lm, load_tokenizer
from distill.teachers import ModelTeacher, Teacher
from distill.teachers.sharding import loading_whole_on_every_rank, weight_rows
from distill.trl_compat import disable_dropout

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
        dataset = with_text_column(dataset, args.dataset_text_field)
        settings = {
            "max_length": args.max_length,
            "completion_only_loss": args.completion_only_loss,
            "packing": args.packing,
            "need_prompts": args.uses_generation and split == "train",
            "chat_loss_tokens": args.chat_loss_tokens,
        }
        if is_stream(dataset):
            if split == "train" and args.max_steps <= 0:
                raise DataError(
                    "A streaming train_dataset (IterableDataset) has no length, so the run's length must be given: "
                    "set max_steps=N (optimizer steps), or materialise the rows: "
                    "Dataset.from_list(list(stream.take(n)))."
                )
            prepared[split], reports[split] = prepare_stream(dataset, tokenizer, **settings)
        else:
            prepared[split], reports[split] = prepare_dataset(
                dataset, tokenizer, num_proc=args.dataset_num_proc, **settings
            )
        logger.info("%s data: %s", split, reports[split])
    return prepared, reports


def rows_to_check(rows: Any) -> Any:
    """Prepared rows for ``Teacher.check_dataset``: all of them, or a stream's first ones (the rest are not read)."""
    if is_stream(rows):
        return datasets.Dataset.from_list(list(rows.take(STREAM_CHECKED_ROWS)))
    return rows


def pick_teacher(teacher: Any, teacher_model: Any, args: Any) -> Any:
    """The teacher among ``teacher=``, TRL's ``teacher_model=`` and ``args.teacher_model_name_or_path``.

    Raises:
        ValueError: none of them, or two different ones.
    """
    given = [value for value in (teacher, teacher_model) if value is not None]
    if len(given) == 2 and given[0] is not given[1]:
        raise ValueError("teacher= and teacher_model= (TRL's name for it) are both given; pass one.")
    if given:
        return given[0]
    name = getattr(args, "teacher_model_name_or_path", None)
    if name is None:
        raise ValueError("No teacher: pass teacher= (a model, a name or path, or a distill Teacher).")
    return name


def with_text_column(dataset: Any, text_field: str) -> Any:
    """``dataset`` with its ``text_field`` column named ``text`` (TRL's ``dataset_text_field``), when it has one."""
    rows = dataset if isinstance(dataset, list) else None  # prepare_dataset takes a list of row dicts too
    columns = list(rows[0]) if rows else (getattr(dataset, "column_names", None) or [])
    if not columns and is_stream(dataset):  # a stream from a generator does not know its columns: read one row
        columns = list(next(iter(dataset.take(1)), {}))
    if text_field == "text" or text_field not in columns:
        return dataset
    if "text" in columns:
        raise ValueError(
            f"dataset_text_field={text_field!r}, but the dataset has a 'text' column too; drop one of them."
        )
    if rows is not None:
        return [{("text" if key == text_field else key): value for key, value in row.items()} for row in rows]
    return dataset.rename_column(text_field, "text")


def turn_off_dropout(model: nn.Module) -> None:
    """``disable_dropout=True``: every dropout of the student at p=0, logged when that changed any."""
    changed = disable_dropout(model)
    if changed:
        logger.info("disable_dropout=True: %d dropout modules of the student set to p=0 (as TRL does).", changed)


def teacher_device(teacher: Any, args: DistillConfig) -> torch.device | None:
    """Where an in-process teacher's weights go: ``teacher_device``, else this process's device; ``None`` for a
    model dispatched over several devices (``device_map="auto"``), which stays where it is."""
    if args.teacher_device:
        return torch.device(args.teacher_device)
    if getattr(teacher, "hf_device_map", None):
        return None
    return args.device


def resolve_teacher(
    teacher: nn.Module | Teacher | str,
    student: nn.Module,
    args: DistillConfig,
    teacher_tokenizer: Any,
    *,
    place: bool = True,
    empty: bool = False,
) -> Teacher:
    """The teacher as a :class:`Teacher`: wrapped, loaded (from a path) or checked not to be the student.

    Args:
        place: move an unquantized model teacher to :func:`teacher_device` now. ``False`` leaves it where it
            is (a path loads on the CPU) for the trainer to shard before anything reaches the GPU
            (``Trainer._place_teacher``). A quantized teacher is always placed while loading (bitsandbytes
            needs it).
        empty: a teacher given by path is built on the meta device, without reading its weights (the ranks
            other than 0 under ``fsdp_cpu_ram_efficient_loading``, whose shards are filled from rank 0).
    """
    if isinstance(teacher, Teacher):
        if teacher_tokenizer is not None:
            teacher.tokenizer = teacher_tokenizer
        return teacher
    if teacher is student or (isinstance(teacher, nn.Module) and _shares_parameters(teacher, student)):
        raise ValueError(
            "The teacher is the student model itself (they share parameters): distilling a model into itself "
            "trains nothing. Load the teacher separately, e.g. AutoModelForCausalLM.from_pretrained(...)."
        )
    device = teacher_device(teacher, args)
    if isinstance(teacher, str):
        quantized = args.teacher_quantization != "none"
        if empty and not quantized:
            model = empty_causal_lm(teacher, resolve_dtype(args.teacher_dtype), **args.load_kwargs("teacher"))
            return ModelTeacher(model, tokenizer=teacher_tokenizer)
        with loading_whole_on_every_rank():  # not under zero.Init / RAM-efficient loading: the student's switches
            model = load_causal_lm(
                teacher,
                dtype=resolve_dtype(args.teacher_dtype),
                quantization=args.teacher_quantization,
                device=device if place or quantized else None,
                **args.load_kwargs("teacher"),
            )
        return ModelTeacher(model, tokenizer=teacher_tokenizer, device=device if place else None)
    if args.teacher_model_init_kwargs:
        raise ValueError("teacher_model_init_kwargs apply when the teacher is given as a name or path; it is loaded.")
    if args.teacher_quantization != "none":
        raise ValueError(
            "teacher_quantization applies when the teacher is given as a path; this teacher is an already "
            "loaded model. Load it quantized yourself (distill.models.load_causal_lm(..., quantization='4bit')) "
            "or pass its path."
        )
    dtype = resolve_dtype(args.teacher_dtype)
    return ModelTeacher(
        teacher,
        tokenizer=teacher_tokenizer,
        device=device if place else None,
        dtype=None if dtype == "auto" else dtype,
    )


def shared_vocabulary(student: nn.Module, teacher: Teacher, tokenizer: Any, args: DistillConfig) -> int:
    """The number of vocabulary rows both heads share, after checking the tokenizers agree."""
    student_rows = weight_rows(student.get_output_embeddings().weight)  # ZeRO-3: the full size
    teacher_rows = teacher.vocab_rows
    if teacher.tokenizer is None and isinstance(getattr(teacher, "model", None), nn.Module):
        check_teacher_without_tokenizer(teacher, tokenizer)
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


# Tokenizer files: a folder holding one of these has the tokenizer the model was saved with.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Head rows beyond the tokenizer that are still ordinary padding (Qwen2.5: 399; DeepSeek-LLM: 2,385).
_PADDING_ROWS = 4096


def _own_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved with ``model`` (its folder, or the hub cache; never downloaded), or ``None``."""
    config = getattr(model, "config", None)
    source = str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or "")
    if not source:
        return None
    folder = Path(source).expanduser()
    if folder.is_dir() and not any((folder / name).exists() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure only means there is nothing local to check against
        return None


def _special_ids(model: nn.Module, name: str) -> list[int]:
    ids: list[int] = []
    for holder in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        value = getattr(holder, name, None)
        ids += [i for i in (value if isinstance(value, list) else [value]) if isinstance(i, int)]
    return sorted(set(ids))


def check_teacher_without_tokenizer(teacher: Teacher, tokenizer: Any) -> None:
    """Check a model teacher given without its tokenizer as far as its files and config allow.

    1. If the tokenizer it was saved with is on this machine (its ``name_or_path`` folder, or the hub
       cache), it becomes ``teacher.tokenizer`` and the full token-by-token check follows.
    2. Otherwise its config's bos / eos ids must be special tokens of the student's tokenizer (ids past the
       tokenizer's end, or ordinary tokens, mean another tokenizer), and a UserWarning says loudly that
       only this was checked (and whether its head is much larger than the tokenizer).

    Raises:
        VocabularyMismatchError: a bos / eos id of the teacher is not a special token of ``tokenizer``.
    """
    model = teacher.model  # type: ignore[attr-defined]
    own = _own_tokenizer(model)
    if own is not None:
        logger.info("Teacher tokenizer loaded from %s to check it against the student's.", own.name_or_path)
        teacher.tokenizer = own
        return
    size, special = len(tokenizer), set(tokenizer.all_special_ids)
    vocab = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    problems = []
    for name in ("bos_token_id", "eos_token_id"):
        for token_id in _special_ids(model, name):
            if token_id >= size:
                problems.append(f"its {name} {token_id} is past the end of the student's tokenizer ({size:,} tokens)")
            elif token_id not in special:
                problems.append(f"its {name} {token_id} is the ordinary token {vocab.get(token_id)!r} there")
    if problems:
        raise VocabularyMismatchError(
            "The teacher does not use the student's tokenizer: " + "; ".join(problems) + ". Distilling would "
            "compare different tokens id by id. Use a teacher of the student's family, or pass "
            "teacher_processing_class=<the teacher's tokenizer> to check it token by token."
        )
    rows = teacher.vocab_rows
    size_note = (
        f" Its head has {rows:,} rows for the tokenizer's {size:,} tokens, far more than padding: this looks like "
        "another tokenizer."
        if rows > size + _PADDING_ROWS
        else ""
    )
    message = (
        "The teacher was passed as a model object without teacher_processing_class and no tokenizer was saved "
        "with it, so its vocabulary could not be compared with the student's token by token; only its bos/eos "
        f"ids and head size were checked.{size_note} A teacher with another tokenizer trains the student on "
        "wrong targets without any error: pass teacher_processing_class=<the teacher's tokenizer>."
    )
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=5)  # the caller of Trainer(...)


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    b_storage = {p.data_ptr() for p in b.parameters()}
    return any(p.data_ptr() in b_storage for p in a.parameters())


def checked_args(args: Any, model: Any) -> DistillConfig:
    """``args``, refused unless it is a :class:`DistillConfig` whose model settings fit how ``model`` is given."""
    if not isinstance(args, DistillConfig):
        raise TypeError(
            f"args must be a distill.DistillConfig (it adds the loss, teacher and data fields); got "
            f"{type(args).__name__}. Build it as DistillConfig(output_dir=..., ...)."
        )
    if args.model_init_kwargs and not isinstance(model, str):
        raise ValueError("model_init_kwargs apply when the student is given as a name or path, not a model.")
    return args


def student_and_teacher_tokenizers(
    model: Any, teacher: Any, tokenizer: Any, teacher_tokenizer: Any, args: DistillConfig
) -> tuple[Any, Any]:
    """The student's tokenizer (loaded from ``model`` when it is a path; given a pad token) and the teacher's (loaded
    from ``teacher`` when it is a path and none was given)."""
    if tokenizer is None:
        if not isinstance(model, str):
            raise ValueError("processing_class (the student tokenizer) is required when model is a model object.")
        tokenizer = load_tokenizer(model, "model", trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding is masked everywhere, so any id works; eos is what most chat models use.
        tokenizer.pad_token = tokenizer.eos_token
    if teacher_tokenizer is None and isinstance(teacher, str):
        teacher_tokenizer = load_tokenizer(teacher, "teacher", trust_remote_code=args.trust_remote_code)
    return tokenizer, teacher_tokenizer


def prepared_student(model: nn.Module, peft_config: Any, args: DistillConfig) -> nn.Module:
    """The student with its adapters (``peft_config``), checked to have something to train, dropout off if asked."""
    if peft_config is not None:
        model = apply_peft(model, peft_config, gradient_checkpointing=args.gradient_checkpointing)
    check_student_trainable(model, peft_config)
    if args.disable_dropout:
        turn_off_dropout(model)
    return model


def may_shard_teacher(args: DistillConfig) -> bool:
    """Whether ``Trainer._place_teacher`` may shard the teacher (several processes, sharding not turned off): it is
    then kept off the GPU until it is sharded, or placed whole there if it is not after all."""
    return args.world_size > 1 and args.teacher_sharding != "none"
