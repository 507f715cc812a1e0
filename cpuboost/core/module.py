"""``OptimizedModule``: the original model plus graphs built per input signature, verified, cached.

The wrapper shares the original's parameter, buffer and submodule tables, so ``state_dict()`` keys,
``parameters()`` and attribute access are the original's own. Passes work on a private copy.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import signature, verify
from ..machine.hardware import Hardware
from ..options import Options
from .proxy import ModelProxy
from .registry import PassContext, Plan
from .report import GraphRecord, PassRecord, Report

log = logging.getLogger("cpuboost")

# Dynamo compiles are not thread-safe across models; builds are rare and slow, so one lock serializes them.
_BUILD_LOCK = threading.RLock()


@dataclasses.dataclass
class GraphEntry:
    path: str
    fn: Callable[..., Any]
    no_grad: bool
    template: Any
    record: GraphRecord

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        with torch.no_grad() if self.no_grad else contextlib.nullcontext():
            out = self.fn(*args, **kwargs)
        return verify.match_dtypes(self.template, out)


@contextlib.contextmanager
def _eval_temporarily(model: nn.Module):
    """Eval mode for a reference run, then every module's own flag back as it was."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


class OptimizedModule(ModelProxy):
    """Runs the user's model through the fastest verified path for each input signature (inference)."""

    def __init__(self, original: nn.Module, options: Options, plan: Plan, hardware: Hardware) -> None:
        super().__init__(original)
        self.__dict__["_options"] = options
        self.__dict__["_plan"] = plan
        self.__dict__["_hardware"] = hardware
        self.__dict__["_work"] = None
        self.__dict__["_cache"] = collections.OrderedDict()
        self.__dict__["_cache_lock"] = threading.Lock()
        self.__dict__["_fingerprint"] = None
        self.__dict__["_tracked"] = []
        self.__dict__["_report"] = Report(
            model=type(original).__name__,
            mode=plan.mode,
            options=options.describe(),
            passes=[PassRecord(p.name, "planned", detail=p.doc) for p in plan.module_passes + plan.graph_passes]
            + [PassRecord(name, "skipped", detail=why) for name, why in plan.skipped],
        )
        self.training = False

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.invalidate("parameters converted (.to()/.float()/...)")
        return self

    # -- cache --------------------------------------------------------------------------------------
    def invalidate(self, why: str = "asked") -> None:
        """Drop every built graph and the working copy; the next call rebuilds and re-verifies."""
        with _BUILD_LOCK, self._cache_lock:
            if self._cache or self._work is not None:
                self._report.events.append(f"graphs dropped: {why}")
            self._cache.clear()
            self.__dict__["_work"] = None
            self.__dict__["_fingerprint"] = None

    def _current_fingerprint(self) -> int:
        # Version counters only grow, so their sum changes whenever any tensor is modified in place
        # (optimizer steps, load_state_dict, running-stat updates).
        return sum(t._version for t in self._tracked)

    def _check_fresh(self) -> None:
        if self._fingerprint is not None and self._current_fingerprint() != self._fingerprint:
            self.invalidate("parameters or buffers changed since the graphs were built")

    # -- calls --------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training or (torch.is_grad_enabled() and signature.any_requires_grad(args, kwargs)):
            self._note_once("eager: called in train mode or with inputs that require grad; ran the original")
            return self._original(*args, **kwargs)
        self._check_fresh()
        key = signature.call_key(args, kwargs)
        with self._cache_lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
        if entry is not None:
            return entry(args, kwargs)
        return self._build_and_call(key, args, kwargs)

    def _note_once(self, text: str) -> None:
        if text not in self._report.events:
            self._report.events.append(text)

    def _reference(self, args: tuple, kwargs: dict) -> Any:
        with _eval_temporarily(self._original), torch.no_grad(), torch.autocast("cpu", enabled=False):
            return self._original(*args, **kwargs)

    def _build_and_call(self, key, args: tuple, kwargs: dict) -> Any:
        with _BUILD_LOCK:
            with self._cache_lock:
                entry = self._cache.get(key)
            if entry is not None:  # another thread built it while we waited
                return entry(args, kwargs)
            out, entry = self._build(args, kwargs)
            with self._cache_lock:
                self._cache[key] = entry
                while len(self._cache) > self._options.cache_size:
                    self._cache.popitem(last=False)
            if self._fingerprint is None:
                self.__dict__["_tracked"] = _state_tensors(self._original)
                self.__dict__["_fingerprint"] = self._current_fingerprint()
            return out

    def _build(self, args: tuple, kwargs: dict) -> tuple[Any, GraphEntry]:
        options = self._options
        sig = signature.describe(args, kwargs)
        started = time.perf_counter()
        log.info("cpuboost: building %s for [%s]", type(self._original).__name__, sig)
        reference = self._reference(args, kwargs) if options.verify else None
        template = verify.dtype_template(reference) if reference is not None else None
        work = self._working_copy(args, kwargs)
        fallbacks: list[tuple[str, str]] = []
        contexts = {spec.name: self._pass_context(args, kwargs) for spec in self._plan.graph_passes}
        candidates: list[tuple[str, Callable[[], Callable]]] = [
            (spec.name, lambda spec=spec: spec.fn(work, args, kwargs, contexts[spec.name]))
            for spec in self._plan.graph_passes
        ]
        if self._plan.module_passes or options.low_precision:
            candidates.append(("eager+passes", lambda: _eager_runner(work, options.dtype)))
        # Under backend='auto' every usable graph backend is built and verified, and the fastest serves:
        # which one wins depends on the model and the CPU (IPEX's oneDNN graphs beat Inductor on AMX convnets).
        race = options.backend == "auto"
        graph_names = {spec.name for spec in self._plan.graph_passes}
        verified: list[tuple[str, Callable, Any, Any, float]] = []
        for name, build in candidates:
            if verified and not (race and name in graph_names):
                break
            attempt_started = time.perf_counter()
            log.info("cpuboost: trying %s for [%s]", name, sig)
            try:
                fn = build()
                with torch.no_grad():
                    out = fn(*args, **kwargs)
            except Exception as exc:  # any backend failure means: record it, try the next path
                fallbacks.append((name, f"build failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
                self._mark_graph_pass(name, "failed", 0.0, fallbacks[-1][1])
                log.warning("cpuboost: %s failed for [%s]: %s", name, sig, exc)
                continue
            verdict = verify.compare(reference, out, options.dtype) if options.verify else None
            if verdict is not None and not verdict.ok:
                fallbacks.append((name, f"verification {verdict}"))
                self._mark_graph_pass(name, "failed", 0.0, fallbacks[-1][1])
                log.warning("cpuboost: %s did not match eager for [%s]: %s", name, sig, verdict)
                continue
            verified.append((name, fn, out, verdict, time.perf_counter() - attempt_started))
        if verified:
            timings = _race(verified, args, kwargs) if len(verified) > 1 else {}
            name, fn, out, verdict, seconds = min(verified, key=lambda v: timings.get(v[0], 0.0))
            record = GraphRecord(sig, name, time.perf_counter() - started,
                                 str(verdict) if verdict else "not verified (verify=False)", fallbacks,
                                 list(timings.items()))
            notes = contexts[name].notes if name in contexts else []
            self._mark_graph_pass(name, "applied", seconds, "; ".join([f"used for [{sig}]", *notes]))
            for loser, *_, loser_seconds in verified:
                if loser != name:
                    self._mark_graph_pass(loser, "skipped", loser_seconds,
                                          f"verified for [{sig}] but slower than {name}: {record.race()}")
            self._report.graphs.append(record)
            log.info("cpuboost: built [%s] with %s in %.1f s (%s)", sig, name, record.build_seconds,
                     record.verification)
            return verify.match_dtypes(template, out), GraphEntry(name, fn, True, template, record)
        record = GraphRecord(sig, "eager (original)", time.perf_counter() - started, "is the reference", fallbacks)
        self._report.graphs.append(record)
        if reference is None:
            reference = self._reference(args, kwargs)
        return reference, GraphEntry("eager", self._eager_original, False, None, record)

    def _mark_graph_pass(self, name: str, status: str, seconds: float, detail: str) -> None:
        record = next((r for r in self._report.passes if r.name == name), None)
        if record is None or record.status == "applied" and status != "applied":
            return  # a pass that served one signature stays "applied"; the rest per signature is in graphs
        record.status, record.detail = status, detail
        record.seconds = max(record.seconds, seconds)

    def _eager_original(self, *args: Any, **kwargs: Any) -> Any:
        with _eval_temporarily(self._original), torch.no_grad():
            return self._original(*args, **kwargs)

    def _pass_context(self, args: tuple, kwargs: dict) -> PassContext:
        return PassContext(self._options, self._hardware, self._plan.mode, None, args, kwargs)

    def _working_copy(self, args: tuple, kwargs: dict) -> Optional[nn.Module]:
        """The original (copied unless inplace=True) with every module pass applied, built once."""
        if self._work is not None:
            return self._work
        applied: list = []
        work = self._fresh_copy()
        for spec in self._plan.module_passes:
            record = next(r for r in self._report.passes if r.name == spec.name)
            ctx = self._pass_context(args, kwargs)
            started = time.perf_counter()
            try:
                work = spec.fn(work, ctx) or work
            except Exception as exc:  # a pass that raises is skipped; the copy is rebuilt without it
                record.status, record.seconds = "failed", time.perf_counter() - started
                record.detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                log.warning("cpuboost: pass %s failed (after %s): %s", spec.name, [s.name for s in applied], exc)
                work = self._fresh_copy()
                for done in applied:
                    work = done.fn(work, self._pass_context(args, kwargs)) or work
                continue
            record.status, record.seconds = "applied", time.perf_counter() - started
            record.detail = "; ".join(ctx.notes) or spec.doc
            applied.append(spec)
        self.__dict__["_work"] = work
        return work

    def _fresh_copy(self) -> nn.Module:
        if self._options.inplace:
            return self._original
        with torch.no_grad():
            return copy.deepcopy(self._original)

    def explain(self) -> Report:
        return self._report


_RACE_ROUNDS = 3


def _race(verified: list, args: tuple, kwargs: dict) -> dict[str, float]:
    """Best of a few interleaved calls per verified graph, in ms (each graph has run once already)."""
    best = {name: float("inf") for name, *_ in verified}
    with torch.no_grad():
        for _ in range(_RACE_ROUNDS):
            for name, fn, *_ in verified:
                begin = time.perf_counter()
                fn(*args, **kwargs)
                best[name] = min(best[name], (time.perf_counter() - begin) * 1e3)
    return best


def _eager_runner(model: nn.Module, dtype: torch.dtype) -> Callable:
    """The working copy under the plan's precision; fp32 outside any autocast needs no wrapper at all.

    Safe to decide once per entry: the outer autocast state is part of the cache key.
    """
    from .precision import PrecisionRunner

    if dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        return model
    return PrecisionRunner(model, dtype)
