"""The private working copy that module passes rewrite, and the rollback of a pass that failed.

A full ``deepcopy`` doubles the model in memory. The working copy instead copies the module tree only:
every Parameter and buffer of the copy is a new tensor object over the *same storage* as the original's,
so weights a pass does not change are shared, while a pass that replaces one (``.to()``, folding) replaces
it in the copy alone. Passes must not write into weights in place; rebinding (``param.data = ...``,
``setattr``) is what ``.to()``, folding and the other built-in passes do.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any, Callable

import torch
from torch import nn

from .registry import PassContext, PassSpec
from .report import PassRecord

log = logging.getLogger("cpuboost")


def shallow_copy(model: nn.Module) -> nn.Module:
    """The module tree copied, its Parameters and buffers new objects over the original's storage."""
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for param in model.parameters():
            memo[id(param)] = nn.Parameter(param.detach(), requires_grad=param.requires_grad)
        for buf in model.buffers():
            memo[id(buf)] = buf.detach()
        return copy.deepcopy(model, memo)


@dataclasses.dataclass
class Snapshot:
    """What a pass could change on a model it rewrites in place (inplace=True): enough to undo it."""

    tables: list[tuple[nn.Module, dict, dict, dict, bool]]
    data: list[tuple[torch.Tensor, torch.Tensor]]


def snapshot(model: nn.Module) -> Snapshot:
    tables = [(m, dict(m._parameters), dict(m._buffers), dict(m._modules), m.training) for m in model.modules()]
    data = [(t, t.data) for t in [*model.parameters(), *model.buffers()]]
    return Snapshot(tables, data)


def restore(saved: Snapshot) -> None:
    """Put every table entry, tensor binding and train flag back as it was when the snapshot was taken."""
    with torch.no_grad():
        for module, params, buffers, modules, training in saved.tables:
            for table, old in ((module._parameters, params), (module._buffers, buffers), (module._modules, modules)):
                table.clear()
                table.update(old)
            module.training = training
        for tensor, data in saved.data:
            if tensor.data is not data:
                tensor.data = data


def apply_module_passes(original: nn.Module, specs: tuple[PassSpec, ...], records: list[PassRecord],
                        make_ctx: Callable[[], PassContext], inplace: bool) -> nn.Module:
    """The working copy with every module pass applied; a pass that raises is undone and reported."""
    if inplace:
        work = original
    elif any(spec.writes_weights for spec in specs):
        with torch.no_grad():
            work = copy.deepcopy(original)  # a pass may write into weights: they must not be the user's
    else:
        work = shallow_copy(original)
    for spec in specs:
        record = next(r for r in records if r.name == spec.name)
        ctx = make_ctx()
        saved = snapshot(work)
        started = time.perf_counter()
        try:
            work = spec.fn(work, ctx) or work
        except Exception as exc:  # a pass that raises is undone and skipped; the rest still apply
            restore(saved)
            record.status, record.seconds = "failed", time.perf_counter() - started
            record.detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]} (undone)"
            log.warning("cpuboost: pass %s failed and was undone: %s", spec.name, exc)
            continue
        record.status, record.seconds = "applied", time.perf_counter() - started
        record.detail = "; ".join(ctx.notes) or spec.doc
    return work
