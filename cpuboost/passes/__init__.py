"""Built-in passes, one file per family; registered the first time the registry is used."""
from __future__ import annotations


def register_builtins() -> None:
    from . import folding, graph, ipex, layout, mode, precision, training  # noqa: F401

    for module in (mode, folding, layout, precision, graph, training, ipex):
        module.register()
