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
