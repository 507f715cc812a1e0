"""A second length to race a dynamic text graph on: a graph that will serve every length is picked on two
lengths, not only on the first call's. Which backend is faster moves with the length: BERT-style, 4 layers,
Intel Xeon with AMX, 2 cores, in a loop of calls, OpenVINO's dynamic graph against Inductor's 2.30/2.91 ms at
20 tokens, 3.62/4.02 at 52, 6.33/5.79 at 100."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .signature import SEQUENCE_INPUTS

SHORT = 64  # below this many tokens the probe is 4x longer; from it, 4x shorter (a race on both ends of use)
FACTOR = 4


@dataclasses.dataclass(frozen=True)
class Probe:
    args: tuple
    kwargs: dict
    length: int


def probe_length(length: int, limit: Optional[int]) -> Optional[int]:
    """The other length to time at, within the model's position table (``limit``); None when there is none."""
    other = length * FACTOR if length < SHORT else max(length // FACTOR, 2)
    if limit is not None:
        other = min(other, limit)
    return other if other != length and other > 1 else None


def position_limit(model: Any) -> Optional[int]:
    """The longest sequence the model's position table takes (transformers configs), if it says."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 1 else None


def _resized(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """``tensor`` with dim 1 tiled or cut to ``length``: token ids, masks and positions stay valid values. Cloned
    to standard strides: a cut of a batch of one is "contiguous" with stride(0) of the uncut length, which the
    dynamic graph's stride guard refused, so no shorter probe length was ever timed."""
    repeats = -(-length // tensor.shape[1])
    return torch.cat([tensor] * repeats, dim=1)[:, :length].clone(memory_format=torch.contiguous_format)


def other_length(args: tuple, kwargs: dict, dims: dict, model: Any) -> Optional[Probe]:
    """The call's token inputs (dynamic in dim 1, all one length) at the probe length; positional tensors and
    other inputs as they are. None when the call has no such inputs or no other length fits."""
    names = [w for w, d in dims.items() if w in SEQUENCE_INPUTS and 1 in d
             and isinstance(kwargs.get(w), torch.Tensor) and kwargs[w].dim() == 2]
    lengths = {kwargs[w].shape[1] for w in names}
    if not names or len(lengths) != 1:
        return None
    length = probe_length(lengths.pop(), position_limit(model))
    if length is None:
        return None
    return Probe(args, {**kwargs, **{w: _resized(kwargs[w], length) for w in names}}, length)
