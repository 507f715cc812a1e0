"""Ways to run one model ("paths"): the registry, the built-in paths and the named groups."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import types
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import CpuBoostError
from .workloads import Workload

log = logging.getLogger("cpuboost.bench")

# A build turns (model, workload) into a callable taking the workload's inputs; it must not modify the model.
Build = Callable[[nn.Module, Workload], Callable[..., Any]]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


class UnknownPathError(CpuBoostError, ValueError):
    """A benchmark path or path group name that is not registered."""


def _always() -> Optional[str]:
    return None


@dataclasses.dataclass(frozen=True)
class BenchPath:
    name: str
    build: Build
    dtype: str  # "fp32" | "bf16" | "fp16" | "int8": the precision the heavy ops run in
    label: str  # what a reader sees in tables and charts
    available: Callable[[], Optional[str]] = _always  # None, or why it cannot run here
    compiles: bool = False  # its first call builds a graph (seconds to minutes)
    describe: Optional[Callable[[Any], str]] = None  # after the build: what it actually ran


_PATHS: dict[str, BenchPath] = {}
_PLUGIN_MODULES = ("cpuboost.backends.ipex",)
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
            if not optimized.wait_for_builds(600):  # a text model's other rungs race on in the background:
                raise TimeoutError("cpuboost's background race ran past 600 s")
            wl.call(optimized)  # timed once it is settled, which this call does
        return optimized
    return build


def _cpuboost_int8(model: nn.Module, wl: Workload) -> Callable:
    """cpuboost int8: static with 4 calibration batches where the inputs are floating, dynamic otherwise."""
    import cpuboost

    optimized = cpuboost.optimize(model, dtype="int8", calibration=wl.calibration())
    with torch.no_grad():
        wl.call(optimized)
    return optimized


def _int8_available() -> Optional[str]:
    from ..machine.hardware import detect

    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (pip install 'cpuboost[int8]')"
    return None if detect().has_cxx_compiler else "no C++ compiler: int8 graphs need Inductor"


def _cpuboost_describe(optimized: Any) -> str:
    import cpuboost

    graphs = cpuboost.explain(optimized).graphs
    if not graphs:
        return ""
    g = graphs[-1]
    others = "; ".join(f"{r.name}: {r.fate}" for r in g.rungs if r.fate != "served")
    return f"ran {g.path} {g.dtype}".rstrip() + (f" ({others})" if others else "")


def _openvino_available() -> Optional[str]:
    from ..backends import all_backends

    ov = next(b for b in all_backends() if b.name == "openvino")
    return None if ov.usable else ov.reason


def _openvino(model: nn.Module, wl: Workload) -> Callable:
    import openvino.torch  # noqa: F401 - registers the "openvino" torch.compile backend

    compiled = torch.compile(model, backend="openvino",
                             options={"device": "CPU", "config": {"INFERENCE_PRECISION_HINT": "bf16"}})
    with torch.no_grad():
        wl.call(compiled)
    return compiled


def _openvino_convert(dtype: torch.dtype) -> Build:
    """cpuboost's own OpenVINO backend (convert_model + compile_model), as its ladder builds it."""
    def run(model: nn.Module, wl: Workload) -> Callable:
        from ..backends import openvino

        notes: list[str] = []
        fn = openvino.build(model, tuple(wl.args), dict(wl.kwargs), dtype, notes.append)
        fn.notes = notes
        return fn
    return run


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
    register_path("cpuboost_int8", _cpuboost_int8, dtype="int8", compiles=True, available=_int8_available,
                  label="cpuboost int8", describe=_cpuboost_describe)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        register_path(f"openvino_convert_{name}", _openvino_convert(dtype), dtype=name, compiles=True,
                      available=_openvino_available, label=f"OpenVINO convert_model {name}",
                      describe=lambda fn: "; ".join(getattr(fn, "notes", [])[:2]))
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
    # int8 against what it must beat: cpuboost bf16 (the bar) and the hand-written bf16 compile
    "int8": ("eager_fp32", "cpuboost_bf16", "cpuboost_int8", "compile_bf16"),
}
GROUPS["default"] = GROUPS["issue2"] + ("peers",)
GROUPS["all"] = ("eager_fp32", "eager_bf16", "cpuboost_fp32", "cpuboost_bf16", "cpuboost_fp32_nofusion",
                 "cpuboost_bf16_nofusion", "compile_fp32", "compile_bf16", "peers")
_BUILTIN_NAMES = set(_PATHS) - {"openvino_bf16", "openvino_convert_fp32", "openvino_convert_bf16"}  # peers


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
