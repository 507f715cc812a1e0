"""Inductor, the native backend: torch.compile with freezing (weight prepack, constant folding, fused
epilogues), compiled now for one example input.

Inductor's config is patched only around the build, never globally. Each build compiles a runner with a
fresh code object, so every graph owns its dynamo cache entry and dropping it lets the compiled code go.
Call-time recompiles are forbidden: a guard miss raises instead of serving a graph nobody verified. That is
done per call and per thread (``serve_only``), never with ``torch.compiler.set_stance``: the stance is
process-wide, so threads interleaving its context manager could leave the user's own torch.compile in
``fail_on_recompile``.
"""
from __future__ import annotations

import contextlib
import functools
import platform
import threading
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from ..core.precision import fresh_runner

DynamicDims = Optional[Mapping[Any, list]]


class RecompileRefused(RuntimeError):
    """The compiled graph's guards rejected a call; the runtime treats it as a new signature."""


def _marked_dynamic(args: tuple, kwargs: dict, dynamic_dims: DynamicDims) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with each tensor of ``dynamic_dims`` replaced by an alias (``detach()``: same
    storage, a new tensor object) marked dynamic. ``mark_dynamic`` writes onto the tensor, and a marked tensor
    fails every compiled graph's guards that saw it unmarked ("_has_dynamo_dim_marking is present on runtime
    tensor"): marking the caller's own tensor made the next model it was passed to (another cpuboost graph, or
    the user's torch.compile) refuse or recompile."""
    if not dynamic_dims:
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for where, dims in dynamic_dims.items():
        holder = kwargs if isinstance(where, str) else args
        value = holder.get(where) if holder is kwargs else holder[where]
        if isinstance(value, torch.Tensor):
            holder[where] = value.detach()
            for dim in dims:
                torch._dynamo.mark_dynamic(holder[where], dim)
    return tuple(args), kwargs


def serve_only(compiled: nn.Module) -> Callable:
    """``compiled`` (a torch.compile'd module, already compiled) as a callable that runs its cached graphs and
    raises ``RecompileRefused`` where a guard rejects a call, instead of compiling or running eager.

    It installs, for the call and in the calling thread only (dynamo's eval-frame callback is thread-local),
    the same callback ``set_stance("fail_on_recompile")`` installs (torch/_dynamo/eval_frame.py
    ``_callback_from_stance``), naming the compiled backend so the cached entries' backend guard matches.
    ``torch._dynamo.run`` (callback False) would run eager silently on a guard miss: nothing to detect.
    A stance the user set process-wide still applies on top, as torch applies it to every compiled call."""
    from torch._dynamo import convert_frame, trace_rules
    from torch._dynamo.eval_frame import _TorchDynamoContext

    skip = getattr(convert_frame, "ConvertFrameReturn", lambda: None)  # None meant "skip" before torch 2.6

    def refuse_new_frame(frame: Any, *_: Any, **__: Any) -> Any:
        if trace_rules.check(frame.f_code) or not convert_frame.has_tensor_in_frame(frame):
            return skip()  # what the stance does: frames it would not compile
        raise RecompileRefused(f"a guard of the compiled graph rejected this call ({frame.f_code.co_name}, "
                               f"line {frame.f_lineno}); it would need a compile nobody verified")

    # the attribute dynamo's cache lookup follows to the backend: _orig_backend in torch 2.13, _orig_callable
    # before (torch 2.8, the IPEX environment's); each version reads only its own
    refuse_new_frame._torchdynamo_orig_backend = compiled.dynamo_ctx.callback  # type: ignore[attr-defined]
    refuse_new_frame._torchdynamo_orig_callable = compiled.dynamo_ctx.callback  # type: ignore[attr-defined]
    return _TorchDynamoContext(refuse_new_frame)(compiled.forward._torchdynamo_orig_callable)


def call_served(serve: Callable, *args: Any, **kwargs: Any) -> Any:
    """Calls a ``serve_only`` callable; the user's own process-wide fail_on_recompile stance raises torch's
    "Detected recompile" instead of ours: the same refusal."""
    try:
        return serve(*args, **kwargs)
    except RuntimeError as exc:
        if not isinstance(exc, RecompileRefused) and "Detected recompile" in str(exc):
            raise RecompileRefused(str(exc).splitlines()[0]) from exc
        raise


class CompiledGraph:
    """A compiled runner that may only run the graph built for it (no silent call-time recompile)."""

    def __init__(self, compiled: nn.Module, cpp_wrapper: bool) -> None:
        self.compiled = compiled
        self.cpp_wrapper = cpp_wrapper
        self.serve = serve_only(compiled)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call_served(self.serve, *args, **kwargs)


_PROBES_STARTED = threading.Event()


def start_isa_probes() -> None:
    """Start, once per process, Inductor's probes of the vector ISAs this CPU has (AMX, AVX-512, AVX2: each a
    g++ build of a test program against ATen's headers and a load in a subprocess), one thread each. Inductor runs
    them one after another at its first C++ codegen, ~10 s with an empty Inductor cache here; run side by side
    from the start of a build they overlap each other and the eager reference runs. Results land in Inductor's
    own caches (per ISA object, and the built test programs on disk under its file locks)."""
    if _PROBES_STARTED.is_set():
        return
    _PROBES_STARTED.set()
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor import cpu_vec_isa

        if inductor_config.cpp.vec_isa_ok is not None or platform.machine() not in ("x86_64", "AMD64"):
            return
        flags = cpu_vec_isa.x86_isa_checker()
        wanted = [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
    except Exception:  # noqa: BLE001 - another torch: Inductor probes at its own pace
        return
    for isa in wanted:
        threading.Thread(target=_probe, args=(isa,), name=f"cpuboost: Inductor probes {isa}", daemon=True).start()


def _probe(isa: Any) -> None:
    try:
        bool(isa)
    except Exception:  # noqa: BLE001 - Inductor's own probe at its first codegen says what is wrong
        pass


def config_lock() -> Any:
    """Dynamo's own compile lock (an RLock every dynamo compile takes, torch/_dynamo/convert_frame.py), held
    around a config patch and the compile it governs: Inductor's and dynamo's config are process-wide, so
    without it another thread's compile (another model's build, or the user's torch.compile) could compile
    under our patch, or two patches interleaving could leave one in place. It costs no parallelism: dynamo
    compiles one frame at a time anyway."""
    from torch._dynamo.convert_frame import compile_lock

    from ..integrations.transformers_guards import steady_output_registration

    start_isa_probes()
    steady_output_registration()  # every cpuboost build takes this lock: its graphs keep serving (see there)
    return compile_lock


@contextlib.contextmanager
def templates_parsed_once() -> Iterator[None]:
    """Inductor parses a GEMM template's jinja source again each time it renders one (every GEMM, for its
    choice and again for its kernel): a 12-layer decode step's 85 GEMMs spent ~5 s of a 50 s compile in jinja's
    parser. Inside this block (hold ``config_lock``: the class attribute is process-wide) each source is parsed
    once; the original comes back after."""
    try:
        from torch._inductor.codegen.common import KernelTemplate

        original = KernelTemplate.__dict__["_template_from_string"]
        parse = original.__func__
    except (ImportError, KeyError, AttributeError):  # another torch: nothing to memoize
        yield
        return
    KernelTemplate._template_from_string = staticmethod(functools.lru_cache(maxsize=None)(parse))
    try:
        with _index_expressions_parsed_once():
            yield
    finally:
        KernelTemplate._template_from_string = original


@contextlib.contextmanager
def _index_expressions_parsed_once() -> Iterator[None]:
    """The GEMM template's kernel parses the same few index strings ("m_end - m_start", "N"...) with sympy each
    time it renders a slice or an epilogue: 6460 parses, ~4.6 s of a profiled 12-layer int8 decode build. Sympy
    expressions are immutable, so each string is parsed once inside this block."""
    try:
        import sympy
        import torch._inductor.compile_fx  # noqa: F401 - first: the kernel module alone is a circular import
        from torch._inductor.codegen import cpp_template_kernel as module

        original = module.parse_expr_with_index_symbols
    except (ImportError, AttributeError):
        yield
        return
    parsed = functools.lru_cache(maxsize=None)(original)

    def parse_once(expr: Any) -> Any:
        if isinstance(expr, sympy.Expr):
            return expr
        if isinstance(expr, (list, tuple)):
            return [parse_once(e) for e in expr]
        return parsed(str(expr))

    module.parse_expr_with_index_symbols = parse_once
    try:
        yield
    finally:
        module.parse_expr_with_index_symbols = original


def compile_now(model: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype, cpp_wrapper: bool,
                dynamic_dims: DynamicDims = None, out_dtypes: Any = None) -> CompiledGraph:
    """Compile ``model`` under ``dtype``'s autocast for this input, with freezing; returns the callable.
    ``out_dtypes``: eager's output dtypes, cast to inside the graph (``PrecisionRunner``)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    compiled = torch.compile(fresh_runner(model, dtype, out_dtypes), backend="inductor",
                             dynamic=None if dynamic_dims else False)
    args, kwargs = _marked_dynamic(args, kwargs, dynamic_dims)
    with config_lock(), inductor_config.patch(freezing=True, cpp_wrapper=cpp_wrapper), \
            dynamo_config.patch(recompile_limit=64), torch.no_grad():
        compiled(*args, **kwargs)
    return CompiledGraph(compiled, cpp_wrapper)


def build(model: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype, note: Callable[[str], None],
          dynamic_dims: DynamicDims = None, out_dtypes: Any = None) -> CompiledGraph:
    """Inductor's C++ wrapper first (kernels called without a Python line per op: 1.16x ResNet-50 b1 bf16,
    1.07x BERT-base b1 over the Python wrapper, benchmarks/wrapper.py on AMX); the Python wrapper where the
    C++ one cannot compile the model, with the reason noted."""
    try:
        graph = compile_now(model, args, kwargs, dtype, cpp_wrapper=True, dynamic_dims=dynamic_dims,
                            out_dtypes=out_dtypes)
    except Exception as exc:  # any C++-wrapper failure: the Python wrapper is the same graph, proven
        note(f"C++ wrapper failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); Python wrapper used")
        return compile_now(model, args, kwargs, dtype, cpp_wrapper=False, dynamic_dims=dynamic_dims,
                           out_dtypes=out_dtypes)
    note("C++ wrapper")
    return graph
