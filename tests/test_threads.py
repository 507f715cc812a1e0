"""Threads: serving never touches process-wide compiler state, builds of one model never hold up another."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from torch._dynamo.eval_frame import _stance
from torch._dynamo.utils import counters

import cpuboost
from cpuboost.backends import inductor

from nets import MLP, run_in_threads


@pytest.fixture(scope="module")
def compiled_mlp():
    net = MLP([16, 32, 8]).eval()
    x = torch.randn(4, 16)
    graph = inductor.compile_now(net, (x,), {}, torch.float32, cpp_wrapper=False)
    with torch.no_grad():
        return net, graph, x, net(x)


@pytest.mark.slow
def test_a_guard_miss_raises_and_compiles_nothing(compiled_mlp):
    """A call the graph's guards reject (another batch size) raises RecompileRefused: no compile, no eager."""
    _, graph, x, expected = compiled_mlp
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        torch.testing.assert_close(graph(x), expected)
        with pytest.raises(inductor.RecompileRefused):
            graph(torch.randn(5, 16))
    assert counters["stats"]["unique_graphs"] == graphs
    assert _stance.stance == "default"


@pytest.mark.slow
def test_serving_threads_leave_the_users_torch_compile_alone(compiled_mlp):
    """Threads serving a compiled graph beside the user's own torch.compile that recompiles for new shapes:
    the user's compiles succeed, every served answer is right, and the stance is the default afterwards."""
    _, graph, x, expected = compiled_mlp
    serving = threading.Barrier(4)

    def user_function(a):
        return torch.sin(a) * 2 + 1

    users = torch.compile(user_function, dynamic=False)

    def worker(i: int) -> None:
        serving.wait(timeout=60)
        if i == 0:
            for n in range(2, 6):  # a new shape each time: a recompile
                torch.testing.assert_close(users(torch.ones(n, 3)), user_function(torch.ones(n, 3)))
            return
        with torch.no_grad():
            for _ in range(300):
                torch.testing.assert_close(graph(x), expected)

    assert run_in_threads(worker, 4) == []
    assert _stance.stance == "default"
    torch.testing.assert_close(users(torch.ones(7, 3)), user_function(torch.ones(7, 3)))  # and it still recompiles


_GATES: dict = {}  # id -> (gate, entered): events live outside the model, which cpuboost deep-copies


class Gated(nn.Module):
    """A model whose forward waits for ``gate``: its first call's build can be held open at will (a real build:
    the reference run that starts every build waits)."""

    def __init__(self, gate: threading.Event, entered: threading.Event) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 4)
        self.gate_id = len(_GATES)
        _GATES[self.gate_id] = (gate, entered)

    def forward(self, x):
        gate, entered = _GATES[self.gate_id]
        entered.set()
        assert gate.wait(timeout=120), "the test never opened the gate"
        return self.lin(x)


def _eager(net, x):
    with torch.no_grad():
        return net(x)


def test_eight_threads_first_calls_with_different_shapes_answer_as_single_threaded():
    """Two models, eight threads, each thread's first call a new batch size: every answer is eager's and
    each model keeps one graph per size."""
    nets = [MLP([16, 32, 8]).eval(), MLP([16, 24, 8], act="gelu").eval()]
    models = [cpuboost.optimize(net, dtype="fp32", fusion=False, shapes="static") for net in nets]
    inputs = [torch.randn(i + 1, 16, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    expected = [_eager(nets[i % 2], x) for i, x in enumerate(inputs)]
    got: dict = {}

    def worker(i: int) -> None:
        got[i] = models[i % 2](inputs[i])

    assert run_in_threads(worker, 8, timeout=300) == []
    for i in range(8):
        torch.testing.assert_close(got[i], expected[i], rtol=1e-4, atol=1e-5)
    assert [len(m._cache) for m in models] == [4, 4]


def test_a_built_model_and_a_new_size_never_wait_for_another_models_build():
    """While model B's build is held open, model A answers a built size, builds a new size and is
    invalidated, all in a worker that finishes; B's build then completes with eager's answer."""
    gate, entered = threading.Event(), threading.Event()
    slow = Gated(gate, entered).eval()
    a_net = MLP([16, 32, 8]).eval()
    a, b = (cpuboost.optimize(n, dtype="fp32", fusion=False, shapes="static") for n in (a_net, slow))
    x = torch.randn(2, 16)
    a(x)
    b_result: dict = {}
    builder = threading.Thread(target=lambda: b_result.setdefault("out", b(x)))
    builder.start()
    assert entered.wait(timeout=60)
    a_results: dict = {}

    def use_a() -> None:
        a_results["built"] = a(x)
        a_results["new size"] = a(torch.ones(5, 16))
        a.invalidate("test")
        a_results["after invalidate"] = a(x)

    user = threading.Thread(target=use_a)
    user.start()
    user.join(timeout=120)
    finished, held = not user.is_alive(), builder.is_alive()
    gate.set()
    user.join(timeout=120)
    builder.join(timeout=120)
    assert finished and held  # A finished while B's build was still held open
    assert not user.is_alive() and not builder.is_alive()
    torch.testing.assert_close(a_results["built"], _eager(a_net, x))
    torch.testing.assert_close(a_results["new size"], _eager(a_net, torch.ones(5, 16)))
    torch.testing.assert_close(a_results["after invalidate"], _eager(a_net, x))
    torch.testing.assert_close(b_result["out"], _eager(slow, x))


def test_an_edit_during_a_build_keeps_nothing_built_from_the_old_weights():
    """invalidate() during this model's own build returns at once; that build answers its call but its
    graph is not kept, and the next call rebuilds from the new weights."""
    gate, entered = threading.Event(), threading.Event()
    net = Gated(gate, entered).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, shapes="static")
    x = torch.randn(3, 16)
    builder = threading.Thread(target=model, args=(x,))
    builder.start()
    assert entered.wait(timeout=60)
    with torch.no_grad():
        net.lin.weight.mul_(-2)
    done = threading.Thread(target=model.invalidate, args=("edited during the build",))
    done.start()
    done.join(timeout=30)
    assert not done.is_alive()  # invalidate did not wait for the build
    gate.set()
    builder.join(timeout=120)
    assert not builder.is_alive()
    assert "a graph built while the weights were edited was not kept; the next call rebuilds" in (
        cpuboost.explain(model).events)
    assert len(model._cache) == 0
    torch.testing.assert_close(model(x), _eager(net, x))
