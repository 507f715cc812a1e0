"""Timing a candidate against the original eager fp32 call, interleaved, so a shared CPU's drift cancels."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

ROUNDS = 3
HOPELESS = 2.0  # a candidate this many times slower than eager after one round is not timed further


def _ms(fn: Callable, args: tuple, kwargs: dict) -> float:
    begin = time.perf_counter()
    fn(*args, **kwargs)
    return (time.perf_counter() - begin) * 1e3


def against_eager(candidate: Callable, eager: Callable, args: tuple, kwargs: dict,
                  rounds: int = ROUNDS, eager_ms: float | None = None) -> tuple[float, float]:
    """(candidate ms, eager ms): medians of interleaved calls; each side has run once already.

    ``eager_ms``: eager's time measured already (the verification call of a warm start, whose rung an earlier
    process raced in full): only the candidate is timed, against it.
    """
    if eager_ms is not None:
        with torch.no_grad():
            return statistics.median(_ms(candidate, args, kwargs) for _ in range(rounds)), eager_ms
    mine, theirs = [], []
    with torch.no_grad():
        for i in range(rounds):
            pair = ((candidate, mine), (eager, theirs)) if i % 2 == 0 else ((eager, theirs), (candidate, mine))
            for fn, into in pair:
                into.append(_ms(fn, args, kwargs))
            if mine[0] > HOPELESS * theirs[0]:
                break
    return statistics.median(mine), statistics.median(theirs)


def head_to_head(challenger: Callable, holder: Callable, args: tuple, kwargs: dict,
                 rounds: int = 5) -> tuple[float, float]:
    """(challenger ms, holder ms): medians of calls interleaved in alternating order. Two candidates each timed
    against eager in its own window can swap places when the load changes in between; side by side, they
    cannot."""
    mine, theirs = [], []
    with torch.no_grad():
        for i in range(rounds):
            pair = ((challenger, mine), (holder, theirs)) if i % 2 == 0 else ((holder, theirs), (challenger, mine))
            for fn, into in pair:
                into.append(_ms(fn, args, kwargs))
    return statistics.median(mine), statistics.median(theirs)


def resident_mb() -> float:
    """This process's resident memory in MiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    import resource

    return pages * resource.getpagesize() / 2**20


def run_once(fn: Callable, args: tuple, kwargs: dict) -> Any:
    with torch.no_grad():
        return fn(*args, **kwargs)
