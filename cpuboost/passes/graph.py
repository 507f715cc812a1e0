"""The graph pass: torch.compile/Inductor with freezing (weight prepack, constant folding, fused epilogues).

Inductor config is patched only around the build, never globally. Each build compiles a runner with a
fresh code object, so every input signature owns its dynamo cache entry and dropping it from our LRU
cache lets the compiled code go too.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
from torch import nn

from ..registry import PassContext, PlanContext, register_pass

_counter = itertools.count()


class PrecisionRunner(nn.Module):
    """Runs the model under the plan's autocast (or none for fp32), the unit that gets compiled."""

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
    """A PrecisionRunner whose forward has its own code object (its own dynamo cache)."""
    n = next(_counter)
    namespace: dict[str, Any] = {}
    source = "def forward(self, *args, **kwargs):\n    return PrecisionRunner.forward(self, *args, **kwargs)\n"
    exec(compile(source, f"<cpuboost-graph-{n}>", "exec"), {"PrecisionRunner": PrecisionRunner}, namespace)
    cls = type(f"CompiledRunner{n}", (PrecisionRunner,), {"forward": namespace["forward"]})
    return cls(model, dtype)


def _compile_now(model: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype, cpp_wrapper: bool) -> Callable:
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    compiled = torch.compile(fresh_runner(model, dtype), backend="inductor", dynamic=False)
    with inductor_config.patch(freezing=True, cpp_wrapper=cpp_wrapper), \
            dynamo_config.patch(recompile_limit=64), torch.no_grad():
        compiled(*args, **kwargs)
    return compiled


def build_inductor(model: nn.Module, args: tuple, kwargs: dict, ctx: PassContext) -> Callable:
    """torch.compile(Inductor) with freezing, compiled now for this input signature.

    Inductor's C++ wrapper calls the kernels without a Python line per op: 1.16x on ResNet-50 b1 and 1.07x
    on BERT-base b1 in bf16 over the same graph with the Python wrapper (benchmarks/wrapper.py, AMX CPU),
    for a few seconds more build. Where it cannot compile a model, the Python wrapper is used and the report
    says why.
    """
    try:
        compiled = _compile_now(model, args, kwargs, ctx.options.dtype, cpp_wrapper=True)
    except Exception as exc:  # any C++-wrapper failure: the Python wrapper is the same graph, proven
        ctx.note(f"C++ wrapper failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                 "Python wrapper used")
        return _compile_now(model, args, kwargs, ctx.options.dtype, cpp_wrapper=False)
    ctx.note("C++ wrapper")
    return compiled


def _inductor_usable(ctx: PlanContext):
    if ctx.options.backend not in ("auto", "native"):
        return f"backend={ctx.options.backend!r}"
    if not ctx.options.fusion:
        return "fusion=False"
    if not ctx.hardware.has_cxx_compiler:
        return "no C++ compiler (g++/clang++) on PATH; Inductor needs one. Install g++ to enable it"
    return None


def register() -> None:
    register_pass(build_inductor, name="inductor", kind="graph", modes="infer", available=_inductor_usable)
