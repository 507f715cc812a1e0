"""Warm start, wired into the runtime: what the ladder decided per signature is stored as
JSON (``store.DecisionStore``), and Inductor's winning graph as an AOTInductor package keyed by the weights'
content, so a restarted process loads the graph, verifies it once and answers without compiling or racing.

Several processes may warm one cache at once: a signature's build holds its entry's lock (``units``) from
reading the decision to writing it, so a second process waits, then finds the first one's decision and
graph and loads them instead of compiling the same thing again."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..options import Options, dtype_name
from . import package, store, units
from .units import EntryLock

log = logging.getLogger("cpuboost")


def _options_key(options: Options) -> dict:
    key = {"dtype": dtype_name(options.dtype), "backend": options.backend, "fusion": options.fusion,
           "tolerance": options.tolerance, "shapes": options.shapes, "verify": options.verify}
    if options.calibration is not None:  # int8 scales come from these batches: other data, other graph
        key["calibration"] = store.data_digest(options.calibration)
    return key


LOCK_WAIT_S = 900.0  # longer than any build we know of; past it, build anyway (publishing stays whole)


@dataclasses.dataclass
class Lookup:
    """One signature's persistent entry: the stored decision (if any), where its artifacts live, and the
    entry lock held until ``release`` (after the decision is written, or when the build fails)."""

    decision: Optional[dict]
    decision_key: dict
    artifact_dir: Optional[Path]
    store: Optional[store.DecisionStore] = None
    lock: Optional[EntryLock] = None
    waited_s: float = 0.0

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    @contextlib.contextmanager
    def building(self):
        """The scope of this signature's build: Inductor's own caches inside the store (``inductor_cache``);
        a build that raises releases the entry lock (one that returns releases it in ``remember``)."""
        try:
            with inductor_cache(self.store) if self.store is not None else contextlib.nullcontext():
                yield
        except BaseException:
            self.release()
            raise


class WarmStart:
    """The persistent side of one optimized model; disabled (``enabled`` False) with CPUBOOST_CACHE_DIR=off."""

    def __init__(self, options: Options, passes: list[str]) -> None:
        self.store = store.DecisionStore.from_option(options.cache_dir)
        self.options = options
        self.passes = passes  # the candidates differ when a pass is registered or a backend appears
        self._options_key = {**_options_key(options), "passes": passes}
        self._weights: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    def forget_weights(self) -> None:
        """The weights changed: their digest is computed again for the next artifact key."""
        self._weights = None

    def lookup(self, original: nn.Module, args: tuple, kwargs: dict, dynamic: Optional[dict] = None) -> Lookup:
        """The entry for this call's signature (any size in the ``dynamic`` dims the build will have), its lock
        taken first (waiting for another process that is building it), so the decision read is the one that
        process wrote. The caller must ``release`` it."""
        key = store.make_key(original, args, kwargs, self._options_key, weights=False,
                             backends=("openvino", "torchao"), dynamic=dynamic)
        if self._weights is None:
            self._weights = store.weights_digest(original)
        full = {**key, "weights": self._weights}
        lock, waited = self.store.entry_lock(full), 0.0
        if lock is not None:
            begin = time.monotonic()
            if lock.acquire(timeout=LOCK_WAIT_S):
                self.store.sweep(full)  # staging a killed process left behind
            else:
                log.warning("cpuboost cache: waited %.0f s for another build of this signature; building too",
                            LOCK_WAIT_S)
                lock = None
            waited = time.monotonic() - begin
        try:
            artifact = self.store.artifact_dir(full) if self.store.writable else None
            return Lookup(self.store.get(key), key, artifact, self.store, lock, waited)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def remember(self, found: Lookup, rung: Optional[str], yardstick_error: Optional[float] = None,
                 size: Optional[str] = None, dims: Optional[dict] = None) -> Optional["SizeLog"]:
        """The decision, with eager autocast's error on this signature (a warm start verifies against it
        instead of running eager autocast again); then the entry's lock goes. For a dynamic graph (``dims``)
        that serves, the log of sizes it was checked on, ``size`` (this build's) first, with the sizes an
        earlier process checked the same rung on for these weights."""
        try:
            same = found.decision is not None and found.decision.get("rung") == rung
            if yardstick_error is None and same:
                yardstick_error = found.decision.get("yardstick_error")
            decision: dict = {"rung": rung or "eager"}
            if yardstick_error is not None:
                decision["yardstick_error"] = yardstick_error
            log = None
            if dims and rung is not None and size is not None:
                earlier = found.decision.get(SizeLog.FIELD) if same else None
                log = SizeLog(self.store, found.decision_key, rung, self._weights or "", earlier, size)
                decision[SizeLog.FIELD] = log.record()
            self.store.put(found.decision_key, decision)
            return log
        finally:
            found.release()

    @staticmethod
    def hints(found: Optional[Lookup], prefer: Optional[str], reference_ms: Optional[float]) -> Optional[dict]:
        """What the decided rung needs no eager call for: this call's eager time (its reference was timed) and
        the stored yardstick error; None unless the rung to try first came from the persistent cache."""
        if found is None or found.decision is None or found.decision.get("rung") != prefer:
            return None
        return {"eager_ms": reference_ms, "yardstick_error": found.decision.get("yardstick_error")}


class SizeLog:
    """The sizes a kept dynamic graph passed its check against eager fp32 on, in its decision, so that a restarted
    process serves them without checking again (a new length's first call costs the served call alone). Tied to
    the weights' digest: a graph of other weights was checked on nothing. Bounded; written as sizes pass."""

    FIELD = "sizes_checked"
    LIMIT = 256

    def __init__(self, cache: store.DecisionStore, key: dict, rung: str, weights: str, earlier: Optional[dict],
                 size: str) -> None:
        self._store, self._key, self._rung, self._weights = cache, key, rung, weights
        kept = earlier.get("sizes", []) if isinstance(earlier, dict) and earlier.get("weights") == weights else []
        self.checked: set[str] = {s for s in kept if isinstance(s, str)}
        self.checked.add(size)
        self._lock = threading.Lock()

    def record(self) -> dict:
        return {"weights": self._weights, "sizes": sorted(self.checked)[: self.LIMIT]}

    def add(self, size: str) -> None:
        """``size`` passed: kept in the decision (best effort: the cache is an optimisation)."""
        with self._lock:
            if size in self.checked or len(self.checked) >= self.LIMIT:
                return
            self.checked.add(size)
            try:
                decision = self._store.get(self._key)
                if decision is not None and decision.get("rung") == self._rung:  # not another process's new rung
                    self._store.put(self._key, {**decision, self.FIELD: self.record()}, trim=False)
            except Exception as exc:  # noqa: BLE001 - never a reason to fail a call
                log.debug("cpuboost cache: checked size not kept (%s)", exc)


def inductor_artifact(model: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype, folder: Path,
                      note, dynamic_dims: Optional[dict] = None) -> Any:
    """The Inductor rung through AOTInductor, persisted as the unit ``folder/graph``: loaded when it is there,
    checks out and was built for the same ``dynamic_dims`` (no compile), else exported and compiled in a
    child process, in a staging folder, and published whole. A graph that then fails verification is removed
    by the ladder (``PackagedGraph.forget_cached``). Raises when export fails (the caller compiles instead)."""
    unit = folder / "graph"
    request = {str(w): list(d) for w, d in (dynamic_dims or {}).items()}
    if (unit / "graph.pt2").exists():
        try:
            graph = package.load_graph(unit / "graph.pt2", root=folder, model=model)
            if (graph.meta.get("dynamic_request") or {}) != request:
                raise package.PackageFormatError(f"built for dynamic dims {graph.meta.get('dynamic_request')}, "
                                                 f"this build asks for {request or 'none'}")
            graph.cache_unit = unit
            note("loaded from the persistent cache (AOTInductor package, no compile)")
            return graph
        except (package.PackageFormatError, package.PackageMismatchError, package.UnsafeLocationError,
                OSError) as exc:
            note(f"cached graph unusable ({exc}); compiled again")
    staging = units.stage(unit)
    try:
        graph, _ = package.compile_aoti(model, args, kwargs, dtype, workdir=staging, dynamic_dims=dynamic_dims,
                                        read_tables=True)
        units.publish(staging, unit)
    except BaseException:
        units.discard(staging)
        raise
    graph.path, graph.cache_unit = unit / "graph.pt2", unit
    dynamic = graph.meta.get("dynamic")
    note("AOTInductor package (export + freezing), kept in the persistent cache; compiled in a child process"
         + (f"; dynamic dims (flat input: dim [range]) {dynamic}" if dynamic else ""))
    return graph


_SCOPE_LOCK = threading.Lock()
_SCOPE: dict = {"depth": 0, "previous": None}


@contextlib.contextmanager
def inductor_cache(cache: store.DecisionStore):
    """Point Inductor's on-disk caches (C++ kernels, FX graphs) at the store during a build, then restore,
    so the size bound covers them and ``trim`` can evict them (it waits for no build to hold ``builds_lock``).

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` each time it needs the folder; the variable is set only
    inside this block (contract 3), counted across threads: the first build to enter sets it, the last to
    leave restores it (two overlapping builds never restore each other's value; a second store's build that
    overlaps uses the first one's folder). With freezing, Inductor's FX graph cache is bypassed on CPU
    whenever oneDNN weight prepacking made mkldnn constants and the AOTAutograd cache always is; what still
    hits across processes is the compiled C++ kernel cache.
    """
    folder = cache.inductor_dir()
    builds = cache.builds_lock()
    if folder is None or builds is None or not builds.acquire(timeout=60, shared=True):
        yield None
        return
    with _SCOPE_LOCK:
        if _SCOPE["depth"] == 0:
            _SCOPE["previous"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        _SCOPE["depth"] += 1
        current = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    try:
        yield Path(current)
    finally:
        with _SCOPE_LOCK:
            _SCOPE["depth"] -= 1
            if _SCOPE["depth"] == 0:
                if _SCOPE["previous"] is None:
                    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
                else:
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _SCOPE["previous"]
        builds.release()
