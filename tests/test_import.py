"""Importing cpuboost is light and has no global side effects."""
import json
import os
import subprocess
import sys

PROBE = r"""
import json, os, sys, torch
threads = torch.get_num_threads()
env = dict(os.environ)
import cpuboost
from cpuboost import cpu_optimized, cpu_amp
@cpu_optimized(dtype="bf16")
def make():
    return torch.nn.Linear(2, 2)
heavy = [m for m in ("intel_extension_for_pytorch", "openvino", "torch._inductor", "torch._dynamo", "transformers")
         if m in sys.modules]
print(json.dumps({"heavy": heavy, "threads_same": threads == torch.get_num_threads(),
                  "env_same": env == dict(os.environ), "all": cpuboost.__all__}))
"""


def _probe():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_import_and_decoration_import_nothing_heavy():
    """import + decoration pull in no IPEX, OpenVINO, Inductor, Dynamo or transformers."""
    result, _ = _probe()
    assert result["heavy"] == []


def test_import_changes_no_threads_or_environment_and_prints_nothing():
    """Thread count and os.environ are the same after import; nothing is printed to stderr."""
    result, stderr = _probe()
    assert result["threads_same"] and result["env_same"]
    assert "cpuboost" not in stderr


def test_public_api_is_sorted_and_complete():
    """__all__ holds exactly the documented names, sorted."""
    import cpuboost

    expected = ["CpuBoostError", "cpu_amp", "cpu_optimized", "explain", "list_passes", "load", "optimize",
                "register_pass", "save", "unwrap"]
    assert cpuboost.__all__ == sorted(expected)
    assert all(hasattr(cpuboost, name) for name in expected)
    assert os.environ.get("CPUBOOST_DISABLE") is None
