"""Decode steps in cpuboost's persistent store, keyed by model, weights, options, machine and (batch, cache
bucket): the decision, and the winning step as an AOTInductor package, so a restarted process loads the step
(seconds) and verifies it, with no compile and no race.

The step is exported when it first serves (seconds); the program is then saved and compiled in the
background, in a child process at a lower priority, while this process goes on generating with its in-process
graph (Inductor's FX graph cache cannot keep that graph: its oneDNN-packed weights are unpicklable mkldnn
tensors, so without the package every restart compiled again, 30-50 s for a Qwen2-0.5B shape). The key's entry lock is held until the package is published, so another process
starting meanwhile waits for it instead of compiling the same step; at interpreter exit a compile under way
is waited for (logged), since a short script would otherwise never leave one."""
from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

log = logging.getLogger("cpuboost")
NICE = 10  # the background compile yields the CPU to the serving process (and runs in the idle class: child.py)
UNIT = "decode"
_COMPILES: list[threading.Thread] = []
_COMPILES_LOCK = threading.Lock()


class PersistedDecisions:
    def __init__(self, warm: Any, original: nn.Module) -> None:
        self._warm, self._original = warm, original  # a persist.warm.WarmStart, enabled
        self._pending: list[threading.Thread] = []  # package compiles waiting for the call that built them
        self._pending_lock = threading.Lock()

    def lookup(self, batch: int, bucket: int, note: Callable[[str], None]) -> Optional[Any]:
        """The key's entry with its lock held (the caller releases it), or None: the cache never fails a call."""
        try:
            found = self._warm.lookup(self._original, (), {"generate": {"batch": batch, "cache": bucket}})
        except Exception as exc:  # noqa: BLE001 - an unusable cache costs a compile, never the call
            note(f"generate: persistent cache skipped: {type(exc).__name__}: {exc}")
            return None
        if found.waited_s > 1:
            note(f"generate: waited {found.waited_s:.1f} s for another process building batch {batch}, "
                 f"cache {bucket}")
        if (found.decision or {}).get("rung") == "compiled":
            note(f"generate: batch {batch}, cache {bucket}: decision from the persistent cache (compiled)")
        return found

    @staticmethod
    def packaged(found: Any, model: nn.Module, note: Callable[[str], None]) -> Optional[Any]:
        """The key's packaged step, loaded (not yet verified), or None when there is none or it is unusable
        (then it is removed, unless the folder is not trusted)."""
        from ..persist import units
        from ..persist.errors import PackageFormatError, PackageMismatchError, UnsafeLocationError
        from .packaged import PackagedDecode

        unit = found.artifact_dir / UNIT if found.artifact_dir is not None else None
        if unit is None or not (unit / "decode.json").is_file():
            return None
        try:
            step = PackagedDecode(model, unit, "AOTInductor package from the persistent cache, no compile",
                                  root=found.artifact_dir)
        except UnsafeLocationError as exc:
            note(f"generate: packaged decode step not loaded: {exc}")
            return None
        except (PackageFormatError, PackageMismatchError, OSError, RuntimeError) as exc:
            note(f"generate: packaged decode step unusable ({type(exc).__name__}: {str(exc)[:200]}); removed, "
                 "compiled again")
            units.discard(unit)
            return None
        return step

    def remember(self, found: Any, step: Any = None, copies: Any = None, dtype: Optional[torch.dtype] = None,
                 note: Callable[[str], None] = lambda text: None) -> None:
        """Write the key's decision; for a step compiled here, export it now; its package is saved and compiled
        in the background once ``start_pending`` is called (the entry stays locked until it is published)."""
        example, options = getattr(step, "example", None), getattr(step, "options", None)
        if step is not None:
            step.example = None  # holds a pool cache: not kept past the build
        if example is None or options is None or found.artifact_dir is None:
            self._warm.remember(found, "compiled")
            return
        from ..persist import units
        from .packaged import export_step

        try:
            exported = export_step(getattr(step, "model", copies.decode), example, copies.cache_arg, dtype)
        except Exception as exc:  # noqa: BLE001 - a step that does not export still serves; restarts compile it
            note(f"generate: decode step not packaged for restarts ({type(exc).__name__}: "
                 f"{(str(exc) or '-').splitlines()[0][:200]}); a restarted process compiles it again")
            self._warm.remember(found, "compiled")
            return
        unit = found.artifact_dir / UNIT
        staging = units.stage(unit)
        lock, found.lock = found.lock, None
        self._warm.remember(found, "compiled")
        thread = threading.Thread(target=_compile, args=(exported, options, staging, unit, lock, note),
                                  name="cpuboost build: decode package", daemon=True)
        with _COMPILES_LOCK:
            if not _COMPILES:
                atexit.register(_finish_compiles)
            _COMPILES.append(thread)
        with self._pending_lock:
            self._pending.append(thread)

    def start_pending(self) -> None:
        """Start the package compiles of the steps built for the call that just returned: not during it, since
        saving the program holds the GIL in long stretches (Qwen2-0.5B shape: the cold first call 57 s instead
        of 47 s when they overlapped)."""
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for thread in pending:
            thread.start()

    @staticmethod
    def forget(step: Any) -> None:
        """A packaged step that failed verification: its unit goes, so no later process loads it again."""
        from ..persist import units

        log.warning("cpuboost cache: packaged decode step %s failed verification; removed", step.unit)
        units.discard(step.unit)


def _compile(exported: Any, options: dict, staging: Path, unit: Path, lock: Any, note: Callable[[str], None]) -> None:
    from ..persist import units
    from .packaged import compile_unit

    try:
        meta = compile_unit(exported, options, staging, nice=NICE)
        units.publish(staging, unit)
        note(f"generate: decode step packaged for restarts (AOTInductor, export {meta['export_s']:.1f} s, compile "
             f"{meta['compile_s']:.0f} s in a background child process)")
    except Exception as exc:  # noqa: BLE001 - the step in this process serves regardless
        units.discard(staging)
        note(f"generate: decode step not packaged for restarts ({type(exc).__name__}: "
             f"{(str(exc) or '-').splitlines()[0][:200]}); a restarted process compiles it again")
    finally:
        if lock is not None:
            lock.release()


def _finish_compiles() -> None:
    with _COMPILES_LOCK:
        for thread in _COMPILES:
            if thread.ident is None:  # never started: its call raised before returning
                thread.start()
        running = [t for t in _COMPILES if t.is_alive()]
    if running:
        log.warning("cpuboost: finishing %d decode-step package(s) for warm restarts before exiting (about a "
                    "minute; CPUBOOST_CACHE_DIR=off skips them)", len(running))
    for thread in running:
        thread.join()
