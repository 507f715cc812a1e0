"""Bad input on the training path: a typed CpuBoostError that says what was expected, and nothing modified."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import cpuboost
from cpuboost import cpu_optimized
from cpuboost.errors import CpuBoostError, ModelModeError, OptimizerMismatchError, UnsupportedTargetError
from training_cases import (TinyConvNet, assert_same_state, make_optimizer, make_pair, model_specs, optimize_quietly,
                            optimizer_specs, state_of)


def _conv_pair():
    net = TinyConvNet(4, True, 0.0)
    return net, torch.optim.AdamW(net.parameters(), lr=1e-3)


@settings(max_examples=20)
@given(model_specs, optimizer_specs)
def test_optimizer_over_another_models_params_changes_nothing(mspec, ospec):
    """An optimizer holding parameters the model does not own: OptimizerMismatchError; both untouched."""
    net, _ = make_pair(mspec, ospec)
    other = TinyConvNet(4, False, 0.0)
    opt = make_optimizer(other, ospec)
    before, before_other = state_of(net), state_of(other, opt)
    with pytest.raises(OptimizerMismatchError, match="not the model's") as err:
        optimize_quietly(net, opt, dtype="bf16")
    assert type(opt).__name__ in str(err.value) and "model.parameters()" in str(err.value)
    assert_same_state(before, state_of(net))
    assert_same_state(before_other, state_of(other, opt))


def test_optimizer_with_some_foreign_params_is_rejected():
    """Mixing the model's parameters with outside ones is still a mismatch, reported with the count."""
    net, _ = _conv_pair()
    stray = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD(list(net.parameters()) + [stray], lr=0.1)
    before = state_of(net, opt)
    with pytest.raises(OptimizerMismatchError, match="1 parameter"):
        optimize_quietly(net, opt)
    assert_same_state(before, state_of(net, opt))


def test_optimizer_over_part_of_the_model_is_fine():
    """Fine-tuning a head only (optimizer over a subset of the model's parameters) is accepted."""
    net, _ = _conv_pair()
    opt = torch.optim.AdamW(net.fc.parameters(), lr=1e-3)
    tnet, topt = optimize_quietly(net, opt, dtype="fp32")
    assert topt is opt and "fused_optimizer" in cpuboost.explain(tnet).applied


@pytest.mark.parametrize("several", [list, tuple])
def test_several_optimizers_are_rejected_untouched(several):
    """optimize(model, [opt1, opt2]) raises OptimizerMismatchError saying to combine them; nothing changes."""
    net, opt1 = _conv_pair()
    opt2 = torch.optim.SGD(net.fc.parameters(), lr=0.1)
    before = [state_of(net, opt1), state_of(net, opt2)]
    with pytest.raises(OptimizerMismatchError, match="2 optimizers.*one optimizer"):
        optimize_quietly(net, several([opt1, opt2]))
    assert_same_state(before[0], state_of(net, opt1))
    assert_same_state(before[1], state_of(net, opt2))


@pytest.mark.parametrize("shape", ["flat", "nested"])
def test_factory_returning_several_optimizers_is_rejected(shape):
    """A factory returning (model, opt1, opt2) or (model, [opt1, opt2]) gets the several-optimizers error."""
    made = {}

    @cpu_optimized(dtype="bf16")
    def make():
        net, opt1 = _conv_pair()
        opt2 = torch.optim.SGD(net.fc.parameters(), lr=0.1)
        made["net"], made["before"] = net, state_of(net)
        return (net, opt1, opt2) if shape == "flat" else (net, [opt1, opt2])

    with pytest.raises(OptimizerMismatchError, match="2 optimizers"):
        make()
    assert_same_state(made["before"], state_of(made["net"]))


@pytest.mark.parametrize("result", [
    lambda net, opt: (opt, net),
    lambda net, opt: (net, opt, torch.optim.lr_scheduler.StepLR(opt, 1)),
    lambda net, opt: (net, "adamw"),
    lambda net, opt: (net, None),
], ids=["swapped", "with-scheduler", "optimizer-name", "none"])
def test_factory_returning_something_else_says_what_is_expected(result):
    """A factory returning anything but Module or (Module, Optimizer) raises UnsupportedTargetError; untouched."""
    made = {}

    @cpu_optimized(dtype="bf16")
    def make():
        net, opt = _conv_pair()
        returned = result(net, opt)  # a scheduler sets initial_lr here, before cpuboost sees anything
        made["net"], made["opt"], made["before"] = net, opt, state_of(net, opt)
        return returned

    with pytest.raises(UnsupportedTargetError, match=r"\(Module, Optimizer\) pair"):
        make()
    assert_same_state(made["before"], state_of(made["net"], made["opt"]))


def test_eval_model_from_a_factory_is_rejected_with_the_fix():
    """An eval-mode model returned with its optimizer raises ModelModeError (a CpuBoostError and ValueError)."""
    @cpu_optimized(dtype="bf16")
    def make():
        net, opt = _conv_pair()
        return net.eval(), opt

    with pytest.raises(ModelModeError) as err:
        make()
    assert isinstance(err.value, CpuBoostError) and isinstance(err.value, ValueError)
    assert "TinyConvNet" in str(err.value) and "AdamW" in str(err.value)


def test_not_an_optimizer_is_rejected():
    """optimize(model, something_else) names what it got and what it expects."""
    net, _ = _conv_pair()
    before = state_of(net)
    with pytest.raises(OptimizerMismatchError, match="torch.optim.Optimizer, got dict"):
        optimize_quietly(net, {"lr": 0.1})
    assert_same_state(before, state_of(net))


def test_empty_optimizer_is_rejected():
    """An optimizer without parameters cannot train the model: a typed error."""
    net, _ = _conv_pair()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    opt.param_groups[0]["params"] = []
    with pytest.raises(OptimizerMismatchError, match="no parameters"):
        optimize_quietly(net, opt)
