"""Every script in examples/ runs to the end as a user would start it (tiny configs; CPUBOOST_BACKEND=eager
keeps CI off the compilers: the scripts themselves use the defaults)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NEEDS = {"accelerate_train.py": "accelerate", "lightning_train.py": "lightning"}


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(script, tmp_path):
    """The script exits 0 and prints what it promises (a report or the ranks' results)."""
    pytest.importorskip(NEEDS.get(script, "transformers"))
    env = {**os.environ, "CPUBOOST_BACKEND": "eager", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert ("cpuboost report" in done.stdout) or ('"weights"' in done.stdout), done.stdout[-2000:]
