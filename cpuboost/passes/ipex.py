"""IPEX passes: an inference graph pass ("ipex") and a training pass ("ipex_optimize").

Inference: ``ipex.optimize`` on a copy, then with fusion=True TorchScript trace+freeze; verified and
fallen back from like every graph pass. Under backend='auto' it is built beside Inductor whenever IPEX is
usable, and the faster verified graph serves (IPEX's oneDNN graphs won on AMX convnets, Inductor won
elsewhere); IPEX is imported at that first build, never at ``import cpuboost``.

Training (backend='ipex', dtype='bf16'): ``ipex.optimize(model, optimizer=opt, dtype=bf16)`` in place on
the user's pair: bf16 weights in the model, fp32 master weights behind the optimizer, ``state_dict()``
in the plain fp32 format. The user's module structure is kept (no weight prepacking, no LSTM swap), and
a checkpoint loaded afterwards is copied, not aliased (IPEX keeps references to the loaded tensors).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..core.registry import PassContext, PlanContext, register_pass
from ..options import dtype_name

_IPEX_DTYPES = (torch.float32, torch.bfloat16)


def build_ipex(model: nn.Module, args: tuple, kwargs: dict, ctx: PassContext) -> Callable:
    """IPEX: ipex.optimize, then TorchScript trace+freeze with fusion=True (warm-up runs fuse oneDNN ops)."""
    from ..backends.ipex import infer as ipex_infer

    if ctx.dynamic_dims and ctx.options.fusion:
        raise NotImplementedError("IPEX's TorchScript trace is static in every dim; it drops out for dynamic dims "
                                  f"{ctx.dynamic_dims}")
    return ipex_infer.build(model, args, kwargs, ctx.options.dtype, ctx.options.fusion, ctx.notes,
                            accept_tracer_warnings=ctx.options.accept_tracer_warnings)


def _ipex_verdict(explicit: bool) -> Optional[str]:
    from ..backends.ipex.probe import availability, usable_now

    if explicit:  # backend='ipex': decide now, so an unusable IPEX is an error at optimize()
        verdict = availability()
        return None if verdict.usable else verdict.reason
    return usable_now()


def _inference_wanted(ctx: PlanContext) -> Optional[str]:
    backend = ctx.options.backend
    if backend not in ("auto", "ipex"):
        return f"backend={backend!r}"
    if backend == "auto" and not ctx.options.fusion:
        return "fusion=False (under backend='auto' IPEX is a fused-graph candidate; backend='ipex' runs it imperative)"
    if ctx.options.dtype not in _IPEX_DTYPES:
        return f"dtype={dtype_name(ctx.options.dtype)}: cpuboost's IPEX paths are fp32 and bf16"
    return _ipex_verdict(explicit=backend == "ipex")


# -- training ------------------------------------------------------------------------------------------


def ipex_optimize(model: nn.Module, ctx: PassContext) -> nn.Module:
    """ipex.optimize(model, optimizer, dtype=bf16) in place: bf16 weights, fp32 masters, fused IPEX step."""
    from ..backends.ipex.probe import ipex_logs, load

    ipex, opt = load(), ctx.optimizer
    patched = _InstancePatches([*model.modules(), opt])
    try:
        with ipex_logs() as said, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new_model, new_opt = ipex.optimize(model, optimizer=opt, dtype=torch.bfloat16, inplace=True,
                                               weights_prepack=False, optimize_lstm=False)
        if new_model is not model or new_opt is not opt:
            raise RuntimeError("ipex.optimize(inplace=True) returned new objects; cpuboost trains your own pair")
        copied = _copy_checkpoints_on_load(model)
    except BaseException:  # not a fallback: undo our patches, then the error (or interrupt) goes on as it was
        patched.undo()  # then cpuboost.training restores the parameter tables
        raise
    cast = sum(p.dtype == torch.bfloat16 for p in model.parameters())
    step = getattr(opt.step, "__name__", "step")
    ctx.note(f"{cast} parameter(s) now bf16 with fp32 masters; optimizer step: IPEX {step}; state_dict() "
             f"of both is the plain fp32 format; {copied} module(s) copy checkpoints on load")
    ctx.notes.extend(m for m in said if "deprecated" not in m)
    return model


def _training_wanted(ctx: PlanContext) -> Optional[str]:
    if ctx.options.backend != "ipex":
        return f"backend={ctx.options.backend!r} (ask backend='ipex' for IPEX training)"
    if ctx.options.dtype != torch.bfloat16:
        return "IPEX training is wired for dtype='bf16' (ipex.optimize with an optimizer); use dtype='bf16'"
    if ctx.optimizer is None:
        return "no optimizer given (ipex.optimize trains a (model, optimizer) pair)"
    return _ipex_verdict(explicit=True)


class _InstancePatches:
    """What IPEX sets on instances (state_dict, step, _load_from_state_dict, ...), to take it off again."""

    def __init__(self, objects: list[Any]) -> None:
        self.saved = [(obj, dict(vars(obj))) for obj in objects]

    def undo(self) -> None:
        for obj, before in self.saved:
            attrs = vars(obj)
            for key in [k for k in attrs if k not in before]:
                del attrs[key]
            for key, value in before.items():
                if attrs.get(key, value) is not value:
                    attrs[key] = value


def _copy_checkpoints_on_load(model: nn.Module) -> int:
    """IPEX's per-module loader keeps the caller's tensors as master weights (so training would write into
    the user's checkpoint) and skips torch's key/shape checks: run torch's loader first, give IPEX copies."""
    count = 0
    for module in model.modules():
        ipex_load = vars(module).get("_load_from_state_dict")
        if ipex_load is None or getattr(ipex_load, "_cpuboost_copying", False):
            continue
        vars(module)["_load_from_state_dict"] = _copying_loader(module, ipex_load)
        count += 1
    return count


def _copying_loader(module: nn.Module, ipex_load: Callable) -> Callable:
    def load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        errors_before = len(error_msgs)
        nn.Module._load_from_state_dict(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)  # checks, buffers, values into bf16
        if len(error_msgs) > errors_before:
            return
        own = {prefix + name for name, p in module._parameters.items() if p is not None}
        copies = {k: v.detach().clone() for k, v in state_dict.items() if k in own and torch.is_tensor(v)}
        with torch.no_grad():
            ipex_load(copies, prefix, local_metadata, strict, [], [], error_msgs)  # masters from the copies

    load._cpuboost_copying = True  # type: ignore[attr-defined]
    return load


def register() -> None:
    register_pass(build_ipex, name="ipex", kind="graph", modes="infer", after=("inductor", "openvino"),
                  available=_inference_wanted)
    register_pass(ipex_optimize, name="ipex_optimize", modes="train", after=("fused_optimizer", "autocast"),
                  available=_training_wanted)
