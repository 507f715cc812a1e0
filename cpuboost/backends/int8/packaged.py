"""int8 graphs kept in the persistent cache: compiled by AOTInductor in a staging folder, with the scheme and
the accuracy measured at build in the sidecar, then published as one unit in the signature's artifact folder
(``persist.units``), so a restarted process loads them without calibrating, quantizing or compiling. A graph
that failed int8's bound, or whose build was interrupted, is never published."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...persist import aoti, units
from .accuracy import describe

GRAPH = "int8"  # the unit folder in the artifact folder, and its files' names (int8.pt2 + int8.json)


def load_cached(folder: Path, note: Callable[[str], None]) -> aoti.PackagedGraph | None:
    pt2 = folder / GRAPH / f"{GRAPH}.pt2"
    if not pt2.exists():
        return None
    try:
        graph = aoti.load_graph(pt2, root=folder)
        graph.cache_unit = pt2.parent
    except (aoti.PackageFormatError, aoti.PackageMismatchError, aoti.UnsafeLocationError, OSError) as exc:
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
                     folder: Path, mix: torch.dtype) -> aoti.PackagedGraph:
    """AOTInductor (export + freezing) of the PT2E graph, staged beside ``folder/GRAPH`` until ``keep`` or
    ``discard``, the layers int8 leaves alone under ``mix``'s autocast; its float inputs are copied on every call
    (the int8 ``sum`` post-op writes into its residual input, see ``_clone_float_inputs``)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    allow_exported_model_train_eval(quantized)  # compile_aoti switches modes around the export
    staging = units.stage(folder / GRAPH)
    try:
        graph, _ = aoti.compile_aoti(quantized, args, kwargs, mix, workdir=staging, name=GRAPH,
                                     reference=reference, extra_meta={"int8_scheme": scheme,
                                                                      "calibration_batches": batches,
                                                                      "clone_inputs": True})
    except BaseException:
        units.discard(staging)
        raise
    return graph


def keep(graph: aoti.PackagedGraph, measured: dict) -> None:
    """Record the accuracy measured at build and publish the unit: from now on a restarted process may load it."""
    aoti.update_meta(graph, int8_accuracy={k: v for k, v in measured.items() if k != "problem"}, dtype="int8")
    unit = units.publish(graph.path.parent, graph.path.parent.parent / GRAPH)
    graph.path, graph.cache_unit = unit / graph.path.name, unit


def discard(graph: aoti.PackagedGraph) -> None:
    """A graph outside int8's bound: its staging folder goes, nothing is published."""
    units.discard(graph.path.parent)
