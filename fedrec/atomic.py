"""Atomic writes: a reader sees the old content or the new one, never half of either."""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from fedrec.errors import FedrecError


# what a full disk, a quota or a read-only folder raise
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def write_failed(path: Path, exc: OSError) -> FedrecError:
    """The error a user sees when the disk is full or the folder is read-only."""
    return FedrecError(f"cannot write {path}: {exc.strerror or exc}",
                       hint="Free disk space or make the folder writable, then run again; "
                            "no file was left half-written.")


def is_write_failure(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_failed(path, exc) from exc
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_write_failure(exc):
            raise write_failed(path, exc) from exc
        raise


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")


# Every folder `atomic_dir` builds holds this (empty) folder. A folder, not a file: folders that
# must list each file they hold (an edge bundle's manifest) need not know about it.
OUTPUT_MARKER = ".fedrec-output"


def refuse_to_replace(path: str | Path) -> None:
    """`atomic_dir` replaces a folder as a whole, so it may replace only an empty one or one it
    built itself (marked with OUTPUT_MARKER): an --out pointed at someone's folder must not delete it."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise FedrecError(f"{path} exists and is not a folder", hint="Pass a folder for the output.")
    if not (path / OUTPUT_MARKER).is_dir() and any(path.iterdir()):
        raise FedrecError(f"{path} is not empty and is not a folder fedrec wrote (it has no {OUTPUT_MARKER} "
                          "marker): writing the output there would delete what it holds",
                          hint="Pass a new or empty output folder, or move that folder's files elsewhere.")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in only when complete.

    An existing directory at `path` is kept until the new one is whole, then replaced, if
    `refuse_to_replace` allows (checked before building and again before the swap).
    """
    path = Path(path)
    try:
        refuse_to_replace(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise write_failed(path, exc) from exc
    try:
        (tmp / OUTPUT_MARKER).mkdir()
        yield tmp
        refuse_to_replace(path)
        old = swap_in(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_write_failure(exc):
            raise write_failed(path, exc) from exc
        raise


def swap_in(new: Path, path: Path) -> Path | None:
    """Move the folder `new` to `path`; returns where the folder it replaced now is (None if none).
    Where the system can exchange two paths `path` is never missing; elsewhere it is, between two
    renames."""
    if not path.exists():
        os.replace(new, path)
        return None
    if exchange(new, path):
        return new
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(new, path)
    return old


RENAME_EXCHANGE = 2                 # <linux/fs.h>
AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where the
    C library, kernel or filesystem does not offer it."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)     # glibc ≥ 2.28
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return function
