"""Static int8 through OpenVINO: the same PT2E quantization (x86 Inductor quantizer, calibration batches),
with each weight kept behind its quantize/dequantize pair so OpenVINO's converter sees FakeQuantize and runs
its own int8 kernels. ResNet-50 b4 here (AMD EPYC, AVX512_VNNI): 42.7 ms against Inductor int8's 48.1 ms,
built in 5 s against 17 s. Dynamic int8 (no calibration) has no OpenVINO form: its run-time ``choose_qparams``
ops have no conversion rule.

With a persistent cache folder the converted model is kept there as OpenVINO IR, with its measured accuracy
and the SHA-256 of both files beside it, published as one unit (``persist.units``: staged, then renamed into
place), so a restarted process compiles the IR (about a second) instead of calibrating, quantizing and
converting again, and never reads an ``.xml`` of one build beside the ``.bin`` of another."""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...persist import units
from . import sensitivity
from .accuracy import assess, describe, refusal
from .calibration import check_calibration
from .quantize import STATIC_LAYERS, _pt2e, layers, quantized_copy

GRAPH = "openvino_int8"  # the unit folder, holding openvino_int8.xml/.bin (IR) + openvino_int8.json (record)


def _load_cached(folder: Path, model: nn.Module, args: tuple, kwargs: dict, precision: torch.dtype,
                 note: Callable[[str], None]) -> Callable | None:
    from .. import openvino
    from ..openvino_ir import blob_dir, blob_state

    unit = folder / GRAPH
    sidecar, xml = unit / f"{GRAPH}.json", unit / f"{GRAPH}.xml"
    if not sidecar.exists() or not xml.exists():
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        units.check_files(unit, record.get("files"), str(unit))
        measured = record["int8_accuracy"]
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            reference = model(*args, **kwargs)  # the answers' structure and dtypes
        blobs = blob_dir(folder)  # OpenVINO's compiled blob too: a warm start then reads no model
        runner = openvino.load(xml, args, kwargs, reference, precision, str(blobs) if blobs is not None else None)
    except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never a failed call
        note(f"int8: cached OpenVINO graph unusable ({type(exc).__name__}: {str(exc)[:120]}); built again")
        return None
    note("int8 OpenVINO graph loaded from the persistent cache (IR: no calibration, no conversion)"
         + (f", OpenVINO's compiled blob {blob_state(runner)} {blobs}" if blobs is not None else ""))
    runner.forget_cached = lambda: units.discard(unit)  # failed verification here: not loaded again
    runner.accuracy_summary = (f"int8 static (OpenVINO) vs eager fp32 at build, on {measured.get('inputs', 1)} "
                               f"input(s): {describe(measured)}")
    return runner


def _keep(folder: Path, staging: Path, measured: dict) -> None:
    """The staged IR and its record (accuracy, digests) published as the unit ``folder/GRAPH``."""
    accuracy = {k: v for k, v in measured.items() if k != "problem"}
    units.seal(staging, f"{GRAPH}.json", {"int8_accuracy": accuracy})
    units.publish(staging, folder / GRAPH)


def build(model: nn.Module, args: tuple, kwargs: dict, calibration: Any, note: Callable[[str], None],
          precision: torch.dtype = torch.float32, tolerance: float | None = None,
          artifact_dir: Path | None = None) -> Callable:
    """Quantize a private copy on the calibration batches, convert and compile it with OpenVINO; judged on the
    example and every batch like the Inductor int8 graph. ``precision``: what OpenVINO runs the layers it does
    not quantize in (bf16 where the CPU has it natively). ``artifact_dir``: the persistent cache folder."""
    from .. import openvino

    batches = check_calibration(calibration, args, kwargs)
    if not batches:
        raise NotImplementedError("OpenVINO int8 is static only: it needs calibration=[batch, ...]")
    folder = Path(artifact_dir) if artifact_dir is not None else None
    if folder is not None:
        cached = _load_cached(folder, model, args, kwargs, precision, note)
        if cached is not None:
            return cached
    started = time.perf_counter()
    quantized, reference, references = quantized_copy(
        model, args, kwargs, batches, "int8 static quantization",
        lambda private: _pt2e(private, args, kwargs, batches, fold_weights=False), note)
    for module in quantized.modules():  # an exported graph refuses .eval(); it runs eval-mode ops already
        module.training = False
    note(f"int8 scheme: static PT2E (x86 Inductor quantizer, weights as FakeQuantize), {len(batches)} calibration "
         f"batch(es); quantize {time.perf_counter() - started:.1f} s")
    from ...core.verify import INT8_BOUND

    staging = units.stage(folder / GRAPH) if folder is not None else None

    def convert(graph: nn.Module, label: str) -> tuple:
        runner = openvino.build(graph, args, kwargs, precision, note, via_export=True, probe_tolerance=INT8_BOUND,
                                save_to=staging / f"{GRAPH}.xml" if staging is not None else None)
        with torch.no_grad():
            output = runner(*args, **kwargs)
        return (runner, *assess(label, runner, output, reference, references, batches, tolerance, note))

    try:
        runner, got, summary, problem = convert(quantized, "int8 static (OpenVINO)")
        if problem and len(layers(model, STATIC_LAYERS)) > 1:  # keep the most sensitive layers in fp32
            splits = sensitivity.keep_sensitive(copy.deepcopy(model).eval(), args, kwargs, batches, references,
                                                reference, tolerance, note, fold_weights=False)
            first = problem
            while problem:
                del runner  # the graph that missed goes before the next is converted
                try:
                    simulated, keep = next(splits)
                except Exception as exc:  # noqa: BLE001 - no split passes: the first verdict stands, with why
                    problem = f"{first}; keeping the most sensitive layers in fp32 did not help ({exc})"
                    break
                for module in simulated.modules():
                    module.training = False
                runner, got, summary, problem = convert(simulated, f"int8 static (OpenVINO), accuracy-controlled "
                                                                   f"({len(keep)} layer(s) kept in fp32)")
                summary += sensitivity.kept_summary(batches, keep)
        if folder is not None and not problem:
            _keep(folder, staging, got)
    finally:
        units.discard(staging)  # gone already once published
    if problem:
        raise refusal(f"OpenVINO int8 graph of {type(model).__name__}", problem)
    runner.accuracy_summary = summary
    return runner
