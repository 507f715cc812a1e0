"""Inductor, the native backend: torch.compile with freezing (weight prepack, constant folding, fused
epilogues), compiled now for one example input.

Inductor's config is patched only around the build, never globally. Each build compiles a runner with a
fresh code object, so every graph owns its dynamo cache entry and dropping it lets the compiled code go.
Call-time recompiles are forbidden: a guard miss raises instead of serving a graph nobody verified.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ..core.precision import fresh_runner

DynamicDims = Optional[Mapping[Any, list]]


class RecompileRefused(RuntimeError):
    """The compiled graph's guards rejected a call; the runtime treats it as a new signature."""


def _mark_dynamic(args: tuple, kwargs: dict, dynamic_dims: DynamicDims) -> None:
    if not dynamic_dims:
        return
    for where, dims in dynamic_dims.items():
        value = kwargs.get(where) if isinstance(where, str) else args[where]
        if isinstance(value, torch.Tensor):
            for dim in dims:
                torch._dynamo.mark_dynamic(value, dim)


class CompiledGraph:
    """A compiled runner that may only run the graph built for it (no silent call-time recompile)."""

    def __init__(self, compiled: Callable, cpp_wrapper: bool) -> None:
        self.compiled = compiled
        self.cpp_wrapper = cpp_wrapper

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self.compiled(*args, **kwargs)
        except RuntimeError as exc:
            if "fail_on_recompile" in str(exc) or "Detected recompile" in str(exc):
                raise RecompileRefused(str(exc).splitlines()[0]) from exc
            raise


def compile_now(model: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype, cpp_wrapper: bool,
                dynamic_dims: DynamicDims = None) -> CompiledGraph:
    """Compile ``model`` under ``dtype``'s autocast for this input, with freezing; returns the callable."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    compiled = torch.compile(fresh_runner(model, dtype), backend="inductor",
                             dynamic=None if dynamic_dims else False)
    _mark_dynamic(args, kwargs, dynamic_dims)
    with inductor_config.patch(freezing=True, cpp_wrapper=cpp_wrapper), \
            dynamo_config.patch(recompile_limit=64), torch.no_grad():
        compiled(*args, **kwargs)
    return CompiledGraph(compiled, cpp_wrapper)


def build(model: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype, note: Callable[[str], None],
          dynamic_dims: DynamicDims = None) -> CompiledGraph:
    """Inductor's C++ wrapper first (kernels called without a Python line per op: 1.16x ResNet-50 b1 bf16,
    1.07x BERT-base b1 over the Python wrapper, benchmarks/wrapper.py on AMX); the Python wrapper where the
    C++ one cannot compile the model, with the reason noted."""
    try:
        graph = compile_now(model, args, kwargs, dtype, cpp_wrapper=True, dynamic_dims=dynamic_dims)
    except Exception as exc:  # any C++-wrapper failure: the Python wrapper is the same graph, proven
        note(f"C++ wrapper failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); Python wrapper used")
        return compile_now(model, args, kwargs, dtype, cpp_wrapper=False, dynamic_dims=dynamic_dims)
    note("C++ wrapper")
    return graph
