"""Deployment packages and persistent Inductor graphs: AOTInductor (torch.export + freezing) plus JSON.

A package is a folder::

    manifest.json      format, dtype, build machine, what the running machine needs, one entry per graph
    graph-0.pt2        AOTInductor package (weights folded and baked in, bf16 casts folded by freezing)
    graph-0.json       the graph's input template and output structure (also inside manifest.json)

The exported graph takes the call's tensors as a flat tuple and returns a flat tuple, cast in the graph to
the dtypes eager fp32 gives; the call's structure lives in JSON here, so loading needs neither pickle nor
the model's code: ``load_package`` rebuilds tuples, dicts, namedtuples and transformers ``ModelOutput``
objects. (``aoti_load_package`` would rebuild a ModelOutput itself only in a process that imported
transformers first: a fresh process raises "Deserializing ...ModelOutput in pytree is not registered".)

Inductor compiles with ``-march=native`` and the ISA it picked (``cpu_vec_isa``): a package needs the
build CPU's code-generation flags, the same torch (the .so links libtorch's C ABI of that version) and the
same architecture. ``load_package`` checks those first and raises ``PackageMismatchError`` naming each
difference and the fix.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import CpuBoostError
from . import store as _store

log = logging.getLogger("cpuboost")

FORMAT = "cpuboost-package"
VERSION = 1
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}
_SCALAR = (bool, int, float, str, type(None))
# x86-64 micro-architecture levels (for march=): the codegen flags each one lets the compiler use
_MARCH_LEVELS = {
    "x86-64": [], "x86-64-v2": [],
    "x86-64-v3": ["avx", "avx2", "fma", "f16c"],
    "x86-64-v4": ["avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
}


class PackageMismatchError(CpuBoostError, RuntimeError):
    """A package built for another machine or library version; ``differences`` maps what to (needed, here)."""

    def __init__(self, message: str, differences: Optional[dict] = None) -> None:
        super().__init__(message)
        self.differences = differences or {}


class PackageFormatError(CpuBoostError, ValueError):
    """Not a cpuboost package, a damaged one, or a model whose inputs/outputs cannot be packaged."""


class PackageSignatureError(CpuBoostError, ValueError):
    """A call whose input signature (shapes, dtypes, structure) was not built into the package."""


class PackageVerificationError(CpuBoostError, RuntimeError):
    """The compiled graph did not match eager fp32 within the dtype's tolerance; nothing was written."""


def _dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise PackageFormatError(f"dtype {dtype!r} cannot be packaged; use one of bf16, fp16, fp32") from None


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


# -- the exported unit ------------------------------------------------------------------------------------
class _FlatRunner(nn.Module):
    """The model under the dtype's autocast, taking the call's tensors flat and returning output tensors
    flat, each cast to the dtype eager fp32 gives (in the graph, so the cast fuses into the last kernel)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, in_spec: dict, out_dtypes: list) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.in_spec = in_spec
        self.out_dtypes = out_dtypes

    def forward(self, *tensors: torch.Tensor) -> tuple:
        args, kwargs = _rebuild(self.in_spec, tensors, [0], {})
        if self.dtype == torch.float32:
            with torch.autocast("cpu", enabled=False):
                out = self.model(*args, **kwargs)
        else:
            with torch.autocast("cpu", dtype=self.dtype):
                out = self.model(*args, **kwargs)
        leaves: list = []
        describe_tree(out, leaves, inputs=False)
        return tuple(t.to(d) if t.dtype != d else t for t, d in zip(leaves, self.out_dtypes))


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for tracing, then every submodule's own flag back (the caller's model is not changed)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _eager(model: nn.Module, args: tuple, kwargs: dict, dtype: Optional[torch.dtype]) -> Any:
    with torch.no_grad():
        if dtype is None or dtype == torch.float32:
            with torch.autocast("cpu", enabled=False):
                return model(*args, **kwargs)
        with torch.autocast("cpu", dtype=dtype):
            return model(*args, **kwargs)


def _isa() -> dict:
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = pick_vec_isa()
        return {"name": str(isa), "flags": isa.build_arch_flags()}
    except Exception:  # no compiler or an exotic platform: the flag list alone then decides
        return {"name": "unknown", "flags": ""}


def _flag_names(arch_flags: str) -> list[str]:
    """'-mavx512f -mavx512vnni -mamx-tile' -> cpuinfo names ['avx512f', 'avx512_vnni', 'amx_tile']."""
    names = []
    for flag in arch_flags.split():
        if not flag.startswith("-m") or flag.startswith("-march"):
            continue
        name = flag[2:].replace("-", "_")
        for glued in ("vnni", "bf16", "fp16"):
            if name.startswith("avx512") and name.endswith(glued) and not name.endswith("_" + glued):
                name = name[: -len(glued)] + "_" + glued
        names.append(name)
    return sorted(set(names))


def requirements(march: Optional[str] = None) -> dict:
    """What a graph compiled here needs at load: with -march=native (Inductor's default), every codegen
    flag this CPU has; with ``march`` a level such as 'x86-64-v4', that level's flags plus Inductor's ISA."""
    machine = _store.machine_fingerprint()
    isa = _isa()
    if march is None:
        flags = sorted(set(machine["cpu_flags"]) | set(_flag_names(isa["flags"])))
    else:
        if march not in _MARCH_LEVELS:
            raise PackageFormatError(f"march={march!r} unknown; use one of {sorted(_MARCH_LEVELS)} or None")
        flags = sorted(set(_MARCH_LEVELS[march]) | set(_flag_names(isa["flags"])))
    return {"arch": machine["arch"], "cpu_flags": flags, "torch": machine["torch"], "python": machine["python"],
            "isa": isa, "march": march or "native"}


def check_requirements(needs: dict) -> None:
    """Raise ``PackageMismatchError`` when this machine or its libraries differ from what a graph needs."""
    here = _store.machine_fingerprint()
    differences: dict[str, tuple] = {}
    fixes = []
    if needs.get("arch") != here["arch"]:
        differences["arch"] = (needs.get("arch"), here["arch"])
        fixes.append(f"build the package on a {needs.get('arch')} machine like this one")
    if needs.get("torch") != here["torch"]:
        differences["torch"] = (needs.get("torch"), here["torch"])
        fixes.append(f"install torch=={needs.get('torch')}, or rebuild the package with cpuboost.save under "
                     f"torch {here['torch']}")
    missing = sorted(set(needs.get("cpu_flags", [])) - set(here["cpu_flags"]))
    if missing:
        differences["cpu_flags"] = (missing, "missing here")
        fixes.append("rebuild on this machine, or build with march='x86-64-v3'/'x86-64-v4' for a portable package "
                     "(only the ISA Inductor picks is then needed)")
    if differences:
        what = "; ".join(f"{k}: package needs {v[0]}, this machine has {v[1]}" if k != "cpu_flags"
                         else f"CPU lacks {', '.join(v[0])}" for k, v in differences.items())
        raise PackageMismatchError(f"this package cannot run here ({what}). To fix: {'; or '.join(fixes)}",
                                   differences)


# -- compile one graph ----------------------------------------------------------------------------------------
def _tolerance_ok(reference: Any, yard: Any, out_leaves: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[bool, list]:
    ref_leaves: list = []
    describe_tree(reference, ref_leaves, inputs=False)
    yard_leaves: list = []
    if yard is not None:
        describe_tree(yard, yard_leaves, inputs=False)
    errors, ok = [], True
    for i, (ref, out) in enumerate(zip(ref_leaves, out_leaves)):
        if not ref.is_floating_point():
            good = torch.equal(ref, out.to(ref.dtype))
            errors.append(0.0 if good else float("inf"))
            ok &= good
            continue
        scale = ref.float().abs().max().item() or 1.0
        err = (out.float() - ref.float()).abs().max().item() / scale
        if dtype == torch.float32:
            bound = 1e-4
        else:
            eager = (yard_leaves[i].float() - ref.float()).abs().max().item() / scale if yard_leaves else 0.0
            bound = max(4 * eager, 2e-2 if dtype == torch.bfloat16 else 5e-3)
        errors.append(err)
        ok &= err <= bound
    return ok and len(ref_leaves) == len(out_leaves), errors


def compile_aoti(module: nn.Module, args: tuple, kwargs: dict, dtype: Union[str, torch.dtype], *,
                 workdir: Union[str, os.PathLike, None] = None, name: str = "graph", march: Optional[str] = None,
                 reference: Any = None) -> tuple["PackagedGraph", Path]:
    """Export ``module`` for this signature, compile it with AOTInductor (freezing) and load it.

    Returns the loaded graph (a callable answering in eager's output structure and dtypes) and the path of
    its ``.pt2``; ``<name>.json`` beside it holds the structure, so ``load_graph(path)`` brings it back in a
    later process without compiling. ``workdir``: e.g. ``DecisionStore.artifact_dir(key)``; files appear
    there atomically. ``reference``: eager fp32's output for these inputs, if the caller has it already
    (only its dtypes are used here). Raises whatever torch.export or Inductor raise: a model that does not
    export (data-dependent Python control flow) falls back to torch.compile in the caller.
    """
    dtype = _dtype(dtype)
    leaves: list = []
    in_spec = describe_tree((tuple(args), dict(kwargs)), leaves, inputs=True)
    if reference is None:
        with _eval_mode(module):
            reference = _eager(module, args, kwargs, torch.float32)
    out_leaves: list = []
    out_spec = describe_tree(reference, out_leaves, inputs=False)
    out_dtypes = [t.dtype for t in out_leaves]
    flat = _FlatRunner(module, dtype, in_spec, out_dtypes).eval()
    folder = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="cpuboost-aoti-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    from torch import _inductor as inductor  # heavy: imported only when compiling

    with torch.no_grad(), _eval_mode(module):  # freezing applies only without grad
        exported = torch.export.export(flat, tuple(leaves), strict=False)
        exported_s = time.perf_counter() - started
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".pt2")
        os.close(fd)
        configs: dict[str, Any] = {"freezing": True}
        if march is not None:
            configs["cpp.march"] = march
        try:
            inductor.aoti_compile_and_package(exported, package_path=tmp, inductor_configs=configs)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    meta = {"format": FORMAT, "version": VERSION, "dtype": str(dtype).replace("torch.", ""), "inputs": in_spec,
            "output": out_spec, "needs": requirements(march), "bytes": os.path.getsize(tmp),
            "export_s": round(exported_s, 2), "compile_s": round(time.perf_counter() - started, 2)}
    _drop_inductor_copy(Path(tmp))
    final = folder / f"{name}.pt2"
    _store.publish(Path(tmp), final)
    _store.atomic_write(folder / f"{name}.json", json.dumps(meta, indent=1).encode())
    log.info("cpuboost: AOTInductor graph %s in %.1f s (export %.1f s)", final, meta["compile_s"], exported_s)
    graph = PackagedGraph(final, meta)
    if workdir is None:  # nobody else owns the folder: it goes with the graph (the loader has its own copy)
        weakref.finalize(graph, shutil.rmtree, str(folder), True)
    return graph, final


def _drop_inductor_copy(pt2: Path) -> None:
    """AOTInductor leaves its build folder (the wrapper .so with every weight baked in: 50 MB for ResNet-50,
    270 MB for BERT-base) in Inductor's cache dir; the package holds the same files, so that copy goes."""
    import zipfile

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    try:
        with zipfile.ZipFile(pt2) as archive:
            sos = [Path(n).name for n in archive.namelist() if n.endswith(".wrapper.so")]
        root = Path(cache_dir())
        for so in sos:
            for hit in root.glob(f"*/{so}"):
                shutil.rmtree(hit.parent, ignore_errors=True)
    except (OSError, zipfile.BadZipFile) as exc:  # tidying only: never fails a build
        log.debug("cpuboost: left AOTInductor's build folder in place (%s)", exc)


class PackagedGraph:
    """One AOTInductor graph for one input signature, answering in the recorded output structure."""

    def __init__(self, path: Path, meta: dict, output_types: str = "auto") -> None:
        self.path = Path(path)
        self.meta = meta
        self._tensor_specs = []
        _collect_tensor_specs(meta["inputs"], self._tensor_specs)
        self._classes = _classes(meta["output"], output_types, {})
        try:
            # The C++ loader straight away: aoti_load_package would import torch._inductor (seconds) only to
            # wrap it in pytree specs we do not use (ours are JSON, above).
            self._loader = torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, 1, -1)
        except Exception as exc:
            raise PackageFormatError(f"{self.path} does not load as an AOTInductor package "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from exc

    @property
    def key(self) -> str:
        return json.dumps(_strip_strides(self.meta["inputs"]), sort_keys=True)

    def _flat_inputs(self, args: tuple, kwargs: dict) -> list:
        leaves: list = []
        describe_tree((tuple(args), dict(kwargs)), leaves, inputs=True)
        flat = []
        for t, spec in zip(leaves, self._tensor_specs):
            if list(t.stride()) != spec["stride"] and t.numel() > 1:
                t = torch.empty_strided(t.shape, spec["stride"], dtype=t.dtype).copy_(t)
            flat.append(t)
        return flat

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = self._flat_inputs(args, kwargs)
        with torch.no_grad():
            outs = self._loader.run(flat)
        return _rebuild(self.meta["output"], list(outs), [0], self._classes)


def _collect_tensor_specs(spec: dict, out: list) -> None:
    if spec["t"] == "tensor":
        out.append(spec)
    for child in spec.get("c", []):
        _collect_tensor_specs(child, out)


def load_graph(path: Union[str, os.PathLike], *, output_types: str = "auto", check: bool = True) -> PackagedGraph:
    """A graph written by ``compile_aoti`` (its ``.pt2`` path), checked against this machine, loaded.
    Raises PackageFormatError for a missing/damaged/foreign sidecar, PackageMismatchError for another machine."""
    path = Path(path)
    meta = _read_json(path.with_suffix(".json"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise PackageFormatError(f"{path.with_suffix('.json')} is not a cpuboost graph of version {VERSION}")
    if check:
        check_requirements(meta["needs"])
    size = path.stat().st_size if path.exists() else -1
    if size != meta.get("bytes"):
        raise PackageFormatError(f"{path} is {size} bytes, its sidecar says {meta.get('bytes')}: truncated or "
                                 "replaced; rebuild it")
    return PackagedGraph(path, meta, output_types)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PackageFormatError(f"{path} is missing: not a cpuboost package (or an incomplete copy)") from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise PackageFormatError(f"{path} is damaged ({type(exc).__name__}: {str(exc)[:120]})") from exc
    if not isinstance(data, dict):
        raise PackageFormatError(f"{path} is not a cpuboost manifest")
    return data


# -- deployment packages --------------------------------------------------------------------------------------
def save_package(module: nn.Module, examples: Sequence[tuple[tuple, dict]], dtype: Union[str, torch.dtype],
                 path: Union[str, os.PathLike], extra_manifest: Optional[dict] = None, *, verify: bool = True,
                 march: Optional[str] = None, overwrite: bool = True) -> Path:
    """Compile one AOTInductor graph per example signature into the folder ``path`` with a manifest.

    ``module``: what should run (the working copy after module passes, in eval mode; not an IPEX-traced
    model). ``examples``: ``[(args, kwargs), ...]``, one per signature to serve. Each graph is checked against
    eager fp32 (``verify``) within the dtype's tolerance before anything is written. The folder is built
    beside ``path`` and renamed into place, so a crash leaves the old package (or none), never half of one.
    Graphs the runtime already compiled with ``compile_aoti`` need no second compile: see ``pack_graphs``.
    """
    dtype = _dtype(dtype)
    path = Path(path)
    if not examples:
        raise PackageFormatError("save_package needs at least one example (args, kwargs)")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.build-"))
    try:
        files, seen = [], set()
        for i, (args, kwargs) in enumerate(examples):
            args, kwargs = tuple(args), dict(kwargs or {})
            key = _input_key(args, kwargs)
            if key in seen:
                continue
            seen.add(key)
            with _eval_mode(module):
                reference = _eager(module, args, kwargs, torch.float32)
            graph, file = compile_aoti(module, args, kwargs, dtype, workdir=staging, name=f"graph-{i}",
                                       march=march, reference=reference)
            if verify:
                with _eval_mode(module):
                    yard = _eager(module, args, kwargs, dtype) if dtype != torch.float32 else None
                out_leaves: list = []
                describe_tree(graph(*args, **kwargs), out_leaves, inputs=False)
                ok, errors = _tolerance_ok(reference, yard, out_leaves, dtype)
                graph.meta["max_rel_error"] = [round(e, 6) if e != float("inf") else "inf" for e in errors]
                _store.atomic_write(file.with_suffix(".json"), json.dumps(graph.meta, indent=1).encode())
                if not ok:
                    raise PackageVerificationError(
                        f"the compiled graph for signature {i} differs from eager fp32 by {errors} (relative to "
                        f"each output's max); not saved. Try dtype='fp32' or report the model")
            files.append(file)
        return pack_graphs(files, path, extra_manifest, overwrite=overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pack_graphs(files: Sequence[Union[str, os.PathLike]], path: Union[str, os.PathLike],
                extra_manifest: Optional[dict] = None, *, overwrite: bool = True) -> Path:
    """Write a package folder from graphs ``compile_aoti`` already made (``.pt2`` with ``.json`` beside):
    what ``cpuboost.save`` uses for signatures the runtime built through the store. Copies, then renames
    the folder into place."""
    path = Path(path)
    try:
        json.dumps(extra_manifest or {})
    except (TypeError, ValueError) as exc:
        raise PackageFormatError(f"extra_manifest must be plain JSON data: {exc}") from exc
    metas = []
    for file in files:
        meta = _read_json(Path(file).with_suffix(".json"))
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise PackageFormatError(f"{file} was not written by this cpuboost's compile_aoti")
        metas.append((Path(file), meta))
    if not metas:
        raise PackageFormatError("a package needs at least one graph")
    dtypes = {m["dtype"] for _, m in metas}
    needs = [m["needs"] for _, m in metas]
    if len(dtypes) > 1 or any(n != needs[0] for n in needs):
        raise PackageFormatError(f"graphs of one package must share dtype and build machine, got {sorted(dtypes)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.staging-"))
    try:
        graphs = []
        for i, (file, meta) in enumerate(metas):
            name = f"graph-{i}.pt2"
            shutil.copyfile(file, staging / name)
            _store.atomic_write((staging / name).with_suffix(".json"), json.dumps(meta, indent=1).encode())
            graphs.append({"file": name, "inputs": meta["inputs"], "output": meta["output"],
                           "bytes": meta["bytes"], "compile_s": meta.get("compile_s"),
                           "max_rel_error": meta.get("max_rel_error")})
        manifest = {"format": FORMAT, "version": VERSION, "dtype": metas[0][1]["dtype"],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "built_on": _store.machine_fingerprint(),
                    "needs": needs[0], "graphs": graphs, "extra": extra_manifest or {}}
        _store.atomic_write(staging / "manifest.json", json.dumps(manifest, indent=1).encode())
        _shareable(staging)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path")
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _shareable(folder: Path) -> None:
    """Temporary files are private (0600/0700); a package is meant to be copied and read by others."""
    umask = 0o022  # read, not set: os.umask() to query it would change it for every thread for a moment
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status", encoding="ascii") as fh:
        umask = int(next(ln for ln in fh if ln.startswith("Umask:")).split()[1], 8)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


class PackagedModel(nn.Module):
    """A loaded package: call it like the original model; each signature built into the package answers
    without compiling. ``manifest`` is the package's manifest; ``signatures`` lists what it serves."""

    def __init__(self, path: Path, manifest: dict, graphs: dict) -> None:
        super().__init__()
        self.path = path
        self.manifest = manifest
        self._graphs = graphs
        self.eval()

    @property
    def signatures(self) -> list[str]:
        return [_describe(g.meta["inputs"]) for g in self._graphs.values()]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        graph = self._graphs.get(_input_key(args, kwargs))
        if graph is None:
            raise PackageSignatureError(
                f"this package serves [{'] or ['.join(self.signatures)}], not [{_describe_call(args, kwargs)}]; "
                "save the package with an example of this signature too")
        return graph(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, dtype={self.manifest.get('dtype')}, signatures={self.signatures}"


def _describe(spec: dict) -> str:
    parts: list = []
    _collect_tensor_specs(spec, parts)
    return ", ".join(f"{s['dtype']}[{'x'.join(map(str, s['shape']))}]" for s in parts)


def _describe_call(args: tuple, kwargs: dict) -> str:
    leaves: list = []
    return _describe(describe_tree((tuple(args), dict(kwargs)), leaves, inputs=True))


def read_manifest(path: Union[str, os.PathLike]) -> dict:
    manifest = _read_json(Path(path) / "manifest.json")
    if manifest.get("format") != FORMAT:
        raise PackageFormatError(f"{path} is not a cpuboost package (manifest format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise PackageMismatchError(f"{path} is a version-{manifest.get('version')} package; this cpuboost reads "
                                   f"version {VERSION}. Rebuild it with this cpuboost's save()",
                                   {"version": (manifest.get("version"), VERSION)})
    return manifest


def load_package(path: Union[str, os.PathLike], *, output_types: str = "auto", check: bool = True) -> PackagedModel:
    """Load a package written by ``save_package``: no compiling, no pickle, no model code needed.

    Checks the manifest against this machine first (``PackageMismatchError`` names every difference and the
    fix; ``check=False`` skips that at your own risk). ``output_types``: how transformers ModelOutputs and
    namedtuples come back: 'auto' (the real class when its module is already imported, else a stand-in with
    the same fields: ``PackagedOutput``), 'import' (import the class's module), 'plain' (stand-ins always).
    """
    if output_types not in ("auto", "import", "plain"):
        raise ValueError(f"output_types={output_types!r}: use 'auto', 'import' or 'plain'")
    path = Path(path)
    manifest = read_manifest(path)
    if check:
        check_requirements(manifest["needs"])
    graphs = {}
    for entry in manifest.get("graphs", []):
        file = path / entry["file"]
        size = file.stat().st_size if file.exists() else -1
        if size != entry.get("bytes"):
            raise PackageFormatError(f"{file} is {size} bytes, the manifest says {entry.get('bytes')}: the package "
                                     "is incomplete or damaged; copy or save it again")
        meta = {"inputs": entry["inputs"], "output": entry["output"], "needs": manifest["needs"],
                "format": FORMAT, "version": VERSION, "bytes": entry["bytes"]}
        graph = PackagedGraph(file, meta, output_types)
        graphs[graph.key] = graph
    if not graphs:
        raise PackageFormatError(f"{path} holds no graphs")
    return PackagedModel(path, manifest, graphs)

