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

Split by concern: ``treespec`` (the JSON structure), ``aoti`` (one graph: compile, requirements, load),
``errors``; this module writes and loads package folders and re-exports the others' names.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import CpuBoostError
from . import trust, units
# re-exported: callers use package.compile_aoti, package.load_graph, package.PackageFormatError...
from .aoti import (FORMAT, VERSION, PackagedGraph, _dtype, _eager, _eval_mode, _read_json,  # noqa: F401
                   check_requirements, compile_aoti, load_graph, requirements)
from .keys import machine_fingerprint
from .errors import (PackageFormatError, PackageMismatchError, PackageSignatureError,  # noqa: F401
                     PackageVerificationError, UnsafeLocationError)
from .treespec import (PackagedOutput, _classes, _describe, _describe_call, _input_key, _rebuild,  # noqa: F401
                       describe_tree)


# -- checking a compiled graph against eager ------------------------------------------------------------------
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

# -- deployment packages --------------------------------------------------------------------------------------
def save_package(module: nn.Module, examples: Sequence[tuple[tuple, dict]], dtype: Union[str, torch.dtype],
                 path: Union[str, os.PathLike], extra_manifest: Optional[dict] = None, *, verify: bool = True,
                 march: Optional[str] = None, overwrite: bool = True,
                 judge: Optional[Callable[[Any, Any, Any], tuple[bool, str]]] = None,
                 reference_module: Optional[nn.Module] = None) -> Path:
    """Compile one AOTInductor graph per example signature into the folder ``path`` with a manifest.

    ``module``: what should run (the working copy after module passes, in eval mode; not an IPEX-traced
    model). ``examples``: ``[(args, kwargs), ...]``, one per signature to serve. Each graph is checked against
    eager fp32 (``verify``) within the dtype's tolerance before anything is written; ``judge(reference,
    output, eager autocast's output)`` -> (ok, detail) replaces the built-in bound (``cpuboost.save`` passes
    the runtime's own rule, ``core.verify.compare`` with the model's ``tolerance``, and the user's own model
    as ``reference_module``: the references are then its eager answers, not the rewritten ``module``'s). The folder is built
    beside ``path`` and renamed into place, so a crash leaves the old package (or none), never half of one.
    Graphs the runtime already compiled with ``compile_aoti`` need no second compile: see ``pack_graphs``.
    """
    dtype = _dtype(dtype)
    path = Path(path)
    eager = reference_module if reference_module is not None else module
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
            with _eval_mode(eager):
                reference = _eager(eager, args, kwargs, torch.float32)
            graph, file = compile_aoti(module, args, kwargs, dtype, workdir=staging, name=f"graph-{i}",
                                       march=march, reference=reference)
            if verify:
                with _eval_mode(eager):
                    yard = _eager(eager, args, kwargs, dtype) if dtype != torch.float32 else None
                out = graph(*args, **kwargs)
                out_leaves: list = []
                describe_tree(out, out_leaves, inputs=False)
                ok, errors = _tolerance_ok(reference, yard, out_leaves, dtype)
                graph.meta["max_rel_error"] = [round(e, 6) if e != float("inf") else "inf" for e in errors]
                if judge is not None:
                    ok, graph.meta["verification"] = judge(reference, out, yard)
                units.atomic_write(file.with_suffix(".json"), json.dumps(graph.meta, indent=1).encode())
                if not ok:
                    raise PackageVerificationError(
                        f"the compiled graph for signature {i} differs from eager fp32 by {errors} (relative to "
                        f"each output's max; {graph.meta.get('verification', 'the dtype bound')}); not saved. "
                        "Try dtype='fp32' or report the model")
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
            digest = units.sha256_file(staging / name)
            if digest != meta.get("files", {}).get(file.name, {}).get("sha256"):
                raise PackageFormatError(f"{file} does not match the SHA-256 its record holds; not packaged")
            meta = {**meta, "files": {name: {"sha256": digest, "bytes": meta["bytes"]}}}
            units.atomic_write((staging / name).with_suffix(".json"), json.dumps(meta, indent=1).encode())
            graphs.append({"file": name, "sha256": digest, "inputs": meta["inputs"], "output": meta["output"],
                           "bytes": meta["bytes"], "compile_s": meta.get("compile_s"),
                           "max_rel_error": meta.get("max_rel_error")})
        manifest = {"format": FORMAT, "version": VERSION, "dtype": metas[0][1]["dtype"],
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "built_on": machine_fingerprint(),
                    "needs": needs[0], "graphs": graphs, "extra": extra_manifest or {}}
        units.atomic_write(staging / "manifest.json", json.dumps(manifest, indent=1).encode())
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
    umask |= 0o022  # never writable by others: ``load_package`` refuses native code others can replace
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

    Loading runs the native code the package holds, like unpickling: load only packages from sources you
    trust. Before any of it is loaded: the folder and those above it are private (``UnsafeLocationError``),
    every file the manifest names stays inside the package and matches its SHA-256 (``PackageFormatError``
    otherwise, for any damage). Checks the manifest against this machine first (``PackageMismatchError`` names every difference and the
    fix; ``check=False`` skips that at your own risk). ``output_types``: how transformers ModelOutputs and
    namedtuples come back: 'auto' (the real class when its module is already imported, else a stand-in with
    the same fields: ``PackagedOutput``), 'import' (import the class's module), 'plain' (stand-ins always).
    """
    if output_types not in ("auto", "import", "plain"):
        raise ValueError(f"output_types={output_types!r}: use 'auto', 'import' or 'plain'")
    path = Path(path)
    problem = trust.unsafe_reason(path, path)
    if problem is not None:
        raise UnsafeLocationError(f"not loading the package {path}: {problem}. It holds native code; copy it into "
                                  "a folder only you can write, or `chmod go-w` the folders named")
    manifest = read_manifest(path)
    try:
        if check:
            check_requirements(manifest["needs"])
        graphs = {}
        for entry in manifest["graphs"]:
            name = entry["file"]
            file = units.inside(path, name, f"the package {path}")
            size = file.stat().st_size if file.is_file() else -1
            if size != entry.get("bytes"):
                raise PackageFormatError(f"{file} is {size} bytes, the manifest says {entry.get('bytes')}: the "
                                         "package is incomplete or damaged; copy or save it again")
            problem = trust.unsafe_reason(file, path)
            if problem is not None:
                raise UnsafeLocationError(f"not loading the package {path}: {problem}")
            units.check_files(path, {name: {"sha256": entry.get("sha256"), "bytes": entry["bytes"]}},
                              f"the package {path}")
            meta = {"inputs": entry["inputs"], "output": entry["output"], "needs": manifest["needs"],
                    "format": FORMAT, "version": VERSION, "bytes": entry["bytes"]}
            graph = PackagedGraph(file, meta, output_types)
            graphs[graph.key] = graph
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        if isinstance(exc, CpuBoostError):
            raise
        raise PackageFormatError(f"the manifest of {path} is damaged ({type(exc).__name__}: {exc}); copy or save "
                                 "the package again") from exc
    if not graphs:
        raise PackageFormatError(f"{path} holds no graphs")
    return PackagedModel(path, manifest, graphs)

