"""What this CPU can do, read from the OS (not guessed from the model name), cached per process."""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import shutil

import torch

# cpuinfo flag -> the name users know it by
_FEATURES = {
    "avx2": "AVX2",
    "avx512f": "AVX512F",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
    "avx512_fp16": "AVX512_FP16",
    "amx_bf16": "AMX_BF16",
    "amx_int8": "AMX_INT8",
    "amx_fp16": "AMX_FP16",
}


@dataclasses.dataclass(frozen=True)
class Hardware:
    cpu_model: str
    physical_cores: int
    logical_cpus: int
    torch_threads: int
    features: frozenset[str]
    torch_capability: str
    has_cxx_compiler: bool

    @property
    def native_bf16(self) -> bool:
        return bool({"AVX512_BF16", "AMX_BF16"} & self.features)

    @property
    def native_fp16(self) -> bool:
        return bool({"AVX512_FP16", "AMX_FP16"} & self.features)

    def native(self, dtype: torch.dtype) -> bool:
        if dtype == torch.bfloat16:
            return self.native_bf16
        if dtype == torch.float16:
            return self.native_fp16
        return True

    @property
    def recommended_dtype(self) -> str:
        return "bf16" if self.native_bf16 else "fp32"


def _read_cpuinfo() -> tuple[str, set[str], int]:
    model, flags, cores = platform.processor() or platform.machine(), set(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return model, flags, 0
    physical_id = "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name":
            model = value
        elif key == "flags" and not flags:
            flags = set(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    return model, flags, len(cores)


@functools.lru_cache(maxsize=None)
def detect() -> Hardware:
    model, flags, physical = _read_cpuinfo()
    logical = os.cpu_count() or 1
    return Hardware(
        cpu_model=model,
        physical_cores=physical or logical,
        logical_cpus=logical,
        torch_threads=torch.get_num_threads(),
        features=frozenset(name for flag, name in _FEATURES.items() if flag in flags),
        torch_capability=torch.backends.cpu.get_cpu_capability(),
        has_cxx_compiler=any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    )
