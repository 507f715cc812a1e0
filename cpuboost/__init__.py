"""cpuboost: make PyTorch models fast on CPUs with one decorator and one context manager.

``import cpuboost`` is light: no IPEX, OpenVINO or Inductor import, no thread or environment changes.
"""
from .amp import cpu_amp
from .api import cpu_optimized, explain, optimize, unwrap
from .errors import CpuBoostError
from .registry import list_passes, register_pass

__all__ = sorted(
    ["CpuBoostError", "cpu_amp", "cpu_optimized", "explain", "list_passes", "optimize", "register_pass", "unwrap"]
)
__version__ = "0.1.0"
