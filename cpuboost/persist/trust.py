"""Whether a folder is private enough to load native code from (contract 11).

A ``.pt2`` holds a shared library that is ``dlopen``ed: whoever can write the folder it comes from, or any
folder above it, can make this process run their code. So, as ssh and sudo do for their files: every folder
from the artifact up to ``/`` must be owned by this user or root, and none may be writable by group or
others, except an ancestor of the cache (or package) root with the sticky bit (``/tmp``): there others can
add names but not replace ours. The root itself and everything under it never may be writable by others.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional


def _problem(path: Path, st: os.stat_result, allow_sticky: bool) -> Optional[str]:
    uid = os.getuid()
    if st.st_uid not in (uid, 0):
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {uid}) or root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        if allow_sticky and st.st_mode & stat.S_ISVTX and stat.S_ISDIR(st.st_mode):
            return None
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        return f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def unsafe_reason(path: os.PathLike | str, root: os.PathLike | str) -> Optional[str]:
    """Why native code under ``path`` (a file or folder inside ``root``) must not be loaded, or None.

    Links are resolved first (what gets opened is judged); ``path`` and each folder up to ``root`` are checked
    strictly, ``root``'s ancestors with the sticky bit allowed."""
    path, root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if path != root and root not in path.parents:
        return f"{path} lies outside {root} (a link out of the cache or package)"
    current, strict = path, True
    while True:
        try:
            st = os.stat(current)
        except OSError as exc:
            return f"cannot check {current} ({exc.strerror or exc})"
        problem = _problem(current, st, allow_sticky=not strict)
        if problem:
            return problem
        if current == root:
            strict = False
        if current.parent == current:
            return None
        current = current.parent


def make_private_root(root: Path) -> None:
    """Create the cache root (and missing parents) with mode 0700; an existing root is left as found
    (``unsafe_reason`` judges it)."""
    if root.is_dir():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(root, 0o700)
    except FileExistsError:
        return
    os.chmod(root, 0o700)  # whatever the umask
