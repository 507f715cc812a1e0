"""Never stale: every kind of weight edit gives the eager model's answer at that moment, on every path."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cpuboost
from cpuboost.core.freshness import UNREAD_IN_EVAL

from nets import StackNet, randomize_bn


def _net(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return randomize_bn(StackNet(3, [8, 8], ["relu", "gelu"], [False, True], True), gen).eval()


def _eager(net, x):
    with torch.no_grad():
        return net(x)


def _edit(net, kind, gen):
    """One weight edit of ``kind``; none of them bumps the edited Parameter's version counter except 'inplace'."""
    conv = net.blocks[0].conv
    bn = net.blocks[1].bn
    with torch.no_grad():
        if kind == "data_mul":
            conv.weight.data.mul_(3)
        elif kind == "data_double":  # exponent only: the mantissa bits stay the same
            conv.weight.data.mul_(2)
        elif kind == "data_halve":
            net.fc.weight.data.mul_(0.5)
        elif kind == "data_neg":  # sign only
            conv.weight.data.neg_()
        elif kind == "data_assign":
            conv.weight.data = torch.randn(conv.weight.shape, generator=gen)
        elif kind == "new_parameter":
            net.fc.weight = nn.Parameter(torch.randn(net.fc.weight.shape, generator=gen))
        elif kind == "assign_state_dict":
            other = _net(int(torch.randint(1, 100, (1,), generator=gen)))
            net.load_state_dict(other.state_dict(), assign=True)
        elif kind == "load_state_dict":
            net.load_state_dict(_net(int(torch.randint(1, 100, (1,), generator=gen))).state_dict())
        elif kind == "bn_stats_data":
            bn.running_mean.data = torch.randn(bn.running_mean.shape, generator=gen)
        elif kind == "bn_stats_inplace":
            bn.running_var.mul_(2)
        elif kind == "inplace":
            net.fc.bias.add_(1.0)
        elif kind == "data_zero_rows":  # pruning-style
            conv.weight.data[: conv.weight.shape[0] // 2] = 0
        elif kind == "ema":
            for p in net.parameters():
                p.data.mul_(0.9).add_(0.1)


EDITS = ["data_mul", "data_double", "data_halve", "data_neg", "data_assign", "new_parameter", "assign_state_dict", "load_state_dict", "bn_stats_data",
         "bn_stats_inplace", "inplace", "data_zero_rows", "ema"]


@pytest.mark.parametrize("kind", EDITS)
def test_each_edit_is_seen_on_the_eager_path(kind):
    """fusion=False: after each kind of edit the answer is eager's new one, and the report says why."""
    net = _net()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), _eager(net, x), rtol=1e-4, atol=1e-5)
    before = _eager(net, x)
    _edit(net, kind, torch.Generator().manual_seed(1))
    after = _eager(net, x)
    assert not torch.allclose(before, after)  # the edit changes the answer, so staleness would show
    torch.testing.assert_close(model(x), after, rtol=1e-4, atol=1e-5)
    assert any(e.startswith("graphs dropped") for e in cpuboost.explain(model).events)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["data_mul", "data_neg", "new_parameter", "bn_stats_data"])
def test_edits_are_seen_on_the_compiled_path(kind):
    """fusion=True (a frozen Inductor graph holds the weights as constants): an edit rebuilds."""
    net = _net()
    model = cpuboost.optimize(net, dtype="fp32", backend="native", tune_budget=0)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    _edit(net, kind, torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x), _eager(net, x), rtol=1e-4, atol=1e-5)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(EDITS + ["none"]), st.integers(1, 3), st.sampled_from([6, 8])),
                min_size=1, max_size=6), st.integers(0, 2**16))
def test_fuzz_edits_and_shapes_never_stale(steps, seed):
    """Interleaved calls, random edits of every kind and random shapes: every answer is eager's now."""
    gen = torch.Generator().manual_seed(seed)
    net = _net(seed % 7)
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, tune_budget=0)
    for kind, batch, size in steps:
        if kind != "none":
            _edit(net, kind, gen)
        x = torch.randn(batch, 3, size, size, generator=gen)
        torch.testing.assert_close(model(x), _eager(net, x), rtol=1e-4, atol=1e-5)


def test_invalidate_by_hand_covers_the_unsampled_edit():
    """A hand edit of one element through .data may miss the sampled fingerprint; invalidate() is the fix."""
    net = _net()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    net.fc.bias.data[1] += 5.0
    model.invalidate("edited by hand")
    torch.testing.assert_close(model(x), _eager(net, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool])
@pytest.mark.parametrize("edit", ["double", "halve", "negate", "low_bit"])
def test_watch_sees_whole_element_edits_through_data(dtype, edit):
    """Every bit of a sampled element counts: sign, exponent and low mantissa edits through .data (which bump
    no version counter) are all seen, for buffers of every element size, strided ones included."""
    from cpuboost.core.freshness import WeightWatch

    net = nn.Module()
    values = torch.arange(1, 65).reshape(8, 8).t()  # a transposed (non-contiguous) buffer
    net.register_buffer("b", (values % 2).bool() if dtype == torch.bool else values.to(dtype))
    watch = WeightWatch(net)
    assert watch.changed() is None
    data = net.b.data
    if dtype == torch.bool:
        data.logical_not_()
    elif edit == "double":
        data.mul_(2)
    elif edit == "halve":
        data.copy_(data // 2 if not dtype.is_floating_point else data * 0.5)
    elif edit == "negate":
        data.neg_()
    else:  # the lowest bit of every element's integer view
        bits = data.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[data.element_size()])
        bits.bitwise_xor_(1)
    assert watch.changed() == "a weight's values changed (a write through .data)"


def test_the_watch_keeps_sampled_memory_alive_when_data_is_rebound():
    """After ``p.data = other`` drops the last reference to the old storage, the memory the sampler reads
    is still held (nothing allocated afterwards lands on it), so a check racing a rebinding thread never
    reads freed memory; the rebinding itself is reported."""
    from cpuboost.core.freshness import WeightWatch

    net = nn.Linear(256, 256)
    watch = WeightWatch(net)
    old_address = net.weight.data_ptr()
    net.weight.data = torch.randn(256, 256)
    fresh = [torch.empty(256, 256) for _ in range(64)]
    assert old_address not in {t.data_ptr() for t in fresh}
    assert watch.changed() == "a weight was rebound (.data = ...)"


def test_a_checkpoint_is_not_an_edit_but_a_config_switch_is(tmp_path):
    """transformers' save_pretrained writes ``config.architectures`` and ``config.dtype``: metadata no forward
    reads, so a checkpoint must not rebuild every graph; a config field forward reads still rebuilds."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cpuboost.core.freshness import WeightWatch

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64)).eval()
    watch = WeightWatch(model)
    model.save_pretrained(tmp_path)
    assert model.config.architectures == ["Qwen2ForCausalLM"]  # the write this test is about happened
    assert watch.changed() is None
    model.config.output_hidden_states = not model.config.output_hidden_states
    assert watch.changed() == "a plain attribute of the model (or its config) changed"


def _unread_edit(value):
    """Another valid value of the same kind (an unread attribute's edit)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value / 2 + 0.25
    if isinstance(value, tuple):
        return tuple(v + 1 for v in value)
    return 0.5  # momentum=None


def _instance(cls):
    gen = torch.Generator().manual_seed(0)
    made = {nn.Conv1d: lambda: (nn.Conv1d(3, 4, 3), torch.randn(2, 3, 9, generator=gen)),
            nn.Conv2d: lambda: (nn.Conv2d(3, 4, 3), torch.randn(2, 3, 9, 9, generator=gen)),
            nn.Conv3d: lambda: (nn.Conv3d(3, 4, 3), torch.randn(2, 3, 5, 5, 5, generator=gen)),
            nn.BatchNorm1d: lambda: (nn.BatchNorm1d(4), torch.randn(3, 4, 5, generator=gen)),
            nn.BatchNorm2d: lambda: (nn.BatchNorm2d(4), torch.randn(3, 4, 5, 5, generator=gen)),
            nn.BatchNorm3d: lambda: (nn.BatchNorm3d(4), torch.randn(3, 4, 3, 3, 3, generator=gen)),
            nn.Linear: lambda: (nn.Linear(5, 4), torch.randn(3, 5, generator=gen)),
            nn.LayerNorm: lambda: (nn.LayerNorm(5), torch.randn(3, 5, generator=gen)),
            nn.GroupNorm: lambda: (nn.GroupNorm(2, 4), torch.randn(3, 4, 5, generator=gen)),
            nn.Embedding: lambda: (nn.Embedding(10, 4), torch.randint(0, 10, (3, 5), generator=gen))}[cls]
    module, x = made()
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        randomize_bn(module, gen)
    return module.eval(), x


@pytest.mark.parametrize("cls", list(UNREAD_IN_EVAL), ids=lambda c: c.__name__)
def test_what_the_watch_skips_no_eval_forward_reads(cls):
    """The watch leaves out attributes and buffers of torch's own modules that their eval forward never reads:
    editing every one of them changes no output of this torch's modules, and the watch does not rebuild for
    them; an attribute forward does read (eps, stride, padding_idx...) is still watched."""
    from cpuboost.core.freshness import WeightWatch

    module, x = _instance(cls)
    attrs, buffers = UNREAD_IN_EVAL[cls]
    with torch.no_grad():
        before = module(x)
    watch = WeightWatch(module)
    for name in attrs:
        setattr(module, name, _unread_edit(getattr(module, name)))
    for name in buffers:
        getattr(module, name).add_(7)
    with torch.no_grad():
        torch.testing.assert_close(module(x), before, rtol=0, atol=0)
    assert watch.changed() is None
    read = next(n for n in ("eps", "stride", "padding_idx", "num_groups") if hasattr(module, n) and n not in attrs
                ) if cls is not nn.Linear else None
    if read is not None:
        setattr(module, read, _unread_edit(getattr(module, read)) if getattr(module, read) is not None else 1)
        assert watch.changed() == "a plain attribute of the model (or its config) changed"
    else:
        module.weight.data.mul_(2)
        assert watch.changed() == "a weight's values changed (a write through .data)"


@pytest.mark.parametrize("use_numpy", [True, False])
def test_both_samplers_see_a_write_through_data(use_numpy):
    """The sampled fingerprint reads through numpy where it is installed and through torch otherwise; each
    sees a one-element-per-sample write that bumps no version counter."""
    from cpuboost.core.freshness import _Sampler

    net = nn.Sequential(nn.Linear(64, 64), nn.Conv2d(4, 4, 3))
    sampler = _Sampler([p for p in net.parameters()], use_numpy=use_numpy)
    assert bool(sampler.numpy_gathers) == use_numpy and sampler.same()
    net[1].weight.data.view(-1)[::9].add_(1e-3)
    assert not sampler.same()
