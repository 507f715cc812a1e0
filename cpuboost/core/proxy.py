"""A module that *is* the user's model for keys, parameters, attributes and class, while adding behaviour.

Frameworks take a model by what it looks like: transformers' pipelines look its class name up in a task
mapping, ``Trainer`` reads ``forward``'s parameters to choose dataset columns and ``isinstance(model,
PreTrainedModel)`` to save a checkpoint, accelerate and Lightning read ``.device`` and ``state_dict()``.
So a proxy reports the original's class (``__class__``, hence ``isinstance``) and an instance of a proxy
class is made as a subclass specialised per original class whose ``forward`` carries the original's
signature. ``type(proxy)`` stays a ModelProxy subclass: cpuboost's own checks keep working.
"""
from __future__ import annotations

import inspect
import weakref
from typing import Any

from torch import nn

_SHARED_TABLES = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
# proxy class -> original class -> proxy class specialised for it (weak: model classes made in a loop go away)
_SPECIALISED: "weakref.WeakKeyDictionary[type, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()


def _forward_signature(original_cls: type) -> inspect.Signature | None:
    try:
        return inspect.signature(original_cls.forward)
    except (TypeError, ValueError, AttributeError):  # a builtin or odd forward: keep (*args, **kwargs)
        return None


def specialised(proxy_cls: type, original_cls: type) -> type:
    """``proxy_cls`` specialised for ``original_cls``: named after it, ``forward`` with its signature. Cached."""
    proxy_cls = proxy_cls.__dict__.get("_proxy_base", proxy_cls)
    per_original = _SPECIALISED.setdefault(proxy_cls, weakref.WeakKeyDictionary())
    made = per_original.get(original_cls)
    if made is not None:
        return made
    run = proxy_cls.forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return run(self, *args, **kwargs)

    signature = _forward_signature(original_cls)
    if signature is not None:
        forward.__signature__ = signature
    forward.__doc__ = getattr(original_cls.forward, "__doc__", None)
    namespace = {"forward": forward, "_proxy_base": proxy_cls, "__module__": proxy_cls.__module__,
                 "__qualname__": f"{proxy_cls.__qualname__}[{original_cls.__qualname__}]"}
    made = type(f"{proxy_cls.__name__}[{original_cls.__name__}]", (proxy_cls,), namespace)
    per_original[original_cls] = made
    return made


class ModelProxy(nn.Module):
    """Shares the original's parameter, buffer and submodule tables (no copy, no key prefix).

    So ``state_dict()`` has the original keys, ``parameters()`` are the original's Parameters (an optimizer
    built on either sees the same tensors), and attributes like ``model.config`` resolve on the original.
    """

    def __new__(cls, original: Any = None, *args: Any, **kwargs: Any) -> "ModelProxy":
        if isinstance(original, nn.Module):
            cls = specialised(cls, type(original))
        return super().__new__(cls)

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        for table in _SHARED_TABLES:
            self.__dict__[table] = original.__dict__[table]
        self.__dict__["_original"] = original
        self.training = original.training

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """The original's class: ``isinstance(proxy, OriginalClass)`` holds, as task mappings expect."""
        original = self.__dict__.get("_original")
        return type(self) if original is None else type(original)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") and name.endswith("__"):  # copy/pickle hooks are the proxy's own
                raise
            return getattr(self.__dict__["_original"], name)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        # The original's own, so per-instance overrides apply (IPEX training returns fp32 master weights).
        return self._original.state_dict(*args, **kwargs)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._original._load_from_state_dict(*args, **kwargs)

    def _get_name(self) -> str:
        return f"Optimized[{type(self._original).__name__}]"

    def train(self, mode: bool = True) -> "ModelProxy":
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
        self.training = mode
        for m in self._original.modules():
            m.training = mode
        return self

    @property
    def original(self) -> nn.Module:
        """The user's model, unchanged by cpuboost's passes (unless ``inplace=True``)."""
        return self._original
