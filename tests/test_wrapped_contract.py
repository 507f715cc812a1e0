"""Contract 12: an optimized model (inference or training wrapper) keeps what frameworks read from a model."""
from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch

import cpuboost
from frameworks import bert, gpt2, same_weights
from oracle import rung, verified

transformers = pytest.importorskip("transformers")


def _wrap(kind: str, model):
    if kind == "infer":
        return cpuboost.optimize(model.eval(), dtype="bf16", backend="eager")
    model.train()
    wrapped, _ = cpuboost.optimize(model, torch.optim.AdamW(model.parameters()), dtype="bf16", backend="eager")
    return wrapped


KINDS = ["infer", "train"]


@pytest.mark.parametrize("kind", KINDS)
def test_class_isinstance_and_task_mapping(kind):
    """The wrapper reports the original's class: isinstance holds and pipelines' task mappings know its name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as names

    model = bert()
    wrapped = _wrap(kind, model)
    assert isinstance(wrapped, transformers.BertForSequenceClassification)
    assert isinstance(wrapped, transformers.PreTrainedModel) and isinstance(wrapped, torch.nn.Module)
    assert isinstance(wrapped, cpuboost.core.proxy.ModelProxy)  # cpuboost's own checks still see a wrapper
    assert wrapped.__class__ is type(model) and wrapped.__class__.__name__ in names.values()
    assert cpuboost.unwrap(wrapped) is model


@pytest.mark.parametrize("kind", KINDS)
def test_forward_signature_is_the_originals(kind):
    """Trainer reads forward's parameters to pick dataset columns and label names."""
    model = bert()
    wrapped = _wrap(kind, model)
    assert inspect.signature(wrapped.forward) == inspect.signature(model.forward)
    assert "labels" in inspect.signature(wrapped.forward).parameters
    ids = torch.randint(5, 30, (2, 7))
    out = wrapped(input_ids=ids, labels=torch.tensor([0, 1]))  # the signature is the real one: it runs
    assert out.loss is not None and out.logits.shape == (2, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_config_generation_device_dtype(kind):
    """config (with task_specific_params), generation_config, can_generate(), .device, .dtype, .to()."""
    model = gpt2()
    model.config.task_specific_params = {"text-generation": {"max_new_tokens": 3}}
    wrapped = _wrap(kind, model)
    assert wrapped.config is model.config and wrapped.config.task_specific_params["text-generation"]
    assert wrapped.generation_config is model.generation_config and wrapped.can_generate()
    assert not _wrap(kind, bert()).can_generate()
    assert wrapped.device == torch.device("cpu") and wrapped.dtype == torch.float32
    assert wrapped.to("cpu") is wrapped and wrapped.to(torch.device("cpu")).device.type == "cpu"


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_keys_and_save_pretrained_round_trip(kind, tmp_path):
    """state_dict() keys are the original's (no prefix); save_pretrained writes a checkpoint from_pretrained loads."""
    model = bert()
    wrapped = _wrap(kind, model)
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert not [k for k in wrapped.state_dict() if k.startswith(("_orig_mod.", "_original.", "module."))]
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # a trained weight must be what is saved
    wrapped.save_pretrained(tmp_path)
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    assert type(loaded) is transformers.BertForSequenceClassification and same_weights(loaded, model)


@pytest.mark.parametrize("kind", KINDS)
def test_copies_keep_the_class_and_signature(kind):
    """deepcopy, pickle and torch.save give a wrapper of the same kind, class and forward signature."""
    model = bert()
    wrapped = _wrap(kind, model)
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(wrapped), pickle.loads(pickle.dumps(wrapped)),
                   torch.load(buffer, weights_only=False)):
        assert type(copied) is type(wrapped) and isinstance(copied, transformers.BertForSequenceClassification)
        assert inspect.signature(copied.forward) == inspect.signature(model.forward)
        assert copied.original is not model and same_weights(copied.original, model)


def test_one_proxy_class_per_original_class():
    """The specialised class is made once per (wrapper, original class) and never for a plain nn.Module call."""
    a, b = cpuboost.optimize(bert().eval(), backend="eager"), cpuboost.optimize(bert().eval(), backend="eager")
    assert type(a) is type(b)
    assert type(a) is not type(_wrap("train", bert()))
    plain = cpuboost.optimize(torch.nn.Linear(3, 2), backend="eager")
    assert plain.__class__ is torch.nn.Linear and "input" in inspect.signature(plain.forward).parameters


def test_training_wrapper_in_eval_without_grad_takes_the_inference_path():
    """model.eval() + no_grad (Trainer.evaluate, Lightning validation) runs verified inference graphs;
    train mode, or eval with autograd on, keeps the training forward."""
    model = bert()
    wrapped = _wrap("train", model)
    ids = torch.randint(5, 30, (2, 7))
    wrapped(input_ids=ids)
    assert wrapped._inference is None
    wrapped.eval()
    with torch.no_grad():
        out = wrapped(input_ids=ids).logits
    graphs = cpuboost.explain(wrapped.inference()).graphs
    assert len(graphs) == 1 and out.dtype == torch.float32
    assert verified(rung(wrapped.inference(), "eager+passes bf16"))  # built and verified, whether or not it won
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    assert torch.allclose(out, reference, atol=5e-2)
    wrapped(input_ids=ids)  # autograd on: the training forward, no new graph
    assert len(cpuboost.explain(wrapped.inference()).graphs) == 1
    assert "inference path" in str(cpuboost.explain(wrapped))
