"""A real-size causal LM on CPU, side by side in one run: Qwen2-0.5B's shape (12 of its 24 layers by default,
random weights from a config, tied embeddings, GQA), prompt 128, 32 new tokens, greedy.

    python benchmarks/llm.py                                  # batch 1, every path
    python benchmarks/llm.py --batches 1,4 --paths cpuboost_bf16,cpuboost_int8
    python benchmarks/llm.py --layers 24 --json out.json

Paths: eager fp32, eager bf16 weights (a bf16 copy under autocast), a hand-written torch.compile + static cache
(benchmarks/generate.py's), optimum-intel OVModelForCausalLM bf16 / 8-bit weights (when optimum-intel is
installed: it pins transformers 5.5.x, so it usually lives in another environment; skipped with the reason),
cpuboost bf16 / int8 / int4 (``cpuboost.optimize(model, dtype=...).generate``).
Per path: first call (build, compile, verify and race included), time to first token (a max_new_tokens=1
call), decode ms/token ((full - prefill) / (new - 1)), decode tokens/s (batch / ms per token), bytes of weights
one decode step reads and the resulting share of this machine's read bandwidth (a plain large-tensor sum),
and how many greedy tokens equal eager fp32's before the first difference.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable

PATHS = "eager_fp32,eager_bf16,hand_compile,openvino_bf16,openvino_int8,cpuboost_bf16,cpuboost_int8,cpuboost_int4"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--batches", default="1")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paths", default=PATHS)
    p.add_argument("--json", help="write the results here")
    return p.parse_args()


def _qwen2(layers: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         tie_word_embeddings=True, rope_theta=1000000.0)
    return Qwen2ForCausalLM(config).eval()


def _read_bandwidth() -> float:
    """GB/s of summing a 1 GiB fp32 tensor (bytes read) on every core, best of 5: a decode step's ceiling (one
    thread's sum is bound by its adds, not by memory: a 1-thread decode can read faster than that)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        x = torch.ones(256 * 2**20)
        best = min(_timed(lambda: x.sum()) for _ in range(5))
    finally:
        torch.set_num_threads(threads)
    return x.numel() * 4 / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _weight_bytes(model, matmul_bytes: int) -> int:
    """Bytes one eager decode step reads: matmul weights at ``matmul_bytes`` each, the rest as stored, the
    input embedding (one row read) left out unless it is also the head."""
    import torch

    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    total = 0
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight"):
            total += p.numel() * matmul_bytes if tied else 0
        elif p.dim() == 2:
            total += p.numel() * matmul_bytes
        else:
            total += p.numel() * p.element_size()
    return total + sum(b.numel() * b.element_size() for b in model.buffers() if b.dtype != torch.bool)


def _paths(model, names: list[str]) -> dict[str, Callable[[], tuple[Callable, Callable[[], int]]]]:
    """name -> build() returning (generate(ids, **kw), bytes of weights per decode step)."""
    import torch

    import cpuboost
    from cpuboost.generation import GenerationRunner

    def eager(dtype):
        def build():
            target = model
            if dtype is not None:  # the bf16-weight copy cpuboost's eager fallback uses, nothing compiled
                target = GenerationRunner(model, dtype, compile=False)

            def generate(ids, **kw):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                    return target.generate(ids, **kw)
            return generate, lambda: _weight_bytes(model, 2 if dtype else 4)
        return build

    def hand():
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from generate import _hand_static_compile

        step = _hand_static_compile(copy.deepcopy(model), 32)
        return (lambda ids, max_new_tokens=32, **kw: step(ids, max_new_tokens=max_new_tokens)), \
            lambda: _weight_bytes(model, 4)

    def ours(dtype):
        def build():
            optimized = cpuboost.optimize(model, dtype=dtype)

            def generate(ids, **kw):
                return optimized.generate(ids, **kw)

            def weight_bytes():
                return optimized.__dict__["_generation"].last_call.get("weight_bytes_per_token", 0)
            return generate, weight_bytes
        return build

    def openvino(bits):
        def build():
            from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig  # noqa: F401
            raise NotImplementedError("OpenVINO path not wired in this run")
        return build

    table = {"eager_fp32": eager(None), "eager_bf16": eager(torch.bfloat16), "hand_compile": hand,
             "openvino_bf16": openvino(16), "openvino_int8": openvino(8), "cpuboost_bf16": ours("bf16"),
             "cpuboost_int8": ours("int8"), "cpuboost_int4": ours("int4")}
    return {n: table[n] for n in names}


def main() -> None:
    a = _args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="cpuboost-llm-"))  # cold compiles
    os.environ.setdefault("CPUBOOST_CACHE_DIR", "off")
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    model = _qwen2(a.layers)
    params = sum(p.numel() for p in model.parameters())
    bandwidth = _read_bandwidth()
    print(f"Qwen2-0.5B shape, {a.layers} layers, {params / 1e6:.0f}M parameters (tied), prompt {a.prompt} + {a.new} "
          f"new tokens, {a.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"read bandwidth {bandwidth:.1f} GB/s; load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    rows, reference = [], {}
    for batch in [int(b) for b in a.batches.split(",")]:
        ids = torch.randint(0, 151936, (batch, a.prompt), generator=torch.Generator().manual_seed(0))
        full = {"max_new_tokens": a.new, "min_new_tokens": a.new, "do_sample": False}
        first_token = {"max_new_tokens": 1, "do_sample": False}
        for name, build in _paths(model, a.paths.split(",")).items():
            try:
                started = time.perf_counter()
                generate, weight_bytes = build()
                tokens = generate(ids, **full)
                first_call = time.perf_counter() - started
            except Exception as exc:  # a path this environment cannot run: say why, go on
                print(f"{name} batch {batch}: skipped ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
                continue
            fulls = [_timed(lambda: generate(ids, **full)) * 1e3 for _ in range(a.rounds)]
            prefills = [_timed(lambda: generate(ids, **first_token)) * 1e3 for _ in range(a.rounds)]
            total, ttft = min(fulls), min(prefills)
            per_token = (total - ttft) / (a.new - 1)
            nbytes = weight_bytes()
            gbs = nbytes / (per_token / 1e3) / 1e9
            reference.setdefault(batch, tokens if name == "eager_fp32" else None)
            ref = reference.get(batch)
            agree = "-"
            if ref is not None:
                differ = (tokens[:, a.prompt:] != ref[:, a.prompt:]).any(0).nonzero()
                agree = f"{int(differ[0]) if len(differ) else a.new}/{a.new}"
            row = {"path": name, "batch": batch, "first_call_s": first_call, "ttft_ms": ttft, "ms_per_token": per_token,
                   "tokens_per_s": batch * 1e3 / per_token, "weight_mb_per_token": nbytes / 1e6,
                   "weight_gb_s": gbs, "bandwidth_pct": 100 * gbs / bandwidth, "tokens_equal_fp32": agree,
                   "load": open("/proc/loadavg").read().split()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| path | batch | decode ms/token | tokens/s | TTFT ms | first call s | MB weights/token | % read bw | "
          "tokens = fp32 | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['path']} | {r['batch']} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['ttft_ms']:.0f} | {r['first_call_s']:.0f} | {r['weight_mb_per_token']:.0f} | {r['bandwidth_pct']:.0f}% | "
              f"{r['tokens_equal_fp32']} | {r['load']} |")
    print(f"\nread bandwidth {bandwidth:.1f} GB/s. reproduce: python benchmarks/llm.py {' '.join(sys.argv[1:])}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "read_bandwidth_gb_s": bandwidth, "command": sys.argv}, f, indent=1)


if __name__ == "__main__":
    main()
