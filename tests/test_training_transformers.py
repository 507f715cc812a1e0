"""A real transformers model (tiny BERT from config) trained through cpuboost: bf16 learns like fp32."""
from __future__ import annotations

import pytest
import torch

from training_cases import optimize_quietly, roundtrip

transformers = pytest.importorskip("transformers")

STEPS = 20
# Measured here: bf16's per-step loss stays within 0.2% of fp32's over 20 steps; the bound leaves 10x room.
CURVE_TOL = 2e-2


def _bert():
    config = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).train()


def _data():
    """A learnable task: the label is the second token's id mod 3."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(4):
        ids = torch.randint(1, 128, (8, 16), generator=gen)
        out.append((ids, ids[:, 1] % 3))
    return out


def _train(net, opt, data, steps, start=0):
    losses = []
    for i in range(start, start + steps):
        ids, labels = data[i % len(data)]
        torch.manual_seed(100 + i)  # the same dropout masks in every run
        out = net(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses, out


@pytest.mark.slow
def test_tiny_bert_bf16_loss_curve_tracks_fp32():
    """BertForSequenceClassification: bf16 per-step losses within 2% of fp32's over 20 steps, and both learn."""
    data = _data()
    curves, outputs = {}, {}
    for dtype in ("fp32", "bf16"):
        bert = _bert()
        net, opt = optimize_quietly(bert, torch.optim.AdamW(bert.parameters(), lr=2e-3), dtype=dtype)
        seen = []
        hook = bert.classifier.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        curves[dtype], outputs[dtype] = _train(net, opt, data, STEPS)
        hook.remove()
        assert seen[-1] == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]  # autocast really ran
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert bf16 == pytest.approx(fp32, rel=CURVE_TOL)
    assert fp32[-1] < 0.85 * fp32[0] and bf16[-1] < 0.85 * bf16[0]
    out = outputs["bf16"]
    assert type(out).__name__ == "SequenceClassifierOutput"
    assert out.logits.dtype == torch.float32 and out.loss.dtype == torch.float32


@pytest.mark.slow
def test_tiny_bert_checkpoint_resumes_in_a_plain_model():
    """A bf16-trained BERT's checkpoint has the plain model's keys and resumes in plain eager autocast."""
    data = _data()
    bert = _bert()
    net, opt = optimize_quietly(bert, torch.optim.AdamW(bert.parameters(), lr=2e-3), dtype="bf16")
    head, _ = _train(net, opt, data, 4)
    ckpt = roundtrip({"model": net.state_dict(), "opt": opt.state_dict()})
    plain = _bert()
    assert list(ckpt["model"]) == list(plain.state_dict())
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=2e-3)
    plain.load_state_dict(ckpt["model"])
    plain_opt.load_state_dict(ckpt["opt"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tail, _ = _train(plain, plain_opt, data, 4, start=4)
    unbroken, _ = _train(net, opt, data, 4, start=4)
    assert tail == pytest.approx(unbroken, rel=2e-2)
