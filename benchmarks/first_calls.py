"""First-call latency of a fresh model: build="blocking" against build="background", side by side.

Each (model, mode) runs in its own subprocess with an empty Inductor cache and cpuboost's persistent cache
off, so neither mode reuses the other's compile. A child builds the model from its transformers config
(random weights), optimizes it and times each of its first ``--calls`` calls. Blocking: the first call
holds the whole build (ladder, verification, race). Background: eager answers while the ladder runs in a
thread; the built graph serves from the first call after it lands ("graph from call").

    python benchmarks/first_calls.py [--models resnet50,bert] [--calls 50] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("blocking", "background")


def child(name: str, mode: str, calls: int, dtype: str) -> dict:
    import torch

    import cpuboost
    from cpuboost.bench import workloads
    from cpuboost.core import signature

    torch.manual_seed(0)
    wl = workloads.load(name)
    model = cpuboost.optimize(wl.model, dtype=dtype, tune_budget=0, cache_dir="off", build=mode)
    key = signature.call_key(wl.args, wl.kwargs)
    started = time.perf_counter()
    latencies, graph_from = [], None
    with torch.no_grad():
        for i in range(calls):
            served = model._cache.get(key) is not None
            begin = time.perf_counter()
            wl.call(model)
            latencies.append((time.perf_counter() - begin) * 1e3)
            if served and graph_from is None:
                graph_from = i + 1
    finished = model.wait_for_builds(timeout=1800)
    entry = model._cache.get(key)
    return {"first_ms": latencies[0], "median_ms": statistics.median(latencies[1:]) if calls > 1 else None,
            "max_ms": max(latencies), "total_s": sum(latencies) / 1e3, "graph_from": graph_from,
            "built_after_s": time.perf_counter() - started if finished else None,
            "served_by": f"{entry.record.path} {entry.record.dtype}" if entry is not None else "not built"}


def run_child(name: str, mode: str, calls: int, dtype: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="cpuboost-first-calls-") as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tmp, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, __file__, "--child", name, mode, str(calls), dtype],
                              env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,bert")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, mode, calls, dtype = args.child
        print(json.dumps(child(name, mode, int(calls), dtype)))
        return
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    print(f"# python benchmarks/first_calls.py --models {args.models} --calls {args.calls} --dtype {args.dtype}"
          f"   (load average before: {' '.join(load)})")
    print(f"| model | mode | first call | median of calls 2-{args.calls} | slowest | all {args.calls} calls | "
          "graph from call | build done after | served by |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name in args.models.split(","):
        rows = {mode: run_child(name, mode, args.calls, args.dtype) for mode in MODES}
        for mode, r in rows.items():
            built = f"{r['built_after_s']:.0f} s" if r["built_after_s"] is not None else "not done"
            median = f"{r['median_ms']:.0f} ms" if r["median_ms"] is not None else "-"
            print(f"| {name} | {mode} | {r['first_ms']:.0f} ms | {median} | {r['max_ms']:.0f} ms | "
                  f"{r['total_s']:.1f} s | {r['graph_from'] or '-'} | {built} | {r['served_by']} |")
        block, back = rows["blocking"], rows["background"]
        print(f"| {name} | background / blocking | {back['first_ms'] / block['first_ms']:.3f}x | | | "
              f"{back['total_s'] / block['total_s']:.2f}x | | | |")
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    print(f"# load average after: {' '.join(load)}")


if __name__ == "__main__":
    main()
