"""Options as one frozen, validated value; environment overrides are read only when asked for."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

import torch

from .errors import CalibrationError, InvalidOptionError, UnknownDtypeError, UnknownOptionError

_DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "int8": torch.int8,
    "qint8": torch.int8,
}
_SHORT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "int8"}
if hasattr(torch, "int4"):  # weight-only int4, served by generate() of causal LMs (cpuboost/generation)
    _DTYPE_NAMES["int4"] = torch.int4
    _SHORT_NAMES[torch.int4] = "int4"

BACKEND_CHOICES = ("auto", "native", "eager", "ipex", "openvino")
MODE_CHOICES = ("auto", "infer", "train")
SHAPE_CHOICES = ("auto", "static", "dynamic")
# auto: a dynamic family's first call serves its first verified graph, the other rungs race in the background
# (``core.raceon``); blocking: every rung before the first answer; background: eager answers while it all builds
BUILD_CHOICES = ("auto", "blocking", "background")
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
        "Use dtype='bf16' for speed, 'fp32' for exact eager numerics, 'int8' for quantized inference"
        " ('int4': weight-only, for generate() of causal LMs)."
    )
    raise UnknownDtypeError(msg)


def check_int4_served(dtype: torch.dtype) -> None:
    """dtype='int4' needs torch's CPU int4 kernel; say so up front rather than after a model is copied."""
    if dtype == getattr(torch, "int4", None) and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        msg = (f"dtype='int4' needs torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu), which torch "
               f"{torch.__version__} does not have; use dtype='int8' (weight-only int8 for generate()) or 'bf16'")
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


def _parse_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidOptionError(f"option {name}={value!r} must be a number") from None


def _parse_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    msg = f"option {name}={value!r} is not one of {', '.join(map(repr, choices))}"
    raise InvalidOptionError(msg)


def _check_number(name: str, value: Any, *, allow_none: bool, what: str, fix: str) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        msg = f"option {name}={value!r} must be {what}; {fix}"
        raise InvalidOptionError(msg)


def _check_dynamic_dims(value: Any) -> None:
    if value is None:
        return
    ok = isinstance(value, Mapping) and all(
        isinstance(k, (str, int)) and not isinstance(k, bool) and isinstance(v, (list, tuple))
        and all(isinstance(d, int) and not isinstance(d, bool) for d in v) for k, v in value.items())
    if not ok:
        msg = (f"option dynamic_dims={value!r} must map an input (keyword name or positional index) to a list "
               "of dimension indices, e.g. dynamic_dims={'input_ids': [1]} or {0: [2, 3]}")
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
    tolerance: Optional[float] = None      # demand closer than the dtype's own judge (max-normalised error)
    tune_budget: float = 30.0              # seconds the ladder may spend on more rungs after a winner
    shapes: str = "auto"                   # "auto": static first (token dims: dynamic), then one dynamic graph
    dynamic_dims: Optional[Mapping] = None  # {input name or position: [dims]} declared dynamic up front
    cache_dir: Optional[str] = None        # persistent decisions and artifacts; None: CPUBOOST_CACHE_DIR
    calibration: Optional[Any] = None      # int8: example inputs (tuples of args or dicts of kwargs)
    accept_tracer_warnings: bool = False   # keep traced graphs whose tracer warned (data-dependent branches)
    build: str = "auto"                    # "background": a new signature is answered by eager while it builds

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        check_int4_served(self.dtype)
        for name in ("fusion", "verify", "inplace", "compile_training", "accept_tracer_warnings"):
            object.__setattr__(self, name, _parse_bool(name, getattr(self, name)))
        object.__setattr__(self, "backend", _parse_choice("backend", self.backend, BACKEND_CHOICES))
        object.__setattr__(self, "mode", _parse_choice("mode", self.mode, MODE_CHOICES))
        object.__setattr__(self, "shapes", _parse_choice("shapes", self.shapes, SHAPE_CHOICES))
        object.__setattr__(self, "build", _parse_choice("build", self.build, BUILD_CHOICES))
        if isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int) or self.cache_size < 1:
            msg = f"option cache_size={self.cache_size!r} must be a positive int (graphs kept per model)"
            raise InvalidOptionError(msg)
        if isinstance(self.tune_budget, str):
            object.__setattr__(self, "tune_budget", _parse_float("tune_budget", self.tune_budget))
        _check_number("tolerance", self.tolerance, allow_none=True, what="a non-negative number or None",
                      fix="e.g. tolerance=1e-3 demands max|diff|/max|eager| <= 1e-3 of every path")
        _check_number("tune_budget", self.tune_budget, allow_none=False, what="a non-negative number of seconds",
                      fix="e.g. tune_budget=0 serves the first verified path that beats eager, 30 is the default")
        _check_dynamic_dims(self.dynamic_dims)
        if self.calibration is not None and _one_shot(self.calibration):
            object.__setattr__(self, "calibration", list(self.calibration))  # a generator is read once, kept
        if self.calibration is not None and _empty(self.calibration):
            raise CalibrationError("option calibration= is empty: give at least one example input (a few batches "
                                   "of real data calibrate best), or calibration=None for dynamic int8")
        if self.calibration is not None and self.dtype != torch.int8:
            msg = (f"option calibration= is only used with dtype='int8', got dtype={dtype_name(self.dtype)!r}; "
                   "drop calibration= or ask for dtype='int8'")
            raise InvalidOptionError(msg)
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            msg = f"option cache_dir={self.cache_dir!r} must be a path (str or os.PathLike), or 'off' to disable"
            raise InvalidOptionError(msg)

    @property
    def low_precision(self) -> bool:
        return self.dtype != torch.float32

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype of this plan (int8 graphs quantize; they do not autocast), None for none."""
        return self.dtype if self.dtype in (torch.bfloat16, torch.float16) else None

    def describe(self) -> str:
        extra = "".join(f" {name}={getattr(self, name)!r}" for name in ("tolerance", "dynamic_dims")
                        if getattr(self, name) is not None)
        return (
            f"dtype={dtype_name(self.dtype)} fusion={self.fusion} backend={self.backend} "
            f"mode={self.mode} verify={self.verify} shapes={self.shapes} build={self.build}{extra}"
        )


def _empty(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and not value


def _one_shot(value: Any) -> bool:
    """An iterable that a second pass may not see again (a generator, a DataLoader that shuffles): its
    batches are read once into a list, so every build and the warm-start key see the same data."""
    from collections.abc import Iterable, Mapping

    return (isinstance(value, Iterable) and not isinstance(value, (list, tuple, Mapping, str, bytes))
            and not isinstance(value, torch.Tensor))


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))
_ENV_OVERRIDES = {"CPUBOOST_DTYPE": "dtype", "CPUBOOST_FUSION": "fusion", "CPUBOOST_BACKEND": "backend",
                  "CPUBOOST_TUNE_BUDGET": "tune_budget"}


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
