"""distill: knowledge distillation of large language models.

The loss layer lives in :mod:`distill.losses`; vocabulary checks in :mod:`distill.models`. Nothing
heavy is imported here, so ``import distill`` stays cheap.
"""

__version__ = "0.1.0"
