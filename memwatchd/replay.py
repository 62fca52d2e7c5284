"""Replay: the daemon's own Policy over a recorded trace, on a virtual clock.

The loop mirrors the daemon's: at each recorded sample the targets it read are
evaluated; between samples, every target the policy is not quiet on is
evaluated again when its interval (``Policy.interval_for``) says it would have
been sampled, with its last recorded value. A quiet target whose value does not
change stays quiet (``Policy.quiet``), so it needs no virtual ticks: that is
what makes a day of 100 targets replay in seconds. The trace is a stream
(``trace.open_trace``): each sample is consumed as it is read and dropped, so a
replay holds the policy's state and one value per target, never the trace.

After an action the trace no longer says what would have happened:
- a target the replay SIGKILLs is dropped (its later readings are ignored);
- after a SIGTERM the ladder goes on over the recorded readings (as if it ignored it);
- memory a replay-only kill would have freed is added back to MemAvailable, and a
  guard victim is assumed to exit on SIGTERM (both approximations, and said so);
- every decision on a target after its first divergence (an action the live run did
  not take, or a live action the replay did not take) is marked ``diverged``; for the
  guard, after any divergence at all (any kill frees host memory).
"""
from __future__ import annotations

import heapq
import signal
from typing import Dict, List, Optional, Sequence

from memwatchd.config import Config, parse_config
from memwatchd.policy import Policy, guard_level, is_quiet
from memwatchd.report import count
from memwatchd.trace import Trace, TraceError, loadable_config, open_trace
from memwatchd.types import (NO_ZRAM, Candidate, ConfigError, HostSample, Pressure, Reading,
                             SwapDevices)

SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
_new_reading = tuple.__new__   # a Reading without the namedtuple's argument handling (per row)


class Decision:
    """One decision of the replay (``live`` False) or of the recorded run (``live`` True)."""

    __slots__ = ("t", "key", "watch", "kind", "reason", "usage", "limit", "signal", "live",
                 "by_guard", "match", "diverged", "window")

    def __init__(self, t, key, watch, kind, reason, usage, limit, sig, live, by_guard=False):
        self.t, self.key, self.watch, self.kind, self.reason = t, key, watch, kind, reason
        self.usage, self.limit, self.signal, self.live = usage, limit, sig, live
        self.by_guard = by_guard   # the host guard's (policy.Decision.by_guard), whatever the name
        self.match: Optional[Decision] = None
        self.diverged = False
        self.window: Optional[float] = None   # live: one sample (time since the one before)

    @property
    def action(self) -> str:
        if self.kind != "signal":
            return self.kind
        return "kill" if self.signal == "SIGKILL" else "term"

    def same_as(self, other: "Decision") -> bool:
        return (self.key == other.key and self.kind == other.kind and self.signal == other.signal
                and self.reason == other.reason)


class Result:
    """Everything a replay found: its decisions, the live ones, divergences, caveats."""

    def __init__(self, trace: Trace, config: Config):
        self.trace = trace
        self.config = config
        self.decisions: List[Decision] = []
        self.live: List[Decision] = []
        self.diverged_at: Dict[tuple, float] = {}
        self.notes: List[str] = []
        self.dropped: Dict[tuple, int] = {}       # key -> readings ignored after a replay kill
        self.tolerance = 0.0
        self.start = trace.start
        self.end = trace.end
        self.ticks = 0
        self.readings = 0
        self.names: Dict[tuple, str] = {}          # guard victims that were no target -> comm

    @property
    def damage(self) -> List[str]:
        return self.trace.damage

    def stopped(self) -> Dict[tuple, Decision]:
        """Targets the replay signalled (first signal each): "would have stopped" these."""
        out: Dict[tuple, Decision] = {}
        for d in self.decisions:
            if d.kind in ("signal", "freeze") and not d.by_guard and d.key not in out:
                out[d.key] = d
        return out


def check_config(trace: Trace, config: Config, recorded_only: bool = False) -> List[str]:
    """Refuse a config whose watches the trace never recorded, or recorded measuring something
    else (another scope); return notes for watches it lacks. The trace's runs are known
    only once it has been read: ``recorded_only`` checks the watches of its first header
    (before a replay), the full check follows it."""
    recorded = {w.get("name"): w for w in trace.header.get("config", {}).get("watch", [])
                if isinstance(w, dict)}
    names = list(recorded) if recorded_only else trace.watch_names()
    notes = []
    matched = [w for w in config.watches if w.name in names]
    if config.watches and not matched and not recorded_only:
        raise ConfigError(f"{config.source}: its watches ({', '.join(w.name for w in config.watches)}) "
                          f"match none recorded in {trace.path} ({', '.join(names) or 'none'}): replay "
                          "pairs a [[watch]] with the trace's readings by its name")
    for i, w in enumerate(config.watches):
        if w.name not in names:
            notes.append(f"watch {w.name}: not in the trace; nothing to replay for it")
            continue
        rec = recorded.get(w.name)
        scope = rec.get("scope") if rec else next(
            (r.kind for r in trace.runs.values() if r.watch == w.name), w.scope)
        if scope != w.scope:
            raise ConfigError(f"{config.source}: watch[{i}] ({w.name}) has scope {w.scope}, but "
                              f"{trace.path} recorded it with scope {scope}: its readings measure "
                              "something else")
        if rec and rec.get("usage") not in (None, w.usage) and w.scope != "cgroup":
            raise ConfigError(f"{config.source}: watch[{i}] ({w.name}) measures {w.usage}, but "
                              f"{trace.path} recorded {rec.get('usage')}")
    return notes


def recorded_config(trace: Trace) -> Config:
    """The config the trace was recorded with (from its first header)."""
    try:
        return parse_config(loadable_config(trace.header["config"]), f"{trace.path} (recorded config)")
    except (ConfigError, KeyError) as e:
        raise TraceError(f"{trace.path}: the recorded config cannot be used: {e}") from None


def replay(trace: Trace, config: Optional[Config] = None, start: Optional[float] = None,
           end: Optional[float] = None) -> Result:
    """Replay ``config`` (default: the recorded one) over ``trace`` between trace times
    start and end (default: all of it). A trace from open_trace is consumed (once);
    one from read_trace can be replayed again."""
    config = config or recorded_config(trace)
    result = Result(trace, config)
    check_config(trace, config, recorded_only=True)   # a wrong scope fails before the work
    _Replayer(trace, config, result, trace.start if start is None else start, end).run()
    result.notes[:0] = check_config(trace, config)
    _match(result)
    return result


class _Replayer:
    def __init__(self, trace: Trace, config: Config, result: Result, start: float,
                 end: Optional[float]):
        self.trace, self.config, self.result = trace, config, result
        self.start, self.end = start, float("inf") if end is None else end
        self.until_end = end is None      # the trace's end is known once it is read
        result.start = start
        self.policy = Policy(config)
        self.watches = {w.name: w for w in config.watches}
        self.mem_total = trace.mem_total
        self.swap_total = trace.swap_total
        self.held: Dict[int, Reading] = {}
        self.rid_of: Dict[tuple, int] = {}
        self.killed: Dict[int, float] = {}
        self.freed: Dict[tuple, int] = {}
        self.stopped: set = set()        # keys the replayed guard stopped: never chosen again
        self.live_stopped: set = set()   # keys the live guard stopped (not dry-run): freed live
        self.due_at: Dict[int, float] = {}
        self.heap: list = []
        self.host_raw = None
        self.host: Optional[HostSample] = None
        self.candidates: Optional[tuple] = None   # the latest recorded list: (time, [(pid, ...)])
        self.started = False
        self.seen_at: Dict[int, float] = {}
        self.fixed: Dict[int, tuple] = {}    # process run id -> (key, watch, limit, warn); () = no watch
        self.guard_on = config.guard.enabled
        self.noted = set()
        rec = trace.header.get("config", {}).get("daemon", {})
        self.live_dry_run = bool(rec.get("dry_run")) if isinstance(rec, dict) else False

    def note(self, text: str) -> None:
        if text not in self.noted:
            self.noted.add(text)
            self.result.notes.append(text)

    # -- readings

    def reading(self, rid: int, usage: int, limit: int, warn, stat) -> Optional[Reading]:
        fixed = self.fixed.get(rid)
        if fixed is not None:   # a process: its limit and warn do not change (a % of MemTotal)
            return Reading(fixed[0], fixed[1], usage, fixed[2], fixed[3]) if fixed else None
        run = self.trace.runs[rid]
        w = self.watches.get(run.watch)
        if w is None:
            if run.kind != "cgroup":
                self.fixed[rid] = ()
            return None
        base = self.mem_total
        unreclaimable = ceiling = None
        if run.kind == "cgroup":
            if stat is not None:
                current, anon, inactive = stat[0] or 0, stat[1] or 0, stat[3] or 0
                usage = anon if w.usage == "anon" else current - max(inactive, 0) \
                    if w.usage == "current-inactive_file" else current
                if stat[6] is not None and stat[6] > 0:
                    base = stat[6]
                    ceiling = stat[6]
                if anon >= 0 and (stat[4] or 0) >= 0:
                    unreclaimable = anon + (stat[4] or 0)
            else:
                self.note("some cgroup readings carry no memory.stat: their recorded usage is used as is")
        lim = w.limit.resolve(base)
        wrn = w.warn.resolve(base) if w.warn is not None else None
        if run.kind != "cgroup":
            self.fixed[rid] = (run.key, run.watch, lim, wrn)
        return Reading(run.key, run.watch, usage, lim, wrn, unreclaimable, ceiling)

    def set_host(self) -> None:
        h = self.host_raw
        if h is None:
            return
        freed = sum(self.freed.values())
        if freed:
            self.note("memory a replay-only kill would have freed is added back to MemAvailable "
                      "(an approximation: the kernel may not return all of it at once)")
        pressure = None
        if h[2] is not None or h[3] is not None:
            if h[4] is None and self.guard_on and (h[2] or h[3]):   # a stall it cannot weigh
                self.note("the trace has no PSI totals (written before trace format 3): the "
                          "guard's pressure triggers could not be replayed, only MemAvailable")
            pressure = Pressure(some_avg10=h[2] or 0.0, full_avg10=h[3] or 0.0,
                                some_total_us=h[4] or 0, full_total_us=h[5] or 0)
        if h[6] is not None and h[10] is None and self.guard_on and self.policy.config.guard.psi_io_full > 0:
            self.note("the trace has no I/O stall totals (written before trace format 4, or on a "
                      "kernel without /proc/pressure/io): the guard's psi_io_full trigger could "
                      "not be replayed")
        g = self.policy.config.guard
        swap_total = self.swap_total if h[8] is None else h[8]
        if h[11] is None and h[1] is not None and self.guard_on and g.predict > 0 and g.count_swap \
                and swap_total > 0:
            self.note("the trace has no SwapCached (written before trace format 5): the host "
                      "trend ([guard] predict) is replayed counting pages in the swap cache "
                      "twice (their RAM and their swap slot), as the daemon that wrote it did")
        self.host = HostSample(self.mem_total, min(self.mem_total, h[0] + freed),
                               swap_total, h[1], pressure, h[6], h[7], h[10], h[11])
        self.policy.zram = NO_ZRAM if h[9] is None else SwapDevices(*h[9])

    # -- the loop

    def run(self) -> None:
        samples = self.trace.iter_samples()
        heap, held, quiet = self.heap, self.held, self.policy.quiet
        for s in samples:
            t = s.t
            if t > self.end:
                for _ in samples:   # read to the end: its damage and runs are reported too
                    pass
                break
            if heap and heap[0][0] < t:
                self.advance(t)
            # a quiet reading changes nothing (Policy.quiet): tick only for the others, or
            # for the host when the guard may act
            active = self.apply(s)
            if t < self.start:
                continue
            if not self.started:
                self.started = True
                active = [rid for rid, r in held.items() if not quiet(r)]
            if active or (self.host is not None and (self.guard_on or self.policy.guard.victim)
                          and (s.host is not None or s.gone or s.decisions
                               or s.candidates is not None)):   # (the live guard looked)
                self.tick(t, active)
        if self.until_end:
            self.end = self.trace.end
        self.result.end = self.end
        self.advance(self.end + 1e-9)
        for h in self.trace.headers:   # the recorder's gaps (trace.Recorder._held_up)
            if all(isinstance(h.get(k), (int, float)) for k in ("dropped", "dropped_since", "w")):
                end = h["w"]   # the header's own wall clock: right in any boot of the ring
                self.note(f"the daemon's disk held its trace up: {h['dropped']} ticks from "
                          f"{_wall_clock(end - (h['m'] - h['dropped_since']))} to "
                          f"{_wall_clock(end)} were not recorded, and the replay saw nothing there")

    def apply(self, s) -> List[int]:
        """Take in one sample; the run ids whose new reading the policy is not quiet on."""
        active = []
        seen, held, fixed_of, killed = self.seen_at, self.held, self.fixed, self.killed
        quiet = self.policy.quiet
        t = s.t
        if s.candidates is not None:
            self.candidates = (t, s.candidates)
        if s.decisions:
            self.live_decisions(s)
        for rid, usage, limit, warn, stat in s.rows:
            seen[rid] = t
            if rid in killed:
                key = self.trace.runs[rid].key
                self.result.dropped[key] = self.result.dropped.get(key, 0) + 1
                continue
            fixed = fixed_of.get(rid)
            if fixed:   # a process (most rows): the same Reading with this usage
                r = held[rid] = _new_reading(Reading, (fixed[0], fixed[1], usage, fixed[2], fixed[3],
                                                       None, None))
            else:
                r = self.reading(rid, usage, limit, warn, stat)
                if r is None:
                    continue
                held[rid] = r
                self.rid_of[r.key] = rid
            if not quiet(r):
                active.append(rid)
        for rid in s.gone:
            key = self.trace.runs[rid].key
            self.held.pop(rid, None)
            self.due_at.pop(rid, None)
            self.policy.forget(key)
            self.freed.pop(key, None)   # the live run freed it too from here on
        if s.host is not None or s.gone or s.decisions:
            if s.host is not None:
                self.host_raw = s.host
            self.set_host()
        if s.gone and active:
            active = [rid for rid in active if rid in held]   # (gone in the same line)
        return active

    def live_decisions(self, s) -> None:
        """The live policy's decisions in this sample, each with its one-sample window
        (the time since that target's sample before this one)."""
        for d in s.decisions:
            key = tuple(d["key"])
            # Traces recorded before "by_guard" existed name the guard only by its watch name.
            by_guard = bool(d.get("by_guard", d.get("watch") == "guard"))
            live = Decision(s.t, key, d.get("watch"), d.get("kind"), d.get("reason"),
                            d.get("usage"), d.get("limit"), d.get("signal"), True, by_guard)
            if by_guard:
                self.name_victim(key)
            rid = self.rid_of.get(key)
            if rid is None:
                rid = next((r for r, u, *_ in s.rows if self.trace.runs[r].key == key), None)
            prev = self.seen_at.get(rid)
            live.window = None if prev is None else s.t - prev
            self.result.live.append(live)
            if by_guard and d.get("kind") == "signal" and not self.live_dry_run:
                self.freed.pop(key, None)
                self.live_stopped.add(key)

    def advance(self, until: float) -> None:
        """The virtual ticks before ``until``: targets not quiet, at their own intervals."""
        heap = self.heap
        while heap and heap[0][0] < until:
            due = heap[0][0]
            rids = []
            while heap and heap[0][0] == due:
                _, rid = heapq.heappop(heap)
                if self.due_at.get(rid) == due:
                    rids.append(rid)
            if rids and due >= self.start:
                self.tick(due, [r for r in rids if r != 0])

    def tick(self, t: float, rids: Sequence[int]) -> None:
        result = self.result
        result.ticks += 1
        held = self.held
        readings = [held[rid] for rid in dict.fromkeys(rids) if rid in held]
        result.readings += len(readings)
        policy = self.policy
        decisions = policy.evaluate(t, readings, self.host)
        host = self.host
        if host is not None and (self.guard_on or policy.guard.victim is not None):
            candidates = ()
            if policy.guard_wants_victim(t, host):
                candidates = self.guard_candidates(t)
            decisions += policy.guard_evaluate(t, host, candidates, ())
        for d in decisions:
            self.simulate(t, d)
        for r in readings:
            rid = self.rid_of[r.key]
            if rid not in held:
                continue
            if is_quiet(r, policy.states.get(r.key)):   # (a trend is fed recorded values only)
                self.due_at.pop(rid, None)
            else:
                due = t + policy.interval_for(r)
                self.due_at[rid] = due
                heapq.heappush(self.heap, (due, rid))
        if host is not None and (policy.guard.victim is not None
                                 or guard_level(self.config.guard, host)[0] is not None):
            due = t + policy.guard_interval(host)
            if self.due_at.get(0, -1.0) <= t:
                self.due_at[0] = due
                heapq.heappush(self.heap, (due, 0))

    def name_victim(self, key: tuple) -> None:
        """Remember the name of a guard victim that was no target (from the recorded list)."""
        if self.candidates is not None and key not in self.result.names:
            for c in self.candidates[1]:
                if (c[0], c[1]) == key[1:]:
                    self.result.names[key] = c[2]
                    break

    def guard_candidates(self, t: float) -> List[Candidate]:
        gone = self.stopped | set(self.freed)
        if self.candidates:
            at, cands = self.candidates   # the latest before t: samples come in time order
            if abs(at - t) > 1.0:
                self.note("the guard fired at a time the trace has no process list for: it chose "
                          "from the nearest one recorded")
            # a list's major faults are the moment it was taken: the same count again at
            # another time would read as a process whose pages never come back, so where the
            # live guard did not look, its own-faults rule is left out (pressure decides)
            fresh = abs(at - t) < 1e-3
            if not fresh and any(c[5] >= 0 for c in cands):
                self.note("the replayed guard looked where the live one did not: without the "
                          "processes' own page faults then, pressure and refaults decided alone")
            return [Candidate(("process", pid, start), pid, comm, cgroup, rss, uid, root_owned,
                              faults if fresh else -1)
                    for pid, start, comm, cgroup, rss, faults, uid, root_owned in cands
                    if ("process", pid, start) not in gone]
        self.note("the trace has no process list (the guard never fired while recording): the "
                  "replayed guard chose among the watched processes only")
        out = []
        for rid, r in self.held.items():
            run = self.trace.runs[rid]
            if r.key[0] == "process" and r.key not in gone:
                out.append(Candidate(r.key, r.key[1], run.comm, run.cgroup, r.usage))
        return out

    def simulate(self, t: float, d) -> None:
        sig = None if d.signal is None else signal.Signals(d.signal).name
        out = Decision(t, d.key, d.watch, d.kind, d.reason, d.usage, d.limit, sig, False, d.by_guard)
        self.result.decisions.append(out)
        if d.by_guard:
            self.name_victim(d.key)
        if d.kind != "signal":
            return
        rid = self.rid_of.get(d.key)
        if d.by_guard:
            if sig == "SIGTERM":
                self.note("a process the replayed guard sent SIGTERM is assumed to exit at once")
            self.stopped.add(d.key)
            if d.key not in self.live_stopped:   # (else the trace's figures have it freed)
                self.freed[d.key] = d.usage or 0
            self.policy.forget(d.key)
            if rid is not None and rid in self.held:
                self.kill(t, rid)
            self.set_host()
        elif sig == "SIGKILL" and rid is not None:
            self.freed[d.key] = self.held[rid].usage if rid in self.held else d.usage or 0
            self.kill(t, rid)
            self.policy.forget(d.key)
            self.set_host()

    def kill(self, t: float, rid: int) -> None:
        self.killed[rid] = t
        self.held.pop(rid, None)
        self.due_at.pop(rid, None)


def _match(result: Result) -> None:
    """Pair replay decisions with live ones (same target, kind, signal, reason, within one
    sample: the time since the sample before the live decision's, at most the slowest
    interval), then mark what comes after each target's first divergence."""
    daemon = result.config.daemon
    rec = result.trace.header.get("config", {}).get("daemon", {})
    from memwatchd.config import parse_duration
    try:
        rec_interval = parse_duration(rec.get("interval", "1s"), "interval")
    except ConfigError:
        rec_interval = daemon.interval
    result.tolerance = max(daemon.interval, rec_interval)
    live = [d for d in result.live if result.start <= d.t <= result.end]
    result.live = live
    for d in result.decisions:
        for l in live:
            window = result.tolerance if l.window is None else min(l.window, result.tolerance)
            if l.match is None and l.same_as(d) and abs(l.t - d.t) <= max(window, 1e-3):
                d.match, l.match = l, d
                break
    first: Dict[tuple, float] = {}
    for d in result.decisions + live:
        if d.match is None and d.kind != "warn":
            if d.t < first.get(d.key, float("inf")):
                first[d.key] = d.t
    result.diverged_at = first
    anywhere = min(first.values(), default=float("inf"))
    for d in result.decisions:
        since = anywhere if d.by_guard else first.get(d.key, float("inf"))
        d.diverged = d.t > since


# ------------------------------------------------------------------ output

def _mib(n) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def label(trace: Trace, key: tuple, names: Optional[Dict[tuple, str]] = None) -> str:
    """ "pid 123 (comm)" or "cgroup /x" (raw: escape before printing). A guard victim that was
    not a target is named from the candidate list it was chosen from (``Result.names``)."""
    if key[0] == "cgroup":
        return f"cgroup {key[1]}"
    run = next((r for r in trace.runs.values() if r.key == key), None)
    comm = run.comm if run else (names or {}).get(key, "")
    return f"pid {key[1]}" + (f" ({comm})" if comm else "")


def _clock(trace: Trace, t: float) -> str:
    return _wall_clock(trace.wall(t))


def _wall_clock(w: float) -> str:
    import time
    return time.strftime("%H:%M:%S", time.gmtime(w)) + f".{int((w % 1) * 1000):03d}"


def to_json(result: Result) -> List[dict]:
    """One object per replay decision, per live decision not reproduced, then a summary."""
    from memwatchd.report import escape
    trace = result.trace
    out = []
    for d in result.decisions:
        out.append({"type": "replay", "t": round(d.t - trace.start, 4),
                    "wall": round(trace.wall(d.t), 3), "watch": d.watch, "key": list(d.key),
                    "target": escape(label(trace, d.key, result.names)), "reason": d.reason, "usage_bytes": d.usage,
                    "limit_bytes": d.limit, "action": d.action, "signal": d.signal,
                    "live": None if d.match is None else {
                        "t": round(d.match.t - trace.start, 4), "delta_s": round(d.t - d.match.t, 4)},
                    "diverged": d.diverged})
    for l in result.live:
        if l.match is None:
            out.append({"type": "live-only", "t": round(l.t - trace.start, 4),
                        "wall": round(trace.wall(l.t), 3), "watch": l.watch, "key": list(l.key),
                        "target": escape(label(trace, l.key, result.names)), "reason": l.reason,
                        "usage_bytes": l.usage, "limit_bytes": l.limit, "action": l.action,
                        "signal": l.signal})
    out.append(summary(result))
    return out


def summary(result: Result) -> dict:
    same = sum(1 for d in result.decisions if d.match is not None)
    return {"type": "summary", "trace": result.trace.path, "config": result.config.source,
            "seconds": round(result.end - result.start, 3), "targets": len(result.trace.runs),
            "decisions": len(result.decisions), "reproduced": same,
            "new": len(result.decisions) - same,
            "live_not_taken": sum(1 for l in result.live if l.match is None),
            "diverged": {label(result.trace, k, result.names): round(t - result.trace.start, 4)
                         for k, t in result.diverged_at.items()},
            "dropped_readings": sum(result.dropped.values()),
            "tolerance_s": result.tolerance, "notes": list(result.notes),
            "damage": list(result.damage)}


def format_text(result: Result) -> str:
    from memwatchd.report import escape
    trace = result.trace
    lines = [f"replay of {trace.path} ({count(len(trace.runs), 'target')}, "
             f"{result.end - result.start:.1f} s from {_clock(trace, result.start)} UTC) "
             f"with {result.config.source}"]
    if result.decisions:
        lines.append(f"{'time':<12} {'+s':>8}  {'target':<30} {'usage':>10} {'limit':>10}  "
                     f"{'action':<6} {'reason':<22} live")
    for d in result.decisions:
        if d.match is not None:
            live = f"same ({d.t - d.match.t:+.3f}s)"
        else:
            live = "not taken live"
        if d.diverged:
            live += ", after a divergence"
        target = escape(f"{d.watch}: {label(trace, d.key, result.names)}")
        lines.append(f"{_clock(trace, d.t):<12} {d.t - trace.start:>8.3f}  {target[:30]:<30} "
                     f"{_mib(d.usage):>10} {_mib(d.limit):>10}  {d.action:<6} {d.reason:<22} {live}")
    missed = [l for l in result.live if l.match is None]
    if missed:
        lines.append("live decisions the replay did not take:")
        for l in missed:
            lines.append(f"{_clock(trace, l.t):<12} {l.t - trace.start:>8.3f}  "
                         f"{escape(f'{l.watch}: {label(trace, l.key, result.names)}')[:30]:<30} {_mib(l.usage):>10} "
                         f"{_mib(l.limit):>10}  {l.action:<6} {l.reason}")
    s = summary(result)
    lines.append(f"{count(s['decisions'], 'decision')}: {s['reproduced']} as live, {s['new']} not taken live; "
                 f"{count(s['live_not_taken'], 'live decision')} not taken by the replay")
    for key, t in sorted(result.diverged_at.items(), key=lambda kv: kv[1]):
        dropped = result.dropped.get(key, 0)
        lines.append(f"diverged: {escape(label(trace, key, result.names))} from +{t - trace.start:.3f}s"
                     + (f" ({count(dropped, 'later reading')} ignored: the replay killed it)" if dropped else ""))
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def parse_time(value: str, trace: Trace, where: str) -> float:
    """--from/--to: seconds into the trace ("90s", "5m", "0") or a UTC time
    ("2026-12-01T08:40:00" or "08:40:00" on the trace's first day)."""
    from memwatchd.config import parse_duration
    text = value.strip()
    if ":" in text:
        import datetime
        try:
            if "T" in text or "-" in text:
                when = datetime.datetime.fromisoformat(text.rstrip("Z"))
            else:
                day = datetime.datetime.fromtimestamp(trace.wall0, datetime.timezone.utc).date()
                when = datetime.datetime.combine(day, datetime.time.fromisoformat(text))
        except ValueError:
            raise ConfigError(f"{where}: expected seconds into the trace (90s, 5m) or a UTC time "
                              f"(2026-12-01T08:40:00, 08:40:00), got {value!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        return trace.start + (when.timestamp() - trace.wall0)
    return trace.start + parse_duration(text, where)


def replay_file(path: str, config: Optional[Config] = None, t_from: Optional[str] = None,
                t_to: Optional[str] = None) -> Result:
    """Replay a trace file or ring directory as it is read (a stream: memory does not grow
    with the trace)."""
    trace = open_trace(path, stats=False)
    start = parse_time(t_from, trace, "--from") if t_from else None
    end = parse_time(t_to, trace, "--to") if t_to else None
    return replay(trace, config, start, end)
