"""`memwatchd status` and `memwatchd events`: the data, and its Rich rendering.

CLI side only (it imports Rich; the daemon never imports this module). The data
is plain JSON-able dicts, so `--json` prints exactly what the table shows.
Every string a process chose (comm, cmdline, cgroup names) reaches Rich as
Text, never as markup: a process named "[red]x" cannot paint the screen.
"""
from __future__ import annotations

import datetime
import os
import time
from typing import Any, Dict, Iterable, List, Optional

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from memwatchd import report, state
from memwatchd.config import CGROUP_ROOT, Config
from memwatchd.types import AccessDenied

_MESSAGES = {
    "running": "memwatchd is running",
    "stale": "memwatchd (pid {pid}) is alive but has not written its state for {age:.0f} s: "
             "it may be stuck or stopped; sampled once instead",
    "dead": "memwatchd is not running (its last state names pid {pid}, which is gone); sampled once",
    "none": "memwatchd is not running (no state file {path}); sampled once",
    "off": "the state file is off in the config ([daemon] state = \"\"); sampled once",
}


# --------------------------------------------------------------------- status

def collect(config: Config, proc_root: str = "/", cgroup_root: str = CGROUP_ROOT) -> Dict[str, Any]:
    """The status view: the daemon's own state when it runs, else one sample taken here."""
    path = config.daemon.state
    saved, problem = None, ""
    if path:
        try:
            saved = state.read_state(path)
        except PermissionError:
            raise AccessDenied(f"cannot read the state file {path}: permission denied "
                               "(it is root's: try sudo)") from None
        except (OSError, ValueError) as e:
            problem = str(e)
    liveness = state.liveness(saved, proc=os.path.join(proc_root, "proc")) if path else "off"
    if liveness == "running":
        view = saved
        view["running"] = True
        view["source"] = "state"
        view["message"] = _MESSAGES["running"]
    else:
        view = sample_once(config, proc_root, cgroup_root)
        view["running"] = False
        view["source"] = "sample"
        daemon = (saved or {}).get("daemon") or {}
        age = state.boottime() - (saved or {}).get("written_boottime", 0)
        view["message"] = _MESSAGES[liveness].format(pid=daemon.get("pid"), age=age, path=path)
        if problem:
            view["message"] = f"memwatchd's state file is unreadable ({problem}); sampled once"
        if liveness in ("stale", "dead") and saved:
            view["last_state"] = {"written_at": saved.get("written_at"), "daemon": daemon}
            if not view["recent_actions"]:
                view["recent_actions"] = saved.get("recent_actions") or []
    view["state_file"] = path or None
    view["age_seconds"] = age = max(0.0, state.boottime() - view["written_boottime"])
    for row in view["targets"]:   # as of now, not as of the state write
        if row.get("sample_age_seconds") is not None:
            row["sample_age_seconds"] = round(row["sample_age_seconds"] + age, 6)
    return view


def sample_once(config: Config, proc_root: str = "/", cgroup_root: str = CGROUP_ROOT) -> Dict[str, Any]:
    """Resolve and sample every configured target once, as the daemon would."""
    from memwatchd.targets import TargetSet, ancestors

    never = ancestors(os.getpid(), os.path.join(proc_root, "proc"))
    targets = TargetSet(config, proc_root, cgroup_root, never)
    now = time.monotonic()
    targets.refresh(now)
    while targets.busy:   # a cmdline pass spans ticks in the daemon; here, finish it now
        now = time.monotonic()
        targets.refresh(now)
    targets.sample_due(now, force=True)
    recent = recent_from_events(config.daemon.events) if config.daemon.events else []
    last = {state.action_key(entry): entry for entry in recent}
    view = state.build_view(targets.targets.values(), targets.host.read(), now, config,
                            None, recent, last)
    view["problems"] = [report.escape(p) for p in targets.problems]
    return view


def recent_from_events(path: str, n: int = state.RECENT) -> List[Dict[str, Any]]:
    """The last n actions of an events file, as the state file lists them."""
    try:
        entries = pair_events(report.iter_events(path))
    except OSError:
        return []
    out = []
    for e in entries[-n:]:
        summary = state.action_summary(e)
        o = e.get("outcome")
        if o:
            summary["outcome"] = {k: o.get(k) for k in
                                  ("exited", "seconds_to_exit", "freed_bytes", "escalated")}
        out.append(summary)
    return out


# --------------------------------------------------------------------- events

def pair_events(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each decision with its outcome (same id) under "outcome" (None: none recorded).

    Outcomes whose decision is missing (e.g. its line was torn) are dropped."""
    decisions: Dict[str, Dict[str, Any]] = {}
    for record in records:
        kind, event_id = record.get("type"), record.get("id")
        if not isinstance(event_id, str):
            continue
        if kind == "decision":
            decisions[event_id] = dict(record, outcome=None)
        elif kind == "outcome" and event_id in decisions:
            decisions[event_id]["outcome"] = record
    return list(decisions.values())


def parse_time(text: Any) -> Optional[float]:
    """Unix time from a record's "2024-05-01T12:00:00.123Z"; None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return None
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def select_events(path: str, since: Optional[float] = None, target: Optional[str] = None,
                  now: Optional[float] = None) -> report.Events:
    """The paired events of a file, newer than `since` seconds ago and of `target` if given.
    The result's .skipped counts unreadable lines (a torn last line, after a crash)."""
    records = report.read_events(path)
    cutoff = None if since is None else (time.time() if now is None else now) - since
    out = report.Events()
    for e in pair_events(records):
        if target is not None and e.get("target") != target:
            continue
        when = parse_time(e.get("time"))
        if cutoff is not None and (when is None or when < cutoff):
            continue
        out.append(e)
    out.skipped = records.skipped
    return out


# ------------------------------------------------------------------ rendering

def size(n: Optional[float]) -> str:
    """1536 -> "1.5 KiB"; None -> "-"."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, mult in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= mult:
            return f"{sign}{n / mult:.1f} {unit}"
    return f"{sign}{int(n)} B"


def short_size(n: Optional[float]) -> str:
    """A table cell like top's: 1.8M, 1022M, 20.6G (binary units)."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, mult in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= mult:
            v = n / mult
            return f"{sign}{v:.1f}{unit}" if v < 100 else f"{sign}{v:.0f}{unit}"
    return f"{sign}{int(n)}B"


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def local_time(text: Any, now: Optional[float] = None) -> str:
    """A record's UTC time in local time; only the clock time if it is from today (as of now)."""
    when = parse_time(text)
    if when is None:
        return str(text)
    if now is not None and time.localtime(when)[:3] == time.localtime(now)[:3]:
        return time.strftime("%H:%M:%S", time.localtime(when))
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def _percent_style(usage: int, limit: int, warn: Optional[int]) -> str:
    if usage >= limit:
        return "bold red"
    if (warn is not None and usage >= warn) or usage >= 0.9 * limit:
        return "yellow"
    return "green"


def _what(row: Dict[str, Any]) -> Text:
    if row.get("pid") is None:
        return Text(row.get("cgroup") or "")
    return Text(f"{row['pid']} {row.get('comm') or ''}".rstrip())


def _action_text(action: Optional[Dict[str, Any]], now: float) -> Text:
    if not action:
        return Text("-", style="dim")
    warn = action.get("action") == "warn"
    what = "warn" if warn else f"{action.get('signal') or action.get('action')} {action.get('reason')}"
    when = parse_time(action.get("time"))
    ago = f" {duration(now - when)} ago" if when is not None else ""
    extra = " (dry run)" if action.get("dry_run") else ""
    return Text(f"{what}{ago}{extra}", style="yellow" if warn else "red")


def status_renderable(view: Dict[str, Any], now: Optional[float] = None) -> Group:
    """The whole `status` screen: headline, host line, targets table, recent actions."""
    now = time.time() if now is None else now
    parts: List[Any] = []
    daemon = view.get("daemon") or {}
    if view.get("running"):
        head = Text("● ", style="bold green")
        head.append(f"memwatchd {daemon.get('version', '')} running: pid {daemon.get('pid')}, "
                    f"up {duration(now - daemon.get('started_at', now))}, "
                    f"RSS {size(daemon.get('rss_bytes'))}, sampler {daemon.get('sampler')}, "
                    f"{daemon.get('actions_taken', 0)} action(s)"
                    f"{', DRY RUN' if view.get('dry_run') else ''}; "
                    f"state {duration(view.get('age_seconds'))} old")
    else:
        head = Text("○ ", style="bold red")
        head.append(view.get("message", "memwatchd is not running"))
    parts.append(head)

    host = view.get("host") or {}
    line = Text("host: ")
    if host:
        total, avail = host["mem_total_bytes"], host["mem_available_bytes"]
        share = avail / total if total else 0
        line.append(f"MemAvailable {size(avail)} of {size(total)} ({share:.0%})",
                    style="green" if share > 0.2 else ("yellow" if share > 0.1 else "bold red"))
        psi = host.get("psi")
        if psi:
            line.append(f" · PSI avg10 some {psi['some_avg10']:.2f}% full {psi['full_avg10']:.2f}%",
                        style="bold red" if psi["full_avg10"] >= 10 else
                        ("yellow" if psi["some_avg10"] >= 10 else ""))
        else:
            line.append(" · no PSI")
    parts.append(line)
    guard = view.get("guard") or {}
    if guard.get("enabled") and guard.get("term_below_bytes") is not None:
        parts.append(Text(f"guard: SIGTERM the largest process below {size(guard['term_below_bytes'])}"
                          f" available, SIGKILL below {size(guard['kill_below_bytes'])}"))
    elif guard:
        parts.append(Text("guard: off"))
    for problem in view.get("problems") or ():
        parts.append(Text(f"note: {problem}", style="yellow"))

    table = _table(("target", "left"), ("kind", "left"), ("pid/cgroup", "left"),
                   ("usage", "right"), ("limit", "right"), ("%", "right"),
                   ("headroom", "right"), ("age", "right"), ("last action", "left"))
    for row in view.get("targets") or ():
        usage, limit = row.get("usage_bytes"), row.get("limit_bytes")
        if usage is not None and limit:
            pct = Text(f"{usage / limit:.0%}", style=_percent_style(usage, limit, row.get("warn_bytes")))
        else:
            pct = Text("-")
        headroom = row.get("headroom_bytes")
        table.add_row(Text(row["target"]), row.get("kind", ""), _what(row), short_size(usage),
                      short_size(limit), pct,
                      Text(short_size(headroom),
                           style="bold red" if headroom is not None and headroom <= 0 else ""),
                      duration(row.get("sample_age_seconds")),
                      _action_text(row.get("last_action"), now))
    if view.get("targets"):
        parts.append(table)
    else:
        watches = view.get("watches") or []
        parts.append(Text("no targets: " + (f"{', '.join(watches)} matched nothing" if watches
                                            else "no [[watch]] in the config (the guard alone)"),
                          style="dim"))
    recent = view.get("recent_actions") or []
    if recent:
        parts.append(Text("recent actions:", style="bold"))
        for a in recent[-5:]:
            who = f"{a['pid']} {a.get('comm') or ''}" if a.get("pid") is not None \
                else (a.get("cgroup") or "")
            outcome = a.get("outcome") or {}
            if outcome.get("exited"):
                fate = f": exited after {duration(outcome.get('seconds_to_exit'))}"
            elif outcome:
                fate = ": did not exit"
            else:
                fate = ""
            parts.append(Text(f"  {local_time(a.get('time'), now)} {a.get('target')} "
                              f"{a.get('signal') or a.get('action')} {who} "
                              f"{short_size(a.get('usage_bytes'))}/{short_size(a.get('limit_bytes'))} "
                              f"{a.get('reason')}{' (dry run)' if a.get('dry_run') else ''}{fate}"))
    return Group(*parts)


def _table(*columns) -> Table:
    """Columns: (name, justify); only the free-text ones (a name, a path, an action) wrap."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0,
                  header_style="bold")
    for name, justify in columns:
        free = name in ("target", "pid/cgroup", "reason", "last action")
        table.add_column(name, justify=justify, overflow="fold", no_wrap=not free,
                         min_width=8 if free else None)
    return table


def events_table(events: List[Dict[str, Any]], now: Optional[float] = None) -> Table:
    now = time.time() if now is None else now
    table = _table(("when", "left"), ("target", "left"), ("pid/cgroup", "left"),
                   ("usage/limit", "right"), ("reason", "left"), ("action", "left"),
                   ("died after", "right"), ("freed", "right"))
    for e in events:
        who = _what(e)
        action = e.get("signal") or e.get("action") or "?"
        if e.get("dry_run"):
            action += " (dry run)"
        outcome = e.get("outcome")
        if outcome is None:
            died = Text("-" if e.get("dry_run") or e.get("action") in ("warn", "throttle", "freeze")
                        else "no outcome", style="dim")
            freed = "-"
        elif outcome.get("exited"):
            died = Text(duration(outcome.get("seconds_to_exit")))
            freed = short_size(outcome.get("freed_bytes"))
        else:
            died = Text("did not exit", style="bold red")
            freed = "-"
        table.add_row(local_time(e.get("time"), now), Text(str(e.get("target"))), who,
                      f"{short_size(e.get('usage_bytes'))}/{short_size(e.get('limit_bytes'))}",
                      Text(str(e.get("reason"))), Text(action,
                                                       style="yellow" if e.get("action") == "warn" else "red"),
                      died, freed)
    return table


def console(**kw) -> Console:
    return Console(highlight=False, **kw)
