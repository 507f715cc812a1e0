"""Training throughput: 1 process using every core vs several processes (DDP over gloo), same run.

    python benchmarks/scaling.py                      # 1 x all cores vs 2 x half, fp32, small ConvNet
    python benchmarks/scaling.py --procs 1,2,4 --dtype bf16 --reps 5

Each configuration is started with ``python -m cpuboost.launch --nproc-per-node P`` (threads per rank =
physical cores / P, ranks pinned to their cores), trains ``cpuboost.models.ConvNet`` on random 32x32 images
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
    from cpuboost.models import ConvNet

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


def _launch(procs: int, args: argparse.Namespace, out: str) -> dict:
    cmd = [sys.executable, "-m", "cpuboost.launch", "--nproc-per-node", str(procs), "--standalone",
           os.path.abspath(__file__), "--worker", "--out", out, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--global-batch", str(args.global_batch), "--width", str(args.width),
           "--dtype", args.dtype, "--gradient-dtype", args.gradient_dtype]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # let the launcher choose
    env.setdefault("PYTHONWARNINGS", "ignore")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.limit)
    if done.returncode != 0:
        raise SystemExit(f"{procs}-process run failed:\n{done.stderr[-4000:]}")
    with open(out, encoding="utf-8") as fh:
        return json.load(fh)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2", help="processes per configuration, comma-separated (default 1,2)")
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
    procs = [int(x) for x in args.procs.split(",")]
    rates: dict[int, list[float]] = {n: [] for n in procs}
    threads: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for n in procs:
                result = _launch(n, args, os.path.join(tmp, f"{n}-{rep}.json"))
                rates[n].append(result["samples_per_s"])
                threads[n] = result["threads"]
                print(f"rep {rep + 1}/{args.reps}: {n} process(es) x {threads[n]} thread(s): "
                      f"{result['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
    base = statistics.median(rates[procs[0]])
    print(f"\nConvNet(width={args.width}) training, 32x32, global batch {args.global_batch}, dtype {args.dtype}, "
          f"gradients {args.gradient_dtype}, {args.steps} timed steps, median of {args.reps}")
    print("| processes x threads | samples/s (median) | all runs | vs first row |")
    print("|---|---|---|---|")
    for n in procs:
        med = statistics.median(rates[n])
        runs = ", ".join(f"{r:.0f}" for r in rates[n])
        print(f"| {n} x {threads[n]} | {med:.1f} | {runs} | {med / base:.2f}x |")
    print("\ncommand: " + shlex.join([os.path.relpath(sys.executable), "benchmarks/scaling.py", *(argv or sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
