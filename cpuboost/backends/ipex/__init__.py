"""IPEX, the optional backend: ``probe`` says whether it can run here (before importing it), ``infer``
builds inference graphs. IPEX 2.8, its last CPU release, pins torch 2.8."""
from __future__ import annotations

from .probe import INSTALL_HINT, IpexUnavailableError, availability, ipex_logs, load, predict, usable_now

__all__ = ["INSTALL_HINT", "IpexUnavailableError", "availability", "ipex_logs", "load", "predict",
           "register_bench_paths", "usable_now"]


def register_bench_paths(register_path) -> None:
    """IPEX's imperative and TorchScript paths for ``cpuboost bench``, listed where metadata says it fits."""
    if not predict().usable:
        return
    from .infer import register_bench

    register_bench(register_path)
