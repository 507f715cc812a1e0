"""``cpu_amp``: CPU autocast that shares torch's own state and is safe to reuse, nest and decorate with."""
from __future__ import annotations

import inspect
import threading
import warnings
from typing import Any, Callable

import torch

from .machine import hardware
from .errors import UnknownDtypeError
from .options import dtype_name, parse_dtype


class CpuBoostPerformanceWarning(UserWarning):
    """The requested precision is emulated on this CPU and will be slower than fp32."""


_warned_lock = threading.Lock()
_warned: set[torch.dtype] = set()


def warn_if_emulated(dtype: torch.dtype) -> None:
    """Warn once per process and dtype when the CPU has no native instructions for it."""
    if dtype in (torch.float32, torch.int8) or hardware.detect().native(dtype):
        return
    with _warned_lock:
        if dtype in _warned:
            return
        _warned.add(dtype)
    name = dtype_name(dtype)
    warnings.warn(
        f"this CPU has no native {name} instructions (no AVX512_BF16/AMX for bf16, no AVX512_FP16/AMX_FP16 "
        f"for fp16): {name} math is emulated and usually slower than fp32 here. Use dtype='fp32' for speed "
        "on this machine; `cpuboost env` shows what it supports.",
        CpuBoostPerformanceWarning,
        stacklevel=3,
    )


class cpu_amp:  # noqa: N801 - reads like torch.autocast / torch.no_grad
    """CPU autocast (bf16 by default) built on ``torch.autocast("cpu")``.

    It is torch's own autocast underneath, so ``torch.is_autocast_enabled("cpu")`` sees it and it nests
    with ``torch.autocast``. Each ``with`` and each decorated call uses fresh saved state (kept per
    thread), so one instance can be reused, nested, shared by threads and used for recursion.
    """

    def __init__(self, dtype: Any = "bf16", enabled: bool = True, cache_enabled: bool | None = None) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"cpu_amp(enabled={enabled!r}) must be True or False")
        if cache_enabled is not None and not isinstance(cache_enabled, bool):
            raise TypeError(f"cpu_amp(cache_enabled={cache_enabled!r}) must be True, False or None")
        self.dtype = parse_dtype(dtype)
        if self.dtype == torch.int8:
            msg = (f"cpu_amp(dtype={dtype!r}): autocast runs in one of 'bf16', 'fp16', 'fp32'; int8 is a quantized "
                   "inference path: use cpuboost.optimize(model, dtype='int8') instead")
            raise UnknownDtypeError(msg)
        self.enabled = enabled
        self.cache_enabled = cache_enabled
        self._local = threading.local()

    def clone(self) -> "cpu_amp":
        return type(self)(self.dtype, self.enabled, self.cache_enabled)

    def _autocast(self) -> torch.autocast:
        # fp32 "autocast" means: run in fp32 even inside an outer low-precision region.
        enabled = self.enabled and self.dtype != torch.float32
        kwargs = {} if self.cache_enabled is None else {"cache_enabled": self.cache_enabled}
        if self.enabled and self.dtype == torch.float32:
            return torch.autocast("cpu", enabled=False, **kwargs)
        return torch.autocast("cpu", dtype=self.dtype, enabled=enabled, **kwargs)

    def __enter__(self) -> "cpu_amp":
        if self.enabled:
            warn_if_emulated(self.dtype)
        ctx = self._autocast()
        stack = self._local.__dict__.setdefault("stack", [])
        ctx.__enter__()
        stack.append(ctx)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._local.stack.pop().__exit__(*exc)

    def __call__(self, fn: Callable) -> Callable:
        return amp_wrapper(fn, self.clone)

    def __repr__(self) -> str:
        return f"cpu_amp(dtype={dtype_name(self.dtype)!r}, enabled={self.enabled})"


def amp_wrapper(fn: Callable, make_context: Callable[[], Any]) -> Callable:
    """Wrap ``fn`` so each call (and each generator resume) runs inside a fresh context."""
    import wrapt

    if inspect.isgeneratorfunction(fn):

        @wrapt.decorator
        def gen_wrapper(wrapped, instance, args, kwargs):
            return _resume_inside(wrapped(*args, **kwargs), make_context)

        return gen_wrapper(fn)

    @wrapt.decorator
    def wrapper(wrapped, instance, args, kwargs):
        with make_context():
            return wrapped(*args, **kwargs)

    return wrapper(fn)


def _resume_inside(gen, make_context):
    """Re-enter the context around each step of a generator, never holding it across a yield."""
    step, arg = gen.send, None
    while True:
        try:
            with make_context():
                value = step(arg)
        except StopIteration as stop:
            return stop.value
        try:
            arg = yield value
            step = gen.send
        except GeneratorExit:
            gen.close()
            raise
        except BaseException as exc:  # thrown in by the caller: deliver it inside the context
            step, arg = gen.throw, exc
