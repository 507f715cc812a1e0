"""Deployment packages and persistent AOTInductor graphs: round trip, fresh-process load, typed refusals.

One small conv net is compiled once (module fixture, ~20-30 s on 2 busy cores); every other test copies
that package and damages or edits the copy. Only the structure tests run without a compiler.
"""
from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cpuboost.persist import package as pkg
from cpuboost.persist import store as st
from cpuboost.errors import CpuBoostError

Pair = collections.namedtuple("Pair", "logits features")


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x, scale: float = 1.0):
        f = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return {"out": Pair(self.head(f) * scale, f), "count": 2}


def _net() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def _close(out, ref, bound=3e-2):
    assert out["count"] == ref["count"] == 2
    assert isinstance(out["out"], Pair)
    for a, b in zip(out["out"], ref["out"]):
        assert a.dtype == b.dtype == torch.float32  # eager fp32's dtypes, although the graph ran bf16
        assert ((a - b).abs().max() / b.abs().max()).item() < bound


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store with one compiled graph, and a package packed from it (one compile for the whole file)."""
    root = tmp_path_factory.mktemp("pkg")
    net = _net()
    store = st.DecisionStore(root / "cache")
    key = st.make_key(net, (X,), {"scale": 0.5}, {"dtype": "bf16"})
    graph, file = pkg.compile_aoti(net, (X,), {"scale": 0.5}, "bf16", workdir=store.artifact_dir(key))
    store.put(key, {"rung": "aoti", "artifact": file.name})
    package = pkg.pack_graphs([file], root / "package", {"model": "TinyNet"})
    return {"net": net, "graph": graph, "file": file, "store": store, "key": key, "package": package, "root": root}


pytestmark = pytest.mark.slow


def _copy(built, tmp_path) -> Path:
    return Path(shutil.copytree(built["package"], tmp_path / "copy"))


def test_compiled_graph_answers_like_eager(built):
    ref = built["net"](X, scale=0.5)
    _close(built["graph"](X, scale=0.5), ref)
    # channels_last input to a graph traced contiguous: restrided, same answer
    _close(built["graph"](X.contiguous(memory_format=torch.channels_last), scale=0.5), ref)


def test_round_trip_through_store_and_package(built):
    ref = built["net"](X, scale=0.5)
    decision = built["store"].get(built["key"])
    graph = pkg.load_graph(built["store"].artifact_dir(built["key"]) / decision["artifact"])
    _close(graph(X, scale=0.5), ref)
    loaded = pkg.load_package(built["package"])
    assert isinstance(loaded, nn.Module) and loaded.manifest["extra"] == {"model": "TinyNet"}
    assert loaded.manifest["dtype"] == "bfloat16" and loaded.manifest["needs"]["torch"] == torch.__version__
    _close(loaded(X, scale=0.5), ref)
    with pytest.raises(pkg.PackageSignatureError, match="float32\\[2x3x12x12\\]"):
        loaded(torch.randn(1, 3, 12, 12), scale=0.5)
    with pytest.raises(pkg.PackageSignatureError):
        loaded(X, scale=2.0)  # a Python scalar is part of the signature: it was baked into the graph


def test_fresh_process_loads_without_compiling_or_model_code(built, tmp_path):
    """A new interpreter: no TinyNet class, no torch._inductor import, same answer as this process."""
    expected = built["graph"](X, scale=0.5)["out"].logits
    torch.save(X, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import json, sys, torch
        from cpuboost.persist.package import load_package
        x = torch.load({str(tmp_path / 'x.pt')!r})
        out = load_package({str(built['package'])!r})(x, scale=0.5)
        print(json.dumps([out["out"].logits.tolist(), type(out["out"]).__name__, "torch._inductor" in sys.modules]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logits, kind, inductor_imported = json.loads(proc.stdout.strip().splitlines()[-1])
    assert torch.equal(torch.tensor(logits), expected)  # the same graph gives the same bits
    assert kind == "Pair"  # a namedtuple of the same name and fields, although this test module is not imported
    assert inductor_imported is False


@pytest.mark.parametrize("field,value,match", [
    ("torch", "1.13.0", "torch"),
    ("cpu_flags", None, None),  # real x86 flags, the first this machine lacks (AMX Xeons have amx_tile)
    ("arch", "aarch64", "arch"),
])
def test_manifest_mismatch_is_refused_with_a_typed_error(built, tmp_path, field, value, match):
    copy = _copy(built, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    if field == "cpu_flags":
        from cpuboost.persist.keys import _cpu_flags

        here = set(_cpu_flags())
        match = next(f for f in ("amx_tile", "amx_fp16", "avx512_fp16", "avx10_2", "sha512") if f not in here)
        value = sorted(set(manifest["needs"]["cpu_flags"]) | {match})
    manifest["needs"][field] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(pkg.PackageMismatchError, match=match) as info:
        pkg.load_package(copy)
    assert isinstance(info.value, CpuBoostError) and isinstance(info.value, RuntimeError)
    assert field in info.value.differences and "To fix" in str(info.value)
    pkg.load_package(copy, check=False)  # the caller may override, at their own risk


def test_damaged_packages_are_refused_not_crashed(built, tmp_path):
    copy = _copy(built, tmp_path)
    graph = next(copy.glob("*.pt2"))
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 3])
    with pytest.raises(pkg.PackageFormatError, match="incomplete or damaged"):
        pkg.load_package(copy)
    (copy / "manifest.json").write_text('{"format": "cpuboost-package", "vers')
    with pytest.raises(pkg.PackageFormatError, match="damaged"):
        pkg.load_package(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(pkg.PackageFormatError, match="missing"):
        pkg.load_package(copy)
    manifest = json.loads((built["package"] / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(pkg.PackageMismatchError, match="version"):
        pkg.load_package(copy)


def test_truncated_store_artifact_is_a_format_error_so_the_runtime_rebuilds(built, tmp_path):
    folder = Path(shutil.copytree(built["file"].parent, tmp_path / "artifact"))
    graph = folder / built["file"].name
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(pkg.PackageFormatError):
        pkg.load_graph(graph)
    graph.with_suffix(".json").write_text("{not json")
    with pytest.raises(pkg.PackageFormatError):
        pkg.load_graph(graph)


def test_output_structure_round_trips_without_compiling():
    transformers = pytest.importorskip("transformers")
    out = transformers.modeling_outputs.BaseModelOutputWithPooling(last_hidden_state=torch.ones(1, 2),
                                                                   pooler_output=torch.zeros(1))
    leaves: list = []
    spec = pkg.describe_tree({"a": (out, [torch.ones(1)]), "n": None}, leaves, inputs=False)
    json.dumps(spec)
    real = pkg._rebuild(spec, leaves, [0], pkg._classes(spec, "auto", {}))
    assert type(real["a"][0]) is type(out) and real["n"] is None
    plain = pkg._rebuild(spec, leaves, [0], pkg._classes(spec, "plain", {}))["a"][0]
    assert isinstance(plain, pkg.PackagedOutput)
    assert plain.last_hidden_state is leaves[0] and plain[1] is leaves[1] and plain["pooler_output"] is leaves[1]
    assert plain.to_tuple() == (leaves[0], leaves[1])
    with pytest.raises(pkg.PackageFormatError, match="cannot be packaged"):
        pkg.describe_tree(object(), [], inputs=False)


def test_many_threads_share_one_loaded_graph(built):
    """The AOTInductor container runs calls on its model instances at once: same answers as one thread."""
    from concurrent.futures import ThreadPoolExecutor

    graph = built["graph"]
    inputs = [torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(s)) for s in range(8)]
    alone = [graph(x, scale=0.5)["out"].logits for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda x: graph(x, scale=0.5)["out"].logits, inputs * 3))
    assert all(torch.equal(a, b) for a, b in zip(alone * 3, together))


def test_package_records_the_full_cpu_flag_list_and_every_graph_digest(built):
    """Inductor compiles with -march=native: the package needs every flag /proc/cpuinfo lists, not a subset."""
    manifest = json.loads((built["package"] / "manifest.json").read_text())
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        here = next(set(line.partition(":")[2].split()) for line in fh if line.startswith(("flags", "Features")))
    assert set(manifest["needs"]["cpu_flags"]) == here
    assert {"fpu", "sse2"} <= set(manifest["needs"]["cpu_flags"])  # outside the 22 codegen flags kept before
    assert all(len(g["sha256"]) == 64 for g in manifest["graphs"])


def test_tampered_package_artifact_is_a_format_error(built, tmp_path):
    """Same size, one byte changed (a planted .so would keep the size too): the SHA-256 check refuses it."""
    copy = _copy(built, tmp_path)
    graph = next(copy.glob("*.pt2"))
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(pkg.PackageFormatError, match="SHA-256"):
        pkg.load_package(copy)


@pytest.mark.parametrize("where", ["../outside.pt2", "ABSOLUTE", "link.pt2"])
def test_manifest_path_outside_the_package_is_refused(built, tmp_path, where):
    """A manifest naming ``../x``, an absolute path, or a link out of the package loads nothing from there."""
    copy = _copy(built, tmp_path)
    graph = next(copy.glob("*.pt2"))
    outside = tmp_path / "outside.pt2"
    shutil.copyfile(graph, outside)  # a real, loadable graph: only its place makes it wrong
    if where == "ABSOLUTE":
        where = str(outside)
    elif where == "link.pt2":
        (copy / where).symlink_to(outside)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["graphs"][0]["file"] = where
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(pkg.PackageFormatError, match="outside|relative"):
        pkg.load_package(copy)


def test_package_in_a_folder_others_can_write_is_refused(built, tmp_path):
    copy = _copy(built, tmp_path)
    copy.chmod(0o777)
    with pytest.raises(pkg.UnsafeLocationError, match="writable by others"):
        pkg.load_package(copy)
    copy.chmod(0o755)
    assert pkg.load_package(copy).signatures


def test_damaged_manifest_fields_are_format_errors(built, tmp_path):
    """Wrong types anywhere in the manifest: a typed error, never a KeyError or TypeError."""
    copy = _copy(built, tmp_path)
    manifest = json.loads((built["package"] / "manifest.json").read_text())
    for broken in ({**manifest, "graphs": [{"file": 3}]}, {**manifest, "graphs": "x"},
                   {**manifest, "graphs": [{**manifest["graphs"][0], "inputs": None}]}):
        (copy / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(pkg.PackageFormatError):
            pkg.load_package(copy)


class _Lookup(nn.Module):
    """A 2 MiB embedding table (read as an input) beside a small one (held) and a matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.table, self.small = nn.Embedding(8192, 64), nn.Embedding(16, 64)
        self.proj = nn.Linear(64, 8)

    def forward(self, ids):
        return self.proj(self.table(ids) + self.small(ids % 16))


def test_a_runtime_graph_reads_the_large_embedding_table_from_the_model_instead_of_holding_it(tmp_path):
    import zipfile

    from cpuboost.persist import aoti

    torch.manual_seed(0)
    model, ids = _Lookup().eval(), torch.randint(0, 8192, (2, 5))
    graph, file = aoti.compile_aoti(model, (ids,), {}, "fp32", workdir=tmp_path, read_tables=True)
    assert graph.meta["tables"] == [["table.weight", [8192, 64], "float32"]]  # not the 4 KiB one
    held = sum(i.file_size for i in zipfile.ZipFile(file).infolist() if i.filename.endswith(".blob"))
    assert held < 8192 * 64 * 4 / 8  # the table's 2 MiB are not in the package
    with torch.no_grad():
        torch.testing.assert_close(graph(ids), model(ids), rtol=1e-5, atol=1e-6)
        loaded = aoti.load_graph(file, model=model)
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-5, atol=1e-6)
        model.table.weight[ids[0, 0]] += 1.0  # the graph reads the model's table as it is now
        torch.testing.assert_close(loaded(ids), model(ids), rtol=1e-5, atol=1e-6)
    with pytest.raises(pkg.PackageFormatError, match="load it with the model"):
        aoti.load_graph(file)
    with pytest.raises(pkg.PackageFormatError, match="not the float32"):
        aoti.load_graph(file, model=_resized())


def _resized() -> nn.Module:
    other = _Lookup()
    other.table = nn.Embedding(100, 64)
    return other
