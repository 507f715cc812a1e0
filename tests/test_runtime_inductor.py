"""The compiled path (Inductor + freezing): few, small examples, because each compile costs seconds."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpuboost
from oracle import allowed_error, eager_autocast, rejection_justified, rung, verified

from nets import Branchy, StackNet, randomize_bn, run_in_threads

pytestmark = pytest.mark.slow


def _rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-6)).item()


@settings(max_examples=3)
@given(st.sampled_from(["fp32", "bf16"]), st.lists(st.sampled_from(["relu", "gelu", "silu"]), min_size=1,
                                                    max_size=2), st.booleans(), st.integers(0, 1000))
def test_compiled_conv_stacks_match_eager(dtype, acts, head_bn, seed):
    """Inductor-frozen conv stacks match eager fp32 within the dtype tolerance."""
    gen = torch.Generator().manual_seed(seed)
    net = randomize_bn(StackNet(3, [8] * len(acts), acts, [True] * len(acts), head_bn), gen).eval()
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        ref = net(x)
    model = cpuboost.optimize(net, dtype=dtype, backend="native", tune_budget=0)
    out = model(x)
    report = cpuboost.explain(model)
    dt = model._options.dtype
    own = eager_autocast(net, dt, x) if dt != torch.float32 else None
    assert out.dtype == torch.float32 and _rel_err(out, ref) <= allowed_error(dt, ref, own)
    torch.testing.assert_close(model(x), out)  # the cached entry gives the same answer again
    # the compiled graph itself, judged by the tests' own oracle (not only by cpuboost's verifier)
    from cpuboost.backends.inductor import build

    notes = []
    graph = build(model._work, (x,), {}, dt, notes.append)
    with torch.no_grad():
        compiled = graph(x)
    assert "C++ wrapper" in notes and _rel_err(compiled.float(), ref) <= allowed_error(dt, ref, own)
    record = rung(model, f"inductor {dtype}")  # built and verified (it may still lose the race to eager), or
    assert verified(record) or rejection_justified(record, dt, compiled, ref, own), str(report)  # justly refused


def test_compiled_control_flow_and_threads():
    """Value-dependent branches stay correct when compiled, also from several threads at once."""
    net = Branchy().eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=True)
    pos, neg = torch.ones(2, 4), -torch.ones(2, 4)
    with torch.no_grad():
        expected = {True: net(pos), False: net(neg)}
    assert cpuboost.explain(model).graphs == []
    torch.testing.assert_close(model(pos), expected[True])
    assert verified(rung(model, "inductor fp32")), str(cpuboost.explain(model))

    def worker(i):
        for j in range(10):
            flag = (i + j) % 2 == 0
            torch.testing.assert_close(model(pos if flag else neg), expected[flag])

    assert run_in_threads(worker, 4) == []


def test_inductor_config_is_not_changed_globally():
    """Freezing and the C++ wrapper are on only during the build; the global Inductor config is untouched."""
    import torch._inductor.config as inductor_config

    before = (inductor_config.freezing, inductor_config.cpp_wrapper)
    model = cpuboost.optimize(torch.nn.Linear(4, 4).eval(), dtype="fp32")
    model(torch.randn(2, 4))
    assert (inductor_config.freezing, inductor_config.cpp_wrapper) == before
    assert verified(rung(model, "inductor fp32")), str(cpuboost.explain(model))
