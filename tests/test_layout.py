"""The house stays in order: no import cycles between cpuboost modules, <= 12 top-level files, <= 400 lines."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_layout_has_no_cycles_and_small_modules():
    """.ci/layout.py counts imports inside functions too; it exits non-zero on any violation."""
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "layout.py"), "cpuboost"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("cycles 0: []")
