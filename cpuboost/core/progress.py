"""What a person sees while the ladder runs: one log line per rung, and a tqdm bar where one can show."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from typing import Iterator, Optional

log = logging.getLogger("cpuboost")


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class Progress:
    def __init__(self, total: int, what: str) -> None:
        self.bar = None
        if importlib.util.find_spec("tqdm") is not None and _interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"cpuboost {what}", leave=False, file=sys.stderr)

    def start(self, rung: str, signature: str) -> None:
        log.info("cpuboost: trying %s for [%s]", rung, signature)
        if self.bar is not None:
            self.bar.set_postfix_str(rung)

    def end(self, rung: str, fate: str) -> None:
        log.info("cpuboost: %s: %s", rung, fate)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def progress(total: int, what: str) -> Iterator[Progress]:
    bar: Optional[Progress] = Progress(total, what)
    try:
        yield bar
    finally:
        bar.close()
