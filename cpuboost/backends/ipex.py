"""Intel Extension for PyTorch, version-gated: decided from metadata before any import is tried."""
from __future__ import annotations

import functools

from . import Availability, package_version


@functools.lru_cache(maxsize=None)
def availability() -> Availability:
    import torch

    version = package_version("intel_extension_for_pytorch", "intel-extension-for-pytorch")
    if version is None:
        return Availability("ipex", False, "not installed (optional; IPEX 2.8 needs torch 2.8.x)")
    torch_mm = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    ipex_mm = ".".join(version.split("+")[0].split(".")[:2])
    if torch_mm != ipex_mm:
        return Availability("ipex", False, f"version mismatch: IPEX {version} needs torch {ipex_mm}.x, "
                            f"this is torch {torch.__version__}; install matching versions or use the native "
                            "backend", version)
    try:
        import intel_extension_for_pytorch  # noqa: F401
    except BaseException as exc:  # IPEX's own import can exit or raise anything
        return Availability("ipex", False, f"import failed: {type(exc).__name__}: {exc}", version)
    return Availability("ipex", True, "installed and importable", version)
