"""LoRA students as standalone models: :func:`merge_adapters` folds the adapters into the base weights.

A student trained with ``peft_config`` is saved as adapters only (``adapter_config.json`` and
``adapter_model.safetensors``), which need peft and the base model to run. Merged, it is a standard
``transformers`` folder that ``AutoModelForCausalLM.from_pretrained``, vLLM or llama.cpp's converter read
as they read any model. :func:`load_snippet` is the few lines that load what a run saved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from distill.checks import InputError, check_writable_folder

__all__ = ["ADAPTER_CONFIG", "is_adapter_folder", "load_snippet", "merge_adapters"]

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds peft adapters (an ``adapter_config.json``)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def load_snippet(folder: str | os.PathLike) -> str:
    """Three lines of Python that load the model (and tokenizer) saved in ``folder``; peft's class for adapters."""
    path = json.dumps(os.fspath(Path(folder).resolve()))
    if is_adapter_folder(folder):
        named = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        # Without a base model named, AutoPeftModel cannot load the adapters: say how to give it one.
        comment = (
            f"merged: distill merge {path} --out DIR"
            if named
            else (f"no base model named in {ADAPTER_CONFIG}: distill merge {path} --base BASE --out DIR")
        )
        return (
            "from peft import AutoPeftModelForCausalLM; from transformers import AutoTokenizer\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({path})  # {comment}\n"
            f"tokenizer = AutoTokenizer.from_pretrained({path})"
        )
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({path})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({path})"
    )


def _empty_output(out: str | os.PathLike) -> Path:
    folder = check_writable_folder(out)
    entries = sorted(entry.name for entry in folder.iterdir())
    if entries:
        raise InputError(
            f"--out {os.fspath(out)!r} is not empty ({', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}); "
            "nothing was written. Give an empty or new folder for the merged model."
        )
    return folder


def _load_adapters(folder: Path, base: str | os.PathLike | None, dtype: str) -> tuple[Any, str | os.PathLike]:
    """The base model with ``folder``'s adapters attached (a ``peft.PeftModel``, loaded unquantized), and the base."""
    from distill.models.loading import check_model_source, load_causal_lm

    check_model_source(os.fspath(folder), "adapters")
    if not is_adapter_folder(folder):
        if (folder / "config.json").is_file():
            raise InputError(
                f"{os.fspath(folder)!r} is a full model (config.json, no {ADAPTER_CONFIG}): there are no adapters "
                "to merge; load it as it is."
            )
        raise InputError(f"{os.fspath(folder)!r} holds no {ADAPTER_CONFIG}: give the folder a LoRA run saved.")
    named = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    base = base or named
    if not base:
        raise InputError(
            f"{os.fspath(folder / ADAPTER_CONFIG)} names no base model (base_model_name_or_path is empty): pass the "
            "base model's folder or hub id (--base)."
        )
    import peft  # after the checks: importing it (and bitsandbytes) takes seconds and logs

    # Merged into unquantized weights: a QLoRA student's base is loaded in `dtype`, not in 4-bit.
    model = load_causal_lm(base, dtype=dtype)
    return peft.PeftModel.from_pretrained(model, os.fspath(folder)), base


def merge_adapters(
    student: str | os.PathLike | Any,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    tokenizer: Any = None,
    dtype: str = "auto",
) -> Path:
    """Merge a LoRA student's adapters into its base weights and save a standard model and tokenizer.

    Args:
        student: a folder of saved adapters (``trainer.save_model`` of a LoRA run), or a ``peft.PeftModel``
            in memory, which is merged in place (its adapters are gone afterwards). Merge a QLoRA student from
            its folder: the base is then loaded unquantized, rather than merged into 4-bit weights.
        out: an empty or new folder for the merged model.
        base: the base model (folder or hub id) when the adapters' ``base_model_name_or_path`` is empty or
            should be overridden; adapters folders only.
        tokenizer: saved beside the model; default: the adapters folder's tokenizer, else the base's.
        dtype: dtype of the base weights loaded for the merge (``"auto"``: as saved).

    Returns:
        ``out``, as a ``Path``.

    Raises:
        InputError: ``out`` is not empty, the folder holds no adapters (or is a full model), no base model is
            known, or the model object has no adapters.
        FileNotFoundError: the adapters folder or the base model does not exist.
    """
    target = _empty_output(out)  # before any loading: a wrong --out costs nothing
    if isinstance(student, (str, os.PathLike)):
        folder = Path(student).expanduser()
        model, base = _load_adapters(folder, base, dtype)
        if tokenizer is None:
            from distill.models.loading import load_tokenizer

            has_own = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
            tokenizer = load_tokenizer(folder if has_own else base, "tokenizer")
    else:
        model = student
        if not hasattr(model, "merge_and_unload"):
            raise InputError(
                f"{type(model).__name__} has no peft adapters to merge; save it with model.save_pretrained(out)."
            )
    merged = model.merge_and_unload()
    merged.save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target
