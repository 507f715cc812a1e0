"""The cache key of a call: everything that can change which graph is correct for it."""
from __future__ import annotations

from typing import Any, Hashable

import torch
from torch.utils import _pytree as pytree

from ..errors import InvalidOptionError

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


def _standard_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _channels_last(value: torch.Tensor) -> bool:
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return value.dim() in formats and value.is_contiguous(memory_format=formats[value.dim()])


def _standard(value: Any) -> Any:
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.dim() < 2 or not value.numel():
        return value
    if not value.is_contiguous():
        return value if _channels_last(value) else value.contiguous()
    if 1 not in value.shape:  # contiguous without a size-1 dim: its strides are the standard ones already
        return value
    strides = _standard_strides(value.shape)
    return value if value.stride() == strides else value.as_strided(value.shape, strides, value.storage_offset())


def standard_layout(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's top-level tensors in the layout graphs are built for; the caller's tensors are left alone.
    Contiguous ones whose size-1 dim carries another stride (``ids[:, :32]`` of a 1 x 128 tensor: strides
    (128, 1)) as a standard-strided view of the same memory: a compiled graph guards ``stride(0) == size(1)`` and
    refused such a call, so a sliced batch of one rebuilt the whole graph (a Llama's 6.3 s compile) where its
    dynamic graph serves that length. Non-contiguous ones (a cut of a larger batch, an expanded mask) as a
    contiguous copy: they were a family of their own, a whole build and race (a tiny BERT: 4.9 s) for the same
    values; channels_last tensors stay as they are (a layout a graph is built for)."""
    return tuple(_standard(a) for a in args), {k: _standard(v) for k, v in kwargs.items()}


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


def _shape_free(value: Any) -> Hashable:
    """A top-level input's key with its sizes left out: rank, dtype, device, layout, requires_grad."""
    if isinstance(value, torch.Tensor):
        layout = "cl" if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last) \
            and not value.is_contiguous() else ("c" if value.is_contiguous() else "s")
        return ("tensor", value.dim(), value.dtype, value.device, value.requires_grad, layout)
    return _key(value)


def family_key(args: tuple, kwargs: dict) -> Hashable:
    """The call's structure without the sizes of its top-level tensors: calls that differ only in those
    sizes (sequence length, batch, image size) share one family and may share one dynamic graph."""
    autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
    return (tuple(_shape_free(a) for a in args), tuple((k, _shape_free(v)) for k, v in kwargs.items()), autocast)


def top_level_shapes(args: tuple, kwargs: dict) -> dict[Any, tuple[int, ...]]:
    """Sizes of the top-level tensor inputs, by position (int) or keyword name (str)."""
    shapes: dict[Any, tuple[int, ...]] = {i: tuple(a.shape) for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    shapes.update({k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    return shapes


def varying_dims(first: dict[Any, tuple[int, ...]], now: dict[Any, tuple[int, ...]]) -> dict[Any, list[int]]:
    """The dims whose size differs between two calls of one family."""
    dims = {where: [d for d, (a, b) in enumerate(zip(first[where], shape)) if a != b]
            for where, shape in now.items() if where in first}
    return {where: ds for where, ds in dims.items() if ds}


SEQUENCE_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def sequence_dims(shapes: dict[Any, tuple[int, ...]]) -> dict[Any, list[int]]:
    """Dim 1 of the inputs whose names say they are token sequences (transformers' names), where it is longer
    than 1: a text model meets a new length almost every call, so its first graph is built dynamic in that dim
    and one build serves the family (instead of a static build, then a dynamic one at the second length).
    Dim 0 too when it is a batch of more than one: a batched pipeline's or loader's last batch is smaller
    (BERT-base pipeline, batch 8: that tail batch cost a second build). Then dim 0 of every other input of two
    or more dims that is as long: a batch shrinks in all its inputs at once, and marked in the token inputs only,
    an encoder-decoder's ``decoder_input_ids`` kept its batch while they changed (BART b8: OpenVINO's check of
    its dynamic graph met a batch of 9 beside one of 8, and eager refused that input)."""
    dims = {w: [d for d in (0, 1) if shape[d] > 1] for w, shape in shapes.items()
            if w in SEQUENCE_INPUTS and len(shape) == 2 and shape[1] > 1}
    batches = {shapes[w][0] for w, d in dims.items() if 0 in d}
    if len(batches) == 1:
        batch = batches.pop()
        dims.update({w: [0] for w, shape in shapes.items() if w not in dims and len(shape) >= 2 and shape[0] == batch})
    return dims


def checked_dims(declared: dict, shapes: dict) -> dict:
    """``dynamic_dims`` checked against this call: every input named must be a tensor with those dims."""
    for where, dims in declared.items():
        if where not in shapes:
            inputs = ", ".join(repr(w) for w in shapes) or "none"
            msg = (f"dynamic_dims names input {where!r}, which this call does not pass as a tensor (tensor inputs: "
                   f"{inputs}); name a keyword argument or a positional index from those")
            raise InvalidOptionError(msg)
        rank = len(shapes[where])
        bad = [d for d in dims if not -rank <= d < rank]
        if bad:
            msg = (f"dynamic_dims[{where!r}] = {list(dims)} names dim(s) {bad}, but that input has {rank} dims "
                   f"(shape {list(shapes[where])}); use indices 0..{rank - 1}")
            raise InvalidOptionError(msg)
    return {w: sorted(d % len(shapes[w]) for d in dims) for w, dims in declared.items() if dims}
