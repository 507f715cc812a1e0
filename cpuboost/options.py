"""Options as one frozen, validated value; environment overrides are read only when asked for."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import torch

from .errors import InvalidOptionError, UnknownDtypeError, UnknownOptionError

_DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
_SHORT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

BACKENDS = ("auto", "native", "eager", "ipex", "openvino")
MODES = ("auto", "infer", "train")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_dtype(value: Any) -> torch.dtype:
    """Accept the names users type and torch dtypes; name the choices otherwise.

    ``"auto"`` means bf16 where the CPU has native bf16 (AVX512_BF16 or AMX), else fp32.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        from .machine.hardware import detect

        return _DTYPE_NAMES[detect().recommended_dtype]
    if isinstance(value, torch.dtype):
        if value in _SHORT_NAMES:
            return value
    elif isinstance(value, str) and value.strip().lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.strip().lower()]
    choices = ", ".join(repr(n) for n in ["auto", *_DTYPE_NAMES])
    msg = (
        f"unknown dtype {value!r}; expected one of {choices} or torch.bfloat16/float16/float32. "
        "Use dtype='bf16' for speed, 'fp32' for exact eager numerics."
    )
    raise UnknownDtypeError(msg)


def dtype_name(dtype: torch.dtype) -> str:
    return _SHORT_NAMES[dtype]


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    msg = f"option {name}={value!r} must be True or False (or, from the environment, 1/0/true/false)"
    raise InvalidOptionError(msg)


def _parse_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    msg = f"option {name}={value!r} is not one of {', '.join(map(repr, choices))}"
    raise InvalidOptionError(msg)


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything that steers a plan. Construct through :func:`resolve_options`."""

    dtype: torch.dtype = torch.bfloat16
    fusion: bool = True
    backend: str = "auto"
    mode: str = "auto"
    verify: bool = True
    inplace: bool = False
    cache_size: int = 16
    compile_training: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        for name in ("fusion", "verify", "inplace", "compile_training"):
            object.__setattr__(self, name, _parse_bool(name, getattr(self, name)))
        object.__setattr__(self, "backend", _parse_choice("backend", self.backend, BACKENDS))
        object.__setattr__(self, "mode", _parse_choice("mode", self.mode, MODES))
        if isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int) or self.cache_size < 1:
            msg = f"option cache_size={self.cache_size!r} must be a positive int (graphs kept per model)"
            raise InvalidOptionError(msg)

    @property
    def low_precision(self) -> bool:
        return self.dtype != torch.float32

    def describe(self) -> str:
        return (
            f"dtype={dtype_name(self.dtype)} fusion={self.fusion} backend={self.backend} "
            f"mode={self.mode} verify={self.verify}"
        )


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))
_ENV_OVERRIDES = {"CPUBOOST_DTYPE": "dtype", "CPUBOOST_FUSION": "fusion", "CPUBOOST_BACKEND": "backend"}


def check_option_names(kwargs: Mapping[str, Any]) -> None:
    unknown = sorted(set(kwargs) - set(OPTION_NAMES))
    if unknown:
        msg = f"unknown option(s) {', '.join(map(repr, unknown))}; valid options are {', '.join(OPTION_NAMES)}"
        raise UnknownOptionError(msg)


def env_defaults(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Defaults replaced by CPUBOOST_* variables; read each time a model is optimized, never at import."""
    environ = os.environ if environ is None else environ
    return {opt: environ[var] for var, opt in _ENV_OVERRIDES.items() if environ.get(var, "") != ""}


def is_disabled(environ: Mapping[str, str] | None = None) -> bool:
    """``CPUBOOST_DISABLE=1``: every decorator becomes a pass-through (the debugging switch)."""
    environ = os.environ if environ is None else environ
    return _parse_bool("CPUBOOST_DISABLE", environ.get("CPUBOOST_DISABLE", "0"))


def resolve_options(explicit: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Options:
    """Explicit arguments win over CPUBOOST_* variables, which win over the built-in defaults."""
    check_option_names(explicit)
    merged = {**env_defaults(environ), **explicit}
    return Options(**merged)
