"""Training passes: train mode (autocast and the fused optimizer step live in cpuboost.training)."""
from __future__ import annotations

from ..registry import register_pass


def train_mode(model, ctx):
    """Put the model in train mode."""
    model.train()
    return model


def register() -> None:
    register_pass(train_mode, name="train_mode", modes="train")
