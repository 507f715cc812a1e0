"""The Inductor graph pass (the native backend, ``cpuboost.backends.inductor``)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..core.registry import PassContext, PlanContext, register_pass


def build_inductor(model: nn.Module, args: tuple, kwargs: dict, ctx: PassContext) -> Callable:
    """torch.compile(Inductor) with freezing, compiled now for this input signature."""
    from ..backends import inductor

    if ctx.artifact_dir is not None:  # compiled in a child process: its compile's memory goes with it
        from ..persist import warm as persist

        try:
            return persist.inductor_artifact(model, args, kwargs, ctx.options.dtype, ctx.artifact_dir, ctx.note,
                                             dynamic_dims=ctx.dynamic_dims)
        except Exception as exc:  # a model torch.export cannot take: torch.compile, not persisted
            ctx.note(f"not persisted (AOTInductor: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    return inductor.build(model, args, kwargs, ctx.options.dtype, ctx.note, dynamic_dims=ctx.dynamic_dims)


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
