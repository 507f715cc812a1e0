"""Weight freshness: notice any edit of a weight or buffer before a graph built from the old ones serves.

Four cheap checks per call, over every parameter and buffer of the user's model:
- identity: each module's table still holds the same tensor object (``module.weight = nn.Parameter(...)``,
  ``load_state_dict(assign=True)``);
- binding and in-place writes: each tensor's ``data_ptr`` and version counter (``p.data = t``,
  ``p.mul_()`` under no_grad, optimizer steps, ``load_state_dict``);
- a sampled content fingerprint: the raw bits of 8 evenly spaced elements of every tensor, read in one
  gather (an index into one flat view of the address range that holds them), catching writes through
  ``.data`` that bump no version counter (``p.data.mul_(3)``, EMA updates). It runs only after the pointer
  check passed, so every address it reads belongs to a live tensor. A write that changes none of the
  sampled elements of any tensor (a few entries edited by hand through ``.data``) is the one edit it can
  miss; ``model.invalidate()`` covers that case;
- plain Python attributes of every module and of ``model.config`` (numbers, strings, flags, tuples).
Measured per call (benchmarks/freshness.py): see README "What is checked, and what it costs".
"""
from __future__ import annotations

import ctypes
import itertools
import operator
from typing import Optional

import torch
from torch import nn

SAMPLES_PER_TENSOR = 8
_DATA_PTR = torch.Tensor.data_ptr
_VERSION = operator.attrgetter("_version")
_PLAIN = (bool, int, float, str, type(None), tuple)


class _Sampler:
    """Reads a fixed set of 16-bit words at known addresses in one indexing call."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        live = [t for t in tensors if t.numel() and t.element_size() >= 2 and t.data_ptr() % 2 == 0]
        self.flat: Optional[torch.Tensor] = None
        if not live:
            return
        low = min(t.data_ptr() for t in live)
        high = max(t.data_ptr() + t.numel() * t.element_size() for t in live)
        try:
            self.flat = torch.frombuffer((ctypes.c_int16 * ((high - low) // 2)).from_address(low), dtype=torch.int16)
        except (ValueError, OverflowError, TypeError, MemoryError):
            return  # an address range this platform cannot view: the other checks still run
        index = []
        for t in live:
            start, words = (t.data_ptr() - low) // 2, t.element_size() // 2
            extent = _extent(t)
            step = max(1, extent // SAMPLES_PER_TENSOR)
            index += [start + i * words for i in range(0, min(extent, SAMPLES_PER_TENSOR * step), step)]
        self.index = torch.tensor(index, dtype=torch.long)
        self.bits = self.flat[self.index].clone()

    def same(self) -> bool:
        return self.flat is None or torch.equal(self.flat[self.index], self.bits)


def _extent(t: torch.Tensor) -> int:
    """Elements from the tensor's first address to its last (dense layouts: its numel)."""
    if t.is_contiguous():
        return t.numel()
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if stride > 0)


class _Nones:
    """An endless row of None defaults for ``map(getattr, ...)`` (a deleted attribute reads as None)."""

    def __getitem__(self, item: slice):
        return itertools.repeat(None, item.stop)


_NONES = _Nones()


class WeightWatch:
    """A record of the model's weights at build time; ``changed()`` says what differs now (or None)."""

    def __init__(self, model: nn.Module) -> None:
        self.slots: list[tuple[dict, str, torch.Tensor]] = []
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is not None:
                        self.slots.append((table, name, tensor))
        self.tables = [table for table, _, _ in self.slots]
        self.names = [name for _, name, _ in self.slots]
        self.tensors = [t for _, _, t in self.slots]
        self.ptrs = [t.data_ptr() for t in self.tensors]
        self.versions = [t._version for t in self.tensors]
        self.sampler = _Sampler(self.tensors)
        self.model = model
        self.shape = self._structure()
        # plain Python attributes that steer forward (``self.scale``, ``config.output_hidden_states``): the
        # working copy holds its own copies of them, so a change on the user's model must rebuild
        owners = [*model.modules()]
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "__dict__") and not isinstance(config, nn.Module):
            owners.append(config)
        found = [(owner, name, value) for owner in owners for name, value in vars(owner).items()
                 if not name.startswith("_") and name != "training" and isinstance(value, _PLAIN)]
        self.attr_owners = [o for o, _, _ in found]
        self.attr_names = [n for _, n, _ in found]
        self.attr_values = [v for _, _, v in found]

    def _structure(self) -> tuple[int, int]:
        modules = list(self.model.modules())
        return len(modules), sum(len(m._parameters) + len(m._buffers) for m in modules)

    def changed(self) -> Optional[str]:
        """What was edited since the build (None: nothing)."""
        if not all(map(operator.is_, map(dict.get, self.tables, self.names), self.tensors)):
            return "a weight or buffer was replaced by another tensor (attribute assignment or assign=True)"
        if list(map(_DATA_PTR, self.tensors)) != self.ptrs:
            return "a weight was rebound (.data = ...)"
        if list(map(_VERSION, self.tensors)) != self.versions:
            return "a weight was modified in place"
        if not self.sampler.same():
            return "a weight's values changed (a write through .data)"
        if list(map(getattr, self.attr_owners, self.attr_names, _NONES[:len(self.attr_names)])) != self.attr_values:
            return "a plain attribute of the model (or its config) changed"
        return None

    def structure_changed(self) -> bool:
        """Modules, parameters or buffers added or removed (checked when a graph is rebuilt)."""
        return self._structure() != self.shape
