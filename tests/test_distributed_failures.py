"""A rank that dies or hangs ends the whole 2-rank job non-zero, with the rank named."""
from __future__ import annotations

import pytest

from dist_scripts.runner import TRAIN, launch_cmd, run

pytestmark = pytest.mark.distributed

TIMEOUT_S = 5  # the collective timeout given to prepare() in these runs


def _fail(tmp_path, how: str):
    cmd = launch_cmd("--nproc-per-node", "2", "--standalone", TRAIN, "--out", str(tmp_path / "out.json"),
                     "--timeout", str(TIMEOUT_S), "--fail-rank", "1", "--fail-step", "2", "--fail-how", how)
    return run(cmd, timeout=90)


def test_killed_rank_makes_the_job_exit_nonzero(tmp_path):
    """SIGKILL on rank 1 mid-run: the launcher exits non-zero within a minute and torchrun names rank 1."""
    done, seconds = _fail(tmp_path, "kill")
    assert done.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in done.stderr and "SIGKILL" in done.stderr
    assert not (tmp_path / "out.json").exists()  # rank 0 never finished training
    assert seconds < 60


def test_hung_rank_makes_the_others_fail_after_the_timeout(tmp_path):
    """Rank 1 stops joining collectives: rank 0 raises CollectiveTimeoutError after the timeout, job exits non-zero."""
    done, seconds = _fail(tmp_path, "hang")
    assert done.returncode != 0
    assert "[rank0]: cpuboost.distributed.CollectiveTimeoutError: rank 0 of 2" in done.stderr
    assert f"timeout of {TIMEOUT_S}s" in done.stderr
    assert seconds < 60  # not torch's default 30 minutes
    summary = done.stderr[done.stderr.index("Root Cause"):]  # torchrun's summary, from rank 0's error file
    assert "rank      : 0 (local_rank: 0)" in summary and "CollectiveTimeoutError: rank 0 of 2" in summary
