"""The ladder's rungs for one input signature: each graph pass in the requested dtype (int8 with the bf16
rungs beside it), eager with the passes, then the same in fp32; a rung decided earlier goes first."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from ..options import dtype_name
from . import ladder
from .precision import eager_runner
from .registry import PassContext


def ladder_stages(optimized: Any, work: nn.Module, args: tuple, kwargs: dict, dims: dict, prefer: Optional[str],
                  artifact_dir=None, out_dtypes: Any = None) -> list[list[ladder.Rung]]:
    """``optimized``: the OptimizedModule (its options, plan, hardware and report); ``work``: its working copy;
    ``out_dtypes``: eager's output dtypes, for the graphs to answer in."""
    options, plan = optimized._options, optimized._plan
    low_precision_work = any(p.dtype in (torch.bfloat16, torch.float16) for p in work.parameters())
    # eager with passes differs from the original only when a pass other than eval changed something
    passes_changed = any(r.status == "applied" and r.name != "eval" for r in optimized._report.passes
                         if r.name in {spec.name for spec in plan.module_passes})
    # int8 races the bf16 candidates in one stage (it must beat them, not only eager); fp32 comes after
    first = [options.dtype] + ([torch.bfloat16] if options.dtype == torch.int8
                               and optimized._hardware.native(torch.bfloat16) else [])
    stage_dtypes = [first] + ([[torch.float32]] if options.dtype != torch.float32 else [])
    stages: list[list[ladder.Rung]] = []
    for dtypes in stage_dtypes:
        stage = []
        for dtype in dtypes:
            for spec in plan.graph_passes:
                if dtype not in spec.dtypes:
                    continue
                opts = dataclasses.replace(options, dtype=dtype,
                                           calibration=options.calibration if dtype == torch.int8 else None)
                ctx = PassContext(opts, optimized._hardware, plan.mode, None, args, kwargs, dynamic_dims=dims or None,
                                  artifact_dir=ladder.artifact_dir(artifact_dir, dtype, options.dtype, spec.name),
                                  out_dtypes=out_dtypes)
                stage.append(ladder.Rung(f"{spec.name} {dtype_name(dtype)}", spec.name, dtype,
                                         lambda spec=spec, ctx=ctx: spec.fn(work, args, kwargs, ctx), ctx.notes))
            if dtype in (torch.bfloat16, torch.float16) or (
                    dtype == torch.float32 and passes_changed and not low_precision_work):
                stage.append(ladder.Rung(f"eager+passes {dtype_name(dtype)}", "eager+passes", dtype,
                                         lambda dtype=dtype: eager_runner(work, dtype)))
        if stage:
            stages.append(stage)
    if prefer:  # a known winner goes first; with it, the ladder stops at the first rung that wins
        for stage in stages:
            chosen = [r for r in stage if r.name == prefer]
            if chosen:
                stage.remove(chosen[0])
                stages[0].insert(0, chosen[0])
                break
    return stages
