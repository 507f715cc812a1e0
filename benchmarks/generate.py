"""generate() on a Llama-style causal LM: eager fp32, eager autocast bf16, a hand-written static cache +
torch.compile loop, and cpuboost's GenerationRunner (fp32, bf16, and bf16 without compile), interleaved.

    python benchmarks/generate.py                      # 6 layers, hidden 512, 64-token prompt, 32 new tokens
    python benchmarks/generate.py --rounds 8 --json out.json --plot out.png
    python benchmarks/generate.py --paths eager_fp32,autocast_bf16,runner_bf16

Per path: the first call (building and compiling included, in a fresh Inductor cache unless --warm-cache),
then rounds of interleaved calls, best and median per path: a full call (prompt + N greedy tokens), the
prefill (max_new_tokens=1), ms per token after the prefill, tokens/s, and the weight bytes a decode token
reads divided by its time (GB/s) next to this machine's copy bandwidth. Timings on a shared machine are
noisy: compare paths as same-round ratios, as the summary does.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paths", default="eager_fp32,autocast_bf16,static_compile_bf16,runner_fp32,runner_bf16,"
                                       "runner_bf16_eager")
    p.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk cache (first calls faster)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a bar chart here (needs matplotlib)")
    return p.parse_args()


def _model(a: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=a.vocab,
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def _hand_static_compile(model, new_tokens: int) -> Callable:
    """What a user writes by hand: a StaticCache, eager prefill, torch.compile'd decode, autocast bf16."""
    import torch
    from transformers import StaticCache

    step = torch.compile(model.forward, dynamic=False)
    caches: dict[tuple, Any] = {}

    def generate(ids, max_new_tokens: int = new_tokens, **_):
        key = (ids.shape[0], ids.shape[1] + max_new_tokens)
        if key not in caches:
            caches[key] = StaticCache(config=model.config, max_cache_len=key[1])
        cache = caches[key]
        cache.reset()
        tokens = [ids]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, cache=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            for i in range(max_new_tokens - 1):
                pos = torch.tensor([[ids.shape[1] + i]])
                out = step(input_ids=nxt, cache=cache, position_ids=pos, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(nxt)
        return torch.cat(tokens, dim=1)

    return generate


def _paths(model, a: argparse.Namespace) -> dict[str, tuple[Callable[[], Callable], int]]:
    """name -> (build the generate callable, bytes per matmul-weight element its decode step reads)."""
    import torch

    from cpuboost.generation import GenerationRunner

    def eager(dtype):
        def build():
            def generate(ids, **kw):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                    return model.generate(ids, **kw)
            return generate
        return build

    def runner(dtype, compile=True):
        return lambda: GenerationRunner(model, dtype, lambda text: print("   ", text, flush=True),
                                        compile=compile).generate

    all_paths = {
        "eager_fp32": (eager(None), 4),
        "autocast_bf16": (eager(torch.bfloat16), 4),  # reads fp32 weights and re-casts them every step
        "static_compile_bf16": (lambda: _hand_static_compile(model, a.new), 4),
        "runner_fp32": (runner(torch.float32), 4),
        "runner_bf16": (runner(torch.bfloat16), 2),
        "runner_bf16_eager": (runner(torch.bfloat16, compile=False), 2),
    }
    return {name: all_paths[name] for name in a.paths.split(",")}


def _copy_bandwidth() -> float:
    """GB/s of a 256 MiB fp32 tensor copy (bytes read + written), best of 5."""
    import torch

    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * 4 / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    a = _args()
    if not a.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cpuboost-genbench-")
    import torch

    torch.set_num_threads(a.threads)
    model = _model(a)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    ids = torch.randint(0, a.vocab, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    full = {"max_new_tokens": a.new, "min_new_tokens": a.new, "do_sample": False}
    prefill = {"max_new_tokens": 1, "do_sample": False}
    print(f"Llama {a.layers} layers, hidden {a.hidden}, {matmul / 1e6:.1f}M matmul weights, prompt {a.prompt} + "
          f"{a.new} new tokens, {a.threads} threads, torch {torch.__version__}", flush=True)
    bandwidth = _copy_bandwidth()
    print(f"copy bandwidth {bandwidth:.1f} GB/s", flush=True)

    fns, first, tokens = {}, {}, {}
    for name, (build, _) in _paths(model, a).items():
        print(f"first call: {name}", flush=True)
        started = time.perf_counter()
        fns[name] = build()
        tokens[name] = fns[name](ids, **full)
        first[name] = time.perf_counter() - started
        print(f"    {first[name]:.1f} s", flush=True)
    totals: dict[str, list[float]] = {n: [] for n in fns}
    prefills: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(a.rounds):
        for name, fn in fns.items():
            totals[name].append(_timed(lambda fn=fn: fn(ids, **full)) * 1e3)
            prefills[name].append(_timed(lambda fn=fn: fn(ids, **prefill)) * 1e3)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{n} {totals[n][-1]:.0f}" for n in fns), flush=True)

    bytes_per = {name: per for name, (_, per) in _paths(model, a).items()}
    rows = []
    for name in fns:
        total, pre = min(totals[name]), min(prefills[name])
        per_token = (total - pre) / (a.new - 1)
        gbs = matmul * bytes_per[name] / (per_token / 1e3) / 1e9
        ratios = {base: statistics.median(b / t for b, t in zip(totals[base], totals[name]))
                  for base in ("eager_fp32", "autocast_bf16") if base in totals}
        same = sum(int(x == y) for x, y in zip(tokens[name][0, a.prompt:].tolist(),
                                               tokens.get("eager_fp32", tokens[name])[0, a.prompt:].tolist()))
        rows.append({"path": name, "first_call_s": first[name], "total_ms": total,
                     "total_ms_median": statistics.median(totals[name]), "prefill_ms": pre,
                     "ms_per_token": per_token, "tokens_per_s": a.new / (total / 1e3), "weight_gb_s": gbs,
                     "bandwidth_fraction": gbs / bandwidth, "speedup_vs": ratios,
                     "tokens_equal_fp32": f"{same}/{a.new}"})
    print("\n| path | first call s | total ms (best / median) | prefill ms | ms/token | tok/s | weights GB/s "
          "(% of copy bw) | vs eager fp32 | vs autocast | tokens = fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        vs = row["speedup_vs"]
        print(f"| {row['path']} | {row['first_call_s']:.1f} | {row['total_ms']:.0f} / {row['total_ms_median']:.0f} | "
              f"{row['prefill_ms']:.0f} | {row['ms_per_token']:.1f} | {row['tokens_per_s']:.0f} | "
              f"{row['weight_gb_s']:.1f} ({100 * row['bandwidth_fraction']:.0f}%) | "
              f"{vs.get('eager_fp32', float('nan')):.2f}x | {vs.get('autocast_bf16', float('nan')):.2f}x | "
              f"{row['tokens_equal_fp32']} |")
    command = "python benchmarks/generate.py " + " ".join(sys.argv[1:])
    print(f"\nspeed-ups: median of same-round ratios of full calls. copy bandwidth {bandwidth:.1f} GB/s.")
    print(f"reproduce: {command.strip()}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "copy_bandwidth_gb_s": bandwidth, "rows": rows,
                       "totals_ms": totals, "prefills_ms": prefills, "command": command}, fh, indent=1)
    if a.plot:
        _plot(rows, a.plot)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [r["path"] for r in rows]
    pre = [r["prefill_ms"] for r in rows]
    dec = [r["total_ms"] - r["prefill_ms"] for r in rows]
    ax.barh(names, pre, label="prefill")
    ax.barh(names, dec, left=pre, label="decode")
    ax.set_xlabel("ms per generate() (best round)")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
