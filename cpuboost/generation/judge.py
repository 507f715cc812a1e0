"""Is a decode graph right? Step-wise logits of its greedy run against eager fp32's, with a yardstick run
(eager autocast, or eager on the dequantized weights for weight-only int8/int4) as the dtype's own error."""
from __future__ import annotations

from typing import Any

import torch

VERIFY_MULTIPLE = 3.0  # low precision passes within this multiple of the yardstick's own error vs fp32
VERIFY_FLOOR = 1e-3  # ... or this relative error, whichever is larger (autocast can be exact on a tiny model)
FP32_TOLERANCE = 1e-4


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-6)


def agreement(out: Any, ref: Any) -> tuple[int, int]:
    """(new tokens equal to eager fp32's before the first difference, new tokens compared), over all rows."""
    new = len(ref.logits)
    a, b = out.sequences[:, -new:], ref.sequences[:, -new:]
    differ = (a != b).any(0).nonzero()
    return (int(differ[0]) if len(differ) else new), new


def judge(ref: Any, yard: Any, out: Any, low_precision: bool) -> tuple[bool, str]:
    """Step-wise logits of the served path vs eager fp32 (``ref``); ``yard`` is the dtype's own eager run."""
    same_prefix, new = agreement(out, ref)
    tokens = f"first {same_prefix} of {new} greedy tokens equal to eager fp32's"
    if not low_precision:
        err = max(rel_error(o, r) for o, r in zip(out.logits, ref.logits))
        same = torch.equal(out.sequences, ref.sequences)
        return err <= FP32_TOLERANCE and same, (f"fp32 logits rel err {err:.1e} (<= {FP32_TOLERANCE:.0e}), "
                                                f"tokens {'equal' if same else 'DIFFER'}")
    start, errors = ref.sequences.shape[1] - len(ref.logits), []
    for i, (o, r, y) in enumerate(zip(out.logits, ref.logits, yard.logits)):
        same = lambda a, b, n=start + i: torch.equal(a.sequences[:, :n], b.sequences[:, :n])  # noqa: E731
        if same(out, ref) and same(yard, ref):
            errors.append((rel_error(o, r), rel_error(y, r)))
        elif same(out, yard) and errors:  # fp32 took another token at a near-tie: the yardstick's path
            errors.append((rel_error(o, y), errors[0][1]))
    ok = all(err <= max(VERIFY_MULTIPLE * own, VERIFY_FLOOR) for err, own in errors) and len(errors) > 0
    shown = errors[:2] + ([errors[-1]] if len(errors) > 2 else [])
    text = ", ".join(f"{err:.1e} vs own {own:.1e}" for err, own in shown)
    return ok, (f"logits rel err vs fp32 over {len(errors)} step(s): {text} (limit {VERIFY_MULTIPLE:g}x the "
                f"dtype's own, floor {VERIFY_FLOOR:.0e}); {tokens}")
