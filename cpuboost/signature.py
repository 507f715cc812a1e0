"""The cache key of a call: everything that can change which graph is correct for it."""
from __future__ import annotations

from typing import Any, Hashable

import torch
from torch.utils import _pytree as pytree

_SCALARS = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


def _leaf_key(leaf: Any) -> Hashable:
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), tuple(leaf.stride()), leaf.dtype, leaf.device.type, leaf.requires_grad)
    if isinstance(leaf, _SCALARS):
        # Python values steer control flow, so the value itself is part of the key.
        return ("V", type(leaf), leaf)
    return ("O", type(leaf), id(leaf))


def call_key(args: tuple, kwargs: dict) -> Hashable:
    """Shapes, strides, dtypes and structure of the inputs, plus the autocast state around the call."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
    return (str(spec), tuple(_leaf_key(x) for x in leaves), autocast)


def describe(args: tuple, kwargs: dict) -> str:
    """A short human-readable form of a signature for reports."""
    parts = []
    leaves, _ = pytree.tree_flatten((args, kwargs))
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            dt = str(leaf.dtype).replace("torch.", "")
            parts.append(f"{dt}[{'x'.join(map(str, leaf.shape))}]")
        else:
            parts.append(repr(leaf)[:20])
    return ", ".join(parts) if parts else "()"


def any_requires_grad(args: tuple, kwargs: dict) -> bool:
    leaves, _ = pytree.tree_flatten((args, kwargs))
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)
