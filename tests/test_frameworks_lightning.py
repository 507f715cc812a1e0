"""Lightning with cpuboost: ``CpuBoostCallback`` under ``precision="bf16-mixed"`` fits, validates, predicts, checkpoints."""
from __future__ import annotations

import pytest
import torch

import cpuboost
from frameworks import LabelledTexts, bert, same_weights
from oracle import allowed_error, rel_err

L = pytest.importorskip("lightning")
from cpuboost.integrations.lightning import CpuBoostCallback  # noqa: E402  (needs lightning)


class TextClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = bert(num_labels=3)

    def training_step(self, batch, index):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def validation_step(self, batch, index):
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)

    def predict_step(self, batch, index):
        return self.model(input_ids=batch["input_ids"]).logits

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


def _loader(n: int, seed: int = 0):
    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels")}
    return torch.utils.data.DataLoader(LabelledTexts(n, seed), batch_size=8, collate_fn=collate)


def _trainer(tmp_path, callbacks):
    return L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=4, callbacks=callbacks, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))


def test_fit_validate_predict_and_clean_checkpoint(tmp_path):
    """fit trains through the training wrapper, validate/predict go through verified inference graphs, and the
    checkpoint has the plain module's keys: a LightningModule without cpuboost loads it strictly."""
    module = TextClassifier()
    original = module.model
    start = original.classifier.weight.detach().clone()
    trainer = _trainer(tmp_path, [CpuBoostCallback(backend="eager")])
    trainer.fit(module, _loader(32), _loader(16, 1))
    wrapped = module.model
    assert isinstance(wrapped, cpuboost.core.proxy.ModelProxy) and cpuboost.unwrap(wrapped) is original
    assert cpuboost.explain(wrapped).mode == "train" and not torch.equal(start, original.classifier.weight)
    metrics = trainer.validate(module, _loader(16, 1))
    predicted = torch.cat(trainer.predict(module, _loader(16, 1)))
    graphs = cpuboost.explain(wrapped.inference()).graphs
    assert graphs and all(g.verification.startswith(("ok", "is the reference")) for g in graphs)
    with torch.no_grad():
        plain = original.eval()(input_ids=LabelledTexts(16, 1).ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):  # what predict runs under with precision="bf16-mixed"
            plain_dtype = original(input_ids=LabelledTexts(16, 1).ids).logits.dtype
    # answers in the dtype the plain module answers in under Lightning's autocast, whichever path serves
    assert predicted.dtype == plain_dtype == torch.bfloat16
    assert rel_err(predicted.float(), plain) <= allowed_error(torch.bfloat16, plain)
    assert metrics[0]["val_loss"] > 0
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    plain_module = TextClassifier()
    assert list(saved) == list(plain_module.state_dict())  # "model.bert....", no wrapper prefix
    plain_module.load_state_dict(saved, strict=True)
    assert same_weights(plain_module.model, original)


def test_predict_alone_takes_the_inference_path(tmp_path):
    """Without fit, the callback gives the module cpuboost's inference wrapper (a private copy; the user's is kept)."""
    module = TextClassifier()
    trainer = _trainer(tmp_path, [CpuBoostCallback(backend="eager")])
    out = torch.cat(trainer.predict(module, _loader(8)))
    assert cpuboost.explain(module.model).mode == "infer" and len(cpuboost.explain(module.model).graphs) == 1
    with torch.no_grad():
        plain = cpuboost.unwrap(module.model).eval()(input_ids=LabelledTexts(8).ids).logits
    assert rel_err(out, plain) <= allowed_error(torch.bfloat16, plain)


def test_unknown_module_name_is_a_clear_error(tmp_path):
    """modules= naming a child the LightningModule lacks fails at setup with the children it has."""
    from cpuboost.errors import InvalidOptionError

    trainer = _trainer(tmp_path, [CpuBoostCallback(modules=["encoder"], backend="eager")])
    with pytest.raises(InvalidOptionError, match="has: model"):
        trainer.predict(module := TextClassifier(), _loader(8))
    assert not isinstance(module.model, cpuboost.core.proxy.ModelProxy)
