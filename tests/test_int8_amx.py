"""The AMX kernel for weight-only int8 GEMMs of 2 to 16 rows (backends/int8_amx.py): taken where it should be,
the int16 kernel's answer to fp32 rounding, and gone after.

Needs a CPU with AMX_INT8 that Linux lets this process use (skipped elsewhere, with the reason) and a C++ compiler."""
from __future__ import annotations

import pytest
import torch

from cpuboost.backends import int8_amx, int8_dot
from cpuboost.machine.hardware import detect

from nets import compiled_with, int8_linear

pytestmark = [pytest.mark.skipif(not detect().has_cxx_compiler, reason="no C++ compiler for Inductor"),
              pytest.mark.skipif(not int8_amx.available(), reason="needs AMX_INT8 (and torch >= 2.13)")]
TEMPLATE = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP", "fx_graph_cache": False}
OURS, INT16 = "_amx_permitted", "_mm512_dpwssd_epi32"  # a name only cpuboost's AMX kernel has


def _compiled(layer, x, *, amx: bool):
    scopes = [int8_dot.int8_dot_gemms()] + ([int8_amx.int8_amx_gemms()] if amx else [])
    return compiled_with(layer, x, TEMPLATE, scopes)


@pytest.mark.parametrize("rows,in_features", [(2, 896), (3, 4864), (4, 1088), (8, 640), (16, 640)])
def test_a_batched_decode_gemm_runs_on_amx_and_answers_as_the_kernel_it_replaces(rows, in_features):
    # 4864 columns: Inductor hands the kernel K in several L1-sized blocks (each quantized once per thread);
    # 1088: two 512-column scale chunks and a 64-column one. Up to 4 rows it replaces the int16 kernel, from 5
    # rows on Inductor's own AMX kernel (weights converted to bf16)
    layer = int8_linear(in_features, 320, seed=rows)
    x = torch.randn(rows, in_features).to(torch.bfloat16) * 3
    x[0, 5] = 200.0  # an outlier: its chunk's codes use the high byte's full range
    out, code = _compiled(layer, x, amx=True)
    assert OURS in code
    before, before_code = _compiled(layer, x, amx=False)
    assert OURS not in before_code and (INT16 in before_code) == (rows < 5)
    exact = x.double() @ layer.dequantized().double().t()
    if rows < 5:
        # the same int16 codes and scales, exact integer sums either way: only fp32 summation order and the
        # output's bf16 rounding differ, a bf16 step of the largest output apart at most
        assert (out.double() - before.double()).abs().max() <= before.double().abs().max() * 2 ** -8
    error, before_error = (out.double() - exact).abs().max(), (before.double() - exact).abs().max()
    assert error <= before_error * 1.25 + exact.abs().max() * 2 ** -9


@pytest.mark.parametrize("rows,in_features,kernel", [(1, 896, INT16), (4, 900, INT16)])
def test_one_row_and_a_k_off_the_tile_keep_the_int16_kernel(rows, in_features, kernel):
    from torch._inductor.codegen import cpp_micro_gemm

    before = list(cpp_micro_gemm.micro_gemm_configs)
    layer = int8_linear(in_features, 256, seed=0)
    out, code = _compiled(layer, torch.randn(rows, in_features).to(torch.bfloat16), amx=True)
    assert OURS not in code and kernel in code
    assert list(cpp_micro_gemm.micro_gemm_configs) == before


def test_a_package_with_the_kernel_answers_in_a_fresh_process(tmp_path):
    """A restarted process loads a packaged decode step without compiling (nor entering the kernel's scope): the
    kernel's code travels in the package and runs there."""
    import subprocess
    import sys

    import torch._inductor.config as inductor_config

    layer = int8_linear(640, 96, seed=3)
    x = torch.randn(4, 640).to(torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
        exported = torch.export.export(layer, (x,))
    with inductor_config.patch(TEMPLATE), int8_amx.int8_amx_gemms():
        package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "amx.pt2"))
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch; run = torch._inductor.aoti_load_package(sys.argv[1]); "
              "torch.save(run(torch.load(sys.argv[2])), sys.argv[3])")
    done = subprocess.run([sys.executable, "-c", script, package, str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert OURS in "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*.cpp")) or \
        OURS.encode() in (tmp_path / "amx.pt2").read_bytes()
    out = torch.load(tmp_path / "out.pt")
    assert (out.double() - expected.double()).abs().max() <= expected.double().abs().max() * 2 ** -6
