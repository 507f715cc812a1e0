"""Built-in benchmark workloads: real architectures from ``transformers`` configs or plain torch.

Nothing is downloaded: weights are random (seeded), which is all a latency benchmark needs.
``transformers`` is imported only by the workloads that use it.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import CpuBoostError


class WorkloadError(CpuBoostError, ValueError):
    """An unknown built-in model, or a user factory that cannot be loaded or returns the wrong thing."""


@dataclasses.dataclass
class Workload:
    """A model in eval mode plus the inputs one call takes (positional and keyword)."""

    name: str
    model: nn.Module
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    batch: int = 1
    description: str = ""

    def call(self, fn: Callable[..., Any]) -> Any:
        return fn(*self.args, **self.kwargs)

    def calibration(self, batches: int = 4, seed: int = 100) -> Optional[list]:
        """int8 calibration inputs shaped like this call: fresh random floating inputs (images, features),
        other inputs as they are. None when no input is floating (token ids): int8 is then dynamic."""
        floats = [t for t in (*self.args, *self.kwargs.values()) if isinstance(t, torch.Tensor)
                  and t.is_floating_point()]
        if not floats:
            return None
        gen = torch.Generator().manual_seed(seed)

        def fresh(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return torch.randn(value.shape, generator=gen, dtype=value.dtype)
            return value
        return [(tuple(fresh(a) for a in self.args), {k: fresh(v) for k, v in self.kwargs.items()})
                for _ in range(batches)]


def _transformers(name: str):
    if importlib.util.find_spec("transformers") is None:
        msg = f"the {name!r} benchmark model is built from a transformers config; pip install 'cpuboost[bench]'"
        raise WorkloadError(msg)
    return importlib.import_module("transformers")


def resnet50(batch: int = 1, **_: Any) -> Workload:
    """ResNet-50 (transformers ResNetConfig defaults: bottleneck, depths 3-4-6-3), 224x224 images."""
    tf = _transformers("resnet50")
    model = tf.ResNetForImageClassification(tf.ResNetConfig(num_labels=1000)).eval()
    return Workload("resnet50", model, (torch.randn(batch, 3, 224, 224),), batch=batch,
                    description="ResNet-50, 224x224, 1000 classes (transformers ResNetConfig)")


def bert(batch: int = 1, seq: int = 128, **_: Any) -> Workload:
    """BERT-base (12 layers, hidden 768), ``seq`` tokens, with an attention mask."""
    tf = _transformers("bert")
    config = tf.BertConfig()
    model = tf.BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    return Workload("bert", model, (), {"input_ids": ids, "attention_mask": mask}, batch=batch,
                    description=f"BERT-base, seq {seq} (transformers BertConfig)")


def vit(batch: int = 1, **_: Any) -> Workload:
    """ViT-Base/16 at 224x224 (transformers ViTConfig defaults)."""
    tf = _transformers("vit")
    model = tf.ViTForImageClassification(tf.ViTConfig(num_labels=1000)).eval()
    return Workload("vit", model, (torch.randn(batch, 3, 224, 224),), batch=batch,
                    description="ViT-Base/16, 224x224 (transformers ViTConfig)")


class MLP(nn.Module):
    """A plain feed-forward net: Linear+GELU blocks, with a LayerNorm (the kind a tabular model has)."""

    def __init__(self, features: int = 1024, hidden: int = 4096, classes: int = 1000, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(features)]
        width = features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp(batch: int = 64, features: int = 1024, hidden: int = 4096, depth: int = 3, **_: Any) -> Workload:
    """MLP: LayerNorm, ``depth`` x (Linear ``hidden`` + GELU), Linear to 1000 classes."""
    model = MLP(features, hidden, 1000, depth).eval()
    return Workload("mlp", model, (torch.randn(batch, features),), batch=batch,
                    description=f"MLP {features}->{depth}x{hidden}->1000")


class ConvNet(nn.Module):
    """A small CIFAR-style conv net: three Conv+BN+ReLU stages with pooling, then a classifier."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.features = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def convnet(batch: int = 32, width: int = 64, **_: Any) -> Workload:
    """Small ConvNet on 32x32 images (3 Conv+BN+ReLU+pool stages, width 64-128-256)."""
    model = ConvNet(width).eval()
    return Workload("convnet", model, (torch.randn(batch, 3, 32, 32),), batch=batch,
                    description=f"ConvNet {width}-{2 * width}-{4 * width}, 32x32")


BUILTIN: dict[str, Callable[..., Workload]] = {
    "resnet50": resnet50, "bert": bert, "vit": vit, "mlp": mlp, "convnet": convnet,
}
DEFAULT_BATCH = {"resnet50": 1, "bert": 1, "vit": 1, "mlp": 64, "convnet": 32}


def _load_factory(spec: str) -> Callable[..., Any]:
    """``package.module:factory`` or ``path/to/file.py:factory``."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        msg = f"model {spec!r} is neither a built-in ({', '.join(BUILTIN)}) nor MODULE_OR_FILE:factory"
        raise WorkloadError(msg)
    try:
        if where.endswith(".py") or os.path.sep in where:
            if not os.path.isfile(where):
                raise WorkloadError(f"model {spec!r}: no file {where!r}")
            mod_spec = importlib.util.spec_from_file_location(f"cpuboost_bench_user_{abs(hash(where))}", where)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except WorkloadError:
        raise
    except Exception as exc:
        raise WorkloadError(f"model {spec!r}: importing {where!r} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise WorkloadError(f"model {spec!r}: {where!r} has no callable {attr!r}")
    return factory


def _batch_of(args: tuple, kwargs: dict) -> int:
    first = next((x for x in list(args) + list(kwargs.values()) if isinstance(x, torch.Tensor) and x.dim()), None)
    return int(first.shape[0]) if first is not None else 1


def _as_workload(spec: str, result: Any) -> Workload:
    if isinstance(result, Workload):
        return result
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module):
        model, inputs = result
        args, kwargs = None, {}
        if isinstance(inputs, torch.Tensor):
            args = (inputs,)
        elif isinstance(inputs, dict):
            args, kwargs = (), dict(inputs)
        elif isinstance(inputs, (tuple, list)):
            args = tuple(inputs)
        if args is not None:
            return Workload(spec, model.eval(), args, kwargs, batch=_batch_of(args, kwargs),
                            description=type(model).__name__)
    got = type(result).__name__
    msg = (f"model factory {spec!r} returned {got}; it must return (model, inputs) where inputs is a "
           "Tensor, a tuple of positional inputs or a dict of keyword inputs, e.g. "
           "`return Net().eval(), torch.randn(batch, 16)`")
    raise WorkloadError(msg)


def load(spec: str, batch: Optional[int] = None, seq: int = 128, seed: int = 0) -> Workload:
    """A built-in model by name, or ``MODULE_OR_FILE:factory``.

    A factory returns ``(model, inputs)``; it is called with ``batch=`` only when a batch is given
    (and it accepts one), and the batch reported is the first input's leading dimension.
    """
    if batch is not None and batch < 1:
        raise WorkloadError(f"batch={batch} must be a positive integer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec in BUILTIN:
            return BUILTIN[spec](batch=DEFAULT_BATCH[spec] if batch is None else batch, seq=seq)
        factory = _load_factory(spec)
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        takes_batch = "batch" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        if batch is not None and not takes_batch:
            raise WorkloadError(f"--batch {batch} was given but factory {spec!r} takes no `batch` argument")
        result = factory(batch=batch) if batch is not None else factory()
    return _as_workload(spec, result)
