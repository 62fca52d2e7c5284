"""The live state file: what the daemon sees, for `memwatchd status` (the report stage).

The daemon rewrites it when what it shows has changed (a target came or went, an
action, a victim, a reload, a usage or MemAvailable that moved noticeably, a target
or the guard sampling closely), at most once a second, and otherwise every
STATE_HEARTBEAT seconds: an idle daemon does not re-encode unchanged JSON every
second. `status` tells a live daemon from a dead one by its pid and start time, and
a stuck one by a state older than its heartbeat (the file says which: see
liveness()). A temp file in the same directory, then rename(), so a reader sees the
old file or the new one, never half of one.
Mode 0600: it names processes and cgroups. It only goes out: the daemon has no
command socket and reads no instructions from other processes.

Publisher is the daemon's one hook for everything that leaves it besides the
journal and the events file: the state file, and the optional Prometheus
metrics (memwatchd.metrics, imported only when [metrics] is configured, so a
daemon without it never loads prometheus_client).
"""
from __future__ import annotations

import collections
import json
import os
import time
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, Optional

from memwatchd import __version__, report, sampler
from memwatchd.files import BackgroundWriter, write_atomic
from memwatchd.report import ERR, escape, log
from memwatchd.types import MemwatchdError

FORMAT = 2            # 2: times as RFC 3339 strings (*_at) with Unix twins (*_at_unix)
READABLE_FORMATS = (1, 2)   # `status` still reads what an older, still running daemon wrote
STATE_EVERY = 1.0     # at most one state write (and metrics snapshot) per second
STATE_HEARTBEAT = 30.0   # an unchanged state is rewritten this often (it proves the loop runs)
FRESH_FOR = 5.0       # `status`: stale once older than the daemon's heartbeat plus this
MOVED_BYTES = 2**20   # a usage that moved by max(this, 1/64 of its limit) is a change
HOST_MOVED = 64 * 2**20   # MemAvailable that moved by max(this, 1% of MemTotal) is a change
QUIET_HOST_SHARE = 10     # ... but the idle daemon's quiet wait comes back for 1/10 of MemTotal
PSI_MOVED = 1.0       # a PSI avg10 (percent) that moved by this is a change
RECENT = 10           # actions kept in the state file
COUNTED_TARGETS = 256  # targets whose actions of the last hour are counted

__all__ = ["FORMAT", "STATE_EVERY", "STATE_HEARTBEAT", "FRESH_FOR", "fresh_for", "write_atomic", "read_state", "boottime",
           "proc_start_time", "liveness", "target_labels", "target_view", "host_view", "guard_view",
           "build_view", "action_key", "action_summary", "Publisher"]


def boottime() -> float:
    """Seconds since boot (CLOCK_BOOTTIME): the same in every process, unmoved by clock changes."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def read_state(path: str) -> Optional[Dict[str, Any]]:
    """The state file as a dict; None if it does not exist. Raises OSError (e.g. EACCES)
    and ValueError for a file that is not a memwatchd state."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: not a memwatchd state file (format {FORMAT})")
    return data


def proc_start_time(pid: int, proc: str = "/proc") -> Optional[int]:
    """The process's start time (clock ticks after boot), None if there is no such process."""
    try:
        with open(f"{proc}/{int(pid)}/stat", "rb") as f:
            return sampler.parse_stat_start_time(f.read())
    except (OSError, ValueError):
        return None


def liveness(state: Optional[Dict[str, Any]], now_boot: Optional[float] = None,
             proc: str = "/proc") -> str:
    """Does a daemon stand behind this state? One of:

    "running"  written within fresh_for(state) seconds (its heartbeat, plus FRESH_FOR)
               by a process that still lives (same pid AND same start time, so a
               recycled pid does not count);
    "stale"    that process lives, but has not written for longer (stuck, or stopped);
    "dead"     that process is gone (crashed, killed, or stopped uncleanly);
    "none"     there is no state file.
    """
    if state is None:
        return "none"
    daemon = state.get("daemon") or {}
    pid, start = daemon.get("pid"), daemon.get("start_time")
    if not isinstance(pid, int) or pid <= 0 or proc_start_time(pid, proc) != start:
        return "dead"
    now_boot = boottime() if now_boot is None else now_boot
    written = state.get("written_boottime")
    if not isinstance(written, (int, float)) or not 0 <= now_boot - written <= fresh_for(state):
        return "stale"
    return "running"


def quiet_host_move(mem_total: int) -> int:
    """How far MemAvailable may move before an idle daemon's quiet wait (daemon._wait_quiet)
    hands back to Python to write it down: 1/QUIET_HOST_SHARE of MemTotal (at least
    HOST_MOVED). Narrower would cost a Python tick for every allocation of the host's other
    processes (issue 18); what the guard acts on ends the wait by its own rule (its floor,
    the PSI gate), and the state says how old its host numbers are (host.sample_age_seconds)."""
    return max(HOST_MOVED, mem_total // QUIET_HOST_SHARE)


def fresh_for(state: Dict[str, Any]) -> float:
    """How old this daemon's state may get while its loop runs: its heartbeat (the
    longest it leaves an unchanged state unwritten) plus FRESH_FOR of slack. A state
    without a heartbeat (a daemon before issue 18) was rewritten every second."""
    beat = (state.get("daemon") or {}).get("state_heartbeat_seconds")
    if not isinstance(beat, (int, float)) or isinstance(beat, bool) or not 0 < beat <= 3600:
        beat = 0.0
    return beat + FRESH_FOR


# ------------------------------------------------------------------ the view

def target_labels(t: Any) -> tuple:
    """(id, comm, cgroup) of a targets.Target, escape()d: a process chooses its own names.
    They never change while the target lives, so the Publisher computes them once."""
    cgroup = escape(t.cgroup)
    if getattr(t, "container", ""):   # keyed by name: a re-created container is the same row
        return escape(t.container), escape(t.comm), cgroup
    return (cgroup if t.is_cgroup else str(t.pid)), escape(t.comm), cgroup


def target_view(t: Any, now: float, last_action: Optional[dict] = None,
                labels: Optional[tuple] = None, actions_last_hour: int = 0,
                estimate: Optional[dict] = None) -> Dict[str, Any]:
    """One targets.Target as plain JSON data; labels as target_labels(t) returns them;
    estimate as Policy.estimate returns it (None without predict)."""
    sampled = t.sampled_at > 0
    usage = t.usage if sampled else None
    limit = t.limit if sampled else None
    ident, comm, cgroup = labels or target_labels(t)
    return {
        "target": t.watch.name,
        "kind": t.watch.kind,
        "scope": t.watch.scope,
        "id": ident,
        "pid": None if t.is_cgroup else t.pid,
        "comm": comm,
        "cgroup": cgroup,
        "container": ident if getattr(t, "container", "") else None,
        "usage_bytes": usage,
        "limit_bytes": limit,
        "warn_bytes": t.warn if sampled else None,
        "headroom_bytes": None if usage is None else limit - usage,
        "action": t.watch.action,
        "interval_seconds": round(t.interval, 6) if t.interval else None,
        "sample_age_seconds": round(max(0.0, now - t.sampled_at), 6) if sampled else None,
        "last_action": last_action,
        "actions_last_hour": actions_last_hour,
        "predict": estimate,
    }


def host_view(host: Any, age: Optional[float] = None) -> Optional[Dict[str, Any]]:
    """A types.HostSample as plain data (psi None where the kernel has no PSI); age: how
    many seconds before now it was read (None: just now, as `status` samples it)."""
    if host is None:
        return None
    p = host.pressure
    return {
        "sample_age_seconds": round(max(0.0, age or 0.0), 6),
        "mem_total_bytes": host.mem_total,
        "mem_available_bytes": host.mem_available,
        "swap_total_bytes": host.swap_total,
        "swap_free_bytes": host.swap_free,
        "psi": None if p is None else {
            "some_avg10": p.some_avg10, "some_avg60": p.some_avg60,
            "some_total_seconds": p.some_total_us / 1e6,
            "full_avg10": p.full_avg10, "full_avg60": p.full_avg60,
            "full_total_seconds": p.full_total_us / 1e6,
        },
    }


def guard_view(guard: Any, mem_total: Optional[int]) -> Dict[str, Any]:
    term, kill = guard.thresholds(mem_total) if mem_total else (None, None)
    return {"enabled": guard.enabled, "term_below_bytes": term, "kill_below_bytes": kill,
            "count_swap": guard.count_swap, "psi_full": guard.psi_full or None,
            "psi_full_kill": guard.psi_full_kill or None, "psi_some": guard.psi_some or None,
            "psi_io_full": getattr(guard, "psi_io_full", 0) or None,
            "psi_window_seconds": guard.psi_window,
            "psi_refaults_bytes_per_second": getattr(guard, "psi_refaults", 0) or None,
            "predict": None}


def build_view(targets: Iterable[Any], host: Any, now: float, config: Any,
               daemon: Optional[dict] = None, recent: Iterable[dict] = (),
               last_by_target: Optional[Dict[tuple, dict]] = None,
               labels: Optional[Dict[tuple, tuple]] = None,
               counts: Optional[Dict[tuple, int]] = None,
               estimate: Optional[Any] = None, host_age: Optional[float] = None) -> Dict[str, Any]:
    """What `status` shows and the state file holds. daemon=None: sampled by `status` itself.
    last_by_target maps action_key() to the last action on that target, counts to the
    number of actions on it in the last hour; labels caches target_labels() by target key
    across calls (the caller prunes it); estimate is the policy's key -> time-to-exhaustion
    estimate (Policy.estimate), None outside the daemon; host_age: how old the host
    sample is (host_view)."""
    last_by_target = last_by_target or {}
    counts = counts or {}
    labels = {} if labels is None else labels
    rows = []
    for t in targets:
        shown = labels.get(t.key)
        if shown is None:
            shown = labels[t.key] = target_labels(t)
        key = (t.watch.name, shown[0])
        rows.append(target_view(t, now, last_by_target.get(key), shown, counts.get(key, 0),
                                estimate(t.key) if estimate is not None else None))
    rows.sort(key=lambda r: (r["target"], r["id"]))
    written = time.time_ns()
    return {
        "format": FORMAT,
        "written_at": report.format_time(written),
        "written_at_unix": written / 1e9,
        "written_boottime": boottime(),
        "config": config.source,
        "dry_run": config.daemon.dry_run,
        "daemon": daemon,
        "host": host_view(host, host_age),
        "guard": guard_view(config.guard, getattr(host, "mem_total", None)),
        "watches": [w.name for w in config.watches],
        "targets": rows,
        "recent_actions": list(recent),
    }


def action_key(summary: Dict[str, Any]) -> tuple:
    """(watch name, pid as text, container name or cgroup): which target row an action
    concerns; a container counts by name, whatever id Docker gave it this time."""
    pid = summary.get("pid")
    if summary.get("container"):
        return summary.get("target"), summary["container"]
    return summary.get("target"), str(pid) if pid is not None else summary.get("cgroup")


def action_summary(record: Dict[str, Any]) -> Dict[str, Any]:
    """The part of a decision record that `status` shows (already escaped by report)."""
    keys = ("id", "time", "target", "pid", "comm", "cgroup", "container", "action", "signal", "reason",
            "usage_bytes", "limit_bytes", "dry_run")
    out = {k: record.get(k) for k in keys}
    out["outcome"] = None
    return out


# ----------------------------------------------------------------- publisher

class Publisher:
    """The daemon's outward view: the state file (<= 1 Hz) and, when configured, metrics.

    Everything here runs on the daemon's thread except the metrics exporter's own
    thread, which only ever sees snapshots handed to it; a failure is logged and
    never stops protection.
    """

    def __init__(self, config: Any, proc_root: str = "/"):
        self.config = config
        self.proc_root = proc_root
        self.recent: "collections.deque[dict]" = collections.deque(maxlen=RECENT)
        self.last_by_target: Dict[tuple, dict] = {}
        self.labels: Dict[tuple, tuple] = {}   # target key -> target_labels(), escaped once
        self.actions_by_minute: Dict[tuple, collections.deque] = {}   # action_key -> [minute, n]
        self.metrics = None
        self._written = -STATE_EVERY
        self._state_written = -STATE_HEARTBEAT   # when the state file was last written
        self._shown: Optional[tuple] = None   # what the last state write showed: see _changed()
        self._records = 0                 # event records seen (any is a change)
        self._failed = False
        self._writer = BackgroundWriter(self._written_state)   # off the loop (files.py)
        self._self_table = None
        self._self_slot = -1
        self.started_at = time.time()
        self.start_time = proc_start_time(os.getpid(), os.path.join(proc_root, "proc"))

    @property
    def every(self) -> Optional[float]:
        """How often the loop should wake for us; None when nothing is published. Metrics
        take a snapshot every second; the state file alone needs its heartbeat (a change
        comes with the tick that made it)."""
        if self.metrics is not None:
            return STATE_EVERY
        return STATE_HEARTBEAT if self.config.daemon.state else None

    def start(self) -> None:
        """Start the metrics exporter if configured; called once the loop starts."""
        self._start_metrics()

    def _start_metrics(self) -> None:
        m = self.config.metrics
        if not (m.listen or m.textfile):
            return
        try:
            from memwatchd import metrics  # loads prometheus_client: only when configured
            self.metrics = metrics.Metrics(m)
            self.metrics.seed(self.config)
        except ImportError as e:
            log(ERR, f"[metrics] is configured but prometheus_client is missing ({e}); no metrics")
        except OSError as e:
            log(ERR, f"metrics endpoint {m.listen}: {e.strerror or e}; no metrics")

    def reconfigure(self, config: Any) -> None:
        old = self.config.metrics
        self.config = config
        if config.metrics != old:
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            self._start_metrics()
        elif self.metrics is not None:
            self.metrics.seed(config)   # a new watch's first-stop counter starts at 0 too
        self._written = -STATE_EVERY
        self._shown = None              # a reload is a change: written on the next tick

    def rss(self) -> Optional[int]:
        """memwatchd's own resident memory, by one pread of its statm."""
        if self._self_table is None:
            try:
                table = sampler.ProcessTable(root=self.proc_root, capacity=1)
                self._self_slot = table.add(os.getpid())
            except (MemwatchdError, OSError):
                return None
            self._self_table = table
        self._self_table.sample_slots([self._self_slot])
        return self._self_table.rss(self._self_slot)

    # ------------------------------------------------------------ events in

    def on_record(self, record: Dict[str, Any]) -> None:
        """Every event record the daemon writes: kept for the state, counted for metrics."""
        self._records += 1
        if record.get("type") == "decision":
            summary = action_summary(record)
            self.recent.append(summary)
            key = action_key(summary)
            self.last_by_target.pop(key, None)          # re-insert: the dict stays oldest first
            self.last_by_target[key] = summary
            if len(self.last_by_target) > 4 * RECENT:   # forget the oldest: no unbounded growth
                del self.last_by_target[next(iter(self.last_by_target))]
            self._count_action(key)
        elif record.get("type") == "outcome":
            for summary in self.recent:
                if summary["id"] == record.get("id"):
                    summary["outcome"] = {k: record.get(k) for k in
                                          ("exited", "seconds_to_exit", "freed_bytes", "escalated")}
        if self.metrics is not None:
            self.metrics.on_record(record)

    def _count_action(self, key: tuple) -> None:
        """One more action on this target: counted per minute, for an hour (60 entries at
        most per target, COUNTED_TARGETS targets), so a target acted on again and again
        shows in `status` and metrics (actions_last_hour) instead of hiding in the journal."""
        minute = int(time.monotonic() // 60)
        buckets = self.actions_by_minute.pop(key, None)
        if buckets is None:
            buckets = collections.deque(maxlen=60)
            if len(self.actions_by_minute) >= COUNTED_TARGETS:
                del self.actions_by_minute[next(iter(self.actions_by_minute))]
        self.actions_by_minute[key] = buckets        # re-inserted: the dict stays oldest first
        if buckets and buckets[-1][0] == minute:
            buckets[-1][1] += 1
        else:
            buckets.append([minute, 1])

    def actions_last_hour(self) -> Dict[tuple, int]:
        since = int(time.monotonic() // 60) - 59
        return {key: sum(n for minute, n in b if minute >= since)
                for key, b in self.actions_by_minute.items()}

    def victim_exited(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.exit_seconds.observe(seconds)

    def after_tick(self, daemon: Any, tick_seconds: float) -> None:
        """Called after every tick: time it, and publish if a second has passed."""
        if self.metrics is not None:
            self.metrics.tick_seconds.observe(tick_seconds)
        now = daemon.clock()
        if self.every is None or now - self._written < STATE_EVERY:
            return
        write = bool(self.config.daemon.state) and (
            now - self._state_written >= STATE_HEARTBEAT or self._changed(daemon))
        if not write and self.metrics is None:
            return
        self._written = now
        view = self.view(daemon, now)
        if self.metrics is not None:
            self.metrics.publish(view)
        if write:
            self._state_written = now
            self._shown = self._showing(daemon)
            self._write_state(view)

    def _showing(self, daemon: Any) -> tuple:
        """What a state write shows, as far as _changed() compares it: the discrete
        parts (targets, actions, victims, quarantine, records), MemAvailable, PSI, and
        each target's usage."""
        host = daemon.host
        psi = getattr(host, "pressure", None)
        return ((len(daemon.targets.targets), daemon.actions_taken, len(daemon.victims),
                 len(getattr(daemon, "quarantined", ())), self._records),
                getattr(host, "mem_available", None),
                None if psi is None else (psi.some_avg10, psi.full_avg10),
                {key: t.usage for key, t in daemon.targets.targets.items()})

    def _changed(self, daemon: Any) -> bool:
        """Has what the state shows changed enough since the last write to write it now?
        Something discrete (a target, an action, a victim, a record, a quarantine), a
        target's usage moved by max(MOVED_BYTES, 1/64 of its limit) (one growing towards
        its limit is so written about every second), MemAvailable by max(HOST_MOVED, 1%
        of MemTotal), a PSI avg10 by PSI_MOVED."""
        shown = self._shown
        if shown is None:
            return True
        discrete, avail, psi, usage = shown
        if discrete != (len(daemon.targets.targets), daemon.actions_taken, len(daemon.victims),
                        len(getattr(daemon, "quarantined", ())), self._records):
            return True
        host = daemon.host
        if host is not None:
            if avail is None or abs(host.mem_available - avail) >= max(HOST_MOVED, host.mem_total // 100):
                return True
            p = host.pressure
            if (p is None) != (psi is None) or p is not None and (
                    abs(p.some_avg10 - psi[0]) >= PSI_MOVED or abs(p.full_avg10 - psi[1]) >= PSI_MOVED):
                return True
        for key, t in daemon.targets.targets.items():
            before = usage.get(key)
            if before is None or abs(t.usage - before) >= max(MOVED_BYTES, t.limit >> 6):
                return True
        return False

    def view(self, daemon: Any, now: float) -> Dict[str, Any]:
        info = {
            "pid": os.getpid(),
            "start_time": self.start_time,
            "started_at": report.format_time(int(self.started_at * 1e9)),
            "started_at_unix": self.started_at,
            "version": __version__,
            "sampler": sampler.IMPLEMENTATION,
            "discovery": getattr(daemon.targets, "discovery", ""),   # "" when nothing needs it
            "rss_bytes": self.rss(),
            "ticks": daemon.ticks,
            "quiet_wakes": getattr(daemon, "quiet_wakes", 0),
            "actions_taken": daemon.actions_taken,
            "victims": len(daemon.victims),
            "quarantined": dict(getattr(daemon, "quarantined", {})),
            "state_every_seconds": STATE_EVERY,
            "state_heartbeat_seconds": STATE_HEARTBEAT,
        }
        targets = daemon.targets.targets
        if len(self.labels) > 2 * len(targets) + 64:   # forget the targets that are gone
            self.labels = {key: shown for key, shown in self.labels.items() if key in targets}
        policy = getattr(daemon, "policy", None)   # (tests publish stand-ins without one)
        view = build_view(targets.values(), daemon.host, now, self.config,
                          info, self.recent, self.last_by_target, self.labels,
                          self.actions_last_hour(),
                          policy.estimate if policy is not None and policy.trends else None,
                          now - getattr(daemon, "host_read_at", now))
        if policy is not None:
            view["guard"]["predict"] = policy.estimate_host()   # [guard] predict
        return view

    def _write_state(self, view: Dict[str, Any]) -> None:
        path = self.config.daemon.state
        try:
            data = json.dumps(view, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
        except (ValueError, TypeError) as e:
            self._written_state(path, e)
            return
        self._writer.submit(path, data.encode("ascii") + b"\n", 0o600)

    def _written_state(self, path: str, error: Optional[BaseException]) -> None:
        """After each state write (in the writer's thread): log a failure once per streak."""
        if error is None:
            self._failed = False
            return
        if not self._failed:  # once per failure streak, not once a second
            log(ERR, f"could not write the state file {path}: {error}")
        self._failed = True

    def close(self) -> None:
        self._writer.flush(1.0)   # the last state written, unless the disk holds it up
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self._self_table = None
