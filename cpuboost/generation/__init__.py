"""``generate()`` for transformers causal LMs: a private low-precision copy, a prefill (eager, then compiled in
the background), and one verified Inductor graph per decode step on a static KV cache (bf16/fp16/fp32 weights,
or weight-only int8/int4).
Chosen by measurement (benchmarks/generate.py, benchmarks/llm.py):

- The private copy shares every tensor with the user's model except the matmul weights (``nn.Linear``,
  transformers ``Conv1D``), held once in the low-precision dtype; it runs under autocast, whose own casts of
  those weights give the very same values, so nothing is re-cast per step and a step reads half the bytes.
  Weight-only int8/int4 read a half/quarter of that again (weights.py).
- Prefill (one call per ``generate``, any prompt length) runs that copy eagerly.
- Each decode step runs a graph compiled with freezing and Inductor's C++ GEMM template on a ``StaticCache``
  cpuboost makes (cache.py: the same in transformers 4.51 and every 5.x), with math attention (fused by
  Inductor). The cache length is a bucket (128, 256, ... up to ``max_cache_len``): one graph per (batch,
  bucket) serves every prompt and ``max_new_tokens`` that fits. Each graph is verified on the call that builds
  it against eager fp32, with the dtype's own eager error as the yardstick, and timed against eager fp32.
- transformers' own loop drives everything (greedy, sampling, processors, stopping, streamers, dict outputs):
  the copy's ``get_compiled_call`` and ``_valid_auto_compile_criteria`` point at the decode graph.
"""
from .entry import generate_for
from .route import GenerationLengthError, can_route
from .runner import GenerationRunner

__all__ = ["GenerationLengthError", "GenerationRunner", "can_route", "generate_for"]
