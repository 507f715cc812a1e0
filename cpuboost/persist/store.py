"""The persistent cache: the ladder's decisions as JSON, backend artifacts in their own format, one folder.

Layout under the root (``CPUBOOST_CACHE_DIR``, ``cache_dir=``, or ``$XDG_CACHE_HOME/cpuboost``)::

    v1/decisions/ab/<hash>.json   {"format", "key", "decision", "written"}: the key is stored in full
    v1/artifacts/<hash>/          backend artifacts for that key (AOTInductor .pt2, OpenVINO blobs)
    v1/artifacts/<hash>/<unit>/   one published unit each (``units``): graph.pt2 + graph.json, int8.xml + ...
    v1/locks/<hash>.lock          the cross-process build lock of one artifact key (``units.EntryLock``)
    v1/inductor/                  TORCHINDUCTOR_CACHE_DIR while cpuboost builds (see ``inductor_cache``)
    v1/openvino/                  OpenVINO's CACHE_DIR (weightless compiled blobs of cached IR)

Contract 10: nothing here is code. Entries are JSON read with ``json.loads``; an entry that does not parse,
has another format, or whose stored key differs from the one asked for (a foreign or tampered entry) is
ignored with a warning and removed so it is rebuilt. Writes go to a temporary file in the same folder and
are published with ``os.replace``, so readers see a whole entry or none, and two processes writing one key
at once leave one of their two (equal) entries. A folder that cannot be written is used read-only (entries
already there still serve) after one warning; a folder others can write (``trust``) is not used at all.
The size bound covers everything cpuboost writes (Inductor's kernels included) and evicts least recently
used keys (mtime, touched on every hit) with their artifacts, never one another process is building. The
key itself (what a build depends on) is made in ``keys``; ``store`` re-exports its names.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Iterator, Optional, Union

# the keys live in keys.py; re-exported because callers use store.make_key, store.weights_digest...
from . import trust
from .keys import (_jsonable, canonical, data_digest, key_hash, machine_fingerprint,  # noqa: F401
                   make_key, model_fingerprint, signature_json, weights_digest)
from .units import EntryLock, atomic_write, clean_stale  # noqa: F401  (atomic_write: re-exported)

log = logging.getLogger("cpuboost")

FORMAT = 1
ENV = "CPUBOOST_CACHE_DIR"
OFF = ("off", "0", "false", "no", "none", "disabled")
DEFAULT_MAX_BYTES = 4 << 30  # AOTInductor packages carry their weights: ResNet-50 bf16 is 50 MB, BERT-base 270 MB
TOOLS = ("inductor", "openvino")  # compilers' own cache folders under the store: bounded, evicted when idle


class CacheWarning(UserWarning):
    """The persistent cache could not be used as asked (corrupt entry, read-only folder); work goes on."""


class UnsafeCacheWarning(CacheWarning):
    """The cache folder (or one above it) is owned by someone else or writable by others: it holds native
    code that would run in this process, so it is neither read nor written; every build is made afresh."""


# -- where --------------------------------------------------------------------------------------------------
def default_root(option: Union[str, os.PathLike, None] = None) -> Optional[Path]:
    """The cache root: ``option`` (the ``cache_dir=`` option) if given, else ``CPUBOOST_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/cpuboost`` or ``~/.cache/cpuboost``. ``None`` when either says ``off``."""
    value = os.fspath(option) if option is not None else os.environ.get(ENV, "")
    if value.strip().lower() in OFF:
        return None
    if value.strip():
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "cpuboost"


# -- the store ----------------------------------------------------------------------------------------------
_WARNED: set[tuple[str, str]] = set()
_WARN_LOCK = threading.Lock()


def _warn_once(kind: str, where: Any, text: str, category: type = CacheWarning) -> None:
    with _WARN_LOCK:
        if (kind, str(where)) in _WARNED:
            return
        _WARNED.add((kind, str(where)))
    log.warning("cpuboost cache: %s", text)
    warnings.warn(text, category, stacklevel=3)


class DecisionStore:
    """Decisions (JSON) and artifact folders, keyed by a dict (see ``make_key``). ``root=None``: disabled."""

    def __init__(self, root: Union[str, os.PathLike, None], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root).expanduser() if root is not None else None
        self.max_bytes = max_bytes
        self.base = self.root / f"v{FORMAT}" if self.root is not None else None
        self._writable: Optional[bool] = None if self.root is not None else False
        self._trusted: Optional[bool] = None
        self._scratch: Optional[Path] = None
        self._lock = threading.Lock()

    @classmethod
    def from_option(cls, cache_dir: Union[str, os.PathLike, None] = None, **kw: Any) -> "DecisionStore":
        return cls(default_root(cache_dir), **kw)

    @property
    def enabled(self) -> bool:
        """On, and in a folder only this user can write (checked once; warns once if not)."""
        if self.base is None:
            return False
        if self._trusted is None:
            with self._lock:
                if self._trusted is None:
                    self._trusted = self._check_trust()
        return self._trusted

    def _check_trust(self) -> bool:
        with contextlib.suppress(OSError):
            trust.make_private_root(self.root)
        if not self.root.is_dir():
            return True  # nothing to trust yet; ``writable`` says whether it can be made
        problem = trust.unsafe_reason(self.root, self.root)
        if problem is None:
            return True
        _warn_once("unsafe", self.root, f"not using {self.root}: {problem}. The cache holds compiled code that "
                   "this process would load and run, so it must be a folder only you can write: `chmod go-w` "
                   "it (and the folders above it), or point CPUBOOST_CACHE_DIR / cache_dir= at a folder of your "
                   "own. Building without the cache", UnsafeCacheWarning)
        return False

    @property
    def writable(self) -> bool:
        """Whether entries can be written; the first call probes once (and warns once if not)."""
        if self._writable is None:
            with self._lock:
                if self._writable is None:
                    self._writable = self._probe()
        return bool(self._writable)

    def _probe(self) -> bool:
        try:
            trust.make_private_root(self.root)
            for sub in ("decisions", "artifacts", "locks"):
                (self.base / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.base, prefix=".probe-")
            os.close(fd)
            os.unlink(probe)
            return True
        except OSError as exc:
            _warn_once("readonly", self.root, f"{self.root} is not writable ({exc.strerror or exc}); working "
                       "without storing builds (entries already there still serve). Set CPUBOOST_CACHE_DIR "
                       "to a writable folder, or to 'off'")
            return False

    # paths
    def _entry(self, h: str) -> Path:
        return self.base / "decisions" / h[:2] / f"{h}.json"

    def _artifacts(self, h: str) -> Path:
        return self.base / "artifacts" / h

    def _lock_path(self, h: str) -> Path:
        return self.base / "locks" / f"{h}.lock"

    def entry_lock(self, key: dict) -> Optional[EntryLock]:
        """The cross-process lock of this key's artifacts (None when the store is off or read-only); a holder
        also clears what a dead holder left half-staged there."""
        if not self.enabled or not self.writable:
            return None
        return EntryLock(self._lock_path(key_hash(key)))

    def builds_lock(self) -> Optional[EntryLock]:
        """Held shared by every build that points Inductor's cache into the store; ``trim`` evicts Inductor's
        files only when it can take it exclusively (no build running in any process)."""
        return EntryLock(self.base / "locks" / "builds.lock") if self.enabled and self.writable else None

    # decisions
    def get(self, key: dict) -> Optional[dict]:
        """The decision stored for this key, or None (missing, corrupt, foreign: the last two warn)."""
        if not self.enabled:
            return None
        h = key_hash(key)
        path = self._entry(h)
        try:
            raw = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            _warn_once("read", path, f"cannot read {path} ({exc}); rebuilding")
            return None
        try:
            entry = json.loads(raw.decode("utf-8"))
            if not isinstance(entry, dict) or not isinstance(entry.get("decision"), dict):
                raise ValueError("not a cpuboost entry")
        except (ValueError, UnicodeDecodeError) as exc:
            self._discard(path, h, f"corrupt entry {path} ({type(exc).__name__}: {str(exc)[:80]}); ignored, rebuilding")
            return None
        if entry.get("format") != FORMAT:
            self._discard(path, h, f"entry {path} has format {entry.get('format')!r}, expected {FORMAT}; ignored")
            return None
        if entry.get("key") != _jsonable(key):
            differs = _first_difference(entry.get("key"), _jsonable(key))
            self._discard(path, h, f"foreign entry {path} (its key differs at {differs}); ignored, rebuilding")
            return None
        self._touch(h)
        return entry["decision"]

    def put(self, key: dict, decision: dict, trim: bool = True) -> bool:
        """Store a decision (JSON-serializable dict). False when the store is off or cannot be written.
        ``trim=False``: an update that barely grows the cache (a checked size), with no walk of the folder."""
        if not self.enabled or not self.writable:
            return False
        h = key_hash(key)
        entry = {"format": FORMAT, "key": _jsonable(key), "decision": decision, "written": time.time()}
        try:
            data = json.dumps(entry, sort_keys=True, indent=1, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"a cpuboost decision must be plain JSON data: {exc}") from exc
        path = self._entry(h)
        try:
            atomic_write(path, data)
        except OSError as exc:
            self._writable = False
            _warn_once("write", self.root, f"cannot write {path} ({exc.strerror or exc}); working without "
                       "storing builds")
            return False
        if trim:
            self.trim()
        return True

    def _discard(self, path: Path, h: str, text: str) -> None:
        _warn_once("bad", path, text)
        if self.writable:
            with contextlib.suppress(OSError):
                path.unlink()
            shutil.rmtree(self._artifacts(h), ignore_errors=True)

    def _touch(self, h: str) -> None:
        if self._writable is False:
            return
        now = time.time()
        for p in (self._entry(h), self._artifacts(h)):
            with contextlib.suppress(OSError):
                os.utime(p, (now, now))

    # artifacts
    def artifact_dir(self, key: dict, create: bool = True) -> Path:
        """The folder for this key's backend artifacts. When the store is off or read-only (and the
        folder does not already exist there), a private temporary folder so callers need no branch."""
        if self.enabled:
            h = key_hash(key)
            path = self._artifacts(h)
            if path.is_dir():
                self._touch(h)
                return path
            if self.writable:
                if create:
                    try:
                        path.mkdir(mode=0o700, parents=True, exist_ok=True)
                    except OSError as exc:
                        _warn_once("write", self.root, f"cannot create {path} ({exc}); using a temporary folder")
                        return self._private(key)
                return path
        return self._private(key)

    def _private(self, key: dict) -> Path:
        with self._lock:
            if self._scratch is None:  # removed when the store goes (or at exit): artifacts can be 100s of MB
                self._scratch = Path(tempfile.mkdtemp(prefix="cpuboost-"))
                weakref.finalize(self, shutil.rmtree, str(self._scratch), True)
        path = self._scratch / key_hash(key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def inductor_dir(self) -> Optional[Path]:
        if not (self.enabled and self.writable):
            return None
        path = self.base / "inductor"
        with contextlib.suppress(OSError):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    # housekeeping
    def _units(self) -> Iterator[tuple[float, int, str]]:
        """(last use, bytes, hash) for every key that has an entry or artifacts (staging leftovers count)."""
        sizes: dict[str, list] = {}
        for path in (self.base / "decisions").glob("*/*.json"):
            with contextlib.suppress(OSError):
                st = path.stat()
                sizes.setdefault(path.stem, [0.0, 0])[:] = [st.st_mtime, st.st_size]
        for folder in (self.base / "artifacts").glob("*"):
            with contextlib.suppress(OSError):
                unit = sizes.setdefault(folder.name, [folder.stat().st_mtime, 0])
                unit[0] = max(unit[0], folder.stat().st_mtime)
                unit[1] += _bytes(folder)
        for h, (mtime, size) in sizes.items():
            yield mtime, size, h

    def _inductor_units(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, path) of each top-level item of the compilers' cache folders (``TOOLS``)."""
        found = []
        for tool in TOOLS:
            with contextlib.suppress(OSError):
                for item in (self.base / tool).iterdir():
                    with contextlib.suppress(OSError):
                        found.append((item.stat().st_mtime, _bytes(item), item))
        return found

    def _evict(self, h: str) -> bool:
        """Remove one key's entry and artifacts unless another build holds its lock (then False)."""
        lock = EntryLock(self._lock_path(h))
        if not lock.acquire(timeout=0):
            return False
        try:
            with contextlib.suppress(OSError):
                self._entry(h).unlink()
            shutil.rmtree(self._artifacts(h), ignore_errors=True)
        finally:
            lock.release(remove=True)
        return True

    def trim(self, max_bytes: Optional[int] = None) -> int:
        """Evict least recently used keys (and Inductor's cached kernels, when no build is running) until
        everything cpuboost wrote here fits; returns bytes freed. Keys another process is building stay."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        if not self.enabled or not self.writable:
            return 0
        for tmp in (self.base / "decisions").glob("*/.*.tmp"):  # a decision write killed mid-way
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > 3600:
                    tmp.unlink()
        units: list[tuple[float, int, Any]] = [(t, n, h) for t, n, h in self._units()]
        builds = self.builds_lock()
        idle = builds is not None and builds.acquire(timeout=0)  # no build anywhere points Inductor here now
        try:
            inductor = self._inductor_units()
            units += inductor if idle else []
            total = sum(size for _, size, _ in units) + (0 if idle else sum(n for _, n, _ in inductor))
            freed = 0
            for _, size, unit in sorted(units, key=lambda u: u[0]):
                if total - freed <= limit:
                    break
                if isinstance(unit, Path):
                    _remove(unit)
                elif not self._evict(unit):
                    continue
                freed += size
        finally:
            if idle:
                builds.release()
        if freed:
            log.info("cpuboost cache: evicted %d bytes to stay under %d", freed, limit)
        return freed

    def sweep(self, key: dict) -> None:
        """Remove half-staged units a dead process left in this key's folder (the caller holds its lock)."""
        if self.enabled and self.writable:
            clean_stale(self._artifacts(key_hash(key)))

    def info(self) -> dict:
        if not self.enabled:  # off, or refused (a folder others can write: ``UnsafeCacheWarning``)
            return {"root": str(self.root) if self.root else None, "enabled": False, "unsafe": self.root is not None}
        units = list(self._units()) if self.base.is_dir() else []
        inductor = sum(n for _, n, _ in self._inductor_units()) if self.base.is_dir() else 0
        return {"root": str(self.root), "enabled": True, "writable": self.writable, "entries": len(units),
                "bytes": sum(s for _, s, _ in units) + inductor, "inductor_bytes": inductor,
                "max_bytes": self.max_bytes, "format": FORMAT}

    def clear(self) -> None:
        """Remove every entry and artifact of this format (and the Inductor/OpenVINO folders under it)."""
        if self.enabled and self.writable:
            shutil.rmtree(self.base, ignore_errors=True)
            self._writable = None

    def __repr__(self) -> str:
        return f"DecisionStore({str(self.root) if self.root else None!r})"


def _first_difference(a: Any, b: Any, path: str = "key") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path}: {str(a)[:60]} != {str(b)[:60]}"


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
