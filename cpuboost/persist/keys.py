"""Cache keys: what a build depends on, as plain JSON, and its hash.

Apart from the store, which only files entries under a key's hash: a key is computed (and tested) without
touching disk, and the package code reads the machine's fingerprint from here. ``store`` re-exports the
public names.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import torch
from torch import nn


def _jsonable(value: Any) -> Any:
    """Plain JSON for a key: dtypes, devices, tuples, sets and paths become strings or lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    return str(value)


def canonical(key: dict) -> str:
    return json.dumps(_jsonable(key), sort_keys=True, separators=(",", ":"))


def key_hash(key: dict) -> str:
    return hashlib.blake2b(canonical(key).encode(), digest_size=16).hexdigest()


def _code_digest(code: Any, h: Any, depth: int = 0) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code") and depth < 8:
            _code_digest(const, h, depth + 1)
        elif isinstance(const, (str, bytes, int, float, bool, type(None), tuple, frozenset)):
            h.update(repr(const).encode())


def _attr_digest(module: nn.Module, memo: dict) -> str:
    """Plain attributes that steer forward (eps, flags, HF configs); hooks counted, tensors and modules not."""
    parts = []
    for name, value in sorted(vars(module).items()):
        if name in ("_parameters", "_buffers", "_modules", "training") or isinstance(value, (nn.Module, torch.Tensor)):
            continue
        if name.endswith("hooks") and isinstance(value, dict):
            if value:
                parts.append(f"{name}:{len(value)}")
            continue
        if isinstance(value, (bool, int, float, str, type(None), torch.dtype)) or (
                isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str, type(None))) for v in value)):
            parts.append(f"{name}={value!r}")
        elif hasattr(value, "to_dict") and callable(value.to_dict):  # transformers' configs, shared by many
            text = memo.get(id(value))
            if text is None:
                try:
                    text = hashlib.blake2b(json.dumps(value.to_dict(), sort_keys=True, default=str).encode(),
                                           digest_size=8).hexdigest()
                except Exception:  # an odd config: its type still counts
                    text = type(value).__qualname__
                memo[id(value)] = text
            parts.append(f"{name}={text}")
    return ";".join(parts)


def model_fingerprint(model: nn.Module) -> str:
    """Structure: every submodule's name, class, forward code, extra_repr and plain attributes; every
    parameter and buffer's name, shape, stride and dtype. Not the weights' values (see ``weights_digest``)."""
    h = hashlib.blake2b(digest_size=16)
    seen_code: set[int] = set()
    memo: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        cls = type(module)
        h.update(f"M|{name}|{cls.__module__}.{cls.__qualname__}|{module.extra_repr()}|{_attr_digest(module, memo)}".encode())
        forward = getattr(cls, "forward", None)
        code = getattr(forward, "__code__", None)
        if code is not None and id(code) not in seen_code:
            seen_code.add(id(code))
            _code_digest(code, h)
    for kind, items in (("P", model.named_parameters(remove_duplicate=False)),
                        ("B", model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            h.update(f"{kind}|{name}|{tuple(t.shape)}|{t.stride()}|{t.dtype}|{t.device.type}".encode())
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor):
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_sparse or t.layout != torch.strided or t.is_quantized:
        t = t.to_dense() if t.layout != torch.strided else t.dequantize()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy()  # bytes, whatever the dtype (bf16 has no numpy twin)


def weights_digest(model: nn.Module, threads: int = 0) -> str:
    """Content hash of every parameter and buffer (names, shapes, dtypes and bytes).

    sha256 per tensor (SHA extensions where the CPU has them; 2x faster than blake2b on this EPYC), spread
    over a few threads (hashlib drops the GIL on large buffers): 0.1 s for ResNet-50 (100 MB fp32), 0.4 s
    for BERT-base (440 MB) on 2 busy cores. Run once per build or warm start, never per call.
    """
    named = [(f"P|{n}", t) for n, t in model.named_parameters(remove_duplicate=False)]
    named += [(f"B|{n}", t) for n, t in model.named_buffers(remove_duplicate=False)]
    workers = threads or min(4, os.cpu_count() or 1)
    first: dict = {}  # a tied tensor (an LM head sharing the embedding table) is read once, then named
    for name, t in named:
        first.setdefault(id(t), name)

    def one(item):
        name, t = item
        h = hashlib.sha256(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(_tensor_bytes(t) if first[id(t)] == name else f"same as {first[id(t)]}".encode())
        return h.digest()

    big = sum(t.numel() for _, t in named) > (1 << 20)
    if workers > 1 and big:
        with ThreadPoolExecutor(workers) as pool:
            digests = list(pool.map(one, named))
    else:
        digests = [one(item) for item in named]
    return hashlib.sha256(b"".join(digests)).hexdigest()[:32]


def data_digest(value: Any) -> str:
    """Content hash of a nest of tensors and plain values (int8 calibration batches): what they hold."""
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten(value)
    h = hashlib.sha256(str(spec).encode())
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            h.update(f"T|{tuple(leaf.shape)}|{leaf.dtype}|".encode())
            h.update(_tensor_bytes(leaf))
        else:
            h.update(f"V|{leaf!r}|".encode())
    return h.hexdigest()[:32]


def _cpu_flags() -> list[str]:
    """Every instruction-set flag the kernel reports for this CPU: Inductor compiles with -march=native, so
    an artifact may use any of them, and a subset would let it load on a CPU that lacks one (SIGILL)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return sorted(set(value.split()))
    except OSError:
        pass
    return []


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_fingerprint(backends: tuple[str, ...] = ()) -> dict:
    """What a compiled artifact depends on besides the model: the CPU's full flag list, torch's CPU capability,
    the architecture, Python and library versions. ``backends``: extra distributions to version
    (e.g. ``("openvino",)``), read from metadata without importing them."""
    from .. import __version__ as cpuboost_version

    info = {
        "arch": os.uname().machine if hasattr(os, "uname") else sys.platform,
        "cpu_flags": _cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "cpuboost": cpuboost_version,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    for dist in backends:
        info[dist] = _version(dist)
    return info


def signature_json(args: tuple, kwargs: dict, dynamic: Optional[dict] = None) -> list:
    """The input signature as JSON: tensors by shape, stride and dtype; Python values by value. ``dynamic``
    (input -> dims, as a dynamic build gets them): those dims read -1 and those inputs' strides are left out,
    so every size the dynamic graph serves has one entry (a restart's first call at another length finds it)."""
    def one(value: Any, dims: Optional[list] = None) -> Any:
        if isinstance(value, torch.Tensor):
            shape = [-1 if d in dims else n for d, n in enumerate(value.shape)] if dims else list(value.shape)
            return {"shape": shape, "stride": None if dims else list(value.stride()), "dtype": str(value.dtype),
                    "device": value.device.type, "grad": value.requires_grad}
        if isinstance(value, (list, tuple)):
            return {type(value).__name__: [one(v) for v in value]}
        if isinstance(value, dict):
            return {"dict": [[str(k), one(v)] for k, v in value.items()]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {type(value).__name__: value}
        return {"object": f"{type(value).__module__}.{type(value).__qualname__}"}

    autocast = [torch.is_autocast_enabled("cpu"), str(torch.get_autocast_dtype("cpu"))]
    dynamic = dynamic or {}  # the top-level encoding is ``one``'s for a tuple and a dict, with each input's dims
    return [{"tuple": [one(v, dynamic.get(i)) for i, v in enumerate(args)]},
            {"dict": [[str(k), one(v, dynamic.get(k))] for k, v in kwargs.items()]}, {"autocast": autocast}]


def make_key(model: nn.Module, args: tuple, kwargs: dict, options: dict, *, weights: bool = True,
             backends: tuple[str, ...] = (), dynamic: Optional[dict] = None) -> dict:
    """The full key of one build: structure, weights (when an artifact bakes them), signature (``dynamic``
    dims as any size), machine, the options that steer the plan (dtype, backend, fusion, tolerance...)."""
    key = {"model": model_fingerprint(model), "signature": signature_json(args, kwargs, dynamic),
           "machine": machine_fingerprint(backends), "options": _jsonable(options)}
    if weights:
        key["weights"] = weights_digest(model)
    return key
