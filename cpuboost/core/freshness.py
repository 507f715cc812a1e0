"""Weight freshness: notice any edit of a weight or buffer before a graph built from the old ones serves.

Four cheap checks per call, over every parameter and buffer of the user's model (less what ``UNREAD_IN_EVAL``
says torch's own modules never read in eval):
- identity: each module's table still holds the same tensor object (``module.weight = nn.Parameter(...)``,
  ``load_state_dict(assign=True)``);
- binding and in-place writes: each tensor's ``data_ptr`` and version counter (``p.data = t``,
  ``p.mul_()`` under no_grad, optimizer steps, ``load_state_dict``);
- a sampled content fingerprint: every byte of 8 evenly spaced elements of every tensor (sign, exponent
  and mantissa alike), catching writes through ``.data`` that bump no version counter (``p.data.mul_(2)``,
  ``neg_()``, EMA updates), read in one gather. The sampler holds a view of each sampled storage, so it
  never reads memory that a thread rebinding ``.data`` has freed. A write that changes none of the sampled elements of any tensor (a few entries edited
  by hand through ``.data``) is the one edit it can miss; ``model.invalidate()`` covers that case;
- plain Python attributes of every module and of ``model.config`` (numbers, strings, flags, tuples).
Measured per call (benchmarks/freshness.py): see README "What is checked, and what it costs".
"""
from __future__ import annotations

import ctypes
import operator
from typing import Optional

import torch
from torch import nn

SAMPLES_PER_TENSOR = 8
_DATA_PTR = torch.Tensor.data_ptr
_VERSION = operator.attrgetter("_version")
_PLAIN = (bool, int, float, str, type(None), tuple)
# Config fields that record where a model came from or how it was saved, read by no forward: transformers'
# save_pretrained sets ``architectures`` and ``dtype`` (None before), so watching them rebuilt every graph after
# each checkpoint (Qwen2-shaped, 12 layers: the next generate() took 25 s instead of 1).
CONFIG_METADATA = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version", "name_or_path",
                             "auto_map", "custom_pipelines"})


class _Sampler:
    """Reads the whole bytes of a fixed set of elements of live tensors, a gather per word size.

    ``views`` hold the sampled storages, so every address read stays allocated while the sampler lives, even
    when another thread rebinds ``.data`` (the old storage is then kept until the next check drops the
    graph). Each gather indexes one flat view, in words of up to 4 bytes, over the span of those storages
    (ResNet-50's 320 tensors: one int32 gather of 2.6k words); where the platform cannot map that span, one
    ``torch.cat`` per element size reads the views themselves (about 15 times slower: ``cat`` copies each
    strided view separately).

    The gathers run in numpy where it is installed: right after a served call (MobileNetV2 on OpenVINO, 2 cores)
    torch's gather and compare took 53-72 us, numpy's 17-22 (in a loop: 10 and 3)."""

    def __init__(self, tensors: list[torch.Tensor], use_numpy: bool = True) -> None:
        self.views = [v for v in map(_samples, tensors) if v is not None]
        self.gathers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.groups: list[list[torch.Tensor]] = []
        if self.views:
            low = min(v.data_ptr() for v in self.views) // 4 * 4
            high = max(v.data_ptr() + (v.shape[0] - 1) * v.stride(0) + v.shape[1] for v in self.views)
            words: dict[int, list[int]] = {}
            for v in self.views:
                width = next(w for w in (4, 2, 1) if v.shape[1] % w == 0 and (v.data_ptr() - low) % w == 0)
                words.setdefault(width, []).extend(
                    (v.data_ptr() - low + i * v.stride(0)) // width + j
                    for i in range(v.shape[0]) for j in range(v.shape[1] // width))
            try:
                for width, index in sorted(words.items()):
                    flat = torch.frombuffer((ctypes.c_uint8 * (high - low)).from_address(low),
                                            dtype=torch.uint8)[: (high - low) // width * width]
                    self.gathers.append((flat.view(_WORDS[width]), torch.tensor(index, dtype=torch.long)))
            except (ValueError, OverflowError, TypeError, MemoryError, RuntimeError):
                self.gathers = []
                groups: dict[int, list[torch.Tensor]] = {}
                for v in self.views:
                    groups.setdefault(v.shape[1], []).append(v)
                self.groups = list(groups.values())
        self.numpy_gathers = _as_numpy(self.gathers) if use_numpy else []
        self.bits = self._read()

    def _read(self) -> list:
        if self.numpy_gathers:
            return [flat[index].tobytes() for flat, index in self.numpy_gathers]
        if self.gathers:
            return [flat[index] for flat, index in self.gathers]
        return [torch.cat(views) for views in self.groups]

    def same(self) -> bool:
        if self.numpy_gathers:
            return self._read() == self.bits
        return all(map(torch.equal, self._read(), self.bits))


def _as_numpy(gathers: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
    """The same gathers as numpy arrays over the same memory (none without numpy: torch reads them then)."""
    try:
        return [(flat.numpy(), index.numpy()) for flat, index in gathers]
    except (ImportError, RuntimeError, TypeError):
        return []


_WORDS = {4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _samples(t: torch.Tensor) -> Optional[torch.Tensor]:
    """Up to ``SAMPLES_PER_TENSOR`` evenly spaced elements of ``t`` as a (k, element bytes) uint8 view of its
    storage (None for what has no plain strided memory: empty, meta, sparse, quantized tensors)."""
    if not t.numel() or t.layout != torch.strided or t.is_meta or t.is_quantized or t.device.type != "cpu":
        return None
    extent = _extent(t)
    step = max(1, extent // SAMPLES_PER_TENSOR)
    count = len(range(0, min(extent, SAMPLES_PER_TENSOR * step), step))
    try:
        return t.detach().as_strided((count, 1), (step, 1), t.storage_offset()).view(torch.uint8)
    except RuntimeError:  # a dtype with no byte view: the identity, pointer and version checks still run
        return None


def _extent(t: torch.Tensor) -> int:
    """Elements from the tensor's first address to its last (dense layouts: its numel)."""
    if t.is_contiguous():
        return t.numel()
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if stride > 0)




def _unread_in_eval() -> dict[type, tuple[frozenset, frozenset]]:
    """torch's own modules (exact classes): the plain attributes and buffers their eval forward never reads.
    An edit of those cannot change an answer, and not watching them cuts the per-call check (MobileNetV2:
    951 attributes and 314 tensors watched, 481 and 262 left): sizes that the weights' shapes already fix,
    BatchNorm's momentum, affine and step counter (read only in training; train mode runs eager)."""
    conv = (frozenset({"in_channels", "out_channels", "kernel_size", "transposed", "output_padding"}), frozenset())
    norm = (frozenset({"num_features", "affine", "momentum", "track_running_stats"}),
            frozenset({"num_batches_tracked"}))
    table = {nn.Conv1d: conv, nn.Conv2d: conv, nn.Conv3d: conv,
             nn.BatchNorm1d: norm, nn.BatchNorm2d: norm, nn.BatchNorm3d: norm,
             nn.Linear: (frozenset({"in_features", "out_features"}), frozenset()),
             nn.LayerNorm: (frozenset({"elementwise_affine"}), frozenset()),
             nn.GroupNorm: (frozenset({"num_channels", "affine"}), frozenset()),
             nn.Embedding: (frozenset({"num_embeddings", "embedding_dim"}), frozenset())}
    return table


UNREAD_IN_EVAL = _unread_in_eval()
_NOTHING = (frozenset(), frozenset())


class WeightWatch:
    """A record of the model's weights at build time; ``changed()`` says what differs now (or None)."""

    def __init__(self, model: nn.Module) -> None:
        self.slots: list[tuple[dict, str, torch.Tensor]] = []
        for module in model.modules():
            unread = UNREAD_IN_EVAL.get(type(module), _NOTHING)[1]
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is not None and name not in unread:
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
                 if not name.startswith("_") and name != "training" and isinstance(value, _PLAIN)
                 and not (owner is config and name in CONFIG_METADATA)
                 and name not in UNREAD_IN_EVAL.get(type(owner), _NOTHING)[0]]
        self.attr_dicts = [vars(o) for o, _, _ in found]  # read with dict.get: a deleted attribute reads as None
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
        if list(map(dict.get, self.attr_dicts, self.attr_names)) != self.attr_values:
            return "a plain attribute of the model (or its config) changed"
        return None

    def structure_changed(self) -> bool:
        """Modules, parameters or buffers added or removed (checked when a graph is rebuilt)."""
        return self._structure() != self.shape
