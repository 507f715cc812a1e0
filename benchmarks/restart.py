"""generate() in a fresh process, cold and warm, against a hand-written torch.compile: the Qwen2-0.5B shape of
benchmarks/llm.py (12 of 24 layers, random weights), prompt 128, 32 new tokens, greedy, batch 1.

Every row is its own subprocess with an empty Inductor cache, one after another:

  hand   the hand-written torch.compile + static cache (benchmarks/generate.py's), first call
  cold   cpuboost.optimize(model, dtype=...).generate with an empty cpuboost cache: build, verify, race, serve;
         the decode step's package then compiles in the background (its time is reported, and the process
         waits for it at exit)
  warm   a new process on the same cpuboost cache: the package loaded and verified, no compile

Per row: ``first`` (the first generate() call, model already built), ``second`` (the next call: cpuboost rows
share the cores with the compiled prefill's background build then), ``package``
(cold only: how long after the first call returned the package was published), the greedy tokens' agreement
with the cold row, and the process's peak RSS.

    python benchmarks/restart.py [--dtypes bf16,int8] [--layers 12]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time


def _child(a: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from llm import _qwen2, torch_randint

    torch.set_num_threads(a.threads)
    model = _qwen2(a.layers)
    ids = torch_randint(128, 1)
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    if a.row == "hand":
        from generate import _hand_static_compile

        generate = _hand_static_compile(model, 32)
    else:
        import cpuboost

        generate = cpuboost.optimize(model, dtype=a.dtype).generate
    began = time.perf_counter()
    tokens = generate(ids, **kw)
    first = time.perf_counter() - began
    began = time.perf_counter()
    generate(ids, **kw)
    second = time.perf_counter() - began
    waited = time.perf_counter()
    packaging = [t for t in threading.enumerate() if t.name == "cpuboost build: decode package"]
    for thread in packaging:
        thread.join()
    package = time.perf_counter() - waited + second if packaging else None
    print("ROW " + json.dumps({"row": a.row, "dtype": a.dtype, "first_s": first, "second_s": second,
                               "package_s": package, "tokens": tokens[0, -32:].tolist(),
                               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
          flush=True)


def _run(row: str, dtype: str, cache: str, a: argparse.Namespace) -> dict:
    env = dict(os.environ, CPUBOOST_CACHE_DIR=cache,
               TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="cpuboost-restart-inductor-"))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", row, "--dtype", dtype, "--layers", str(a.layers),
           "--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
    if line is None:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        return {"row": row, "dtype": dtype, "error": " | ".join(tail)}
    return json.loads(line[4:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bf16,int8")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=("hand", "cold", "warm"))
    p.add_argument("--dtype", default="bf16")
    a = p.parse_args()
    if a.child:
        a.row = a.child
        _child(a)
        return
    rows = [_run("hand", "bf16", "off", a)]
    print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
    for dtype in a.dtypes.split(","):
        cache = tempfile.mkdtemp(prefix="cpuboost-restart-cache-")
        for row in ("cold", "warm"):
            rows.append(_run(row, dtype, cache, a))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
    hand = rows[0].get("first_s")
    print("\n| row | dtype | first generate s | x hand compile's first | second s | package ready s | tokens = cold's "
          "| peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['row']} | {r['dtype']} | failed: {r['error'][:200]} | | | | | |")
            continue
        cold = next((c for c in rows if c["row"] == "cold" and c["dtype"] == r["dtype"] and "tokens" in c), None)
        same = "-" if r["row"] != "warm" or cold is None else str(r["tokens"] == cold["tokens"])
        ratio = f"{r['first_s'] / hand:.2f}x" if hand else "-"
        package = f"{r['package_s']:.0f}" if r.get("package_s") else "-"
        print(f"| {r['row']} | {r['dtype']} | {r['first_s']:.1f} | {ratio} | {r['second_s']:.2f} | {package} | "
              f"{same} | {r['peak_rss_mb']:.0f} |")
    print(f"\nreproduce: python benchmarks/restart.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
