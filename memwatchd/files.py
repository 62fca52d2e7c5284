"""Whole-file replacement for the files the daemon rewrites (state.json, the metrics
textfile). Its own module so that state.py and metrics.py, which both write such
files, need not import each other (the stages read one way: docs/architecture.md).
"""
from __future__ import annotations

import os

from memwatchd.report import _makedirs_private

__all__ = ["write_atomic"]


def write_atomic(path: str, data: bytes, mode: int = 0o600, make_dirs: bool = True) -> None:
    """Replace path with data: write a temp file beside it, then rename() over it.

    The temp file is created fresh (O_EXCL, after unlinking any leftover, so a planted
    link is never written through) and chmod'ed to mode whatever the umask. Missing
    directories are made 0700 if make_dirs. No fsync: this is live state, and a flush
    could stall the loop on a busy disk.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if make_dirs and not os.path.isdir(directory):
        _makedirs_private(directory)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
