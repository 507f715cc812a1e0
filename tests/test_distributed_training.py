"""2-rank DDP training on loopback: same result as one process on the concatenated batches, bf16, resume."""
from __future__ import annotations

import pytest
import torch

from dist_scripts import train_tiny
from dist_scripts.runner import train_2ranks

pytestmark = pytest.mark.distributed


def _max_rel_diff(report: dict, reference: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| / max|b| over the model's tensors."""
    worst = 0.0
    for name, ref in reference.items():
        got = torch.tensor(report["params"][name])
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    return worst


def _max_abs_diff(report: dict, reference: dict[str, torch.Tensor]) -> float:
    return max((torch.tensor(report["params"][k]) - v).abs().max().item() for k, v in reference.items())


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    """Two epochs of fp32 training on 2 ranks; rank 0 saves a checkpoint after the first."""
    tmp = tmp_path_factory.mktemp("fp32")
    reports = train_2ranks(tmp / "out.json", "--save", str(tmp / "ck.pt"), "--save-after", "1")
    return reports["fp32:fp32"], tmp / "ck.pt"


def test_two_ranks_match_one_process_on_concatenated_batches_fp32(fp32_run):
    """fp32: 2-rank DDP parameters equal one process trained on both ranks' batches, within 1e-5."""
    report, _ = fp32_run
    assert report["world_size"] == 2 and report["steps"] == 2 * train_tiny.STEPS_PER_EPOCH
    reference = train_tiny.train_reference("fp32", epochs=2)
    moved = max((v - train_tiny.make_model().state_dict()[k]).abs().max().item() for k, v in reference.items())
    assert moved > 1e-2  # training really changed the weights, so agreeing means something
    assert _max_abs_diff(report, reference) <= 1e-5


def test_ddp_over_training_module_keys_and_unwrap(fp32_run):
    """DDP wraps cpuboost's TrainingModule: keys get `module.`, cbd.unwrap gives the plain model and keys."""
    report, _ = fp32_run
    assert report["is_ddp"] and report["ddp_keys_prefixed"]
    assert report["unwrap_keys_plain"] and report["unwrap_same_as_cpuboost"]


def test_sharded_loader_advances_one_epoch_per_pass(fp32_run):
    """Each pass over a prepared loader uses the next epoch's shuffle without a set_epoch call."""
    report, _ = fp32_run
    assert report["epochs_seen"] == [0, 1]


def test_checkpoint_from_rank0_resumes_in_a_new_two_rank_run(fp32_run, tmp_path):
    """A new 2-rank run resumed from rank 0's epoch-1 checkpoint ends where the uninterrupted run ended."""
    report, checkpoint = fp32_run
    resumed = train_2ranks(tmp_path / "out.json", "--resume", str(checkpoint))["fp32:fp32"]
    assert resumed["epochs_seen"] == [1] and resumed["steps"] == train_tiny.STEPS_PER_EPOCH
    reference = {k: torch.tensor(v) for k, v in report["params"].items()}
    assert _max_abs_diff(resumed, reference) <= 1e-6


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory):
    """One 2-rank job training two models in turn: bf16 autocast with bf16 gradients, fp32 with bf16 gradients."""
    return train_2ranks(tmp_path_factory.mktemp("bf16") / "out.json", "--variants", "bf16:bf16,fp32:bf16")


def test_bf16_training_with_bf16_gradient_allreduce(bf16_runs):
    """bf16 autocast + bf16 all-reduce over gloo: gradients are bf16 values, parameters within 2e-2."""
    report = bf16_runs["bf16:bf16"]
    assert report["grads_bf16_exact"] is True  # the hook ran: every averaged gradient is a bf16 number
    reference = train_tiny.train_reference("bf16", epochs=2)
    assert _max_rel_diff(report, reference) <= 2e-2


def test_bf16_allreduce_of_fp32_training_stays_close(bf16_runs):
    """fp32 training with bf16 gradient all-reduce: bf16-rounded gradients, parameters within 2e-2 of fp32."""
    report = bf16_runs["fp32:bf16"]
    assert report["grads_bf16_exact"] is True
    assert _max_rel_diff(report, train_tiny.train_reference("fp32", epochs=2)) <= 2e-2


def test_fp32_gradients_are_not_rounded_to_bf16(fp32_run):
    """With gradient_dtype='fp32' (the default) the averaged gradients keep fp32 precision."""
    report, _ = fp32_run
    assert report["grads_bf16_exact"] is False
