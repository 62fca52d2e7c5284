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
