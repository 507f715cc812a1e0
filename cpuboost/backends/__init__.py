"""Optional backends: each says whether it can run here, and why not, before anything heavy is imported."""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Availability:
    name: str
    usable: bool
    reason: str  # why it is usable, or exactly why not and what to do
    version: Optional[str] = None


def package_version(*dist_names: str) -> Optional[str]:
    """Installed version from package metadata, without importing the package."""
    for dist in dist_names:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def native_availability() -> Availability:
    from ..machine.hardware import detect

    import torch

    if not detect().has_cxx_compiler:
        return Availability("native", False, "no C++ compiler (g++/clang++) on PATH: Inductor cannot build "
                            "kernels; cpuboost uses eager passes. Install g++ to enable fused graphs.",
                            torch.__version__)
    return Availability("native", True, "torch.compile/Inductor with freezing", torch.__version__)


@functools.lru_cache(maxsize=None)
def openvino_availability() -> Availability:
    version = package_version("openvino")
    if version is None or importlib.util.find_spec("openvino") is None:
        return Availability("openvino", False, "not installed (pip install 'cpuboost[openvino]')")
    return Availability("openvino", True, "installed", version)


def all_backends() -> list[Availability]:
    """Every backend cpuboost knows, in preference order, with its reason."""
    from .ipex import availability as ipex_availability

    return [native_availability(), ipex_availability(), openvino_availability()]
