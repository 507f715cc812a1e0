"""The int8 graph pass (``dtype="int8"``): static quantization with calibration inputs, dynamic activation
quantization without; verified against eager fp32 by what int8 can do and raced like every candidate."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..core.registry import PassContext, PlanContext, register_pass


def build_int8(model: nn.Module, args: tuple, kwargs: dict, ctx: PassContext) -> Callable:
    """int8: quantize (torchao PT2E with the x86 Inductor quantizer, or dynamic), then Inductor freezing."""
    from ..backends import int8

    if ctx.dynamic_dims:
        raise NotImplementedError(f"the int8 graph is built static; it drops out for dynamic dims {ctx.dynamic_dims}")
    calibration = int8.check_calibration(ctx.options.calibration, args, kwargs) if ctx.options.calibration \
        is not None else None
    return int8.build(model, args, kwargs, calibration, ctx.note, artifact_dir=ctx.artifact_dir,
                      tolerance=ctx.options.tolerance)


def build_openvino_int8(model: nn.Module, args: tuple, kwargs: dict, ctx: PassContext) -> Callable:
    """Static int8 (calibration given) converted by OpenVINO: its own int8 kernels, a build of seconds."""
    from ..backends.int8 import via_openvino

    if ctx.dynamic_dims:
        raise NotImplementedError(f"the int8 graph is built static; it drops out for dynamic dims {ctx.dynamic_dims}")
    precision = torch.bfloat16 if ctx.hardware.native(torch.bfloat16) else torch.float32
    return via_openvino.build(model, args, kwargs, ctx.options.calibration, ctx.note, precision,
                              ctx.options.tolerance, artifact_dir=ctx.artifact_dir)


def _openvino_int8_wanted(ctx: PlanContext) -> Optional[str]:
    from ..backends import openvino_availability

    if ctx.options.dtype != torch.int8:
        return "dtype is not int8"
    if ctx.options.backend not in ("auto", "openvino"):
        return f"backend={ctx.options.backend!r}"
    if ctx.options.calibration is None:
        return "no calibration data: OpenVINO int8 is static only (the Inductor int8 rung quantizes dynamically)"
    verdict = openvino_availability()
    if not verdict.usable:
        return verdict.reason
    from ..backends import int8

    return int8.quantizable(ctx.model)


def _int8_wanted(ctx: PlanContext) -> Optional[str]:
    if ctx.options.dtype != torch.int8:
        return "dtype is not int8"
    if ctx.options.backend not in ("auto", "native"):
        return f"backend={ctx.options.backend!r} (int8 graphs are built by Inductor)"
    if not ctx.hardware.has_cxx_compiler:
        return "no C++ compiler (g++/clang++) on PATH; int8 graphs need Inductor"
    from ..backends import int8

    return int8.quantizable(ctx.model)


def register() -> None:
    register_pass(build_int8, name="int8", kind="graph", modes="infer", before="inductor",
                  available=_int8_wanted, dtypes=(torch.int8,))
    register_pass(build_openvino_int8, name="openvino_int8", kind="graph", modes="infer", before="int8",
                  available=_openvino_int8_wanted, dtypes=(torch.int8,))
