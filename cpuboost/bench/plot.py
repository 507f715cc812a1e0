"""A bar chart of benchmark results a person can read at a glance (matplotlib, the optional ``bench`` extra).

Uses ``matplotlib.figure.Figure`` directly, so no pyplot backend or global state is touched.
"""
from __future__ import annotations

import importlib.util
import math

from .results import BenchResult
from ..errors import CpuBoostError

COLORS = {"fp32": "#3b75af", "bf16": "#ef8636", "fp16": "#519e3e", "int8": "#8e44ad"}


class PlotUnavailableError(CpuBoostError, ImportError):
    """--plot was asked for but matplotlib is not installed."""


def require_matplotlib() -> None:
    """Fail before a long benchmark, not after it, when the chart cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        msg = ("--plot needs matplotlib, which is not installed; pip install 'cpuboost[bench]' "
               "(or pip install matplotlib), or drop --plot and use --json")
        raise PlotUnavailableError(msg)


def _panel(ax, result: BenchResult) -> None:
    paths = list(reversed(result.paths))  # first path (eager fp32) at the top
    y = range(len(paths))
    speed = [result.speedup(p.name) if p.timed else 0.0 for p in paths]
    err_lo, err_hi = [], []
    for p, s in zip(paths, speed):
        lo, hi = result.speedup_quartiles(p.name) if p.timed else (s, s)
        err_lo.append(0.0 if math.isnan(lo) else max(s - lo, 0.0))
        err_hi.append(0.0 if math.isnan(hi) else max(hi - s, 0.0))
    colors = [COLORS.get(p.dtype, "#888888") for p in paths]
    ax.barh(list(y), speed, color=colors, xerr=[err_lo, err_hi], ecolor="#333333", capsize=3, height=0.65)
    ax.axvline(1.0, color="#444444", linestyle="--", linewidth=1)
    ax.set_yticks(list(y))
    ax.set_yticklabels([p.label for p in paths], fontsize=10)
    top = max([s + h for s, h in zip(speed, err_hi) if not math.isnan(s)] + [1.0])
    ax.set_xlim(0, top * 1.6)  # room for the labels right of each whisker
    for i, (p, s, hi) in enumerate(zip(paths, speed, err_hi)):
        if p.timed:
            text = f"{s:.2f}x  {p.median_s * 1e3:.1f} ms"
            if p.build_s >= 1.0:
                text += f"  (build {p.build_s:.0f} s)"
            ax.text(s + hi + top * 0.02, i, text, va="center", fontsize=9,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1, "alpha": 0.85})
        else:
            ax.text(top * 0.03, i, f"{p.status}: {p.reason[:60]}", va="center", fontsize=8, color="#aa0000")
    ax.set_title(f"{result.workload}, batch {result.batch}: {result.description}", fontsize=11, loc="left")
    ax.set_xlabel("speedup vs eager fp32, higher is faster (bar: median of per-round ratios; whiskers: "
                  "their interquartile range)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def plot(results: list[BenchResult], path: str) -> None:
    """One panel per workload, speedup bars coloured by dtype; written to ``path`` (PNG, SVG, PDF...)."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = sum(len(r.paths) for r in results)
    fig = Figure(figsize=(11, 1.0 + 0.42 * rows + 1.0 * len(results)))
    axes = fig.subplots(len(results), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [len(r.paths) + 1.5 for r in results]})[:, 0]
    for ax, result in zip(axes, results):
        _panel(ax, result)
    m = results[0].machine
    bf16 = "native bf16" if m.get("native_bf16") else "bf16 EMULATED (no AVX512_BF16/AMX)"
    loads = [x for r in results for x in (r.machine.get("load_average") or []) if x is not None]
    cpus = m.get("logical_cpus")
    shared = (f"\nother work shared the CPUs (load average up to {max(loads):.1f} on {cpus}): compare ratios, "
              "not absolute times") if loads and cpus and max(loads) > cpus + 0.5 else ""
    fig.suptitle(f"cpuboost bench on {m.get('cpu', '?')}: {m.get('torch_threads', '?')} threads, "
                 f"torch {m.get('torch', '?')}, {bf16}{shared}", fontsize=11)
    dtypes = sorted({p.dtype for r in results for p in r.paths}, key=list(COLORS).index)
    axes[0].legend(handles=[Patch(color=COLORS[d], label=d) for d in dtypes], loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # never clip the path labels
