"""Low-precision weights for the eager path: Conv/Linear weights stored in bf16/fp16 once, not cast per call."""
from __future__ import annotations

import torch
from torch import nn

from ..core.registry import PlanContext, register_pass
from ..options import dtype_name

_MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def low_precision_weights(model: nn.Module, ctx) -> nn.Module:
    """Keep Conv/Linear weights in the autocast dtype; norms and everything else stay fp32."""
    count = 0
    for mod in model.modules():
        if isinstance(mod, _MATMUL_LAYERS):
            mod.to(ctx.options.dtype)
            count += 1
    ctx.note(f"{count} layer(s) cast")
    return model


def _wanted(ctx: PlanContext):
    if ctx.options.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype={dtype_name(ctx.options.dtype)}"
    if ctx.options.inplace:
        return "inplace=True: your model must stay runnable in fp32, the reference for every new input shape"
    if ctx.options.fusion and ctx.options.backend != "eager" and (
            ctx.hardware.has_cxx_compiler or ctx.options.backend == "openvino"):
        return "fusion=True: the fused graphs (Inductor freezing, OpenVINO) hold the weights in the dtype themselves"
    if not ctx.has_module(*_MATMUL_LAYERS):
        return "no Conv/Linear layers"
    return None


def register() -> None:
    register_pass(low_precision_weights, name="low_precision_weights", modes="infer", after="channels_last", writes_weights=False,
                  available=_wanted)
