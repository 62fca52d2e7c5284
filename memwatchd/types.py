"""The samples the readers return and the project's errors, shared by every stage.

Nothing here does I/O; every stage may import this module. The records are
named tuples, not dataclasses: `dataclasses` pulls in inspect, ast, dis and
tokenize, about 1.6 MiB that the daemon's resident memory cannot afford.
"""
from __future__ import annotations

import errno
from collections import namedtuple

# ---------------------------------------------------------------- errors


class MemwatchdError(Exception):
    """Base of every error the core raises; the CLI maps each subclass to an exit code."""


class ConfigError(MemwatchdError):
    """A configuration file (or flag) is invalid. The message names file, key and value."""


class InsecureConfigError(ConfigError):
    """A config file or on_action program is writable by someone other than root."""


class TargetGone(MemwatchdError):
    """The process or cgroup no longer exists (or its PID now names another process)."""


class AccessDenied(MemwatchdError):
    """The kernel refused to let us read or signal the target."""


# The core raises; the CLI exits. Most specific first. entry.py (the console script)
# and cli.py both use this one table; cli.EXIT_STATUS_HELP documents it.
EXIT_CODES = (
    (InsecureConfigError, 3),
    (ConfigError, 2),
    (AccessDenied, 4),
    (TargetGone, 5),
    (MemwatchdError, 1),
)


def exit_code_for(error: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return 1


# ------------------------------------------------- sampler status codes
# One reading of one target ends in one of these. The sampler fills them in a
# status array; a tick never raises for a target that vanished.
OK = 0
GONE = 1
DENIED = 2
FAILED = 3  # an unexpected errno: kept, logged, the target is retried next tick

# The one table that turns an errno from a read into a status. Both sampler
# implementations (the Cython one and the pure-Python twin) use it.
STATUS_FOR_ERRNO = {
    errno.ESRCH: GONE,
    errno.ENOENT: GONE,
    errno.ENODEV: GONE,
    errno.EACCES: DENIED,
    errno.EPERM: DENIED,
}


def status_for_errno(err: int) -> int:
    """Map an OSError errno to OK/GONE/DENIED/FAILED (see STATUS_FOR_ERRNO)."""
    return STATUS_FOR_ERRNO.get(err, FAILED)


def raise_for_status(status: int, what: str) -> None:
    """Turn a non-OK status into the matching exception (used outside the hot loop)."""
    if status == GONE:
        raise TargetGone(f"{what}: gone")
    if status == DENIED:
        raise AccessDenied(f"{what}: permission denied")
    if status != OK:
        raise MemwatchdError(f"{what}: read failed")


# --------------------------------------------------------------- samples

UNLIMITED = -1  # memory.max / memory.high "max"
UNKNOWN = -2    # a key or file the kernel does not provide


class Pressure(namedtuple("Pressure", "some_avg10 some_avg60 some_avg300 some_total_us "
                                      "full_avg10 full_avg60 full_avg300 full_total_us",
                          defaults=(0.0, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0))):
    """One PSI file (/proc/pressure/memory or a cgroup's memory.pressure); totals in µs."""

    __slots__ = ()


class HostSample(namedtuple("HostSample",
                            "mem_total mem_available swap_total swap_free pressure refaults major_faults "
                            "io_full_us swap_cached",
                            defaults=(None, None, None, None))):
    """/proc/meminfo and /proc/pressure/memory, in bytes; pressure is None where PSI is missing.

    refaults: bytes brought back in since boot (/proc/vmstat pswpin + file workingset
    refaults, in pages x page size), read only while MemAvailable is under the reader's
    ``refaults_below`` (the guard's pressure gate); None when not read or missing.
    major_faults: /proc/vmstat pgmajfault (every process's major faults since boot), read
    with refaults; what a candidate's own major faults are a share of (policy.own_thrash).
    io_full_us: /proc/pressure/io "full" total (µs all tasks waited for I/O), read with
    refaults: a swap-in of a page the kernel did not know to be in the working set is
    waited for as I/O, not as a memory stall, so a slow swap device freezes the host with
    memory PSI low (policy.guard_level, psi_io_full); None when not read or missing.
    swap_cached: /proc/meminfo SwapCached, pages that hold a swap slot and their RAM at
    once (being written out, or read back in and not yet dropped from swap): counted
    once, not twice, by the host trend (policy.Policy._predict_host); None where missing.
    """

    __slots__ = ()


class SwapDevices(namedtuple("SwapDevices", "zram_total zram_free zram_orig zram_ram")):
    """The zram part of swap (/proc/swaps and /sys/block/zram*/mm_stat), in bytes.

    zram_total/zram_free: swap space on zram devices; zram_orig: the data they
    hold, uncompressed; zram_ram: the RAM that costs (mm_stat mem_used_total).
    A page swapped to zram frees a page of RAM but costs its compressed size,
    so zram swap is worth less headroom than disk swap (policy.swap_headroom).
    """

    __slots__ = ()


NO_ZRAM = SwapDevices(0, 0, 0, 0)


class CgroupSample(namedtuple("CgroupSample", "current max high swap_current "
                                              "events_high events_max events_oom events_oom_kill "
                                              "events_oom_group_kill anon file inactive_file shmem "
                                              "pressure")):
    """One cgroup v2 directory's memory files, in bytes; UNKNOWN where a file/key is missing.

    max and high are UNLIMITED for "max"; pressure is None without memory.pressure.
    """

    __slots__ = ()


class Reading(namedtuple("Reading", "key watch usage limit warn unreclaimable ceiling",
                         defaults=(None, None))):
    """One watched target's usage this tick, as the policy sees it.

    ``key`` names the target for its whole life: ("process", pid, start_time)
    or ("cgroup", path). ``watch`` is the name of the [[watch]] that made it a
    target; limit and warn are already resolved to bytes (warn None = no warning).
    For a cgroup, ``unreclaimable`` is anon + shmem (what the predictive trigger
    extrapolates; None = ``usage``) and ``ceiling`` its memory.max (None = none).
    """

    __slots__ = ()


class Candidate(namedtuple("Candidate", "key pid comm cgroup rss uid exe_root_owned major_faults",
                           defaults=(-1, False, -1))):
    """A process the host guard may choose (listed only when the guard fires).

    key is ("process", pid, start_time); cgroup is below the cgroup root,
    e.g. "/system.slice/x.service"; rss in bytes. uid (real uid, -1 unknown) and
    exe_root_owned (its executable is a root-owned regular file that nobody else
    may write; None when the kernel does not let memwatchd look) say whether its
    name could have been forged: any user can call a process "sshd". targets
    fills them for processes with a protected name. major_faults: its major page faults
    (stat field 12, -1 unknown), to tell whether its own pages come back (a thrash) or
    only the others' (its growth pushed them out: policy.own_thrash).
    """

    __slots__ = ()
