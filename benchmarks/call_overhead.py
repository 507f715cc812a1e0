"""What cpuboost adds to a served call, against the bare OpenVINO peer, in one process (a zoo model).

    python benchmarks/call_overhead.py --model mobilenet_v2 [--calls 300]

Per-call medians over interleaved calls (each timed call follows two untimed ones of the same path, so the
runtime that ran before it does not count): the zoo's OpenVINO peer (``convert_model`` + ``compile_model``, one
infer request), the graph cpuboost serves called alone, and the whole cpuboost call, with the weight-freshness
check as it is and with every attribute and buffer watched, read through torch (this round's check before its
two changes). On a 2 ms model the check is the difference: it runs right after an inference that has pushed the
objects it reads out of the caches.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _everything_watched(model: torch.nn.Module):
    from cpuboost.core import freshness

    skipped = dict(freshness.UNREAD_IN_EVAL)
    freshness.UNREAD_IN_EVAL.clear()
    try:
        watch = freshness.WeightWatch(model)
    finally:
        freshness.UNREAD_IN_EVAL.update(skipped)
    watch.sampler = freshness._Sampler(watch.tensors, use_numpy=False)
    return watch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    os.environ.setdefault("CPUBOOST_CACHE_DIR", "off")
    import cpuboost
    import zoo

    spec = zoo.build(args.model)
    peer, _ = zoo._openvino(spec, zoo.main_output(spec.call(spec.model)))
    model = cpuboost.optimize(spec.model, dtype="bf16")
    with torch.no_grad():
        spec.call(model)
    entry = next(iter(model._cache.entries.values()))
    watches = {"this check": model._watch, "everything watched": _everything_watched(spec.model)}

    def with_watch(name: str):
        def call() -> None:
            model.__dict__["_watch"] = watches[name]
            spec.call(model)
        return call

    paths = {"OpenVINO peer": peer, "served graph alone": lambda: entry.fn(*spec.args, **spec.kwargs),
             "cpuboost call": with_watch("this check"),
             "cpuboost call, everything watched": with_watch("everything watched")}
    times: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        for _ in range(args.calls):
            for name, fn in paths.items():
                fn()
                fn()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    model.__dict__["_watch"] = watches["this check"]
    peer_ms = statistics.median(times["OpenVINO peer"]) * 1e3
    print(f"# python benchmarks/call_overhead.py --model {args.model} --calls {args.calls}   "
          f"(served: {entry.record.path} {entry.record.dtype}; tensors watched {len(watches['this check'].tensors)}"
          f" of {len(watches['everything watched'].tensors)}, attributes {len(watches['this check'].attr_names)}"
          f" of {len(watches['everything watched'].attr_names)})")
    print("| path | per call (median) | vs the OpenVINO peer |")
    print("|---|---:|---:|")
    for name, samples in times.items():
        ms = statistics.median(samples) * 1e3
        print(f"| {name} | {ms:.3f} ms | {peer_ms / ms:.3f}x |")


if __name__ == "__main__":
    main()
