"""transformers pipelines and Trainer take ``cpuboost.optimize(model)`` where they take the model itself."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cpuboost
from cpuboost.integrations.transformers import trainer_parts
from frameworks import (TEXTS, VOCAB, LabelledTexts, TransformersLog, bert, gpt2, reset_accelerate, same_weights,
                        tokenizer)
from oracle import allowed_error, rel_err

transformers = pytest.importorskip("transformers")
BF16 = torch.bfloat16


def _scores(task: str, answer) -> np.ndarray:
    """The continuous part of a pipeline's answer, in a fixed order (argmax labels may swap on near-ties)."""
    if task == "feature-extraction":
        return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in answer])
    rows = answer if isinstance(answer[0], list) else [answer]
    if task == "fill-mask":
        return np.array([[d["score"] for d in sorted(r, key=lambda d: d["token"])] for r in rows]).ravel()
    if task == "token-classification":
        return np.array([d["score"] for r in rows for d in r], dtype=np.float64)
    return np.array([[d["score"] for d in sorted(r, key=lambda d: d["label"])] for r in rows]).ravel()


def _image_parts():
    from PIL import Image

    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(20 + 4 * i, 24, 3) * 255).astype("uint8")) for i in range(3)]
    processor = transformers.ViTImageProcessor(size={"height": 16, "width": 16})
    return transformers.ViTForImageClassification(cfg), {"image_processor": processor}, images, {"top_k": 3}


def _text_parts(head: str, task: str, tmp_path):
    inputs = ["the cat [MASK] on the mat", "a [MASK] movie"] if task == "fill-mask" else TEXTS
    call = {"text-classification": {"top_k": None}, "fill-mask": {"top_k": VOCAB}}.get(task, {})
    return bert(head, num_labels=3), {"tokenizer": tokenizer(tmp_path)}, inputs, call


SCORED = {
    "text-classification": "BertForSequenceClassification",
    "token-classification": "BertForTokenClassification",
    "feature-extraction": "BertModel",
    "fill-mask": "BertForMaskedLM",
    "image-classification": None,
}


def _pipelines(task: str, model, parts: dict):
    """The plain pipeline and one over ``cpuboost.optimize(model)``, with transformers' log of the latter."""
    plain = transformers.pipeline(task, model=model.eval(), **parts)
    optimized = cpuboost.optimize(model, dtype="bf16", backend="eager")
    with TransformersLog() as log:
        fast = transformers.pipeline(task, model=optimized, **parts)
    return plain, fast, optimized, log


@pytest.mark.parametrize("task", sorted(SCORED))
def test_pipeline_answers_within_bf16_tolerance_and_logs_no_error(task, tmp_path):
    """Each pipeline takes the optimized model unchanged: no "not supported" log, cpuboost serves the calls
    (batch 1 and padded batches), scores within what bf16 autocast itself moves them."""
    model, parts, inputs, call = (_image_parts() if SCORED[task] is None
                                  else _text_parts(SCORED[task], task, tmp_path))
    plain, fast, optimized, log = _pipelines(task, model, parts)
    assert not log.messages("not supported"), log.messages("")
    for batch in (1, 2):
        expected = plain(inputs, batch_size=batch, **call)
        with torch.autocast("cpu", dtype=BF16):
            own = plain(inputs, batch_size=batch, **call)
        got = fast(inputs, batch_size=batch, **call)
        ref, out = torch.from_numpy(_scores(task, expected)), torch.from_numpy(_scores(task, got))
        assert out.shape == ref.shape
        limit = allowed_error(BF16, ref, torch.from_numpy(_scores(task, own)))
        assert rel_err(out, ref) <= limit, (task, batch, rel_err(out, ref), limit)
    graphs = cpuboost.explain(optimized).graphs
    assert len(graphs) >= 2  # one per new signature: cpuboost's forward served the pipeline
    if task not in ("feature-extraction", "fill-mask"):  # (those check no class) the log check can fail:
        with TransformersLog() as control:  # a class outside the task mapping is reported
            transformers.pipeline(task, model=_renamed(model), **parts)
        assert control.messages("not supported")


def _renamed(model):
    """The same model under a class name no task mapping holds (what an opaque wrapper looked like before)."""
    return type("OpaqueWrapper", (type(model),), {})(model.config)


def _speech_parts(tmp_path):
    vocab = {"<pad>": 0, "<unk>": 1, "|": 2, **{c: i + 3 for i, c in enumerate("abcdefghij")}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    cfg = transformers.Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
                                      conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=2)
    torch.manual_seed(0)
    extractor = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                      do_normalize=True, return_attention_mask=False)
    parts = {"tokenizer": transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json")),
             "feature_extractor": extractor}
    audio = [np.random.RandomState(i).randn(4000 + 1500 * i).astype("float32") for i in range(3)]
    return transformers.Wav2Vec2ForCTC(cfg), parts, audio


def test_speech_recognition_pipeline(tmp_path):
    """automatic-speech-recognition (CTC): no "not supported" log; the logits the optimized model gave the
    pipeline are within bf16's tolerance of the plain model's (CTC's argmax text may flip on near-ties, so the
    transcript is compared exactly only when an fp32 path served)."""
    model, parts, audio = _speech_parts(tmp_path)
    plain, fast, optimized, log = _pipelines("automatic-speech-recognition", model, parts)
    assert not log.messages("not supported")
    served = []
    optimized.register_forward_hook(lambda module, args, out: served.append(out.logits))
    expected, got = plain(audio), fast(audio)
    assert len(served) == len(audio) and all(g["text"] for g in got)
    for logits, clip in zip(served, audio):
        features = parts["feature_extractor"](clip, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            reference = model(**features).logits
            with torch.autocast("cpu", dtype=BF16):
                own = model(**features).logits.float()
        assert rel_err(logits, reference) <= allowed_error(BF16, reference, own)
    if cpuboost.explain(optimized).graphs[-1].dtype in ("", "fp32"):  # eager or fp32 served: the same text
        assert got == expected


def test_text_generation_pipeline_uses_cpuboost_generate(tmp_path):
    """text-generation runs through cpuboost's generate(): no "not supported" log, prompt kept, tokens added."""
    model = gpt2()
    plain, fast, optimized, log = _pipelines("text-generation", model, {"tokenizer": tokenizer(tmp_path)})
    assert not log.messages("not supported")
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "return_tensors": True}
    expected, got = plain(TEXTS[:2], **kwargs), fast(TEXTS[:2], **kwargs)
    for e, g in zip(expected, got):
        ids, ref = g[0]["generated_token_ids"], e[0]["generated_token_ids"]
        assert len(ids) == len(ref) and ids[:-4] == ref[:-4]  # the prompt, then 4 new tokens
    assert any(event.startswith("generate:") for event in cpuboost.explain(optimized).events)


@pytest.fixture
def fresh_accelerate_state():
    """Trainer sets accelerate's process-wide state; later tests (and files) start without it."""
    yield
    reset_accelerate()


def _trainer(model_and_opt: dict, out, steps: int = 6, **extra):
    args = transformers.TrainingArguments(str(out), use_cpu=True, max_steps=steps, per_device_train_batch_size=8,
                                          per_device_eval_batch_size=8, save_steps=3, logging_steps=3,
                                          report_to=[], learning_rate=2e-3, disable_tqdm=True, seed=0, **extra)
    parts = model_and_opt(args) if callable(model_and_opt) else model_and_opt
    return transformers.Trainer(args=args, train_dataset=LabelledTexts(32), eval_dataset=LabelledTexts(16, seed=1),
                                **parts), args


def _by_hand(args_model):
    """The issue's form: ``om, oo = cpuboost.optimize(model, optimizer)``; ``Trainer(model=om, optimizers=(oo, sch))``."""
    def parts(args):
        optimizer = torch.optim.AdamW(args_model.parameters(), lr=args.learning_rate)
        om, oo = cpuboost.optimize(args_model.train(), optimizer, dtype="bf16", backend="eager")
        scheduler = torch.optim.lr_scheduler.LambdaLR(oo, lambda step: 1.0 - step / args.max_steps)
        return {"model": om, "optimizers": (oo, scheduler)}
    return parts


@pytest.mark.parametrize("form", ["by_hand", "trainer_parts"])
def test_trainer_trains_evaluates_predicts_and_saves(form, tmp_path, fresh_accelerate_state):
    """Trainer with a cpuboost training model: columns chosen from forward's signature, loss falls, evaluate
    and predict take cpuboost's inference path, save_model writes a checkpoint from_pretrained loads."""
    model = bert(num_labels=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    make = _by_hand(model) if form == "by_hand" else (lambda args: trainer_parts(model, args, backend="eager"))
    trainer, _ = _trainer(make, tmp_path)
    result = trainer.train()
    assert result.global_step == 6 and np.isfinite(result.training_loss)
    assert not torch.equal(before["classifier.weight"], model.classifier.weight)
    metrics = trainer.evaluate()
    predicted = trainer.predict(LabelledTexts(16, seed=1))
    assert predicted.predictions.shape == (16, 3) and predicted.metrics["test_loss"] == pytest.approx(
        metrics["eval_loss"], rel=1e-5)
    wrapped = trainer.model
    graphs = cpuboost.explain(wrapped.inference()).graphs  # evaluate/predict went through verified graphs
    assert graphs and all(g.verification.startswith(("ok", "is the reference")) for g in graphs)
    with torch.no_grad():
        plain = model.eval()(input_ids=LabelledTexts(16, seed=1).ids).logits
    assert rel_err(torch.from_numpy(predicted.predictions), plain) <= allowed_error(BF16, plain)
    trainer.save_model(str(tmp_path / "final"))
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "final")
    assert type(loaded) is transformers.BertForSequenceClassification and same_weights(loaded, model)


def test_trainer_resumes_from_a_checkpoint(tmp_path, fresh_accelerate_state):
    """A run resumed from checkpoint-3 ends with the weights of the uninterrupted 6-step run."""
    straight = bert(num_labels=3)
    trainer, _ = _trainer(lambda args: trainer_parts(straight, args, backend="eager"), tmp_path / "a")
    trainer.train()
    resumed = bert(num_labels=3)
    trainer, _ = _trainer(lambda args: trainer_parts(resumed, args, backend="eager"), tmp_path / "b")
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
