"""The benchmark harness: ways to run one model ("paths"), timed side by side in one process.

Timings on a shared CPU drift, so paths are never timed one after another: every round runs every
path once (the order rotates each round), and the result is the median over rounds with its spread,
reported as a ratio to eager fp32. Each path's first call (the graph build) is timed on its own.

Extension point: ``register_path(name, build, dtype=..., label=..., available=...)``. A backend module
(``cpuboost.backends.ipex``, ...) that defines ``register_bench_paths(register_path)`` gets it called
the first time the paths are listed; that is where "ipex_imperative" / "ipex_jit" belong.

``paths`` holds the registry and the built-in paths, ``harness`` the timing loop, ``workloads`` the models,
``results`` the result table (text, HTML, JSON) and ``plot`` the chart.
"""
from __future__ import annotations

from . import harness, paths, results, workloads
from .harness import count_flops, gemm_peak, run
from .paths import (_PATHS, DTYPES, GROUPS, BenchPath, UnknownPathError, _eager, get_path, list_paths,
                    register_path, resolve_paths)
from .results import BenchResult, PathResult
from .workloads import Workload

__all__ = ["BenchPath", "BenchResult", "DTYPES", "GROUPS", "PathResult", "UnknownPathError", "Workload",
           "count_flops", "gemm_peak", "get_path", "harness", "list_paths", "paths", "register_path",
           "resolve_paths", "results", "run", "workloads"]
