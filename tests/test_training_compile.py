"""The optional compiled training forward (compile_training=True) and graph-pass failures on the train path."""
from __future__ import annotations

import pytest
import torch

import cpuboost
from cpuboost.core.registry import unregister_pass
from training_cases import batches, make_pair, optimize_quietly, train

SPEC = {"kind": "conv", "width": 8, "depth": 1, "bn": True, "dropout": 0.0, "seed": 4}
OPT = {"name": "adamw", "kwargs": {}, "groups": 1}


@pytest.mark.slow
def test_compiled_training_forward_learns_like_eager():
    """compile_training=True: Inductor forward/backward give eager bf16's losses within 2e-2; explain says so."""
    data = batches(SPEC)
    eager = train(*optimize_quietly(*make_pair(SPEC, OPT), dtype="bf16"), data, 4)
    net, opt = optimize_quietly(*make_pair(SPEC, OPT), dtype="bf16", compile_training=True)
    compiled = train(net, opt, data, 4)
    assert compiled == pytest.approx(eager, rel=2e-2)
    report = cpuboost.explain(net)
    assert "compiled_training" in report.applied
    assert net(data[0][0]).dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_a_failing_training_graph_is_recorded_and_eager_runs():
    """A train-mode graph pass that raises on the first call is marked failed; training runs eagerly."""
    def broken_graph(model, args, kwargs, ctx):
        def run(*a, **k):
            raise RuntimeError("cannot build")
        return run

    data = batches(SPEC)
    expected = train(*optimize_quietly(*make_pair(SPEC, OPT), dtype="fp32"), data, 3)
    cpuboost.register_pass(broken_graph, name="broken_graph", kind="graph", modes="train")
    try:
        net, opt = optimize_quietly(*make_pair(SPEC, OPT), dtype="fp32")
        got = train(net, opt, data, 3)
    finally:
        unregister_pass("broken_graph")
    assert got == pytest.approx(expected, rel=1e-6)
    report = cpuboost.explain(net)
    record = next(p for p in report.passes if p.name == "broken_graph")
    assert record.status == "failed" and "cannot build" in record.detail
    assert any("training runs eagerly" in e for e in report.events)
