"""Compare an optimized output with eager fp32 within the dtype-aware tolerances of DESIGN.md."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import torch

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE[dtype]


@dataclasses.dataclass(frozen=True)
class Verdict:
    ok: bool
    error: float  # worst max|diff| / max|reference| over all floating outputs
    tolerance: float
    problem: Optional[str] = None

    def __str__(self) -> str:
        state = "ok" if self.ok else "FAILED"
        tail = f" ({self.problem})" if self.problem else ""
        return f"{state}: rel err {self.error:.2e} <= {self.tolerance:.0e}{tail}" if self.ok else (
            f"{state}: rel err {self.error:.2e} > {self.tolerance:.0e}{tail}"
        )


_PLAIN = (int, float, bool, str, bytes, type(None))


def _items(value: Any):
    """Children of a container output as (path, child); HF ModelOutput is a Mapping."""
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    if isinstance(value, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(value)]
    return None


def _object_items(value: Any):
    """Tensor-bearing and plain attributes of an output object (e.g. a KV cache), for comparison only."""
    if isinstance(value, (_PLAIN, torch.nn.Module, type)) or not hasattr(value, "__dict__"):
        return None
    return [(k, v) for k, v in sorted(vars(value).items())
            if isinstance(v, (torch.Tensor, _PLAIN, tuple, list, Mapping)) or hasattr(v, "__dict__")]


def _tensor_error(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, Optional[str]]:
    if ref.shape != out.shape:
        return float("inf"), f"shape {tuple(out.shape)} != eager {tuple(ref.shape)}"
    if not ref.is_floating_point() and not ref.is_complex():
        return (0.0, None) if torch.equal(ref, out.to(ref.dtype)) else (float("inf"), "integer outputs differ")
    ref64, out64 = ref.detach().double(), out.detach().double()
    ref_nan, out_nan = torch.isnan(ref64), torch.isnan(out64)
    if not torch.equal(ref_nan, out_nan):
        return float("inf"), "NaN pattern differs from eager"
    ref_inf, out_inf = torch.isinf(ref64), torch.isinf(out64)
    if not torch.equal(ref64[ref_inf], out64[ref_inf]) or not torch.equal(ref_inf, out_inf):
        return float("inf"), "infinities differ from eager"
    finite = ~(ref_nan | ref_inf)
    if not finite.any():
        return 0.0, None
    diff = (ref64[finite] - out64[finite]).abs().max().item()
    scale = max(ref64[finite].abs().max().item(), 1e-6)
    return diff / scale, None


def compare(reference: Any, output: Any, dtype: torch.dtype) -> Verdict:
    """Walk both outputs together; structure, shapes and non-tensor values must match exactly."""
    tol = tolerance(dtype)
    worst, problems = 0.0, []

    def walk(ref: Any, out: Any, path: str, depth: int = 0) -> None:
        nonlocal worst
        if depth > 8:
            return
        if isinstance(ref, torch.Tensor):
            if not isinstance(out, torch.Tensor):
                problems.append(f"{path or 'output'}: expected a tensor, got {type(out).__name__}")
                worst = float("inf")
                return
            err, problem = _tensor_error(ref, out)
            worst = max(worst, err)
            if problem:
                problems.append(f"{path or 'output'}: {problem}")
            return
        ref_items, out_items = _items(ref), _items(out)
        if ref_items is None and not isinstance(ref, _PLAIN) and type(ref) is type(out):
            ref_items, out_items = _object_items(ref), _object_items(out)
        if ref_items is not None:
            if out_items is None or [k for k, _ in ref_items] != [k for k, _ in out_items]:
                problems.append(f"{path or 'output'}: structure differs from eager")
                worst = float("inf")
                return
            for (key, r), (_, o) in zip(ref_items, out_items):
                walk(r, o, f"{path}.{key}" if path else key, depth + 1)
            return
        try:
            same = bool(ref == out)
        except Exception as exc:  # an object whose == raises cannot be checked; say so
            problems.append(f"{path or 'output'}: cannot compare {type(ref).__name__} ({exc})")
            same = False
        if not same:
            problems.append(f"{path or 'output'}: {out!r} != eager {ref!r}")
            worst = float("inf")

    walk(reference, output, "")
    ok = worst <= tol and not problems
    return Verdict(ok=ok, error=worst, tolerance=tol, problem="; ".join(problems[:3]) or None)


def dtype_template(reference: Any) -> Any:
    """The reference output with each tensor replaced by its dtype: all that match_dtypes needs to keep."""
    if isinstance(reference, torch.Tensor):
        return reference.dtype
    items = _items(reference)
    if items is None:
        return None
    if isinstance(reference, Mapping):
        return {k: dtype_template(v) for k, v in items}
    return [dtype_template(v) for _, v in items]


def match_dtypes(template: Any, output: Any) -> Any:
    """Cast floating outputs back to the dtype eager produced, keeping the container types."""
    if isinstance(template, torch.dtype):
        if isinstance(output, torch.Tensor) and output.dtype != template and output.is_floating_point():
            return output.to(template)
        return output
    if isinstance(template, dict) and isinstance(output, Mapping):
        for key in list(output.keys()):
            if key in template:
                output[key] = match_dtypes(template[key], output[key])
        return output
    if isinstance(template, list) and isinstance(output, (tuple, list)) and len(template) == len(output):
        items = [match_dtypes(t, o) for t, o in zip(template, output)]
        if isinstance(output, list):
            return items
        return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)
    return output
