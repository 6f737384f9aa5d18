"""`DistillConfig`: every setting of a distillation run, as `transformers.TrainingArguments` plus KD fields.

Subclassing ``TrainingArguments`` (as TRL's configs do) means every field is also a command-line flag
or YAML key through ``HfArgumentParser``, and the optimizer, schedule, precision, checkpointing,
logging and distributed settings are the ones users already know.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from transformers import TrainingArguments

from distill import transformers_compat, trl_compat
from distill.checks import InputError, check_int
from distill.losses import DIVERGENCE_NAMES, HIDDEN_LOSSES, Divergence, Objective

_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class DistillConfig(TrainingArguments):
    """Training arguments for :class:`distill.Trainer`.

    Every ``transformers.TrainingArguments`` field applies (``output_dir``, ``learning_rate``,
    ``per_device_train_batch_size``, ``bf16``, ``save_steps``, ...); the fields below add the
    distillation objective, the teacher's placement and the data handling. Each is validated in
    ``__post_init__`` with a message that says what to change.
    """

    # The objective.
    loss: str = field(
        default="jsd",
        metadata={"help": f"Divergence between teacher and student, one of {', '.join(DIVERGENCE_NAMES)}."},
    )
    beta: float = field(
        default=0.5,
        metadata={"help": "Generalized JSD interpolation in [0, 1]: 0 is forward KL(teacher||student), 1 reverse KL."},
    )
    alpha: float = field(default=0.1, metadata={"help": "Skew of skew_kl / skew_reverse_kl, in [0, 1)."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of both models in the KD term."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the KD term."})
    ce_weight: float = field(default=0.0, metadata={"help": "Weight of the hard-label cross-entropy on the data."})
    loss_implementation: Literal["fused", "dense"] = field(
        default="fused",
        metadata={
            "help": "'fused': the loss from both models' final hidden states, chunked over tokens, so no "
            "[tokens x vocab] logits exist (default). 'dense': the models' full logits (for models whose head "
            "is not a plain linear layer, and for comparison)."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per chunk of the fused loss; default from the vocabulary size and device."},
    )
    sparse_tail: Literal["bucket", "renormalize"] = field(
        default="bucket", metadata={"help": "Sparse (top-k) teachers: how the mass outside the top-k is treated."}
    )
    vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Shared vocabulary rows of both heads; default: the ids both tokenizers share (the rest of a "
            "padded head is ignored)."
        },
    )

    # Intermediate-layer (hidden-state) distillation; see docs/trainer.md.
    hidden_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the intermediate-layer loss added to the logit loss: mapped student layers' outputs "
            "(residual stream) matched to the teacher's. 0 turns it off (default). Needs an in-process teacher."
        },
    )
    hidden_loss: str = field(
        default="cosine",
        metadata={
            "help": "Per-token hidden-state loss: 'cosine' (1 - cos) or 'mse' (squared error relative to the "
            "teacher's mean squared norm at that layer, so 1 = predicting zeros at any width or depth)."
        },
    )
    hidden_layer_map: str = field(
        default="auto",
        metadata={
            "help": "Which student layer's output is matched to which teacher layer's: 'auto' (from the pruning "
            "record in the student's config.distill_pruning if it has one, else every student layer to the teacher "
            "layer at the same relative depth, last to last), or explicit 'student:teacher' pairs, e.g. '0:1,1:3' "
            "(0-based; a list ['0:1', '1:3'] or [(0, 1), (1, 3)] is accepted too)."
        },
    )
    hidden_projection: Literal["auto", "learned", "none"] = field(
        default="auto",
        metadata={
            "help": "How student states reach the teacher's width: 'auto' (the exact channel selection of a "
            "width-pruning record; identity at equal widths; else a learned linear map per layer, trained with the "
            "student, not saved in it), 'learned' (always the learned map), 'none' (identity; widths must match)."
        },
    )
    hidden_loss_tokens: Literal["completion", "all"] = field(
        default="completion",
        metadata={
            "help": "Tokens the hidden-state loss counts: 'completion' (those the logit loss counts) or 'all' (every "
            "non-padding token, prompts included; not with packing)."
        },
    )

    # The teacher.
    teacher_dtype: str = field(
        default="auto", metadata={"help": f"Teacher weights dtype, one of {', '.join(_DTYPES)}."}
    )
    teacher_quantization: Literal["none", "4bit", "8bit"] = field(
        default="none",
        metadata={"help": "Load the teacher (given as a path) in 4-bit nf4 or 8-bit with bitsandbytes."},
    )
    teacher_device: str | None = field(
        default=None, metadata={"help": "Device of the teacher, e.g. 'cuda:1'; default: the student's."}
    )
    teacher_sharding: Literal["auto", "none", "fsdp"] = field(
        default="auto",
        metadata={
            "help": "Shard the teacher's weights over the processes with FSDP2 ('fsdp') instead of replicating it "
            "('none'). 'auto' shards it when the student is trained with FSDP or DeepSpeed ZeRO-3."
        },
    )
    teacher_prefetch: int = field(
        default=2,
        metadata={
            "help": "Micro-batches ahead whose targets a remote teacher (ServerTeacher) is asked for while the "
            "student trains, so its GPU does not wait on the network. 0: ask when the batch is trained. Not used on "
            "on-policy or seq_kd steps (their completions are not known ahead)."
        },
    )
    student_dtype: str = field(default="auto", metadata={"help": "Student dtype when the student is given as a path."})

    # On-policy and sequence-level distillation.
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of steps trained on completions the student generates for the prompts (on-policy, "
            "GKD's lambda). 0: always the dataset's completions."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={"help": "Sequence-level KD: train on the teacher's own completions, generated each step."},
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated per completion."})
    generation_temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature of generation; 0 means greedy."}
    )
    generation_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold of generation."})
    generation_top_k: int = field(default=0, metadata={"help": "Top-k sampling of generation; 0 disables it."})

    # Data.
    max_length: int = field(
        default=1024, metadata={"help": "Longest training sequence in tokens (prompt + completion)."}
    )
    completion_only_loss: bool = field(
        default=True,
        metadata={"help": "Loss only on completion / assistant tokens (prompts are context only)."},
    )
    chat_loss_tokens: Literal["assistant_turns", "trl"] = field(
        default="assistant_turns",
        metadata={
            "help": "Which tokens of a chat row carry loss. 'assistant_turns': every assistant turn's content and "
            "end-of-turn token (not the newline a template writes after it, which the model never generates). "
            "'trl': TRL GKDTrainer's convention (DataCollatorForChatML): only the last message, through the end "
            "of the render, that newline included; use it to lay a loss curve over TRL's."
        },
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack several rows into each max_length sequence (documents never attend to each other)."},
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenizing the dataset."})

    # Robustness.
    save_on_sigterm: bool = field(
        default=True,
        metadata={"help": "On SIGTERM (spot preemption, scancel), finish the step, save a checkpoint, stop."},
    )
    allow_resume_changes: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint saved with other training settings (loss, beta, temperature, learning "
            "rate, ...). Off: such a resume is refused with the list of what changed."
        },
    )

    # Cross-tokenizer distillation (docs/cross_tokenizer.md).
    cross_tokenizer: Literal["off", "auto", "on"] = field(
        default="off",
        metadata={
            "help": "Distil across tokenizers: 'off' refuses a teacher whose tokenizer differs from the student's; "
            "'auto' aligns the two tokenizations (docs/cross_tokenizer.md) when they differ; 'on' always does "
            "(identical tokenizers then give the usual loss)."
        },
    )
    cross_tokenizer_loss: Literal["pkl", "uld", "gold"] = field(
        default="pkl",
        metadata={
            "help": "Cross-tokenizer KD term at each aligned span: 'pkl' (the loss divergence over projected "
            "vocabularies), 'uld' (sorted-probability Wasserstein), 'gold' (GOLD's hybrid)."
        },
    )
    teacher_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Several teachers: the weight of each one's KD term (default equal), mixed at every token."},
    )
    teacher_route_column: str | None = field(
        default=None,
        metadata={
            "help": "Several teachers: a dataset column naming each row's teacher (by name or index); the row is "
            "distilled from that teacher only, instead of from the weighted mixture."
        },
    )
    vocab_map_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of cached student->teacher vocabulary maps (default ~/.cache/distill/vocab_maps)."},
    )
    # TRL's names (GKDConfig / DistillationConfig / SFTConfig), same meaning; docs/trainer.md "Porting from TRL".
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "When the student is given as a name: keywords for from_pretrained, as in TRL. Keys: "
            "attn_implementation, trust_remote_code, dtype / torch_dtype (= student_dtype); others are refused "
            "with the distill field to use."
        },
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "The same for the teacher given as a name (dtype / torch_dtype = teacher_dtype)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run model code shipped with a checkpoint, for student and teacher models and tokenizers."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher's name or path when the Trainer is given no teacher (TRL)."}
    )
    dataset_text_field: str = field(
        default="text", metadata={"help": "Column holding plain-text rows (TRL's SFTConfig); renamed to 'text'."}
    )
    assistant_only_loss: bool | None = field(
        default=None,
        metadata={"help": "TRL's name: True is completion_only_loss=True (distill's default); False is refused."},
    )
    padding_free: bool = field(
        default=False, metadata={"help": "TRL's flattened batches: not available (True is refused; use packing)."}
    )
    disable_dropout: bool = field(
        default=False,
        metadata={"help": "Set every dropout of the student (adapters included) to p=0, as TRL does (GKDConfig: on)."},
    )
    # transformers 5.x's field, declared again so that a command line on 4.57 (whose field is an int) parses a
    # fraction too; transformers_compat.move_warmup_fraction then hands 4.x its warmup_ratio.
    warmup_steps: float = field(
        default=0,
        metadata={
            "help": "Linear warmup from 0 to learning_rate: a whole number of optimizer steps, or a fraction of the "
            "run below 1 (0.03 is the first 3%), on every supported transformers."
        },
    )

    def __post_init__(self) -> None:
        # The collator needs the raw columns, and our batches carry keys the model's forward does not take.
        self.remove_unused_columns = False
        transformers_compat.move_warmup_fraction(self)
        transformers_compat.default_to_non_reentrant(self)
        super().__post_init__()
        self._check()
        self._check_hidden()
        self._check_cross_tokenizer()
        self._check_trl_names()

    def _check_trl_names(self) -> None:
        student, self.student_dtype = trl_compat.init_kwargs(
            self.model_init_kwargs, "model_init_kwargs", "student_dtype", self.student_dtype
        )
        teacher, self.teacher_dtype = trl_compat.init_kwargs(
            self.teacher_model_init_kwargs, "teacher_model_init_kwargs", "teacher_dtype", self.teacher_dtype
        )
        self.model_init_kwargs, self.teacher_model_init_kwargs = student or None, teacher or None
        for name in ("student_dtype", "teacher_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {_DTYPES}.")
        trl_compat.check_data_keywords(self.assistant_only_loss, self.completion_only_loss, self.padding_free)
        if not self.dataset_text_field:
            raise InputError("dataset_text_field must name a column (default 'text').")
        if self.chat_loss_tokens not in ("assistant_turns", "trl"):
            raise ValueError(f"chat_loss_tokens must be 'assistant_turns' or 'trl'; got {self.chat_loss_tokens!r}.")

    def load_kwargs(self, role: Literal["student", "teacher"]) -> dict[str, Any]:
        """Keywords for :func:`distill.models.load_causal_lm` beyond the dtype, for a model given by name."""
        given = self.model_init_kwargs if role == "student" else self.teacher_model_init_kwargs
        return {"trust_remote_code": self.trust_remote_code, **(given or {})}

    def _check(self) -> None:
        self._check_finite()
        if self.loss not in DIVERGENCE_NAMES:
            raise ValueError(f"loss={self.loss!r} is not a distillation loss; choose one of {DIVERGENCE_NAMES}.")
        # Objective / Divergence validate beta, alpha, temperature and the weights with their own messages.
        self.objective(vocab_size=None)
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError("kd_weight and ce_weight are both 0: nothing would be learned. Set kd_weight > 0.")
        if self.loss_implementation not in ("fused", "dense"):
            raise ValueError(f"loss_implementation must be 'fused' or 'dense'; got {self.loss_implementation!r}.")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(
                f"loss_chunk_size must be >= 1 token (or None for automatic); got {self.loss_chunk_size}."
            )
        for name in ("teacher_dtype", "student_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {_DTYPES}.")
        if self.teacher_quantization not in ("none", "4bit", "8bit"):
            raise ValueError(
                f"teacher_quantization must be 'none', '4bit' or '8bit'; got {self.teacher_quantization!r}."
            )
        if self.teacher_sharding not in ("auto", "none", "fsdp"):
            raise ValueError(f"teacher_sharding must be 'auto', 'none' or 'fsdp'; got {self.teacher_sharding!r}.")
        if self.teacher_prefetch < 0:
            raise ValueError(f"teacher_prefetch is a number of micro-batches, >= 0; got {self.teacher_prefetch}.")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda is the fraction of on-policy steps, in [0, 1]; got {self.lmbda}.")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {self.max_new_tokens}.")
        if self.generation_temperature < 0:
            raise ValueError(f"generation_temperature must be >= 0 (0 is greedy); got {self.generation_temperature}.")
        if not 0.0 < self.generation_top_p <= 1.0:
            raise ValueError(f"generation_top_p must be in (0, 1]; got {self.generation_top_p}.")
        check_int(self.generation_top_k, "generation_top_k (0: off)", minimum=0)
        # TrainingArguments takes these as given; a zero batch or a negative rate would fail (or do nothing) late.
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check_int(getattr(self, name), name)
        for name in ("learning_rate", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0; got {getattr(self, name)}.")
        if self.dataset_num_proc is not None:
            check_int(self.dataset_num_proc, "dataset_num_proc")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens; got {self.max_length}.")
        if self.uses_generation and self.packing:
            raise ValueError(
                "packing=True cannot be combined with lmbda > 0 or seq_kd: generation needs each row's prompt. "
                "Turn packing off for on-policy / sequence-level distillation."
            )
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive number of rows; got {self.vocab_size}.")

    def _check_hidden(self) -> None:
        if not math.isfinite(self.hidden_loss_weight) or self.hidden_loss_weight < 0:
            raise ValueError(
                f"hidden_loss_weight must be a finite number >= 0 (0 turns the hidden-state loss off); got "
                f"{self.hidden_loss_weight}."
            )
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ValueError(f"hidden_loss={self.hidden_loss!r}; choose one of {HIDDEN_LOSSES}.")
        if self.hidden_projection not in ("auto", "learned", "none"):
            raise ValueError(f"hidden_projection must be 'auto', 'learned' or 'none'; got {self.hidden_projection!r}.")
        if self.hidden_loss_tokens not in ("completion", "all"):
            raise ValueError(f"hidden_loss_tokens must be 'completion' or 'all'; got {self.hidden_loss_tokens!r}.")
        if self.hidden_loss_tokens == "all" and self.packing and self.hidden_loss_weight > 0:
            raise ValueError(
                "hidden_loss_tokens='all' needs each row's padding mask, which packed batches do not carry. Use "
                "hidden_loss_tokens='completion' (the logit loss's tokens) or packing=False."
            )
        if self.hidden_layer_map != "auto":
            # Canonical string form, so it round-trips through JSON / the command line.
            pairs = parse_layer_map(self.hidden_layer_map)
            self.hidden_layer_map = ",".join(f"{student}:{teacher}" for student, teacher in pairs)

    def _check_finite(self) -> None:
        """Refuse NaN and infinite numbers anywhere: ``temperature=inf`` or ``kd_weight=nan`` would train nothing."""
        for spec in fields(self):
            value = getattr(self, spec.name, None)
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"{spec.name}={value} is not a finite number; set a finite value.")
        if not self.temperature > 0:
            raise InputError(
                f"temperature must be a finite number > 0 (1: the models' own softmax); got {self.temperature}."
            )

    def _check_cross_tokenizer(self) -> None:
        if self.cross_tokenizer not in ("off", "auto", "on"):
            raise ValueError(f"cross_tokenizer must be 'off', 'auto' or 'on'; got {self.cross_tokenizer!r}.")
        if self.cross_tokenizer_loss not in ("pkl", "uld", "gold"):
            raise ValueError(
                f"cross_tokenizer_loss must be 'pkl', 'uld' or 'gold'; got {self.cross_tokenizer_loss!r}."
            )

    @property
    def uses_generation(self) -> bool:
        """Whether some steps train on generated completions (on-policy or sequence-level KD)."""
        return self.lmbda > 0 or self.seq_kd

    def objective(self, vocab_size: int | None) -> Objective:
        """The loss settings as a :class:`distill.losses.Objective` over ``vocab_size`` shared rows."""
        return Objective(
            divergence=Divergence(self.loss, beta=self.beta, alpha=self.alpha),
            temperature=self.temperature,
            kd_weight=self.kd_weight,
            ce_weight=self.ce_weight,
            tail=self.sparse_tail,
            vocab_size=vocab_size,
        )

    def generation_kwargs(self, pad_token_id: int, eos_token_id: int | list[int] | None) -> dict[str, object]:
        """Keyword arguments for ``model.generate`` from the generation fields."""
        sample = self.generation_temperature > 0
        kwargs: dict[str, object] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": sample,
            "pad_token_id": pad_token_id,
            "eos_token_id": eos_token_id,
            "use_cache": True,
        }
        if sample:
            kwargs.update(
                temperature=self.generation_temperature, top_p=self.generation_top_p, top_k=self.generation_top_k
            )
        return kwargs


def parse_layer_map(spec: object) -> list[tuple[int, int]]:
    """``[(student layer, teacher layer), ...]`` from ``'0:1,1:3'``, ``['0:1', '1:3']`` or ``[(0, 1), (1, 3)]``.

    Raises:
        ValueError: a malformed pair, a negative index, or a student layer mapped twice.
    """
    items = spec.replace(" ", "").split(",") if isinstance(spec, str) else list(spec)  # type: ignore[call-overload]
    pairs: list[tuple[int, int]] = []
    for item in items:
        parts = item.split(":") if isinstance(item, str) else list(item)
        try:
            student, teacher = (int(part) for part in parts)
        except (TypeError, ValueError):
            raise ValueError(
                f"hidden_layer_map: {item!r} is not a 'student:teacher' pair of layer indices; write e.g. "
                "'0:1,1:3' (or 'auto')."
            ) from None
        if student < 0 or teacher < 0:
            raise ValueError(f"hidden_layer_map: layer indices are 0-based and >= 0; got {item!r}.")
        pairs.append((student, teacher))
    students = [student for student, _ in pairs]
    if not pairs or len(set(students)) != len(students):
        raise ValueError(f"hidden_layer_map must map each student layer at most once, and at least one; got {spec!r}.")
    return pairs
