"""Ops OpenVINO lacks, spelt while tracing: the spelling answers as torch does, and a model calling ``torch.diff``
(transformers' packed-sequence masks, Whisper's decoder) converts and answers as eager."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cpuboost.backends.openvino_ops import OpenVINOSpellings, diff


@settings(max_examples=200)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.integers(0, 3), st.data(),
       st.sampled_from([torch.float32, torch.int64, torch.bool]))
def test_the_spelling_of_diff_answers_as_torch_diff(shape, n, data, dtype):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = torch.randint(0, 3, shape).to(dtype)
    edge = list(shape)
    edge[dim] = data.draw(st.integers(1, 2))
    prepend = torch.randint(0, 3, edge).to(dtype) if data.draw(st.booleans()) else None
    append = torch.randint(0, 3, edge).to(dtype) if data.draw(st.booleans()) else None
    expected = torch.diff(x, n=n, dim=dim, prepend=prepend, append=append)
    got = diff(x, n=n, dim=dim, prepend=prepend, append=append)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    with OpenVINOSpellings():  # the mode routes both spellings of the call to it
        assert torch.equal(x.diff(n=n, dim=dim, prepend=prepend, append=append), expected)


class PackedPositions(nn.Module):
    """What transformers' masking_utils does with position ids: where a new packed sequence starts."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)

    def forward(self, input_ids, position_ids):
        starts = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        return self.embed(input_ids) * starts.unsqueeze(-1).float()


def test_a_model_calling_diff_converts_and_answers_as_eager():
    pytest.importorskip("openvino")
    from cpuboost.backends.openvino import build

    net = PackedPositions().eval()
    ids, positions = torch.randint(0, 50, (2, 12)), torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]] * 2)
    with torch.no_grad():
        expected = net(ids, positions)
    fn = build(net, (ids, positions), {}, torch.float32, lambda note: None, dynamic_dims={1: [1], 0: [1]})
    torch.testing.assert_close(fn(ids, positions), expected)
    shorter = positions[:, :7].contiguous()
    with torch.no_grad():
        torch.testing.assert_close(fn(ids[:, :7].contiguous(), shorter), net(ids[:, :7], shorter))
