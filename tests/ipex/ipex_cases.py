"""Shared by tests/ipex: the skip marker (IPEX usable here?) and tiny models that build in about a second."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cpuboost.backends.ipex import availability

_VERDICT = availability()  # in the IPEX environment this is the (quiet) import; elsewhere metadata only
needs_ipex = [pytest.mark.ipex, pytest.mark.skipif(not _VERDICT.usable, reason=f"IPEX not usable: {_VERDICT.reason}")]
TOL = {"fp32": 1e-4, "bf16": 3e-2}  # DESIGN.md's verification tolerances


class ConvNet(nn.Module):
    """Conv-BN-ReLU twice and a Linear head: what IPEX folds, prepacks and fuses."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.drop(self.features(x).mean(dim=(2, 3))))


def conv_net(seed: int = 0) -> ConvNet:
    """A ConvNet whose BatchNorm statistics are not the identity (so folding is really exercised)."""
    torch.manual_seed(seed)
    net = ConvNet()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 12, 12) * 2 + 1)
    return net.eval()


def tiny_bert(**config):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=32, **config)
    return BertModel(cfg).eval()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
