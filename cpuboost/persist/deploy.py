"""``cpuboost.save`` and ``cpuboost.load``: a self-contained package of what an optimized model built
(``package`` writes and reads the folder)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..options import dtype_name
from . import package
from .errors import PackagedPathWarning


def save(optimized: Any, path: str | Path) -> Path:
    """A self-contained package of the signatures ``optimized`` has built: one AOTInductor graph each, plus a
    JSON manifest (signatures, dtype, versions, every CPU flag it needs, each graph's SHA-256). Graphs built
    through the persistent cache are copied, the others compiled now from the recorded example inputs and
    judged by the runtime's own rule (``verify.compare``, the model's ``tolerance``). A signature the runtime
    serves another way (OpenVINO, IPEX, eager, an int8 graph not in the cache) gets an Inductor graph in the
    package, which answers differently from what served: ``PackagedPathWarning`` says which signatures."""
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
    options = optimized._options
    dtype = options.dtype if options.dtype != torch.int8 else torch.float32
    extra = {"model": type(optimized._original).__name__, "options": options.describe()}
    # a runtime graph that reads the model's embedding tables (persist.tables) cannot travel without the model:
    # the package compiles that signature again, holding them (the same program: the same answers)
    built = [entry.fn.path for entry, _ in examples
             if isinstance(entry.fn, package.PackagedGraph) and not entry.fn.meta.get("tables")]
    if len(built) == len(examples):
        return package.pack_graphs(built, path, extra)
    others = [f"[{entry.record.signature}] served by {entry.record.path} {entry.record.dtype}".rstrip()
              for entry, _ in examples if not isinstance(entry.fn, package.PackagedGraph)]
    if others:
        warnings.warn(f"cpuboost.save(): {'; '.join(others)} at runtime, but a package holds AOTInductor graphs "
                      "only: "
                      f"the package gets an Inductor {dtype_name(dtype)} graph for those signatures instead, "
                      "judged against eager fp32 by the runtime's rule. Its answers differ from the runtime's within "
                      "that bound; keep the optimized model (and its cache) to serve exactly what was verified",
                      PackagedPathWarning, stacklevel=3)
    work = optimized._working_copy(*examples[0][1])
    return package.save_package(work, [example for _, example in examples], dtype, path, extra,
                                judge=_runtime_rule(dtype, options.tolerance), reference_module=optimized._eval_model())


def _runtime_rule(dtype: torch.dtype, tolerance: Optional[float]):
    """The runtime's verification (eager autocast's error as the yardstick, the model's ``tolerance``)."""
    from ..core import verify

    def judge(reference: Any, output: Any, yardstick: Any) -> tuple[bool, str]:
        verdict = verify.compare(reference, output, dtype, yardstick, tolerance)
        return verdict.ok, str(verdict)

    return judge


def load(path: str | Path, **kwargs: Any) -> nn.Module:
    """A saved package as a callable model: answers without compiling; refuses (PackageMismatchError, with
    what differs and what to do) a package built for another CPU, torch or cpuboost version."""
    return package.load_package(path, **kwargs)
