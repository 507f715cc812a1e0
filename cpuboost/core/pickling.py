"""deepcopy, pickle and torch.save of optimized models: the user's model and the options travel; locks,
compiled code and built graphs do not (the copy rebuilds them lazily, on its first call).

An instance of a class decorated with ``@cpu_optimized`` cannot be pickled the usual way: its module's
attribute of that name is the decorator's wrapper, not the class, and pickle checks that identity. Such an
instance travels as (module, qualified name, state) and comes back as an instance of the wrapped class.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any

from torch import nn


def _shadowed(cls: type) -> bool:
    target: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is not cls


def _class_at(module: str, qualname: str) -> type:
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return getattr(target, "__wrapped__", target)


def _instance(module: str, qualname: str, state: dict) -> nn.Module:
    obj = _class_at(module, qualname).__new__(_class_at(module, qualname))
    obj.__setstate__(state) if hasattr(obj, "__setstate__") else obj.__dict__.update(state)
    return obj


class _ModelRef:
    """Pickles as the model itself, or by name and state when its class is shadowed by a decorator."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __reduce_ex__(self, protocol: int):
        cls = type(self.model)
        if _shadowed(cls):
            return _instance, (cls.__module__, cls.__qualname__, self.model.__getstate__())
        return _identity, (self.model,)


def _identity(model: nn.Module) -> nn.Module:
    return model


def _restore(cls: type, model: nn.Module, state: dict) -> Any:
    obj = cls.__new__(cls, model)
    obj.__setstate__({**state, "original": model})
    return obj


def reduce_proxy(proxy: Any, state: dict) -> tuple:
    """``__reduce_ex__`` for a ModelProxy subclass: its class, the user's model and picklable ``state``."""
    base = type(proxy).__dict__.get("_proxy_base", type(proxy))  # the class made per original is made again
    return _restore, (base, _ModelRef(proxy._original), state)
