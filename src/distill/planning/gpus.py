"""The GPUs a run can be planned for: memory, peak dense bf16 throughput, memory bandwidth and an hourly price.

Memory is what the driver reports as the card's total (``nvidia-smi``'s "MiB" column); the CUDA
context is not taken off here but planned as its own memory item. Throughput is the spec sheet's
dense bf16 tensor-core peak (not the "with sparsity" figure, which is twice that). Prices are typical
on-demand cloud list prices as of late 2026 and are assumptions: replace them with yours through
:func:`with_prices` or a price file (:func:`load_prices`, ``distill plan --prices``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from distill.checks import InputError, check_float

__all__ = ["CPU", "GPU", "GPUS", "get_gpu", "load_prices", "with_prices"]

_MIB = 2**20


@dataclass(frozen=True)
class GPU:
    """One accelerator (or the CPU, for validating the planner on a laptop).

    Attributes:
        name: catalogue key, e.g. ``"H100-80GB"``.
        memory_bytes: total device memory in bytes, as the driver reports it.
        bf16_tflops: peak dense bf16 tensor throughput in TFLOP/s (10**12 FLOP/s), spec sheet.
        memory_bandwidth: peak memory bandwidth in bytes/s (used for on-policy decoding).
        hourly_usd: price of one device for one hour, in US dollars (an assumption; edit it).
        description: what the entry stands for (form factor, memory type).
        cuda: whether it is a CUDA device (a CUDA context and allocator reserve are planned).
        link_bandwidth: bytes/s one GPU receives from the others of its node in an all-gather, per direction
            (NVLink on SXM parts, PCIe otherwise; spec sheet): what re-gathering sharded weights is paced by.
    """

    name: str
    memory_bytes: int
    bf16_tflops: float
    memory_bandwidth: float
    hourly_usd: float
    description: str = ""
    cuda: bool = True
    link_bandwidth: float = 32e9

    @property
    def memory_gib(self) -> float:
        """Total memory in GiB (2**30 bytes)."""
        return self.memory_bytes / 2**30


# Peak dense bf16 with fp32 accumulation, from each spec sheet. Links: NVLink 4 is 900 GB/s both ways per
# H100/H200 (450 each way), NVLink 3 600 GB/s per A100; the PCIe cards share PCIe 4.0 x16 (~32 GB/s each way).
# A10G is AWS's A10 variant: it has more FP32 throughput than the A10 but about 70 dense bf16 TFLOPS against
# the A10's 125.
GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU("H100-80GB", 81559 * _MIB, 989.4, 3.35e12, 2.99, "H100 SXM5 80 GB HBM3", link_bandwidth=450e9),
        GPU("H200-141GB", 143771 * _MIB, 989.4, 4.8e12, 3.79, "H200 SXM 141 GB HBM3e", link_bandwidth=450e9),
        GPU("A100-40GB", 40960 * _MIB, 312.0, 1.555e12, 1.29, "A100 SXM4 40 GB HBM2", link_bandwidth=300e9),
        GPU("A100-80GB", 81920 * _MIB, 312.0, 2.039e12, 1.79, "A100 SXM4 80 GB HBM2e", link_bandwidth=300e9),
        GPU("L40S-48GB", 46068 * _MIB, 362.05, 0.864e12, 1.19, "L40S 48 GB GDDR6"),
        GPU("A10G-24GB", 23028 * _MIB, 70.0, 0.6e12, 1.01, "A10G 24 GB GDDR6 (AWS g5)"),
        GPU("L4-24GB", 23034 * _MIB, 121.0, 0.3e12, 0.80, "L4 24 GB GDDR6"),
        GPU("RTX4090-24GB", 24564 * _MIB, 165.2, 1.008e12, 0.69, "GeForce RTX 4090 24 GB GDDR6X"),
    )
}

# The host CPU as a device: only for checking the memory model against measured RSS (no price, no
# meaningful FLOP rate; memory is the machine's RAM where it can be read).
CPU = GPU(
    "cpu",
    os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0,
    1.0,
    50e9,
    0.0,
    "host CPU (memory-model validation only)",
    cuda=False,
)


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def get_gpu(name: str, catalogue: Mapping[str, GPU] | None = None) -> GPU:
    """The catalogue entry for ``name``, matched loosely: ``"H100"``, ``"h100-80gb"``, ``"a100 40"`` all work.

    Args:
        name: a catalogue key, a model name (``"L4"``), or a unique prefix or part of a key (case, dashes and
            spaces ignored), or ``"cpu"``.
        catalogue: the GPUs to look in (default :data:`GPUS`, or one returned by :func:`with_prices`).

    Returns:
        The :class:`GPU`.

    Raises:
        KeyError: no entry, or several, match; the message lists the catalogue.
    """
    catalogue = GPUS if catalogue is None else catalogue
    wanted = _key(name)
    if wanted == "cpu":
        return CPU
    exact = [gpu for key, gpu in catalogue.items() if _key(key) == wanted]
    # "L4" is the L4, not the L40S: a whole model name (the part before the memory size) beats a prefix.
    family = [gpu for key, gpu in catalogue.items() if _key(key.split("-")[0]) == wanted]
    if exact or len(family) == 1:
        return (exact or family)[0]
    matches = [gpu for key, gpu in catalogue.items() if _key(key).startswith(wanted)]
    matches = matches or [gpu for key, gpu in catalogue.items() if wanted in _key(key)]  # "4090", "a10g"
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        choices = ", ".join(gpu.name for gpu in matches)
        raise KeyError(
            f"GPU {name!r} is ambiguous: it matches {choices}. Give the memory too, e.g. {matches[0].name}."
        )
    raise KeyError(f"Unknown GPU {name!r}; the catalogue has {', '.join(catalogue)} (and 'cpu').")


def with_prices(prices: Mapping[str, float], catalogue: Mapping[str, GPU] | None = None) -> dict[str, GPU]:
    """A copy of the catalogue with some hourly prices replaced.

    Args:
        prices: ``{gpu name: US dollars per GPU-hour}``; names are matched as in :func:`get_gpu`.
        catalogue: the catalogue to start from (default :data:`GPUS`).

    Returns:
        A new ``{name: GPU}`` dict; the given catalogue is not modified.

    Raises:
        KeyError: a name matches no GPU. ValueError: a negative price.
    """
    updated = dict(GPUS if catalogue is None else catalogue)
    for name, price in prices.items():
        price = check_float(price, f"The price of {name} (US dollars per hour)", minimum=0)
        gpu = get_gpu(name, updated)
        updated[gpu.name] = replace(gpu, hourly_usd=price)
    return updated


def load_prices(path: str | os.PathLike) -> dict[str, float]:
    """Hourly prices from a JSON or YAML file holding ``{gpu name: US dollars per GPU-hour}``.

    Args:
        path: a ``.json`` file, or ``.yaml``/``.yml`` (needs PyYAML, which transformers installs).

    Returns:
        ``{name: price}`` as written in the file (pass it to :func:`with_prices`).

    Raises:
        FileNotFoundError: no such file.
        InputError: the file is not valid JSON / YAML, or does not hold a mapping of names to finite prices
            >= 0 (the message names the file and the entry).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--prices {os.fspath(path)!r}: no such file.")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise ValueError(" ".join(str(error).split())) from None
        else:
            data = json.loads(text)
    except (UnicodeDecodeError, ValueError) as error:
        raise InputError(
            f"{path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} ({error}); it "
            'must hold a mapping of GPU names to US dollars per hour, e.g. {"H100": 2.5}.'
        ) from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a mapping of GPU names to US dollars per hour, e.g. {{'H100': 2.5}}.")
    for name, price in data.items():
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price) or price < 0:
            raise InputError(
                f"{path}: the price of {name} must be a finite number >= 0 (USD per hour); got {price!r}."
            )
    return {str(name): float(price) for name, price in data.items()}
