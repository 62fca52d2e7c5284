"""Plain frozen dataclasses and the project's errors, shared by every stage.

Nothing here does I/O; every stage may import this module.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Optional

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


@dataclass(frozen=True)
class Pressure:
    """One PSI file (/proc/pressure/memory or a cgroup's memory.pressure)."""

    some_avg10: float = 0.0
    some_avg60: float = 0.0
    some_avg300: float = 0.0
    some_total_us: int = 0
    full_avg10: float = 0.0
    full_avg60: float = 0.0
    full_avg300: float = 0.0
    full_total_us: int = 0


@dataclass(frozen=True)
class HostSample:
    """/proc/meminfo and /proc/pressure/memory; pressure is None where PSI is missing."""

    mem_total: int
    mem_available: int
    swap_total: int
    swap_free: int
    pressure: Optional[Pressure]


@dataclass(frozen=True)
class CgroupSample:
    """One cgroup v2 directory's memory files, in bytes; UNKNOWN where a file/key is missing."""

    current: int
    max: int            # UNLIMITED for "max"
    high: int           # UNLIMITED for "max"
    swap_current: int
    events_high: int
    events_max: int
    events_oom: int
    events_oom_kill: int
    events_oom_group_kill: int
    anon: int
    file: int
    inactive_file: int
    shmem: int
    pressure: Optional[Pressure]


@dataclass(frozen=True)
class Reading:
    """One watched target's usage this tick, as the policy sees it.

    ``key`` names the target for its whole life: ("process", pid, start_time)
    or ("cgroup", path). ``watch`` is the name of the [[watch]] that made it a
    target; limit and warn are already resolved to bytes (warn None = no warning).
    """

    key: tuple
    watch: str
    usage: int
    limit: int
    warn: Optional[int]


@dataclass(frozen=True)
class Candidate:
    """A process the host guard may choose (listed only when the guard fires)."""

    key: tuple                   # ("process", pid, start_time)
    pid: int
    comm: str
    cgroup: str                  # below the cgroup root, e.g. "/system.slice/x.service"
    rss: int
