"""A token model's first graph, dynamic in its sequence (and batch) dims, compiled as an AOTInductor package in a
child process and kept in the persistent cache: the process does not hold the compile's memory, a later model
loads it without compiling, and a size outside what export kept symbolic is refused, never run."""
import pytest
import torch

import cpuboost
from cpuboost.persist import dims, package

transformers = pytest.importorskip("transformers")

from test_shapes import _ids, _tiny_bert  # noqa: E402

TOKEN_DIMS = {"input_ids": [0, 1], "attention_mask": [0, 1]}


def _inductor_notes(model):
    return next(p.detail for p in cpuboost.explain(model).passes if p.name == "inductor")


def _eager(net, inputs):
    with torch.no_grad():
        return net(**inputs).last_hidden_state


@pytest.mark.slow
def test_a_dynamic_first_graph_is_packaged_in_a_child_kept_and_loaded_at_any_size(tmp_path, monkeypatch):
    from cpuboost.passes import inductor as inductor_pass

    monkeypatch.setattr(inductor_pass, "CHILD_COMPILE_MIN_BYTES", 0)  # a tiny model, packaged as a large one is
    net = _tiny_bert()
    first = cpuboost.optimize(net, dtype="fp32", backend="native", tune_budget=0, cache_dir=str(tmp_path))
    torch.testing.assert_close(first(**_ids(12, 2)).last_hidden_state, _eager(net, _ids(12, 2)),
                               rtol=1e-4, atol=1e-5)
    record = cpuboost.explain(first).graphs[0]
    assert record.path == "inductor" and record.dynamic == "input_ids:[0, 1], attention_mask:[0, 1]", \
        str(cpuboost.explain(first))
    assert "compiled in a child process" in _inductor_notes(first), _inductor_notes(first)
    [unit] = list((tmp_path / "v1" / "artifacts").glob("*/graph"))

    torch.testing.assert_close(first(**_ids(20, 2)).last_hidden_state, _eager(net, _ids(20, 2)), rtol=1e-4, atol=1e-5)
    assert cpuboost.explain(first).graphs[1].verification.startswith("ok"), str(cpuboost.explain(first))

    # a restart's first call at another length and batch finds the same entry (its dynamic dims read as any size);
    # the size the first process checked is served without an eager call
    again = cpuboost.optimize(net, dtype="fp32", backend="native", tune_budget=0, cache_dir=str(tmp_path))
    eager_calls = []  # a global hook: one on the module would be part of its fingerprint (another model)
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, *_: eager_calls.append(1) if module is net else None)
    try:
        outs = {}
        for length, batch in ((31, 3), (20, 2), (5, 2)):
            eager_calls.clear()
            outs[length] = (again(**_ids(length, batch)).last_hidden_state, len(eager_calls))
    finally:
        hook.remove()
    for length, batch in ((31, 3), (20, 2), (5, 2)):
        torch.testing.assert_close(outs[length][0], _eager(net, _ids(length, batch)), rtol=1e-4, atol=1e-5)
    assert outs[20][1] == 0 and outs[31][1] >= 1, {n: c for n, (_, c) in outs.items()}
    assert "loaded from the persistent cache (AOTInductor package, no compile)" in _inductor_notes(again)
    assert any("decision from the persistent cache (inductor fp32)" in e for e in cpuboost.explain(again).events)
    graphs = cpuboost.explain(again).graphs
    assert graphs[0].rungs[0].fate == "served", str(cpuboost.explain(again))
    assert "checked against eager fp32 before" in graphs[1].rungs[0].fate, graphs[1].rungs[0].fate
    assert all(g.rungs[0].fate.startswith("served (dynamic graph") for g in graphs[1:]), str(cpuboost.explain(again))

    graph = package.load_graph(unit / "graph.pt2", root=tmp_path)
    ranges = graph.meta["dynamic"]
    assert ranges["0"]["1"] == [2, 512] and ranges["0"]["0"][0] == 2, ranges  # 512 positions: export's bound
    with pytest.raises(ValueError, match="outside the graph's range"):
        graph(**_ids(600, 2))
    with pytest.raises(ValueError, match="outside the graph's range"):
        graph(**_ids(12, 1))  # batch 1: export specialises a size-1 dim, so 1 is not in the range
    strided = {k: torch.cat([v, v], dim=1)[:, ::2] for k, v in _ids(9, 2).items()}  # not contiguous
    torch.testing.assert_close(graph(**strided).last_hidden_state, _eager(net, strided), rtol=1e-4, atol=1e-5)


def test_leaf_dims_count_flat_inputs_in_call_order():
    ids, mask, extra = torch.zeros(2, 5), torch.ones(2, 5), torch.ones(3)
    found = dims.leaf_dims((extra, (extra, extra)), {"input_ids": ids, "attention_mask": mask},
                           {"input_ids": [1, 0], "attention_mask": [1], 0: [0]})
    assert found == {0: [0], 3: [0, 1], 4: [1]}


def test_a_call_outside_the_recorded_shapes_is_refused():
    specs = [{"shape": [2, 8]}, {"shape": [4]}]
    ranges = {"0": {"1": [2, 16]}}
    dims.check_call([torch.zeros(2, 16), torch.zeros(4)], specs, ranges)
    for leaves, match in (([torch.zeros(2, 17), torch.zeros(4)], "outside the graph's range"),
                          ([torch.zeros(3, 8), torch.zeros(4)], "compiled for 2 only"),
                          ([torch.zeros(2, 8), torch.zeros(5)], "compiled for 4 only"),
                          ([torch.zeros(2, 8, 1), torch.zeros(4)], "has 3 dims")):
        with pytest.raises(ValueError, match=match):
            dims.check_call(leaves, specs, ranges)


def test_a_small_models_dynamic_graph_compiles_here_and_is_not_kept(tmp_path):
    """Under the size where the child's fixed start-up cost pays off, the dynamic first graph is torch.compile'd in
    this process (the report says so) and nothing is written for it; it still serves other sizes."""
    net = _tiny_bert()
    model = cpuboost.optimize(net, dtype="fp32", backend="native", tune_budget=0, cache_dir=str(tmp_path))
    for length in (12, 20):
        torch.testing.assert_close(model(**_ids(length, 2)).last_hidden_state, _eager(net, _ids(length, 2)),
                                   rtol=1e-4, atol=1e-5)
    assert "compiled in this process, not kept" in _inductor_notes(model), _inductor_notes(model)
    assert cpuboost.explain(model).graphs[0].path == "inductor", str(cpuboost.explain(model))
    assert not list((tmp_path / "v1" / "artifacts").glob("*/graph"))
