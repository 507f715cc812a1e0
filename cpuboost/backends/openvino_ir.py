"""OpenVINO fp32/bf16 graphs kept in the persistent cache as IR, so a restart compiles instead of converting.

Converting is the slow half of an OpenVINO build (BERT 6 layers here: 6 s to convert, under a second to
compile the IR). With a persistent cache folder the built callable holds its converted ``ov.Model`` until the
ladder serves it (``keep_cached``); only then is it written as IR (``graph.xml`` + ``graph.bin``) with a record
(dtype, dynamic dims, output structure, SHA-256 of both files) and published as one unit (``persist.units``),
so a rung that lost writes nothing. A warm start checks the record and digests, reads the IR (no conversion,
no second-input probe: the build ran it) and compiles it with OpenVINO's own ``CACHE_DIR`` (weightless blobs
in the store's ``openvino`` folder, bounded by ``trim`` like Inductor's files); the ladder then verifies it
against eager like every warm graph and removes it when it fails (``forget_cached``). IR keeps dynamic dims
(-1), so dynamic graphs persist too; the record's dims must be the call's.
"""
from __future__ import annotations

import functools
import json
import logging
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils import _pytree as pytree

from ..options import dtype_name
from ..persist import store, units
from ..persist.errors import PackageFormatError
from ..persist.treespec import _classes, _collect_tensor_specs, _rebuild, describe_tree
from . import openvino

log = logging.getLogger("cpuboost")

FORMAT = "cpuboost-openvino-ir"
VERSION = 1
RECORD = "graph.json"
LOADED = "loaded from the persistent cache (OpenVINO IR, no conversion)"


def unit_for(folder: Path, dtype: torch.dtype) -> Path:
    """The unit of the OpenVINO graph in ``dtype`` inside a signature's artifact folder."""
    return Path(folder) / f"openvino_{dtype_name(dtype)}"


def blob_dir(folder: Path) -> Optional[Path]:
    """OpenVINO's CACHE_DIR: the store's ``openvino`` folder beside ``artifacts`` (None outside a store)."""
    base = next((p.parent for p in Path(folder).parents if p.name == "artifacts"), None)
    if base is None or base.name != f"v{store.FORMAT}":
        return None
    path = base / "openvino"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return None
    return path


def _dims(dynamic_dims: Optional[dict]) -> dict:
    return {str(k): sorted([v] if isinstance(v, int) else v) for k, v in (dynamic_dims or {}).items()}


def build(model: torch.nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype, note: Callable[[str], None],
          dynamic_dims: Optional[dict], folder: Path) -> Callable[..., Any]:
    """The graph from ``folder``'s IR when it is there and checks out, else converted and built (written as
    IR only when the ladder serves it: ``keep_cached``)."""
    unit = unit_for(folder, dtype)
    cached = _load(unit, args, kwargs, dtype, dynamic_dims, note, blob_dir(folder))
    if cached is not None:
        return cached
    fn = openvino.build(model, args, kwargs, dtype, note, dynamic_dims=dynamic_dims, keep_model=True)
    fn.keep_cached = functools.partial(_keep, weakref.ref(fn), unit, dtype, dynamic_dims, note)
    return fn


def _load(unit: Path, args: tuple, kwargs: dict, dtype: torch.dtype, dynamic_dims: Optional[dict],
          note: Callable[[str], None], blobs: Optional[Path]) -> Optional[Callable[..., Any]]:
    record = unit / RECORD
    if not record.exists():
        return None
    try:
        meta = json.loads(record.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise PackageFormatError(f"{record} is not a cpuboost OpenVINO IR record of version {VERSION}")
        if meta.get("dynamic_dims") != _dims(dynamic_dims):
            raise PackageFormatError(f"built with dynamic dims {meta.get('dynamic_dims')}, this call has "
                                     f"{_dims(dynamic_dims)}")
        units.check_files(unit, meta.get("files"), str(unit))
        fn = openvino.load(unit / "graph.xml", args, kwargs, _stand_in(meta["output"]), dtype,
                           str(blobs) if blobs is not None else None)
        if len(fn.out_slots) != len(fn.compiled.outputs):
            raise PackageFormatError(f"its record describes {len(fn.out_slots)} output tensors, the IR has "
                                     f"{len(fn.compiled.outputs)}")
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign unit is converted again, never served
        note(f"cached OpenVINO IR unusable ({type(exc).__name__}: {str(exc)[:160]}); converted again")
        log.warning("cpuboost cache: %s unusable (%s); removed, converting again", unit, exc)
        units.discard(unit)
        return None
    note(LOADED + (f", OpenVINO's compiled blob {blob_state(fn)} {blobs}" if blobs is not None else ""))
    fn.forget_cached = functools.partial(_forget, unit)  # failed verification: not loaded again
    return fn


def blob_state(fn: openvino.OpenVINOCallable) -> str:
    """Whether OpenVINO read the compiled blob from its CACHE_DIR or wrote it there, for the report."""
    try:
        return "reused from" if fn.compiled.get_property("LOADED_FROM_CACHE") else "written to"
    except Exception:  # noqa: BLE001 - an OpenVINO that does not say
        return "kept in"


def _forget(unit: Path) -> None:
    log.warning("cpuboost cache: %s failed verification; removed", unit)
    units.discard(unit)


def _stand_in(spec: dict) -> Any:
    """An output of the recorded structure with empty tensors of the recorded dtypes: what ``openvino.load``
    takes the answers' form from, without an eager call."""
    tensors: list = []
    _collect_tensor_specs(spec, tensors)
    empties = [torch.empty(0, dtype=getattr(torch, t["dtype"])) for t in tensors]
    return _rebuild(spec, empties, [0], _classes(spec, "auto", {}))


def _describe(fn: openvino.OpenVINOCallable) -> dict:
    """The JSON structure of the callable's answers (tensors empty: only their dtypes matter)."""
    leaves = list(fn.out_fixed)
    for slot, dtype in zip(fn.out_slots, fn.out_dtypes):
        leaves[slot] = torch.empty(0, dtype=dtype)
    return describe_tree(pytree.tree_unflatten(leaves, fn.out_spec), [], inputs=False)


def _keep(ref: weakref.ref, unit: Path, dtype: torch.dtype, dynamic_dims: Optional[dict],
          note: Callable[[str], None]) -> None:
    """The served graph's IR and record, staged and published as ``unit``; its converted model then goes."""
    fn = ref()
    ov_model = getattr(fn, "ov_model", None)
    if ov_model is None:
        return
    fn.ov_model = None
    staging = None
    try:
        import openvino as ov

        meta = {"format": FORMAT, "version": VERSION, "dtype": dtype_name(dtype), "dynamic_dims": _dims(dynamic_dims),
                "output": _describe(fn), "openvino": ov.get_version()}
        staging = units.stage(unit)
        ov.save_model(ov_model, str(staging / "graph.xml"), compress_to_fp16=False)
        units.seal(staging, RECORD, meta)
        units.publish(staging, unit)
        note("kept in the persistent cache as OpenVINO IR (a restart compiles it, no conversion)")
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: the graph serves all the same
        note(f"not persisted (OpenVINO IR: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    finally:
        units.discard(staging)  # gone already once published
