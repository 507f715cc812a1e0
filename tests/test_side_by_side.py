"""How verified rungs are raced side by side: a dynamic text graph on two lengths (the call's and a probe
length), and between two rungs level within timing noise, the one a restarted process loads without compiling."""
import time

import pytest
import torch
from torch import nn

import cpuboost
from cpuboost.core import probe, registry


class SlowTokenModel(nn.Module):
    """A token model whose eager call costs 30 ms plus 0.3 ms a token: every test rung beats it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8)
        self.out = nn.Linear(8, 4)

    def compute(self, input_ids, attention_mask):
        return self.out(self.embed(input_ids)) * attention_mask[..., None]

    def forward(self, input_ids, attention_mask):
        time.sleep(0.03 + 0.0003 * input_ids.shape[1])
        return self.compute(input_ids, attention_mask)


def _costed(fixed_ms: float, per_token_ms: float):
    """A graph pass whose graph answers correctly in ``fixed_ms`` plus ``per_token_ms`` per token beyond 16."""
    def build(model, args, kwargs, ctx):
        def run(input_ids, attention_mask):
            time.sleep((fixed_ms + per_token_ms * max(input_ids.shape[1] - 16, 0)) / 1e3)
            return model.compute(input_ids, attention_mask)
        return run
    return build


@pytest.fixture
def costed_passes():
    names = ["test_short_fast", "test_long_fast"]
    registry.register_pass(_costed(2.0, 0.25), name=names[0], kind="graph", modes="infer")  # 2 ms at 16, 14 at 64
    registry.register_pass(_costed(4.0, 0.01), name=names[1], kind="graph", modes="infer")  # 4 ms at 16, 4.5 at 64
    yield names
    for name in names:
        registry.unregister_pass(name)


@pytest.mark.parametrize("build", ["blocking", "auto"])
def test_a_dynamic_text_graph_is_raced_at_a_second_length_too(costed_passes, build):
    """At 16 tokens the first rung is twice as fast; at the probe length (64) the second is three times as fast:
    the one that serves every length is the second, and the report shows both timings. With build="auto" the
    first serves the first call and the race of the second, settled by the next call, is timed at both lengths."""
    short_fast, long_fast = costed_passes
    net = SlowTokenModel().eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, cache_dir="off", build=build)
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones(1, 16, dtype=torch.long))
        torch.testing.assert_close(out, net.compute(ids, torch.ones(1, 16, dtype=torch.long)))
        if build == "auto":
            assert cpuboost.explain(model).graphs[-1].path == short_fast  # quick to answer: it came first
            assert model.wait_for_builds(60)
            torch.testing.assert_close(model(input_ids=ids, attention_mask=torch.ones(1, 16, dtype=torch.long)),
                                       net.compute(ids, torch.ones(1, 16, dtype=torch.long)))
    graph = cpuboost.explain(model).graphs[-1]
    assert graph.path == long_fast, [r.line() for r in graph.rungs]
    assert "input_ids:[1]" in graph.dynamic
    loser = next(r for r in graph.rungs if r.name == f"{short_fast} fp32")
    assert loser.fate.startswith(f"verified but slower than {long_fast} fp32"), loser.fate
    assert "at length 64:" in loser.fate, loser.fate
    longer = torch.randint(0, 100, (1, 40))  # a later length: served by the same dynamic graph, no build
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=longer, attention_mask=torch.ones(1, 40, dtype=torch.long)),
                                   net.compute(longer, torch.ones(1, 40, dtype=torch.long)))
    assert cpuboost.explain(model).graphs[-1].rungs[0].fate.startswith("served (dynamic graph")


def test_a_static_graph_is_raced_at_the_calls_length_only(costed_passes):
    """shapes="static": nothing serves other lengths, so only the call's length decides (the first rung)."""
    short_fast, _ = costed_passes
    net = SlowTokenModel().eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, cache_dir="off", shapes="static")
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones(1, 16, dtype=torch.long))
    graph = cpuboost.explain(model).graphs[-1]
    assert graph.path == short_fast, [r.line() for r in graph.rungs]
    assert not any("at length" in r.fate for r in graph.rungs)


def _kept_graph(ms: float, kept: list):
    """A graph pass answering in ``ms``, whose graph the persistent cache would keep (``keep_cached``, called
    when it serves, as OpenVINO IR's is)."""
    def build(model, args, kwargs, ctx):
        def run(input_ids, attention_mask):
            time.sleep(ms / 1e3)
            return model.compute(input_ids, attention_mask)
        run.keep_cached = lambda: kept.append(True)
        return run
    return build


@pytest.mark.parametrize("kept_ms, served", [(10.2, "test_kept"), (20.0, "test_recompiled")])
def test_between_level_rungs_the_one_a_restart_loads_serves(kept_ms, served):
    """10 ms (compiled again by every restart) against 10.2 ms (kept by the cache): level within 5%, the kept one
    serves and is kept; against 20 ms the faster serves."""
    kept: list = []
    registry.register_pass(_costed(10.0, 0.0), name="test_recompiled", kind="graph", modes="infer")
    registry.register_pass(_kept_graph(kept_ms, kept), name="test_kept", kind="graph", modes="infer")
    try:
        net = SlowTokenModel().eval()
        model = cpuboost.optimize(net, dtype="fp32", fusion=False, cache_dir="off", shapes="static")
        ids, mask = torch.randint(0, 100, (1, 16)), torch.ones(1, 16, dtype=torch.long)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask), net.compute(ids, mask))
    finally:
        registry.unregister_pass("test_recompiled")
        registry.unregister_pass("test_kept")
    graph = cpuboost.explain(model).graphs[-1]
    assert graph.path == served, [r.line() for r in graph.rungs]
    assert kept == ([True] if served == "test_kept" else [])
    loser = next(r for r in graph.rungs if r.name.startswith("test_") and not r.fate == "served")
    if served == "test_kept":
        assert loser.fate.startswith("verified, level with test_kept fp32, which a restart loads"), loser.fate
        assert loser.fate.endswith("within 5%: a restart would compile it again"), loser.fate
    else:
        assert loser.fate.startswith("verified but slower than test_recompiled fp32"), loser.fate


@pytest.mark.parametrize("length, limit, expected", [
    (16, None, 64), (16, 40, 40), (63, None, 252), (64, None, 16), (128, 512, 32), (512, 512, 128),
    (3, 3, None), (2, None, 8), (5, 5, None)])
def test_the_probe_length_is_four_times_longer_or_shorter_within_the_position_table(length, limit, expected):
    assert probe.probe_length(length, limit) == expected


def test_the_probe_keeps_token_values_valid_and_other_inputs_as_they_are():
    ids = torch.arange(10).reshape(1, 10)
    mask = torch.ones(1, 10, dtype=torch.long)
    other = torch.randn(1, 10)
    found = probe.other_length((other,), {"input_ids": ids, "attention_mask": mask},
                               {"input_ids": [1], "attention_mask": [1]}, None)
    assert found.length == 40 and found.args[0] is other
    assert found.kwargs["input_ids"].shape == (1, 40) and found.kwargs["input_ids"].max() == 9
    assert found.kwargs["attention_mask"].shape == (1, 40) and bool((found.kwargs["attention_mask"] == 1).all())
    assert probe.other_length((), {"input_ids": ids}, {}, None) is None  # not dynamic: no probe
    assert probe.other_length((), {"input_ids": ids, "attention_mask": mask[:, :5]},
                              {"input_ids": [1], "attention_mask": [1]}, None) is None  # two lengths: unclear


def test_a_shorter_probe_has_the_strides_of_a_fresh_tensor():
    """A cut of a batch of one kept stride(0) of the uncut length, which every dynamic graph's stride guard
    refused: the shorter length was never timed."""
    ids = torch.arange(128).reshape(1, 128)
    found = probe.other_length((), {"input_ids": ids}, {"input_ids": [1]}, None)
    assert found.length == 32 and found.kwargs["input_ids"].stride() == (32, 1)
    assert torch.equal(found.kwargs["input_ids"], ids[:, :32])
