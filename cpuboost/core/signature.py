"""The cache key of a call: everything that can change which graph is correct for it."""
from __future__ import annotations

from typing import Any, Hashable

import torch
from torch.utils import _pytree as pytree

_SCALARS = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


def _key(value: Any) -> Hashable:
    """Hashable description of one input; plain containers are walked directly (pytree is slow per call)."""
    if isinstance(value, torch.Tensor):
        return (value.shape, value.stride(), value.dtype, value.device, value.requires_grad)
    if isinstance(value, _SCALARS):
        # Python values steer control flow, so the value itself is part of the key.
        return (type(value), value)
    kind = type(value)
    if kind is tuple or kind is list:
        return (kind, tuple(_key(v) for v in value))
    if kind is dict:
        return (kind, tuple((k, _key(v)) for k, v in value.items()))
    leaves, spec = pytree.tree_flatten(value)
    if len(leaves) == 1 and leaves[0] is value:
        return ("object", kind, id(value))
    return (str(spec), tuple(_key(leaf) for leaf in leaves))


def call_key(args: tuple, kwargs: dict) -> Hashable:
    """Shapes, strides, dtypes and structure of the inputs, plus the autocast state around the call."""
    autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
    return (_key(args), _key(kwargs), autocast)


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
    if all(isinstance(a, torch.Tensor) for a in args) and all(isinstance(v, torch.Tensor) for v in kwargs.values()):
        return any(a.requires_grad for a in args) or any(v.requires_grad for v in kwargs.values())
    leaves, _ = pytree.tree_flatten((args, kwargs))
    return any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)
