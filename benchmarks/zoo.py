"""A model zoo of real architectures (transformers configs, random weights): cpuboost against its peers.

    python benchmarks/zoo.py                                  # every model, one subprocess each
    python benchmarks/zoo.py --models resnet,bert,gpt2 --repeat 15 --json zoo.json --plot zoo.png
    python benchmarks/zoo.py --models resnet --dtypes fp32,int8   # add cpuboost fp32 / int8 paths
    python benchmarks/zoo.py --models resnet,regnet --dtypes int8 --batch 8   # every input (and calibration) b8
    python benchmarks/zoo.py --list                           # the model names
    python benchmarks/zoo.py --one bert --json -               # the worker: one model, JSON on stdout

Per model, in ONE process (its own subprocess, with a timeout), these paths are built and then timed in
interleaved rounds after their first call:

- ``eager_fp32``   the model as given (the baseline of every ratio);
- ``hand_compile`` ``torch.compile(model)`` with ``torch._inductor.config.freezing = True``, called under
  ``torch.autocast("cpu", torch.bfloat16)``: what a user writes by hand;
- ``openvino``      ``openvino.convert_model`` + ``compile_model(INFERENCE_PRECISION_HINT=bf16, LATENCY)``;
- ``cpuboost_bf16`` ``cpuboost.optimize(model, dtype="bf16")`` (plus ``cpuboost_fp32``/``cpuboost_int8`` with
  ``--dtypes``).

Every ratio is the median over rounds of same-round ratios (eager time / path time in that round), so
machine noise that hits a whole round cancels. Errors are measured on the main output (logits or last
hidden state) against eager fp32: max|diff| / max|ref| and cosine similarity. A model "passes" when
cpuboost bf16's error is within tolerance (max(3e-2, 3x eager autocast bf16's own error), the small multiple
of DESIGN.md's numerics contract) and its speed is >= 0.85x the best of eager fp32, hand compile and
OpenVINO.

Nothing is downloaded: every model is built from a config written here, with random weights that are
re-drawn so outputs are not trivial (BatchNorm running statistics, norm scales and biases included).
Inductor's on-disk cache and cpuboost's persistent cache are fresh temporary folders per model, so build times
are cold builds and every path is raced by the code under test (not decided by an earlier run); the one-time
Inductor start-up of a process is paid by a tiny warm-up compile before any path is built.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# --------------------------------------------------------------------------------------------- the models


@dataclasses.dataclass
class Spec:
    """One zoo entry, built: the model in eval mode, one call's inputs and what kind of model it is."""

    name: str
    kind: str  # vision | text | audio
    model: nn.Module
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    description: str = ""
    calibration: list | None = None  # example inputs for int8 (static): images, or random token ids

    def call(self, fn: Callable[..., Any]) -> Any:
        return fn(*self.args, **self.kwargs)

    def ov_example(self) -> Any:
        """The example input openvino.convert_model takes: the tensor, a tuple, or the kwargs dict."""
        if self.kwargs:
            return dict(self.kwargs)
        return self.args[0] if len(self.args) == 1 else self.args


def _tf():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def make_nontrivial(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw what a fresh init leaves constant, so outputs vary and folded/fused numerics are exercised.

    Linear/conv/embedding weights keep the architecture's own init (transformers' ``_init_weights``, which
    the constructors already ran); biases, norm scales/shifts and BatchNorm running statistics, which an
    init leaves at 0/1, get small random values. Everything is seeded: the same model every run.
    """
    g = _seeded(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) * 0.5 + 0.75)
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) or \
                type(module).__name__.endswith("RMSNorm") or type(module).__name__.endswith("LayerNorm"):
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            if isinstance(weight, torch.Tensor) and weight.is_floating_point():
                weight.copy_(weight + torch.randn(weight.shape, generator=g) * 0.1)
            if isinstance(bias, torch.Tensor) and bias.is_floating_point():
                bias.copy_(bias + torch.randn(bias.shape, generator=g) * 0.02)
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and module.bias is not None:
            bias = module.bias
            if bool((bias == 0).all()):
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.02)
    return model.eval()


BATCH = 1  # every model's batch (``--batch``): int8's integer kernels pay from a few rows up


def _image(config: Any, seed: int = 1) -> torch.Tensor:
    size = getattr(config, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    channels = getattr(config, "num_channels", 3)
    return torch.randn(BATCH, channels, size, size, generator=_seeded(seed))


def _vision(name: str, model: nn.Module, config: Any, description: str) -> Spec:
    pixels = _image(config)
    calibration = [_image(config, seed=100 + i) for i in range(4)]
    return Spec(name, "vision", make_nontrivial(model), (pixels,), description=description,
                calibration=calibration)


def _text(name: str, model: nn.Module, vocab: int, seq: int, description: str, decoder_seq: int = 0,
          mask: bool = True, token_types: bool = False) -> Spec:
    def tokens(seed: int) -> dict[str, torch.Tensor]:
        g = _seeded(seed)
        kwargs = {"input_ids": torch.randint(0, vocab, (BATCH, seq), generator=g)}
        if mask:
            kwargs["attention_mask"] = torch.ones(BATCH, seq, dtype=torch.long)
        if token_types:
            kwargs["token_type_ids"] = torch.zeros(BATCH, seq, dtype=torch.long)
        if decoder_seq:
            kwargs["decoder_input_ids"] = torch.randint(0, vocab, (BATCH, decoder_seq), generator=g)
        return kwargs

    return Spec(name, "text", make_nontrivial(model), (), tokens(1), description=description,
                calibration=[tokens(100 + i) for i in range(4)])


# Vision ------------------------------------------------------------------------------------------------

def resnet() -> Spec:
    tf = _tf()
    config = tf.ResNetConfig(num_labels=1000)  # ResNet-50
    return _vision("resnet", tf.ResNetForImageClassification(config), config, "ResNet-50, 224x224")


def convnext() -> Spec:
    tf = _tf()
    config = tf.ConvNextConfig(num_labels=1000)  # ConvNeXt-T: depths 3-3-9-3, 96..768
    return _vision("convnext", tf.ConvNextForImageClassification(config), config, "ConvNeXt-T, 224x224")


def vit() -> Spec:
    tf = _tf()
    config = tf.ViTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_labels=1000)
    return _vision("vit", tf.ViTForImageClassification(config), config, "ViT-S/16 (12 layers, 384), 224x224")


def swin() -> Spec:
    tf = _tf()
    config = tf.SwinConfig(num_labels=1000)  # Swin-T: embed 96, depths 2-2-6-2, window 7
    return _vision("swin", tf.SwinForImageClassification(config), config, "Swin-T, 224x224")


def mobilenet_v2() -> Spec:
    tf = _tf()
    config = tf.MobileNetV2Config(num_labels=1000)  # 1.0 width, 224
    return _vision("mobilenet_v2", tf.MobileNetV2ForImageClassification(config), config,
                   "MobileNetV2 1.0, 224x224")


def efficientnet() -> Spec:
    tf = _tf()  # the default config is B7 (600x600); B0 is width 1.0, depth 1.0, 224
    config = tf.EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0, image_size=224,
                                   hidden_dim=1280, num_labels=1000)
    return _vision("efficientnet", tf.EfficientNetForImageClassification(config), config,
                   "EfficientNet-B0, 224x224")


def regnet() -> Spec:
    tf = _tf()
    # RegNetY-800MF (the default config is a ~4 GF RegNetY whose grouped convs take ~2.5x ResNet-50 here)
    config = tf.RegNetConfig(embedding_size=32, hidden_sizes=[64, 144, 320, 784], depths=[1, 3, 8, 2],
                             groups_width=16, layer_type="y", num_labels=1000)
    return _vision("regnet", tf.RegNetForImageClassification(config), config, "RegNetY-800MF, 224x224")


def levit() -> Spec:
    tf = _tf()
    config = tf.LevitConfig(num_labels=1000)  # LeViT-128S
    return _vision("levit", tf.LevitForImageClassification(config), config, "LeViT-128S, 224x224")


def mobilevit() -> Spec:
    tf = _tf()
    config = tf.MobileViTConfig(num_labels=1000)  # MobileViT-S, 256x256
    return _vision("mobilevit", tf.MobileViTForImageClassification(config), config, "MobileViT-S, 256x256")


def dinov2() -> Spec:
    tf = _tf()  # the default is ViT-B/14; ViT-S/14 keeps a call near 100 ms on 2 cores
    config = tf.Dinov2Config(hidden_size=384, num_attention_heads=6, num_labels=1000)
    return _vision("dinov2", tf.Dinov2ForImageClassification(config), config, "DINOv2 ViT-S/14, 224x224")


# Text --------------------------------------------------------------------------------------------------

SEQ = 128


def bert() -> Spec:
    tf = _tf()
    config = tf.BertConfig()
    return _text("bert", tf.BertModel(config), config.vocab_size, SEQ, "BERT-base, seq 128", token_types=True)


def distilbert() -> Spec:
    tf = _tf()
    config = tf.DistilBertConfig()
    return _text("distilbert", tf.DistilBertModel(config), config.vocab_size, SEQ, "DistilBERT-base, seq 128")


def roberta() -> Spec:
    tf = _tf()
    config = tf.RobertaConfig(vocab_size=50265, max_position_embeddings=514, pad_token_id=1,
                              type_vocab_size=1)
    spec = _text("roberta", tf.RobertaModel(config), config.vocab_size, SEQ, "RoBERTa-base, seq 128")
    spec.kwargs["input_ids"].clamp_(min=3)  # no padding ids: RoBERTa positions skip pad tokens
    return spec


def albert() -> Spec:
    tf = _tf()  # the default config is xxlarge (hidden 4096); this is albert-base
    config = tf.AlbertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, embedding_size=128)
    return _text("albert", tf.AlbertModel(config), config.vocab_size, SEQ, "ALBERT-base, seq 128")


def deberta() -> Spec:
    tf = _tf()  # DeBERTa-v3-base's architecture, 4 of its 12 layers (disentangled attention is slow in eager)
    config = tf.DebertaV2Config(hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                                intermediate_size=3072, vocab_size=128100, max_position_embeddings=512,
                                relative_attention=True, position_buckets=256, pos_att_type=["p2c", "c2p"],
                                max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True,
                                position_biased_input=False, type_vocab_size=0)
    return _text("deberta", tf.DebertaV2Model(config), config.vocab_size, SEQ, "DeBERTa-v3-base (4 layers), seq 128")


def electra() -> Spec:
    tf = _tf()
    config = tf.ElectraConfig()  # ELECTRA-small discriminator: hidden 256, 12 layers
    return _text("electra", tf.ElectraModel(config), config.vocab_size, SEQ, "ELECTRA-small, seq 128")


def gpt2() -> Spec:
    tf = _tf()  # GPT-2 small's width and vocab, 6 of its 12 layers; prefill only (no KV cache returned)
    config = tf.GPT2Config(n_layer=6, use_cache=False)
    return _text("gpt2", tf.GPT2LMHeadModel(config), config.vocab_size, SEQ, "GPT-2 (6 layers, 768), LM head, seq 128")


def _small_causal_lm(name: str, family: str, kv_heads: int) -> Spec:
    """A 4-layer, 512-wide ``family`` causal LM (Llama, Qwen2) with grouped-query attention 8/``kv_heads``."""
    tf = _tf()
    config = getattr(tf, f"{family}Config")(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=kv_heads, vocab_size=32000, max_position_embeddings=2048, use_cache=False)
    return _text(name, getattr(tf, f"{family}ForCausalLM")(config), config.vocab_size, SEQ,
                 f"{family} (4 layers, 512, GQA 8/{kv_heads}), LM head 32k, seq 128")


def llama() -> Spec:
    return _small_causal_lm("llama", "Llama", kv_heads=4)


def qwen2() -> Spec:
    return _small_causal_lm("qwen2", "Qwen2", kv_heads=2)


def t5() -> Spec:
    tf = _tf()
    config = tf.T5Config(use_cache=False)  # T5-small: d_model 512, 6+6 layers
    return _text("t5", tf.T5ForConditionalGeneration(config), config.vocab_size, SEQ,
                 "T5-small, encoder seq 128, decoder seq 32", decoder_seq=32)


def bart() -> Spec:
    tf = _tf()  # the default config is bart-large; this is bart-base (768, 6+6 layers)
    config = tf.BartConfig(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                           decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, use_cache=False)
    return _text("bart", tf.BartForConditionalGeneration(config), config.vocab_size, SEQ,
                 "BART-base, encoder seq 128, decoder seq 32", decoder_seq=32)


# Audio -------------------------------------------------------------------------------------------------

def whisper() -> Spec:
    tf = _tf()  # Whisper-tiny's shape (384, 4+4 layers) on 10 s of log-mel features (30 s is 3x the encoder)
    config = tf.WhisperConfig(max_source_positions=500, d_model=384, encoder_layers=4, decoder_layers=4,
                              encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536,
                              decoder_ffn_dim=1536, use_cache=False)
    g = _seeded(1)
    features = torch.randn(BATCH, config.num_mel_bins, 2 * config.max_source_positions, generator=g)
    decoder = torch.randint(0, config.vocab_size, (BATCH, 16), generator=g)
    model = make_nontrivial(tf.WhisperForConditionalGeneration(config))
    return Spec("whisper", "audio", model, (), {"input_features": features, "decoder_input_ids": decoder},
                description="Whisper-tiny, 10 s log-mel (1000 frames), decoder seq 16")


def wav2vec2() -> Spec:
    tf = _tf()
    config = tf.Wav2Vec2Config()  # base: conv feature extractor + 12 layers of 768; 1 s of 16 kHz audio
    audio = torch.randn(BATCH, 16000, generator=_seeded(1))
    model = make_nontrivial(tf.Wav2Vec2ForCTC(config))
    return Spec("wav2vec2", "audio", model, (audio,), description="Wav2Vec2-base CTC, 1 s at 16 kHz")


BUILDERS: dict[str, Callable[[], Spec]] = {
    f.__name__: f for f in (
        resnet, convnext, vit, swin, mobilenet_v2, efficientnet, regnet, levit, mobilevit, dinov2,
        bert, distilbert, roberta, albert, deberta, electra, gpt2, llama, qwen2, t5, bart,
        whisper, wav2vec2,
    )
}


def build(name: str, seed: int = 0) -> Spec:
    """Build one zoo model (seeded, so the same weights every run)."""
    if name not in BUILDERS:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    return BUILDERS[name]()


def main_output(out: Any) -> torch.Tensor:
    """The output that errors are measured on: the first tensor (logits, or the last hidden state)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "values"):
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    else:
        raise TypeError(f"cannot find a tensor in an output of type {type(out).__name__}")
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise TypeError(f"no floating tensor in the output ({type(out).__name__})")


# ------------------------------------------------------------------------------------------- the worker

PEERS = ("eager_fp32", "hand_compile", "openvino")
LABELS = {"eager_fp32": "eager fp32", "hand_compile": "hand compile bf16", "openvino": "OpenVINO bf16",
          "cpuboost_bf16": "cpuboost bf16", "cpuboost_fp32": "cpuboost fp32", "cpuboost_int8": "cpuboost int8"}
MIN_TIMED_S = 0.02  # a timed sample loops over calls until it spans at least this long


def _log(msg: str) -> None:
    print(f"[zoo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _short(exc: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Summary:" in lines:  # OpenVINO's conversion report: its summary names the unconverted operations
        lines = lines[lines.index("Summary:") + 1:]
    text = " ".join(lines[:3]) if lines else ""
    return f"{type(exc).__name__}: {text}"[:limit]


def errors_vs(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """max|diff| / max|ref| and cosine similarity of the main output against eager fp32."""
    ref64, out64 = ref.detach().double().flatten(), out.detach().double().flatten()
    if ref64.shape != out64.shape:
        return {"rel_err": math.inf, "cosine": math.nan, "problem": f"shape {tuple(out.shape)} != {tuple(ref.shape)}"}
    if not torch.isfinite(out64).all():
        return {"rel_err": math.inf, "cosine": math.nan, "problem": "non-finite values"}
    rel = ((ref64 - out64).abs().max() / ref64.abs().max().clamp_min(1e-12)).item()
    cos = torch.nn.functional.cosine_similarity(ref64, out64, dim=0).item()
    return {"rel_err": rel, "cosine": cos}


class _Positional(nn.Module):
    """model(**dict(zip(keys, args))) returning only the main output: for OpenVINO's tracer, whose dict/None
    handling fails on some models (the retry after converting the model as given fails)."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return main_output(self.model(**dict(zip(self.keys, args))))


def _openvino(spec: Spec, ref: torch.Tensor) -> tuple[Callable[[], torch.Tensor], str]:
    import openvino as ov

    note = ""
    with torch.no_grad():
        try:
            converted = ov.convert_model(spec.model, example_input=spec.ov_example())
        except Exception as first:  # noqa: BLE001 (retry once through a main-output wrapper)
            keys = list(spec.kwargs)
            wrapper = _Positional(spec.model, keys).eval()
            example = tuple(spec.kwargs[k] for k in keys) if keys else tuple(spec.args)
            try:
                converted = ov.convert_model(wrapper, example_input=example)
            except Exception:  # noqa: BLE001 (any failure is a result to report)
                raise first from None
            note = f"converted through a main-output wrapper (as given: {_short(first, 100)})"
    compiled = ov.Core().compile_model(converted, "CPU", config={"INFERENCE_PRECISION_HINT": "bf16",
                                                                "PERFORMANCE_HINT": "LATENCY"})
    names = [i.get_any_name() for i in compiled.inputs]
    if spec.kwargs and not note:
        feed: Any = {k: v.numpy() for k, v in spec.kwargs.items() if k in names}
    else:
        feed = [v.numpy() for v in (spec.kwargs.values() if spec.kwargs else spec.args)]
    request = compiled.create_infer_request()
    # the output that matches eager's main output (the first one with its shape)
    outputs = request.infer(feed)
    index = 0
    for i, port in enumerate(compiled.outputs):
        if tuple(outputs[port].shape) == tuple(ref.shape):
            index = i
            break
    port = compiled.output(index)

    def call() -> torch.Tensor:
        return torch.from_numpy(request.infer(feed)[port].copy())

    return call, note


def _inductor_warmup() -> None:
    """Pay Inductor's one-time start-up in this process before any path's build is timed."""
    lin = nn.Linear(8, 8).eval()
    with torch.no_grad():
        torch.compile(lin)(torch.randn(2, 8))
    torch._dynamo.reset()


def _cpuboost_path(spec: Spec, dtype: str) -> tuple[Callable[[], Any], dict]:
    import cpuboost

    options: dict[str, Any] = {"dtype": dtype}
    if dtype == "int8" and spec.calibration is not None:
        options["calibration"] = spec.calibration
    model = cpuboost.optimize(spec.model, **options)
    return (lambda: spec.call(model)), {"model": model}


def _describe_cpuboost(model: Any) -> dict:
    import cpuboost

    report = cpuboost.explain(model)
    info: dict[str, Any] = {"report": str(report)}
    if report.graphs:
        g = report.graphs[-1]
        info.update(served=g.path, verification=g.verification, cpuboost_build_s=g.build_seconds,
                    fallbacks=[list(f) for f in g.fallbacks], race=[list(t) for t in g.timings])
    else:
        info.update(served="(no graph recorded)")
    return info


def run_one(name: str, repeat: int, dtypes: list[str], skip: set[str]) -> dict:
    """Build every path for one model, check its answer, then time them in interleaved rounds."""
    result: dict[str, Any] = {"model": name, "paths": {}, "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    spec = build(name)
    result.update(kind=spec.kind, description=spec.description, model_build_s=time.perf_counter() - t0)
    calls: dict[str, Callable[[], Any]] = {}
    paths: dict[str, dict] = result["paths"]

    with torch.no_grad():
        ref = main_output(spec.call(spec.model)).float()
        with torch.autocast("cpu", torch.bfloat16):
            autocast_out = main_output(spec.call(spec.model))
    result["autocast_bf16_error"] = errors_vs(ref, autocast_out.float())
    result["output_shape"] = list(ref.shape)
    calls["eager_fp32"] = lambda: spec.call(spec.model)
    paths["eager_fp32"] = {"status": "ok", "build_s": 0.0, **errors_vs(ref, ref)}

    _log(f"{name}: inductor warm-up")
    _inductor_warmup()

    for dtype in dtypes:  # cpuboost first: the hand compile may reuse kernels it compiled, not vice versa
        key = f"cpuboost_{dtype}"
        _log(f"{name}: building {key}")
        entry: dict[str, Any] = {}
        paths[key] = entry
        try:
            fn, held = _cpuboost_path(spec, dtype)
            start = time.perf_counter()
            with torch.no_grad():
                out = fn()
            entry["build_s"] = time.perf_counter() - start
            entry.update(errors_vs(ref, main_output(out).float()))
            start = time.perf_counter()  # a text model's other rungs race on in the background (build="auto"):
            held["model"].wait_for_builds()  # the peers are not timed beside it, and one call settles it
            with torch.no_grad():
                fn()
            entry["race_after_s"] = time.perf_counter() - start
            entry.update(_describe_cpuboost(held["model"]))
            entry["status"] = "ok"
            calls[key] = fn
        except Exception as exc:  # noqa: BLE001 (any failure is a result to report)
            entry["status"] = f"unsupported: {_short(exc)}" if dtype == "int8" else f"error: {_short(exc)}"
            entry["traceback"] = traceback.format_exc()[-3000:]

    if "hand_compile" not in skip:
        _log(f"{name}: building hand_compile")
        entry = paths.setdefault("hand_compile", {})
        try:
            torch._inductor.config.freezing = True
            compiled = torch.compile(spec.model)

            def hand() -> Any:
                with torch.autocast("cpu", torch.bfloat16):
                    return spec.call(compiled)

            start = time.perf_counter()
            with torch.no_grad():
                out = hand()
            entry["build_s"] = time.perf_counter() - start
            entry.update(errors_vs(ref, main_output(out).float()))
            entry["status"] = "ok"
            calls["hand_compile"] = hand
        except Exception as exc:  # noqa: BLE001 (any failure is a result to report)
            entry["status"] = f"error: {_short(exc)}"
            entry["traceback"] = traceback.format_exc()[-3000:]

    if "openvino" not in skip:
        _log(f"{name}: building openvino")
        entry = paths.setdefault("openvino", {})
        try:
            start = time.perf_counter()
            ov_call, note = _openvino(spec, ref)
            out = ov_call()
            entry["build_s"] = time.perf_counter() - start
            entry.update(errors_vs(ref, out.float()))
            entry["status"] = "ok"
            if note:
                entry["note"] = note
            calls["openvino"] = ov_call
        except Exception as exc:  # noqa: BLE001 (any failure is a result to report)
            entry["status"] = f"n/a ({_short(exc, 160)})"
            entry["traceback"] = traceback.format_exc()[-3000:]

    _log(f"{name}: timing {', '.join(calls)} in {repeat} interleaved rounds")
    result["timing"] = time_paths(calls, repeat)
    for key, samples in result["timing"]["per_call_s"].items():
        paths[key]["median_ms"] = statistics.median(samples) * 1e3
    return result


def time_paths(calls: dict[str, Callable[[], Any]], repeat: int) -> dict:
    """Interleaved rounds: each round calls every path (rotating the order) and keeps its seconds per call.
    A sample loops over enough calls to span MIN_TIMED_S so sub-millisecond models are measurable, after one
    untimed call of the same path: the first call after another runtime's (OpenVINO's TBB threads, torch's
    OpenMP ones) is slowed while that runtime's threads still spin, which a served model, called in a loop,
    never sees."""
    names = list(calls)
    loops: dict[str, int] = {}
    with torch.no_grad():
        for n in names:  # one untimed call each (caches, allocator), then size the loop
            calls[n]()
            start = time.perf_counter()
            calls[n]()
            one = time.perf_counter() - start
            loops[n] = max(1, min(1000, math.ceil(MIN_TIMED_S / max(one, 1e-6))))
        per_call: dict[str, list[float]] = {n: [] for n in names}
        for r in range(repeat):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                fn, k = calls[n], loops[n]
                fn()  # settle (see above)
                start = time.perf_counter()
                for _ in range(k):
                    fn()
                per_call[n].append((time.perf_counter() - start) / k)
    return {"per_call_s": per_call, "loops": loops, "rounds": repeat}


def ratios(result: dict, path: str) -> dict:
    """Median same-round ratios of ``path`` against eager fp32, hand compile, OpenVINO and the best of them."""
    t = result.get("timing", {}).get("per_call_s", {})
    if path not in t:
        return {}
    mine = t[path]
    out = {}
    for peer in PEERS:
        if peer in t and peer != path:
            out[f"vs_{peer}"] = statistics.median(p / m for p, m in zip(t[peer], mine))
    peers = [p for p in PEERS if p in t and p != path]
    if peers:
        best_round = [min(t[p][i] for p in peers) for i in range(len(mine))]
        out["vs_best"] = statistics.median(b / m for b, m in zip(best_round, mine))
        wins = {p: sum(1 for i in range(len(mine)) if t[p][i] == best_round[i]) for p in peers}
        out["best_peer"] = max(wins, key=wins.get)
    return out


def vs_cpuboost_bf16(result: dict, dtype: str) -> float | None:
    """Median same-round speed of cpuboost ``dtype`` over cpuboost bf16 (int8's own bar: >= 1.3x)."""
    t = result.get("timing", {}).get("per_call_s", {})
    mine, bf16 = t.get(f"cpuboost_{dtype}"), t.get("cpuboost_bf16")
    return statistics.median(b / m for b, m in zip(bf16, mine)) if mine and bf16 else None


def tolerance(result: dict, dtype: str) -> float:
    """The pass bar on max|diff|/max|ref|: fp32 1e-4; bf16 max(3e-2, 3x eager autocast bf16's own error)."""
    if dtype == "fp32":
        return 1e-4
    own = result.get("autocast_bf16_error", {}).get("rel_err", 0.0)
    if dtype == "int8":
        return max(1e-1, 3 * own)
    return max(3e-2, 3 * own)


def verdict(result: dict) -> dict:
    """Does cpuboost bf16 pass on this model: answer within tolerance and >= 0.85x the best peer."""
    cb = result.get("paths", {}).get("cpuboost_bf16")
    if result.get("failure"):
        return {"pass": False, "why": result["failure"]}
    if not cb or cb.get("status") != "ok":
        return {"pass": False, "why": (cb or {}).get("status", "cpuboost bf16 not run")}
    r = ratios(result, "cpuboost_bf16")
    tol = tolerance(result, "bf16")
    why = []
    if not cb["rel_err"] <= tol:
        why.append(f"error {cb['rel_err']:.2e} > tol {tol:.1e}")
    if r.get("vs_best", 0.0) < 0.85:
        why.append(f"{r.get('vs_best', math.nan):.2f}x best peer ({LABELS.get(r.get('best_peer'), '?')})")
    return {"pass": not why, "why": "; ".join(why)}


def worker(args: argparse.Namespace) -> int:
    global BATCH
    BATCH = args.batch
    dtypes = ["bf16"] + [d for d in args.dtypes.split(",") if d and d != "bf16"]
    skip = {p for p in args.skip.split(",") if p}
    try:
        result = run_one(args.one, args.repeat, dtypes, skip)
    except Exception as exc:  # noqa: BLE001 (any failure is a result to report)
        result = {"model": args.one, "failure": _short(exc, 300), "traceback": traceback.format_exc()[-3000:]}
    from cpuboost.bench.results import emit_json

    emit_json(result, args.json)
    return 0


# ------------------------------------------------------------------------------------------- the parent

def machine_info() -> dict:
    info: dict[str, Any] = {"cpu": "?", "flags": [], "logical_cpus": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(flags & {"avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8",
                                               "avx512_fp16"})
                break
    except OSError:
        pass
    for mod in ("transformers", "openvino"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"not importable ({type(exc).__name__})"
    info["loadavg_start"] = os.getloadavg()
    return info


def run_child(name: str, args: argparse.Namespace) -> dict:
    """One model in a fresh subprocess (own Inductor cache folder), killed after args.timeout seconds."""
    with tempfile.TemporaryDirectory(prefix=f"zoo-{name}-") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--json", out, "--repeat", str(args.repeat),
               "--dtypes", args.dtypes, "--skip", args.skip, "--batch", str(args.batch)]
        # cpuboost's persistent cache too: a decision kept by an earlier run (or older code) would skip the race
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"), PYTHONWARNINGS="ignore",
                   CPUBOOST_CACHE_DIR=os.path.join(tmp, "cpuboost"))
        if args.omp_wait != "inherit":
            env["OMP_WAIT_POLICY"] = args.omp_wait.upper()
        log_path = os.path.join(tmp, "stderr.log")
        start = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT if not args.verbose else None,
                                    env=env, start_new_session=True)
            try:
                proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: only what we started
                proc.wait()
        wall = time.perf_counter() - start
        with open(log_path, errors="replace") as f:
            tail = [line.rstrip() for line in f.read().splitlines() if line.strip()][-15:]
        if os.path.exists(out):
            with open(out) as f:
                result = json.load(f)
        elif proc.returncode is not None and proc.returncode < 0 and wall >= args.timeout:
            result = {"model": name, "failure": f"timeout after {args.timeout:.0f} s", "log_tail": tail}
        else:
            last = next((line for line in reversed(tail) if "Error" in line), tail[-1] if tail else "")
            result = {"model": name, "failure": f"worker exited {proc.returncode}: {last[:200]}", "log_tail": tail}
        if wall >= args.timeout:
            result["failure"] = f"timeout after {args.timeout:.0f} s"
        result["wall_s"] = wall
        return result


def _fmt_x(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}x"


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def report_lines(results: list[dict], extra: list[str]) -> list[str]:
    head = (f"{'model':13} {'kind':6} {'eager':>8} {'cpuboost served':24} {'err':>8} {'cos':>8} {'vs eager':>8} "
            f"{'vs hand':>8} {'vs OV':>8} {'vs best':>8} {'cb build':>8} {'hc build':>8} {'ov build':>8}  verdict")
    lines = [head, "-" * len(head)]
    notes: list[str] = []
    for res in results:
        name = res["model"]
        if res.get("failure"):
            lines.append(f"{name:13} {res.get('kind', '?'):6} FAILED: {res['failure']}")
            continue
        p = res["paths"]
        cb = p.get("cpuboost_bf16", {})
        r = ratios(res, "cpuboost_bf16")
        eager_ms = p["eager_fp32"].get("median_ms")
        served = cb.get("served", cb.get("status", "?")) if cb.get("status") == "ok" else cb.get("status", "?")
        v = res["verdict"]
        ov = p.get("openvino", {})
        hc = p.get("hand_compile", {})
        lines.append(
            f"{name:13} {res['kind']:6} {eager_ms:7.1f}ms {served[:24]:24} "
            f"{cb.get('rel_err', math.nan):8.1e} {cb.get('cosine', math.nan):8.5f} {_fmt_x(r.get('vs_eager_fp32')):>8} "
            f"{_fmt_x(r.get('vs_hand_compile')):>8} {_fmt_x(r.get('vs_openvino')):>8} {_fmt_x(r.get('vs_best')):>8} "
            f"{_fmt_s(cb.get('build_s')):>8} {_fmt_s(hc.get('build_s')):>8} {_fmt_s(ov.get('build_s')):>8}  "
            f"{'PASS' if v['pass'] else 'FAIL'}{': ' + v['why'] if v['why'] else ''}")
        for key in ("hand_compile", "openvino"):
            entry = p.get(key, {})
            if entry.get("status", "ok") != "ok":
                notes.append(f"  {name}: {LABELS[key]} {entry['status']}")
            elif entry.get("note"):
                notes.append(f"  {name}: {LABELS[key]} {entry['note']}")
            elif key in p and entry.get("rel_err", 0) > tolerance(res, "bf16"):
                notes.append(f"  {name}: {LABELS[key]} error {entry['rel_err']:.2e} (cosine {entry['cosine']:.5f})")
        if cb.get("status") == "ok" and cb.get("fallbacks"):
            for path, why in cb["fallbacks"]:
                notes.append(f"  {name}: cpuboost fell back from {path}: {why[:300]}")
        for d in extra:
            e = p.get(f"cpuboost_{d}", {})
            if e.get("status") == "ok":
                rr = ratios(res, f"cpuboost_{d}")
                notes.append(f"  {name}: cpuboost {d}: served {e.get('served')}, err {e['rel_err']:.1e} "
                             f"(tol {tolerance(res, d):.0e}), {_fmt_x(rr.get('vs_eager_fp32'))} eager, "
                             f"{_fmt_x(vs_cpuboost_bf16(res, d))} cpuboost bf16, {_fmt_x(rr.get('vs_best'))} best, "
                             f"build {_fmt_s(e.get('build_s'))}")
            else:
                notes.append(f"  {name}: cpuboost {d}: {e.get('status', 'not run')}")
    if notes:
        lines += ["", "notes:"] + notes
    return lines


def summary(results: list[dict]) -> dict:
    ran = [r for r in results if not r.get("failure")]
    passed = [r for r in ran if r["verdict"]["pass"]]
    vs_eager = [ratios(r, "cpuboost_bf16").get("vs_eager_fp32") for r in ran]
    vs_best = [ratios(r, "cpuboost_bf16").get("vs_best") for r in ran]
    vs_eager = [x for x in vs_eager if x]
    vs_best = [x for x in vs_best if x]

    def geo(xs: list[float]) -> float:
        return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan

    served: dict[str, int] = {}
    for r in ran:
        cb = r["paths"].get("cpuboost_bf16", {})
        key = cb.get("served", "error") if cb.get("status") == "ok" else "error"
        served[key] = served.get(key, 0) + 1
    int8 = {r["model"]: vs_cpuboost_bf16(r, "int8") for r in ran}
    int8 = {name: x for name, x in int8.items() if x}
    return {"models": len(results), "ran": len(ran), "failed": [r["model"] for r in results if r.get("failure")],
            "passed": len(passed), "geomean_vs_eager": geo(vs_eager), "geomean_vs_best": geo(vs_best),
            "served": served, "int8_vs_bf16": int8}


def plot(results: list[dict], path: str, extra: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in results if not r.get("failure")]
    keys = ["hand_compile", "openvino", "cpuboost_bf16"] + [f"cpuboost_{d}" for d in extra]
    fig, ax = plt.subplots(figsize=(min(18, max(8, 0.35 * len(ran) * len(keys))), 5))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = []
        for r in ran:
            t = r.get("timing", {}).get("per_call_s", {})
            values.append(statistics.median(e / m for e, m in zip(t["eager_fp32"], t[key])) if key in t else 0)
        ax.bar([j + i * width for j in range(len(ran))], values, width, label=LABELS[key])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(ran))])
    ax.set_xticklabels([r["model"] for r in ran], rotation=45, ha="right")
    ax.set_ylabel("speed-up over eager fp32 (median of same-round ratios)")
    ax.set_title(f"cpuboost zoo, batch {BATCH} (missing bar: path could not run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parent(args: argparse.Namespace) -> int:
    names = list(BUILDERS) if args.models in (None, "", "all") else [m.strip() for m in args.models.split(",")]
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    extra = [d for d in args.dtypes.split(",") if d and d != "bf16"]
    repro = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), "benchmarks/zoo.py", *sys.argv[1:]])
    info = machine_info()
    print(f"reproduce: {repro}")
    print(f"machine: {info['cpu']} ({', '.join(info['flags'])}), {info['logical_cpus']} logical CPUs, torch "
          f"{info['torch']} ({info['torch_threads']} threads), transformers {info['transformers']}, openvino "
          f"{info['openvino']}; load average {info['loadavg_start'][0]:.1f}; OMP_WAIT_POLICY in workers: "
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset') if args.omp_wait == 'inherit' else args.omp_wait.upper()}")
    global BATCH
    BATCH = args.batch
    print(f"{len(names)} model(s), batch {args.batch}, {args.repeat} interleaved rounds each, timeout "
          f"{args.timeout:.0f} s per model", flush=True)
    results = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", end=" ", flush=True)
        res = run_child(name, args)
        res["verdict"] = verdict(res)
        results.append(res)
        cb = res.get("paths", {}).get("cpuboost_bf16", {})
        status = res.get("failure") or (f"cpuboost served {cb.get('served')}, "
                                        f"{_fmt_x(ratios(res, 'cpuboost_bf16').get('vs_eager_fp32'))} eager"
                                        if cb.get("status") == "ok" else cb.get("status", "?"))
        print(f"{res['wall_s']:.0f} s: {status}", flush=True)
    info["loadavg_end"] = os.getloadavg()
    print()
    for line in report_lines(results, extra):
        print(line)
    s = summary(results)
    print()
    print(f"summary: {s['passed']}/{s['ran']} pass (cpuboost bf16 error within tolerance and >= 0.85x the best of "
          f"eager fp32 / hand compile / OpenVINO); geomean cpuboost bf16 vs eager fp32 "
          f"{_fmt_x(s['geomean_vs_eager'])}, "
          f"vs best {_fmt_x(s['geomean_vs_best'])}; served: "
          + ", ".join(f"{k} x{v}" for k, v in sorted(s["served"].items()))
          + (f"; failed to run: {', '.join(s['failed'])}" if s["failed"] else ""))
    if s["int8_vs_bf16"]:
        fast = sorted(name for name, x in s["int8_vs_bf16"].items() if x >= 1.3)
        print(f"int8: >= 1.3x cpuboost bf16 on {len(fast)}/{len(s['int8_vs_bf16'])} ({', '.join(fast) or 'none'})")
    print(f"load average at end {info['loadavg_end'][0]:.1f} (2 cores: ratios are same-round medians; absolute ms are "
          "not comparable across runs)")
    print(f"reproduce: {repro}")
    if args.json:
        for r in results:
            r["ratios"] = {k: ratios(r, k) for k in r.get("paths", {}) if k != "eager_fp32"}
        with open(args.json, "w") as f:
            json.dump({"command": repro, "machine": info, "summary": s, "results": results}, f, indent=1, default=str)
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot, extra)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_wait = "inherit" if os.environ.get("OMP_WAIT_POLICY") else "passive"
    parser.add_argument("--models", help=f"comma-separated subset (default: all): {', '.join(BUILDERS)}")
    parser.add_argument("--repeat", type=int, default=10, help="interleaved timing rounds per model (default 10)")
    parser.add_argument("--dtypes", default="bf16",
                        help="cpuboost dtypes: bf16 always; add fp32 and/or int8, e.g. --dtypes bf16,fp32,int8")
    parser.add_argument("--batch", type=int, default=1,
                        help="batch size of every model's input and calibration batches (default 1)")
    parser.add_argument("--skip", default="", help="peers to leave out: hand_compile, openvino")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per model (default 1200)")
    parser.add_argument("--json", help="write all results (with every sample) here; with --one: '-' = stdout")
    parser.add_argument("--plot", help="write a bar chart (PNG) of speed-ups over eager fp32")
    parser.add_argument("--omp-wait", choices=("passive", "active", "inherit"), default=default_wait,
                        help="OMP_WAIT_POLICY for the workers (default: passive unless OMP_WAIT_POLICY is set). "
                             "On a shared machine GNU OpenMP's default spin-wait made 2-thread torch 10-30x slower "
                             "(a thread spins on a barrier while its partner is descheduled); passive is the "
                             "stable choice there. OpenVINO (TBB) is not affected either way")
    parser.add_argument("--verbose", action="store_true", help="show each worker's progress log")
    parser.add_argument("--list", action="store_true", help="print the model names and exit")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the worker: one model, results as JSON
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(BUILDERS))
        return 0
    if args.one:
        return worker(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
