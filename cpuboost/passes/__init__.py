"""Built-in passes, one file per family. Each module's ``register()`` adds its passes to the registry;
``cpuboost/__init__`` hands :func:`register_builtins` to the registry, which calls it on first use."""
from __future__ import annotations


def register_builtins() -> None:
    from . import folding, inductor, int8, ipex, layout, mode, openvino, pooling, precision, training

    for module in (mode, folding, pooling, layout, precision, int8, inductor, openvino, training, ipex):
        module.register()
