"""channels_last for conv nets: oneDNN's convolutions run without layout reorders."""
from __future__ import annotations

import torch
from torch import nn

from ..core.registry import PlanContext, register_pass


def channels_last(model: nn.Module, ctx) -> nn.Module:
    """Store 4-d conv weights as channels_last so oneDNN skips layout reorders."""
    model.to(memory_format=torch.channels_last)
    return model


def _conv_net(ctx: PlanContext):
    if not ctx.has_module(nn.Conv2d):
        return "no Conv2d layers (channels_last only helps 2-d convolutions)"
    return None


def register() -> None:
    register_pass(channels_last, name="channels_last", modes=("infer", "train"), after="fold_batchnorm", writes_weights=False,
                  available=_conv_net)
