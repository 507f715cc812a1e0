"""Lightning with cpuboost: add ``CpuBoostCallback`` to the Trainer's callbacks; the LightningModule is unchanged.

Tiny BERT from a config: no downloads.
"""
import lightning as L
import torch
import transformers

import cpuboost
from cpuboost.integrations.lightning import CpuBoostCallback


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, num_labels=3)
        self.model = transformers.BertForSequenceClassification(config)

    def training_step(self, batch, index):
        ids, labels = batch
        return self.model(input_ids=ids, labels=labels).loss

    def validation_step(self, batch, index):
        ids, labels = batch
        self.log("val_loss", self.model(input_ids=ids, labels=labels).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=2e-3)


def loader(n: int, seed: int) -> torch.utils.data.DataLoader:
    ids = torch.randint(5, 64, (n, 12), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, ids[:, 1] % 3), batch_size=8)


def main() -> None:
    torch.manual_seed(0)
    module = Classifier()
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=8, logger=False,
                        enable_progress_bar=False, callbacks=[CpuBoostCallback(dtype="bf16")])
    trainer.fit(module, loader(64, 0), loader(16, 1))
    print(trainer.validate(module, loader(16, 1)))
    print(cpuboost.explain(module.model))


if __name__ == "__main__":
    main()
