"""Background builds (``build="background"``): a call whose signature has no graph yet is answered by the eager
model at once, while the ladder builds, verifies and races that signature in a daemon thread; the winner
serves the calls after it. The first answer costs one eager call instead of the whole build.

One thread per signature; a second call of a signature still building is answered by eager too. A build that
fails is recorded for ``explain()`` and that signature stays eager until ``invalidate()`` (no retry loop).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Hashable, Optional

import torch
from torch.utils import _pytree as pytree

from . import signature
from .exitwait import wait_at_exit


def private_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Copies of the call's tensors for the build: the caller may reuse or overwrite its own as soon as the
    eager answer is back, and a build verified on inputs that changed under it would judge noise."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (tuple(args), dict(kwargs)))


class BackgroundBuilds:
    """The builds running in the background for one model, and the signatures whose build failed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[Hashable, threading.Thread] = {}
        self.failed: dict[Hashable, str] = {}

    def answer_now(self, model: Any, key: Hashable, args: tuple, kwargs: dict) -> Any:
        """Eager's answer for ``model`` (an OptimizedModule) now, raising what the model raises before any
        build starts; the signature then builds in a daemon thread on private copies of the inputs, under the
        caller's autocast and grad mode (both thread-local, and the autocast state is part of the key)."""
        out = model._eager_original(*args, **kwargs)
        if self.busy(key):  # already building (or failed): the inputs need no private copy
            return out
        copies = private_inputs(args, kwargs)
        autocast, dtype = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
        grad = torch.is_grad_enabled()

        def build() -> None:
            with torch.autocast("cpu", dtype=dtype, enabled=autocast), torch.set_grad_enabled(grad):
                model._build_and_call(key, *copies)

        self.start(key, signature.describe(args, kwargs), build, model._report.note)
        return out

    def busy(self, key: Hashable) -> bool:
        """A build of ``key`` runs or has failed: calls meanwhile are answered by eager without starting one."""
        with self.lock:
            return key in self.running or key in self.failed

    def start(self, key: Hashable, sig: str, build: Callable[[], Any], note: Callable[[str], None],
              what: str = "") -> None:
        """Starts ``build`` for ``key`` unless one is running or has failed; ``what`` is the report's line."""
        with self.lock:
            if key in self.running or key in self.failed:
                return
            thread = threading.Thread(target=self._run, args=(key, sig, build, note), daemon=True,
                                      name=f"cpuboost build [{sig[:60]}]")
            self.running[key] = thread
        note(what or f"[{sig}]: answered by eager while its graph builds in the background")
        wait_at_exit(thread, "a background graph build")
        thread.start()

    def _run(self, key: Hashable, sig: str, build: Callable[[], Any], note: Callable[[str], None]) -> None:
        try:
            build()
        except BaseException as exc:  # noqa: BLE001 - a daemon thread has no caller: explain() is where it goes
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            with self.lock:
                self.failed[key] = why
            note(f"background build of [{sig}] failed ({why}); eager serves it until invalidate()")
        finally:
            with self.lock:
                self.running.pop(key, None)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Joins the running builds (started before or during the wait); True when none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.lock:
                threads = list(self.running.values())
            if not threads:
                return True
            for thread in threads:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                thread.join(left)
            if deadline is not None and time.monotonic() >= deadline:
                with self.lock:
                    return not self.running

    def forget_failures(self) -> None:
        with self.lock:
            self.failed.clear()
