"""TRL's configuration and trainer keywords, read with TRL's meaning or refused with the distill name to use.

A TRL user porting a ``GKDConfig`` / ``DistillationConfig`` script keeps these keywords; the table of every name
is in ``docs/trainer.md`` ("Porting from TRL"). What is checked here runs in ``DistillConfig.__post_init__``.
"""

from __future__ import annotations

import json
from typing import Any

from distill.checks import InputError

# Keys of model_init_kwargs / teacher_model_init_kwargs that reach ``distill.models.load_causal_lm``.
INIT_KWARGS = ("attn_implementation", "trust_remote_code")
_DTYPE_KEYS = ("dtype", "torch_dtype")
# Keys TRL forwards to from_pretrained that distill sets elsewhere: key -> (student advice, teacher advice).
_SET_ELSEWHERE = {
    "quantization_config": (
        "a quantized student is loaded by you (distill.models.load_causal_lm(path, quantization='4bit')) and "
        "trained with peft_config (QLoRA)",
        "set teacher_quantization='4bit' or '8bit'",
    ),
    "device_map": (
        "the Trainer (accelerate) places the student; load it yourself for a custom device_map",
        "set teacher_device, or load the teacher yourself with a device_map and pass the model",
    ),
}


def init_kwargs(value: Any, name: str, dtype_field: str, dtype: str) -> tuple[dict[str, Any], str]:
    """Check TRL's ``model_init_kwargs`` / ``teacher_model_init_kwargs``; return them and the resulting dtype.

    Args:
        value: the field's value: ``None``, a dict, or its JSON text (as from the command line).
        name: the field's name, for messages.
        dtype_field: the distill field that holds the same model's dtype (``student_dtype`` / ``teacher_dtype``).
        dtype: that field's value; a ``dtype`` / ``torch_dtype`` key sets it when it is ``"auto"``.

    Returns:
        ``({key: value} for load_causal_lm, dtype)``.

    Raises:
        InputError: not a dict, a key distill does not forward (naming what to use instead), or two dtypes.
    """
    if value is None:
        return {}, dtype
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(
                f'{name} must be a dict or its JSON text, e.g. \'{{"attn_implementation": "sdpa"}}\'; got {value!r}.'
            ) from None
    if not isinstance(value, dict):
        raise InputError(f"{name} must be a dict of from_pretrained keywords; got {type(value).__name__}.")
    kwargs = dict(value)
    for key in _DTYPE_KEYS:
        if key in kwargs:
            given = str(kwargs.pop(key)).removeprefix("torch.")
            if dtype not in ("auto", given):
                raise InputError(f"{name}[{key!r}]={given!r} disagrees with {dtype_field}={dtype!r}; set one of them.")
            dtype = given
    teacher = name.startswith("teacher")
    for key in kwargs:
        if key in INIT_KWARGS:
            continue
        advice = (
            _SET_ELSEWHERE[key][teacher]
            if key in _SET_ELSEWHERE
            else ("load the model yourself with AutoModelForCausalLM.from_pretrained and pass it")
        )
        raise InputError(
            f"{name}[{key!r}] is not forwarded by distill (it takes {', '.join(INIT_KWARGS + _DTYPE_KEYS)}): {advice}."
        )
    return kwargs, dtype


def check_data_keywords(assistant_only_loss: bool | None, completion_only_loss: bool, padding_free: bool) -> None:
    """Refuse TRL data keywords whose TRL meaning distill does not have, naming the distill field to use."""
    if padding_free:
        raise InputError(
            "padding_free=True (TRL: flatten each batch into one sequence, FlashAttention only) is not available in "
            "distill; set packing=True instead (rows packed into max_length sequences whose documents never attend "
            "to each other), or leave padding_free unset."
        )
    if assistant_only_loss is False:
        raise InputError(
            "assistant_only_loss=False (TRL: loss on every token of chat rows) has no distill twin that leaves "
            "prompt/completion rows alone; distill's one switch is completion_only_loss (default True: assistant / "
            "completion tokens only). Set completion_only_loss=False for loss on every token, and leave "
            "assistant_only_loss unset."
        )
    if assistant_only_loss and not completion_only_loss:
        raise InputError(
            "assistant_only_loss=True asks for loss on assistant tokens only, but completion_only_loss=False asks "
            "for every token; drop one of them (completion_only_loss=True is distill's name for it)."
        )


def disable_dropout(model: Any) -> int:
    """Set every ``torch.nn.Dropout`` of ``model`` to ``p=0`` (TRL's ``disable_dropout_in_model``).

    Returns:
        How many dropout modules had ``p > 0``.
    """
    from torch import nn

    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            changed += module.p > 0
            module.p = 0.0
    return changed
