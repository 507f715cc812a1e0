"""Ops OpenVINO's PyTorch frontend has no rule for, spelt with ops it has while the model is traced.

transformers' masks find packed sequences with ``torch.diff(position_ids, prepend=...)`` (Whisper's decoder, and
every model built on ``masking_utils``); one ``aten::diff`` failed the whole conversion ("No conversion rule found
for operations: aten::diff"), so neither OpenVINO nor cpuboost's OpenVINO rung could serve those models. The
spelling is exact (integer and bool inputs included), and the converted graph is still checked against eager.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode


def _along(x: torch.Tensor, dim: int, part: slice) -> torch.Tensor:
    index = [slice(None)] * x.dim()
    index[dim] = part
    return x[tuple(index)]


def diff(input: torch.Tensor, n: int = 1, dim: int = -1, prepend: torch.Tensor | None = None,
         append: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.diff`` from concatenation and slices: open-ended slices, so a dynamic length stays dynamic."""
    if n == 0:  # torch.diff returns its input then, prepend and append left out
        return input
    parts = [t for t in (prepend, input, append) if t is not None]
    x = torch.cat(parts, dim) if len(parts) > 1 else input
    dim = dim % x.dim()
    for _ in range(n):
        later, earlier = _along(x, dim, slice(1, None)), _along(x, dim, slice(None, -1))
        x = later != earlier if x.dtype == torch.bool else later - earlier  # torch.diff of bools is an xor
    return x


_SPELLINGS = {torch.diff: diff, torch.Tensor.diff: diff}


class OpenVINOSpellings(TorchFunctionMode):
    """Around a trace for OpenVINO: the calls in ``_SPELLINGS`` are recorded as their spelling."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        spelling = _SPELLINGS.get(func)
        return (spelling or func)(*args, **(kwargs or {}))
