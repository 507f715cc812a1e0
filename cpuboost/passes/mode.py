"""Eval mode for inference: dropout off, BatchNorm on running statistics."""
from __future__ import annotations

from ..core.registry import register_pass


def eval_mode(model, ctx):
    """Switch to eval: dropout off, BatchNorm uses running statistics."""
    was_training = sum(m.training for m in model.modules())
    model.eval()
    if was_training:
        ctx.note(f"{was_training} submodule(s) were in train mode")
    return model


def register() -> None:
    register_pass(eval_mode, name="eval", modes="infer", writes_weights=False)
