"""The pass registry: registration, ordering, availability reasons, user passes."""
import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.core import registry
from cpuboost.errors import PassRegistrationError
from cpuboost.machine.hardware import detect
from cpuboost.options import Options

from nets import StackNet


@pytest.fixture
def temp_pass():
    names = []
    yield names
    for name in names:
        registry.unregister_pass(name)


def _plan(model, mode="infer", **opts):
    return registry.plan(model, None, Options(**opts), detect(), mode)


def test_builtin_inference_order():
    """Inference passes run eval, then folding, then channels_last, then the graph pass."""
    names = cpuboost.list_passes("infer")
    assert names.index("eval") < names.index("fold_batchnorm") < names.index("channels_last")
    assert "inductor" in names and "train_mode" not in names


def test_every_skipped_pass_has_a_reason():
    """Passes that do not apply are listed with a non-empty reason."""
    plan = _plan(nn.Sequential(nn.Linear(2, 2)), dtype="fp32", fusion=False)
    skipped = dict(plan.skipped)
    assert skipped["fold_batchnorm"] == "no BatchNorm layers"
    assert "Conv2d" in skipped["channels_last"]
    assert skipped["inductor"] == "fusion=False"
    assert skipped["low_precision_weights"] == "dtype=fp32"
    assert all(reason for reason in skipped.values())


def test_conv_net_plan_applies_folding_and_layout():
    """A conv net with BatchNorm gets folding and channels_last."""
    plan = _plan(StackNet(3, [4], ["relu"], [False], False), dtype="bf16", fusion=False)
    assert {"eval", "fold_batchnorm", "channels_last", "low_precision_weights"} <= set(plan.names)


def test_user_pass_runs_in_order_and_appears_in_report(temp_pass):
    """A registered user pass runs after the pass it names and is reported as applied."""
    calls = []

    @cpuboost.register_pass(name="test_marker", modes="infer", after="eval")
    def marker(model, ctx):
        """Marks the model."""
        calls.append(model.training)
        ctx.note("marked")
        return model

    temp_pass.append("test_marker")
    m = cpuboost.optimize(nn.Linear(2, 2).train(), fusion=False, dtype="fp32")
    m(torch.randn(1, 2))
    assert calls == [False]  # ran after eval
    rec = next(p for p in cpuboost.explain(m).passes if p.name == "test_marker")
    assert rec.status == "applied" and rec.detail == "marked"


def test_unavailable_user_pass_is_skipped_with_its_reason(temp_pass):
    """A pass whose availability check returns a reason is skipped with exactly that reason."""
    cpuboost.register_pass(lambda m, c: m, name="test_never", available=lambda ctx: "never here")
    temp_pass.append("test_never")
    assert dict(_plan(nn.Linear(1, 1)).skipped)["test_never"] == "never here"


def test_failing_pass_is_recorded_and_the_rest_still_apply(temp_pass):
    """A pass that raises is marked failed with the error; the model still gives eager's answer."""

    @cpuboost.register_pass(name="test_broken", after="eval")
    def broken(model, ctx):
        model.weight.data.zero_()  # half-modifies the copy, then fails
        raise RuntimeError("kaput")

    temp_pass.append("test_broken")
    lin = nn.Linear(3, 3)
    m = cpuboost.optimize(lin, fusion=False, dtype="fp32")
    x = torch.randn(2, 3)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=0)
    rec = next(p for p in cpuboost.explain(m).passes if p.name == "test_broken")
    assert rec.status == "failed" and "kaput" in rec.detail


def test_duplicate_name_rejected(temp_pass):
    """Registering a second pass under an existing name is an error unless replace=True."""
    with pytest.raises(PassRegistrationError, match="'eval' is already registered"):
        cpuboost.register_pass(lambda m, c: m, name="eval")


@pytest.mark.parametrize("kwargs,match", [({"modes": "serve"}, "modes"), ({"kind": "kernel"}, "kind"),
                                          ({"after": "test_self"}, "itself")])
def test_bad_registration_rejected(kwargs, match):
    """Unknown modes/kinds and self-ordering are rejected at registration."""
    with pytest.raises(PassRegistrationError, match=match):
        cpuboost.register_pass(lambda m, c: m, name="test_self", **kwargs)


def test_ordering_cycle_reported(temp_pass):
    """Two passes that must each run before the other give an error naming both."""
    cpuboost.register_pass(lambda m, c: m, name="test_a", after="test_b")
    temp_pass.append("test_a")
    cpuboost.register_pass(lambda m, c: m, name="test_b", after="test_a")
    temp_pass.append("test_b")
    with pytest.raises(PassRegistrationError, match="cycle.*test_a"):
        cpuboost.list_passes()
