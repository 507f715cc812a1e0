"""A transformers pipeline over a cpuboost model: pass ``cpuboost.optimize(model)`` where the model goes.

Tiny BERT from a config and a word-level tokenizer, so it runs without downloads; with a real checkpoint
write ``model = AutoModelForSequenceClassification.from_pretrained(name)`` and ``tokenizer=name``.
"""
import tempfile
from pathlib import Path

import torch
import transformers

import cpuboost

WORDS = "[PAD] [UNK] [CLS] [SEP] [MASK] the a cat dog sat on mat good bad movie very not i like it was".split()


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    (folder / "vocab.txt").write_text("\n".join(WORDS))
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, num_labels=2)
    model = transformers.BertForSequenceClassification(config).eval()

    classify = transformers.pipeline("text-classification", model=cpuboost.optimize(model, dtype="bf16"),
                                     tokenizer=tokenizer)
    texts = ["a very good movie", "i did not like it", "the cat sat on the mat", "the dog was bad"]
    for text, answer in zip(texts, classify(texts, batch_size=2)):
        print(f"{text!r}: {answer['label']} {answer['score']:.3f}")
    print(cpuboost.explain(classify.model))


if __name__ == "__main__":
    main()
