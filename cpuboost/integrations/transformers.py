"""transformers ``Trainer`` with cpuboost's training path: ``Trainer(**trainer_parts(model, args), args=args, ...)``.

Trainer builds its optimizer only after it holds the model; cpuboost's training path wants the optimizer
with the model. So the optimizer is built here as Trainer would build it from ``args`` (its ``optim``, learning
rate, betas and the weight-decay groups) and both are handed over optimized; Trainer still builds the LR
scheduler from ``args``. ``evaluate``/``predict`` run in eval mode without autograd, so they take the
inference path (verified graphs per input signature).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..api import optimize


def _grouped_parameters(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainer's own split: no weight decay on biases and norm weights."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def trainer_parts(model: nn.Module, args: Any, **options: Any) -> dict:
    """``{"model": ..., "optimizers": (optimizer, None)}`` for ``Trainer``: the model and the optimizer ``args``
    asks for, through cpuboost's training path (``options`` as for ``cpuboost.optimize``; dtype bf16 default).

    Leave ``args.bf16`` off: cpuboost's forward already runs under autocast in ``dtype`` (turning it on as
    well only nests a second, identical autocast).
    """
    from transformers import Trainer

    model.train()
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls(_grouped_parameters(model, args.weight_decay), **optimizer_kwargs)
    wrapped, optimizer = optimize(model, optimizer, **{"dtype": "bf16", **options})
    return {"model": wrapped, "optimizers": (optimizer, None)}
