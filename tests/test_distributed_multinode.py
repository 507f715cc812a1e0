""""Two nodes" on one machine: two launcher invocations meet through a c10d rendezvous on 127.0.0.1."""
from __future__ import annotations

import json

import pytest
import torch

from dist_scripts import train_tiny
from dist_scripts.runner import LIMIT_S, TRAIN, finish, free_port, launch_cmd, start, stop

pytestmark = pytest.mark.distributed


def test_two_nodes_train_to_the_single_process_result(tmp_path):
    """--nnodes 2, --node-rank 0/1, one rank each, c10d rendezvous: fp32 result equals one process within 1e-5."""
    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "out.json"
    nodes = [start(launch_cmd("--no-bind", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                              "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                              TRAIN, "--out", str(out)))
             for node in (0, 1)]
    try:
        done = [finish(p, LIMIT_S) for p in nodes]
    finally:
        for p in nodes:
            stop(p)
    assert [d.returncode for d in done] == [0, 0], "\n".join(d.stderr[-3000:] for d in done)
    report = json.loads(out.read_text())["fp32:fp32"]
    assert report["world_size"] == 2 and report["is_ddp"]
    reference = train_tiny.train_reference("fp32", epochs=2)
    assert max((torch.tensor(report["params"][k]) - v).abs().max().item() for k, v in reference.items()) <= 1e-5
