"""The benchmark harness: path selection, interleaved timing, FLOPs, results, JSON and the chart."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cpuboost import bench
from cpuboost.bench import plot as benchplot
from cpuboost.bench.results import BenchResult, PathResult, load_json, write_json
from cpuboost.bench.workloads import Workload

BUILTIN = ["eager_fp32", "eager_bf16", "compile_fp32", "compile_bf16", "cpuboost_fp32", "cpuboost_bf16",
           "cpuboost_fp32_nofusion", "cpuboost_bf16_nofusion"]


def tiny() -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return Workload("tiny", model, (torch.randn(3, 8),), batch=3, description="tiny MLP")


@pytest.fixture
def scratch_paths():
    """Paths registered by a test are removed afterwards."""
    before = set(bench._PATHS)
    yield
    for name in set(bench._PATHS) - before:
        del bench._PATHS[name]


def run_fast(wl: Workload, names, rounds: int = 3, **kw) -> BenchResult:
    paths = [bench.get_path(n) for n in names]
    return bench.run(wl, paths, rounds=rounds, round_seconds=0.002, warmup=1, progress=False,
                     measure_peak=kw.pop("measure_peak", False), **kw)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(BUILTIN), max_size=8), st.sampled_from(["all", "fp32", "bf16"]))
def test_resolve_paths_baseline_first_no_duplicates(names, dtype):
    """eager_fp32 always comes first, each path appears once, order is kept and --dtype filters the rest."""
    got = [p.name for p in bench.resolve_paths(",".join(names) or "eager_fp32", dtype)]
    assert got[0] == "eager_fp32"
    assert len(got) == len(set(got))
    wanted = [n for n in dict.fromkeys(names) if n != "eager_fp32"
              and (dtype == "all" or bench.get_path(n).dtype == dtype)]
    assert got[1:] == wanted


def test_resolve_paths_groups_expand():
    """Group names expand to their members; the issue-2 group holds the six paths of the core benchmark."""
    assert [p.name for p in bench.resolve_paths("issue2")] == list(bench.GROUPS["issue2"])
    assert [p.name for p in bench.resolve_paths("eager,cpuboost_fp32")] == ["eager_fp32", "eager_bf16",
                                                                            "cpuboost_fp32"]
    assert {p.name for p in bench.resolve_paths("all")} >= set(BUILTIN)


def test_unknown_path_names_the_choices():
    """An unknown path is an error that lists the registered paths and groups."""
    with pytest.raises(bench.UnknownPathError, match="eager_fp32.*groups: issue2") as info:
        bench.resolve_paths("eager_fp32,turbo")
    assert isinstance(info.value, ValueError) and "'turbo'" in str(info.value)


def test_peers_include_only_available_plugin_paths(scratch_paths):
    """'peers' adds registered extra paths (IPEX/OpenVINO style) that can run here and leaves out the rest."""
    bench.register_path("peer_ok", bench._eager, dtype="fp32")
    bench.register_path("peer_missing", bench._eager, dtype="bf16", available=lambda: "not installed")
    names = [p.name for p in bench.resolve_paths("eager_fp32,peers")]
    assert "peer_ok" in names and "peer_missing" not in names
    assert ("openvino_bf16" in names) == (bench.get_path("openvino_bf16").available() is None)
    assert not {"compile_bf16", "cpuboost_bf16"} & set(names)


def test_register_path_rejects_duplicates_and_bad_dtype(scratch_paths):
    """A second path under a taken name, or an unknown dtype, is refused with the reason."""
    with pytest.raises(bench.UnknownPathError, match="exists"):
        bench.register_path("eager_fp32", bench._eager, dtype="fp32")
    with pytest.raises(bench.UnknownPathError, match="dtype='int3'"):
        bench.register_path("weird", bench._eager, dtype="int3")


def test_count_flops_of_linear_layers():
    """FLOPs are counted by torch's FlopCounterMode: 2 * batch * in * out per Linear."""
    assert bench.count_flops(tiny()) == 2 * 3 * (8 * 16 + 16 * 4)


def test_gemm_peak_is_a_plausible_rate():
    """The GEMM peak measured on the spot is a positive, finite GFLOP/s figure."""
    peak = bench.gemm_peak(torch.float32, seconds=0.05, n=256)
    assert 0.01 < peak < 1e6


def test_rounds_interleave_and_rotate(scratch_paths):
    """Every round runs every path, and the path that goes first rotates from round to round."""
    calls: list[str] = []

    def recorder(tag):
        def build(model, wl):
            def run(*args):
                calls.append(tag)
                return model(*args)
            return run
        return build

    bench.register_path("rec_a", recorder("a"), dtype="fp32")
    bench.register_path("rec_b", recorder("b"), dtype="fp32")
    wl = tiny()
    paths = [bench.get_path("rec_a"), bench.get_path("rec_b")]
    result = bench.run(wl, paths, rounds=4, round_seconds=1e-9, warmup=0, progress=False, measure_peak=False)
    timed = calls[-8:]  # 1 call per path per round (round_seconds is tiny), after the build calls
    firsts = [timed[i] for i in range(0, 8, 2)]
    assert firsts == ["a", "b", "a", "b"]
    assert all(sorted(timed[i:i + 2]) == ["a", "b"] for i in range(0, 8, 2))
    assert all(len(p.samples_s) == 4 for p in result.paths)


def test_run_reports_medians_ratios_and_errors():
    """Eager paths run end to end: samples per round, speedup of the baseline is 1, bf16 error within 3e-2."""
    result = run_fast(tiny(), ["eager_fp32", "eager_bf16"], rounds=5, measure_peak=True)
    base, bf16 = result.path("eager_fp32"), result.path("eager_bf16")
    assert len(base.samples_s) == 5 and len(bf16.samples_s) == 5
    assert result.speedup("eager_fp32") == pytest.approx(1.0)
    paired = sorted(b / p for b, p in zip(base.samples_s, bf16.samples_s))
    assert result.speedup("eager_bf16") == pytest.approx(paired[2])  # median of 5 same-round ratios
    lo, hi = result.speedup_quartiles("eager_bf16")
    assert paired[0] <= lo <= result.speedup("eager_bf16") <= hi <= paired[-1]
    assert base.max_rel_err == 0.0
    assert 0.0 < bf16.max_rel_err <= 3e-2
    assert set(result.peaks) == {"fp32", "bf16"} and all(v > 0 for v in result.peaks.values())
    assert result.flops == 2 * 3 * (8 * 16 + 16 * 4)
    assert result.gflops(base) == pytest.approx(result.flops / base.median_s / 1e9)
    table = result.table()
    assert "eager fp32" in table and "eager autocast bf16" in table and "1.00x" in table


def test_failing_unavailable_and_wrong_paths_are_reported(scratch_paths):
    """A path that raises is 'failed', one that cannot run is 'skipped', a wrong one is flagged; others still run."""
    def broken(model, wl):
        raise RuntimeError("no kernel for this op")

    bench.register_path("broken", broken, dtype="fp32")
    bench.register_path("absent", bench._eager, dtype="fp32", available=lambda: "not installed here")
    bench.register_path("zeros", lambda m, wl: (lambda *a: torch.zeros(3, 4)), dtype="fp32")
    result = run_fast(tiny(), ["eager_fp32", "broken", "absent", "zeros"])
    assert result.path("broken").status == "failed" and "no kernel" in result.path("broken").reason
    assert result.path("absent").status == "skipped" and result.path("absent").reason == "not installed here"
    zeros = result.path("zeros")
    assert zeros.timed and zeros.max_rel_err > 0.5 and "differs from eager" in zeros.reason
    assert result.path("eager_fp32").timed
    assert "failed" in result.table() and "not installed here" in result.table()


@pytest.mark.slow
def test_cpuboost_path_builds_once_and_says_what_ran():
    """cpuboost fp32 builds in the first call (timed as build), matches eager, and names the graph it ran."""
    result = run_fast(tiny(), ["eager_fp32", "cpuboost_fp32"])
    cb = result.path("cpuboost_fp32")
    assert cb.timed and cb.build_s > 0
    assert bench.harness._inductor_started  # Inductor's process start-up was paid before the timed build
    assert cb.max_rel_err <= 1e-4
    assert cb.note.startswith("ran ")
    # the compiled rung was built and verified, whether or not it beat eager: a fallback fails this test
    assert "inductor fp32: failed" not in cb.note and "inductor fp32: rejected" not in cb.note, cb.note


def test_build_progress_goes_to_the_cpuboost_logger(caplog):
    """Builds announce themselves through the 'cpuboost' logger at INFO, so notebooks and CLIs can show them."""
    with caplog.at_level(logging.INFO, logger="cpuboost"):
        run_fast(tiny(), ["eager_fp32", "eager_bf16"], rounds=1)
    text = caplog.text
    assert "building eager autocast bf16" in text and "built eager autocast bf16" in text
    assert "interleaved rounds" in text


def test_json_round_trip_keeps_samples_and_handles_infinite_error(tmp_path):
    """write_json stores every sample and derived figure ("inf" for an infinite error); load_json reads it back."""
    result = run_fast(tiny(), ["eager_fp32", "eager_bf16"], rounds=3)
    result.paths.append(PathResult("odd", "odd", "fp32", max_rel_err=math.inf, status="failed", reason="shape"))
    out = tmp_path / "r.json"
    write_json([result], str(out), command=["cpuboost", "bench"])
    doc = json.loads(out.read_text())
    assert doc["schema"] == "cpuboost.bench/1" and doc["command"] == ["cpuboost", "bench"]
    paths = {p["name"]: p for p in doc["results"][0]["paths"]}
    assert len(paths["eager_bf16"]["samples_s"]) == 3
    assert paths["eager_fp32"]["speedup_vs_eager_fp32"] == pytest.approx(1.0)
    assert paths["eager_bf16"]["median_s"] == pytest.approx(result.path("eager_bf16").median_s)
    assert paths["odd"]["max_rel_err"] == "inf" and paths["odd"]["median_s"] is None
    again = load_json(str(out))[0]
    assert again.table() == result.table() and again.path("odd").max_rel_err == math.inf


def test_result_renders_as_html_for_notebooks():
    """A BenchResult shows as an HTML table in Jupyter, one row per path."""
    result = run_fast(tiny(), ["eager_fp32", "eager_bf16"], rounds=2)
    page = result._repr_html_()
    assert page.count("<tr>") == 3 and "eager autocast bf16" in page and "<th>vs eager fp32</th>" in page


def test_plot_writes_a_png_with_a_panel_per_workload(tmp_path):
    """The chart is a PNG with one panel per workload, tall enough to read, skipped paths included."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    one = run_fast(tiny(), ["eager_fp32", "eager_bf16"], rounds=2)
    two = run_fast(tiny(), ["eager_fp32"], rounds=2)
    two.paths.append(PathResult("absent", "absent", "bf16", status="skipped", reason="not installed"))
    out = tmp_path / "chart.png"
    benchplot.plot([one, two], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(str(out)).shape[:2]
    assert width >= 1000 and height >= 400


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    """Without matplotlib, plotting raises an ImportError that says how to install it."""
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(benchplot.PlotUnavailableError, match=r"cpuboost\[bench\]") as info:
        benchplot.plot([], str(tmp_path / "x.png"))
    assert isinstance(info.value, ImportError)


def test_run_takes_a_model_spec_and_path_names(tmp_path, monkeypatch):
    """bench.run accepts a model spec string and a list of path names, as a notebook user would type them."""
    (tmp_path / "nbmodels.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Linear(4, 2).eval(), torch.randn(2, 4)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = bench.run("nbmodels:make", ["eager"], rounds=2, round_seconds=0.001, progress=False,
                       measure_peak=False)
    assert [p.name for p in result.paths] == ["eager_fp32", "eager_bf16"]
    assert result.batch == 2 and all(p.timed for p in result.paths)


def test_a_broken_plugin_hook_does_not_break_the_benchmark(monkeypatch, scratch_paths, caplog):
    """A backend whose register_bench_paths raises is logged and skipped; the built-in paths still list."""
    import importlib.machinery
    import types

    module = types.ModuleType("cpuboost_fake_backend")
    module.__spec__ = importlib.machinery.ModuleSpec("cpuboost_fake_backend", None)

    def hook(register):
        raise OSError("libfoo.so: cannot open shared object file")

    module.register_bench_paths = hook
    monkeypatch.setitem(__import__("sys").modules, "cpuboost_fake_backend", module)
    monkeypatch.setattr(bench.paths, "_PLUGIN_MODULES", ("cpuboost_fake_backend",))
    monkeypatch.setattr(bench.paths, "_plugins_loaded", False)
    with caplog.at_level(logging.WARNING, logger="cpuboost"):
        names = bench.list_paths()
    assert "eager_fp32" in names and "libfoo.so" in caplog.text
