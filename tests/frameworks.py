"""Tiny transformers models, a word-level tokenizer and datasets for the framework tests (no downloads)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

WORDS = ("the a cat dog sat on mat is good bad movie very not i like it was fun long short day night "
         "red blue green we they saw film plot actor").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = len(SPECIALS) + len(WORDS)
TEXTS = ["the cat sat on the mat", "a very good movie", "i did not like it at all , it was long",
         "we saw the film", "the plot was fun and the actor was good but the day was long and the night short"]


def tokenizer(folder: Path):
    """A BertTokenizer over ``WORDS`` written to ``folder`` (any word not in it is [UNK])."""
    import transformers

    path = Path(folder) / "vocab.txt"
    path.write_text("\n".join(SPECIALS + WORDS))
    return transformers.BertTokenizer(str(path))


def bert_config(**extra):
    import transformers

    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64, **extra)


def bert(head: str = "BertForSequenceClassification", **extra):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, head)(bert_config(**extra))


def gpt2():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


class LabelledTexts(torch.utils.data.Dataset):
    """``n`` rows of 12 token ids whose label is the second id mod 3 (learnable), plus a column the model
    does not take (Trainer must drop it by reading ``forward``'s signature)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(len(SPECIALS), VOCAB, (n, 12), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": self.ids[i, 1] % 3, "source": "unused"}


class TransformersLog:
    """Records transformers' own log (its root logger does not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = self.records.append

    def __enter__(self) -> "TransformersLog":
        logging.getLogger("transformers").addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("transformers").removeHandler(self.handler)

    def messages(self, contains: str) -> list[str]:
        return [r.getMessage() for r in self.records if contains in r.getMessage()]


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state (Trainer and Accelerator set it once per process)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
