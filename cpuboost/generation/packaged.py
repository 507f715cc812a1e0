"""The decode step as an AOTInductor package in cpuboost's store, so a restarted process loads it (seconds)
instead of compiling (the in-process graph's oneDNN-packed weights keep Inductor's FX graph cache from
hitting: a warm start compiled again for 30 s).

The exported unit takes the step's tensors flat: the call's tensors, then every tensor of the static cache
(per layer: keys, values and whatever position counter this transformers keeps), which the graph updates in
place, so each call's own cache (the pool's) is written as in eager. It returns the logits; the step hands
transformers its output type with the call's cache in it. Keywords that are not tensors (``use_cache``,
``logits_to_keep``...) are part of the package: a call with others, or with other shapes, runs eagerly."""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .cache import layer_states, shell_layers
from .decode import Step

FORMAT, VERSION = "cpuboost-decode-package", 1
_PLAIN = (bool, int, float, str, type(None))


class UnpackableStep(ValueError):
    """The step's call cannot be described as flat tensors plus constants (the reason says which keyword)."""


def describe_call(kwargs: dict, cache_arg: str) -> dict:
    """The call's layout as JSON: each keyword a tensor, a dict of tensors, a constant, or the cache."""
    layout: dict = {"cache_arg": cache_arg, "kwargs": []}
    for name, value in kwargs.items():
        if name == cache_arg:
            continue
        if isinstance(value, torch.Tensor):
            layout["kwargs"].append([name, "tensor", _spec(value)])
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            layout["kwargs"].append([name, "tensors", {k: _spec(v) for k, v in value.items()}])
        elif isinstance(value, _PLAIN):
            layout["kwargs"].append([name, "constant", value])
        else:
            raise UnpackableStep(f"keyword {name!r} is a {type(value).__name__}")
    cache = kwargs.get(cache_arg)
    if cache is None:
        raise UnpackableStep(f"no {cache_arg!r} in the step's call")
    layout["cache"] = [[_spec(t) for t in tensors] for tensors in cache_tensors(cache)]
    layout["table"] = None
    return layout


def _spec(tensor: torch.Tensor) -> list:
    return [list(tensor.shape), str(tensor.dtype).replace("torch.", "")]


def cache_tensors(cache: Any) -> list[list[torch.Tensor]]:
    """Every tensor the step reads or writes in the cache, per layer, in a fixed order."""
    layers = getattr(cache, "layers", None)
    if layers:
        return [[value for _, value in sorted(vars(layer).items()) if isinstance(value, torch.Tensor)]
                for layer in layers]
    return [[keys, values] for keys, values in layer_states(cache)]


def input_table(model: nn.Module) -> Optional[torch.Tensor]:
    """The input embedding table, which the package takes as an input instead of holding it: a step reads a
    few of its rows, and held it would be a second copy of the largest weight (Qwen2-0.5B: 544 MB of 1.1 GB)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def flatten(layout: dict, kwargs: dict, table: Optional[torch.Tensor] = None) -> Optional[list[torch.Tensor]]:
    """The call's tensors in the package's order (``table``: the input embedding table, when the layout takes
    it); None when the call differs from the layout."""
    flat: list[torch.Tensor] = []
    for name, kind, spec in layout["kwargs"]:
        value = kwargs.get(name)
        if kind == "constant":
            if value != spec or type(value) is not type(spec):
                return None
            continue
        tensors = [value] if kind == "tensor" else (
            [value.get(k) for k in spec] if isinstance(value, dict) and value.keys() == spec.keys() else None)
        specs = [spec] if kind == "tensor" else list(spec.values())
        if tensors is None or not all(isinstance(t, torch.Tensor) and _spec(t) == s for t, s in zip(tensors, specs)):
            return None
        flat += [t.contiguous() for t in tensors]
    if {n for n, _, _ in layout["kwargs"]} | {layout["cache_arg"]} != set(kwargs):
        return None
    layers = cache_tensors(kwargs[layout["cache_arg"]])
    if [[_spec(t) for t in tensors] for tensors in layers] != layout["cache"]:
        return None
    flat += [t for tensors in layers for t in tensors]
    if layout.get("table") is not None:
        if table is None or _spec(table) != layout["table"]:
            return None
        flat.append(table)
    return flat


class _FlatDecode(nn.Module):
    """The decode model taking the step's tensors flat (then the cache's, then the embedding table) and
    returning the logits. With the table as an input the model gets ``inputs_embeds`` from its own embedding
    module run on that table (a scaled embedding keeps its scale).

    The model's weights are buffers of this module under names without dots: Inductor drops a weight its GEMM
    template has repacked only when the program's attribute has the constant's own (dotless) name, so with the
    model's nested names every package held each weight twice (Qwen2-0.5B int8: 630 MB instead of 315)."""

    def __init__(self, model: nn.Module, layout: dict, cache: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.layout, self.cache, self.dtype = layout, cache, dtype
        self._model = [model]  # not a submodule: its tensors enter the program as the flat buffers below
        self._fqns = {}  # flat buffer name -> the model's own name
        for fqn, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            name = fqn.replace(".", "_")
            while name in self._fqns or hasattr(self, name):
                name += "_"
            self._fqns[name] = fqn
            self.register_buffer(name, tensor.detach())

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        kwargs, index = {}, 0
        for name, kind, spec in self.layout["kwargs"]:
            if kind == "constant":
                kwargs[name] = spec
            elif kind == "tensor":
                kwargs[name], index = tensors[index], index + 1
            else:
                kwargs[name] = dict(zip(spec, tensors[index:index + len(spec)]))
                index += len(spec)
        per_layer = [len(layer) for layer in self.layout["cache"]]
        grouped = []
        for count in per_layer:
            grouped.append(list(tensors[index:index + count]))
            index += count
        kwargs[self.layout["cache_arg"]] = shell_layers(self.cache, grouped)
        model = self._model[0]
        if self.layout["table"] is not None:
            module = model.get_input_embeddings()
            ids = kwargs.pop("input_ids")
            kwargs["inputs_embeds"] = torch.func.functional_call(module, {"weight": tensors[index]}, (ids,))
        state = {fqn: getattr(self, name) for name, fqn in self._fqns.items()}
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = torch.func.functional_call(model, state, (), kwargs)
        self.output = (type(out).__module__, type(out).__qualname__, [k for k in out.keys() if k != "logits"])
        return out.logits


class ExportedStep:
    """A decode step exported for one call's layout (the program holds the decode copy's weights)."""

    def __init__(self, program: Any, layout: dict, output: list, export_s: float) -> None:
        self.program, self.layout, self.output, self.export_s = program, layout, output, export_s


def export_step(model: nn.Module, kwargs: dict, cache_arg: str, dtype: torch.dtype) -> ExportedStep:
    """Export the step for this call (on a private copy of the module tree: export swaps parameters for fake
    tensors while it traces). Reads only shapes: no tensor is written. Raises ``UnpackableStep`` or whatever
    export raises."""
    from .copies import shared_copy

    layout = describe_call(kwargs, cache_arg)
    table = input_table(model)
    if table is not None and isinstance(kwargs.get("input_ids"), torch.Tensor) and "inputs_embeds" not in kwargs:
        layout["table"] = _spec(table)
    began = time.perf_counter()
    flat_model = _FlatDecode(shared_copy(model), layout, kwargs[cache_arg], dtype).eval()
    with torch.no_grad():
        exported = torch.export.export(flat_model, tuple(flatten(layout, kwargs, table)), strict=False)
    module, name, fields = flat_model.output
    if not module.startswith("transformers.") or len(fields) > 1:
        raise UnpackableStep(f"the model answers {module}.{name} with {fields}: not logits and the cache")
    return ExportedStep(exported, layout, [module, name, fields[0] if fields else None], time.perf_counter() - began)


def compile_unit(step: ExportedStep, options: dict, unit: Path, *, nice: int = 0) -> dict:
    """Save an exported step and compile it into the unit folder ``unit`` (``decode.pt2`` and its record
    ``decode.json``) in a child process. Raises ``ChildCompileError`` or what saving raises."""
    from ..persist import units
    from ..persist.aoti import _drop_inductor_copy, requirements
    from ..persist.child import compile_saved, save_program

    began = time.perf_counter()
    import torch._inductor.config as inductor_config

    configs = dict(options)
    if "aot_inductor.package_constants_on_disk_format" in inductor_config.get_config_copy():  # torch >= 2.9
        configs.update({"aot_inductor.package_constants_in_so": False,
                        "aot_inductor.package_constants_on_disk_format": "binary_blob"})
    program = save_program(step.program, str(unit / "decode.pt2"))
    step.program = None  # the weights it holds go as soon as they are written
    try:
        compile_saved(program, str(unit / "decode.pt2"), configs, nice=nice, kernels=True)
    finally:
        program.unlink(missing_ok=True)
    _drop_inductor_copy(unit / "decode.pt2")
    meta = {"format": FORMAT, "version": VERSION, "layout": step.layout, "needs": requirements(),
            "output": step.output, "export_s": round(step.export_s, 2),
            "compile_s": round(time.perf_counter() - began, 2)}
    return units.seal(unit, "decode.json", meta)


class PackagedDecode(Step):
    """A decode step loaded from its package. Calls that differ from its layout run the decode model eagerly
    (as a compiled step's unguarded calls do)."""

    def __init__(self, model: nn.Module, unit: Path, how: str, root: Optional[Path] = None) -> None:
        from ..persist import trust, units
        from ..persist.aoti import RUNNERS, check_requirements
        from ..persist.errors import PackageFormatError, UnsafeLocationError

        super().__init__(how)
        path = unit / "decode.pt2"
        problem = trust.unsafe_reason(path, root if root is not None else unit)
        if problem is not None:
            raise UnsafeLocationError(f"not loading {path}: {problem}")
        try:
            meta = json.loads((unit / "decode.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PackageFormatError(f"{unit / 'decode.json'} is missing or damaged ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise PackageFormatError(f"{unit / 'decode.json'} is not a cpuboost decode package of version {VERSION}")
        units.check_files(unit, meta.get("files"), str(unit))
        check_requirements(meta["needs"])
        self.model, self.layout, self.meta, self.unit, self.built = model, meta["layout"], meta, unit, True
        self.eager_calls, self._table = 0, input_table(model)
        module, name, self._cache_field = meta["output"]
        if not module.startswith("transformers."):
            raise PackageFormatError(f"{unit / 'decode.json'} names an output type outside transformers: {module}")
        self._output_type = getattr(importlib.import_module(module), name)
        self._loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, RUNNERS, -1)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        flat = None if args else flatten(self.layout, kwargs, self._table)
        if flat is None:
            self.eager_calls += 1
            return self.model(*args, **kwargs)
        with torch.no_grad():
            logits = self._loader.run(flat)[0]
        fields = {"logits": logits}
        if self._cache_field is not None:
            fields[self._cache_field] = kwargs[self.layout["cache_arg"]]
        return self._output_type(**fields)
