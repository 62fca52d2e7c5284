"""Whole-file replacement for the files the daemon rewrites (state.json, the metrics
textfile). Its own module so that state.py and metrics.py, which both write such
files, need not import each other (the stages read one way: docs/architecture.md).

``BackgroundWriter`` does it off the loop: creating and filling a file on /run
(tmpfs) allocates pages, and under a thrash that allocation reclaims for seconds
(seen in the guest: the loop blocked in open() of the state file until systemd's
watchdog killed memwatchd). The loop waits a few milliseconds for a write; one the
kernel holds up is left to finish on its own, and newer content replaces what was
waiting behind it, so the file ends up current and the loop never waits twice.
"""
from __future__ import annotations

import _thread
import os

from memwatchd.report import _makedirs_private

__all__ = ["write_atomic", "BackgroundWriter"]


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


class BackgroundWriter:
    """write_atomic in a helper thread, newest content first (see the module docstring).

    ``on_result(path, error)`` is called in the writer thread after each write (error
    None when it succeeded). Raw _thread locks, not threading: resident memory is a goal.
    """

    __slots__ = ("on_result", "_lock", "_done", "_next", "_busy")

    def __init__(self, on_result=None):
        self.on_result = on_result
        self._lock = _thread.allocate_lock()   # guards _next and _busy
        self._done = _thread.allocate_lock()   # held while a write is in flight
        self._next = None                      # (path, data, mode, make_dirs) waiting
        self._busy = False

    @property
    def busy(self) -> bool:
        """A write is still in flight (the last content may not be on disk yet)."""
        return self._busy

    def submit(self, path: str, data: bytes, mode: int = 0o600, make_dirs: bool = True,
               wait: float = 0.05) -> bool:
        """Write data to path; True once written (or failed: on_result says) within
        ``wait`` seconds. While an earlier write is still held up, data replaces whatever
        waits behind it and submit returns False at once."""
        with self._lock:
            self._next = (path, data, mode, make_dirs)
            if self._busy:
                return False
            self._busy = True
            self._done.acquire()
        try:
            _thread.start_new_thread(self._run, ())
        except RuntimeError:   # no thread to be had (RLIMIT_NPROC, memory): write here
            self._run()
        return self.flush(wait)

    def flush(self, wait: float) -> bool:
        """Wait up to ``wait`` seconds for the writes in flight; True once none is."""
        if self._done.acquire(True, wait):
            self._done.release()
            return True
        return False

    def _run(self) -> None:
        while True:
            with self._lock:
                job, self._next = self._next, None
                if job is None:
                    self._busy = False
                    self._done.release()
                    return
            error = None
            try:
                write_atomic(*job)
            except (OSError, ValueError) as e:
                error = e
            if self.on_result is not None:
                self.on_result(job[0], error)
