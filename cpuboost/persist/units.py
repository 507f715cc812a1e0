"""A cache artifact published as one unit, and the cross-process lock of one cache entry.

A unit is a folder (an AOTInductor ``.pt2`` with its ``.json`` record, OpenVINO ``.xml`` + ``.bin`` with
theirs). It is written in a private staging folder beside its final name, every file fsynced, the record
written last with the SHA-256 of every other file, then the folder is renamed into place: a reader sees the
whole unit or none, never a ``.pt2`` of one build beside the ``.json`` of another. A process killed while
staging leaves a ``.<name>.staging-*`` folder that the next holder of the entry lock (or ``trim``) removes.

The entry lock is ``fcntl.flock`` on a file in the cache: the kernel drops it when its process dies, SIGKILL
included, so a crash never leaves a cache locked. Another process building the same entry waits for it and
then loads what it published instead of compiling the same graph again.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from .errors import PackageFormatError

STAGING = ".staging-"
TRASH = ".trash-"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync it, then ``os.replace`` it in."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def stage(final: Path) -> Path:
    """A private empty folder beside ``final`` to build the unit in (removed by ``discard`` or, if this
    process dies, by the next lock holder)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}{STAGING}{os.getpid()}-"))


def digests(folder: Path, record: str) -> dict:
    """``{file name: {"sha256", "bytes"}}`` for every file of the unit but its record."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != record and not p.name.startswith(".")}


def seal(folder: Path, record: str, meta: dict) -> dict:
    """Record every file's digest in ``meta["files"]``, write ``meta`` as ``record`` last, fsync it all."""
    meta["files"] = digests(folder, record)
    for name in meta["files"]:
        _fsync(folder / name)
    atomic_write(folder / record, json.dumps(meta, indent=1).encode())
    _fsync(folder)
    return meta


def publish(staging: Path, final: Path) -> Path:
    """Rename the staged unit to ``final`` (one ``rename``); a unit already there (one found unusable and
    rebuilt, or another process's equal one) is moved aside first and removed after."""
    try:
        os.rename(staging, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        old = final.parent / f".{final.name}{TRASH}{os.getpid()}-{time.monotonic_ns()}"
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(final.parent)
    return final


def discard(folder: Optional[Path]) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def check_files(folder: Path, files: Any, what: str) -> None:
    """Every file a record names is there, inside ``folder``, with its recorded size and SHA-256; else
    ``PackageFormatError`` naming it (a damaged, truncated, replaced or planted file)."""
    if not isinstance(files, dict) or not files:
        raise PackageFormatError(f"{what} records no file digests (written by an older cpuboost, or damaged); "
                                 "rebuild it")
    for name, expected in files.items():
        path = inside(folder, name, what)
        if not isinstance(expected, dict) or not path.is_file():
            raise PackageFormatError(f"{what}: {name} is missing or its record is damaged; rebuild it")
        if path.stat().st_size != expected.get("bytes"):
            raise PackageFormatError(f"{what}: {name} is {path.stat().st_size} bytes, its record says "
                                     f"{expected.get('bytes')}: truncated or replaced; rebuild it")
        if sha256_file(path) != expected.get("sha256"):
            raise PackageFormatError(f"{what}: {name} does not match its SHA-256 (changed after it was written); "
                                     "refused. Rebuild it, and check who else can write there")


def inside(folder: Path, name: Any, what: str) -> Path:
    """``folder / name`` when ``name`` is a plain relative path that stays inside ``folder``; else
    ``PackageFormatError`` (``../``, absolute paths and links out are refused)."""
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name) or "\\" in name:
        raise PackageFormatError(f"{what} names the file {name!r}: only plain relative paths inside it are allowed")
    path = folder / name
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root or ".." in Path(name).parts:
        raise PackageFormatError(f"{what} names {name!r}, which points outside it; refused")
    return path


def clean_stale(folder: Path) -> None:
    """Remove staging and trash folders left in ``folder`` by a process that died (call with the lock held)."""
    with contextlib.suppress(OSError):
        for child in folder.iterdir():
            if child.name.startswith(".") and (STAGING in child.name or TRASH in child.name):
                shutil.rmtree(child, ignore_errors=True)


class EntryLock:
    """An exclusive ``flock`` on ``path``, shared across processes (and across threads: each holder opens
    its own descriptor). Lock files may be removed by ``trim``; a holder checks it locked the file that is
    still at ``path``, so two processes never both think they hold one entry."""

    POLL_S = 0.05

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, timeout: float, shared: bool = False) -> bool:
        """Wait up to ``timeout`` seconds (0: try once); False when another holder kept it that long.
        ``shared``: many shared holders at once, none while an exclusive one holds it."""
        import fcntl

        deadline = time.monotonic() + timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return False
                time.sleep(self.POLL_S)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # removed (trim) between our open and our lock: lock the file now at that path

    def release(self, remove: bool = False) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        os.close(fd)  # closing drops the flock

    def __del__(self) -> None:  # a holder that forgot to release never keeps the entry locked for good
        self.release()

    def __enter__(self) -> "EntryLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
