"""The bf16 dot-product GEMM kernel (backends/bf16_dot.py): used where it should be, right, and gone after.

Needs a CPU with AVX512_BF16 and no AMX (skipped elsewhere, with the reason) and a C++ compiler."""
from __future__ import annotations

import pytest
import torch

from cpuboost.backends import bf16_dot
from cpuboost.machine.hardware import detect

pytestmark = [
    pytest.mark.skipif(not bf16_dot.available(), reason="needs AVX512_BF16 without AMX (AMX has its own kernel) and torch >= 2.13"),
    pytest.mark.skipif(not detect().has_cxx_compiler, reason="no C++ compiler for Inductor"),
]


def _compiled_code(fn, *args, dot: bool):
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    options = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP", "fx_graph_cache": False}
    with torch.no_grad(), inductor_config.patch(options), (bf16_dot.bf16_dot_gemms() if dot else _nothing()):
        out, code = run_and_get_code(torch.compile(fn, dynamic=False), *args)
    torch._dynamo.reset()
    return out, "\n".join(code)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("rows", [4, 5])
def test_a_bf16_linear_of_several_rows_runs_the_dot_kernel_and_answers_as_the_fp32_kernel(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512, bias=True).to(torch.bfloat16).eval()
    x = torch.randn(rows, 256).to(torch.bfloat16)
    out, code = _compiled_code(linear, x, dot=True)
    assert "_mm512_dpbf16_ps" in code
    plain, plain_code = _compiled_code(linear, x, dot=False)
    assert "_mm512_dpbf16_ps" not in plain_code
    exact = x.double() @ linear.weight.double().t() + linear.bias.double()
    # both accumulate in fp32 and round once to bf16: the same error against an exact product
    assert (out.double() - exact).abs().max() <= (plain.double() - exact).abs().max() * 1.5 + 1e-3


def test_one_row_keeps_inductors_own_kernel_and_the_registry_is_left_as_it_was():
    from torch._inductor.codegen import cpp_micro_gemm

    before = list(cpp_micro_gemm.micro_gemm_configs)
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512, bias=False).to(torch.bfloat16).eval()
    out, code = _compiled_code(linear, torch.randn(1, 256).to(torch.bfloat16), dot=True)
    assert "_mm512_dpbf16_ps" not in code  # one row: reading the weights is the bound, the fp32 kernel is as fast
    assert list(cpp_micro_gemm.micro_gemm_configs) == before
