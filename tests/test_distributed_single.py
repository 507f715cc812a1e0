"""cpuboost.distributed in one plain process (no torchrun): unchanged objects, helpers, validation, sharding."""
from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, WeightedRandomSampler
from torch.utils.data.distributed import DistributedSampler

import cpuboost
import cpuboost.distributed as cbd
from cpuboost.distributed.errors import explain_failure, install_excepthook
from cpuboost.errors import CpuBoostError, InvalidOptionError

from dist_scripts import train_tiny


@pytest.fixture
def training():
    net = nn.Linear(4, 2)
    return cpuboost.optimize(net, torch.optim.SGD(net.parameters(), lr=0.1), dtype="fp32")


@pytest.fixture
def no_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def as_rank1_of_2(monkeypatch):
    """torchrun's variables for rank 1 of 2, without a process group (rank()/world_size() read them)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")


def _loader(n: int = 10, **kwargs) -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(n).float()), **kwargs)


def test_prepare_without_torchrun_returns_everything_unchanged(no_torchrun, training):
    """No WORLD_SIZE: prepare hands back the very same model, optimizer and loaders."""
    net, opt = training
    loader = _loader(batch_size=2, shuffle=True)
    got = cbd.prepare(net, opt, loader, gradient_dtype="bf16", timeout=30)
    assert got[0] is net and got[1] is opt and got[2] is loader and len(got) == 3
    assert cbd.prepare(net) is net


def test_helpers_in_a_single_process(no_torchrun):
    """rank 0 of 1, main process, not distributed; barrier returns at once."""
    assert (cbd.rank(), cbd.world_size(), cbd.local_rank()) == (0, 1, 0)
    assert cbd.is_main_process() and not cbd.is_distributed()
    cbd.barrier()


def test_helpers_read_torchrun_env_before_init(as_rank1_of_2):
    """Before the process group exists, rank/world size come from torchrun's variables."""
    assert (cbd.rank(), cbd.world_size(), cbd.local_rank()) == (1, 2, 1)
    assert not cbd.is_main_process() and cbd.is_distributed()


def test_unwrap_gives_the_plain_model(training):
    """cbd.unwrap strips cpuboost's wrapper like cpuboost.unwrap; plain keys."""
    net, _ = training
    assert cbd.unwrap(net) is cpuboost.unwrap(net) and type(cbd.unwrap(net)) is nn.Linear
    assert list(cbd.unwrap(net).state_dict()) == ["weight", "bias"]


def test_training_script_runs_unchanged_as_one_process(no_torchrun, tmp_path, monkeypatch):
    """The torchrun training script also runs as a plain `python train.py`: no DDP, world size 1."""
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["train_tiny.py", "--out", str(out), "--epochs", "1"])
    train_tiny.main()
    report = json.loads(out.read_text())["fp32:fp32"]
    assert report["world_size"] == 1 and not report["is_ddp"] and report["steps"] == 6


def test_init_with_incomplete_torchrun_env_is_a_clear_error(monkeypatch, no_torchrun):
    """WORLD_SIZE=2 without RANK/MASTER_*: the error names what is missing and how to launch."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(cbd.DistributedSetupError, match=r"RANK, MASTER_ADDR, MASTER_PORT not set.*torchrun"):
        cbd.init()


@pytest.mark.parametrize("bad", ["fp16", "int8", 3, None])
def test_bad_gradient_dtype_names_the_choices(bad, training):
    """gradient_dtype outside fp32/bf16 is an InvalidOptionError that lists both."""
    with pytest.raises(InvalidOptionError, match=r"gradient_dtype=.*'fp32', 'bf16'"):
        cbd.prepare(*training, gradient_dtype=bad)


def test_gradient_dtype_accepts_torch_dtypes(no_torchrun, training):
    """torch.bfloat16 and torch.float32 are accepted spellings."""
    for dtype in (torch.bfloat16, torch.float32, "BF16"):
        assert cbd.prepare(*training, gradient_dtype=dtype)[0] is training[0]


@pytest.mark.parametrize("bad", [0, -1, "10", True, float("nan")])
def test_bad_timeout_is_rejected(bad, training):
    """timeout must be positive seconds or a timedelta."""
    with pytest.raises(InvalidOptionError, match="timeout="):
        cbd.prepare(*training, timeout=bad)


def test_bad_backend_names_the_choices(training):
    """An unknown backend lists the valid ones."""
    with pytest.raises(InvalidOptionError, match="'gloo'"):
        cbd.prepare(*training, backend="nccl-cpu")


def test_inference_optimized_model_is_refused(training):
    """A model optimized for inference cannot be trained data-parallel: the error says what to pass."""
    model = cpuboost.optimize(nn.Linear(4, 2).eval(), dtype="fp32", fusion=False)
    with pytest.raises(cbd.DistributedSetupError, match="pass the optimizer too"):
        cbd.prepare(model, training[1])


def test_loader_in_the_optimizer_slot_is_refused(training):
    """prepare(model, loader) is a mistake the error explains."""
    with pytest.raises(cbd.DistributedSetupError, match="optimizer second"):
        cbd.prepare(training[0], _loader(batch_size=2))


def test_distributed_errors_are_cpuboost_errors():
    """Every distributed error is a CpuBoostError and the nearest builtin."""
    assert issubclass(cbd.DistributedSetupError, (CpuBoostError, RuntimeError))
    assert issubclass(cbd.CollectiveTimeoutError, (CpuBoostError, TimeoutError))
    assert issubclass(cbd.PeerLostError, (CpuBoostError, ConnectionError))


@given(n=st.integers(1, 40), world=st.integers(1, 5), shuffle=st.booleans(), epochs=st.integers(1, 4))
def test_epoch_sampler_shards_cover_the_data_and_advance(n, world, shuffle, epochs):
    """Shards are equal-sized, cover every index each epoch, and each pass uses the next epoch's order."""
    ds = TensorDataset(torch.arange(n))
    samplers = [cbd._EpochSampler(ds, num_replicas=world, rank=r, shuffle=shuffle, seed=3) for r in range(world)]
    for epoch in range(epochs):
        shards = [list(s) for s in samplers]
        assert len({len(s) for s in shards}) == 1 and set().union(*shards) == set(range(n))
        for r, shard in enumerate(shards):
            plain = DistributedSampler(ds, num_replicas=world, rank=r, shuffle=shuffle, seed=3)
            plain.set_epoch(epoch)
            assert shard == list(plain)


def test_set_epoch_pins_the_next_pass(as_rank1_of_2):
    """set_epoch(loader, e) makes the next pass use epoch e; later passes continue from there."""
    loader = cbd._shard_loader(_loader(20, batch_size=2, shuffle=True), seed=0)
    cbd.set_epoch(loader, 5)
    list(loader)
    assert loader.sampler.epoch == 5
    list(loader)
    assert loader.sampler.epoch == 6
    cbd.set_epoch(_loader(batch_size=2), 3)  # unsharded: a no-op, no error


def test_shard_loader_keeps_the_loader_settings(as_rank1_of_2):
    """Sharding keeps batch size, drop_last, collate_fn and workers; rank 1 of 2 gets the odd indices."""
    collate = lambda batch: torch.stack([b[0] for b in batch])  # noqa: E731
    loader = cbd._shard_loader(_loader(10, batch_size=3, drop_last=True, collate_fn=collate), seed=0)
    assert isinstance(loader.sampler, DistributedSampler) and not loader.sampler.shuffle
    assert (loader.batch_size, loader.drop_last, loader.collate_fn, loader.num_workers) == (3, True, collate, 0)
    assert [b.tolist() for b in loader] == [[1.0, 3.0, 5.0]]


def test_shard_loader_keeps_a_user_distributed_sampler(as_rank1_of_2):
    """A loader that already has a DistributedSampler comes back as it is."""
    ds = TensorDataset(torch.arange(8))
    loader = DataLoader(ds, sampler=DistributedSampler(ds, num_replicas=2, rank=1), batch_size=2)
    assert cbd._shard_loader(loader, seed=0) is loader


@pytest.mark.parametrize("case", ["custom_sampler", "iterable", "subclass"])
def test_shard_loader_refuses_what_it_cannot_split(as_rank1_of_2, case):
    """Custom samplers, IterableDatasets and DataLoader subclasses get an error that says what to do."""
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(4))

    class MyLoader(DataLoader):
        pass

    ds = TensorDataset(torch.arange(8).float())
    loader = {"custom_sampler": DataLoader(ds, sampler=WeightedRandomSampler([1.0] * 8, 8)),
              "iterable": DataLoader(Stream()), "subclass": MyLoader(ds)}[case]
    with pytest.raises(cbd.DistributedSetupError, match="DistributedSampler|every world_size-th"):
        cbd._shard_loader(loader, seed=0)


def test_gloo_timeout_is_explained_with_rank_and_timeout(as_rank1_of_2):
    """gloo's 'Timed out waiting' becomes CollectiveTimeoutError naming the rank and the timeout."""
    raw = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation")
    better = explain_failure(raw, 5.0)
    assert isinstance(better, cbd.CollectiveTimeoutError)
    assert "rank 1 of 2" in str(better) and "timeout of 5s" in str(better) and "timeout=SECONDS" in str(better)


def test_lost_peer_is_explained():
    """'Connection closed/reset by peer' becomes PeerLostError; other errors are left alone."""
    assert isinstance(explain_failure(RuntimeError("pair.cc:553] Connection closed by peer [127.0.0.1]:1"), 9),
                      cbd.PeerLostError)
    assert isinstance(explain_failure(RuntimeError("Read error: Connection reset by peer"), 9), cbd.PeerLostError)
    assert explain_failure(RuntimeError("shape mismatch"), 9) is None
    assert explain_failure(ValueError("Timed out"), 9) is None


def test_rank_logger_logs_on_main_process_only_by_default(as_rank1_of_2, caplog):
    """On rank 1, plain records are dropped; main_process_only=False logs with a [rank 1/2] prefix."""
    log = cbd.get_logger("cpuboost.test")
    with caplog.at_level(logging.INFO, logger="cpuboost.test"):
        log.info("only on rank 0")
        log.info("step %d", 7, main_process_only=False)
    assert [r.getMessage() for r in caplog.records] == ["[rank 1/2] step 7"]
    assert caplog.records[0].funcName == "test_rank_logger_logs_on_main_process_only_by_default"


def test_excepthook_records_the_error_file_and_explains_collectives(no_torchrun, monkeypatch, tmp_path):
    """The hook writes torchrun's error file, passes errors on, and re-raises gloo timeouts as ours (chained)."""
    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: seen.append(args))
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    install_excepthook(7.0)
    install_excepthook(7.0)  # idempotent: chained once
    try:
        raise ValueError("planned")
    except ValueError as exc:
        sys.excepthook(ValueError, exc, exc.__traceback__)
    message = json.loads((tmp_path / "error.json").read_text())["message"]
    assert message["message"] == "ValueError: planned" and 'raise ValueError("planned")' in \
        message["extraInfo"]["py_callstack"]
    raw = RuntimeError("[unbound_buffer.cc:78] Timed out waiting 7000ms for recv operation to complete")
    sys.excepthook(RuntimeError, raw, None)
    assert [type(args[1]) for args in seen] == [ValueError, cbd.CollectiveTimeoutError]
    assert seen[1][1].__cause__ is raw and "timeout of 7s" in str(seen[1][1])
    assert "CollectiveTimeoutError: rank 0 of 1" in (tmp_path / "error.json").read_text()
