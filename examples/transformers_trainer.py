"""transformers Trainer with cpuboost's training path: one line builds the model and optimizer Trainer takes.

``evaluate``/``predict`` then run through cpuboost's inference path; ``save_model`` writes an ordinary
checkpoint that ``from_pretrained`` loads. Tiny BERT from a config: no downloads.
"""
import tempfile

import torch
import transformers

import cpuboost
from cpuboost.integrations.transformers import trainer_parts


class Texts(torch.utils.data.Dataset):
    """Random token ids; the label is the second id mod 3 (something to learn)."""

    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(5, 64, (n, 12), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i, 1] % 3}


def main() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    out = tempfile.mkdtemp()
    args = transformers.TrainingArguments(out, use_cpu=True, max_steps=8, per_device_train_batch_size=8,
                                          learning_rate=2e-3, report_to=[], disable_tqdm=True)

    trainer = transformers.Trainer(**trainer_parts(model, args, dtype="bf16"), args=args,
                                   train_dataset=Texts(64, 0), eval_dataset=Texts(16, 1))
    trainer.train()
    print(trainer.evaluate())
    trainer.save_model(f"{out}/final")
    reloaded = transformers.BertForSequenceClassification.from_pretrained(f"{out}/final")
    print("reloaded:", type(reloaded).__name__, torch.equal(reloaded.classifier.weight, model.classifier.weight))
    print(cpuboost.explain(trainer.model.inference()))


if __name__ == "__main__":
    main()
