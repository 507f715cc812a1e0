"""The persistent decision store: JSON only, atomic, corrupt/foreign entries ignored, read-only folders survive.

No compiling here: every test is milliseconds except the multi-process writer race (a second or two).
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from cpuboost.persist import store as st
from cpuboost.persist import warm


def _key(n: int = 0, torch_version: str | None = None) -> dict:
    machine = st.machine_fingerprint()
    if torch_version:
        machine["torch"] = torch_version
    return {"model": f"m{n}", "weights": "w", "signature": [[1, 3, 8, 8], "float32"], "machine": machine,
            "options": {"dtype": "bf16"}}


def _decision(n: int = 0) -> dict:
    return {"rung": "aoti", "artifact": "graph.pt2", "timings_ms": {"aoti": 1.5 + n, "eager": 3.0}}


@pytest.fixture(autouse=True)
def _fresh_warnings():
    st._WARNED.clear()
    yield
    st._WARNED.clear()


def test_default_root_honours_option_env_and_off(monkeypatch, tmp_path):
    monkeypatch.delenv("CPUBOOST_CACHE_DIR", raising=False)  # conftest points it at the session's folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert st.default_root() == tmp_path / "xdg" / "cpuboost"
    monkeypatch.setenv("CPUBOOST_CACHE_DIR", str(tmp_path / "env"))
    assert st.default_root() == tmp_path / "env"
    assert st.default_root(tmp_path / "opt") == tmp_path / "opt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("CPUBOOST_CACHE_DIR")
    assert st.default_root() == Path.home() / ".cache" / "cpuboost"
    monkeypatch.setenv("CPUBOOST_CACHE_DIR", "off")
    assert st.default_root() is None
    assert st.default_root("OFF") is None
    off = st.DecisionStore.from_option()
    assert not off.enabled and off.get(_key()) is None and off.put(_key(), _decision()) is False
    assert off.artifact_dir(_key()).is_dir()  # a private scratch folder, so callers need no branch


def test_round_trip_is_plain_json(tmp_path):
    store = st.DecisionStore(tmp_path)
    assert store.get(_key()) is None
    assert store.put(_key(), _decision())
    assert store.get(_key()) == _decision()
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 1
    entry = json.loads(files[0].read_text())  # readable by anything, no pickle
    assert entry["key"]["model"] == "m0" and entry["format"] == st.FORMAT
    assert store.info()["entries"] == 1
    with pytest.raises(TypeError):
        store.put(_key(1), {"fn": object()})


def _entry_path(store: st.DecisionStore, key: dict) -> Path:
    return store._entry(st.key_hash(key))


@pytest.mark.parametrize("damage", ["truncated", "binary", "not_a_dict", "other_format", "empty"])
def test_damaged_entry_warns_and_rebuilds(tmp_path, damage):
    store = st.DecisionStore(tmp_path)
    store.put(_key(), _decision())
    path = _entry_path(store, _key())
    raw = path.read_bytes()
    damaged = {"truncated": raw[: len(raw) // 2], "binary": b"\x80\x04\x95 pickle-ish \xff", "not_a_dict": b"[1, 2]",
               "other_format": json.dumps({**json.loads(raw), "format": 999}).encode(), "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.warns(st.CacheWarning):
        assert store.get(_key()) is None
    assert not path.exists()  # removed, so the next build writes a good one
    assert store.put(_key(), _decision())
    assert store.get(_key()) == _decision()


def test_entry_from_another_torch_version_is_ignored(tmp_path):
    store = st.DecisionStore(tmp_path)
    old = _key(torch_version="2.0.0")
    store.put(old, _decision())
    # The natural case: another version hashes to another entry, so it is simply not found.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert store.get(_key()) is None
    # A foreign entry copied over ours (same file name, other key): refused, with a warning naming the field.
    _entry_path(store, _key()).parent.mkdir(parents=True, exist_ok=True)
    os.replace(_entry_path(store, old), _entry_path(store, _key()))
    with pytest.warns(st.CacheWarning, match="torch"):
        assert store.get(_key()) is None


def _hammer(root: str, worker: int, rounds: int, queue) -> None:
    store = st.DecisionStore(root)
    bad = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(rounds):
            store.put(_key(), _decision(i % 3))
            got = store.get(_key())
            if got is not None and got["rung"] != "aoti":
                bad += 1
    queue.put((worker, bad, [str(w.message) for w in caught]))


def test_concurrent_writers_never_corrupt(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), w, 60, queue)) for w in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert not p.is_alive() and p.exitcode == 0
    assert all(bad == 0 and not caught for _, bad, caught in results), results
    store = st.DecisionStore(tmp_path)
    assert store.get(_key())["rung"] == "aoti"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # no temp files left behind


def _refuse_writes(monkeypatch, tmp_path):
    """A read-only folder: chmod where that binds (not root), and writes failing with EROFS either way."""
    if os.geteuid() != 0:
        for p in [tmp_path, *tmp_path.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)

    def refuse(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(st.tempfile, "mkstemp", refuse)


def test_read_only_dir_works_without_caching_and_warns_once(tmp_path, monkeypatch):
    writer = st.DecisionStore(tmp_path)
    writer.put(_key(1), _decision(1))
    (writer.artifact_dir(_key(1)) / "graph.pt2").write_bytes(b"x")
    _refuse_writes(monkeypatch, tmp_path)
    try:
        store = st.DecisionStore(tmp_path)
        with pytest.warns(st.CacheWarning, match="not writable") as caught:
            assert store.put(_key(2), _decision(2)) is False
            assert store.put(_key(3), _decision(3)) is False
            assert store.get(_key(2)) is None
        assert len([w for w in caught if issubclass(w.category, st.CacheWarning)]) == 1
        assert store.get(_key(1)) == _decision(1)  # what is there still serves
        assert (store.artifact_dir(_key(1)) / "graph.pt2").exists()
        scratch = store.artifact_dir(_key(2))  # a private folder instead of one in the read-only store
        assert tmp_path not in scratch.parents
        (scratch / "f").write_bytes(b"ok")
        assert store.trim(0) == 0 and store.info()["writable"] is False
    finally:
        if os.geteuid() != 0:
            for p in [tmp_path, *tmp_path.rglob("*")]:
                p.chmod(0o755 if p.is_dir() else 0o644)


def test_unusable_root_is_a_warning_not_a_crash(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = st.DecisionStore(blocker / "cache")
    with pytest.warns(st.CacheWarning):
        assert store.put(_key(), _decision()) is False
    assert store.get(_key()) is None


def test_size_bound_evicts_least_recently_used(tmp_path):
    store = st.DecisionStore(tmp_path, max_bytes=10 ** 9)
    for n in range(4):
        store.put(_key(n), _decision(n))
        (store.artifact_dir(_key(n)) / "graph.pt2").write_bytes(b"\0" * 10_000)
        for p in (_entry_path(store, _key(n)), store.artifact_dir(_key(n))):
            os.utime(p, (1000.0 + n, 1000.0 + n))
    store.get(_key(0))  # a hit makes key 0 the most recently used
    freed = store.trim(25_000)
    assert freed >= 20_000
    assert store.get(_key(0)) == _decision(0) and store.get(_key(3)) == _decision(3)
    assert store.get(_key(1)) is None and store.get(_key(2)) is None
    assert not (tmp_path / "v1" / "artifacts" / st.key_hash(_key(1))).exists()
    store.clear()
    assert store.info()["entries"] == 0


class _Net(nn.Module):
    def __init__(self, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=stride)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        return self.conv(x) * self.scale[:, None, None]


def test_a_tied_weight_is_hashed_once_and_still_counts():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(64, 8), torch.nn.Linear(8, 64, bias=False)
            self.head.weight = self.embed.weight

    tied, untied = Tied(), Tied()
    untied.head.weight = torch.nn.Parameter(untied.embed.weight.detach().clone())
    untied.embed.weight.data.copy_(tied.embed.weight.data)
    untied.head.weight.data.copy_(tied.embed.weight.data)
    assert st.weights_digest(tied) != st.weights_digest(untied)  # same values, but one table is two here
    before = st.weights_digest(tied)
    with torch.no_grad():
        tied.head.weight[3, 1] += 1.0  # an edit through the second name changes the digest as well
    assert st.weights_digest(tied) != before


def test_fingerprints_separate_structure_from_weights():
    a, b = _Net(), _Net()
    assert st.model_fingerprint(a) == st.model_fingerprint(b)
    assert st.weights_digest(a) != st.weights_digest(b)
    b.load_state_dict(a.state_dict())
    assert st.weights_digest(a) == st.weights_digest(b)
    assert st.model_fingerprint(_Net(stride=2)) != st.model_fingerprint(a)  # extra_repr counts
    assert st.model_fingerprint(_Net().to(torch.bfloat16)) != st.model_fingerprint(a)
    before = st.weights_digest(a)
    with torch.no_grad():
        a.scale[0] = 2.0
    assert st.weights_digest(a) != before
    with torch.no_grad():
        a.conv.weight.data[0, 0, 0, 0] += 1.0  # an edit through .data changes the content hash too
    assert st.weights_digest(a) != before

    class Other(_Net):
        def forward(self, x):
            return self.conv(x) + 1

    assert st.model_fingerprint(Other()) != st.model_fingerprint(a)  # forward's code counts


def test_make_key_and_machine_fingerprint():
    machine = st.machine_fingerprint(("openvino",))
    assert machine["torch"] == torch.__version__ and "cpu_flags" in machine and "openvino" in machine
    net, x = _Net(), torch.randn(1, 3, 8, 8)
    key = st.make_key(net, (x,), {}, {"dtype": torch.bfloat16})
    json.dumps(key)
    assert key == st.make_key(net, (torch.randn(1, 3, 8, 8),), {}, {"dtype": torch.bfloat16})
    assert st.key_hash(key) != st.key_hash(st.make_key(net, (torch.randn(2, 3, 8, 8),), {}, {"dtype": "bf16"}))
    assert "weights" not in st.make_key(net, (x,), {}, {}, weights=False)


def test_inductor_cache_is_scoped(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    store = st.DecisionStore(tmp_path)
    with warm.inductor_cache(store) as folder:
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    with warm.inductor_cache(store):
        pass
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"


def test_a_dynamic_builds_key_reads_its_dynamic_dims_as_any_size():
    """One entry per dynamic family: the key of a build dynamic in dims 0 and 2 is the same at every size of
    those dims, and differs where a static dim, the dtype or the dynamic dims themselves differ."""
    net = _Net()

    def key(shape, dims={0: [0, 2]}, dtype=torch.float32):
        return st.key_hash(st.make_key(net, (torch.zeros(shape, dtype=dtype),), {}, {}, dynamic=dims))

    assert key((1, 3, 8, 8)) == key((4, 3, 5, 8)) == key((2, 3, 300, 8))
    assert key((1, 3, 8, 8)) != key((1, 3, 8, 9))  # dim 3 is static
    assert key((1, 3, 8, 8)) != key((1, 3, 8, 8), dtype=torch.float64)
    assert key((1, 3, 8, 8)) != key((1, 3, 8, 8), dims={0: [2]})
    assert key((1, 3, 8, 8), dims=None) != key((1, 3, 8, 8))
