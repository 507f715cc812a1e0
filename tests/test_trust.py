"""Never silently wrong: outer autocast, inplace=True across shapes, threads, call-time recompiles."""
import threading

import pytest
import torch
from torch import nn

import cpuboost
from oracle import rung, verified

from nets import MLP, StackNet, randomize_bn, run_in_threads


def _eager(net, *args):
    with torch.no_grad():
        return net(*args)


GLOBAL_SHIFT = {"value": 0.5}


class Scaled(nn.Module):
    """Reads a plain attribute and a module global in forward: editing either changes the answer without
    touching a weight. The pointwise chain is what Inductor fuses into one kernel, so its graph beats eager."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 512)
        self.scale = 1.0

    def forward(self, x):
        y = self.fc(x)
        for _ in range(16):  # ~80 memory-bound pointwise passes in eager, one fused kernel compiled
            y = torch.nn.functional.gelu(y * self.scale + GLOBAL_SHIFT["value"]) - y.sigmoid()
        return y


def _close(out, expected):
    return ((out - expected).abs().max() / expected.abs().max()).item() < 1e-4


@pytest.mark.parametrize("fusion", [False, True])
def test_outer_autocast_answers_in_the_dtype_eager_would(fusion):
    """Under torch.autocast(bf16) an fp32-optimized model answers in bf16, as eager does, on every path."""
    if fusion:
        pytest.importorskip("torch._inductor")
    net = randomize_bn(MLP([8, 16, 4])).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=fusion, tune_budget=0)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _eager(net, x)
        out = model(x)
    assert expected.dtype == torch.bfloat16 and out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    plain = model(x)  # outside autocast: a different signature, answered in fp32
    assert plain.dtype == torch.float32


def test_inplace_works_across_signatures_and_keeps_the_model_fp32():
    """inplace=True folds into the user's model but keeps it fp32, so new shapes still have a reference."""
    net = randomize_bn(StackNet(3, [8], ["relu"], [False], True)).eval()
    reference = randomize_bn(StackNet(3, [8], ["relu"], [False], True)).eval()
    reference.load_state_dict(net.state_dict())
    model = cpuboost.optimize(net, dtype="bf16", fusion=False, inplace=True)
    for batch, size in ((2, 8), (3, 6), (1, 10)):
        x = torch.randn(batch, 3, size, size)
        expected = _eager(reference, x)
        out = model(x)
        assert ((out - expected).abs().max() / expected.abs().max()).item() < 5e-2
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert "low_precision_weights" in cpuboost.explain(model).skipped


def test_failed_pass_is_rolled_back_on_the_users_model():
    """inplace=True and a pass that half-modifies the model then raises: the model is as it was."""

    @cpuboost.register_pass(name="test_half_done", after="fold_batchnorm", writes_weights=False)
    def half_done(model, ctx):
        model.fc = nn.Linear(8, 5)  # rebinds a submodule, then fails
        raise RuntimeError("gave up half way")

    try:
        net = randomize_bn(StackNet(3, [8], ["relu"], [False], False)).eval()
        fc = net.fc
        model = cpuboost.optimize(net, dtype="fp32", fusion=False, inplace=True)
        x = torch.randn(2, 3, 6, 6)
        model(x)
        assert net.fc is fc
        rec = next(p for p in cpuboost.explain(model).passes if p.name == "test_half_done")
        assert rec.status == "failed" and "undone" in rec.detail
    finally:
        cpuboost.core.registry.unregister_pass("test_half_done")


def test_eight_threads_first_calls_with_different_shapes():
    """Eight threads make their first calls at once, each with its own shape: every answer is eager's."""
    net = randomize_bn(MLP([6, 12, 4])).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, shapes="static", cache_size=16)
    inputs = [torch.randn(i + 1, 6) for i in range(8)]
    expected = [_eager(net, x) for x in inputs]
    start = threading.Barrier(8)

    def worker(i):
        start.wait()
        torch.testing.assert_close(model(inputs[i]), expected[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(inputs[i]), expected[i], rtol=1e-4, atol=1e-5)

    assert run_in_threads(worker, 8) == []
    assert len(cpuboost.explain(model).graphs) == 8  # one verified build per signature, none twice


@pytest.mark.slow
def test_a_guard_miss_is_a_new_signature_not_an_unverified_recompile():
    """A compiled graph whose guards fail (a Python attribute changed) is not recompiled behind our back:
    the call is treated as a new signature, built and verified, and answers like eager."""
    net = Scaled().eval()
    model = cpuboost.optimize(net, dtype="fp32", backend="native", tune_budget=0)
    x = torch.randn(1024, 64)
    model(x)
    assert cpuboost.explain(model).graphs[-1].path == "inductor", str(cpuboost.explain(model))
    GLOBAL_SHIFT["value"] = 2.0  # a global the graph guards on: the guard misses, nothing recompiles silently
    try:
        assert _close(model(x), _eager(net, x))
        assert any("guards refused" in e for e in cpuboost.explain(model).events), str(cpuboost.explain(model))
        assert verified(rung(model, "inductor fp32"))
    finally:
        GLOBAL_SHIFT["value"] = 0.5
    net.scale = 3.0  # an attribute of the user's model: the working copy's own copy must not serve
    assert _close(model(x), _eager(net, x))
    assert any("plain attribute" in e for e in cpuboost.explain(model).events)
