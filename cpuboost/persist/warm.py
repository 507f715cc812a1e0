"""Warm start, wired into the runtime: what the ladder decided per signature is stored as
JSON (``store.DecisionStore``), and Inductor's winning graph as an AOTInductor package keyed by the weights'
content, so a restarted process loads the graph, verifies it once and answers without compiling or racing."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..options import Options, dtype_name
from . import package, store

log = logging.getLogger("cpuboost")


def _options_key(options: Options) -> dict:
    key = {"dtype": dtype_name(options.dtype), "backend": options.backend, "fusion": options.fusion,
           "tolerance": options.tolerance, "shapes": options.shapes, "verify": options.verify}
    if options.calibration is not None:  # int8 scales come from these batches: other data, other graph
        key["calibration"] = store.data_digest(options.calibration)
    return key


@dataclasses.dataclass
class Lookup:
    """One signature's persistent entry: the stored decision (if any) and where its artifacts live."""

    decision: Optional[dict]
    decision_key: dict
    artifact_dir: Optional[Path]


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

    def lookup(self, original: nn.Module, args: tuple, kwargs: dict) -> Lookup:
        key = store.make_key(original, args, kwargs, self._options_key, weights=False,
                             backends=("openvino", "torchao"))
        if self._weights is None:
            self._weights = store.weights_digest(original)
        artifact = self.store.artifact_dir({**key, "weights": self._weights}) if self.store.writable else None
        return Lookup(self.store.get(key), key, artifact)

    def remember(self, found: Lookup, rung: Optional[str], yardstick_error: Optional[float] = None) -> None:
        """The decision, with eager autocast's error on this signature (a warm start verifies against it
        instead of running eager autocast again)."""
        if yardstick_error is None and found.decision is not None and found.decision.get("rung") == rung:
            yardstick_error = found.decision.get("yardstick_error")
        decision: dict = {"rung": rung or "eager"}
        if yardstick_error is not None:
            decision["yardstick_error"] = yardstick_error
        self.store.put(found.decision_key, decision)

    @staticmethod
    def hints(found: Optional[Lookup], prefer: Optional[str], reference_ms: Optional[float]) -> Optional[dict]:
        """What the decided rung needs no eager call for: this call's eager time (its reference was timed) and
        the stored yardstick error; None unless the rung to try first came from the persistent cache."""
        if found is None or found.decision is None or found.decision.get("rung") != prefer:
            return None
        return {"eager_ms": reference_ms, "yardstick_error": found.decision.get("yardstick_error")}


def inductor_artifact(model: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype, folder: Path,
                      note) -> Any:
    """The Inductor rung through AOTInductor, persisted in ``folder``: loaded when a graph is already there
    (no compile), else exported and compiled into it. Raises when export fails (the caller compiles instead)."""
    pt2 = folder / "graph.pt2"
    if pt2.exists():
        try:
            graph = package.load_graph(pt2)
            note("loaded from the persistent cache (AOTInductor package, no compile)")
            return graph
        except (package.PackageFormatError, package.PackageMismatchError, OSError) as exc:
            note(f"cached graph unusable ({exc}); compiled again")
    graph, _ = package.compile_aoti(model, args, kwargs, dtype, workdir=folder)
    note("AOTInductor package (export + freezing), kept in the persistent cache")
    return graph
