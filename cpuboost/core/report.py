"""``explain()``: what ran, what was skipped and why, and what each step cost."""
from __future__ import annotations

import dataclasses
import html
from typing import Optional


@dataclasses.dataclass
class PassRecord:
    name: str
    status: str  # "applied", "failed", "skipped", "planned"
    seconds: float = 0.0
    detail: str = ""


@dataclasses.dataclass
class RungRecord:
    """One candidate the ladder tried for one signature: what it cost, how close and how fast it was."""

    name: str  # backend and dtype, e.g. "inductor bf16"
    fate: str  # "served", "verified but slower than ...", "slower than eager fp32", "failed: ...", ...
    build_seconds: float = 0.0
    error: str = ""  # the verdict, e.g. "ok: rel err 4.1e-03 <= 1.2e-02, eager autocast 4.0e-03"
    ms: Optional[float] = None  # median per call
    vs_eager: Optional[float] = None  # eager fp32 time / this time (>1 is faster)
    accuracy: str = ""  # what the backend measured itself (int8: vs eager fp32 on the calibration batches)

    def line(self) -> str:
        speed = f", {self.ms:.2f} ms ({self.vs_eager:.2f}x eager fp32)" if self.ms is not None else ""
        build = f"built in {self.build_seconds:.2f} s" if self.build_seconds else "not built"
        error = f", {self.error}" if self.error else ""
        accuracy = f"; {self.accuracy}" if self.accuracy else ""
        return f"{self.name}: {self.fate}; {build}{speed}{error}{accuracy}"


@dataclasses.dataclass
class GraphRecord:
    signature: str
    path: str
    build_seconds: float
    verification: str
    fallbacks: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    timings: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # (path, ms per call) when raced
    rungs: list[RungRecord] = dataclasses.field(default_factory=list)
    dtype: str = ""
    dynamic: str = ""  # "" for a static graph, else the dims it serves dynamically
    memory_mb: Optional[float] = None  # resident memory the serving graph added when built
    vs_eager: Optional[float] = None

    def race(self) -> str:
        return ", ".join(f"{path} {ms:.2f} ms" for path, ms in self.timings)


@dataclasses.dataclass
class Report:
    model: str
    mode: str
    options: str
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    graphs: list[GraphRecord] = dataclasses.field(default_factory=list)
    events: list[str] = dataclasses.field(default_factory=list)
    backend_notes: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    dropped_graphs: int = 0  # records dropped to keep the report bounded (oldest first)

    MAX_GRAPHS = 64

    def add_graph(self, record: "GraphRecord") -> None:
        """Keep the newest records only: a long-running service must not grow its report forever."""
        self.graphs.append(record)
        if len(self.graphs) > self.MAX_GRAPHS:
            del self.graphs[0]
            self.dropped_graphs += 1

    def note(self, text: str) -> None:
        """An event line, once (repeated events are not repeated)."""
        if text not in self.events:
            self.events.append(text)
            if len(self.events) > self.MAX_GRAPHS:
                del self.events[0]

    @property
    def applied(self) -> list[str]:
        return [p.name for p in self.passes if p.status == "applied"]

    @property
    def skipped(self) -> dict[str, str]:
        return {p.name: p.detail for p in self.passes if p.status == "skipped"}

    def _rows(self) -> list[tuple[str, str, str, str]]:
        rows = []
        for p in self.passes:
            cost = f"{p.seconds * 1e3:.1f} ms" if p.seconds else ""
            rows.append((p.name, p.status, cost, p.detail))
        return rows

    def __str__(self) -> str:
        lines = [f"cpuboost report for {self.model} ({self.mode}; {self.options})", "passes:"]
        width = max([len(r[0]) for r in self._rows()] + [4])
        for name, status, cost, detail in self._rows():
            lines.append(f"  {name:<{width}}  {status:<8} {cost:>10}  {detail}".rstrip())
        if self.backend_notes:
            lines.append("backends:")
            lines += [f"  {name}: {why}" for name, why in self.backend_notes]
        if self.graphs:
            lines.append("graphs (one per input signature):")
            if self.dropped_graphs:
                lines.append(f"  ({self.dropped_graphs} older record(s) dropped)")
            for g in self.graphs:
                what = f"{g.path} {g.dtype}".strip() + (f" dynamic in {g.dynamic}" if g.dynamic else "")
                speed = f", {g.vs_eager:.2f}x eager fp32" if g.vs_eager else ""
                memory = f", holds {g.memory_mb:.0f} MiB" if g.memory_mb is not None else ""
                lines.append(f"  [{g.signature}] -> {what}, built in {g.build_seconds:.2f} s{speed}{memory}, "
                             f"{g.verification}")
                lines += [f"      {rung.line()}" for rung in g.rungs]
                if not g.rungs:
                    lines += [f"      fell back from {path}: {why}" for path, why in g.fallbacks]
        elif self.mode != "train":  # training runs eagerly unless compile_training builds a graph
            lines.append("graphs: none built yet (the first call builds and verifies one)")
        if self.events:
            lines.append("events:")
            lines += [f"  {e}" for e in self.events]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        esc = html.escape
        rows = "".join(
            f"<tr><td>{esc(n)}</td><td>{esc(s)}</td><td>{esc(c)}</td><td>{esc(d)}</td></tr>"
            for n, s, c, d in self._rows()
        )
        graphs = "".join(
            f"<tr><td>{esc(g.signature)}</td><td>{esc(g.path)}</td><td>{g.build_seconds:.2f} s</td>"
            f"<td>{esc(g.verification)}</td><td>{'<br>'.join(esc(r.line()) for r in g.rungs)}</td>"
            f"<td>{esc(g.race())}</td></tr>"
            for g in self.graphs
        )
        events = "".join(f"<li>{esc(e)}</li>" for e in self.events)
        return (
            f"<div><b>cpuboost</b> {esc(self.model)} ({esc(self.mode)}; {esc(self.options)})"
            "<table><tr><th>pass</th><th>status</th><th>cost</th><th>detail</th></tr>"
            f"{rows}</table>"
            "<table><tr><th>signature</th><th>path</th><th>build</th><th>verification</th><th>rungs tried</th>"
            "<th>raced (ms per call)</th></tr>"
            f"{graphs}</table>"
            f"{'<ul>' + events + '</ul>' if events else ''}</div>"
        )

    def graph_for(self, signature: str) -> Optional[GraphRecord]:
        return next((g for g in reversed(self.graphs) if g.signature == signature), None)
