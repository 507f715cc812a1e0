"""Built-in benchmark models and user factories: real architectures, seeded, no downloads."""
from __future__ import annotations

import pytest
import torch

from cpuboost.bench import workloads as models


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, batch, out_shape", [("mlp", 2, (2, 1000)), ("convnet", 3, (3, 10))])
def test_plain_torch_models_run(name, batch, out_shape):
    """mlp and convnet build in eval mode for the batch asked and produce class scores of the right shape."""
    wl = models.load(name, batch)
    assert wl.batch == batch and not wl.model.training
    with torch.no_grad():
        assert tuple(wl.call(wl.model).shape) == out_shape


def test_default_batches_are_the_suite_sizes():
    """Without --batch, mlp uses 64 and convnet 32 (the sizes the README suite reports)."""
    assert models.load("convnet").batch == 32
    assert models.DEFAULT_BATCH == {"resnet50": 1, "bert": 1, "vit": 1, "mlp": 64, "convnet": 32}


def test_loading_is_seeded_and_leaves_the_global_rng_alone():
    """The same spec gives the same weights and inputs every time, without moving torch's global RNG."""
    state = torch.random.get_rng_state()
    a, b = models.load("convnet", 2), models.load("convnet", 2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.args[0], b.args[0])
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("name, params_m", [("resnet50", 25.557), ("bert", 109.482), ("vit", 86.568)])
def test_transformers_models_are_the_real_architectures(name, params_m):
    """resnet50, bert and vit come from transformers configs with the published parameter counts (+-0.5%)."""
    pytest.importorskip("transformers")
    wl = models.load(name, 1, seq=16)
    assert n_params(wl.model) / 1e6 == pytest.approx(params_m, rel=5e-3)
    if name == "bert":
        assert tuple(wl.kwargs["input_ids"].shape) == (1, 16) and wl.kwargs["attention_mask"].dtype == torch.long
    else:
        assert tuple(wl.args[0].shape) == (1, 3, 224, 224)


def test_user_factory_from_a_module_path(tmp_path, monkeypatch):
    """MODULE:factory imports the module; a dict of inputs becomes keyword inputs, batch read from them."""
    (tmp_path / "usermods.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def forward(self, x, scale):\n"
        "        return x * scale\n"
        "def build():\n"
        "    return Net(), {'x': torch.ones(6, 2), 'scale': torch.tensor(2.0)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    wl = models.load("usermods:build")
    assert wl.batch == 6 and wl.args == () and set(wl.kwargs) == {"x", "scale"}
    assert torch.equal(wl.call(wl.model), torch.full((6, 2), 2.0))


@pytest.mark.parametrize("spec, message", [
    ("nocolon", "neither a built-in"),
    ("cpuboost_no_such_module_xyz:f", "importing 'cpuboost_no_such_module_xyz' failed"),
    ("torch:__version__", "no callable '__version__'"),
])
def test_bad_specs_name_the_problem(spec, message):
    """Unknown names, missing modules and non-callables are WorkloadErrors (also ValueError) that say what failed."""
    with pytest.raises(models.WorkloadError, match=message) as info:
        models.load(spec)
    assert isinstance(info.value, ValueError)
