"""Training-step benchmark behind the README's Training table: every path side by side, in one process.

    python benchmarks/training.py                      # ResNet-18 b8 224px + BERT (4x512) s128 b8, 20 steps
    python benchmarks/training.py resnet18 --steps 10  # one workload, fewer steps
    python benchmarks/training.py --compile            # add cpuboost bf16 with compile_training=True

Paths: eager fp32; eager torch.autocast bf16; cpuboost fp32; cpuboost bf16 (and compiled). Each path trains
its own copy of one initialisation on the same batches. Steps are interleaved (one step of every path per
round, the order rotated each round), so machine noise hits all paths alike. Speedups are the median (and
interquartile range) of per-round ratios to eager fp32's step in the same round; step times are medians
after the warm-up steps; the loss is the last step's. A micro-benchmark on a tiny MLP measures
cpuboost's own per-step cost (the wrapper, autocast entry, output casts, optimizer hooks).
"""
from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import cpuboost


# -- models (plain torch; no torchvision) ------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016): 7x7 stem, four stages of two basic blocks, global pool, linear head."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def resnet18_workload(batch: int, seed: int, steps: int) -> dict:
    """1000-way head; images are one of 10 fixed noisy patterns, a fresh batch each step (learnable, not memorised)."""
    torch.manual_seed(seed)
    model = ResNet18()
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 3, 224, 224, generator=gen)
    data = []
    for _ in range(steps):
        labels = torch.randint(0, 10, (batch,), generator=gen)
        data.append((patterns[labels] + 2.0 * torch.randn(batch, 3, 224, 224, generator=gen), labels))
    return {
        "name": f"ResNet-18 b{batch} 224px",
        "model": model,
        "optimizer": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4),
        "data": data,
        "loss": lambda net, batch_: F.cross_entropy(net(batch_[0]), batch_[1]),
    }


def bert_workload(batch: int, seed: int, steps: int, seq: int = 128) -> dict:
    """Sequence classification where the label is one token's parity; a fresh batch each step."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=2048,
                        num_labels=2)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).train()
    gen = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(steps):
        ids = torch.randint(1000, config.vocab_size, (batch, seq), generator=gen)
        data.append((ids, ids[:, 1] % 2))
    return {
        "name": f"BERT 4x512 s{seq} b{batch}",
        "model": model,
        "optimizer": lambda params: torch.optim.AdamW(params, lr=5e-5),
        "data": data,
        "loss": lambda net, batch_: net(input_ids=batch_[0], labels=batch_[1]).loss,
    }


WORKLOADS = {"resnet18": resnet18_workload, "bert": bert_workload}


# -- paths -------------------------------------------------------------------------------------------------
def _eager(autocast: torch.dtype | None) -> Callable:
    def build(model: nn.Module, make_opt: Callable) -> tuple[nn.Module, Any, Any]:
        ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else None
        return model, make_opt(model.parameters()), ctx
    return build


def _cpuboost(dtype: str, **options: Any) -> Callable:
    def build(model: nn.Module, make_opt: Callable) -> tuple[nn.Module, Any, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cpuboost.amp.CpuBoostPerformanceWarning)
            net, opt = cpuboost.optimize(model, make_opt(model.parameters()), dtype=dtype, **options)
        return net, opt, None
    return build


PATHS = {
    "eager fp32": _eager(None),
    "eager autocast bf16": _eager(torch.bfloat16),
    "cpuboost fp32": _cpuboost("fp32"),
    "cpuboost bf16": _cpuboost("bf16"),
}
COMPILED = {"cpuboost bf16 compiled": _cpuboost("bf16", compile_training=True)}


def _step(net: nn.Module, opt: Any, ctx: Any, loss_fn: Callable, batch: Any, index: int) -> float:
    torch.manual_seed(1000 + index)  # the same dropout masks on every path
    if ctx is None:
        loss = loss_fn(net, batch)
    else:
        with ctx():
            loss = loss_fn(net, batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def run_workload(wl: dict, paths: dict, steps: int, warmup: int) -> dict:
    """Train every path ``steps`` steps, interleaved; returns per-path step times and losses."""
    runs = {}
    for name, build in paths.items():
        started = time.perf_counter()
        runs[name] = build(copy.deepcopy(wl["model"]), wl["optimizer"])
        runs[name] += (time.perf_counter() - started,)
    times: dict[str, list[float]] = {n: [] for n in paths}
    losses: dict[str, list[float]] = {n: [] for n in paths}
    names = list(paths)
    for i in range(steps):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            net, opt, ctx, _ = runs[name]
            started = time.perf_counter()
            losses[name].append(_step(net, opt, ctx, wl["loss"], wl["data"][i % len(wl["data"])], i))
            times[name].append(time.perf_counter() - started)
        print(f"  step {i + 1}/{steps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names),
              file=sys.stderr, flush=True)
    base = times[names[0]][warmup:]
    out = {}
    for n in names:
        ratios = sorted(b / t for b, t in zip(base, times[n][warmup:]))  # same round: same machine load
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        out[n] = {"median_s": statistics.median(times[n][warmup:]), "first_s": times[n][0],
                  "speedup": statistics.median(ratios), "iqr": (q1, q3), "loss": losses[n][-1], "losses": losses[n]}
    return out


def overhead(steps: int = 500) -> dict:
    """cpuboost's own per-step cost: a tiny MLP where the math is nearly free, fused SGD on both sides.

    One thread, so other processes on a shared machine do not turn OpenMP waits into the measurement.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _overhead(steps)
    finally:
        torch.set_num_threads(threads)


def _overhead(steps: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    plain = copy.deepcopy(model)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, fused=True)
    net, opt = _cpuboost("fp32")(copy.deepcopy(model), lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9))[:2]
    times = {"eager": [], "cpuboost": []}
    for _ in range(steps):
        for name, (m, o) in (("eager", (plain, plain_opt)), ("cpuboost", (net, opt))):
            started = time.perf_counter()
            F.cross_entropy(m(x), y).backward()
            o.step()
            o.zero_grad()
            times[name].append(time.perf_counter() - started)
    return {k: statistics.median(v[20:]) for k, v in times.items()}


def table(name: str, result: dict) -> list[str]:
    base = result["eager fp32"]
    lines = [f"| {name} | step (median) | speedup vs eager fp32 (IQR) | loss after {len(base['losses'])} steps | "
             "loss vs eager fp32 |", "|---|---:|---:|---:|---:|"]
    for path, r in result.items():
        q1, q3 = r["iqr"]
        lines.append(f"| {path} | {r['median_s'] * 1e3:.0f} ms | {r['speedup']:.2f}x ({q1:.2f}-{q3:.2f}) | "
                     f"{r['loss']:.4f} | {100 * (r['loss'] / base['loss'] - 1):+.2f}% |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=[], help=f"any of {sorted(WORKLOADS)} (default: all)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per path (loss is the last one's)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="add cpuboost bf16 with compile_training=True")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {sorted(WORKLOADS)}")
    paths = {**PATHS, **(COMPILED if args.compile else {})}
    hw = cpuboost.machine.hardware.detect()
    print(f"# {hw.cpu_model}; {torch.get_num_threads()} threads; native bf16: {hw.native_bf16}; "
          f"torch {torch.__version__}")
    command = ["python", "benchmarks/training.py", *(sys.argv[1:] if argv is None else argv)]
    print("# reproduce: " + " ".join(shlex.quote(a) for a in command))
    for key in args.workloads or list(WORKLOADS):
        wl = WORKLOADS[key](args.batch, seed=0, steps=args.steps)
        print(f"\n## {wl['name']}: {args.steps} steps per path, median over steps {args.warmup + 1}-{args.steps}",
              flush=True)
        result = run_workload(wl, paths, args.steps, args.warmup)
        print("\n".join(table(wl["name"], result)), flush=True)
        bf16, fp32 = result["cpuboost bf16"]["loss"], result["cpuboost fp32"]["loss"]
        print(f"cpuboost bf16 vs cpuboost fp32 loss after {args.steps} steps: {100 * (bf16 / fp32 - 1):+.2f}%")
    cost = overhead()
    print(f"\n## cpuboost's own cost per training step (tiny MLP, fused SGD both sides, 1 thread): "
          f"eager {cost['eager'] * 1e6:.0f} us, cpuboost {cost['cpuboost'] * 1e6:.0f} us, "
          f"difference {(cost['cpuboost'] - cost['eager']) * 1e6:+.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
