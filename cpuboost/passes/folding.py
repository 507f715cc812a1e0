"""Fold BatchNorm into the Conv/Linear that feeds it (inference only).

Pairs are found by watching one real forward: a BatchNorm whose input *is* the output tensor of a
Conv or Linear, each called once. No tracing, so models with Python control flow work; the folded model
is still verified against eager, which catches the rare case where the conv output is used elsewhere too.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..core.registry import PassContext, PlanContext, register_pass
from .watch import watched_forward

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# (producer type, BatchNorm type) -> folding function, as torch's fuser_method_mappings does it
_FOLDERS = {
    (nn.Conv1d, nn.BatchNorm1d): fuse_conv_bn_eval,
    (nn.Conv2d, nn.BatchNorm2d): fuse_conv_bn_eval,
    (nn.Conv3d, nn.BatchNorm3d): fuse_conv_bn_eval,
    (nn.Linear, nn.BatchNorm1d): fuse_linear_bn_eval,
}
_PRODUCERS = tuple({p for p, _ in _FOLDERS})


def _find_pairs(model: nn.Module, ctx: PassContext) -> list[tuple[str, str]]:
    names = {m: n for n, m in model.named_modules()}
    calls: dict[nn.Module, int] = {}
    produced: dict[int, nn.Module] = {}
    fed: dict[nn.Module, nn.Module] = {}

    def after_producer(mod, _inputs, output):
        calls[mod] = calls.get(mod, 0) + 1
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (mod, output)

    def before_bn(mod, inputs):
        calls[mod] = calls.get(mod, 0) + 1
        if inputs and isinstance(inputs[0], torch.Tensor) and id(inputs[0]) in produced:
            producer, tensor = produced[id(inputs[0])]
            if tensor is inputs[0]:
                fed[mod] = producer

    handles = []
    for mod in model.modules():
        if isinstance(mod, _PRODUCERS):
            handles.append(mod.register_forward_hook(after_producer))
        elif isinstance(mod, _BN):
            handles.append(mod.register_forward_pre_hook(before_bn))
    watched_forward(model, ctx, handles)
    pairs = []
    for bn, producer in fed.items():
        if calls.get(bn) == 1 and calls.get(producer) == 1 and (type(producer), type(bn)) in _FOLDERS:
            if bn.track_running_stats and bn.running_mean is not None:
                pairs.append((names[producer], names[bn]))
    return pairs


def fold_batchnorm(model: nn.Module, ctx: PassContext) -> nn.Module:
    """Fold BatchNorm into the preceding Conv/Linear (one kernel fewer per pair)."""
    pairs = _find_pairs(model, ctx)
    for producer_name, bn_name in pairs:
        producer, bn = model.get_submodule(producer_name), model.get_submodule(bn_name)
        folded = _FOLDERS[(type(producer), type(bn))](producer, bn)
        model.set_submodule(producer_name, folded)
        model.set_submodule(bn_name, nn.Identity().train(bn.training))  # a new module defaults to train mode
    ctx.note(f"folded {len(pairs)} pair(s)")
    return model


def _has_bn(ctx: PlanContext):
    if not ctx.has_module(*_BN):
        return "no BatchNorm layers"
    return None


def register() -> None:
    register_pass(fold_batchnorm, name="fold_batchnorm", modes="infer", after="eval", available=_has_bn,
                  writes_weights=False)
