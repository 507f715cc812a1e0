"""Training steps through cpuboost: learn like eager, bf16 close to fp32, schedulers, fp16 loss scaling."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from cpuboost import cpu_optimized
from training_cases import (batches, make_model, make_optimizer, make_pair, model_specs, optimize_quietly,
                            optimizer_specs, train)

STEPS = 5


def _eager_with_layout_of(net: nn.Module, mspec: dict, ospec: dict):
    """A plain eager pair whose weights have the memory layout cpuboost chose (channels_last for convs)."""
    model = make_model(mspec)
    if any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
           for p in net.parameters()):
        model.to(memory_format=torch.channels_last)
    return model, make_optimizer(model, ospec)


@settings(max_examples=30)
@given(model_specs, optimizer_specs)
def test_fp32_training_matches_eager(mspec, ospec):
    """fp32 through cpuboost (fused step, channels_last) learns like eager.

    Weights are compared within 1e-5 with eager in the same memory layout: a channels_last convolution sums
    its weight gradient in another order, and gradient-normalising optimizers (Adagrad, Adam, RMSprop) turn
    those last-bit differences in near-zero gradients into lr-sized differences in single weights, in
    plain eager too. Against eager in the default layout the losses must still agree within 1e-4.
    """
    data = batches(mspec)
    net, opt = optimize_quietly(*make_pair(mspec, ospec), dtype="fp32")
    got = train(net, opt, data, STEPS)
    plain, plain_opt = _eager_with_layout_of(net, mspec, ospec)
    expected = train(plain, plain_opt, data, STEPS)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for (name, a), b in zip(plain.state_dict().items(), net.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    default_layout = train(*make_pair(mspec, ospec), data, STEPS)
    assert got == pytest.approx(default_layout, rel=1e-4, abs=1e-5)


@settings(max_examples=20)
@given(model_specs, optimizer_specs)
def test_bf16_training_tracks_fp32_and_eager_autocast(mspec, ospec):
    """bf16 losses match eager autocast within 1e-2 and stray from fp32 no further than eager autocast does.

    How far bf16 strays from fp32 is bf16's and the optimizer's doing, not cpuboost's: Adagrad's first steps are
    close to lr * sign(grad), so bf16 rounding of near-zero gradients moves a loss by 3-4% in plain eager.
    """
    data = batches(mspec)
    fp32 = train(*make_pair(mspec, ospec), data, STEPS)
    eager_bf16 = train(*make_pair(mspec, ospec), data, STEPS, autocast=torch.bfloat16)
    net, opt = optimize_quietly(*make_pair(mspec, ospec), dtype="bf16")
    got = train(net, opt, data, STEPS)
    assert all(math.isfinite(v) for v in got)
    assert got == pytest.approx(eager_bf16, rel=1e-2, abs=5e-3)
    for mine, theirs, reference in zip(got, eager_bf16, fp32):
        assert abs(mine - reference) <= abs(theirs - reference) + 1e-2 * abs(reference) + 5e-3
    assert got == pytest.approx(fp32, rel=1e-1, abs=1e-2)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert all(t.dtype == torch.float32 for s in opt.state.values() for t in s.values() if t.is_floating_point())


def test_outputs_and_gradients_are_fp32():
    """bf16 forward returns fp32 outputs (loss in fp32) and fp32 gradients on the fp32 master weights."""
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    tnet, _ = optimize_quietly(net, torch.optim.SGD(net.parameters(), lr=0.1), dtype="bf16")
    out = tnet(torch.randn(5, 8))
    assert out.dtype == torch.float32
    F.cross_entropy(out, torch.randint(0, 4, (5,))).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    with torch.no_grad():
        reference = net(torch.ones(2, 8))
    assert torch.allclose(tnet(torch.ones(2, 8)).detach(), reference, rtol=3e-2, atol=3e-2)


def test_lr_scheduler_built_before_and_after_optimize_keeps_working():
    """Schedulers on the optimizer (made before or after optimize) give the same LRs and losses as eager."""
    spec = {"kind": "mlp", "width": 8, "depth": 2, "bn": False, "dropout": 0.0, "seed": 3}
    ospec = {"name": "adamw", "kwargs": {}, "groups": 2}
    data = batches(spec)

    plain, popt = make_pair(spec, ospec)
    psched = torch.optim.lr_scheduler.OneCycleLR(popt, max_lr=0.05, total_steps=8)
    expected = train(plain, popt, data, 8, scheduler=psched)

    net, opt = make_pair(spec, ospec)
    before = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=8)
    tnet, topt = optimize_quietly(net, opt, dtype="fp32")
    assert train(tnet, topt, data, 8, scheduler=before) == pytest.approx(expected, rel=1e-5)
    assert before.get_last_lr() == pytest.approx(psched.get_last_lr())

    net2, opt2 = optimize_quietly(*make_pair(spec, ospec), dtype="fp32")
    after = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    train(net2, opt2, data, 5, scheduler=after)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([1e-2 * 0.25] * 2)


def test_fp16_grad_scaler_skips_overflow_and_learns():
    """fp16: net.grad_scaler scales the loss, skips a step with inf gradients (halving the scale) and learns."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    tnet, opt = optimize_quietly(net, torch.optim.AdamW(net.parameters(), lr=1e-2), dtype="fp16")
    scaler = tnet.grad_scaler
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 16
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    losses = []
    for i in range(30):
        loss = F.cross_entropy(tnet(x), y)
        if i == 3:
            before = [p.detach().clone() for p in net.parameters()]
            scale = scaler.get_scale()
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if i == 3:
            assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))
            assert scaler.get_scale() == scale / 2
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_grad_scaler_is_a_pass_through_for_bf16():
    """With bf16 the same scaler code runs unchanged: scale() returns the loss, step() steps."""
    net = nn.Linear(4, 2)
    tnet, opt = optimize_quietly(net, torch.optim.SGD(net.parameters(), lr=0.5), dtype="bf16")
    loss = tnet(torch.ones(1, 4)).sum()
    assert not tnet.grad_scaler.is_enabled() and tnet.grad_scaler.scale(loss) is loss
    weight = net.weight.detach().clone()
    loss.backward()
    tnet.grad_scaler.step(opt)
    assert not torch.equal(weight, net.weight)


def test_decorated_factory_and_train_step_as_in_the_readme():
    """@cpu_optimized factory + @cpu_optimized train step (function and method) train, under autocast."""
    seen = []

    @cpu_optimized(dtype="bf16")
    def make_training():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        return net, torch.optim.AdamW(net.parameters(), lr=1e-2)

    net, opt = make_training()
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))

    @cpu_optimized(dtype="bf16")
    def train_step(x, y, *, scale: float = 1.0):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        loss = F.cross_entropy(net(x), y) * scale
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    class Trainer:
        @cpu_optimized(dtype="bf16")
        def step(self, x, y):
            return train_step.__wrapped__(x, y)

    assert list(inspect.signature(train_step).parameters) == ["x", "y", "scale"]
    first = train_step(x, y).item()
    for _ in range(10):
        last = Trainer().step(x, y).item()
    assert seen == [torch.bfloat16] * 11 and last < first
    assert not torch.is_autocast_enabled("cpu")


def test_generator_train_loop_reenters_autocast_each_resume():
    """A decorated generator runs each step under autocast and the caller's code between steps without it."""
    net = nn.Linear(4, 2)
    tnet, opt = optimize_quietly(net, torch.optim.SGD(net.parameters(), lr=0.1), dtype="bf16")

    @cpu_optimized(dtype="bf16")
    def loop(n):
        for _ in range(n):
            loss = tnet(torch.randn(3, 4)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            yield torch.is_autocast_enabled("cpu"), loss.item()

    for inside, _ in loop(3):
        assert inside and not torch.is_autocast_enabled("cpu")


def test_users_own_fused_adagrad_stays_right_after_channels_last():
    """Adagrad(fused=True) made before cpuboost's channels_last (contiguous state) keeps a correct, saveable state.

    torch's CPU fused kernel walks state as flat memory: with mismatched strides it trains self-consistently
    but stores the state permuted, which a checkpoint then carries into any other layout.
    """
    spec = {"kind": "conv", "width": 8, "depth": 1, "bn": False, "dropout": 0.0, "seed": 11}
    data = batches(spec)
    plain, _ = make_pair(spec, {"name": "sgd", "kwargs": {}, "groups": 1})
    plain_opt = torch.optim.Adagrad(plain.parameters(), lr=0.05)
    expected = train(plain, plain_opt, data, STEPS)
    net, _ = make_pair(spec, {"name": "sgd", "kwargs": {}, "groups": 1})
    tnet, opt = optimize_quietly(net, torch.optim.Adagrad(net.parameters(), lr=0.05, fused=True), dtype="fp32")
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert train(tnet, opt, data, STEPS) == pytest.approx(expected, rel=1e-5)
    for index, state in plain_opt.state_dict()["state"].items():
        assert torch.allclose(opt.state_dict()["state"][index]["sum"], state["sum"], rtol=1e-5), index
