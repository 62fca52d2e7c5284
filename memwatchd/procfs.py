"""The pure-Python twin of the compiled sampler (ext/_memread.pyx).

Same classes, same methods, same results: the reference the C code is tested
against, and the fallback where the extension cannot be built
(MEMWATCHD_NO_EXTENSIONS=1 forces it). Like the C code it keeps one fd per
file and re-reads it with os.pread, so the two differ only in speed.
"""
from __future__ import annotations

import os
import time
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import Iterable, List, Optional, Sequence

from memwatchd import types as _types
from memwatchd.threadgroup import open_live_statm
from memwatchd.types import (
    GONE,
    OK,
    UNKNOWN,
    UNLIMITED,
    CgroupSample,
    HostSample,
    Pressure,
    raise_for_status,
    status_for_errno,
)

IMPLEMENTATION = "python"
BUFSIZE = 8192
PAGE_SIZE = os.sysconf("SC_PAGESIZE")
_DIGITS = b"0123456789"


# ------------------------------------------------------------------ parsing

INT64_MAX = 2 ** 63 - 1


def _leading_uint(data: bytes, pos: int = 0):
    """Digits at data[pos:] -> (value, end), or (None, pos) if there are none or the
    value does not fit in int64 (as in the C parser)."""
    end = pos
    while end < len(data) and data[end] in _DIGITS:
        end += 1
    if end == pos or int(data[pos:end]) > INT64_MAX:
        return None, pos
    return int(data[pos:end]), end


def parse_statm(data: bytes):
    """Return (vms_pages, rss_pages) from statm text; raise ValueError if malformed."""
    vms, pos = _leading_uint(data)
    if vms is None:
        raise ValueError("malformed statm")
    while pos < len(data) and data[pos] in b" \t":
        pos += 1
    rss, _ = _leading_uint(data, pos)
    if rss is None:
        raise ValueError("malformed statm")
    return vms, rss


def _stat_field(data: bytes, field: int) -> Optional[int]:
    """Numeric field ``field`` (> 2) of /proc/<pid>/stat, counted after the LAST ')'
    (comm may hold ')'); None if malformed (the twin of parse_stat_field_c)."""
    close = data.rfind(b")")
    if close < 0:
        return None
    # After ')' fields are separated by single spaces; field 3 follows the first one.
    fields = data[close + 1:].split(b" ")
    if len(fields) <= field - 2:
        return None
    return _leading_uint(fields[field - 2])[0]


def parse_stat_start_time(data: bytes) -> int:
    """Field 22 (starttime) of /proc/<pid>/stat; ValueError if malformed."""
    value = _stat_field(data, 22)
    if value is None:
        raise ValueError("malformed stat")
    return value


def _stat_major_faults(data: bytes) -> int:
    """Field 12 (majflt) of /proc/<pid>/stat; -1 if malformed."""
    value = _stat_field(data, 12)
    return -1 if value is None else value


def parse_keyed(data: bytes, keys: Sequence, scale_kb: int = 1024) -> List[int]:
    """Lines "key value" or "Key: value kB": values of keys (bytes), UNKNOWN where absent."""
    wanted = [k if isinstance(k, bytes) else k.encode() for k in keys]
    out = [UNKNOWN] * len(wanted)
    for line in data.split(b"\n"):
        end = 0
        while end < len(line) and line[end] not in b" :":
            end += 1
        key = line[:end]
        if key not in wanted:
            continue
        pos = end + 1 if end < len(line) and line[end:end + 1] == b":" else end
        while pos < len(line) and line[pos] in b" \t":
            pos += 1
        value, pos = _leading_uint(line, pos)
        if value is not None:
            while pos < len(line) and line[pos] in b" \t":
                pos += 1
            if line[pos:pos + 2] == b"kB":
                if value > INT64_MAX // scale_kb:
                    continue  # does not fit: stays UNKNOWN
                value *= scale_kb
            out[wanted.index(key)] = value
    return out


def parse_max(data: bytes) -> int:
    """memory.max text -> bytes, UNLIMITED for "max", UNKNOWN if unparsable."""
    if data.startswith(b"max"):
        return UNLIMITED
    value, _ = _leading_uint(data)
    return UNKNOWN if value is None else value


def _centi(data: bytes, pos: int):
    """A PSI average like "12.34" into hundredths, truncating further digits."""
    whole, pos = _leading_uint(data, pos)
    if whole is None:
        return None, pos
    frac = b""
    if pos < len(data) and data[pos:pos + 1] == b".":
        pos += 1
        start = pos
        while pos < len(data) and data[pos] in _DIGITS:
            pos += 1
        frac = data[start:pos]
    return whole * 100 + int((frac[:2] + b"00")[:2]), pos


def _parse_psi_values(data: bytes) -> Optional[List[int]]:
    """[some avg10,avg60,avg300 (hundredths), total, full ...] or None if malformed."""
    values = [0] * 8
    for line in data.split(b"\n"):
        base = 0 if line.startswith(b"some") else 4 if line.startswith(b"full") else -1
        if base < 0:
            continue
        pos = 4
        for k in range(4):
            eq = line.find(b"=", pos)
            if eq < 0:
                break
            pos = eq + 1
            value, pos = _centi(line, pos) if k < 3 else _leading_uint(line, pos)
            if value is None:
                return None
            values[base + k] = value
    return values


def _pressure_from(v: Sequence[int]) -> Pressure:
    return Pressure(v[0] / 100.0, v[1] / 100.0, v[2] / 100.0, v[3],
                    v[4] / 100.0, v[5] / 100.0, v[6] / 100.0, v[7])


def parse_psi(data: bytes) -> Pressure:
    """PSI text -> Pressure; ValueError if malformed."""
    values = _parse_psi_values(data)
    if values is None:
        raise ValueError("malformed PSI")
    return _pressure_from(values)


def _pread(fd: int) -> bytes:
    """One pread at offset 0; the file's current content (the kernel regenerates it)."""
    return os.pread(fd, BUFSIZE, 0)


def _open_at(name: str, dirfd: int) -> int:
    return os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)


# ------------------------------------------------------------ ProcessTable

def _quiet_interval(headroom: int, fill_rate: int, min_interval: float, max_interval: float) -> float:
    """policy.next_interval, as the table's own schedule computes it (tested equal)."""
    if headroom <= 0:
        return min_interval
    return max(min_interval, min(max_interval, headroom / fill_rate))


class ProcessTable:
    """A set of processes whose statm is sampled together (see ext/_memread.pyx),
    and the schedule of the slots handed to it (schedule / sample_scheduled)."""

    def __init__(self, root: str = "/", capacity: int = 64):
        self._proc = os.path.join(root, "proc")
        self._fds: List[int] = []
        self._rss: List[int] = []
        self._vms: List[int] = []
        self._status: List[int] = []
        self._pids: List[int] = []
        self._starts: List[int] = []
        self._majflts: List[int] = []   # majflt (stat field 12) when the slot was added
        self._via_thread: List[bool] = []   # reads /proc/<pid>/task/<tid>/statm
        self._free: List[int] = []
        # the table's own schedule (issue 18): per slot, whether it is scheduled here,
        # the RSS it is quiet below and the limit its headroom is counted to (both from
        # the policy), when it is due, when it was last sampled, its current interval
        self._scheduled: List[bool] = []
        self._quiet_below: List[int] = []
        self._limit: List[int] = []
        self._due: List[float] = []
        self._sampled_at: List[float] = []
        self._interval: List[float] = []

    def __del__(self):
        for fd in getattr(self, "_fds", ()):
            if fd >= 0:
                os.close(fd)

    def add(self, pid: int) -> int:
        """Open pid's statm; return its slot. Raises TargetGone / AccessDenied."""
        what = f"process {pid}"
        try:
            dirfd = os.open(os.path.join(self._proc, str(int(pid))),
                            os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise_for_status(status_for_errno(e.errno), what)
        try:
            try:
                statfd = _open_at("stat", dirfd)
                try:
                    stat = _pread(statfd)
                finally:
                    os.close(statfd)
                start = parse_stat_start_time(stat)
                majflt = _stat_major_faults(stat)
                fd = _open_at("statm", dirfd)
            except OSError as e:
                raise_for_status(status_for_errno(e.errno), what)
            except ValueError:
                raise _types.TargetGone(f"{what}: unreadable stat") from None
        finally:
            os.close(dirfd)
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self._fds)
            for column in (self._fds, self._rss, self._vms, self._status, self._pids, self._starts,
                           self._majflts,
                           self._via_thread, self._scheduled, self._quiet_below, self._limit,
                           self._due, self._sampled_at, self._interval):
                column.append(0)
        self._fds[slot], self._pids[slot], self._starts[slot] = fd, pid, start
        self._majflts[slot] = majflt
        self._via_thread[slot] = self._scheduled[slot] = False
        self._rss[slot] = self._vms[slot] = 0
        self._status[slot] = OK
        return slot

    def remove(self, slot: int) -> None:
        """Forget a slot (closing its fd); the slot number may be reused by add()."""
        self._check(slot)
        if self._fds[slot] >= 0:
            os.close(self._fds[slot])
        self._fds[slot] = -1
        self._status[slot] = GONE
        self._pids[slot] = 0
        self._scheduled[slot] = False
        self._free.append(slot)

    def _sample_one(self, i: int) -> bool:
        """pread + parse one slot; True if it is still live."""
        fd = self._fds[i]
        if fd < 0:
            return False
        try:
            data = _pread(fd)
        except OSError as e:
            self._status[i] = status_for_errno(e.errno)
            if self._status[i] == GONE:
                if self._via_thread[i]:  # that thread exited: another may live
                    return self._rehome(i)
                self._close(i)
            return False
        try:
            vms, rss = parse_statm(data)
        except ValueError:
            vms = rss = 0
        if vms == 0 and rss == 0:
            # A zombie reads all zeros, and so does a live process whose main thread exited.
            return self._rehome(i)
        self._rss[i] = rss * PAGE_SIZE
        self._vms[i] = vms * PAGE_SIZE
        self._status[i] = OK
        return True

    def _rehome(self, i: int) -> bool:
        """A live thread's statm from now on (memwatchd.threadgroup), or GONE."""
        self._close(i)
        found = open_live_statm(self._proc, self._pids[i], self._starts[i])
        if found is None:
            self._status[i] = GONE
            self._rss[i] = 0
            return False
        self._fds[i], vms, rss = found
        self._via_thread[i] = True
        self._rss[i] = rss * PAGE_SIZE
        self._vms[i] = vms * PAGE_SIZE
        self._status[i] = OK
        return True

    def sample(self) -> int:
        """Re-read every live slot; return how many are still live."""
        return sum(self._sample_one(i) for i in range(len(self._fds)))

    def sample_slots(self, slots) -> int:
        """Re-read only these slots (the ones due); return how many are still live."""
        for i in slots:
            self._check(i)
        return sum(self._sample_one(i) for i in slots)

    # -------------------------------------------------- the table's own schedule

    def schedule(self, slot: int, quiet_below: int, limit: int, sampled_at: float,
                 due_at: float, interval: float) -> None:
        """Keep this slot's schedule here: sample_scheduled reads it when due and hands
        it back only once it is loud (RSS at or above quiet_below), not OK or gone."""
        self._check(slot)
        self._scheduled[slot] = True
        self._quiet_below[slot], self._limit[slot] = quiet_below, limit
        self._sampled_at[slot], self._due[slot], self._interval[slot] = sampled_at, due_at, interval

    def unschedule(self, slot: int) -> None:
        """The caller schedules this slot again."""
        self._check(slot)
        self._scheduled[slot] = False

    def sample_scheduled(self, now: float, fill_rate: int, min_interval: float,
                         max_interval: float) -> List[int]:
        """Read every scheduled slot due by now. A quiet one is given its next due time
        (headroom to its limit over fill_rate, clamped, as policy.interval_for); the
        others leave the schedule and are returned, in slot order."""
        loud = []
        for i in range(len(self._fds)):
            if not self._scheduled[i] or self._due[i] > now:
                continue
            if not self._sample_one(i) or self._rss[i] >= self._quiet_below[i]:
                self._scheduled[i] = False
                loud.append(i)
                continue
            self._sampled_at[i] = now
            self._interval[i] = every = _quiet_interval(self._limit[i] - self._rss[i], fill_rate,
                                                        min_interval, max_interval)
            self._due[i] = now + every
        return loud

    def scheduled(self, slot: int) -> bool:
        self._check(slot)
        return self._scheduled[slot]

    def due_at(self, slot: int) -> float:
        self._check(slot)
        return self._due[slot]

    def set_due(self, slot: int, due_at: float) -> None:
        self._check(slot)
        self._due[slot] = due_at

    def sampled_at(self, slot: int) -> float:
        self._check(slot)
        return self._sampled_at[slot]

    def interval(self, slot: int) -> float:
        self._check(slot)
        return self._interval[slot]

    def next_due(self) -> float:
        """The earliest due time of the scheduled slots (inf when none)."""
        return min((d for d, on in zip(self._due, self._scheduled) if on), default=float("inf"))

    def _close(self, slot: int) -> None:
        os.close(self._fds[slot])
        self._fds[slot] = -1

    def _check(self, slot: int) -> None:
        if not 0 <= slot < len(self._fds):
            raise IndexError(slot)

    def rss(self, slot: int) -> int:
        self._check(slot)
        return self._rss[slot]

    def vms(self, slot: int) -> int:
        self._check(slot)
        return self._vms[slot]

    def status(self, slot: int) -> int:
        self._check(slot)
        return self._status[slot]

    def pid(self, slot: int) -> int:
        self._check(slot)
        return self._pids[slot]

    def start_time(self, slot: int) -> int:
        self._check(slot)
        return self._starts[slot]

    def major_faults(self, slot: int) -> int:
        """Its major page faults (stat field 12) when the slot was added; -1 unreadable."""
        self._check(slot)
        return self._majflts[slot]

    def __len__(self) -> int:
        return len(self._fds) - len(self._free)


# ------------------------------------------------------------- CgroupTable

CGROUP_FILES = ("memory.current", "memory.max", "memory.high", "memory.swap.current",
                "memory.events", "memory.stat", "memory.pressure")
EVENT_KEYS = [b"high", b"max", b"oom", b"oom_kill", b"oom_group_kill"]
STAT_KEYS = [b"anon", b"file", b"inactive_file", b"shmem"]


class CgroupTable:
    """A set of cgroup v2 directories whose memory files are sampled together."""

    def __init__(self, capacity: int = 8):
        self._fds: List[List[int]] = []   # per slot: one fd per CGROUP_FILES entry (-1 = absent)
        self._values: List[Optional[CgroupSample]] = []
        self._status: List[int] = []
        self._paths: List[Optional[str]] = []
        self._dirfds: List[int] = []      # the directory, held from selection to action
        self._free: List[int] = []

    def __del__(self):
        for fds in getattr(self, "_fds", ()):
            for fd in fds:
                if fd >= 0:
                    os.close(fd)
        for fd in getattr(self, "_dirfds", ()):
            if fd is not None and fd >= 0:
                os.close(fd)

    def add(self, path) -> int:
        """Open the memory files of a cgroup directory; return its slot."""
        what = f"cgroup {path}"
        try:
            dirfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise_for_status(status_for_errno(e.errno), what)
        fds = []
        for name in CGROUP_FILES:
            try:
                fds.append(_open_at(name, dirfd))
            except OSError as e:
                if name == "memory.current":   # the first one: nothing else to close
                    os.close(dirfd)
                    raise_for_status(status_for_errno(e.errno), f"{what}: memory.current")
                fds.append(-1)
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self._fds)
            for column in (self._fds, self._values, self._status, self._paths, self._dirfds):
                column.append(None)
        self._fds[slot] = fds
        self._dirfds[slot] = dirfd
        self._paths[slot] = path
        self._status[slot] = OK
        self._values[slot] = _unknown_cgroup_sample()
        return slot

    def _close(self, slot: int) -> None:
        for fd in self._fds[slot] + [self._dirfds[slot]]:
            if fd >= 0:
                os.close(fd)
        self._fds[slot] = [-1] * len(CGROUP_FILES)
        self._dirfds[slot] = -1

    def remove(self, slot: int) -> None:
        self._check(slot)
        self._close(slot)
        self._status[slot] = GONE
        self._paths[slot] = None
        self._free.append(slot)

    def sample(self) -> int:
        """Re-read every live cgroup; return how many are still live."""
        return sum(self._sample_one(i) for i in range(len(self._fds)))

    def sample_slots(self, slots: Iterable[int]) -> int:
        """Re-read only these slots (the ones due); return how many are still live."""
        slots = list(slots)
        for i in slots:
            self._check(i)
        return sum(self._sample_one(i) for i in slots)

    def _sample_one(self, i: int) -> bool:
        """pread + parse every memory file of one slot; True if it is still live."""
        fds = self._fds[i]
        if fds[0] < 0:
            return False
        try:
            texts = [_pread(fds[0])]
        except OSError as e:  # only memory.current decides that a cgroup is gone
            self._status[i] = status_for_errno(e.errno)
            if self._status[i] == GONE:
                self._close(i)
            return False
        texts.extend(_pread_optional(fd) for fd in fds[1:])
        self._values[i] = _cgroup_sample(*texts)
        self._status[i] = OK
        return True

    def _check(self, slot: int) -> None:
        if not 0 <= slot < len(self._fds):
            raise IndexError(slot)

    def status(self, slot: int) -> int:
        self._check(slot)
        return self._status[slot]

    def current(self, slot: int) -> int:
        self._check(slot)
        return self._values[slot].current

    def path(self, slot: int):
        self._check(slot)
        return self._paths[slot]

    def dirfd(self, slot: int) -> int:
        """The cgroup directory opened by add() (-1 once GONE or removed)."""
        self._check(slot)
        return self._dirfds[slot]

    def get(self, slot: int) -> CgroupSample:
        self._check(slot)
        return self._values[slot]

    def __len__(self) -> int:
        return len(self._fds) - len(self._free)


def _pread_optional(fd: int) -> Optional[bytes]:
    """An optional cgroup file: None (UNKNOWN) if absent or failing (ENODEV after
    cgroup.pressure=0, EACCES, ...), never a reason to drop the cgroup."""
    if fd < 0:
        return None
    try:
        return _pread(fd)
    except OSError:
        return None


def _unknown_cgroup_sample() -> CgroupSample:
    return CgroupSample(*([UNKNOWN] * 13), pressure=None)


def _cgroup_sample(current, mmax, high, swap, events, stat, pressure) -> CgroupSample:
    """Build a CgroupSample from the raw file contents (None = file absent)."""
    def one(text):
        return UNKNOWN if text is None else parse_max(text)
    ev = parse_keyed(events, EVENT_KEYS, 1) if events is not None else [UNKNOWN] * 5
    st = parse_keyed(stat, STAT_KEYS, 1) if stat is not None else [UNKNOWN] * 4
    psi = _parse_psi_values(pressure) if pressure is not None else None
    return CgroupSample(one(current), one(mmax), one(high), one(swap), *ev, *st,
                        pressure=None if psi is None else _pressure_from(psi))


# -------------------------------------------------------------- HostReader

MEMINFO_KEYS = [b"MemTotal", b"MemAvailable", b"SwapTotal", b"SwapFree", b"SwapCached"]
# pages brought back in: from swap, and file pages evicted recently (workingset_refault
# before Linux 5.9 split it into _anon and _file; anon refaults are swap-ins anyway)
VMSTAT_KEYS = [b"pswpin", b"workingset_refault_file", b"workingset_refault", b"pgmajfault"]
VMSTAT_BUFSIZE = 16384


def _open_optional(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


class HostReader:
    """/proc/meminfo and /proc/pressure/memory, kept open and re-read; /proc/vmstat's
    refault counters and /proc/pressure/io too while MemAvailable is under
    ``refaults_below`` bytes."""

    def __init__(self, root: str = "/"):
        proc = os.path.join(root, "proc")
        self._meminfo_fd = os.open(os.path.join(proc, "meminfo"), os.O_RDONLY | os.O_CLOEXEC)
        self._psi_fd = _open_optional(os.path.join(proc, "pressure", "memory"))
        self._vmstat_fd = _open_optional(os.path.join(proc, "vmstat"))
        self._io_psi_fd = _open_optional(os.path.join(proc, "pressure", "io"))
        self.refaults_below = -1

    def __del__(self):
        for fd in (getattr(self, "_meminfo_fd", -1), getattr(self, "_psi_fd", -1),
                   getattr(self, "_vmstat_fd", -1), getattr(self, "_io_psi_fd", -1)):
            if fd >= 0:
                os.close(fd)

    def _refaults(self) -> tuple:
        """(bytes refaulted since boot: pswpin + file refaults, major faults since boot or
        None), or (None, None) if unreadable."""
        try:
            data = os.pread(self._vmstat_fd, VMSTAT_BUFSIZE - 1, 0)
        except OSError:
            return None, None
        swapins, file_new, file_old, majflt = parse_keyed(data, VMSTAT_KEYS, 1)
        if swapins < 0 or (file_new < 0 and file_old < 0):
            return None, None
        return ((swapins + (file_new if file_new >= 0 else file_old)) * PAGE_SIZE,
                majflt if majflt >= 0 else None)

    def _io_full_us(self) -> Optional[int]:
        """/proc/pressure/io's "full" total in µs, or None (no file, unreadable, malformed)."""
        try:
            values = _parse_psi_values(_pread(self._io_psi_fd))
        except OSError:
            return None
        return None if values is None else values[7]

    @property
    def has_psi(self) -> bool:
        return self._psi_fd >= 0

    def read(self) -> HostSample:
        """Return a HostSample (pressure None where PSI is unavailable)."""
        mem = parse_keyed(_pread(self._meminfo_fd), MEMINFO_KEYS, 1024)
        pressure = None
        if self._psi_fd >= 0:
            try:
                values = _parse_psi_values(_pread(self._psi_fd))
            except OSError:
                values = None
            if values is not None:
                pressure = _pressure_from(values)
        refaults = major_faults = io_full = None
        if self._vmstat_fd >= 0 and 0 <= mem[1] < self.refaults_below:
            refaults, major_faults = self._refaults()
            if self._io_psi_fd >= 0:
                io_full = self._io_full_us()
        return HostSample(mem[0], mem[1], mem[2], mem[3], pressure, refaults, major_faults, io_full,
                          mem[4] if mem[4] >= 0 else None)


def wait_quiet(host: HostReader, fds, timeout: float, step: float, low: int, high: int,
               ping_fd: int = -1, ping_every: float = 0.0, ping_in: float = 0.0,
               table: Optional["ProcessTable"] = None, slots=(), ceilings=(),
               target_step: float = 0.0, steps=()):
    """The compiled wait_quiet's twin (ext/_memread.pyx says what it does): the same
    results, at a Python wake-up's cost for every step."""
    import select
    poller = select.poll()
    for fd, events in fds:
        poller.register(fd, events)
    now = time.monotonic()
    deadline, next_look = now + timeout, now + step
    next_ping = now + ping_in if ping_fd >= 0 else deadline + 1.0
    slots = list(slots) if table is not None else []
    every = list(steps) if len(steps) else [target_step] * len(slots)
    if len(every) != len(slots):
        raise ValueError("steps: one per slot")
    due = [now + e for e in every]
    fastest = min(every, default=target_step)
    next_sample = min(due, default=deadline + 1.0)
    slack = min([step] + ([fastest] if slots else []) + ([ping_every] if ping_fd >= 0 else [])) / 2
    pings, avail, pinged_at, wakes = 0, -1, 0.0, 0

    def out(why, ready=()):
        return why, list(ready), pings, avail, (time.monotonic() - pinged_at) if pings else 0.0, wakes

    while True:
        until = min(deadline, next_look, next_ping, next_sample)
        try:
            ready = poller.poll(max(0.0, until - now) * 1000.0 + 0.999)
        except InterruptedError:
            ready = []
        if ready:
            return out(1, ready)
        wakes += 1
        now = time.monotonic()
        soon = now + slack if now < deadline else now   # returning: Python pings next
        if next_ping <= soon:
            try:
                if os.write(ping_fd, b"WATCHDOG=1") != 10:
                    return out(3)
            except OSError:
                return out(3)
            pings += 1
            pinged_at = now
            next_ping = now + ping_every
        if now >= deadline:
            return out(0)
        if next_look <= soon:
            try:
                avail = max(-1, parse_keyed(_pread(host._meminfo_fd), (b"MemAvailable",), 1024)[0])
            except OSError:
                avail = -1
            if avail < low or avail > high:
                return out(2)
            next_look = now + step
        if next_sample <= soon:
            now_due = [k for k in range(len(slots)) if due[k] < now + fastest]   # before the next
            table.sample_slots([slots[k] for k in now_due])
            for k in now_due:
                due[k] = now + every[k]
            if any(table.status(slots[k]) != _types.OK or table.rss(slots[k]) >= ceilings[k]
                   for k in now_due):
                return out(4)
            next_sample = min(due)


# ------------------------------------------------ syscalls the stdlib lacks

def process_mrelease(pidfd: int) -> None:
    """Reap a dying process's memory now (Linux 5.15+). Raises OSError (EINVAL on a live one)."""
    import ctypes  # only on the kill path, and only without the extension
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(448, ctypes.c_int(pidfd), ctypes.c_uint(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


PR_SET_IO_FLUSHER = 57   # linux/prctl.h


def set_io_flusher() -> None:
    """prctl(PR_SET_IO_FLUSHER): this process's allocations never do I/O in reclaim
    (see ext/_memread.pyx set_io_flusher). Raises OSError (EPERM, EINVAL before 5.6)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_IO_FLUSHER, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def mlockall_onfault() -> None:
    """mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT): keep the killer resident under pressure.

    malloc_trim(0) first hands the heap that start-up freed back to the kernel, so
    what stays locked is what the daemon uses.
    """
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.malloc_trim(ctypes.c_size_t(0))
    if libc.mlockall(1 | 2 | 4) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
