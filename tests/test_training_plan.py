"""The training plan: which passes run for which model/optimizer, what they really change, and explain()."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import cpuboost
from cpuboost.errors import ModelModeError
from training_cases import PlainSGD, TinyConvNet, assert_same_state, optimize_quietly, state_of


def _step_ops(net, opt, x) -> set[str]:
    """The aten ops one optimizer step runs (what the profiler sees, not what flags claim)."""
    net(x).float().sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    opt.zero_grad()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("name,kwargs", [
    ("SGD", {"momentum": 0.9}), ("Adam", {}), ("AdamW", {"weight_decay": 0.1}), ("Adagrad", {}),
], ids=["sgd", "adam", "adamw", "adagrad"])
def test_fused_step_really_runs_the_fused_kernel(name, kwargs):
    """SGD/Adam/AdamW/Adagrad get torch's fused CPU kernel: the profiler shows aten::_fused_<name>_."""
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = getattr(torch.optim, name)(net.parameters(), lr=1e-2, **kwargs)
    tnet, topt = optimize_quietly(net, opt, dtype="fp32")
    assert topt is opt
    ops = _step_ops(tnet, topt, torch.randn(4, 8))
    assert f"aten::_fused_{name.lower()}_" in ops
    assert "fused_optimizer" in cpuboost.explain(tnet).applied


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.RMSprop(p, lr=1e-3), lambda p: PlainSGD(p),
    lambda p: type("MyAdamW", (torch.optim.AdamW,), {})(p, lr=1e-3),
], ids=["rmsprop", "custom", "adamw-subclass"])
def test_optimizers_without_a_fused_kernel_keep_their_own_step(make):
    """RMSprop, user-written optimizers and subclasses keep their step; the report says why."""
    net = nn.Linear(8, 2)
    opt = make(net.parameters())
    groups = [dict(g) for g in opt.param_groups]
    tnet, topt = optimize_quietly(net, opt, dtype="fp32")
    assert [dict(g) for g in topt.param_groups] == groups
    reason = cpuboost.explain(tnet).skipped["fused_optimizer"]
    assert type(opt).__name__ in reason and "own step" in reason
    assert not any("_fused_" in op for op in _step_ops(tnet, topt, torch.randn(3, 8)))


def test_explicit_fused_false_is_respected():
    """An optimizer built with fused=False keeps the for-loop step the user asked for."""
    net = nn.Linear(4, 2)
    opt = torch.optim.AdamW(net.parameters(), fused=False)
    tnet, topt = optimize_quietly(net, opt, dtype="fp32")
    assert topt.param_groups[0]["fused"] is False
    assert "fused=False" in cpuboost.explain(tnet).skipped["fused_optimizer"]


def test_passes_follow_dtype_and_model():
    """bf16 adds autocast; fp16 adds the grad scaler; channels_last only for conv nets; each skip has a reason."""
    conv = TinyConvNet(4, True, 0.0)
    bf16 = cpuboost.explain(optimize_quietly(conv, torch.optim.SGD(conv.parameters(), lr=0.1), dtype="bf16")[0])
    assert bf16.applied == ["train_mode", "channels_last", "autocast", "fused_optimizer"]
    assert "no loss scaling" in bf16.skipped["grad_scaler"] and "compile_training" in bf16.skipped["compiled_training"]
    assert conv.conv1.weight.is_contiguous(memory_format=torch.channels_last)

    mlp = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fp16 = cpuboost.explain(optimize_quietly(mlp, torch.optim.Adam(mlp.parameters()), dtype="fp16")[0])
    assert fp16.applied == ["train_mode", "autocast", "grad_scaler", "fused_optimizer"]
    assert "Conv2d" in fp16.skipped["channels_last"]

    fp32 = cpuboost.explain(optimize_quietly(mlp, torch.optim.Adam(mlp.parameters()), dtype="fp32")[0])
    assert fp32.skipped["autocast"] == "dtype=fp32" and fp32.skipped["grad_scaler"] == "dtype=fp32"
    text = str(fp32)
    assert "fused_optimizer" in text and "applied" in text and "train" in text


def test_registry_lists_the_train_passes_in_order():
    """list_passes('train') is the training plan's order."""
    names = cpuboost.list_passes("train")
    wanted = ["train_mode", "channels_last", "autocast", "grad_scaler", "fused_optimizer"]
    assert [n for n in names if n in wanted] == wanted and "compiled_training" in names


def test_model_without_optimizer_in_train_mode():
    """mode='train' with no optimizer: train mode and autocast apply, the optimizer pass says why not."""
    net = nn.Linear(4, 2)
    tnet = optimize_quietly(net, mode="train", dtype="bf16")
    report = cpuboost.explain(tnet)
    assert report.mode == "train" and report.skipped["fused_optimizer"] == "no optimizer given"
    out = tnet(torch.randn(3, 4))
    assert out.dtype == torch.float32 and out.requires_grad


def test_submodules_frozen_in_eval_stay_frozen():
    """A train-mode model whose BatchNorm the user froze in eval keeps it frozen (no blanket .train())."""
    net = TinyConvNet(4, True, 0.0)
    net.bn.eval()
    tnet, _ = optimize_quietly(net, torch.optim.SGD(net.parameters(), lr=0.1), dtype="fp32")
    assert tnet.training and not net.bn.training and net.conv1.training
    assert "left as they are" in str(cpuboost.explain(tnet))


def test_eval_model_with_optimizer_is_an_error_and_untouched():
    """An eval-mode model with an optimizer raises ModelModeError naming the fixes; nothing changes."""
    net = TinyConvNet(4, True, 0.0).eval()
    opt = torch.optim.AdamW(net.parameters())
    before = state_of(net, opt)
    with pytest.raises(ModelModeError, match=r"eval mode.*model\.train\(\).*mode='train'"):
        optimize_quietly(net, opt, dtype="bf16")
    assert_same_state(before, state_of(net, opt))


def test_eval_model_with_explicit_train_mode_is_switched_and_recorded():
    """mode='train' on an eval-mode model switches it to train mode and says so in explain()."""
    net = TinyConvNet(4, True, 0.0).eval()
    tnet, _ = optimize_quietly(net, torch.optim.AdamW(net.parameters()), dtype="bf16", mode="train")
    assert tnet.training and all(m.training for m in net.modules())
    assert "switched from eval to train" in str(cpuboost.explain(tnet))


def test_a_failing_train_pass_is_rolled_back_and_recorded():
    """A train pass that raises half-way is undone (layout, flags, optimizer groups); later passes still run."""
    def breaks_midway(model, ctx):
        model.to(memory_format=torch.channels_last)
        model.eval()
        ctx.optimizer.param_groups[0]["lr"] = 123.0
        ctx.optimizer.param_groups[0]["extra"] = True
        raise RuntimeError("half done")

    cpuboost.register_pass(breaks_midway, name="breaks_midway", modes="train", after="train_mode",
                           before="channels_last")
    try:
        net = TinyConvNet(4, False, 0.0)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        tnet, topt = optimize_quietly(net, opt, dtype="fp32")
    finally:
        from cpuboost.core.registry import unregister_pass

        unregister_pass("breaks_midway")
    report = cpuboost.explain(tnet)
    record = next(p for p in report.passes if p.name == "breaks_midway")
    assert record.status == "failed" and "half done" in record.detail
    assert tnet.training and topt.param_groups[0]["lr"] == 0.1 and "extra" not in topt.param_groups[0]
    assert "channels_last" in report.applied and "fused_optimizer" in report.applied
    assert topt.param_groups[0]["fused"] is True


def test_preparing_the_same_optimizer_twice_keeps_checkpoints_plain():
    """optimize() twice on one optimizer registers its hooks once; state_dict still shows the user's flags."""
    net = nn.Linear(4, 2)
    opt = torch.optim.Adam(net.parameters(), foreach=True)
    optimize_quietly(net, opt, dtype="fp32")
    tnet, topt = optimize_quietly(net, opt, dtype="fp32")
    assert "0 of 1 param group(s) (1 already fused)" in str(cpuboost.explain(tnet))
    group = topt.state_dict()["param_groups"][0]
    assert (group["fused"], group["foreach"]) == (None, True)
    assert (topt.param_groups[0]["fused"], topt.param_groups[0]["foreach"]) == (True, False)
