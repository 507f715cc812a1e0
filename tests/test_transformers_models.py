"""Real transformers models built from small configs (no downloads) through the decorator."""
import pytest
import torch

import cpuboost
from cpuboost import cpu_optimized
from oracle import allowed_error, eager_autocast, rung, verified

transformers = pytest.importorskip("transformers")


def _bert():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    ids = torch.randint(0, 100, (2, 12))
    return transformers.BertModel(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _distilbert():
    cfg = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=100,
                                        max_position_embeddings=64)
    return transformers.DistilBertForSequenceClassification(cfg), {"input_ids": torch.randint(0, 100, (2, 10))}


def _resnet():
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    return transformers.ResNetForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 32, 32)}


def _vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=8)
    return transformers.ViTModel(cfg), {"pixel_values": torch.randn(2, 3, 16, 16)}


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), {"input_ids": torch.randint(0, 100, (2, 9))}


MODELS = {"bert": _bert, "distilbert": _distilbert, "resnet": _resnet, "vit": _vit, "gpt2": _gpt2}


def _leaves(out):
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _check(model, reference, inputs, dtype):
    with torch.no_grad():
        ref = reference(**inputs)
    own = eager_autocast(reference, dtype, **inputs) if dtype != torch.float32 else None
    out = model(**inputs)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    for key, value in _leaves(ref).items():
        err = (out[key].double() - value.double()).abs().max() / value.double().abs().max()
        limit = allowed_error(dtype, value, own[key] if own is not None else None)
        assert out[key].dtype == value.dtype and err <= limit, (key, err.item(), limit)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_eager_passes_on_real_models(name, dtype):
    """Each model family gives eager's outputs (same ModelOutput type and keys) without fusion."""
    torch.manual_seed(0)
    holder = {}

    @cpu_optimized(dtype=dtype, fusion=False)
    def make():
        holder["net"], holder["inputs"] = MODELS[name]()
        return holder["net"].eval()

    model = make()
    _check(model, holder["net"], holder["inputs"], model._options.dtype)
    graph = cpuboost.explain(model).graphs[-1]
    assert graph.path in ("eager+passes", "eager (original)")  # the race against eager decides
    assert not [r.line() for r in graph.rungs if r.fate.startswith(("failed", "rejected"))], str(cpuboost.explain(model))
    if dtype == "bf16":  # the bf16 candidate exists, and was verified whether or not it won
        assert verified(rung(model, "eager+passes bf16")), str(cpuboost.explain(model))


@pytest.mark.slow
@pytest.mark.parametrize("name,dtype", [("bert", "bf16"), ("resnet", "fp32"), ("gpt2", "bf16")])
def test_compiled_real_models(name, dtype):
    """BERT, ResNet and GPT-2 (with its KV cache output) compile with Inductor and match eager."""
    torch.manual_seed(0)
    net, inputs = MODELS[name]()

    @cpu_optimized(dtype=dtype)
    def make():
        return net.eval()

    model = make()
    _check(model, net, inputs, model._options.dtype)
    assert model.wait_for_builds(600)  # BERT's token inputs: Inductor may race on after OpenVINO answered first
    report = cpuboost.explain(model)
    assert verified(rung(model, f"inductor {dtype}")), str(report)  # built and verified; the race picks what serves


@pytest.mark.slow
def test_bf16_graph_answers_in_eagers_dtype_from_inside_the_graph():
    """GPT-2's bf16 Inductor graph hands back fp32 logits and KV cache itself (the cast is the graph's last
    kernel, not an extra pass over the logits after it), in one graph with no break, matching eager."""
    from torch._dynamo.utils import counters

    from cpuboost.backends.inductor import build
    from cpuboost.core.verify import dtype_template

    torch.manual_seed(0)
    net, inputs = _gpt2()
    net.eval()
    with torch.no_grad():
        ref = net(**inputs)
    own = eager_autocast(net, torch.bfloat16, **inputs)
    graphs_before = counters["stats"]["unique_graphs"]
    graph = build(net, (), inputs, torch.bfloat16, lambda _: None, out_dtypes=dtype_template(ref))
    with torch.no_grad():
        out = graph(**inputs)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    assert leaves and all(t.dtype == torch.float32 for t in leaves)
    err = (out["logits"] - ref["logits"]).abs().max() / ref["logits"].abs().max()
    assert err <= allowed_error(torch.bfloat16, ref["logits"], own["logits"])
    bare = build(net, (), inputs, torch.bfloat16, lambda _: None)  # without the template: autocast's bf16
    with torch.no_grad():
        assert bare(**inputs)["logits"].dtype == torch.bfloat16
