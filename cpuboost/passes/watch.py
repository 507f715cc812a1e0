"""One real forward of the example input with hooks attached: how module passes find what they rewrite (which
BatchNorm a conv feeds, which pool's window covers its map) without tracing, so Python control flow is fine."""
from __future__ import annotations

import torch
from torch import nn

from ..core.registry import PassContext


def watched_forward(model: nn.Module, ctx: PassContext, handles: list) -> None:
    """Runs ``model`` on the pass's example input once; the hooks in ``handles`` are removed however it ends."""
    try:
        with torch.no_grad():
            model(*ctx.example_args, **ctx.example_kwargs)
    finally:
        for handle in handles:
            handle.remove()
