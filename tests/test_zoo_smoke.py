"""The model zoo (benchmarks/zoo.py) cannot rot: every builder builds and runs one eager forward.

No compile, no timing: this catches transformers API drift (renamed config fields, changed inputs or
outputs) and builders that produce degenerate models (constant or non-finite outputs).
"""
from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import pytest
import torch

pytest.importorskip("transformers")

ZOO_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"


def _load_zoo():
    spec = importlib.util.spec_from_file_location("cpuboost_bench_zoo", ZOO_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny single calls gain little from two, and on a shared machine two threads
    spinning on OpenMP barriers (the default wait policy) made this file 3-10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

EXPECTED = {
    "vision": {"resnet", "convnext", "vit", "swin", "mobilenet_v2", "efficientnet", "regnet", "levit", "mobilevit",
               "dinov2"},
    "text": {"bert", "distilbert", "roberta", "albert", "deberta", "electra", "gpt2", "llama", "qwen2", "t5",
             "bart"},
    "audio": {"whisper", "wav2vec2"},
}


def test_zoo_lists_every_architecture():
    assert set(zoo.BUILDERS) == set().union(*EXPECTED.values())


@pytest.mark.parametrize("name", list(zoo.BUILDERS))
def test_builder_runs_eager_forward(name):
    spec = zoo.build(name)
    assert spec.name == name
    assert name in EXPECTED[spec.kind]
    assert not spec.model.training
    with torch.no_grad():
        out = zoo.main_output(spec.call(spec.model))
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    assert out.std().item() > 1e-4, f"{name}: near-constant output, the weights are degenerate"
    # the error measures used by the benchmark are well defined on this output
    errors = zoo.errors_vs(out, out + 1e-3 * out.abs().max())
    assert 0 < errors["rel_err"] < 1e-2 and errors["cosine"] > 0.99
    if spec.kind == "vision":
        assert spec.calibration is not None and len(spec.calibration) == 4
        assert all(c.shape == spec.args[0].shape for c in spec.calibration)
    assert not math.isnan(out.abs().max().item())


def test_builds_are_seeded():
    a, b = zoo.build("electra"), zoo.build("electra")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert all(torch.equal(a.kwargs[k], b.kwargs[k]) for k in a.kwargs)
