"""Racing on after the first answer (``build="auto"``): a dynamic family's first build serves the first compiled
graph that wins (the rungs quick to build go first) and the rest of its ladder stage builds, verifies and is timed
against eager in a daemon thread. The next call after that thread finishes races the best of them against the
serving graph side by side, on the first call's inputs and the probe length, as the blocking ladder would
have; the faster serves from then on, and a kept decision is rewritten to it.

Why: a text model's family serves every length from one graph, and its whole race cost the first call 17 s
(BERT-style, 4 layers, 2 cores: Inductor's dynamic graph 12.6 s, OpenVINO's 2.7 s, then losing to it), where
a hand-written ``torch.compile`` answers its first two lengths in 13 s. Timing is left to a foreground call: a
background race timed beside the caller's own calls would time their contention, not the graphs.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time
from typing import Any, Callable, Optional

import torch

from ..options import dtype_name
from . import ladder, race
from .cache import GraphEntry
from .exitwait import EXITING
from .probe import Probe
from .report import GraphRecord, RungRecord

# From this many bytes of weights a family's first build races every rung before answering, as ``build="blocking"``:
# the graph that serves is held while the next one builds, and Inductor's build of a large model passes through
# transients near twice its graph (the exported program written for the child compile, the package loaded and
# verified). BERT-base, cache on, AMD EPYC: peak +704 MiB racing on (OpenVINO served first), +533 MiB blocking
# (Inductor built first, with nothing held), against the hand compile's +484. The same bound as
# ``passes.inductor.CHILD_COMPILE_MIN_BYTES``: below it, the dynamic Inductor graph compiles in this process.
RACE_ON_MAX_BYTES = 256 << 20


def wanted(model: torch.nn.Module) -> bool:
    """Whether a family's first build of ``model`` may answer before its race is over (weights under the bound)."""
    from ..persist.aoti import module_bytes  # the measure the child-compile bound uses

    return module_bytes(model) < RACE_ON_MAX_BYTES


class RaceOn:
    """The rest of one family's first ladder stage, built in the background and settled by a later call."""

    def __init__(self, rungs: list[ladder.Rung], holder: ladder.Winner, record: GraphRecord, inputs: tuple,
                 probe: Optional[Probe], reference: Any, yardstick: Callable[[torch.dtype], Any],
                 eager: Callable[..., Any], *, tolerance: Optional[float], verify_outputs: bool, budget: float,
                 epoch: int, family_key: Any, build_scope: Callable[[], Any] = contextlib.nullcontext) -> None:
        self.rungs, self.holder, self.record = rungs, holder, record
        self.args, self.kwargs = inputs
        self.probe, self.reference, self.yardstick, self.eager = probe, reference, yardstick, eager
        self.tolerance, self.verify_outputs = tolerance, verify_outputs
        self.deadline = time.perf_counter() + budget  # the ladder's tune_budget, from the holder's win
        self.epoch, self.family_key, self.build_scope = epoch, family_key, build_scope
        self.best: Optional[ladder.Winner] = None
        self.done = threading.Event()

    def _placeholder(self, name: str) -> int:
        return next(i for i, r in enumerate(self.record.rungs) if r.name == name and r.fate.startswith("building"))

    def _put(self, rung: ladder.Rung, record: RungRecord) -> None:
        self.record.rungs[self._placeholder(rung.name)] = record

    def run(self, lock: threading.RLock, current_epoch: Callable[[], int]) -> None:
        """Builds the rungs one after another under the model's ``lock`` (they share its working copy with any
        other build of it); keeps the fastest against eager, as timed here, for ``settle``."""
        try:
            with lock, self.build_scope():
                for rung in self.rungs:
                    self._one(rung, current_epoch)
        finally:
            self.done.set()

    def _one(self, rung: ladder.Rung, current_epoch: Callable[[], int]) -> None:
        if EXITING.is_set() or current_epoch() != self.epoch or time.perf_counter() > self.deadline:
            why = ("the interpreter is exiting" if EXITING.is_set() else "the weights changed"
                   if current_epoch() != self.epoch else "tune_budget spent")
            self._put(rung, RungRecord(rung.name, f"not tried: {why}"))
            return
        candidate = ladder._try(rung, self.args, self.kwargs, self.reference, self.yardstick, self.eager,
                                self.tolerance, self.verify_outputs)
        if isinstance(candidate, RungRecord):
            self._put(rung, candidate)
            return
        self._put(rung, candidate.record)
        candidate.record.fate = "verified; races the serving graph at the next call"
        best = self.best
        if best is None or candidate.ms / candidate.eager_ms < best.ms / best.eager_ms:
            best, candidate = candidate, best
        if candidate is not None:
            candidate.record.fate = f"verified but slower than {best.rung.name} (both timed in the background)"
        self.best = best
        del candidate
        race.release_memory()

    def settle(self) -> Optional[ladder.Winner]:
        """The background's best against the serving graph, side by side in this (foreground) call: the
        challenger when it is faster (its record then says "served"), else None (the serving graph stays)."""
        challenger, holder = self.best, self.holder
        self.best = None
        if challenger is None:
            return None
        try:
            won = ladder._beats(challenger, holder, self.args, self.kwargs, self.probe)
        except Exception as exc:  # a graph that answered in the background but not here does not serve
            why, won = ladder._first_line(exc), None
            challenger.record.fate = f"failed when raced against {holder.rung.name}: {why}"
        if not won:
            if won is not None:
                challenger.record.fate = ladder._lost(challenger, holder.rung.name)
            del challenger
            race.release_memory()
            return None
        holder.record.fate = ladder._lost(holder, challenger.rung.name) + ", after serving first"
        challenger.record.fate = f"served (built in the background; took over from {holder.rung.name})"
        keep = getattr(challenger.fn, "keep_cached", None)
        if callable(keep):
            keep()
        return challenger


def start(race_on: RaceOn, builds: Any, lock: threading.RLock, current_epoch: Callable[[], int],
          signature: str, note: Callable[[str], None]) -> None:
    """Runs ``race_on`` in a daemon thread tracked by ``builds`` (``wait_for_builds()`` joins it; an exiting
    interpreter finishes the rung in progress, starts no other)."""
    builds.start(("race on", id(race_on)), signature, lambda: race_on.run(lock, current_epoch), note,
                 what=f"[{signature}]: {race_on.holder.rung.name} serves while the other rungs build in the "
                      f"background ({', '.join(r.name for r in race_on.rungs)})")


def swap_entry(old: GraphEntry, winner: ladder.Winner) -> GraphEntry:
    """The entry that serves in ``old``'s place, its record (shared with the report) rewritten to the winner."""
    record = old.record
    record.path, record.dtype = winner.rung.backend, dtype_name(winner.rung.dtype)
    record.verification = str(winner.verdict) if winner.verdict else "not verified (verify=False)"
    record.memory_mb, record.vs_eager = winner.memory_mb, winner.eager_ms / winner.ms if winner.ms else None
    record.timings = [(r.name, r.ms) for r in record.rungs if r.ms is not None]
    entry = GraphEntry(winner.rung.backend, winner.fn, old.template, record)
    entry.example = old.example
    return entry


def begin(model: Any, rest: list[ladder.Rung], winner: ladder.Winner, record: GraphRecord, args: tuple,
          kwargs: dict, dims: dict, reference: Any, yardsticks: dict, found: Any) -> None:
    """Starts racing ``rest`` for the family ``model`` (an OptimizedModule) has just served with ``winner``:
    on private copies of the call's inputs (the caller may reuse its own), with the reference and eager
    autocast's outputs this build computed already."""
    from . import probe, signature
    from .background import private_inputs

    copies = private_inputs(args, kwargs)

    def yardstick(dtype: torch.dtype) -> Any:
        if dtype not in yardsticks:
            yardsticks[dtype] = model._autocast_output(dtype, *copies)
        return yardsticks[dtype]

    if found is not None and found.store is not None:  # Inductor's own caches inside the store, as in the ladder
        from ..persist.warm import inductor_cache

        scope = functools.partial(inductor_cache, found.store)
    else:
        scope = contextlib.nullcontext
    options = model._options
    race_on = RaceOn(rest, winner, record, copies, probe.other_length(*copies, dims, model._original), reference,
                     yardstick, model._eager_original, tolerance=options.tolerance,
                     verify_outputs=options.verify, budget=options.tune_budget, epoch=model._build_epoch,
                     family_key=signature.family_key(args, kwargs), build_scope=scope)
    race_on.dims, race_on.signature, race_on.cached = dims, record.signature, found is not None
    model.__dict__["_racing"] = race_on
    start(race_on, model._builds, model._work_lock, lambda: model._epoch, record.signature, model._report.note)


def settle_pending(model: Any) -> None:
    """Called by the model's next call once the background is done (under its build lock): the race, then the
    swap. Nothing happens when the weights changed since (``invalidate`` dropped the family)."""
    race_on = model.__dict__.get("_racing")
    if race_on is None or not race_on.done.is_set():
        return
    model.__dict__["_racing"] = None
    family = model._cache.family(race_on.family_key)
    if race_on.epoch != model._epoch or family is None or family.dynamic is None:
        return
    winner = race_on.settle()
    raced = {r.name for r in race_on.rungs}
    model._mark_rungs(race_on.signature, [r for r in race_on.record.rungs if r.name in raced], race_on.rungs, winner)
    if winner is None:
        return
    entry = swap_entry(family.dynamic, winner)
    if race_on.cached:  # the kept decision follows the graph that serves now
        found = model._persistent(race_on.args, race_on.kwargs, race_on.dims)
        if found is not None:
            yard = winner.verdict.yardstick if winner.verdict is not None else None
            entry.sizes = model._warm.remember(found, winner.rung.name, yard, race_on.signature, race_on.dims)
    with model._lock:
        model._cache.replace(family.dynamic, entry)
        family.serve_dynamic(family.dims, entry, winner.verdict)
        family.winner = model._winners[race_on.family_key] = winner.rung.name
    model._report.note(f"[{race_on.signature}]: {winner.rung.name} took over from {race_on.holder.rung.name}"
                       f"{winner.versus}")
