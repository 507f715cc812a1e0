"""Accuracy-aware static int8: when the whole-model graph misses int8's bound, keep the layers that cost the
most accuracy in fp32 until the rest passes (what IPEX's ``quantization.autotune`` and NNCF's
``quantize_with_accuracy_control`` do).

Each quantizable layer's cost is measured alone, cheaply: the fp32 model runs once per layer on a calibration
batch with only that layer's input (u8 per tensor, the calibration range) and weight (s8 per channel)
fake-quantized, and the output's error against eager fp32 ranks the layers. The 1, 2, 4, ... worst are then
left out of the PT2E quantizer (``set_module_name_qconfig(name, None)``) and the simulated int8 model (eager
q/dq, no compile) is judged on the example, the batches that set the scales and a held-out part of the
calibration data, until it passes; only that one is compiled. Kept layers run in fp32 inside the int8 graph.
"""
from __future__ import annotations

from collections.abc import Callable
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
    return f" ({len(held_out(batches)[1])} batch(es) held out of calibration); layers kept in fp32: {', '.join(keep)}"


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
                   fold_weights: bool = True) -> tuple[nn.Module, list]:
    """(simulated-int8 model that passes, layers kept in fp32), or raises ``ValueError`` saying how far it got.
    ``batches``/``references``: every calibration batch and eager fp32's answer on it; the scales are set on
    all but the held-out ones, the judge sees them all and the example. ``fold_weights=False``: weights as
    FakeQuantize, the form OpenVINO converts."""
    fit, held = held_out(batches)
    ranked = rank_layers(model, *fit[0], references[0])
    note("int8 layer sensitivity (output error with only that layer quantized, first calibration batch): "
         + ", ".join(f"{n} {e:.3g}" for n, e in ranked[:6]) + (" ..." if len(ranked) > 6 else ""))
    inputs = [((tuple(args), dict(kwargs)), reference)] + list(zip(batches, references))
    keep_count, last = 1, ""
    while keep_count <= max(1, int(len(ranked) * MOST_KEPT)):
        keep = [n for n, _ in ranked[:keep_count]]
        simulated = _pt2e(model, args, kwargs, fit, fold_weights=fold_weights, keep=keep)
        with torch.no_grad():
            got = combine([accuracy(ref, simulated(*a, **k)) for (a, k), ref in inputs])
        problem = judge(got, tolerance)
        last = f"{len(keep)} kept: {describe(got)}" + (f" ({problem})" if problem else "")
        note(f"int8 with {len(keep)} layer(s) kept in fp32 (simulated, {len(inputs)} inputs, {len(held)} held out): "
             f"{describe(got)}")
        if problem is None:
            return simulated, keep
        keep_count *= 2
    raise ValueError(f"no split up to {int(len(ranked) * MOST_KEPT)} layers kept in fp32 passes ({last})")
