"""int8 vs bf16-compiled vs eager fp32, interleaved in one process.

    python benchmarks/int8.py [--models resnet,bert] [--reps 12] [--extra]

ResNet-50 (transformers ResNetForImageClassification, random weights) b4 224x224 with 4 calibration batches
(static int8), BERT-base (BertModel) s128 b8 without calibration (dynamic int8). Per model: each path
built once (build times printed), then `reps` rounds, each round timing every path once in turn, so the
load of a shared machine falls on all paths alike. Reported: median and min wall time, and the median of
per-round ratios bf16/path ("paired", the most robust number on a noisy machine). Errors vs eager fp32:
max|diff|/max|ref| and cosine over every floating output, top-1 agreement for logits.
--extra adds, for BERT, the int8 alternatives measured to choose the scheme: torchao dynamic (per-token
scales, scheme="dynamic_torchao"), and static PT2E calibrated on the example input alone.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch

sys.path.insert(0, "/work/main")
from cpuboost.backends import int8  # noqa: E402


def bf16_compiled(model, args, kwargs):
    """What a user writes: torch.compile with Inductor freezing, called under autocast bf16."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(copy.deepcopy(model))

    def run(*a, **k):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return compiled(*a, **k)
    started = time.perf_counter()
    with inductor_config.patch(freezing=True):
        run(*args, **kwargs)
    return run, time.perf_counter() - started


def int8_path(model, args, kwargs, calibration, scheme=None):
    notes: list[str] = []
    started = time.perf_counter()
    run = int8.build(model, args, kwargs, calibration, notes.append, scheme=scheme)
    total = time.perf_counter() - started
    for line in notes:
        print("   ", line, flush=True)
    return run, total


def workloads(names):
    from transformers import BertConfig, BertModel, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    if "resnet" in names:
        model = ResNetForImageClassification(ResNetConfig()).eval()
        x = torch.randn(4, 3, 224, 224)
        calibration = [(torch.randn(4, 3, 224, 224),) for _ in range(4)]
        yield "ResNet-50 b4 224", model, (x,), {}, calibration
    if "bert" in names:
        model = BertModel(BertConfig()).eval()
        ids = torch.randint(0, 30522, (8, 128))
        yield "BERT-base s128 b8", model, (), {"input_ids": ids}, None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet,bert")
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--extra", action="store_true")
    opts = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    for title, model, args, kwargs, calibration in workloads(opts.models.split(",")):
        print(f"\n== {title}", flush=True)

        def eager(*a, **k):
            with torch.no_grad():
                return model(*a, **k)
        paths, build_s = {"eager fp32": eager}, {"eager fp32": 0.0}
        paths["bf16 compiled"], build_s["bf16 compiled"] = bf16_compiled(model, args, kwargs)
        print(f"  bf16 compiled built in {build_s['bf16 compiled']:.0f} s", flush=True)
        label = "int8 static" if calibration else "int8 (auto)"
        print(f"  {label}:", flush=True)
        paths[label], build_s[label] = int8_path(model, args, kwargs, calibration)
        if opts.extra and calibration is None:
            print("  int8 torchao dynamic (scheme='dynamic_torchao'):", flush=True)
            paths["int8 torchao dyn"], build_s["int8 torchao dyn"] = int8_path(
                model, args, kwargs, None, scheme="dynamic_torchao")
            print("  int8 static, calibrated on the example input only:", flush=True)
            paths["int8 static(ex)"], build_s["int8 static(ex)"] = int8_path(
                model, args, kwargs, [(args, kwargs)], scheme="static")
        reference = eager(*args, **kwargs)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(opts.reps):
            for name, run in paths.items():
                started = time.perf_counter()
                run(*args, **kwargs)
                times[name].append(time.perf_counter() - started)
        base = times["bf16 compiled"]
        print(f"\n  {'path':<22}{'median ms':>10}{'min ms':>9}{'x eager':>9}{'x bf16':>8}{'paired':>8}"
              f"{'max_err':>9}{'cosine':>9}{'top1':>6}{'build s':>9}")
        for name, run in paths.items():
            t = times[name]
            acc = int8.accuracy(reference, run(*args, **kwargs))
            paired = statistics.median(b / a for a, b in zip(t, base))
            top1 = f"{acc['top1_agreement']:.2f}" if "top1_agreement" in acc else "-"
            print(f"  {name:<22}{statistics.median(t) * 1e3:>10.0f}{min(t) * 1e3:>9.0f}"
                  f"{statistics.median(times['eager fp32']) / statistics.median(t):>9.2f}"
                  f"{statistics.median(base) / statistics.median(t):>8.2f}{paired:>8.2f}"
                  f"{acc['max_err']:>9.4f}{acc['cosine']:>9.5f}{top1:>6}{build_s[name]:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
