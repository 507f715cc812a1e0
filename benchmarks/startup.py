"""Startup cost: time to first answer in a fresh process, cold cache, warm cache, and a loaded package.

Every scenario runs in its own subprocess (nothing imported or compiled in the parent), one after another:

  baseline  torch.compile(freezing, C++ wrapper): what cpuboost's Inductor rung costs today, no persistence
  cold      empty cache dir: key, AOTInductor compile into the store, decision written, first answer
  warm      same cache dir, a new process: key, decision read, graph loaded, verified, first answer
  load      load() of a package written from the cold build's graph: first answer, no compiling

Times per child: ``import`` (torch + cpuboost), ``model`` (build the model), ``first`` (from having the model
to holding the first answer: optimize/key/lookup/compile/load/verify), ``second`` (the next call),
``steady`` (best of 5). Each child's first answer is written as .npy so the parent can say whether warm and
load answer the same as cold.

With ``--api`` the children call ``cpuboost.optimize(model, dtype=..., cache_dir=...)``, ``cpuboost.save``
and ``cpuboost.load`` (once the runtime has them); without it they drive ``cpuboost.persist.store`` and
``cpuboost.persist.package`` directly, the way the runtime is meant to.

    python benchmarks/startup.py --models resnet50 bert --out benchmarks/results/startup.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("baseline", "cold", "warm", "load")


# -- child ------------------------------------------------------------------------------------------------
def _model(name: str):
    import torch

    torch.manual_seed(0)
    if name == "resnet50":
        from transformers import ResNetConfig, ResNetForImageClassification

        model = ResNetForImageClassification(ResNetConfig()).eval()
        return model, (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)),), {}
    if name == "bert":
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig()).eval()
        g = torch.Generator().manual_seed(1)
        return model, (), {"input_ids": torch.randint(0, 30000, (1, 128), generator=g),
                           "attention_mask": torch.ones(1, 128, dtype=torch.long)}
    if name == "tiny":
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
        return net, (torch.randn(1, 3, 32, 32),), {}
    raise SystemExit(f"unknown model {name}")


def _leaves(out):
    import torch
    from torch.utils import _pytree as pytree

    if isinstance(out, dict):  # ModelOutput and PackagedOutput alike
        return [v for v in out.values() if isinstance(v, torch.Tensor)]
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _direct_first(scenario: str, model, args, kwargs, dtype: str, cache: Path, package: Path) -> tuple:
    """The runtime's path, driven by hand: returns (callable, first output, notes)."""
    import torch

    from cpuboost.persist import package as pkg
    from cpuboost.persist import store as st

    notes: dict = {}
    if scenario == "load":
        loaded = pkg.load_package(package)
        return loaded, loaded(*args, **kwargs), notes
    if scenario == "baseline":
        import torch._inductor.config as inductor_config

        class PrecisionRunner(torch.nn.Module):  # as cpuboost's Inductor rung wraps the model
            def __init__(self, inner, low):
                super().__init__()
                self.inner, self.low = inner, low

            def forward(self, *a, **k):
                with torch.autocast("cpu", dtype=self.low):
                    return self.inner(*a, **k)

        compiled = torch.compile(PrecisionRunner(model, getattr(torch, {"bf16": "bfloat16"}.get(dtype, dtype))),
                                 dynamic=False)
        with inductor_config.patch(freezing=True, cpp_wrapper=True), torch.no_grad():
            out = compiled(*args, **kwargs)
        return compiled, out, notes
    store = st.DecisionStore(cache)
    begin = time.perf_counter()
    key = st.make_key(model, args, kwargs, {"dtype": dtype, "backend": "auto", "fusion": True})
    notes["key_s"] = round(time.perf_counter() - begin, 3)
    decision = store.get(key)
    fn = None
    if decision is not None and decision.get("rung") == "aoti":
        try:
            begin = time.perf_counter()
            fn = pkg.load_graph(store.artifact_dir(key) / decision["artifact"])
            notes["load_s"] = round(time.perf_counter() - begin, 3)
        except pkg.PackageFormatError as exc:  # evicted or damaged under us: rebuild
            notes["load_error"] = str(exc)
    reference = None
    with torch.no_grad():
        begin = time.perf_counter()
        reference = model(*args, **kwargs)  # the runtime verifies every graph it serves, warm ones too
        notes["eager_fp32_s"] = round(time.perf_counter() - begin, 3)
    if fn is None:
        begin = time.perf_counter()
        fn, file = pkg.compile_aoti(model, args, kwargs, dtype, workdir=store.artifact_dir(key), reference=reference)
        notes["compile_s"] = round(time.perf_counter() - begin, 3)
        store.put(key, {"rung": "aoti", "artifact": file.name, "dtype": dtype})
        notes["decision"] = "built"
    else:
        notes["decision"] = "from cache"
    out = fn(*args, **kwargs)
    err = max(((a.float() - b.float()).abs().max() / (b.float().abs().max() + 1e-12)).item()
              for a, b in zip(_leaves(out), _leaves(reference)))
    notes["rel_err_vs_fp32"] = round(err, 5)
    if scenario == "cold":  # the load scenario's package is packed from this graph (after the timing)
        notes["_after"] = lambda: pkg.pack_graphs([fn.path], package, {"model": type(model).__name__})
    return fn, out, notes


def _api_first(scenario: str, model, args, kwargs, dtype: str, cache: Path, package: Path) -> tuple:
    import cpuboost

    if scenario == "load":
        loaded = cpuboost.load(package)
        return loaded, loaded(*args, **kwargs), {}
    opt = cpuboost.optimize(model, dtype=dtype, cache_dir=str(cache) if scenario != "baseline" else "off")
    out = opt(*args, **kwargs)
    notes: dict = {}
    if scenario == "cold" and hasattr(cpuboost, "save"):  # the load scenario's package, written after the timing
        notes["_after"] = lambda: cpuboost.save(opt, package)
    return opt, out, notes


def child(ns: argparse.Namespace) -> None:
    begin = time.perf_counter()
    import torch

    import cpuboost  # noqa: F401

    imported = time.perf_counter()
    model, args, kwargs = _model(ns.model)
    built = time.perf_counter()
    first = _api_first if ns.api else _direct_first
    fn, out, notes = first(ns.scenario, model, args, kwargs, ns.dtype, Path(ns.cache), Path(ns.package))
    answered = time.perf_counter()
    with torch.no_grad():
        fn(*args, **kwargs)
        second = time.perf_counter()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            fn(*args, **kwargs)
            best = min(best, time.perf_counter() - t)
    after = notes.pop("_after", None)
    if after is not None:
        saving = time.perf_counter()
        after()
        notes["save_s"] = round(time.perf_counter() - saving, 2)
    import numpy as np

    for i, leaf in enumerate(_leaves(out)):
        np.save(Path(ns.work) / f"{ns.model}-{ns.scenario}-{i}.npy", leaf.detach().float().numpy())
    print("RESULT " + json.dumps({
        "model": ns.model, "scenario": ns.scenario, "import_s": round(imported - begin, 2),
        "model_s": round(built - imported, 2), "first_s": round(answered - built, 2),
        "second_ms": round((second - answered) * 1e3, 1), "steady_ms": round(best * 1e3, 1), **notes}))


# -- parent -----------------------------------------------------------------------------------------------
def run(models: list[str], scenarios: list[str], dtype: str, api: bool, work: Path, timeout: int) -> list[dict]:
    import numpy as np

    rows = []
    for name in models:
        cache, package = work / f"cache-{name}", work / f"package-{name}"
        for scenario in scenarios:
            cmd = [sys.executable, __file__, "--child", scenario, "--model", name, "--dtype", dtype,
                   "--cache", str(cache), "--package", str(package), "--work", str(work)] + (["--api"] if api else [])
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            begin = time.perf_counter()
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env)
            wall = time.perf_counter() - begin
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                rows.append({"model": name, "scenario": scenario, "error": (proc.stderr or proc.stdout)[-600:]})
                print(f"{name:9s} {scenario:8s} FAILED\n{rows[-1]['error']}", file=sys.stderr)
                continue
            row = json.loads(line[7:])
            row["process_s"] = round(wall, 2)
            if scenario in ("warm", "load"):
                same = []
                for i in range(8):
                    a, b = work / f"{name}-cold-{i}.npy", work / f"{name}-{scenario}-{i}.npy"
                    if a.exists() and b.exists():
                        same.append(bool(np.array_equal(np.load(a), np.load(b))))
                row["same_answer_as_cold"] = all(same) if same else None
            rows.append(row)
            print(f"{name:9s} {scenario:8s} first {row['first_s']:7.2f} s  second {row['second_ms']:8.1f} ms  "
                  f"steady {row['steady_ms']:8.1f} ms  process {wall:6.1f} s  "
                  + " ".join(f"{k}={v}" for k, v in row.items() if k.endswith(("_s", "_err_vs_fp32", "decision",
                                                                                "same_answer_as_cold"))
                             and k not in ("first_s", "process_s")), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "bert"])
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--api", action="store_true", help="use cpuboost.optimize/save/load instead of the modules")
    parser.add_argument("--work", help="folder for cache, packages and outputs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--child", choices=SCENARIOS, dest="scenario", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--package", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.scenario:
        child(ns)
        return
    work = Path(ns.work) if ns.work else Path(tempfile.mkdtemp(prefix="cpuboost-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = run(ns.models, ns.scenarios, ns.dtype, ns.api, work, ns.timeout)
    finally:
        if not ns.keep and not ns.work:
            shutil.rmtree(work, ignore_errors=True)
    meta = {"cpu": _cpu(), "cores": os.cpu_count(), "load_avg": os.getloadavg(), "api": ns.api, "dtype": ns.dtype}
    if ns.out:
        Path(ns.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(json.dumps(meta))


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
