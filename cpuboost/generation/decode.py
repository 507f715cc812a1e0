"""One compiled decode step per (batch, cache length), built with Inductor's config patched around the build
only (dynamo reads ``freezing`` while tracing, so ``torch.compile(options=)`` cannot carry it), then served in
dynamo's thread-local run-only mode: no compiler stance or config is changed while serving."""
from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Optional

import torch
from torch import nn

from .cache import unmark_static
from .weights import inductor_options

# Inductor settings per build attempt, best first. The C++ GEMM template (the only GEMM backend: no benchmarking)
# packs each frozen weight for its own micro-kernels: one-row matmuls 3.2x (bf16) / 1.9x (fp32) faster than the
# oneDNN/MKL calls of plain freezing; generate() 1.6x -> 2.6x over eager fp32 (bf16, 1 thread, this machine).
# It also takes weight-only int8 (aten's _weight_int8pack_mm, the scale as its epilogue): 2.0x plain freezing here;
# with AVX512_VNNI its GEMMs of up to 16 rows run cpuboost's int16 dot-product kernel (backends/int8_dot.py), with
# AMX_INT8 those of 2 to 16 rows its AMX kernel (backends/int8_amx.py).
BUILDS = (("freezing + C++ GEMM template", {"freezing": True, "max_autotune": True,
                                             "max_autotune_gemm_backends": "CPP"}),
          ("freezing", {"freezing": True}))
# Past a few rows a decode GEMM stops being bound by reading weights, and the template's micro-kernels can fall
# far behind oneDNN (12-layer Qwen2-shaped MLPs + LM head, bf16, no AMX: 13.6 against 22.2 ms at 1 row, 16.9
# against 17.6 at 4, but 58.8 against 23.4 at 8 and 112 against 33 at 16). There Inductor's autotuning picks per
# GEMM shape by timing each choice, which it gets right once the GEMM is compute-bound; at 1-4 rows its in-cache
# timings miss what streaming the weights costs (autotuned: 19.9 ms at 1 row, 21.0 at 4), so the template alone.
TEMPLATE_ROWS = 4
AUTOTUNED = ("freezing + GEMMs autotuned (C++ template or ATen, timed per shape)",
             {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"})


def builds_for(rows: int) -> tuple:
    """The Inductor settings to try for a decode step of ``rows`` sequences, best first."""
    return BUILDS if rows <= TEMPLATE_ROWS else (AUTOTUNED, *BUILDS[1:])


_counter = itertools.count()


class Step:
    """What the runner asks of a decode step, compiled here or loaded from a package: calls counted, the
    call's clock told when the first step starts, ``built`` once verified graphs serve."""

    def __init__(self, how: str) -> None:
        self.how, self.calls, self.built = how, 0, False
        self.missed = 0  # served calls the graph's guards rejected (a compiled step counts them; they ran eagerly)
        self.stopped = False  # the runner has said this step stopped serving
        self.example: Optional[dict] = None  # the first call's keywords, until the step is packaged or serves
        self._timing = threading.local()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        for value in kwargs.values():  # the static cache, under whichever name this transformers passes it
            if hasattr(value, "layers") or hasattr(value, "key_cache"):
                unmark_static(value)
        self.calls += 1
        if self.example is None and not self.built:
            self.example = dict(kwargs)
        clock = self._timing.__dict__.get("clock")
        if clock is not None and clock.first_step is None:
            clock.first_step = time.perf_counter()
        if clock is not None:
            clock.steps += 1
        return self._run(*args, **kwargs)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def timed(self, clock: "CallClock") -> "_Timed":
        return _Timed(self._timing, clock)


class DecodeStep(Step):
    """The decode forward of one (batch, cache length), compiled by Inductor on its first call. Once built,
    calls run in run-only mode (``torch._dynamo.run``, thread-local): inputs the verified graph's guards do not
    cover run eagerly, never a new, unverified graph. Concurrent calls are fine: each brings its own cache."""

    def __init__(self, model: nn.Module, how: str, options: dict) -> None:
        super().__init__(how)
        # A fresh code object per graph, so each owns its dynamo cache and dropping it frees the graph.
        namespace: dict[str, Any] = {}
        source = "def decode_step(*args, **kwargs):\n    return model(*args, **kwargs)\n"
        exec(compile(source, f"<cpuboost-decode-{next(_counter)}>", "exec"), {"model": model}, namespace)
        self._compiled = torch.compile(namespace["decode_step"], backend=self._counted_inductor, dynamic=False)
        self._run_only = torch._dynamo.run(namespace["decode_step"])
        self.model, self.options = model, inductor_options(model, options)
        self._graph_ran = threading.local()

    def _counted_inductor(self, graph: Any, example_inputs: Any) -> Any:
        """Inductor's graph, telling the calling thread it ran: in run-only mode a call the graph's guards
        reject (global state changed since the build: torch.set_num_threads, a patched function) runs eagerly
        without a word, and the runner must know to rebuild."""
        from torch._dynamo.backends.registry import lookup_backend

        compiled = lookup_backend("inductor")(graph, example_inputs)
        ran = self._graph_ran

        def run(*args: Any) -> Any:
            ran.yes = True
            return compiled(*args)
        return run

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        if self.built:
            self._graph_ran.yes = False
            out = self._run_only(*args, **kwargs)
            if not self._graph_ran.yes:
                self.missed += 1
            return out
        import torch._inductor.config as inductor_config

        from ..backends.inductor import config_lock, templates_parsed_once
        from ..backends.gemm_kernels import cpuboost_gemms

        # as every Inductor build: no other compile under the patch
        with config_lock(), inductor_config.patch(self.options), templates_parsed_once(), cpuboost_gemms():
            return self._compiled(*args, **kwargs)


class CallClock:
    """Wall times of one generate() call: prefill (start to the first decode step) and the decode steps."""

    def __init__(self) -> None:
        self.start, self.first_step, self.end, self.steps = time.perf_counter(), None, None, 0

    def summary(self) -> dict:
        end = self.end or time.perf_counter()
        first = self.first_step or end
        decode_ms = (end - first) * 1e3 / max(self.steps, 1)
        return {"prefill_ms": (first - self.start) * 1e3, "decode_ms_per_token": decode_ms,
                "decode_steps": self.steps}


class _Timed:
    def __init__(self, slot: threading.local, clock: CallClock) -> None:
        self._slot, self._clock = slot, clock

    def __enter__(self) -> CallClock:
        self._slot.clock = self._clock
        return self._clock

    def __exit__(self, *exc: Any) -> None:
        self._clock.end = time.perf_counter()
        self._slot.clock = None
