"""LoRA / QLoRA students with peft, and the checks that a student can learn at all.

A quantized student trains only through adapters (QLoRA, Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314): its 4-bit/8-bit weights have no gradient. :func:`apply_peft` gets a
model there in the order peft expects, and :func:`check_student_trainable` refuses a student that
would otherwise train nothing, before any compute is spent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from distill.models.quantization import is_quantized, make_trainable_4bit_safe

if TYPE_CHECKING:
    import peft
    from transformers import PreTrainedModel

__all__ = ["apply_peft", "check_student_trainable", "has_trainable_adapters"]

QUANTIZED_WITHOUT_ADAPTERS = (
    "the student is loaded in 4-bit/8-bit and has no LoRA adapters: quantized weights cannot be trained. "
    "Pass peft_config=LoraConfig(...) (QLoRA) or load the student in bf16/fp32."
)

# Non-reentrant checkpointing needs no input that requires grad and is what torch recommends; the reentrant
# default also warns on every call in torch >= 2.4.
_CHECKPOINTING_KWARGS = {"use_reentrant": False}


def has_trainable_adapters(model: nn.Module) -> bool:
    """Whether ``model`` carries peft adapters and has at least one parameter that requires grad.

    Covers both ``peft.PeftModel`` and adapters attached through transformers' ``add_adapter`` (both
    set ``peft_config``); no peft import is needed.
    """
    if not getattr(model, "peft_config", None):
        return False
    return any(param.requires_grad for param in model.parameters())


def _enable_checkpointing(model: PreTrainedModel) -> None:
    # transformers 5 renamed gradient checkpointing to activation checkpointing and deprecated the old name.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=dict(_CHECKPOINTING_KWARGS))
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(_CHECKPOINTING_KWARGS))


def apply_peft(
    model: PreTrainedModel, peft_config: peft.PeftConfig, *, gradient_checkpointing: bool = False
) -> peft.PeftModel:
    """Wrap a student in peft adapters (LoRA, or QLoRA when it is quantized), ready to train.

    Quantized models first go through ``peft.prepare_model_for_kbit_training`` (freezes the base, casts
    norms and embeddings to fp32) and :func:`make_trainable_4bit_safe`, so the adapters keep getting
    gradients after the model has run ``generate()`` on a CPU.

    Args:
        model: a transformers causal LM without adapters (full precision or bitsandbytes-quantized).
        peft_config: e.g. ``LoraConfig(r=16, target_modules="all-linear")``.
        gradient_checkpointing: recompute activations in the backward (non-reentrant); the embedding
            output is also made to require grad so that a reentrant checkpoint set later by a Trainer
            still reaches the adapters.

    Returns:
        The ``peft.PeftModel``; only adapter parameters require grad.

    Raises:
        ValueError: ``model`` already has adapters.
    """
    import peft

    if getattr(model, "peft_config", None):
        raise ValueError(
            "the model already has peft adapters; pass peft_config=None to train them, or merge them first "
            "(model.merge_and_unload())"
        )
    if is_quantized(model):
        model = peft.prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=dict(_CHECKPOINTING_KWARGS),
        )
        make_trainable_4bit_safe(model)
    elif gradient_checkpointing:
        _enable_checkpointing(model)
    if gradient_checkpointing:
        # With the base frozen, a checkpointed block's inputs would not require grad and (reentrant
        # checkpointing) its adapters would get none.
        model.enable_input_require_grads()
    return peft.get_peft_model(model, peft_config)


def check_student_trainable(model: nn.Module, peft_config: Any) -> None:
    """Refuse a student that would train nothing, with a message that says what to do instead.

    Args:
        model: the student as loaded (before :func:`apply_peft`).
        peft_config: the adapter config that will be applied, or ``None`` for full fine-tuning.

    Raises:
        ValueError: the student is quantized and gets no adapters, or (without ``peft_config``) none of
            its parameters requires grad.
    """
    if peft_config is not None:
        return  # apply_peft adds the trainable parameters
    if is_quantized(model) and not has_trainable_adapters(model):
        raise ValueError(QUANTIZED_WITHOUT_ADAPTERS)
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError(
            "the student has no parameter that requires grad (was it frozen?): nothing would be trained. "
            "Call model.requires_grad_(True), or pass peft_config=LoraConfig(...) to train adapters."
        )
