"""The ``cpuboost`` command: env facts, bench end to end, argument errors and the launch hand-off."""
from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpuboost.machine import envinfo, hardware
from cpuboost.cli import main

FACTORY = '''
import torch
def make(batch=4):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    return net.eval(), torch.randn(batch, 8)
def no_batch():
    return torch.nn.Linear(2, 2), torch.randn(1, 2)
def nothing():
    return torch.nn.Linear(2, 2)
'''


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "tinymodels.py"
    path.write_text(FACTORY)
    return str(path)


def cpuinfo_flags() -> set[str]:
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def test_env_json_has_the_documented_keys(capsys):
    """`env --json` prints valid JSON with exactly the documented keys and a reason for each unusable backend."""
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert tuple(info) == envinfo.KEYS
    assert set(info["isa"]) == set(envinfo.ISA)
    assert info["cpu"]["torch_threads"] >= 1 and info["cpu"]["logical_cpus"] >= 1
    assert info["versions"]["torch"]
    names = [b["name"] for b in info["backends"]]
    assert names == ["native", "ipex", "openvino"]
    assert all(b["reason"] for b in info["backends"] if not b["usable"])
    assert info["recommended_dtype"] in ("bf16", "fp32") and info["recommended_reason"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_env_isa_and_bf16_verdict_come_from_the_os(capsys):
    """ISA flags match /proc/cpuinfo, and bf16 is called native only when AVX512_BF16 or AMX_BF16 is there."""
    main(["env", "--json"])
    info = json.loads(capsys.readouterr().out)
    flags = cpuinfo_flags()
    assert info["isa"]["AVX512_BF16"] == ("avx512_bf16" in flags)
    assert info["isa"]["AMX_BF16"] == ("amx_bf16" in flags)
    assert info["isa"]["AVX2"] == ("avx2" in flags)
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert info["bf16"].startswith("native" if native else "emulated")
    assert info["recommended_dtype"] == ("bf16" if native else "fp32")


@settings(max_examples=100, deadline=None)
@given(st.sets(st.sampled_from(envinfo.ISA)))
def test_recommendation_follows_native_bf16(features):
    """bf16 is recommended exactly when the CPU has AVX512_BF16 or AMX_BF16; otherwise fp32 with the reason."""
    hw = hardware.Hardware("cpu", 2, 2, 2, frozenset(features), "AVX512", True)
    dtype, why = envinfo.recommendation(hw)
    assert dtype == ("bf16" if {"AVX512_BF16", "AMX_BF16"} & features else "fp32")
    assert ("emulated" in why) == (dtype == "fp32")


def test_env_text_is_pasteable(capsys):
    """Plain `env` prints one readable report naming every backend, the bf16 verdict and the recommendation."""
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for needle in ("CPU:", "torch CPU capability", "bf16:", "native", "ipex", "openvino", "recommended dtype"):
        assert needle in out


def test_python_dash_m_cpuboost_env():
    """`python -m cpuboost env --json` works as a separate process and prints JSON."""
    proc = subprocess.run([sys.executable, "-m", "cpuboost", "env", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cpuboost"]


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["bogus"], "invalid choice"),
    (["env", "--yaml"], "unrecognized arguments"),
    (["bench"], "a model is required"),
    (["bench", "mlp", "--batch", "0"], "--batch 0 must be a positive integer"),
    (["bench", "mlp", "--rounds", "-1"], "--rounds -1 must be a positive integer"),
    (["bench", "mlp", "--batch", "two"], "invalid int value"),
    (["bench", "mlp", "--dtype", "int8"], "invalid choice"),
    (["bench", "mlp", "--paths", "eager_fp32,warp"], "unknown benchmark path 'warp'"),
    (["bench", "nosuchmodel"], "neither a built-in"),
    (["bench", "nowhere/model.py:make"], "no file"),
    (["bench", "mlp", "--json", "/no/such/folder/r.json"], "folder /no/such/folder does not exist"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_argument_errors_print_usage_and_exit_2(capsys, argv, message):
    """Bad arguments print the usage line and the problem on stderr and return exit status 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: cpuboost" in err and message in err


def test_factory_errors_are_usage_errors(capsys, factory_file):
    """A factory that returns no inputs, or gets --batch it cannot take, is reported with what to return."""
    assert main(["bench", f"{factory_file}:nothing", "--paths", "eager_fp32"]) == 2
    assert "must return (model, inputs)" in capsys.readouterr().err
    assert main(["bench", f"{factory_file}:no_batch", "--batch", "3"]) == 2
    assert "takes no `batch` argument" in capsys.readouterr().err
    assert main(["bench", f"{factory_file}:missing"]) == 2
    assert "no callable 'missing'" in capsys.readouterr().err


def test_help_lists_the_subcommands(capsys):
    """`cpuboost --help` exits 0 and names env, bench and launch."""
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "env" in out and "bench" in out and "launch" in out


def test_plot_without_matplotlib_fails_before_benchmarking(capsys, monkeypatch, factory_file):
    """--plot without matplotlib is a usage error naming the extra, raised before any model is built."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", f"{factory_file}:make", "--plot", "x.png"]) == 2
    captured = capsys.readouterr()
    assert "cpuboost[bench]" in captured.err and "building" not in captured.err


def test_launch_hands_the_rest_of_argv_to_cpuboost_launch(monkeypatch):
    """`cpuboost launch ...` imports cpuboost.launch only then and passes every later argument untouched."""
    seen = []
    module = types.ModuleType("cpuboost.launch")
    module.__spec__ = importlib.machinery.ModuleSpec("cpuboost.launch", None)
    module.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "cpuboost.launch", module)
    assert main(["launch", "--nproc", "2", "train.py", "--lr", "0.1", "--help"]) == 7
    assert seen == [["--nproc", "2", "train.py", "--lr", "0.1", "--help"]]


def test_launch_missing_is_a_clear_error(monkeypatch, capsys):
    """Without cpuboost.launch installed, `cpuboost launch` exits 2 and points at torchrun."""
    monkeypatch.setitem(sys.modules, "cpuboost.launch", None)
    assert main(["launch", "train.py"]) == 2
    assert "torchrun" in capsys.readouterr().err


def test_bench_end_to_end_with_json_and_plot(capsys, tmp_path, factory_file):
    """`bench FILE:factory` prints the table and writes JSON and a PNG chart (eager paths)."""
    pytest.importorskip("matplotlib")
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["bench", f"{factory_file}:make", "--batch", "5", "--paths", "eager", "--rounds", "3",
            "--round-seconds", "0.005", "--json", str(out_json), "--plot", str(out_png)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "eager fp32" in captured.out and "eager autocast bf16" in captured.out and "GEMM peak" in captured.out
    assert "building eager autocast bf16" in captured.err  # progress on stderr, not in the table
    doc = json.loads(out_json.read_text())
    result = doc["results"][0]
    assert result["batch"] == 5 and result["flops"] == 2 * 5 * (8 * 16 + 16 * 4)
    assert [p["name"] for p in result["paths"]] == ["eager_fp32", "eager_bf16"]
    assert all(len(p["samples_s"]) == 3 and p["status"] == "ok" for p in result["paths"])
    assert set(result["gemm_peak_gflops"]) == {"fp32", "bf16"}
    assert out_png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_with_one_compiled_path(capsys, factory_file):
    """`bench --dtype fp32` with cpuboost fp32 compiles one graph and reports its build time and accuracy."""
    argv = ["bench", f"{factory_file}:make", "--paths", "eager_fp32,cpuboost_fp32,eager_bf16", "--dtype", "fp32",
            "--rounds", "2", "--round-seconds", "0.005", "--no-peak", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("cpuboost fp32"))
    assert "ran " in row and "x" in row
    assert "inductor fp32: failed" not in row and "inductor fp32: rejected" not in row, row
    assert "eager autocast bf16" not in out  # --dtype fp32 keeps only fp32 paths (plus the baseline)


def test_cache_info_and_clear(tmp_path, capsys):
    """`cpuboost cache info|clear` reports the persistent cache and empties it."""
    from cpuboost.persist.store import DecisionStore

    store = DecisionStore(tmp_path)
    store.put({"model": "m", "signature": [1]}, {"rung": "eager"})
    assert main(["cache", "info", "--dir", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["entries"] == 1 and info["root"] == str(tmp_path)
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert "cleared 1 entries" in capsys.readouterr().out
    assert DecisionStore(tmp_path).info()["entries"] == 0
