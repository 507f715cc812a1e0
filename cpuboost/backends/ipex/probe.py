"""Intel Extension for PyTorch, version-gated: decided from metadata before any import is tried.

IPEX 2.8 (its last CPU release) pins torch 2.8.x, and importing it has global side effects: it configures
the root logger (``logging.basicConfig``), swaps the logger class for every logger created afterwards,
prints an ERROR line and raises ``AttributeError`` (``os.exit``) on a torch mismatch, exits on CPUs
without AVX2, writes C++ warnings to stderr and takes ~12 s. So: the version check comes first (package
metadata, no import); the import runs once, with its output captured and the logging state put back;
every failure becomes a reason ``cpuboost env`` and ``explain()`` show.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import sys
import tempfile
import threading
from typing import Any, Iterator, Optional

from .. import Availability, package_version

DIST_NAMES = ("intel_extension_for_pytorch", "intel-extension-for-pytorch")
INSTALL_HINT = "pip install torch==2.8.0 intel-extension-for-pytorch==2.8.0 transformers==4.51.3"
_import_lock = threading.Lock()
log = logging.getLogger("cpuboost")


class IpexUnavailableError(RuntimeError):
    """IPEX was needed (a build under backend='auto') but cannot be imported here; carries the reason."""


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def predict() -> Availability:
    """Installed? Matching torch? From metadata and torch.__version__ only: IPEX is not imported."""
    import torch

    version = package_version(*DIST_NAMES)
    if version is None:
        return Availability("ipex", False, f"not installed (optional; IPEX 2.8, its last CPU release, needs torch "
                            f"2.8: {INSTALL_HINT})")
    torch_mm, ipex_mm = _major_minor(torch.__version__), _major_minor(version)
    if torch_mm != ipex_mm:
        return Availability("ipex", False, f"version mismatch: IPEX {version} needs torch {ipex_mm}.x, this is "
                            f"torch {torch.__version__}; install torch=={ipex_mm}.* beside it, or uninstall IPEX and "
                            "use the native backend", version)
    return Availability("ipex", True, f"IPEX {version} matches torch {torch.__version__} (not imported yet)", version)


@functools.lru_cache(maxsize=None)
def availability() -> Availability:
    """The full verdict: ``predict()``, then one guarded, quiet import (cached for the process)."""
    import torch

    predicted = predict()
    if not predicted.usable:
        return predicted
    with _import_lock:
        error, printed = _quiet_import()
    if error is not None:
        said = f"; it printed: {printed[:200]}" if printed else ""
        return Availability("ipex", False, f"import failed: {error}{said}{_transformers_hint()}", predicted.version)
    return Availability("ipex", True, f"IPEX {predicted.version} with torch {torch.__version__}: ipex.optimize, and "
                        "with fusion=True TorchScript trace+freeze; backend='auto' builds it beside Inductor and keeps "
                        "the faster",
                        predicted.version)


def usable_now() -> Optional[str]:
    """None when IPEX is a candidate, else why not; never imports: the full verdict if reached, else metadata.

    Under backend='auto' the ~12 s import waits until the first build needs IPEX (``load()``), never
    ``optimize()`` or ``import cpuboost``; a broken import is then recorded as that build's failure.
    """
    decided = availability.cache_info().currsize > 0
    verdict = availability() if decided else predict()
    return None if verdict.usable else verdict.reason


def load() -> Any:
    """The ``intel_extension_for_pytorch`` module, or IpexUnavailableError with the reason."""
    verdict = availability()
    if not verdict.usable:
        raise IpexUnavailableError(f"IPEX is not usable: {verdict.reason}")
    return sys.modules["intel_extension_for_pytorch"]


def _transformers_hint() -> str:
    version = package_version("transformers")
    if version and int(version.split(".")[0]) >= 5:
        return f"; transformers {version} is installed and IPEX 2.8 needs transformers<5 (4.51.3 works)"
    return ""


def _quiet_import() -> tuple[Optional[str], str]:
    """Import IPEX with its output captured and the logging state restored: (error or None, what it printed)."""
    out, err = io.StringIO(), io.StringIO()
    error = None
    with _restored_logging(), _captured_fd(2) as native_err, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            import intel_extension_for_pytorch  # noqa: F401
        except (Exception, SystemExit) as exc:  # its __init__ raises AttributeError, exits, or fails anywhere
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    noise = (native_err.getvalue() + err.getvalue()).strip()
    if noise:
        log.debug("cpuboost: IPEX import wrote to stderr:\n%s", noise)
    printed = " ".join(out.getvalue().split())
    return error, printed


@contextlib.contextmanager
def _restored_logging() -> Iterator[None]:
    """Undo what IPEX's import does to logging: root handlers/level, the logger class, the CUDA notice."""
    root = logging.getLogger()
    handlers, level, logger_class = list(root.handlers), root.level, logging.getLoggerClass()
    cpp_ext = logging.getLogger("torch.utils.cpp_extension")  # "No CUDA runtime is found" at import
    cpp_level = cpp_ext.level
    cpp_ext.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cpp_ext.setLevel(cpp_level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        for handler in [h for h in handlers if h not in root.handlers]:
            root.addHandler(handler)
        root.setLevel(level)
        logging.setLoggerClass(logger_class)


class _Captured:
    def __init__(self) -> None:
        self.text = ""

    def getvalue(self) -> str:
        return self.text


@contextlib.contextmanager
def _captured_fd(fd: int) -> Iterator[_Captured]:
    """Route a file descriptor (C++ warnings on stderr) to a temporary file for the duration."""
    captured = _Captured()
    try:
        saved = os.dup(fd)
    except OSError:  # no such descriptor (embedded interpreters): nothing to capture
        yield captured
        return
    with tempfile.TemporaryFile() as tmp:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(tmp.fileno(), fd)
        try:
            yield captured
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            captured.text = tmp.read().decode("utf-8", "replace")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def ipex_logs() -> Iterator[list[str]]:
    """Collect what IPEX logs during a call (for the report) instead of printing it on the user's stderr."""
    logger = logging.getLogger("IPEX")
    saved = logger.handlers[:], logger.propagate, logger.level
    collect = _Collect()
    logger.handlers, logger.propagate = [collect], False
    logger.setLevel(logging.WARNING)
    try:
        yield collect.messages
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
