"""The structure of a call's inputs and outputs as JSON (tensors as shape/stride/dtype leaves), and back.

Its own module because both the AOTInductor graphs and the package folders read and write it, and because
rebuilding outputs must need neither pickle nor the model's code (see ``package``'s docstring).
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import json
import sys
from typing import Any, Optional, Sequence

import torch

from .errors import PackageFormatError

_SCALAR = (bool, int, float, str, type(None))


# -- structure of inputs and outputs, as JSON -----------------------------------------------------------------
def _cls_path(obj: Any) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


def _is_model_output(value: Any) -> bool:
    return isinstance(value, collections.OrderedDict) and any(
        c.__name__ == "ModelOutput" and c.__module__.startswith("transformers") for c in type(value).__mro__)


def describe_tree(value: Any, leaves: list, *, inputs: bool) -> dict:
    """JSON description of a value; tensors are appended to ``leaves`` and described by shape/stride/dtype."""
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return {"t": "tensor", "shape": list(value.shape), "stride": list(value.stride()),
                "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, _SCALAR):
        return {"t": "const", "v": value}
    if not inputs and _is_model_output(value):
        keys = list(value.keys())
        return {"t": "modeloutput", "cls": _cls_path(value), "k": keys,
                "c": [describe_tree(value[k], leaves, inputs=inputs) for k in keys]}
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        return {"t": "namedtuple", "cls": _cls_path(value), "k": list(type(value)._fields),
                "c": [describe_tree(v, leaves, inputs=inputs) for v in value]}
    if isinstance(value, (tuple, list)):
        return {"t": "list" if isinstance(value, list) else "tuple",
                "c": [describe_tree(v, leaves, inputs=inputs) for v in value]}
    if isinstance(value, dict) or (inputs and hasattr(value, "keys") and hasattr(value, "__getitem__")):
        keys = list(value.keys())
        if not all(isinstance(k, (str, int)) for k in keys):
            raise PackageFormatError(f"dict keys {keys[:4]} cannot be packaged (only str and int keys)")
        return {"t": "dict", "k": keys, "c": [describe_tree(value[k], leaves, inputs=inputs) for k in keys]}
    if isinstance(value, torch.dtype):
        return {"t": "dtype", "v": str(value)}
    raise PackageFormatError(f"{'an input' if inputs else 'an output'} of type {type(value).__qualname__} "
                             "cannot be packaged (tensors, Python scalars, tuples, lists, dicts, namedtuples and "
                             "transformers ModelOutputs can)")


def _rebuild(spec: dict, leaves: Sequence[torch.Tensor], pos: list, classes: dict) -> Any:
    kind = spec["t"]
    if kind == "tensor":
        pos[0] += 1
        return leaves[pos[0] - 1]
    if kind == "const":
        return spec["v"]
    if kind == "dtype":
        return getattr(torch, spec["v"].replace("torch.", ""))
    children = [_rebuild(c, leaves, pos, classes) for c in spec.get("c", [])]
    if kind == "tuple":
        return tuple(children)
    if kind == "list":
        return children
    if kind == "dict":
        return dict(zip(spec["k"], children))
    cls = classes.get(spec["cls"])
    if kind == "namedtuple":
        return cls(*children) if cls is not None else collections.namedtuple(
            spec["cls"].rpartition(":")[2].rpartition(".")[2], spec["k"])(*children)
    if kind == "modeloutput":
        return (cls or PackagedOutput)(**dict(zip(spec["k"], children)))
    raise PackageFormatError(f"unknown node {kind!r} in a package's output structure")


class PackagedOutput(collections.OrderedDict):
    """Stands in for a transformers ModelOutput when transformers is not imported: fields by name,
    attribute or position (``out.logits``, ``out["logits"]``, ``out[0]``), ``to_tuple()``."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getitem__(name)
        except KeyError:
            raise AttributeError(name) from None

    def to_tuple(self) -> tuple:
        return tuple(self.values())


def _resolve_class(path: str, mode: str) -> Optional[type]:
    """The class named ``module:qualname`` when allowed: 'auto' only from modules already imported (no
    import cost, no code run on the package's say-so); 'import' imports the module; 'plain' never."""
    if mode == "plain":
        return None
    module_name, _, qualname = path.partition(":")
    module = sys.modules.get(module_name)
    if module is None and mode == "import":
        with contextlib.suppress(ImportError):
            module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def _classes(spec: dict, mode: str, out: dict) -> dict:
    if "cls" in spec and spec["cls"] not in out:
        out[spec["cls"]] = _resolve_class(spec["cls"], mode)
    for child in spec.get("c", []):
        _classes(child, mode, out)
    return out


def _input_key(args: tuple, kwargs: dict) -> str:
    leaves: list = []
    spec = describe_tree((tuple(args), dict(kwargs)), leaves, inputs=True)
    return json.dumps(_strip_strides(spec), sort_keys=True)


def _strip_strides(spec: dict) -> dict:
    if spec["t"] == "tensor":
        return {"t": "tensor", "shape": spec["shape"], "dtype": spec["dtype"]}
    if "c" in spec:
        return {**spec, "c": [_strip_strides(c) for c in spec["c"]]}
    return spec


def _collect_tensor_specs(spec: dict, out: list) -> None:
    if spec["t"] == "tensor":
        out.append(spec)
    for child in spec.get("c", []):
        _collect_tensor_specs(child, out)


def _describe(spec: dict) -> str:
    parts: list = []
    _collect_tensor_specs(spec, parts)
    return ", ".join(f"{s['dtype']}[{'x'.join(map(str, s['shape']))}]" for s in parts)


def _describe_call(args: tuple, kwargs: dict) -> str:
    leaves: list = []
    return _describe(describe_tree((tuple(args), dict(kwargs)), leaves, inputs=True))
