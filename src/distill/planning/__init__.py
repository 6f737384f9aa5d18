"""Plan a distillation run before launch: will it fit in GPU memory, how long will it take, what will it cost.

Example::

    from distill.planning import plan_run

    plan = plan_run("Qwen/Qwen2.5-Coder-1.5B", "Qwen/Qwen2.5-Coder-7B", gpu="A10G", max_length=1024, tokens=50e6)
    plan.fits  # False: 42.6 GiB needed, 22.5 GiB on an A10G
    print(plan.message)  # the biggest item, and the changes that make it fit (planned again, with savings)
    plan.memory.items, plan.throughput.tokens_per_second, plan.cost.usd

See ``docs/planning.md`` for the formulas, the assumptions and how they were checked.
"""

from __future__ import annotations

from distill.planning.advice import Suggestion
from distill.planning.gpus import CPU, GPU, GPUS, get_gpu, load_prices, with_prices
from distill.planning.memory import MemoryEstimate, MemoryItem, estimate_memory
from distill.planning.models import KNOWN_MODELS, ModelSpec, model_spec, spec_from_config
from distill.planning.plan import Plan, plan, plan_from_config, plan_run
from distill.planning.pruning import PruningCost, pruning_cost
from distill.planning.setup import RunSetup
from distill.planning.throughput import Cost, Throughput, estimate_cost, estimate_throughput, flops_per_token

__all__ = [
    "CPU",
    "GPU",
    "GPUS",
    "KNOWN_MODELS",
    "Cost",
    "MemoryEstimate",
    "MemoryItem",
    "ModelSpec",
    "Plan",
    "PruningCost",
    "RunSetup",
    "Suggestion",
    "Throughput",
    "estimate_cost",
    "estimate_memory",
    "estimate_throughput",
    "flops_per_token",
    "get_gpu",
    "load_prices",
    "model_spec",
    "plan",
    "plan_from_config",
    "plan_run",
    "pruning_cost",
    "spec_from_config",
    "with_prices",
]
