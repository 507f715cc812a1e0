"""What cpuboost's micro-kernels for Inductor's C++ GEMM template share (backends/bf16_dot.py, int8_dot.py,
int8_amx.py): the walk over VNNI-packed weight panels their entry functions make, their kernel class, and
registering a kernel for some builds only."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch

log = logging.getLogger("cpuboost")

TORCH_FROM = "2.13"  # the template API they were written against (torch 2.8's emits code they do not compile with)

# An entry function's loop over the columns, vnni * block_n values per vnni steps of K in a panel: the weights
# packed at compile time (constants), or packed here per call (a weight that is a graph input).
PANELS = r"""
{%- if pack_vnni_B_locally %}
    {{template.codegen_allocate_weight_buffer("packed_B_buf", input2_t, "K", block_n)}}
{%- endif %}
    for (int64_t n = 0; n < N; n += {{block_n}}) {
{%- if pack_vnni_B_locally %}
        at::vec::pack_vnni{{vnni}}(B + n, packed_B_buf, ldb, K, {{block_n}});
        const {{input2_t}}* panel = packed_B_buf;
        const int64_t panel_ldb = {{block_n}};
{%- else %}
        const {{input2_t}}* panel = B + {{vnni}} * n;
        const int64_t panel_ldb = ldb;
{%- endif %}"""


def recent_torch() -> bool:
    try:
        return torch.torch_version.TorchVersion(torch.__version__.split("+")[0]) >= TORCH_FROM
    except ValueError:
        return False


def vnni_kernel_class(micro, name: str, sources: tuple, vnni: int = 2, **constants):
    """A micro-kernel class of Inductor's ``micro`` module named ``name``, whose C++ is ``sources`` (jinja, in
    order) rendered with the template's options, its register blocking and ``constants``; weights packed in
    ``vnni`` (2 or 4) steps of K per column."""
    from torch._inductor.codegen.common import KernelTemplate

    layout = {2: micro.LayoutType.VNNI2, 4: micro.LayoutType.VNNI4}[vnni]

    def codegen_define(self, kernel) -> str:
        block_m, block_n, _ = self.register_blocking
        options = {"declare_kernel": self.get_kernel_declaration(), "kernel": kernel, "block_m": block_m,
                   "block_n": block_n, "vnni": vnni, **constants, **self.get_common_options()}
        return "".join(KernelTemplate._template_from_string(source).render(options) for source in sources)

    return type(name, (micro.CppMicroGemm,), {"codegen_define": codegen_define,
                                               "get_b_layout": lambda self: layout})


@contextlib.contextmanager
def kernel_scope(usable: bool, what: str, make: Callable) -> Iterator[None]:
    """Inside: the kernel ``make()`` returns as ``(micro, cls, configs)`` registered, where ``usable``; a torch
    whose template API differs keeps its own kernels (logged)."""
    if not usable:
        yield
        return
    try:
        micro, cls, configs = make()
    except (ImportError, AttributeError, TypeError) as exc:
        log.info("cpuboost: %s GEMM kernel not used (%s: %s)", what, type(exc).__name__, exc)
        yield
        return
    with registered(micro, cls, configs):
        yield


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
