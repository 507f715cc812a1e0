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
class GraphRecord:
    signature: str
    path: str
    build_seconds: float
    verification: str
    fallbacks: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    timings: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # (path, ms per call) when raced

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
            for g in self.graphs:
                lines.append(f"  [{g.signature}] -> {g.path}, built in {g.build_seconds:.2f} s, {g.verification}")
                lines += [f"      fell back from {path}: {why}" for path, why in g.fallbacks]
                if g.timings:
                    lines.append(f"      fastest of the verified graphs (ms per call): {g.race()}")
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
            f"<td>{esc(g.verification)}</td><td>{esc('; '.join(f'{p}: {w}' for p, w in g.fallbacks))}</td>"
            f"<td>{esc(g.race())}</td></tr>"
            for g in self.graphs
        )
        events = "".join(f"<li>{esc(e)}</li>" for e in self.events)
        return (
            f"<div><b>cpuboost</b> {esc(self.model)} ({esc(self.mode)}; {esc(self.options)})"
            "<table><tr><th>pass</th><th>status</th><th>cost</th><th>detail</th></tr>"
            f"{rows}</table>"
            "<table><tr><th>signature</th><th>path</th><th>build</th><th>verification</th><th>fallbacks</th>"
            "<th>raced (ms per call)</th></tr>"
            f"{graphs}</table>"
            f"{'<ul>' + events + '</ul>' if events else ''}</div>"
        )

    def graph_for(self, signature: str) -> Optional[GraphRecord]:
        return next((g for g in reversed(self.graphs) if g.signature == signature), None)
