"""Quantizing the private copy: PT2E with the x86 Inductor quantizer (static with calibration, dynamic
without), torchao ``quantize_`` where PT2E cannot export the model or on request."""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ...errors import NotQuantizableError

STATIC_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)  # what the x86 Inductor quantizer annotates
DYNAMIC_LAYERS = (nn.Linear,)


def layers(model: nn.Module, kinds: tuple) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, kinds)]


def _x86_quantizer_module():
    """torchao's x86 Inductor quantizer, imported without leaving its global pre-grad pass installed."""
    import sys

    import torch._inductor.config as inductor_config

    name = "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer"
    if name in sys.modules:
        return sys.modules[name]
    from ..inductor import config_lock

    with config_lock():  # no other thread compiles while the pass it installs is in place
        before = inductor_config.pre_grad_custom_pass
        try:
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        finally:
            inductor_config.pre_grad_custom_pass = before
    return xiq


def _floating(node) -> bool:
    """Whether an FX node's value is a floating tensor (what an observer can measure)."""
    value = node.meta.get("val") if hasattr(node, "meta") else None
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def drop_integer_annotations(graph_module) -> None:
    """Removes the quantizer's observers from integer tensors. The x86 quantizer annotates ``add``/``mul`` by
    op, whatever the dtype: RoBERTa's position ids (``cumsum(input_ids != pad) * mask``, int32) then met a
    histogram observer, and ``torch.histc`` has no integer kernel ("histogram_cpu" not implemented for 'Int'):
    static int8 of RoBERTa failed. An op left with no floating input or output is not quantized at all."""
    for node in graph_module.graph.nodes:
        annotation = node.meta.get("quantization_annotation")
        if annotation is None:
            continue
        for source in [n for n in annotation.input_qspec_map if not _floating(n)]:
            del annotation.input_qspec_map[source]
        if annotation.output_qspec is not None and not _floating(node):
            annotation.output_qspec = None


def _integer_safe(quantizer_class):
    """``quantizer_class`` whose annotations skip integer tensors (``drop_integer_annotations``)."""

    class IntegerSafeQuantizer(quantizer_class):
        def annotate(self, model):
            model = super().annotate(model)
            drop_integer_annotations(model)
            return model

    IntegerSafeQuantizer.__name__ = quantizer_class.__name__
    return IntegerSafeQuantizer


def _float_residual_quantizer(xiq):
    """The x86 quantizer without its Conv+add(+ReLU) patterns: a convolution feeding a residual add quantizes its
    input and weight only, and the residual stream stays in floating point. The stock patterns quantize the add's
    other input (the stream) and its output, so a ResNet requantizes its stream to u8 per tensor at every block,
    and that error passes undamped from block to block: on the realistic ResNet-50 of ``benchmarks/int8.py``
    0.176 max error, keeping its five most sensitive convolutions in fp32 0.148; with the stream in floating
    point 0.121 and 0.064 (bound 0.1). Linear+add keeps its stream in floating point in the stock quantizer too."""

    class FloatResidualQuantizer(_integer_safe(xiq.X86InductorQuantizer)):
        def _annotate_conv2d_binary_unary(self, *args, **kwargs) -> None:
            pass

        def _annotate_conv2d_binary(self, *args, **kwargs) -> None:
            pass

    return FloatResidualQuantizer()


def _pt2e(model: nn.Module, args: tuple, kwargs: dict, batches: list, fold_weights: bool = True,
          keep: tuple | list = (), float_residual: bool = False) -> nn.Module:
    """Export, annotate with the x86 Inductor quantizer, calibrate on ``batches``, convert to q/dq form.
    No batches: the dynamic config, run once on the example so the weight observers see the weights.
    ``fold_weights=False`` keeps each weight fp32 behind its own quantize/dequantize pair, the FakeQuantize
    pattern OpenVINO's converter turns into int8 kernels (folded int8 weights it cannot convert). ``keep``:
    layers (module names) left unquantized, in fp32 (``sensitivity``); ``float_residual``: residual adds and
    their stream left in floating point (``_float_residual_quantizer``)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    xiq = _x86_quantizer_module()
    exported = torch.export.export(model, tuple(args), dict(kwargs), strict=False).module()
    config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=not batches)
    stock = _integer_safe(xiq.X86InductorQuantizer)
    quantizer = (_float_residual_quantizer(xiq) if float_residual else stock()).set_global(config)
    for name in keep:
        quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_pt2e(exported, quantizer)
    for a, k in batches or [(tuple(args), dict(kwargs))]:
        prepared(*a, **k)
    return convert_pt2e(prepared, fold_quantize=fold_weights)


def _torchao(model: nn.Module, scheme: str) -> nn.Module:
    """torchao ``quantize_`` in place on the private copy: dynamic (per-token activation scales) or weight-only."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    config = Int8WeightOnlyConfig if scheme == "weight_only" else Int8DynamicActivationInt8WeightConfig
    quantize_(model, config(set_inductor_config=False))  # True would change global Inductor settings
    return model


def choose_scheme(model: nn.Module, batches: list) -> str:
    """static with calibration data, dynamic without (weight-only only on request, see the module doc)."""
    if batches:
        return "static"
    if not layers(model, DYNAMIC_LAYERS):
        convs = len(layers(model, STATIC_LAYERS))
        raise NotQuantizableError(
            f"{type(model).__name__} has {convs} Conv layer(s) and no Linear: int8 without calibration data "
            f"quantizes Linear layers only. Pass calibration=[batch, ...] for static int8 of the convolutions")
    return "dynamic"


DESCRIBE = {
    "static": "static PT2E (x86 Inductor quantizer: u8 activations per tensor, s8 weights per channel), "
              "{n} calibration batch(es)",
    "dynamic": "dynamic PT2E (x86 Inductor quantizer: s8 weights per channel, activation scale per tensor "
               "at run time)",
    "dynamic_torchao": "dynamic torchao Int8DynamicActivationInt8WeightConfig (s8 weights per channel, "
                       "per-token activation scales at run time)",
    "weight_only": "weight-only torchao Int8WeightOnlyConfig",
}


def quantize_copy(private: nn.Module, args: tuple, kwargs: dict, batches: list, scheme: str,
              note: Callable[[str], None]) -> tuple[nn.Module, str, dict]:
    """The quantized copy, the scheme that made it, and the Inductor config its compile needs (patched
    around the build only)."""
    if scheme in ("dynamic_torchao", "weight_only"):
        patches = {"freezing": True, "force_fuse_int_mm_with_mul": scheme == "dynamic_torchao"}
        return _torchao(private, scheme), scheme, patches
    try:
        patches = {"freezing": True, "pre_grad_custom_pass": _x86_quantizer_module().quant_lift_up}
        return _pt2e(private, args, kwargs, batches if scheme == "static" else []), scheme, patches
    except Exception as exc:
        if scheme == "static":
            raise
        note(f"int8: PT2E failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
             f"dynamic int8 through torchao on the module instead")
    patches = {"freezing": True, "force_fuse_int_mm_with_mul": True}
    return _torchao(private, "dynamic_torchao"), "dynamic_torchao", patches


def quantized_copy(model: nn.Module, args: tuple, kwargs: dict, batches: list, what: str,
                   quantize: Callable[[nn.Module], object], note: Callable[[str], None]) -> tuple:
    """(quantize(private eval copy), eager fp32 on the example, eager fp32 on each batch). The eager answers
    come first: ``quantize_`` may change the copy in place. Any failure is a ``QuantizationError`` naming
    ``what`` ("int8 static quantization"); ``model`` is never touched."""
    from ...errors import QuantizationError

    private = copy.deepcopy(model)
    if private.training:
        note("int8: the model is in train mode; the int8 copy runs in eval mode")
    private.eval()
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            reference = private(*args, **kwargs)
            references = [private(*a, **k) for a, k in batches]
            return quantize(private), reference, references
    except Exception as exc:
        raise QuantizationError(f"{what} of {type(model).__name__} failed: {type(exc).__name__}: {exc}") from exc
