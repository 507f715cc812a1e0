"""The benchmark harness: ways to run one model ("paths"), timed side by side in one process.

Timings on a shared CPU drift, so paths are never timed one after another: every round runs every
path once (the order rotates each round), and the result is the median over rounds with its spread,
reported as a ratio to eager fp32. Each path's first call (the graph build) is timed on its own.

Extension point: ``register_path(name, build, dtype=..., label=..., available=...)``. A backend module
(``cpuboost.backends.ipex``, ...) that defines ``register_bench_paths(register_path)`` gets it called
the first time the paths are listed; that is where "ipex_imperative" / "ipex_jit" belong.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
import time
import types
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from . import verify
from .benchresult import BenchResult, PathResult
from .errors import CpuBoostError
from .models import Workload

log = logging.getLogger("cpuboost.bench")

# A build turns (model, workload) into a callable taking the workload's inputs; it must not modify the model.
Build = Callable[[nn.Module, Workload], Callable[..., Any]]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UnknownPathError(CpuBoostError, ValueError):
    """A benchmark path or path group name that is not registered."""


def _always() -> Optional[str]:
    return None


@dataclasses.dataclass(frozen=True)
class BenchPath:
    name: str
    build: Build
    dtype: str  # "fp32" | "bf16" | "fp16": the precision the heavy ops run in
    label: str  # what a reader sees in tables and charts
    available: Callable[[], Optional[str]] = _always  # None, or why it cannot run here
    compiles: bool = False  # its first call builds a graph (seconds to minutes)
    describe: Optional[Callable[[Any], str]] = None  # after the build: what it actually ran


_PATHS: dict[str, BenchPath] = {}
_PLUGIN_MODULES = ("cpuboost.backends.ipex", "cpuboost.backends.openvino")
_plugins_loaded = False


def register_path(name: str, build: Build, *, dtype: str, label: str | None = None,
                  available: Callable[[], Optional[str]] | None = None, compiles: bool = False,
                  describe: Callable[[Any], str] | None = None, replace: bool = False) -> BenchPath:
    """Add a way of running a model to the benchmark (IPEX, OpenVINO and user paths plug in here)."""
    if dtype not in DTYPES:
        raise UnknownPathError(f"path {name!r}: dtype={dtype!r} must be one of {', '.join(DTYPES)}")
    if name in _PATHS and not replace:
        raise UnknownPathError(f"a benchmark path named {name!r} exists; pick another name or pass replace=True")
    path = BenchPath(name, build, dtype, label or name, available or _always, compiles, describe)
    _PATHS[name] = path
    return path


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module_name in _PLUGIN_MODULES:
        if importlib.util.find_spec(module_name) is None:
            continue
        try:
            hook = getattr(importlib.import_module(module_name), "register_bench_paths", None)
            if hook is not None:
                hook(register_path)
        except Exception as exc:  # a broken optional backend must not take the benchmark down with it
            log.warning("benchmark paths from %s not registered: %s: %s", module_name, type(exc).__name__, exc)


def list_paths() -> list[str]:
    _load_plugins()
    return list(_PATHS)


def get_path(name: str) -> BenchPath:
    _load_plugins()
    if name not in _PATHS:
        msg = f"unknown benchmark path {name!r}; paths: {', '.join(_PATHS)}; groups: {', '.join(GROUPS)}"
        raise UnknownPathError(msg)
    return _PATHS[name]


# -- the built-in paths ---------------------------------------------------------------------------
def _eager(model: nn.Module, wl: Workload) -> Callable:
    return model


def _eager_autocast(model: nn.Module, wl: Workload) -> Callable:
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(*args, **kwargs)
    return run


def _own_code(fn: Callable) -> Callable:
    """The same function with its own code object, so its dynamo cache is its own: benchmarking many models
    in one process never runs into dynamo's per-code recompile limit (which would silently run eager)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _hand_compile(dtype: torch.dtype) -> Build:
    """What a user writes by hand: torch.compile with Inductor freezing (plus autocast for bf16)."""
    def build(model: nn.Module, wl: Workload) -> Callable:
        import torch._inductor.config as inductor_config

        def run(*args: Any, **kwargs: Any) -> Any:
            if dtype == torch.float32:
                return model(*args, **kwargs)
            with torch.autocast("cpu", dtype=dtype):
                return model(*args, **kwargs)

        compiled = torch.compile(_own_code(run))
        with inductor_config.patch(freezing=True), torch.no_grad():
            wl.call(compiled)  # compiles now, while freezing is on
        return compiled
    return build


def _cpuboost(dtype: str, fusion: bool) -> Build:
    def build(model: nn.Module, wl: Workload) -> Callable:
        import cpuboost

        optimized = cpuboost.optimize(model, dtype=dtype, fusion=fusion)
        with torch.no_grad():
            wl.call(optimized)  # the first call builds and verifies
        return optimized
    return build


def _cpuboost_describe(optimized: Any) -> str:
    import cpuboost

    graphs = cpuboost.explain(optimized).graphs
    if not graphs:
        return ""
    g = graphs[-1]
    fell = "; ".join(f"{p} failed: {why}" for p, why in g.fallbacks)
    return f"ran {g.path}" + (f" ({fell})" if fell else "")


def _openvino_available() -> Optional[str]:
    from .backends import all_backends

    ov = next(b for b in all_backends() if b.name == "openvino")
    return None if ov.usable else ov.reason


def _openvino(model: nn.Module, wl: Workload) -> Callable:
    import openvino.torch  # noqa: F401 - registers the "openvino" torch.compile backend

    compiled = torch.compile(model, backend="openvino",
                             options={"device": "CPU", "config": {"INFERENCE_PRECISION_HINT": "bf16"}})
    with torch.no_grad():
        wl.call(compiled)
    return compiled


def _register_builtins() -> None:
    register_path("eager_fp32", _eager, dtype="fp32", label="eager fp32")
    register_path("eager_bf16", _eager_autocast, dtype="bf16", label="eager autocast bf16")
    register_path("compile_fp32", _hand_compile(torch.float32), dtype="fp32", compiles=True,
                  label="torch.compile freezing fp32")
    register_path("compile_bf16", _hand_compile(torch.bfloat16), dtype="bf16", compiles=True,
                  label="torch.compile freezing bf16")
    for dtype in ("fp32", "bf16"):
        register_path(f"cpuboost_{dtype}", _cpuboost(dtype, True), dtype=dtype, compiles=True,
                      label=f"cpuboost {dtype}", describe=_cpuboost_describe)
        register_path(f"cpuboost_{dtype}_nofusion", _cpuboost(dtype, False), dtype=dtype,
                      label=f"cpuboost {dtype} fusion=False", describe=_cpuboost_describe)
    register_path("openvino_bf16", _openvino, dtype="bf16", compiles=True, available=_openvino_available,
                  label="OpenVINO bf16 (torch.compile)")


_register_builtins()

# Named selections for --paths. "peers" are optional backends, included only where they can run.
GROUPS: dict[str, tuple[str, ...]] = {
    # cpuboost before the hand-written compiles: builds run in this order and a later build of the same
    # graph reuses kernels compiled in memory, so the product's own first-call time is the one measured cold.
    "issue2": ("eager_fp32", "eager_bf16", "cpuboost_fp32", "cpuboost_bf16", "compile_fp32", "compile_bf16"),
    "eager": ("eager_fp32", "eager_bf16"),
    "fast": ("eager_fp32", "eager_bf16", "cpuboost_fp32_nofusion", "cpuboost_bf16_nofusion"),
}
GROUPS["default"] = GROUPS["issue2"] + ("peers",)
GROUPS["all"] = ("eager_fp32", "eager_bf16", "cpuboost_fp32", "cpuboost_bf16", "cpuboost_fp32_nofusion",
                 "cpuboost_bf16_nofusion", "compile_fp32", "compile_bf16", "peers")
_BUILTIN_NAMES = set(_PATHS) - {"openvino_bf16"}  # paths of optional backends are "peers", ours are not


def resolve_paths(spec: str | Sequence[str] | None = "default", dtype: str = "all") -> list[BenchPath]:
    """Names and group names (comma-separated) to paths; eager_fp32 is always first (the baseline)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec or ["default"])
    names: list[str] = []

    def add(item: str) -> None:
        item = item.strip()
        if not item:
            return
        if item == "peers":  # every registered non-built-in path that can run here
            names.extend(n for n in list_paths() if n not in _BUILTIN_NAMES and get_path(n).available() is None)
        elif item in GROUPS:
            for sub in GROUPS[item]:
                add(sub)
        else:
            names.append(get_path(item).name)

    for item in items:
        add(item)
    if dtype not in ("all", *DTYPES):
        raise UnknownPathError(f"dtype={dtype!r} must be one of all, {', '.join(DTYPES)}")
    ordered = ["eager_fp32"] + [n for n in dict.fromkeys(names) if n != "eager_fp32"]
    return [get_path(n) for n in ordered if n == "eager_fp32" or dtype == "all" or get_path(n).dtype == dtype]


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
        from .models import load

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
    peaks = {name: gemm_peak(DTYPES[name]) for name in DTYPES if name in dtypes} if measure_peak else {}
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
    from .envinfo import machine_summary

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
