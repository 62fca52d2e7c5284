# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Hot-path readers for memwatchd, in C.

Each table keeps one open fd per watched file and re-reads it with
pread(fd, buf, 0) into a preallocated buffer, parsing integers in C. One
``sample()`` call reads a whole table: N targets cost N syscalls and a single
Python-to-C crossing. The pure-Python twin with the same API is
memwatchd/procfs.py; tests run against both.
"""
from libc.errno cimport errno, EINTR
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memset
from libc.stdint cimport int64_t, INT64_MAX
from posix.unistd cimport close, sysconf, _SC_PAGESIZE

import os

from memwatchd import types as _types
from memwatchd.threadgroup import open_live_statm
from memwatchd.types import CgroupSample, HostSample, Pressure

cdef extern from "unistd.h" nogil:
    ssize_t pread(int fd, void *buf, size_t count, long offset)
    long syscall(long number, ...)

cdef extern from "fcntl.h" nogil:
    # Declared here, not cimported from posix.fcntl: Cython 0.29 (Debian 12's
    # cython3) has no O_CLOEXEC or O_DIRECTORY there.
    enum: O_RDONLY
    enum: O_CLOEXEC
    enum: O_DIRECTORY
    int openat(int dirfd, const char *path, int flags, ...)
    int open(const char *path, int flags, ...)

cdef extern from "poll.h" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)

cdef extern from "time.h" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum: CLOCK_MONOTONIC

cdef extern from "sys/socket.h" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    enum: MSG_DONTWAIT
    enum: MSG_NOSIGNAL

cdef extern from "malloc.h" nogil:
    int malloc_trim(size_t pad)

cdef extern from "sys/prctl.h" nogil:
    int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)

cdef extern from "sys/mman.h" nogil:
    int mlockall(int flags)
    int MCL_CURRENT
    int MCL_FUTURE

cdef enum:
    BUFSIZE = 8192
    SYS_PROCESS_MRELEASE = 448
    MCL_ONFAULT_FLAG = 4
    PR_SET_IO_FLUSHER_OPT = 57
    ERRNO_TABLE_SIZE = 256
    # mirrors of memwatchd.types constants, usable without the GIL (checked below)
    S_OK = 0
    S_GONE = 1
    S_FAILED = 3
    C_UNLIMITED = -1
    C_UNKNOWN = -2

assert (S_OK, S_GONE, S_FAILED, C_UNLIMITED, C_UNKNOWN) == (
    _types.OK, _types.GONE, _types.FAILED, _types.UNLIMITED, _types.UNKNOWN)

cdef int64_t PAGE_SIZE = sysconf(_SC_PAGESIZE)

# errno -> status, built once from the single table in memwatchd.types.
cdef signed char _status_of_errno[ERRNO_TABLE_SIZE]
for _i in range(ERRNO_TABLE_SIZE):
    _status_of_errno[_i] = _types.FAILED
for _err, _st in _types.STATUS_FOR_ERRNO.items():
    _status_of_errno[_err] = _st

cdef inline int status_of(int err) nogil:
    if 0 <= err < ERRNO_TABLE_SIZE:
        return _status_of_errno[err]
    return S_FAILED


# ------------------------------------------------------------------ parsing

cdef inline const char *skip_spaces(const char *p, const char *end) nogil:
    while p < end and (p[0] == b' ' or p[0] == b'\t'):
        p += 1
    return p

cdef inline const char *parse_uint(const char *p, const char *end, int64_t *out) nogil:
    """Parse decimal digits at p; return the position after them, or NULL if there
    are none or the value does not fit in int64 (no file we read holds such a number)."""
    cdef int64_t v = 0
    cdef const char *start = p
    while p < end and b'0' <= p[0] <= b'9':
        if v > (INT64_MAX - (p[0] - 48)) // 10:
            return NULL
        v = v * 10 + (p[0] - 48)
        p += 1
    if p == start:
        return NULL
    out[0] = v
    return p

cdef inline int parse_statm_c(const char *buf, ssize_t n, int64_t *vms_pages, int64_t *rss_pages) nogil:
    """statm: "size resident shared text lib data dt". Returns 0 on success."""
    cdef const char *end = buf + n
    cdef const char *p = parse_uint(buf, end, vms_pages)
    if p == NULL:
        return -1
    p = skip_spaces(p, end)
    p = parse_uint(p, end, rss_pages)
    if p == NULL:
        return -1
    return 0

cdef int64_t parse_stat_field_c(const char *buf, ssize_t n, int want) nogil:
    """Numeric field ``want`` (> 2) of /proc/<pid>/stat, counted after the LAST ')'
    (comm may hold ')'); -1 if malformed."""
    cdef ssize_t i = n - 1
    cdef const char *p
    cdef const char *end = buf + n
    cdef int field = 2  # the ')' closes field 2 (comm)
    cdef int64_t v
    while i >= 0 and buf[i] != b')':
        i -= 1
    if i < 0:
        return -1
    p = buf + i + 1
    while p < end:
        if p[0] == b' ':
            field += 1
            p += 1
            if field == want:
                if parse_uint(p, end, &v) == NULL:
                    return -1
                return v
        else:
            p += 1
    return -1

cdef inline int64_t parse_stat_start_time_c(const char *buf, ssize_t n) nogil:
    """Field 22 (starttime) of /proc/<pid>/stat."""
    return parse_stat_field_c(buf, n, 22)

cdef int parse_keyed_c(const char *buf, ssize_t n, list keys, int64_t *out, int64_t scale_kb) except -1:
    """Lines "key value [kB]" (memory.stat, memory.events) or "Key:  value kB" (meminfo).

    out[i] receives the value of keys[i] (bytes keys), or stays UNKNOWN. A value
    followed by "kB" is multiplied by scale_kb.
    """
    cdef const char *end = buf + n
    cdef const char *p = buf
    cdef const char *line_start
    cdef const char *key_end
    cdef Py_ssize_t klen, j, nkeys = len(keys)
    cdef bytes key
    cdef const char *kp
    cdef const char *q
    cdef int64_t v
    while p < end:
        line_start = p
        while p < end and p[0] != b' ' and p[0] != b':' and p[0] != b'\n':
            p += 1
        key_end = p
        klen = key_end - line_start
        if p < end and p[0] == b':':
            p += 1
        p = skip_spaces(p, end)
        for j in range(nkeys):
            key = keys[j]
            if len(key) == klen:
                kp = key
                if memcmp_(kp, line_start, klen):
                    q = parse_uint(p, end, &v)
                    if q != NULL:
                        q = skip_spaces(q, end)
                        if q + 1 < end and q[0] == b'k' and q[1] == b'B':
                            if v > INT64_MAX // scale_kb:
                                break  # does not fit: stays UNKNOWN
                            v *= scale_kb
                        out[j] = v
                    break
        while p < end and p[0] != b'\n':
            p += 1
        p += 1
    return 0

cdef inline bint memcmp_(const char *a, const char *b, Py_ssize_t n) nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if a[i] != b[i]:
            return False
    return True

cdef int64_t parse_max_c(const char *buf, ssize_t n) nogil:
    """memory.max / memory.high: an integer or "max" (UNLIMITED)."""
    cdef int64_t v
    if n >= 3 and buf[0] == b'm' and buf[1] == b'a' and buf[2] == b'x':
        return C_UNLIMITED
    if parse_uint(buf, buf + n, &v) == NULL:
        return C_UNKNOWN
    return v

cdef const char *parse_centi(const char *p, const char *end, int64_t *out) nogil:
    """A PSI average like "12.34" into hundredths (1234)."""
    cdef int64_t whole = 0, frac = 0
    cdef int digits = 0
    p = parse_uint(p, end, &whole)
    if p == NULL:
        return NULL
    if p < end and p[0] == b'.':
        p += 1
        while p < end and b'0' <= p[0] <= b'9':
            if digits < 2:
                frac = frac * 10 + (p[0] - 48)
                digits += 1
            p += 1
    while digits < 2:
        frac *= 10
        digits += 1
    out[0] = whole * 100 + frac
    return p

cdef int parse_psi_c(const char *buf, ssize_t n, int64_t *out) nogil:
    """PSI: lines "some avg10=.. avg60=.. avg300=.. total=.." and "full ...".

    out[0..3] = some avg10, avg60, avg300 (hundredths), total us; out[4..7] = full.
    """
    cdef const char *end = buf + n
    cdef const char *p = buf
    cdef int base, k
    while p < end:
        if end - p >= 4 and memcmp_(p, b"some", 4):
            base = 0
        elif end - p >= 4 and memcmp_(p, b"full", 4):
            base = 4
        else:
            base = -1
        if base >= 0:
            p += 4
            for k in range(4):
                while p < end and p[0] != b'=' and p[0] != b'\n':
                    p += 1
                if p >= end or p[0] != b'=':
                    break
                p += 1
                if k < 3:
                    p = parse_centi(p, end, &out[base + k])
                else:
                    p = parse_uint(p, end, &out[base + k])
                if p == NULL:
                    return -1
        while p < end and p[0] != b'\n':
            p += 1
        p += 1
    return 0


cdef inline ssize_t pread_retry(int fd, char *buf, size_t size) nogil:
    cdef ssize_t n
    while True:
        n = pread(fd, buf, size, 0)
        if n >= 0 or errno != EINTR:
            return n


cdef object _pressure_from(int64_t *v):
    return Pressure(v[0] / 100.0, v[1] / 100.0, v[2] / 100.0, v[3],
                    v[4] / 100.0, v[5] / 100.0, v[6] / 100.0, v[7])


# ------------------------------------------------ Python-visible parse API
# Used by tests (hypothesis compares them with memwatchd.procfs) and by the
# rare non-hot paths.

def parse_statm(bytes data):
    """Return (vms_pages, rss_pages) from statm text; raise ValueError if malformed."""
    cdef int64_t vms, rss
    if parse_statm_c(data, len(data), &vms, &rss) != 0:
        raise ValueError("malformed statm")
    return vms, rss

def parse_stat_start_time(bytes data):
    """Return field 22 (starttime, clock ticks) of /proc/<pid>/stat; ValueError if malformed."""
    cdef int64_t v = parse_stat_start_time_c(data, len(data))
    if v < 0:
        raise ValueError("malformed stat")
    return v

def parse_keyed(bytes data, keys, int scale_kb=1024):
    """Return a list of values for keys (bytes), UNKNOWN where absent."""
    cdef list klist = [k if isinstance(k, bytes) else k.encode() for k in keys]
    cdef int64_t *out = <int64_t *>malloc(max(1, len(klist)) * sizeof(int64_t))
    try:
        for i in range(len(klist)):
            out[i] = _types.UNKNOWN
        parse_keyed_c(data, len(data), klist, out, scale_kb)
        return [out[i] for i in range(len(klist))]
    finally:
        free(out)

def parse_max(bytes data):
    """memory.max text -> bytes, UNLIMITED for "max", UNKNOWN if unparsable."""
    return parse_max_c(data, len(data))

def parse_psi(bytes data):
    """PSI text -> Pressure; ValueError if malformed."""
    cdef int64_t v[8]
    memset(v, 0, sizeof(v))
    if parse_psi_c(data, len(data), v) != 0:
        raise ValueError("malformed PSI")
    return _pressure_from(v)


# ------------------------------------------------------------ ProcessTable

cdef class ProcessTable:
    """A set of processes whose statm is sampled together.

    add(pid) opens /proc/<pid> once (a directory fd pins that very process, so
    statm and stat are read from the same one, never from a PID's successor)
    and returns a slot. sample() re-reads every live slot's statm with one
    pread each; rss(slot)/vms(slot)/status(slot) read the results. A process
    that exited, or a zombie (statm all zeros), turns GONE; its fd is closed.
    A statm of zeros is first checked off the hot path (memwatchd.threadgroup):
    if the main thread exited while others live, the slot reads a live thread's
    statm from then on; only a whole thread group that exited is GONE.

    The table also keeps the schedule of the slots handed to it (issue 18):
    schedule(slot, quiet_below, limit, ...) with a ceiling the policy computed,
    then sample_scheduled(now, ...) reads the scheduled slots that are due,
    gives each quiet one its next due time (headroom / fill rate, clamped, as
    policy.interval_for) and returns only the loud, failing or gone ones, so
    the caller touches no quiet target at all.
    """
    cdef int *fds
    cdef signed char *via_thread   # the slot reads /proc/<pid>/task/<tid>/statm
    cdef Py_ssize_t *pending       # slots whose statm read zeros this pass
    cdef Py_ssize_t npending
    cdef int64_t *rss_bytes
    cdef int64_t *vms_bytes
    cdef int64_t *start_times
    cdef int64_t *majflts          # majflt (stat field 12) when the slot was added
    cdef int64_t *pids
    cdef signed char *statuses
    cdef signed char *in_schedule  # the slot's schedule is kept here
    cdef int64_t *quiet_below      # its RSS ceiling (from the policy)
    cdef int64_t *limits           # what its headroom is counted to
    cdef double *due
    cdef double *sampled
    cdef double *intervals
    cdef Py_ssize_t capacity
    cdef Py_ssize_t used
    cdef list free_slots
    cdef bytes proc_root
    cdef char buf[BUFSIZE]

    def __cinit__(self, root="/", Py_ssize_t capacity=64):
        self.capacity = 0
        self.used = 0
        self.free_slots = []
        self.proc_root = os.fsencode(os.path.join(root, "proc"))
        self._grow(max(capacity, 1))

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.fds != NULL:
            for i in range(self.used):
                if self.fds[i] >= 0:
                    close(self.fds[i])
        free(self.fds); free(self.rss_bytes); free(self.vms_bytes)
        free(self.start_times); free(self.majflts); free(self.pids); free(self.statuses)
        free(self.via_thread); free(self.pending)
        free(self.in_schedule); free(self.quiet_below); free(self.limits)
        free(self.due); free(self.sampled); free(self.intervals)

    cdef _grow(self, Py_ssize_t newcap):
        self.via_thread = <signed char *>realloc(self.via_thread, newcap)
        self.pending = <Py_ssize_t *>realloc(self.pending, newcap * sizeof(Py_ssize_t))
        if self.via_thread == NULL or self.pending == NULL:
            raise MemoryError()
        self.in_schedule = <signed char *>realloc(self.in_schedule, newcap)
        self.quiet_below = <int64_t *>realloc(self.quiet_below, newcap * sizeof(int64_t))
        self.limits = <int64_t *>realloc(self.limits, newcap * sizeof(int64_t))
        self.due = <double *>realloc(self.due, newcap * sizeof(double))
        self.sampled = <double *>realloc(self.sampled, newcap * sizeof(double))
        self.intervals = <double *>realloc(self.intervals, newcap * sizeof(double))
        if (self.in_schedule == NULL or self.quiet_below == NULL or self.limits == NULL
                or self.due == NULL or self.sampled == NULL or self.intervals == NULL):
            raise MemoryError()
        self.fds = <int *>realloc(self.fds, newcap * sizeof(int))
        self.rss_bytes = <int64_t *>realloc(self.rss_bytes, newcap * sizeof(int64_t))
        self.vms_bytes = <int64_t *>realloc(self.vms_bytes, newcap * sizeof(int64_t))
        self.start_times = <int64_t *>realloc(self.start_times, newcap * sizeof(int64_t))
        self.majflts = <int64_t *>realloc(self.majflts, newcap * sizeof(int64_t))
        self.pids = <int64_t *>realloc(self.pids, newcap * sizeof(int64_t))
        self.statuses = <signed char *>realloc(self.statuses, newcap)
        if (self.fds == NULL or self.rss_bytes == NULL or self.vms_bytes == NULL
                or self.start_times == NULL or self.majflts == NULL or self.pids == NULL
                or self.statuses == NULL):
            raise MemoryError()
        self.capacity = newcap

    def add(self, int pid):
        """Open pid's statm; return its slot. Raises TargetGone / AccessDenied."""
        cdef bytes path = self.proc_root + b"/" + str(pid).encode()
        cdef int dirfd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        cdef int fd, statfd, err
        cdef ssize_t n
        cdef int64_t start, majflt
        if dirfd < 0:
            _types.raise_for_status(status_of(errno), f"process {pid}")
        try:
            statfd = openat(dirfd, b"stat", O_RDONLY | O_CLOEXEC)
            if statfd < 0:
                _types.raise_for_status(status_of(errno), f"process {pid}")
            n = pread_retry(statfd, self.buf, BUFSIZE)
            err = errno
            close(statfd)
            if n < 0:
                _types.raise_for_status(status_of(err), f"process {pid}")
            start = parse_stat_start_time_c(self.buf, n)
            majflt = parse_stat_field_c(self.buf, n, 12)
            if start < 0:
                raise _types.TargetGone(f"process {pid}: unreadable stat")
            fd = openat(dirfd, b"statm", O_RDONLY | O_CLOEXEC)
            if fd < 0:
                _types.raise_for_status(status_of(errno), f"process {pid}")
        finally:
            close(dirfd)
        cdef Py_ssize_t slot
        if self.free_slots:
            slot = self.free_slots.pop()
        else:
            if self.used == self.capacity:
                self._grow(self.capacity * 2)
            slot = self.used
            self.used += 1
        self.fds[slot] = fd
        self.pids[slot] = pid
        self.start_times[slot] = start
        self.majflts[slot] = majflt
        self.rss_bytes[slot] = 0
        self.vms_bytes[slot] = 0
        self.statuses[slot] = _types.OK
        self.via_thread[slot] = 0
        self.in_schedule[slot] = 0
        return slot

    def remove(self, Py_ssize_t slot):
        """Forget a slot (closing its fd); the slot number may be reused by add()."""
        self._check(slot)
        if self.fds[slot] >= 0:
            close(self.fds[slot])
        self.fds[slot] = -1
        self.statuses[slot] = _types.GONE
        self.pids[slot] = 0
        self.in_schedule[slot] = 0
        self.free_slots.append(slot)

    cdef inline bint _sample_one(self, Py_ssize_t i) noexcept nogil:
        """pread + parse one slot; True if it is still live. A read of zeros (or a
        failing thread fd) queues the slot in pending for _rehome, outside nogil."""
        cdef ssize_t n
        cdef int64_t vms, rss
        cdef int fd = self.fds[i]
        if fd < 0:
            return False
        n = pread_retry(fd, self.buf, BUFSIZE)
        if n < 0:
            self.statuses[i] = status_of(errno)
            if self.statuses[i] == S_GONE:
                if self.via_thread[i] and self.npending < self.capacity:
                    self.pending[self.npending] = i  # that thread exited: another may live
                    self.npending += 1
                    return False
                close(fd)
                self.fds[i] = -1
            return False
        if parse_statm_c(self.buf, n, &vms, &rss) != 0 or (vms == 0 and rss == 0):
            # A zombie reads all zeros, and so does a live process whose main thread exited.
            self.statuses[i] = S_GONE
            self.rss_bytes[i] = 0
            if self.npending < self.capacity:
                self.pending[self.npending] = i
                self.npending += 1
            else:
                close(fd)
                self.fds[i] = -1
            return False
        self.rss_bytes[i] = rss * PAGE_SIZE
        self.vms_bytes[i] = vms * PAGE_SIZE
        self.statuses[i] = S_OK
        return True

    cdef Py_ssize_t _rehome_pending(self):
        """Settle the slots that read zeros: a live thread's statm, or GONE. Returns the
        number that turned out live."""
        cdef Py_ssize_t k, i, live = 0
        cdef Py_ssize_t count = self.npending
        self.npending = 0
        for k in range(count):
            i = self.pending[k]
            found = open_live_statm(os.fsdecode(self.proc_root), self.pids[i], self.start_times[i])
            close(self.fds[i])
            if found is None:
                self.fds[i] = -1
                self.statuses[i] = S_GONE
                continue
            self.fds[i], vms, rss = found
            self.via_thread[i] = 1
            self.rss_bytes[i] = rss * PAGE_SIZE
            self.vms_bytes[i] = vms * PAGE_SIZE
            self.statuses[i] = S_OK
            live += 1
        return live

    def sample(self):
        """Re-read every live slot; return how many are still live."""
        cdef Py_ssize_t i, live = 0
        with nogil:
            for i in range(self.used):
                if self._sample_one(i):
                    live += 1
        if self.npending:
            live += self._rehome_pending()
        return live

    def sample_slots(self, slots):
        """Re-read only these slots (the ones due); return how many are still live."""
        cdef Py_ssize_t i, k, n = len(slots), live = 0
        cdef Py_ssize_t *idx = <Py_ssize_t *>malloc(max(n, 1) * sizeof(Py_ssize_t))
        if idx == NULL:
            raise MemoryError()
        try:
            for k in range(n):
                i = slots[k]
                self._check(i)
                idx[k] = i
            with nogil:
                for k in range(n):
                    if self._sample_one(idx[k]):
                        live += 1
        finally:
            free(idx)
        if self.npending:
            live += self._rehome_pending()
        return live

    cdef inline _check(self, Py_ssize_t slot):
        if slot < 0 or slot >= self.used:
            raise IndexError(slot)

    # -------------------------------------------------- the table's own schedule

    def schedule(self, Py_ssize_t slot, int64_t quiet_below, int64_t limit, double sampled_at,
                 double due_at, double interval):
        """Keep this slot's schedule here: sample_scheduled reads it when due and hands
        it back only once it is loud (RSS at or above quiet_below), not OK or gone."""
        self._check(slot)
        self.in_schedule[slot] = 1
        self.quiet_below[slot] = quiet_below
        self.limits[slot] = limit
        self.sampled[slot] = sampled_at
        self.due[slot] = due_at
        self.intervals[slot] = interval

    def unschedule(self, Py_ssize_t slot):
        """The caller schedules this slot again."""
        self._check(slot)
        self.in_schedule[slot] = 0

    def sample_scheduled(self, double now, int64_t fill_rate, double min_interval,
                         double max_interval):
        """Read every scheduled slot due by now. A quiet one is given its next due time
        (headroom to its limit over fill_rate, clamped, as policy.interval_for); the
        others leave the schedule and are returned, in slot order."""
        cdef Py_ssize_t i
        cdef int64_t room
        cdef double every
        cdef list loud = []
        if fill_rate <= 0:
            raise ValueError("fill_rate must be positive")
        with nogil:
            for i in range(self.used):
                if self.in_schedule[i] and self.due[i] <= now:
                    self._sample_one(i)
        if self.npending:   # read zeros: a live thread's statm, or GONE
            self._rehome_pending()
        for i in range(self.used):
            if not self.in_schedule[i] or self.due[i] > now:
                continue
            if self.statuses[i] != S_OK or self.rss_bytes[i] >= self.quiet_below[i]:
                self.in_schedule[i] = 0
                loud.append(i)
                continue
            room = self.limits[i] - self.rss_bytes[i]
            if room <= 0:
                every = min_interval
            else:
                every = max(min_interval, min(max_interval, <double>room / <double>fill_rate))
            self.sampled[i] = now
            self.intervals[i] = every
            self.due[i] = now + every
        return loud

    def scheduled(self, Py_ssize_t slot):
        self._check(slot)
        return bool(self.in_schedule[slot])

    def due_at(self, Py_ssize_t slot):
        self._check(slot)
        return self.due[slot]

    def set_due(self, Py_ssize_t slot, double due_at):
        self._check(slot)
        self.due[slot] = due_at

    def sampled_at(self, Py_ssize_t slot):
        self._check(slot)
        return self.sampled[slot]

    def interval(self, Py_ssize_t slot):
        self._check(slot)
        return self.intervals[slot]

    def next_due(self):
        """The earliest due time of the scheduled slots (inf when none)."""
        cdef Py_ssize_t i
        cdef double best = float("inf")
        for i in range(self.used):
            if self.in_schedule[i] and self.due[i] < best:
                best = self.due[i]
        return best

    def rss(self, Py_ssize_t slot):
        self._check(slot)
        return self.rss_bytes[slot]

    def vms(self, Py_ssize_t slot):
        self._check(slot)
        return self.vms_bytes[slot]

    def status(self, Py_ssize_t slot):
        self._check(slot)
        return self.statuses[slot]

    def pid(self, Py_ssize_t slot):
        self._check(slot)
        return self.pids[slot]

    def start_time(self, Py_ssize_t slot):
        self._check(slot)
        return self.start_times[slot]

    def major_faults(self, Py_ssize_t slot):
        """Its major page faults (stat field 12) when the slot was added; -1 unreadable."""
        self._check(slot)
        return self.majflts[slot]

    def __len__(self):
        return self.used - len(self.free_slots)


# ------------------------------------------------------------- CgroupTable

CGROUP_FILES = ("memory.current", "memory.max", "memory.high", "memory.swap.current",
                "memory.events", "memory.stat", "memory.pressure")
cdef enum:
    NFILES = 7
    F_CURRENT = 0
    F_MAX = 1
    F_HIGH = 2
    F_SWAP = 3
    F_EVENTS = 4
    F_STAT = 5
    F_PRESSURE = 6
    # values per slot: current, max, high, swap, 5 events, 4 stat keys, 8 psi, has_psi
    NVALUES = 22
    V_EVENTS = 4
    V_STAT = 9
    V_PSI = 13
    V_HAS_PSI = 21
EVENT_KEYS = [b"high", b"max", b"oom", b"oom_kill", b"oom_group_kill"]
STAT_KEYS = [b"anon", b"file", b"inactive_file", b"shmem"]


cdef inline void _forget_file(int64_t *v, int k) noexcept nogil:
    """The values an unreadable optional file k would have given: UNKNOWN (no PSI)."""
    cdef int j
    if k == F_MAX:
        v[1] = C_UNKNOWN
    elif k == F_HIGH:
        v[2] = C_UNKNOWN
    elif k == F_SWAP:
        v[3] = C_UNKNOWN
    elif k == F_EVENTS:
        for j in range(5):
            v[V_EVENTS + j] = C_UNKNOWN
    elif k == F_STAT:
        for j in range(4):
            v[V_STAT + j] = C_UNKNOWN
    elif k == F_PRESSURE:
        v[V_HAS_PSI] = 0


cdef class CgroupTable:
    """A set of cgroup v2 directories whose memory files are sampled together.

    add(path) opens the directory (kept: dirfd(slot)), memory.current (required;
    its absence means the cgroup is gone or has no memory controller) and
    whichever optional files exist.
    A removed cgroup's memory.current fails with ENODEV/ENOENT, which turns the
    slot GONE; an optional file that fails to read only reads as UNKNOWN.
    """
    cdef int *fds            # capacity * NFILES
    cdef int *dirfds         # the cgroup directory itself, held from selection to action
    cdef int64_t *values     # capacity * NVALUES
    cdef signed char *statuses
    cdef Py_ssize_t capacity
    cdef Py_ssize_t used
    cdef list free_slots
    cdef list paths
    cdef list event_keys
    cdef list stat_keys
    cdef char buf[BUFSIZE]

    def __cinit__(self, Py_ssize_t capacity=8):
        self.capacity = 0
        self.used = 0
        self.free_slots = []
        self.paths = []
        self.event_keys = EVENT_KEYS
        self.stat_keys = STAT_KEYS
        self._grow(max(capacity, 1))

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.fds != NULL:
            for i in range(self.used * NFILES):
                if self.fds[i] >= 0:
                    close(self.fds[i])
            for i in range(self.used):
                if self.dirfds[i] >= 0:
                    close(self.dirfds[i])
        free(self.fds); free(self.dirfds); free(self.values); free(self.statuses)

    cdef _grow(self, Py_ssize_t newcap):
        self.fds = <int *>realloc(self.fds, newcap * NFILES * sizeof(int))
        self.dirfds = <int *>realloc(self.dirfds, newcap * sizeof(int))
        self.values = <int64_t *>realloc(self.values, newcap * NVALUES * sizeof(int64_t))
        self.statuses = <signed char *>realloc(self.statuses, newcap)
        if self.fds == NULL or self.dirfds == NULL or self.values == NULL or self.statuses == NULL:
            raise MemoryError()
        self.capacity = newcap

    def add(self, path):
        """Open the memory files of a cgroup directory; return its slot."""
        cdef bytes bpath = os.fsencode(path)
        cdef int dirfd = open(bpath, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        cdef int k, fd
        cdef int opened[NFILES]
        if dirfd < 0:
            _types.raise_for_status(status_of(errno), f"cgroup {path}")
        for k in range(NFILES):
            opened[k] = openat(dirfd, os.fsencode(CGROUP_FILES[k]), O_RDONLY | O_CLOEXEC)
            if opened[k] < 0 and k == F_CURRENT:   # the first one: nothing else to close
                err = errno
                close(dirfd)
                _types.raise_for_status(status_of(err), f"cgroup {path}: memory.current")
        cdef Py_ssize_t slot
        if self.free_slots:
            slot = self.free_slots.pop()
            self.paths[slot] = path
        else:
            if self.used == self.capacity:
                self._grow(self.capacity * 2)
            slot = self.used
            self.used += 1
            self.paths.append(path)
        for k in range(NFILES):
            self.fds[slot * NFILES + k] = opened[k]
        self.dirfds[slot] = dirfd
        for k in range(NVALUES):
            self.values[slot * NVALUES + k] = _types.UNKNOWN
        self.statuses[slot] = _types.OK
        return slot

    cdef _close_slot(self, Py_ssize_t slot):
        cdef int k
        if self.dirfds[slot] >= 0:
            close(self.dirfds[slot])
            self.dirfds[slot] = -1
        for k in range(NFILES):
            if self.fds[slot * NFILES + k] >= 0:
                close(self.fds[slot * NFILES + k])
                self.fds[slot * NFILES + k] = -1

    def remove(self, Py_ssize_t slot):
        self._check(slot)
        self._close_slot(slot)
        self.statuses[slot] = _types.GONE
        self.paths[slot] = None
        self.free_slots.append(slot)

    def sample(self):
        """Re-read every live cgroup; return how many are still live."""
        cdef Py_ssize_t i, live = 0
        for i in range(self.used):
            if self._sample_one(i):
                live += 1
        return live

    def sample_slots(self, slots):
        """Re-read only these slots (the ones due); return how many are still live."""
        cdef Py_ssize_t live = 0
        slots = list(slots)
        for i in slots:  # all checked before any is read, as in ProcessTable
            self._check(i)
        for i in slots:
            if self._sample_one(i):
                live += 1
        return live

    cdef bint _sample_one(self, Py_ssize_t i):
        """pread + parse every memory file of one slot; True if it is still live."""
        cdef int k, fd, st
        cdef ssize_t n
        cdef int64_t *v
        if self.fds[i * NFILES + F_CURRENT] < 0:
            return False
        v = self.values + i * NVALUES
        st = S_OK
        for k in range(NFILES):
            fd = self.fds[i * NFILES + k]
            if fd < 0:
                continue
            n = pread_retry(fd, self.buf, BUFSIZE - 1)
            if n < 0:
                if k == F_CURRENT:  # only memory.current decides that a cgroup is gone
                    st = status_of(errno)
                    break
                _forget_file(v, k)  # an optional file failing (ENODEV after
                continue            # cgroup.pressure=0, EACCES, ...) is just unknown
            if k == F_CURRENT:
                v[0] = parse_max_c(self.buf, n)
            elif k == F_MAX:
                v[1] = parse_max_c(self.buf, n)
            elif k == F_HIGH:
                v[2] = parse_max_c(self.buf, n)
            elif k == F_SWAP:
                v[3] = parse_max_c(self.buf, n)
            elif k == F_EVENTS:
                parse_keyed_c(self.buf, n, self.event_keys, v + V_EVENTS, 1)
            elif k == F_STAT:
                parse_keyed_c(self.buf, n, self.stat_keys, v + V_STAT, 1)
            else:
                memset(v + V_PSI, 0, 8 * sizeof(int64_t))
                v[V_HAS_PSI] = 1 if parse_psi_c(self.buf, n, v + V_PSI) == 0 else 0
        self.statuses[i] = st
        if st == S_GONE:
            self._close_slot(i)
        return st == S_OK

    cdef inline _check(self, Py_ssize_t slot):
        if slot < 0 or slot >= self.used:
            raise IndexError(slot)

    def status(self, Py_ssize_t slot):
        self._check(slot)
        return self.statuses[slot]

    def current(self, Py_ssize_t slot):
        """memory.current of the last sample (the cheap field the loop needs every tick)."""
        self._check(slot)
        return self.values[slot * NVALUES]

    def path(self, Py_ssize_t slot):
        self._check(slot)
        return self.paths[slot]

    def dirfd(self, Py_ssize_t slot):
        """The cgroup directory opened by add() (-1 once GONE or removed): actions open
        cgroup.kill/cgroup.procs relative to it, so a cgroup removed and re-created at
        the same path is never mistaken for the one that was selected."""
        self._check(slot)
        return self.dirfds[slot]

    def get(self, Py_ssize_t slot):
        """The last sample of a slot as a CgroupSample."""
        self._check(slot)
        cdef int64_t *v = self.values + slot * NVALUES
        return CgroupSample(
            current=v[0], max=v[1], high=v[2], swap_current=v[3],
            events_high=v[4], events_max=v[5], events_oom=v[6], events_oom_kill=v[7],
            events_oom_group_kill=v[8], anon=v[9], file=v[10], inactive_file=v[11],
            shmem=v[12], pressure=_pressure_from(v + V_PSI) if v[V_HAS_PSI] == 1 else None)

    def __len__(self):
        return self.used - len(self.free_slots)


# -------------------------------------------------------------- HostReader

MEMINFO_KEYS = [b"MemTotal", b"MemAvailable", b"SwapTotal", b"SwapFree", b"SwapCached"]
# pages brought back in: from swap, and file pages evicted recently (workingset_refault
# before Linux 5.9 split it into _anon and _file; anon refaults are swap-ins anyway)
VMSTAT_KEYS = [b"pswpin", b"workingset_refault_file", b"workingset_refault", b"pgmajfault"]
DEF VMSTAT_BUFSIZE = 16384


cdef class HostReader:
    """/proc/meminfo and /proc/pressure/memory, kept open and re-read; /proc/vmstat's
    refault counters and /proc/pressure/io too while MemAvailable is under
    ``refaults_below`` bytes."""
    cdef int meminfo_fd
    cdef int psi_fd
    cdef int vmstat_fd
    cdef int io_psi_fd
    cdef list keys
    cdef char buf[BUFSIZE]
    cdef public int64_t refaults_below

    def __cinit__(self, root="/"):
        self.meminfo_fd = -1
        self.psi_fd = -1
        self.vmstat_fd = -1
        self.io_psi_fd = -1
        self.refaults_below = -1
        self.keys = MEMINFO_KEYS
        proc = os.path.join(root, "proc")
        self.meminfo_fd = open(os.fsencode(os.path.join(proc, "meminfo")), O_RDONLY | O_CLOEXEC)
        if self.meminfo_fd < 0:
            raise OSError(errno, os.strerror(errno), os.path.join(proc, "meminfo"))
        self.psi_fd = open(os.fsencode(os.path.join(proc, "pressure", "memory")), O_RDONLY | O_CLOEXEC)
        self.vmstat_fd = open(os.fsencode(os.path.join(proc, "vmstat")), O_RDONLY | O_CLOEXEC)
        self.io_psi_fd = open(os.fsencode(os.path.join(proc, "pressure", "io")), O_RDONLY | O_CLOEXEC)

    def __dealloc__(self):
        if self.meminfo_fd >= 0:
            close(self.meminfo_fd)
        if self.psi_fd >= 0:
            close(self.psi_fd)
        if self.vmstat_fd >= 0:
            close(self.vmstat_fd)
        if self.io_psi_fd >= 0:
            close(self.io_psi_fd)

    cdef object _refaults(self):
        """(bytes refaulted since boot: pswpin + file refaults, major faults since boot or
        None), or (None, None) if unreadable."""
        cdef char vbuf[VMSTAT_BUFSIZE]
        cdef int64_t v[4]
        cdef ssize_t n = pread_retry(self.vmstat_fd, vbuf, VMSTAT_BUFSIZE - 1)
        if n <= 0:
            return None, None
        v[0] = v[1] = v[2] = v[3] = _types.UNKNOWN
        parse_keyed_c(vbuf, n, VMSTAT_KEYS, v, 1)
        if v[0] < 0 or (v[1] < 0 and v[2] < 0):
            return None, None
        return (v[0] + (v[1] if v[1] >= 0 else v[2])) * PAGE_SIZE, (v[3] if v[3] >= 0 else None)

    cdef object _io_full_us(self):
        """/proc/pressure/io's "full" total in µs, or None (no file, unreadable, malformed)."""
        cdef int64_t psi[8]
        cdef ssize_t n = pread_retry(self.io_psi_fd, self.buf, BUFSIZE - 1)
        memset(psi, 0, sizeof(psi))
        if n < 0 or parse_psi_c(self.buf, n, psi) != 0:
            return None
        return psi[7]

    @property
    def has_psi(self):
        return self.psi_fd >= 0

    def read(self):
        """Return a HostSample (pressure None where PSI is unavailable)."""
        cdef int64_t mem[5]
        cdef int64_t psi[8]
        cdef ssize_t n
        cdef int k
        for k in range(5):
            mem[k] = _types.UNKNOWN
        n = pread_retry(self.meminfo_fd, self.buf, BUFSIZE - 1)
        if n < 0:
            raise OSError(errno, os.strerror(errno), "meminfo")
        parse_keyed_c(self.buf, n, self.keys, mem, 1024)
        pressure = None
        if self.psi_fd >= 0:
            n = pread_retry(self.psi_fd, self.buf, BUFSIZE - 1)
            memset(psi, 0, sizeof(psi))
            if n >= 0 and parse_psi_c(self.buf, n, psi) == 0:
                pressure = _pressure_from(psi)
        refaults = major_faults = io_full = None
        if self.vmstat_fd >= 0 and 0 <= mem[1] < self.refaults_below:
            refaults, major_faults = self._refaults()
            if self.io_psi_fd >= 0:
                io_full = self._io_full_us()
        return HostSample(mem[0], mem[1], mem[2], mem[3], pressure, refaults, major_faults, io_full,
                          mem[4] if mem[4] >= 0 else None)


cdef inline double monotonic_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int64_t mem_available_c(const char *buf, ssize_t n) noexcept nogil:
    """MemAvailable in bytes from /proc/meminfo's text; -1 if it is not there."""
    cdef const char *key = b"MemAvailable:"
    cdef const char *p = buf
    cdef const char *end = buf + n
    cdef int64_t v
    while p + 13 <= end:
        if memcmp_(p, key, 13):
            p = parse_uint(skip_spaces(p + 13, end), end, &v)
            return v * 1024 if p != NULL else -1
        while p < end and p[0] != 10:   # the next line
            p += 1
        p += 1
    return -1


def wait_quiet(HostReader host, fds, double timeout, double step, int64_t low, int64_t high,
               int ping_fd=-1, double ping_every=0.0, double ping_in=0.0,
               ProcessTable table=None, slots=(), ceilings=(), double target_step=0.0,
               steps=()):
    """The idle loop's wait, in C: poll fds (a list of (fd, events)) for up to timeout
    seconds, and every step seconds re-read MemAvailable (one pread of the HostReader's
    meminfo) without returning to Python while it stays within [low, high]; with a
    ping_fd (the connected NOTIFY_SOCKET), send WATCHDOG=1 every ping_every seconds,
    the first ping_in from now. A wake-up that needs nothing else costs a few syscalls
    instead of a Python tick (issue 18). With a table, its slots are sampled every
    target_step seconds the same way (sample_slots) and the wait ends (why 4) once a
    slot's RSS reaches its ceiling (ceilings[k] for slots[k]) or a slot is no longer live;
    with steps, slots[k] is sampled every steps[k] seconds instead (each on its own
    schedule: a slot far from its limit is not read as often as the closest one).
    One wake-up does every look that is due within half the shortest period (merged:
    a look or ping done a little early, never late), so the host look and the pings
    ride on the targets' wake-ups instead of adding their own; and when it samples, it
    samples every slot due before the fastest slot's next look (no wake-up of their own).
    Returns (why, ready, pings, mem_available, ping_ago, wakes): why 0 timeout, 1 an
    fd is ready (ready: its [(fd, revents)]), 2 MemAvailable left the band (or could
    not be read), 3 a ping could not be sent (the caller's notifier takes over), 4 a
    target needs a look; pings: how many were sent; mem_available: the last read (-1:
    none); ping_ago: seconds since the last ping sent here (0.0 if none); wakes: how
    many times the wait woke up by itself (its whole cost, besides the syscalls).
    """
    cdef Py_ssize_t n = len(fds), k
    cdef pollfd *pfds = <pollfd *>malloc(max(n, 1) * sizeof(pollfd))
    cdef int why = 0, rc, pings = 0, wait_ms, wakes = 0
    cdef double now, soon, slack, deadline, next_look, next_ping, until, pinged_at = 0.0
    cdef int64_t avail = -1
    cdef ssize_t got
    cdef int meminfo_fd = host.meminfo_fd
    cdef char *buf = host.buf
    cdef const char *ping = b"WATCHDOG=1"
    cdef Py_ssize_t nslots = len(slots) if table is not None else 0, j
    cdef Py_ssize_t *idx = <Py_ssize_t *>malloc(max(nslots, 1) * sizeof(Py_ssize_t))
    cdef int64_t *ceil = <int64_t *>malloc(max(nslots, 1) * sizeof(int64_t))
    cdef double *every = <double *>malloc(max(nslots, 1) * sizeof(double))
    cdef double *due = <double *>malloc(max(nslots, 1) * sizeof(double))
    cdef double next_sample, fastest = target_step
    if pfds == NULL or idx == NULL or ceil == NULL or every == NULL or due == NULL:
        free(pfds); free(idx); free(ceil); free(every); free(due)
        raise MemoryError()
    try:
        if len(steps) and len(steps) != nslots:
            raise ValueError("steps: one per slot")
        for j in range(nslots):
            idx[j] = slots[j]
            table._check(idx[j])
            ceil[j] = ceilings[j]
            every[j] = steps[j] if len(steps) else target_step
            if j == 0 or every[j] < fastest:
                fastest = every[j]
        for k in range(n):
            pfds[k].fd = fds[k][0]
            pfds[k].events = fds[k][1]
            pfds[k].revents = 0
        slack = step      # half the shortest period: how early a merged look may be
        if nslots > 0 and fastest < slack:
            slack = fastest
        if ping_fd >= 0 and ping_every < slack:
            slack = ping_every
        slack = slack / 2.0
        with nogil:
            now = monotonic_now()
            deadline = now + timeout
            next_look = now + step
            next_ping = now + ping_in if ping_fd >= 0 else deadline + 1.0
            next_sample = deadline + 1.0
            for j in range(nslots):
                due[j] = now + every[j]
                if due[j] < next_sample:
                    next_sample = due[j]
            while True:
                until = deadline
                if next_look < until:
                    until = next_look
                if next_ping < until:
                    until = next_ping
                if next_sample < until:
                    until = next_sample
                wait_ms = <int>((until - now) * 1000.0 + 0.999)
                rc = poll(pfds, n, wait_ms if wait_ms > 0 else 0)
                if rc > 0:
                    why = 1
                    break
                if rc < 0 and errno != EINTR:
                    why = 1    # let Python's poll see what is wrong
                    break
                wakes += 1
                now = monotonic_now()
                soon = now + slack if now < deadline else now   # returning: Python pings next
                if next_ping <= soon:
                    if send(ping_fd, ping, 10, MSG_DONTWAIT | MSG_NOSIGNAL) != 10:
                        why = 3
                        break
                    pings += 1
                    pinged_at = now
                    next_ping = now + ping_every
                if now >= deadline:
                    break
                if next_look <= soon:
                    got = pread_retry(meminfo_fd, buf, BUFSIZE - 1)
                    avail = mem_available_c(buf, got) if got > 0 else -1
                    if avail < low or avail > high:
                        why = 2
                        break
                    next_look = now + step
                if next_sample <= soon:
                    next_sample = deadline + 1.0
                    for j in range(nslots):
                        if due[j] < now + fastest:   # due before the next such wake-up
                            if not table._sample_one(idx[j]) or table.rss_bytes[idx[j]] >= ceil[j]:
                                why = 4
                            due[j] = now + every[j]
                        if due[j] < next_sample:
                            next_sample = due[j]
                    if why == 4:
                        break
        if table is not None and table.npending:
            table._rehome_pending()   # slots that read zeros: a live thread, or GONE
        ready = [(pfds[k].fd, pfds[k].revents) for k in range(n) if pfds[k].revents] if why == 1 else []
        return (why, ready, pings, avail, (monotonic_now() - pinged_at) if pings else 0.0,
                wakes)
    finally:
        free(pfds); free(idx); free(ceil); free(every); free(due)


# ------------------------------------------------ syscalls the stdlib lacks

def process_mrelease(int pidfd):
    """Reap a dying process's memory now (Linux 5.15+). Raises OSError (EINVAL on a live one)."""
    cdef long r
    with nogil:
        r = syscall(SYS_PROCESS_MRELEASE, pidfd, 0)
    if r != 0:
        raise OSError(errno, os.strerror(errno))

def mlockall_onfault():
    """mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT): keep the killer resident under pressure.

    malloc_trim(0) first hands the heap that start-up freed back to the kernel, so
    what stays locked is what the daemon uses (about 0.5 MiB less resident).
    """
    malloc_trim(0)
    if mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT_FLAG) != 0:
        raise OSError(errno, os.strerror(errno))

def set_io_flusher():
    """prctl(PR_SET_IO_FLUSHER): this process's allocations never do I/O in reclaim
    (Linux 5.6+, CAP_SYS_RESOURCE). Measured in the guest on a swap disk at 4 MiB/s:
    the daemon's open() of a /proc file needed a slab page, its direct reclaim wrote a
    swap page and waited in the block layer's writeback throttle behind that disk, and
    the loop stood still for 20-40 s. Raises OSError (EPERM, EINVAL before 5.6)."""
    if prctl(PR_SET_IO_FLUSHER_OPT, 1, 0, 0, 0) != 0:
        raise OSError(errno, os.strerror(errno))


IMPLEMENTATION = "c"
