"""The unit every path runs: the working copy under the plan's autocast (or none, for fp32)."""
from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
from torch import nn

_counter = itertools.count()


class PrecisionRunner(nn.Module):
    """Runs the model under the plan's autocast (or with autocast off for fp32): the unit that gets compiled."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.dtype == torch.float32:
            with torch.autocast("cpu", enabled=False):
                return self.model(*args, **kwargs)
        with torch.autocast("cpu", dtype=self.dtype):
            return self.model(*args, **kwargs)


def fresh_runner(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A PrecisionRunner whose forward has its own code object, so it owns its dynamo cache entry:
    dropping the runner lets its compiled code go too."""
    n = next(_counter)
    namespace: dict[str, Any] = {}
    source = "def forward(self, *args, **kwargs):\n    return PrecisionRunner.forward(self, *args, **kwargs)\n"
    exec(compile(source, f"<cpuboost-graph-{n}>", "exec"), {"PrecisionRunner": PrecisionRunner}, namespace)
    cls = type(f"CompiledRunner{n}", (PrecisionRunner,), {"forward": namespace["forward"]})
    return cls(model, dtype)


def eager_runner(model: nn.Module, dtype: torch.dtype) -> Callable:
    """The working copy under a precision; fp32 outside any autocast needs no wrapper at all."""
    if dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return model
    return PrecisionRunner(model, dtype)
