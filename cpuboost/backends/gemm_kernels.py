"""All of cpuboost's micro-kernels for Inductor's C++ GEMM template, for the builds that use them: decode graphs
and their package compiles (each kernel takes its GEMMs only where its CPU and torch allow)."""
from __future__ import annotations

import contextlib
from typing import Iterator

from .bf16_dot import bf16_dot_gemms
from .int8_amx import int8_amx_gemms
from .int8_dot import int8_dot_gemms


@contextlib.contextmanager
def cpuboost_gemms() -> Iterator[None]:
    """Inside: every cpuboost micro-kernel this CPU and torch can use."""
    with bf16_dot_gemms(), int8_dot_gemms(), int8_amx_gemms():
        yield
