"""Optimized models survive deepcopy, pickle and torch.save; the copy works and rebuilds lazily."""
import copy
import io
import pickle

import torch
from torch import nn

import cpuboost

from nets import MLP, StackNet, randomize_bn


@cpuboost.cpu_optimized(dtype="fp32", fusion=False)
class DecoratedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).relu()


def _eager(net, x):
    with torch.no_grad():
        return net(x)


def _round_trips(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return {
        "deepcopy": copy.deepcopy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
        "torch.save": torch.load(buffer, weights_only=False),
    }


def test_inference_model_copies_answer_and_rebuild():
    """Each copy answers like eager, builds its own graphs, and does not share weights with the source."""
    net = randomize_bn(StackNet(3, [4], ["relu"], [False], True)).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False)
    x = torch.randn(2, 3, 6, 6)
    model(x)
    for how, clone in _round_trips(model).items():
        assert type(clone) is type(model) and cpuboost.explain(clone).graphs == [], how
        torch.testing.assert_close(clone(x), _eager(net, x), rtol=1e-4, atol=1e-5)
        assert len(cpuboost.explain(clone).graphs) == 1, how
        with torch.no_grad():
            next(cpuboost.unwrap(clone).parameters()).add_(1.0)  # the copy's weights are its own
        torch.testing.assert_close(model(x), _eager(net, x), rtol=1e-4, atol=1e-5)
        assert clone.state_dict().keys() == model.state_dict().keys()


def test_decorated_class_instances_pickle():
    """An instance of a @cpu_optimized class pickles, unpickles and answers (the class name is shadowed)."""
    model = DecoratedNet()
    x = torch.randn(2, 4)
    expected = model(x)
    for how, clone in _round_trips(model).items():
        assert isinstance(clone, DecoratedNet), how
        torch.testing.assert_close(clone(x), expected)


def test_training_model_copies_keep_options():
    """The training path's model survives the same round trips and still trains."""
    net = MLP([4, 8, 2])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model, opt = cpuboost.optimize(net, opt, dtype="bf16")
    for how, clone in _round_trips(model).items():
        clone.train()
        loss = clone(torch.randn(4, 4)).float().pow(2).mean()
        loss.backward()
        assert all(p.grad is not None for p in clone.parameters()), how
        assert clone._options.dtype == torch.bfloat16
