"""How far an int8 answer is from eager fp32 (max-normalised error, cosine, top-1 agreement), and eager's
output dtypes kept on the way out: int8 has no eager twin to compare with, so these numbers are its judge."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils import _pytree as pytree


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


def combine(results: list[dict]) -> dict:
    """One summary of several ``accuracy`` results: the worst error and cosine, top-1 agreement averaged."""
    problems = [r["problem"] for r in results if "problem" in r]
    merged: dict[str, Any] = {"max_err": max(r["max_err"] for r in results),
                              "cosine": min(r["cosine"] for r in results), "inputs": len(results)}
    top1 = [r["top1_agreement"] for r in results if "top1_agreement" in r]
    if top1:
        merged["top1_agreement"] = sum(top1) / len(top1)
    if problems:
        merged["problem"] = problems[0]
    return merged


def measure(runner: Any, output: Any, reference: Any, references: list, batches: list) -> tuple[dict, str]:
    """The int8 graph against eager fp32 on the example (its ``output`` there) and on every calibration batch:
    the combined numbers and, in words, what they were measured on."""
    results = [accuracy(reference, output)] + [accuracy(ref, runner(*a, **k)) for ref, (a, k) in
                                                zip(references, batches)]
    where = f"the example input and {len(batches)} calibration batch(es)" if batches else "the example input"
    return combine(results), where


def describe(result: dict) -> str:
    top1 = f", top-1 agreement {result['top1_agreement']:.3f}" if "top1_agreement" in result else ""
    return f"max_err {result['max_err']:.3g}, cosine {result['cosine']:.5f}{top1}"


def judge(result: dict, tolerance: float | None = None) -> str | None:
    """None when ``result`` is within what int8 may do (the runtime's own int8 bound, or ``tolerance``
    when tighter), else what is wrong."""
    from ...core.verify import INT8_BOUND, INT8_MIN_COSINE, bound

    limit = bound(torch.int8, tolerance=tolerance)
    if "problem" in result:
        return result["problem"]
    if not result["max_err"] <= limit:
        return f"max_err {result['max_err']:.3g} > {limit:g}" + (" (tolerance=)" if limit < INT8_BOUND else "")
    if not result["cosine"] >= INT8_MIN_COSINE:
        return f"cosine {result['cosine']:.4f} < {INT8_MIN_COSINE}"
    return None


def assess(label: str, runner: Any, output: Any, reference: Any, references: list, batches: list,
           tolerance: float | None, note: Any) -> tuple[dict, str, str | None]:
    """(numbers, summary, problem) of an int8 graph measured against eager fp32 on the example and every
    calibration batch; the summary (``label`` vs eager fp32 on ...) is noted, ``problem`` is None when within
    int8's bound, else what is outside it and on which inputs."""
    got, where = measure(runner, output, reference, references, batches)
    summary = f"{label} vs eager fp32 on {where}: {describe(got)}"
    note(summary)
    problem = judge(got, tolerance)
    return got, summary, problem and f"outside int8's bound on {where}: {problem}"


def refusal(what: str, problem: str) -> Exception:
    from ...errors import QuantizationError

    return QuantizationError(f"{what} is {problem}; not served. Calibrate with more representative batches, "
                             "or use dtype='bf16'")
