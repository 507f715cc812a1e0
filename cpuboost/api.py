"""``optimize`` (the functional form), ``cpu_optimized`` (the decorator), ``explain`` and ``unwrap``."""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable

import torch
import wrapt
from torch import nn

from .core import registry
from .machine import hardware
from .amp import amp_wrapper, cpu_amp, warn_if_emulated
from .errors import (BackendUnavailableError, CpuBoostError, InvalidOptionError, OptimizerMismatchError,
                     UnsupportedTargetError)
from .options import Options, check_option_names, is_disabled, resolve_options
from .core.proxy import ModelProxy
from .core.report import Report


def _check_optimizer(model: nn.Module, optimizer: Any) -> None:
    if isinstance(optimizer, (list, tuple)):
        msg = (f"got {len(optimizer)} optimizers; cpuboost optimizes one (model, optimizer) pair. "
               "Combine parameter groups into one optimizer, or optimize the model alone (mode='train').")
        raise OptimizerMismatchError(msg)
    if not isinstance(optimizer, torch.optim.Optimizer):
        msg = f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        raise OptimizerMismatchError(msg)
    owned = {id(p) for p in model.parameters()}
    used = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = [p for p in used if id(p) not in owned]
    if not used or foreign:
        what = "has no parameters" if not used else f"holds {len(foreign)} parameter(s) that are not the model's"
        msg = (f"the {type(optimizer).__name__} {what}; build it from this model's parameters, e.g. "
               f"torch.optim.AdamW(model.parameters()), after creating the model it trains")
        raise OptimizerMismatchError(msg)


def _pick_mode(options: Options, optimizer: Any) -> str:
    if options.mode != "auto":
        return options.mode
    return "train" if optimizer is not None else "infer"


def optimize(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **options: Any):
    """Optimize ``model`` (and ``optimizer``) for this CPU; returns what it was given, optimized.

    With an optimizer the training path is taken and ``(model, optimizer)`` comes back; without one,
    the inference path and a single module. ``mode="train"|"infer"`` overrides that choice.
    """
    opts = resolve_options(options)
    if is_disabled():
        return model if optimizer is None else (model, optimizer)
    if isinstance(model, ModelProxy):
        model = model.original
    if not isinstance(model, nn.Module):
        msg = (f"optimize() expects a torch.nn.Module, got {type(model).__name__}; "
               "pass the model (and optionally its optimizer) itself")
        raise UnsupportedTargetError(msg)
    if optimizer is not None:
        _check_optimizer(model, optimizer)
    mode = _pick_mode(opts, optimizer)
    if mode == "train" and opts.dtype == torch.int8:
        msg = ("dtype='int8' is an inference path (quantized weights and activations); training takes "
               "dtype='bf16', 'fp16' or 'fp32'. Train in bf16, then optimize the trained model with dtype='int8'.")
        raise InvalidOptionError(msg)
    if opts.dtype == getattr(torch, "int4", None):
        _check_int4_target(model, mode)
    hw = hardware.detect()
    if opts.low_precision:
        warn_if_emulated(opts.dtype)
    plan = registry.plan(model, optimizer, opts, hw, mode)
    _check_backend(opts, plan)
    if mode == "train":
        from .training import prepare_training

        return prepare_training(model, optimizer, opts, plan)
    from .core.module import OptimizedModule

    optimized = OptimizedModule(model, opts, plan, hw)
    return optimized if optimizer is None else (optimized, optimizer)


def _check_backend(opts: Options, plan: registry.Plan) -> None:
    """An explicitly requested backend that cannot run is an error, not a quiet fallback."""
    if plan.mode == "train" and opts.backend == "openvino":
        msg = ("backend='openvino' was asked for a training model, but OpenVINO runs inference only; train with "
               "backend='auto' (or 'native'/'ipex'), then optimize the trained model with backend='openvino'")
        raise BackendUnavailableError(msg)
    if opts.backend in ("auto", "eager") or (plan.mode == "train" and opts.backend != "ipex"):
        return
    names = {"native": "inductor"}.get(opts.backend, opts.backend)
    if plan.mode == "train":  # IPEX training is a train pass, not a graph pass
        names = "ipex_optimize"
    if any(p.name == names for p in plan.graph_passes + plan.module_passes):
        return
    why = dict(plan.skipped).get(names, "no graph pass serves it")

    fix = " (pip install 'cpuboost[openvino]')" if opts.backend == "openvino" and "install" not in why else ""
    msg = (f"backend={opts.backend!r} was asked for but cannot run here: {why}{fix}. Use backend='auto' to "
           "fall back to what runs here (choices: 'auto', 'native', 'eager', 'ipex', 'openvino').")
    raise BackendUnavailableError(msg)


def unwrap(model: Any) -> Any:
    """The user's original model behind an optimized one (anything else is returned as is)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, ModelProxy):
            model = model.original
        else:
            return model


def explain(model: Any) -> Report:
    """What cpuboost did to ``model``: passes applied and skipped with reasons, graphs, costs."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if isinstance(inner, ModelProxy):
        return inner.explain()
    msg = (f"explain() needs a model returned by cpuboost (optimize or @cpu_optimized), "
           f"got {type(model).__name__}; was CPUBOOST_DISABLE=1 set?")
    raise CpuBoostError(msg)


def _optimize_result(result: Any, options: dict) -> Any:
    """A factory's return value: a Module or a (Module, Optimizer) pair is optimized, anything else kept."""
    if isinstance(result, nn.Module):
        return optimize(result, **options)
    if isinstance(result, (tuple, list)) and any(isinstance(x, nn.Module) for x in result):
        if (len(result) == 2 and isinstance(result[0], nn.Module)
                and isinstance(result[1], torch.optim.Optimizer)):
            return optimize(result[0], result[1], **options)
        rest = list(result[1]) if len(result) == 2 and isinstance(result[1], (list, tuple)) else list(result[1:])
        if len(rest) > 1 and all(isinstance(o, torch.optim.Optimizer) for o in rest):
            _check_optimizer(result[0], rest)  # several optimizers: a typed error that says what to do
        kinds = ", ".join(type(x).__name__ for x in result)
        msg = (f"the decorated factory returned ({kinds}); cpuboost expects a Module (inference) or a "
               "(Module, Optimizer) pair (training). Return one of those, or optimize the parts with "
               "cpuboost.optimize().")
        raise UnsupportedTargetError(msg)
    return result


class _OptimizedClass(wrapt.FunctionWrapper):
    """A decorated nn.Module subclass: instances come back optimized and still pass isinstance."""

    def __instancecheck__(self, instance: Any) -> bool:
        return isinstance(instance, self.__wrapped__) or (
            isinstance(instance, ModelProxy) and isinstance(instance.original, self.__wrapped__)
        )

    def __subclasscheck__(self, subclass: type) -> bool:
        return issubclass(subclass, self.__wrapped__)


def cpu_optimized(fn: Callable | None = None, /, **options: Any):
    """Decorate a model factory, an ``nn.Module`` class, or a train step.

    Options: ``dtype`` ("bf16" | "fp16" | "fp32"), ``fusion`` (compile a fused graph), ``backend``
    ("auto" | "native" | "eager" | "ipex" | "openvino"), ``mode`` ("auto" | "infer" | "train"),
    ``verify``, ``inplace``, ``cache_size``. The call runs under ``cpu_amp(dtype)``; a returned Module
    or (Module, Optimizer) is optimized, any other result comes back unchanged.
    Set ``CPUBOOST_DISABLE=1`` to turn every decorator into a pass-through while debugging.
    """
    if fn is None:
        return lambda f: cpu_optimized(f, **options)
    check_option_names(options)
    Options(**options)  # bad values fail here, at decoration time, not at the first call
    if not callable(fn):
        msg = f"@cpu_optimized decorates a model factory, an nn.Module class or a function, got {fn!r}"
        raise UnsupportedTargetError(msg)

    def amp_context():
        if is_disabled():
            return contextlib.nullcontext()
        return cpu_amp(resolve_options(options).amp_dtype or torch.float32)  # int8 builds run in fp32

    if inspect.isclass(fn):
        if not issubclass(fn, nn.Module):
            msg = f"@cpu_optimized on a class needs an nn.Module subclass, got {fn.__name__}"
            raise UnsupportedTargetError(msg)

        def make_instance(wrapped, instance, args, kwargs):
            model = wrapped(*args, **kwargs)
            return model if is_disabled() else optimize(model, **options)

        return _OptimizedClass(fn, make_instance)

    if inspect.isgeneratorfunction(fn):
        return amp_wrapper(fn, amp_context)

    @wrapt.decorator
    def call(wrapped, instance, args, kwargs):
        if is_disabled():
            return wrapped(*args, **kwargs)
        with amp_context():
            result = wrapped(*args, **kwargs)
        return _optimize_result(result, options)

    return call(fn)


def _check_int4_target(model: nn.Module, mode: str) -> None:
    """dtype='int4' is weight-only int4 for generate(): refused, before anything is copied, where nothing serves it."""
    from .generation import can_route

    why = "training takes dtype='bf16', 'fp16' or 'fp32'" if mode == "train" else can_route(model)
    if why is not None:
        msg = (f"dtype='int4' is weight-only int4 for generate() of transformers causal LMs, and nothing serves it "
               f"for this {type(model).__name__}: {why}. Use dtype='int8' for quantized inference or 'bf16'.")
        raise InvalidOptionError(msg)
