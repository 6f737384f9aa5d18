"""Load a teacher or student causal LM, freeze it, and check that it fits where it is going.

One entry point, :func:`load_causal_lm`, for both models: a dtype by its short name, optional
bitsandbytes quantization, a device. A path that does not exist fails at once with a message that
says so, instead of a hub lookup that hangs (online without network) or an unrelated hub error
(offline).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distill.checks import is_path_like
from distill.models.files import IncompleteFilesError, damaged_files
from distill.models.quantization import Quantization, quantization_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "ModelDoesNotFitError",
    "check_fits",
    "check_model_source",
    "freeze",
    "load_causal_lm",
    "load_tokenizer",
    "parameter_bytes",
    "resolve_dtype",
]

_DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
_ACCEPTED_DTYPES = "'auto', 'bf16'/'bfloat16', 'fp16'/'float16', 'fp32'/'float32' or the matching torch.dtype"

# "org/name" or "name": what the hub accepts as a repository id (neither part starts with "." so "./x" is a path).
_HUB_ID = re.compile(r"^\w[\w.-]*(/\w[\w.-]*)?$")
_TRUTHY = {"1", "ON", "YES", "TRUE"}
_FIX = "Pass a folder written by save_pretrained() (it holds config.json) or a hub id such as Qwen/Qwen2.5-0.5B."
_GIB = 1024**3


class ModelDoesNotFitError(MemoryError):
    """The models would not fit in the free memory of their device."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """Turn a user-facing dtype name into what ``from_pretrained`` takes.

    Args:
        dtype: ``None``/``"auto"`` (the checkpoint's own dtype), ``"bf16"``/``"bfloat16"``,
            ``"fp16"``/``"float16"``, ``"fp32"``/``"float32"`` (case-insensitive, ``"torch."`` prefix
            allowed), or one of those three ``torch.dtype``.

    Returns:
        ``"auto"`` or a ``torch.dtype``.

    Raises:
        ValueError: anything else; the message lists the accepted values.
    """
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        raise ValueError(f"unsupported dtype {dtype}: use {_ACCEPTED_DTYPES}")
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name in _DTYPES:
            return _DTYPES[name]
    raise ValueError(f"unknown dtype {dtype!r}: use {_ACCEPTED_DTYPES}")


def _hub_offline() -> bool:
    # Read at call time: huggingface_hub's own constant is frozen when it is first imported.
    from huggingface_hub import constants

    env = (os.environ.get(name, "").upper() in _TRUTHY for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(env) or bool(constants.HF_HUB_OFFLINE)


def check_model_source(name_or_path: str | os.PathLike, what: str = "model") -> None:
    """Fail fast, naming it, on a model that is neither a local folder nor reachable on the hub.

    A name that can only be a path (``./x``, ``/x``, ``~/x``, ``a/b/c``; see
    :func:`distill.checks.is_path_like`) must be an existing folder: transformers would otherwise answer
    "Repo id must be in the form 'repo_name'". A hub id is checked against the local cache when
    ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) forbids downloading it; one that is also a
    missing path beside an existing folder (``out/student``) is then reported as "no such folder".

    Args:
        name_or_path: a folder or a hub id.
        what: the model's role, for the message (``"teacher"``, ``"--student"``, ...).

    Raises:
        FileNotFoundError: no such folder, a file instead of a folder, or a hub id that is not cached while offline.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise FileNotFoundError(
            f"no model folder at {text!r} ({what}): it is a file; give the folder that holds config.json."
        )
    if not isinstance(name_or_path, str) or is_path_like(text) or not _HUB_ID.match(text):
        raise FileNotFoundError(
            f"no model folder at {text!r} ({what}): no such folder (resolved to {path.resolve()}). {_FIX}"
        )
    if not _hub_offline():
        return  # a hub id: from_pretrained downloads it (or reports the hub's own error)
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(text, "config.json"), str):
        return
    if Path(text).parent.is_dir() and str(Path(text).parent) != ".":  # "out/student" beside an out/ folder
        raise FileNotFoundError(
            f"no model folder at {text!r} ({what}): no such folder (resolved to {path.resolve()}), and no hub model "
            f"of that name is cached while this machine is offline (HF_HUB_OFFLINE=1). {_FIX}"
        )
    raise FileNotFoundError(
        f"{what} {text!r} is neither a local model folder nor in the Hugging Face cache, and this machine is offline "
        "(HF_HUB_OFFLINE=1) so it cannot be downloaded. Pass the path of a folder written by save_pretrained(), "
        "or download the model first."
    )


def load_tokenizer(name_or_path: str | os.PathLike, what: str = "tokenizer", **kwargs: object) -> Any:
    """``AutoTokenizer.from_pretrained`` after :func:`check_model_source` (a missing folder is named, not looked up).

    Args:
        name_or_path: a folder or a hub id.
        what: the tokenizer's role, for the message.
        kwargs: passed to ``from_pretrained``.
    """
    from transformers import AutoTokenizer

    check_model_source(name_or_path, what)
    return AutoTokenizer.from_pretrained(os.fspath(name_or_path), **kwargs)


def _dtype_kwarg() -> str:
    # transformers 4.56 renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns in 5.x).
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _default_compute_dtype(device: str | torch.device | None) -> torch.dtype:
    # 4-bit layers need a concrete compute dtype even when the weights load in "auto": bf16 where the GPU has
    # it, fp32 elsewhere (bf16 matmuls on a CPU without AVX512-BF16 are emulated and slow).
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return (
        torch.bfloat16 if on_cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    )


def load_causal_lm(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = "auto",
    quantization: Quantization = "none",
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM (teacher or student) with ``AutoModelForCausalLM.from_pretrained``.

    Args:
        name_or_path: a folder written by ``save_pretrained`` or a hub id (``"Qwen/Qwen2.5-0.5B"``).
        dtype: see :func:`resolve_dtype`. With quantization it is the dtype of the layers left
            unquantized and the 4-bit compute dtype (``"auto"``: bf16 on a GPU that has it, else fp32).
        quantization: ``"none"``, ``"4bit"`` (NF4, double quantization) or ``"8bit"``; needs
            bitsandbytes, which runs on CUDA and (0.50.2 checked) on CPU.
        device: where the weights go. Quantized models are placed while loading
            (``device_map={"": device}``, which bitsandbytes needs); others are loaded then moved. ``None``
            leaves transformers' default (CPU).
        attn_implementation: e.g. ``"sdpa"``, ``"eager"``, ``"flash_attention_2"``; ``None`` for the default.
        trust_remote_code: run model code shipped with the checkpoint.

    Returns:
        The model, in eval mode (as ``from_pretrained`` returns it).

    Raises:
        FileNotFoundError: ``name_or_path`` is a missing folder, or a hub id that is not cached while
            ``HF_HUB_OFFLINE=1``.
        ValueError: an unknown dtype or quantization.
        ImportError: quantization without bitsandbytes installed.
    """
    from transformers import AutoModelForCausalLM

    resolved_dtype = resolve_dtype(dtype)
    compute_dtype = resolved_dtype if isinstance(resolved_dtype, torch.dtype) else _default_compute_dtype(device)
    bnb_config = quantization_config(quantization, compute_dtype)
    check_model_source(name_or_path)

    kwargs: dict[str, object] = {_dtype_kwarg(): resolved_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if bnb_config is not None:
        kwargs["quantization_config"] = bnb_config
        if device is not None:
            kwargs["device_map"] = {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except Exception as error:
        _raise_if_damaged(name_or_path, error)
        raise
    if bnb_config is None and device is not None:
        model = model.to(device)
    return model


def empty_causal_lm(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = "auto",
    *,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The model :func:`load_causal_lm` would load, built from its config on the meta device: no weights read.

    For a process that receives its weights from another (a sharded teacher under
    ``fsdp_cpu_ram_efficient_loading``, see :func:`distill.teachers.sharding.fill_shards_from`). ``dtype="auto"``
    takes the config's dtype, as ``from_pretrained`` does, so every process agrees on the tensors' sizes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_source(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    resolved = resolve_dtype(dtype)
    if not isinstance(resolved, torch.dtype):
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        resolved = getattr(torch, saved) if isinstance(saved, str) else saved or torch.get_default_dtype()
    kwargs: dict[str, object] = {"trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.to(resolved).eval()


def _raise_if_damaged(name_or_path: str | os.PathLike, error: Exception) -> None:
    """After a failed load from a local folder: name the file that is cut short, if one is."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return
    damaged = damaged_files(folder)
    if damaged:
        listed = "; ".join(f"{path} ({problem})" for path, problem in damaged)
        raise IncompleteFilesError(
            f"The model folder {folder} is incomplete: {listed}. It was probably being written when the process "
            "was stopped; save it again (or resume from an earlier checkpoint)."
        ) from error


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode (no dropout) with no parameter requiring grad; returns it (a teacher)."""
    model.eval()
    model.requires_grad_(False)
    return model


def _quant_state_bytes(tensor: torch.Tensor) -> int:
    # bitsandbytes keeps scales beside the packed weight: 4-bit block absmax (and its own quantization
    # state with double quantization) and the 8-bit per-row scales (SCB).
    total = 0
    quant_state = getattr(tensor, "quant_state", None)
    for holder, name in ((quant_state, "absmax"), (getattr(quant_state, "state2", None), "absmax"), (tensor, "SCB")):
        extra = getattr(holder, name, None)
        if isinstance(extra, torch.Tensor):
            total += extra.numel() * extra.element_size()
    return total


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``model``, each tensor counted once (tied weights).

    Quantized weights count at their storage size (4-bit: half a byte per weight, 8-bit: one) plus their
    scales. Optimizer state, gradients and activations are not included.

    Args:
        model: any module (on any device; meta tensors count at their nominal size).

    Returns:
        Size in bytes.
    """
    seen: set[tuple[int, int, torch.dtype] | int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        pointer = tensor.data_ptr()
        # Meta and empty tensors all report pointer 0; tell them apart by identity instead.
        key = (pointer, tensor.numel(), tensor.dtype) if pointer else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size() + _quant_state_bytes(tensor)
    return total


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu":
        try:
            import psutil
        except ImportError:
            return None
        return psutil.virtual_memory().available
    return None  # mps, xpu, meta, ...: no reliable free-memory query


def check_fits(models_bytes: int, device: torch.device | str, *, what: str, headroom: float = 0.9) -> None:
    """Refuse, before anything is placed, models that would not fit in the device's free memory.

    Call it with the bytes that are about to be placed on ``device`` (e.g. :func:`parameter_bytes` of a
    teacher and student loaded on the CPU, before moving them to the GPU); memory already used there
    counts as taken. Activations, gradients and optimizer state need room too, hence ``headroom``.

    Args:
        models_bytes: bytes to place, in bytes.
        device: target device. CUDA: compared with ``torch.cuda.mem_get_info`` free memory. CPU:
            compared with available RAM if psutil is installed, else not checked. Others: not checked.
        what: what is being placed, for the message (e.g. ``"teacher + student"``).
        headroom: fraction of the free memory the models may use, in ``(0, 1]``.

    Raises:
        ModelDoesNotFitError: ``models_bytes > free * headroom``; the message gives both in GiB and ways out.
        ValueError: ``headroom`` outside ``(0, 1]``.
    """
    if not 0 < headroom <= 1:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}")
    device = torch.device(device)
    free = _free_bytes(device)
    if free is None or models_bytes <= free * headroom:
        return
    raise ModelDoesNotFitError(
        f"{what}: {models_bytes / _GIB:.2f} GiB needed on {device}, but only {free / _GIB:.2f} GiB is free there "
        f"(at most {free * headroom / _GIB:.2f} GiB may be used, headroom={headroom}). Load the teacher in 4-bit "
        "(quantization='4bit'), train the student with LoRA/QLoRA (peft_config=LoraConfig(...)), or use a smaller "
        "model; a smaller batch or shorter sequences leave more room for activations."
    )
