"""The decode copy's rotary embeddings read from tables (generation/rope.py): eager's own values, the user's
model untouched, and the dynamic rotary types left computing their own."""
import pytest
import torch

from cpuboost.generation.copies import shared_copy, weight_bytes_per_token
from cpuboost.generation.rope import table_rotary_embeddings

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _rotary(model):
    return next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))


@pytest.mark.parametrize("family,scaling", [
    ("Qwen2", None), ("Llama", None), ("Phi3", None), ("Gemma", None),
    ("Llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}),
    ("Llama", {"rope_type": "linear", "factor": 2.0}),
])
def test_tables_give_the_modules_own_rotation_and_leave_the_user_model_alone(family, scaling):
    config = getattr(transformers, f"{family}Config")(**SMALL, **({"rope_scaling": scaling} if scaling else {}))
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    copy = shared_copy(model)
    note = table_rotary_embeddings(copy, 300)
    assert note is not None and note.startswith("rotary cos/sin read from 300-position tables"), note
    mine, theirs = _rotary(copy), _rotary(model)
    assert "cpuboost_cos" in dict(mine.named_buffers()) and "forward" in vars(mine)
    assert "cpuboost_cos" not in dict(theirs.named_buffers()) and "forward" not in vars(theirs)
    positions = torch.tensor([[0, 5, 127, 128, 299], [299, 1, 2, 3, 200]])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 64, dtype=dtype)
        for got, want in zip(mine(x, positions), theirs(x, positions)):
            assert got.dtype == want.dtype and torch.equal(got, want)
    assert weight_bytes_per_token(copy) == weight_bytes_per_token(model)  # a step reads a row of each table


def test_a_length_dependent_rotation_keeps_computing_its_own():
    """``dynamic`` rescales the angles with the sequence length: a table of one length would be wrong at
    another, so the module keeps its forward and the note says so."""
    config = transformers.LlamaConfig(**SMALL, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    copy = shared_copy(transformers.LlamaForCausalLM(config).eval())
    note = table_rotary_embeddings(copy, 300)
    assert note is not None and "computed per step" in note and "(dynamic)" in note, note
    assert "cpuboost_cos" not in dict(_rotary(copy).named_buffers())


def test_a_context_past_the_bound_keeps_computing_its_own():
    from cpuboost.generation import rope

    copy = shared_copy(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL)).eval())
    note = table_rotary_embeddings(copy, rope.MAX_POSITIONS + 1)
    assert "tables past" in note and "cpuboost_cos" not in dict(_rotary(copy).named_buffers()), note
