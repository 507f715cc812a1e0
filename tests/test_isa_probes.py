"""Inductor's vector-ISA probes, started side by side at a build's start, give Inductor's own answer."""
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 probes only")

PICK = """
import sys, threading, time
import torch._inductor.compile_fx
from torch._inductor import cpu_vec_isa
if sys.argv[1] == "threads":
    from cpuboost.backends.inductor import start_isa_probes
    start_isa_probes()
    probes = [t for t in threading.enumerate() if t.name.startswith("cpuboost: Inductor probes")]
    assert probes, "no probe thread started"
    for t in probes:
        t.join(120)
        assert not t.is_alive(), t.name
print(cpu_vec_isa.pick_vec_isa())
"""


def _pick(how, tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / how))  # empty: the probes compile
    return subprocess.run([sys.executable, "-c", PICK, how], capture_output=True, text=True, check=True,
                          env=env, timeout=300).stdout.strip()


@pytest.mark.slow
def test_probes_in_threads_pick_what_inductor_picks_alone(tmp_path):
    assert _pick("threads", tmp_path) == _pick("inductor", tmp_path) != ""
