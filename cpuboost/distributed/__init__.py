"""Data-parallel training on CPUs with ``torch.distributed`` (gloo) and ``torchrun``, nothing home-made.

The same script runs as one plain process and under ``torchrun`` / ``cpuboost launch``::

    net, opt = make_training()                       # cpuboost.optimize / @cpu_optimized first
    net, opt, loader = cbd.prepare(net, opt, loader)  # then DDP, sharded loaders, timeouts
    ...
    if cbd.is_main_process():
        torch.save({"model": cbd.unwrap(net).state_dict(), "opt": opt.state_dict()}, "ck.pt")

Without torchrun's environment (no ``WORLD_SIZE``), ``prepare`` hands everything back unchanged.
With several processes it initialises the process group from that environment (``env://``), wraps the
model in ``DistributedDataParallel`` *after* cpuboost's optimization, and shards each loader with a
``DistributedSampler`` that moves to the next epoch on its own each time the loader is iterated (call
``set_epoch(loader, epoch)`` to choose the epoch, e.g. when resuming).
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from .. import api
from .errors import (CollectiveTimeoutError, DistributedSetupError, PeerLostError, install_excepthook,
                           rank_logger)
from ..errors import InvalidOptionError
from ..training.gloo_exit import let_gloo_threads_finish_at_exit
from ..options import dtype_name, parse_dtype

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "CollectiveTimeoutError",
    "DistributedSetupError",
    "PeerLostError",
    "barrier",
    "get_logger",
    "init",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "prepare",
    "rank",
    "set_epoch",
    "unwrap",
    "world_size",
]

# Long enough for rank 0 to write a large checkpoint while the others wait at the next collective;
# short enough that a stuck or dead rank ends the job in minutes, not torch's default 30.
DEFAULT_TIMEOUT_S = 600.0
PROCESS_GROUP_BACKENDS = ("gloo", "mpi", "ccl")
GRADIENT_DTYPES = ("fp32", "bf16")

log = rank_logger("cpuboost.distributed")
_NO_OPTIMIZER = object()  # prepare(model) alone returns the model alone


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's global rank: from the process group, else torchrun's ``RANK``, else 0."""
    if _dist_ready():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its own machine (torchrun's ``LOCAL_RANK``), 0 without torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """How many processes train together: the process group's size, else ``WORLD_SIZE``, else 1."""
    if _dist_ready():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True when several processes train together (so gradients are all-reduced)."""
    return world_size() > 1


def is_main_process() -> bool:
    """True on global rank 0: the one that saves checkpoints, prints summaries, downloads data."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (bounded by the collective timeout); a no-op in a single process."""
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def unwrap(model: Any) -> Any:
    """The user's plain model behind DDP and cpuboost's wrappers: save ``unwrap(net).state_dict()``."""
    return api.unwrap(model)


def get_logger(name: str) -> logging.LoggerAdapter:
    """A logger whose records start with ``[rank r/w]``; ``main_process_only=False`` logs on every rank."""
    return rank_logger(name)


def _timeout(value: Any) -> datetime.timedelta:
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        seconds = -1.0
    if not seconds > 0:
        msg = (f"timeout={value!r} must be a positive number of seconds or a datetime.timedelta "
               f"(default {DEFAULT_TIMEOUT_S:.0f}s): how long a collective waits for the other ranks")
        raise InvalidOptionError(msg)
    return datetime.timedelta(seconds=seconds)


def _backend(value: Any) -> str:
    if isinstance(value, str) and value.strip().lower() in PROCESS_GROUP_BACKENDS:
        return value.strip().lower()
    msg = (f"backend={value!r} is not one of {', '.join(map(repr, PROCESS_GROUP_BACKENDS))}; 'gloo' works on every CPU "
           "(oneCCL needs oneccl_bindings_for_pytorch, MPI a torch built with MPI)")
    raise InvalidOptionError(msg)


def _gradient_dtype(value: Any) -> str:
    try:
        name = dtype_name(parse_dtype(value))
    except ValueError:
        name = None
    if name in GRADIENT_DTYPES:
        return name
    msg = (f"gradient_dtype={value!r} is not one of {', '.join(map(repr, GRADIENT_DTYPES))}; 'bf16' halves "
           "the bytes all-reduced per step (gradients are rounded to bf16), 'fp32' keeps them exact")
    raise InvalidOptionError(msg)


def init(backend: str = "gloo", timeout: Any = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group described by torchrun's environment; True when several ranks train.

    Idempotent: an already initialised group is kept as it is (its own timeout stays). Without
    ``WORLD_SIZE`` (a plain ``python train.py``) nothing is initialised and False comes back.
    """
    backend, limit = _backend(backend), _timeout(timeout)
    if _dist_ready():  # the user's own group: its timeout is whatever they gave it
        install_excepthook(None)
        let_gloo_threads_finish_at_exit()
        return torch.distributed.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing or not torch.distributed.is_available():
        why = f"{', '.join(missing)} not set" if missing else "this torch build has no torch.distributed"
        msg = (f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for several processes but {why}; start the "
               "script with `torchrun --nproc-per-node N train.py` or `cpuboost launch --nproc-per-node N "
               "train.py`, which set RANK, MASTER_ADDR and MASTER_PORT for every rank")
        raise DistributedSetupError(msg)
    torch.distributed.init_process_group(backend=backend, timeout=limit)
    install_excepthook(limit.total_seconds())
    let_gloo_threads_finish_at_exit()
    return torch.distributed.get_world_size() > 1


class _EpochSampler(DistributedSampler):
    """A DistributedSampler that moves to the next epoch by itself each time it is iterated.

    ``set_epoch(e)`` still works the usual way: the next pass then uses epoch ``e`` exactly.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._started = False
        self._epoch_set = False

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._epoch_set = True

    def __iter__(self) -> Iterator:
        if self._started and not self._epoch_set:
            self.epoch += 1
        self._started, self._epoch_set = True, False
        return super().__iter__()


_LOADER_FIELDS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
                  "multiprocessing_context", "generator", "persistent_workers", "pin_memory_device", "in_order")


def _shard_loader(loader: Any, seed: int) -> DataLoader:
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, DistributedSampler):
        return loader  # already sharded by the user
    advice = ("build it yourself with sampler=torch.utils.data.distributed.DistributedSampler(dataset) "
              "(it reads rank and world size from the process group) and pass it to prepare() as it is")
    if type(loader) is not DataLoader:
        msg = f"prepare() shards torch.utils.data.DataLoader objects, got {type(loader).__name__}; {advice}"
        raise DistributedSetupError(msg)
    if isinstance(loader.dataset, IterableDataset):
        msg = ("prepare() cannot shard an IterableDataset (it has no indices to split); make the dataset "
               "yield only every world_size-th item starting at cbd.rank(), or use a map-style dataset")
        raise DistributedSetupError(msg)
    sampler, batches = loader.sampler, loader.batch_sampler
    plain = type(sampler) in (SequentialSampler, RandomSampler) and (batches is None or type(batches) is BatchSampler)
    if not plain or (isinstance(sampler, RandomSampler) and (sampler.replacement or sampler._num_samples)):
        msg = f"prepare() keeps the default samplers only, this loader has a custom {type(sampler).__name__}; {advice}"
        raise DistributedSetupError(msg)
    shuffle = isinstance(sampler, RandomSampler)
    shard = _EpochSampler(loader.dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed)
    kwargs = {k: getattr(loader, k) for k in _LOADER_FIELDS if hasattr(loader, k)}
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=shard, drop_last=loader.drop_last,
                      **kwargs)


def set_epoch(loader: Any, epoch: int) -> None:
    """Make the loader's next pass use ``epoch``'s shuffle (resume); a no-op for unsharded loaders.

    Loaders from ``prepare`` already advance one epoch per pass, so a plain ``for epoch in ...: for batch in
    loader`` loop needs no call; calling it every epoch, as with a bare ``DistributedSampler``, also works.
    """
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def _check_model(model: Any) -> None:
    from ..core.module import OptimizedModule

    if isinstance(model, OptimizedModule):
        msg = ("prepare() got a model optimized for inference (cpuboost.optimize without an optimizer); "
               "for training pass the optimizer too: net, opt = cpuboost.optimize(model, optimizer, ...)")
        raise DistributedSetupError(msg)
    if not isinstance(model, nn.Module):
        msg = f"prepare() expects the model (a torch.nn.Module) first, got {type(model).__name__}"
        raise DistributedSetupError(msg)


def _wrap_ddp(model: nn.Module, gradient_dtype: str, ddp_options: Mapping[str, Any]) -> nn.Module:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        log.warning("the model is already wrapped in DistributedDataParallel: kept as it is (gradient_dtype and "
                    "ddp_options apply only to a DDP that prepare() creates)")
        return model
    ddp = nn.parallel.DistributedDataParallel(model, **dict(ddp_options))
    if gradient_dtype == "bf16":
        ddp.register_comm_hook(None, _bf16_gradients)
    return ddp


def _bf16_gradients(process_group, bucket):  # no annotations: DDP checks them against real types
    """torch's DDP ``bf16_compress_hook``, under a name DDP's registration check lets through on CPU.

    DDP refuses a hook *named* ``bf16_compress_hook`` unless CUDA+NCCL or XPU+XCCL is present, a check
    from before gloo could all-reduce bf16 (it can since torch 2.2); the hook itself is torch's, unchanged.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

    return bf16_compress_hook(process_group, bucket)


def prepare(model: nn.Module, optimizer: Any = _NO_OPTIMIZER, *loaders: Any,
            backend: str = "gloo", gradient_dtype: Any = "fp32", timeout: Any = DEFAULT_TIMEOUT_S,
            seed: int = 0, ddp_options: Optional[Mapping[str, Any]] = None):
    """Make ``(model, optimizer, *loaders)`` train data-parallel; returns them in the same order.

    - process group: joined from torchrun's environment when needed (``backend``: gloo by default);
    - model: wrapped in DistributedDataParallel (after cpuboost's optimization; ``ddp_options`` go to DDP);
      its ``state_dict`` keys then start with ``module.``: save ``unwrap(model).state_dict()``;
    - ``gradient_dtype="bf16"``: gradients are all-reduced in bf16 (DDP's ``bf16_compress_hook``);
    - loaders: sharded with a DistributedSampler (``seed`` shared by all ranks; epochs advance per pass);
    - ``timeout`` (seconds): a collective that waits longer (a dead or stuck rank) raises on the others.

    In a single process everything comes back unchanged, so the script also runs without torchrun.
    ``prepare(model)`` alone returns the model alone.
    """
    grad_dtype, options = _gradient_dtype(gradient_dtype), dict(ddp_options or {})
    _check_model(model)
    if optimizer is not _NO_OPTIMIZER and optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        msg = (f"prepare(model, optimizer, *loaders) got a {type(optimizer).__name__} as the optimizer; "
               "pass the optimizer second (or None), then the loaders")
        raise DistributedSetupError(msg)
    if init(backend, timeout):
        model = _wrap_ddp(model, grad_dtype, options)
        loaders = tuple(_shard_loader(loader, seed) for loader in loaders)
        log.info("DDP over %s on %d ranks; gradients all-reduced in %s; %d loader(s) sharded; collective "
                 "timeout %.0fs", torch.distributed.get_backend(), world_size(), grad_dtype, len(loaders),
                 _timeout(timeout).total_seconds())
    if optimizer is _NO_OPTIMIZER:
        return model
    return (model, optimizer, *loaders)
