"""Accuracy-aware static int8: when the whole-model graph misses int8's bound, keep the layers that cost the
most accuracy in fp32 until the rest passes (what IPEX's ``quantization.autotune`` and NNCF's
``quantize_with_accuracy_control`` do).

Each quantizable layer's cost is measured alone, cheaply: the fp32 model runs once per layer on a calibration
batch with only that layer's input (u8 per tensor, the calibration range) and weight (s8 per channel)
fake-quantized, and the output's error against eager fp32 ranks the layers. The retry quantizes with the residual
stream in floating point (``quantize._float_residual_quantizer``: what the ranking measures, a layer's input and
weight), first with no layer kept, then leaving the 1, 2, 4, ... worst out of the PT2E quantizer
(``set_module_name_qconfig(name, None)``); each simulated int8 model (eager q/dq, no compile) is judged on the
example, the batches that set the scales and a held-out part of the calibration data, until one passes; only that
one is compiled. Kept layers run in fp32 inside the int8 graph. On the realistic ResNet-50 of
``benchmarks/int8.py`` the stem and the four projection shortcuts (12% of the FLOPs) hold two thirds of the
ranked error: with those five kept, 0.064 max error (simulated) where the stock graph has 0.176 (bound 0.1).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .accuracy import accuracy, combine, describe, judge
from .quantize import STATIC_LAYERS, _pt2e, layers

MOST_KEPT = 0.5  # past half the layers in fp32, int8 has little left to win over bf16


def held_out(batches: list) -> tuple[list, list]:
    """(batches that set the scales, batches kept for judging only): a quarter held out, at least one, once
    there are two or more."""
    if len(batches) < 2:
        return batches, []
    n = max(1, len(batches) // 4)
    return batches[:-n], batches[-n:]


def kept_summary(batches: list, keep: list) -> str:
    """What the accuracy summary adds for a graph with layers kept in fp32 (``explain()`` shows it)."""
    return (f" ({len(held_out(batches)[1])} batch(es) held out of calibration); residual stream in floating point; "
            f"layers kept in fp32: {', '.join(keep) or 'none'}")


def _fake_quant_input(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255.0, 1e-12)
    zero = int(round(-low / scale))
    return torch.fake_quantize_per_tensor_affine(x, scale, min(max(zero, 0), 255), 0, 255)


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    flat = w.detach().reshape(w.shape[0], -1)
    scale = (flat.abs().amax(dim=1) / 127.0).clamp_min(1e-12).float()
    zero = torch.zeros(w.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.detach(), scale, zero, 0, -128, 127)


def rank_layers(model: nn.Module, args: tuple, kwargs: dict, reference: Any) -> list[tuple[str, float]]:
    """(layer, error of the output with only that layer quantized), worst first, on ``(args, kwargs)``."""
    names = layers(model, STATIC_LAYERS)
    modules = dict(model.named_modules())
    ranges: dict[str, list[float]] = {}

    def observe(name):
        def hook(_mod, inputs):
            x = inputs[0].detach()
            ranges[name] = [x.min().item(), x.max().item()]
        return hook

    handles = [modules[n].register_forward_pre_hook(observe(n)) for n in names]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    costs = []
    for name in names:
        if name not in ranges:
            continue  # not reached on this input
        mod = modules[name]
        low, high = ranges[name]
        original = mod.weight.data
        handle = mod.register_forward_pre_hook(
            lambda _m, inputs, low=low, high=high: (_fake_quant_input(inputs[0], low, high), *inputs[1:]))
        try:
            mod.weight.data = _fake_quant_weight(original)
            with torch.no_grad():
                costs.append((name, accuracy(reference, model(*args, **kwargs))["max_err"]))
        finally:
            mod.weight.data = original
            handle.remove()
    return sorted(costs, key=lambda item: -item[1])


def keep_sensitive(model: nn.Module, args: tuple, kwargs: dict, batches: list, references: list,
                   reference: Any, tolerance: float | None, note: Callable[[str], None],
                   fold_weights: bool = True) -> Iterator[tuple[nn.Module, list]]:
    """Yields (simulated-int8 model that passes, layers kept in fp32), fewest kept first: the caller compiles
    each and asks for the next while the compiled graph still misses the bound (it rounds differently from the
    simulation: realistic ResNet-50, two layers kept, 0.0966 simulated, 0.105 as OpenVINO's int8 graph). Raises
    ``ValueError`` saying how far it got once no split is left. ``batches``/``references``: every calibration
    batch and eager fp32's answer on it; the scales are set on all but the held-out ones, the judge sees them all
    and the example. ``fold_weights=False``: weights as FakeQuantize, the form OpenVINO converts."""
    fit, held = held_out(batches)
    ranked = rank_layers(model, *fit[0], references[0])
    note("int8 layer sensitivity (output error with only that layer quantized, first calibration batch): "
         + ", ".join(f"{n} {e:.3g}" for n, e in ranked[:6]) + (" ..." if len(ranked) > 6 else ""))
    inputs = [((tuple(args), dict(kwargs)), reference)] + list(zip(batches, references))
    keep_count, last = 0, ""
    while keep_count <= max(1, int(len(ranked) * MOST_KEPT)):
        keep = [n for n, _ in ranked[:keep_count]]
        simulated = _pt2e(model, args, kwargs, fit, fold_weights=fold_weights, keep=keep, float_residual=True)
        with torch.no_grad():
            got = combine([accuracy(ref, simulated(*a, **k)) for (a, k), ref in inputs])
        problem = judge(got, tolerance)
        last = f"{len(keep)} kept: {describe(got)}" + (f" ({problem})" if problem else "")
        note(f"int8 with the residual stream in floating point and {len(keep)} layer(s) kept in fp32 (simulated, "
             f"{len(inputs)} inputs, {len(held)} held out): {describe(got)}")
        if problem is None:
            yield simulated, keep
            last = f"{len(keep)} kept: passed simulated, missed compiled"
        keep_count = max(1, keep_count * 2)
    raise ValueError(f"no split up to {int(len(ranked) * MOST_KEPT)} layers kept in fp32 passes ({last})")
