"""A real-size causal LM on CPU, side by side in one run: Qwen2-0.5B's shape (12 of its 24 layers by default,
random weights from a config, tied embeddings, GQA), prompt 128, 32 new tokens, greedy.

    python benchmarks/llm.py                                  # batch 1, every path
    python benchmarks/llm.py --batches 1,4 --paths cpuboost_bf16,cpuboost_int8
    python benchmarks/llm.py --layers 24 --json out.json
    python benchmarks/llm.py --prompts 128,1024 --paths eager_bf16,openvino_bf16,cpuboost_bf16

optimum-intel rows: optimum-intel pins transformers 5.5.x, so they run in their own environment (torch pinned in
every pip command: an unpinned torch pulls a CUDA build; PyPI's torchvision, which optimum-intel pulls, is a CUDA
build that fails to import beside CPU torch, so it goes):

    python3.11 -m venv .venv-ov && echo "torch==2.13.0" > .venv-ov/constraints.txt
    .venv-ov/bin/pip install -c .venv-ov/constraints.txt torch==2.13.0
    .venv-ov/bin/pip install -c .venv-ov/constraints.txt "optimum-intel[openvino]" wrapt torchao==0.18.0
    .venv-ov/bin/pip uninstall -y torchvision
    .venv-ov/bin/pip install --no-deps -e .
    .venv-ov/bin/python benchmarks/llm.py --paths eager_bf16,openvino_bf16,openvino_int8,cpuboost_bf16,cpuboost_int8

Paths: eager fp32, eager bf16 weights (a bf16 copy under autocast), a hand-written torch.compile + static cache
(benchmarks/generate.py's), optimum-intel OVModelForCausalLM bf16 / 8-bit weights (when optimum-intel is
installed: it pins transformers 5.5.x, so it usually lives in another environment; skipped with the reason),
cpuboost bf16 / int8 / int4 (``cpuboost.optimize(model, dtype=...).generate``).
Per path and prompt/batch shape: first call (the path's build on its first shape, then each shape's own
compiles, verification and race; cpuboost's compiled prefill then builds in the background, and its time is
printed apart: timing starts once it is done), time to first token (a max_new_tokens=1 call), decode ms/token ((full - prefill) / (new - 1)), decode tokens/s (batch / ms per token), bytes of weights
one decode step reads and the resulting share of this machine's read bandwidth (a plain large-tensor sum),
how many greedy tokens equal eager fp32's before the first difference, and the prefill rate: GFLOP/s =
2 * non-embedding matmul parameters (the LM head left out) * prompt * batch / TTFT (attention's own matmuls
left out too: a lower bound), beside the measured bf16 matmul peak (best of 5 2048^3 torch.mm on --threads).
The OpenVINO rows export the model (saved once with save_pretrained to a temporary folder) with
OVModelForCausalLM(export=True): their first call includes that export; their weight bytes are the IR's matmul
constants, floats at bf16's 2 bytes (the CPU plugin runs them in bf16), 8-bit weights and their scales as stored.
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
    p.add_argument("--prompts", default="128", help="comma list of prompt lengths, e.g. 128,1024")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--batches", default="1")
    p.add_argument("--rounds", type=int, default=3)
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


def _matmul_peak() -> float:
    """GFLOP/s of a 2048^3 bf16 torch.mm on the benchmark's threads, best of 5 after a warm-up: prefill's ceiling."""
    import torch

    x = torch.randn(2048, 2048).to(torch.bfloat16)
    x @ x
    best = min(_timed(lambda: torch.mm(x, x)) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _matmul_params(model) -> int:
    """Parameters of the matmuls every prompt token runs: 2-D weights less the embeddings and the LM head."""
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in skip)


def _openvino_weight_bytes(ov_model) -> int:
    """Bytes one decode step reads from an OpenVINO model's constants: a constant reached (through the weight
    decompression chain) only by a Gather is the input embedding and left out; float weights count at bf16's
    2 bytes (what the CPU plugin runs under INFERENCE_PRECISION_HINT=bf16), 8-bit weights and scales as stored."""
    passthrough = {"Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Unsqueeze"}

    def only_gathers(node, depth=0) -> bool:
        consumers = [t.get_node() for out in node.outputs() for t in out.get_target_inputs()]
        ends = []
        for c in consumers:
            kind = c.get_type_name()
            if kind in passthrough and depth < 6:
                ends.append(only_gathers(c, depth + 1))
            else:
                ends.append(kind == "Gather")
        return bool(ends) and all(ends)

    total = 0
    for op in ov_model.get_ops():
        if op.get_type_name() != "Constant" or op.get_byte_size() < 1024 or only_gathers(op):
            continue
        element = op.get_output_element_type(0)
        size = op.get_byte_size()
        total += size // element.size * 2 if element.is_real() and element.size > 2 else size
    return total


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


def _paths(model, names: list[str], threads: int) -> dict[str, Callable[[], tuple[Callable, Callable[[], int]]]]:
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
            generate.wait = optimized.wait_for_builds  # the compiled prefill builds in the background

            def weight_bytes():
                return optimized.__dict__["_generation"].last_call.get("weight_bytes_per_token", 0)
            return generate, weight_bytes
        return build

    saved: list[str] = []  # the model's folder, written once for both OpenVINO rows (outside their timing)
    if any(n.startswith("openvino") for n in names):
        try:
            import optimum.intel  # noqa: F401
        except ImportError:
            pass  # each OpenVINO row says so when it builds
        else:
            folder = tempfile.mkdtemp(prefix="cpuboost-llm-ov-")
            model.save_pretrained(folder)
            model.generation_config.save_pretrained(folder)
            saved.append(folder)

    def openvino(bits):
        def build():
            from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

            quantized = {"quantization_config": OVWeightQuantizationConfig(bits=8)} if bits == 8 else \
                {"load_in_8bit": False}  # no default 8-bit compression: bf16 weights at run time
            ov = OVModelForCausalLM.from_pretrained(
                saved[0], export=True, compile=True, **quantized,
                ov_config={"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY",
                           "INFERENCE_NUM_THREADS": str(threads), "CACHE_DIR": ""})

            def generate(ids, **kw):
                return ov.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            return generate, lambda: _openvino_weight_bytes(ov.model)
        return build

    table = {"eager_fp32": eager(None), "eager_bf16": eager(torch.bfloat16), "hand_compile": hand,
             "openvino_bf16": openvino(16), "openvino_int8": openvino(8), "cpuboost_bf16": ours("bf16"),
             "cpuboost_int8": ours("int8"), "cpuboost_int4": ours("int4")}
    return {n: table[n] for n in names}


def _first_calls(generate, shapes: list, new: int, weight_bytes) -> dict:
    """{(prompt, batch): (tokens, first call s, weight bytes a step read)}: each shape's first call (its build)
    before any timing. The bytes are read per shape: a weight-only path may serve another copy at some batches."""
    done = {}
    for prompt, batch in shapes:
        ids = torch_randint(prompt, batch)
        started = time.perf_counter()
        tokens = generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        done[prompt, batch] = tokens, time.perf_counter() - started, weight_bytes()
    return done


def _timings(paths: dict, shapes: list, new: int, rounds: int) -> dict:
    """{(path, prompt, batch): (best full-generate ms, best time-to-first-token ms)}, paths and shapes interleaved
    in every round: the machine's bandwidth drifts by a quarter over minutes here, and a ratio between paths (int8
    against bf16) or shapes (batch 4 against batch 1) must not be a ratio between two minutes."""
    best: dict = {(name, *shape): [float("inf"), float("inf")] for name in paths for shape in shapes}
    for _ in range(rounds):
        for name, generate in paths.items():
            for prompt, batch in shapes:
                ids = torch_randint(prompt, batch)
                full = _timed(lambda: generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)) * 1e3
                ttft = _timed(lambda: generate(ids, max_new_tokens=1, do_sample=False)) * 1e3
                key = (name, prompt, batch)
                best[key] = [min(best[key][0], full), min(best[key][1], ttft)]
    return best


def torch_randint(prompt: int, batch: int):
    import torch

    return torch.randint(0, 151936, (batch, prompt), generator=torch.Generator().manual_seed(prompt))


def main() -> None:
    a = _args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="cpuboost-llm-"))  # cold compiles
    os.environ.setdefault("CPUBOOST_CACHE_DIR", "off")
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    model = _qwen2(a.layers)
    params, matmul_params = sum(p.numel() for p in model.parameters()), _matmul_params(model)
    prompts, batches = [int(n) for n in a.prompts.split(",")], [int(b) for b in a.batches.split(",")]
    bandwidth, peak = _read_bandwidth(), _matmul_peak()
    print(f"Qwen2-0.5B shape, {a.layers} layers, {params / 1e6:.0f}M parameters (tied, {matmul_params / 1e6:.0f}M in "
          f"per-token matmuls), prompts {a.prompts} + {a.new} new tokens, {a.threads} threads, torch "
          f"{torch.__version__}, transformers {transformers.__version__}; read bandwidth {bandwidth:.1f} GB/s, bf16 "
          f"matmul peak {peak:.0f} GFLOP/s; load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    shapes = [(prompt, batch) for prompt in prompts for batch in batches]
    built = {}  # every path built and its shapes' first calls made before any timing
    for name, build in _paths(model, a.paths.split(","), a.threads).items():
        started = time.perf_counter()
        try:  # built once, then every prompt and batch: a new shape's first call is that shape's build
            generate, weight_bytes = build()
            build_s = time.perf_counter() - started
            firsts = _first_calls(generate, shapes, a.new, weight_bytes)
            waited = time.perf_counter()
            if hasattr(generate, "wait"):  # no timing while a background build shares the cores
                generate.wait()
                print(f"{name}: background builds (the compiled prefill) done {time.perf_counter() - waited:.0f} s "
                      "after the first calls", flush=True)
        except Exception as exc:  # a path this environment cannot run: say why, go on
            print(f"{name}: skipped ({type(exc).__name__}: {str(exc)[:160]})", flush=True)
            continue
        built[name] = generate, firsts, build_s
        print(f"{name}: built, first calls {sum(f[1] for f in firsts.values()) + build_s:.0f} s", flush=True)
    timings = _timings({name: g for name, (g, _, _) in built.items()}, shapes, a.new, a.rounds)
    rows, reference = [], {}
    for name, (generate, firsts, build_s) in built.items():
        for prompt, batch in shapes:
            (tokens, first_call, nbytes), (total, ttft) = firsts[prompt, batch], timings[name, prompt, batch]
            first_call, build_s = first_call + build_s, 0.0
            per_token = (total - ttft) / (a.new - 1)
            gbs = nbytes / (per_token / 1e3) / 1e9
            prefill = 2 * matmul_params * prompt * batch / (ttft / 1e3) / 1e9
            if name == "eager_fp32":
                reference[prompt, batch] = tokens
            agree = "-"
            if (prompt, batch) in reference:
                ref = reference[prompt, batch]
                differ = (tokens[:, prompt:] != ref[:, prompt:]).any(0).nonzero()
                agree = f"{int(differ[0]) if len(differ) else a.new}/{a.new}"
            row = {"path": name, "prompt": prompt, "batch": batch, "first_call_s": first_call, "ttft_ms": ttft,
                   "prefill_gflop_s": prefill, "prefill_peak_pct": 100 * prefill / peak,
                   "ms_per_token": per_token, "tokens_per_s": batch * 1e3 / per_token,
                   "weight_mb_per_token": nbytes / 1e6, "weight_gb_s": gbs, "bandwidth_pct": 100 * gbs / bandwidth,
                   "tokens_equal_fp32": agree, "load": open("/proc/loadavg").read().split()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| path | prompt | batch | decode ms/token | tokens/s | MB weights/token | % read bw | TTFT ms | "
          "prefill GFLOP/s (% peak) | first call s | tokens = fp32 | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["prompt"], r["batch"])):
        print(f"| {r['path']} | {r['prompt']} | {r['batch']} | {r['ms_per_token']:.1f} | {r['tokens_per_s']:.1f} | "
              f"{r['weight_mb_per_token']:.0f} | {r['bandwidth_pct']:.0f}% | {r['ttft_ms']:.0f} | "
              f"{r['prefill_gflop_s']:.0f} ({r['prefill_peak_pct']:.0f}%) | {r['first_call_s']:.0f} | "
              f"{r['tokens_equal_fp32']} | {r['load']} |")
    for r in rows:
        one = next((o for o in rows if o["path"] == r["path"] and o["prompt"] == r["prompt"] and o["batch"] == 1), None)
        if one is not None and r["batch"] > 1:
            print(f"{r['path']} prompt {r['prompt']}: batch {r['batch']} decode throughput "
                  f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x batch 1's (rounds interleaved)")
    print(f"\nread bandwidth {bandwidth:.1f} GB/s, bf16 matmul peak {peak:.0f} GFLOP/s. "
          f"reproduce: python benchmarks/llm.py {' '.join(sys.argv[1:])}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "read_bandwidth_gb_s": bandwidth, "bf16_matmul_peak_gflop_s": peak,
                       "command": sys.argv}, f, indent=1)


if __name__ == "__main__":
    main()
