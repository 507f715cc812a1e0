"""Let gloo's worker threads finish before the interpreter shuts down, in every process that trains with it.

A gradient all-reduce launched in backward (cpuboost's own data parallel or a framework's DDP: accelerate,
Lightning, Trainer) carries a Python object in its thread-local state, and gloo frees the finished work on its
own thread, which needs the GIL. When that happens after Python starts finalising, the thread is torn down
inside a noexcept destructor and the process aborts ("terminate called without an active exception", exit -6)
although training finished (torch 2.13; about one 2-rank accelerate run in ten on 2 cores). Sleeping in an exit
hook releases the GIL while Python can still hand it over, so those frees complete first.
"""
from __future__ import annotations

import atexit
import threading
import time

import torch

GIL_RELEASE_AT_EXIT_S = 0.05
_registered = False
_lock = threading.Lock()


def let_gloo_threads_finish_at_exit() -> None:
    """Register the exit hook once per process."""
    global _registered
    with _lock:
        if not _registered:
            atexit.register(time.sleep, GIL_RELEASE_AT_EXIT_S)
            _registered = True


def when_distributed() -> None:
    """The hook, if a process group runs here (cheap once registered: called from every training forward)."""
    if not _registered and torch.distributed.is_available() and torch.distributed.is_initialized():
        let_gloo_threads_finish_at_exit()
