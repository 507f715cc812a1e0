"""The package errors, in a module of their own so that every package module (tree specs, AOTInductor
graphs, package folders) can raise them without importing another; ``package`` re-exports them."""
from __future__ import annotations

from typing import Optional

from ..errors import CpuBoostError


class PackageMismatchError(CpuBoostError, RuntimeError):
    """A package built for another machine or library version; ``differences`` maps what to (needed, here)."""

    def __init__(self, message: str, differences: Optional[dict] = None) -> None:
        super().__init__(message)
        self.differences = differences or {}


class PackageFormatError(CpuBoostError, ValueError):
    """Not a cpuboost package, a damaged one, or a model whose inputs/outputs cannot be packaged."""


class PackageSignatureError(CpuBoostError, ValueError):
    """A call whose input signature (shapes, dtypes, structure) was not built into the package."""


class PackageVerificationError(CpuBoostError, RuntimeError):
    """The compiled graph did not match eager fp32 within the dtype's tolerance; nothing was written."""



class UnsafeLocationError(CpuBoostError, PermissionError):
    """Native code (a ``.pt2``'s shared library) in a folder that someone else can write or owns: not loaded."""


class PackagedPathWarning(UserWarning):
    """``cpuboost.save`` packaged an Inductor graph for a signature that another path (OpenVINO, eager, an
    uncached int8 graph) serves at runtime: the package's answers come from a different graph."""
