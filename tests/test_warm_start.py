"""Warm start through the public API: a second process reuses the decision and the compiled graph;
cpuboost.save/load round-trip; a foreign or damaged cache entry is ignored, never a crash. Each test asserts
which path served: the models are chosen so that it is known (Inductor wins by far, or nothing competes)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import cpuboost
from cpuboost.persist.errors import PackagedPathWarning
from cpuboost.persist.store import CacheWarning

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent("""
    import json, sys, time, torch, cpuboost
    sys.path.insert(0, {tests!r})
    from test_warm_start import Pointwise
    net = Pointwise().eval()
    x = torch.randn(128, 4096, generator=torch.Generator().manual_seed(1))
    model = cpuboost.optimize(net, dtype="fp32", backend="native", cache_dir={cache!r})
    begin = time.perf_counter()
    out = model(x)
    seconds = time.perf_counter() - begin
    report = cpuboost.explain(model)
    rung = next(r for r in report.graphs[-1].rungs if r.name == "inductor fp32")
    print(json.dumps({{"seconds": seconds, "out": out.flatten().tolist(), "events": report.events,
                       "inductor": rung.fate, "notes": next(p.detail for p in report.passes if p.name == "inductor"),
                       "path": report.graphs[-1].path}}))
""")


def _child(cache, tests):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPUBOOST_")}
    proc = subprocess.run([sys.executable, "-c", CHILD.format(cache=str(cache), tests=tests)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_reuses_decision_and_graph(tmp_path):
    """The second process finds the first one's decision (no race) and its AOTInductor graph (no compile),
    verifies it once and gives the same answer."""
    tests = os.path.dirname(__file__)
    first = _child(tmp_path, tests)
    second = _child(tmp_path, tests)
    assert any("decision from the persistent cache" in e for e in second["events"]), second
    assert first["path"] == second["path"] == "inductor", (first["path"], second["path"])
    torch.testing.assert_close(torch.tensor(second["out"]), torch.tensor(first["out"]), rtol=1e-5, atol=1e-6)
    assert "kept in the persistent cache" in first["notes"], first["notes"]
    assert "loaded from the persistent cache" in second["notes"], second["notes"]
    assert second["seconds"] < first["seconds"]


def test_corrupt_cache_entries_are_rebuilt_with_a_warning(tmp_path):
    """Truncated decision files are ignored with a warning and rebuilt; the answer is eager's."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 8)
    cpuboost.optimize(net, dtype="fp32", fusion=False, cache_dir=str(tmp_path))(x)
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".json")]
    assert files
    for path in files:
        with open(path, "r+b") as fh:
            fh.truncate(max(os.path.getsize(path) // 2, 1))
    with pytest.warns(CacheWarning, match="corrupt entry") as caught:
        again = cpuboost.optimize(net, dtype="fp32", fusion=False, cache_dir=str(tmp_path))
        out = again(x)
    assert all(issubclass(w.category, CacheWarning) for w in caught), [str(w.message) for w in caught]
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-5)
    assert cpuboost.explain(again).graphs[-1].path == "eager (original)"  # nothing competes with fusion=False


def test_eager_decided_by_an_earlier_process_builds_nothing(tmp_path):
    """Nothing beat eager in the first process (fusion=False leaves eager+passes bf16, which a tolerance of
    1e-6 rejects); the second takes that decision from the cache and builds no rung at all."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 8)
    options = {"dtype": "bf16", "fusion": False, "tolerance": 1e-6, "cache_dir": str(tmp_path)}
    first = cpuboost.optimize(net, **options)
    first(x)
    assert cpuboost.explain(first).graphs[-1].path == "eager (original)", str(cpuboost.explain(first))
    assert [r.fate.split(":")[0] for r in cpuboost.explain(first).graphs[-1].rungs] == ["rejected"]
    again = cpuboost.optimize(net, **options)
    out = again(x)
    report = cpuboost.explain(again)
    assert any("decision from the persistent cache (eager)" in e for e in report.events), report.events
    assert report.graphs[-1].path == "eager (original)" and report.graphs[-1].rungs == []
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=0, atol=0)


def test_save_and_load_round_trip(tmp_path):
    """cpuboost.save() packages the built signatures; cpuboost.load() answers without compiling."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 14 * 14, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    model = cpuboost.optimize(net, dtype="fp32", fusion=False)
    model(x)
    # eager serves, as it is or with channels_last (the two race within noise on this small conv net)
    assert cpuboost.explain(model).graphs[-1].path in ("eager (original)", "eager+passes"), str(cpuboost.explain(model))
    with pytest.warns(PackagedPathWarning, match=r"served by eager.*Inductor fp32 graph"):
        path = cpuboost.save(model, tmp_path / "pkg")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["graphs"] and "needs" in json.dumps(manifest)
    loaded = cpuboost.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-5)


class Pointwise(torch.nn.Module):
    """Forty elementwise ops on a large tensor: eager walks memory forty times, Inductor once, so the Inductor
    rung wins its race by far on any CPU (no transcendental: Inductor's tanh is slower than eager's on an AMX
    Xeon). Counts its eager calls (copies share the class)."""

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.001))

    def forward(self, x):
        type(self).calls += 1
        for _ in range(10):
            x = torch.clamp(x * self.scale + 0.01, -3.0, 3.0) * 1.5
        return x


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_warm_start_calls_eager_once(tmp_path, dtype):
    """A decision from the persistent cache is verified against the one eager call that makes the reference
    (its time is the race, eager autocast's error is stored with the decision): no more eager calls."""
    x = torch.randn(256, 4096)
    first = cpuboost.optimize(Pointwise().eval(), dtype=dtype, backend="native", cache_dir=str(tmp_path))
    expected = first(x)
    record = cpuboost.explain(first).graphs[-1]
    assert record.path == "inductor", str(cpuboost.explain(first))
    Pointwise.calls = 0
    again = cpuboost.optimize(Pointwise().eval(), dtype=dtype, backend="native", cache_dir=str(tmp_path))
    torch.testing.assert_close(again(x), expected, rtol=0, atol=0)
    assert Pointwise.calls == 1, Pointwise.calls
    report = cpuboost.explain(again)
    assert any("decision from the persistent cache" in e for e in report.events), report.events
    assert report.graphs[-1].path == "inductor" and report.graphs[-1].verification.startswith("ok")


def other_weights_entry(cache, x, backend):
    """A Pointwise with other weights (another artifact key, the same decision key), optimized on ``cache``,
    and its entry's artifact folder for ``x``: where a test plants a unit that answers wrong."""
    other = Pointwise().eval()
    with torch.no_grad():
        other.scale.fill_(1.5)
    model = cpuboost.optimize(other, dtype="fp32", backend=backend, cache_dir=str(cache))
    from cpuboost.persist.warm import WarmStart

    found = WarmStart(model._options, model._plan.names).lookup(other, (x,), {})
    found.release()
    return other, model, found.artifact_dir


def test_cached_graph_failing_verification_is_removed(tmp_path):
    """A cached graph that loads but answers wrong (here: another model's graph under this key) is rejected,
    removed from the cache, and the answer is eager's; the next warm start does not load it again."""
    x = torch.randn(256, 4096)
    first = cpuboost.optimize(Pointwise().eval(), dtype="fp32", backend="native", cache_dir=str(tmp_path))
    first(x)
    assert cpuboost.explain(first).graphs[-1].path == "inductor", str(cpuboost.explain(first))
    other, model, folder = other_weights_entry(tmp_path, x, "native")
    unit = folder / "graph"
    source = next(p for p in (tmp_path / "v1" / "artifacts").glob("*/graph") if p != unit)
    shutil.copytree(source, unit)  # a whole, well-formed unit with matching digests: only its answers are wrong
    out = model(x)
    with torch.no_grad():
        torch.testing.assert_close(out, other(x), rtol=1e-4, atol=1e-5)
    report = cpuboost.explain(model)
    rung = next(r for r in report.graphs[-1].rungs if r.name == "inductor fp32")
    assert rung.fate.startswith("rejected"), rung.fate  # only the planted graph answers wrong
    assert not unit.exists()  # removed: not loaded and paid for again
