"""The decode graph builds and serves on the transformers installed here. CI runs this file twice: in the main
environment (the newest transformers) and in the IPEX environment (torch 2.8, transformers 4.51.3, the
oldest supported), so a transformers change that breaks the static route fails a test instead of falling
back to eager with a note."""
import warnings

import pytest
import torch

from cpuboost.generation import GenerationRunner

transformers = pytest.importorskip("transformers")


@pytest.mark.slow
def test_bf16_decode_graph_builds_verifies_and_serves_on_this_transformers():
    """A tiny GQA Llama: the bf16 decode graph is built (no warning, no eager fallback), verified against eager
    fp32 and serves a second call of another prompt length; its first token is eager autocast's."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=256, initializer_range=0.2)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    notes = []
    runner = GenerationRunner(model, torch.bfloat16, notes.append, race=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = runner.generate(ids, max_new_tokens=10, do_sample=False)
    assert not [w for w in caught if "decode graph" in str(w.message)], [str(w.message) for w in caught]
    assert runner.describe()["batch 1, cache 128"] == "compiled", (transformers.__version__, notes)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert out.shape == auto.shape and out[0, 12] == auto[0, 12]
    longer = torch.cat([ids, ids[:, :5]], dim=1)
    again = runner.generate(longer, max_new_tokens=6, do_sample=False)
    assert again.shape == (1, 23) and sum("built" in n for n in notes) == 1, notes
    last = runner.last_call
    assert last["decode_steps"] == 5 and last["decode_ms_per_token"] > 0 and last["weight_bytes_per_token"] > 0
