"""build="auto": a dynamic family's first call serves its first verified compiled graph; the rest of the ladder
stage builds in the background and the next call after it races the best of them side by side, swapping in
the faster. Graph passes registered here with known speeds make each branch certain; one test uses the real
backends on a tiny BERT."""
import threading
import time

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.core import ladder, registry

EAGER_S = 0.02


class Tokens(nn.Module):
    """A token model whose eager call is slow (a sleep): any graph below that wins against eager."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 8)

    def forward(self, input_ids, attention_mask):
        time.sleep(EAGER_S)
        return self.emb(input_ids) * attention_mask[..., None]


def _graph(seconds, gate=None):
    def build(model, args, kwargs, ctx):
        if gate is not None:
            assert gate.wait(60), "the test never opened the gate"

        def run(input_ids, attention_mask):
            time.sleep(seconds)
            return model.emb(input_ids) * attention_mask[..., None]
        return run
    return build


@pytest.fixture
def rungs():
    """Graph passes with known speeds, registered in order (the ladder tries them so); removed afterwards."""
    names = []

    def add(name, build):
        registry.register_pass(build, name=name, kind="graph", modes="infer")
        names.append(name)

    yield add
    for name in names:
        registry.unregister_pass(name)


def _call(model, length):
    ids = torch.arange(length).remainder(64)[None]
    return model(input_ids=ids, attention_mask=torch.ones_like(ids))


def _eager(net, length):
    with torch.no_grad():
        return _call(net, length)


def _first_record(model):
    return cpuboost.explain(model).graphs[0]


def _fates(record):
    return {r.name: r.fate for r in record.rungs}


def test_the_first_call_serves_the_first_winner_and_a_faster_one_takes_over(rungs):
    gate = threading.Event()
    rungs("test_first", _graph(0.008))
    rungs("test_faster", _graph(0.001, gate))
    net = Tokens().eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, cache_dir="off")
    torch.testing.assert_close(_call(model, 16), _eager(net, 16))
    fates = _fates(_first_record(model))
    assert fates["test_first fp32"] == "served", fates
    assert fates["test_faster fp32"].startswith("building in the background while test_first fp32 serves"), fates
    torch.testing.assert_close(_call(model, 20), _eager(net, 20))  # still building: the first graph serves
    assert cpuboost.explain(model).graphs[-1].path == "test_first"
    gate.set()
    assert model.wait_for_builds(60)
    assert _fates(_first_record(model))["test_faster fp32"].startswith("verified; races"), _first_record(model).rungs
    torch.testing.assert_close(_call(model, 24), _eager(net, 24))  # this call settles the race
    record = _first_record(model)
    fates = _fates(record)
    assert fates["test_faster fp32"].startswith("served (built in the background; took over from test_first"), fates
    assert fates["test_first fp32"].startswith("verified but slower than test_faster fp32"), fates
    assert "after serving first" in fates["test_first fp32"]
    assert record.path == "test_faster"
    assert cpuboost.explain(model).graphs[-1].path == "test_faster"  # later sizes: the new graph
    family = next(iter(model._cache.families.values()))
    assert family.winner == "test_faster fp32" and family.dynamic.path == "test_faster"
    assert family.sizes_passed == 2  # checked again from its own build's size: the new graph is new
    torch.testing.assert_close(_call(model, 40), _eager(net, 40))
    assert any("test_faster fp32 took over from test_first fp32" in e for e in cpuboost.explain(model).events)


def test_a_slower_challenger_leaves_the_first_winner_serving(rungs):
    rungs("test_first", _graph(0.001))
    rungs("test_slower", _graph(0.008))
    net = Tokens().eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, cache_dir="off")
    _call(model, 16)
    assert model.wait_for_builds(60)
    torch.testing.assert_close(_call(model, 24), _eager(net, 24))
    record = _first_record(model)
    fates = _fates(record)
    assert fates["test_first fp32"] == "served", fates
    assert fates["test_slower fp32"].startswith("verified but slower than test_first fp32 (side by side"), fates
    assert record.path == "test_first" and cpuboost.explain(model).graphs[-1].path == "test_first"


def test_blocking_races_every_rung_before_the_first_answer(rungs):
    rungs("test_first", _graph(0.008))
    rungs("test_faster", _graph(0.001))
    net = Tokens().eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, cache_dir="off", build="blocking")
    torch.testing.assert_close(_call(model, 16), _eager(net, 16))
    fates = _fates(_first_record(model))
    assert fates["test_faster fp32"] == "served", fates
    assert fates["test_first fp32"].startswith("verified but slower than test_faster fp32"), fates
    assert model._racing is None


def test_a_race_built_from_weights_edited_since_never_serves(rungs):
    gate = threading.Event()
    rungs("test_first", _graph(0.008))
    rungs("test_gated", _graph(0.001, gate))
    net = Tokens().eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, cache_dir="off")
    _call(model, 16)
    racing = model._racing
    assert racing is not None and not racing.done.is_set()  # held at the gate: still building
    with torch.no_grad():
        net.emb.weight.mul_(2)
    gate.set()
    assert model.wait_for_builds(60) and racing.done.is_set()
    torch.testing.assert_close(_call(model, 16), _eager(net, 16))  # the edit is seen: rebuilt, not swapped
    assert "graphs dropped: a weight was modified in place" in cpuboost.explain(model).events
    assert _fates(cpuboost.explain(model).graphs[-1])["test_first fp32"] == "served"
    assert model.wait_for_builds(60)
    torch.testing.assert_close(_call(model, 24), _eager(net, 24))


def _rung(name, backend, seconds):
    return ladder.Rung(name, backend, torch.float32, lambda: lambda x: (time.sleep(seconds), x * 2)[1])


def test_the_climb_tries_the_rungs_quick_to_build_first_and_returns_the_rest():
    slow_to_build = _rung("inductor fp32", "inductor", 0.001)
    quick = _rung("openvino fp32", "openvino", 0.002)
    x = torch.randn(4)

    def eager(t):
        time.sleep(0.01)
        return t * 2

    kwargs = dict(reference=x * 2, yardstick=lambda d: None, eager=eager, tolerance=None, budget=30.0,
                  verify_outputs=True, signature="x")
    winner, records, rest = ladder.climb([[slow_to_build, quick]], (x,), {}, serve_first=True, **kwargs)
    assert winner.rung is quick and rest == [slow_to_build]
    assert [r.name for r in records] == ["openvino fp32", "inductor fp32"]
    assert records[1].fate == "building in the background while openvino fp32 serves"
    winner, records, rest = ladder.climb([[slow_to_build, quick]], (x,), {}, **kwargs)
    assert winner.rung is slow_to_build and rest == []  # without serve_first: every rung, the fastest serves


def test_a_tiny_bert_answers_first_then_serves_the_race_winner():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("openvino")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    net = transformers.BertModel(config).eval()
    model = cpuboost.optimize(net, dtype="fp32", cache_dir="off")
    out = _call(model, 16)
    with torch.no_grad():
        torch.testing.assert_close(out.last_hidden_state, _call(net, 16).last_hidden_state, rtol=1e-4, atol=1e-4)
    fates = _fates(_first_record(model))
    assert fates["openvino fp32"] == "served", fates  # quick to build: tried, and served, first
    assert fates["inductor fp32"].startswith("building in the background"), fates
    assert model.wait_for_builds(300)
    out = _call(model, 24)
    with torch.no_grad():
        torch.testing.assert_close(out.last_hidden_state, _call(net, 24).last_hidden_state, rtol=1e-4, atol=1e-4)
    record = _first_record(model)
    served = [r for r in record.rungs if r.fate.startswith("served")]
    assert len(served) == 1, record.rungs
    assert cpuboost.explain(model).graphs[-1].path == record.path == served[0].name.split()[0]


def test_a_model_over_the_bound_races_every_rung_before_answering(rungs, monkeypatch):
    """Large models keep the blocking ladder (the graph held while the next builds raised BERT-base's peak)."""
    from cpuboost.core import raceon

    monkeypatch.setattr(raceon, "RACE_ON_MAX_BYTES", sum(p.numel() * 4 for p in Tokens().parameters()))
    rungs("test_first", _graph(0.008))
    rungs("test_faster", _graph(0.001))
    net = Tokens().eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, cache_dir="off")
    torch.testing.assert_close(_call(model, 16), _eager(net, 16))
    assert _fates(_first_record(model))["test_faster fp32"] == "served"
    assert model._racing is None


def test_a_challenger_that_fails_when_raced_never_serves_and_the_call_answers(rungs):
    """A graph that answered in the background but raises in the caller's thread: the settling call still
    answers (from the serving graph) and the record says why the challenger lost."""
    def build(model, args, kwargs, ctx):
        def run(input_ids, attention_mask):
            if threading.current_thread() is threading.main_thread():
                raise RuntimeError("only answers in the background")
            time.sleep(0.001)
            return model.emb(input_ids) * attention_mask[..., None]
        return run

    rungs("test_first", _graph(0.008))
    rungs("test_flaky", build)
    net = Tokens().eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, cache_dir="off")
    _call(model, 16)
    assert model.wait_for_builds(60)
    torch.testing.assert_close(_call(model, 24), _eager(net, 24))
    fates = _fates(_first_record(model))
    assert fates["test_flaky fp32"].startswith("failed when raced against test_first fp32: RuntimeError"), fates
    assert fates["test_first fp32"] == "served" and cpuboost.explain(model).graphs[-1].path == "test_first"
