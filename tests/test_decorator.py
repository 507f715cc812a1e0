"""@cpu_optimized on factories, classes, functions and methods; the functional optimize()."""
import inspect

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost import cpu_optimized
from cpuboost.errors import CpuBoostError, OptimizerMismatchError, UnsupportedTargetError

from nets import MLP


def test_factory_returning_module_takes_inference_path():
    """A factory returning a module gives an optimized module in eval mode, same answers."""
    base = {}

    @cpu_optimized(dtype="fp32", fusion=False)
    def make():
        base["m"] = MLP([4, 8, 3]).eval()
        return base["m"]

    model = make()
    x = torch.randn(5, 4)
    assert isinstance(model, nn.Module) and cpuboost.explain(model).mode == "infer"
    torch.testing.assert_close(model(x), base["m"](x), rtol=1e-4, atol=1e-5)
    assert cpuboost.unwrap(model) is base["m"]


def test_bare_decorator_without_parentheses():
    """@cpu_optimized with no arguments uses the defaults (bf16)."""

    @cpu_optimized
    def make():
        return nn.Linear(2, 2)

    assert "dtype=bf16" in cpuboost.explain(make()).options


def test_factory_keeps_name_doc_signature():
    """The decorated factory keeps its name, docstring and signature."""

    def make(width: int = 3, *, depth: int = 1) -> nn.Module:
        """Builds it."""
        return nn.Linear(width, width)

    wrapped = cpu_optimized(dtype="fp32")(make)
    assert (wrapped.__name__, wrapped.__doc__) == ("make", "Builds it.")
    assert inspect.signature(wrapped) == inspect.signature(make)


def test_factory_returning_pair_takes_training_path():
    """A (module, optimizer) factory returns a training module and an optimizer over the same params."""

    @cpu_optimized(dtype="bf16")
    def make():
        net = nn.Linear(4, 2)
        return net, torch.optim.SGD(net.parameters(), lr=0.1)

    net, opt = make()
    assert cpuboost.explain(net).mode == "train" and net.training
    assert {id(p) for p in net.parameters()} == {id(p) for g in opt.param_groups for p in g["params"]}


def test_module_class_instances_are_optimized_and_isinstance_holds():
    """Decorating an nn.Module subclass optimizes instances; isinstance(obj, TheClass) stays true."""

    @cpu_optimized(dtype="fp32", fusion=False)
    class Net(nn.Module):
        """A net."""

        def __init__(self, width):
            super().__init__()
            self.fc = nn.Linear(width, width)

        def forward(self, x):
            return self.fc(x)

    net = Net(3)
    assert isinstance(net, Net) and isinstance(net, nn.Module)
    assert Net.__name__ == "Net" and Net.__doc__ == "A net."
    assert type(cpuboost.unwrap(net)).__name__ == "Net"
    x = torch.randn(2, 3)
    torch.testing.assert_close(net(x), cpuboost.unwrap(net)(x))
    assert not isinstance(nn.Linear(1, 1), Net)


def test_plain_function_runs_under_autocast_and_returns_unchanged():
    """A train step runs under cpu_amp(dtype); its non-module result comes back as is."""

    @cpu_optimized(dtype="bf16")
    def step(a, b):
        return (a @ b), torch.is_autocast_enabled("cpu"), {"k": 1}

    out, inside, extra = step(torch.randn(2, 2), torch.randn(2, 2))
    assert inside and out.dtype == torch.bfloat16 and extra == {"k": 1}
    assert not torch.is_autocast_enabled("cpu")


def test_method_decoration_binds_self():
    """Decorating a method works: self is passed and autocast applies."""

    class Trainer:
        scale = 3

        @cpu_optimized(dtype="bf16")
        def step(self, x):
            return x * self.scale, torch.is_autocast_enabled("cpu")

    value, inside = Trainer().step(2)
    assert (value, inside) == (6, True)


def test_disable_switch_makes_decorators_pass_through(monkeypatch):
    """CPUBOOST_DISABLE=1: factories return the raw model and steps run without autocast."""
    monkeypatch.setenv("CPUBOOST_DISABLE", "1")
    raw = nn.Linear(2, 2)

    @cpu_optimized(dtype="bf16")
    def make():
        return raw

    @cpu_optimized(dtype="bf16")
    def step():
        return torch.is_autocast_enabled("cpu")

    assert make() is raw and step() is False
    assert cpuboost.optimize(raw) is raw
    with pytest.raises(CpuBoostError, match="CPUBOOST_DISABLE"):
        cpuboost.explain(raw)


def test_optimize_does_not_mutate_the_users_module():
    """optimize() + calls leave the user's module's parameters, flags and layout as they were."""
    from nets import StackNet, randomize_bn

    net = randomize_bn(StackNet(3, [4, 4], ["relu", "gelu"], [False, True], True)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [m.training for m in net.modules()]
    model = cpuboost.optimize(net, dtype="bf16", fusion=False)
    model(torch.randn(2, 3, 8, 8))
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(after[k].is_contiguous() for k in after)
    assert [m.training for m in net.modules()] == flags
    assert type(net.blocks[0].bn) is nn.BatchNorm2d


@pytest.mark.parametrize("bad", [None, 3, "model", [nn.Linear(1, 1)]])
def test_optimize_rejects_non_modules(bad):
    """optimize() of something that is not a module raises UnsupportedTargetError naming the type."""
    with pytest.raises(UnsupportedTargetError, match=type(bad).__name__):
        cpuboost.optimize(bad)


def test_factory_returning_unusable_tuple_is_an_error():
    """(optimizer, model) or (model, x, y) from a factory raises with what was expected."""

    @cpu_optimized
    def make():
        net = nn.Linear(2, 2)
        return torch.optim.SGD(net.parameters(), lr=1), net

    with pytest.raises(UnsupportedTargetError, match=r"\(Module, Optimizer\)"):
        make()


def test_class_that_is_not_a_module_is_rejected():
    """Decorating a non-Module class is an error at decoration time."""
    with pytest.raises(UnsupportedTargetError, match="Plain"):
        @cpu_optimized
        class Plain:
            pass


def test_bad_option_fails_at_decoration_time():
    """A bad dtype in the decorator fails immediately, before any model is built."""
    with pytest.raises(CpuBoostError, match="'int3'"):
        cpu_optimized(dtype="int3")(lambda: nn.Linear(1, 1))


def test_optimizer_not_owning_model_params_is_rejected_untouched():
    """An optimizer over another model's parameters is a typed error; nothing is modified."""
    net, other = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.AdamW(other.parameters())
    groups_before = [dict(g) for g in opt.param_groups]
    with pytest.raises(OptimizerMismatchError, match="not the model's"):
        cpuboost.optimize(net, opt)
    assert [dict(g) for g in opt.param_groups] == groups_before and net.training


def _ipex_usable():
    from cpuboost.backends.ipex import availability

    return availability().usable


@pytest.mark.skipif("_ipex_usable()", reason="IPEX is usable in this environment")
def test_explicit_backend_that_cannot_run_is_an_error():
    """backend='ipex' without a usable IPEX raises BackendUnavailableError with the reason."""
    from cpuboost.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="backend='ipex'.*backend='auto'"):
        cpuboost.optimize(nn.Linear(2, 2), backend="ipex")
