"""Shapes that change: one dynamic graph per input structure, each new size verified once, no storms."""
import copy
import time
import warnings

import pytest
import torch
import transformers
from torch import nn

import cpuboost
from cpuboost.core import registry
from cpuboost.errors import InvalidOptionError
from cpuboost.persist.errors import PackagedPathWarning

from nets import MLP, Cancelling, randomize_bn


def _tiny_bert():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    return transformers.BertModel(config).eval()


def _ids(length, batch=1):
    gen = torch.Generator().manual_seed(length)
    return {"input_ids": torch.randint(0, 100, (batch, length), generator=gen),
            "attention_mask": torch.ones(batch, length, dtype=torch.long)}


def test_many_lengths_build_one_graph_and_verify_every_size():
    """Twelve sequence lengths of inputs named as token sequences: the first builds one graph dynamic in the
    sequence dim that serves the rest (one build per family, not a static then a dynamic one); every answer
    matches eager; no recompile warning. Eager serves here (nothing beat it): it is the reference, so a new
    size costs one eager call and nothing is checked twice."""
    net = _tiny_bert()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, tune_budget=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for length in range(8, 56, 4):
            inputs = _ids(length)
            with torch.no_grad():
                expected = net(**inputs).last_hidden_state
            torch.testing.assert_close(model(**inputs).last_hidden_state, expected, rtol=1e-4, atol=1e-5)
    graphs = cpuboost.explain(model).graphs
    built = [g for g in graphs if not g.rungs or not g.rungs[0].fate.startswith("served (dynamic")]
    assert len(built) == 1 and built[0].dynamic == "input_ids:[1], attention_mask:[1]", str(cpuboost.explain(model))
    assert len(graphs) == 12, str(cpuboost.explain(model))  # one record per size, on its first call
    assert all(g.verification.startswith(("ok", "is the reference", "eager: the reference")) for g in graphs)


class SlowEager(nn.Module):
    """An MLP whose original call sleeps 10 ms: the test graph below (the same layers, no sleep) always wins."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.slow = randomize_bn(MLP([8, 16, 4])).eval(), True

    def forward(self, x):
        if self.slow:
            time.sleep(0.01)
        return self.net(x)


def test_a_dynamic_graph_checks_new_sizes_until_it_passed_twice_then_samples():
    """A compiled-style dynamic graph serves new batch sizes: each is checked against eager until the graph has
    passed on two sizes, then every fourth; unchecked sizes cost the served call alone, answers stay eager's."""
    def no_sleep(model, args, kwargs, ctx):
        fast = copy.deepcopy(model)
        fast.slow = False
        return lambda *a, **k: fast(*a, **k)

    registry.register_pass(no_sleep, name="test_no_sleep", kind="graph", modes="infer", dtypes=(torch.float32,))
    try:
        net = SlowEager()
        model = cpuboost.optimize(net, dtype="fp32", fusion=False, tune_budget=0)
        for batch in range(2, 14):
            x = torch.randn(batch, 8)
            with torch.no_grad():
                torch.testing.assert_close(model(x), net(x), rtol=1e-5, atol=1e-6)
    finally:
        registry.unregister_pass("test_no_sleep")
    graphs = cpuboost.explain(model).graphs
    assert graphs[1].path == "test_no_sleep" and graphs[1].dynamic, str(cpuboost.explain(model))
    served = [g for g in graphs[2:] if g.rungs[0].fate.startswith("served (dynamic")]
    assert len(served) == 10, str(cpuboost.explain(model))
    checked = [g.verification.startswith("ok") for g in served]
    # the dynamic build passed on its size; the next size is checked, then three skipped, then one checked...
    assert checked == [True, False, False, False, True, False, False, False, True, False], checked
    assert all(g.verification.startswith("size not checked") for g in served if not g.verification.startswith("ok"))


def test_static_shapes_build_per_size_and_warn_with_the_fix():
    """shapes='static': every size is its own graph; a model that keeps recompiling gets one warning."""
    net = randomize_bn(MLP([4, 8, 2])).eval()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, shapes="static")
    with pytest.warns(UserWarning, match="dynamic_dims") as caught:
        for batch in range(2, 9):
            model(torch.randn(batch, 4))
    assert len(caught) == 1 and len(cpuboost.explain(model).graphs) == 7


def test_declared_dynamic_dims_build_one_graph_up_front():
    """dynamic_dims={'input_ids': [1], ...}: the first build is already dynamic in the sequence dim."""
    net = _tiny_bert()
    model = cpuboost.optimize(net, dtype="fp32", fusion=False,
                              dynamic_dims={"input_ids": [1], "attention_mask": [1]})
    for length in (8, 12, 20):
        inputs = _ids(length)
        with torch.no_grad():
            expected = net(**inputs).last_hidden_state
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected, rtol=1e-4, atol=1e-5)
    first = cpuboost.explain(model).graphs[0]
    assert "input_ids:[1]" in first.dynamic
    assert all(g.rungs[0].fate.startswith("served (dynamic") for g in cpuboost.explain(model).graphs[1:])


@pytest.mark.parametrize("dims, match", [
    ({"pixel_values": [1]}, r"'pixel_values'.*tensor inputs: 'input_ids'"),
    ({"input_ids": [5]}, r"dim\(s\) \[5\].*2 dims"),
])
def test_bad_dynamic_dims_are_typed_errors(dims, match):
    """dynamic_dims naming an input or dim that does not exist: InvalidOptionError with the fix, no build."""
    net = _tiny_bert()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, dynamic_dims=dims)
    with pytest.raises(InvalidOptionError, match=match):
        model(**_ids(8))
    assert cpuboost.explain(model).graphs == []
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.slow
def test_compiled_dynamic_graph_serves_new_lengths_without_rebuilding(tmp_path):
    """With Inductor: the first length builds one graph dynamic in the token dim; each rung is raced once for
    the family (not again at the second length); later lengths reuse the graph, verified."""
    net = _tiny_bert()
    model = cpuboost.optimize(net, dtype="fp32", backend="native", tune_budget=0)
    sliced = {k: v[:, :32] for k, v in _ids(64).items()}  # contiguous, stride(0) 64: the graph guards 32
    assert sliced["input_ids"].is_contiguous() and sliced["input_ids"].stride() == (64, 1)
    cut = {k: v[:, ::2] for k, v in _ids(60).items()}  # not contiguous: a family of its own before
    for inputs in (*map(_ids, (8, 16, 24, 40)), sliced, cut):
        with torch.no_grad():
            expected = net(**inputs).last_hidden_state
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected, rtol=1e-4, atol=1e-5)
    assert sliced["input_ids"].stride() == (64, 1)  # the caller's tensor is left as it was
    graphs = cpuboost.explain(model).graphs
    built = [g for g in graphs if not g.rungs[0].fate.startswith("served (dynamic")]
    assert len(built) == 1 and built[0].dynamic and len(graphs) == 6, str(cpuboost.explain(model))
    raced = [r.name for g in graphs for r in g.rungs if not r.fate.startswith(("not tried", "served (dynamic"))]
    assert raced.count("inductor fp32") == 1, raced
    assert all(g.verification.startswith(("ok", "is the reference", "eager")) for g in graphs[:2]), \
        str(cpuboost.explain(model))
    with pytest.warns(PackagedPathWarning):  # the first length is recorded for save(), as before; its package
        package = cpuboost.save(model, tmp_path / "bert")  # gets an AOTInductor graph (it served another way)
    assert (package / "manifest.json").exists()


class SlowCancelling(Cancelling):
    """``Cancelling`` (bf16 loses most of the difference: eager autocast ~0.3 of the output's scale on random
    inputs, exactly 0 on zeros) whose fp32 call sleeps, so eager+passes bf16 wins."""

    def forward(self, x):
        if not torch.is_autocast_enabled("cpu"):
            time.sleep(0.01)
        return self.a(x) - self.b(x)


def test_a_new_size_is_judged_by_its_own_autocast_error_before_it_is_refused():
    """The family's graph was built on sizes where bf16 is exact (zeros: yardstick 0); a new size where bf16
    itself is far off is judged by eager autocast's error on that size, not refused and rebuilt."""
    net = SlowCancelling().eval()
    model = cpuboost.optimize(net, dtype="bf16", fusion=False, tune_budget=0)
    for rows in (2, 3):
        model(torch.zeros(rows, 64))
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            own = (net(x).float() - ref).abs().max() / ref.abs().max()
    assert own > 0.1  # far beyond the 1e-2 floor a yardstick of 0 leaves
    out = model(x)
    assert ((out - ref).abs().max() / ref.abs().max()) <= 3 * own + 1e-6
    graphs = cpuboost.explain(model).graphs
    assert graphs[1].dynamic and graphs[1].path == "eager+passes", str(cpuboost.explain(model))
    assert graphs[-1].rungs[0].fate == "served (dynamic graph, verified on this size)", str(cpuboost.explain(model))


@pytest.mark.slow
def test_int8_keeps_a_static_first_build_for_token_inputs():
    """int8 graphs are built static (they drop out for dynamic dims): token inputs do not make an int8 model's
    first build dynamic, which would leave it without any int8 candidate."""
    net = _tiny_bert()
    model = cpuboost.optimize(net, dtype="int8", fusion=False, tune_budget=0)
    model(**_ids(8))
    first = cpuboost.explain(model).graphs[0]
    assert first.dynamic == "", str(cpuboost.explain(model))


def test_with_the_persistent_cache_a_token_models_first_build_is_dynamic_and_its_decision_kept(tmp_path):
    """With the cache on, as with it off, a text model's first graph is dynamic in the sequence dim: a pipeline's
    mixed lengths cost one build per family (a static first graph cost a second, dynamic build at the second
    length). The decision is kept: a restarted model on the same cache builds only the decided rung."""
    cached = cpuboost.optimize(_tiny_bert(), dtype="bf16", fusion=False, tune_budget=0, cache_dir=str(tmp_path))
    for length in (8, 13, 21):
        cached(**_ids(length))
    graphs = cpuboost.explain(cached).graphs
    assert graphs[0].dynamic == "input_ids:[1], attention_mask:[1]", str(cpuboost.explain(cached))
    assert all(g.rungs[0].fate.startswith("served (dynamic graph") for g in graphs[1:]), str(cpuboost.explain(cached))
    assert any(tmp_path.rglob("*.json")), "the decision was not kept in the cache"
    restarted = cpuboost.optimize(_tiny_bert(), dtype="bf16", fusion=False, tune_budget=0, cache_dir=str(tmp_path))
    restarted(**_ids(8))
    report = cpuboost.explain(restarted)
    assert report.graphs[0].dynamic == "input_ids:[1], attention_mask:[1]", str(report)
    assert any("decision from the persistent cache" in e for e in report.events), str(report)


class _SlowEagerBert(transformers.BertModel):
    """Sleeps 10 ms when called eagerly, not in the graph OpenVINO traces: that graph always wins its race."""

    def forward(self, *args, **kwargs):
        if not torch.jit.is_tracing():
            time.sleep(0.01)
        return super().forward(*args, **kwargs)


def test_a_batched_token_models_smaller_last_batch_is_served_by_the_first_graph():
    """Batches of token inputs (a pipeline's batch_size=3 over 8 texts: 3, 3, then 2): the first graph is
    dynamic in the batch dim too, so the smaller last batch is served by it, not by a second build."""
    net = _SlowEagerBert(_tiny_bert().config).eval()
    model = cpuboost.optimize(net, dtype="fp32", backend="openvino", tune_budget=0)
    for length, batch in ((8, 3), (12, 3), (10, 2)):
        inputs = _ids(length, batch)
        with torch.no_grad():
            expected = net(**inputs).last_hidden_state
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected, rtol=1e-4, atol=1e-4)
    report = cpuboost.explain(model)
    assert report.graphs[0].path == "openvino", str(report)  # eager would serve any size: proves nothing
    assert report.graphs[0].dynamic == "input_ids:[0, 1], attention_mask:[0, 1]", str(report)
    assert [g.rungs[0].fate.startswith("served (dynamic graph") for g in report.graphs] == [False, True, True], \
        str(report)


def test_the_batch_dim_is_dynamic_in_every_input_that_carries_the_batch():
    from cpuboost.core.signature import sequence_dims

    shapes = {"input_ids": (8, 128), "attention_mask": (8, 128), "decoder_input_ids": (8, 32), "scale": (8,),
              "table": (4, 8)}
    assert sequence_dims(shapes) == {"input_ids": [0, 1], "attention_mask": [0, 1], "decoder_input_ids": [0]}
    assert sequence_dims({"input_ids": (1, 16), "decoder_input_ids": (1, 4)}) == {"input_ids": [1]}


def test_inputs_get_the_layout_graphs_are_built_for_and_the_callers_tensors_stay():
    from cpuboost.core.signature import call_key, standard_layout

    cut = torch.arange(128).reshape(1, 128)[:, :32]  # contiguous, strides (128, 1): a view with (32, 1)
    strided = torch.arange(256).reshape(2, 128)[:, :32]  # not contiguous: a contiguous copy
    expanded = torch.ones(1, 32).expand(2, 32)
    last = torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    args, kwargs = standard_layout((cut, 5), {"s": strided, "e": expanded, "cl": last, "plain": torch.ones(2, 3)})
    assert args[0].stride() == (32, 1) and torch.equal(args[0], cut) and args[0].data_ptr() == cut.data_ptr()
    assert kwargs["s"].is_contiguous() and torch.equal(kwargs["s"], strided) and strided.stride() == (128, 1)
    assert kwargs["e"].stride() == (32, 1) and torch.equal(kwargs["e"], expanded) and expanded.stride() == (0, 1)
    assert args[1] == 5 and kwargs["cl"] is last
    assert call_key(args, {}) == call_key((torch.zeros(1, 32, dtype=torch.long), 5), {})
    assert call_key((), kwargs) == call_key((), {k: v.clone() for k, v in kwargs.items()})
    plain = ((torch.ones(2, 3),), {"x": torch.zeros(4)})
    args, kwargs = standard_layout(*plain)
    assert args[0] is plain[0][0] and kwargs["x"] is plain[1]["x"]


def test_an_encoder_decoders_smaller_last_batch_is_served_by_the_first_graph():
    """BART at batch 3, then 2: the decoder's ids change batch with the encoder's, so the first graph is dynamic
    in their batch dim too. Marked in the token inputs only, OpenVINO's check of the dynamic graph paired a
    grown encoder batch with the decoder's old one, eager refused that input and the OpenVINO rung failed."""
    config = transformers.BartConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64,
                                     use_cache=False)
    torch.manual_seed(0)
    net = transformers.BartModel(config).eval()
    model = cpuboost.optimize(net, dtype="fp32", backend="openvino", tune_budget=0)
    for batch in (3, 2):
        inputs = {**_ids(12, batch), "decoder_input_ids": _ids(5, batch)["input_ids"]}
        with torch.no_grad():
            expected = net(**inputs).last_hidden_state
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected, rtol=1e-4, atol=1e-4)
    report = cpuboost.explain(model)
    assert report.graphs[0].path == "openvino", str(report)
    assert report.graphs[0].dynamic == "input_ids:[0, 1], attention_mask:[0, 1], decoder_input_ids:[0]", str(report)
    assert report.graphs[1].rungs[0].fate.startswith("served (dynamic graph"), str(report)


@pytest.mark.slow
def test_a_dynamic_build_leaves_the_callers_tensors_unmarked_for_other_compiled_graphs():
    """The dynamic build marks an alias of the input, never the caller's tensor: a marked tensor fails the
    guards of every graph compiled on it unmarked, so the same batch passed on to the user's own compiled
    function (or another optimized model) recompiled it, or had a verified graph refused."""
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(len(example_inputs))
        return gm.forward

    other = _tiny_bert()
    users_own = torch.compile(lambda **kw: other(**kw).last_hidden_state, backend=counting, dynamic=False)
    inputs = _ids(12)
    with torch.no_grad():
        users_own(**inputs)
    assert len(compiles) == 1
    model = cpuboost.optimize(_tiny_bert(), dtype="fp32", backend="native", tune_budget=0, cache_dir="off",
                              dynamic_dims={"input_ids": [1], "attention_mask": [1]})
    model(**inputs)
    assert cpuboost.explain(model).graphs[0].path == "inductor", str(cpuboost.explain(model))
    assert not any(hasattr(t, "_dynamo_dynamic_indices") for t in inputs.values())
    with torch.no_grad():
        users_own(**inputs)
    assert len(compiles) == 1  # served by its graph: no recompile
