"""OpenVINO winners in the persistent cache: the served fp32/bf16 graph is kept as IR, a new process compiles it
without converting, a damaged or wrong IR is never served. ``Pointwise`` (forty elementwise ops on a large
tensor) is the model: OpenVINO fuses them into one pass over memory, so with ``backend="openvino"`` its rung
wins against eager by far and the path that serves is known. 256 rows (4 MiB, past the caches): OpenVINO 2.6x
eager there, 1.9x at 64 rows, where a loaded CI machine once timed it at 0.85x and kept no IR."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import cpuboost

pytest.importorskip("openvino")

from test_warm_start import Pointwise, other_weights_entry  # noqa: E402

CONVERTED = "OpenVINO convert"  # the note every conversion writes: its absence means no conversion ran
LOADED = "loaded from the persistent cache (OpenVINO IR, no conversion)"

CHILD = textwrap.dedent("""
    import json, sys, torch, cpuboost
    sys.path.insert(0, {tests!r})
    from test_warm_start import Pointwise
    net = Pointwise().eval()
    x = torch.randn(128, 4096, generator=torch.Generator().manual_seed(1))
    model = cpuboost.optimize(net, dtype="fp32", backend="openvino", cache_dir={cache!r})
    out = model(x)
    with torch.no_grad():
        error = ((out - net(x)).abs().max() / net(x).abs().max()).item()
    report = cpuboost.explain(model)
    print(json.dumps({{"error": error, "events": report.events, "path": report.graphs[-1].path,
                       "notes": next(p.detail for p in report.passes if p.name == "openvino")}}))
""")


def _child(cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPUBOOST_")}
    code = CHILD.format(cache=str(cache), tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _units(cache, dtype="fp32"):
    return list((cache / "v1" / "artifacts").glob(f"*/openvino_{dtype}"))


def _optimize(cache, dtype="fp32", **options):
    return cpuboost.optimize(Pointwise().eval(), dtype=dtype, backend="openvino", cache_dir=str(cache), **options)


def _notes(model):
    return next(p.detail for p in cpuboost.explain(model).passes if p.name == "openvino")


@pytest.mark.slow
def test_a_new_process_compiles_the_kept_ir_without_converting(tmp_path):
    """The first process converts, serves OpenVINO and keeps its IR (record, digests) in the entry; a second
    process takes the decision and the IR (no conversion) and answers as eager does."""
    first = _child(tmp_path)
    assert first["path"] == "openvino" and CONVERTED in first["notes"], first
    assert "kept in the persistent cache as OpenVINO IR" in first["notes"], first["notes"]
    [unit] = _units(tmp_path)
    assert sorted(p.name for p in unit.iterdir()) == ["graph.bin", "graph.json", "graph.xml"]
    assert set(json.loads((unit / "graph.json").read_text())["files"]) == {"graph.bin", "graph.xml"}
    second = _child(tmp_path)
    assert any("decision from the persistent cache (openvino fp32)" in e for e in second["events"]), second
    assert second["path"] == "openvino" and LOADED in second["notes"], second["notes"]
    assert CONVERTED not in second["notes"], second["notes"]
    assert second["error"] <= 1e-4, second["error"]
    assert list((tmp_path / "v1" / "openvino").glob("*.blob")), "OpenVINO's CACHE_DIR holds no compiled blob"


def test_a_damaged_ir_is_refused_and_converted_again(tmp_path):
    """A .bin changed after it was written (same size: only the SHA-256 tells) is refused, converted again and
    published anew; the answer is the reconverted graph's, equal to eager's."""
    x = torch.randn(256, 4096)
    first = _optimize(tmp_path)
    first(x)
    units = _units(tmp_path)
    assert len(units) == 1, str(cpuboost.explain(first))  # OpenVINO served and kept its IR (else: why not)
    unit = units[0]
    weights = bytearray((unit / "graph.bin").read_bytes())
    weights[0] ^= 0xFF
    (unit / "graph.bin").write_bytes(bytes(weights))
    again = _optimize(tmp_path)
    out = again(x)
    notes = _notes(again)
    assert "cached OpenVINO IR unusable (PackageFormatError" in notes and "SHA-256" in notes, notes
    assert CONVERTED in notes and "kept in the persistent cache as OpenVINO IR" in notes, notes
    assert cpuboost.explain(again).graphs[-1].path == "openvino"
    with torch.no_grad():
        torch.testing.assert_close(out, Pointwise().eval()(x), rtol=1e-4, atol=1e-5)
    third = _optimize(tmp_path)
    third(x)
    assert LOADED in _notes(third), _notes(third)  # the republished unit checks out


def test_an_ir_answering_wrong_is_removed(tmp_path):
    """A whole, well-formed IR unit of another model's weights under this key loads, fails verification
    against eager, and is removed; eager answers."""
    x = torch.randn(256, 4096)
    _optimize(tmp_path)(x)
    other, model, folder = other_weights_entry(tmp_path, x, "openvino")
    planted = folder / "openvino_fp32"
    shutil.copytree(_units(tmp_path)[0], planted)
    out = model(x)
    with torch.no_grad():
        torch.testing.assert_close(out, other(x), rtol=1e-4, atol=1e-5)
    rung = next(r for r in cpuboost.explain(model).graphs[-1].rungs if r.name == "openvino fp32")
    assert rung.fate.startswith("rejected"), rung.fate  # only the planted graph answers wrong: it was loaded
    assert not planted.exists()


def test_a_rung_that_does_not_serve_writes_no_ir(tmp_path):
    """tolerance=1e-12 refuses the OpenVINO graph (fp32 rounding differs from eager's): eager serves, and no
    IR, staging folder or blob is left in the cache."""
    x = torch.randn(256, 4096)
    model = _optimize(tmp_path, tolerance=1e-12)
    model(x)
    report = cpuboost.explain(model)
    assert report.graphs[-1].path == "eager (original)", str(report)
    assert [r.fate.split(":")[0] for r in report.graphs[-1].rungs] == ["rejected"]  # built, then refused
    artifacts = [p for p in (tmp_path / "v1" / "artifacts").rglob("*") if p.is_file()]
    assert artifacts == [] and not list((tmp_path / "v1").glob("openvino/*")), artifacts


def test_a_dynamic_graph_is_kept_with_its_dims(tmp_path):
    """dynamic_dims graphs persist too (IR keeps -1 dims); the restarted graph serves another size. 256 rows:
    at 64 a dynamic OpenVINO graph's per-call shape work can lose the race to eager on a CPU with large caches
    (CI saw no IR written), and only a served graph is kept."""
    x = torch.randn(256, 4096)
    first = _optimize(tmp_path, dynamic_dims={0: [0]})
    first(x)
    assert cpuboost.explain(first).graphs[-1].path == "openvino", str(cpuboost.explain(first))
    [unit] = _units(tmp_path)
    assert json.loads((unit / "graph.json").read_text())["dynamic_dims"] == {"0": [0]}
    again = _optimize(tmp_path, dynamic_dims={0: [0]})
    again(x)
    assert LOADED in _notes(again) and CONVERTED not in _notes(again), _notes(again)
    assert "compiled blob written to" in _notes(again), _notes(again)
    y = torch.randn(192, 4096)
    out = again(y)
    record = cpuboost.explain(again).graphs[-1]
    assert record.path == "openvino" and "dynamic graph" in record.rungs[0].fate, record.rungs
    with torch.no_grad():
        torch.testing.assert_close(out, Pointwise().eval()(y), rtol=1e-4, atol=1e-5)
    third = _optimize(tmp_path, dynamic_dims={0: [0]})
    third(x)
    assert "compiled blob reused from" in _notes(third), _notes(third)  # OpenVINO's CACHE_DIR hit


def test_openvino_blobs_count_toward_the_bound_and_are_trimmed(tmp_path):
    """OpenVINO's CACHE_DIR is the store's ``openvino`` folder (found from an artifact folder): its blobs count
    in the store's size and go when ``trim`` needs room and no build runs; outside a store there is none."""
    from cpuboost.backends.openvino_ir import blob_dir
    from cpuboost.persist.store import DecisionStore

    store = DecisionStore(tmp_path)
    key = {"model": "m", "signature": "s"}
    folder = store.artifact_dir(key)
    blobs = blob_dir(folder)
    assert blobs == tmp_path / "v1" / "openvino" and blob_dir(tmp_path / "elsewhere" / "x") is None
    (blobs / "123.blob").write_bytes(b"\0" * 30_000)
    assert store.info()["bytes"] >= 30_000
    assert store.trim(1000) >= 30_000 and not (blobs / "123.blob").exists()


def test_the_fp32_escape_of_a_bf16_plan_keeps_its_openvino_ir_in_its_own_folder(tmp_path):
    """A bf16 plan's fp32 OpenVINO rung gets a folder of its own (it writes only once it serves), so a warm
    start loads that winner too; Inductor's fp32 rung gets none (its package compiles while it builds); the
    IR kept there is loaded without converting, and its blobs go to the store's one OpenVINO folder."""
    from cpuboost.backends import openvino_ir
    from cpuboost.core import ladder
    from cpuboost.persist.store import DecisionStore

    store = DecisionStore(tmp_path)
    folder = store.artifact_dir({"model": "m", "signature": "s"})
    escape = ladder.artifact_dir(folder, torch.float32, torch.bfloat16, "openvino")
    assert escape == folder / "fp32"
    assert ladder.artifact_dir(folder, torch.float32, torch.bfloat16, "inductor") is None
    assert ladder.artifact_dir(folder, torch.bfloat16, torch.bfloat16, "inductor") == folder
    assert ladder.artifact_dir(folder, torch.bfloat16, torch.int8, "inductor") == folder / "bf16"
    assert openvino_ir.blob_dir(escape) == tmp_path / "v1" / "openvino"

    net, x, notes = Pointwise().eval(), torch.randn(8, 256), []
    first = openvino_ir.build(net, (x,), {}, torch.float32, notes.append, None, escape)
    out = first(x)
    first.keep_cached()
    assert (escape / "openvino_fp32" / "graph.xml").exists(), notes
    notes.clear()
    second = openvino_ir.build(net, (x,), {}, torch.float32, notes.append, None, escape)
    assert any(n.startswith(LOADED) for n in notes) and not any(CONVERTED in n for n in notes), notes
    torch.testing.assert_close(second(x), out, rtol=1e-5, atol=1e-5)
