"""The timing loop: build each path once (timed), then interleaved rounds, medians of same-round ratios."""
from __future__ import annotations

import copy
import logging
import os
import sys
import time
from typing import Any, Callable, Iterable, Optional

import torch

from ..core import verify
from .results import BenchResult, PathResult
from ..errors import CpuBoostError
from .workloads import Workload

from .paths import DTYPES, BenchPath, _own_code, resolve_paths

log = logging.getLogger("cpuboost.bench")

# -- measuring ------------------------------------------------------------------------------------
def count_flops(wl: Workload) -> int:
    """FLOPs of one eager fp32 call, from torch's FlopCounterMode (a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        wl.call(wl.model)
    return int(counter.get_total_flops())


def gemm_peak(dtype: torch.dtype, seconds: float = 0.3, n: int | None = None) -> float:
    """Best GFLOP/s of an n x n matmul in ``dtype``, measured now: the roofline to compare against."""
    n = n or (1024 if torch.get_num_threads() <= 4 else 2048)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    out = torch.mm(a, b)
    best, reps, deadline = float("inf"), 0, time.perf_counter() + seconds
    while reps < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
        reps += 1
    return 2 * n ** 3 / best / 1e9


def _progress(total: int, desc: str, enabled: Optional[bool]):
    """A tqdm bar on stderr when tqdm is installed and a terminal or notebook is attached, else None."""
    if enabled is None:
        enabled = sys.stderr.isatty() or "ipykernel" in sys.modules
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def _reference_output(wl: Workload) -> Any:
    with torch.no_grad():
        return copy.deepcopy(wl.call(wl.model))


def _build(path: BenchPath, wl: Workload, reference: Any) -> tuple[Optional[Callable], PathResult]:
    result = PathResult(path.name, path.label, path.dtype)
    why = path.available()
    if why is not None:
        result.status, result.reason = "skipped", why
        return None, result
    log.info("building %s%s", path.label, " (compiling a graph; can take tens of seconds)" if path.compiles else "")
    started = time.perf_counter()
    try:
        fn = path.build(wl.model, wl)
        with torch.no_grad():
            out = wl.call(fn)
    except Exception as exc:  # a path that cannot run this model is reported, the others still run
        result.status = "failed"
        result.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        log.warning("%s failed: %s", path.label, result.reason)
        return None, result
    result.build_s = time.perf_counter() - started
    verdict = verify.compare(reference, out, DTYPES[path.dtype])
    result.max_rel_err, result.tolerance = verdict.error, verdict.tolerance
    if path.dtype == "int8":  # int8 has no eager twin: its accuracy is part of the result, stated beside speed
        from ..backends.int8.accuracy import accuracy

        result.accuracy = {k: v for k, v in accuracy(reference, out).items() if k != "problem"}
    if not verdict.ok:
        result.reason = f"output differs from eager fp32: {verdict}"
        log.warning("%s: %s", path.label, result.reason)
    if path.describe is not None:
        result.note = path.describe(fn)
    log.info("built %s in %.1f s", path.label, result.build_s)
    return fn, result


def _per_call(fn: Callable, wl: Workload, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        wl.call(fn)
    return (time.perf_counter() - start) / iters


def run(wl: Workload | str, paths: Iterable[BenchPath | str] | str = "default", *, rounds: int = 10,
        round_seconds: float = 0.3, warmup: int = 2, progress: Optional[bool] = None,
        measure_peak: bool = True) -> BenchResult:
    """Build every path, then time them in interleaved rounds; returns a BenchResult (table, JSON, plot).

    ``wl`` is a Workload or a model spec for ``models.load`` ("resnet50", "file.py:factory");
    ``paths`` are path/group names (a comma-separated string or a list) or BenchPath objects.
    In a notebook the result displays as an HTML table.
    """
    if rounds < 1:
        raise CpuBoostError(f"rounds={rounds} must be at least 1")
    if isinstance(wl, str):
        from .workloads import load

        wl = load(wl)
    selected = [paths] if isinstance(paths, str) else list(paths)
    if any(isinstance(p, str) for p in selected):
        selected = resolve_paths([p if isinstance(p, str) else p.name for p in selected])
    reference = _reference_output(wl)
    flops = count_flops(wl)
    startup = _inductor_startup() if any(p.compiles for p in selected) else 0.0
    built: list[tuple[Callable, PathResult, int]] = []
    seconds = 0.0  # one round's expected duration
    results: list[PathResult] = []
    bar = _progress(len(selected), f"building {wl.name}", progress)
    for path in selected:
        fn, result = _build(path, wl, reference)
        results.append(result)
        if fn is not None:
            with torch.no_grad():
                for _ in range(warmup):
                    wl.call(fn)
                estimate = _per_call(fn, wl, 1)
            iters = max(1, min(1000, int(round_seconds / max(estimate, 1e-6))))
            built.append((fn, result, iters))
            seconds += iters * estimate
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    dtypes = {r.dtype for _, r, _ in built}
    peaks = ({name: gemm_peak(DTYPES[name]) for name in DTYPES if name in dtypes and name != "int8"}
             if measure_peak else {})
    log.info("timing %d paths in %d interleaved rounds (about %.0f s)", len(built), rounds, seconds * rounds)
    load_before = _load_average()
    bar = _progress(rounds, f"timing {wl.name}", progress)
    with torch.no_grad():
        for r in range(rounds):
            shift = r % max(len(built), 1)
            for fn, result, iters in built[shift:] + built[:shift]:
                result.samples_s.append(_per_call(fn, wl, iters))
            if bar is not None:
                bar.update(1)
            else:
                log.debug("round %d/%d done", r + 1, rounds)
    if bar is not None:
        bar.close()
    from ..machine.envinfo import machine_summary

    machine = {**machine_summary(), "load_average": [load_before, _load_average()]}
    return BenchResult(workload=wl.name, description=wl.description, batch=wl.batch, flops=flops,
                       peaks=peaks, paths=results, rounds=rounds, machine=machine, startup_s=startup)


_inductor_started = False


def _inductor_startup() -> float:
    """Pay Inductor's once-per-process start (imports, compile workers) before any path's build is timed.

    Otherwise the first compiled path's build time carries tens of seconds that every later one skips.
    Returns the seconds it took (0 when this process had already started it).
    """
    global _inductor_started
    if _inductor_started:
        return 0.0
    log.info("starting torch.compile/Inductor (once per process; not counted in any path's build time)")
    started = time.perf_counter()
    try:
        fn = torch.compile(_own_code(lambda t: torch.nn.functional.gelu(t * 2.0) + 1.0))
        with torch.no_grad():
            fn(torch.randn(8))
    except Exception as exc:  # the paths that need Inductor will report their own failure
        log.warning("Inductor start-up failed: %s: %s", type(exc).__name__, exc)
    _inductor_started = True
    return time.perf_counter() - started


def _load_average() -> Optional[float]:
    """The OS's 1-minute load average: how much else was running while we timed (None where unknown)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
