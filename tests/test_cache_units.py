"""Cache units and trust, without compiling: whole-unit publishing, digests, the cross-process entry lock,
trim leaving a locked entry alone, stale staging swept, and a cache folder others can write refused."""
from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest
import torch

import cpuboost
from cpuboost.persist import store as st
from cpuboost.persist import trust, units
from cpuboost.persist.errors import PackageFormatError


@pytest.fixture(autouse=True)
def _fresh_warnings():
    st._WARNED.clear()
    yield
    st._WARNED.clear()


def _key(n: int) -> dict:
    return {"model": f"m{n}", "weights": "w", "signature": [n], "machine": {}, "options": {}}


def _unit(folder, name="graph", payload=b"\x7fELF" + b"\0" * 4000):
    staging = units.stage(folder / name)
    (staging / f"{name}.pt2").write_bytes(payload)
    units.seal(staging, f"{name}.json", {"format": "test"})
    return staging


def test_a_unit_appears_whole_or_not_at_all(tmp_path):
    """Until the rename nothing is at the final name; after it, both files and a record naming their digests."""
    staging = _unit(tmp_path)
    assert not (tmp_path / "graph").exists() and staging.name.startswith(".graph.staging-")
    units.publish(staging, tmp_path / "graph")
    record = json.loads((tmp_path / "graph" / "graph.json").read_text())
    assert set(record["files"]) == {"graph.pt2"} and len(record["files"]["graph.pt2"]["sha256"]) == 64
    units.check_files(tmp_path / "graph", record["files"], "unit")
    again = _unit(tmp_path, payload=b"other")  # a rebuilt unit replaces the old one whole
    units.publish(again, tmp_path / "graph")
    assert (tmp_path / "graph" / "graph.pt2").read_bytes() == b"other"
    assert [p.name for p in tmp_path.iterdir()] == ["graph"]  # no staging or trash left


def test_a_changed_or_missing_file_fails_its_digest(tmp_path):
    units.publish(_unit(tmp_path), tmp_path / "graph")
    record = json.loads((tmp_path / "graph" / "graph.json").read_text())
    pt2 = tmp_path / "graph" / "graph.pt2"
    data = bytearray(pt2.read_bytes())
    data[10] ^= 1
    pt2.write_bytes(bytes(data))
    with pytest.raises(PackageFormatError, match="SHA-256"):
        units.check_files(tmp_path / "graph", record["files"], "unit")
    pt2.unlink()
    with pytest.raises(PackageFormatError, match="missing"):
        units.check_files(tmp_path / "graph", record["files"], "unit")
    with pytest.raises(PackageFormatError, match="no file digests"):
        units.check_files(tmp_path / "graph", None, "unit")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", ""])
def test_names_outside_their_folder_are_refused(tmp_path, name):
    with pytest.raises(PackageFormatError):
        units.inside(tmp_path, name, "manifest")


def _hold(lock_path: str, ready, release) -> None:
    lock = units.EntryLock(__import__("pathlib").Path(lock_path))
    assert lock.acquire(timeout=10)
    ready.set()
    release.wait(30)


def test_entry_lock_is_exclusive_across_processes_and_freed_when_its_holder_dies(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(str(tmp_path / "e.lock"), ready, release))
    child.start()
    assert ready.wait(30)
    mine = units.EntryLock(tmp_path / "e.lock")
    begin = time.monotonic()
    assert mine.acquire(timeout=0.3) is False and time.monotonic() - begin >= 0.3
    child.kill()  # SIGKILL: the kernel drops its flock
    child.join(10)
    assert not child.is_alive()
    assert mine.acquire(timeout=5) is True
    mine.release()


def test_trim_never_evicts_an_entry_another_build_holds(tmp_path):
    store = st.DecisionStore(tmp_path)
    for n in range(3):
        store.put(_key(n), {"rung": "inductor fp32"})
        (store.artifact_dir(_key(n)) / "blob").write_bytes(b"\0" * 10_000)
    lock = store.entry_lock(_key(1))
    assert lock.acquire(timeout=0)
    try:
        store.trim(0)
        assert store.artifact_dir(_key(1), create=False).joinpath("blob").exists()  # being built: kept
        assert not (tmp_path / "v1" / "artifacts" / st.key_hash(_key(0))).exists()
        assert not (tmp_path / "v1" / "artifacts" / st.key_hash(_key(2))).exists()
    finally:
        lock.release()
    store.trim(0)
    assert not (tmp_path / "v1" / "artifacts" / st.key_hash(_key(1))).exists()


def test_trim_counts_inductor_files_and_stale_staging(tmp_path):
    """Inductor's kernels inside the store count toward the bound; a dead build's staging is swept."""
    store = st.DecisionStore(tmp_path)
    store.put(_key(0), {"rung": "inductor fp32"})
    folder = store.artifact_dir(_key(0))
    (units.stage(folder / "graph") / "graph.pt2").write_bytes(b"\0" * 5000)  # left by a killed process
    kernels = store.inductor_dir() / "ab"
    kernels.mkdir(parents=True)
    (kernels / "kernel.so").write_bytes(b"\0" * 20_000)
    assert store.info()["inductor_bytes"] == 20_000 and store.info()["bytes"] > 25_000
    lock = store.entry_lock(_key(0))
    assert lock.acquire(timeout=0)
    store.sweep(_key(0))
    lock.release()
    assert list(folder.iterdir()) == []
    assert store.trim(1000) >= 20_000 and not kernels.exists()


def test_cache_root_is_created_private(tmp_path):
    store = st.DecisionStore(tmp_path / "new" / "cache")
    assert store.enabled and store.writable
    assert (tmp_path / "new" / "cache").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_cache_others_can_write_is_refused_with_its_warning_and_answers_stay_right(tmp_path, mode):
    """A world- or group-writable cache could hold a planted .so: not read, not written, warned once; the
    model still answers like eager."""
    root = tmp_path / "cache"
    root.mkdir()
    root.chmod(mode)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 8)
    model = cpuboost.optimize(net, dtype="fp32", fusion=False, cache_dir=str(root))
    with pytest.warns(st.UnsafeCacheWarning, match="writable by") as caught:
        out = model(x)
        model(torch.randn(3, 8))
    assert len([w for w in caught if issubclass(w.category, st.UnsafeCacheWarning)]) == 1
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-5)
    assert list(root.iterdir()) == []  # nothing read or written there
    assert st.DecisionStore(root).info() == {"root": str(root), "enabled": False, "unsafe": True}
    assert not any("persistent cache" in e for e in cpuboost.explain(model).events)


def test_an_ancestor_with_the_sticky_bit_is_fine_but_not_the_root(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: others add names, never replace ours
    mine = shared / "cache"
    mine.mkdir(mode=0o700)
    assert trust.unsafe_reason(mine, mine) is None
    assert "writable by others" in trust.unsafe_reason(shared, shared)
    other = tmp_path / "theirs"
    other.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(other, 65534, 65534)
        assert "owned by uid 65534" in trust.unsafe_reason(other, other)
