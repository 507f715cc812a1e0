"""AOTInductor's compile in a child process: the exported program goes to the child through
``torch.export.save`` (a format of its own, no pickle), the child writes the ``.pt2`` and exits.

Why: what Inductor leaves in a process after a compile stays there, whether the graph is kept or dropped
(a 100 MiB MLP in bf16: ~180 MiB retained after the graph is freed, compiled in-process with torch.compile or
AOTInductor alike; BERT-base ~430 MiB), while loading a compiled package and dropping it leaves ~6 MiB. So the
runtime's process holds only the graph that serves, and a rung that loses the race leaves nothing behind.
Where the child cannot run (no interpreter to start, a program ``torch.export.save`` cannot write, a failed
compile) the compile runs in this process, as before, with the reason logged.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("cpuboost")

# The child imports torch, and cpuboost's kernels from the folder this cpuboost was imported from (a fresh
# interpreter's path may hold another cpuboost, or none).
_CHILD = """
import json, sys
import torch
program, package, configs, threads, kernels = sys.argv[1:6]
torch.set_num_threads(int(threads))  # Inductor sizes its parallel loops by this: the same code as in-process
from torch import _inductor
import contextlib
scope = contextlib.nullcontext()
if kernels:  # cpuboost's GEMM micro-kernels (backends/*_dot.py), from the cpuboost that started this child
    sys.path.insert(0, kernels)
    from cpuboost.backends.gemm_kernels import cpuboost_gemms
    scope = cpuboost_gemms()
try:  # each GEMM template's jinja source parsed once, not per GEMM (cpuboost.backends.inductor.templates_parsed_once)
    import functools
    from torch._inductor.codegen.common import KernelTemplate
    _parse = KernelTemplate.__dict__["_template_from_string"].__func__
    KernelTemplate._template_from_string = staticmethod(functools.lru_cache(maxsize=None)(_parse))
except Exception as exc:  # another torch: templates parsed per use, as Inductor does; said on stderr
    print(f"cpuboost: GEMM templates parsed per use ({type(exc).__name__}: {exc})", file=sys.stderr)
with torch.no_grad(), scope:  # freezing (weight prepacking, constant folding) applies only without grad
    _inductor.aoti_compile_and_package(torch.export.load(program), package_path=package,
                                       inductor_configs=json.loads(configs))
"""


class ChildCompileError(RuntimeError):
    """The child process did not produce the package; the first line says why."""


def compile_package(exported: Any, package_path: str, configs: dict) -> None:
    """``torch._inductor.aoti_compile_and_package(exported, package_path, configs)``, in a child process when
    it can be, else here."""
    try:
        _in_child(exported, package_path, configs)
        return
    except Exception as exc:  # noqa: BLE001 - the in-process compile below is the same graph
        log.info("cpuboost: AOTInductor compile in this process (the child could not: %s)",
                 str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    from torch import _inductor as inductor

    inductor.aoti_compile_and_package(exported, package_path=package_path, inductor_configs=configs)


def _in_child(exported: Any, package_path: str, configs: dict) -> None:
    program = save_program(exported, package_path)
    try:
        compile_saved(program, package_path, configs)
    finally:
        program.unlink(missing_ok=True)


def save_program(exported: Any, package_path: str) -> Path:
    """The exported program written beside the package-to-be, for ``compile_saved``."""
    package = Path(package_path)
    program = package.with_name(f"{package.stem}.exported.pt2")
    with warnings.catch_warnings():  # weights sharing one storage (tied embeddings): saved once, as wanted
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(exported, str(program))
    return program


def _yield_cpu(nice: int) -> None:
    """In the child, before it runs: a lower priority, and on Linux the idle class, which runs only on a core
    nothing else wants. A nice of 10 alone still took slices of a core from the serving process's OpenMP threads,
    whose every parallel region waits for its slowest thread: 6-layer Qwen2 shape, 2 cores, decode while the
    package compiled 28.9 ms/token (nice 10) against 18.6 (idle class), ~17 with no compile running. A
    process busy all the time leaves it waiting: it then finishes at exit (persisted.py)."""
    os.nice(nice)
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # a platform or sandbox without it: the nice value stays
            pass


def compile_saved(program: Path, package_path: str, configs: dict, *, nice: int = 0, kernels: bool = False) -> None:
    """Compile a saved program in a child process (``nice``: its scheduling priority lowered by that much,
    for a compile in the background of a process that is serving; ``kernels``: with cpuboost's GEMM kernels of
    ``backends.bf16_dot`` and ``backends.int8_dot``, as the in-process decode graph was built). Raises ``ChildCompileError``."""
    package = Path(package_path)
    lower = (lambda: _yield_cpu(nice)) if nice else None
    root = str(Path(__file__).resolve().parent.parent.parent) if kernels else ""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(program), str(package), json.dumps(configs),
                           str(torch.get_num_threads()), root], capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL, env=dict(os.environ), preexec_fn=lower)
    if proc.returncode != 0 or not package.is_file() or package.stat().st_size == 0:
        tail = [line for line in (proc.stderr or "").splitlines() if line.strip()][-1:] or ["no output"]
        raise ChildCompileError(f"exit {proc.returncode}: {tail[0][:300]}")
