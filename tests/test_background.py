"""build="background": a new signature is answered by eager at once; its graph builds in a daemon thread and
serves the calls after it; a failed background build is recorded and eager keeps answering."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.core import signature
from cpuboost.errors import InvalidOptionError

from nets import MLP, assert_exit_waits_for_build

BACKGROUND_NOTE = "answered by eager while its graph builds in the background"


class Pointwise(nn.Module):
    """Forty elementwise ops on a large tensor: Inductor fuses them into one pass, so it beats eager. No
    transcendental op: Inductor's vectorized tanh runs at half eager's speed on an AMX Xeon."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.001))

    def forward(self, x):
        for _ in range(10):
            x = torch.clamp(x * self.scale + 0.01, -3.0, 3.0) * 1.5
        return x


def _eager(net, *args, **kwargs):
    with torch.no_grad():
        return net(*args, **kwargs)


def test_the_build_option_is_checked_and_names_the_choices():
    net = MLP([4, 4])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(InvalidOptionError) as info:
        cpuboost.optimize(net, build="later")
    assert all(f"'{choice}'" in str(info.value) for choice in ("later", "auto", "blocking", "background"))
    assert isinstance(info.value, ValueError)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert "build=auto" in cpuboost.explain(cpuboost.optimize(net, fusion=False)).options


def test_first_answer_is_eagers_and_the_build_lands_for_later_calls():
    """Eager path (fusion=False): the first call returns eager's own answer (bit for bit) before any graph
    exists; after the background build the signature has its entry and later answers match eager."""
    net = MLP([16, 32, 8]).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, build="background")
    x = torch.randn(4, 16)
    first = model(x)
    assert torch.equal(first, _eager(net, x))
    assert model.wait_for_builds(timeout=300)
    assert model._cache.get(signature.call_key((x,), {})) is not None
    torch.testing.assert_close(model(x), _eager(net, x), rtol=1e-4, atol=1e-5)
    report = cpuboost.explain(model)
    assert any(BACKGROUND_NOTE in e for e in report.events) and len(report.graphs) == 1


def test_the_background_build_keeps_the_callers_autocast():
    """Under an outer bf16 autocast the background build runs under it too (autocast is thread-local and
    part of the key): the graph that lands answers in bf16, as eager does there."""
    net = MLP([16, 32, 8]).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, build="background")
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _eager(net, x)
        assert torch.equal(model(x), expected) and expected.dtype == torch.bfloat16
        assert model.wait_for_builds(timeout=300)
        assert model._cache.get(signature.call_key((x,), {})) is not None
        later = model(x)
    assert later.dtype == torch.bfloat16
    torch.testing.assert_close(later.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_a_failed_background_build_is_recorded_and_eager_keeps_answering():
    """A build that raises in the background (dynamic_dims names an input the call does not have) is in
    explain(); the signature is answered by eager without a new build on every call."""
    net = MLP([16, 8]).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, build="background", dynamic_dims={"nope": [0]})
    x = torch.randn(3, 16)
    assert torch.equal(model(x), _eager(net, x))
    assert model.wait_for_builds(timeout=300)
    failed = [e for e in cpuboost.explain(model).events if e.startswith("background build of")]
    assert len(failed) == 1 and "InvalidOptionError" in failed[0] and "'nope'" in failed[0]
    for _ in range(3):
        assert torch.equal(model(x), _eager(net, x))
    assert model.wait_for_builds(timeout=10) and len(model._cache) == 0
    assert sum(BACKGROUND_NOTE in e for e in cpuboost.explain(model).events) == 1  # started once, not per call


@pytest.mark.slow
def test_the_compiled_winner_takes_over_after_the_background_build():
    """Inductor: the first call is eager's answer; once the background build is done, the Inductor graph
    serves (explain shows it) and its answers match eager."""
    net = Pointwise().eval()
    model = cpuboost.optimize(net, dtype="fp32", backend="native", tune_budget=0, build="background")
    x = torch.randn(128, 4096, generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(x), _eager(net, x))
    assert model.wait_for_builds(timeout=600)
    entry = model._cache.get(signature.call_key((x,), {}))
    assert entry is not None and entry.path == "inductor", cpuboost.explain(model)
    torch.testing.assert_close(model(x), _eager(net, x), rtol=1e-4, atol=1e-5)
    report = cpuboost.explain(model)
    assert report.graphs[-1].path == "inductor" and any(BACKGROUND_NOTE in e for e in report.events)


def test_a_process_exiting_during_a_background_build_waits_for_it_instead_of_aborting():
    """One call, then exit at once: the Inductor build under way is waited for, with a warning (a daemon thread
    killed inside Inductor's compile aborted the process: exit status 134)."""
    script = (
        "import torch, cpuboost\n"
        "class P(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.s = torch.nn.Parameter(torch.tensor(1.001))\n"
        "    def forward(self, x):\n"
        "        for _ in range(10): x = torch.clamp(x * self.s + 0.01, -3.0, 3.0) * 1.5\n"
        "        return x\n"
        "m = cpuboost.optimize(P().eval(), dtype='fp32', backend='native', build='background')\n"
        "m(torch.randn(128, 4096))\n"
        "print('building at exit:', not m.wait_for_builds(timeout=0), flush=True)\n")
    assert_exit_waits_for_build(script, "building at exit: True", "finishing a background graph build before exiting")
