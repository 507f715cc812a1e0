"""What cpuboost's per-call checks cost, next to the call they guard (ResNet-50 b1 and BERT-base b1).

    python benchmarks/freshness.py [--dtype bf16] [--calls 200]
    python benchmarks/freshness.py --models mobilenet_v2,resnet50   # any benchmarks/zoo.py model too

For each model: the optimized call (median ms), and the median microseconds of each check it runs on every
call: the weight-freshness check (identity, data_ptr, version counters, sampled content, plain attributes)
called in a loop and called right after a served call (as it runs in use: the inference has pushed the
objects it reads out of the caches), the signature key, and the whole wrapper (optimized call minus the
serving graph called directly).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

import cpuboost
from cpuboost.bench import workloads
from cpuboost.core import signature


def _median_us(fn, calls: int) -> float:
    samples = []
    for _ in range(calls):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e6)
    return statistics.median(samples)


def _workload(name: str):
    """A built-in workload, or a benchmarks/zoo.py model by name."""
    if name in workloads.BUILTIN:
        return workloads.load(name)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import zoo

    spec = zoo.build(name)
    return SimpleNamespace(model=spec.model, args=spec.args, kwargs=spec.kwargs, call=spec.call)


def measure(name: str, dtype: str, calls: int) -> dict:
    wl = _workload(name)
    model = cpuboost.optimize(wl.model, dtype=dtype, tune_budget=0)
    with torch.no_grad():
        wl.call(model)
    entry = model._cache.get(signature.call_key(wl.args, wl.kwargs))
    served = f"{entry.record.path} {entry.record.dtype}"
    rounds = max(5, calls // 20)
    call_ms, direct_ms = [], []
    with torch.no_grad():
        for _ in range(rounds):  # interleaved: the wrapped call and the graph alone
            call_ms.append(_median_us(lambda: wl.call(model), 3) / 1e3)
            direct_ms.append(_median_us(lambda: entry.fn(*wl.args, **wl.kwargs), 3) / 1e3)
    fresh_us = _median_us(model._watch.changed, calls)
    after_call = []
    with torch.no_grad():
        for _ in range(calls):
            entry.fn(*wl.args, **wl.kwargs)
            after_call.append(_median_us(model._watch.changed, 1))
    key_us = _median_us(lambda: signature.call_key(wl.args, wl.kwargs), calls)
    call, direct = statistics.median(call_ms), statistics.median(direct_ms)
    return {"model": name, "served": served, "call_ms": call, "freshness_us": fresh_us, "key_us": key_us,
            "after_call_us": statistics.median(after_call),
            "wrapper_us": max(call - direct, 0.0) * 1e3, "tensors": len(model._watch.tensors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--models", default="resnet50,bert")
    args = parser.parse_args()
    print(f"# python benchmarks/freshness.py --dtype {args.dtype} --calls {args.calls} --models {args.models}   "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print("| model | served by | call | freshness check | the check after a call | signature key | "
          "whole wrapper (call - graph) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        r = measure(name, args.dtype, args.calls)
        pct = lambda us: f"{us:.0f} us ({us / (r['call_ms'] * 1e3) * 100:.2f}%)"  # noqa: E731
        print(f"| {r['model']} ({r['tensors']} tensors) | {r['served']} | {r['call_ms']:.1f} ms | "
              f"{pct(r['freshness_us'])} | {pct(r['after_call_us'])} | {pct(r['key_us'])} | {pct(r['wrapper_us'])} |")


if __name__ == "__main__":
    main()
