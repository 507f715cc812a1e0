"""Many input lengths, the way a server or a notebook calls a text model: total time and graphs built per path.

    python benchmarks/shapes.py [--layers 4] [--lengths 16,24,...] [--unseen 20,44,...] [--dtype bf16]

A BERT-style encoder (transformers BertModel from a config, random weights) is called once per length, first
with 12 lengths none of the paths has seen, then with later lengths never seen before. Per path: the total
time of the first-seen lengths (builds included), the time of the later lengths, the speed-up on those later
calls against eager fp32 (median of same-call ratios), graphs built, and the worst error against eager fp32.
Each path runs on its own copy of the model in this one process; eager fp32 runs beside every call.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import transformers

import cpuboost

LENGTHS = [16, 24, 32, 40, 48, 56, 64, 72, 88, 96, 112, 128]
UNSEEN = [20, 36, 52, 76, 100, 120]


def _inputs(length: int) -> dict:
    gen = torch.Generator().manual_seed(length)
    return {"input_ids": torch.randint(0, 30000, (1, length), generator=gen),
            "attention_mask": torch.ones(1, length, dtype=torch.long)}


def _paths(model: torch.nn.Module, dtype: str) -> dict:
    low = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]

    def hand(compiled):
        def run(**kw):
            with torch.autocast("cpu", dtype=low, enabled=low != torch.float32):
                return compiled(**kw)
        return run

    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # what a user writing it by hand sets
    return {
        "hand compile (freezing, dynamic after 2nd length)": hand(torch.compile(copy.deepcopy(model))),
        f"cpuboost {dtype}": cpuboost.optimize(copy.deepcopy(model), dtype=dtype, cache_dir="off"),
    }


def _err(out, ref) -> float:
    a, b = out.last_hidden_state.double(), ref.last_hidden_state.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--unseen", default=",".join(map(str, UNSEEN)))
    args = parser.parse_args()
    lengths, unseen = [int(n) for n in args.lengths.split(",")], [int(n) for n in args.unseen.split(",")]
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=args.layers)
    model = transformers.BertModel(config).eval()
    paths = _paths(model, args.dtype)
    print(f"# python benchmarks/shapes.py --layers {args.layers} --dtype {args.dtype}   (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {_load():.1f})")
    rows = []
    eager_first = sum(_timed(model, _inputs(n))[0] for n in lengths)
    for name, fn in paths.items():
        first, later, ratios, worst = 0.0, 0.0, [], 0.0
        with torch.no_grad():
            for n in lengths:
                seconds, out = _timed(fn, _inputs(n))
                first += seconds
                worst = max(worst, _err(out, model(**_inputs(n))))
            for n in unseen:
                seconds, out = _timed(fn, _inputs(n))
                eager_s, ref = _timed(model, _inputs(n))
                later += seconds
                ratios.append(eager_s / seconds)
                worst = max(worst, _err(out, ref))
        rows.append((name, first, later, statistics.median(ratios), _graphs(fn), worst))
    print(f"| path | {len(lengths)} first-seen lengths | {len(unseen)} later lengths | later vs eager fp32 | "
          "graphs built | worst error vs eager fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| eager fp32 | {eager_first:.2f} s | | 1.00x | 0 | 0 |")
    for name, first, later, ratio, graphs, worst in rows:
        print(f"| {name} | {first:.2f} s | {later:.2f} s | {ratio:.2f}x | {graphs} | {worst:.1e} |")


def _timed(fn, inputs: dict):
    with torch.no_grad():
        begin = time.perf_counter()
        out = fn(**inputs)
        return time.perf_counter() - begin, out


def _graphs(fn) -> str:
    try:
        graphs = cpuboost.explain(fn).graphs
    except cpuboost.CpuBoostError:
        return "(dynamo: per recompile)"
    return str(sum(1 for g in graphs if not (g.rungs and g.rungs[0].fate.startswith("served (dynamic"))))


def _load() -> float:
    try:
        import os

        return os.getloadavg()[0]
    except OSError:
        return float("nan")


if __name__ == "__main__":
    main()
