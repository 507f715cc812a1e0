"""What ``cpuboost env`` reports: this machine, the installed stack and each backend's availability.

Everything comes from the OS, package metadata and the backend probes; nothing is guessed from the
CPU's model name. Made to be pasted into a bug report.
"""
from __future__ import annotations

import os
import platform
import shutil
import sys
from typing import Any

import torch

from .. import __version__
from . import hardware
from ..backends import all_backends, package_version

ISA = ("AVX2", "AVX512F", "AVX512_VNNI", "AVX512_BF16", "AVX512_FP16", "AMX_BF16", "AMX_INT8", "AMX_FP16")
PACKAGES = {  # shown name -> distribution names to look up (no imports)
    "torch": ("torch",),
    "intel_extension_for_pytorch": ("intel_extension_for_pytorch", "intel-extension-for-pytorch"),
    "openvino": ("openvino",),
    "transformers": ("transformers",),
    "numpy": ("numpy",),
    "matplotlib": ("matplotlib",),
}
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_AFFINITY", "KMP_BLOCKTIME", "LD_PRELOAD",
            "CPUBOOST_DISABLE", "CPUBOOST_DTYPE", "CPUBOOST_FUSION", "CPUBOOST_BACKEND")
# The documented top-level keys of `cpuboost env --json` (tests hold the output to this list).
KEYS = ("cpuboost", "python", "platform", "cpu", "isa", "isa_source", "torch_cpu_capability", "bf16", "fp16",
        "versions", "backends", "cxx_compiler", "recommended_dtype", "recommended_reason", "environment")


def _precision(native: bool, names: str) -> str:
    return f"native ({names})" if native else f"emulated (no {names})"


def recommendation(hw: hardware.Hardware) -> tuple[str, str]:
    if hw.native_bf16:
        have = ", ".join(sorted({"AVX512_BF16", "AMX_BF16"} & hw.features))
        return "bf16", f"this CPU runs bf16 matmuls natively ({have}); use dtype='bf16'"
    return "fp32", ("bf16 is emulated on this CPU (no AVX512_BF16 or AMX_BF16), so bf16 matmuls are slower "
                    "than fp32; use dtype='fp32' (fusion still applies)")


def collect() -> dict[str, Any]:
    """The facts as a JSON-ready dict with the keys in ``KEYS``."""
    hw = hardware.detect()
    dtype, why = recommendation(hw)
    compiler = next((shutil.which(c) for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    return {
        "cpuboost": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": {"model": hw.cpu_model, "physical_cores": hw.physical_cores, "logical_cpus": hw.logical_cpus,
                "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()},
        "isa": {name: name in hw.features for name in ISA},
        "isa_source": "/proc/cpuinfo flags" if os.path.exists("/proc/cpuinfo") else "unavailable (no /proc/cpuinfo)",
        "torch_cpu_capability": hw.torch_capability,
        "bf16": _precision(hw.native_bf16, "AVX512_BF16 or AMX_BF16"),
        "fp16": _precision(hw.native_fp16, "AVX512_FP16 or AMX_FP16"),
        "versions": {name: package_version(*dists) for name, dists in PACKAGES.items()},
        "backends": [{"name": b.name, "usable": b.usable, "reason": b.reason, "version": b.version}
                     for b in all_backends()],
        "cxx_compiler": compiler,
        "recommended_dtype": dtype,
        "recommended_reason": why,
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def format_text(info: dict[str, Any]) -> str:
    cpu = info["cpu"]
    isa = "  ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["isa"].items())
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in info["versions"].items())
    width = max(len(b["name"]) for b in info["backends"])
    lines = [
        "cpuboost environment (paste this into bug reports)",
        f"- cpuboost: {info['cpuboost']}   Python: {info['python']}   OS: {info['platform']}",
        f"- CPU: {cpu['model']}",
        f"- cores: {cpu['physical_cores']} physical, {cpu['logical_cpus']} logical; torch uses "
        f"{cpu['torch_threads']} threads ({cpu['torch_interop_threads']} inter-op)",
        f"- ISA (from {info['isa_source']}): {isa}",
        f"- torch CPU capability: {info['torch_cpu_capability']}",
        f"- bf16: {info['bf16']}",
        f"- fp16: {info['fp16']}",
        f"- versions: {versions}",
        f"- C++ compiler (Inductor): {info['cxx_compiler'] or 'none found'}",
        "- backends:",
    ]
    for b in info["backends"]:
        state = "usable" if b["usable"] else "unusable"
        version = f" [{b['version']}]" if b["version"] else ""
        lines.append(f"    {b['name']:<{width}}  {state:<8}  {b['reason']}{version}")
    lines.append(f"- recommended dtype: {info['recommended_dtype']} ({info['recommended_reason']})")
    env = ", ".join(f"{k}={v}" for k, v in info["environment"].items()) or "none of " + ", ".join(ENV_VARS[:3])
    lines.append(f"- environment: {env}")
    return "\n".join(lines)


def machine_summary() -> dict[str, Any]:
    """The few facts a benchmark result must carry to be read later."""
    hw = hardware.detect()
    return {"cpu": hw.cpu_model, "physical_cores": hw.physical_cores, "logical_cpus": hw.logical_cpus,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpuboost": __version__, "features": sorted(hw.features),
            "native_bf16": hw.native_bf16, "torch_cpu_capability": hw.torch_capability}
