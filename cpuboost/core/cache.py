"""Built graphs by input signature, grouped into families that differ only in top-level tensor sizes.

An exact signature maps to the entry that serves it. A family remembers its first sizes, the rung that won
there, and at most one dynamic graph: once a dimension takes a second size (``shapes="auto"``; token inputs
from the first size, ``signature.sequence_dims``), one graph dynamic in that dimension serves later sizes;
each is checked against eager until the graph has passed on two sizes, then every fourth (a new length
costs the served call, not an eager call on top). The exact-signature table is a bounded LRU of
references: evicting one only costs a re-verification.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Callable, Hashable, Optional

import torch

from . import verify
from .report import GraphRecord


@dataclasses.dataclass
class GraphEntry:
    path: str
    fn: Callable[..., Any]
    template: Any  # eager's output dtypes, to answer in the dtype eager would
    record: GraphRecord
    no_grad: bool = True
    example: Optional[tuple] = None  # (args, kwargs) of the first call: what cpuboost.save() compiles for
    sizes: Any = None  # a kept dynamic graph's log of sizes checked against eager (``persist.warm.SizeLog``)

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        if self.no_grad:
            with torch.no_grad():
                out = self.fn(*args, **kwargs)
        else:
            out = self.fn(*args, **kwargs)
        return verify.match_dtypes(self.template, out) if self.template is not None else out


@dataclasses.dataclass
class Family:
    first_shapes: dict
    winner: Optional[str] = None  # the rung that served the first size, tried first for later builds
    dims: dict = dataclasses.field(default_factory=dict)  # dims seen varying
    dynamic: Optional[GraphEntry] = None
    builds: int = 0
    yardstick_error: Optional[float] = None  # eager autocast's error at the dynamic graph's build
    sizes_passed: int = 0  # sizes the dynamic graph was checked on against eager fp32, its build's included
    unchecked_in_a_row: int = 0

    SAMPLE_EVERY = 4  # once the dynamic graph passed on two sizes, every 4th new size is still checked

    def serve_dynamic(self, dims: dict, entry: GraphEntry, verdict: Optional[verify.Verdict]) -> None:
        """``entry`` (built dynamic in ``dims``) serves the family's later sizes; the sizes an earlier process
        checked it on (its ``sizes`` log, same weights) count as passed."""
        self.dims, self.dynamic = dims, entry
        self.yardstick_error = verdict.yardstick if verdict is not None else None
        earlier = len(entry.sizes.checked) - 1 if entry.sizes is not None else 0  # the log holds this build's size
        self.sizes_passed, self.unchecked_in_a_row = int(verdict is not None) + max(earlier, 0), 0

    def _checked_before(self, sig: Optional[str]) -> bool:
        log = self.dynamic.sizes if self.dynamic is not None else None
        return log is not None and sig in log.checked

    def due_for_check(self, sig: Optional[str] = None) -> bool:
        if self._checked_before(sig):
            return False
        return self.sizes_passed < 2 or self.unchecked_in_a_row + 1 >= self.SAMPLE_EVERY

    def served_size(self, checked: bool, sig: Optional[str] = None) -> None:
        if checked:
            self.sizes_passed, self.unchecked_in_a_row = self.sizes_passed + 1, 0
            if self.dynamic is not None and self.dynamic.sizes is not None and sig is not None:
                self.dynamic.sizes.add(sig)
        elif not self._checked_before(sig):
            self.unchecked_in_a_row += 1

    def unchecked_reason(self, path: str, verify_on: bool, sig: Optional[str] = None) -> str:
        if path == "eager":
            return "eager: the reference itself"
        if not verify_on:
            return "not verified (verify=False)"
        if self._checked_before(sig):
            return "size checked against eager fp32 before (persistent cache, same weights)"
        return (f"size not checked: the graph passed on {self.sizes_passed} sizes; every {self.SAMPLE_EVERY}th new "
                "size is")


class SignatureCache:
    """Thread-safe: lookups take a short lock; builds are serialized by the caller."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: collections.OrderedDict[Hashable, GraphEntry] = collections.OrderedDict()
        self.families: dict[Hashable, Family] = {}
        self.lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[GraphEntry]:
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
            return entry

    def put(self, key: Hashable, entry: GraphEntry) -> None:
        with self.lock:
            self.entries[key] = entry
            self.entries.move_to_end(key)
            # static graphs are bounded by cache_size; references to a family's dynamic graph are cheap
            while self._static_count() > self.size or len(self.entries) > 16 * self.size:
                self.entries.popitem(last=False)

    def _static_count(self) -> int:
        dynamic = {id(f.dynamic) for f in self.families.values() if f.dynamic is not None}
        return len({id(e) for e in self.entries.values() if id(e) not in dynamic})

    def replace(self, old: GraphEntry, new: GraphEntry) -> None:
        """Every signature ``old`` serves is served by ``new`` (a family's dynamic graph swapped for a faster one)."""
        with self.lock:
            for key, entry in self.entries.items():
                if entry is old:
                    self.entries[key] = new

    def drop(self, key: Hashable) -> None:
        with self.lock:
            self.entries.pop(key, None)

    def family(self, key: Hashable) -> Optional[Family]:
        return self.families.get(key)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.families.clear()

    def __len__(self) -> int:
        return len(self.entries)


def verify_dtype(entry: GraphEntry) -> torch.dtype:
    """The dtype an entry's graph is judged in (its record's)."""
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "int8": torch.int8}
    return names.get(entry.record.dtype, torch.float32)
