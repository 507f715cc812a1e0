"""A tiny CNN trained with cpuboost + cpuboost.distributed; started by the distributed tests.

Run under torchrun / ``python -m cpuboost.launch``; rank 0 writes what the tests check to ``--out``.
The functions are also imported by the tests to train the single-process reference.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import cpuboost
import cpuboost.distributed as cbd

PER_RANK_BATCH = 4
RANKS = 2
STEPS_PER_EPOCH = 3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def make_dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    n = PER_RANK_BATCH * RANKS * STEPS_PER_EPOCH
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def make_training(dtype: str):
    net = make_model()
    return cpuboost.optimize(net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9), dtype=dtype)


def step(net, opt, x, y) -> None:
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()


def reference_batches(epoch: int):
    """The concatenation of what every rank sees at each step of ``epoch`` (for the 1-process reference)."""
    ds = make_dataset()
    shards = []
    for r in range(RANKS):
        sampler = DistributedSampler(ds, num_replicas=RANKS, rank=r, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
    for i in range(STEPS_PER_EPOCH):
        idx = [j for shard in shards for j in shard[i * PER_RANK_BATCH:(i + 1) * PER_RANK_BATCH]]
        yield ds.tensors[0][idx], ds.tensors[1][idx]


def train_reference(dtype: str, epochs: int) -> dict[str, torch.Tensor]:
    net, opt = make_training(dtype)
    for epoch in range(epochs):
        for x, y in reference_batches(epoch):
            step(net, opt, x, y)
    return {k: v.detach().clone() for k, v in cpuboost.unwrap(net).state_dict().items()}


def _fail(how: str) -> None:
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "hang":  # alive, sockets open, never joins the next collective
        time.sleep(3600)
    else:
        raise ValueError(f"planned failure on rank {cbd.rank()}")


def train(a: argparse.Namespace, dtype: str, gradient_dtype: str) -> dict:
    """One model trained data-parallel (or alone, without torchrun); what the tests check about it."""
    net, opt = make_training(dtype)
    start = 0
    if a.resume:
        ck = torch.load(a.resume, map_location="cpu")
        cbd.unwrap(net).load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start = ck["epoch"]
    loader = DataLoader(make_dataset(), batch_size=PER_RANK_BATCH, shuffle=True)
    net, opt, loader = cbd.prepare(net, opt, loader, gradient_dtype=gradient_dtype, timeout=a.timeout)
    cbd.set_epoch(loader, start)
    report = {"world_size": cbd.world_size(), "threads": torch.get_num_threads(),
              "is_ddp": isinstance(net, nn.parallel.DistributedDataParallel),
              "ddp_keys_prefixed": all(k.startswith("module.") for k in net.state_dict()),
              "unwrap_keys_plain": list(cbd.unwrap(net).state_dict()) == list(make_model().state_dict()),
              "unwrap_same_as_cpuboost": cbd.unwrap(net) is cpuboost.unwrap(net), "epochs_seen": []}
    n = 0
    for epoch in range(start, a.epochs):
        for i, (x, y) in enumerate(loader):
            if i == 0:
                report["epochs_seen"].append(loader.sampler.epoch if cbd.is_distributed() else epoch)
            if cbd.rank() == a.fail_rank and n == a.fail_step:
                _fail(a.fail_how)
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            if n == 0:
                grads = [q.grad for q in net.parameters()]
                report["grads_bf16_exact"] = all(torch.equal(g, g.bfloat16().float()) for g in grads)
            opt.step()
            opt.zero_grad()
            n += 1
        if a.save and epoch + 1 == a.save_after:
            if cbd.is_main_process():
                torch.save({"model": cbd.unwrap(net).state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1},
                           a.save)
            cbd.barrier()
    report["steps"] = n
    report["params"] = {k: v.tolist() for k, v in cbd.unwrap(net).state_dict().items()}
    return report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="rank 0 writes {variant: report} here as JSON")
    p.add_argument("--variants", default="fp32:fp32",
                   help="models to train one after the other, as dtype:gradient_dtype, comma-separated")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--save", help="rank 0 saves a checkpoint here after --save-after epochs (one variant)")
    p.add_argument("--save-after", type=int, default=1)
    p.add_argument("--resume", help="checkpoint to resume from (one variant)")
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--fail-step", type=int, default=2)
    p.add_argument("--fail-how", choices=("kill", "hang", "raise"), default="raise")
    a = p.parse_args()
    variants = a.variants.split(",")
    if (a.save or a.resume) and len(variants) > 1:
        p.error("--save/--resume take one variant")
    reports = {v: train(a, *v.split(":")) for v in variants}
    if cbd.is_main_process():
        with open(a.out, "w", encoding="utf-8") as fh:
            json.dump(reports, fh)


if __name__ == "__main__":
    main()
