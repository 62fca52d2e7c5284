"""The sampler stage: picks the compiled readers, or their pure-Python twin.

Both offer ProcessTable, CgroupTable, HostReader, the parse_* functions,
process_mrelease and mlockall_onfault (see ext/_memread.pyx). Everything else
in memwatchd imports them from here, so the choice is made in one place.
MEMWATCHD_NO_EXTENSIONS=1 forces the twin; otherwise the compiled module is
used when it was built, and IMPLEMENTATION says which one is live
("c" or "python") so tests and `memwatchd --version` can tell.
"""
from __future__ import annotations

import os


def _load():
    if os.environ.get("MEMWATCHD_NO_EXTENSIONS", "") not in ("", "0"):
        from memwatchd import procfs
        return procfs
    try:
        from memwatchd import _memread
    except ImportError:  # not built (e.g. a source checkout): same API, slower
        from memwatchd import procfs
        return procfs
    return _memread


impl = _load()
IMPLEMENTATION: str = impl.IMPLEMENTATION
ProcessTable = impl.ProcessTable
CgroupTable = impl.CgroupTable
HostReader = impl.HostReader
parse_statm = impl.parse_statm
parse_stat_start_time = impl.parse_stat_start_time
parse_keyed = impl.parse_keyed
parse_max = impl.parse_max
parse_psi = impl.parse_psi
process_mrelease = impl.process_mrelease
mlockall_onfault = impl.mlockall_onfault
set_io_flusher = impl.set_io_flusher
wait_quiet = impl.wait_quiet


def open_psi_trigger(proc_root: str = "/", stall_us: int = 150_000, window_us: int = 1_000_000):
    """Register a PSI trigger on /proc/pressure/memory; return its fd (poll it for POLLPRI).

    The kernel then wakes us as soon as tasks stall on memory for stall_us within
    window_us, instead of at the next tick. Without CAP_SYS_RESOURCE (Linux 6.5+)
    the window must be a multiple of 2 s, so a refused trigger is retried at 2 s
    with the same stall share. Raises OSError where PSI is missing or every form
    is refused; the caller then relies on sampling alone.
    """
    path = os.path.join(proc_root, "proc", "pressure", "memory")
    attempts = [(stall_us, window_us), (stall_us * 2_000_000 // window_us, 2_000_000)]
    error: OSError = OSError("no PSI trigger attempted")
    for stall, window in attempts:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.write(fd, f"some {int(stall)} {int(window)}\0".encode())
            return fd
        except OSError as e:
            os.close(fd)
            error = e
    raise error
