"""Peak resident memory each inference path adds above the loaded model: BERT-base, seq 128, batch 1.

    python benchmarks/memory.py                      # all four paths, each in a fresh subprocess
    python benchmarks/memory.py --paths eager_fp32,cpuboost_bf16 --calls 3 --json mem.json
    python benchmarks/memory.py --one cpuboost_bf16   # the worker: one path, JSON on stdout

Each path runs in its own fresh process: build ``BertModel(BertConfig())`` (random weights, seeded), then
measure the resident set (``VmRSS``) with the model loaded: the baseline. The peak counter (``VmHWM``) is
then reset by writing ``5`` to ``/proc/self/clear_refs`` (where the kernel refuses, a 2 ms sampler thread
reads VmRSS instead; the output says which was used). The path is built and called ``--calls`` times under
``torch.no_grad()``; reported are

- **peak added**: VmHWM (or the sampled maximum) minus the baseline, the number a memory budget must cover;
- **retained**: VmRSS after the calls minus the baseline (graphs, copies of weights, caches kept alive).

Paths: ``eager_fp32`` (the model as is), ``eager_bf16`` (under ``torch.autocast("cpu", torch.bfloat16)``),
``hand_compile`` (``torch.compile`` with ``torch._inductor.config.freezing = True`` under autocast bf16),
``cpuboost_bf16`` (``cpuboost.optimize(model, dtype="bf16")`` with its persistent cache in an empty folder: a
cold start that also writes its artifacts), ``cpuboost_bf16_nocache`` (the same with ``cache_dir="off"``) and
``cpuboost_bf16_blocking`` (cache on, ``build="blocking"``: every rung raced inside the first call; BERT-base,
above ``core.raceon.RACE_ON_MAX_BYTES``, gets that by default too). The ``cpuboost_*`` paths are measured once a
race their first call left running in the background (``build="auto"``, smaller text models) has finished and a
call has settled it, so the peak covers every build and the retained the graph that serves. Memory of Inductor's
compile worker processes is not in these numbers (they are other processes); the import of Inductor itself is.
The target is cpuboost bf16 (cache on) peak added and retained <= 1.25x the hand compile's.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

PATHS = ("eager_fp32", "eager_bf16", "hand_compile", "cpuboost_bf16", "cpuboost_bf16_nocache", "cpuboost_bf16_blocking")
LABELS = {"eager_fp32": "eager fp32", "eager_bf16": "eager autocast bf16",
          "hand_compile": "hand compile (freezing + autocast bf16)", "cpuboost_bf16": "cpuboost bf16, cache on",
          "cpuboost_bf16_nocache": "cpuboost bf16, cache off",
          "cpuboost_bf16_blocking": "cpuboost bf16, cache on, build=blocking"}
TARGET = 1.25


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process in bytes."""
    with open("/proc/self/status") as f:
        text = f.read()
    return {key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024
            for key in ("VmRSS", "VmHWM")}


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    s = _status()
    return s["VmHWM"] <= s["VmRSS"] + (4 << 20)


class _Sampler(threading.Thread):
    """Reads VmRSS every ``interval`` seconds and keeps the maximum (a cross-check, or the fallback)."""

    def __init__(self, interval: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _status()["VmRSS"])
            time.sleep(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, _status()["VmRSS"])
        return self.peak


def worker(path: str, calls: int, seq: int) -> dict:
    import gc

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig()
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(1, seq, dtype=torch.long)}
    gc.collect()
    baseline = _status()["VmRSS"]
    exact = _reset_peak()
    sampler = _Sampler()
    sampler.start()
    start = time.perf_counter()
    first_call_s: float | None = None
    served = None

    if path == "eager_fp32":
        def fn() -> Any:
            return model(**inputs)
    elif path == "eager_bf16":
        def fn() -> Any:
            with torch.autocast("cpu", torch.bfloat16):
                return model(**inputs)
    elif path == "hand_compile":
        import torch._inductor.config

        torch._inductor.config.freezing = True
        compiled = torch.compile(model)

        def fn() -> Any:
            with torch.autocast("cpu", torch.bfloat16):
                return compiled(**inputs)
    elif path.startswith("cpuboost_bf16"):
        import cpuboost

        cache = "off" if path == "cpuboost_bf16_nocache" else os.environ["MEMORY_BENCH_CACHE"]
        build = "blocking" if path == "cpuboost_bf16_blocking" else "auto"
        optimized = cpuboost.optimize(model, dtype="bf16", cache_dir=cache, build=build)

        def fn() -> Any:
            return optimized(**inputs)
    else:
        raise SystemExit(f"unknown path {path!r}; choose from {', '.join(PATHS)}")

    with torch.no_grad():
        for i in range(calls):
            out = fn()
            if i == 0:
                first_call_s = time.perf_counter() - start
            del out
        if path.startswith("cpuboost"):  # the race of the other rungs (build="auto") ends, and one call settles it
            optimized.wait_for_builds()
            fn()
    gc.collect()
    sampled_peak = sampler.stop()
    after = _status()
    if path.startswith("cpuboost"):
        graphs = cpuboost.explain(optimized).graphs
        served = graphs[-1].path if graphs else None
    peak = after["VmHWM"] if exact else sampled_peak
    mib = 1 << 20
    return {"path": path, "baseline_mib": baseline / mib, "peak_added_mib": (peak - baseline) / mib,
            "sampled_peak_added_mib": (sampled_peak - baseline) / mib,
            "retained_mib": (after["VmRSS"] - baseline) / mib, "peak_method": "VmHWM after clear_refs"
            if exact else "VmRSS sampled every 2 ms", "first_call_s": first_call_s, "calls": calls,
            "served": served, "threads": torch.get_num_threads()}


def run_child(path: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mem-{path}-") as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", path, "--json", out, "--calls", str(args.calls),
               "--seq", str(args.seq)]
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"), PYTHONWARNINGS="ignore",
                   MEMORY_BENCH_CACHE=os.path.join(tmp, "cpuboost"))
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                                  check=False)
        except subprocess.TimeoutExpired:
            return {"path": path, "failure": f"timeout after {args.timeout:.0f} s"}
        if proc.returncode != 0 or not os.path.exists(out):
            tail = [line for line in (proc.stderr or "").splitlines() if line.strip()][-3:]
            return {"path": path, "failure": f"exit {proc.returncode}: {' | '.join(tail)[:400]}"}
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {', '.join(PATHS)}")
    parser.add_argument("--calls", type=int, default=3, help="calls per path after loading (default 3)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per path (default 1200)")
    parser.add_argument("--json", help="write the results here (with --one: '-' = stdout)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        from cpuboost.bench.results import emit_json

        emit_json(worker(args.one, args.calls, args.seq), args.json)
        return 0

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise SystemExit(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    repro = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), "benchmarks/memory.py", *sys.argv[1:]])
    print(f"reproduce: {repro}")
    print(f"BERT-base (BertModel(BertConfig())), seq {args.seq}, batch 1, {args.calls} calls per path, each path in a "
          f"fresh process; load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for path in paths:
        print(f"  {path} ...", end=" ", flush=True)
        res = run_child(path, args)
        results.append(res)
        print(res.get("failure") or f"peak +{res['peak_added_mib']:.0f} MiB", flush=True)
    print()
    print(f"{'path':42} {'baseline':>9} {'peak added':>11} {'(sampled)':>10} {'retained':>9} {'first call':>11}")
    for r in results:
        if r.get("failure"):
            print(f"{LABELS[r['path']]:42} FAILED: {r['failure']}")
            continue
        label = LABELS[r["path"]] + (f" [{r['served']}]" if r.get("served") else "")
        print(f"{label:42} {r['baseline_mib']:7.0f}Mi {r['peak_added_mib']:9.0f}Mi "
              f"{r['sampled_peak_added_mib']:8.0f}Mi {r['retained_mib']:7.0f}Mi {r['first_call_s']:10.1f}s")
    methods = {r["peak_method"] for r in results if not r.get("failure")}
    print(f"peak measured as: {', '.join(sorted(methods))}; baseline = VmRSS with the model loaded")
    by = {r["path"]: r for r in results if not r.get("failure")}
    verdict = None
    for mine in ("cpuboost_bf16", "cpuboost_bf16_nocache", "cpuboost_bf16_blocking"):
        if mine not in by or "hand_compile" not in by:
            continue
        ratio = by[mine]["peak_added_mib"] / max(by["hand_compile"]["peak_added_mib"], 1e-9)
        kept = by[mine]["retained_mib"] / max(by["hand_compile"]["retained_mib"], 1e-9)
        met = ratio <= TARGET and kept <= TARGET
        verdict = met if mine == "cpuboost_bf16" else verdict
        print(f"{LABELS[mine]} / hand compile: peak added {ratio:.2f}x, retained {kept:.2f}x (target <= {TARGET}x "
              f"both: {'met' if met else 'NOT met'})")
    print(f"reproduce: {repro}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": repro, "results": results, "target_met": verdict}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
