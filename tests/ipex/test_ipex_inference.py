"""Inference through real IPEX: fp32/bf16 x fusion on/off, HF outputs, fallback, and the 'auto' order."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.core import registry
from cpuboost.backends.ipex import infer as ipex_infer
from cpuboost.errors import BackendUnavailableError
from cpuboost.machine.hardware import detect
from cpuboost.options import Options
from ipex_cases import TOL, conv_net, needs_ipex, rel_err, tiny_bert
from oracle import rung, verified

pytestmark = needs_ipex
CASES = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
IDS = [f"{d}-fusion{'On' if f else 'Off'}" for d, f in CASES]


@pytest.mark.parametrize("dtype, fusion", CASES, ids=IDS)
def test_convnet_matches_eager_on_the_ipex_path(dtype, fusion):
    """backend='ipex' builds with IPEX for every dtype x fusion, matches eager fp32, and leaves the model alone."""
    net = conv_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = net(x)
    model = cpuboost.optimize(net, backend="ipex", dtype=dtype, fusion=fusion)
    out = model(x)
    # IPEX built and verified; the race against eager (and eager with passes) picks what serves
    assert verified(rung(model, f"ipex {dtype}")), str(cpuboost.explain(model))
    assert out.dtype == torch.float32 and rel_err(out, ref) <= TOL[dtype]
    assert rel_err(model(x * 0.5), net(x * 0.5)) <= TOL[dtype]  # a cached graph, new values
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.dtype == torch.float32 for p in net.parameters())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fusion_traces_and_fuses_while_imperative_does_not(dtype):
    """fusion=True gives a frozen TorchScript graph holding IPEX's fused ops; fusion=False runs IPEX's module."""
    net, x = conv_net(), torch.randn(2, 3, 12, 12)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    fused = ipex_infer.build(net, (x,), {}, dt, fusion=True)
    kinds = {n.kind() for n in fused.graph.graph_for(*fused.flat.inputs((x,), {})).nodes()}
    assert any(k.startswith(("ipex_prepack::", "torch_ipex::", "ipex::")) for k in kinds), sorted(kinds)
    assert "aten::batch_norm" not in kinds  # frozen and folded
    plain = ipex_infer.build(net, (x,), {}, dt, fusion=False)
    assert isinstance(plain, ipex_infer.Imperative) and not isinstance(plain.module, torch.jit.ScriptModule)
    assert rel_err(fused(x), plain(x)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_hf_model_output_survives_the_trace(dtype):
    """A BertModel's ModelOutput comes back as the same class and keys; a new mask (same shape) is honoured."""
    bert = tiny_bert()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    model = cpuboost.optimize(bert, backend="ipex", dtype=dtype, fusion=True)
    out = model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    ipex = rung(model, f"ipex {dtype}")  # built; in bf16 IPEX may be judged less accurate than autocast, and refused
    assert verified(ipex) or ipex.fate.startswith("rejected"), str(cpuboost.explain(model))
    for key in ref.keys():
        assert rel_err(out[key], ref[key]) <= TOL[dtype], key
    padded = mask.clone()
    padded[:, 5:] = 0  # same signature, different values: nothing may be baked into the trace
    with torch.no_grad():
        ref2 = bert(input_ids=ids, attention_mask=padded).last_hidden_state
    assert rel_err(model(input_ids=ids, attention_mask=padded).last_hidden_state, ref2) <= TOL[dtype]
    assert len(cpuboost.explain(model).graphs) == 1


class DictWithNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, scale: float = 1.0, extra=None):
        y = self.lin(x) * scale
        return {"logits": y, "hidden": None, "pair": (y.relu(), y.sum(dim=-1)), "n": 3}


def test_containers_none_and_keyword_inputs_rebuild():
    """Dict/tuple outputs with None and int leaves, and keyword inputs, round-trip through the frozen graph."""
    net = DictWithNone().eval()
    x = torch.randn(5, 4)
    model = cpuboost.optimize(net, backend="ipex", dtype="fp32")
    out = model(x, scale=2.0)
    ref = net(x, scale=2.0)
    assert verified(rung(model, "ipex fp32")), str(cpuboost.explain(model))
    assert out["hidden"] is None and out["n"] == 3 and isinstance(out["pair"], tuple)
    assert rel_err(out["logits"], ref["logits"]) <= 1e-4 and rel_err(out["pair"][1], ref["pair"][1]) <= 1e-4
    out3 = model(x, scale=3.0)  # a new scalar value is a new signature, not a stale constant
    assert rel_err(out3["logits"], net(x, scale=3.0)["logits"]) <= 1e-4
    assert len(cpuboost.explain(model).graphs) == 2


class ReturnsObject(nn.Module):
    class Box:
        def __init__(self, t):
            self.t = t

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x), self.Box(x.sum())


def test_untraceable_output_falls_back_with_the_reason():
    """An output object TorchScript would freeze is refused: IPEX's build fails, eager runs, the reason is kept."""
    net = ReturnsObject().eval()
    model = cpuboost.optimize(net, backend="ipex", dtype="fp32", fusion=True)
    x = torch.randn(2, 4)
    out = model(x)
    graph = cpuboost.explain(model).graphs[-1]
    assert graph.path != "ipex" and torch.allclose(out[0], net(x)[0])
    assert "Box" in rung(model, "ipex fp32").fate, str(cpuboost.explain(model))


def test_auto_tries_inductor_then_ipex():
    """Under backend='auto' the graph candidates are Inductor, then IPEX; IPEX runs when Inductor fails."""
    net = conv_net()
    plan = registry.plan(net, None, Options(dtype="fp32"), detect(), "infer")
    assert [p.name for p in plan.graph_passes if p.name != "openvino"] == ["inductor", "ipex"]
    original = registry.lookup("inductor")

    def failing(model, args, kwargs, ctx):
        raise RuntimeError("no Inductor in this test")

    registry.register_pass(failing, name="inductor", kind="graph", modes="infer", replace=True)
    try:
        model = cpuboost.optimize(net, dtype="fp32")
        x = torch.randn(2, 3, 12, 12)
        assert rel_err(model(x), net(x)) <= 1e-4
    finally:
        registry.register_pass(original.fn, name="inductor", kind="graph", modes="infer",
                               available=original.available, replace=True)
    assert rung(model, "inductor fp32").fate.startswith("failed: RuntimeError: no Inductor")
    assert verified(rung(model, "ipex fp32")), str(cpuboost.explain(model))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_auto_builds_both_and_keeps_the_faster(dtype):
    """Under backend='auto' Inductor and IPEX are both built and verified; the faster per call serves."""
    net = conv_net()
    x = torch.randn(2, 3, 12, 12)
    model = cpuboost.optimize(net, dtype=dtype)
    out = model(x)
    report = cpuboost.explain(model)
    graph = report.graphs[-1]
    both = [rung(model, f"inductor {dtype}"), rung(model, f"ipex {dtype}")]
    assert all(verified(r) and r.ms > 0 for r in both), str(report)  # both built, verified and timed
    raced = [r for r in graph.rungs if r.ms is not None and r.vs_eager and r.vs_eager > 1 and r.error.startswith("ok")]
    if raced:  # one verified rung serves; every other lost a side-by-side race (timed interleaved, not alone)
        served = [r for r in raced if r.fate == "served"]
        assert len(served) == 1 and graph.path == served[0].name.rsplit(" ", 1)[0], str(report)
        assert all(r.fate.startswith("verified but slower than") for r in raced if r is not served[0]), str(report)
    assert "raced" in report._repr_html_()
    assert rel_err(out, net(x)) <= TOL[dtype]
    assert rel_err(model(x * 0.5), net(x * 0.5)) <= TOL[dtype]  # the kept graph, cached


def test_fp16_with_explicit_ipex_is_an_error():
    """backend='ipex' with dtype='fp16' is refused with the reason (cpuboost's IPEX paths are fp32/bf16)."""
    with pytest.raises(BackendUnavailableError, match="fp16"):
        cpuboost.optimize(conv_net(), backend="ipex", dtype="fp16")
