"""The generation runner: private copies of the model, one verified decode graph per (batch, cache bucket),
and transformers' own loop driving them (greedy, sampling, processors, stopping, streamers, dict outputs).

Concurrency: calls whose (batch, bucket) graph is built run at the same time, each on its own static cache
(a pool), in dynamo's thread-local run-only mode; a build holds only its own key's lock, so other keys, and
calls on the eager copy, do not wait. ``refresh()`` swaps all copies at once; a call in flight finishes on
the copies it started with."""
from __future__ import annotations

import contextlib
import inspect
import threading
import time
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from .cache import CachePool, cache_refusal, new_static_cache
from .copies import cast_matmul_weights, math_attention, prefill_on, shared_copy, weight_bytes_per_token
from .decode import TEMPLATE_ROWS, CallClock, DecodeStep, Step, builds_for
from .persisted import PersistedDecisions
from .prefill import PrefillGraph
from .judge import judge
from .rope import table_rotary_embeddings
from .route import CallPlan, can_route
from .weights import fake_quantized, quantize_matmul_weights, unavailable

PROBE_STEPS = 8  # greedy steps compared with eager fp32 per build (logits per step, token agreement)
LOADED_PROBE_STEPS = 4  # ... per package loaded: bytes equal to what passed 8 steps when built (its digest)
DECISIVE = 0.5  # a first race round this far under eager fp32's time decides it
_QUANTIZED = {torch.int8: "int8"}
if hasattr(torch, "int4"):
    _QUANTIZED[torch.int4] = "int4"


def _rival_rows() -> int:
    """The batch from which a weight-only decode is raced against the bf16 copy's: 4 where bf16 GEMMs have
    the dot-product kernel (backends/bf16_dot.py), else past the GEMM template's rows."""
    from ..backends.bf16_dot import available

    return 4 if available() else TEMPLATE_ROWS + 1


class _Copies:
    """Everything one weights version runs on; ``refresh()`` replaces the whole object."""

    def __init__(self, runner: "GenerationRunner") -> None:
        original, note = runner._original, runner._note
        self.reference = shared_copy(original).eval()  # fp32, shares every tensor: the judge's reference
        self.work = self.reference  # the eager fallback and prefill: matmul weights in the activation dtype
        if runner.act_dtype != torch.float32:
            self.work = shared_copy(original).eval()
            count = cast_matmul_weights(self.work, runner.act_dtype)
            note(f"generate: {count} matmul weight(s) held in {runner.act_dtype} by the private copy")
        # The static route's copy shares the fallback's tensors; it alone switches to math attention,
        # since transformers builds the mask for the attention the model is set to.
        self.static = shared_copy(self.work)
        attention = math_attention(self.static)
        if attention:
            note(f"generate: {attention}")
        tables = table_rotary_embeddings(self.static, runner.max_cache_len)
        if tables:
            note(f"generate: the decode copy's {tables}")
        # the yardstick, eager autocast: on the copy whose matmul weights are already in the activation dtype,
        # the same numbers as autocast casting the fp32 weights on every call, without the casts
        self.decode, self.yard, self.kind = self.static, self.work, None
        kind = _QUANTIZED.get(runner.dtype)
        if kind is not None:
            why = unavailable(kind)
            if why is None:
                self.decode = shared_copy(self.static)
                count, kept = quantize_matmul_weights(self.decode, kind)
                self.yard, self.kind = fake_quantized(shared_copy(original).eval(), self.decode), kind
                note(f"generate: {count} matmul layer(s) weight-only {kind} in the decode copy"
                     + (f"; kept: {', '.join(kept)}" if kept else ""))
            else:
                runner._warn(f"generate: weight-only {kind} not available, the decode runs {runner.act_dtype}: "
                             f"{why}")
        # transformers 5.2x renamed generate's past_key_values to cache (the old name warns)
        forward = inspect.signature(type(original).forward).parameters
        self.cache_arg = "cache" if "cache" in forward else "past_key_values"
        kinds = {getattr(getattr(m, "config", None), "_attn_implementation", None) for m in (self.static, self.work)}
        self.prefill: Optional[PrefillGraph] = None  # the compiled prefill, built after the first call
        if len(kinds) > 1:
            if runner._compile and runner._compile_prefill:
                self.prefill = PrefillGraph(self.work, self.reference, runner.act_dtype, self.cache_arg,
                                            new_static_cache, note, race=runner._race_enabled)
            prefill_on(self.static, self.work, self.cache_arg, self.prefill)  # SDPA there; decode: math attention
            note("generate: the prefill runs the model's sdpa attention, decode steps the math attention")
        self.refusal = cache_refusal(original)
        self.bytes_per_token = weight_bytes_per_token(self.decode)
        self.pool = CachePool(self.static)
        self.steps: dict[tuple[int, int], Any] = {}  # (batch, bucket) -> DecodeStep, or why it runs eagerly
        self.key_locks: dict[tuple[int, int], threading.Lock] = {}
        self.rebuilt: set[tuple[int, int]] = set()  # keys whose graph stopped serving and was dropped once
        # transformers asks these two on every generate(); the answers point at this thread's decode graph.
        active = runner._active
        self.static.get_compiled_call = lambda compile_config=None: active.__dict__.get("step")
        self.static._valid_auto_compile_criteria = lambda *a, **k: active.__dict__.get("step") is not None


class GenerationRunner:
    """Built once per (model, dtype); holds what ``generate()`` runs on. ``generate`` has the signature and
    outputs of ``original.generate``; ``note`` gets one line per decision. ``dtype``: fp32, bf16, fp16, or
    ``torch.int8`` / ``torch.int4`` for weight-only quantized decode (bf16 activations). ``prefill``: also
    compile the prefill (cpuboost.optimize's generate does)."""

    def __init__(self, original: nn.Module, dtype: torch.dtype = torch.bfloat16,
                 note: Optional[Callable[[str], None]] = None, *, max_cache_len: Optional[int] = None,
                 compile: bool = True, race: bool = True,
                 build_lock: Optional[contextlib.AbstractContextManager] = None,
                 persist: Optional["PersistedDecisions"] = None, prefill: bool = False) -> None:
        self._original = original
        self._persist = persist  # decode decisions and Inductor's caches in cpuboost's persistent store
        self._build_lock = build_lock or contextlib.nullcontext()  # optional: the caller's per-model build lock
        self.dtype = dtype
        self.act_dtype = torch.bfloat16 if dtype in _QUANTIZED else dtype
        self.low_precision = dtype != torch.float32
        self._note = note or (lambda text: None)
        self.reason = can_route(original)
        config = getattr(original, "config", None)
        self.max_cache_len = int(max_cache_len or getattr(config, "max_position_embeddings", None) or 2048)
        self._compile, self._race_enabled, self._lock, self._noted = compile, race, threading.Lock(), set()
        self._compile_prefill = prefill  # a compiled prefill (prefill.py), built in the background after a call
        self._active = threading.local()
        self.last_call: dict = {}  # the last static-route call: prefill ms, decode ms/token, tokens/s, bytes read
        self._copies: Optional[_Copies] = None
        if self.reason is None:
            self.refresh()

    def refresh(self) -> None:
        """Re-read the original's weights: new private copies, every decode graph dropped."""
        self._copies = _Copies(self)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        why = self.reason or ("the model is in train mode" if self._original.training else None)
        if why is not None:
            self._note_once(f"generate: eager (the original's own): {why}")
            return self._original.generate(*args, **kwargs)
        copies = self._copies
        call = CallPlan(copies.work, args, kwargs)
        why = call.refusal or copies.refusal
        if why is None:
            bucket = call.bucket(self.max_cache_len)  # raises before anything runs
            try:
                step = self._step_for(copies, call, bucket)
                if isinstance(step, Step):
                    return self._run_static(copies, step, call.batch, bucket, args, kwargs)
            finally:
                if self._persist is not None:
                    self._persist.start_pending()  # the package compiles of a step built for this call
                if copies.prefill is not None:
                    copies.prefill.start_pending()  # the compiled prefill, once a first prefill gave its example
            why = step
        self._note_once(f"generate: eager private copy ({self.act_dtype}), dynamic cache: {why}")
        with self._precision():
            return copies.work.generate(*args, **kwargs)

    def describe(self) -> dict:
        """Route per (batch, cache bucket): 'compiled' or the reason it runs eagerly (times: ``last_call``)."""
        if self.reason is not None:
            return {"route": "eager (original)", "reason": self.reason}
        return {f"batch {b}, cache {n}": ("compiled" if isinstance(s, Step) else s)
                for (b, n), s in dict(self._copies.steps).items()}

    def prefill_state(self) -> str:
        """The compiled prefill's state: not built, pending, building, serving, or refused with why."""
        prefill = self._copies.prefill if self._copies is not None else None
        return prefill.state if prefill is not None else "eager (no compiled prefill for this runner)"

    def wait_for_builds(self, timeout: Optional[float] = None) -> bool:
        """Waits for the compiled prefill's background build; True when none is running."""
        prefill = self._copies.prefill if self._copies is not None else None
        return prefill.wait(timeout) if prefill is not None else True

    # -- internals ----------------------------------------------------------------------------------
    def _precision(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=self.act_dtype, enabled=self.act_dtype != torch.float32)

    def _note_once(self, text: str) -> None:
        with self._lock:
            fresh = text not in self._noted
            self._noted.add(text)
        if fresh:
            self._note(text)

    def _warn(self, text: str) -> None:
        """A lost speed-up is said twice: in explain() and as a Python warning (never silent)."""
        self._note(f"WARNING {text}")
        warnings.warn(text, RuntimeWarning, stacklevel=3)

    def _step_for(self, copies: _Copies, call: CallPlan, bucket: int) -> Any:
        """The key's decode step, built once: concurrent first calls of one key wait for its build, other
        keys and built keys never do."""
        key = (call.batch, bucket)
        with self._lock:
            if key in copies.steps:
                return copies.steps[key]
            key_lock = copies.key_locks.setdefault(key, threading.Lock())
        with key_lock:
            if key not in copies.steps:
                copies.steps[key] = self._persisted_build(copies, call, bucket) if self._compile else "compile=False"
            return copies.steps[key]

    def _persisted_build(self, copies: _Copies, call: CallPlan, bucket: int) -> Any:
        """``_build`` inside this key's persistent entry: its lock (another process building the same key is
        waited for), Inductor's caches in the store, and a graph that won here before skips the race (it is
        still verified). Only wins are written: a refusal measured on a busy machine is not made permanent."""
        found = self._persist.lookup(call.batch, bucket, self._note) if self._persist is not None else None
        if found is None:
            step = self._build(copies, call, bucket)
            if isinstance(step, Step):
                step.example = None  # holds a pool cache; only packaging needs it
            return step
        won_before = (found.decision or {}).get("rung") == "compiled"
        with found.building():  # releases the entry's lock if the build raises
            packaged = self._persist.packaged(found, copies.decode, self._note) if won_before else None
            step = self._build(copies, call, bucket, race=not won_before, packaged=packaged)
        if isinstance(step, Step):
            self._persist.remember(found, step, copies, self.act_dtype, self._note)
        else:
            found.release()
        return step

    def _build(self, copies: _Copies, call: CallPlan, bucket: int, race: bool = True,
               packaged: Optional[Step] = None) -> Any:
        """Compile (or load: ``packaged``), verify and time the decode graph for this key on this call's prompt;
        else the reason."""
        if packaged is None:
            from ..backends.inductor import start_isa_probes
            start_isa_probes()  # beside the eager reference runs below, not after them
        steps = PROBE_STEPS if packaged is None else LOADED_PROBE_STEPS
        started, probe, where = time.perf_counter(), call.probe(steps), f"batch {call.batch}, cache {bucket}"
        ref, yard = self._eager_fp32(copies, **probe), None
        if self.low_precision:
            with torch.no_grad(), self._precision():
                yard = copies.yard.generate(**probe)
        failures = []
        with self._build_lock:
            for how, options in ([(packaged.how, None)] if packaged is not None else []) + list(builds_for(call.batch)):
                step = packaged if options is None else DecodeStep(copies.decode, how, options)
                try:
                    out = self._run_static(copies, step, call.batch, bucket, (), probe)
                    break
                except Exception as exc:  # a compile failure: say why, try the next settings, then eager
                    failures.append(f"{how}: {type(exc).__name__}: {(str(exc) or '-').splitlines()[0][:200]}")
            else:
                self._warn(f"generate: no decode graph for {where} (decode runs eagerly, several times slower): "
                           + "; ".join(failures))
                return "decode graph failed to build: " + "; ".join(failures)
        seconds = time.perf_counter() - started
        if step.calls == 0:
            self._warn(f"generate: no decode graph for {where}: transformers never called get_compiled_call")
            return "decode graph never called by transformers' generate loop"
        ok, verdict = judge(ref, yard, out, self.low_precision)
        if not ok and step is packaged:
            self._note(f"generate: packaged decode step for {where} failed verification ({verdict}); compiled again")
            self._persist.forget(step)
            return self._build(copies, call, bucket, race)
        if not ok:
            return self._refuse(where, f"failed verification: {verdict}")
        step.built = True
        faster, timing = self._race(copies, step, bucket, probe) if race else (True, "won here before: not raced")
        if not faster:
            return self._refuse(where, f"measured slower than eager fp32 ({timing})")
        earlier = f" (after {'; '.join(failures)})" if failures else ""
        done = "loaded" if step is packaged else "built"
        self._note(f"generate: decode graph ({step.how}{earlier}) for {where} {done} in {seconds:.1f} s; {verdict}; "
                   f"{timing}")
        if race and self._race_enabled and copies.kind is not None and call.batch >= _rival_rows():
            return self._versus_bf16(copies, call, bucket, probe, ref, step)
        return step

    def _versus_bf16(self, copies: _Copies, call: CallPlan, bucket: int, probe: dict, ref: Any,
                     quantized: Step) -> Step:
        """From a few rows on, weight-only kernels can be bound by converting each weight rather than by reading
        it (this CPU, batch 8: int8 58.7 against bf16 32.8 ms a step; with the bf16 dot-product kernel, batch 4:
        19.9 against 16.4), and the bf16 copy the prefill runs on is there anyway: its decode graph is built and
        verified too, the two are timed in turn (three rounds, median), and the bf16 one serves only if it is
        more than 10% faster."""
        where, kind = f"batch {call.batch}, cache {bucket}", copies.kind
        how, options = builds_for(call.batch)[0]
        rival = DecodeStep(copies.static, f"{how}; bf16 weights", options)
        try:
            with torch.no_grad(), self._precision():
                yard = copies.work.generate(**probe)  # eager autocast: bf16's own error
            with self._build_lock:
                out = self._run_static(copies, rival, call.batch, bucket, (), probe)
        except Exception as exc:  # the quantized graph serves, as it would have
            self._note(f"generate: {where}: bf16 rival not built ({type(exc).__name__}: "
                       f"{(str(exc) or '-').splitlines()[0][:160]}); weight-only {kind} serves")
            return quantized
        ok, verdict = judge(ref, yard, out, True)
        if not ok:
            self._note(f"generate: {where}: bf16 rival failed verification ({verdict}); weight-only {kind} serves")
            return quantized
        rival.built = True
        timing = dict(probe, max_new_tokens=8, min_new_tokens=8, output_logits=False, return_dict_in_generate=False)
        ratios = []
        for _ in range(3):
            begin = time.perf_counter()
            self._run_static(copies, quantized, call.batch, bucket, (), timing)
            middle = time.perf_counter()
            self._run_static(copies, rival, call.batch, bucket, (), timing)
            ratios.append((middle - begin) / (time.perf_counter() - middle))
        ratio = sorted(ratios)[1]  # weight-only time / bf16 time
        if ratio > 1.1:
            self._note(f"generate: {where}: the bf16 decode copy serves, {ratio:.2f}x the weight-only {kind} graph's "
                       f"speed at this batch (median of 3 rounds; its kernels convert every weight); {verdict}")
            return rival
        self._note(f"generate: {where}: weight-only {kind} serves, {1 / ratio:.2f}x the bf16 copy's speed at this "
                   "batch (median of 3 rounds)")
        return quantized

    def _refuse(self, where: str, why: str) -> str:
        self._note(f"generate: decode graph for {where} not used: {why}")
        return f"decode graph {why}"

    def _eager_fp32(self, copies: _Copies, **kwargs: Any) -> Any:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return copies.reference.generate(**kwargs)

    def _race(self, copies: _Copies, step: Step, bucket: int, probe: dict) -> tuple[bool, str]:
        """Rounds of 8-token greedy calls, the verified graph then eager fp32 (DESIGN 8): it serves unless the
        median same-round ratio says it is slower. A first round at most ``DECISIVE`` of eager's time settles it
        (this machine's noise moves a round by a fifth, not by half); otherwise three rounds. race=False skips
        this (tests on noisy machines)."""
        if not self._race_enabled:
            return True, "not timed (race=False)"
        timing = dict(probe, max_new_tokens=8, min_new_tokens=8, output_logits=False, return_dict_in_generate=False)
        ratios, batch = [], probe["input_ids"].shape[0]
        for _ in range(3):
            begin = time.perf_counter()
            self._run_static(copies, step, batch, bucket, (), timing)
            middle = time.perf_counter()
            self._eager_fp32(copies, **timing)
            ratios.append((middle - begin) / (time.perf_counter() - middle))
            if ratios[0] <= DECISIVE:
                break
        ratio = sorted(ratios)[len(ratios) // 2]
        rounds = "1 round, decisive" if len(ratios) == 1 else "median of 3 rounds"
        return ratio < 1.0, f"{1 / ratio:.2f}x eager fp32 over 8 tokens ({rounds}); {self._speed_text()}"

    def _speed_text(self) -> str:
        last = self.last_call
        return (f"prefill {last['prefill_ms']:.1f} ms, decode {last['decode_ms_per_token']:.2f} ms/token, "
                f"{last['tokens_per_s']:.1f} tokens/s, {last['weight_bytes_per_token'] / 1e6:.1f} MB of weights "
                f"read per token ({last['weight_read_gb_s']:.1f} GB/s)")

    def _run_static(self, copies: _Copies, step: Step, batch: int, bucket: int, args: tuple,
                    kwargs: dict) -> Any:
        from transformers.generation.configuration_utils import CompileConfig

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # transformers 4.x compiles only on CUDA unless told
        cache = copies.pool.take(batch, bucket)
        missed = step.missed
        self._active.step = step
        try:
            with self._precision(), step.timed(CallClock()) as clock:
                out = copies.static.generate(*args, **kwargs, **{copies.cache_arg: cache},
                                             compile_config=compile_config)
        finally:
            self._active.step = None
            copies.pool.give_back(batch, bucket, cache)
        model = getattr(step, "model", copies.decode)  # the bf16 rival of a weight-only copy reads bf16 weights
        nbytes = copies.bytes_per_token if model is copies.decode else weight_bytes_per_token(model)
        self.last_call = self._summary(clock, batch, nbytes)
        if step.missed > missed:
            self._stopped_serving(copies, step, (batch, bucket))
        return out

    def _stopped_serving(self, copies: _Copies, step: Step, key: tuple[int, int]) -> None:
        """A served decode graph whose guards rejected this call's steps (they ran eagerly): dropped, so the
        next call builds and verifies one for the state now; once only per key, then said and left eager."""
        where = f"batch {key[0]}, cache {key[1]}"
        with self._lock:
            if copies.steps.get(key) is not step or step.stopped:
                return  # another thread's call dropped it already, or it was said
            step.stopped = True
            first = key not in copies.rebuilt
            if first:
                copies.rebuilt.add(key)
                del copies.steps[key]
        self._warn(f"generate: the decode graph for {where} stopped serving: its guards rejected the steps of a "
                   f"call ({step.missed} in all; the state it was built under changed, e.g. torch.set_num_threads "
                   "or a patched function), which ran eagerly; " + ("it is built again on the next call" if first
                                                                    else "again after one rebuild: left eager"))

    @staticmethod
    def _summary(clock: CallClock, batch: int, weight_bytes: int) -> dict:
        stats = clock.summary()
        per_token_s = stats["decode_ms_per_token"] / 1e3
        stats.update(batch=batch, tokens_per_s=batch / per_token_s if per_token_s > 0 else 0.0,
                     weight_bytes_per_token=weight_bytes,
                     weight_read_gb_s=weight_bytes / per_token_s / 1e9 if per_token_s > 0 else 0.0)
        return stats

