"""``OptimizedModule``: the user's model plus graphs built per input signature, verified, raced, cached.

The wrapper shares the original's parameter, buffer and submodule tables, so ``state_dict()`` keys,
``parameters()`` and attribute access are the original's own. Each piece it relies on can be read alone:
``cache`` (signatures and families), ``freshness`` (weight edits), ``ladder`` (build, verify, race),
``workcopy`` (the private copy passes rewrite) and ``report``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
import time
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..machine.hardware import Hardware
from ..options import Options, dtype_name
from . import ladder, probe, raceon, signature, verify
from .background import BackgroundBuilds
from .cache import Family, GraphEntry, SignatureCache, verify_dtype
from .freshness import WeightWatch
from .pickling import reduce_proxy
from .proxy import ModelProxy
from .registry import PassContext, Plan, plan_here
from .report import GraphRecord, PassRecord, Report, RungRecord
from .stages import ladder_stages
from .workcopy import apply_module_passes, shallow_copy

log = logging.getLogger("cpuboost")

_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
STATIC_GRAPHS_BEFORE_WARNING = 4


class OptimizedModule(ModelProxy):
    """Runs the user's model through the fastest verified path for each input signature (inference)."""

    def __init__(self, original: nn.Module, options: Options, plan: Plan, hardware: Hardware) -> None:
        super().__init__(original)
        self.__dict__.update(_options=options, _plan=plan, _hardware=hardware)
        self._start_fresh()
        self.training = False

    def _start_fresh(self) -> None:
        """Runtime state: nothing here is pickled; a copy or an unpickled model rebuilds it lazily."""
        options, plan = self._options, self._plan
        self.__dict__.update(
            _work=None, _eval_view=None, _watch=None, _lock=threading.RLock(), _build_lock=threading.RLock(),
            _work_lock=threading.RLock(), _racing=None, _epoch=0, _build_epoch=0, _builds=BackgroundBuilds(),
            _cache=SignatureCache(options.cache_size), _winners={}, _warned=set(), _generation=None, _warm=None,
            _report=Report(
                model=type(self._original).__name__, mode=plan.mode, options=options.describe(),
                passes=[PassRecord(p.name, "planned", detail=p.doc) for p in plan.module_passes + plan.graph_passes]
                + [PassRecord(name, "skipped", detail=why) for name, why in plan.skipped]))

    # -- copies: deepcopy, pickle and torch.save keep the model and options, never locks or graphs ---------
    def __getstate__(self) -> dict:
        return {"original": self._original, "options": self._options}

    def __setstate__(self, state: dict) -> None:
        original, options = state["original"], state["options"]
        plan, hardware = plan_here(original, options)  # the plan holds functions: made again here
        nn.Module.__init__(self)
        ModelProxy.__init__(self, original)
        self.__dict__.update(_options=options, _plan=plan, _hardware=hardware)
        self._start_fresh()
        self.training = False

    def __reduce_ex__(self, protocol: int):
        return reduce_proxy(self, {"options": self._options})

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.invalidate("parameters converted (.to()/.float()/...)")
        return self

    def invalidate(self, why: str = "asked") -> None:
        """Drop every built graph and the working copy; the next call rebuilds and re-verifies. Never waits for
        a build: one in progress sees the new epoch and keeps nothing built from the old weights."""
        with self._lock:
            self.__dict__["_epoch"] = self._epoch + 1
            if len(self._cache) or self._work is not None:
                self._report.note(f"graphs dropped: {why}")
            self._cache.clear()
            self.__dict__.update(_work=None, _eval_view=None, _watch=None, _generation=None)
            self._builds.forget_failures()
            if self._warm is not None:
                self._warm.forget_weights()

    def _check_fresh(self) -> None:
        watch = self._watch
        if watch is not None:
            why = watch.changed()
            if why is not None:
                self.invalidate(why)

    # -- calls ----------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training or (torch.is_grad_enabled() and signature.any_requires_grad(args, kwargs)):
            self._report.note("eager: called in train mode or with inputs that require grad; ran the original")
            return self._original(*args, **kwargs)
        self._check_fresh()
        if self._racing is not None and self._racing.done.is_set():  # a background race to settle: time it now
            with self._build_lock:
                raceon.settle_pending(self)
        args, kwargs = signature.standard_layout(args, kwargs)
        key = signature.call_key(args, kwargs)
        entry = self._cache.get(key)
        if entry is not None:
            try:
                return entry(args, kwargs)
            except RuntimeError as exc:
                if type(exc).__name__ != "RecompileRefused":
                    raise
                self._cache.drop(key)  # a guard miss: this call is a signature nobody verified yet
                self._report.note(f"a graph's guards refused a call ({exc}); treated as a new signature")
        if self._options.build == "background":
            return self._builds.answer_now(self, key, args, kwargs)
        return self._build_and_call(key, args, kwargs)

    def wait_for_builds(self, timeout: Optional[float] = None) -> bool:
        """Waits for background builds (``build="background"``, the race of ``build="auto"``, generate()'s compiled
        prefill); True when none runs. A race that finished is settled by the next call."""
        runner = self.__dict__.get("_generation")
        return self._builds.wait(timeout) & (runner is None or runner.wait_for_builds(timeout))

    def _eval_model(self) -> nn.Module:
        """The user's model as it runs in eval: itself, or a view sharing its weights if it is in train mode,
        so reference runs never flip train/eval flags that other threads may be reading."""
        if not any(m.training for m in self._original.modules()):
            return self._original
        if self._eval_view is None:
            self.__dict__["_eval_view"] = shallow_copy(self._original).eval()
        return self._eval_view

    def _eager_original(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self._eval_model()(*args, **kwargs)

    def _reference(self, args: tuple, kwargs: dict) -> Any:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return self._eval_model()(*args, **kwargs)

    def _autocast_output(self, dtype: torch.dtype, args: tuple, kwargs: dict) -> Any:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, cache_enabled=False):  # no cast cache (a bf16 copy of all weights)
            return self._eval_model()(*args, **kwargs)

    def _build_and_call(self, key, args: tuple, kwargs: dict) -> Any:
        """Builds of one model run one at a time (they share its working copy; a race beside another build of
        it would time noise); other models build in parallel; built signatures never wait."""
        with self._build_lock:
            entry = self._cache.get(key)
            if entry is not None:  # another thread built it while we waited
                return entry(args, kwargs)
            self.__dict__["_build_epoch"] = self._epoch
            if self._watch is None:
                self.__dict__["_watch"] = WeightWatch(self._original)
            return self._build(key, args, kwargs)

    def _keep(self, remember: Callable[[], None]) -> None:
        """Runs ``remember`` (what puts a built graph in the cache) unless ``invalidate()`` ran since this build
        started: a graph built from the old weights is then answered once, by the call that built it, never kept."""
        with self._lock:
            if self._epoch == self._build_epoch:
                remember()
            else:
                self._report.note("a graph built while the weights were edited was not kept; the next call rebuilds")

    def _build(self, key, args: tuple, kwargs: dict) -> Any:
        options = self._options
        sig = signature.describe(args, kwargs)
        started = time.perf_counter()
        family_key = signature.family_key(args, kwargs)
        shapes = signature.top_level_shapes(args, kwargs)
        family = self._cache.family(family_key)
        if family is not None and family.dynamic is not None and options.shapes != "static":
            out = self._serve_new_size(family, key, args, kwargs, sig)
            if out is not None:
                return out
        begin = time.perf_counter()
        reference = self._reference(args, kwargs) if options.verify else None
        reference_ms = (time.perf_counter() - begin) * 1e3 if reference is not None else None
        if torch.is_autocast_enabled("cpu"):  # answer in the dtype eager answers in under the caller's autocast
            template = verify.dtype_template(self._eager_original(*args, **kwargs))
        else:
            template = verify.dtype_template(reference) if reference is not None else None
        yardsticks: dict = {}

        def yardstick(dtype: torch.dtype) -> Any:
            if dtype not in yardsticks:
                yardsticks[dtype] = self._autocast_output(dtype, args, kwargs)
            return yardsticks[dtype]

        dims = self._dynamic_dims(family, shapes, args, kwargs)
        prefer = family.winner if family is not None else self._winners.get(family_key)
        # a family's first build (static, or dynamic in token dims) keeps its decision; holds the entry's lock
        found = self._persistent(args, kwargs, dims) if family is None or not dims else None
        if found is not None and found.waited_s > 1:
            self._report.note(f"[{sig}]: waited {found.waited_s:.1f} s for another process building it")
        if found is not None and found.decision is not None and prefer is None:
            prefer = found.decision.get("rung")  # decided by an earlier process: no race, that rung only
            self._report.note(f"[{sig}]: decision from the persistent cache ({prefer})")
        serve_first = (options.build == "auto" and family is None and bool(dims) and not prefer  # see raceon
                       and options.tune_budget > 0 and raceon.wanted(self._original))
        with found.building() if found is not None else contextlib.nullcontext(), self._work_lock:
            stages = [] if prefer == "eager" else ladder_stages(  # eager decided earlier: nothing beat it
                self, self._working_copy(args, kwargs), args, kwargs, dims, prefer,
                found.artifact_dir if found is not None else None, template)
            winner, rungs, rest = ladder.climb(
                stages, args, kwargs, reference=reference, yardstick=yardstick, eager=self._eager_original,
                tolerance=options.tolerance, budget=0.0 if prefer else options.tune_budget,
                verify_outputs=options.verify, signature=sig, decided=prefer,
                warm=self._warm.hints(found, prefer, reference_ms) if found else None,
                probe=None if prefer else probe.other_length(args, kwargs, dims, self._original),
                serve_first=serve_first)
        record = GraphRecord(sig, "eager (original)", 0.0, "is the reference", rungs=rungs,
                             dynamic=", ".join(f"{w}:{d}" for w, d in dims.items()) if dims else "")
        if winner is None:
            out = reference if reference is not None else self._eager_original(*args, **kwargs)
            entry = GraphEntry("eager", self._eager_original, None, record, no_grad=False)
        else:
            record.path, record.dtype = winner.rung.backend, dtype_name(winner.rung.dtype)
            record.verification = str(winner.verdict) if winner.verdict else "not verified (verify=False)"
            record.memory_mb, record.vs_eager = winner.memory_mb, winner.eager_ms / winner.ms
            record.timings = [(r.name, r.ms) for r in rungs if r.ms is not None]
            out = winner.out
            entry = GraphEntry(winner.rung.backend, winner.fn, template, record)
        self._mark_rungs(sig, rungs, [r for stage in stages for r in stage], winner)
        record.build_seconds = time.perf_counter() - started
        entry.example = (args, kwargs) if not dims or family is None else None  # what save() compiles for
        if found is not None:
            yard = winner.verdict.yardstick if winner is not None and winner.verdict is not None else None
            entry.sizes = self._warm.remember(found, winner.rung.name if winner is not None else None, yard, sig, dims)
        self._report.add_graph(record)
        self._keep(lambda: self._remember(family, family_key, shapes, key, entry, dims, winner))
        if rest and winner is not None and self._epoch == self._build_epoch:
            raceon.begin(self, rest, winner, record, args, kwargs, dims, reference, yardsticks, found)
        log.info("cpuboost: [%s] served by %s %s after %.1f s", sig, record.path, record.dtype, record.build_seconds)
        return verify.match_dtypes(template, out) if template is not None else out  # first call = later calls

    def _serve_new_size(self, family: Family, key, args, kwargs, sig) -> Any:
        """A new size for a family that has a dynamic graph: served by it, no build. The size is checked against
        eager fp32 (judged by the yardstick error measured at the graph's build) while the graph has passed on
        fewer than two sizes, then on every ``Family.SAMPLE_EVERY``-th new size: a new length costs the served
        call, not an eager call on top. An eager family is the reference itself: nothing to check."""
        entry = family.dynamic
        check = self._options.verify and entry.path != "eager" and family.due_for_check(sig)
        begin = time.perf_counter()
        reference = self._reference(args, kwargs) if check else None
        try:
            out = entry(args, kwargs)
        except Exception as exc:  # the dynamic graph cannot take this size: build for it
            self._report.note(f"dynamic graph refused [{sig}]: {ladder._first_line(exc)}")
            return None
        if reference is not None:  # judged by the yardstick error measured when the dynamic graph was built
            dtype = verify_dtype(entry)
            verdict = verify.compare(reference, out, dtype, None, self._options.tolerance,
                                     yardstick_error=family.yardstick_error)
            if not verdict.ok and dtype in (torch.bfloat16, torch.float16):  # this size's own autocast error:
                verdict = verify.compare(reference, out, dtype, self._autocast_output(dtype, args, kwargs),
                                         self._options.tolerance)  # low precision may simply do worse here
            if not verdict.ok:
                self._report.note(f"dynamic graph rejected for [{sig}]: {verdict}; building for it")
                return None
            how, verification = "verified on this size", str(verdict)
        else:
            how = verification = family.unchecked_reason(entry.path, self._options.verify, sig)
        family.served_size(reference is not None, sig)
        record = dataclasses.replace(entry.record, signature=sig, build_seconds=time.perf_counter() - begin,
                                     verification=verification,
                                     rungs=[RungRecord(f"{entry.record.path} {entry.record.dtype}",
                                                       f"served (dynamic graph, {how})")])
        self._report.add_graph(record)
        self._keep(lambda: self._cache.put(key, entry))
        return out

    def _dynamic_dims(self, family: Optional[Family], shapes: dict, args: tuple, kwargs: dict) -> dict:
        options = self._options
        if options.shapes == "static":
            return {}
        if options.dynamic_dims:
            return signature.checked_dims(options.dynamic_dims, shapes)
        if options.shapes == "dynamic":
            return {w: [d for d, size in enumerate(shape) if size > 1] for w, shape in shapes.items()}
        if family is None:  # token sequences: one dynamic graph from the first build (int8 and IPEX trace static),
            # cache on or off: the decision persists (OpenVINO as dynamic IR); a static first graph cost a 2nd build
            static_only = options.dtype == torch.int8 or options.backend == "ipex"
            return signature.sequence_dims(shapes) if not static_only else {}
        varying = signature.varying_dims(family.first_shapes, shapes)
        merged = {w: sorted(set(family.dims.get(w, [])) | set(varying.get(w, []))) for w in {*family.dims, *varying}}
        return {w: d for w, d in merged.items() if d}

    def _remember(self, family, family_key, shapes, key, entry, dims, winner) -> None:
        if family is None:
            family = Family(first_shapes=shapes)
            self._cache.families[family_key] = family
        family.builds += 1
        if winner is not None:
            family.winner = family.winner or winner.rung.name
            self._winners[family_key] = winner.rung.name
        if dims:  # eager, when nothing beat it, serves every size too: later sizes are verified, not rebuilt
            family.serve_dynamic(dims, entry, winner.verdict if winner is not None else None)
        self._cache.put(key, entry)
        if family.builds > STATIC_GRAPHS_BEFORE_WARNING and "recompiles" not in self._warned:
            self._warned.add("recompiles")
            warnings.warn(
                f"cpuboost built {family.builds} graphs for one input structure of {type(self._original).__name__}"
                f" (shapes={self._options.shapes!r}); each costs a compile. Pass shapes='auto' (the default) or "
                "dynamic_dims={'input_name': [dim]} so one dynamic graph serves every size.", stacklevel=4)

    def _warm_start(self):
        if self._warm is None:  # the persistent side, made on first use (``enabled`` False: cache off or unsafe)
            from ..persist.warm import WarmStart
            self.__dict__["_warm"] = WarmStart(self._options, self._plan.names)
        return self._warm

    def _persistent(self, args: tuple, kwargs: dict, dims: dict):
        """This signature's entry in the persistent cache, any size in ``dims`` (None when the cache is off)."""
        if not self._warm_start().enabled:
            return None
        try:
            return self._warm.lookup(self._original, args, kwargs, dims)
        except Exception as exc:  # the cache is an optimisation: never a reason to fail a call
            self._report.note(f"persistent cache skipped: {type(exc).__name__}: {exc}")
            return None

    def _examples(self) -> list:
        """(entry, (args, kwargs)) for each static signature built, oldest first: what save() packages."""
        seen, found = set(), []
        for entry in list(self._cache.entries.values()):
            if entry.example is not None and id(entry) not in seen:
                seen.add(id(entry))
                found.append((entry, entry.example))
        return found

    def _working_copy(self, args: tuple, kwargs: dict) -> nn.Module:
        if self._work is None:
            ctx = lambda: PassContext(self._options, self._hardware, self._plan.mode, None, args, kwargs)  # noqa: E731
            self.__dict__["_work"] = apply_module_passes(self._original, self._plan.module_passes,
                                                         self._report.passes, ctx, self._options.inplace)
        return self._work

    def _mark_rungs(self, sig: str, records: list, rungs: list, winner: Optional[ladder.Winner]) -> None:
        """Each tried rung's verdict on its pass's line: the winner's "applied", the others' "failed" or "skipped",
        a losing rung's build notes kept visible; rungs not tried, or still building in the background, say nothing."""
        notes = {r.name: r.notes for r in rungs}
        if winner is not None:
            self._mark_pass(winner.rung.backend, "applied", winner.build_seconds,
                            "; ".join([f"used for [{sig}]", *winner.rung.notes]))
        for rung in records:
            if (winner is None or rung is not winner.record) and not rung.fate.startswith(("not tried", "building")):
                self._mark_pass(rung.name.rsplit(" ", 1)[0], "failed" if rung.fate.startswith(("failed", "rej"))
                                else "skipped", rung.build_seconds, "; ".join([f"[{sig}] {rung.line()}",
                                                                               *notes.get(rung.name, [])]))

    def _mark_pass(self, name: str, status: str, seconds: float, detail: str) -> None:
        record = next((r for r in self._report.passes if r.name == name), None)
        if record is None or (record.status != "planned" and status != "applied"):
            return  # the first verdict stays (a pass that served stays "applied"); the rest is in graphs
        record.status, record.detail = status, detail
        record.seconds = max(record.seconds, seconds)

    def __getattr__(self, name: str) -> Any:
        if name == "generate" and hasattr(self.__dict__["_original"], "generate"):
            from ..generation import generate_for  # generate() through the optimized path, or as eager runs it

            return functools.partial(generate_for, self)
        return super().__getattr__(name)

    def explain(self) -> Report:
        return self._report
