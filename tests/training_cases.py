"""Small models, optimizers and a train loop shared by the tests/test_training_*.py files."""
from __future__ import annotations

import copy
import io
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

import cpuboost

CLASSES = 4


class PlainSGD(torch.optim.Optimizer):
    """A user-written optimizer cpuboost knows nothing about (its own step must keep working)."""

    def __init__(self, params, lr: float = 0.05) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    buf = self.state[p].setdefault("velocity", torch.zeros_like(p))
                    buf.mul_(0.5).add_(p.grad)
                    p.add_(buf, alpha=-group["lr"])


class TinyConvNet(nn.Module):
    def __init__(self, width: int, bn: bool, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=not bn)  # a bias before BN is cancelled
        self.bn = nn.BatchNorm2d(width) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width, CLASSES)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv1(x)))
        y = torch.relu(self.conv2(y)).mean(dim=(2, 3))
        return self.fc(self.drop(y))


def make_model(spec: dict) -> nn.Module:
    torch.manual_seed(spec["seed"])
    if spec["kind"] == "conv":
        return TinyConvNet(spec["width"], spec["bn"], spec["dropout"])
    layers: list[nn.Module] = []
    sizes = [8] + [spec["width"]] * spec["depth"]
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.LayerNorm(b) if spec["bn"] else nn.Identity(), nn.GELU(),
                   nn.Dropout(spec["dropout"])]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], CLASSES))


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p, **kw: torch.optim.SGD(p, lr=0.05, **kw),
    "adam": lambda p, **kw: torch.optim.Adam(p, lr=1e-2, **kw),
    "adamw": lambda p, **kw: torch.optim.AdamW(p, lr=1e-2, **kw),
    "adagrad": lambda p, **kw: torch.optim.Adagrad(p, lr=5e-2, **kw),
    "rmsprop": lambda p, **kw: torch.optim.RMSprop(p, lr=1e-3, **kw),
    "plain_sgd": lambda p, **kw: PlainSGD(p, **kw),
}

_OPT_KWARGS = {
    "sgd": st.sampled_from([{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True},
                            {"momentum": 0.8, "dampening": 0.1, "weight_decay": 1e-2}]),
    "adam": st.sampled_from([{}, {"amsgrad": True}, {"weight_decay": 1e-2}, {"maximize": False, "eps": 1e-6}]),
    "adamw": st.sampled_from([{}, {"amsgrad": True}, {"weight_decay": 0.1}]),
    "adagrad": st.sampled_from([{}, {"lr_decay": 1e-3}, {"weight_decay": 1e-2}]),
    "rmsprop": st.sampled_from([{}, {"momentum": 0.9}, {"centered": True}]),
    "plain_sgd": st.just({}),
}

model_specs = st.fixed_dictionaries({
    "kind": st.sampled_from(["mlp", "conv"]),
    "width": st.sampled_from([4, 8, 16]),
    "depth": st.integers(1, 3),
    "bn": st.booleans(),
    "dropout": st.sampled_from([0.0, 0.2]),
    "seed": st.integers(0, 2**16),
})
optimizer_specs = st.sampled_from(sorted(OPTIMIZERS)).flatmap(
    lambda name: st.fixed_dictionaries({"name": st.just(name), "kwargs": _OPT_KWARGS[name],
                                        "groups": st.sampled_from([1, 2])})
)


def make_optimizer(model: nn.Module, spec: dict) -> torch.optim.Optimizer:
    """One param group, or two (weights, and biases/norms without weight decay) as people often build."""
    build = OPTIMIZERS[spec["name"]]
    params = list(model.parameters())
    if spec["groups"] == 1 or spec["name"] == "plain_sgd":
        return build(params, **spec["kwargs"])
    weights = [p for p in params if p.dim() > 1]
    others = [p for p in params if p.dim() <= 1]
    kwargs = dict(spec["kwargs"])
    return build([{"params": weights}, {"params": others, **({"weight_decay": 0.0} if "weight_decay" in kwargs
                                                               else {})}], **kwargs)


def make_pair(model_spec: dict, opt_spec: dict):
    model = make_model(model_spec)
    return model, make_optimizer(model, opt_spec)


def batches(model_spec: dict, n: int = 3, batch: int = 6, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 3, 8, 8) if model_spec["kind"] == "conv" else (batch, 8)
    return [(torch.randn(shape, generator=gen), torch.randint(0, CLASSES, (batch,), generator=gen)) for _ in range(n)]


def train(net: nn.Module, opt: torch.optim.Optimizer, data: list, steps: int, *, start: int = 0,
          autocast: torch.dtype | None = None, scheduler: Any = None) -> list[float]:
    """Plain training steps; step i reseeds the RNG so dropout masks match across runs and resumes."""
    losses = []
    for i in range(start, start + steps):
        x, y = data[i % len(data)]
        torch.manual_seed(1000 + i)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = net(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def optimize_quietly(model: nn.Module, opt: torch.optim.Optimizer | None = None, **options: Any):
    """cpuboost.optimize without the once-per-process 'bf16 is emulated here' warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cpuboost.amp.CpuBoostPerformanceWarning)
        return cpuboost.optimize(model, opt, **options)


def roundtrip(obj: Any) -> Any:
    """What a real checkpoint gives back: torch.save then torch.load (no tensors shared with the source)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def state_of(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict:
    """Everything a failed cpuboost call must leave as it was: values, layouts, flags, optimizer groups."""
    snap = {
        "tensors": {k: (v.detach().clone(), v.stride(), v.data_ptr()) for k, v in model.state_dict().items()},
        "param_ids": [id(p) for p in model.parameters()],
        "training": [m.training for m in model.modules()],
    }
    if opt is not None:
        snap["groups"] = [{k: (v if k != "params" else [id(p) for p in v]) for k, v in g.items()}
                          for g in opt.param_groups]
        snap["opt_state"] = copy.deepcopy(opt.state_dict())
        snap["opt_type"] = type(opt)
    return snap


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    assert before["param_ids"] == after["param_ids"] and before["training"] == after["training"]
    for key, (value, stride, ptr) in before["tensors"].items():
        v2, s2, p2 = after["tensors"][key]
        assert torch.equal(value, v2) and stride == s2 and ptr == p2, key
    if "groups" in before:
        assert before["groups"] == after["groups"] and before["opt_type"] is after["opt_type"]
        assert _deep_equal(before["opt_state"], after["opt_state"])


def _deep_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_deep_equal(x, y) for x, y in zip(a, b))
    return a == b
