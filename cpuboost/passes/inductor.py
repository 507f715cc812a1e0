"""The Inductor graph pass (the native backend, ``cpuboost.backends.inductor``)."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..core.registry import PassContext, PlanContext, register_pass

# A dynamic graph is compiled as a kept AOTInductor package in a child process from this many bytes of weights.
# The child costs a fixed ~9 s more than compiling here (interpreter and Inductor start, the program's round trip:
# 4-layer BERT, 208 MB, 31.6 against 22.7 s), while what a compile here leaves in the process grows with the
# model (BERT-base, 440 MB: ~430 MiB retained, 1.28x the hand compile's; in the child: 0.94x). Below it, the
# fixed cost dominates: torch.compile here, not kept (a static graph is always kept: one size, one compile).
CHILD_COMPILE_MIN_BYTES = 256 << 20


def build_inductor(model: nn.Module, args: tuple, kwargs: dict, ctx: PassContext) -> Callable:
    """torch.compile(Inductor) with freezing, compiled now for this input signature; with the persistent cache
    on, an AOTInductor package compiled in a child process (its compile's memory goes with it) and kept."""
    from ..backends import inductor

    if ctx.artifact_dir is not None:
        from ..persist import aoti, warm as persist

        if not ctx.dynamic_dims or aoti.module_bytes(model) >= CHILD_COMPILE_MIN_BYTES:
            try:
                return persist.inductor_artifact(model, args, kwargs, ctx.options.dtype, ctx.artifact_dir,
                                                 ctx.note, dynamic_dims=ctx.dynamic_dims)
            except Exception as exc:  # a model torch.export cannot take: torch.compile, not persisted
                ctx.note(f"not persisted (AOTInductor: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        else:
            ctx.note(f"dynamic graph compiled in this process, not kept (weights under "
                     f"{CHILD_COMPILE_MIN_BYTES >> 20} MiB)")
    return inductor.build(model, args, kwargs, ctx.options.dtype, ctx.note, dynamic_dims=ctx.dynamic_dims,
                          out_dtypes=ctx.out_dtypes)


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
