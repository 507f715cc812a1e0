"""A compiled prefill: one Inductor graph (freezing, dynamic shapes) of the prefill copy's forward on an
exact-length StaticCache, so every prompt length is served without a compile of its own (dynamo specialises
a size of 1: a graph built on one row serves one row; other batch sizes run the eager prefill).
Short prompts are bound by everything around the matmuls (norms, RoPE, casts between fp32 and bf16, oneDNN
repacking the weights on every call), which the graph fuses or does once: Qwen2-0.5B shape, 12 layers, bf16,
Xeon with AMX, 2 cores: 1.58x eager autocast at 128 tokens, 1.48x at 77, 1.35x at 300, 1.0x at 1024
(matmul-bound there).

The compile takes ~35 s on 2 cores, longer than many generate() calls, so it never runs inside one: the first
prefill's inputs are kept, and after that call returns a daemon thread compiles the graph, verifies it on
them against eager fp32 (logits and every key/value written to the cache, within the multiple of eager
autocast's own error that decode graphs get), and races it against the eager prefill it would replace. Only a
graph that passes both serves, in dynamo's run-only mode: a call its guards do not cover runs eagerly."""
from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..core.exitwait import wait_at_exit
from .cache import layer_states
from .judge import FP32_TOLERANCE, VERIFY_FLOOR, VERIFY_MULTIPLE, rel_error

OPTIONS = {"freezing": True}  # the C++ GEMM template packs per M: no gain at prefill sizes, a longer compile
ROUNDS = 3
# Dynamo's own bookkeeping can fail on a build in this thread while the caller's thread runs a first call of
# another batch size (seen: SpeculationLogDivergence, then a guard on a kwargs dict that "is None" when retried
# at once; Qwen2 shape, bf16 and int8): such a build is tried once more after the next call, from a fresh function.
ATTEMPTS = 2
_counter = itertools.count()


def _traced_function(model: nn.Module) -> Callable[..., Any]:
    """``model.forward(**kwargs)`` as a function of its own code object (its own dynamo cache entry)."""
    namespace: dict[str, Any] = {}
    source = "def prefill(**kwargs):\n    return model.forward(**kwargs)\n"
    exec(compile(source, f"<cpuboost-prefill-{next(_counter)}>", "exec"), {"model": model}, namespace)
    return namespace["prefill"]


def _dynamo_bookkeeping(exc: Optional[BaseException]) -> bool:
    """An error of dynamo's own state rather than of the model (or one dynamo wrapped around such an error): a
    divergence between a trace and its replay, or an assertion raised inside dynamo itself."""
    seen = 0
    while exc is not None and seen < 8:
        if type(exc).__name__ == "SpeculationLogDivergence":
            return True
        frame, tb = None, exc.__traceback__
        while tb is not None:
            frame, tb = tb.tb_frame, tb.tb_next
        if isinstance(exc, AssertionError) and frame is not None and "torch/_dynamo/" in frame.f_code.co_filename:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class PrefillGraph:
    """The compiled prefill of one set of private copies. ``prefill``: the copy the eager prefill runs on;
    ``reference``: the fp32 copy the judge compares with; ``new_cache(model, batch, length)``: an exact-length
    StaticCache for ``model``; ``cache_arg``: the name forward takes it under."""

    def __init__(self, prefill: nn.Module, reference: nn.Module, act_dtype: torch.dtype, cache_arg: str,
                 new_cache: Callable[..., Any], note: Callable[[str], None], race: bool = True) -> None:
        self._prefill, self._reference, self._dtype = prefill, reference, act_dtype
        self._cache_arg, self._new_cache, self._note, self._race_enabled = cache_arg, new_cache, note, race
        self.state = "not built"  # -> "pending" (an example kept) -> "building" -> "serving" | "refused: why"
        self.served = 0  # prefills the graph answered (a call its guards do not cover runs eagerly inside it)
        self._example: Optional[dict] = None
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._function = _traced_function(prefill)
        self._compiled: Any = None  # made in the build thread: importing dynamo costs a warm start 1.3 s
        self._run_only: Any = None
        self._attempts_left = ATTEMPTS

    def run(self, kwargs: dict) -> Optional[Any]:
        """The graph's output for this prefill once it serves; None otherwise (the caller runs eager on
        ``kwargs``, whose cache a failed graph replaced), keeping the first call's inputs as the build's example."""
        if self.state == "serving":
            try:
                out = self._run_only(**kwargs)
            except Exception as exc:  # never a failed call for the graph's sake: eager answers, and from now on,
                self._refuse(f"failed while serving ({type(exc).__name__}: {(str(exc) or '-').splitlines()[0][:200]})")
                kwargs[self._cache_arg] = self._fresh_cache(self._prefill, kwargs)  # one the graph did not touch
                return None
            self.served += 1
            return out
        if self.state == "not built":
            with self._lock:
                if self.state == "not built":
                    self._example = _private(kwargs, self._cache_arg)
                    self.state = "pending"
        return None

    def start_pending(self) -> None:
        """Starts the build thread if an example is waiting (called after the generate() that kept it)."""
        with self._lock:
            if self.state != "pending":
                return
            self.state = "building"
            self._thread = threading.Thread(target=self._build, name="cpuboost build: prefill graph", daemon=True)
        wait_at_exit(self._thread, "the compiled prefill's background build")
        self._thread.start()

    def wait(self, timeout: Optional[float] = None) -> bool:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    # -- the build thread ---------------------------------------------------------------------------
    def _build(self) -> None:
        from ..backends.inductor import config_lock

        example, self._example = self._example, None
        started = time.perf_counter()
        try:
            self._compiled = torch.compile(self._function, backend="inductor", dynamic=True)
            self._run_only = torch._dynamo.run(self._function)
            with torch.no_grad(), torch.autocast("cpu", dtype=self._dtype, enabled=self._dtype != torch.float32):
                import torch._inductor.config as inductor_config

                with config_lock(), inductor_config.patch(OPTIONS):
                    out, cache = self._call(self._compiled, self._prefill, example)
                seconds = time.perf_counter() - started
                ok, verdict = self._verify(example, out, cache)
                if not ok:
                    return self._refuse(f"failed verification: {verdict}")
                faster, timing = self._race(example)
            if not faster:
                return self._refuse(f"measured slower than the eager prefill ({timing})")
        except Exception as exc:  # a graph that cannot be built: the eager prefill keeps serving, and says why
            if self._attempts_left > 1 and _dynamo_bookkeeping(exc):  # a build at a quieter moment may pass
                return self._build_again(example, exc)
            return self._refuse(f"not built ({type(exc).__name__}: {(str(exc) or '-').splitlines()[0][:200]})")
        self.state = "serving"
        self._note(f"generate: compiled prefill (Inductor, freezing, dynamic prompt length) built in "
                   f"{seconds:.1f} s in the background; {verdict}; {timing}; it serves every prompt from now on")

    def _build_again(self, example: dict, exc: Exception) -> None:
        """Keeps the example for another build after the next generate() call, from a fresh function."""
        self._attempts_left -= 1
        self._function = _traced_function(self._prefill)  # a new code object: nothing of the failed build's state
        self._example, self.state = example, "pending"
        self._note(f"generate: compiled prefill build failed inside dynamo ({type(exc).__name__}: "
                   f"{(str(exc) or '-').splitlines()[0][:120]}); built again after the next call")

    def _refuse(self, why: str) -> None:
        self.state = f"refused: {why}"
        self._note(f"generate: compiled prefill {why}; the eager prefill serves")

    def _call(self, fn: Callable[..., Any], model: nn.Module, example: dict) -> tuple[Any, Any]:
        """``fn`` on the example with a fresh exact cache for ``model``: (output, that cache)."""
        cache = self._fresh_cache(model, example)
        return fn(**{**example, self._cache_arg: cache}), cache

    def _fresh_cache(self, model: nn.Module, kwargs: dict) -> Any:
        """An empty cache for ``model`` exactly as long as the prompt in ``kwargs``."""
        tokens = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        return self._new_cache(model, tokens.shape[0], tokens.shape[1])

    def _verify(self, example: dict, out: Any, cache: Any) -> tuple[bool, str]:
        """Logits and every cached key/value against eager fp32's, each within the multiple of eager autocast's
        own error (or the floor)."""
        yard, yard_cache = self._call(self._prefill.forward, self._prefill, example)
        with torch.autocast("cpu", enabled=False):
            ref, ref_cache = self._call(self._reference.forward, self._reference, example)
        pairs = [("logits", out.logits, yard.logits, ref.logits)]
        flat = [[t for pair in layer_states(c) for t in pair] for c in (cache, yard_cache, ref_cache)]
        for i, (o, y, r) in enumerate(zip(*flat)):
            pairs.append((f"cache tensor {i}", o, y, r))
        worst, worst_text = 0.0, ""
        for name, o, y, r in pairs:
            err, own = rel_error(o.float(), r.float()), rel_error(y.float(), r.float())
            limit = max(VERIFY_MULTIPLE * own, VERIFY_FLOOR if self._dtype != torch.float32 else FP32_TOLERANCE)
            if err > limit:
                return False, (f"{name}: rel err {err:.1e} vs fp32 > {limit:.1e} ({VERIFY_MULTIPLE:g}x autocast's "
                               f"{own:.1e})")
            if err / limit >= worst:
                worst, worst_text = err / limit, f"{name} rel err {err:.1e} vs autocast's own {own:.1e}"
        return True, f"{len(pairs)} tensors within bounds (closest: {worst_text})"

    def _race(self, example: dict) -> tuple[bool, str]:
        """Rounds of the graph then the eager prefill on the example; the median same-round ratio decides."""
        if not self._race_enabled:
            return True, "not timed (race=False)"
        ratios, graph_ms = [], []
        for _ in range(ROUNDS):
            begin = time.perf_counter()
            self._call(self._run_only, self._prefill, example)
            middle = time.perf_counter()
            self._call(self._prefill.forward, self._prefill, example)
            ratios.append((middle - begin) / (time.perf_counter() - middle))
            graph_ms.append((middle - begin) * 1e3)
        ratio, ms = sorted(ratios)[ROUNDS // 2], sorted(graph_ms)[ROUNDS // 2]
        tokens = example.get("input_ids", example.get("inputs_embeds"))
        return ratio < 1.0, (f"{1 / ratio:.2f}x the eager prefill at {tuple(tokens.shape[:2])} (median of {ROUNDS} "
                             f"rounds, {ms:.1f} ms)")


def _private(kwargs: dict, cache_arg: str) -> dict:
    """The prefill's inputs, cloned (the caller reuses its own), without the cache (each run makes its own)."""
    from torch.utils import _pytree as pytree

    kept = {k: v for k, v in kwargs.items() if k != cache_arg}
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), kept)

