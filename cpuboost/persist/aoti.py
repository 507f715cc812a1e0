"""One AOTInductor graph: export and compile it, what the machine that runs it needs, load it back.

Apart from ``package`` because the runtime compiles and reloads single graphs through the store on every
warm start; a deployment package is only a folder of these graphs plus a manifest.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from . import child, dims, tables, trust, units
from .errors import PackageFormatError, PackageMismatchError, UnsafeLocationError
from .keys import machine_fingerprint
from .treespec import _classes, _collect_tensor_specs, _rebuild, _strip_strides, describe_tree

log = logging.getLogger("cpuboost")

FORMAT = "cpuboost-package"
VERSION = 2  # 2: every graph's SHA-256 in its record, the build CPU's full flag list
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}
# x86-64 micro-architecture levels (for march=): the codegen flags each one lets the compiler use
_MARCH_LEVELS = {
    "x86-64": [], "x86-64-v2": [],
    "x86-64-v3": ["avx", "avx2", "fma", "f16c"],
    "x86-64-v4": ["avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
}


def _dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise PackageFormatError(f"dtype {dtype!r} cannot be packaged; use one of bf16, fp16, fp32") from None


# -- the exported unit ------------------------------------------------------------------------------------
class _FlatRunner(nn.Module):
    """The model under the dtype's autocast, taking the call's tensors flat and returning output tensors
    flat, each cast to the dtype eager fp32 gives (in the graph, so the cast fuses into the last kernel)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, in_spec: dict, out_dtypes: list,
                 table_names: tuple = ()) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype
        self.in_spec = in_spec
        self.out_dtypes = out_dtypes
        self.table_names = list(table_names)  # the last inputs: embedding tables read from the live model

    def forward(self, *tensors: torch.Tensor) -> tuple:
        count = len(tensors) - len(self.table_names)
        args, kwargs = _rebuild(self.in_spec, tensors[:count], [0], {})
        state = dict(zip(self.table_names, tensors[count:]))
        with torch.autocast("cpu", dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = torch.func.functional_call(self.model, state, args, kwargs) if state else self.model(*args, **kwargs)
        leaves: list = []
        describe_tree(out, leaves, inputs=False)
        return tuple(t.to(d) if t.dtype != d else t for t, d in zip(leaves, self.out_dtypes))


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


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
    machine = machine_fingerprint()
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
    here = machine_fingerprint()
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


def compile_aoti(module: nn.Module, args: tuple, kwargs: dict, dtype: Union[str, torch.dtype], *,
                 workdir: Union[str, os.PathLike, None] = None, name: str = "graph", march: Optional[str] = None,
                 reference: Any = None, extra_meta: Optional[dict] = None,
                 dynamic_dims: dims.DynamicDims = None, read_tables: bool = False) -> tuple["PackagedGraph", Path]:
    """Export ``module`` for this signature, compile it with AOTInductor (freezing) and load it.

    Returns the loaded graph (a callable answering in eager's output structure and dtypes) and the path of
    its ``.pt2``; ``<name>.json`` beside it holds the structure and the ``.pt2``'s SHA-256, so
    ``load_graph(path)`` brings it back in a later process without compiling. ``workdir``: a private folder
    (``units.stage``) that the caller publishes as one unit once the graph is judged. ``reference``: eager fp32's output for these inputs, if the caller has it already
    (only its dtypes are used here). ``extra_meta``: more sidecar fields (an int8 graph records its scheme,
    and ``clone_inputs``: its kernels write into a float input, so every call passes copies). Raises
    whatever torch.export or Inductor raise: a model that does not export (data-dependent Python control
    flow) falls back to torch.compile in the caller. ``dynamic_dims`` (input -> dims): one graph for every size
    of those dims that export keeps symbolic; they and their ranges are recorded, and a call outside them raises.
    ``read_tables``: the graph reads the model's large embedding tables as inputs instead of holding copies
    (``tables``); loading it then needs the model.
    """
    dtype = _dtype(dtype)
    leaves: list = []
    in_spec = describe_tree((tuple(args), dict(kwargs)), leaves, inputs=True)
    wanted = dims.leaf_dims(tuple(args), dict(kwargs), dynamic_dims)
    leaves = [t.contiguous() if i in wanted else t for i, t in enumerate(leaves)]  # a dynamic input runs contiguous
    if reference is None:
        with _eval_mode(module):
            reference = _eager(module, args, kwargs, torch.float32)
    out_leaves: list = []
    out_spec = describe_tree(reference, out_leaves, inputs=False)
    out_dtypes = [t.dtype for t in out_leaves]
    table_names = tables.input_tables(module) if read_tables else []
    flat = _FlatRunner(module, dtype, in_spec, out_dtypes, table_names).eval()
    folder = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="cpuboost-aoti-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    with torch.no_grad(), _eval_mode(module):  # freezing applies only without grad
        shapes = ((dims.export_shapes(leaves, wanted)[0] + (None,) * len(table_names),) if wanted else None)
        exported = torch.export.export(flat, tuple(leaves + tables.tensors(module, table_names)), strict=False,
                                       dynamic_shapes=shapes)
        ranges = dims.exported_ranges(exported) if wanted else {}
        exported_s = time.perf_counter() - started
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".pt2")
        os.close(fd)
        configs: dict[str, Any] = {"freezing": True}
        weight_bytes = module_bytes(module)
        import torch._inductor.config as inductor_config

        on_disk = "aot_inductor.package_constants_on_disk_format" in inductor_config.get_config_copy()  # torch>=2.9
        if weight_bytes > 1 << 20 and on_disk:  # weights beside the code, not inside the .so: loaded once
            # (BERT-base bf16: +473 MiB resident against +900 MiB with the .so's mapped copy on top). Not for tiny
            # models: an empty weights file (every constant folded into the code) does not load (mmap of 0 bytes).
            configs.update({"aot_inductor.package_constants_in_so": False,
                            "aot_inductor.package_constants_on_disk_format": "binary_blob"})
        if march is not None:
            configs["cpp.march"] = march
        try:
            child.compile_package(exported, tmp, configs)  # in a child process: its leftovers go with it
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    final = folder / f"{name}.pt2"
    os.replace(tmp, final)
    meta = {"format": FORMAT, "version": VERSION, "dtype": str(dtype).replace("torch.", ""), "inputs": in_spec,
            "output": out_spec, "needs": requirements(march), "bytes": final.stat().st_size,
            "files": {final.name: {"sha256": units.sha256_file(final), "bytes": final.stat().st_size}},
            "export_s": round(exported_s, 2), "compile_s": round(time.perf_counter() - started, 2),
            "tables": tables.spec(module, table_names), **(extra_meta or {})}
    if wanted:  # what was asked (a warm start compares it) and what export kept symbolic (every call is checked)
        meta.update(dynamic_request={str(w): list(d) for w, d in dynamic_dims.items()}, dynamic=ranges)
    _drop_inductor_copy(final)
    units.atomic_write(folder / f"{name}.json", json.dumps(meta, indent=1).encode())
    log.info("cpuboost: AOTInductor graph %s in %.1f s (export %.1f s)", final, meta["compile_s"], exported_s)
    graph = PackagedGraph(final, meta, model=module)
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


RUNNERS = 4


class PackagedGraph:
    """One AOTInductor graph for one input signature, answering in the recorded output structure."""

    cache_unit: Optional[Path] = None  # the persistent-cache folder it was loaded from (see ``forget_cached``)

    def __init__(self, path: Path, meta: dict, output_types: str = "auto", model: Optional[nn.Module] = None) -> None:
        self.path = Path(path)
        self.meta = meta
        self._tables = tables.bind(model, meta.get("tables") or [])
        self._tensor_specs = []
        try:
            _collect_tensor_specs(meta["inputs"], self._tensor_specs)
            self._classes = _classes(meta["output"], output_types, {})
        except (KeyError, TypeError, AttributeError) as exc:
            raise PackageFormatError(f"the record of {self.path} is damaged ({type(exc).__name__}: {exc})") from exc
        self._clone_inputs = bool(meta.get("clone_inputs"))
        self._ranges = meta.get("dynamic") or {}
        try:
            # The C++ loader straight away: aoti_load_package would import torch._inductor (seconds) only to
            # wrap it in pytree specs we do not use (ours are JSON, above).
            # RUNNERS model instances share one copy of the weights (model_container.h), so that many calls of
            # one graph run at once instead of taking turns
            self._loader = torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, RUNNERS, -1)
        except Exception as exc:
            raise PackageFormatError(f"{self.path} does not load as an AOTInductor package "
                                     f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from exc

    @property
    def key(self) -> str:
        return json.dumps(_strip_strides(self.meta["inputs"]), sort_keys=True)

    def _flat_inputs(self, args: tuple, kwargs: dict) -> list:
        leaves: list = []
        describe_tree((tuple(args), dict(kwargs)), leaves, inputs=True)
        if self._ranges:
            dims.check_call(leaves, self._tensor_specs, self._ranges)
        flat = []
        for i, (t, spec) in enumerate(zip(leaves, self._tensor_specs)):
            if str(i) in self._ranges:
                t = t.contiguous()  # compiled for contiguous inputs of any size in range
            elif list(t.stride()) != spec["stride"] and t.numel() > 1:
                t = torch.empty_strided(t.shape, spec["stride"], dtype=t.dtype).copy_(t)
            elif self._clone_inputs and t.is_floating_point():
                t = t.clone()  # int8 kernels' fused ``sum`` writes into its residual input: never the caller's
            flat.append(t)
        return flat

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = self._flat_inputs(args, kwargs) + [getattr(sub, attr).detach() for sub, attr in self._tables]
        with torch.no_grad():
            outs = self._loader.run(flat)
        return _rebuild(self.meta["output"], list(outs), [0], self._classes)

    def forget_cached(self) -> None:
        """This graph failed verification: its cache unit goes, so no later process loads it again."""
        if self.cache_unit is not None:
            log.warning("cpuboost cache: %s failed verification; removed", self.cache_unit)
            units.discard(self.cache_unit)


def load_graph(path: Union[str, os.PathLike], *, output_types: str = "auto", check: bool = True,
               root: Union[str, os.PathLike, None] = None, model: Optional[nn.Module] = None) -> PackagedGraph:
    """A graph written by ``compile_aoti`` (its ``.pt2`` path), checked and loaded. Before its code is
    loaded: the folders from it up to ``root`` (default: its own folder) and above are private
    (``UnsafeLocationError``), its record is whole and of this version and its SHA-256 matches
    (``PackageFormatError``), this machine has what it needs (``PackageMismatchError``). ``model``: the one
    whose embedding tables the graph reads, if it was built with ``read_tables``."""
    path = Path(path)
    if not path.is_file():
        raise PackageFormatError(f"{path} is missing: not a cpuboost graph (or an incomplete copy)")
    problem = trust.unsafe_reason(path, root if root is not None else path.parent)
    if problem is not None:
        raise UnsafeLocationError(f"not loading {path}: {problem}; it holds native code, so only a folder that "
                                  "only you (or root) can write is trusted")
    meta = _read_json(path.with_suffix(".json"))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise PackageFormatError(f"{path.with_suffix('.json')} is not a cpuboost graph of version {VERSION}")
    files = meta.get("files")
    if not isinstance(files, dict) or path.name not in files or not isinstance(meta.get("needs"), dict):
        raise PackageFormatError(f"{path.with_suffix('.json')} records no digest for {path.name}; rebuild it")
    units.check_files(path.parent, {path.name: files[path.name]}, str(path.parent))
    if check:
        check_requirements(meta["needs"])
    return PackagedGraph(path, meta, output_types, model=model)


def update_meta(graph: PackagedGraph, **fields: Any) -> None:
    """Add ``fields`` to a graph's sidecar (e.g. accuracy measured after it was built), atomically."""
    graph.meta.update(fields)
    units.atomic_write(graph.path.with_suffix(".json"), json.dumps(graph.meta, indent=1).encode())


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
