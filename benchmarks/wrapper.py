"""Inductor's C++ wrapper vs its Python wrapper on the same graph, side by side in one process.

    python benchmarks/wrapper.py                    # ResNet-50 b1 and BERT-base s128 b1, bf16
    python benchmarks/wrapper.py resnet50 --dtype fp32 --rounds 40

Both graphs are compiled from cpuboost's own working copy (after its module passes) with freezing, exactly
as the graph pass builds them, and timed by ``cpuboost.bench.run`` in interleaved rounds beside eager fp32.
The summary shows the C++ wrapper's speed-up over the Python wrapper (median of same-round ratios).
"""
from __future__ import annotations

import argparse

import torch

import cpuboost
from cpuboost import bench
from cpuboost.bench import workloads as models
from cpuboost.options import parse_dtype
from cpuboost.backends.inductor import compile_now


def _wrapper_path(dtype: str, cpp_wrapper: bool) -> bench.BenchPath:
    def build(model: torch.nn.Module, wl: models.Workload):
        # fp32 without fusion runs exactly the module passes a fused build runs (eval, BN folding, channels_last)
        optimized = cpuboost.optimize(model, dtype="fp32", fusion=False)
        with torch.no_grad():
            wl.call(optimized)
        return compile_now(optimized._work, wl.args, wl.kwargs, parse_dtype(dtype), cpp_wrapper=cpp_wrapper)

    kind = "cpp" if cpp_wrapper else "python"
    return bench.BenchPath(f"inductor_{kind}_wrapper_{dtype}", build, dtype,
                           f"Inductor {'C++' if cpp_wrapper else 'Python'} wrapper {dtype}", compiles=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="*", default=["resnet50", "bert"])
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--rounds", type=int, default=30)
    a = parser.parse_args()
    python, cpp = _wrapper_path(a.dtype, False), _wrapper_path(a.dtype, True)
    lines = ["| workload | dtype | C++ wrapper vs Python wrapper (IQR) |", "|---|---|---:|"]
    for name in a.workloads:
        result = bench.run(models.load(name, batch=1), [bench.get_path("eager_fp32"), python, cpp],
                           rounds=a.rounds, measure_peak=False)
        print(result.table(), flush=True)
        low, high = result.speedup_quartiles(cpp.name, baseline=python.name)
        lines.append(f"| {name} b1 | {a.dtype} | **{result.speedup(cpp.name, baseline=python.name):.2f}x** "
                     f"({low:.2f}-{high:.2f}) |")
    print(f"\nreproduce: python benchmarks/wrapper.py {' '.join(a.workloads)} --dtype {a.dtype} --rounds {a.rounds}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
