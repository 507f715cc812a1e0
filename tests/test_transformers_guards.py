"""Graphs of transformers models keep serving when another model-output type appears in the process.

transformers 5.0-5.5 (5.5.x is what optimum-intel pins) guard every compiled graph that builds a ModelOutput
on their set of registered output types; later versions skip the registration while compiling. CI runs this
file against both (README: the transformers 5.5 environment)."""
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")


def _qwen2():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    return transformers.Qwen2ForCausalLM(config).eval()


def _new_output_type():
    @dataclasses.dataclass
    class SomeoneElsesOutput(transformers.utils.ModelOutput):
        value: torch.Tensor = None

    SomeoneElsesOutput(value=torch.zeros(1))  # registers the type, as its first instance does anywhere


def test_a_served_forward_graph_survives_a_new_output_type():
    """The graph cpuboost serves refuses calls its guards reject (RecompileRefused, a rebuild): before the
    fix, on transformers 5.5 the first instance of another output type anywhere made it refuse."""
    from cpuboost.backends.inductor import build

    model = _qwen2()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    graph = build(model, (), {"input_ids": ids}, torch.float32, note=lambda _: None)
    with torch.no_grad():
        first = graph(input_ids=ids).logits
        _new_output_type()
        again = graph(input_ids=ids).logits
    assert torch.equal(first, again)

