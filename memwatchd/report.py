"""The report stage: log lines for the journal and the durable JSON record of every kill.

Process names and command lines are chosen by whoever we are about to kill, so
they pass through escape() before they reach a log line or a record: one call to
log() is always exactly one line, and a name like "x\\n<0>fake" cannot forge a
journal entry. The event log is written and fsync()ed before any signal is sent,
so a host that dies right after the kill still has the reason on disk.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import Any, Dict, Iterator, List, Optional, Sequence, TextIO, Union

__all__ = [
    "ERR", "WARNING", "NOTICE", "INFO", "DEBUG",
    "escape", "format_cmdline", "log", "set_stream", "set_level", "is_journal", "fatal_line",
    "EventLog", "Events", "read_events", "iter_events",
    "decision_record", "outcome_record", "host_fields", "format_time",
    "format_size", "format_duration", "count", "decision_text", "EVENT_FORMAT", "upgrade_record",
]

# ------------------------------------------------------------------ escaping

ESCAPE_MAX = 512
TRUNCATED = "...[truncated]"

# Characters that must never reach a log line or terminal raw: C0, DEL, C1 (0x80-0x9f,
# e.g. CSI), the Unicode line/paragraph separators and the bidi overrides/isolates
# (which can make a name read differently from what it is), lone surrogates, plus
# the backslash itself so that every escape sequence in the output was made by us
# (injective). A regex, not a str.translate table: the tables cost 0.4 MiB resident.
_UNSAFE = re.compile("[\x00-\x1f\\\\\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e"
                     "\u2066-\u2069\ud800-\udfff]")


def _code(ch: str, from_bytes: bool) -> str:
    """The escape for one unsafe character.

    \\xNN only below 0x80 and for invalid bytes: bytes input is decoded with
    surrogateescape, so undecodable byte 0xNN arrives as U+DCNN and shows as \\xNN,
    while a decoded C1 character (U+0080, b"\\xc2\\x80") shows as \\u0080.
    """
    cp = ord(ch)
    if cp == 0x5C:
        return "\\\\"
    if cp < 0x80:
        return f"\\x{cp:02x}"
    if from_bytes and 0xDC80 <= cp <= 0xDCFF:
        return f"\\x{cp - 0xDC00:02x}"
    return f"\\u{cp:04x}"


def escape(text: Union[str, bytes], max_len: int = ESCAPE_MAX) -> str:
    """A one-line, printable, JSON-safe rendering of an untrusted string, at most max_len chars.

    Control characters (C0 and DEL as \\xNN; C1, Unicode line separators, bidi
    controls and lone surrogates as \\uNNNN) are escaped; a backslash becomes two, so distinct
    inputs stay distinct (short ones: longer ones are cut and end in TRUNCATED).
    bytes are decoded as UTF-8 and each invalid byte rendered \\xNN (as
    backslashreplace would).
    """
    from_bytes = isinstance(text, (bytes, bytearray))
    if from_bytes:
        # Each input char yields >= 1 output char, so only the first max_len can show.
        text = bytes(text[:max_len * 4 + 4]).decode("utf-8", "surrogateescape")
    else:
        text = str(text)
    head = text[:max_len + 1]
    out = _UNSAFE.sub(lambda m: _code(m.group(), from_bytes), head)
    if len(out) <= max_len and len(head) == len(text):
        return out
    budget = max(0, max_len - len(TRUNCATED))
    pieces = []
    used = 0
    for ch in head:
        piece = _code(ch, from_bytes) if _UNSAFE.match(ch) else ch
        if used + len(piece) > budget:
            break
        pieces.append(piece)
        used += len(piece)
    return "".join(pieces) + TRUNCATED[:max_len]


def format_cmdline(raw: Union[bytes, str, Sequence[str]], max_len: int = ESCAPE_MAX) -> str:
    """A command line for humans, as ps shows it: arguments joined by spaces, then escape()d.

    raw is /proc/<pid>/cmdline (NUL-separated bytes), a string, or an argv list.
    """
    if isinstance(raw, (bytes, bytearray)):
        return escape(bytes(raw).rstrip(b"\0").replace(b"\0", b" "), max_len)
    if isinstance(raw, str):
        return escape(raw, max_len)
    return escape(" ".join(str(a) for a in raw), max_len)


# ------------------------------------------------------------------ log lines

ERR, WARNING, NOTICE, INFO, DEBUG = 3, 4, 5, 6, 7
_NAMES = {0: "emerg", 1: "alert", 2: "crit", ERR: "error", WARNING: "warning",
          NOTICE: "notice", INFO: "info", DEBUG: "debug"}
# Only line breaks and control characters: messages are already escaped where they
# carry untrusted data, and escaping backslashes again would garble them.
_LINE_TABLE = {cp: f"\\x{cp:02x}" for cp in [*range(0x20), 0x7F, 0x85]
               if cp != 0x09}
_LINE_TABLE.update({0x2028: "\\u2028", 0x2029: "\\u2029"})

_stream: Optional[TextIO] = None   # None: sys.stderr at call time
_plain: Optional[bool] = None      # None: decide from the stream / environment
_max_priority = INFO


def set_stream(stream: Optional[TextIO], plain: Optional[bool] = None) -> None:
    """Send log lines to stream (None: sys.stderr). plain=None decides as described in log()."""
    global _stream, _plain
    _stream = stream
    _plain = plain


def set_level(max_priority: int) -> None:
    """Drop messages less important than max_priority (default INFO; DEBUG shows all)."""
    global _max_priority
    _max_priority = int(max_priority)


def is_journal(stream: Optional[TextIO]) -> bool:
    """Is stream connected to the journal? systemd's documented rule (systemd.exec(5),
    $JOURNAL_STREAM): the variable holds "device:inode" of the journal stream, and a
    program may use the sd-daemon "<N>" prefixes only when its stderr is that very
    file. Anything else (a terminal, `| tee`, `2>>job.log`, cron mail, CI) gets words."""
    value = os.environ.get("JOURNAL_STREAM", "")
    if not value or stream is None:
        return False
    try:
        st = os.fstat(stream.fileno())
        dev, _, ino = value.partition(":")
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, ValueError, OSError):  # no fd (StringIO), closed, or a bad value
        return False


def _is_plain(stream: TextIO) -> bool:
    if _plain is not None:
        return _plain
    if os.environ.get("MEMWATCHD_LOG_PLAIN", "") not in ("", "0"):
        return True
    return not is_journal(stream)


def log(priority: int, message: str) -> None:
    """Write one line: "<N>message" for journald (sd-daemon(3) prefix), or "level: message".

    The "<N>" prefix is used only when the stream is the journal (is_journal(): the
    $JOURNAL_STREAM rule; journald turns it into PRIORITY=), otherwise the level is a
    word ("warning: ..."). MEMWATCHD_LOG_PLAIN=1 forces words. Newlines and control
    characters in message become \\xNN, so a call is exactly one line. Never raises:
    a lost stderr must not stop the daemon.
    """
    if priority > _max_priority:
        return
    stream = _stream if _stream is not None else sys.stderr
    if stream is None:
        return
    text = str(message).translate(_LINE_TABLE)
    if _is_plain(stream):
        line = f"{_NAMES.get(priority, str(priority))}: {text}\n"
    else:
        line = f"<{int(priority)}>{text}\n"
    try:
        stream.write(line)
        stream.flush()
    except (OSError, ValueError):
        pass


def fatal_line(message: str, stream: Optional[TextIO] = None) -> str:
    """How a fatal start-up error of `run` is printed: with the error priority ("<3>")
    when stderr is the journal, else "memwatchd: message" like every other command."""
    text = str(message).translate(_LINE_TABLE)
    if is_journal(sys.stderr if stream is None else stream):
        return f"<{ERR}>{text}"
    return f"memwatchd: {text}"


# ------------------------------------------------------------- how we print numbers
# One way everywhere (log lines, summaries, status, events): sizes 1024-based as the
# config reads them (B, KiB, MiB, GiB, TiB; three significant digits), durations in
# ms below a second and s above (min and h only past 2 min and 2 h).


def format_size(n: Optional[float]) -> str:
    """1536 -> "1.5 KiB", 766 * 2**20 -> "766 MiB", None -> "-"."""
    if n is None:
        return "-"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, mult in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= mult:
            value = n / mult
            text = f"{value:.1f}" if value < 100 else f"{value:.0f}"
            return f"{sign}{text.replace('.0', '') if text.endswith('.0') else text} {unit}"
    return f"{sign}{int(n)} B"


def format_duration(seconds: Optional[float]) -> str:
    """0.038 -> "38 ms", 2.9 -> "2.9 s", 300 -> "5 min", None -> "-"."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s".replace(".0 s", " s")
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h".replace(".0 h", " h")


def count(n: int, one: str, many: str = "") -> str:
    """count(1, "watch") -> "1 watch", count(3, "watch", "watches") -> "3 watches"."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


_GUARD_MEASURES = {
    "mem-available-critical": "MemAvailable {avail}{swap} is below the kill floor {kill}",
    "psi-full-high": "all tasks stalled on memory {psi_limit} or more of the last {window} "
                     "(full avg10 {psi}){refaults}, MemAvailable {avail}",
    "psi-full-critical": "all tasks stalled on memory {psi_kill} or more of the last {window} "
                         "(full avg10 {psi}), MemAvailable {avail}",
    "psi-some-high": "some task stalled on memory {psi_some} or more of the last {window} "
                     "(some avg10 {psi_s}){refaults}, MemAvailable {avail}",
    "psi-io-full-high": "all tasks waited for I/O {psi_io} or more of the last {window} while "
                        "evicted pages came back at {io_back}/s or more (a swap device too slow "
                        "for the swap-ins), MemAvailable {avail}",
    "grace-expired": "still running after the guard's grace; MemAvailable {avail}, floor {term}",
    "predicted-exhaustion": "MemAvailable {avail}{swap} is predicted to reach the floor {term} soon",
}


def decision_text(watch: str, usage: Optional[int], limit: Optional[int], reason: str,
                  warn: Optional[int] = None, host: Any = None, guard: Any = None) -> str:
    """What a decision's log line says was measured, after "<who>": the target's usage
    against its own limit (or warn level); for the host guard, what the guard measured
    (MemAvailable against its floor, or pressure) and the victim's size, so that a guard
    line never reads as if the process had a limit. Pure: replay can print the same."""
    if watch != "guard":
        if reason == "warn-level" and warn is not None:
            return (f"using {format_size(usage)}, above its warn level {format_size(warn)} "
                    f"(limit {format_size(limit)})")
        if reason == "predicted-exhaustion":
            return (f"using {format_size(usage)}, predicted to reach its limit "
                    f"{format_size(limit)} soon ({reason})")
        return f"using {format_size(usage)}, over its limit {format_size(limit)} ({reason})"
    avail = getattr(host, "mem_available", None)
    term = kill = limit
    if guard is not None and getattr(host, "mem_total", 0) > 0:
        term, kill = guard.thresholds(host.mem_total)
    pressure = getattr(host, "pressure", None)
    swap = ""
    if getattr(guard, "count_swap", False) and getattr(host, "swap_total", 0) > 0:
        swap = f" plus free swap (SwapFree {format_size(host.swap_free)}, zram at its worth)"
    measured = _GUARD_MEASURES.get(reason, "MemAvailable {avail}{swap} is below the floor {term}").format(
        avail=format_size(avail), term=format_size(term), kill=format_size(kill), swap=swap,
        psi="-" if pressure is None else f"{pressure.full_avg10:.1f}%",
        psi_s="-" if pressure is None else f"{pressure.some_avg10:.1f}%",
        psi_limit=f"{getattr(guard, 'psi_full', 0):g}%",
        psi_kill=f"{getattr(guard, 'psi_full_kill', 0):g}%",
        psi_some=f"{getattr(guard, 'psi_some', 0):g}%",
        psi_io=f"{getattr(guard, 'psi_io_full', 0):g}%",
        io_back=_io_back(guard),
        window=f"{getattr(guard, 'psi_window', 0):g} s",
        refaults=_refaults_text(guard, host))
    return f"at {format_size(usage)}, the largest it may stop: {measured} ({reason})"


def _io_back(guard) -> str:
    """The refault rate an I/O stall needs (policy.io_stalled)."""
    from memwatchd.policy import IO_REFAULTS
    return format_size(getattr(guard, "psi_refaults", 0) // IO_REFAULTS)


def _refaults_text(guard, host) -> str:
    """What the refault rule (policy.thrashing, policy.own_thrash) measured, if it did."""
    rate = getattr(guard, "psi_refaults", 0)
    if rate <= 0 or getattr(host, "refaults", None) is None:
        return ""
    own = ""
    if getattr(host, "major_faults", None) is not None:
        from memwatchd.policy import ANYONE_THRASH
        own = f" (its own among them, or {format_size(ANYONE_THRASH * rate)}/s in all)"
    return f" with evicted pages coming back at {format_size(rate)}/s or more{own}"


# ------------------------------------------------------------------ event log

def _makedirs_private(path: str) -> None:
    """Create every missing directory of path with mode 0700 (os.makedirs would use the umask)."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EventLog:
    """Append-only JSON Lines file of decisions and outcomes (path None: disabled, a no-op).

    Each append() is one os.write() of one whole line on an O_APPEND fd, then
    fsync(): the record is on disk when append() returns, and concurrent writers
    never interleave inside a line. Records are written as given: pass
    comm/cmdline through escape() (decision_record() does) - json.dumps with
    ensure_ascii=True keeps any string safe for JSON, escape() keeps it safe for
    the humans and tools reading it.

    Errors are not swallowed: append() raises OSError (ENOSPC, EIO, EROFS, ...)
    and the daemon decides whether to act without a record; nothing is logged here.
    If the file is renamed or deleted (log rotation) or its directory removed, the
    next append() recreates it. A torn last line (host died mid-write) is ended
    with a newline before the next record, so it spoils only itself.
    """

    def __init__(self, path: Optional[str]):
        self.path = None if path is None else os.fspath(path)
        self._fd = -1
        self._ino = None
        self._torn = False
        if self.path is not None:
            self._open()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _open(self) -> None:
        assert self.path is not None
        directory = os.path.dirname(os.path.abspath(self.path))
        _makedirs_private(directory)
        created = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            self._torn = False
            if st.st_size > 0:
                # The host may have died mid-write: is the last line complete?
                try:
                    rfd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        self._torn = os.pread(rfd, 1, st.st_size - 1) not in (b"\n", b"")
                    finally:
                        os.close(rfd)
                except OSError:
                    pass
            if created:
                _fsync_dir(directory)  # the new name itself must survive a crash
        except BaseException:
            os.close(fd)
            raise
        self._close_fd()
        self._fd = fd
        self._ino = (st.st_dev, st.st_ino)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = -1

    def _current(self) -> bool:
        """Is our fd still the file at self.path (not rotated away or deleted)?"""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._ino

    def append(self, record: Dict[str, Any]) -> None:
        """Write record as one JSON line and fsync it. Raises OSError (or TypeError/ValueError
        for a record json cannot encode) - never returns before the data is durable."""
        if self.path is None:
            return
        line = json.dumps(record, ensure_ascii=True, sort_keys=True,
                          separators=(",", ":"), allow_nan=False) + "\n"
        if self._fd < 0 or not self._current():
            self._open()
        data = (("\n" + line) if self._torn else line).encode("ascii")
        fd = self._fd
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):  # a regular file writes short only when the disk is full
                raise OSError(28, f"short write to {self.path} ({written} of {len(data)} bytes)")
        except OSError:
            try:
                os.ftruncate(fd, size)  # do not leave half a line behind
            except OSError:
                self._torn = True
            raise
        self._torn = False
        os.fsync(fd)

    def close(self) -> None:
        self._close_fd()

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Events(list):
    """The records read from an event log; .skipped counts lines that were not valid records."""

    skipped = 0


def iter_events(path: str, counter: Optional[List[int]] = None) -> Iterator[Dict[str, Any]]:
    """Yield the records of an event log, skipping torn or corrupt lines.

    counter, if given, is a one-item list incremented for each skipped line. A
    missing file yields nothing (no events yet).
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:  # includes UnicodeDecodeError
                record = None
            if isinstance(record, dict):
                yield record
            elif counter is not None:
                counter[0] += 1


def read_events(path: str) -> Events:
    """All records of an event log; the result's .skipped counts torn or corrupt lines."""
    counter = [0]
    events = Events(iter_events(path, counter))
    events.skipped = counter[0]
    return events


# ------------------------------------------------------------------ records

# Version of the event records (docs/formats.md). Records without "format" are version 1,
# whose host fields were "mem_available" and "mem_total"; upgrade_record() reads both.
EVENT_FORMAT = 2
_V1_HOST = {"mem_available": "mem_available_bytes", "mem_total": "mem_total_bytes"}


def upgrade_record(record: Dict[str, Any]) -> Dict[str, Any]:
    """An event record as the current format names its fields, whichever version wrote it
    (for `events`, the state file and replay: old files keep working)."""
    if record.get("format", 1) >= EVENT_FORMAT:
        return record
    record = dict(record, format=EVENT_FORMAT)
    host = record.get("host")
    if isinstance(host, dict):
        record["host"] = {_V1_HOST.get(k, k): v for k, v in host.items()}
    return record


def format_time(time_ns: int) -> str:
    """ISO 8601 UTC with milliseconds: 2024-05-01T12:00:00.123Z."""
    seconds, ns = divmod(int(time_ns), 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ns // 1_000_000:03d}Z"


def _signal_name(sig: Union[int, str, None]) -> Optional[str]:
    if sig is None or isinstance(sig, str):
        return sig
    import signal as _signal
    try:
        return _signal.Signals(int(sig)).name
    except ValueError:
        return str(int(sig))


def host_fields(sample: Any) -> Dict[str, Any]:
    """The host keywords of decision_record() from a types.HostSample."""
    pressure = getattr(sample, "pressure", None)
    return {
        "mem_available": sample.mem_available,
        "mem_total": sample.mem_total,
        "psi_some_avg10": None if pressure is None else pressure.some_avg10,
        "psi_full_avg10": None if pressure is None else pressure.full_avg10,
    }


def decision_record(*, target: str, pid: Optional[int], start_time: Optional[int],
                    comm: Union[str, bytes, None], cmdline: Union[str, bytes, Sequence[str], None],
                    cgroup: Optional[str], usage_bytes: Optional[int], limit_bytes: Optional[int],
                    reason: str, action: str, signal: Union[int, str, None], dry_run: bool,
                    mem_available: Optional[int] = None, mem_total: Optional[int] = None,
                    psi_some_avg10: Optional[float] = None, psi_full_avg10: Optional[float] = None,
                    time_ns: Optional[int] = None, event_id: Optional[str] = None) -> Dict[str, Any]:
    """The record written (and fsync'ed) before acting. Pass comm/cmdline/cgroup/target RAW:
    they are escaped here (cmdline may be /proc cmdline bytes or an argv list). signal is
    stored by name ("SIGKILL"), None for actions that send none (memory.high, freeze)."""
    now = time.time_ns() if time_ns is None else int(time_ns)
    return {
        "format": EVENT_FORMAT,
        "type": "decision",
        "id": event_id if event_id is not None else f"{now}-{pid if pid is not None else 0}",
        "time": format_time(now),
        "target": escape(target),
        "pid": pid,
        "start_time": start_time,
        "comm": None if comm is None else escape(comm),
        "cmdline": None if cmdline is None else format_cmdline(cmdline),
        "cgroup": None if cgroup is None else escape(cgroup),
        "usage_bytes": usage_bytes,
        "limit_bytes": limit_bytes,
        "reason": escape(reason),
        "action": action,
        "signal": _signal_name(signal),
        "dry_run": bool(dry_run),
        "host": {
            "mem_available_bytes": mem_available,
            "mem_total_bytes": mem_total,
            "psi_some_avg10": psi_some_avg10,
            "psi_full_avg10": psi_full_avg10,
        },
    }


def outcome_record(*, event_id: str, exited: bool, seconds_to_exit: Optional[float],
                   freed_bytes: Optional[int], escalated: bool, detail: str = "",
                   time_ns: Optional[int] = None) -> Dict[str, Any]:
    """What became of a decision (same id): did it exit, how fast, what it freed."""
    now = time.time_ns() if time_ns is None else int(time_ns)
    return {
        "format": EVENT_FORMAT,
        "type": "outcome",
        "id": event_id,
        "time": format_time(now),
        "exited": bool(exited),
        "seconds_to_exit": None if seconds_to_exit is None else round(float(seconds_to_exit), 6),
        "freed_bytes": freed_bytes,
        "escalated": bool(escalated),
        "detail": escape(detail),
    }
