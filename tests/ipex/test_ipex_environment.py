"""Real IPEX seen from outside: a quiet import that leaves logging alone, `cpuboost env`, bench paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from cpuboost import bench
from cpuboost.cli import main
from cpuboost.bench.workloads import Workload
from ipex_cases import conv_net, needs_ipex
from oracle import rung, verified

pytestmark = needs_ipex

IMPORT_PROBE = r"""
import json, logging, sys
import torch
before = (list(logging.getLogger().handlers), logging.getLogger().level, logging.getLoggerClass())
import cpuboost
model = cpuboost.optimize(torch.nn.Linear(2, 2), dtype="fp32")  # 'auto' plans IPEX but does not import it
planned = [r.name for r in cpuboost.explain(model).passes if r.status == "planned"]
imported_by_plan = "intel_extension_for_pytorch" in sys.modules
from cpuboost.backends.ipex import availability
verdict = availability()
after = (list(logging.getLogger().handlers), logging.getLogger().level, logging.getLoggerClass())
print(json.dumps({"usable": verdict.usable, "reason": verdict.reason, "version": verdict.version,
                  "imported": "intel_extension_for_pytorch" in sys.modules, "imported_by_plan": imported_by_plan,
                  "planned": planned, "logging_same": before == after,
                  "new_logger_class": type(logging.getLogger("created.after.import")).__name__}))
"""


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPUBOOST_")}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_import_through_cpuboost_is_quiet_and_restores_logging():
    """IPEX imports (2.8, usable) with nothing on stdout/stderr and the root logger and logger class as before."""
    proc = _run(["-c", IMPORT_PROBE])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["usable"] and out["imported"] and out["version"].startswith("2.8"), out["reason"]
    assert out["logging_same"] and out["new_logger_class"] == "Logger"
    assert "ipex" in out["planned"] and not out["imported_by_plan"]
    assert proc.stdout.strip().count("\n") == 0  # only the probe's JSON line
    for noise in ("Overriding a previously registered kernel", "No CUDA runtime", "IPEX"):
        assert noise not in proc.stderr, proc.stderr[-2000:]


def test_cpuboost_env_shows_ipex_usable(capsys):
    """`cpuboost env` lists ipex as usable with its version and says what it runs (JSON and text)."""
    assert main(["env", "--json"]) == 0
    ipex = next(b for b in json.loads(capsys.readouterr().out)["backends"] if b["name"] == "ipex")
    assert ipex["usable"] and ipex["version"].startswith("2.8") and "ipex.optimize" in ipex["reason"]
    assert main(["env"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("ipex"))
    assert " usable " in line and f"[{ipex['version']}]" in line


def test_bench_lists_and_times_the_ipex_paths():
    """The four IPEX bench paths are registered here and run side by side with eager, verified against it."""
    names = ["ipex_imperative_fp32", "ipex_jit_fp32", "ipex_imperative_bf16", "ipex_jit_bf16"]
    assert set(names) <= set(bench.list_paths())
    peers = [p.name for p in bench.resolve_paths("peers")]
    assert set(names) <= set(peers)
    net = conv_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    wl = Workload("convnet", net, (torch.randn(2, 3, 12, 12),), batch=2)
    result = bench.run(wl, ["eager_fp32", *names], rounds=2, round_seconds=0.02, warmup=1, measure_peak=False)
    by_name = {p.name: p for p in result.paths}
    for name in names:
        p = by_name[name]
        assert p.timed and p.max_rel_err <= p.tolerance, (name, p.status, p.reason)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_native_inductor_path_runs_on_ipex_torch():
    """cpuboost's own Inductor path builds and verifies on the torch IPEX pins (2.8), beside IPEX."""
    import cpuboost

    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    model = cpuboost.optimize(net, dtype="fp32", backend="native")  # under 'auto' the faster of the two serves
    x = torch.randn(3, 8)
    out = model(x)
    assert verified(rung(model, "inductor fp32")), str(cpuboost.explain(model))  # the race picks what serves
    assert torch.allclose(out, net(x), rtol=1e-4, atol=1e-5)
