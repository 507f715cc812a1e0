"""int8 graphs kept in the persistent cache: compiled by AOTInductor into the signature's artifact folder,
with the scheme and the accuracy measured at build in the sidecar, so a restarted process loads them without
calibrating, quantizing or compiling. A graph whose accuracy was never recorded (the build was interrupted, or
failed int8's bound) is not loaded."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...persist import aoti
from .accuracy import describe

GRAPH = "int8"  # the file name in the artifact folder (int8.pt2 + int8.json)


def load_cached(folder: Path, note: Callable[[str], None]) -> aoti.PackagedGraph | None:
    pt2 = folder / f"{GRAPH}.pt2"
    if not pt2.exists():
        return None
    try:
        graph = aoti.load_graph(pt2)
    except (aoti.PackageFormatError, aoti.PackageMismatchError, OSError) as exc:
        note(f"int8: cached graph unusable ({exc}); quantized and compiled again")
        return None
    measured = graph.meta.get("int8_accuracy")
    if not measured or "int8_scheme" not in graph.meta:
        note("int8: cached graph has no recorded accuracy (an interrupted build); quantized and compiled again")
        return None
    note(f"int8 {graph.meta['int8_scheme']} graph loaded from the persistent cache (AOTInductor package: "
         "no calibration, no compile)")
    graph.accuracy_summary = (f"int8 {graph.meta['int8_scheme']} vs eager fp32 at build, on "
                              f"{measured.get('inputs', 1)} input(s): {describe(measured)}")
    return graph


def compile_packaged(quantized: nn.Module, args: tuple, kwargs: dict, reference: Any, scheme: str, batches: int,
                     folder: Path) -> aoti.PackagedGraph:
    """AOTInductor (export + freezing) of the PT2E graph into ``folder``; its float inputs are copied on every
    call (the int8 ``sum`` post-op writes into its residual input, see ``_clone_float_inputs``)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    allow_exported_model_train_eval(quantized)  # compile_aoti switches modes around the export
    graph, _ = aoti.compile_aoti(quantized, args, kwargs, torch.float32, workdir=folder, name=GRAPH,
                                 reference=reference, extra_meta={"int8_scheme": scheme,
                                                                  "calibration_batches": batches,
                                                                  "clone_inputs": True})
    return graph


def keep(graph: aoti.PackagedGraph, measured: dict) -> None:
    """Record the accuracy measured at build: from now on a restarted process may load this graph."""
    aoti.update_meta(graph, int8_accuracy={k: v for k, v in measured.items() if k != "problem"}, dtype="int8")


def discard(graph: aoti.PackagedGraph) -> None:
    for path in (graph.path, graph.path.with_suffix(".json")):
        with contextlib.suppress(OSError):
            path.unlink()
