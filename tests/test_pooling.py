"""The global_pooling pass: an average pool whose window covers its input answers as the original pool, and the
model OpenVINO refused (a window larger than its map, as transformers' EfficientNet has) is served by it."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cpuboost
from cpuboost.passes.pooling import GlobalMeanWhereCovered, covers

POOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d}


@settings(max_examples=300)
@given(st.integers(1, 2), st.data())
def test_the_wrapped_pool_answers_as_the_pool_at_every_size(dims, data):
    """Every pool without padding, every map size: the same values, or the same refusal where eager refuses."""
    sizes = st.integers(1, 9)
    kernel = data.draw(st.lists(sizes, min_size=dims, max_size=dims))
    stride = data.draw(st.one_of(st.none(), st.lists(sizes, min_size=dims, max_size=dims)))
    pool = POOLS[dims](kernel, stride=stride, ceil_mode=data.draw(st.booleans()),
                       count_include_pad=data.draw(st.booleans()))
    x = torch.randn(2, 3, *data.draw(st.lists(sizes, min_size=dims, max_size=dims)))
    wrapped = GlobalMeanWhereCovered(pool)
    try:
        expected = pool(x)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            wrapped(x)
        assert not covers(pool, tuple(x.shape[2:]))
        return
    torch.testing.assert_close(wrapped(x), expected, rtol=1e-6, atol=1e-6)
    if covers(pool, tuple(x.shape[2:])):
        assert expected.shape[2:] == (1,) * dims


def test_padding_or_a_divisor_override_is_never_taken_for_a_mean():
    assert covers(nn.AvgPool2d(8, ceil_mode=True), (7, 7))
    assert not covers(nn.AvgPool2d(8, padding=1, ceil_mode=True), (7, 7))
    assert not covers(nn.AvgPool2d(8, ceil_mode=True, divisor_override=2), (7, 7))
    assert not covers(nn.AvgPool2d(8), (7, 7))  # without ceil_mode eager refuses a window longer than the map


class OversizedPoolNet(nn.Module):
    """transformers' EfficientNet head in small: ``AvgPool2d(hidden_dim, ceil_mode=True)`` on a small map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(64, ceil_mode=True)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(torch.nn.functional.silu(self.conv(x))).flatten(1))


def test_a_pool_larger_than_its_map_is_served_by_openvino(two_threads):
    pytest.importorskip("openvino")
    from cpuboost.backends.openvino import build

    net, x = OversizedPoolNet().eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = net(x)
    with pytest.raises(Exception, match="avg_pool2d|[Kk]ernel"):  # what the pass is for: OpenVINO refuses the pool
        build(net, (x,), {}, torch.float32, lambda note: None)(x)
    model = cpuboost.optimize(net, dtype="fp32", backend="openvino")
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    report = cpuboost.explain(model)
    assert "global_pooling" in report.applied and "pool(s) made global means: pool" in str(report)
    fates = {r.name: r.fate for r in report.graphs[-1].rungs}  # built and verified; whether it serves is a race
    assert not fates["openvino fp32"].startswith(("failed", "rejected")), str(report)
    assert "openvino fp32: " in str(report) and "ok: rel err" in str(report).split("openvino fp32: ")[-1], str(report)
    assert type(net.pool) is nn.AvgPool2d  # the user's model is untouched


def test_a_trace_of_the_wrapped_pool_is_the_mean_without_tracer_warnings():
    """IPEX refuses a trace that warned (a frozen branch): the wrapper's trace must not warn."""
    import warnings

    wrapped, x = GlobalMeanWhereCovered(nn.AvgPool2d(64, ceil_mode=True)), torch.randn(2, 3, 7, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(wrapped, x)
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    torch.testing.assert_close(traced(x), wrapped.pool(x))
