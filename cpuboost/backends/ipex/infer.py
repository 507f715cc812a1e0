"""IPEX inference callables: ``ipex.optimize`` alone (imperative), or traced and frozen with TorchScript.

TorchScript is deprecated in current torch, so every ``torch.jit`` call in cpuboost lives in this file,
with its warnings caught only around the trace, the freeze and the warm-up runs. TorchScript traces
tensors in, tensors out: inputs and outputs are flattened with ``torch.utils._pytree`` (HF ``ModelOutput``
is a registered node) and rebuilt around the frozen graph, so models returning dicts, dataclasses or
``None`` fields trace too. Values that are not tensors are fixed at trace time, which is safe because
cpuboost builds one graph per input signature and the signature includes every non-tensor input value.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .probe import ipex_logs, load

WARMUP_RUNS = 2  # IPEX's oneDNN fusion pass runs on the profiling executor's second call
# Output leaves that may be fixed at trace time: the same for every call with one input signature.
_CONSTANT_OUTPUTS = (type(None), bool, int, str)
# One ipex.optimize copy per (cpuboost working copy, dtype), shared by the signatures built from it.
_OPTIMIZED: "weakref.WeakKeyDictionary[nn.Module, dict[torch.dtype, nn.Module]]" = weakref.WeakKeyDictionary()


def precision(dtype: torch.dtype):
    """bf16: autocast without its weight cache (TorchScript freezes the casts); fp32: autocast off."""
    if dtype == torch.float32:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cpu", dtype=dtype, cache_enabled=False)


def optimized_copy(model: nn.Module, dtype: torch.dtype, notes: Optional[list] = None) -> nn.Module:
    """``ipex.optimize`` on a deep copy: IPEX changes the model it is given, even with inplace=False."""
    per_model = _OPTIMIZED.setdefault(model, {})
    if dtype not in per_model:
        ipex = load()
        with ipex_logs() as said, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_model[dtype] = ipex.optimize(copy.deepcopy(model).eval(), dtype=dtype, inplace=True)
        if notes is not None:
            notes.extend(said)
    return per_model[dtype]


@dataclasses.dataclass
class Imperative:
    """``ipex.optimize``'d module called directly (no graph capture), under the dtype's autocast."""

    module: nn.Module
    dtype: torch.dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), precision(self.dtype):
            return self.module(*args, **kwargs)


class Flat(nn.Module):
    """Tensors in, tuple of tensors out: the form TorchScript traces. Records how to rebuild the output."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.model = model
        leaves, self.in_spec = pytree.tree_flatten((args, kwargs))
        self.in_slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.in_fixed = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        self.out_spec: Optional[pytree.TreeSpec] = None
        self.out_fixed: list = []
        self.out_slots: list[int] = []

    def inputs(self, args: tuple, kwargs: dict) -> tuple:
        leaves, _ = pytree.tree_flatten((args, kwargs))
        return tuple(leaves[i] for i in self.in_slots)

    def forward(self, *tensors: torch.Tensor) -> tuple:
        leaves = list(self.in_fixed)
        for slot, tensor in zip(self.in_slots, tensors):
            leaves[slot] = tensor
        args, kwargs = pytree.tree_unflatten(leaves, self.in_spec)
        out_leaves, self.out_spec = pytree.tree_flatten(self.model(*args, **kwargs))
        odd = [type(x).__name__ for x in out_leaves if not isinstance(x, (torch.Tensor, *_CONSTANT_OUTPUTS))]
        if odd:
            raise TypeError(f"the model returns {', '.join(sorted(set(odd)))} objects, which a TorchScript trace "
                            "would freeze at their trace-time value; IPEX jit needs tensors (and None/int/bool/str)")
        self.out_slots = [i for i, leaf in enumerate(out_leaves) if isinstance(leaf, torch.Tensor)]
        self.out_fixed = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in out_leaves]
        return tuple(out_leaves[i] for i in self.out_slots)

    def rebuild(self, tensors: tuple) -> Any:
        leaves = list(self.out_fixed)
        for slot, tensor in zip(self.out_slots, tensors):
            leaves[slot] = tensor
        return pytree.tree_unflatten(leaves, self.out_spec)


class Frozen:
    """A frozen TorchScript graph behind the model's own call signature and output structure."""

    def __init__(self, graph: torch.jit.ScriptModule, flat: Flat, dtype: torch.dtype) -> None:
        self.graph, self.flat, self.dtype = graph, flat, dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), precision(self.dtype):
            out = self.graph(*self.flat.inputs(args, kwargs))
        return self.flat.rebuild(out if isinstance(out, tuple) else (out,))


@contextlib.contextmanager
def _jit_warnings(seen: list[str]):
    """TorchScript and IPEX deprecation notices stay here; tracer warnings are kept for the report."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    seen.extend(str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning))


class TracerWarningsError(RuntimeError):
    """The trace warned (a data-dependent branch or shape was frozen): it may be wrong for other inputs."""


def trace_frozen(module: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype,
                 notes: Optional[list] = None, accept_tracer_warnings: bool = True) -> Frozen:
    """Trace + freeze under no_grad and the dtype's autocast, then warm up so IPEX's fusion pass fires."""
    flat = Flat(module, args, kwargs).eval()  # a new Module defaults to train mode; freeze needs eval
    example = flat.inputs(args, kwargs)
    tracer_warnings: list[str] = []
    with torch.no_grad(), precision(dtype), ipex_logs(), _jit_warnings(tracer_warnings):
        traced = torch.jit.trace(flat, example, check_trace=False, strict=False)
        graph = torch.jit.freeze(traced)
        for _ in range(WARMUP_RUNS):
            graph(*example)
    if tracer_warnings and not accept_tracer_warnings:
        msg = (f"{len(tracer_warnings)} tracer warning(s) (a branch or shape frozen into the trace), first: "
               f"{tracer_warnings[0][:160]}; pass accept_tracer_warnings=True to keep such traces")
        raise TracerWarningsError(msg)
    if notes is not None and tracer_warnings:
        notes.append(f"{len(tracer_warnings)} tracer warning(s), first: {tracer_warnings[0][:160]}")
    return Frozen(graph, flat, dtype)


def build(model: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype, fusion: bool,
          notes: Optional[list] = None, accept_tracer_warnings: bool = True) -> Callable:
    """The IPEX callable for one input signature: frozen TorchScript with fusion, else imperative."""
    optimized = optimized_copy(model, dtype, notes)
    if not fusion:
        return Imperative(optimized, dtype)
    return trace_frozen(optimized, args, kwargs, dtype, notes, accept_tracer_warnings)


def register_bench(register_path) -> None:
    """``ipex_imperative_{fp32,bf16}`` and ``ipex_jit_{fp32,bf16}`` for ``cpuboost bench``."""
    from .probe import availability

    def available() -> Optional[str]:
        verdict = availability()
        return None if verdict.usable else verdict.reason

    def path(dtype: torch.dtype, fusion: bool):
        def run(model: nn.Module, wl) -> Callable:
            _OPTIMIZED.pop(model, None)  # a fresh ipex.optimize per path, timed as its build
            fn = build(model, wl.args, wl.kwargs, dtype, fusion)
            _OPTIMIZED.pop(model, None)
            return fn
        return run

    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        register_path(f"ipex_imperative_{name}", path(dtype, False), dtype=name, available=available,
                      label=f"IPEX imperative {name}")
        register_path(f"ipex_jit_{name}", path(dtype, True), dtype=name, available=available,
                      label=f"IPEX jit trace+freeze {name}")
