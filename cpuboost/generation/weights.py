"""Weight-only int8 / int4 matmul layers for the decode copy: a decode step is bound by reading weights, so
fewer bytes per weight is the speed. Activations stay bf16; the layers run outside autocast.

- int8: per-output-channel symmetric (torchao's ``Int8WeightOnlyConfig`` scheme, computed here: 3x faster than
  ``quantize_``, no import), run by aten's ``_weight_int8pack_mm``, which Inductor lowers to its C++ GEMM
  template (scale as an epilogue); on AVX512_VNNI CPUs decode builds give it cpuboost's int16 dot-product
  micro-kernel (backends/int8_dot.py), on AMX_INT8 CPUs its AMX kernel from 2 rows (backends/int8_amx.py).
- int4: aten's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``, group-wise asymmetric, what torchao's CPU
  int4 layout wraps; torchao 0.18's own ``Int4WeightOnlyConfig`` needs ``mslk`` kernels on CPU).
Each layer can give its weight back dequantized, so the judge's yardstick is an eager run of exactly
the quantized weights: the quantization's own error (DESIGN contract 1). It holds them in bf16 (the dtype
autocast runs them in anyway): half the memory of an fp32 copy, and no cast per call."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .copies import matmul_layers

KINDS = ("int8", "int4")
_GROUP_SIZES = (128, 64, 32)


class WeightOnlyLinear(nn.Module):
    """A linear layer whose weight is held quantized; bf16 activations in, bf16 out (as autocast's linear)."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        with torch.autocast("cpu", enabled=False):
            out = self._matmul(flat)
            if self.bias is not None:
                out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(WeightOnlyLinear):
    """Per-output-channel symmetric int8 (torchao's ``Int8WeightOnlyConfig`` scheme), held as plain buffers and
    run by aten's weight-only int8 kernel directly: the same op in-process and exported (an exported torchao
    tensor subclass is dequantized to bf16 instead, which freezing folds into bf16 weights: bf16's speed)."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__(linear)
        weight = linear.weight.detach()
        scale = (weight.abs().amax(dim=1).float() / 127).clamp(min=1e-12).to(torch.bfloat16)  # the kernel's dtype
        codes = weight.float().div(scale.float()[:, None])  # one new tensor, then rounded and clipped in place
        self.register_buffer("qdata", codes.round_().clamp_(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qdata, self.scale)

    def dequantized(self) -> torch.Tensor:
        return self.qdata.to(torch.bfloat16) * self.scale[:, None]  # codes are exact in bf16; one rounding


class Int4Linear(WeightOnlyLinear):
    def __init__(self, linear: nn.Module, group_size: int) -> None:
        super().__init__(linear)
        weight = linear.weight.detach().float()
        n, k = weight.shape
        groups = weight.view(n, k // group_size, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-6)
        codes = torch.clamp(torch.round((groups - low) / scale), 0, 15).to(torch.int32)
        zero = low + 8 * scale  # the kernel computes (code - 8) * scale + zero
        scales_and_zeros = torch.stack([scale.view(n, -1), zero.view(n, -1)], -1).transpose(0, 1)
        self.group_size = group_size
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous().to(torch.bfloat16))
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.view(n, k), 1))
        # for the judge's yardstick only: one byte per weight, a quarter of what fp32 would keep
        self._codes, self._scale, self._zero = codes.to(torch.uint8), scale.bfloat16(), zero.bfloat16()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)

    def dequantized(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        return ((self._codes.float() - 8) * self._scale.float() + self._zero.float()).view(n, k)


def unavailable(kind: str) -> Optional[str]:
    """None when weight-only ``kind`` can run on this torch and CPU, else why not (and what to do)."""
    if kind == "int8":
        if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            return f"torch {torch.__version__} has no weight-only int8 kernel (_weight_int8pack_mm); use dtype='bf16'"
        return None
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} has no CPU int4 kernel (_weight_int4pack_mm_for_cpu); use dtype='int8'"
    return None


def quantize_matmul_weights(model: nn.Module, kind: str) -> tuple[int, list[str]]:
    """Replace the matmul layers of ``model`` (a private copy) by weight-only ``kind`` layers. Returns the
    number replaced and the layers kept in their dtype, with why."""
    replaced, kept = 0, []
    for name, module in list(matmul_layers(model)):
        if not isinstance(module, nn.Linear):
            kept.append(f"{name} ({type(module).__name__})")
            continue
        if kind == "int8":
            layer: nn.Module = Int8Linear(module)
        else:
            group = next((g for g in _GROUP_SIZES if module.in_features % g == 0), None)
            if group is None:
                kept.append(f"{name} (in_features {module.in_features} not a multiple of 32)")
                continue
            layer = Int4Linear(module, group)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
        replaced += 1
    return replaced, kept


# Inductor's FX graph cache keys a frozen graph's weight-only int8 GEMM without the weights its template packs
# (torch 2.13): a later model of the same shapes is served the first one's packed weights (Linear 896->4864, two
# processes, two seeds: max error 3.2 on outputs of 2.1). bf16 and int4 graphs are keyed right. A build of a
# graph that holds int8 layers skips that cache.
UNCACHED = {"fx_graph_cache": False}


def inductor_options(model: nn.Module, options: dict) -> dict:
    """``options`` for an Inductor build of ``model``, with the FX graph cache off where it holds int8 layers."""
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return {**options, **UNCACHED}
    return options


def fake_quantized(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """``model`` (a shared fp32 copy) with each weight ``quantized`` holds replaced by its dequantized value."""
    for name, module in quantized.named_modules():
        if isinstance(module, WeightOnlyLinear):
            target = model.get_submodule(name)
            target._parameters["weight"] = nn.Parameter(module.dequantized().to(torch.bfloat16), requires_grad=False)
    return model
