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
    for row in view["targets"] + [view.get("host") or {}]:   # as of now, not of the write
        if row.get("sample_age_seconds") is not None:
            row["sample_age_seconds"] = round(row["sample_age_seconds"] + age, 6)
    return view


def sample_once(config: Config, proc_root: str = "/", cgroup_root: str = CGROUP_ROOT) -> Dict[str, Any]:
    """Resolve and sample every configured target once, as the daemon would."""
    from memwatchd.targets import TargetSet, ancestors

    never = ancestors(os.getpid(), os.path.join(proc_root, "proc"))
    targets = TargetSet(config, proc_root, cgroup_root, never, events=False)   # one sample
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
                  until: Optional[float] = None) -> report.Events:
    """The paired events of a file at or after `since` and before `until` (Unix times, as
    parse_when() gives them), of `target` if given. The result's .skipped counts unreadable
    lines (a torn last line, after a crash); .size is how many bytes were read, where
    follow_records() goes on."""
    size = os.path.getsize(path) if os.path.exists(path) else 0
    read = {"whole": 0}
    records = report.Events(_records(path, 0, size, read))
    records.skipped = sum(1 for r in records if r is None)
    out = report.Events()
    for e in pair_events(r for r in records if r is not None):
        if target is not None and e.get("target") != target:
            continue
        when = parse_time(e.get("time"))
        if since is not None and (when is None or when < since):
            continue
        if until is not None and (when is None or when >= until):
            continue
        out.append(e)
    out.skipped = records.skipped
    out.size = read["whole"]     # after the last whole line: a record still being written is followed
    return out


def _records(path: str, start: int, end: int,
             read: Optional[Dict[str, int]] = None) -> Iterable[Optional[Dict[str, Any]]]:
    """The records in bytes [start, end) of an events file; None for each unreadable line.
    read["whole"] is set to the offset after the last line that ended in a newline."""
    import json
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(start)
        pos = start
        for raw in f:                  # line by line: a big events file is never read whole
            pos += len(raw)
            if pos > end:              # written after we looked: --follow reads it
                break
            if read is not None and raw.endswith(b"\n"):
                read["whole"] = pos
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            yield report.upgrade_record(record) if isinstance(record, dict) else None


def follow_records(path: str, offset: int = 0, target: Optional[str] = None,
                   poll: float = 0.5) -> Iterable[Dict[str, Any]]:
    """`events --follow`: every record appended after offset, as it is written (forever).

    Only whole lines are read (a record being written waits for its newline); a file
    that was replaced or truncated (log rotation) is read again from its start. Outcomes
    are shown for the decisions of `target` (they carry no target of their own)."""
    inode = None
    ids: set = set()
    while True:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if inode is not None and (st.st_dev, st.st_ino) != inode or st.st_size < offset:
                offset = 0
            inode = (st.st_dev, st.st_ino)
            if st.st_size > offset:
                with open(path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read(st.st_size - offset)
                whole = chunk[:chunk.rfind(b"\n") + 1]
                offset += len(whole)
                for record in _records_of(whole):
                    if target is not None:
                        if record.get("type") == "decision" and record.get("target") == target:
                            ids.add(record.get("id"))
                        elif record.get("id") not in ids:
                            continue
                    yield record
        time.sleep(poll)


def _records_of(data: bytes) -> Iterable[Dict[str, Any]]:
    import json
    for raw in data.splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield report.upgrade_record(record)


def record_line(record: Dict[str, Any], now: Optional[float] = None) -> str:
    """One followed record as one line: a decision, or the outcome of one."""
    when = local_time(record.get("time"), time.time() if now is None else now)
    if record.get("type") == "outcome":
        fate = (f"exited after {duration(record.get('seconds_to_exit'))}, freed "
                f"{size(record.get('freed_bytes'))}" if record.get("exited") else "did not exit")
        return f"{when} outcome of {record.get('id')}: {fate}"
    who = (f"pid {record.get('pid')} {record.get('comm') or ''}".rstrip()
           if record.get("pid") is not None else f"container {record['container']}"
           if record.get("container") else f"cgroup {record.get('cgroup')}")
    what = record.get("signal") or record.get("action")
    return (f"{when} {record.get('target')} {what}{' (dry run)' if record.get('dry_run') else ''} "
            f"{who} {size(record.get('usage_bytes'))}/{size(record.get('limit_bytes'))} "
            f"{record.get('reason')} [{record.get('id')}]")


_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1, "sec": 1, "second": 1,
          "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600,
          "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400, "w": 604800,
          "week": 604800, "weeks": 604800}


def parse_when(text: str, where: str, now: Optional[float] = None) -> float:
    """A point in time as journalctl --since/--until read it (local time), as a Unix time.

    "now", "today", "yesterday", "tomorrow"; "2026-12-01", "2026-12-01 07:00[:05]",
    "07:00[:05]" (today); "@1764572400"; a relative time "-1h", "+30m", "1h ago",
    "2 days ago", and (memwatchd's own shorthand, as before) a bare "1d", "90s" = ago.
    Raises ConfigError naming the flag."""
    import re
    from memwatchd.types import ConfigError
    now = time.time() if now is None else now
    raw = text
    text = text.strip().lower()
    today = datetime.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
    days = {"today": 0, "yesterday": -1, "tomorrow": 1}
    if text == "now":
        return now
    if text in days:
        return (today + datetime.timedelta(days=days[text])).timestamp()
    if text.startswith("@"):
        try:
            return float(text[1:])
        except ValueError:
            pass
    m = re.fullmatch(r"([+-]?)\s*((?:[0-9.]+\s*[a-z]+\s*)+?)\s*(ago|left)?", text)
    if m and not re.fullmatch(r"[0-9.]+", m.group(2).strip()):
        seconds = 0.0
        parts = re.findall(r"([0-9]+(?:\.[0-9]*)?)\s*([a-z]+)", m.group(2))
        if parts and all(unit in _UNITS for _, unit in parts) and \
                "".join(n + u for n, u in parts) == re.sub(r"\s+", "", m.group(2)):
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
            forward = m.group(1) == "+" or m.group(3) == "left"
            return now + seconds if forward else now - seconds
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y-%m-%dt%H:%M:%S",
                "%Y-%m-%dt%H:%M"):
        try:
            return datetime.datetime.strptime(text, fmt).timestamp()
        except ValueError:
            pass
    for fmt in ("%H:%M:%S", "%H:%M"):
        try:
            t = datetime.datetime.strptime(text, fmt).time()
            return datetime.datetime.combine(today.date(), t).timestamp()
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected a time as journalctl reads it: 1h, 30m, 1d (ago), "
                      f'-2h, "2 days ago", today, yesterday, now, 2026-12-01, "2026-12-01 07:00", '
                      f"07:00; got {raw!r}")


# ------------------------------------------------------------------ rendering

size = report.format_size            # one way to print sizes and durations, everywhere
short_size = report.format_size
duration = report.format_duration


def local_time(text: Any, now: Optional[float] = None) -> str:
    """A record's UTC time in local time; only the clock time if it is from today (as of now)."""
    when = parse_time(text)
    if when is None:
        return str(text)
    if now is not None and time.localtime(when)[:3] == time.localtime(now)[:3]:
        return time.strftime("%H:%M:%S", time.localtime(when))
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def _unix(data: Dict[str, Any], key: str, default: float) -> float:
    """A state time as a Unix time: "<key>_unix" (format 2), or a number under key (format 1)."""
    value = data.get(key + "_unix", data.get(key))
    return value if isinstance(value, (int, float)) else default


def _percent_style(usage: int, limit: int, warn: Optional[int]) -> str:
    if usage >= limit:
        return "bold red"
    if (warn is not None and usage >= warn) or usage >= 0.9 * limit:
        return "yellow"
    return "green"


def _what(row: Dict[str, Any], kind_shown: bool = False) -> Text:
    if row.get("container"):
        return Text(row["container"] if kind_shown else f"container {row['container']}")
    if row.get("pid") is None:
        return Text(row.get("cgroup") or "")
    return Text(f"{row['pid']} {row.get('comm') or ''}".rstrip())


def _action_text(action: Optional[Dict[str, Any]], now: float, last_hour: int = 0) -> Text:
    if not action:
        return Text("-", style="dim")
    warn = action.get("action") == "warn"
    what = "warn" if warn else f"{action.get('signal') or action.get('action')} {action.get('reason')}"
    when = parse_time(action.get("time"))
    ago = f" {duration(now - when)} ago" if when is not None else ""
    extra = " (dry run)" if action.get("dry_run") else ""
    again = f", {last_hour} in the last hour" if last_hour > 1 else ""   # acted on again and again
    return Text(f"{what}{ago}{extra}{again}", style="yellow" if warn else "red")


def status_renderable(view: Dict[str, Any], now: Optional[float] = None) -> Group:
    """The whole `status` screen: headline, host line, targets table, recent actions."""
    now = time.time() if now is None else now
    parts: List[Any] = []
    daemon = view.get("daemon") or {}
    if view.get("running"):
        head = Text("● ", style="bold green")
        head.append(f"memwatchd {daemon.get('version', '')} running: pid {daemon.get('pid')}, "
                    f"up {duration(now - _unix(daemon, 'started_at', now))}, "
                    f"RSS {size(daemon.get('rss_bytes'))}, sampler {daemon.get('sampler')}, "
                    + (f"new processes by {daemon['discovery']}, " if daemon.get('discovery') else "") +
                    f"{report.count(daemon.get('actions_taken', 0), 'action')}"
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
        host_age = host.get("sample_age_seconds")
        if host_age is not None and host_age >= 2:   # an idle daemon's: not presented as fresh
            line.append(f" · sampled {duration(host_age)} ago", style="dim")
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
        table.add_row(Text(row["target"]), row.get("kind", ""), _what(row, kind_shown=True), short_size(usage),
                      short_size(limit), pct,
                      Text(short_size(headroom),
                           style="bold red" if headroom is not None and headroom <= 0 else ""),
                      duration(row.get("sample_age_seconds")),
                      _action_text(row.get("last_action"), now, row.get("actions_last_hour") or 0))
    if view.get("targets"):
        parts.append(_fit(table))
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
                else f"container {a['container']}" if a.get("container") \
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


FREE_COLUMNS = ("target", "pid/cgroup", "reason", "last action")


def _table(*columns) -> Table:
    """Columns: (name, justify). On a terminal the free-text ones are cut to fit its width
    (see _fit), so every row stays one line; piped (console() gives an unlimited width)
    nothing is cut or wrapped, like systemctl."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0,
                  header_style="bold")
    for name, justify in columns:
        table.add_column(name, justify=justify, overflow="ellipsis", no_wrap=True,
                         min_width=6 if name in FREE_COLUMNS else None)
    return table


def _fit(table: Table) -> Table:
    """On a narrow terminal only the free-text columns (a name, a path, an action) give
    way, each cell cut with an ellipsis and kept on one line; a size, a time or a signal
    is never cut. Rich shrinks only "wrappable" columns, so those are marked wrappable
    while their cells refuse to wrap."""
    for column in table.columns:
        if column.header in FREE_COLUMNS:
            column.no_wrap = False
            column._cells = [_one_line(c) for c in column._cells]
    return table


def _one_line(cell: Any) -> Text:
    text = cell.copy() if isinstance(cell, Text) else Text(str(cell))
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


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
    return _fit(table)


PIPE_WIDTH = 10_000   # "unlimited" when stdout is not a terminal: nothing is cut or wrapped


def console(**kw) -> Console:
    """A Rich console for stdout: a terminal's own width, or (piped: `status | cat`,
    `events | grep`) an unlimited one with no colour, so lines are whole for tools."""
    import sys
    if "width" not in kw and not sys.stdout.isatty():
        kw["width"] = PIPE_WIDTH
    return Console(highlight=False, **kw)


def show(console: Console, renderable: Any) -> None:
    """Print a table or the status screen; piped, without the padding Rich adds to the
    last column (trailing blanks only trip up grep and awk)."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    text = "\n".join(line.rstrip() for line in captured.get().split("\n"))
    console.file.write(text)
    console.file.flush()
