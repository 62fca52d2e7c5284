"""`memwatchd suggest`: what limit does a job need, learnt from the runs in traces.

Per watch, every run's peak. A run that finished on its own is complete: its peak is
what it needed. A run that memwatchd stopped, that the kernel's OOM killer hit, or that
was still running when the trace ended is right-censored: its peak is only a lower
bound. Censored peaks are reported, never folded in as if complete; folding them in is
the feedback loop of Kubernetes' VPA (a limit-capped peak raises the next limit a
little, forever, or caps it where it was).

limit = max(weighted percentile of complete peaks * (1 + margin), largest complete
peak * 1.05), rounded up to two significant figures; weights halve every half-life of
age (a run a week older counts half). warn = the percentile itself, at most 90% of the
limit. Then the suggested limits are replayed over the same traces.
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, Optional, Sequence

from memwatchd.config import Size, parse_duration
from memwatchd.replay import recorded_config, replay
from memwatchd.report import count
from memwatchd.trace import Run, Trace, TraceError, open_trace, read_runs
from memwatchd.types import ConfigError, MemwatchdError

FLOOR = 1.05        # the limit clears the largest complete peak by this factor
WARN_CAP = 0.9      # warn at most this share of the limit
MiB = 2**20


def parse_half_life(text: str) -> float:
    text = text.strip()
    if text.endswith("d") and text[:-1].replace(".", "", 1).isdigit():
        return float(text[:-1]) * 86400.0
    return parse_duration(text, "--half-life") or float("inf")


def round_up(n: float) -> int:
    """Up to two significant figures of MiB (1234.5 MiB -> 1300 MiB), at least 1 MiB."""
    mib = max(1.0, n / MiB)
    step = 10 ** max(0, math.floor(math.log10(mib)) - 1)
    return int(math.ceil(mib / step - 1e-9) * step) * MiB


def size_text(n: int) -> str:
    mib = n // MiB
    return f"{mib // 1024}G" if mib >= 1024 and mib % 1024 == 0 else f"{mib}M"


def weighted_percentile(values: Sequence[float], weights: Sequence[float], p: float) -> float:
    pairs = sorted(zip(values, weights))
    total = sum(weights)
    acc = 0.0
    for v, w in pairs:
        acc += w
        if acc >= total * p / 100.0 - 1e-12:
            return v
    return pairs[-1][0]


class RunView:
    """One run as suggest sees it: peak, how it ended, whether its peak is complete."""

    def __init__(self, trace: Trace, run: Run, ended: str):
        self.trace, self.run = trace, run
        self.peak = run.peak
        self.ended = ended          # finished | stopped | oom-killed | running
        self.complete = ended == "finished"
        self.end_wall = trace.wall(run.gone if run.gone is not None else trace.end)
        self.weight = 1.0

    def label(self) -> str:
        from memwatchd.replay import label
        return label(self.trace, self.run.key)


class WatchSuggestion:
    def __init__(self, watch: str, spec: Optional[dict]):
        self.watch = watch
        self.spec = spec or {}
        self.runs: List[RunView] = []
        self.limit: Optional[int] = None
        self.warn: Optional[int] = None
        self.percentile_peak: Optional[int] = None
        self.why = ""
        self.stopped_by_replay: List[str] = []
        self.replayed_runs = 0
        self.percentile = 95.0

    @property
    def complete(self) -> List[RunView]:
        return [r for r in self.runs if r.complete]

    @property
    def censored(self) -> List[RunView]:
        return [r for r in self.runs if not r.complete]


class Report:
    def __init__(self):
        self.watches: Dict[str, WatchSuggestion] = {}
        self.traces: List[Trace] = []
        self.damage: List[str] = []
        self.settings: dict = {}

    def to_json(self) -> dict:
        out = {"settings": self.settings, "traces": [t.path for t in self.traces], "watches": []}
        for w in self.watches.values():
            out["watches"].append({
                "watch": w.watch, "limit_bytes": w.limit, "warn_bytes": w.warn,
                "percentile_peak_bytes": w.percentile_peak, "why": w.why,
                "runs": [{"target": r.label(), "trace": r.trace.path, "peak_bytes": r.peak,
                          "ended": r.ended, "complete": r.complete, "weight": round(r.weight, 4),
                          "seconds": round((r.run.gone or r.trace.end) - r.run.first, 3)}
                         for r in w.runs],
                "replay": {"runs": w.replayed_runs, "stopped": w.stopped_by_replay}})
        out["damage"] = self.damage
        return out

    def text(self) -> str:
        lines = []
        for w in self.watches.values():
            lines.append(f"watch {w.watch}: {count(len(w.runs), 'run')}, {len(w.complete)} finished on "
                         f"their own, {len(w.censored)} censored")
            for r in w.runs:
                seconds = (r.run.gone or r.trace.end) - r.run.first
                bound = "" if r.complete else " (a lower bound: " + {
                    "stopped": "memwatchd stopped it", "oom-killed": "the kernel OOM-killed it",
                    "running": "still running when the trace ended"}[r.ended] + ")"
                lines.append(f"  {r.label()[:40]:<40} peak {r.peak / MiB:>9.1f} MiB  {seconds:>8.1f} s  "
                             f"{r.ended}{bound}")
            lines.append(f"  -> {w.why}")
        lines.append("")
        lines.append("# suggested by `memwatchd suggest` (paste over the matching [[watch]] keys)")
        for w in self.watches.values():
            if w.limit is None:
                lines.append(f"# watch {w.watch}: no suggestion ({w.why})")
                continue
            lines.append("[[watch]]")
            lines.append(f"name = {json.dumps(w.watch)}")
            lines.extend(_selector_lines(w))
            lines.append(f"limit = \"{size_text(w.limit)}\"      # {_why_short(w)}")
            if w.warn is not None:
                lines.append(f"warn = \"{size_text(w.warn)}\"")
            lines.append("")
        lines.append("replay of the suggested limits over the same traces:")
        for w in self.watches.values():
            if w.limit is None:
                continue
            k, n = len(w.stopped_by_replay), w.replayed_runs
            lines.append(f"  {w.watch}: limit {size_text(w.limit)} would have stopped {k} of "
                         f"{count(n, 'recorded run')}" + (f": {', '.join(w.stopped_by_replay)}" if k else ""))
        return "\n".join(lines)


def _why_short(w: WatchSuggestion) -> str:
    return (f"p{w.percentile:g} of {count(len(w.complete), 'finished run')} {w.percentile_peak / MiB:.0f} MiB "
            f"+ margin; largest {max(r.peak for r in w.complete) / MiB:.0f} MiB")


def _selector_lines(w: WatchSuggestion) -> List[str]:
    spec = w.spec
    for kind in ("pidfile", "unit", "cgroup", "cmdline"):
        if kind in spec:
            return [f"{kind} = {json.dumps(spec[kind])}"]
    cmd = next((r.run.cmdline for r in w.runs if r.run.cmdline), "")
    warn = f" --warn {size_text(w.warn)}" if w.warn is not None else ""
    return [f"# recorded by pid (a command); for its next run: memwatchd watch --limit "
            f"{size_text(w.limit)}{warn} -- {json.dumps(cmd)[1:-1][:200]}",
            "# in the daemon's config, give it a selector: pidfile, unit, cgroup or cmdline"]


def _events_stopped(path: str) -> tuple:
    """(process keys, [(cgroup, wall time)]) that an events file says memwatchd stopped for real."""
    procs, cgroups = set(), []
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise MemwatchdError(f"{path}: cannot read: {e.strerror}") from None
    import datetime
    with f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or rec.get("type") != "decision" or rec.get("dry_run"):
                continue
            if rec.get("action") not in ("term", "kill", "freeze"):
                continue
            if rec.get("scope") == "cgroup" or rec.get("pid") is None:
                try:
                    when = datetime.datetime.fromisoformat(str(rec.get("time")).rstrip("Z")).replace(
                        tzinfo=datetime.timezone.utc).timestamp()
                except ValueError:
                    continue
                cgroups.append((rec.get("cgroup"), when))
            else:
                procs.add(("process", rec.get("pid"), rec.get("start_time")))
    return procs, cgroups


def _ended(trace: Trace, run: Run, stopped_procs, stopped_cgroups) -> str:
    key = run.key
    if key in stopped_procs:
        return "stopped"
    for t, e in trace.events:   # the records say what was really sent (dry run or not)
        if e.get("type") == "decision" and not e.get("dry_run") and \
                e.get("action") in ("term", "kill", "freeze") and \
                run.first <= t <= (run.gone if run.gone is not None else trace.end) + 1.0:
            ekey = ("cgroup", e.get("cgroup")) if e.get("scope") == "cgroup" else \
                ("process", e.get("pid"), e.get("start_time"))
            if ekey == key:
                return "stopped"
    if key[0] == "cgroup":
        lo, hi = trace.wall(run.first), trace.wall(run.gone if run.gone is not None else trace.end)
        if any(c == key[1] and lo <= w <= hi + 30 for c, w in stopped_cgroups):
            return "stopped"
        if run.oom_kills is not None and run.oom_kills[1] > run.oom_kills[0]:
            return "oom-killed"   # memory.events oom_kill went up during the run
    if run.gone is None:
        return "running"
    return "finished"


def suggest(paths: Sequence[str], events_path: Optional[str] = None, percentile: float = 95.0,
            margin: float = 0.2, half_life: float = 7 * 86400.0) -> Report:
    if not 0 < percentile <= 100:
        raise ConfigError(f"--percentile: expected a number above 0 and at most 100, got {percentile}")
    if not 0 <= margin <= 10:
        raise ConfigError(f"--margin: expected 0 to 1000 (percent), got {margin * 100:g}")
    report = Report()
    report.settings = {"percentile": percentile, "margin": margin, "half_life_s": half_life}
    procs, cgroups = _events_stopped(events_path) if events_path else (set(), [])
    for path in paths:
        trace = read_runs(path)   # peaks and ends; the samples are not kept
        report.traces.append(trace)
        report.damage.extend(trace.damage)
        specs = {w.get("name"): w for w in trace.header.get("config", {}).get("watch", [])
                 if isinstance(w, dict)}
        for run in trace.runs.values():
            if not run.watch or not run.samples:
                continue
            w = report.watches.get(run.watch)
            if w is None:
                w = report.watches[run.watch] = WatchSuggestion(run.watch, specs.get(run.watch))
                w.percentile = percentile
            w.runs.append(RunView(trace, run, _ended(trace, run, procs, cgroups)))
    if not report.watches:
        raise TraceError(f"{', '.join(paths)}: no target readings in the {'trace' if len(paths) == 1 else 'traces'}: nothing to learn from")
    for w in report.watches.values():
        _recommend(w, percentile, margin, half_life)
    _replay_suggestions(report)
    return report


def _recommend(w: WatchSuggestion, percentile: float, margin: float, half_life: float) -> None:
    complete = w.complete
    censored = w.censored
    if not complete:
        low = max((r.peak for r in censored), default=0)
        w.why = (f"no run finished on its own, so no peak is known: the censored ones needed at "
                 f"least {low / MiB:.0f} MiB; let one finish (a higher limit, or record it) first")
        return
    newest = max(r.end_wall for r in w.runs)
    for r in w.runs:
        age = max(0.0, newest - r.end_wall)
        r.weight = 0.5 ** (age / half_life) if half_life != float("inf") else 1.0
    peaks = [r.peak for r in complete]
    p = weighted_percentile(peaks, [r.weight for r in complete], percentile)
    largest = max(peaks)
    w.percentile_peak = p
    w.limit = round_up(max(p * (1 + margin), largest * FLOOR))
    warn = round_up(p)
    w.warn = warn if warn < w.limit * WARN_CAP else None
    if w.warn is None:
        w.warn = int(w.limit * WARN_CAP) // MiB * MiB or None
    why = (f"limit {size_text(w.limit)}: p{percentile:g} of {count(len(complete), 'finished run')} "
           f"{p / MiB:.1f} MiB + {margin * 100:g}%, never below the largest finished peak "
           f"{largest / MiB:.1f} MiB")
    over = [r for r in censored if r.peak >= w.limit]
    if censored:
        why += (f"; {count(len(censored), 'censored run')} not counted (their peaks are lower bounds)")
    if over:
        why += (f"; {len(over)} of them already passed {size_text(w.limit)} before they ended: if "
                "they were legitimate, their need is unknown (raise the limit and record again)")
    w.why = why


def _replay_suggestions(report: Report) -> None:
    """Replay each trace with its recorded config, the suggested limit and warn put in."""
    for trace in report.traces:
        try:
            config = recorded_config(trace)
        except MemwatchdError as e:
            report.damage.append(str(e))
            continue
        names = {w.name for w in config.watches}
        watches = []
        for wc in config.watches:
            s = report.watches.get(wc.name)
            if s is not None and s.limit is not None:
                wc = wc._replace(limit=Size(bytes=s.limit),
                                 warn=Size(bytes=s.warn) if s.warn is not None and s.warn < s.limit else None)
            watches.append(wc)
        config = config._replace(watches=tuple(watches), source="suggested limits")
        result = replay(open_trace(trace.path, stats=False), config)   # a second pass
        stopped = result.stopped()
        for run in trace.runs.values():
            s = report.watches.get(run.watch)
            if s is None or s.limit is None or run.watch not in names or not run.samples:
                continue
            s.replayed_runs += 1
            if run.key in stopped:
                s.stopped_by_replay.append(f"{RunView(trace, run, '').label()} at "
                                           f"{stopped[run.key].usage / MiB:.0f} MiB")
