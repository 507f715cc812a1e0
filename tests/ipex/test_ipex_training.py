"""bf16 training through real IPEX: what changes, checkpoints in the plain format, exact resume, no aliasing."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import cpuboost
from cpuboost.errors import BackendUnavailableError
from ipex_cases import ConvNet, needs_ipex

pytestmark = needs_ipex
STEPS, FIRST = 6, 3
RESUME_TOL = 2e-2  # the bf16 resume tolerance of the training path (observed: exactly equal)


def make_pair(kind: str):
    torch.manual_seed(0)
    net = ConvNet().train()
    if kind == "adamw":  # not in IPEX's fused list: non-fused fp32 master weights
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2)
    return net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)  # IPEX's split bf16 SGD step


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(STEPS)]


DATA = batches()


def step(net, opt, i: int) -> float:
    torch.manual_seed(100 + i)  # the same dropout mask in every run of step i
    x, y = DATA[i]
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def ipex_pair(kind: str):
    return cpuboost.optimize(*make_pair(kind), backend="ipex", dtype="bf16")


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_ipex_optimize_applies_in_place(kind):
    """The same model and optimizer come back; weights run bf16, the optimizer steps with IPEX; explain says so."""
    net, opt = make_pair(kind)
    tnet, topt = cpuboost.optimize(net, opt, backend="ipex", dtype="bf16")
    report = cpuboost.explain(tnet)
    assert topt is opt and cpuboost.unwrap(tnet) is net and "ipex_optimize" in report.applied, str(report)
    assert {p.dtype for p in net.parameters() if p.dim() > 1} == {torch.bfloat16}
    assert hasattr(opt, "params_attr") and "IPEX" in next(r.detail for r in report.passes if r.name == "ipex_optimize")
    assert type(net.fc) is torch.nn.Linear  # module structure kept (no weight prepack)
    losses = [step(tnet, topt, i) for i in range(STEPS)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] + 0.5


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_checkpoint_round_trip_resumes_exactly(kind):
    """Plain fp32 state dicts; a fresh optimized pair loading them resumes as if never stopped."""
    net, opt = ipex_pair(kind)
    uninterrupted = [step(net, opt, i) for i in range(STEPS)]

    net, opt = ipex_pair(kind)
    first = [step(net, opt, i) for i in range(FIRST)]
    ckpt = roundtrip({"model": net.state_dict(), "opt": opt.state_dict()})
    plain_net, plain_opt = make_pair(kind)
    assert list(ckpt["model"]) == list(plain_net.state_dict())
    assert {v.dtype for v in ckpt["model"].values()} <= {torch.float32, torch.int64}
    step(plain_net, plain_opt, 0)  # a plain optimizer's state after one step, to compare structure with
    plain_state = plain_opt.state_dict()
    assert ckpt["opt"]["param_groups"] == plain_state["param_groups"]
    assert {i: sorted(s) for i, s in ckpt["opt"]["state"].items()} == {
        i: sorted(s) for i, s in plain_state["state"].items()}
    saved = copy.deepcopy(ckpt)

    net2, opt2 = ipex_pair(kind)
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    resumed = [step(net2, opt2, i) for i in range(FIRST, STEPS)]
    assert first == uninterrupted[:FIRST]
    assert max(abs(a - b) for a, b in zip(resumed, uninterrupted[FIRST:])) <= RESUME_TOL
    # training after the load must not write into the caller's checkpoint (IPEX alone aliases it)
    assert all(torch.equal(v, saved["model"][k]) for k, v in ckpt["model"].items())


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_checkpoints_cross_between_plain_and_ipex(kind):
    """An IPEX checkpoint loads into a plain pair, and a plain checkpoint into an IPEX pair, all keys matched."""
    net, opt = ipex_pair(kind)
    for i in range(2):
        step(net, opt, i)
    ckpt = roundtrip({"model": net.state_dict(), "opt": opt.state_dict()})
    plain_net, plain_opt = make_pair(kind)
    assert not plain_net.load_state_dict(ckpt["model"]).missing_keys
    plain_opt.load_state_dict(ckpt["opt"])
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in plain_net.state_dict().items())
    back, back_opt = cpuboost.optimize(plain_net, plain_opt, backend="ipex", dtype="bf16")
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in back.state_dict().items())


def test_strict_load_still_reports_missing_keys():
    """IPEX's per-module loader skips torch's checks; cpuboost keeps them: a missing key is an error."""
    net, _ = ipex_pair("adamw")
    state = net.state_dict()
    state.pop("fc.weight")
    with pytest.raises(RuntimeError, match="fc.weight"):
        net.load_state_dict(state)


def test_fp32_or_no_optimizer_is_an_error_with_the_reason():
    """backend='ipex' training needs dtype='bf16' and an optimizer; otherwise a typed error says which."""
    with pytest.raises(BackendUnavailableError, match="dtype='bf16'"):
        cpuboost.optimize(*make_pair("sgd"), backend="ipex", dtype="fp32")
    with pytest.raises(BackendUnavailableError, match="no optimizer"):
        cpuboost.optimize(ConvNet().train(), mode="train", backend="ipex", dtype="bf16")


def test_auto_training_leaves_ipex_out():
    """Under backend='auto' training stays on the native path; IPEX training is opt-in."""
    net, opt = cpuboost.optimize(*make_pair("adamw"), dtype="bf16")
    skipped = cpuboost.explain(net).skipped
    assert "backend='auto'" in skipped["ipex_optimize"]
    assert {p.dtype for p in cpuboost.unwrap(net).parameters()} == {torch.float32}
