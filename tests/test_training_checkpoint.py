"""Checkpoints of optimized training: plain keys, fp32 values, exact resume, plain <-> optimized both ways."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training_cases import (batches, make_pair, model_specs, optimize_quietly, optimizer_specs, roundtrip, train)

FIRST, THEN = 3, 3
# The issue's resume tolerances: fp32 resumes within 1e-5, bf16 within 2e-2 of the uninterrupted run.
RESUME_TOL = {"fp32": 1e-5, "bf16": 2e-2}
# Plain eager and optimized runs use different kernels (fused step, channels_last convolutions).
CROSS_TOL = {"fp32": 1e-5, "bf16": 3e-2}


def _checkpoint(net, opt) -> dict:
    return roundtrip({"model": net.state_dict(), "opt": opt.state_dict()})


def _resume(ckpt: dict, mspec: dict, ospec: dict, dtype: str | None):
    """A fresh process's view: build the pair again, load the checkpoint, (optionally) optimize."""
    net, opt = make_pair(mspec, ospec)
    if dtype is None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        return net, opt
    net, opt = optimize_quietly(net, opt, dtype=dtype)
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    return net, opt


@settings(max_examples=30)
@given(model_specs, optimizer_specs, st.sampled_from(["fp32", "bf16"]))
def test_state_dicts_are_a_plain_models(mspec, ospec, dtype):
    """Optimized state_dicts have the plain pair's keys and param_group values, and only fp32 tensors."""
    data = batches(mspec)
    plain, plain_opt = make_pair(mspec, ospec)
    train(plain, plain_opt, data, 2)
    net, opt = optimize_quietly(*make_pair(mspec, ospec), dtype=dtype)
    train(net, opt, data, 2)
    model_sd, plain_sd = net.state_dict(), plain.state_dict()
    assert list(model_sd) == list(plain_sd)
    assert all(v.dtype == plain_sd[k].dtype for k, v in model_sd.items())
    opt_sd, plain_opt_sd = opt.state_dict(), plain_opt.state_dict()
    assert opt_sd["param_groups"] == plain_opt_sd["param_groups"]
    assert opt_sd["state"].keys() == plain_opt_sd["state"].keys()
    for index, state in opt_sd["state"].items():
        assert state.keys() == plain_opt_sd["state"][index].keys()
        for key, value in state.items():
            if torch.is_tensor(value):
                ref = plain_opt_sd["state"][index][key]
                assert (value.dtype, value.shape) == (ref.dtype, ref.shape), key
                assert value.dtype in (torch.float32, torch.int64), key


@settings(max_examples=30)
@given(model_specs, optimizer_specs, st.sampled_from(["fp32", "bf16"]))
def test_resume_from_checkpoint_equals_never_stopping(mspec, ospec, dtype):
    """Save after 3 steps, load into a freshly optimized pair, 3 more steps: the losses of an unbroken run."""
    data = batches(mspec)
    net, opt = optimize_quietly(*make_pair(mspec, ospec), dtype=dtype)
    unbroken = train(net, opt, data, FIRST + THEN)

    net, opt = optimize_quietly(*make_pair(mspec, ospec), dtype=dtype)
    head = train(net, opt, data, FIRST)
    ckpt = _checkpoint(net, opt)
    del net, opt
    net, opt = _resume(ckpt, mspec, ospec, dtype)
    tail = train(net, opt, data, THEN, start=FIRST)
    assert head + tail == pytest.approx(unbroken, rel=RESUME_TOL[dtype], abs=RESUME_TOL[dtype])


@settings(max_examples=30)
@given(model_specs, optimizer_specs, st.sampled_from(["fp32", "bf16"]), st.booleans())
def test_plain_and_optimized_checkpoints_load_both_ways(mspec, ospec, dtype, plain_first):
    """A plain run's checkpoint resumes under cpuboost, and a cpuboost checkpoint resumes plain."""
    data = batches(mspec)
    autocast = torch.bfloat16 if dtype == "bf16" else None
    plain, plain_opt = make_pair(mspec, ospec)
    reference = train(plain, plain_opt, data, FIRST + THEN, autocast=autocast)

    if plain_first:
        first, first_opt = make_pair(mspec, ospec)
        head = train(first, first_opt, data, FIRST, autocast=autocast)
        net, opt = _resume(_checkpoint(first, first_opt), mspec, ospec, dtype)
        tail = train(net, opt, data, THEN, start=FIRST)
        assert opt.param_groups[0].get("fused") in (True, None)  # fused again after loading a plain checkpoint
        if ospec["name"] in ("sgd", "adam", "adamw", "adagrad"):
            assert all(g["fused"] is True for g in opt.param_groups)
    else:
        first, first_opt = optimize_quietly(*make_pair(mspec, ospec), dtype=dtype)
        head = train(first, first_opt, data, FIRST)
        net, opt = _resume(_checkpoint(first, first_opt), mspec, ospec, None)
        tail = train(net, opt, data, THEN, start=FIRST, autocast=autocast)
        assert all(g.get("fused") in (None, False) for g in opt.param_groups)  # the plain optimizer stays plain
    assert head + tail == pytest.approx(reference, rel=CROSS_TOL[dtype], abs=CROSS_TOL[dtype])


def test_checkpoint_tensors_hold_the_trained_values():
    """The saved weights equal the live fp32 master weights bit for bit, in any memory layout."""
    mspec = {"kind": "conv", "width": 8, "depth": 1, "bn": True, "dropout": 0.0, "seed": 1}
    net, opt = optimize_quietly(*make_pair(mspec, {"name": "adamw", "kwargs": {}, "groups": 1}), dtype="bf16")
    train(net, opt, batches(mspec), 2)
    saved = _checkpoint(net, opt)
    for (name, live), value in zip(net.state_dict().items(), saved["model"].values()):
        assert value.dtype == live.dtype and torch.equal(value, live), name
    exp_avg = saved["opt"]["state"][0]["exp_avg"]
    assert exp_avg.dtype == torch.float32 and torch.equal(exp_avg, opt.state[net.conv1.weight]["exp_avg"])


def test_lr_scheduler_state_round_trips():
    """A scheduler's state_dict saved mid-run resumes the same learning-rate schedule on an optimized pair."""
    mspec = {"kind": "mlp", "width": 8, "depth": 1, "bn": False, "dropout": 0.0, "seed": 2}
    ospec = {"name": "sgd", "kwargs": {"momentum": 0.9}, "groups": 1}
    data = batches(mspec)
    net, opt = optimize_quietly(*make_pair(mspec, ospec), dtype="fp32")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    unbroken = train(net, opt, data, 6, scheduler=sched)

    net, opt = optimize_quietly(*make_pair(mspec, ospec), dtype="fp32")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    head = train(net, opt, data, 3, scheduler=sched)
    ckpt = roundtrip({"model": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    net, opt = _resume(ckpt, mspec, ospec, "fp32")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    sched.load_state_dict(ckpt["sched"])
    tail = train(net, opt, data, 3, start=3, scheduler=sched)
    assert head + tail == pytest.approx(unbroken, rel=1e-6)


@pytest.mark.parametrize("name", ["adam", "sgd", "adagrad"])
def test_fused_step_with_channels_last_matches_plain_after_loading_a_plain_checkpoint(name):
    """Contiguous state (a plain checkpoint, Adagrad's eager state) next to channels_last weights trains right.

    torch 2.13's CPU fused kernels do not check that state strides match the parameter's; cpuboost gives
    them the parameter's layout before each fused step.
    """
    mspec = {"kind": "conv", "width": 8, "depth": 1, "bn": False, "dropout": 0.0, "seed": 5}
    ospec = {"name": name, "kwargs": {"momentum": 0.9} if name == "sgd" else {}, "groups": 1}
    data = batches(mspec)
    plain, plain_opt = make_pair(mspec, ospec)
    reference = train(plain, plain_opt, data, 6)

    plain, plain_opt = make_pair(mspec, ospec)
    train(plain, plain_opt, data, 3)
    net, opt = _resume(_checkpoint(plain, plain_opt), mspec, ospec, "fp32")
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last) and opt.param_groups[0]["fused"]
    tail = train(net, opt, data, 3, start=3)
    assert tail == pytest.approx(reference[3:], rel=1e-5)
    state = opt.state[net.conv1.weight]
    assert all(v.stride() == net.conv1.weight.stride() for v in state.values() if v.dim() == 4)


def test_decorated_factory_resumes_exactly_as_in_the_issue():
    """@cpu_optimized factory: save model+opt, call the factory again, load both: the unbroken run's losses."""
    from cpuboost import cpu_optimized

    mspec = {"kind": "conv", "width": 8, "depth": 1, "bn": True, "dropout": 0.2, "seed": 9}
    ospec = {"name": "adamw", "kwargs": {"weight_decay": 0.05}, "groups": 2}
    make_training = cpu_optimized(dtype="bf16")(lambda: make_pair(mspec, ospec))
    data = batches(mspec)
    unbroken = train(*make_training(), data, 6)
    net, opt = make_training()
    head = train(net, opt, data, 3)
    ckpt = roundtrip({"model": net.state_dict(), "opt": opt.state_dict()})
    net2, opt2 = make_training()
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert all(g["fused"] for g in opt2.param_groups)
    tail = train(net2, opt2, data, 3, start=3)
    assert head + tail == pytest.approx(unbroken, rel=2e-2)
