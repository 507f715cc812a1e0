"""The compiled prefill (generation/prefill.py): built in the background after the first generate(), verified
against eager fp32, then serving prompts of every length from one graph, with answers as eager autocast's."""
import pytest
import torch

from cpuboost.generation import GenerationRunner

from nets import assert_exit_waits_for_build

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=256, initializer_range=0.2)
    return transformers.LlamaForCausalLM(config).eval()


def _ids(length, seed=1):
    return torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_the_prefill_graph_builds_after_the_first_call_and_serves_new_lengths_like_autocast():
    """Nothing compiles the prefill during the first call; after it the graph builds in the background, passes
    verification (notes say so), and answers prefills of lengths it never saw, as close to eager fp32 as
    eager autocast is, without a compile per length."""
    model, notes = _llama(), []
    runner = GenerationRunner(model, torch.bfloat16, notes.append, race=False, prefill=True)
    assert runner.prefill_state() == "not built"
    kw = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    runner.generate(_ids(12), **kw)
    assert runner.prefill_state() in ("building", "serving")
    assert runner.wait_for_builds(timeout=900)
    assert runner.prefill_state() == "serving", notes
    built = [n for n in notes if n.startswith("generate: compiled prefill")]
    assert len(built) == 1 and "tensors within bounds" in built[0], notes
    graph = runner._copies.prefill
    for length in (7, 19, 30):
        served = graph.served
        ids = _ids(length, seed=length)
        out = runner.generate(ids, **kw)
        assert graph.served > served  # the graph answered this length's prefill
        with torch.no_grad():
            ref = model.generate(ids, **kw)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yard = model.generate(ids, **kw)
        own = _rel(yard.logits[0], ref.logits[0])
        assert _rel(out.logits[0], ref.logits[0]) <= max(3 * own, 1e-3)  # the first token's logits: the prefill's
    # the one graph covers a new length: let the real generate() call it where it may compile (not run-only),
    # and no graph is added
    from torch._dynamo.utils import counters

    graphs, graph._run_only = counters["stats"]["unique_graphs"], graph._compiled
    runner.generate(_ids(41), **kw)
    assert counters["stats"]["unique_graphs"] == graphs and graph.served == served + 2


def test_without_the_option_the_prefill_stays_eager_and_nothing_builds():
    model, notes = _llama(), []
    runner = GenerationRunner(model, torch.bfloat16, notes.append, race=False)
    runner.generate(_ids(12), max_new_tokens=2, do_sample=False)
    assert runner.prefill_state().startswith("eager") and runner._copies.prefill is None
    assert runner.wait_for_builds(timeout=1) and not any("compiled prefill" in n for n in notes)


def test_a_process_exiting_during_the_prefill_build_waits_for_it_instead_of_aborting():
    """cpuboost.optimize(...).generate once, then exit at once: the build under way is waited for, with a
    warning (a daemon thread killed inside Inductor's compile aborted the process: exit status 134)."""
    script = (
        "import torch, transformers, cpuboost\n"
        "torch.manual_seed(0)\n"
        "config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,\n"
        "    num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)\n"
        "model = transformers.LlamaForCausalLM(config).eval()\n"
        "opt = cpuboost.optimize(model, dtype='bf16')\n"
        "opt.generate(torch.randint(0, 128, (1, 12)), max_new_tokens=4, do_sample=False)\n"
        "print('state at exit:', opt._generation.prefill_state(), flush=True)\n")
    assert_exit_waits_for_build(script, "state at exit: building",
                                "finishing the compiled prefill's background build before exiting")


@pytest.mark.parametrize("error,serves", [("divergence", True), ("model", False)])
def test_a_build_that_fails_in_dynamos_bookkeeping_is_built_again_and_a_model_error_is_not(monkeypatch, error,
                                                                                          serves):
    """Dynamo's trace-and-replay state can diverge while the caller's thread runs the same model eagerly (a
    SpeculationLogDivergence, seen on Qwen2-shaped builds beside a batch-4 first call): the graph is built once
    more after the next call, from a fresh function. An error of the model's own is not worth a second compile."""
    from torch._dynamo.symbolic_convert import SpeculationLogDivergence

    from cpuboost.generation.prefill import PrefillGraph

    real, attempts = PrefillGraph._call, []

    def first_fails(self, fn, model, example):
        attempts.append(fn)
        if len(attempts) == 1:  # what the first compile raised in those builds (no way to provoke it on demand)
            raise SpeculationLogDivergence("diverged") if error == "divergence" else ValueError("shape mismatch")
        return real(self, fn, model, example)

    monkeypatch.setattr(PrefillGraph, "_call", first_fails)
    model, notes = _llama(), []
    runner = GenerationRunner(model, torch.bfloat16, notes.append, race=False, prefill=True)
    runner.generate(_ids(12), max_new_tokens=2, do_sample=False)
    assert runner.wait_for_builds(timeout=900)
    again = [n for n in notes if "built again after the next call" in n]
    if not serves:
        assert runner.prefill_state().startswith("refused: not built (ValueError") and not again, notes
        assert len(attempts) == 1
        return
    assert runner.prefill_state() == "pending" and len(again) == 1, notes
    runner.generate(_ids(9), max_new_tokens=2, do_sample=False)  # the next call, then the build again
    assert runner.wait_for_builds(timeout=900)
    assert runner.prefill_state() == "serving", notes
    first, second = (fn._torchdynamo_orig_callable for fn in attempts[:2])
    assert first.__code__ is not second.__code__  # the second build compiled a function of its own


def test_dynamo_bookkeeping_errors_are_told_from_the_models():
    from torch._dynamo.symbolic_convert import SpeculationLogDivergence

    from cpuboost.generation.prefill import _dynamo_bookkeeping

    def raised(source, filename):
        try:
            exec(compile(source, filename, "exec"))
        except AssertionError as exc:
            return exc

    inside = raised("assert False, 'Expected dict'", "/site-packages/torch/_dynamo/guards.py")
    assert _dynamo_bookkeeping(SpeculationLogDivergence("x")) and _dynamo_bookkeeping(inside)
    wrapped = RuntimeError("compile failed")
    wrapped.__cause__ = inside
    assert _dynamo_bookkeeping(wrapped)
    assert not _dynamo_bookkeeping(raised("assert False", "/models/modeling_llama.py"))
    assert not _dynamo_bookkeeping(ValueError("x"))
