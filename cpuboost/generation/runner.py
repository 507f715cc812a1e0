"""``generate()`` for transformers causal LMs: a private low-precision copy, eager prefill, and one Inductor
graph per decode step on a static KV cache. Chosen by measurement (benchmarks/generate.py):

- The private copy shares every tensor with the user's model except the matmul weights (``nn.Linear``,
  transformers ``Conv1D``), held once in the low-precision dtype; it runs under autocast, whose own casts of
  those weights give the very same values, so nothing is re-cast per step and a step reads half the bytes.
- Prefill (one call per ``generate``, any prompt length) runs that copy eagerly.
- Each decode step runs a graph compiled with freezing and Inductor's C++ GEMM template on transformers'
  ``StaticCache``, with math attention (fused by Inductor). The cache length is a bucket (128, 256, ... up to
  ``max_cache_len``): one graph per (batch, bucket) serves every prompt and ``max_new_tokens`` that fits. Each
  graph is verified on the call that builds it against eager fp32, with eager autocast's own error as the
  yardstick (fp32: within 1e-4 and the same tokens), and timed against eager fp32.
- transformers' own loop drives everything (greedy, sampling, processors, stopping, streamers, dict outputs):
  the copy's ``get_compiled_call`` and ``_valid_auto_compile_criteria`` point at the decode graph.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
import sys
import threading
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import CpuBoostError

MIN_BUCKET = 128
_VERIFY_MULTIPLE = 3.0  # low precision passes within this multiple of eager autocast's own error vs fp32
_VERIFY_FLOOR = 1e-3  # ... or this relative error, whichever is larger (autocast can be exact on a tiny model)
_FP32_TOLERANCE = 1e-4
# Arguments that take over the cache or the compile: honoured, so the static route steps aside.
_CALLER_CACHE_ARGS = ("cache", "past_key_values", "cache_implementation", "compile_config", "disable_compile",
                      "prefill_chunk_size", "assistant_model", "prompt_lookup_num_tokens", "custom_generate")
_counter = itertools.count()


class GenerationLengthError(CpuBoostError, ValueError):
    """``generate()`` asked for more positions than the runner's static KV cache holds."""


def can_route(model: Any) -> Optional[str]:
    """None when ``model.generate`` can run on a :class:`GenerationRunner`, else the reason it cannot."""
    if not isinstance(model, nn.Module) or not callable(getattr(model, "generate", None)):
        return f"{type(model).__name__} has no generate() method"
    try:
        from transformers import GenerationMixin
    except ImportError:
        return "transformers is not installed; only its GenerationMixin.generate is routed"
    if not isinstance(model, GenerationMixin):
        return f"{type(model).__name__}.generate is its own, not transformers' GenerationMixin.generate"
    if getattr(type(model).generate, "__qualname__", "") != "GenerationMixin.generate":
        return (f"{type(model).__name__} overrides generate() ({type(model).generate.__qualname__}); "
                "cpuboost cannot tell what it runs")
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not routed yet (only decoder-only causal LMs)"
    if getattr(model, "hf_quantizer", None) is not None:
        return "the model is quantized by transformers (hf_quantizer); its own kernels serve"
    if any(p.device.type != "cpu" for p in model.parameters()):
        return "the model has parameters off the CPU (or split across devices)"
    return None


def _shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` holding the very same Parameter and buffer objects (no tensor copied)."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    with torch.no_grad():
        return copy.deepcopy(model, memo)


class _FlatLinear(nn.Linear):
    """``nn.Linear`` on a 2-D view of its input. CPU bf16 linear of a strided 3-D input (the LM head after
    ``logits_to_keep`` slicing in prefill) takes a bmm path that copies the whole weight on every call:
    70 ms instead of 5 ms for a 16000x512 head on one thread here. Same GEMM, same numerics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() <= 2:
            return nn.functional.linear(x, self.weight, self.bias)
        out = nn.functional.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def _cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Give each matmul layer of ``model`` (a shared copy) its own ``dtype`` weight and bias; tied weights
    (an LM head sharing the embedding) are untied in the copy only, so the embedding stays fp32."""
    cast: dict[int, nn.Parameter] = {}
    for module in model.modules():
        # Conv1D: GPT-2's layer; its addmm is one autocast runs in low precision too
        if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        if type(module) is nn.Linear:
            module.__class__ = _FlatLinear
        for name in ("weight", "bias"):
            param = module._parameters.get(name)
            if param is None or not param.is_floating_point() or param.dtype == dtype:
                continue
            if id(param) not in cast:
                cast[id(param)] = nn.Parameter(param.detach().to(dtype), requires_grad=False)
            module._parameters[name] = cast[id(param)]
    return len(cast)


def _math_attention(model: nn.Module) -> Optional[str]:
    """Switch a private copy from SDPA to transformers' eager (math) attention, which Inductor fuses in the
    decode graph; SDPA stays an opaque flash-attention call per layer costing more than the layer's matmuls
    for one query (1.47x -> 1.61x over eager fp32 here). Flash/flex/custom attention is left alone."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return None
    try:
        model.set_attn_implementation("eager")
    except Exception as exc:  # a model that cannot switch keeps SDPA, and says so
        return f"attention stays sdpa ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return f"the decode copy runs {config._attn_implementation} attention (the model's is sdpa)"


def _unmark_static(cache: Any) -> None:
    """StaticCache marks its tensors as static addresses (for CUDA graphs), which freezing would bake into
    the graph as constants (stale cache, index errors). On CPU the mark buys nothing: drop it."""
    for layer in getattr(cache, "layers", ()):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and hasattr(value, "_dynamo_static_input_type"):
                del value._dynamo_static_input_type


# Inductor settings per build attempt, best first. The C++ GEMM template (the only GEMM backend: no benchmarking)
# packs each frozen weight for its own micro-kernels: one-row matmuls 3.2x (bf16) / 1.9x (fp32) faster than the
# oneDNN/MKL calls of plain freezing; generate() 1.6x -> 2.6x over eager fp32 (bf16, 1 thread, this machine).
_BUILDS = (("freezing + C++ GEMM template", {"freezing": True, "max_autotune": True,
                                              "max_autotune_gemm_backends": "CPP"}),
           ("freezing", {"freezing": True}))


class _DecodeStep:
    """The decode forward of one (batch, cache length), compiled by Inductor on its first call."""

    def __init__(self, model: nn.Module, how: str, options: dict) -> None:
        # A fresh code object per graph, so each owns its dynamo cache and dropping it frees the graph.
        namespace: dict[str, Any] = {}
        source = "def decode_step(*args, **kwargs):\n    return model(*args, **kwargs)\n"
        exec(compile(source, f"<cpuboost-decode-{next(_counter)}>", "exec"), {"model": model}, namespace)
        self._compiled = torch.compile(namespace["decode_step"], backend="inductor", dynamic=False)
        self.how, self._options, self.calls, self.built = how, options, 0, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _unmark_static(kwargs.get("cache"))
        self.calls += 1
        if self.built:
            # inputs the verified graph does not cover (other model kwargs) run eagerly, never an unverified graph
            with torch.compiler.set_stance("eager_on_recompile"):
                return self._compiled(*args, **kwargs)
        import torch._inductor.config as inductor_config

        with inductor_config.patch(self._options):
            return self._compiled(*args, **kwargs)


class _Call:
    """What one generate() call asks for, read the way transformers reads it."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        config = kwargs.get("generation_config") or model.generation_config
        self._kwargs = kwargs

        def setting(name: str, default: Any = None) -> Any:
            value = kwargs[name] if name in kwargs else getattr(config, name, default)
            return default if value is None else value

        self.prompt = prompt = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        self.refusal: Optional[str] = None
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.dtype.is_floating_point:
            self.refusal = "no input_ids prompt to size the static cache by (inputs_embeds are not routed yet)"
            return
        self.prompt_len = prompt.shape[1]
        self.copies = int(setting("num_return_sequences", 1)) if setting("do_sample", False) else 1
        self.batch = prompt.shape[0] * self.copies
        self.max_new = kwargs.get("max_new_tokens", config.max_new_tokens)
        self.needed = self.prompt_len + self.max_new if self.max_new is not None else int(setting("max_length", 20))
        caller = [name for name in _CALLER_CACHE_ARGS if kwargs.get(name) is not None]
        if caller:
            self.refusal = f"the call passes {', '.join(caller)}; transformers handles it as asked"
        elif int(setting("num_beams", 1)) > 1:
            self.refusal = "beam search (num_beams > 1) runs on a dynamic cache"
        elif setting("use_cache", True) is False:
            self.refusal = "use_cache=False"

    def probe(self) -> dict:
        """Two greedy steps on this call's prompt and graph shapes, returning the raw logits of each."""
        probe = {k: self._kwargs[k] for k in ("attention_mask", "pad_token_id", "eos_token_id") if k in self._kwargs}
        probe.update(input_ids=self.prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False, num_beams=1,
                     output_logits=True, return_dict_in_generate=True)
        for name in {"input_ids", "attention_mask"} & probe.keys():  # sampled sequences: rows of the batch
            probe[name] = probe[name].repeat_interleave(self.copies, 0)
        return probe


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-6)


def _judge(ref: Any, yard: Any, out: Any, low_precision: bool) -> tuple[bool, str]:
    """Step-wise logits of the served path vs eager fp32 (``ref``); ``yard`` is eager autocast's own run."""
    if not low_precision:
        err = max(_rel_error(o, r) for o, r in zip(out.logits, ref.logits))
        same = torch.equal(out.sequences, ref.sequences)
        return err <= _FP32_TOLERANCE and same, (f"fp32 logits rel err {err:.1e} (<= {_FP32_TOLERANCE:.0e}), "
                                                 f"tokens {'equal' if same else 'DIFFER'}")
    start, errors = ref.sequences.shape[1] - len(ref.logits), []
    for i, (o, r, y) in enumerate(zip(out.logits, ref.logits, yard.logits)):
        same = lambda a, b, n=start + i: torch.equal(a.sequences[:, :n], b.sequences[:, :n])  # noqa: E731
        if same(out, ref) and same(yard, ref):
            errors.append((_rel_error(o, r), _rel_error(y, r)))
        elif same(out, yard):  # fp32 took another token at a near-tie: autocast took this path, compare there
            errors.append((_rel_error(o, y), errors[0][1]))
    ok = all(err <= max(_VERIFY_MULTIPLE * own, _VERIFY_FLOOR) for err, own in errors) and len(errors) > 0
    text = ", ".join(f"step {i}: {err:.1e} vs autocast {own:.1e}" for i, (err, own) in enumerate(errors))
    return ok, f"logits rel err vs fp32 {text} (limit {_VERIFY_MULTIPLE:g}x autocast's, floor {_VERIFY_FLOOR:.0e})"


class GenerationRunner:
    """Built once per (model, dtype); holds what ``generate()`` runs on. ``generate`` has the signature and
    outputs of ``original.generate``; ``note`` gets one line per decision; ``refresh()`` re-reads the
    original's weights (cheap: structural copies and one cast; graphs rebuild and re-verify on next use)."""

    def __init__(self, original: nn.Module, dtype: torch.dtype = torch.bfloat16,
                 note: Optional[Callable[[str], None]] = None, *, max_cache_len: Optional[int] = None,
                 compile: bool = True, race: bool = True,
                 build_lock: Optional[contextlib.AbstractContextManager] = None) -> None:
        self._original = original
        self._build_lock = build_lock or contextlib.nullcontext()  # the runtime's lock serializing compiles
        self.dtype, self.low_precision = dtype, dtype != torch.float32
        self._note = note or (lambda text: None)
        self.reason = can_route(original)
        config = getattr(original, "config", None)
        self.max_cache_len = int(max_cache_len or getattr(config, "max_position_embeddings", None) or 2048)
        self._compile, self._race_enabled, self._lock, self._noted = compile, race, threading.RLock(), set()
        self._steps: dict[tuple[int, int], Any] = {}  # (batch, bucket) -> _DecodeStep, or the reason it is eager
        self._active: Optional[_DecodeStep] = None
        # _reference: fp32, shares every tensor with the original; _work: the eager fallback (low-precision
        # matmul weights, the model's attention); _static: the static route (same tensors, math attention)
        if self.reason is None:
            self.refresh()

    def refresh(self) -> None:
        """Re-read the original's weights: new private copies, every decode graph dropped."""
        with self._lock:
            self._steps.clear()
            # fp32 reference for verification, and the eager fallback where dtype is fp32: shares every tensor.
            self._reference = _shared_copy(self._original).eval()
            work = self._reference
            if self.low_precision:  # the eager fallback in low precision: matmul weights cast once
                work = _shared_copy(self._original).eval()
                self._note(f"generate: {_cast_matmul_weights(work, self.dtype)} matmul weight(s) held in "
                           f"{self.dtype} by the private copy")
            # The static route's copy shares the fallback's tensors; it alone switches to math attention,
            # since transformers builds the mask for the attention the model is set to.
            static = _shared_copy(work)
            attention = _math_attention(static)
            if attention:
                self._note(f"generate: {attention}")
            # transformers asks these two on every generate(); the answers point at this call's decode graph.
            static.get_compiled_call = lambda compile_config=None: self._active
            static._valid_auto_compile_criteria = lambda model_kwargs, generation_config: self._active is not None
            self._work, self._static = work, static

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        why = self.reason or ("the model is in train mode" if self._original.training else None)
        if why is not None:
            self._note_once(f"generate: eager (the original's own): {why}")
            return self._original.generate(*args, **kwargs)
        with self._lock:
            call = _Call(self._work, args, kwargs)
            if call.refusal is None:
                bucket = self._bucket(call)  # raises before anything runs
                key = (call.batch, bucket)
                if key not in self._steps:
                    self._steps[key] = self._build(call, bucket) if self._compile else "compile=False"
                if isinstance(self._steps[key], _DecodeStep):
                    return self._run_static(self._steps[key], bucket, args, kwargs)
                why = self._steps[key]
            self._note_once(f"generate: eager private copy ({self.dtype}), dynamic cache: {why or call.refusal}")
            with self._precision():
                return self._work.generate(*args, **kwargs)

    # -- internals ----------------------------------------------------------------------------------
    def _precision(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=self.dtype, enabled=self.low_precision)

    def _note_once(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text), self._note(text)

    def _bucket(self, call: _Call) -> int:
        if call.needed > self.max_cache_len:
            room = self.max_cache_len - call.prompt_len
            fix = f"ask for max_new_tokens <= {room}" if room > 0 else "shorten the prompt"
            what = (f"max_new_tokens={call.max_new} after a {call.prompt_len}-token prompt"
                    if call.max_new is not None else f"max_length={call.needed}")
            msg = (f"{what} needs a {call.needed}-position KV cache; this model's static cache holds "
                   f"{self.max_cache_len} (max_cache_len, by default config.max_position_embeddings). "
                   f"Either {fix}, or build the runner with max_cache_len>={call.needed}.")
            raise GenerationLengthError(msg)
        return min(MIN_BUCKET << max(0, math.ceil(math.log2(call.needed / MIN_BUCKET))), self.max_cache_len)

    def _build(self, call: _Call, bucket: int) -> Any:
        """Compile, verify and time the decode graph for this key on this call's prompt; else the reason."""
        started, probe, where = time.perf_counter(), call.probe(), f"batch {call.batch}, cache {bucket}"
        ref, yard = self._eager_fp32(**probe), None
        if self.low_precision:
            with torch.no_grad(), torch.autocast("cpu", dtype=self.dtype):
                yard = self._reference.generate(**probe)
        failures = []
        with self._build_lock:
            for how, options in _BUILDS:
                step = _DecodeStep(self._static, how, options)
                try:
                    out = self._run_static(step, bucket, (), probe)
                    break
                except Exception as exc:  # a compile failure: say why, try the next settings, then eager
                    failures.append(f"{how}: {type(exc).__name__}: {(str(exc) or '-').splitlines()[0][:160]}")
                    self._note(f"generate: decode graph for {where} failed ({failures[-1]})")
            else:
                return "decode graph failed to build: " + "; ".join(failures)
        seconds = time.perf_counter() - started
        if step.calls == 0:
            return self._refuse(where, "transformers never called get_compiled_call (changed generate loop?)")
        ok, verdict = _judge(ref, yard, out, self.low_precision)
        if not ok:
            return self._refuse(where, f"failed verification: {verdict}")
        step.built = True
        faster, timing = self._race(step, bucket, probe)
        if not faster:
            return self._refuse(where, f"measured slower than eager fp32 ({timing})")
        self._note(f"generate: decode graph ({step.how}) for {where} built in {seconds:.1f} s; {verdict}; {timing}")
        return step

    def _refuse(self, where: str, why: str) -> str:
        self._note(f"generate: decode graph for {where} not used: {why}")
        return f"decode graph {why}"

    def _eager_fp32(self, **kwargs: Any) -> Any:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            return self._reference.generate(**kwargs)

    def _race(self, step: _DecodeStep, bucket: int, probe: dict) -> tuple[bool, str]:
        """Three rounds of 8-token greedy calls, the verified graph then eager fp32 (DESIGN 8): it serves unless
        the median same-round ratio says it is slower. race=False skips this (tests on noisy machines)."""
        if not self._race_enabled:
            return True, "not timed (race=False)"
        timing = dict(probe, max_new_tokens=8, min_new_tokens=8, output_logits=False, return_dict_in_generate=False)
        ratios = []
        for _ in range(3):
            begin = time.perf_counter()
            self._run_static(step, bucket, (), timing)
            middle = time.perf_counter()
            self._eager_fp32(**timing)
            ratios.append((middle - begin) / (time.perf_counter() - middle))
        ratio = sorted(ratios)[1]
        return ratio < 1.0, f"{1 / ratio:.2f}x eager fp32 over 8 tokens (median of 3 rounds)"

    def _run_static(self, step: _DecodeStep, bucket: int, args: tuple, kwargs: dict) -> Any:
        work = self._static
        # transformers keeps the largest cache length ever used on the model and reuses it: one bucket per call.
        work.__dict__.pop("_previous_max_cache_length", None)
        self._active = step
        try:
            with self._precision():
                return work.generate(*args, **kwargs, cache_implementation="static", max_cache_len=bucket)
        finally:
            self._active = None

    def describe(self) -> dict:
        """Route per (batch, cache bucket): 'compiled' or the reason it runs eagerly."""
        if self.reason is not None:
            return {"route": "eager (original)", "reason": self.reason}
        return {f"batch {b}, cache {n}": ("compiled" if isinstance(s, _DecodeStep) else s)
                for (b, n), s in self._steps.items()}


def generate_for(optimized: Any, *args: Any, **kwargs: Any) -> Any:
    """``OptimizedModule.generate`` (core/module.py binds it): one runner per optimized module, kept in its
    ``_generation`` slot, which ``invalidate()`` clears, so a weight edit seen by its watch rebuilds it."""
    optimized._check_fresh()
    runner = optimized.__dict__.get("_generation")
    if runner is None:
        from .freshness import WeightWatch

        if optimized.__dict__.get("_watch") is None:
            optimized.__dict__["_watch"] = WeightWatch(optimized._original)
        options = optimized._options
        runner = GenerationRunner(optimized._original, options.amp_dtype or torch.float32, optimized._report.note,
                                  compile=options.fusion and options.backend in ("auto", "native"),
                                  build_lock=getattr(sys.modules[type(optimized).__module__], "_BUILD_LOCK", None))
        optimized.__dict__["_generation"] = runner
    return runner.generate(*args, **kwargs)
