"""The build ladder: candidates for one input signature, each built, verified and raced against eager.

Rungs come in stages: the requested dtype first (Inductor, OpenVINO, IPEX, eager with passes), then the
same backends in fp32 if none of the first stage is both accurate enough and faster than eager fp32, or if
the one that is was not compiled (eager with passes): compiled fp32 graphs then race it. The original eager
model is what serves when no rung wins, or when the winner, timed side by side with eager once more at the
end, is not faster. A candidate is judged against the eager fp32
reference by what its dtype can do (``verify.compare`` with eager autocast's own error as the yardstick),
then timed against the original eager fp32 call, interleaved. The fastest verified candidate that beats
eager serves; losers are freed before the next rung, so racing never holds two extra graphs at once.
Once a rung has won, further rungs start only while the ``tune_budget`` (seconds from that win) lasts.
Two verified rungs are timed side by side (a dynamic text graph at a second length too, ``probe``); level
within ``race.CLOSE``, the one a restarted process gets without compiling serves.
With ``serve_first`` (a dynamic family's first build, ``build="auto"``) the rungs quick to build go first and the
first compiled rung that wins, confirmed against eager, ends the climb: the rest of its stage is returned for
``raceon`` to build in the background, so a first call costs that rung, not every rung.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import torch

from ..errors import CpuBoostError
from ..options import dtype_name
from . import race, verify
from .probe import Probe
from .progress import progress
from .report import RungRecord


@dataclasses.dataclass
class Rung:
    name: str  # backend and dtype, "inductor bf16"
    backend: str
    dtype: torch.dtype
    build: Callable[[], Callable[..., Any]]
    notes: list = dataclasses.field(default_factory=list)

    @property
    def compiled(self) -> bool:
        """Whether this rung is a graph a compiler built; an uncompiled win (eager with passes, in a low
        dtype) does not close the ladder: compiled fp32 graphs may still beat it."""
        return self.backend != "eager+passes"


@dataclasses.dataclass
class Winner:
    rung: Rung
    fn: Callable[..., Any]
    out: Any
    verdict: Optional[verify.Verdict]
    build_seconds: float
    ms: float
    eager_ms: float
    memory_mb: float
    record: RungRecord
    versus: str = ""  # the last side-by-side timing against the rung holding the lead, for the report


RECOMPILED = ": a restart would compile it again"


def _beats(challenger: Winner, holder: Winner, args: tuple, kwargs: dict, probe: Optional[Probe] = None) -> bool:
    """Whether the new verified rung is faster than the one holding the lead, timed side by side. With a
    ``probe`` (a dynamic text graph, which will serve every length) at both lengths too: the product of the two
    ratios decides, so neither length's milliseconds outweigh the other's."""
    mine, theirs = race.head_to_head(challenger.fn, holder.fn, args, kwargs)
    challenger.versus = f" (side by side: {mine:.2f} ms against {theirs:.2f} ms"
    holder.versus = f" (side by side: {theirs:.2f} ms against {mine:.2f} ms"
    ratio = mine / theirs if theirs else 1.0
    if probe is not None:
        try:
            long_mine, long_theirs = race.head_to_head(challenger.fn, holder.fn, probe.args, probe.kwargs)
        except Exception as exc:  # a graph that cannot take the other length is judged on the call's alone
            challenger.versus += f"; not timed at length {probe.length}: {_first_line(exc)}"
        else:
            challenger.versus += f"; at length {probe.length}: {long_mine:.2f} ms against {long_theirs:.2f} ms"
            holder.versus += f"; at length {probe.length}: {long_theirs:.2f} ms against {long_mine:.2f} ms"
            ratio *= long_mine / long_theirs if long_theirs else 1.0
    challenger.versus += ")"
    holder.versus += ")"
    challenger_warm = _restarts_warm(challenger)
    if abs(ratio - 1.0) <= race.CLOSE and challenger_warm != _restarts_warm(holder):
        kept = challenger if challenger_warm else holder
        kept.versus += f", within {race.CLOSE:.0%}: kept for a restart to load"
        (holder if kept is challenger else challenger).versus += f", within {race.CLOSE:.0%}{RECOMPILED}"
        return kept is challenger
    return ratio < 1.0


def _lost(loser: Winner, winner: str) -> str:
    if loser.versus.endswith(RECOMPILED):
        return f"verified, level with {winner}, which a restart loads{loser.versus}"
    return f"verified but slower than {winner}{loser.versus}"


def _restarts_warm(winner: Winner) -> bool:
    """Whether a restarted process gets this rung without compiling: eager with passes (nothing to compile), or a
    graph the persistent cache keeps (an AOTInductor package, OpenVINO IR). Between two rungs within
    ``race.CLOSE`` of each other (timing noise on a shared CPU) the kept one serves: a BERT-style model's
    in-process dynamic Inductor graph won by 2% and a restart compiled it again (9 s), where OpenVINO's kept IR
    loads in 0.8 s."""
    kept = (callable(getattr(winner.fn, name, None)) for name in ("keep_cached", "forget_cached"))
    return not winner.rung.compiled or any(kept)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _int8_must_race(int8_verified: bool, rung: Rung, decided: Optional[str]) -> bool:
    """An int8 graph serves only when it beats every float graph beside it, so once one is verified those are
    built past the budget: an accuracy-controlled int8 graph of a realistic ResNet-50 (95 s of builds) once
    served at 5.4x eager fp32, its bf16 rungs (OpenVINO's: 10.8x) never tried."""
    return int8_verified and rung.dtype != torch.int8 and decided is None


QUICK_TO_BUILD = ("openvino",)  # BERT-style, 4 layers, 2 cores: OpenVINO 2.7 s, Inductor (dynamic) 12 s
BACKGROUND = "building in the background while {} serves"  # a rung ``raceon`` has still to build


def climb(stages: list[list[Rung]], args: tuple, kwargs: dict, *, reference: Any,
          yardstick: Callable[[torch.dtype], Any], eager: Callable[..., Any], tolerance: Optional[float],
          budget: float, verify_outputs: bool, signature: str,
          decided: Optional[str] = None, warm: Optional[dict] = None,
          probe: Optional[Probe] = None,
          serve_first: bool = False) -> tuple[Optional[Winner], list[RungRecord], list[Rung]]:
    """Try the rungs in order; return the winner (None: eager serves), a record of every rung and the rungs
    left for the background (``serve_first`` only; their records say so until ``raceon`` replaces them).

    ``warm``: what an earlier process measured for the ``decided`` rung (``eager_ms`` of this call's reference,
    ``yardstick_error`` of eager autocast), so a warm start verifies and times it without more eager calls.
    ``probe``: the call at another length, where verified rungs of a dynamic text graph race side by side too.
    """
    records: list[RungRecord] = []
    rest: list[Rung] = []
    best: Optional[Winner] = None
    won_at = 0.0  # the budget counts from the first winner: the first build, however slow, never uses it up
    total = sum(len(stage) for stage in stages)
    compiled_tried = confirmed = False
    int8_verified = False
    if serve_first and stages:
        stages = [sorted(stages[0], key=lambda r: r.backend not in QUICK_TO_BUILD), *stages[1:]]
    with progress(total, signature) as bar:
        for stage in stages:
            if best is not None and best.rung.compiled:
                records += [RungRecord(r.name, f"not tried: {best.rung.name} won in the requested dtype")
                            for r in stage]
                continue
            for index, rung in enumerate(stage):
                if rest:
                    break
                over_budget = best is not None and time.perf_counter() - won_at > budget
                if over_budget and not _int8_must_race(int8_verified, rung, decided):
                    why = (f"{decided} was decided by an earlier build (this process or the persistent cache)"
                           if decided and best.rung.name == decided else f"tune_budget={budget:g} s spent")
                    records.append(RungRecord(rung.name, f"not tried: {why}"))
                    bar.end(rung.name, "skipped (budget)")
                    continue
                bar.start(rung.name, signature)
                compiled_tried = compiled_tried or rung.compiled
                candidate = _try(rung, args, kwargs, reference, yardstick, eager, tolerance, verify_outputs,
                                 warm if warm and rung.name == decided else None)
                records.append(candidate if isinstance(candidate, RungRecord) else candidate.record)
                if isinstance(candidate, Winner):
                    won_at = won_at or time.perf_counter()
                    int8_verified = int8_verified or candidate.rung.dtype == torch.int8
                    if best is None or _beats(candidate, best, args, kwargs, probe):
                        if best is not None:
                            best.record.fate = _lost(best, rung.name)
                        best, candidate = candidate, best
                    if candidate is not None:
                        candidate.record.fate = _lost(candidate, best.rung.name)
                        compiled_loser = candidate.rung.compiled
                        del candidate
                        if compiled_loser:
                            race.release_memory()  # a loser's graph goes before the next rung is built
                if serve_first and best is not None and best.rung.compiled and not confirmed:
                    best, confirmed = _confirm(best, eager, args, kwargs), True
                    if best is None:  # slower than eager side by side: the climb goes on in the foreground
                        confirmed = False
                    elif stage[index + 1:]:
                        rest = stage[index + 1:]
                        records += [RungRecord(r.name, BACKGROUND.format(best.rung.name)) for r in rest]
                bar.end(rung.name, records[-1 - len(rest)].fate)
    if best is not None and not confirmed and not (warm and best.rung.name == decided):
        best = _confirm(best, eager, args, kwargs)
    if best is not None:
        best.record.fate = "served"
        keep = getattr(best.fn, "keep_cached", None)  # a persistent artifact written only for the graph that serves
        if callable(keep):
            keep()
    if compiled_tried:
        # what the compiles freed goes back to the system, not only the losers' graphs; an eager-only ladder
        # frees little and would pay a full gc per new signature (0.5 s in a large process)
        race.release_memory()
    return best, records, rest


def _confirm(best: Winner, eager: Callable[..., Any], args: tuple, kwargs: dict) -> Optional[Winner]:
    """The serve decision, timed side by side with eager fp32 once more: a rung that won in its own window
    but loses to eager next to it (LeViT: eager+passes bf16 at 0.96x) does not serve. A warm start's decided
    rung skips this: its process raced it in full, and this one has no eager timing to spare. The record keeps
    this last timing."""
    mine, theirs = race.head_to_head(best.fn, eager, args, kwargs, rounds=race.ROUNDS)
    if mine < theirs:
        best.ms, best.eager_ms = mine, theirs
        best.record.ms, best.record.vs_eager = mine, theirs / mine if mine else None
        return best
    best.record.fate = f"slower than eager fp32 side by side ({mine:.2f} ms against {theirs:.2f} ms)"
    return None


def _try(rung: Rung, args: tuple, kwargs: dict, reference: Any, yardstick: Callable[[torch.dtype], Any],
         eager: Callable[..., Any], tolerance: Optional[float], verify_outputs: bool,
         warm: Optional[dict] = None) -> Winner | RungRecord:
    before = race.resident_mb()
    begin = time.perf_counter()
    try:
        fn = rung.build()
        out = race.run_once(fn, args, kwargs)
    except Exception as exc:  # any backend failure: record it, the next rung is tried
        if isinstance(exc, CpuBoostError) and isinstance(exc, ValueError):
            raise  # the user's input is wrong (calibration data, dynamic_dims): say so, build nothing
        return RungRecord(rung.name, f"failed: {_first_line(exc)}", time.perf_counter() - begin)
    seconds = time.perf_counter() - begin
    measured = getattr(fn, "accuracy_summary", "")  # a backend's own measurement (int8: calibration batches)
    verdict = None
    if verify_outputs:
        low = rung.dtype in (torch.bfloat16, torch.float16)
        known = (warm or {}).get("yardstick_error")
        if low and known is not None:  # eager autocast's error, measured when this rung was decided
            verdict = verify.compare(reference, out, rung.dtype, None, tolerance, yardstick_error=known)
        else:
            verdict = verify.compare(reference, out, rung.dtype, yardstick(rung.dtype) if low else None, tolerance)
        if not verdict.ok:
            forget = getattr(fn, "forget_cached", None)  # a persistent graph that fails is not loaded again
            if callable(forget):
                forget()
            return RungRecord(rung.name, "rejected: not accurate enough", seconds, str(verdict), accuracy=measured)
    try:
        ms, eager_ms = race.against_eager(fn, eager, args, kwargs, eager_ms=(warm or {}).get("eager_ms"))
    except Exception as exc:  # a graph that answered once but not twice is not served
        return RungRecord(rung.name, f"failed on a second call: {_first_line(exc)}", seconds, accuracy=measured)
    error = str(verdict) if verdict else "not verified (verify=False)"
    record = RungRecord(rung.name, "", seconds, error, ms, eager_ms / ms if ms else None, accuracy=measured)
    if ms >= eager_ms:
        record.fate = "slower than eager fp32"
        return record
    return Winner(rung, fn, out, verdict, seconds, ms, eager_ms, max(race.resident_mb() - before, 0.0), record)


# Rungs that write their artifact only once they serve (OpenVINO IR): a folder for every dtype costs nothing
# until one wins. The others (AOTInductor) compile their package while building, so the fp32 stage of a
# low-precision plan runs without a folder rather than paying a package for each rung that then loses.
_KEPT_ONLY_WHEN_SERVED = frozenset({"openvino"})


def artifact_dir(folder, dtype: torch.dtype, planned: torch.dtype, rung: str = ""):
    """Where a rung keeps its persistent artifact: the signature's folder for the planned dtype; a subfolder
    for the bf16 rungs an int8 plan races (int8 keeps its own graph in the folder itself), and for the fp32
    escape of a rung that writes only when it serves (a warm start then loads that winner as well)."""
    if folder is None or dtype == planned:
        return folder
    if planned == torch.int8 and dtype != torch.float32 or rung in _KEPT_ONLY_WHEN_SERVED:
        return folder / dtype_name(dtype)
    return None
