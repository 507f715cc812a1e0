"""accelerate with cpuboost: optimize then prepare (the supported order), the other order, and 2 real processes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cpuboost
from frameworks import bert, reset_accelerate

accelerate = pytest.importorskip("accelerate")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "accelerate_train.py"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test starts and ends without accelerate's process-wide state (an earlier Trainer may have set it)."""
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture
def accelerator():
    """A bf16 CPU Accelerator with accumulation over 2 micro-batches."""
    return accelerate.Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)


def _batches(n: int = 4):
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(5, 30, (8, 12), generator=gen) for _ in range(n)]


def _train(accelerator, model, optimizer, batches) -> list[float]:
    losses = []
    for i, ids in enumerate(batches):
        before = model.classifier.weight.detach().clone()
        with accelerator.accumulate(model):
            torch.manual_seed(10 + i)  # the same dropout masks with and without cpuboost
            loss = model(input_ids=ids, labels=ids[:, 1] % 3).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        stepped = not torch.equal(before, model.classifier.weight)
        assert stepped == (i % 2 == 1), f"micro-batch {i}: the optimizer steps every 2nd one"
        losses.append(loss.item())
    return losses


def _plain_losses(batches) -> list[float]:
    """accelerate alone (its own bf16 autocast), for the loss comparison."""
    acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    model = bert(num_labels=3).train()
    model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=2e-3))
    losses = _train(acc, model, optimizer, batches)
    reset_accelerate()
    return losses


def test_optimize_then_prepare_trains_accumulates_saves_and_unwraps(tmp_path):
    """cpuboost first, then prepare: losses track accelerate's own bf16 run, gradient accumulation steps every
    2nd micro-batch, save_state/load_state restore the weights, unwrap_model and cpuboost.unwrap give the model."""
    batches = _batches()
    expected = _plain_losses(batches)
    acc = accelerate.Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    net = bert(num_labels=3).train()
    model, optimizer = cpuboost.optimize(net, torch.optim.AdamW(net.parameters(), lr=2e-3), dtype="bf16")
    model, optimizer = acc.prepare(model, optimizer)
    assert "fused_optimizer" in cpuboost.explain(model).applied  # cpuboost saw the plain AdamW
    losses = _train(acc, model, optimizer, batches)
    assert losses == pytest.approx(expected, rel=2e-2)  # both bf16 autocast: within bf16 noise
    acc.save_state(str(tmp_path))
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.classifier.weight.add_(1.0)
    acc.load_state(str(tmp_path))
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    unwrapped = acc.unwrap_model(model)
    assert isinstance(unwrapped, type(net)) and cpuboost.unwrap(unwrapped) is net
    assert list(unwrapped.state_dict()) == list(net.state_dict())


def test_prepare_then_optimize_works_on_one_process(accelerator):
    """The other order trains too on one process; cpuboost reports that the AcceleratedOptimizer keeps its step."""
    net = bert(num_labels=3).train()
    model, optimizer = accelerator.prepare(net, torch.optim.AdamW(net.parameters(), lr=2e-3))
    model, optimizer = cpuboost.optimize(model, optimizer, dtype="bf16")
    assert all(l == l for l in _train(accelerator, model, optimizer, _batches(2)))
    assert "AcceleratedOptimizer" in cpuboost.explain(model).skipped["fused_optimizer"]


def test_a_data_parallel_model_is_refused_with_the_order_to_use(monkeypatch):
    """After prepare on several processes the model is a DDP: optimize says to optimize first, changes nothing."""
    from cpuboost.errors import UnsupportedTargetError

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        net = bert(num_labels=3).train()
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        before = net.training, [p.data_ptr() for p in net.parameters()]
        with pytest.raises(UnsupportedTargetError, match="optimize it with cpuboost first"):
            cpuboost.optimize(ddp, torch.optim.AdamW(ddp.parameters()))
        assert (net.training, [p.data_ptr() for p in net.parameters()]) == before
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    from dist_scripts.runner import free_port

    return free_port()


@pytest.mark.distributed
def test_two_processes_multi_cpu_end_with_identical_weights(tmp_path):
    """``cpuboost launch --nproc-per-node 2`` on the accelerate example: 2 ranks, MULTI_CPU (gloo), every rank's
    weights identical after training on different shards (gradients were all-reduced), save/load_state included."""
    from dist_scripts.runner import launch_cmd, run

    out = tmp_path / "ranks.json"
    cmd = launch_cmd("--nproc-per-node", "2", "--standalone", str(EXAMPLE), "--steps", "4", "--out", str(out))
    done, _ = run(cmd)
    # no retry: a rank aborting at exit ("terminate called without an active exception") is cpuboost's to prevent
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and {r["ranks"] for r in ranks} == {2}
    assert {r["type"] for r in ranks} == {"DistributedType.MULTI_CPU"}
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["loss"] != ranks[1]["loss"]
    assert {r["class"] for r in ranks} == {"BertForSequenceClassification"}


def test_training_under_a_frameworks_process_group_guards_the_exit(tmp_path):
    """accelerate (and Lightning's DDP) start gloo themselves: optimizing a model for training in such a process
    registers the exit hook that lets gloo's threads finish (without it a rank aborts at exit about one 2-rank run
    in ten), and a process without a group gets none."""
    script = tmp_path / "group.py"
    script.write_text(
        "import sys, torch, cpuboost\n"
        "from cpuboost.training import gloo_exit\n"
        "if sys.argv[1] == 'group':\n"
        "    torch.distributed.init_process_group('gloo', store=torch.distributed.HashStore(), rank=0, world_size=1)\n"
        "net = torch.nn.Linear(4, 2)\n"
        "model, opt = cpuboost.optimize(net, torch.optim.SGD(net.parameters(), lr=0.1), dtype='bf16')\n"
        "model(torch.randn(3, 4)).sum().backward()\n"
        "print(gloo_exit._registered)\n"
        "if sys.argv[1] == 'group':\n"
        "    torch.distributed.destroy_process_group()\n")
    answers = [subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=120)
               for how in ("group", "none")]
    assert [a.returncode for a in answers] == [0, 0], answers[0].stderr[-2000:] + answers[1].stderr[-2000:]
    assert [a.stdout.split()[-1] for a in answers] == ["True", "False"]
