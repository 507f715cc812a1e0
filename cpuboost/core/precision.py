"""The unit every path runs: the working copy under the plan's autocast (or none, for fp32)."""
from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
from torch import nn

from .verify import match_dtypes

_counter = itertools.count()


class PrecisionRunner(nn.Module):
    """Runs the model under the plan's autocast (or with autocast off for fp32): the unit that gets compiled.

    ``out_dtypes`` (``verify.dtype_template`` of eager's answer): each floating output is cast back to eager's
    dtype inside the runner, so a compiled graph writes it in its last kernel. Cast after the graph, a GPT-2 LM
    head's 128 x 50257 bf16 logits cost an extra 1.4 ms pass of an 18 ms call (Intel Xeon, AMX)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, out_dtypes: Any = None) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.out_dtypes = out_dtypes

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.dtype == torch.float32:
            with torch.autocast("cpu", enabled=False):
                out = self.model(*args, **kwargs)
        else:
            with torch.autocast("cpu", dtype=self.dtype):
                out = self.model(*args, **kwargs)
        return out if self.out_dtypes is None else match_dtypes(self.out_dtypes, out)


def fresh_runner(model: nn.Module, dtype: torch.dtype, out_dtypes: Any = None) -> nn.Module:
    """A PrecisionRunner whose forward has its own code object, so it owns its dynamo cache entry:
    dropping the runner lets its compiled code go too."""
    n = next(_counter)
    namespace: dict[str, Any] = {}
    source = "def forward(self, *args, **kwargs):\n    return PrecisionRunner.forward(self, *args, **kwargs)\n"
    exec(compile(source, f"<cpuboost-graph-{n}>", "exec"), {"PrecisionRunner": PrecisionRunner}, namespace)
    cls = type(f"CompiledRunner{n}", (PrecisionRunner,), {"forward": namespace["forward"]})
    return cls(model, dtype, out_dtypes)


def eager_runner(model: nn.Module, dtype: torch.dtype) -> Callable:
    """The working copy under a precision; fp32 outside any autocast needs no wrapper at all."""
    if dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return model
    return PrecisionRunner(model, dtype)
