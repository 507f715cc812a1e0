"""Failures in a multi-process run, said plainly and tagged with the rank that saw them.

A collective that fails deep in gloo reads like ``Timed out waiting 600000ms for recv`` or ``Connection
closed by peer``. In a distributed run (after ``cpuboost.distributed.prepare``/``init``) an uncaught
exception of that kind is re-raised as :class:`CollectiveTimeoutError` / :class:`PeerLostError`, naming
the rank, the timeout and what to do; torch's own hook still prefixes every line with ``[rankN]``. Under
torchrun the error is also written to the elastic error file, so torchrun's failure summary shows it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import traceback
from typing import Any, Optional

import torch

from ..errors import CpuBoostError


class DistributedSetupError(CpuBoostError, RuntimeError):
    """prepare()/init() got something it cannot make data-parallel, or an incomplete torchrun environment."""


class CollectiveTimeoutError(CpuBoostError, TimeoutError):
    """A collective waited longer than the timeout: another rank is stuck or dead."""


class PeerLostError(CpuBoostError, ConnectionError):
    """Another rank closed its connection in the middle of a collective: it crashed or was killed."""


for _cls in (DistributedSetupError, CollectiveTimeoutError, PeerLostError):
    _cls.__module__ = "cpuboost.distributed"  # where users import them from; tracebacks name it

_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_LOST = re.compile(r"connection (closed|reset) by peer|broken pipe|connection refused", re.IGNORECASE)
_installed: dict[str, Any] = {}


def _where() -> tuple[int, int]:
    """Rank and world size, read here rather than from the package, which imports this module."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def explain_failure(exc: BaseException, timeout_s: Optional[float]) -> Optional[CpuBoostError]:
    """A clearer error for a failed collective (None when ``exc`` is something else)."""
    if not isinstance(exc, RuntimeError) or isinstance(exc, CpuBoostError):
        return None
    text = str(exc)
    r, w = _where()
    if _LOST.search(text):
        return PeerLostError(
            f"rank {r} of {w}: another rank closed its connection during a collective, so it crashed or was "
            "killed; its own error and exit code are in its output and in torchrun's failure summary")
    if _TIMEOUT.search(text):
        limit = f"the timeout of {timeout_s:g}s" if timeout_s else "the process group's timeout"
        return CollectiveTimeoutError(
            f"rank {r} of {w}: a collective (gradient all-reduce, barrier or broadcast) waited more than {limit} "
            "for the other ranks: one of them is stuck or dead. If a rank legitimately works alone that long "
            "(evaluation, saving), raise it: cbd.prepare(..., timeout=SECONDS)")
    return None


def _write_error_file(exc: BaseException) -> None:
    """torchelastic's error-file format, so torchrun's summary shows this rank's traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": f"{type(exc).__name__}: {exc}", "extraInfo": {
        "py_callstack": "".join(traceback.format_exception(exc)), "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
    except OSError:
        pass


def install_excepthook(timeout_s: Optional[float]) -> None:
    """Chain a hook (once per process) that explains failed collectives and records the error file."""
    _installed["timeout_s"] = timeout_s
    if _installed.get("hook") is not None and sys.excepthook is _installed["hook"]:
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        try:
            better = explain_failure(exc, _installed["timeout_s"])
            if better is not None:
                better.__cause__ = exc
                exc_type, exc, tb = type(better), better, None
            _write_error_file(exc)
        except Exception:  # the hook must never hide the original error
            pass
        previous(exc_type, exc, tb)

    _installed["hook"] = hook
    sys.excepthook = hook


class RankLogger(logging.LoggerAdapter):
    """Prefixes ``[rank r/w]`` in multi-process runs; logs on rank 0 only unless ``main_process_only=False``."""

    def log(self, level: int, msg: Any, *args: Any, main_process_only: bool = True, **kwargs: Any) -> None:
        r, w = _where()
        if (main_process_only and r != 0) or not self.isEnabledFor(level):
            return
        if w > 1:
            msg = f"[rank {r}/{w}] {msg}"
        kwargs.setdefault("stacklevel", 2)
        self.logger.log(level, msg, *args, **kwargs)


def rank_logger(name: str) -> RankLogger:
    return RankLogger(logging.getLogger(name), {})
