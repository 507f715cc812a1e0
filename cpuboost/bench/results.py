"""Benchmark results: per-path timings and the views people read (text table, notebook HTML, JSON)."""
from __future__ import annotations

import dataclasses
import html
import json
import math
import statistics
import sys
from typing import Any, Optional

SCHEMA = "cpuboost.bench/1"
BASELINE = "eager_fp32"


@dataclasses.dataclass
class PathResult:
    name: str
    label: str
    dtype: str
    status: str = "ok"  # "ok" | "skipped" | "failed"
    reason: str = ""  # why skipped/failed, or a numerics warning
    note: str = ""  # what the path actually ran (e.g. cpuboost's chosen graph)
    build_s: float = 0.0  # first call, including compilation and verification
    max_rel_err: Optional[float] = None  # vs eager fp32, max|diff| / max|eager|
    tolerance: Optional[float] = None
    samples_s: list[float] = dataclasses.field(default_factory=list)  # seconds per call, one per round
    accuracy: dict = dataclasses.field(default_factory=dict)  # int8: max_err, cosine, top1_agreement vs eager

    @property
    def timed(self) -> bool:
        return self.status == "ok" and bool(self.samples_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s) if self.samples_s else math.nan

    @property
    def quartiles_s(self) -> tuple[float, float]:
        if len(self.samples_s) < 2:
            return self.median_s, self.median_s
        q = statistics.quantiles(self.samples_s, n=4, method="inclusive")
        return q[0], q[2]

    @property
    def spread(self) -> float:
        """Half the interquartile range, relative to the median (0.02 reads as +-2%)."""
        lo, hi = self.quartiles_s
        return (hi - lo) / 2 / self.median_s if self.timed else math.nan


@dataclasses.dataclass
class BenchResult:
    workload: str
    description: str
    batch: int
    flops: int  # one call, eager fp32
    peaks: dict[str, float]  # dtype -> GEMM GFLOP/s measured in the same process
    paths: list[PathResult]
    rounds: int
    machine: dict[str, Any]
    startup_s: float = 0.0  # torch.compile/Inductor's once-per-process start, paid before any timed build

    def path(self, name: str) -> Optional[PathResult]:
        return next((p for p in self.paths if p.name == name), None)

    def ratios(self, name: str, baseline: str = BASELINE) -> list[float]:
        """Baseline time / path time, one per round: both ran in the same round, so drift cancels."""
        p, b = self.path(name), self.path(baseline)
        if p is None or b is None or not p.timed or not b.timed:
            return []
        if len(p.samples_s) != len(b.samples_s):
            return [b.median_s / p.median_s]
        return [bs / ps for bs, ps in zip(b.samples_s, p.samples_s)]

    def speedup(self, name: str, baseline: str = BASELINE) -> float:
        """Median of the per-round ratios to the baseline: above 1 is faster than the baseline."""
        ratios = self.ratios(name, baseline)
        return statistics.median(ratios) if ratios else math.nan

    def speedup_quartiles(self, name: str, baseline: str = BASELINE) -> tuple[float, float]:
        ratios = self.ratios(name, baseline)
        if len(ratios) < 2:
            s = self.speedup(name, baseline)
            return s, s
        q = statistics.quantiles(ratios, n=4, method="inclusive")
        return q[0], q[2]

    def gflops(self, p: PathResult) -> float:
        return self.flops / p.median_s / 1e9 if p.timed else math.nan

    def pct_peak(self, p: PathResult) -> float:
        peak = self.peaks.get(p.dtype)
        return 100 * self.gflops(p) / peak if peak else math.nan

    # -- views ------------------------------------------------------------------------------------
    def header(self) -> list[str]:
        m = self.machine
        bf16 = "native" if m.get("native_bf16") else "emulated (no AVX512_BF16/AMX_BF16): bf16 paths run slower here"
        peaks = ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in self.peaks.items()) or "not measured"
        return [
            f"{self.workload} batch {self.batch}: {self.description}; {_si(self.flops)}FLOP per call",
            f"machine: {m.get('cpu', '?')}; {m.get('torch_threads', '?')} torch threads; torch {m.get('torch', '?')}"
            f"; bf16 {bf16}",
            f"GEMM peak measured now: {peaks}",
        ] + self._load_line() + (
            [f"torch.compile/Inductor start-up: {self.startup_s:.1f} s (once per process, in no path's build s)"]
            if self.startup_s else [])

    def _load_line(self) -> list[str]:
        load, cpus = self.machine.get("load_average") or [None, None], self.machine.get("logical_cpus")
        if None in load or not cpus:
            return []
        busy = max(load) > cpus + 0.5  # more runnable work than CPUs: other processes shared them
        note = ": other work shared the CPUs, absolute times are inflated; compare ratios" if busy else ""
        return [f"load average during timing: {load[0]:.1f} -> {load[1]:.1f} on {cpus} logical CPUs{note}"]

    def rows(self) -> list[list[str]]:
        out = []
        for p in self.paths:
            if not p.timed:
                out.append([p.label, p.status, "", "", "", "", "", "", "", p.reason])
                continue
            err = "" if p.max_rel_err is None else f"{p.max_rel_err:.1e}"
            if p.accuracy:
                err += f" (cos {p.accuracy['cosine']:.4f}" + (
                    f", top-1 {p.accuracy['top1_agreement']:.2f})" if "top1_agreement" in p.accuracy else ")")
            notes = "; ".join(x for x in (p.note, p.reason) if x)
            out.append([
                p.label, f"{p.median_s * 1e3:.2f}", f"±{p.spread * 100:.1f}%", f"{self.speedup(p.name):.2f}x",
                f"{self.batch / p.median_s:.1f}", f"{self.gflops(p):.3g}", _pct(self.pct_peak(p)),
                f"{p.build_s:.1f}", err, notes,
            ])
        return out

    COLUMNS = ("path", "median ms", "spread", "vs eager fp32", "items/s", "GFLOP/s", "% peak", "build s",
               "max rel err", "notes")

    def table(self) -> str:
        rows = [list(self.COLUMNS)] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.COLUMNS) - 1)]
        lines = self.header() + [""]
        for r in rows:
            cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:])]
            lines.append("  ".join(cells + [r[-1]]).rstrip())
        lines += ["", f"median over {self.rounds} interleaved rounds; spread = half the interquartile range; "
                      "vs eager fp32 = median over rounds of eager time / path time in the same round; % peak = GFLOP/s over the GEMM "
                      "peak of the path's dtype; build s = first call (compile + verify), built in table order: "
                      "a later path that compiles a graph an earlier one compiled reuses its kernels, so its "
                      "build s is a lower bound"]
        return "\n".join(lines)

    __str__ = table

    def _repr_html_(self) -> str:
        esc = html.escape
        head = "".join(f"<th>{esc(c)}</th>" for c in self.COLUMNS)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in self.rows())
        caption = "<br>".join(esc(h) for h in self.header())
        return f"<div><p>{caption}</p><table><tr>{head}</tr>{body}</table></div>"

    def to_dict(self) -> dict[str, Any]:
        paths = []
        for p in self.paths:
            d = dataclasses.asdict(p)
            lo, hi = p.quartiles_s if p.timed else (None, None)
            d.update(median_s=p.median_s if p.timed else None, p25_s=lo, p75_s=hi,
                     speedup_vs_eager_fp32=_num(self.speedup(p.name)),
                     speedup_quartiles=[_num(x) for x in self.speedup_quartiles(p.name)] if p.timed else None,
                     gflops=_num(self.gflops(p)),
                     pct_peak=_num(self.pct_peak(p)), items_per_s=self.batch / p.median_s if p.timed else None)
            paths.append(d)
        return {"workload": self.workload, "description": self.description, "batch": self.batch,
                "startup_s": self.startup_s,
                "flops": self.flops, "gemm_peak_gflops": self.peaks, "rounds": self.rounds,
                "machine": self.machine, "paths": paths}


def load_json(path: str) -> list[BenchResult]:
    """Results written by write_json, back as BenchResults (to re-render tables and charts without rerunning)."""
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {doc.get('schema')!r} is not {SCHEMA!r}")
    fields = [f.name for f in dataclasses.fields(PathResult)]
    results = []
    for r in doc["results"]:
        paths = []
        for p in r["paths"]:
            p = {k: p[k] for k in fields if k in p}
            if isinstance(p.get("max_rel_err"), str):
                p["max_rel_err"] = float(p["max_rel_err"])
            paths.append(PathResult(**p))
        results.append(BenchResult(r["workload"], r["description"], r["batch"], r["flops"], r["gemm_peak_gflops"],
                                   paths, r["rounds"], r["machine"], r.get("startup_s", 0.0)))
    return results


def _si(value: float) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def _pct(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.0f}%"


def _num(value: float) -> Optional[float]:
    return None if value is None or math.isnan(value) else value


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: an infinite error (a shape mismatch) becomes the string "inf", nan becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def emit_json(data: Any, dest: Optional[str]) -> None:
    """A benchmark worker's result for its parent process: JSON on stdout (``dest`` None or "-") or in the
    file named; values JSON cannot hold are written as their ``str``."""
    text = json.dumps(data, default=str)
    if dest in (None, "-"):
        print(text)
    else:
        with open(dest, "w", encoding="utf-8") as fh:
            fh.write(text)


def write_json(results: list[BenchResult], path: str, command: Optional[list[str]] = None) -> None:
    """One JSON document for one or many workloads, with the command that produced it."""
    doc = _finite({"schema": SCHEMA, "command": command if command is not None else sys.argv,
                   "results": [r.to_dict() for r in results]})
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, allow_nan=False)
        fh.write("\n")
