"""AOTInductor compiles in a child process (the compile's leftovers leave with it); where the child cannot
run, the same compile runs in this process."""
import logging
import os
import sys
import zipfile

import pytest
import torch

from cpuboost.persist import aoti

from nets import MLP, randomize_bn

pytestmark = pytest.mark.slow


def _compile(tmp_path, caplog):
    net = randomize_bn(MLP([16, 32, 8])).eval()
    x = torch.randn(4, 16)
    with caplog.at_level(logging.INFO, logger="cpuboost"):
        graph, path = aoti.compile_aoti(net, (x,), {}, torch.float32, workdir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), net(x), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt2") == [path.name]  # exported copy gone
    with zipfile.ZipFile(path) as package:
        wrapper = "".join(package.read(n).decode(errors="ignore") for n in package.namelist()
                          if n.endswith(".wrapper.cpp"))
    # frozen: the Linear weights prepacked for MKL/oneDNN (an unfrozen graph calls addmm on plain weights)
    assert "_mkl_linear" in wrapper or "_linear_pointwise" in wrapper, "the graph was compiled without freezing"
    return [r.getMessage() for r in caplog.records]


def test_aoti_compiles_in_a_child_process(tmp_path, caplog):
    messages = _compile(tmp_path, caplog)
    assert not any("compile in this process" in m for m in messages), messages


def test_without_a_child_the_compile_runs_here(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    messages = _compile(tmp_path, caplog)
    assert any("compile in this process (the child could not" in m for m in messages), messages


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="no SCHED_IDLE on this platform")
def test_a_background_compile_child_runs_only_on_idle_cores():
    """The child a serving process starts for a package compile: niced and in the idle scheduling class."""
    import subprocess
    import sys

    from cpuboost.persist.child import _yield_cpu

    base = os.nice(0)
    out = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0), os.nice(0))"],
                         capture_output=True, text=True, check=True, preexec_fn=lambda: _yield_cpu(10)).stdout
    policy, nice = map(int, out.split())
    assert policy == os.SCHED_IDLE and nice == min(base + 10, 19)
