"""A module that *is* the user's model for keys, parameters and attributes, while adding behaviour."""
from __future__ import annotations

from typing import Any

from torch import nn

_SHARED_TABLES = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


class ModelProxy(nn.Module):
    """Shares the original's parameter, buffer and submodule tables (no copy, no key prefix).

    So ``state_dict()`` has the original keys, ``parameters()`` are the original's Parameters (an optimizer
    built on either sees the same tensors), and attributes like ``model.config`` resolve on the original.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        for table in _SHARED_TABLES:
            self.__dict__[table] = original.__dict__[table]
        self.__dict__["_original"] = original
        self.training = original.training

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
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
