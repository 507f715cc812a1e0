"""A bf16 dot-product micro-kernel for Inductor's C++ GEMM template, on CPUs with AVX512_BF16 and no AMX.

Without AMX, the template's bf16 micro-kernel converts each weight to fp32 and multiplies with fp32 FMAs.
At one row a GEMM is bound by reading the weights either way; from two rows on (batched decode) it becomes
bound by those FMAs: on an AMD EPYC (AVX-512 in two 256-bit halves) a Qwen2-0.5B-shaped decode step took 23 ms
at batch 4 against 15 ms at batch 1. ``vdpbf16ps`` multiplies pairs of bf16 values straight into fp32
accumulators: twice the multiply-adds per instruction, no conversion. Weights are packed in pairs along K
(the template's VNNI2 layout, as for AMX), so one 64-byte load feeds 16 columns by 2 steps of K.

``bf16_dot_gemms()`` adds the kernel to Inductor's registry for the builds inside it and takes it out after
(hold ``config_lock``: the registry is process-wide); a user's own ``torch.compile`` never sees it."""
from __future__ import annotations

import torch

from .micro_kernels import PANELS, kernel_scope, recent_torch, vnni_kernel_class

MIN_ROWS = 2  # one row reads the weights at the memory's speed with the fp32 kernel already

_ENTRY = r"""
{{declare_kernel}} {
    {{kernel.assert_function}}(K % 2 == 0, "K must be even for the bf16 dot-product kernel");
""" + PANELS + r"""
        for (int64_t m = 0; m < M; m += {{block_m}}) {
            int64_t rows = std::min<int64_t>(M - m, {{block_m}});
            switch (rows) {
{%- for b in range(block_m, 0, -1) %}
            case {{b}}:
                {{kernel_name}}_dot<{{b}}, accum>(A + m * lda, panel, C + m * ldc + n, K, lda, panel_ldb, ldc);
                break;
{%- endfor %}
            }
        }
    }
}
"""

_KERNEL = r"""
template <int64_t ROWS, bool accum>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) __attribute__((noinline))
void {{kernel_name}}_dot(
    const {{input_t}}* {{restrict_keyword}} A,
    const {{input2_t}}* {{restrict_keyword}} B,
    float* {{restrict_keyword}} C,
    int64_t K,
    int64_t lda,
    int64_t ldb,
    int64_t ldc
) {
    constexpr int COLS = {{block_n}} / 16;
    __m512 acc[ROWS][COLS];
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 16
        for (int c = 0; c < COLS; ++c) {
            acc[r][c] = accum ? _mm512_loadu_ps(C + r * ldc + c * 16) : _mm512_setzero_ps();
        }
    }
    for (int64_t k = 0; k < K; k += 2) {
        __m512bh b[COLS];
#pragma GCC unroll 16
        for (int c = 0; c < COLS; ++c) {
            b[c] = (__m512bh)_mm512_loadu_si512(B + k * ldb + c * 32);
        }
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; ++r) {
            int32_t pair;
            std::memcpy(&pair, A + r * lda + k, sizeof(pair));
            __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 16
            for (int c = 0; c < COLS; ++c) {
                acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
            }
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 16
        for (int c = 0; c < COLS; ++c) {
            _mm512_storeu_ps(C + r * ldc + c * 16, acc[r][c]);
        }
    }
}
"""


def available() -> bool:
    """AVX512_BF16 without AMX (with AMX, Inductor's AMX kernel is the faster one), on a torch it was tested on."""
    cpu = torch.cpu
    try:
        return recent_torch() and bool(cpu._is_avx512_bf16_supported()) and not cpu._is_amx_tile_supported()
    except AttributeError:
        return False


def _kernel():
    import torch._inductor.compile_fx  # noqa: F401 - Inductor's codegen modules import in this order only
    from torch._inductor.codegen import cpp_micro_gemm as micro
    from torch._inductor.cpu_vec_isa import VecAVX512

    cls = vnni_kernel_class(micro, "CppMicroGemmBF16Dot", (_KERNEL, _ENTRY))
    configs = micro.generate_gemm_config(VecAVX512, [(4, 64, 2), (4, 32, 2)], input_dtype=torch.bfloat16,
                                         output_dtype=torch.float, extra_check=_rows_and_even_k)
    return micro, cls, configs


def _rows_and_even_k(config, m, n, k, alpha, num_threads, **kwargs) -> bool:
    return m >= MIN_ROWS and k % 2 == 0 and alpha == 1 and n % config.register_blocking.block_n == 0


def bf16_dot_gemms():
    """Inside: bf16 GEMMs of two rows or more get the dot-product kernel (where ``available()``)."""
    return kernel_scope(available(), "bf16 dot-product", _kernel)
