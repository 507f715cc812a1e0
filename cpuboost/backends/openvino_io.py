"""How a call's arguments reach an OpenVINO graph and back: where the tensors sit in ``(args, kwargs)``, the
flat module OpenVINO's frontend traces, and torch tensors handed over as ``ov.Tensor`` without a copy."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


class _Inputs:
    """Where the tensors of a call sit in (args, kwargs), and the values fixed at trace time."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        kwargs = dict(sorted(kwargs.items()))
        with_path, self.spec = pytree.tree_flatten_with_path((args, kwargs))
        self.leaves = [leaf for _, leaf in with_path]
        self.slots = [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, torch.Tensor)]
        self.fixed = [(i, leaf) for i, leaf in enumerate(self.leaves) if not isinstance(leaf, torch.Tensor)]
        self.names = [_leaf_name(with_path[i][0]) for i in self.slots]
        self.dtypes = [self.leaves[i].dtype for i in self.slots]
        # fast path: every positional and keyword argument is itself a tensor
        self.flat_call = all(isinstance(a, torch.Tensor) for a in args) and all(
            isinstance(v, torch.Tensor) for v in kwargs.values())
        self.n_args, self.kw_names = len(args), tuple(kwargs)

    def example(self) -> tuple:
        return tuple(self.leaves[i] for i in self.slots)

    def forget_example(self) -> None:
        """Drop the example tensors (the template keeps only the values fixed at trace time)."""
        for i in self.slots:
            self.leaves[i] = None

    def rebuild(self, tensors) -> tuple[tuple, dict]:
        leaves = list(self.leaves)
        for slot, tensor in zip(self.slots, tensors):
            leaves[slot] = tensor
        return pytree.tree_unflatten(leaves, self.spec)

    def gather(self, args: tuple, kwargs: dict) -> tuple:
        if self.flat_call and len(args) == self.n_args and len(kwargs) == len(self.kw_names):
            try:
                return (*args, *[kwargs[k] for k in self.kw_names])
            except KeyError:
                pass
        else:
            leaves, spec = pytree.tree_flatten((args, dict(sorted(kwargs.items()))))
            if spec == self.spec and all(type(leaves[i]) is type(v) and (leaves[i] is v or leaves[i] == v)
                                         for i, v in self.fixed):
                tensors = tuple(leaves[i] for i in self.slots)
                if all(isinstance(t, torch.Tensor) for t in tensors):
                    return tensors
        raise ValueError("this OpenVINO graph was built for another call structure (arguments, keyword names or "
                         "non-tensor values differ); build one for this signature")


def _key_name(key: int | str) -> str:
    """A dynamic_dims key (a position or a keyword) as the input's name."""
    return f"arg{key}" if isinstance(key, int) and not isinstance(key, bool) else str(key)


def _leaf_name(path) -> str:
    where, first, *rest = path  # (args or kwargs, position or keyword, deeper keys)
    head = f"arg{first.idx}" if where.idx == 0 else str(first.key)
    return head + "".join(f".{getattr(k, 'idx', getattr(k, 'key', getattr(k, 'name', '?')))}" for k in rest)


class _Flat(torch.nn.Module):
    """Tensors in, tuple of tensors out: the form OpenVINO's frontend traces."""

    def __init__(self, model: torch.nn.Module, inputs: _Inputs) -> None:
        super().__init__()
        self.model, self._inputs = model, inputs

    def forward(self, *tensors: torch.Tensor) -> tuple:
        args, kwargs = self._inputs.rebuild(tensors)
        leaves = pytree.tree_leaves(self.model(*args, **kwargs))
        return tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))


def _to_ov(tensor: torch.Tensor, ov_type, keep: list) -> Any:
    """An ov.Tensor over the tensor's memory. The ov.Tensor does not keep that memory alive: a contiguous
    copy made here goes into ``keep``, which the caller holds until the inference is done."""
    import openvino as ov

    if tensor.requires_grad:
        tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
        keep.append(tensor)
    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: hand OpenVINO the bits
        return ov.Tensor(tensor.view(torch.int16).numpy(), list(tensor.shape), ov_type)
    return ov.Tensor(tensor.numpy(), shared_memory=True)


def _static(shape: list) -> bool:
    return all(isinstance(d, int) and d >= 0 for d in shape)


def _bounded(longest: int) -> Any:
    import openvino as ov

    return ov.Dimension(1, longest)


def _partial(shape: list) -> Any:
    """An OpenVINO PartialShape: ints as they are, -1 unbounded, Dimensions (bounded ranges) kept."""
    import openvino as ov

    return ov.PartialShape([d if isinstance(d, ov.Dimension) else ov.Dimension(d) for d in shape])
