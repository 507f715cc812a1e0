"""A mismatched, broken or noisy IPEX is reported and skipped, never crashed on (no IPEX install needed).

Each case puts a fake ``intel_extension_for_pytorch`` distribution (metadata + package) first on
PYTHONPATH of a fresh interpreter, so probe caches and sys.modules start clean.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

TORCH_MM = ".".join(torch.__version__.split("+")[0].split(".")[:2])
MISMATCHED = "2.8.0" if TORCH_MM != "2.8" else "2.7.0"

# What IPEX 2.8's __init__ does on a torch mismatch, plus its logging side effects.
IPEX_IMPORT_SIDE_EFFECTS = """
import logging, os, sys
logging.basicConfig(format="%(asctime)s - IPEX - %(message)s")
class _Logger(logging.Logger):
    pass
logging.setLoggerClass(_Logger)
os.write(2, b"[W OperatorEntry.cpp:218] Warning: Overriding a previously registered kernel\\n")
"""
IPEX_LIKE_FAILURE = IPEX_IMPORT_SIDE_EFFECTS + """
print("ERROR! Intel Extension for PyTorch needs to work with PyTorch 2.8.*, but PyTorch X is found.")
os.exit(127)
"""
NOISY_BUT_WORKING = IPEX_IMPORT_SIDE_EFFECTS + """
print("noise on stdout"); print("noise on stderr", file=sys.stderr)
logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found")
"""
NEVER_IMPORT = """
open(__file__ + ".imported", "w").close()
raise RuntimeError("a version mismatch must be caught before this import")
"""

PROBE = r"""
import json, logging, os, sys
import torch
user_handler = logging.StreamHandler(sys.stdout) if os.environ.get("USER_LOGGING") else None
if user_handler:
    logging.getLogger().addHandler(user_handler)
before = (list(logging.getLogger().handlers), logging.getLogger().level, logging.getLoggerClass())
import cpuboost
from cpuboost.core import registry
from cpuboost.errors import BackendUnavailableError

plan_first = cpuboost.optimize(torch.nn.Linear(2, 2), dtype="fp32")  # backend='auto', nothing called yet
planned_before_probe = [r.name for r in cpuboost.explain(plan_first).passes if r.status == "planned"]
imported_by_plan = "intel_extension_for_pytorch" in sys.modules

from cpuboost.machine import envinfo
backends = envinfo.collect()["backends"]
after = (list(logging.getLogger().handlers), logging.getLogger().level, logging.getLoggerClass())
try:
    cpuboost.optimize(torch.nn.Linear(2, 2), backend="ipex", dtype="fp32")
    explicit = None
except BackendUnavailableError as exc:
    explicit = str(exc)
auto = cpuboost.explain(cpuboost.optimize(torch.nn.Linear(2, 2), dtype="fp32"))
print(json.dumps({
    "ipex": next(b for b in backends if b["name"] == "ipex"),
    "logging_same": before == after,
    "explicit_error": explicit,
    "auto_skipped": auto.skipped.get("ipex"),
    "planned_before_probe": planned_before_probe,
    "imported_by_plan": imported_by_plan,
}))
"""

# Under backend='auto' a build that reaches IPEX (Inductor failed) records the import failure and runs eager.
FALLBACK_PROBE = r"""
import json, torch, cpuboost
from cpuboost.core import registry

def broken_inductor(model, args, kwargs, ctx):
    raise RuntimeError("Inductor unavailable in this test")

registry.list_passes()  # built-ins first, then replace Inductor with one that fails
registry.register_pass(broken_inductor, name="inductor", kind="graph", modes="infer", replace=True)
net = torch.nn.Linear(3, 2)
model = cpuboost.optimize(net, dtype="fp32")
x = torch.randn(4, 3)
same = torch.equal(model(x), net(x))
graph = cpuboost.explain(model).graphs[-1]
fates = [(r.name.rsplit(" ", 1)[0], r.fate) for r in graph.rungs if r.fate != "served"]
print(json.dumps({"same": same, "path": graph.path, "fallbacks": fates}))
"""

# Under backend='auto' a working Inductor graph is kept when the IPEX built beside it fails to import.
RACE_PROBE = r"""
import json, torch, cpuboost
net = torch.nn.Linear(3, 2).eval()
model = cpuboost.optimize(net, dtype="fp32")
x = torch.randn(4, 3)
close = torch.allclose(model(x), net(x), atol=1e-6)
graph = cpuboost.explain(model).graphs[-1]
fates = [(r.name.rsplit(" ", 1)[0], r.fate) for r in graph.rungs if r.fate != "served"]
inductor = next(r for r in graph.rungs if r.name == "inductor fp32")
print(json.dumps({"close": close, "path": graph.path, "fallbacks": fates, "inductor": [inductor.fate, inductor.error]}))
"""


def _fake_ipex(root, version: str, init: str):
    site = root / "site"
    info = site / f"intel_extension_for_pytorch-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: intel_extension_for_pytorch\nVersion: {version}\n")
    pkg = site / "intel_extension_for_pytorch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(init))
    return site


def _run(site, code: str = PROBE, **env_extra: str) -> tuple[dict, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), **env_extra}
    env = {k: v for k, v in env.items() if not k.startswith("CPUBOOST_")}
    env["CPUBOOST_CACHE_DIR"] = "off"  # every probe decides afresh and never writes the user's cache
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def _printed(proc: subprocess.CompletedProcess) -> str:
    """stdout apart from the probe's own JSON line."""
    return "\n".join(proc.stdout.strip().splitlines()[:-1])


def test_version_mismatch_is_reported_without_importing(tmp_path):
    """Metadata claiming IPEX 2.8 beside another torch: 'version mismatch' everywhere, the package never imported."""
    site = _fake_ipex(tmp_path, MISMATCHED, NEVER_IMPORT)
    out, proc = _run(site)
    assert not (site / "intel_extension_for_pytorch" / "__init__.py.imported").exists()
    reason = out["ipex"]["reason"]
    assert out["ipex"]["usable"] is False and out["ipex"]["version"] == MISMATCHED
    assert reason.startswith("version mismatch") and MISMATCHED in reason and torch.__version__ in reason
    assert reason in out["explicit_error"] and "backend='ipex'" in out["explicit_error"]
    assert out["auto_skipped"] == reason and "ipex" not in out["planned_before_probe"]
    assert out["logging_same"]


def test_import_that_raises_is_reported_quietly(tmp_path):
    """A matching version whose import prints, reconfigures logging and raises: reason kept, nothing leaks."""
    site = _fake_ipex(tmp_path, f"{TORCH_MM}.0", IPEX_LIKE_FAILURE)
    out, proc = _run(site)
    reason = out["ipex"]["reason"]
    assert out["ipex"]["usable"] is False
    assert reason.startswith("import failed: AttributeError") and "os" in reason and "exit" in reason
    assert "ERROR! Intel Extension" in reason  # what it printed is in the reason, not on stdout
    assert "ERROR!" not in _printed(proc) and "Overriding" not in proc.stderr
    assert out["logging_same"], "root handlers, level and logger class must be as before the import"
    assert reason in out["explicit_error"] and out["auto_skipped"] == reason
    # Before anything asked for the full probe, 'auto' planned IPEX without importing it (the import is slow).
    assert "ipex" in out["planned_before_probe"] and not out["imported_by_plan"]


def test_auto_build_reaching_a_broken_ipex_falls_back(tmp_path):
    """Under backend='auto', a build that reaches a broken IPEX records the import failure and runs eager."""
    site = _fake_ipex(tmp_path, f"{TORCH_MM}.0", IPEX_LIKE_FAILURE)
    out, proc = _run(site, FALLBACK_PROBE)
    assert out["same"] and out["path"] in ("eager+passes", "eager (original)", "openvino")
    failed = dict(out["fallbacks"])
    assert failed["inductor"].startswith("failed: RuntimeError: Inductor unavailable")
    assert "IpexUnavailableError" in failed["ipex"] and "import failed: AttributeError" in failed["ipex"]
    assert "ERROR!" not in _printed(proc)


@pytest.mark.slow
def test_auto_keeps_inductor_when_the_ipex_beside_it_is_broken(tmp_path):
    """backend='auto' builds IPEX beside Inductor; a broken IPEX is a recorded failure, Inductor still serves."""
    site = _fake_ipex(tmp_path, f"{TORCH_MM}.0", IPEX_LIKE_FAILURE)
    out, proc = _run(site, RACE_PROBE)
    assert out["close"]
    fate, error = out["inductor"]
    assert error.startswith("ok") and not fate.startswith(("failed", "rejected")), out  # it may lose the race
    failed = dict(out["fallbacks"])
    assert "import failed: AttributeError" in failed["ipex"] and "IpexUnavailableError" in failed["ipex"]
    assert "ERROR!" not in _printed(proc)


@pytest.mark.parametrize("init, kind", [
    ("import sys\nsys.exit('IPEX needs a CPU with AVX2')\n", "SystemExit"),
    ("from transformers_shim import missing_name\n", "ModuleNotFoundError"),
], ids=["sys-exit", "missing-module"])
def test_import_that_exits_or_lacks_a_module_is_caught(tmp_path, init, kind):
    """sys.exit() or a failing nested import inside IPEX's __init__ becomes a reason, not a dead process."""
    site = _fake_ipex(tmp_path, f"{TORCH_MM}.0", init)
    out, _ = _run(site)
    assert out["ipex"]["usable"] is False and out["ipex"]["reason"].startswith(f"import failed: {kind}")
    assert out["explicit_error"] and out["logging_same"]


def test_noisy_working_import_leaves_logging_and_output_alone(tmp_path):
    """An import that works but configures logging and prints: usable, and the user's logging is as it was."""
    site = _fake_ipex(tmp_path, f"{TORCH_MM}.0", NOISY_BUT_WORKING)
    for user_logging in ("", "1"):
        out, proc = _run(site, USER_LOGGING=user_logging)
        assert out["ipex"]["usable"] is True and out["ipex"]["version"] == f"{TORCH_MM}.0"
        assert out["logging_same"]
        assert "noise" not in _printed(proc) + proc.stderr and "Overriding" not in proc.stderr
        assert "No CUDA runtime" not in _printed(proc) + proc.stderr
        assert out["explicit_error"] is None


def test_cpuboost_env_names_the_mismatch(tmp_path):
    """`cpuboost env` (text) shows ipex as unusable with the mismatch reason and the installed version."""
    site = _fake_ipex(tmp_path, MISMATCHED, NEVER_IMPORT)
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-m", "cpuboost", "env"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.strip().startswith("ipex"))
    assert "unusable" in line and "version mismatch" in line and f"[{MISMATCHED}]" in line
