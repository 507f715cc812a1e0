"""Inductor's C++ wrapper vs its Python wrapper on the same graph, side by side in one process.

    python benchmarks/wrapper.py                    # ResNet-50 b1 and BERT-base s128 b1, bf16
    python benchmarks/wrapper.py resnet50 --dtype fp32 --rounds 40

Both graphs are compiled from cpuboost's own working copy (after its module passes) with freezing, exactly
as the graph pass builds them, and timed in interleaved rounds; the table shows median ms per call and the
ratio Python wrapper / C++ wrapper (above 1: the C++ wrapper is faster).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import cpuboost
from cpuboost import models
from cpuboost.hardware import detect
from cpuboost.options import parse_dtype
from cpuboost.passes.graph import _compile_now


def measure(name: str, dtype: str, rounds: int) -> dict:
    wl = models.load(name, batch=1)
    # fp32 without fusion runs exactly the module passes a fused build runs (eval, BN folding, channels_last)
    optimized = cpuboost.optimize(wl.model, dtype="fp32", fusion=False)
    with torch.no_grad():
        wl.call(optimized)
    work, torch_dtype = optimized._work, parse_dtype(dtype)
    built, build_s = {}, {}
    for label, cpp in (("python wrapper", False), ("C++ wrapper", True)):
        begin = time.perf_counter()
        built[label] = _compile_now(work, wl.args, wl.kwargs, torch_dtype, cpp_wrapper=cpp)
        build_s[label] = time.perf_counter() - begin
    times: dict[str, list[float]] = {label: [] for label in built}
    with torch.no_grad():
        for fn in built.values():
            for _ in range(3):
                wl.call(fn)
        for _ in range(rounds):
            for label, fn in built.items():
                begin = time.perf_counter()
                wl.call(fn)
                times[label].append(time.perf_counter() - begin)
    median = {label: statistics.median(t) * 1e3 for label, t in times.items()}
    return {"workload": name, "dtype": dtype, "median_ms": median, "build_s": build_s,
            "speedup": median["python wrapper"] / median["C++ wrapper"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="*", default=["resnet50", "bert"])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--rounds", type=int, default=30)
    a = parser.parse_args()
    hw = detect()
    print(f"# {hw.cpu_model}; native bf16: {hw.native_bf16}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; reproduce: python benchmarks/wrapper.py {' '.join(a.workloads)} --dtype {a.dtype} "
          f"--rounds {a.rounds}")
    print("| workload | dtype | Python wrapper | C++ wrapper | speed-up | builds (Python / C++) |")
    print("|---|---|---:|---:|---:|---:|")
    for name in a.workloads:
        r = measure(name, a.dtype, a.rounds)
        m, b = r["median_ms"], r["build_s"]
        print(f"| {name} b1 | {a.dtype} | {m['python wrapper']:.2f} ms | {m['C++ wrapper']:.2f} ms | "
              f"**{r['speedup']:.2f}x** | {b['python wrapper']:.0f} s / {b['C++ wrapper']:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
