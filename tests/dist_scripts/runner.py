"""Start real multi-process jobs for the distributed tests: free loopback ports, bounded run times."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN = str(HERE / "train_tiny.py")
LIMIT_S = 120  # no test job may run longer than this, whatever happens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env() -> dict[str, str]:
    """The parent's environment without CPUBOOST_* overrides, one thread per rank (the machine has 2 cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPUBOOST_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CPUBOOST_CACHE_DIR="off")
    return env


def launch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cpuboost.launch", *args]


def start(cmd: list[str]) -> subprocess.Popen:
    """``cmd`` in its own process group, so a stuck job is ended with every rank it started."""
    return subprocess.Popen(cmd, env=rank_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """End ``proc``'s process group: SIGTERM (torchrun stops its workers), then SIGKILL what is left."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def finish(proc: subprocess.Popen, timeout: float = LIMIT_S) -> subprocess.CompletedProcess:
    """Wait for ``proc`` (ended with its ranks at ``timeout``, then TimeoutExpired is raised)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(cmd: list[str], timeout: float = LIMIT_S) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` to the end (ended at ``timeout``); returns the result and the seconds it took."""
    begin = time.monotonic()
    done = finish(start(cmd), timeout)
    return done, time.monotonic() - begin


def train_2ranks(out: Path, *script_args: str, timeout: float = LIMIT_S) -> dict:
    """``cpuboost launch --nproc-per-node 2 train_tiny.py``; rank 0's report, or a failure with the output."""
    done, _ = run(launch_cmd("--nproc-per-node", "2", "--standalone", TRAIN, "--out", str(out), *script_args),
                  timeout)
    if done.returncode != 0:
        raise AssertionError(f"2-rank run failed (rc={done.returncode}):\n{done.stderr[-6000:]}")
    return json.loads(out.read_text())
