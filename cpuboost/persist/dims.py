"""Dynamic dims of an AOTInductor graph: which flat inputs vary, the range export proved for each, and the
check every call passes before the graph runs.

A torch.compile graph's guards refuse a call its graph was not built for; an AOTInductor graph has no guards,
and a size it was not compiled for reads out of bounds. So the dims export actually kept symbolic (a dim it
specialised stays static) are written in the graph's record with their range, and a call outside them raises
``ValueError`` (the runtime then builds for that size) instead of running.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from .treespec import describe_tree

DynamicDims = Optional[Mapping[Any, list]]


def leaf_dims(args: tuple, kwargs: dict, dynamic_dims: DynamicDims) -> dict[int, list[int]]:
    """``dynamic_dims`` (positional index or keyword -> dims, as the runtime gives them) as flat input index ->
    dims, counting leaves in ``describe_tree``'s order (positional arguments, then keywords)."""
    found: dict[int, list[int]] = {}
    if not dynamic_dims:
        return found
    count = 0
    for where, value in [*enumerate(args), *kwargs.items()]:
        leaves: list = []
        describe_tree(value, leaves, inputs=True)
        if where in dynamic_dims and isinstance(value, torch.Tensor):
            found[count] = sorted(dynamic_dims[where])
        count += len(leaves)
    return found


def export_shapes(leaves: list, wanted: dict[int, list[int]]) -> tuple:
    """torch.export's ``dynamic_shapes`` for the flat runner: ``Dim.AUTO`` on each wanted dim (export relates
    dims that must be equal, such as the ids' and the mask's length, and keeps what it must specialise)."""
    auto = torch.export.Dim.AUTO
    per_leaf = tuple({d: auto for d in wanted[i]} if i in wanted else None for i in range(len(leaves)))
    return (per_leaf,)  # the runner takes ``*tensors``: export sees one argument, the tuple of leaves


def exported_ranges(exported: Any) -> dict[str, dict[str, list]]:
    """Flat input index -> {dim: [lowest, highest or None]} for the dims the exported program kept symbolic."""
    user_inputs = set(exported.graph_signature.user_inputs)
    placeholders = [n for n in exported.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    ranges: dict[str, dict[str, list]] = {}
    for index, node in enumerate(placeholders):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        for dim, size in enumerate(value.shape):
            if isinstance(size, torch.SymInt):
                ranges.setdefault(str(index), {})[str(dim)] = _range(exported, size)
    return ranges


def _range(exported: Any, size: torch.SymInt) -> list:
    symbol = size.node.expr
    bounds = exported.range_constraints.get(symbol)
    if bounds is None:  # an expression of a symbol (export writes ranges for symbols only): no bound known
        return [2, None]
    try:
        upper = int(bounds.upper)
    except (TypeError, ValueError, OverflowError, AttributeError):  # torch's int_oo: no upper bound
        upper = None
    return [int(bounds.lower), upper]


def check_call(leaves: list, specs: list, ranges: dict[str, dict[str, list]]) -> None:
    """Raise ``ValueError`` when a flat input's shape is not one the graph was compiled for: static dims as
    recorded, dynamic ones inside their range (and the graph's inputs then made contiguous by the caller)."""
    for index, (tensor, spec) in enumerate(zip(leaves, specs)):
        dynamic = ranges.get(str(index), {})
        shape = list(tensor.shape)
        if len(shape) != len(spec["shape"]):
            raise ValueError(f"input {index} has {len(shape)} dims; the graph takes {len(spec['shape'])}")
        for dim, (size, recorded) in enumerate(zip(shape, spec["shape"])):
            bounds = dynamic.get(str(dim))
            if bounds is None and size != recorded:
                raise ValueError(f"input {index} dim {dim} is {size}; the graph was compiled for {recorded} only")
            if bounds is not None and (size < bounds[0] or (bounds[1] is not None and size > bounds[1])):
                raise ValueError(f"input {index} dim {dim} is {size}, outside the graph's range {bounds}")
