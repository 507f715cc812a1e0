"""Rotary embeddings read from a table in the decode copy. Inductor fuses the query's rotation into the
attention-score reduction of the decode graph and recomputes its cos/sin for every key position: the fused
softmax kernel took 72 us a layer at batch 1 and ~500 us at batch 4 (Qwen2 shape, cache 256, this machine),
a quarter of a batch-4 step. Looked up from a table computed once by the module's own forward, the kernel
takes 26 us at batch 1, and the values are eager's own.

Only rotary types whose angles depend on the position alone are tabled; the dynamic ones (``dynamic``,
``longrope``) rescale with the sequence length and keep their forward."""
from __future__ import annotations

import inspect
import types
from typing import Optional

import torch
from torch import nn

POSITION_ONLY = frozenset({"default", "linear", "llama3", "yarn"})
MAX_POSITIONS = 32768  # 16 MiB of tables at head size 64; a longer context keeps computing its rotation
TABLES = ("cpuboost_cos", "cpuboost_sin")  # buffers of the private copy; a decode step reads one row of each


def _rotary_modules(model: nn.Module):
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding") and isinstance(getattr(module, "inv_freq", None),
                                                                            torch.Tensor):
            yield name, module


def table_rotary_embeddings(model: nn.Module, positions: int) -> Optional[str]:
    """Give each position-only rotary module of ``model`` (a private copy: its modules are its own) cos/sin
    tables for ``positions`` positions, and a forward that reads them. Returns what was done, for the report."""
    tabled, kept = [], []
    for name, module in _rotary_modules(model):
        if positions > MAX_POSITIONS:
            kept.append(f"{name or 'rotary'} ({positions} positions: tables past {MAX_POSITIONS} cost too much)")
            continue
        kind = getattr(module, "rope_type", "default")
        if list(inspect.signature(module.forward).parameters) != ["x", "position_ids"]:
            kept.append(f"{name or 'rotary'} (forward takes more than x and position_ids)")
            continue
        if kind not in POSITION_ONLY:
            kept.append(f"{name or 'rotary'} ({kind})")
            continue
        try:
            with torch.no_grad():
                cos, sin = module.forward(torch.zeros(1, dtype=torch.float32), torch.arange(positions)[None])
        except Exception as exc:  # a forward that cannot run on the probe keeps computing its own
            kept.append(f"{name or 'rotary'} ({type(exc).__name__})")
            continue
        if cos.dim() != 3 or cos.shape[:2] != (1, positions):
            kept.append(f"{name or 'rotary'} (cos of shape {tuple(cos.shape)})")
            continue
        for buffer, values in zip(TABLES, (cos, sin)):
            module.register_buffer(buffer, values[0].contiguous(), persistent=False)
        module.forward = types.MethodType(_tabled_forward, module)
        tabled.append(name or "rotary")
    if not tabled and not kept:
        return None
    text = f"rotary cos/sin read from {positions}-position tables ({', '.join(tabled)})" if tabled else ""
    return "; ".join(filter(None, [text, f"computed per step: {', '.join(kept)}" if kept else ""]))


def _tabled_forward(self: nn.Module, x: torch.Tensor,
                    position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return self.cpuboost_cos[position_ids].to(x.dtype), self.cpuboost_sin[position_ids].to(x.dtype)
