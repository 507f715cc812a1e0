"""The OpenVINO backend against eager fp32, with real OpenVINO (no mocks). Skipped where OpenVINO is absent."""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("openvino")
transformers = pytest.importorskip("transformers")

from cpuboost.backends.openvino import OpenVINOBuildError, build

from nets import Cancelling, run_in_threads

FP32_TOL = 1e-4   # max|diff| / max|eager fp32|, per output tensor
BF16_TOL = 3e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


@pytest.fixture(autouse=True)
def _two_threads(two_threads):
    """Every test here runs with two torch threads (the shared fixture in conftest restores the count)."""


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def conv_net() -> nn.Module:
    net = ConvNet()
    with torch.no_grad():  # BN statistics that are not the identity
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def conv_builds():
    """(net, built callable, notes) per dtype, built once for the module (a build takes seconds)."""
    cache: dict = {}

    def get(dtype):
        if dtype not in cache:
            net, notes = conv_net(), []
            cache[dtype] = (net, build(net, (torch.randn(2, 3, 32, 32),), {}, dtype, notes.append), notes)
        return cache[dtype]
    return get


@pytest.fixture(scope="module")
def bert():
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=500)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def bert_inputs(seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0  # padding, so the mask matters
    return {"input_ids": torch.randint(0, 500, (1, seq), generator=g), "attention_mask": mask}


@pytest.mark.parametrize("dtype, tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_conv_net_matches_eager_and_results_are_not_overwritten(conv_builds, dtype, tol):
    net, fn, notes = conv_builds(dtype)
    x, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, ref2 = net(x), net(x2)
    out = fn(x)
    kept = out.clone()
    out2 = fn(x2)  # the infer request reuses its output buffer: the first result must not change
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.equal(out, kept)
    assert rel_err(out, ref) <= tol and rel_err(out2, ref2) <= tol
    assert any("precision " + {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype] in n for n in notes), notes
    weights = sum(p.numel() * 4 for p in net.parameters())
    assert weights // 2 <= fn.weight_bytes <= 2 * weights  # BatchNorm may be folded into the conv
    with pytest.raises(TypeError):
        fn(x.double())


def test_bert_kwargs_model_output_dynamic_sequence_fp32(bert):
    """One build with a dynamic sequence dim serves two lengths; ModelOutput class, keys, dtypes, values."""
    notes = []
    fn = build(bert, (), bert_inputs(16), torch.float32, notes.append,
               dynamic_dims={"input_ids": [1], "attention_mask": [1]})
    assert any("dynamic dims" in n for n in notes), notes
    for seq in (16, 7):
        inputs = bert_inputs(seq, seed=seq)
        with torch.no_grad():
            ref = bert(**inputs)
        out = fn(**inputs)
        assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
        assert out.last_hidden_state.shape == (1, seq, 64)
        for key in ref:
            assert out[key].dtype == ref[key].dtype and out[key].shape == ref[key].shape
            assert rel_err(out[key], ref[key]) <= FP32_TOL, (seq, key)
    with pytest.raises(ValueError, match="call structure"):
        fn(inputs["input_ids"])  # positional instead of keyword


def test_a_token_length_is_bounded_by_the_position_table_and_other_dims_are_not(bert):
    """BERT's length dim converts as 1..512 (its position table: the CPU plugin runs a bounded length like a
    static one), the batch dim unbounded; lengths inside the bound answer as eager does."""
    notes = []
    fn = build(bert, (), {k: v.expand(2, -1) for k, v in bert_inputs(16).items()}, torch.float32, notes.append,
               dynamic_dims={"input_ids": [0, 1], "attention_mask": [0, 1]})
    dims = next(n for n in notes if n.startswith("OpenVINO dynamic dims"))
    assert "input_ids [?, 1..512]" in dims and "attention_mask [?, 1..512]" in dims, dims
    for batch, seq in ((2, 16), (3, 40), (1, 512)):
        inputs = {k: v.expand(batch, -1) for k, v in bert_inputs(seq, seed=seq).items()}
        with torch.no_grad():
            ref = bert(**inputs)
        assert rel_err(fn(**inputs).last_hidden_state, ref.last_hidden_state) <= FP32_TOL, (batch, seq)


def test_a_token_model_without_a_position_table_keeps_its_length_unbounded():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)

        def forward(self, input_ids):
            return self.embed(input_ids).sum(-1)

    notes = []
    fn = build(Tokens().eval(), (), {"input_ids": torch.randint(0, 50, (1, 8))}, torch.float32, notes.append,
               dynamic_dims={"input_ids": [1]})
    assert "input_ids [1, ?]" in next(n for n in notes if n.startswith("OpenVINO dynamic dims"))
    assert fn(input_ids=torch.randint(0, 50, (1, 700))).shape == (1, 700)


def test_bert_kwargs_static_bf16(bert):
    inputs = bert_inputs(16)
    fn = build(bert, (), inputs, torch.bfloat16, lambda _: None)
    for seed in (0, 1):  # same signature, other values
        inputs = bert_inputs(16, seed)
        with torch.no_grad():
            ref = bert(**inputs)
        out = fn(**inputs)
        assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
        for key in ref:
            assert out[key].dtype == torch.float32 and rel_err(out[key], ref[key]) <= BF16_TOL, key
    with pytest.raises(RuntimeError):
        fn(**bert_inputs(9))  # static shapes: another length is not served


def test_dynamic_dims_bad_name_is_refused(bert):
    with pytest.raises(ValueError, match="token_type_ids"):
        build(bert, (), bert_inputs(8), torch.float32, lambda _: None, dynamic_dims={"token_type_ids": [1]})


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x, scale: float = 2.0, bias=None):
        h = self.lin(x)
        logits = h * scale
        return {"logits": logits, "aux": None, "pair": (h.sum(-1), h.argmax(-1)), "n": 3,
                "rest": [torch.tanh(h), x, logits]}  # an input and a repeated tensor among the outputs


def test_dict_with_none_tuple_list_constant_and_strided_input():
    net = DictNet().eval()
    x = torch.randn(8, 3).t()  # not contiguous: copied for OpenVINO, and the copy must outlive the call
    fn = build(net, (x,), {"scale": 0.5}, torch.float32, lambda _: None)
    with torch.no_grad():
        ref = net(x, scale=0.5)
    out = fn(x, scale=0.5)
    assert type(out) is dict and list(out) == list(ref) and out["aux"] is None and out["n"] == 3
    assert type(out["pair"]) is tuple and type(out["rest"]) is list and len(out["rest"]) == 3
    assert out["pair"][1].dtype == torch.int64 and torch.equal(out["pair"][1], ref["pair"][1])
    assert torch.equal(out["rest"][1], x)
    for got, want in ((out["logits"], ref["logits"]), (out["pair"][0], ref["pair"][0]),
                      (out["rest"][0], ref["rest"][0]), (out["rest"][2], ref["logits"])):
        assert got.dtype == want.dtype and rel_err(got, want) <= FP32_TOL
    with pytest.raises(ValueError, match="call structure"):
        fn(x, scale=3.0)  # the non-tensor input was fixed at trace time


class Histogram(nn.Module):
    def forward(self, x):
        return torch.histc(x, bins=4)


class ArgmaxAsInt(nn.Module):
    def forward(self, x):
        return x * 2, int(x.argmax())


class Branchy(nn.Module):
    def forward(self, x):
        return x * 2 if x[0, 0] > x[0, -1] else x * 3  # data-dependent: a trace keeps one branch


def test_unsupported_op_raises_clear_error():
    with pytest.raises(OpenVINOBuildError) as info:
        build(Histogram().eval(), (torch.randn(16),), {}, torch.float32, lambda _: None)
    assert "aten::histc" in str(info.value).splitlines()[0]


@pytest.mark.parametrize("model, match", [(ArgmaxAsInt().eval(), "Python value that changes"),
                                          (Branchy().eval(), "specialised")])
def test_input_dependent_traces_are_refused(model, match):
    x = torch.arange(1.0, 9.0).reshape(1, 8) - 2.5  # x[0,0] < x[0,-1]; the flipped probe reverses it
    with pytest.raises(OpenVINOBuildError, match=match):
        build(model, (x,), {}, torch.float32, lambda _: None)


class SignBranch(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x * -5  # flipped and scaled, the values keep their sign


def test_a_branch_on_the_sign_is_refused():
    """The second-input check also negates floating inputs: a trace that froze ``x.sum() > 0`` never serves
    (found through a threaded runtime test that got the other branch's answer)."""
    with pytest.raises(OpenVINOBuildError, match="specialised"):
        build(SignBranch().eval(), (torch.ones(2, 4),), {}, torch.float32, lambda _: None)


def test_second_input_judges_bf16_by_eager_autocasts_own_error():
    """The second input is judged as the example is (eager autocast's error there times the multiplier): a bf16
    graph whose error is what bf16 itself makes passes (a fixed 0.1 bound refused it), while a trace that
    froze a branch is still refused in bf16."""
    net, x = Cancelling().eval(), torch.randn(4, 64)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            own = rel_err(net(x), ref)
    assert own > 0.1  # the old fixed bound would call this a frozen trace
    fn = build(net, (x,), {}, torch.bfloat16, lambda _: None)
    assert rel_err(fn(x), ref) <= 3 * own
    with pytest.raises(OpenVINOBuildError, match="specialised"):
        build(SignBranch().eval(), (torch.ones(2, 4),), {}, torch.bfloat16, lambda _: None)
    with pytest.raises(OpenVINOBuildError, match="specialised"):
        build(Branchy().eval(), (torch.arange(1.0, 9.0).reshape(1, 8) - 2.5,), {}, torch.bfloat16, lambda _: None)


def test_float16_not_native_is_refused_or_runs_f16():
    net, x = conv_net(), torch.randn(1, 3, 16, 16)
    try:
        fn = build(net, (x,), {}, torch.float16, lambda _: None)
    except OpenVINOBuildError as exc:
        assert "not run f16" in str(exc) or "not f16" in str(exc)
    else:
        with torch.no_grad():
            assert rel_err(fn(x), net(x)) <= 1e-2


def test_threads_share_one_callable(conv_builds):
    """Four threads calling one compiled model at once get the single-threaded answers (each thread has its
    own infer request); every worker must finish and none may raise."""
    _, fn, _ = conv_builds(torch.float32)
    xs = [torch.randn(2, 3, 32, 32) for _ in range(8)]
    expected = [fn(x) for x in xs]
    results: dict = {}

    def worker(t: int) -> None:
        results[t] = [fn(x) for x in xs for _ in range(3)][::3]

    assert run_in_threads(worker, 4) == []
    assert sorted(results) == [0, 1, 2, 3]
    assert all(len(got) == len(xs) and all(torch.equal(a, b) for a, b in zip(got, expected))
               for got in results.values())
