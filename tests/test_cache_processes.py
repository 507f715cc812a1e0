"""Several processes on one cache: two warming it at once compile once, a third loads without compiling; a
process SIGKILLed at any stage of a build leaves a cache the next one uses or ignores, answering right.

Each child is a fresh interpreter building a small pointwise model whose Inductor graph wins by far, so the
path that serves is known (asserted, never skipped). About a minute in all on 2 busy cores.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent("""
    import hashlib, json, sys, torch, cpuboost

    class Pointwise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1.001))

        def forward(self, x):
            for _ in range(10):
                x = torch.clamp(x * self.scale + 0.01, -3.0, 3.0) * 1.5
            return x

    x = torch.randn(512, 4096, generator=torch.Generator().manual_seed(1))  # calls of tens of ms: the
    net = Pointwise().eval()  # window between publishing the graph and writing the decision is wide enough to hit
    model = cpuboost.optimize(net, dtype="fp32", backend="native", cache_dir=sys.argv[1])
    out = model(x)
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-5)  # right, whatever the cache held
    report = cpuboost.explain(model)
    notes = next(p.detail for p in report.passes if p.name == "inductor")
    print(json.dumps({"path": report.graphs[-1].path, "events": report.events, "notes": notes,
                      "digest": hashlib.sha256(out.numpy().tobytes()).hexdigest(),
                      "compiler_imported": "torch._inductor.compile_fx" in sys.modules}))
""")

COMPILED = "AOTInductor package (export + freezing), kept in the persistent cache"
LOADED = "loaded from the persistent cache (AOTInductor package, no compile)"


def _start(cache: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CPUBOOST_", "TORCHINDUCTOR_"))}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(cache)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_two_processes_warming_one_cache_compile_once_and_a_third_loads(tmp_path):
    cache = tmp_path / "cache"
    first, second = _start(cache), _start(cache)
    results = [_result(first), _result(second)]
    assert all(r["path"] == "inductor" for r in results), results
    compiled = [r for r in results if COMPILED in r["notes"]]
    waited = [r for r in results if LOADED in r["notes"]]
    assert len(compiled) == 1 and len(waited) == 1, [r["notes"] for r in results]
    assert any("decision from the persistent cache" in e for e in waited[0]["events"]), waited[0]["events"]
    third = _result(_start(cache))
    assert LOADED in third["notes"] and COMPILED not in third["notes"], third["notes"]
    assert third["compiler_imported"] is False  # nothing was compiled: Inductor's compiler was never imported
    assert third["digest"] == compiled[0]["digest"] == waited[0]["digest"]  # one graph, the same bits


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + 600
    while not ready():
        assert proc.poll() is None, f"the child finished before {what}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no {what} within 600 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_at_any_stage_of_a_build_leaves_a_usable_cache(tmp_path):
    """Killed while staging its graph, then killed after publishing it but before writing the decision: the
    next process sweeps the dead staging, loads the published graph, verifies it and answers right."""
    cache = tmp_path / "cache"
    artifacts, decisions = cache / "v1" / "artifacts", cache / "v1" / "decisions"
    staging = lambda: any(artifacts.glob("*/.graph.staging-*/*"))  # noqa: E731
    _kill_when(_start(cache), staging, "a staging folder")
    assert staging()
    published = lambda: any(artifacts.glob("*/graph/graph.json")) and not any(decisions.glob("*/*.json"))  # noqa: E731
    _kill_when(_start(cache), published, "a published graph without a decision")
    assert not any(artifacts.glob("*/.graph.staging-*"))  # the second process swept the first one's staging
    last = _result(_start(cache))
    assert last["path"] == "inductor" and LOADED in last["notes"], last["notes"]
    assert not any(p.name.startswith(".") for p in cache.rglob("*") if "inductor" not in p.parts)
    assert any(decisions.glob("*/*.json"))  # its decision is written: the next process races nothing
