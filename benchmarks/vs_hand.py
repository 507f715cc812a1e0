"""cpuboost bf16 against the hand-written compile, side by side in one process, on a zoo model.

    python benchmarks/vs_hand.py --model gpt2 --variants auto,static --rounds 20
    python benchmarks/vs_hand.py --model llama --variants auto,auto-cache
    python benchmarks/vs_hand.py --model convnext --variants auto,auto-cache --batch 8

The zoo (benchmarks/zoo.py) gives each path its own process and fresh caches; this puts cpuboost's served model
and the hand compile (torch.compile with freezing, called under autocast bf16) in one process and times them in
interleaved rounds, each sample after one untimed call of the same path, so a few percent between them can be
seen. A variant is a ``shapes`` option (auto: dynamic in token dims; static), with ``-cache`` for a fresh
persistent cache folder (AOTInductor packages) instead of ``cache_dir="off"``. Printed: the path each variant
serves with its race, the median and min per call, and the median of same-round ratios hand / variant.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo  # noqa: E402


def hand_compile(spec: zoo.Spec):
    import torch._inductor.config as inductor_config

    compiled = torch.compile(copy.deepcopy(spec.model))

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return spec.call(compiled)
    with inductor_config.patch(freezing=True):
        run()
    return run


def cpuboost_variant(spec: zoo.Spec, variant: str):
    import cpuboost

    shapes, _, cache = variant.partition("-")
    model = cpuboost.optimize(spec.model, dtype="bf16", shapes=shapes,
                              cache_dir=tempfile.mkdtemp(prefix="cpuboost-vs-hand-") if cache else "off")
    with torch.no_grad():
        spec.call(model)
        model.wait_for_builds()  # a text model's other rungs race in the background (build="auto"): settled here
        spec.call(model)
    graph = cpuboost.explain(model).graphs[-1]
    race = ", ".join(f"{name} {ms:.2f} ms" for name, ms in graph.timings)
    print(f"  {variant}: serves {graph.path} {graph.dtype} (race: {race})", flush=True)

    def run():
        with torch.no_grad():
            return spec.call(model)
    return run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--variants", default="auto,static")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1, help="the zoo model's batch (zoo.py --batch)")
    opts = parser.parse_args()
    zoo.BATCH = opts.batch
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    print(f"reproduce: python benchmarks/vs_hand.py --model {opts.model} --variants {opts.variants} "
          f"--rounds {opts.rounds} --batch {opts.batch}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    spec = zoo.build(opts.model)
    paths = {"hand": hand_compile(spec)}
    for variant in opts.variants.split(","):
        paths[variant] = cpuboost_variant(spec, variant)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(opts.rounds):
        for name, run in paths.items():
            run()  # settle: the first call after another path's is slowed by its threads
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    for name, samples in times.items():
        paired = statistics.median(h / s for h, s in zip(times["hand"], samples))
        print(f"  {opts.model} {name:<14} median {statistics.median(samples) * 1e3:7.2f} ms  "
              f"min {min(samples) * 1e3:7.2f} ms  x hand compile (paired) {paired:.3f}", flush=True)


if __name__ == "__main__":
    main()
