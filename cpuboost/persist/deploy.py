"""``cpuboost.save`` and ``cpuboost.load``: a self-contained package of what an optimized model built
(``package`` writes and reads the folder)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import package


def save(optimized: Any, path: str | Path) -> Path:
    """A self-contained package of the signatures ``optimized`` has built: one AOTInductor graph each, plus a
    JSON manifest (signatures, dtype, versions, the CPU features it needs). Graphs built through the
    persistent cache are copied, the others compiled now from the recorded example inputs."""
    if not callable(getattr(optimized, "_examples", None)):  # an OptimizedModule (inference)
        from ..errors import UnsupportedTargetError

        msg = (f"cpuboost.save() takes a model returned by cpuboost.optimize() (inference), got "
               f"{type(optimized).__name__}; optimize it and call it once per input shape to serve, then save")
        raise UnsupportedTargetError(msg)
    examples = optimized._examples()
    if not examples:
        from ..errors import CpuBoostError

        raise CpuBoostError("nothing to save yet: call the optimized model once per input signature it should "
                            "serve (each call builds and verifies that signature), then cpuboost.save() it")
    dtype = optimized._options.dtype if optimized._options.dtype != torch.int8 else torch.float32
    extra = {"model": type(optimized._original).__name__, "options": optimized._options.describe()}
    built = [entry.fn.path for entry, _ in examples if isinstance(entry.fn, package.PackagedGraph)]
    if len(built) == len(examples):
        return package.pack_graphs(built, path, extra)
    work = optimized._working_copy(*examples[0][1])
    return package.save_package(work, [example for _, example in examples], dtype, path, extra)


def load(path: str | Path, **kwargs: Any) -> nn.Module:
    """A saved package as a callable model: answers without compiling; refuses (PackageMismatchError, with
    what differs and what to do) a package built for another CPU, torch or cpuboost version."""
    return package.load_package(path, **kwargs)
