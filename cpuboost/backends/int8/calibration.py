"""int8 calibration inputs: checked against the example input before anything is copied or quantized,
so a wrong batch is a ``CalibrationError`` that names it, never a failure deep inside PT2E."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ...errors import CalibrationError


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return repr(value) if isinstance(value, (int, float, bool, str, type(None))) else type(value).__name__


def _normalise_one(item: Any, index: int, want_spec: Any) -> tuple[tuple, dict]:
    if (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple) and isinstance(item[1], dict)
            and pytree.tree_flatten(item)[1] == want_spec):
        return item  # already normalised by check_calibration: (args, kwargs)
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise CalibrationError(f"calibration[{index}] is a {type(item).__name__}; each calibration input must be "
                           f"a tuple of positional arguments, a dict of keyword arguments or a single tensor")


def check_calibration(calibration: Any, args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """Calibration inputs as ``[(args, kwargs), ...]``, each shaped exactly like the example ``(args, kwargs)``.

    ``None`` means "no calibration data" and gives ``[]``. An empty iterable, an item of another structure,
    tensor shape or dtype, or a different non-tensor value is a ``CalibrationError`` naming the item and
    the difference: the exported graph is specialised to the example's shapes, so anything else would fail
    deep inside PT2E (or calibrate ranges for inputs the graph never serves).
    """
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, Mapping, str, bytes)) or not isinstance(calibration, Iterable):
        raise CalibrationError(f"calibration must be an iterable (list) of example inputs, got "
                               f"{_describe(calibration)}; wrap a single batch in a list: calibration=[batch]")
    want_leaves, want_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    items = [_normalise_one(item, i, want_spec) for i, item in enumerate(calibration)]
    if not items:
        raise CalibrationError("calibration is empty: give at least one example input (a few batches "
                               "of real data calibrate best), or calibration=None for dynamic int8")
    for i, (a, k) in enumerate(items):
        leaves, spec = pytree.tree_flatten((a, k))
        if spec != want_spec:
            raise CalibrationError(
                f"calibration[{i}] has {len(a)} positional and keyword(s) {sorted(k)}; the example input has "
                f"{len(args)} positional and keyword(s) {sorted(kwargs)} (each item must match its structure)")
        for path_index, (got, want) in enumerate(zip(leaves, want_leaves)):
            if isinstance(want, torch.Tensor):
                if not isinstance(got, torch.Tensor):
                    raise CalibrationError(f"calibration[{i}] input #{path_index} is {_describe(got)}, "
                                           f"expected a tensor like {_describe(want)}")
                if got.shape != want.shape or got.dtype != want.dtype:
                    raise CalibrationError(
                        f"calibration[{i}] input #{path_index} is {_describe(got)} but the example input is "
                        f"{_describe(want)}: int8 graphs are built per input shape, so calibrate with "
                        f"batches of the shape and dtype it will serve")
            elif isinstance(got, torch.Tensor) or got != want:
                raise CalibrationError(f"calibration[{i}] input #{path_index} is {_describe(got)}, the example "
                                       f"input has {_describe(want)}")
    return items
