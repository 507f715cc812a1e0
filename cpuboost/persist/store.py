"""The persistent cache: the ladder's decisions as JSON, backend artifacts in their own format, one folder.

Layout under the root (``CPUBOOST_CACHE_DIR``, ``cache_dir=``, or ``$XDG_CACHE_HOME/cpuboost``)::

    v1/decisions/ab/<hash>.json   {"format", "key", "decision", "written"}: the key is stored in full
    v1/artifacts/<hash>/          backend artifacts for that key (AOTInductor .pt2, OpenVINO blobs)
    v1/inductor/                  TORCHINDUCTOR_CACHE_DIR while cpuboost builds (see ``inductor_cache``)
    v1/openvino/                  OpenVINO's CACHE_DIR

Contract 10: nothing here is code. Entries are JSON read with ``json.loads``; an entry that does not parse,
has another format, or whose stored key differs from the one asked for (a foreign or tampered entry) is
ignored with a warning and removed so it is rebuilt. Writes go to a temporary file in the same folder and
are published with ``os.replace``, so readers see a whole entry or none, and two processes writing one key
at once leave one of their two (equal) entries. A folder that cannot be written is used read-only (entries
already there still serve) after one warning. The size bound evicts least recently used keys (mtime,
touched on every hit) with their artifacts. The key itself (what a build depends on) is made in ``keys``;
``store`` re-exports its names.
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
from .keys import (CODEGEN_FLAGS, _jsonable, canonical, data_digest, key_hash, machine_fingerprint,  # noqa: F401
                   make_key, model_fingerprint, signature_json, weights_digest)

log = logging.getLogger("cpuboost")

FORMAT = 1
ENV = "CPUBOOST_CACHE_DIR"
OFF = ("off", "0", "false", "no", "none", "disabled")
DEFAULT_MAX_BYTES = 4 << 30  # AOTInductor packages carry their weights: ResNet-50 bf16 is 50 MB, BERT-base 270 MB


class CacheWarning(UserWarning):
    """The persistent cache could not be used as asked (corrupt entry, read-only folder); work goes on."""


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


def _warn_once(kind: str, where: Any, text: str) -> None:
    with _WARN_LOCK:
        if (kind, str(where)) in _WARNED:
            return
        _WARNED.add((kind, str(where)))
    log.warning("cpuboost cache: %s", text)
    warnings.warn(text, CacheWarning, stacklevel=3)


class DecisionStore:
    """Decisions (JSON) and artifact folders, keyed by a dict (see ``make_key``). ``root=None``: disabled."""

    def __init__(self, root: Union[str, os.PathLike, None], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root).expanduser() if root is not None else None
        self.max_bytes = max_bytes
        self.base = self.root / f"v{FORMAT}" if self.root is not None else None
        self._writable: Optional[bool] = None if self.root is not None else False
        self._scratch: Optional[Path] = None
        self._lock = threading.Lock()

    @classmethod
    def from_option(cls, cache_dir: Union[str, os.PathLike, None] = None, **kw: Any) -> "DecisionStore":
        return cls(default_root(cache_dir), **kw)

    @property
    def enabled(self) -> bool:
        return self.base is not None

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
            for sub in ("decisions", "artifacts"):
                (self.base / sub).mkdir(parents=True, exist_ok=True)
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

    def put(self, key: dict, decision: dict) -> bool:
        """Store a decision (JSON-serializable dict). False when the store is off or cannot be written."""
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
                        path.mkdir(parents=True, exist_ok=True)
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
        return self.base / "inductor" if self.enabled and self.writable else None

    def openvino_dir(self) -> Optional[Path]:
        if not (self.enabled and self.writable):
            return None
        path = self.base / "openvino"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # housekeeping
    def _units(self) -> Iterator[tuple[float, int, str]]:
        """(last use, bytes, hash) for every key that has an entry or artifacts."""
        sizes: dict[str, list] = {}
        for path in (self.base / "decisions").glob("*/*.json"):
            with contextlib.suppress(OSError):
                st = path.stat()
                sizes.setdefault(path.stem, [0.0, 0])[:] = [st.st_mtime, st.st_size]
        for folder in (self.base / "artifacts").glob("*"):
            with contextlib.suppress(OSError):
                unit = sizes.setdefault(folder.name, [folder.stat().st_mtime, 0])
                unit[0] = max(unit[0], folder.stat().st_mtime)
                unit[1] += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        for h, (mtime, size) in sizes.items():
            yield mtime, size, h

    def trim(self, max_bytes: Optional[int] = None) -> int:
        """Evict least recently used keys until the store (decisions + artifacts) fits; returns bytes freed.
        Inductor's and OpenVINO's own folders are left to those libraries."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        if not self.enabled or not self.writable:
            return 0
        units = sorted(self._units())
        total = sum(size for _, size, _ in units)
        freed = 0
        for _, size, h in units:
            if total - freed <= limit:
                break
            with contextlib.suppress(OSError):
                self._entry(h).unlink()
            shutil.rmtree(self._artifacts(h), ignore_errors=True)
            freed += size
        if freed:
            log.info("cpuboost cache: evicted %d bytes to stay under %d", freed, limit)
        return freed

    def info(self) -> dict:
        if not self.enabled:
            return {"root": None, "enabled": False}
        units = list(self._units()) if self.base.is_dir() else []
        return {"root": str(self.root), "enabled": True, "writable": self.writable, "entries": len(units),
                "bytes": sum(s for _, s, _ in units), "max_bytes": self.max_bytes, "format": FORMAT}

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


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then ``os.replace`` it in."""
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


def publish(tmp: Path, final: Path) -> Path:
    """Move a finished artifact (file, or folder) into place atomically; if another process got there
    first, keep theirs (equal by construction: same key) and drop ours."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return final


@contextlib.contextmanager
def inductor_cache(store: DecisionStore):
    """Point Inductor's on-disk caches (C++ kernels, FX graphs) at the store during a build, then restore.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` each time it needs the folder; the variable is set only
    inside this block (contract 3). With freezing, Inductor's FX graph cache is bypassed on CPU whenever
    oneDNN weight prepacking made mkldnn constants ("mkldnn tensors unpickleable", torch 2.13) and the
    AOTAutograd cache always is; what still hits across processes is the compiled C++ kernel cache.
    """
    folder = store.inductor_dir()
    if folder is None:
        yield None
        return
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
