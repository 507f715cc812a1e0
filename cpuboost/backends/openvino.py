"""OpenVINO inference callables: one converted and compiled model per input signature.

The model is wrapped so that it takes the flat tensor inputs and returns a flat tuple of tensors (the
structure of eager's output is learnt from one eager run and rebuilt around OpenVINO's outputs), traced
by OpenVINO's PyTorch frontend with shared weights (a private copy stays alive inside the compiled CPU model
beside the weights it converts: BERT-base +357 MiB; shared, the compiled model holds torch's tensors alive,
and the runtime drops it on any weight edit before it serves again, as it drops every graph), and
compiled for the CPU with the dtype's ``INFERENCE_PRECISION_HINT``, the latency hint and torch's thread
count. Before it is handed back, the compiled model is run once on a second input (values changed, dynamic
dims resized) and compared with eager (low precision by the example's own rule: eager autocast's error there
times the multiplier), so a trace that baked in data- or shape-dependent Python control flow
is refused here rather than served. ``openvino`` is imported only inside :func:`build`.
"""
from __future__ import annotations

import functools
import inspect
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..core.probe import position_limit
from ..core.signature import SEQUENCE_INPUTS
from .openvino_io import _bounded, _Flat, _Inputs, _key_name, _partial, _static, _to_ov
from .openvino_ops import OpenVINOSpellings

try:
    from ..errors import CpuBoostError
except ImportError:  # pragma: no cover - the errors module moved
    class CpuBoostError(Exception):  # type: ignore[no-redef]
        """Stand-in root error."""


class OpenVINOBuildError(CpuBoostError, RuntimeError):
    """OpenVINO cannot build a faithful callable for this model and input; the first line says why."""


_PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
_CONSTANT_LEAVES = (type(None), bool, int, float, str)
_PROBE_FP32_TOLERANCE = 1e-3  # max|diff| / max|eager| on the second input; low precision: eager autocast's rule


@functools.lru_cache(maxsize=1)
def _core():
    import openvino as ov

    return ov.Core()


def _ov_types():
    import openvino as ov

    return {torch.float32: ov.Type.f32, torch.float16: ov.Type.f16, torch.bfloat16: ov.Type.bf16,
            torch.float64: ov.Type.f64, torch.int64: ov.Type.i64, torch.int32: ov.Type.i32,
            torch.int16: ov.Type.i16, torch.int8: ov.Type.i8, torch.uint8: ov.Type.u8, torch.bool: ov.Type.boolean}


def _input_shapes(inputs: _Inputs, dynamic_dims: dict | None, longest: int | None = None) -> list:
    """``input=`` for convert_model: static shapes, -1 where the caller asked for a dynamic dim, except a token
    input's length, bounded by the model's position table (``longest``) where it has one: the CPU plugin runs a
    bounded length like a static one (BERT-base s128 bf16, Intel Xeon with AMX: static 30.3 ms, bounded 30.1,
    unbounded 32.4)."""
    types = _ov_types()
    shapes = [list(inputs.leaves[i].shape) for i in inputs.slots]
    for key, dims in (dynamic_dims or {}).items():
        name = _key_name(key)
        if name not in inputs.names:
            raise ValueError(f"dynamic_dims names {key!r}, which is not a tensor input of this call; tensor inputs: "
                             f"{', '.join(inputs.names)} (positions as ints, keywords by name)")
        shape = shapes[inputs.names.index(name)]
        for dim in ([dims] if isinstance(dims, int) else dims):
            if not -len(shape) <= dim < len(shape):
                raise ValueError(f"dynamic_dims: input {name!r} has {len(shape)} dims, no dim {dim}")
            bounded = longest is not None and name in SEQUENCE_INPUTS and dim % len(shape) == 1 \
                and shape[1] <= longest
            shape[dim % len(shape)] = _bounded(longest) if bounded else -1
    out = []
    for name, shape, dtype in zip(inputs.names, shapes, inputs.dtypes):
        if dtype not in types:
            raise OpenVINOBuildError(f"input {name!r} has dtype {dtype}, which OpenVINO inputs do not take")
        out.append((shape if _static(shape) else _partial(shape), types[dtype]))
    return out


def _why(error: BaseException) -> str:
    """A one-line reason from OpenVINO's multi-line conversion report."""
    text = str(error)
    missing = re.search(r"No conversion rule found for operations: ([^\n]+)", text)
    if missing:
        return f"OpenVINO has no conversion rule for {missing.group(1).strip()}"
    failed = re.search(r"Conversion is failed for: ([^\n]+)", text)
    if failed:
        return f"OpenVINO failed to convert {failed.group(1).strip()}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Check ")]
    return f"{type(error).__name__}: {lines[0] if lines else text}"[:300]


def _convert(flat: _Flat, example: tuple, input_spec: list, via_export: bool = False) -> Any:
    import openvino as ov

    if via_export:  # PT2E int8 graphs: the FX frontend knows their quantize/dequantize ops, TorchScript does not
        return ov.convert_model(torch.export.export(flat, example, strict=False))

    try:  # our own decoder: same trace as convert_model's, minus the re-run that checks it (~20% of convert)
        from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder
    except ImportError:
        return ov.convert_model(flat, example_input=example, input=input_spec, share_weights=True)
    if "trace_kwargs" not in inspect.signature(TorchScriptPythonDecoder).parameters:
        return ov.convert_model(flat, example_input=example, input=input_spec, share_weights=True)
    source = TorchScriptPythonDecoder(flat, example_input=example, shared_memory=True,
                                      trace_kwargs={"check_trace": False})
    return ov.convert_model(source, input=input_spec, share_weights=True)


class OpenVINOCallable:
    """The compiled model behind the model's own call signature, output structure and dtypes."""

    def __init__(self, compiled: Any, inputs: _Inputs, out_spec: Any, out_leaves: list, weight_bytes: int) -> None:
        import openvino as ov

        self.compiled, self.inputs, self.out_spec = compiled, inputs, out_spec
        self.weight_bytes = weight_bytes
        self.out_fixed = [None if isinstance(x, torch.Tensor) else x for x in out_leaves]
        self.out_slots = [i for i, x in enumerate(out_leaves) if isinstance(x, torch.Tensor)]
        self.out_dtypes = [out_leaves[i].dtype for i in self.out_slots]
        self.out_bf16 = [port.get_element_type() == ov.Type.bf16 for port in compiled.outputs]
        self.in_types = [port.get_element_type() for port in compiled.inputs]
        self.single = out_spec.is_leaf() if hasattr(out_spec, "is_leaf") else False
        self._idle: list = [compiled.create_infer_request()]  # one request per concurrent caller, reused

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = self.inputs.gather(args, kwargs)
        for tensor, dtype in zip(tensors, self.inputs.dtypes):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype:
                raise TypeError(f"OpenVINO graph built for a {dtype} tensor input, called with "
                                f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
        try:
            request = self._idle.pop()
        except IndexError:
            request = self.compiled.create_infer_request()
        keep: list = []
        try:
            for i, (tensor, ov_type) in enumerate(zip(tensors, self.in_types)):
                request.set_input_tensor(i, _to_ov(tensor, ov_type, keep))
            request.infer()
            # copies: the request writes its next results into the same output buffers
            outs = [self._torch(request.get_output_tensor(i).data, i) for i in range(len(self.out_slots))]
        finally:
            self._idle.append(request)
        if self.single:
            return outs[0]
        leaves = list(self.out_fixed)
        for slot, out in zip(self.out_slots, outs):
            leaves[slot] = out
        return pytree.tree_unflatten(leaves, self.out_spec)

    def _torch(self, array: Any, i: int) -> torch.Tensor:
        if self.out_bf16[i]:  # OpenVINO hands bf16 bits back as a float16 numpy array: reinterpret them
            out = torch.from_numpy(array.view("int16").copy()).view(torch.bfloat16)
        else:
            out = torch.from_numpy(array.copy())
        return out if out.dtype == self.out_dtypes[i] else out.to(self.out_dtypes[i])


def _probe_input(dynamic_dims: dict | None, inputs: _Inputs, grow: bool, negate: bool = False):
    """A second valid-looking input: values flipped (floats also scaled, or negated), dynamic dims one shorter
    (or longer)."""
    resized = {_key_name(key): {d % inputs.leaves[inputs.slots[inputs.names.index(_key_name(key))]].dim()
                                for d in ([dims] if isinstance(dims, int) else dims)}
               for key, dims in (dynamic_dims or {}).items()}
    tensors = []
    for name, slot in zip(inputs.names, inputs.slots):
        t = inputs.leaves[slot]
        t = t.flip(list(range(t.dim()))) if t.dim() else t.clone()
        if t.is_floating_point():
            t = t * (-0.75 if negate else 0.75)
        for d in sorted(resized.get(name, ())):
            n = t.shape[d]
            t = torch.cat([t, t.narrow(d, n - 1, 1)], d) if grow or n == 1 else t.narrow(d, 0, n - 1)
        tensors.append(t.contiguous())
    return inputs.rebuild(tensors)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|diff| / max|ref| over eager's finite elements; inf where the non-finite elements differ."""
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(out)):
        return float("inf")
    if not finite.any():
        return 0.0
    ref, out = ref[finite].float(), out[finite].float()
    return (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)


def _probe(model, fn: OpenVINOCallable, dtype, dynamic_dims, inputs: _Inputs, out_leaves, out_spec, note,
           tolerance: float | None = None) -> None:
    """Run eager and OpenVINO on other inputs; refuse a trace that specialised on the example. Floating inputs
    are also tried negated: a branch on a sign (``if x.sum() > 0``) is the commonest one a trace freezes, and
    values only flipped and scaled stay on the same side of it."""
    _probe_one(model, fn, dtype, dynamic_dims, inputs, out_leaves, out_spec, note, tolerance, negate=False)
    if any(inputs.leaves[slot].is_floating_point() for slot in inputs.slots):
        _probe_one(model, fn, dtype, dynamic_dims, inputs, out_leaves, out_spec, note, tolerance, negate=True)


def _probe_one(model, fn: OpenVINOCallable, dtype, dynamic_dims, inputs: _Inputs, out_leaves, out_spec, note,
               tolerance: float | None, negate: bool) -> None:
    reference, error = None, None
    for grow in ((False, True) if dynamic_dims else (False,)):
        p_args, p_kwargs = _probe_input(dynamic_dims, inputs, grow, negate)
        try:
            with torch.no_grad():
                reference = model(*p_args, **p_kwargs)
            break
        except Exception as exc:  # noqa: BLE001 - the model rejects this input; try the other size
            error = exc
    constants = [x for x in out_leaves if not isinstance(x, torch.Tensor)]
    if reference is None:
        if dynamic_dims or constants:
            what = "dynamic dims" if dynamic_dims else f"that its Python outputs {constants!r} are constant"
            raise OpenVINOBuildError(f"cannot check {what}: eager fails on a second input ({_why(error)})")
        note(f"second-input check skipped: eager fails on altered values ({_why(error)})")
        return
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    if ref_spec != out_spec:
        raise OpenVINOBuildError("the model's output structure changes with the input; OpenVINO fixes it at trace time")
    for ref, seen in zip(ref_leaves, out_leaves):
        if not isinstance(seen, torch.Tensor) and (isinstance(ref, torch.Tensor) or ref != seen):
            raise OpenVINOBuildError(f"the model returns a Python value that changes with the input ({seen!r} then "
                                     f"{ref!r}); OpenVINO would return the traced one")
    got = pytree.tree_leaves(fn(*p_args, **p_kwargs))
    yardstick = _autocast_leaves(model, dtype, p_args, p_kwargs)
    tensors = [x for x in ref_leaves if isinstance(x, torch.Tensor)]
    for i, (ref, out) in enumerate(zip(tensors, [x for x in got if isinstance(x, torch.Tensor)])):
        if ref.shape != out.shape:
            raise OpenVINOBuildError(f"output {i} has shape {tuple(out.shape)} from OpenVINO but {tuple(ref.shape)} "
                                     "from eager on a second input: the trace fixed a shape")
        if ref.is_floating_point() and ref.numel():
            own = yardstick[i] if yardstick is not None else None
            ok, measured = _probe_verdict(ref, out, own, dtype, tolerance)
            if not ok:
                why = ("the trace specialised on the example input (data- or shape-dependent Python control flow)"
                       if own is None else "this graph rounds more than eager autocast does on other data, or the "
                       "trace specialised on the example input (data- or shape-dependent Python control flow)")
                raise OpenVINOBuildError(f"output {i} differs from eager on a second input ({measured}): {why}")


def _autocast_leaves(model, dtype: torch.dtype, args: tuple, kwargs: dict) -> list | None:
    """Eager's own tensors under autocast in ``dtype`` on the probe input: the yardstick a low-precision graph
    is judged by there, as on the example (None for fp32, or where the model refuses autocast)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, cache_enabled=False):  # no bf16 copy of every weight
            return [x for x in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(x, torch.Tensor)]
    except Exception:  # noqa: BLE001 - no yardstick: the dtype's floor alone
        return None


def _probe_verdict(ref: torch.Tensor, out: torch.Tensor, own: torch.Tensor | None, dtype: torch.dtype,
                   tolerance: float | None) -> tuple[bool, str]:
    """(passes, what was measured). fp32: a tight fixed bound. Low precision: the example's own rule
    (``verify.compare``: eager autocast's error on this input times the multiplier, per row), so ordinary bf16
    error is not taken for a frozen trace. ``tolerance`` (int8 against its simulated twin) is a floor."""
    whole = _relative_error(out, ref)
    if dtype not in (torch.bfloat16, torch.float16):
        limit = tolerance if tolerance is not None else _PROBE_FP32_TOLERANCE
        return whole <= limit, f"max|diff|/max|ref| {whole:.2e}, bound {limit:g}"
    from ..core import verify

    verdict = verify.compare(ref, out, dtype, own if own is not None and own.shape == ref.shape else None)
    floor_ok = tolerance is not None and whole <= tolerance
    return verdict.ok or floor_ok, f"judged as on the example: {verdict}" + (
        f"; max|diff|/max|ref| {whole:.2e} > {tolerance:g}" if tolerance is not None else "")


def _compile(ov_model: Any, dtype: torch.dtype, cache_dir: str | None = None) -> tuple[Any, dict, str]:
    config = {"INFERENCE_PRECISION_HINT": _PRECISION[dtype], "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if cache_dir:  # weightless blobs: the IR's .bin holds the weights already (BERT-6L: 0.7 MB, not 266 MB)
        config.update({"CACHE_DIR": str(cache_dir), "CACHE_MODE": "OPTIMIZE_SIZE"})
    try:
        try:
            compiled = _core().compile_model(ov_model, "CPU", config)
        except Exception:  # an OpenVINO without weightless caching, or a blob it cannot read: no blob then
            if not cache_dir:
                raise
            config = {k: v for k, v in config.items() if k not in ("CACHE_DIR", "CACHE_MODE")}
            compiled = _core().compile_model(ov_model, "CPU", config)
    except Exception as exc:
        raise OpenVINOBuildError(f"compile failed: {_why(exc)}") from exc
    actual = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    if actual != _PRECISION[dtype]:
        raise OpenVINOBuildError(f"OpenVINO's CPU plugin would run {actual}, not {_PRECISION[dtype]}, on this CPU "
                                 "(no native support for that precision)")
    return compiled, config, actual


def load(xml: Path, args: tuple, kwargs: dict, reference: Any, dtype: torch.dtype,
         cache_dir: str | None = None) -> Callable[..., Any]:
    """A model ``build(..., save_to=xml)`` wrote, compiled again for this call (no conversion); ``reference``:
    eager's output for the call (or a stand-in of its structure and dtypes), whose form the answers take.
    Compiled from the file: OpenVINO then keys a ``cache_dir`` blob by the .xml's path and time (a blob made
    from a read ``ov.Model`` in weightless mode is never found again) and reads no model on a hit."""
    compiled, _, _ = _compile(str(xml), dtype, cache_dir)
    out_leaves, out_spec = pytree.tree_flatten(reference)
    weight_bytes = Path(xml).with_suffix(".bin").stat().st_size  # the IR's constants, as build counts them
    inputs = _Inputs(tuple(args), dict(kwargs))
    fn = OpenVINOCallable(compiled, inputs, out_spec, out_leaves, weight_bytes)
    inputs.forget_example()
    return fn


def build(model: torch.nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype, note: Callable[[str], None],
          dynamic_dims: dict | None = None, cache_dir: str | None = None,
          via_export: bool = False, probe_tolerance: float | None = None,
          save_to: Path | None = None, keep_model: bool = False) -> Callable[..., Any]:
    """Convert ``model`` for the call ``model(*args, **kwargs)`` and compile it for the CPU in ``dtype``.

    The returned callable takes the same arguments and returns eager's output structure and dtypes.
    ``dynamic_dims`` ({position or keyword name: [dims]}) leaves those dims dynamic; otherwise every shape
    is static. ``via_export``: convert through torch.export (static shapes; int8 q/dq graphs) instead of
    tracing; ``probe_tolerance``: how far the second-input check may always stray from ``model`` (an int8
    graph against its simulated-int8 eager twin rounds differently; otherwise the dtype's rule); ``save_to``:
    also write the converted model there as OpenVINO IR (``.xml`` + ``.bin``), for ``load``; ``keep_model``:
    the callable holds the converted model as ``ov_model``, written as IR only if it serves (``openvino_ir``).
    Raises (first line says why) where a faithful graph cannot be built.
    """
    if dtype not in _PRECISION:
        raise ValueError(f"OpenVINO backend takes dtype float32, bfloat16 or float16, not {dtype}")
    if any(m.training for m in model.modules()):
        raise OpenVINOBuildError("the model is in training mode; OpenVINO converts the eval-mode graph (call .eval())")
    import openvino as ov

    wanted = {"f16": "FP16", "bf16": "BF16"}.get(_PRECISION[dtype])
    if wanted and wanted not in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise OpenVINOBuildError(f"OpenVINO's CPU plugin would not run {_PRECISION[dtype]} on this CPU "
                                 f"(no {wanted} in its OPTIMIZATION_CAPABILITIES)")
    inputs = _Inputs(tuple(args), dict(kwargs))
    input_spec = _input_shapes(inputs, dynamic_dims, position_limit(model))
    with torch.no_grad():
        reference = model(*args, **kwargs)
    out_leaves, out_spec = pytree.tree_flatten(reference)
    odd = sorted({type(x).__name__ for x in out_leaves if not isinstance(x, (torch.Tensor, *_CONSTANT_LEAVES))})
    if odd:
        raise OpenVINOBuildError(f"the model returns {', '.join(odd)} objects; OpenVINO returns tensors only")
    n_tensors = sum(isinstance(x, torch.Tensor) for x in out_leaves)
    if not n_tensors:
        raise OpenVINOBuildError("the model returns no tensors")

    start = time.perf_counter()
    flat = _Flat(model, inputs)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            with OpenVINOSpellings():
                ov_model = _convert(flat, inputs.example(), input_spec, via_export and not dynamic_dims)
        except Exception as exc:
            raise OpenVINOBuildError(f"conversion failed: {_why(exc)}") from exc
    converted = time.perf_counter()
    if len(ov_model.outputs) != n_tensors:
        raise OpenVINOBuildError(f"OpenVINO's graph has {len(ov_model.outputs)} outputs, eager returns {n_tensors} "
                                 "tensors (an output the converter could not trace)")
    for port, name in zip(ov_model.inputs, inputs.names):
        port.get_tensor().set_names({name})
    weight_bytes = sum(op.get_byte_size() for op in ov_model.get_ops() if op.get_type_name() == "Constant")

    compiled, config, actual = _compile(ov_model, dtype, cache_dir)
    compiled_at = time.perf_counter()
    if save_to is not None:
        ov.save_model(ov_model, str(save_to), compress_to_fp16=False)
    del flat

    fn = OpenVINOCallable(compiled, inputs, out_spec, out_leaves, weight_bytes)
    fn.ov_model = ov_model if keep_model else None
    del ov_model
    _probe(model, fn, dtype, dynamic_dims, inputs, out_leaves, out_spec, note, probe_tolerance)
    inputs.forget_example()
    tracer = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    note(f"OpenVINO {ov.get_version().split('-')[0]}, precision {actual}, latency hint, "
         f"{config['INFERENCE_NUM_THREADS']} threads")
    note(f"OpenVINO convert {converted - start:.2f} s, compile {compiled_at - converted:.2f} s"
         + (f" (cache dir {cache_dir})" if cache_dir else ""))
    if dynamic_dims:
        dynamic = [(n, shape) for n, (shape, _) in zip(inputs.names, input_spec) if not _static(shape)]
        note("OpenVINO dynamic dims: " + ", ".join(f"{n} [{', '.join(map(str, shape))}]" for n, shape in dynamic))
    if tracer:
        note(f"{len(tracer)} tracer warning(s), first: {tracer[0][:160]}")
    return fn
