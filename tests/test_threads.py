"""Threads: serving never touches process-wide compiler state, builds of one model never hold up another."""
from __future__ import annotations

import threading

import pytest
import torch
from torch._dynamo.eval_frame import _stance
from torch._dynamo.utils import counters

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
