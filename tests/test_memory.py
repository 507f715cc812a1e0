"""What a build keeps in memory: no second copy of the weights behind an OpenVINO graph, and no bf16 copy
of every weight held at once by the eager autocast runs that judge low-precision graphs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cpuboost


class CastCacheProbe(nn.Module):
    """Records, at each call under autocast, whether autocast's weight-cast cache was on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 8)
        self.cache_seen: list[bool] = []

    def forward(self, x):
        if torch.is_autocast_enabled("cpu"):
            self.cache_seen.append(torch.is_autocast_cache_enabled())
        return self.fc2(torch.relu(self.fc1(x)))


def test_yardstick_runs_eager_autocast_without_the_cast_cache():
    """The cache keeps a bf16 cast of every weight until the autocast region ends (BERT-base: ~120 MiB more
    at the peak); the yardstick is one call, where nothing is cast twice, so it runs without it."""
    net = CastCacheProbe().eval()
    model = cpuboost.optimize(net, dtype="bf16", backend="eager", cache_dir="off")
    x = torch.randn(4, 32)
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(out.float(), net(x), rtol=5e-2, atol=5e-2)
    graph = cpuboost.explain(model).graphs[0]
    assert any("eager autocast" in rung.error for rung in graph.rungs if rung.error), graph.rungs  # judged by it
    assert False in net.cache_seen, net.cache_seen  # the yardstick call: cache off


def test_openvino_yardstick_runs_without_the_cast_cache():
    pytest.importorskip("openvino")
    from cpuboost.backends.openvino import _autocast_leaves

    net = CastCacheProbe().eval()
    leaves = _autocast_leaves(net, torch.bfloat16, (torch.randn(2, 32),), {})
    assert leaves is not None and leaves[0].dtype == torch.bfloat16
    assert net.cache_seen == [False]


def test_openvino_graph_reads_torchs_weights_instead_of_a_copy():
    """A private copy of the weights stays alive in the compiled CPU model beside the ones it converts
    (BERT-base: +357 MiB resident), so the converted model's constants are torch's own memory."""
    pytest.importorskip("openvino")
    from cpuboost.backends.openvino import _convert, _input_shapes
    from cpuboost.backends.openvino_io import _Flat, _Inputs

    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval()
    inputs = _Inputs((torch.randn(2, 64),), {})
    with torch.no_grad():
        ov_model = _convert(_Flat(net, inputs), inputs.example(), _input_shapes(inputs, None))
    addresses = {op.get_data().ctypes.data for op in ov_model.get_ops() if op.get_type_name() == "Constant"
                 and op.get_byte_size() >= 64 * 128 * 4}
    weights = {p.data_ptr() for p in net.parameters() if p.numel() >= 64 * 128}
    assert weights and weights <= addresses, (weights, addresses)
