"""Traces: what the policy consumed, written as it happens and read back for replay.

A trace is NDJSON, one compact JSON object per line (docs/trace.md lists every
field). The daemon writes one when ``[daemon] trace`` is set (a ring of segment
files in a directory, oldest dropped first, capped at ``trace_size``);
``memwatchd record`` writes one file. ``memwatchd replay`` and ``suggest`` read
them with ``read_trace``, which never raises on damage after the first header:
torn, garbled, reordered or orphaned lines are skipped and listed in ``damage``.

Why NDJSON: a torn write loses one line, not the file; ``jq``/``grep`` read it;
it is documented in a page. Its cost is kept down by what is written, not by
the encoding: a reading is written only when it moved by more than 1/256 of its
value, crossed a level the policy compares against, or while a policy timer runs
(``_held_will_do``), so an idle target costs nothing, and a row is a bare array.

This module is imported by the daemon only when tracing is on.
"""
from __future__ import annotations

import json
import os
import signal
import time
from collections import namedtuple
from json.scanner import make_scanner
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple

from memwatchd import __version__
from memwatchd.policy import WARN_REARM
from memwatchd.report import ERR, NOTICE, count, log
from memwatchd.types import MemwatchdError

FORMAT = 5                     # 5: SwapCached in h; 4: the I/O stall total in h; 3: PSI
                               # totals, fault counters, swap size and zram in h, faults and
                               # owner in c; 2: the compact line; 1-4 read too
DEFAULT_SIZE = 64 * 2**20      # the ring's cap, [daemon] trace_size
SEGMENTS = 8                   # the ring is this many segment files: dropping one frees 1/8
MIN_SEGMENT = 64 * 1024
CLOCK_EVERY = 300.0            # a wall-clock line at most this often (wall = w + (m - m0))
NEAR_FLOOR = 4                 # within this multiple of the guard's floor, every host sample is written
CMDLINE_MAX = 1024             # cmdlines are attacker-sized: cut in the trace
SEGMENT_PREFIX = "trace-"
SEGMENT_SUFFIX = ".ndjson"

_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False, ensure_ascii=True).encode
_decode = json.JSONDecoder().decode


class TraceError(MemwatchdError):
    """A trace that cannot be read at all (no header, a newer format): names the file."""


# ------------------------------------------------------------------ config

def _seconds(x: float) -> str:
    return f"{x!r}s"


def config_dict(config) -> dict:
    """The config as TOML-shaped data that config.parse_config accepts again (the header
    keeps it so a trace replays with its own config). on_action is left out: replay never runs it."""
    d, g, p = config.daemon, config.guard, config.protect
    watches = []
    for w in config.watches:
        item = {"name": w.name, w.kind: w.selector, "limit": str(w.limit),
                "sustain": _seconds(w.sustain), "action": w.action,
                "scope": w.scope, "usage": w.usage}
        if w.action == "term":           # the only action with a grace (config refuses others)
            item["grace"] = _seconds(w.grace)
        if w.warn is not None:
            item["warn"] = str(w.warn)
        if w.predict > 0:
            item["predict"] = _seconds(w.predict)
        watches.append(item)
    return {
        "daemon": {"interval": _seconds(d.interval), "min_interval": _seconds(d.min_interval),
                   "fill_rate": f"{d.fill_rate}B", "cooldown": _seconds(d.cooldown), "dry_run": d.dry_run},
        "guard": {"enabled": g.enabled, "min_available": str(g.min_available),
                  "kill_available": str(g.kill_available), "count_swap": g.count_swap,
                  "psi_full": g.psi_full, "psi_full_kill": g.psi_full_kill, "psi_some": g.psi_some,
                  "psi_io_full": g.psi_io_full, "psi_window": _seconds(g.psi_window),
                  "psi_available": str(g.psi_available), "psi_refaults": f"{g.psi_refaults}B",
                  "grace": _seconds(g.grace), "predict": _seconds(g.predict)},
        "protect": {"names": list(p.names), "cgroups": list(p.cgroups)},
        "watch": watches,
    }


_SIZE_KEYS = {"daemon": ("fill_rate", "trace_size"), "guard": ("min_available", "kill_available"),
              "watch": ("limit", "warn")}


def loadable_config(data: dict) -> dict:
    """A recorded config (a trace header's) as today's parser takes it. Traces written
    before sizes needed a unit hold bytes as bare numbers (fill_rate 4294967296, or a limit
    "1000"), and a grace for every watch whatever its action: memwatchd wrote those itself,
    so they mean bytes, and a grace without SIGTERM meant nothing. The input is not changed."""
    if not isinstance(data, dict):
        return data

    def sizes(table: dict, keys) -> dict:
        out = dict(table)
        for key in keys:
            value = out.get(key)
            if (isinstance(value, int) and not isinstance(value, bool) and value > 0) or \
                    (isinstance(value, str) and value.strip().isdigit() and value.strip("0 ")):
                out[key] = f"{str(value).strip()}B"
        return out

    out = dict(data)
    for section in ("daemon", "guard"):
        if isinstance(out.get(section), dict):
            out[section] = sizes(out[section], _SIZE_KEYS[section])
    if isinstance(out.get("watch"), list):
        watches = []
        for w in out["watch"]:
            if isinstance(w, dict):
                w = sizes(w, _SIZE_KEYS["watch"])
                if w.get("action", "term") != "term":
                    w.pop("grace", None)
            watches.append(w)
        out["watch"] = watches
    return out


def _kernel() -> str:
    return os.uname().release


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


# ------------------------------------------------------------------- sinks

class FileSink:
    """One trace file (``memwatchd record --out``); a name ending in .gz is gzip'ed."""

    def __init__(self, path: str):
        self.path = path
        if path.endswith(".gz"):
            import gzip
            self._file = gzip.open(path, "wb", compresslevel=6)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self._file = os.fdopen(fd, "wb", buffering=0)

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def full(self) -> bool:
        return False

    def rotate(self) -> None:
        """One file has no segments: the new header and keyframe follow in it."""

    def close(self) -> None:
        self._file.close()


class RingSink:
    """A directory of segment files capped at ``size`` bytes, oldest dropped first.

    A restart opens a new segment after the last one, so what the previous run
    wrote is kept (until the cap drops it). Each segment begins with a header and
    a keyframe, so any suffix of the ring replays on its own.
    """

    def __init__(self, directory: str, size: int = DEFAULT_SIZE):
        self.path = directory
        self.size = size
        self.segment_size = max(MIN_SEGMENT, size // SEGMENTS)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        existing = segment_files(directory)
        self.seq = _segment_seq(existing[-1]) + 1 if existing else 1
        self.fd = -1
        self.written = 0
        self._open()

    def _open(self) -> None:
        name = os.path.join(self.path, f"{SEGMENT_PREFIX}{self.seq:08d}{SEGMENT_SUFFIX}")
        self.fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                          | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.written = 0
        self._trim()

    def _trim(self) -> None:
        """Drop the oldest segments until the ring (with the open one full) fits the cap."""
        files = segment_files(self.path)
        sizes = {}
        for f in files:
            try:
                sizes[f] = os.stat(f).st_size
            except OSError:
                sizes[f] = 0
        total = sum(sizes.values()) - sizes.get(files[-1], 0) + self.segment_size if files else 0
        for f in files[:-1]:
            if total <= self.size:
                break
            try:
                os.unlink(f)
            except OSError:
                pass
            total -= sizes[f]

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)
        self.written += len(data)

    def full(self) -> bool:
        return self.written >= self.segment_size

    def rotate(self) -> None:
        os.close(self.fd)
        self.seq += 1
        self._open()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def segment_files(directory: str) -> List[str]:
    """The ring's segment files, oldest first."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    segs = [n for n in names if n.startswith(SEGMENT_PREFIX) and n.endswith(SEGMENT_SUFFIX)
            and n[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)].isdigit()]
    return [os.path.join(directory, n) for n in sorted(segs, key=_segment_seq)]


def _segment_seq(name: str) -> int:
    return int(os.path.basename(name)[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)])


# ---------------------------------------------------------------- recorder

def _stat_row(s) -> list:
    p = s.pressure
    return [s.current, s.anon, s.file, s.inactive_file, s.shmem, s.swap_current, s.max, s.high,
            s.events_oom_kill, None if p is None else p.some_avg10, None if p is None else p.full_avg10]


STAT_FIELDS = ("current", "anon", "file", "inactive_file", "shmem", "swap_current", "max", "high",
               "oom_kill", "psi_some_avg10", "psi_full_avg10")


class Recorder:
    """Writes what the daemon's policy consumes. Three calls from the loop: ``tick`` after
    the policy decided, ``event`` for each decision/outcome record, ``reconfigure`` on reload.

    Never raises into the loop: a write error is logged once and recording stops. Never
    waits on the disk either: ``sink`` is written by offload.TraceWriter's thread, and while
    the disk holds more than its backlog up, ticks are not written (dropped, counted); the
    first tick after it caught up starts a new segment (a header naming the gap, and a
    keyframe), so every segment still replays on its own and a replay says what is missing.
    """

    def __init__(self, sink, config, daemon):
        from memwatchd.offload import TraceWriter
        self.sink = TraceWriter(sink)
        self.dropped = 0              # ticks not written while the disk held the trace up
        self.dropped_since = 0.0
        self.daemon = daemon          # for its targets (names, cgroup stats) and policy state
        self.config = config
        self.broken = False
        self.ids: Dict[tuple, int] = {}
        self.info: Dict[tuple, list] = {}          # key -> target line fields
        self.last: Dict[tuple, list] = {}          # key -> last written reading row
        self.event_keys: Dict[str, tuple] = {}     # decision id -> target key
        self.next_id = 1
        self.host_last = None
        self._near = (None, 0, 0)   # (mem_total, 4x the guard's floor, MemTotal/1024)
        self.clock_at = 0.0
        self._safely(self._header, daemon.clock(), False)

    # -- the loop's calls

    def tick(self, now: float, readings, gone, host, candidates, decisions) -> None:
        if not self.broken and not self._held_up(now):
            self._safely(self._tick, now, readings, gone, host, candidates, decisions)

    def event(self, record: dict) -> None:
        now = self.daemon.clock()
        if not self.broken and not self._held_up(now):
            self._safely(self._event, now, record)

    def _held_up(self, now: float) -> bool:
        """True while the disk holds the trace up (this tick or event is dropped); at the
        first call after it caught up, the new segment that marks the gap."""
        if self.sink.behind():
            if not self.dropped:
                self.dropped_since = now
                log(NOTICE, f"trace {self.sink.path}: the disk holds up {self.sink.backlog >> 20} MiB "
                            "of it; not recording until it catches up")
            self.dropped += 1
            return True
        if self.dropped:
            log(NOTICE, f"trace {self.sink.path}: recording again after "
                        f"{now - self.dropped_since:.1f}s ({self.dropped} ticks or events not recorded)")
            for key in [k for k in self.ids if not _still_there(k, self.daemon.targets)]:
                self._forget(key)   # ended during the gap: the keyframe must not revive it
            gap = {"dropped": self.dropped, "dropped_since": round(self.dropped_since, 4)}
            self.dropped = 0
            self._safely(self._rotate, now, gap)
        return False

    def reconfigure(self, config) -> None:
        """A reload: a new header with the new config (target ids start again)."""
        self.config = config
        self._near = (None, 0, 0)
        self.ids.clear()
        self.info.clear()
        self.last.clear()
        self.host_last = None
        if not self.broken:
            self._safely(self._header, self.daemon.clock(), False)

    def close(self) -> None:
        if not self.broken:
            now = round(self.daemon.clock(), 4)
            ended = [tid for key, tid in self.ids.items() if not _still_there(key, self.daemon.targets)]
            if ended:  # e.g. `record -- COMMAND`: the loop stopped when the command exited
                self._safely(self._write, {"t": "s", "m": now, "g": ended})
            self._safely(self._write, {"t": "end", "m": now})
        try:
            self.sink.close()
        except OSError:
            pass

    # -- internals

    def _safely(self, fn, *args) -> None:
        try:
            fn(*args)
        except (OSError, ValueError, TypeError) as e:
            self.broken = True
            log(ERR, f"trace {self.sink.path}: {e}; recording stopped")

    def _write(self, obj) -> None:
        self.sink.write(_encode(obj).encode() + b"\n")

    def _header(self, now: float, continues: bool, gap: Optional[dict] = None) -> None:
        host = self.daemon.targets.host.read()
        self._write(dict({"t": "header", "format": FORMAT, "memwatchd": __version__, "kernel": _kernel(),
                          "boot_id": _boot_id(), "mem_total": host.mem_total,
                          "swap_total": host.swap_total, "m": round(now, 4), "w": round(time.time(), 4),
                          "continues": continues, "source": self.config.source,
                          "config": config_dict(self.config)}, **(gap or {})))
        self.clock_at = now

    def _rotate(self, now: float, gap: Optional[dict] = None) -> None:
        """A new ring segment (a new header in a single file): header, then every known
        target and its last reading (a keyframe)."""
        self.sink.rotate()
        self._header(now, True, gap)
        for key, fields in self.info.items():
            self._write(dict(fields, m=round(now, 4)))
        rows = list(self.last.values())
        line = {"t": "s", "m": round(now, 4), "k": True}
        if rows:
            line["r"] = rows
        if self.host_last is not None:
            line["h"] = self.host_last
        self._write(line)

    def _target(self, now: float, key: tuple) -> int:
        tid = self.ids[key] = self.next_id
        self.next_id += 1
        t = self.daemon.targets.targets.get(key)
        fields = {"t": "target", "id": tid, "key": list(key)}
        if t is not None:
            fields.update(watch=t.watch.name, kind="cgroup" if t.is_cgroup else t.watch.scope,
                          comm=t.comm, cmdline=t.cmdline[:CMDLINE_MAX], cgroup=t.cgroup)
        self.info[key] = fields
        self._write(dict(fields, m=round(now, 4)))
        return tid

    def _tick(self, now, readings, gone, host, candidates, decisions) -> None:
        if self.sink.full():
            self._rotate(now)
        states = self.daemon.policy.states
        trends = self.daemon.policy.trends
        rows = None
        compact = False
        last = self.last
        for r in readings:  # at idle this loop is the whole cost: keep it to tuple reads
            key, usage, limit, warn = r[0], r[2], r[3], r[4]
            prev = last.get(key)
            if prev is not None and prev[2] == limit and prev[3] == warn:
                held = prev[1]
                band = (held >> 8) + 4096
                trend = trends.get(key) if trends else None
                if held - band <= usage <= held + band and (trend is None or not trend.armed) \
                        and _held_will_do(held, usage, limit, warn, states.get(key)):
                    continue  # moved less than 1/256 and no threshold or timer in play
            tid = self.ids.get(r.key) or self._target(now, r.key)
            row = [tid, r.usage, r.limit, r.warn]
            if r.key[0] == "cgroup":
                t = self.daemon.targets.targets.get(r.key)
                if t is not None:
                    row.append(_stat_row(self.daemon.targets.cgroups.get(t.slot)))
            last[r.key] = row
            if rows is None:
                rows, compact = [], True
            # limit and warn as the target's last row: [id, usage] is enough
            if prev is not None and len(row) == 4 and prev[2] == r.limit and prev[3] == r.warn:
                rows.append(row[:2])
            else:
                rows.append(row)
                compact = False
        h = self._host_row(host)
        gone_ids = [self.ids[t.key] for t in gone if t.key in self.ids] if gone else None
        if gone_ids:
            for t in gone:
                self._forget(t.key)
        if rows is None and h is None and not gone_ids and not candidates and not decisions:
            return
        m = round(now, 4)
        if now - self.clock_at >= CLOCK_EVERY:
            self._write({"t": "clock", "m": m, "w": round(time.time(), 4)})
            self.clock_at = now
        if compact and h is None and not gone_ids and not candidates and not decisions:
            line = [m]       # the common line (format 2): [m, id, usage, id, usage, ...]
            for row in rows:
                line += row
            self._write(line)
            return
        line = {"t": "s", "m": m}
        if rows:
            line["r"] = rows
        if h is not None:
            line["h"] = h
        if gone_ids:
            line["g"] = gone_ids
        if candidates:
            line["c"] = [[c.pid, c.key[2], c.comm, c.cgroup, c.rss, c.major_faults, c.uid,
                          c.exe_root_owned] for c in candidates]
        if decisions:
            line["d"] = [decision_dict(d) for d in decisions]
        self._write(line)

    def _forget(self, key: tuple) -> None:
        self.ids.pop(key, None)
        self.info.pop(key, None)
        self.last.pop(key, None)

    def _host_row(self, host) -> Optional[list]:
        """The host, when it moved: MemAvailable or swap by more than MemTotal/1024, a PSI avg10
        by a point, swap added or removed, zram's figures, or on every tick while MemAvailable
        is within 4x the guard's floor or under the pressure gate (psi_available): there the
        guard's pressure triggers take rates over time from the PSI totals and fault
        counters, and keep a history of them, so a replay needs every tick's values at the
        time the live policy saw them. Swap is often switched on after the daemon started
        (a swapfile, zram set up at boot), so its size is not the header's alone."""
        if host is None:
            return None
        p = host.pressure
        prev = self.host_last
        zram = self.daemon.policy.zram   # the daemon's latest swapinfo reading (a tuple:
        zram = zram if zram.zram_total > 0 else None   # written as an array, nothing built)
        if prev is not None:
            if self._near[0] != host.mem_total:
                guard = self.config.guard
                floor = guard.thresholds(host.mem_total)[0] if guard.enabled else -1
                gate = guard.psi_available.resolve(host.mem_total) if guard.enabled else -1
                self._near = (host.mem_total, max(NEAR_FLOOR * floor, gate), host.mem_total >> 10)
            _, below, band = self._near
            avail = host.mem_available
            if (avail >= below and -band <= avail - prev[0] <= band   # (idle: nothing built)
                    and -band <= host.swap_free - prev[1] <= band
                    and -band <= (host.swap_cached or 0) - (prev[11] or 0) <= band
                    and host.swap_total == prev[8] and zram == prev[9]
                    and (p is None if prev[2] is None else
                         p is not None and _close(p.some_avg10, prev[2]) and _close(p.full_avg10, prev[3]))):
                return None
        row = [host.mem_available, host.swap_free,
               None if p is None else p.some_avg10, None if p is None else p.full_avg10,
               None if p is None else p.some_total_us, None if p is None else p.full_total_us,
               host.refaults, host.major_faults, host.swap_total, zram, host.io_full_us,
               host.swap_cached]
        self.host_last = row
        return row

    def _event(self, now: float, record: dict) -> None:
        if record.get("type") == "decision":
            key = ("cgroup", record.get("cgroup")) if record.get("scope") == "cgroup" else \
                ("process", record.get("pid"), record.get("start_time"))
            self.event_keys[record.get("id")] = key
        self._write({"t": "event", "m": round(now, 4), "e": record})
        if record.get("type") == "outcome" and record.get("exited"):
            key = self.event_keys.pop(record.get("id"), None)
            if key is not None and key[0] == "process" and key in self.ids:
                # the daemon drops a dead victim without a "gone": say it here
                self._write({"t": "s", "m": round(now, 4), "g": [self.ids[key]]})
                self._forget(key)


def _held_will_do(held: int, usage: int, limit: int, warn, state) -> bool:
    """True when the policy, fed the last written value instead of this one, decides and
    changes exactly as with this one: same side of every threshold it compares against
    (limit, warn, warn's re-arm level), and no timer running (sustain, grace). Replay holds
    the last written value, so nothing it needs is lost."""
    if state is None:
        return usage < limit and (warn is None or usage < warn)   # quiet, and stays so
    if state.stage == "terminating" or (state.stage == "idle" and state.over_since is not None):
        return False   # the grace, or the sustain / cooldown clock, runs: every sample counts
    if (usage >= limit) != (held >= limit):
        return False
    return warn is None or ((usage >= warn) == (held >= warn)
                            and (usage < warn * WARN_REARM) == (held < warn * WARN_REARM))


def _still_there(key: tuple, targets) -> bool:
    """At the end of a recording: is this target still alive (same process, same cgroup)?"""
    if key[0] == "cgroup":
        return os.path.isdir(targets.cgroup_root + key[1])
    from memwatchd.sampler import parse_stat_start_time
    try:
        with open(os.path.join(targets.proc, str(key[1]), "stat"), "rb") as f:
            data = f.read()
    except OSError:
        return False
    state = data[data.rfind(b")") + 2:][:1]
    try:
        return state not in (b"Z", b"X") and parse_stat_start_time(data) == key[2]
    except (OSError, ValueError):
        return False


def _close(a, b) -> bool:
    return a is not None and b is not None and -1.0 < a - b < 1.0


def decision_dict(d) -> dict:
    out = {"key": list(d.key), "watch": d.watch, "kind": d.kind, "reason": d.reason,
           "usage": d.usage, "limit": d.limit,
           "signal": None if d.signal is None else signal.Signals(d.signal).name}
    if getattr(d, "by_guard", False):
        out["by_guard"] = True   # the guard is known by this, not by its name (a watch may be "guard")
    return out


def open_ring(config, daemon) -> Recorder:
    """The daemon's recorder for ``[daemon] trace`` (a directory)."""
    return Recorder(RingSink(config.daemon.trace, config.daemon.trace_size), config, daemon)


# ------------------------------------------------------------------ reader
#
# The reader is a stream: replay consumes each sample as it is parsed, so memory is
# bounded by the reorder window below (and what the policy itself keeps), not by the
# trace. Every line is parsed on its own (json's C scanner on one decoded line): a torn
# line can never merge with its neighbours into valid JSON, it is reported instead.

REORDER = 4096      # samples held back so that lines out of time order by fewer are replayed in order
DAMAGE_LISTED = 1000   # damage messages kept per trace; any more are counted in one last line


class Run:
    """One target's life in a trace: from its first reading until it was gone (or the trace ended).
    peak, samples, last, gone and oom_kills are counted as the samples are read
    (``open_trace(stats=False)`` leaves them unset: replay does not need them)."""

    __slots__ = ("rid", "key", "watch", "kind", "comm", "cmdline", "cgroup", "first", "last",
                 "gone", "peak", "samples", "oom_kills")

    def __init__(self, rid: int, key: tuple, fields: dict, t: float):
        self.rid = rid
        self.key = key
        self.watch = _text(fields.get("watch"))
        self.kind = _text(fields.get("kind")) or ("cgroup" if key[0] == "cgroup" else "process")
        self.comm = _text(fields.get("comm"))
        self.cmdline = _text(fields.get("cmdline"))
        self.cgroup = _text(fields.get("cgroup"))
        self.first = self.last = t
        self.gone: Optional[float] = None   # time the trace says it was gone; None: alive at the end
        self.peak = 0
        self.samples = 0
        self.oom_kills: Optional[tuple] = None   # a cgroup's lowest and highest oom_kill count seen


class Sample(namedtuple("Sample", "t rows host gone candidates decisions keyframe")):
    """One line of readings as the daemon's policy saw them at time ``t`` (trace time).

    rows: [(run id, usage, limit, warn, stat list or None)]; host: (mem_available,
    swap_free, psi_some_avg10, psi_full_avg10, psi_some_total_us, psi_full_total_us,
    refaults, major_faults, swap_total, zram: (zram_total, zram_free, zram_orig, zram_ram)
    or None, io_full_us, swap_cached) or None, the last eight None before format 3, the
    last two before format 4, the last before format 5; gone: [run id]; candidates:
    [(pid, start_time, comm, cgroup, rss, major_faults, uid, exe_root_owned)] or None
    (-1, -1, False for the last three before format 3); decisions: [dict] the live
    policy's output; keyframe: the first sample of a ring segment. A tuple: one per line,
    cheap."""

    __slots__ = ()


_new_sample = tuple.__new__   # Sample without the namedtuple's argument handling (the hot path)


class Trace:
    """A trace read back: its first header, the runs, the samples in time order, the events
    and the damage found (never raised: each entry says file, line and what was wrong).

    From ``open_trace`` the samples are a stream, read once by ``iter_samples``; runs,
    events, end and damage are complete once it is exhausted (``complete``). From
    ``read_trace`` they are all in ``samples``."""

    def __init__(self, path: str):
        self.path = path
        self.header: dict = {}
        self.headers: List[dict] = []
        self.runs: Dict[int, Run] = {}
        self.samples: Optional[List[Sample]] = None
        self.events: List[Tuple[float, dict]] = []
        self.damage: List[str] = []
        self.unlisted = 0             # damage beyond DAMAGE_LISTED, counted
        self.start = self.end = 0.0
        self.clean_end = False
        self.wall0 = 0.0
        self.complete = False
        self.retained_peak = 0        # most samples the reader held at once (its reorder window)
        self._stream = None

    @property
    def mem_total(self) -> int:
        return _int(self.header.get("mem_total"))

    @property
    def swap_total(self) -> int:
        return _int(self.header.get("swap_total"))

    def wall(self, t: float) -> float:
        """Wall-clock seconds for trace time t."""
        return self.wall0 + (t - self.start)

    def watch_names(self) -> List[str]:
        names = [w.get("name") for w in self.header.get("config", {}).get("watch", [])
                 if isinstance(w, dict)]
        names += [r.watch for r in self.runs.values()]
        return list(dict.fromkeys(n for n in names if n))

    def iter_samples(self):
        """The samples in time order: read_trace's list (any number of times), or
        open_trace's stream (once: a second pass opens the trace again)."""
        if self.samples is not None:
            return iter(self.samples)
        stream, self._stream = self._stream, None
        if stream is None:
            raise RuntimeError(f"{self.path}: this trace was streamed already; open it again")
        return stream

    def hurt(self, text: str) -> None:
        """One damage message (the first DAMAGE_LISTED are kept, the rest counted)."""
        if len(self.damage) < DAMAGE_LISTED:
            self.damage.append(text)
        else:
            self.unlisted += 1


def _text(v) -> str:
    return v if isinstance(v, str) else ""


def _int(v) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _num(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _key(v) -> Optional[tuple]:
    if isinstance(v, list) and len(v) == 3 and v[0] == "process" and all(
            isinstance(x, int) and not isinstance(x, bool) for x in v[1:]):
        return tuple(v)
    if isinstance(v, list) and len(v) == 2 and v[0] == "cgroup" and isinstance(v[1], str):
        return tuple(v)
    return None


def trace_files(path: str) -> List[str]:
    """A trace file, or a ring directory's segments oldest first."""
    if os.path.isdir(path):
        files = segment_files(path)
        if not files:
            raise TraceError(f"{path}: no trace segments ({SEGMENT_PREFIX}*{SEGMENT_SUFFIX}) in this directory")
        return files
    return [path]


def _lines(path: str, trace: Trace):
    """(line number, text) of a file, gzip'ed or not. Decoded by the buffered text layer
    (invalid UTF-8 kept as surrogates, so the line is reported, not the stream stopped);
    a truncated gzip stream is damage."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror}") from None
    import io
    with f:
        magic = f.read(2)
        f.seek(0)
        stream = f
        if magic == b"\x1f\x8b":
            import gzip
            stream = gzip.GzipFile(fileobj=f)
        text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="\n")
        errors = (EOFError, OSError)      # gzip.BadGzipFile is an OSError
        if stream is not f:
            import zlib
            errors += (zlib.error,)
        n = 0
        try:
            for n, line in enumerate(text, 1):
                yield n, line
        except errors as e:
            if stream is f:
                trace.hurt(f"{path}: read error after line {n} ({e}): read what came before")
            else:
                trace.hurt(f"{path}: compressed data ends early or is corrupt after line {n} ({e}): "
                           "read what came before (truncated file?)")


_NOT_JSON = object()
_scan = make_scanner(json.JSONDecoder())   # the C scanner: (value, end) of one line


def _parse_slow(line: str):
    """A line the fast path did not take: not ASCII (memwatchd writes ASCII only), blank
    around, or not JSON. The reader's old rules: UTF-8 or damage, whitespace allowed."""
    if not line.isascii():
        try:
            line = line.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeError:
            return _NOT_JSON
    try:
        return _decode(line)
    except ValueError:
        return _NOT_JSON


def open_trace(path: str, stats: bool = True, window: int = REORDER) -> Trace:
    """Open a trace file or ring directory for one pass: the first header is read now (a
    TraceError when nothing can be read: missing, not a trace, no header, a newer format),
    the samples stream from ``iter_samples()``. At most ``window`` samples are held back
    to put lines out of time order back in order. With ``stats`` each run's peak, sample
    count, end and oom-kill counts are kept as the samples go by."""
    trace = Trace(path)
    stream = _read(trace, trace_files(path), stats, max(1, window))
    next(stream)     # to the first header
    trace._stream = stream
    return trace


def read_trace(path: str) -> Trace:
    """Read a trace file or ring directory whole (every sample in ``samples``): for
    callers that go over it more than once. Raises TraceError only when nothing can be
    read; anything else is listed in .damage."""
    trace = open_trace(path)
    trace.samples = list(trace.iter_samples())
    return trace


def read_runs(path: str) -> Trace:
    """A trace's header, runs (peaks, ends), events and damage; the samples streamed past."""
    trace = open_trace(path)
    for _ in trace.iter_samples():
        pass
    return trace


def _read(trace: Trace, files: List[str], stats: bool, window: int):
    """The reader: yields None once at the first header (open_trace waits for it), then
    each sample in time order; fills in the trace's runs, events, damage and end."""
    from collections import deque
    hurt = trace.hurt
    runs = trace.runs
    opened: Dict[tuple, int] = {}        # key -> run id of its open run
    ids: Dict[int, int] = {}             # this header's target id -> run id
    short: Dict[int, tuple] = {}         # this header's target id -> (run id, limit, warn) once known
    limits: Dict[int, tuple] = {}        # run id -> its last (limit, warn)
    pending = deque()                    # samples read, not yet yielded (time order)
    tail_t = emitted_t = last_t = events_t = float("-inf")
    held_back = 0                        # the most samples held at once
    offset = 0.0                         # trace time = m + offset (a new boot restarts m)
    first_m = first_w = boot = None
    out_of_order = too_late = 0
    scan, new, fast_rows = _scan, _new_sample, _fast_rows
    for fi, fname in enumerate(files):
        seen_header = compact = False
        n = 0

        def at() -> str:   # where, for a damage message (formatted only then)
            return f"{fname} line {n}"
        for n, line in _lines(fname, trace):
            # the common line first: a sample of [id, usage] rows, complete and ASCII
            sample = None
            try:
                obj, end = scan(line, 0)
            except (StopIteration, ValueError):
                obj, end = _NOT_JSON, -1
            if end == len(line) - 1 and line.isascii() and line[-1] == "\n":
                rows = None
                if type(obj) is list and compact:    # format 2: [m, id, usage, id, usage, ...]
                    m = obj[0]
                    if type(m) is float and len(obj) & 1:
                        rows = []
                        append = rows.append
                        pairs = iter(obj)
                        next(pairs)
                        for tid, usage in zip(pairs, pairs):
                            if type(tid) is int and type(usage) is int:   # (not a bool or float)
                                known = short.get(tid)
                                if known is not None:
                                    append((known[0], usage, known[1], known[2], None))
                                    continue
                            rows = None   # the long way (it says what is wrong)
                            break
                elif seen_header and type(obj) is dict and len(obj) == 3:
                    m, r = obj.get("m"), obj.get("r")
                    if type(m) is float and type(r) is list and obj.get("t") == "s":
                        rows = fast_rows(r, short)
                if rows:
                    t = m + offset
                    sample = new(Sample, (t, rows, None, (), None, (), False))
                    if t < last_t - 1e-9:
                        out_of_order += 1
                    elif t > last_t:
                        last_t = t
            elif line[-1:] != "\n":
                hurt(f"{at()}: truncated line (a torn write?), skipped")
                continue
            else:
                obj = _parse_slow(line)
            if sample is None:
                if obj is _NOT_JSON:
                    if not seen_header and n == 1:
                        raise TraceError(f"{fname}: not a memwatchd trace (line 1 is not JSON)")
                    hurt(f"{at()}: not JSON, skipped")
                    continue
                if type(obj) is list and compact:
                    obj = _compact_line(obj, at, hurt)
                    if obj is None:
                        continue
                if type(obj) is not dict or type(obj.get("m")) not in (float, int):
                    hurt(f"{at()}: not a trace record (no \"t\"/\"m\"), skipped")
                    continue
                kind = obj.get("t")
                if kind == "header":
                    fmt = obj.get("format")
                    if not isinstance(fmt, int) or isinstance(fmt, bool):
                        raise TraceError(f"{at()}: header without a format version")
                    if fmt > FORMAT:
                        raise TraceError(f"{fname}: trace format {fmt} is newer than this memwatchd "
                                         f"({__version__}) reads (format {FORMAT}): upgrade memwatchd "
                                         f"to replay it (it was written by memwatchd {obj.get('memwatchd')})")
                    cfg = obj.get("config")
                    if not (isinstance(cfg, dict) and isinstance(cfg.get("watch", []), list)
                            and all(isinstance(cfg.get(k, {}), dict) for k in ("daemon", "guard"))):
                        hurt(f"{at()}: header without a well-formed config, skipped")
                        continue
                    seen_header = True
                    compact = fmt >= 2
                    m, w = obj["m"], _num(obj.get("w")) or 0.0
                    trace.headers.append(obj)
                    ids, short = {}, {}
                    if first_m is None:
                        first_m, first_w, boot = m, w, obj.get("boot_id")
                        trace.header = obj
                        trace.wall0 = w
                        trace.start = trace.end = m
                        yield None      # open_trace: the header is known
                    elif obj.get("boot_id") != boot:
                        boot = obj.get("boot_id")
                        offset = first_m + (w - first_w) - m  # another boot: place it by the wall clock
                    continue
                if not seen_header:
                    if first_m is None and n == 1 and fi == 0:
                        raise TraceError(f"{fname}: not a memwatchd trace (line 1 is not a header)")
                    hurt(f"{at()}: record before any header, skipped")
                    continue
                t = obj["m"] + offset
                if t < last_t - 1e-9:
                    out_of_order += 1
                elif t > last_t:
                    last_t = t
                if kind == "s":
                    sample = _sample(obj, t, ids, limits, short, at, hurt)
                    if sample is None:
                        continue
                    for rid in sample.gone:   # the key's next target record starts a new run
                        if opened.get(runs[rid].key) == rid:
                            del opened[runs[rid].key]
                else:
                    if kind == "target":
                        key, tid = _key(obj.get("key")), obj.get("id")
                        if key is None or not isinstance(tid, int):
                            hurt(f"{at()}: target record without a valid key and id, skipped")
                            continue
                        rid = opened.get(key)
                        if rid is None:
                            rid = len(runs) + 1
                            runs[rid] = Run(rid, key, obj, t)
                            opened[key] = rid
                        ids[tid] = rid
                        short.pop(tid, None)
                    elif kind == "event":
                        if isinstance(obj.get("e"), dict):
                            trace.events.append((t, obj["e"]))
                            if t > events_t:
                                events_t = t
                        else:
                            hurt(f"{at()}: event without a record, skipped")
                    elif kind == "end":
                        trace.clean_end = True
                    elif kind != "clock":
                        hurt(f"{at()}: unknown record type {str(kind)[:20]!r}, skipped")
                    continue
            # a sample: into the reorder window, the oldest out when it is full
            t = sample[0]
            if t >= tail_t:
                pending.append(sample)
                tail_t = t
            else:
                if t < emitted_t:
                    too_late += 1
                    continue
                i = len(pending)
                while i and pending[i - 1][0] > t:   # stable: after those of the same time
                    i -= 1
                pending.insert(i, sample)
            if len(pending) > window:
                held_back = window + 1
                s = pending.popleft()
                emitted_t = s[0]
                if stats:
                    _count(runs, s)
                yield s
        if not seen_header and first_m is None:
            raise TraceError(f"{fname}: empty or truncated before its header: no trace to read")
    if first_m is None:
        raise TraceError(f"{trace.path}: no header: not a memwatchd trace")
    trace.retained_peak = max(held_back, len(pending))
    while pending:
        s = pending.popleft()
        emitted_t = s[0]
        if stats:
            _count(runs, s)
        yield s
    if out_of_order:
        hurt(f"{trace.path}: {count(out_of_order, 'record')} out of time order (reordered or "
             "concatenated?); replayed in time order")
    if too_late:
        hurt(f"{trace.path}: {count(too_late, 'sample')} more than {window} samples out of time "
             "order, skipped (the reader holds that many back to reorder)")
    if trace.unlisted:
        trace.damage.append(f"{trace.path}: {count(trace.unlisted, 'more damaged record')} not listed")
    trace.events.sort(key=lambda e: e[0])
    trace.end = max(trace.start, emitted_t, events_t)
    trace.complete = True


def _compact_line(obj: list, at, hurt) -> Optional[dict]:
    """A format-2 line [m, id, usage, ...] the fast path did not take, as the "s" record
    it stands for ({"t": "s", "m": m, "r": [[id, usage], ...]}); None if it is not one."""
    if len(obj) < 3 or not len(obj) & 1 or type(obj[0]) not in (float, int):
        hurt(f"{at()}: not a trace record (an array that is not [m, id, usage, ...]), skipped")
        return None
    return {"t": "s", "m": obj[0], "r": [obj[i:i + 2] for i in range(1, len(obj), 2)]}


def _fast_rows(r: list, short: Dict[int, tuple]) -> Optional[list]:
    """The rows of the common sample line, all [id, usage] of targets whose limit is
    known; None when any row is something else (the line then goes the long way)."""
    rows = []
    append = rows.append
    for row in r:
        if type(row) is list and len(row) == 2:
            tid, usage = row
            if type(tid) is int and type(usage) is int:   # (not a bool, not a float)
                known = short.get(tid)
                if known is not None:
                    append((known[0], usage, known[1], known[2], None))
                    continue
        return None
    return rows


def _sample(obj: dict, t: float, ids: Dict[int, int], limits: Dict[int, tuple],
            short: Dict[int, tuple], at, hurt) -> Optional[Sample]:
    """One "s" line; ``limits`` (run id -> (limit, warn)) fills in the short [id, usage] rows
    (``short`` learns each target id's for the fast path); ``at()`` names the file and line
    for a damage message."""
    rows = []
    unknown = 0
    r = obj.get("r")
    for row in r if type(r) is list else ():
        if type(row) is list and len(row) == 2 and type(row[0]) is int and type(row[1]) is int:
            rid = ids.get(row[0])
            prev = limits.get(rid)
            if prev is None:
                unknown += 1
                continue
            short[row[0]] = (rid, prev[0], prev[1])
            rows.append((rid, row[1], prev[0], prev[1], None))
            continue
        if not (isinstance(row, list) and len(row) >= 4 and isinstance(row[0], int)
                and _int(row[1]) == row[1] and _int(row[2]) == row[2]
                and (row[3] is None or _int(row[3]) == row[3])):
            hurt(f"{at()}: malformed reading {str(row)[:60]}, skipped")
            continue
        rid = ids.get(row[0])
        if rid is None:
            unknown += 1
            continue
        stat = row[4] if len(row) > 4 and isinstance(row[4], list) and len(row[4]) == len(STAT_FIELDS) \
            and all(_num(x) is not None or x is None for x in row[4]) else None
        limits[rid] = (row[2], row[3])
        if type(row[0]) is int:
            short[row[0]] = (rid, row[2], row[3])
        rows.append((rid, row[1], row[2], row[3], stat))
    if unknown:
        hurt(f"{at()}: {count(unknown, 'reading')} for a target whose record was lost, skipped")
    host = obj.get("h")
    if host is not None:
        if not (isinstance(host, list) and len(host) in (4, 10, 11, 12) and _int(host[0]) == host[0]
                and _int(host[1]) == host[1]
                and all(x is None or _int(x) == x for x in host[4:9] + host[10:])
                and (len(host) == 4 or host[9] is None or (
                    isinstance(host[9], list) and len(host[9]) == 4
                    and all(_int(x) == x for x in host[9])))):
            hurt(f"{at()}: malformed host sample, skipped")
            host = None
        else:
            added = (*host[4:9], None if host[9] is None else tuple(host[9]),
                     host[10] if len(host) > 10 else None, host[11] if len(host) > 11 else None) \
                if len(host) >= 10 else (None,) * 8          # (before format 3; 4; 5)
            host = (host[0], host[1], _num(host[2]), _num(host[3]), *added)
    g, c, d = obj.get("g"), obj.get("c"), obj.get("d")
    gone = [ids[x] for x in g if isinstance(x, int) and x in ids] if isinstance(g, list) else ()
    cands = None
    if c is not None:
        cands = [tuple(x) if len(x) == 8 else (*x, -1, -1, False) for x in c
                 if isinstance(x, list) and len(x) in (5, 8)
                 and _int(x[0]) == x[0] and _int(x[1]) == x[1] and isinstance(x[2], str)
                 and isinstance(x[3], str) and _int(x[4]) == x[4]
                 and (len(x) == 5 or (_int(x[5]) == x[5] and _int(x[6]) == x[6]
                                      and (x[7] is None or type(x[7]) is bool)))] \
            if isinstance(c, list) else []
    decisions = [x for x in d if isinstance(x, dict) and _key(x.get("key"))] \
        if isinstance(d, list) else ()
    if not (rows or host or gone or cands or decisions):
        return None
    return Sample(t, rows, host, gone, cands, decisions, bool(obj.get("k")))


def _count(runs: Dict[int, Run], s: Sample) -> None:
    """A sample's share of its runs' peaks, counts, ends (in time order: the first gone
    ends a run) and, for cgroups, the oom_kill counts seen."""
    t = s[0]
    for rid, usage, _limit, _warn, stat in s[1]:
        run = runs[rid]
        run.samples += 1
        if t > run.last:
            run.last = t
        if usage > run.peak:
            run.peak = usage
        if stat is not None and stat[8] is not None:
            k = stat[8]
            low, high = run.oom_kills or (k, k)
            run.oom_kills = (min(low, k), max(high, k))
    for rid in s[3]:
        if runs[rid].gone is None:
            runs[rid].gone = t
