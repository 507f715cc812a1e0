"""Timing a candidate against the original eager fp32 call, interleaved, so a shared CPU's drift cancels."""
from __future__ import annotations

import functools
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


def _interleaved(first: Callable, second: Callable, args: tuple, kwargs: dict, rounds: int,
                 give_up: float | None = None, settle: bool = False,
                 samples: tuple[list, list] | None = None) -> tuple[float, float]:
    """Medians (ms) of ``first`` and ``second`` called in turn, the order alternating each round; with
    ``give_up``, stop after one round when ``first`` took that many times ``second``'s time. ``settle``: each
    timed call follows an untimed call of the same graph. Two runtimes' thread pools (OpenVINO's TBB, torch's
    OpenMP) spin for a while after a call, so the first call after the other's is slowed by its spinning
    threads: ResNet-50 b1 bf16, 2 cores, OpenVINO against Inductor timed one call each in turn 24.1 against
    24.2 ms, after a settling call 21.3 against 23.1 ms, as a served graph called in a loop runs."""
    mine, theirs = samples if samples is not None else ([], [])  # ``samples``: earlier rounds' times, extended
    with torch.no_grad():
        for i in range(len(mine), len(mine) + rounds):
            pair = ((first, mine), (second, theirs)) if i % 2 == 0 else ((second, theirs), (first, mine))
            for fn, into in pair:
                if settle:
                    fn(*args, **kwargs)
                into.append(_ms(fn, args, kwargs))
            if give_up is not None and mine[0] > give_up * theirs[0]:
                break
    return statistics.median(mine), statistics.median(theirs)


def against_eager(candidate: Callable, eager: Callable, args: tuple, kwargs: dict,
                  rounds: int = ROUNDS, eager_ms: float | None = None) -> tuple[float, float]:
    """(candidate ms, eager ms): medians of interleaved calls; each side has run once already.

    ``eager_ms``: eager's time measured already (the verification call of a warm start, whose rung an earlier
    process raced in full): only the candidate is timed, against it.
    """
    if eager_ms is not None:
        with torch.no_grad():
            return statistics.median(_ms(candidate, args, kwargs) for _ in range(rounds)), eager_ms
    return _interleaved(candidate, eager, args, kwargs, rounds, give_up=HOPELESS)


CLOSE = 0.05  # medians this close (relative) get as many rounds again before the call is made


def head_to_head(challenger: Callable, holder: Callable, args: tuple, kwargs: dict,
                 rounds: int = 5) -> tuple[float, float]:
    """(challenger ms, holder ms), interleaved, each timed call settled (see ``_interleaved``). Two candidates
    each timed against eager in its own window can swap places when the load changes in between; side by side,
    they cannot. A race within ``CLOSE`` is timed for as many rounds again and decided on all of them (the zoo's
    Llama under OMP_WAIT_POLICY=PASSIVE: Inductor 24.15 against OpenVINO 24.69 ms in five rounds, while longer
    blocks timed OpenVINO 3% faster)."""
    mine: list = []
    theirs: list = []
    a, b = _interleaved(challenger, holder, args, kwargs, rounds, settle=True, samples=(mine, theirs))
    if abs(a - b) <= CLOSE * min(a, b):
        a, b = _interleaved(challenger, holder, args, kwargs, rounds, settle=True, samples=(mine, theirs))
    return a, b


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs ``ldconfig``); None elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): gc alone
        return None


def release_memory() -> None:
    """Collect a freed graph and hand the heap's free pages back to the system (glibc ``malloc_trim``), so
    a losing rung does not stay in the resident set (BERT-base: ~100 MiB more returned than gc alone)."""
    import gc

    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
