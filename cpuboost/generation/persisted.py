"""Decode-graph decisions in cpuboost's persistent store, keyed by model, weights, options, machine and
(batch, cache bucket): a restarted process skips the race for a graph that won before and compiles with
Inductor's caches kept in the store. Only its C++ kernel cache hits: the decode graph's oneDNN-packed bf16
weights are mkldnn tensors, which Inductor's FX graph cache refuses ("mkldnn tensors unpickleable"), and the
C++ GEMM template needs that prepack (no template without it), so Inductor itself runs again (Qwen2 shape,
12 layers, bf16: warm first generate 32 s against 53 s cold). Seconds would need the decode step as an
AOTInductor package."""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn


class PersistedDecisions:
    def __init__(self, warm: Any, original: nn.Module) -> None:
        self._warm, self._original = warm, original  # a persist.warm.WarmStart, enabled

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

    def remember(self, found: Any) -> None:
        self._warm.remember(found, "compiled")
