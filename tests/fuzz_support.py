"""A write guard for the fuzz tests: an audit hook records every write-like filesystem event made
while the code under test runs, and :func:`confined_writes` fails if one lands outside the
directories the example allows.

Audit hooks see Python-level calls only (``open``, ``os.*``, ``shutil.rmtree``); a C extension
writing with its own ``fopen`` is invisible here, which is why the tests also list their sandbox.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# event -> indices of the path arguments it modifies, and of the dir_fd each one is relative to
# (None: always relative to the cwd). os.unlink/os.replace/os.ftruncate raise os.remove/os.rename/
# os.truncate.
_PATH_EVENTS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "os.rename": ((0, 2), (1, 3)),  # the source leaves its folder too: a move out of the inputs is a write
    "os.mkdir": ((0, 2),),
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "shutil.rmtree": ((0, 1),),
    "os.symlink": ((1, 2),),
    "os.link": ((1, 3),),
    "os.truncate": ((0, None),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.mkfifo": ((0, 2),),
    "os.mknod": ((0, 3),),
}

_lock = threading.Lock()
_installed = False
_records: list[tuple[str, str]] | None = None  # (event, resolved path); None: not recording
_in_hook = threading.local()  # the hook's own path lookups must not re-enter it


def _resolve(path: Any, dir_fd: Any) -> str:
    """Absolute real path of an audited path argument (str, bytes, PathLike or an open fd)."""
    if isinstance(path, int):
        return os.path.realpath(f"/proc/self/fd/{path}")
    p = os.fsdecode(os.fspath(path))
    if not os.path.isabs(p):
        base = os.getcwd() if not isinstance(dir_fd, int) or dir_fd < 0 else os.readlink(f"/proc/self/fd/{dir_fd}")
        p = os.path.join(base, p)
    return os.path.realpath(p)


def _writes(event: str, args: tuple[Any, ...]) -> list[str]:
    if event == "open":
        path, mode, flags = args
        if path is None:
            return []
        writes = isinstance(mode, str) and any(c in mode for c in "wax+")
        if not writes and isinstance(flags, int) and flags & _WRITE_FLAGS:
            writes = True
        return [_resolve(path, None)] if writes else []
    spec = _PATH_EVENTS.get(event)
    if spec is None:
        return []
    return [_resolve(args[i], args[j] if j is not None and j < len(args) else None)
            for i, j in spec if i < len(args) and args[i] is not None]


def _hook(event: str, args: tuple[Any, ...]) -> None:
    records = _records
    if records is None or getattr(_in_hook, "on", False):
        return  # the common case, cheap: this hook sees every audit event of the process
    _in_hook.on = True
    try:
        try:
            paths = _writes(event, args)
        except Exception as e:  # an unresolvable path is itself worth a look
            paths = [f"<unresolved {args!r}: {e}>"]
        records.extend((event, p) for p in paths)
    finally:
        _in_hook.on = False


def _install() -> None:
    global _installed
    with _lock:
        if not _installed:  # audit hooks cannot be removed: one per process, gated by _records
            sys.addaudithook(_hook)
            _installed = True


def _ignored(path: str) -> bool:
    # Lazy imports inside the code under test may (re)write bytecode caches.
    return "__pycache__" in Path(path).parts or path == os.devnull


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


@contextlib.contextmanager
def confined_writes(*allowed: str | os.PathLike[str]) -> Iterator[list[tuple[str, str]]]:
    """Record write-like events inside the block; on leaving it, fail (``AssertionError``) if any
    touched a path outside every ``allowed`` directory (none given: no write at all is allowed).

    Yields the live list of ``(event, resolved path)`` records. Keep only the code under test in
    the block: pytest and hypothesis write files of their own between examples."""
    global _records
    _install()
    roots = [os.path.realpath(a) for a in allowed]
    records: list[tuple[str, str]] = []
    with _lock:
        if _records is not None:
            raise RuntimeError("confined_writes does not nest")
        _records = records
    try:
        yield records
    finally:
        with _lock:
            _records = None
        stray = [(e, p) for e, p in records if not _ignored(p) and not _inside(p, roots)]
        if stray:
            where = ", ".join(roots) or "nowhere"
            listed = "\n".join(f"  {e}: {p}" for e, p in stray[:20])
            raise AssertionError(f"{len(stray)} write(s) outside the allowed directories ({where}):\n{listed}")
