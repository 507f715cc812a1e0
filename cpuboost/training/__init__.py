"""The training path: the registry's train passes applied in place, the forward under autocast.

Training works on the user's own model and optimizer: the optimizer holds the model's Parameters, so
a private copy (as inference uses) could not be trained. What changes is small and checkpoint-neutral
(train mode, channels_last strides, the optimizer's ``fused`` flag, hidden from ``state_dict()``), every
change is in ``explain()``, and a pass that raises is rolled back before the next one runs.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Optional

import torch
from torch import nn

from ..machine import hardware
from ..errors import ModelModeError, UnsupportedTargetError
from ..options import Options
from ..passes import training as train_passes
from . import gloo_exit
from ..core.proxy import ModelProxy
from ..core.registry import PassContext, PassSpec, Plan, plan_here
from ..core.report import PassRecord, Report

log = logging.getLogger("cpuboost")
_NO_GRAPH = object()


class TrainingModule(ModelProxy):
    """The user's model (same Parameters, same ``state_dict()`` keys) whose forward runs the train plan.

    Floating outputs produced in the autocast dtype come back as fp32, so a loss computed outside the
    model is computed in fp32 (as the inference path returns eager's dtypes).
    """

    def __init__(self, original: nn.Module, options: Options, plan: Plan, report: Report) -> None:
        super().__init__(original)
        applied = set(report.applied)
        autocast = options.dtype if "autocast" in applied else None
        self.__dict__.update(
            _options=options,
            _plan=plan,
            _report=report,
            _autocast=autocast,
            _scaler=torch.amp.GradScaler("cpu", enabled="grad_scaler" in applied),
            _compiled=None,
            _candidates=list(plan.graph_passes),
            _build_lock=threading.Lock(),
            _inference=None,
        )

    def __reduce_ex__(self, protocol: int):
        """Copies keep the model, options, report and scaler; the plan and any compiled forward are made
        again where the copy lands (they hold functions and compiled code, which do not travel)."""
        from ..core.pickling import reduce_proxy

        return reduce_proxy(self, {"options": self._options, "report": self._report, "scaler": self._scaler})

    def __setstate__(self, state: dict) -> None:
        plan, _ = plan_here(state["original"], state["options"], mode="train")
        nn.Module.__init__(self)
        TrainingModule.__init__(self, state["original"], state["options"], plan, state["report"])
        self.__dict__["_scaler"] = state["scaler"]

    @property
    def grad_scaler(self) -> torch.amp.GradScaler:
        """``GradScaler("cpu")``: enabled for fp16, a pass-through otherwise, so one train step serves all dtypes."""
        return self._scaler

    def inference(self) -> nn.Module:
        """The inference path over the same weights (an ``OptimizedModule``), made on first use.

        Calls in eval mode without autograd (``model.eval()`` + ``torch.no_grad()``: what Trainer's
        ``evaluate``/``predict`` and Lightning's validation do) go through it: verified graphs per input
        signature. Weights changed by training since its last call make it rebuild (contract 9), so
        evaluating after every few steps pays a build each time; its ``explain()`` says what served.
        """
        if self._inference is None:
            from ..core.module import OptimizedModule

            options = dataclasses.replace(self._options, mode="infer")
            plan, hw = plan_here(self._original, options)
            self.__dict__["_inference"] = OptimizedModule(self._original, options, plan, hw)
            self._report.events.append("eval-mode calls without autograd run the inference path "
                                       "(explain(model.inference()) shows its graphs)")
        return self._inference

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._original.training and not torch.is_grad_enabled():
            return self.inference()(*args, **kwargs)
        gloo_exit.when_distributed()  # a framework's DDP (accelerate, Lightning) may have started gloo
        if self._compiled is None and self._candidates:
            out = self._first_graph_call(args, kwargs)
            if out is not _NO_GRAPH:
                return out
        if self._compiled is not None:
            return _outputs_fp32(self._compiled(*args, **kwargs), self._autocast)
        if self._autocast is None:
            return self._original(*args, **kwargs)
        with torch.autocast("cpu", dtype=self._autocast):
            out = self._original(*args, **kwargs)
        return _outputs_fp32(out, self._autocast)

    def _first_graph_call(self, args: tuple, kwargs: dict) -> Any:
        """Try the plan's graph passes on this first call (torch.compile compiles here); keep eager if all fail.

        A compiled forward is not verified against eager: a training forward has side effects (BatchNorm
        statistics, dropout RNG) that a reference run would disturb. Its backward compiles at the first
        ``backward()``, outside cpuboost's reach.
        """
        with self._build_lock:
            while self._candidates and self._compiled is None:
                spec = self._candidates.pop(0)
                record = _record(self._report, spec.name)
                started = time.perf_counter()
                ctx = PassContext(self._options, hardware.detect(), "train", None, args, kwargs)
                try:
                    fn = spec.fn(self._original, args, kwargs, ctx)
                    out = fn(*args, **kwargs)
                except Exception as exc:  # record it; the eager forward is always there
                    _failed(record, exc, started)
                    self._report.events.append(f"{spec.name} failed on the first call; training runs eagerly")
                    log.warning("cpuboost: training graph %s failed: %s", spec.name, exc)
                    continue
                record.status, record.seconds = "applied", time.perf_counter() - started
                record.detail = f"{spec.doc.rstrip('.')}; built on the first call (recompiles per new input shape)"
                self.__dict__["_compiled"] = fn
                return _outputs_fp32(out, self._autocast)
        return _NO_GRAPH

    def explain(self) -> Report:
        return self._report


def _outputs_fp32(out: Any, dtype: Optional[torch.dtype]) -> Any:
    if dtype is None:
        return out
    if isinstance(out, torch.Tensor):
        return out.float() if out.dtype == dtype else out
    from torch.utils import _pytree

    return _pytree.tree_map_only(torch.Tensor, lambda t: t.float() if t.dtype == dtype else t, out)


def _record(report: Report, name: str) -> PassRecord:
    return next(r for r in report.passes if r.name == name)


def _failed(record: PassRecord, exc: Exception, started: float) -> None:
    record.status, record.seconds = "failed", time.perf_counter() - started
    record.detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def check_train_mode(model: nn.Module, optimizer: Any, options: Options) -> None:
    """An eval-mode model that came with an optimizer is ambiguous: say so before anything changes."""
    if optimizer is None or model.training or options.mode == "train":
        return
    msg = (f"the {type(model).__name__} is in eval mode (model.training is False) but came with a "
           f"{type(optimizer).__name__}, so cpuboost would train it. Call model.train() before handing it "
           "over, pass mode='train' to have cpuboost switch it to train mode, or mode='infer' to run inference")
    raise ModelModeError(msg)


def check_not_data_parallel(model: nn.Module) -> None:
    """DDP (accelerate's ``prepare`` on several processes) goes around the model cpuboost wraps, not inside it."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return
    msg = ("the model is already wrapped in DistributedDataParallel (accelerator.prepare on several processes "
           "does that); optimize it with cpuboost first and wrap or prepare the result: "
           "model, opt = cpuboost.optimize(model, opt); model, opt = accelerator.prepare(model, opt)")
    raise UnsupportedTargetError(msg)


@dataclasses.dataclass
class _Snapshot:
    """References (no copies) to everything a train pass may rebind, to roll a failed pass back."""

    tables: list[tuple[dict, dict]]
    data: list[tuple[torch.Tensor, torch.Tensor]]
    flags: list[tuple[nn.Module, bool]]
    groups: list[tuple[dict, dict]]
    fused: Optional[frozenset[int]]

    @classmethod
    def take(cls, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> "_Snapshot":
        modules = list(model.modules())
        tables = [(t, dict(t)) for m in modules for t in (m._parameters, m._buffers)]
        data = [(p, p.data) for p in model.parameters()]
        param_groups = optimizer.param_groups if optimizer is not None else []
        groups = [(g, {k: v for k, v in g.items() if k != "params"}) for g in param_groups]
        return cls(tables, data, [(m, m.training) for m in modules], groups, train_passes.fused_groups(optimizer))

    def restore(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        for table, saved in self.tables:
            table.clear()
            table.update(saved)
        for param, data in self.data:
            param.data = data
        for module, flag in self.flags:
            module.training = flag
        for group, saved in self.groups:
            for key in [k for k in group if k != "params" and k not in saved]:
                del group[key]
            group.update(saved)
        if optimizer is not None:
            train_passes.set_fused_groups(optimizer, self.fused)


def _run_pass(spec: PassSpec, model: nn.Module, optimizer, ctx: PassContext, record: PassRecord) -> None:
    snapshot = _Snapshot.take(model, optimizer)
    started = time.perf_counter()
    try:
        spec.fn(model, ctx)
    except Exception as exc:  # roll this pass back; the others still apply
        snapshot.restore(optimizer)
        _failed(record, exc, started)
        log.warning("cpuboost: train pass %s failed and was rolled back: %s", spec.name, exc)
        return
    record.status, record.seconds = "applied", time.perf_counter() - started
    record.detail = "; ".join(ctx.notes) or spec.doc


def prepare_training(model: nn.Module, optimizer, options: Options, plan: Plan):
    """Apply the training plan in place; returns ``(TrainingModule, optimizer)`` or the module alone.

    The optimizer comes back as the same object (LR schedulers attached to it keep working).
    """
    check_train_mode(model, optimizer, options)
    check_not_data_parallel(model)
    gloo_exit.when_distributed()
    hw = hardware.detect()
    report = Report(
        model=type(model).__name__,
        mode="train",
        options=f"{options.describe()} compile_training={options.compile_training}",
        passes=[PassRecord(p.name, "planned", detail=p.doc) for p in plan.module_passes + plan.graph_passes]
        + [PassRecord(name, "skipped", detail=why) for name, why in plan.skipped],
    )
    for spec in plan.module_passes:
        ctx = PassContext(options, hw, "train", optimizer)
        _run_pass(spec, model, optimizer, ctx, _record(report, spec.name))
    report.events.append("training changes your model and optimizer in place (the optimizer holds the model's "
                         "Parameters); state_dict() of both stays loadable by plain, un-optimized copies")
    wrapped = TrainingModule(model, options, plan, report)
    return wrapped if optimizer is None else (wrapped, optimizer)
