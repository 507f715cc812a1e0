"""Training passes: train mode, autocast, loss scaling, the fused optimizer step, a compiled forward.

Training passes work in place on the user's model and optimizer: the optimizer holds the model's own
Parameters, so a copy could not be trained. ``cpuboost.training`` rolls a pass back if it raises.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..core.registry import PassContext, PlanContext, register_pass

# Optimizers whose CPU fused kernel was checked in torch 2.13 (step ops: aten::_fused_<name>_). Only these
# exact classes: a subclass may override step() and ignore or break on ``fused``.
FUSED_ON_CPU = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)
_FLAGS = ("fused", "foreach")


def train_mode(model: nn.Module, ctx: PassContext) -> nn.Module:
    """Train mode: dropout on, BatchNorm on batch statistics; submodules you froze in eval stay so."""
    if model.training:
        frozen = sum(not m.training for m in model.modules())
        if frozen:
            ctx.note(f"already in train mode; {frozen} submodule(s) you set to eval left as they are")
        else:
            ctx.note("already in train mode")
        return model
    model.train()  # only reached with mode="train" asked explicitly (see cpuboost.training)
    ctx.note("switched from eval to train mode because mode='train' was asked")
    return model


def autocast(model: nn.Module, ctx: PassContext) -> nn.Module:
    """Forward under torch.autocast('cpu'); fp32 parameters stay the master weights."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[ctx.options.dtype]
    ctx.note(f"forward under torch.autocast('cpu', {name}); parameters, gradients and optimizer state stay fp32; "
             "floating outputs come back fp32")
    return model


def _low_precision(ctx: PlanContext) -> Optional[str]:
    return None if ctx.options.low_precision else "dtype=fp32"


def grad_scaler(model: nn.Module, ctx: PassContext) -> nn.Module:
    """fp16 needs loss scaling: the returned model's .grad_scaler is an enabled GradScaler('cpu')."""
    ctx.note("use net.grad_scaler: scaler.scale(loss).backward(); scaler.step(opt); scaler.update()")
    return model


def _fp16(ctx: PlanContext) -> Optional[str]:
    if ctx.options.dtype == torch.float16:
        return None
    return "bf16 has fp32's exponent range: no loss scaling needed" if ctx.options.low_precision else "dtype=fp32"


# -- the fused optimizer step --------------------------------------------------------------------------


class FusedStepHooks:
    """Optimizer hooks that keep cpuboost's fused step safe and invisible to checkpoints.

    - ``state_dict()`` reports each group's ``fused``/``foreach`` as the user built them, so a checkpoint is
      the one a plain optimizer writes; ``load_state_dict()`` (which copies those flags back from the
      checkpoint) is followed by switching the fused step on again.
    - Before each fused step, gradients and optimizer state get their parameter's memory layout. torch 2.13's
      CPU fused kernels walk params, grads and state as flat memory without checking that strides agree
      (CUDA checks): a plain checkpoint's contiguous state next to a channels_last weight is read permuted
      (wrong updates), and state made before the layout change is written permuted (wrong checkpoints).
    """

    def __init__(self, plain: list[dict[str, Any]]) -> None:
        self.plain = plain  # per param group: the user's own flag values
        self.fused_groups: set[int] = set()

    def state_dict_post(self, optimizer: torch.optim.Optimizer, state: dict) -> dict:
        for index, group in enumerate(state["param_groups"]):
            if index in self.fused_groups and index < len(self.plain):
                group.update(self.plain[index])
        return state

    def load_state_dict_post(self, optimizer: torch.optim.Optimizer) -> None:
        for index in self.fused_groups:
            if index < len(optimizer.param_groups):
                optimizer.param_groups[index].update(fused=True, foreach=False)

    def step_pre(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for group in optimizer.param_groups:  # fused by cpuboost or by the user: both need one layout
            if group.get("fused"):
                match_layout(optimizer, group["params"])


def _like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` copied into ``param``'s strides (empty_like keeps a dense tensor's strides)."""
    return torch.empty_like(param, dtype=value.dtype).copy_(value)


def match_layout(optimizer: torch.optim.Optimizer, params: list) -> int:
    """Give grads and per-parameter state tensors their parameter's strides; returns how many changed."""
    changed = 0
    for p in params:
        if p.dim() < 2:  # one dimension has one memory order
            continue
        stride = p.stride()
        grad = p.grad
        if grad is not None and grad.stride() != stride and grad.shape == p.shape and not grad.is_sparse:
            p.grad = _like(p, grad)
            changed += 1
        state = optimizer.state.get(p)
        if state:
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != stride:
                    state[key] = _like(p, value)
                    changed += 1
    return changed


# One set of hooks per optimizer, however often it is prepared; weak, so optimizers are freed normally.
_HOOKS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, FusedStepHooks]" = weakref.WeakKeyDictionary()


def _group_blocker(group: dict) -> Optional[str]:
    """Why this param group cannot take the fused step, or None."""
    if group.get("fused") is False:
        return "built with fused=False; kept as asked"
    if group.get("differentiable"):
        return "differentiable=True has no fused kernel"
    if group.get("capturable"):
        return "capturable=True is for CUDA graphs; kept as built"
    for p in group["params"]:
        if type(p) not in _PLAIN_TENSORS or p.device.type != "cpu" or not torch.is_floating_point(p):
            return f"a {type(p).__name__} of {p.dtype} on {p.device.type}: the fused kernel takes CPU float tensors"
    return None


def _sparse_embeddings(model: nn.Module) -> bool:
    return any(getattr(m, "sparse", False) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)))


def _fusable(ctx: PlanContext) -> Optional[str]:
    opt = ctx.optimizer
    if opt is None:
        return "no optimizer given"
    if type(opt) not in FUSED_ON_CPU:
        known = ", ".join(c.__name__ for c in FUSED_ON_CPU)
        base = next((c.__name__ for c in FUSED_ON_CPU if isinstance(opt, c)), None)
        if base:
            return f"{type(opt).__name__} subclasses {base} and may override step(); keeps its own step"
        return f"{type(opt).__name__} has no fused CPU kernel in torch (those: {known}); keeps its own step"
    if _sparse_embeddings(ctx.model):
        return "sparse embedding gradients have no fused kernel"
    if "fused" not in inspect.signature(type(opt).__init__).parameters:
        return f"this torch's {type(opt).__name__} takes no fused= argument"
    blockers = [_group_blocker(g) for g in opt.param_groups]
    if all(blockers):
        return f"no param group can use it: {blockers[0]}"
    return None


def fused_optimizer(model: nn.Module, ctx: PassContext) -> nn.Module:
    """Switch the optimizer to torch's fused CPU step (one kernel per dtype, 1.5-4x faster than the loop)."""
    opt = ctx.optimizer
    hooks = _HOOKS.get(opt)
    fresh = hooks is None
    if fresh:
        hooks = FusedStepHooks([{k: g.get(k) for k in _FLAGS} for g in opt.param_groups])
    switched, kept = [], []
    for index, group in enumerate(opt.param_groups):
        blocker = _group_blocker(group)
        if blocker:
            kept.append(f"group {index}: {blocker}")
        elif not group.get("fused"):
            switched.append(index)
    if fresh:  # register before touching the groups, so a failure leaves no flags without hooks
        opt.register_state_dict_post_hook(hooks.state_dict_post)
        opt.register_load_state_dict_post_hook(hooks.load_state_dict_post)
        opt.register_step_pre_hook(hooks.step_pre)
        _HOOKS[opt] = hooks
    for index in switched:
        opt.param_groups[index].update(fused=True, foreach=False)
    hooks.fused_groups.update(switched)
    already = sum(bool(g.get("fused")) for g in opt.param_groups) - len(switched)
    ctx.note(f"{type(opt).__name__}: fused=True on {len(switched)} of {len(opt.param_groups)} param group(s)"
             + (f" ({already} already fused)" if already else "")
             + "; state_dict() keeps your own flags, so checkpoints load into plain optimizers and back")
    moved = match_layout(opt, [p for g in opt.param_groups if g.get("fused") for p in g["params"]])
    if moved:
        ctx.note(f"{moved} gradient/state tensor(s) given their parameter's memory layout")
    ctx.notes.extend(kept)
    return model


def fused_groups(opt: Optional[torch.optim.Optimizer]) -> Optional[frozenset[int]]:
    """Which param groups cpuboost switched to the fused step (for rolling a failed prepare back)."""
    hooks = _HOOKS.get(opt) if opt is not None else None
    return None if hooks is None else frozenset(hooks.fused_groups)


def set_fused_groups(opt: torch.optim.Optimizer, groups: Optional[frozenset[int]]) -> None:
    hooks = _HOOKS.get(opt)
    if hooks is not None:
        hooks.fused_groups = set(groups or ())


# -- compiled training forward ---------------------------------------------------------------------------


def compiled_training(model: nn.Module, args: tuple, kwargs: dict, ctx: PassContext) -> Callable:
    """torch.compile (Inductor, no freezing) of the autocast forward; backward compiled by AOTAutograd."""
    from ..core.precision import fresh_runner
    from ..integrations.transformers_guards import steady_output_registration

    steady_output_registration()
    return torch.compile(fresh_runner(model, ctx.options.dtype), backend="inductor")


def _compile_wanted(ctx: PlanContext) -> Optional[str]:
    if not ctx.options.compile_training:
        return "compile_training=False (default): eager forward and backward; set it True to try Inductor"
    if ctx.options.backend not in ("auto", "native"):
        return f"backend={ctx.options.backend!r}"
    if not ctx.hardware.has_cxx_compiler:
        return "no C++ compiler (g++/clang++) on PATH; Inductor needs one. Install g++ to enable it"
    return None


def register() -> None:
    register_pass(train_mode, name="train_mode", modes="train", before="channels_last")
    register_pass(autocast, name="autocast", modes="train", after="train_mode", available=_low_precision)
    register_pass(grad_scaler, name="grad_scaler", modes="train", after="autocast", available=_fp16)
    register_pass(fused_optimizer, name="fused_optimizer", modes="train", after="channels_last",
                  available=_fusable)
    register_pass(compiled_training, name="compiled_training", kind="graph", modes="train",
                  available=_compile_wanted)
