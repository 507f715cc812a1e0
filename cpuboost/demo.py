"""The README demo: optimize a real model (transformers ResNet-50 from its config) and show what it bought.

    python -m cpuboost.demo [--model resnet50|bert] [--dtype auto|fp32|bf16] [--rounds N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _resnet50():
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig()).eval(), {"pixel_values": torch.randn(1, 3, 224, 224)}


def _bert():
    from transformers import BertConfig, BertModel

    ids = torch.randint(0, 30522, (1, 128))
    return BertModel(BertConfig()).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


MODELS = {"resnet50": _resnet50, "bert": _bert}


def _median_ms(fn, inputs, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn(**inputs)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpuboost.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet50")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 where the CPU has native bf16 (AVX512_BF16/AMX), else fp32")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)

    import cpuboost
    from cpuboost.machine.hardware import detect

    hw = detect()
    dtype = hw.recommended_dtype if args.dtype == "auto" else args.dtype
    print(f"CPU: {hw.cpu_model}; {hw.torch_threads} torch threads; native bf16: {hw.native_bf16}")
    print(f"model: {args.model} (transformers, random weights from its config); dtype: {dtype}")
    torch.manual_seed(0)
    net, inputs = MODELS[args.model]()

    @cpuboost.cpu_optimized(dtype=dtype, fusion=True)
    def make():
        return net

    model = make()
    print("building and verifying the optimized graph (tens of seconds on 2 cores)...", flush=True)
    started = time.perf_counter()
    model(**inputs)
    build = time.perf_counter() - started
    started = time.perf_counter()
    model.wait_for_builds()  # a text model's first call answers first; its other rungs race in the background
    raced = time.perf_counter() - started
    with torch.no_grad():
        for _ in range(2):  # warm both paths
            net(**inputs)
            model(**inputs)
        eager_ms, fast_ms = [], []
        for _ in range(3):  # interleaved, so both see the same machine
            eager_ms.append(_median_ms(net, inputs, args.rounds))
            fast_ms.append(_median_ms(model, inputs, args.rounds))
    eager, fast = statistics.median(eager_ms), statistics.median(fast_ms)
    print(f"\neager fp32     : {eager:8.2f} ms")
    print(f"cpuboost {dtype:5s} : {fast:8.2f} ms   speed-up {eager / fast:.2f}x   (first call built in {build:.1f} s"
          + (f"; the other rungs raced {raced:.1f} s more in the background" if raced > 0.05 else "") + ")\n")
    print(cpuboost.explain(model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
