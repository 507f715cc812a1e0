"""The OpenVINO graph pass (``pip install 'cpuboost[openvino]'``): convert, compile for this CPU with the
dtype's precision hint and the latency hint; verified and raced like every other candidate."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ..core.registry import PassContext, PlanContext, register_pass


def build_openvino(model: nn.Module, args: tuple, kwargs: dict, ctx: PassContext) -> Callable:
    """OpenVINO: openvino.convert_model on this input, compile_model with the dtype's precision hint."""
    from ..backends import openvino

    if ctx.artifact_dir is not None:  # the persistent cache is on: IR loaded, or written once this graph serves
        from ..backends import openvino_ir

        return openvino_ir.build(model, args, kwargs, ctx.options.dtype, ctx.note, ctx.dynamic_dims,
                                 ctx.artifact_dir)
    return openvino.build(model, args, kwargs, ctx.options.dtype, ctx.note, dynamic_dims=ctx.dynamic_dims)


def _openvino_wanted(ctx: PlanContext) -> Optional[str]:
    from ..backends import openvino_availability

    if ctx.options.backend not in ("auto", "openvino"):
        return f"backend={ctx.options.backend!r}"
    if ctx.options.backend == "auto" and not ctx.options.fusion:
        return "fusion=False (OpenVINO compiles a fused graph)"
    verdict = openvino_availability()
    return None if verdict.usable else verdict.reason


def register() -> None:
    register_pass(build_openvino, name="openvino", kind="graph", modes="infer", after="inductor",
                  available=_openvino_wanted)
