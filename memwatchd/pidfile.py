"""Reading a pidfile without trusting it.

A pidfile is written by whoever can write it, and a watch's kill action follows
it, so the rules are systemd's for PIDFile= (the fix for CVE-2018-16888),
adapted to a watch that has no unit cgroup to check membership against:

* opened with O_NOFOLLOW|O_NONBLOCK (a symlink is refused, a FIFO cannot hang
  the loop) and accepted only if it is a regular file; at most 64 bytes read;
  the first line must be a PID in 2..4194304 (PID_MAX_LIMIT), so "1", "-5" or
  a value above INT_MAX is refused, never a crash;
* a file that root wrote (owned by root, in a root-owned directory nobody else
  may write, or a sticky one) names any process, as systemd accepts a
  root-owned PID file naming a process outside the unit;
* any other file can only have been written by its owner (when the directory
  is theirs or root's and nobody else may write it): it names only processes
  of that same user, as systemd refuses a process outside the unit from a PID
  file not owned by root. A file in a directory others may write names nothing;
* the process must not have started after the file was last written (plus one
  second of slack for clock granularity): a stale pidfile whose PID was reused
  names an innocent process that did not exist when the file was written.
"""
from __future__ import annotations

import errno
import os
import stat
import time

from memwatchd.types import MemwatchdError

PID_MAX_LIMIT = 4194304  # the kernel's ceiling for pid_max (2^22)
READ_MAX = 64
SLACK = 1.0              # seconds: starttime ticks and coarse mtime granularity


class PidfileRefused(MemwatchdError):
    """The pidfile, or the process it names, is not to be trusted (the message says why)."""


def read_pidfile(path: str):
    """(pid, owner uid or None for "written by root", mtime) from a pidfile, or raise
    PidfileRefused; FileNotFoundError (an OSError) when it does not exist (yet)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PidfileRefused(f"pidfile {path} is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PidfileRefused(f"pidfile {path} is not a regular file")
        data = os.read(fd, READ_MAX)
    finally:
        os.close(fd)
    line = data.split(b"\n", 1)[0].strip()
    if not line.isdigit() or len(line) > 7 or not 2 <= int(line) <= PID_MAX_LIMIT:
        raise PidfileRefused(f"pidfile {path} does not hold a PID (2..{PID_MAX_LIMIT}): "
                             f"{line[:20]!r}")
    return int(line), _writer(path, st), st.st_mtime


def _writer(path: str, st: os.stat_result):
    """None if only root can have written the file; else the one user who can have."""
    try:
        parent = os.stat(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise PidfileRefused(f"pidfile {path}: its directory: {e.strerror}") from None
    others_may_write = parent.st_mode & 0o022 and not parent.st_mode & stat.S_ISVTX
    if others_may_write:
        raise PidfileRefused(f"pidfile {path} is in a directory others may write")
    if st.st_uid == 0 and parent.st_uid == 0:
        return None
    if parent.st_uid not in (0, st.st_uid):
        raise PidfileRefused(f"pidfile {path} is owned by uid {st.st_uid} in a directory "
                             f"of uid {parent.st_uid}")
    return st.st_uid


def started_after(start_ticks: int, when: float) -> bool:
    """Did the process with this start time (clock ticks since boot) start after the
    wall-clock time `when` (plus SLACK)?"""
    booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)   # start times count from it
    return booted + start_ticks / os.sysconf("SC_CLK_TCK") > when + SLACK
