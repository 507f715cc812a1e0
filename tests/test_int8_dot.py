"""The int16 dot-product kernel for weight-only int8 GEMMs (backends/int8_dot.py): used where it should be,
right, and gone after; and int8 graphs kept out of Inductor's FX graph cache (generation/weights.py).

Needs a CPU with AVX512_VNNI (skipped elsewhere, with the reason) and a C++ compiler."""
from __future__ import annotations

import pytest
import torch

from cpuboost.backends import int8_dot
from cpuboost.generation.weights import inductor_options
from cpuboost.machine.hardware import detect

from nets import compiled_with, int8_linear

pytestmark = pytest.mark.skipif(not detect().has_cxx_compiler, reason="no C++ compiler for Inductor")
needs_vnni = pytest.mark.skipif(not int8_dot.available(), reason="needs AVX512_VNNI and torch >= 2.13")
TEMPLATE = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}


@needs_vnni
@pytest.mark.parametrize("rows,in_features", [(1, 896), (3, 1100), (4, 2048)])
def test_an_int8_linear_of_few_rows_runs_the_int16_kernel_and_answers_as_inductors_own(rows, in_features):
    # 1100 columns: two 512-column chunks and a 76-column one, whose last 12 are quantized one by one
    layer = int8_linear(in_features, 256, seed=rows)
    x = torch.randn(rows, in_features).to(torch.bfloat16) * 3
    uncached = {**TEMPLATE, "fx_graph_cache": False}
    out, code = compiled_with(layer, x, uncached, [int8_dot.int8_dot_gemms()])
    assert "_mm512_dpwssd_epi32" in code
    plain, plain_code = compiled_with(layer, x, uncached)
    assert "_mm512_dpwssd_epi32" not in plain_code
    exact = x.double() @ layer.dequantized().double().t()
    # both accumulate the exact weights' products (in fp32, or in int32 from int16 activations rounded to
    # 2^-15 of their chunk's largest value) and round once to bf16: the same error against an exact product
    assert (out.double() - exact).abs().max() <= (plain.double() - exact).abs().max() * 1.5 + 1e-3


@needs_vnni
def test_many_rows_keep_inductors_own_kernel_and_the_registry_is_left_as_it_was():
    from torch._inductor.codegen import cpp_micro_gemm

    before = list(cpp_micro_gemm.micro_gemm_configs)
    layer = int8_linear(256, 256, seed=0)
    out, code = compiled_with(layer, torch.randn(int8_dot.MAX_ROWS + 1, 256).to(torch.bfloat16),
                              {**TEMPLATE, "fx_graph_cache": False}, [int8_dot.int8_dot_gemms()])
    assert "_mm512_dpwssd_epi32" not in code  # a prefill's many rows: Inductor's kernels
    assert list(cpp_micro_gemm.micro_gemm_configs) == before


def test_a_second_int8_model_of_the_same_shapes_is_served_its_own_weights(tmp_path, monkeypatch):
    """Inductor's FX graph cache would hand the second model the int8 weights the first one's graph packed."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # an empty cache: the first build writes it
    cached = {**TEMPLATE, "fx_graph_cache": True}
    x = torch.randn(1, 896).to(torch.bfloat16)
    for seed in (1, 2):
        layer = int8_linear(896, 1152, seed)
        options = inductor_options(layer, cached)
        assert options["fx_graph_cache"] is False
        out, _ = compiled_with(layer, x, options)
        with torch.no_grad():
            expected = layer(x)
        assert (out.float() - expected.float()).abs().max() < 0.05 * expected.float().abs().max()


def test_graphs_without_int8_layers_keep_the_cache():
    options = inductor_options(torch.nn.Linear(4, 4), TEMPLATE)
    assert options == TEMPLATE
