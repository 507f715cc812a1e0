"""The tests' own accuracy oracle, independent of cpuboost's verifier (a bug there must not pass here).

fp32 paths must match eager fp32 tightly. A low-precision path may stray from eager fp32 as far as eager
autocast itself does on the same input, times a small factor, with a floor for outputs autocast gets exact.
"""
from __future__ import annotations

import torch

FP32_TOLERANCE = 1e-4
LOW_PRECISION_FACTOR = 4.0
LOW_PRECISION_FLOOR = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref| in float64."""
    ref64 = ref.detach().double()
    return ((out.detach().double() - ref64).abs().max() / ref64.abs().max().clamp_min(1e-12)).item()


def allowed_error(dtype: torch.dtype, ref: torch.Tensor, autocast_out: torch.Tensor | None = None) -> float:
    """The error a path in ``dtype`` may have against ``ref`` (eager fp32)."""
    if dtype == torch.float32:
        return FP32_TOLERANCE
    own = rel_err(autocast_out, ref) if autocast_out is not None else 0.0
    return max(LOW_PRECISION_FACTOR * own, LOW_PRECISION_FLOOR[dtype])


def eager_autocast(model, dtype: torch.dtype, *args, **kwargs):
    """The eager model's own answer in ``dtype`` (what the dtype itself can do on this input)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        return model(*args, **kwargs)


def rung(model, prefix: str, graph: int = -1):
    """The ladder's record of the rung whose name starts with ``prefix`` ("inductor bf16"), for one graph."""
    import cpuboost

    records = cpuboost.explain(model).graphs[graph].rungs
    return next(r for r in records if r.name.startswith(prefix))


def verified(record) -> bool:
    """The rung was built and passed verification (whether or not it then won the race against eager)."""
    return record.error.startswith("ok") and not record.fate.startswith(("failed", "rejected", "not tried"))


def row_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst per-row error, each row (last dimension) scaled by its own magnitude, floored at a thousandth of
    the tensor's: a small row next to a large one is judged on its own."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    whole = ref64.abs().max().clamp_min(1e-12)
    rows = ref64.reshape(-1, ref64.shape[-1]) if ref64.dim() > 1 else ref64.reshape(1, -1)
    diff = (out64 - ref64).reshape(rows.shape).abs().amax(dim=1)
    return (diff / rows.abs().amax(dim=1).clamp_min(1e-3 * whole)).max().item()


def rejection_justified(record, dtype: torch.dtype, candidate: torch.Tensor, ref: torch.Tensor,
                        autocast_out: torch.Tensor) -> bool:
    """A low-precision rung may be refused only where its answer really strays further than eager autocast's
    own by the verifier's factor (3x, floor 1e-2) on some row: folding BatchNorm into a bf16 bias can cancel
    (a row of 0.03 from 0.45 - 0.42) where eager autocast, by luck of rounding, did not. Judged here with the
    tests' own arithmetic, so a verifier that refuses good graphs still fails."""
    if dtype == torch.float32 or not record.fate.startswith("rejected"):
        return False
    own = row_err(autocast_out, ref)
    return row_err(candidate, ref) > max(3.0 * own, 1e-2)
