"""An AMX micro-kernel for weight-only int8 GEMMs of 2 to 16 rows (batched decode) in Inductor's C++ GEMM template.

At one row a weight-only int8 decode GEMM is bound by reading the weights and cpuboost's int16 dot-product
kernel (backends/int8_dot.py) reads them at the memory's speed; at four rows that kernel needs four ``vpdpwssd``
per 32 weights and becomes bound by them (Qwen2-0.5B-shaped decode step on an AMX Xeon: 12.3 ms at batch 1,
19.0 ms at batch 4). AMX multiplies int8 tiles without converting the weights at all (``tdpbusd``/``tdpbssd``:
16 columns by 64 steps of K per instruction), so rows come almost free. The activations keep the int16
kernel's precision (the same codes, one scale per row and 512 columns): each code is split into an unsigned low
byte and a signed high byte, multiplied as two int8 tiles, and recombined as 256 * high + low after each chunk
(int32 sums: at most 512 * 255 * 128 < 2^31). No rounding beyond the int16 kernel's.

``int8_amx_gemms()`` adds the kernel to Inductor's registry for the builds inside it and takes it out after
(hold ``config_lock``); it ranks above the int16 kernel where both fit. It is registered under the VNNI ISA
class as well as Inductor's ``VecAMX``: Inductor skips every ``VecAMX`` kernel for weight-only int8 GEMMs under
5 rows, and from 5 rows on its own AMX kernel (which converts every weight to bf16) ranks above any VNNI one."""
from __future__ import annotations

import torch

from .int8_dot import CHUNK, PREFETCH, QUANTIZE, SLOTS, quantized_rows_class
from .micro_kernels import PANELS, kernel_scope, recent_torch

MIN_ROWS = 2  # one row is bound by memory either way: the int16 kernel keeps it
MAX_ROWS = 16  # an AMX tile's rows; a prefill's many rows keep Inductor's own kernels
STEP = 64  # steps of K per int8 tile row
BLOCK = (2, 32, 64)  # (rows, columns, K): 2 rows rank it above the int16 kernel's (4, 32, 2) at every M it takes

_DOT = r"""
#include <sys/syscall.h>
#include <unistd.h>

inline bool {{kernel_name}}_amx_permitted() {
    // Linux hands a process AMX's tile state only on request: torch.cpu._init_amx() and AOTInductor's package
    // loader ask; a graph loaded another way might not have
    static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return permitted;
}

struct {{kernel_name}}_tilecfg {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

__attribute__((target("amx-tile"))) inline void {{kernel_name}}_configure(int64_t rows, {{kernel_name}}_rows& state) {
    // tiles 0-3: int32 sums (low x columns 0-15, low x 16-31, high x 0-15, high x 16-31); 4-5: the low and high
    // bytes of the rows; 6-7: 64 steps of K by 16 columns of weights (VNNI4: 4 steps of K per 4-byte column)
    if (state.tile_rows == rows) {
        return;
    }
    {{kernel_name}}_tilecfg cfg{};
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = t < 6 ? static_cast<uint8_t>(rows) : 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    state.tile_rows = rows;
}

template <bool accum>
__attribute__((target("avx512f,avx512bw,amx-tile,amx-int8"))) __attribute__((noinline))
void {{kernel_name}}_amx(
    {{kernel_name}}_rows& state,
    const {{kernel_name}}_block& block,
    int64_t m0,
    int64_t rows,
    const {{input2_t}}* {{restrict_keyword}} B,
    float* {{restrict_keyword}} C,
    int64_t K,
    int64_t ldb,
    int64_t ldc
) {
    {{kernel_name}}_configure(rows, state);
    const uint8_t* low = block.low.data() + m0 * block.width;
    const int8_t* high = block.high.data() + m0 * block.width;
    const float* scales = block.scales.data() + m0 * block.chunks;
    alignas(64) int32_t sums[4][16][16];
    const __m512 shift = _mm512_set1_ps(256.f);
    for (int64_t chunk = 0; chunk < block.chunks; ++chunk) {
        const int64_t k0 = chunk * {{chunk}}, k1 = std::min<int64_t>(K, k0 + {{chunk}});
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = k0; k < k1; k += {{step}}) {
            const char* ahead = reinterpret_cast<const char*>(B + (k + {{prefetch}}) * ldb);
#pragma GCC unroll 32
            for (int line = 0; line < {{step}} * 32 / 64; ++line) {
                _mm_prefetch(ahead + line * 64, _MM_HINT_T0);
            }
            _tile_loadd(4, low + k, block.width);
            _tile_loadd(5, high + k, block.width);
            _tile_loadd(6, B + k * ldb, ldb * 4);
            _tile_loadd(7, B + k * ldb + 64, ldb * 4);
            _tile_dpbusd(0, 4, 6);
            _tile_dpbusd(1, 4, 7);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
        }
        _tile_stored(0, sums[0], 64);
        _tile_stored(1, sums[1], 64);
        _tile_stored(2, sums[2], 64);
        _tile_stored(3, sums[3], 64);
        for (int64_t r = 0; r < rows; ++r) {
            const __m512 scale = _mm512_set1_ps(scales[r * block.chunks + chunk]);
            for (int c = 0; c < 2; ++c) {
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_load_si512(sums[c][r]));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_load_si512(sums[2 + c][r]));
                float* out = C + r * ldc + c * 16;
                const __m512 before = (accum || chunk > 0) ? _mm512_loadu_ps(out) : _mm512_setzero_ps();
                _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_fmadd_ps(hi, shift, lo), scale, before));
            }
        }
    }
}
"""

_ENTRY = r"""
{{declare_kernel}} {
    {{kernel.assert_function}}(K % {{step}} == 0, "K must be a multiple of 64 for the AMX int8 kernel");
    {{kernel.assert_function}}({{kernel_name}}_amx_permitted(), "the OS refused AMX tile state to this process");
    const auto& block = rows.find(A, M, K, lda);  // quantized once per A block and thread, not per column panel
""" + PANELS + r"""
        for (int64_t m = 0; m < M; m += 16) {
            {{kernel_name}}_amx<accum>(rows, block, m, std::min<int64_t>(M - m, 16), panel, C + m * ldc + n, K,
                                       panel_ldb, ldc);
        }
    }
}
"""


def available() -> bool:
    """AMX_INT8 tiles this process may use (``torch.cpu._init_amx`` asks Linux for them), on a tested torch."""
    try:
        return (recent_torch() and bool(torch.cpu._is_amx_tile_supported()) and bool(torch.cpu._init_amx())
                and bool(torch.cpu._is_vnni_supported()))
    except AttributeError:
        return False


def _kernel():
    import torch._inductor.compile_fx  # noqa: F401 - Inductor's codegen modules import in this order only
    from torch._inductor.codegen import cpp_micro_gemm as micro
    from torch._inductor.cpu_vec_isa import VecAMX, VecAVX512VNNI

    class CppMicroGemmInt8Amx(quantized_rows_class(micro, "CppMicroGemmInt8AmxRows", (QUANTIZE, _DOT, _ENTRY),
                                                   vnni=4, chunk=CHUNK, step=STEP, planes=True, pad=STEP,
                                                   slots=SLOTS, prefetch=PREFETCH)):
        def codegen_finalize(self, kernel) -> str:  # the thread's tiles, configured by its first call
            return "if (rows.tile_rows >= 0) { _tile_release(); }"

    def fits(config, m, n, k, alpha, num_threads, **kwargs) -> bool:
        return (isinstance(kwargs.get("vec_isa"), VecAMX) and MIN_ROWS <= m <= MAX_ROWS and k % STEP == 0
                and alpha == 1 and n % config.register_blocking.block_n == 0 and not kwargs.get("q_group_size")
                and not kwargs.get("dynamic_M"))

    configs = [config for isa in (VecAVX512VNNI, VecAMX)  # VecAMX: above Inductor's AMX kernel from 5 rows on
               for config in micro.generate_gemm_config(isa, [BLOCK], input_dtype=torch.bfloat16,
                                                        input2_dtype=torch.int8, output_dtype=torch.float,
                                                        compute_dtype=torch.float, extra_check=fits)]
    return micro, CppMicroGemmInt8Amx, configs


def int8_amx_gemms():
    """Inside: weight-only int8 GEMMs (bf16 activations) of ``MIN_ROWS`` to ``MAX_ROWS`` rows get the AMX kernel."""
    return kernel_scope(available(), "int8 AMX", _kernel)
