"""int8 backend: real torchao PT2E / Inductor builds on tiny models, typed errors on bad requests.

Compiled builds are few and small (a tiny conv net with calibration, a tiny BERT without, a tiny MLP on
the weight-only path); everything else runs no compiler.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from cpuboost.backends import int8
from cpuboost.backends.inductor import RecompileRefused
from cpuboost.errors import (
    CalibrationError,
    CpuBoostError,
    InvalidOptionError,
    NotQuantizableError,
    QuantizationError,
)

# int8 error budget vs eager fp32: max|diff| / max|ref| and cosine (the bar is 0.1 and 0.99)
MAX_ERR = 0.1
MIN_COSINE = 0.99


@pytest.fixture(autouse=True)
def _two_threads(two_threads):
    """Every test here runs with two torch threads (the shared fixture in conftest restores the count)."""


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(self.block(y) + y)
        return self.head(y.mean((2, 3)))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = ConvNet()
    with torch.no_grad():  # non-trivial BN statistics, as a trained net would have
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return net.eval()


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     vocab_size=500)
    return BertModel(cfg).eval()


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict, training: bool = False) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in model.parameters())
    assert model.training is training


def assert_close(reference, output) -> dict:
    got = int8.accuracy(reference, output)
    assert got["max_err"] <= MAX_ERR and got["cosine"] >= MIN_COSINE, got
    return got


# ------------------------------------------------------------------ compiled builds (slow)


@pytest.mark.slow
def test_static_conv_net_with_calibration_is_close_and_leaves_model_and_inputs_alone():
    """Calibrated static PT2E int8 of a conv net: close to fp32, same type/dtype, nothing of the caller's changed."""
    import torch._inductor.config as inductor_config

    net = conv_net()
    before = snapshot(net)
    x = torch.randn(2, 3, 16, 16)
    x_before = x.clone()
    calibration = [(torch.randn(2, 3, 16, 16),) for _ in range(3)] + [torch.randn(2, 3, 16, 16)]
    notes: list[str] = []
    pre_grad, freezing = inductor_config.pre_grad_custom_pass, inductor_config.freezing

    run = int8.build(net, (x,), {}, calibration, notes.append)

    assert inductor_config.pre_grad_custom_pass is pre_grad and inductor_config.freezing == freezing
    assert_unchanged(net, before)
    with torch.no_grad():
        reference = net(x)
    out = run(x)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == reference.shape
    got = assert_close(reference, out)
    assert got["top1_agreement"] >= 0.5
    assert torch.equal(x, x_before)  # Inductor's in-place int8 sum post-op must not reach the caller's tensor
    other = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(net(other), run(other))
    with pytest.raises(RecompileRefused):  # a new shape is a new signature, never an unfrozen recompile
        run(torch.randn(3, 3, 16, 16))
    text = "\n".join(notes)
    assert "static PT2E" in text and "4 calibration batch" in text and "int8 quantize:" in text
    assert "int8 compile" in text


class OutlierInput(nn.Module):
    """Inputs with one channel 1000x the others (its weights 1000x smaller): u8 per-tensor quantization of fc0's
    input rounds every other channel to zero, so whole-model int8 is far off; fc1 and fc2 quantize fine."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc0, self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        with torch.no_grad():
            self.fc0.weight[:, 0] *= 1e-3

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.fc0(x)))))


def _outlier_batch(seed: int) -> torch.Tensor:
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))
    x[:, 0] *= 1000
    return x


@pytest.mark.slow
def test_static_int8_missing_the_bound_keeps_the_most_sensitive_layer_in_fp32():
    """Accuracy control: the whole-model graph misses int8's bound, so layers are ranked by the error each one
    alone causes and the worst (fc0) is kept in fp32; the rest is int8, judged on the example, the batches that
    set the scales and a held-out batch, and it is named in the accuracy summary explain() shows."""
    net = OutlierInput().eval()
    before = snapshot(net)
    x, calibration = _outlier_batch(0), [_outlier_batch(seed) for seed in range(1, 5)]
    notes: list[str] = []
    run = int8.build(net, (x,), {}, calibration, notes.append)
    assert_unchanged(net, before)
    text = "\n".join(notes)
    assert "outside int8's bound" not in run.accuracy_summary
    whole = next(line for line in notes if line.startswith("int8 static vs eager fp32"))
    assert float(whole.split("max_err ")[1].split(",")[0]) > 0.1, text  # the whole-model graph missed
    assert "layers kept in fp32: fc0" in run.accuracy_summary and "1 batch(es) held out" in run.accuracy_summary
    with torch.no_grad():
        unseen = _outlier_batch(99)
        assert_close(net(unseen), run(unseen))


def test_openvino_int8_missing_the_bound_keeps_the_most_sensitive_layer_in_fp32():
    """The OpenVINO int8 graph gets the same accuracy control: fc0 kept in fp32 (no FakeQuantize around it), the
    rest converted to OpenVINO's int8 kernels, judged with a held-out batch."""
    pytest.importorskip("openvino")
    from cpuboost.backends.int8 import via_openvino

    net = OutlierInput().eval()
    x, calibration = _outlier_batch(0), [_outlier_batch(seed) for seed in range(1, 5)]
    notes: list[str] = []
    run = via_openvino.build(net, (x,), {}, calibration, notes.append)
    assert "layers kept in fp32: fc0" in run.accuracy_summary, "\n".join(notes)
    with torch.no_grad():
        unseen = _outlier_batch(99)
        assert_close(net(unseen), run(unseen))


@pytest.mark.slow
@pytest.mark.parametrize("persisted", [False, True])
def test_dynamic_tiny_bert_without_calibration_answers_a_model_output(persisted, tmp_path):
    """Dynamic int8 of a tiny BERT called with kwargs: eager's ModelOutput type, fp32 fields, close values; the
    layers int8 leaves alone in bf16 where the CPU has AMX_BF16 (fp32 elsewhere), compiled in-process or by
    AOTInductor into a cache folder."""
    from cpuboost.machine.hardware import detect

    bert = tiny_bert()
    before = snapshot(bert)
    ids = torch.randint(0, 500, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    notes: list[str] = []

    run = int8.build(bert, (), {"input_ids": ids, "attention_mask": mask}, None, notes.append,
                     artifact_dir=tmp_path if persisted else None)
    compiled = [line for line in notes if line.startswith("int8 compile")]
    assert len(compiled) == 1 and ("kept in the persistent cache" in compiled[0]) == persisted, notes
    assert ("the rest in bf16" in compiled[0]) == ("AMX_BF16" in detect().features), notes

    assert_unchanged(bert, before)
    with torch.no_grad():
        reference = bert(input_ids=ids, attention_mask=mask)
    out = run(input_ids=ids, attention_mask=mask)
    assert type(out) is type(reference)
    assert out.last_hidden_state.dtype == torch.float32 and out.pooler_output.dtype == torch.float32
    assert_close(reference, out)
    assert any("dynamic PT2E" in line for line in notes), notes


@pytest.mark.slow
def test_weight_only_scheme_on_request():
    """scheme="weight_only" (never chosen automatically: slower than dynamic here) builds and stays close."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    before = snapshot(mlp)
    x = torch.randn(2, 64)
    notes: list[str] = []
    run = int8.build(mlp, (x,), {}, None, notes.append, scheme="weight_only")
    assert any("weight-only" in line for line in notes), notes
    assert_unchanged(mlp, before)
    with torch.no_grad():
        assert_close(mlp(x), run(x))


# ------------------------------------------------------------------ typed errors, nothing built


def test_calibration_of_the_wrong_shape_is_refused_before_any_work(monkeypatch):
    """A calibration batch shaped unlike the example input: CalibrationError, model untouched, no copy made."""
    net = conv_net().train()
    before = snapshot(net)
    monkeypatch.setattr(int8.quantize.copy, "deepcopy", lambda *a, **k: pytest.fail("deepcopy before validation"))
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(CalibrationError, match=r"calibration\[1\].*\(2, 3, 8, 8\)") as info:
        int8.build(net, (x,), {}, [(torch.randn(2, 3, 16, 16),), (torch.randn(2, 3, 8, 8),)], lambda _: None)
    assert isinstance(info.value, ValueError) and isinstance(info.value, CpuBoostError)
    assert_unchanged(net, before, training=True)


def test_empty_calibration_list_is_refused():
    """calibration=[] is a mistake (None means no data): CalibrationError, model untouched."""
    net = conv_net()
    before = snapshot(net)
    with pytest.raises(CalibrationError, match="empty"):
        int8.build(net, (torch.randn(2, 3, 16, 16),), {}, [], lambda _: None)
    with pytest.raises(CalibrationError, match="empty"):
        int8.build(net, (torch.randn(2, 3, 16, 16),), {}, iter(()), lambda _: None)
    assert_unchanged(net, before)


def test_model_without_linear_or_conv_is_not_quantizable():
    """No Linear/Conv layer: quantizable() says why and build raises NotQuantizableError."""
    model = nn.Sequential(nn.LayerNorm(8), nn.ReLU()).eval()
    before = snapshot(model)
    reason = int8.quantizable(model)
    assert reason and "no Linear" in reason and "LayerNorm" in reason
    with pytest.raises(NotQuantizableError, match="no Linear"):
        int8.build(model, (torch.randn(2, 8),), {}, None, lambda _: None)
    with pytest.raises(NotQuantizableError):
        int8.build(model, (torch.randn(2, 8),), {}, [(torch.randn(2, 8),)], lambda _: None)
    assert_unchanged(model, before)
    assert int8.quantizable(conv_net()) is None and int8.quantizable(tiny_bert()) is None


def test_conv_only_model_without_calibration_asks_for_calibration():
    """Dynamic int8 covers Linear layers only: a conv-only model without data is told to calibrate."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    before = snapshot(model)
    with pytest.raises(NotQuantizableError, match="calibration="):
        int8.build(model, (torch.randn(1, 3, 8, 8),), {}, None, lambda _: None)
    assert_unchanged(model, before)


def test_scheme_requests_are_checked_before_any_work():
    """scheme="static" without data and an unknown scheme are typed errors; the model is untouched."""
    net = conv_net()
    before = snapshot(net)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(CalibrationError, match="needs calibration"):
        int8.build(net, (x,), {}, None, lambda _: None, scheme="static")
    with pytest.raises(InvalidOptionError, match="dynamic"):
        int8.build(net, (x,), {}, None, lambda _: None, scheme="int4")
    assert_unchanged(net, before)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)


def test_dynamic_falls_back_to_torchao_when_export_fails():
    """No exportable graph: dynamic int8 quantizes the module itself through torchao instead, and says so."""
    notes: list[str] = []
    model = Branchy().eval()
    quantized, scheme, patches = int8.quantize_copy(model, (torch.ones(4, 8),), {}, [], "dynamic", notes.append)
    assert scheme == "dynamic_torchao" and patches["freezing"] is True
    assert len(notes) == 1 and "PT2E failed" in notes[0] and "torchao" in notes[0]
    assert type(quantized.a.weight).__name__ == "Int8Tensor" and type(quantized.b.weight).__name__ == "Int8Tensor"


def test_static_int8_of_a_model_export_cannot_capture_is_a_typed_error():
    """torch.export fails on data-dependent control flow: QuantizationError, the model untouched."""
    model = Branchy().eval()
    before = snapshot(model)
    x = torch.ones(4, 8)
    with pytest.raises(QuantizationError, match="int8 static quantization of Branchy failed") as info:
        int8.build(model, (x,), {}, [x], lambda _: None)
    assert isinstance(info.value, RuntimeError) and info.value.__cause__ is not None
    assert_unchanged(model, before)


@pytest.mark.parametrize("calibration, match", [
    (torch.randn(2, 3), "iterable"),
    ({"x": torch.randn(2, 3)}, "iterable"),
    ([(torch.randn(2, 3), torch.randn(2, 3))], "positional"),
    ([{"y": torch.randn(2, 3)}], "keyword"),
    ([(torch.randn(2, 3, dtype=torch.float64),)], "float64"),
    ([(torch.randn(2, 3), 3)], "positional"),
    ([42], "int"),
], ids=["bare-tensor", "bare-dict", "extra-arg", "wrong-kwarg", "wrong-dtype", "extra-constant", "not-an-input"])
def test_check_calibration_rejects_inputs_unlike_the_example(calibration, match):
    """Each way a calibration set can differ from the example input is a CalibrationError that says how."""
    with pytest.raises(CalibrationError, match=match):
        int8.check_calibration(calibration, (torch.randn(2, 3),), {})


def test_check_calibration_normalises_and_is_idempotent():
    """Tensors, tuples, lists and dicts become (args, kwargs) pairs; normalising twice changes nothing."""
    x = torch.randn(2, 3)
    assert int8.check_calibration(None, (x,), {}) == []
    batches = int8.check_calibration([x, (x,), [x]], (x,), {})
    assert [(len(a), k) for a, k in batches] == [(1, {})] * 3
    assert int8.check_calibration(batches, (x,), {}) == batches
    ids = torch.zeros(2, 5, dtype=torch.long)
    pairs = int8.check_calibration(({"input_ids": ids} for _ in range(2)), (), {"input_ids": ids})
    assert [(a, list(k)) for a, k in pairs] == [((), ["input_ids"])] * 2


def test_accuracy_reports_error_cosine_and_top1():
    """accuracy(): relative max error, lowest cosine over floating leaves, top-1 agreement on logits."""
    from transformers.modeling_outputs import SequenceClassifierOutput

    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    same = int8.accuracy({"logits": logits}, {"logits": logits.clone()})
    assert same == {"max_err": 0.0, "cosine": pytest.approx(1.0), "top1_agreement": 1.0}
    flipped = logits.clone()
    flipped[1] = torch.tensor([1.0, 2.0, 3.3])
    got = int8.accuracy(SequenceClassifierOutput(logits=logits), SequenceClassifierOutput(logits=flipped))
    assert got["max_err"] == pytest.approx(2.3 / 3.0) and got["top1_agreement"] == 0.5 and got["cosine"] < 0.9
    hidden = torch.randn(2, 4, 8)
    assert "top1_agreement" not in int8.accuracy((hidden, hidden), (hidden, hidden))
    assert int8.accuracy(hidden, hidden[:1])["max_err"] == float("inf")
    assert int8.accuracy(torch.ones(3), torch.ones(3).bfloat16())["max_err"] == 0.0


def test_graphs_without_convolutions_mix_with_bf16_and_only_on_amx():
    from cpuboost.machine.hardware import detect

    mixed = torch.bfloat16 if "AMX_BF16" in detect().features else torch.float32
    linear_only, convolutional = nn.Sequential(nn.Linear(8, 8), nn.GELU()), ResidualConvs()
    assert int8.mixing_dtype("dynamic") == mixed and int8.mixing_dtype("dynamic", linear_only) == mixed
    assert int8.mixing_dtype("static", linear_only) == mixed
    assert int8.mixing_dtype("static", convolutional) == torch.float32 and int8.mixing_dtype("static") == torch.float32
    assert int8.mixing_dtype("dynamic_torchao", linear_only) == torch.float32


class ResidualConvs(nn.Module):
    """Two ``relu(conv(x) + x)`` blocks: the stock x86 quantizer's Conv+add+ReLU pattern."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv0, self.conv1 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.conv0(x) + x)
        return torch.relu(self.conv1(x) + x)


def _quantized_add_inputs(graph) -> int:
    """How many inputs of the graph's adds come out of a dequantize (a u8 round trip)."""
    adds = [n for n in graph.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    return sum("dequantize" in str(arg.target) for n in adds for arg in n.args if hasattr(arg, "target"))


@pytest.mark.parametrize("float_residual", [False, True])
def test_accuracy_control_keeps_the_residual_stream_in_floating_point(float_residual):
    """The stock quantizer requantizes the residual stream at every add (its error passes undamped from block
    to block); the accuracy-control retry quantizes each conv's input and weight only, the adds stay float."""
    from cpuboost.backends.int8.quantize import _pt2e

    net = ResidualConvs().eval()
    x = torch.randn(2, 8, 8, 8)
    graph = _pt2e(net, (x,), {}, [((torch.randn(2, 8, 8, 8),), {}) for _ in range(2)], float_residual=float_residual)
    convs = [n for n in graph.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 2 and all("dequantize" in str(n.args[0].target) for n in convs)  # inputs still int8
    assert (_quantized_add_inputs(graph) == 0) == float_residual


def tiny_roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=500, max_position_embeddings=64, pad_token_id=1, type_vocab_size=1,
                        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    return RobertaModel(cfg).eval()


def _roberta_tokens(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 500, (2, 16), generator=g), "attention_mask": torch.ones(2, 16).long()}


@pytest.mark.parametrize("float_residual", [False, True])
def test_static_int8_leaves_integer_tensors_unobserved(float_residual):
    """RoBERTa computes its position ids with integer add/mul, which the x86 quantizer annotates by op: a
    histogram observer on an int32 tensor failed the whole static quantization ("histogram_cpu" not
    implemented for 'Int'). Integer tensors now carry no observer and the Linears are still int8."""
    from cpuboost.backends.int8.quantize import _pt2e

    model = tiny_roberta()
    kwargs = _roberta_tokens(1)
    graph = _pt2e(model, (), kwargs, [((), _roberta_tokens(100 + i)) for i in range(2)],
                  float_residual=float_residual)
    nodes = [n for n in graph.graph.nodes if n.op == "call_function"]
    quantized = [n for n in nodes if "quantize_per_tensor" in str(n.target)]
    assert quantized and all(n.args[0].meta["val"].is_floating_point() for n in quantized
                             if "val" in n.args[0].meta)
    assert sum("linear" in str(n.target) and "dequantize" in str(n.args[0].target) for n in nodes) >= 8
    with torch.no_grad():
        assert_close(model(**kwargs), graph(**kwargs))
