"""What cpuboost's micro-kernels for Inductor's C++ GEMM template share (backends/bf16_dot.py, int8_dot.py):
the walk over VNNI2 weight panels their entry functions make, and registering a kernel for some builds only."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

TORCH_FROM = "2.13"  # the template API they were written against (torch 2.8's emits code they do not compile with)

# An entry function's loop over the columns, 2 * block_n values of K-pairs per panel: the weights packed at
# compile time (constants), or packed here per call (a weight that is a graph input).
PANELS = r"""
{%- if pack_vnni_B_locally %}
    {{template.codegen_allocate_weight_buffer("packed_B_buf", input2_t, "K", block_n)}}
{%- endif %}
    for (int64_t n = 0; n < N; n += {{block_n}}) {
{%- if pack_vnni_B_locally %}
        at::vec::pack_vnni2(B + n, packed_B_buf, ldb, K, {{block_n}});
        const {{input2_t}}* panel = packed_B_buf;
        const int64_t panel_ldb = {{block_n}};
{%- else %}
        const {{input2_t}}* panel = B + 2 * n;
        const int64_t panel_ldb = ldb;
{%- endif %}"""


def recent_torch() -> bool:
    try:
        return torch.torch_version.TorchVersion(torch.__version__.split("+")[0]) >= TORCH_FROM
    except ValueError:
        return False


@contextlib.contextmanager
def registered(micro, cls, configs) -> Iterator[None]:
    """``cls`` with ``configs`` in Inductor's micro-kernel registry (``micro.micro_gemm_configs``, process-wide:
    hold ``config_lock``) inside, first of all: the registry is read in order and the first of equal ranks wins."""
    registry = micro.micro_gemm_configs
    registry[cls] = configs
    others = [(key, registry.pop(key)) for key in list(registry) if key is not cls]
    registry.update(others)
    try:
        yield
    finally:
        registry.pop(cls, None)
