"""Inference benchmarks behind the README tables: every path timed side by side, in one process.

    python benchmarks/inference.py                 # issue-2 check: ResNet-50 b1 + BERT-base s128 b1
    python benchmarks/inference.py --suite         # ResNet-50 b1/b16, BERT s128 b1/b8, ConvNet b32, MLP b64
    python benchmarks/inference.py resnet50_b16    # any listed workload(s) alone
    python benchmarks/inference.py --int8          # issue-15 check: int8 vs cpuboost bf16, ResNet-50 b4 + BERT s128 b8

Each run writes results/inference-<name>.json (all samples), .png (the chart) and .md (the summary
table) under --out. Paths come from cpuboost.bench; IPEX/OpenVINO peers join when installed.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import torch

from cpuboost import bench
from cpuboost.bench import plot as benchplot, workloads as models
from cpuboost.bench.results import BenchResult, load_json, write_json

WORKLOADS = {  # name -> (model, batch)
    "resnet50_b1": ("resnet50", 1),
    "resnet50_b4": ("resnet50", 4),
    "resnet50_b16": ("resnet50", 16),
    "bert_s128_b1": ("bert", 1),
    "bert_s128_b8": ("bert", 8),
    "convnet_b32": ("convnet", 32),
    "mlp_b64": ("mlp", 64),
}
ISSUE2 = ("resnet50_b1", "bert_s128_b1")
INT8 = ("resnet50_b4", "bert_s128_b8")  # ResNet calibrated on 4 random batches; BERT (token ids) dynamic
# Targets from the core issue (measured against eager fp32 and the hand-written torch.compile bf16).
TARGETS = {"resnet50_b1": (2.5, 0.95), "bert_s128_b1": (2.4, 0.95)}
INT8_TARGET, INT8_MAX_ERR, INT8_MIN_COSINE = 1.3, 0.1, 0.99  # int8 vs cpuboost bf16; accuracy vs eager fp32


def summary(results: list[BenchResult]) -> list[str]:
    """A markdown table: eager fp32 latency, then each path's speedup (median of same-round ratios, with
    their interquartile range) and its first-call build time."""
    names = list(dict.fromkeys(p.name for r in results for p in r.paths if p.name != "eager_fp32"))
    labels = {p.name: p.label for r in results for p in r.paths}
    head = ["workload", "eager fp32 (median)"] + [labels[n] for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        base = r.path("eager_fp32")
        cells = [f"{r.workload} b{r.batch}", f"{base.median_s * 1e3:.0f} ms" if base and base.timed else "n/a"]
        for n in names:
            p = r.path(n)
            if p is None:
                cells.append("")
            elif not p.timed:
                cells.append(p.status)
            else:
                lo, hi = r.speedup_quartiles(n)
                build = f", build {p.build_s:.0f} s" if p.build_s >= 1 else ""
                cells.append(f"**{r.speedup(n):.2f}x** ({lo:.2f}-{hi:.2f}{build})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def issue2_check(result: BenchResult, key: str) -> str:
    """The core issue's bar, stated plainly against what was measured."""
    vs_eager, vs_hand = TARGETS[key]
    ours, hand = result.speedup("cpuboost_bf16"), result.speedup("cpuboost_bf16", "compile_bf16")
    best = max((p for p in result.paths if p.timed), key=lambda p: result.speedup(p.name))
    cb = result.path("cpuboost_bf16")
    build = f"{cb.build_s:.1f} s" if cb is not None and cb.timed else "n/a"
    verdict = "met" if ours >= vs_eager and hand >= vs_hand else "NOT met"
    return (f"{key}: cpuboost bf16 = {_x(ours)} eager fp32 (target >= {vs_eager}x), {_x(hand)} hand-written "
            f"torch.compile bf16 (target >= {vs_hand}x), first-call build {build}: {verdict}. "
            f"Fastest path here: {best.label} ({_x(result.speedup(best.name))}).")


def int8_check(result: BenchResult, key: str) -> str:
    """Issue 15's bar: int8 >= 1.3x cpuboost bf16 in the same run, within 0.1 max error and 0.99 cosine."""
    int8 = result.path("cpuboost_int8")
    if int8 is None or not int8.timed:
        return f"{key}: cpuboost int8 did not run ({int8.status + ': ' + int8.reason if int8 else 'not selected'})"
    ratio = result.speedup("cpuboost_int8", "cpuboost_bf16")
    acc = int8.accuracy
    top1 = f", top-1 agreement {acc['top1_agreement']:.3f}" if "top1_agreement" in acc else ""
    ok = ratio >= INT8_TARGET and acc.get("max_err", 1) <= INT8_MAX_ERR and acc.get("cosine", 0) >= INT8_MIN_COSINE
    return (f"{key}: cpuboost int8 = {_x(ratio)} cpuboost bf16 (target >= {INT8_TARGET}x), "
            f"{_x(result.speedup('cpuboost_int8', 'compile_bf16'))} hand-written torch.compile bf16, "
            f"{_x(result.speedup('cpuboost_int8'))} eager fp32; vs eager fp32 max_err {acc.get('max_err', float('nan')):.3f}"
            f" (<= {INT8_MAX_ERR}), cosine {acc.get('cosine', float('nan')):.4f} (>= {INT8_MIN_COSINE}){top1}; "
            f"{int8.note.split(' (')[0]}: {'met' if ok else 'NOT met'}.")


def _x(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                        help=f"any of {', '.join(WORKLOADS)} (default: the issue-2 pair)")
    parser.add_argument("--suite", action="store_true", help="all workloads above")
    parser.add_argument("--int8", action="store_true", help="issue-15 check: int8 paths on ResNet-50 b4, BERT s128 b8")
    parser.add_argument("--paths", default=None, help="paths/groups (default: issue2 for the issue-2 pair, "
                                                      "all for the suite); see `cpuboost bench --list-paths`")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--round-seconds", type=float, default=0.3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--name", default=None, help="file name stem (default: issue2, suite or the workloads)")
    parser.add_argument("--from-json", metavar="FILE", help="re-render tables, summary and chart from a saved run")
    args = parser.parse_args(argv)
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    chosen = list(WORKLOADS) if args.suite else (args.workloads or list(INT8 if args.int8 else ISSUE2))
    paths = args.paths or ("all" if args.suite else "int8" if args.int8 else "issue2")
    name = args.name or ("suite" if args.suite else "int8" if args.int8 and not args.workloads else
                         "issue2" if chosen == list(ISSUE2) else "-".join(chosen))
    plot = True
    try:
        benchplot.require_matplotlib()
    except benchplot.PlotUnavailableError as exc:
        print(f"note: {exc}; writing JSON and markdown only", file=sys.stderr)
        plot = False
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        results = load_json(args.from_json)
        chosen = [f"{r.workload}_b{r.batch}" if r.workload != "bert" else f"bert_s128_b{r.batch}" for r in results]
        for r in results:
            print(r.table(), "\n")
        return _finish(results, chosen, args.out, args.name or "rerendered", plot, write=False)
    results = []
    for key in chosen:
        model, batch = WORKLOADS[key]
        workload = models.load(model, batch)
        result = bench.run(workload, bench.resolve_paths(paths), rounds=args.rounds,
                           round_seconds=args.round_seconds)
        print(result.table(), "\n", flush=True)
        results.append(result)
        del workload
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()  # free this workload's compiled graphs before the next one
    return _finish(results, chosen, args.out, name, plot, write=True)


def _finish(results: list[BenchResult], chosen: list[str], out: str, name: str, plot: bool, write: bool) -> int:
    lines = summary(results)
    checks = [issue2_check(r, key) for r, key in zip(results, chosen) if key in TARGETS
              and r.path("cpuboost_bf16") is not None and r.path("compile_bf16") is not None]
    checks += [int8_check(r, key) for r, key in zip(results, chosen)
               if r.path("cpuboost_int8") is not None and r.path("cpuboost_bf16") is not None]
    stem = os.path.join(out, f"inference-{name}")
    with open(stem + ".md", "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines + [""] + checks) + "\n")
    print("\n".join(lines + [""] + checks))
    if write:
        write_json(results, stem + ".json")
    if plot:
        benchplot.plot(results, stem + ".png")
    print(f"wrote {stem}{'.json, ' if write else ''}.md{', .png' if plot else ''}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
