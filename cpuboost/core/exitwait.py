"""Background build threads an exiting interpreter waits for: a daemon thread killed inside Inductor's compile
aborts the process ("terminate called without an active exception", exit status 134), so at exit the builds
still running are joined, with one warning per kind of build saying why the exit waits."""
from __future__ import annotations

import atexit
import logging
import threading

log = logging.getLogger("cpuboost")
_THREADS: list[tuple[threading.Thread, str]] = []
_LOCK = threading.Lock()
EXITING = threading.Event()  # set before the join: a build with more steps left starts none of them


def wait_at_exit(thread: threading.Thread, what: str) -> None:
    """``thread`` (started or about to be) is joined at interpreter exit if it still runs; ``what`` names it in
    the warning."""
    with _LOCK:
        if not _THREADS:
            atexit.register(_finish)
        _THREADS[:] = [(t, w) for t, w in _THREADS if t.ident is None or t.is_alive()] + [(thread, what)]


def _finish() -> None:
    EXITING.set()
    with _LOCK:
        running = [(t, w) for t, w in _THREADS if t.is_alive()]
    for what in dict.fromkeys(w for _, w in running):
        log.warning("cpuboost: finishing %s before exiting (wait_for_builds() waits for it explicitly)", what)
    for thread, _ in running:
        thread.join()
