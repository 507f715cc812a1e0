"""``OptimizedModule.generate``: one runner per optimized module, kept in its ``_generation`` slot."""
from __future__ import annotations

import threading
from typing import Any

import torch

_SLOT_LOCK = threading.Lock()  # held only to publish a new runner: no model waits on another's build


def generate_for(optimized: Any, *args: Any, **kwargs: Any) -> Any:
    """``invalidate()`` clears the ``_generation`` slot, so a weight edit seen by the module's watch rebuilds the
    runner. The runner locks per (batch, cache bucket) itself; no lock is shared with other models."""
    optimized._check_fresh()
    runner = optimized.__dict__.get("_generation")
    if runner is None:
        fresh = _new_runner(optimized)  # two racing first calls may both make one; the first published serves
        with _SLOT_LOCK:
            runner = optimized.__dict__.get("_generation") or fresh
            optimized.__dict__["_generation"] = runner
    return runner.generate(*args, **kwargs)


def _new_runner(optimized: Any) -> Any:
    from ..core.freshness import WeightWatch
    from .persisted import PersistedDecisions
    from .runner import GenerationRunner

    if optimized.__dict__.get("_watch") is None:
        optimized.__dict__["_watch"] = WeightWatch(optimized._original)
    options = optimized._options
    dtype = options.amp_dtype or (options.dtype if options.dtype in _WEIGHT_ONLY else torch.float32)
    warm = optimized._warm_start()
    persist = PersistedDecisions(warm, optimized._original) if warm.enabled else None
    return GenerationRunner(optimized._original, dtype, optimized._report.note,
                            compile=options.fusion and options.backend in ("auto", "native"), persist=persist,
                            prefill=True)


_WEIGHT_ONLY = (torch.int8, getattr(torch, "int4", torch.int8))
