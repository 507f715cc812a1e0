"""Embedding tables a packaged graph reads from the live model instead of holding: freezing packs every matmul
weight but leaves a lookup table as it is, so a package that held it kept a second copy of the model's own
(BERT-base bf16: 93 MB of its 266 MB, resident in every process that loads it)."""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import nn

from .errors import PackageFormatError

MIN_BYTES = 1 << 20  # smaller tables are not worth an input


def input_tables(module: nn.Module) -> list[str]:
    """Names of the embedding weights to pass as inputs: float, on the CPU, 1 MiB or more, not tied to another
    parameter (a tied LM head is a matmul that freezing would pack) and never renormalised (``max_norm``
    writes into the table)."""
    uses = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    names = []
    for prefix, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if (isinstance(sub, nn.Embedding) and sub.max_norm is None and isinstance(weight, torch.Tensor)
                and weight.is_floating_point() and weight.device.type == "cpu" and uses[id(weight)] == 1
                and weight.numel() * weight.element_size() >= MIN_BYTES):
            names.append(f"{prefix}.weight" if prefix else "weight")
    return names


def spec(module: nn.Module, names: list[str]) -> list:
    """The record of the tables: name, shape, dtype."""
    return [[name, list(t.shape), str(t.dtype).replace("torch.", "")]
            for name, t in zip(names, tensors(module, names))]


def tensors(module: nn.Module, names: list[str]) -> list[torch.Tensor]:
    return [module.get_parameter(name).detach() for name in names]


def bind(module: Optional[nn.Module], recorded: list) -> list[tuple[nn.Module, str]]:
    """(submodule, attribute) per recorded table, checked against the record; read at every call, so a table
    replaced or edited later is the one the graph reads."""
    if not recorded:
        return []
    if module is None:
        raise PackageFormatError("this graph reads the model's embedding tables "
                                 f"({', '.join(r[0] for r in recorded)}); load it with the model")
    bound = []
    for name, shape, dtype in recorded:
        owner, _, attr = name.rpartition(".")
        try:
            sub = module.get_submodule(owner)
            weight = getattr(sub, attr)
        except AttributeError:
            raise PackageFormatError(f"the model has no embedding table {name!r} that this graph reads") from None
        if not isinstance(weight, torch.Tensor) or [list(weight.shape), str(weight.dtype)] != [shape, f"torch.{dtype}"]:
            raise PackageFormatError(f"the model's {name} is not the {dtype} {shape} table this graph was built for")
        bound.append((sub, attr))
    return bound
