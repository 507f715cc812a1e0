"""Training throughput: 1 process using every core vs several processes (DDP over gloo), same run.

    python benchmarks/scaling.py                      # 1 x all cores vs 2 x half, fp32, small ConvNet
    python benchmarks/scaling.py --configs 1x2,2x1,1x1 --dtype bf16 --reps 5

A configuration PxT is started with ``python -m cpuboost.launch --nproc-per-node P`` and
``OMP_NUM_THREADS=T`` (for the default configurations T is what the launcher itself picks: physical
cores / P; ranks are pinned to their cores when they fit), trains ``cpuboost.models.ConvNet`` on random 32x32 images
with cpuboost's training path + ``cpuboost.distributed.prepare``, and reports global samples/s (every
rank's samples, timed between barriers after warm-up). Configurations are interleaved, ``--reps`` times,
and the median is shown, so load from other work on the machine hits them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time


def worker(args: argparse.Namespace) -> None:
    """One rank: optimize, prepare, warm up, then time ``--steps`` steps of the global batch."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import cpuboost
    import cpuboost.distributed as cbd
    from cpuboost.bench.workloads import ConvNet

    world = cbd.world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by the {world} ranks")
    torch.manual_seed(0)
    model = ConvNet(width=args.width)
    net, opt = cpuboost.optimize(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                                 dtype=args.dtype)
    n = args.global_batch * (args.steps + args.warmup)
    data = TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=args.global_batch // world, shuffle=True, drop_last=True)
    net, opt, loader = cbd.prepare(net, opt, loader, gradient_dtype=args.gradient_dtype)
    loss_fn = torch.nn.CrossEntropyLoss()
    start = None
    for i, (x, y) in enumerate(loader):
        if i == args.warmup:
            cbd.barrier()
            start = time.perf_counter()
        loss_fn(net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    cbd.barrier()
    seconds = time.perf_counter() - start
    if cbd.is_main_process():
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"samples_per_s": args.global_batch * args.steps / seconds, "threads": torch.get_num_threads(),
                       "world": world}, fh)


def _launch(procs: int, threads: int, args: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, "-m", "cpuboost.launch", "--nproc-per-node", str(procs), "--standalone",
           os.path.abspath(__file__), "--worker", "--out", out, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--global-batch", str(args.global_batch), "--width", str(args.width),
           "--dtype", args.dtype, "--gradient-dtype", args.gradient_dtype]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.limit)
    if done.returncode != 0:
        raise SystemExit(f"{procs}-process run failed:\n{done.stderr[-4000:]}")
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


def _configs(spec: str) -> list[tuple[int, int]]:
    if spec == "auto":
        from cpuboost.distributed.launch import available_cpus, physical_cores

        cores = len(physical_cores(available_cpus()))
        return [(1, cores), (2, max(1, cores // 2))]
    try:
        pairs = [tuple(int(n) for n in item.lower().split("x")) for item in spec.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise SystemExit(f"--configs {spec!r}: expected PROCSxTHREADS items like 1x2,2x1")
    return pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="auto",
                   help="processes x threads, comma-separated, e.g. 1x2,2x1 (auto: 1xC,2x(C/2) for C physical cores)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions; the median is reported")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=64, help="samples per step over all ranks")
    p.add_argument("--width", type=int, default=32, help="ConvNet width (channels 1x-2x-4x)")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--gradient-dtype", default="fp32")
    p.add_argument("--limit", type=float, default=300, help="seconds before one run is abandoned")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    configs = _configs(args.configs)
    rates: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for procs, threads in configs:
                result = _launch(procs, threads, args, os.path.join(tmp, f"{procs}x{threads}-{rep}.json"))
                rates[(procs, threads)].append(result["samples_per_s"])
                print(f"rep {rep + 1}/{args.reps}: {procs} process(es) x {result['threads']} thread(s): "
                      f"{result['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
    base = statistics.median(rates[configs[0]])
    print(f"\nConvNet(width={args.width}) training, 32x32, global batch {args.global_batch}, dtype {args.dtype}, "
          f"gradients {args.gradient_dtype}, {args.steps} timed steps, median of {args.reps}")
    print("| processes x threads | samples/s (median) | all runs | vs first row |")
    print("|---|---|---|---|")
    for procs, threads in configs:
        med = statistics.median(rates[(procs, threads)])
        runs = ", ".join(f"{r:.0f}" for r in rates[(procs, threads)])
        print(f"| {procs} x {threads} | {med:.1f} | {runs} | {med / base:.2f}x |")
    command = [os.path.relpath(sys.executable), "benchmarks/scaling.py", *(sys.argv[1:] if argv is None else argv)]
    print("\ncommand: " + shlex.join(command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
