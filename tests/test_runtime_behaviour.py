"""OptimizedModule: state dicts, cache bounds, invalidation, control flow, fallbacks, threads."""
import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.core import registry

from nets import MLP, Branchy, StackNet, randomize_bn, run_in_threads


def _eager(net, *args, **kwargs):
    with torch.no_grad():
        return net(*args, **kwargs)


def test_state_dict_has_original_keys_and_values():
    """state_dict() of the optimized model equals the original's: same keys, same values."""
    net = randomize_bn(StackNet(3, [4], ["relu"], [False], True)).eval()
    model = cpuboost.optimize(net, dtype="bf16", fusion=False)
    model(torch.randn(2, 3, 6, 6))  # folding and bf16 weights happen on the private copy
    sd, orig = model.state_dict(), net.state_dict()
    assert list(sd) == list(orig)
    assert all(torch.equal(sd[k], orig[k]) and sd[k].dtype == orig[k].dtype for k in sd)


def test_load_state_dict_updates_answers():
    """Loading new weights into the optimized model changes its answers to the new eager ones."""
    net, other = randomize_bn(MLP([4, 8, 3])).eval(), randomize_bn(MLP([4, 8, 3])).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False)
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), _eager(net, x))
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(model(x), _eager(other, x), rtol=1e-4, atol=1e-5)
    assert any(e.startswith("graphs dropped") for e in cpuboost.explain(model).events)


def test_in_place_edit_of_original_weights_is_noticed():
    """Changing the original's parameters in place invalidates graphs instead of serving stale ones."""
    net = MLP([4, 4]).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False)
    x = torch.randn(2, 4)
    model(x)
    with torch.no_grad():
        net.net[0].weight.mul_(2)
    torch.testing.assert_close(model(x), _eager(net, x))


def test_plain_state_dict_round_trip_through_torch_save(tmp_path):
    """A checkpoint saved from the optimized model loads into a plain model and back."""
    net = randomize_bn(MLP([3, 5, 2])).eval()
    model = cpuboost.optimize(net, dtype="bf16", fusion=False)
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    plain = MLP([3, 5, 2]).eval()
    plain.load_state_dict(torch.load(tmp_path / "ck.pt"))
    x = torch.randn(4, 3)
    torch.testing.assert_close(_eager(plain, x), _eager(net, x))


def test_cache_is_bounded_lru():
    """Growing sequence lengths never hold more than cache_size graphs; recent ones stay."""
    model = cpuboost.optimize(nn.Linear(4, 4), dtype="fp32", fusion=False, cache_size=3, shapes="static")
    with pytest.warns(UserWarning, match="dynamic_dims"):
        for n in range(1, 8):
            model(torch.randn(n, 4))
    assert len(model._cache) == 3
    model(torch.randn(7, 4))
    assert len(cpuboost.explain(model).graphs) == 7  # the hit did not rebuild


def test_data_dependent_control_flow_is_never_wrong():
    """A branch chosen by input values gives eager's answer for both branches."""
    net = Branchy().eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False)
    pos, neg = torch.ones(2, 4), -torch.ones(2, 4)
    for x in (pos, neg, pos, neg):
        torch.testing.assert_close(model(x), _eager(net, x))


def test_python_values_in_inputs_are_part_of_the_key():
    """A Python flag argument that changes the computation is keyed, not cached across values."""

    class Scaled(nn.Module):
        def forward(self, x, scale=1.0, mode="add"):
            return x * scale if mode == "mul" else x + scale

    model = cpuboost.optimize(Scaled(), dtype="fp32", fusion=False)
    x = torch.randn(3)
    torch.testing.assert_close(model(x, 2.0, mode="mul"), x * 2)
    torch.testing.assert_close(model(x, 2.0, mode="add"), x + 2)
    torch.testing.assert_close(model(x, scale=3.0), x + 3)


def test_dict_and_none_outputs_survive():
    """Dict outputs with None entries and tuple outputs come back with the same structure."""

    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return {"logits": self.fc(x), "aux": None, "pair": (x.sum(), x.argmax())}

    net = DictOut().eval()
    out = cpuboost.optimize(net, dtype="bf16", fusion=False)(torch.randn(3, 2))
    assert out["aux"] is None and out["logits"].dtype == torch.float32
    assert out["pair"][1].dtype == torch.int64


@pytest.fixture
def wrong_graph_pass():
    """A graph pass that builds a callable giving wrong answers (as a miscompiling backend would)."""

    def build(model, args, kwargs, ctx):
        return lambda *a, **k: model(*a, **k) + 1.0

    registry.register_pass(build, name="test_wrong_graph", kind="graph", modes="infer")
    yield
    registry.unregister_pass("test_wrong_graph")


def test_verification_failure_falls_back_and_says_why(wrong_graph_pass):
    """A graph that disagrees with eager is rejected; the answer is eager's and the report says why."""
    net = MLP([3, 3]).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False)
    x = torch.randn(2, 3)
    torch.testing.assert_close(model(x), _eager(net, x))
    graph = cpuboost.explain(model).graphs[-1]
    assert graph.path in ("eager+passes", "eager (original)")
    wrong = next(r for r in graph.rungs if r.name == "test_wrong_graph fp32")
    assert wrong.fate.startswith("rejected") and "FAILED" in wrong.error, wrong.line()
    assert "test_wrong_graph" in str(cpuboost.explain(model))


def test_verify_false_trusts_the_graph():
    """verify=False skips the eager comparison (documented as the user's choice); speed still decides."""

    def build(model, args, kwargs, ctx):
        with torch.no_grad():
            wrong = model(*args, **kwargs) + 1.0
        return lambda *a, **k: wrong  # faster than eager, and wrong

    registry.register_pass(build, name="test_fast_wrong_graph", kind="graph", modes="infer")
    try:
        net = MLP([3, 3]).eval()
        model = cpuboost.optimize(net, dtype="fp32", fusion=False, verify=False)
        x = torch.randn(2, 3)
        torch.testing.assert_close(model(x), _eager(net, x) + 1.0)
        assert cpuboost.explain(model).graphs[-1].verification.startswith("not verified")
        checked = cpuboost.optimize(net, dtype="fp32", fusion=False)
        torch.testing.assert_close(checked(x), _eager(net, x))
    finally:
        registry.unregister_pass("test_fast_wrong_graph")


def test_build_error_falls_back_to_eager():
    """A graph pass that raises is recorded and the next path answers."""

    def build(model, args, kwargs, ctx):
        raise RuntimeError("backend exploded")

    registry.register_pass(build, name="test_raising_graph", kind="graph", modes="infer")
    try:
        net = MLP([3, 3]).eval()
        model = cpuboost.optimize(net, dtype="fp32", fusion=False)
        x = torch.randn(2, 3)
        torch.testing.assert_close(model(x), _eager(net, x))
        raised = next(r for r in cpuboost.explain(model).graphs[-1].rungs if r.name == "test_raising_graph fp32")
        assert "backend exploded" in raised.fate
    finally:
        registry.unregister_pass("test_raising_graph")


def test_train_mode_and_input_grads_run_the_original():
    """In train mode, or with inputs requiring grad, the original runs with autograd intact."""
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    model = cpuboost.optimize(net, dtype="bf16", fusion=False)
    x = torch.randn(2, 3, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None
    model.train()
    assert model(torch.randn(2, 3)).requires_grad and net[1].training


def test_many_threads_one_model_same_answers():
    """Eight threads calling one model with mixed shapes all get eager's answers."""
    net = randomize_bn(MLP([6, 12, 4])).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False)
    inputs = [torch.randn(1 + i % 3, 6) for i in range(32)]
    expected = [_eager(net, x) for x in inputs]

    def worker(idx):
        for i in range(idx, len(inputs), 8):
            torch.testing.assert_close(model(inputs[i]), expected[i], rtol=1e-4, atol=1e-5)

    assert run_in_threads(worker, 8) == [] and len(model._cache) == 3
    assert len(cpuboost.explain(model).graphs) == 3  # each signature built exactly once


def test_explain_renders_text_and_html():
    """explain() has a readable text form and an HTML table for notebooks."""
    model = cpuboost.optimize(randomize_bn(MLP([3, 4])).eval(), dtype="fp32", fusion=False)
    model(torch.randn(2, 3))
    report = cpuboost.explain(model)
    text, html = str(report), report._repr_html_()
    assert "fold_batchnorm" in text and "applied" in text and "float32[2x3]" in text
    assert "<table>" in html and "fold_batchnorm" in html


def test_getattr_and_repr_reach_the_original():
    """Attributes of the original (config, submodules) are reachable on the optimized model."""
    net = MLP([2, 2])
    net.config = {"hidden": 2}
    model = cpuboost.optimize(net, dtype="fp32")
    assert model.config == {"hidden": 2} and model.net is net.net
    assert "Optimized[MLP]" in repr(model)
