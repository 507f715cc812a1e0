"""Hypothesis-generated Conv/BN/Linear/activation/residual stacks on the eager-pass path vs eager fp32."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cpuboost
from oracle import allowed_error, eager_autocast, rejection_justified, rel_err, rung, verified

from nets import MLP, StackNet, randomize_bn

ACTS = st.sampled_from(["relu", "gelu", "silu", "none"])


@st.composite
def conv_nets(draw):
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.sampled_from([4, 8]), min_size=depth, max_size=depth))
    acts = draw(st.lists(ACTS, min_size=depth, max_size=depth))
    residual = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    net = StackNet(draw(st.sampled_from([1, 3])), widths, acts, residual, draw(st.booleans()))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    randomize_bn(net, gen)
    batch, size = draw(st.integers(2, 3)), draw(st.sampled_from([5, 8]))
    x = torch.randn(batch, net.blocks[0].conv.in_channels, size, size, generator=gen)
    return net.eval(), x


def _passes_output(model, x, dtype):
    """The eager-with-passes candidate's own answer (the working copy under the plan's precision), so the
    check holds whichever path won the race against eager."""
    from cpuboost.core.precision import PrecisionRunner

    with torch.no_grad():
        return PrecisionRunner(model._work, dtype)(x).float()


def _passes_verified_or_justly_refused(model, x, dt, ref, own):
    """The eager-with-passes rung passed verification, or was refused where the tests' own arithmetic agrees
    it strays too far (it then must not serve)."""
    record = rung(model, "eager+passes")
    if verified(record):
        return True
    assert cpuboost.explain(model).graphs[-1].path == "eager (original)", record.line()
    return rejection_justified(record, dt, _passes_output(model, x, dt), ref, own)


def _rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-6)).item()


@settings(max_examples=40)
@given(conv_nets(), st.sampled_from(["fp32", "bf16"]))
def test_conv_stacks_match_eager(net_and_input, dtype):
    """Eager passes (fold, channels_last, low-precision weights) stay within the dtype tolerance."""
    net, x = net_and_input
    with torch.no_grad():
        ref = net(x)
    model = cpuboost.optimize(net, dtype=dtype, fusion=False)
    out = model(x)
    dt = model._options.dtype
    assert out.dtype == ref.dtype and out.shape == ref.shape
    own = eager_autocast(net, dt, x) if dt != torch.float32 else None
    assert _rel_err(out, ref) <= allowed_error(dt, ref, own)
    assert _rel_err(_passes_output(model, x, dt), ref) <= allowed_error(dt, ref, own)
    report = cpuboost.explain(model)
    assert report.graphs[-1].path in ("eager+passes", "eager (original)")
    assert _passes_verified_or_justly_refused(model, x, dt, ref, own), str(report)
    assert "fold_batchnorm" in report.applied


@settings(max_examples=40)
@given(st.lists(st.integers(2, 12), min_size=2, max_size=4), st.integers(2, 6), st.sampled_from(["fp32", "bf16"]),
       st.integers(0, 2**16))
def test_mlps_with_batchnorm_match_eager(sizes, batch, dtype, seed):
    """Linear+BN1d folding and bf16 weights on MLPs of any shape stay within tolerance."""
    torch.manual_seed(seed)  # the Linear layers' init draws from the global generator: each example one model
    gen = torch.Generator().manual_seed(seed)
    net = randomize_bn(MLP(sizes), gen).eval()
    x = torch.randn(batch, sizes[0], generator=gen)
    with torch.no_grad():
        ref = net(x)
    model = cpuboost.optimize(net, dtype=dtype, fusion=False)
    out = model(x)
    dt = torch.float32 if dtype == "fp32" else torch.bfloat16
    own = eager_autocast(net, dt, x) if dt != torch.float32 else None
    assert _rel_err(out, ref) <= allowed_error(dt, ref, own)
    assert _rel_err(_passes_output(model, x, dt), ref) <= allowed_error(dt, ref, own)
    assert _passes_verified_or_justly_refused(model, x, dt, ref, own), str(cpuboost.explain(model))


@settings(max_examples=20)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(3, 9)), min_size=1, max_size=5))
def test_new_shapes_rebuild_and_stay_correct(shapes):
    """Every new input shape gets its own entry, checked against eager until its dynamic graph passed on two
    sizes, then sampled; answers match eager for each."""
    net = randomize_bn(MLP([3, 6, 2])).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False)
    for batch, _ in shapes:
        x = torch.randn(batch + 1, 3)
        with torch.no_grad():
            torch.testing.assert_close(model(x), net(x), rtol=1e-4, atol=1e-5)
    report = cpuboost.explain(model)
    assert len(report.graphs) == len({b + 1 for b, _ in shapes})
    assert all(g.verification.startswith(("ok", "is the reference", "size not checked", "eager: the reference"))
               for g in report.graphs), str(report)
    assert all(g.verification.startswith(("ok", "is the reference")) for g in report.graphs[:3]), str(report)


@settings(max_examples=6, deadline=None)
@given(width=st.sampled_from([8, 64]), batch=st.integers(1, 4), eager_wins=st.booleans())
def test_under_the_callers_autocast_every_call_answers_in_eagers_dtype(width, batch, eager_wins):
    """Inside the caller's own ``torch.autocast`` (Lightning's bf16-mixed, accelerate's), eager answers in bf16:
    so does the wrapped model, on the first call and later ones, whether eager itself or a rung serves."""
    torch.manual_seed(width + batch)
    net, x = randomize_bn(MLP([width, width, 4])).eval(), torch.randn(batch, width)
    # a tolerance no bf16 answer meets refuses the passes: eager itself serves
    model = cpuboost.optimize(net, backend="eager", dtype="bf16", tolerance=0.0 if eager_wins else None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = net(x).dtype
        answers = [model(x), model(x)]
    served = cpuboost.explain(model).graphs[0].path
    assert served == "eager (original)" if eager_wins else served in ("eager (original)", "eager+passes")
    assert expected == torch.bfloat16 and [a.dtype for a in answers] == [expected, expected], served
    with torch.no_grad():
        plain = net(x)
    assert all(rel_err(a.float(), plain) <= allowed_error(torch.bfloat16, plain) for a in answers)
