"""A process whose main thread exited while other threads live.

After ``pthread_exit()`` in main, the leader thread is a zombie: /proc/<pid>/statm
reads all zeros, cmdline is empty and exe is unreadable, yet the process (its
thread group) is alive and may hold gigabytes. Only a process whose *whole*
thread group has exited is gone. These helpers read such a process through one
of its live threads (/proc/<pid>/task/<tid>/...). Both samplers (ext/_memread.pyx
and its twin memwatchd/procfs.py) call ``open_live_statm`` only off the hot path,
when a statm read turned all zeros or an adopted thread's fd failed, so they
agree by construction and the pread floor is untouched.
"""
from __future__ import annotations

import os

_FLAGS = os.O_RDONLY | os.O_CLOEXEC


def _start_time(stat: bytes) -> int:
    """Field 22 of /proc/<pid>/stat, counted after the LAST ')' (comm may hold ')')."""
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else -1


def _statm_pages(fd: int):
    """(vms, rss) pages from a statm fd, (0, 0) if unreadable or malformed."""
    parts = os.pread(fd, 256, 0).split()
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        return 0, 0
    return int(parts[0]), int(parts[1])


def open_live_statm(proc: str, pid: int, start_time: int):
    """(fd, vms_pages, rss_pages) of a statm that shows process (pid, start_time)'s memory:
    its own if it reads non-zero again, else a live thread's. None if the whole thread
    group has exited or the PID names another process now (start time differs).

    While any thread lives, the zombie leader keeps the PID, so the start-time check
    on /proc/<pid> proves the threads found below belong to the process we watch.
    """
    try:
        dirfd = os.open(os.path.join(proc, str(int(pid))), _FLAGS | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        try:
            statfd = os.open("stat", _FLAGS, dir_fd=dirfd)
            try:
                if _start_time(os.pread(statfd, 4096, 0)) != start_time:
                    return None
            finally:
                os.close(statfd)
            try:
                tids = [t for t in os.listdir(os.path.join(proc, str(int(pid)), "task"))
                        if t.isdigit() and t != str(pid)]
            except OSError:
                tids = []
        except OSError:
            return None
        for name in ["statm"] + [f"task/{tid}/statm" for tid in tids]:
            try:
                fd = os.open(name, _FLAGS, dir_fd=dirfd)
            except OSError:
                continue
            try:
                vms, rss = _statm_pages(fd)
            except OSError:
                vms = rss = 0
            if vms or rss:
                return fd, vms, rss
            os.close(fd)
        return None
    finally:
        os.close(dirfd)


def live_task_dir(proc: str, pid: int) -> str:
    """/proc/<pid> itself, or /proc/<pid>/task/<tid> of a live thread when the leader has
    exited (its cmdline, exe and status are empty then); for cmdline matching and the
    guard's ownership checks."""
    base = os.path.join(proc, str(int(pid)))
    try:
        with open(os.path.join(base, "stat"), "rb", buffering=0) as f:
            state = f.read(4096)
        state = state[state.rfind(b")") + 2:state.rfind(b")") + 3]
    except OSError:
        return base
    if state != b"Z":
        return base
    try:
        tids = [t for t in os.listdir(os.path.join(base, "task")) if t.isdigit() and t != str(pid)]
    except OSError:
        return base
    return os.path.join(base, "task", tids[0]) if tids else base
