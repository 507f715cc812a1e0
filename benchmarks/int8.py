"""int8 vs bf16-compiled vs eager fp32, interleaved in one process.

    python benchmarks/int8.py [--models resnet,bert] [--reps 12] [--extra]
    python benchmarks/int8.py --warm [--models resnet,bert]   # restarted process: cold vs warm first answer

ResNet-50 (transformers ResNetForImageClassification, random weights) b4 224x224 with 4 calibration batches
(static int8), BERT-base (BertModel) s128 b8 without calibration (dynamic int8). Per model: each path
built once (build times printed), then `reps` rounds, each round timing every path once in turn, so the
load of a shared machine falls on all paths alike. Reported: median and min wall time, and the median of
per-round ratios bf16/path ("paired", the most robust number on a noisy machine). Errors vs eager fp32:
max|diff|/max|ref| and cosine over every floating output, top-1 agreement for logits.
--bert-calibration gives BERT 4 calibration batches of random ids, so int8 is static (Inductor and OpenVINO)
rather than dynamic.
--extra adds, for BERT, the int8 alternatives measured to choose the scheme: torchao dynamic (per-token
scales, scheme="dynamic_torchao"), and static PT2E calibrated on the example input alone.
--realistic gives ResNet-50 real-looking activations: inputs are smooth images (upsampled noise, normalised
like ImageNet's), each residual branch's last BatchNorm scale at 0.2 as training leaves it, BatchNorm statistics
recalibrated on 8 such batches (random weights with default running statistics make every activation look
alike, which flatters int8), calibration batches drawn the same way.
--optimize adds cpuboost.optimize(dtype="bf16") and (dtype="int8", calibration=...) with the cache off: the
paths users get, raced and verified (the int8 one may serve bf16 when no int8 graph passes its bound).
--warm times, for each model, cpuboost.optimize(dtype="int8") to its first answer in two fresh processes
sharing one new cache folder: "cold" (race, calibrate, AOTInductor into the cache) then "warm" (the decision
and the int8 graph loaded, verified once, no calibration or compile).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
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


def smooth_images(batch: int) -> torch.Tensor:
    """Upsampled noise, per-channel normalised as ImageNet inputs are: neighbouring pixels correlate."""
    coarse = torch.rand(batch, 3, 14, 14)
    images = torch.nn.functional.interpolate(coarse, size=224, mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


RESIDUAL_GAIN = 0.2


def trained_residual_gains(model, gain: float = RESIDUAL_GAIN) -> None:
    """The last BatchNorm scale of every residual branch set to ``gain``, as training leaves it (small: the
    block starts near identity). At the init's 1.0 a random 50-layer ResNet is chaotic on smooth inputs: eager
    autocast bf16 alone is 0.39 off eager fp32 (cosine 0.898); at 0.2, 0.057 (cosine 0.9995), a trained one's."""
    for block in model.modules():
        if type(block).__name__ == "ResNetBottleNeckLayer":
            torch.nn.init.constant_(block.layer[-1].normalization.weight, gain)


def recalibrate_batchnorm(model, batches: int = 8) -> None:
    """Running statistics as a trained network has them for its inputs (cumulative average over batches)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(smooth_images(8))
    model.eval()


def workloads(names, realistic: bool = False, bert_calibration: bool = False):
    from transformers import BertConfig, BertModel, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    if "resnet" in names:
        model = ResNetForImageClassification(ResNetConfig()).eval()
        if realistic:
            trained_residual_gains(model)
            recalibrate_batchnorm(model)
            x, calibration = smooth_images(4), [(smooth_images(4),) for _ in range(4)]
        else:
            x, calibration = torch.randn(4, 3, 224, 224), [(torch.randn(4, 3, 224, 224),) for _ in range(4)]
        yield f"ResNet-50 b4 224{' (realistic activations)' if realistic else ''}", model, (x,), {}, calibration
    if "bert" in names:
        model = BertModel(BertConfig()).eval()
        ids = torch.randint(0, 30522, (8, 128))
        calibration = [{"input_ids": torch.randint(0, 30522, (8, 128))} for _ in range(4)] if bert_calibration \
            else None
        yield f"BERT-base s128 b8{' (4 calibration batches)' if bert_calibration else ''}", model, (), \
            {"input_ids": ids}, calibration


WARM_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch, cpuboost
from cpuboost.bench import workloads
wl = workloads.load({spec!r}, {batch})
began = time.perf_counter()
model = cpuboost.optimize(wl.model, dtype="int8", calibration=wl.calibration(), cache_dir={cache!r})
with torch.no_grad():
    wl.call(model)
first = time.perf_counter() - began
graph = cpuboost.explain(model).graphs[-1]
print(json.dumps({{"first": first, "import_and_model": began - t0, "served": f"{{graph.path}} {{graph.dtype}}",
                   "events": [e for e in cpuboost.explain(model).events if "persistent" in e]}}))
"""


def warm(names) -> None:
    specs = {"resnet": ("resnet50", 4), "bert": ("bert", 8)}
    for name in names:
        spec, batch = specs[name]
        cache = tempfile.mkdtemp(prefix="cpuboost-int8-warm-")
        rows = {}
        for scenario in ("cold", "warm"):
            env = {k: v for k, v in os.environ.items() if k != "CPUBOOST_CACHE_DIR"}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
            proc = subprocess.run([sys.executable, "-c", WARM_CHILD.format(spec=spec, batch=batch, cache=cache)],
                                  capture_output=True, text=True, env=env, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            rows[scenario] = json.loads(proc.stdout.strip().splitlines()[-1])
        cold, hot = rows["cold"], rows["warm"]
        print(f"{spec} b{batch} int8: cold first answer {cold['first']:.1f} s ({cold['served']}), warm "
              f"{hot['first']:.1f} s ({hot['served']}; {hot['first'] / cold['first']:.2f}x), "
              f"import + model {hot['import_and_model']:.1f} s; {'; '.join(hot['events'])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet,bert")
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--extra", action="store_true")
    parser.add_argument("--warm", action="store_true", help="cold vs warm first answer in fresh processes")
    parser.add_argument("--realistic", action="store_true", help="ResNet-50: smooth inputs, BatchNorm recalibrated")
    parser.add_argument("--bert-calibration", action="store_true",
                        help="BERT-base: 4 calibration batches of random ids (static int8) instead of none (dynamic)")
    parser.add_argument("--optimize", action="store_true", help="add cpuboost.optimize bf16 and int8 paths")
    opts = parser.parse_args()
    if opts.warm:
        return warm(opts.models.split(","))
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    chosen = workloads(opts.models.split(","), opts.realistic, opts.bert_calibration)
    for title, model, args, kwargs, calibration in chosen:
        print(f"\n== {title}", flush=True)

        def eager(*a, **k):
            with torch.no_grad():
                return model(*a, **k)
        paths, build_s = {"eager fp32": eager}, {"eager fp32": 0.0}
        paths["bf16 compiled"], build_s["bf16 compiled"] = bf16_compiled(model, args, kwargs)
        print(f"  bf16 compiled built in {build_s['bf16 compiled']:.0f} s", flush=True)
        label = "int8 static" if calibration else "int8 (auto)"
        print(f"  {label}:", flush=True)
        try:
            paths[label], build_s[label] = int8_path(model, args, kwargs, calibration)
        except Exception as exc:  # refused (outside int8's bound): say why, measure the rest
            print(f"    refused: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
        if opts.extra and calibration is None:
            print("  int8 torchao dynamic (scheme='dynamic_torchao'):", flush=True)
            paths["int8 torchao dyn"], build_s["int8 torchao dyn"] = int8_path(
                model, args, kwargs, None, scheme="dynamic_torchao")
            print("  int8 static, calibrated on the example input only:", flush=True)
            paths["int8 static(ex)"], build_s["int8 static(ex)"] = int8_path(
                model, args, kwargs, [(args, kwargs)], scheme="static")
        if opts.optimize:
            import cpuboost

            for dtype in ("bf16", "int8"):
                started = time.perf_counter()
                optimized = cpuboost.optimize(model, dtype=dtype, cache_dir="off",
                                              calibration=calibration if dtype == "int8" else None)
                with torch.no_grad():
                    optimized(*args, **kwargs)
                name = f"cpuboost {dtype}"
                paths[name], build_s[name] = optimized, time.perf_counter() - started
                graph = cpuboost.explain(optimized).graphs[-1]
                print(f"  {name} built in {build_s[name]:.0f} s, serves {graph.path} {graph.dtype}", flush=True)
                kept = [e for e in cpuboost.explain(optimized).events if "higher precision" in e or "kept" in e]
                for line in kept[:3]:
                    print("   ", line[:300], flush=True)
        reference = eager(*args, **kwargs)
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(opts.reps):
            for name, run in paths.items():
                started = time.perf_counter()
                run(*args, **kwargs)
                times[name].append(time.perf_counter() - started)
        base = times["bf16 compiled"]
        print(f"\n  {'path':<22}{'median ms':>10}{'min ms':>9}{'x eager':>9}{'x bf16':>8}{'paired':>8}"
              f"{'max_err':>9}{'cosine':>9}{'top1':>6}{'build s':>9}"
              + (f"{'x cpuboost bf16 (paired)':>26}" if "cpuboost bf16" in times else ""))
        for name, run in paths.items():
            t = times[name]
            acc = int8.accuracy(reference, run(*args, **kwargs))
            paired = statistics.median(b / a for a, b in zip(t, base))
            top1 = f"{acc['top1_agreement']:.2f}" if "top1_agreement" in acc else "-"
            print(f"  {name:<22}{statistics.median(t) * 1e3:>10.0f}{min(t) * 1e3:>9.0f}"
                  f"{statistics.median(times['eager fp32']) / statistics.median(t):>9.2f}"
                  f"{statistics.median(base) / statistics.median(t):>8.2f}{paired:>8.2f}"
                  f"{acc['max_err']:>9.4f}{acc['cosine']:>9.5f}{top1:>6}{build_s[name]:>9.0f}"
                  + (f"{statistics.median(b / a for a, b in zip(t, times['cpuboost bf16'])):>26.2f}"
                     if "cpuboost bf16" in times else ""), flush=True)


if __name__ == "__main__":
    main()
