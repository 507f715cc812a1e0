"""int8 inference: static PT2E quantization with calibration data, dynamic quantization without.

Schemes (``build`` picks one; ``scheme=`` forces one):

- ``static``: torchao's PT2E flow. ``torch.export`` the private copy, annotate it with the x86 Inductor
  quantizer (u8 activations per tensor, s8 weights per channel, histogram observers), run the calibration
  batches, convert, then ``torch.compile`` with freezing so Inductor's x86 passes fold the q/dq pairs into
  oneDNN ``qconv``/``qlinear`` kernels with fused post-ops.
- ``dynamic``: the same PT2E flow with the quantizer's dynamic config (s8 weights per channel, one activation
  scale per tensor computed at run time), Linear layers only, no data needed. Where PT2E fails (``torch.export``
  cannot capture the model) it falls back, with a note, to ``dynamic_torchao``.
- ``dynamic_torchao``: torchao ``Int8DynamicActivationInt8WeightConfig`` on the module itself (per-token
  activation scales), then ``torch.compile`` with freezing; needs no export. BERT-base s128 b8 against the bf16
  graph (2 threads): in the quietest run PT2E 1.57x / torchao 1.41x (paired medians; best-of-15 agreed); over
  five loaded runs each won some, PT2E by up to 10% on best-of-N, torchao by up to 5%. A caller that can
  afford two builds may race both.
- ``weight_only``: torchao ``Int8WeightOnlyConfig`` + freezing, on request only: it dequantises the weights
  every call and measured slower than dynamic int8 and than bf16 at every row count tried (1 to 1024 rows
  through 768x3072 Linears, AVX512-VNNI), except once in a noisy median at 1 row.

The graph is compiled with Inductor's C++ wrapper first (ResNet-50 b4 int8, best of 15: 418 ms against 508 ms
with the Python wrapper), the Python wrapper where the C++ one fails, as the Inductor backend does.

All of torchao and Inductor is imported inside the functions. Global state is left alone: torchao's
x86 quantizer module installs ``torch._inductor.config.pre_grad_custom_pass`` when first imported; we put
the old value back and patch the pass (with ``freezing``) only around the build, like the Inductor backend.
``torch.compile(options={"freezing": True})`` is not the same thing: dynamo reads the global flag too, and
with the option alone the frozen graph's ``onednn::qconv_prepack`` fails on meta tensors. As in the
Inductor backend, a call that would recompile raises ``RecompileRefused`` instead of compiling unfrozen.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import (
    CalibrationError,
    InvalidOptionError,
    NotQuantizableError,
    QuantizationError,
)
from .inductor import RecompileRefused

SCHEMES = ("static", "dynamic", "dynamic_torchao", "weight_only")
# Warnings torch 2.13 / torchao 0.18 print on every int8 compile that say nothing about the user's model
_COMPILE_NOISE = ("To copy construct from a tensor",  # torch/_inductor/mkldnn_lowerings.py, qconv/qlinear
                  ".*does not implement _stable_hash_for_caching")  # torchao Int8Tensor, AOT autograd cache
STATIC_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)  # what the x86 Inductor quantizer annotates
DYNAMIC_LAYERS = (nn.Linear,)


def _layers(model: nn.Module, kinds: tuple) -> list[str]:
    return [name for name, mod in model.named_modules() if isinstance(mod, kinds)]


def quantizable(model: Any) -> str | None:
    """None when int8 has something to work on (a Linear or Conv layer), else the reason why not."""
    if not isinstance(model, nn.Module):
        return f"int8 needs an nn.Module, got {type(model).__name__}"
    if not _layers(model, STATIC_LAYERS):
        kinds = sorted({type(m).__name__ for m in model.modules()} - {type(model).__name__})
        return (f"{type(model).__name__} has no Linear, Conv1d or Conv2d layer to quantize "
                f"(its layers: {', '.join(kinds[:8]) or 'none'}); use dtype='bf16' or 'fp32'")
    return None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return repr(value) if isinstance(value, (int, float, bool, str, type(None))) else type(value).__name__


def _normalise_one(item: Any, index: int, want_spec: Any) -> tuple[tuple, dict]:
    if (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], tuple) and isinstance(item[1], dict)
            and pytree.tree_flatten(item)[1] == want_spec):
        return item  # already normalised by check_calibration: (args, kwargs)
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        return tuple(item), {}
    raise CalibrationError(f"calibration[{index}] is a {type(item).__name__}; each calibration input must be "
                           f"a tuple of positional arguments, a dict of keyword arguments or a single tensor")


def check_calibration(calibration: Any, args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """Calibration inputs as ``[(args, kwargs), ...]``, each shaped exactly like the example ``(args, kwargs)``.

    ``None`` means "no calibration data" and gives ``[]``. An empty iterable, an item of another structure,
    tensor shape or dtype, or a different non-tensor value is a ``CalibrationError`` naming the item and
    the difference: the exported graph is specialised to the example's shapes, so anything else would fail
    deep inside PT2E (or calibrate ranges for inputs the graph never serves).
    """
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, Mapping, str, bytes)) or not isinstance(calibration, Iterable):
        raise CalibrationError(f"calibration must be an iterable (list) of example inputs, got "
                               f"{_describe(calibration)}; wrap a single batch in a list: calibration=[batch]")
    want_leaves, want_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    items = [_normalise_one(item, i, want_spec) for i, item in enumerate(calibration)]
    if not items:
        raise CalibrationError("calibration is empty: give at least one example input (a few batches "
                               "of real data calibrate best), or calibration=None for dynamic int8")
    for i, (a, k) in enumerate(items):
        leaves, spec = pytree.tree_flatten((a, k))
        if spec != want_spec:
            raise CalibrationError(
                f"calibration[{i}] has {len(a)} positional and keyword(s) {sorted(k)}; the example input has "
                f"{len(args)} positional and keyword(s) {sorted(kwargs)} (each item must match its structure)")
        for path_index, (got, want) in enumerate(zip(leaves, want_leaves)):
            if isinstance(want, torch.Tensor):
                if not isinstance(got, torch.Tensor):
                    raise CalibrationError(f"calibration[{i}] input #{path_index} is {_describe(got)}, "
                                           f"expected a tensor like {_describe(want)}")
                if got.shape != want.shape or got.dtype != want.dtype:
                    raise CalibrationError(
                        f"calibration[{i}] input #{path_index} is {_describe(got)} but the example input is "
                        f"{_describe(want)}: int8 graphs are built per input shape, so calibrate with "
                        f"batches of the shape and dtype it will serve")
            elif isinstance(got, torch.Tensor) or got != want:
                raise CalibrationError(f"calibration[{i}] input #{path_index} is {_describe(got)}, the example "
                                       f"input has {_describe(want)}")
    return items


# ---------------------------------------------------------------- outputs


def dtype_template(reference: Any) -> tuple[Any, list]:
    """What ``cast_like`` keeps of eager's output: its pytree structure and each leaf's dtype (or None)."""
    leaves, spec = pytree.tree_flatten(reference)
    return spec, [leaf.dtype if isinstance(leaf, torch.Tensor) else None for leaf in leaves]


def cast_like(template: tuple[Any, list], output: Any) -> Any:
    """``output`` with each floating tensor cast to the dtype eager gave for that leaf; structure kept."""
    spec, dtypes = template
    leaves, out_spec = pytree.tree_flatten(output)
    if out_spec != spec:
        return output
    cast = [o.to(d) if isinstance(o, torch.Tensor) and d is not None and o.is_floating_point() and o.dtype != d
            else o for d, o in zip(dtypes, leaves)]
    return pytree.tree_unflatten(cast, out_spec)


def _paths(value: Any) -> list[tuple[str, Any]]:
    flat, _ = pytree.tree_flatten_with_path(value)
    return [(pytree.keystr(path), leaf) for path, leaf in flat]


def accuracy(reference: Any, output: Any) -> dict:
    """How far ``output`` is from ``reference`` over every floating tensor, worst case first.

    ``max_err``: max |diff| / max |reference| (the worst leaf); ``cosine``: the lowest cosine similarity of a
    leaf, flattened; ``top1_agreement``: share of rows whose argmax matches, for a ``logits`` leaf (or a
    single 2-D output), the place where the last dim is classes. Structure or shape mismatches give
    ``max_err=inf`` and ``cosine=0`` with ``problem`` saying where.
    """
    ref_leaves, out_leaves = _paths(reference), _paths(output)
    result: dict[str, Any] = {"max_err": 0.0, "cosine": 1.0}
    if [p for p, _ in ref_leaves] != [p for p, _ in out_leaves]:
        return {"max_err": math.inf, "cosine": 0.0, "problem": "output structure differs from the reference"}
    classes = []
    for (path, ref), (_, out) in zip(ref_leaves, out_leaves):
        if not isinstance(ref, torch.Tensor):
            continue
        if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
            return {"max_err": math.inf, "cosine": 0.0, "problem": f"{path or 'output'}: shape differs"}
        if not ref.is_floating_point():
            if not torch.equal(ref, out.to(ref.dtype)):
                return {"max_err": math.inf, "cosine": 0.0, "problem": f"{path or 'output'}: integers differ"}
            continue
        if ref.dim() >= 2 and (path.endswith(("logits']", ".logits")) or len(ref_leaves) == 1 and ref.dim() == 2):
            classes.append((ref, out))
        r, o = ref.detach().double().flatten(), out.detach().double().flatten()
        if r.numel() == 0:
            continue
        scale = max(r.abs().max().item(), 1e-12)
        result["max_err"] = max(result["max_err"], (r - o).abs().max().item() / scale)
        denom = r.norm().item() * o.norm().item()
        cos = (r @ o).item() / denom if denom > 0 else float(torch.equal(r, o))
        result["cosine"] = min(result["cosine"], cos)
    if classes:
        ref, out = classes[0]
        result["top1_agreement"] = (ref.argmax(-1) == out.argmax(-1)).double().mean().item()
    return result


# ---------------------------------------------------------------- building


def _clone_float_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Fresh copies of floating tensor inputs: Inductor's int8 ``sum`` post-op writes into its residual
    operand in place, and when that operand is a graph input it is the caller's tensor (seen with torch
    2.13: ``linear(x) + x`` compiled from PT2E overwrote ``x``)."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.clone() if t.is_floating_point() else t, (args, kwargs))


def _x86_quantizer_module():
    """torchao's x86 Inductor quantizer, imported without leaving its global pre-grad pass installed."""
    import sys

    import torch._inductor.config as inductor_config

    name = "torchao.quantization.pt2e.quantizer.x86_inductor_quantizer"
    if name in sys.modules:
        return sys.modules[name]
    before = inductor_config.pre_grad_custom_pass
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    finally:
        inductor_config.pre_grad_custom_pass = before
    return xiq


def _pt2e(model: nn.Module, args: tuple, kwargs: dict, batches: list) -> nn.Module:
    """Export, annotate with the x86 Inductor quantizer, calibrate on ``batches``, convert to q/dq form.
    No batches: the dynamic config, run once on the example so the weight observers see the weights."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    xiq = _x86_quantizer_module()
    exported = torch.export.export(model, tuple(args), dict(kwargs), strict=False).module()
    config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=not batches)
    prepared = prepare_pt2e(exported, xiq.X86InductorQuantizer().set_global(config))
    for a, k in batches or [(tuple(args), dict(kwargs))]:
        prepared(*a, **k)
    return convert_pt2e(prepared)


def _torchao(model: nn.Module, scheme: str) -> nn.Module:
    """torchao ``quantize_`` in place on the private copy: dynamic (per-token activation scales) or weight-only."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    config = Int8WeightOnlyConfig if scheme == "weight_only" else Int8DynamicActivationInt8WeightConfig
    quantize_(model, config(set_inductor_config=False))  # True would change global Inductor settings
    return model


def choose_scheme(model: nn.Module, batches: list) -> str:
    """static with calibration data, dynamic without (weight-only only on request, see the module doc)."""
    if batches:
        return "static"
    if not _layers(model, DYNAMIC_LAYERS):
        convs = len(_layers(model, STATIC_LAYERS))
        raise NotQuantizableError(
            f"{type(model).__name__} has {convs} Conv layer(s) and no Linear: int8 without calibration data "
            f"quantizes Linear layers only. Pass calibration=[batch, ...] for static int8 of the convolutions")
    return "dynamic"


_DESCRIBE = {
    "static": "static PT2E (x86 Inductor quantizer: u8 activations per tensor, s8 weights per channel), "
              "{n} calibration batch(es)",
    "dynamic": "dynamic PT2E (x86 Inductor quantizer: s8 weights per channel, activation scale per tensor "
               "at run time)",
    "dynamic_torchao": "dynamic torchao Int8DynamicActivationInt8WeightConfig (s8 weights per channel, "
                       "per-token activation scales at run time)",
    "weight_only": "weight-only torchao Int8WeightOnlyConfig",
}


def _quantize(private: nn.Module, args: tuple, kwargs: dict, batches: list, scheme: str,
              note: Callable[[str], None]) -> tuple[nn.Module, str, dict]:
    """The quantized copy, the scheme that made it, and the Inductor config its compile needs (patched
    around the build only)."""
    if scheme in ("dynamic_torchao", "weight_only"):
        patches = {"freezing": True, "force_fuse_int_mm_with_mul": scheme == "dynamic_torchao"}
        return _torchao(private, scheme), scheme, patches
    try:
        patches = {"freezing": True, "pre_grad_custom_pass": _x86_quantizer_module().quant_lift_up}
        return _pt2e(private, args, kwargs, batches if scheme == "static" else []), scheme, patches
    except Exception as exc:
        if scheme == "static":
            raise
        note(f"int8: PT2E failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
             f"dynamic int8 through torchao on the module instead")
    patches = {"freezing": True, "force_fuse_int_mm_with_mul": True}
    return _torchao(private, "dynamic_torchao"), "dynamic_torchao", patches


class Int8Callable:
    """The compiled int8 graph, called like the eager model and answering with eager's structure/dtypes."""

    def __init__(self, compiled: Callable, template: Any, scheme: str, clone_inputs: bool):
        self.compiled, self.template, self.scheme, self.clone_inputs = compiled, template, scheme, clone_inputs

    def _run(self, args: tuple, kwargs: dict) -> Any:
        if self.clone_inputs:
            args, kwargs = _clone_float_inputs(args, kwargs)
        with torch.no_grad():
            return cast_like(self.template, self.compiled(*args, **kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self._run(args, kwargs)
        except RuntimeError as exc:
            if "fail_on_recompile" in str(exc) or "Detected recompile" in str(exc):
                raise RecompileRefused(str(exc).splitlines()[0]) from exc
            raise

    def __repr__(self) -> str:
        return f"Int8Callable(scheme={self.scheme!r})"


def build(model: nn.Module, args: tuple, kwargs: dict, calibration: list | None,
          note: Callable[[str], None] = lambda line: None, scheme: str | None = None) -> Callable:
    """Quantize a private copy of ``model`` to int8, compile it for ``(args, kwargs)`` now, return the callable.

    Every check (quantizable layers, calibration shapes, scheme) runs before any copy or quantization, so
    a bad request raises a typed error and leaves nothing half-built; ``model`` itself is never touched.
    """
    args, kwargs = tuple(args), dict(kwargs or {})
    reason = quantizable(model)
    if reason:
        raise NotQuantizableError(reason)
    batches = check_calibration(calibration, args, kwargs)
    if scheme is None:
        scheme = choose_scheme(model, batches)
    elif scheme not in SCHEMES:
        raise InvalidOptionError(f"unknown int8 scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    elif scheme == "static" and not batches:
        raise CalibrationError("static int8 needs calibration data: pass calibration=[batch, ...]")

    started = time.perf_counter()
    private = copy.deepcopy(model)
    if private.training:
        note("int8: the model is in train mode; the int8 copy runs in eval mode")
    private.eval()
    name = type(model).__name__
    try:
        with torch.no_grad():
            reference = private(*args, **kwargs)
            quantized, scheme, patches = _quantize(private, args, kwargs, batches, scheme, note)
    except Exception as exc:
        raise QuantizationError(f"int8 {scheme} quantization of {name} failed: {type(exc).__name__}: {exc}") from exc
    note(f"int8 scheme: {_DESCRIBE[scheme].format(n=len(batches))}")
    note(f"int8 quantize: {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    template = dtype_template(reference)
    try:
        runner, output = _compile(quantized, args, kwargs, template, scheme, {**patches, "cpp_wrapper": True})
        wrapper = "C++ wrapper"
    except Exception as exc:  # noqa: BLE001 - the Python wrapper is the same graph; only the C++ glue failed
        wrapper = f"Python wrapper (C++ wrapper failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
        try:
            runner, output = _compile(quantized, args, kwargs, template, scheme, {**patches, "cpp_wrapper": False})
        except Exception as exc:
            raise QuantizationError(f"int8 {scheme} graph of {name} failed to compile: {type(exc).__name__}: "
                                    f"{exc}") from exc
    note(f"int8 compile (Inductor, freezing, {wrapper}): {time.perf_counter() - started:.1f} s")
    got = accuracy(reference, output)
    top1 = f", top1 {got['top1_agreement']:.3f}" if "top1_agreement" in got else ""
    note(f"int8 vs eager fp32 on the example input: max_err {got['max_err']:.3g}, cosine {got['cosine']:.5f}{top1}")
    return runner


def _compile(quantized: nn.Module, args: tuple, kwargs: dict, template: Any, scheme: str,
             patches: dict) -> tuple[Int8Callable, Any]:
    import torch._inductor.config as inductor_config

    from ..core.precision import fresh_runner

    # autocast off inside (int8 mixed with fp32; int8 mixed with bf16 showed no clear gain), whatever the caller runs
    compiled = torch.compile(fresh_runner(quantized, torch.float32), backend="inductor", dynamic=False)
    runner = Int8Callable(compiled, template, scheme, clone_inputs=scheme in ("static", "dynamic"))
    with inductor_config.patch(patches), warnings.catch_warnings():
        for message in _COMPILE_NOISE:
            warnings.filterwarnings("ignore", message=message)
        return runner, runner._run(args, kwargs)
