"""The training path: the model runs its forward under autocast; fp32 parameters stay the master weights."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .options import Options
from .proxy import ModelProxy
from .registry import Plan
from .report import PassRecord, Report


class TrainingModule(ModelProxy):
    """The user's model (same Parameters, same keys) whose forward runs under the plan's autocast."""

    def __init__(self, original: nn.Module, options: Options, plan: Plan) -> None:
        super().__init__(original)
        self.__dict__["_options"] = options
        self.__dict__["_report"] = Report(
            model=type(original).__name__,
            mode="train",
            options=options.describe(),
            passes=[PassRecord(p.name, "applied", detail=p.doc) for p in plan.module_passes]
            + [PassRecord(name, "skipped", detail=why) for name, why in plan.skipped],
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        dtype = self._options.dtype
        if dtype == torch.float32:
            return self._original(*args, **kwargs)
        with torch.autocast("cpu", dtype=dtype):
            return self._original(*args, **kwargs)

    def explain(self) -> Report:
        return self._report


def prepare_training(model: nn.Module, optimizer, options: Options, plan: Plan):
    """Apply the training plan; returns ``(TrainingModule, optimizer)`` or the module alone."""
    wrapped = TrainingModule(model, options, plan)
    wrapped.train(True)
    return wrapped if optimizer is None else (wrapped, optimizer)
