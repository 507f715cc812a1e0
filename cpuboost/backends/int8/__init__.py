"""int8 inference: static PT2E quantization with calibration data, dynamic quantization without.

Schemes (``build`` picks one; ``scheme=`` forces one):

- ``static``: torchao's PT2E flow. ``torch.export`` the private copy, annotate it with the x86 Inductor
  quantizer (u8 activations per tensor, s8 weights per channel, histogram observers), run the calibration
  batches, convert, then ``torch.compile`` with freezing so Inductor's x86 passes fold the q/dq pairs into
  oneDNN ``qconv``/``qlinear`` kernels with fused post-ops.
- ``dynamic``: the same PT2E flow with the quantizer's dynamic config (s8 weights per channel, one activation
  scale per tensor computed at run time), Linear layers only, no data needed. Where PT2E fails (``torch.export``
  cannot capture the model) it falls back, with a note, to ``dynamic_torchao``.
- ``dynamic_torchao``: torchao ``Int8DynamicActivationInt8WeightConfig`` on the module itself (per-token
  activation scales), then ``torch.compile`` with freezing; needs no export. BERT-base s128 b8 against the bf16
  graph (2 threads): in the quietest run PT2E 1.57x / torchao 1.41x (paired medians; best-of-15 agreed); over
  five loaded runs each won some, PT2E by up to 10% on best-of-N, torchao by up to 5%. A caller that can
  afford two builds may race both.
- ``weight_only``: torchao ``Int8WeightOnlyConfig`` + freezing, on request only: it dequantises the weights
  every call and measured slower than dynamic int8 and than bf16 at every row count tried (1 to 1024 rows
  through 768x3072 Linears, AVX512-VNNI), except once in a noisy median at 1 row.

With a persistent cache folder (``artifact_dir``; the runtime passes one for static signatures) a PT2E graph
is compiled by AOTInductor into that folder with its scheme and measured accuracy beside it, so a restarted
process loads it (no calibration, no compile), as the Inductor rung does. Otherwise, and where AOTInductor
fails, the graph is compiled with Inductor's C++ wrapper first (ResNet-50 b4 int8, best of 15: 418 ms against 508 ms
with the Python wrapper), the Python wrapper where the C++ one fails, as the Inductor backend does.

All of torchao and Inductor is imported inside the functions. Global state is left alone: torchao's
x86 quantizer module installs ``torch._inductor.config.pre_grad_custom_pass`` when first imported; we put
the old value back and patch the pass (with ``freezing``) only around the build, like the Inductor backend.
``torch.compile(options={"freezing": True})`` is not the same thing: dynamo reads the global flag too, and
with the option alone the frozen graph's ``onednn::qconv_prepack`` fails on meta tensors. As in the
Inductor backend, a call that would recompile raises ``RecompileRefused`` instead of compiling unfrozen.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ...errors import (
    CalibrationError,
    InvalidOptionError,
    NotQuantizableError,
    QuantizationError,
)
from ..inductor import call_served, config_lock, serve_only
from . import packaged
from .accuracy import (
    accuracy,
    assess,
    cast_like,
    combine,
    describe,
    dtype_template,
    judge,
    refusal,
)
from .calibration import check_calibration
from .quantize import (
    DESCRIBE,
    DYNAMIC_LAYERS,
    STATIC_LAYERS,
    choose_scheme,
    layers,
    quantize_copy,
    quantized_copy,
)

__all__ = [
    "DYNAMIC_LAYERS",
    "SCHEMES",
    "STATIC_LAYERS",
    "Int8Callable",
    "accuracy",
    "build",
    "cast_like",
    "check_calibration",
    "choose_scheme",
    "combine",
    "describe",
    "dtype_template",
    "judge",
    "quantizable",
]

SCHEMES = ("static", "dynamic", "dynamic_torchao", "weight_only")
# Warnings torch 2.13 / torchao 0.18 print on every int8 compile that say nothing about the user's model
_COMPILE_NOISE = ("To copy construct from a tensor",  # torch/_inductor/mkldnn_lowerings.py, qconv/qlinear
                  ".*does not implement _stable_hash_for_caching")  # torchao Int8Tensor, AOT autograd cache


def quantizable(model: Any) -> str | None:
    """None when int8 has something to work on (a Linear or Conv layer), else the reason why not."""
    if not isinstance(model, nn.Module):
        return f"int8 needs an nn.Module, got {type(model).__name__}"
    if not layers(model, STATIC_LAYERS):
        kinds = sorted({type(m).__name__ for m in model.modules()} - {type(model).__name__})
        return (f"{type(model).__name__} has no Linear, Conv1d or Conv2d layer to quantize "
                f"(its layers: {', '.join(kinds[:8]) or 'none'}); use dtype='bf16' or 'fp32'")
    return None


def _clone_float_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Fresh copies of floating tensor inputs: Inductor's int8 ``sum`` post-op writes into its residual
    operand in place, and when that operand is a graph input it is the caller's tensor (seen with torch
    2.13: ``linear(x) + x`` compiled from PT2E overwrote ``x``, through torch.compile and AOTInductor alike)."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t.is_floating_point() else t, (args, kwargs))


class Int8Callable:
    """The compiled int8 graph, called like the eager model and answering with eager's structure/dtypes."""

    def __init__(self, compiled: Callable, template: Any, scheme: str, clone_inputs: bool):
        self.compiled, self.template, self.scheme, self.clone_inputs = compiled, template, scheme, clone_inputs
        self.serve: Callable | None = None  # set once compiled: from then on a guard miss raises

    def _run(self, args: tuple, kwargs: dict) -> Any:
        if self.clone_inputs:
            args, kwargs = _clone_float_inputs(args, kwargs)
        with torch.no_grad():
            if self.serve is None:
                return cast_like(self.template, self.compiled(*args, **kwargs))
            return cast_like(self.template, call_served(self.serve, *args, **kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(args, kwargs)

    def __repr__(self) -> str:
        return f"Int8Callable(scheme={self.scheme!r})"


def build(model: nn.Module, args: tuple, kwargs: dict, calibration: list | None,
          note: Callable[[str], None] = lambda line: None, scheme: str | None = None,
          artifact_dir: Path | None = None, tolerance: float | None = None) -> Callable:
    """Quantize a private copy of ``model`` to int8, compile it for ``(args, kwargs)`` now, return the callable.

    Every check (quantizable layers, calibration shapes, scheme) runs before any copy or quantization, so
    a bad request raises a typed error and leaves nothing half-built; ``model`` itself is never touched.
    The graph is then measured against eager fp32 on the example input and on every calibration batch
    (max error, cosine, top-1 agreement: noted for ``explain()``); outside int8's bound (or ``tolerance``)
    on any of them it is a ``QuantizationError`` and nothing is served or kept.
    """
    args, kwargs = tuple(args), dict(kwargs or {})
    reason = quantizable(model)
    if reason:
        raise NotQuantizableError(reason)
    batches = check_calibration(calibration, args, kwargs)
    if scheme is None:
        scheme = choose_scheme(model, batches)
    elif scheme not in SCHEMES:
        raise InvalidOptionError(f"unknown int8 scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    elif scheme == "static" and not batches:
        raise CalibrationError("static int8 needs calibration data: pass calibration=[batch, ...]")
    if artifact_dir is not None:
        cached = packaged.load_cached(Path(artifact_dir), note)
        if cached is not None:
            return cached

    started = time.perf_counter()
    name = type(model).__name__
    (quantized, scheme, patches), reference, references = quantized_copy(
        model, args, kwargs, batches, f"int8 {scheme} quantization",
        lambda private: quantize_copy(private, args, kwargs, batches, scheme, note), note)
    note(f"int8 scheme: {DESCRIBE[scheme].format(n=len(batches))}")
    note(f"int8 quantize: {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    runner, output, how, persisted = _compile_any(quantized, args, kwargs, reference, scheme, patches,
                                                  len(batches), artifact_dir, note, mixing_dtype(scheme, model))
    note(f"int8 compile ({how}): {time.perf_counter() - started:.1f} s")
    got, summary, problem = assess(f"int8 {scheme}", runner, output, reference, references, batches, tolerance,
                                   note)
    if problem and scheme == "static" and quantizable_layers(model) > 1:
        if persisted:
            packaged.discard(runner)
        del runner
        runner, got, summary, problem, persisted = _keep_sensitive(
            model, args, kwargs, batches, reference, references, patches, artifact_dir, tolerance, note, problem)
    if problem:
        if persisted:
            packaged.discard(runner)
        raise refusal(f"int8 {scheme} graph of {name}", problem)
    if persisted:
        packaged.keep(runner, got)
    runner.accuracy_summary = summary  # explain() shows it on the int8 rung, served or not
    return runner


def mixing_dtype(scheme: str, model: nn.Module | None = None) -> torch.dtype:
    """What an int8 graph runs its other layers in (attention, norms, activations): bf16 under autocast where the
    CPU has AMX_BF16, fp32 elsewhere (an AMD EPYC with AVX512_BF16 showed no clear gain). Dynamic graphs quantize
    the Linears only (BERT-base s128 b8, Xeon with AMX: 106 against 139 ms with fp32 around the int8 Linears, max
    error 0.052 against 0.056); a static graph of a model without convolutions likewise (BERT-base b8 static:
    81 against 92 ms, max error 0.060 against 0.059). Static graphs of convolutional models (u8 between the
    convolutions) keep fp32; so does ``dynamic_torchao``."""
    from ...machine.hardware import detect

    if "AMX_BF16" not in detect().features:
        return torch.float32
    if scheme == "dynamic":
        return torch.bfloat16
    convolutional = model is None or any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in model.modules())
    return torch.bfloat16 if scheme == "static" and not convolutional else torch.float32


def quantizable_layers(model: nn.Module) -> int:
    return len(layers(model, STATIC_LAYERS))


def _keep_sensitive(model: nn.Module, args: tuple, kwargs: dict, batches: list, reference: Any, references: list,
                    patches: dict, artifact_dir: Path | None, tolerance: float | None, note: Callable[[str], None],
                    whole: str) -> tuple:
    """The whole-model graph missed the bound (``whole`` says how): the most sensitive layers kept in fp32
    until the simulated graph passes (``sensitivity``), then that one compiled and judged like the first.
    (runner, numbers, summary, problem, persisted); ``problem`` says what still fails."""
    import copy

    from . import sensitivity

    started = time.perf_counter()
    private = copy.deepcopy(model).eval()
    splits = sensitivity.keep_sensitive(private, args, kwargs, batches, references, reference, tolerance, note)
    while True:
        try:
            simulated, keep = next(splits)
        except Exception as exc:  # noqa: BLE001 - no split passes: the first verdict stands, with why
            return None, {}, "", f"{whole}; keeping the most sensitive layers in fp32 did not help ({exc})", False
        note(f"int8 accuracy control: residual stream in floating point, {len(keep)} layer(s) kept in fp32 "
             f"({', '.join(keep) or 'none'}), {time.perf_counter() - started:.1f} s")
        runner, output, how, persisted = _compile_any(simulated, args, kwargs, reference, "static", patches,
                                                      len(batches), artifact_dir, note, torch.float32)
        got, summary, problem = assess(f"int8 static, accuracy-controlled ({len(keep)} layer(s) kept in fp32)",
                                       runner, output, reference, references, batches, tolerance, note)
        if problem is None:
            return runner, got, summary + sensitivity.kept_summary(batches, keep), None, persisted
        if persisted:
            packaged.discard(runner)
        del runner, output  # the graph that missed goes before the next is compiled


def _compile_any(quantized: nn.Module, args: tuple, kwargs: dict, reference: Any, scheme: str, patches: dict,
                 batches: int, artifact_dir: Path | None, note: Callable[[str], None],
                 mix: torch.dtype) -> tuple[Any, Any, str, bool]:
    """(callable, its output on the example, how it was built, whether it is in ``artifact_dir``): AOTInductor
    into ``artifact_dir`` when there is one, else (or when that fails) torch.compile, C++ wrapper first; the
    layers int8 leaves alone run in ``mix``."""
    name = type(quantized).__name__
    mixed = ", the rest in bf16" if mix == torch.bfloat16 else ""
    if artifact_dir is not None and scheme in ("static", "dynamic"):
        try:
            with warnings.catch_warnings():
                for message in _COMPILE_NOISE:
                    warnings.filterwarnings("ignore", message=message)
                graph = packaged.compile_packaged(quantized, args, kwargs, reference, scheme, batches,
                                                  Path(artifact_dir), mix)
                how = f"AOTInductor, freezing{mixed}, kept in the persistent cache"
                return graph, graph(*args, **kwargs), how, True
        except Exception as exc:  # noqa: BLE001 - torch.compile below is the same graph, only not persisted
            note(f"int8: not persisted (AOTInductor: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    template = dtype_template(reference)
    try:
        runner, output = _compile(quantized, args, kwargs, template, scheme, {**patches, "cpp_wrapper": True}, mix)
        return runner, output, f"Inductor, freezing{mixed}, C++ wrapper", False
    except Exception as exc:  # noqa: BLE001 - the Python wrapper is the same graph; only the C++ glue failed
        wrapper = f"Python wrapper (C++ wrapper failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    try:
        runner, output = _compile(quantized, args, kwargs, template, scheme, {**patches, "cpp_wrapper": False}, mix)
    except Exception as exc:
        raise QuantizationError(f"int8 {scheme} graph of {name} failed to compile: {type(exc).__name__}: "
                                f"{exc}") from exc
    return runner, output, f"Inductor, freezing{mixed}, {wrapper}", False


def _compile(quantized: nn.Module, args: tuple, kwargs: dict, template: Any, scheme: str,
             patches: dict, mix: torch.dtype) -> tuple[Int8Callable, Any]:
    import torch._inductor.config as inductor_config

    from ...core.precision import fresh_runner

    # the layers int8 leaves alone run in ``mix`` (its autocast, or none), whatever the caller runs
    compiled = torch.compile(fresh_runner(quantized, mix), backend="inductor", dynamic=False)
    runner = Int8Callable(compiled, template, scheme, clone_inputs=scheme in ("static", "dynamic"))
    with config_lock(), inductor_config.patch(patches), warnings.catch_warnings():
        for message in _COMPILE_NOISE:
            warnings.filterwarnings("ignore", message=message)
        output = runner._run(args, kwargs)
    runner.serve = serve_only(compiled)
    return runner, output
