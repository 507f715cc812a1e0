"""An average pool whose window covers its whole input is a global mean (inference only).

transformers' EfficientNet pools its 7x7 map with ``AvgPool2d(1280, ceil_mode=True)``: eager clips the window to
the map, but OpenVINO refuses a window larger than its input (the model fails at run time) and Inductor unrolls
the 1280x1280 window with a bounds check per element (EfficientNet-B0: 0.1-0.3x eager). ``adaptive_avg_pool(x, 1)``
is the same mean to both, and fast. The swap happens where the window covers the map; any other size calls the
original pool, so no input size gets a different answer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.registry import PassContext, PlanContext, register_pass
from .watch import watched_forward

# AvgPool3d refuses a map smaller than its window outright, so only a window of exactly the map's size covers it
_POOLS = {nn.AvgPool1d: (1, F.adaptive_avg_pool1d), nn.AvgPool2d: (2, F.adaptive_avg_pool2d)}


def _per_dim(value, dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _may_cover(pool: nn.Module) -> bool:
    """Without padding or a divisor override, a window over the whole map divides by the map's size: a mean."""
    dims = _POOLS[type(pool)][0]
    padding = _per_dim(pool.padding, dims)
    return not any(padding) and getattr(pool, "divisor_override", None) is None


def covers(pool: nn.Module, spatial: tuple[int, ...]) -> bool:
    """True when ``pool`` makes one output per channel that averages all of ``spatial``: each map size fits
    its window, the one window starts inside it, and a window longer than the map is clipped (ceil_mode)
    rather than refused."""
    dims = _POOLS[type(pool)][0]
    kernel = _per_dim(pool.kernel_size, dims)
    stride = _per_dim(pool.stride if pool.stride is not None else pool.kernel_size, dims)
    if len(spatial) != dims or not _may_cover(pool):
        return False
    return all(0 < size <= k and k - size < s and (pool.ceil_mode or size == k)
               for size, k, s in zip(spatial, kernel, stride))


class GlobalMeanWhereCovered(nn.Module):
    """The original pool, run as a global mean for the input sizes its window covers."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool
        self.dims, self.adaptive = _POOLS[type(pool)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A TorchScript trace (OpenVINO, IPEX) records a size as a tensor and would warn on each comparison;
        # the pass chose this pool because the window covered its map, so the trace takes the mean unasked.
        if torch.jit.is_tracing() or covers(self.pool, tuple(x.shape[-self.dims:])):
            return self.adaptive(x, 1)
        return self.pool(x)


def _covering_pools(model: nn.Module, ctx: PassContext) -> list[str]:
    """The pools whose window covered their input in one real forward."""
    names = {m: n for n, m in model.named_modules()}
    found: list[str] = []

    def before_pool(mod, inputs):
        x = inputs[0] if inputs else None
        covered = isinstance(x, torch.Tensor) and covers(mod, tuple(x.shape[-_POOLS[type(mod)][0]:]))
        if covered and names[mod] not in found:
            found.append(names[mod])

    pools = [m for m in model.modules() if type(m) in _POOLS]
    watched_forward(model, ctx, [pool.register_forward_pre_hook(before_pool) for pool in pools])
    return found


def global_pooling(model: nn.Module, ctx: PassContext) -> nn.Module:
    """Average pools whose window covers the whole map become global means (OpenVINO refuses them, Inductor
    unrolls them)."""
    names = _covering_pools(model, ctx)
    for name in names:
        pool = model.get_submodule(name)
        model.set_submodule(name, GlobalMeanWhereCovered(pool).train(pool.training))  # a new module starts in train
    ctx.note(f"{len(names)} pool(s) made global means" + (f": {', '.join(names)}" if names else ""))
    return model


def _has_pool_that_may_cover(ctx: PlanContext):
    if not any(type(m) in _POOLS and _may_cover(m) for m in ctx.model.modules()):
        return "no average pool without padding"
    return None


def register() -> None:
    register_pass(global_pooling, name="global_pooling", modes="infer", after="eval",
                  available=_has_pool_that_may_cover, writes_weights=False)
