"""An int16 dot-product micro-kernel for weight-only int8 GEMMs in Inductor's C++ GEMM template (AVX512_VNNI).

A weight-only int8 decode step should be bound by reading the weights, at half bf16's bytes. Inductor's own
kernel for bf16 activations and int8 weights converts every weight to fp32 (sign-extend, convert) and then
multiplies with fp32 FMAs: three instructions per 16 weights, and at one row it runs out of instructions before
it runs out of memory (Qwen2-0.5B-shaped LM head, one row, on an AMX Xeon: 20 GB/s against bf16's 27).
``vpdpwssd`` multiplies pairs of int16 values into int32 accumulators: one sign-extending load and one
instruction per 32 weights. The activation rows are held as int16 for that, one scale per row and 512 columns
(rounding error under 2^-15 of the chunk's largest value, far below the bf16 rounding the activations already
carry), quantized once per GEMM call and thread; each 512-column chunk's int32 sums (at most
512 * 32767 * 128 < 2^31: no overflow) are scaled into fp32 accumulators. Weights are packed in pairs along K
(the template's VNNI2 layout), so one 32-byte load feeds 16 columns by 2 steps of K.

``int8_dot_gemms()`` adds the kernel to Inductor's registry for the builds inside it and takes it out after
(hold ``config_lock``: the registry is process-wide); a user's own ``torch.compile`` never sees it. On CPUs
with AMX_INT8 the GEMMs of 2 rows and more go to cpuboost's AMX kernel (backends/int8_amx.py), which shares
this kernel's activation codes (``QUANTIZE``)."""
from __future__ import annotations

import torch

from .micro_kernels import PANELS, kernel_scope, recent_torch, vnni_kernel_class

MAX_ROWS = 16  # decode-sized GEMMs; a prefill's many rows keep Inductor's own kernels
PREFETCH = 256  # rows of K ahead (8 KiB of a 32-column panel): 1.80x bf16 against 1.55-1.75x at 32-1024 here
CHUNK = 512  # columns per activation scale: int32 sums of 512 int16 x int8 products cannot overflow
SLOTS = 16  # quantized A blocks a thread keeps: Inductor splits K into blocks that fit L1 (K 4864: 9 blocks)

# The activation rows as int16 codes, one scale per row and CHUNK columns; with ``planes`` (backends/int8_amx.py)
# each code split into an unsigned low byte and a signed high byte (code = 256 * high + low), rows padded to 64.
QUANTIZE = r"""
struct {{kernel_name}}_block {
    // the codes of one A block (a row range by a K range), and one scale per row and CHUNK columns
    const {{input_t}}* a = nullptr;
    int64_t m = -1, k = -1, lda = -1, width = 0, chunks = 0;
{%- if planes %}
    std::vector<uint8_t> low;
    std::vector<int8_t> high;
{%- else %}
    std::vector<int16_t> codes;
{%- endif %}
    std::vector<float> scales;
};

__attribute__((target("avx512f,avx512bw"))) __attribute__((noinline))
void {{kernel_name}}_quantize(
    const {{input_t}}* {{restrict_keyword}} A, int64_t M, int64_t K, int64_t lda, {{kernel_name}}_block& block
) {
    block.a = A; block.m = M; block.k = K; block.lda = lda;
    block.width = (K + {{pad}} - 1) / {{pad}} * {{pad}};
    block.chunks = (K + {{chunk}} - 1) / {{chunk}};
{%- if planes %}
    block.low.assign(M * block.width, 0);
    block.high.assign(M * block.width, 0);
{%- else %}
    block.codes.assign(M * block.width, 0);
{%- endif %}
    block.scales.resize(M * block.chunks);
    const __m512 no_sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t m = 0; m < M; ++m) {
        const uint16_t* row = reinterpret_cast<const uint16_t*>(A + m * lda);
{%- if planes %}
        uint8_t* low = block.low.data() + m * block.width;
        int8_t* high = block.high.data() + m * block.width;
{%- else %}
        int16_t* codes = block.codes.data() + m * block.width;
{%- endif %}
        for (int64_t c = 0; c < block.chunks; ++c) {
            const int64_t k0 = c * {{chunk}}, k1 = std::min<int64_t>(K, k0 + {{chunk}});
            const int64_t full = k0 + (k1 - k0) / 16 * 16;
            __m512 top = _mm512_setzero_ps();
            for (int64_t k = k0; k < full; k += 16) {
                __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(row + k))), 16);
                top = _mm512_max_ps(top, _mm512_and_ps(_mm512_castsi512_ps(bits), no_sign));
            }
            float amax = _mm512_reduce_max_ps(top);
            for (int64_t k = full; k < k1; ++k) {
                amax = std::max(amax, std::abs(static_cast<float>(A[m * lda + k])));
            }
            const float inverse = amax > 0.f ? 32767.f / amax : 0.f;
            block.scales[m * block.chunks + c] = amax / 32767.f;
            const __m512 times = _mm512_set1_ps(inverse);
            for (int64_t k = k0; k < full; k += 16) {
                __m512i bits = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(row + k))), 16);
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(bits), times));
{%- if planes %}
                _mm_storeu_si128((__m128i*)(low + k), _mm512_cvtepi32_epi8(q));
                _mm_storeu_si128((__m128i*)(high + k), _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 8)));
{%- else %}
                _mm256_storeu_si256((__m256i*)(codes + k), _mm512_cvtsepi32_epi16(q));
{%- endif %}
            }
            for (int64_t k = full; k < k1; ++k) {
                const auto code = static_cast<int16_t>(std::nearbyint(static_cast<float>(A[m * lda + k]) * inverse));
{%- if planes %}
                low[k] = static_cast<uint8_t>(code & 0xff);
                high[k] = static_cast<int8_t>(code >> 8);
{%- else %}
                codes[k] = code;
{%- endif %}
            }
        }
    }
}

struct {{kernel_name}}_rows {
    // this thread's quantized A blocks: the template calls a GEMM's K blocks in turn for each column panel
    {{kernel_name}}_block blocks[{{slots}}];
    int64_t next = 0;
{%- if planes %}
    int64_t tile_rows = -1;  // the rows this thread's AMX tiles are configured for
{%- endif %}

    const {{kernel_name}}_block& find(const {{input_t}}* A, int64_t M, int64_t K, int64_t lda) {
        for (const auto& block : blocks) {
            if (block.a == A && block.m == M && block.k == K && block.lda == lda) {
                return block;
            }
        }
        auto& block = blocks[next++ % {{slots}}];
        {{kernel_name}}_quantize(A, M, K, lda, block);
        return block;
    }
};
"""

_DOT = r"""
template <int64_t ROWS, bool accum>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) __attribute__((noinline))
void {{kernel_name}}_dot(
    const int16_t* {{restrict_keyword}} QA,
    const float* {{restrict_keyword}} S,
    const {{input2_t}}* {{restrict_keyword}} B,
    float* {{restrict_keyword}} C,
    int64_t K,
    int64_t width,
    int64_t chunks,
    int64_t ldb,
    int64_t ldc
) {
    constexpr int COLS = {{block_n}} / 16;
    __m512 out[ROWS][COLS];
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 16
        for (int c = 0; c < COLS; ++c) {
            out[r][c] = accum ? _mm512_loadu_ps(C + r * ldc + c * 16) : _mm512_setzero_ps();
        }
    }
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t k0 = chunk * {{chunk}}, k1 = std::min<int64_t>(K, k0 + {{chunk}});
        __m512i sums[ROWS][COLS];
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 16
            for (int c = 0; c < COLS; ++c) {
                sums[r][c] = _mm512_setzero_si512();
            }
        }
        for (int64_t k = k0; k < k1; k += 2) {
            _mm_prefetch(reinterpret_cast<const char*>(B + (k + {{prefetch}}) * ldb), _MM_HINT_T0);
            __m512i b[COLS];
#pragma GCC unroll 16
            for (int c = 0; c < COLS; ++c) {
                b[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(B + k * ldb + c * 32)));
            }
#pragma GCC unroll 16
            for (int r = 0; r < ROWS; ++r) {
                int32_t pair;
                std::memcpy(&pair, QA + r * width + k, sizeof(pair));
                const __m512i a = _mm512_set1_epi32(pair);
#pragma GCC unroll 16
                for (int c = 0; c < COLS; ++c) {
                    sums[r][c] = _mm512_dpwssd_epi32(sums[r][c], a, b[c]);
                }
            }
        }
#pragma GCC unroll 16
        for (int r = 0; r < ROWS; ++r) {
            const __m512 scale = _mm512_set1_ps(S[r * chunks + chunk]);
#pragma GCC unroll 16
            for (int c = 0; c < COLS; ++c) {
                out[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][c]), scale, out[r][c]);
            }
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < ROWS; ++r) {
#pragma GCC unroll 16
        for (int c = 0; c < COLS; ++c) {
            _mm512_storeu_ps(C + r * ldc + c * 16, out[r][c]);
        }
    }
}
"""

_ENTRY = r"""
{{declare_kernel}} {
    {{kernel.assert_function}}(K % 2 == 0, "K must be even for the int16 dot-product kernel");
    const auto& block = rows.find(A, M, K, lda);  // quantized once per A block and thread, not per column panel
""" + PANELS + r"""
        for (int64_t m = 0; m < M; m += {{block_m}}) {
            const int16_t* codes = block.codes.data() + m * block.width;
            const float* scales = block.scales.data() + m * block.chunks;
            switch (std::min<int64_t>(M - m, {{block_m}})) {
{%- for b in range(block_m, 0, -1) %}
            case {{b}}:
                {{kernel_name}}_dot<{{b}}, accum>(codes, scales, panel, C + m * ldc + n, K, block.width, block.chunks,
                                                  panel_ldb, ldc);
                break;
{%- endfor %}
            }
        }
    }
}
"""


def available() -> bool:
    """AVX512_VNNI (with AVX512BW), on a torch it was tested on."""
    try:
        return recent_torch() and bool(torch.cpu._is_avx512_supported()) and bool(torch.cpu._is_vnni_supported())
    except AttributeError:
        return False


def _kernel():
    import torch._inductor.compile_fx  # noqa: F401 - Inductor's codegen modules import in this order only
    from torch._inductor.codegen import cpp_micro_gemm as micro
    from torch._inductor.cpu_vec_isa import VecAVX512VNNI

    CppMicroGemmInt8Dot = quantized_rows_class(micro, "CppMicroGemmInt8Dot", (QUANTIZE, _DOT, _ENTRY), chunk=CHUNK,
                                               prefetch=PREFETCH, planes=False, pad=32, slots=SLOTS)

    configs = micro.generate_gemm_config(VecAVX512VNNI, [(4, 32, 2)], input_dtype=torch.bfloat16,
                                         input2_dtype=torch.int8, output_dtype=torch.float,
                                         compute_dtype=torch.float, extra_check=_fits)
    return micro, CppMicroGemmInt8Dot, configs


def quantized_rows_class(micro, name: str, sources: tuple, **constants):
    """A kernel class (``vnni_kernel_class``) whose entry takes this thread's quantized activation rows, the
    ``_rows`` struct of ``QUANTIZE``: one per thread and GEMM call, so each A block is quantized once."""
    def extra_args_declare(self) -> str:
        return f"{self.name}_rows& rows,"

    def init(self, kernel) -> str:
        return f"{self.name}_rows rows;  // this thread's quantized activation rows"

    return type(name, (vnni_kernel_class(micro, f"{name}Base", sources, **constants),),
                {"get_kernel_extra_args_declare": extra_args_declare, "codegen_init": init,
                 "get_kernel_extra_args": lambda self, **kwargs: ["rows,"]})


def _fits(config, m, n, k, alpha, num_threads, **kwargs) -> bool:
    return (m <= MAX_ROWS and k % 2 == 0 and alpha == 1 and n % config.register_blocking.block_n == 0
            and not kwargs.get("q_group_size"))


def int8_dot_gemms():
    """Inside: weight-only int8 GEMMs (bf16 activations) of up to ``MAX_ROWS`` rows get the int16 kernel."""
    return kernel_scope(available(), "int8 dot-product", _kernel)
