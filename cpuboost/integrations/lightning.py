"""Lightning: ``lightning.Trainer(callbacks=[CpuBoostCallback(dtype="bf16")])`` optimizes the LightningModule's models.

Lightning owns the loop, the optimizer and the LightningModule, so the natural hook is a callback: at
``setup`` (before ``configure_optimizers``) each child module that holds trainable parameters is replaced by
cpuboost's wrapper of it: the training path for ``fit`` (eval-mode steps without autograd, i.e. validation and
prediction, take the inference path), the inference path for ``validate``/``test``/``predict`` alone. The
wrappers share the children's parameters and report their keys, so optimizers built in
``configure_optimizers`` and checkpoints are the same as without the callback.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning.pytorch as pl

from ..api import optimize
from ..core.proxy import ModelProxy


class CpuBoostCallback(pl.Callback):
    """Wraps the LightningModule's children (or only those named in ``modules``) with ``cpuboost.optimize``."""

    def __init__(self, modules: Optional[Sequence[str]] = None, **options: Any) -> None:
        self.modules = None if modules is None else tuple(modules)
        self.options = {"dtype": "bf16", **options}
        self.wrapped: dict[str, ModelProxy] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        children = dict(pl_module.named_children())
        missing = sorted(set(self.modules or ()) - set(children))
        if missing:  # checked before anything is wrapped
            from ..errors import InvalidOptionError

            msg = (f"CpuBoostCallback(modules=...) names {missing}, which {type(pl_module).__name__} does not have "
                   f"as child modules (it has: {', '.join(children) or 'none'}); name attributes holding nn.Modules")
            raise InvalidOptionError(msg)
        for name, child in children.items():
            if isinstance(child, ModelProxy) or (self.modules is not None and name not in self.modules):
                continue
            if not any(p.requires_grad for p in child.parameters()):
                continue
            wrapped = optimize(child, mode="train" if stage == "fit" else "infer", **self.options)
            setattr(pl_module, name, wrapped)
            self.wrapped[name] = wrapped
