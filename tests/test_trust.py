"""Never silently wrong: outer autocast, inplace=True across shapes, threads, call-time recompiles."""
import threading

import pytest
import torch
from torch import nn

import cpuboost

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
def test_a_compiled_graph_refuses_to_recompile_on_a_guard_miss():
    """Inductor's graph, once built, raises RecompileRefused when its guards miss (a global it read changed)
    instead of recompiling an unverified graph behind cpuboost's back."""
    from cpuboost.backends.inductor import RecompileRefused, build

    net = Scaled().eval()
    x = torch.randn(1024, 64)
    with torch.no_grad():  # as the runtime calls it (grad mode is part of the guards)
        graph = build(net, (x,), {}, torch.float32, lambda note: None)
        assert _close(graph(x), _eager(net, x))
    GLOBAL_SHIFT["value"] = 2.0
    try:
        with pytest.raises(RecompileRefused), torch.no_grad():
            graph(x)
    finally:
        GLOBAL_SHIFT["value"] = 0.5


def test_a_guard_miss_is_a_new_signature_built_and_verified():
    """A serving graph that refuses a call (RecompileRefused) makes that call a new signature: the runtime
    rebuilds, verifies and answers like eager, and says so; an attribute edit on the model rebuilds too."""
    from cpuboost.backends.inductor import RecompileRefused

    def guarded(model, args, kwargs, ctx):
        shift = GLOBAL_SHIFT["value"]
        with torch.no_grad():
            answer = net(*args, **kwargs)  # precomputed: faster than eager, correct for this state only

        def run(*a, **k):
            if GLOBAL_SHIFT["value"] != shift:
                raise RecompileRefused("guard failed: GLOBAL_SHIFT changed")
            return answer
        return run

    net = Scaled().eval()
    cpuboost.core.registry.register_pass(guarded, name="test_guarded", kind="graph", modes="infer")
    try:
        model = cpuboost.optimize(net, dtype="fp32", fusion=False)
        x = torch.randn(64, 64)
        model(x)
        assert cpuboost.explain(model).graphs[-1].path == "test_guarded", str(cpuboost.explain(model))
        GLOBAL_SHIFT["value"] = 2.0
        assert _close(model(x), _eager(net, x))
        assert any("guards refused" in e for e in cpuboost.explain(model).events), str(cpuboost.explain(model))
        assert cpuboost.explain(model).graphs[-1].verification.startswith("ok")
    finally:
        GLOBAL_SHIFT["value"] = 0.5
        cpuboost.core.registry.unregister_pass("test_guarded")
    net.scale = 3.0  # an attribute of the user's model: the working copy's own copy must not serve
    assert _close(model(x), _eager(net, x))
    assert any("plain attribute" in e for e in cpuboost.explain(model).events)
