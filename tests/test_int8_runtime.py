"""int8 through the runtime: raced and reported by optimize(), measured on the calibration batches, kept in
the persistent cache (AOTInductor) and loaded back without calibrating, bad requests refused early.

Compiled builds are few and small: one MLP through optimize() (int8 wins there by a wide margin, against the bf16
graphs built beside it), one tiny conv net built twice through the backend's cache, one
failed-bound build; everything else runs no compiler.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

import cpuboost
from cpuboost.backends import int8
from cpuboost.persist import warm as persist
from cpuboost.errors import CalibrationError, QuantizationError
from cpuboost.options import Options
from oracle import rung, verified
from test_int8_backend import MAX_ERR, MIN_COSINE, assert_unchanged, conv_net, snapshot


@pytest.fixture(autouse=True)
def _two_threads(two_threads):
    """Two torch threads, restored afterwards (the shared conftest fixture)."""


class Residual(nn.Module):
    """``linear(x) + x``: the pattern whose int8 ``sum`` post-op writes into its residual input."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.inner, self.outer = nn.Linear(width, width), nn.Linear(width, 8)

    def forward(self, x):
        return self.outer(torch.relu(self.inner(x) + x))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 512), nn.ReLU(), nn.Linear(512, 16)).eval()


def own_accuracy(reference, output) -> dict:
    got = int8.accuracy(reference, output)
    assert got["max_err"] <= MAX_ERR and got["cosine"] >= MIN_COSINE, got
    return got


# ------------------------------------------------------------------ compiled (slow)


@pytest.mark.slow
def test_optimize_int8_serves_verified_reports_calibration_accuracy_and_warm_starts(tmp_path):
    """dtype='int8' with calibration: the int8 rung is built, judged on the call and on every calibration batch
    (explain() says so, with top-1 agreement), serves, and a second optimize() of the same weights and data
    loads the cached graph instead of calibrating and compiling again."""
    net = mlp()
    before = snapshot(net)
    x = torch.randn(64, 512)
    calibration = [(torch.randn(64, 512),) for _ in range(3)]
    model = cpuboost.optimize(net, dtype="int8", calibration=calibration, cache_dir=str(tmp_path), tune_budget=0,
                              backend="native")  # the Inductor int8 rung (the one persisted) first
    out = model(x)

    assert_unchanged(net, before)
    with torch.no_grad():
        own_accuracy(net(x), out)
    record = rung(model, "int8 int8")
    assert verified(record), record.line()
    assert "on the example input and 3 calibration batch(es)" in record.accuracy, record.line()
    assert "top-1 agreement" in record.accuracy and "max_err" in record.accuracy
    assert "calibration batch" in str(cpuboost.explain(model))
    report = cpuboost.explain(model)
    assert report.graphs[-1].path == "int8", str(report)  # 3-4x eager fp32 here
    bf16 = rung(model, "inductor bf16")  # int8 serves only when it beats the float graphs: built past the budget
    assert not bf16.fate.startswith("not tried"), bf16.line()
    graphs = list(tmp_path.rglob("int8.pt2"))
    assert len(graphs) == 1
    meta = json.loads(graphs[0].with_suffix(".json").read_text())
    assert meta["int8_scheme"] == "static" and meta["int8_accuracy"]["inputs"] == 4 and meta["dtype"] == "int8"

    again = cpuboost.optimize(mlp(), dtype="int8", calibration=calibration, cache_dir=str(tmp_path), tune_budget=0,
                              backend="native")
    torch.testing.assert_close(again(x), out, rtol=0, atol=0)
    detail = next(p.detail for p in cpuboost.explain(again).passes if p.name == "int8")
    assert "loaded from the persistent cache" in detail and "int8 quantize" not in detail, detail
    assert "at build" in rung(again, "int8 int8").accuracy

    package = cpuboost.save(model, tmp_path / "pkg")  # the int8 graph itself, not an fp32 recompile
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["dtype"] == "int8"
    torch.testing.assert_close(cpuboost.load(package)(x), out, rtol=0, atol=0)


@pytest.mark.slow
def test_cached_int8_graph_is_loaded_without_quantizing_and_never_writes_into_inputs(tmp_path):
    """The backend's persistent path: AOTInductor graph in the folder, loaded on the second build with its
    build-time accuracy; the caller's input survives the in-place int8 sum; an entry without recorded accuracy
    (an interrupted build) is rebuilt."""
    net = Residual().eval()
    x = torch.randn(16, 64)
    calibration = [(torch.randn(16, 64),) for _ in range(2)]
    notes: list[str] = []
    first = int8.build(net, (x,), {}, calibration, notes.append, artifact_dir=tmp_path)
    kept = x.clone()
    out = first(x)
    assert torch.equal(x, kept)
    with torch.no_grad():
        own_accuracy(net(x), out)
    assert any("AOTInductor" in n for n in notes), notes
    assert "2 calibration batch(es)" in first.accuracy_summary

    notes.clear()
    second = int8.build(net, (x,), {}, calibration, notes.append, artifact_dir=tmp_path)
    assert any("loaded from the persistent cache" in n for n in notes) and not any("quantize" in n for n in notes)
    torch.testing.assert_close(second(x), out, rtol=0, atol=0)
    assert torch.equal(x, kept)
    assert "at build" in second.accuracy_summary

    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == ["int8.json", "int8.pt2"]  # one unit
    assert [p.name for p in tmp_path.iterdir()] == ["int8"]  # no staging left
    sidecar = tmp_path / "int8" / "int8.json"
    meta = json.loads(sidecar.read_text())
    del meta["int8_accuracy"]
    sidecar.write_text(json.dumps(meta))
    notes.clear()
    int8.build(net, (x,), {}, calibration, notes.append, artifact_dir=tmp_path)
    assert any("no recorded accuracy" in n for n in notes) and any("int8 quantize" in n for n in notes), notes


@pytest.mark.slow
def test_int8_outside_the_demanded_tolerance_is_refused_and_not_kept(tmp_path):
    """tolerance= tighter than int8 can do: a QuantizationError naming the numbers, no graph left in the cache."""
    net = Residual().eval()
    x = torch.randn(8, 64)
    with pytest.raises(QuantizationError, match=r"outside int8's bound .*max_err .* > 1e-07"):
        int8.build(net, (x,), {}, [(torch.randn(8, 64),)], artifact_dir=tmp_path, tolerance=1e-7)
    assert not list(tmp_path.rglob("int8.pt2"))


@pytest.mark.slow
def test_openvino_int8_rung_is_static_judged_on_calibration_and_leaves_the_model_alone():
    """OpenVINO's int8 (PT2E with FakeQuantize weights): close to fp32 on the example and every batch, eager's
    output structure, the caller's model and input untouched; without calibration it declines."""
    pytest.importorskip("openvino")
    from cpuboost.backends.int8 import via_openvino

    net = conv_net()
    before = snapshot(net)
    x = torch.randn(2, 3, 16, 16)
    kept = x.clone()
    notes: list[str] = []
    run = via_openvino.build(net, (x,), {}, [(torch.randn(2, 3, 16, 16),) for _ in range(2)], notes.append)
    out = run(x)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and torch.equal(x, kept)
    with torch.no_grad():
        own_accuracy(net(x), out)
    assert_unchanged(net, before)
    assert "2 calibration batch(es)" in run.accuracy_summary and "OpenVINO" in run.accuracy_summary
    with pytest.raises(NotImplementedError, match="static only"):
        via_openvino.build(net, (x,), {}, None, notes.append)


@pytest.mark.slow
def test_openvino_int8_graph_is_kept_as_ir_and_loaded_without_quantizing(tmp_path):
    """With a cache folder the OpenVINO int8 graph is kept as IR plus its accuracy; a second build loads it (no
    calibration, no conversion) and answers the same; an entry whose sidecar is missing is built again."""
    pytest.importorskip("openvino")
    from cpuboost.backends.int8 import via_openvino

    net = conv_net()
    x = torch.randn(2, 3, 16, 16)
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(2)]
    notes: list[str] = []
    first = via_openvino.build(net, (x,), {}, calibration, notes.append, artifact_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["openvino_int8"]  # one unit, no staging left
    assert sorted(p.name for p in (tmp_path / "openvino_int8").iterdir()) == [
        "openvino_int8.bin", "openvino_int8.json", "openvino_int8.xml"]
    record = json.loads((tmp_path / "openvino_int8" / "openvino_int8.json").read_text())
    assert sorted(record["files"]) == ["openvino_int8.bin", "openvino_int8.xml"]  # digests of both halves
    notes.clear()
    second = via_openvino.build(net, (x,), {}, calibration, notes.append, artifact_dir=tmp_path)
    assert any("loaded from the persistent cache" in n for n in notes) and not any("quantize" in n for n in notes)
    torch.testing.assert_close(second(x), first(x), rtol=1e-5, atol=1e-5)
    assert "at build" in second.accuracy_summary
    (tmp_path / "openvino_int8" / "openvino_int8.json").unlink()
    notes.clear()
    via_openvino.build(net, (x,), {}, calibration, notes.append, artifact_dir=tmp_path)
    assert any("quantize" in n for n in notes), notes


@pytest.mark.slow
def test_openvino_int8_warm_load_compiles_through_the_stores_blob_folder(tmp_path):
    """Inside a store's artifacts folder the warm load hands OpenVINO the store's CACHE_DIR (as the fp32/bf16
    IR does): the compiled blob is written there, and the report says where it came from."""
    pytest.importorskip("openvino")
    from cpuboost.backends.int8 import via_openvino
    from cpuboost.persist import store

    folder = tmp_path / f"v{store.FORMAT}" / "artifacts" / "signature"
    folder.mkdir(parents=True)
    net, x = conv_net(), torch.randn(2, 3, 16, 16)
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(2)]
    notes: list[str] = []
    first = via_openvino.build(net, (x,), {}, calibration, notes.append, artifact_dir=folder)
    notes.clear()
    second = via_openvino.build(net, (x,), {}, calibration, notes.append, artifact_dir=folder)
    blobs = tmp_path / f"v{store.FORMAT}" / "openvino"
    assert any(f"compiled blob written to {blobs}" in n or f"compiled blob reused from {blobs}" in n
               for n in notes), notes
    assert list(blobs.glob("*.blob")), "OpenVINO's CACHE_DIR holds no compiled blob"
    torch.testing.assert_close(second(x), first(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ no compiler


def test_bad_calibration_through_optimize_is_a_typed_error_and_the_model_is_untouched():
    """Wrong shape: CalibrationError on the first call naming the batch; empty: at optimize() already."""
    net = conv_net()
    before = snapshot(net)
    with pytest.raises(CalibrationError, match="empty"):
        cpuboost.optimize(net, dtype="int8", calibration=[])
    model = cpuboost.optimize(net, dtype="int8", calibration=[(torch.randn(2, 3, 8, 8),)], fusion=False)
    with pytest.raises(CalibrationError, match=r"calibration\[0\].*shape"):
        model(torch.randn(2, 3, 16, 16))
    assert_unchanged(net, before)


def test_model_without_quantizable_layers_says_why_in_the_report():
    """No Linear/Conv: the int8 pass is skipped with the reason, and the answer is still eager's."""
    net = nn.Sequential(nn.Tanh(), nn.Softplus()).eval()
    x = torch.randn(4, 8)
    model = cpuboost.optimize(net, dtype="int8", fusion=False)
    torch.testing.assert_close(model(x), net(x))
    record = next(p for p in cpuboost.explain(model).passes if p.name == "int8")
    assert record.status == "skipped" and "no Linear, Conv1d or Conv2d" in record.detail, record


def test_generator_calibration_is_read_once_and_keys_the_cache():
    """A generator is kept as a list (every build sees the batches); other data means another cache key."""
    batches = [(torch.randn(2, 4),) for _ in range(3)]
    options = Options(dtype="int8", calibration=(b for b in batches))
    assert isinstance(options.calibration, list) and len(options.calibration) == 3
    same = persist._options_key(Options(dtype="int8", calibration=list(batches)))
    assert persist._options_key(options) == same
    other = persist._options_key(Options(dtype="int8", calibration=[(torch.randn(2, 4),)]))
    assert other["calibration"] != same["calibration"]
    assert "calibration" not in persist._options_key(Options(dtype="int8"))
