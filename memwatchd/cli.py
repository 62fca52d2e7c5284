"""The command line: the only module that imports Typer, prints, or exits.

Every command is a thin shell over the core; types.EXIT_CODES is the one table that
maps the core's errors to exit codes, EXIT_STATUS_HELP documents every status once.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

from memwatchd import __version__
from memwatchd.types import ConfigError, MemwatchdError, TargetGone, exit_code_for

EXIT_USAGE = 2
# `status` when the daemon is not running, like `systemctl status` (LSB: "not running").
EXIT_NOT_RUNNING = 3
# `watch` exits with this when memwatchd had to stop its target for memory (like
# timeout(1)'s 124). 120 is not a signal death (those are 128+N) and not one of the
# shells' 126/127.
EXIT_STOPPED_FOR_MEMORY = 120

EXIT_STATUS_HELP = f"""\b
Exit status:
  0    success
  1    an error not listed below (e.g. an events file that cannot be read)
  2    bad options, or an invalid config file
  3    a config file or on_action program writable by others (refused);
       status: memwatchd is not running (the targets were sampled once)
  4    permission denied (try as root)
  5    watch: nothing matched what it was told to watch
  {EXIT_STOPPED_FOR_MEMORY}  watch: memwatchd stopped its target for memory
  126  watch -- COMMAND: the command cannot be run; 127: not found
  128+N  watch -- COMMAND: a signal N ended the command;
       otherwise watch -- COMMAND exits with the command's own status"""

# Plain click help and errors on every Typer version: rich_markup_mode=None is enough from
# Typer 0.9 on, but Typer 0.7 (Debian 12's) formats with rich whenever rich is importable.
if getattr(typer.core, "rich", None) is not None:
    typer.core.rich = None

class _InOrder(typer.core.TyperGroup):
    """Commands listed in the order they are defined (Typer 0.7 sorts them by name)."""

    def list_commands(self, ctx):
        return list(self.commands)


class _TakesCommand(typer.core.TyperCommand):
    """Usage reads `[OPTIONS] [-- COMMAND...]` on every Typer version."""

    def collect_usage_pieces(self, ctx):
        return [self.options_metavar, "[-- COMMAND...]"]


app = typer.Typer(
    cls=_InOrder,
    name="memwatchd",
    help="Stop a runaway process, systemd unit or cgroup before it stalls the machine.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _say_error(error: MemwatchdError, flags: bool = False) -> None:
    """Each error on its own line (check-config reports all of them)."""
    for line in getattr(error, "errors", None) or (str(error),):
        typer.echo(f"memwatchd: {_flag_names(line) if flags else line}", err=True)


def fail(error: MemwatchdError, flags: bool = False) -> "typer.Exit":
    """Print the error on stderr and give the exit code for its class (types.EXIT_CODES).
    With flags, the error came from `watch`'s options: name the flag, not the key."""
    _say_error(error, flags)
    return typer.Exit(exit_code_for(error))


def usage_error(message: str) -> "typer.Exit":
    typer.echo(f"memwatchd watch: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


_KEY_RE = re.compile(r"command line: (?:watch\[\d+\]|daemon)\.([a-z_]+)")


def _flag_names(message: str) -> str:
    """`watch`'s flags become a config internally; say "--limit", not "watch[0].limit",
    and show a flag's value as typed, not as a TOML string."""
    message = _KEY_RE.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)
    return message.replace(", got a string ", ", got ")


def _version(value: bool) -> None:
    if value:
        from memwatchd.sampler import IMPLEMENTATION
        typer.echo(f"memwatchd {__version__} (sampler: {IMPLEMENTATION})")
        raise typer.Exit()


@app.callback(epilog=EXIT_STATUS_HELP)
def main_options(
    version: Optional[bool] = typer.Option(
        None, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """memwatchd watches the memory of what you name and stops an offender before the host stalls.

    Start with `memwatchd watch --limit 2G -- COMMAND` for one job, or install the daemon with
    `memwatchd install-units` and `systemctl enable --now memwatchd`. `memwatchd COMMAND --help`
    shows each command's options and examples.
    """


CONFIG_HELP = "Config file (TOML). Default: /etc/memwatchd/memwatchd.toml; without it, the host guard alone."
INSECURE_HELP = ("Accept a config file (and on_action programs) not owned by root or writable by "
                 "others. For development only: whoever can edit the config decides what root kills.")


@app.command(short_help="Run the daemon in the foreground (what systemd starts).")
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", metavar="FILE", help=CONFIG_HELP),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Log every decision, send no signal."),
) -> None:
    """Run the daemon in the foreground (this is what systemd starts).

    Reads the config, watches its targets and the host, and acts: warn, SIGTERM, grace, SIGKILL.
    SIGHUP reloads the config (an invalid one is logged and the old one keeps running);
    SIGTERM stops. Records every action in the events file before sending anything.
    A config other than the default gets its own state and events files.

    \b
    Examples:
      memwatchd run --config /etc/memwatchd/memwatchd.toml
      memwatchd run --config ./test.toml --insecure --dry-run
    """
    from memwatchd.daemon import run_from_file
    from memwatchd.report import fatal_line
    try:
        code = run_from_file(str(config) if config else None, insecure, dry_run)
    except (MemwatchdError, OSError) as e:
        typer.echo(fatal_line(str(e)), err=True)
        raise typer.Exit(exit_code_for(e))
    raise typer.Exit(code)


@app.command("check-config", short_help="Validate a config file; name every bad file, key and value.")
def check_config(
    path: Optional[Path] = typer.Argument(None, metavar="[FILE]",
                                          help="Config file to check (default: /etc/memwatchd/memwatchd.toml)."),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only errors; the exit status says the rest."),
) -> None:
    """Validate a config file: exit 0 if the daemon would accept it, else name the file, key and
    value of every error (not only the first). Warnings (valid but probably not meant) are
    printed and do not fail the check.

    \b
    Examples:
      memwatchd check-config /etc/memwatchd/memwatchd.toml
      memwatchd check-config ./new.toml && sudo install -m 600 new.toml /etc/memwatchd/memwatchd.toml
    """
    from memwatchd import config as cfgmod
    from memwatchd.install import events_path_problem
    from memwatchd.report import count
    try:
        cfg = cfgmod.load_config(str(path) if path else None, insecure=insecure)
        problem = events_path_problem(cfg.daemon.events)
        if problem:
            raise ConfigError(f"{cfg.source}: daemon.events = {cfg.daemon.events!r}: {problem}")
    except MemwatchdError as e:
        raise fail(e)
    for warning in cfg.warnings:
        typer.echo(f"memwatchd: warning: {warning}", err=True)
    if quiet:
        return
    summary = (f"{count(len(cfg.watches), 'watch', 'watches')}, guard "
               f"{'on' if cfg.guard.enabled else 'off'}")
    if cfg.source == cfgmod.BUILTIN_SOURCE:
        typer.echo(f"no config file at {cfgmod.DEFAULT_CONFIG_PATH}: checked only the built-in "
                   f"defaults ({summary}); name a file to check it")
        return
    typer.echo(f"{cfg.source}: OK ({summary})")


WATCH_EPILOG = (
    "\b\nSelectors: exactly one of -- COMMAND, --pid (repeatable), --pidfile, --cmdline, --unit, "
    "--cgroup or --container.\nDefaults are those of a [[watch]] in the config (grace 10s, sustain 0s, "
    "action term).\n\b\nExit status: with -- COMMAND, the command's own (128+N if a signal N "
    f"ended it), or {EXIT_STOPPED_FOR_MEMORY} if memwatchd\nstopped its target for memory "
    "(also with --pid and the other selectors); 0 once every target is gone;\n"
    "2 for bad options, 5 if nothing matched. `memwatchd --help` lists every exit status.")

SELECTOR_FLAGS = ("-- COMMAND", "--pid", "--pidfile", "--cmdline", "--unit", "--cgroup", "--container")


@app.command(cls=_TakesCommand, epilog=WATCH_EPILOG, context_settings={"allow_interspersed_args": False},
             short_help="Watch one command, process, unit or cgroup in the foreground.")
def watch(
    command: Optional[List[str]] = typer.Argument(
        None, metavar="-- COMMAND", show_default=False,
        help="Start this command and watch it (and its children)."),
    pid: Optional[List[str]] = typer.Option(None, "--pid", "-p", metavar="PID", help="Watch this process (repeatable)."),
    pidfile: Optional[str] = typer.Option(None, "--pidfile", metavar="FILE",
                                          help="Watch the process whose PID is in this file (re-read when it goes)."),
    cmdline: Optional[str] = typer.Option(None, "--cmdline", metavar="REGEX",
                                          help="Watch every process whose command line matches (Python re.search)."),
    unit: Optional[str] = typer.Option(None, "--unit", "-u", metavar="UNIT", help="Watch this systemd unit's cgroup."),
    cgroup: Optional[str] = typer.Option(None, "--cgroup", metavar="PATH", help="Watch a cgroup v2 directory (path or glob)."),
    container: Optional[str] = typer.Option(None, "--container", metavar="GLOB",
                                            help="Watch the running Docker/Podman containers whose name matches (sim-*)."),
    limit: str = typer.Option(..., "--limit", "-l", metavar="SIZE",
                              help="Act above this: 2G, 512M, 80% (of RAM, or of the cgroup's memory.max). "
                                   "A bare number is refused (write 4096B for bytes)."),
    warn: Optional[str] = typer.Option(None, "--warn", metavar="SIZE", help="Log a warning at this usage (below --limit)."),
    action: str = typer.Option("term", "--action", metavar="ACTION",
                               help="term (SIGTERM, grace, SIGKILL), kill, warn, throttle or freeze (the last two: cgroups)."),
    grace: Optional[str] = typer.Option(None, "--grace", metavar="DURATION",
                                        help="With --action term: how long after SIGTERM before SIGKILL. Default 10s."),
    sustain: Optional[str] = typer.Option(None, "--sustain", metavar="DURATION",
                                          help="Act only once usage stays above --limit this long. Default 0s."),
    scope: Optional[str] = typer.Option(None, "--scope", metavar="SCOPE",
                                        help="process, tree or cgroup. Default: tree for a command, process for "
                                             "--pid/--pidfile/--cmdline, cgroup for --unit/--cgroup/--container."),
    usage: Optional[str] = typer.Option(None, "--usage", metavar="HOW",
                                        help="How a cgroup is measured: current (default), anon or current-inactive_file."),
    interval: str = typer.Option("1s", "--interval", metavar="DURATION",
                                 help="Slowest sampling period (sampling speeds up near the limit)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Decide and report, but send nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print every record (the events format) as a JSON line on stdout. "
                                                        "Not with -- COMMAND, whose output stdout is: use --json-fd."),
    json_fd: Optional[int] = typer.Option(None, "--json-fd", metavar="FD",
                                          help="Write every record as a JSON line to this open file descriptor "
                                               "(e.g. --json-fd 3 3>records.jsonl); the command does not inherit it."),
    events: Optional[Path] = typer.Option(None, "--events", metavar="FILE", help="Also append records to this events file."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also log what is watched and when targets come and go."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log only errors; no warnings, no summary line."),
) -> None:
    """Watch one command, processes, a unit or a cgroup in the foreground; no config file needed.

    \b
    Examples:
      memwatchd watch --limit 2G -- make -j8
      memwatchd watch --limit 4G --json-fd 3 -- ./simulate 3>records.jsonl
      memwatchd watch --pid 1234 --pid 5678 --limit 500M --action kill
      memwatchd watch --pidfile /run/build.pid --limit 8G --scope tree --sustain 2s
      memwatchd watch --cmdline '^python3 .*train' --limit 25% --action warn
      memwatchd watch --unit simulation.service --limit 80% --warn 70%
      memwatchd watch --container 'sim-*' --limit 90% --grace 5s
    """
    import json
    import os
    import subprocess

    from memwatchd import report
    from memwatchd.config import PID_MAX, parse_config
    from memwatchd.daemon import Daemon, Options

    if quiet and verbose:
        raise usage_error("--quiet and --verbose conflict: give one")
    report.set_level(report.ERR if quiet else report.INFO if verbose else report.NOTICE)

    command = list(command or [])
    given = [flag for flag, value in zip(SELECTOR_FLAGS, (command, pid, pidfile, cmdline, unit, cgroup,
                                                              container))
             if value]
    if not given:
        raise usage_error("say what to watch: -- COMMAND, --pid PID, --pidfile FILE, --cmdline REGEX, "
                          "--unit UNIT, --cgroup PATH or --container GLOB")
    if len(given) > 1:
        raise usage_error(f"{given[0]} and {given[1]} conflict: give only one of "
                          f"{', '.join(SELECTOR_FLAGS)}")
    selector = given[0]
    cgroup_kind = selector in ("--unit", "--cgroup", "--container")
    if scope == "cgroup" and not cgroup_kind:
        raise usage_error(f"--scope cgroup conflicts with {selector}: a cgroup scope needs --unit, --cgroup or --container")
    if scope in ("process", "tree") and cgroup_kind:
        raise usage_error(f"--scope {scope} conflicts with {selector}: a unit or cgroup is measured whole "
                          "(--scope cgroup)")
    if action in ("throttle", "freeze") and not cgroup_kind:
        raise usage_error(f"--action {action} conflicts with {selector}: it works on a cgroup "
                          "(--unit or --cgroup)")
    if usage is not None and usage != "rss" and not cgroup_kind:
        raise usage_error(f"--usage {usage} conflicts with {selector}: a process is measured by rss")
    if grace is not None and action != "term":
        raise usage_error(f"--grace conflicts with --action {action}: only term waits (SIGTERM, grace, "
                          "SIGKILL)")
    if json_out and command:
        raise usage_error("--json conflicts with -- COMMAND: the command's output goes to stdout; "
                          "use --json-fd 3 3>FILE, or --events FILE")
    if json_out and json_fd is not None:
        raise usage_error("--json and --json-fd conflict: give one")

    pids = []
    for text in pid or ():
        if not text.strip().isdigit() or not 1 <= int(text) <= PID_MAX:
            raise usage_error(f"--pid {text!r}: expected a process ID (a number from 1 to {PID_MAX})")
        pids.append(int(text))

    base = {"limit": limit, "action": action}
    for key, value in (("warn", warn), ("grace", grace), ("sustain", sustain), ("usage", usage),
                       ("scope", scope)):
        if value is not None:
            base[key] = value
    if command:
        watches = [dict(base, name="command", pid=1, scope=scope or "tree")]
    elif pids:
        watches = [dict(base, name=f"pid-{p}", pid=p) for p in pids]
    else:
        kind = selector[2:]
        value = {"pidfile": pidfile, "cmdline": cmdline, "unit": unit, "cgroup": cgroup,
                 "container": container}[kind]
        if kind in ("unit", "cgroup", "container"):
            from memwatchd.targets import host_support
            why = host_support().get(kind)
            if why:  # said plainly, not "matched nothing"
                typer.echo(f"memwatchd watch: --{kind}{' ' if why.startswith('needs') else ': '}{why}",
                           err=True)
                raise typer.Exit(exit_code_for(TargetGone("")))
        watches = [dict(base, name=kind, **{kind: value})]
    try:
        cfg = parse_config({"daemon": {"interval": interval, "min_interval": "10ms",
                                       "events": str(events.absolute()) if events else "", "state": "",
                                       "dry_run": dry_run},
                            "guard": {"enabled": False}, "watch": watches}, "command line")
    except MemwatchdError as e:
        raise fail(e, flags=True)

    out = None
    if json_fd is not None:
        try:
            out = os.fdopen(os.dup(json_fd), "w", buffering=1)
        except OSError as e:
            raise usage_error(f"--json-fd {json_fd}: not an open file descriptor ({e.strerror})")
    elif json_out:
        out = typer.get_text_stream("stdout")

    def show(record: dict) -> None:
        try:
            out.write(json.dumps(record, sort_keys=True) + "\n")
            out.flush()
        except (OSError, ValueError):
            pass   # a closed reader must not stop the watch

    opts = Options(exit_when_idle=True, on_record=show if out is not None else None,
                   psi_trigger=False, lock_memory=False)
    child = None
    if command:
        try:
            child = subprocess.Popen(command)
        except OSError as e:
            typer.echo(f"memwatchd watch: cannot start {command[0]!r}: {e.strerror}", err=True)
            raise typer.Exit(127 if isinstance(e, FileNotFoundError) else 126)
        cfg = cfg._replace(watches=(cfg.watches[0]._replace(selector=child.pid),))
        opts.command_pidfd = os.pidfd_open(child.pid)
    try:
        daemon = Daemon(cfg, opts)
        daemon.run()
    except MemwatchdError as e:
        if child is not None:
            child.kill()
            child.wait()
        raise fail(e)
    status = child.wait() if child is not None else 0
    stopped = [r for r in daemon.stopped_for_memory if not r["dry_run"]]
    if stopped:
        if not quiet:
            for line in stopped_summary(stopped, command[0] if command else None):
                typer.echo(f"memwatchd: {line}", err=True)
        raise typer.Exit(EXIT_STOPPED_FOR_MEMORY)
    raise typer.Exit(128 - status if status < 0 else status)


def stopped_summary(records: List[dict], started_as: Optional[str] = None) -> List[str]:
    """One line per target stopped for memory, from its decision records: the program
    they name (read when memwatchd decided: a wrapper may have exec'ed another), its
    highest usage, its limit, the signals sent. started_as: `watch -- COMMAND`'s argv[0],
    said when the program stopped is not the one started."""
    import os

    from memwatchd.report import escape, format_size
    by_target: dict = {}
    for r in records:
        by_target.setdefault((r.get("target"), r.get("pid"), r.get("cgroup")), []).append(r)
    lines = []
    for (_, pid, cgroup), rs in by_target.items():
        first, last = rs[0], rs[-1]
        name = last.get("comm") or "?"
        also = ""
        if started_as and name != os.path.basename(started_as)[:15]:
            also = f", started as {escape(started_as)}"
        who = f"{name} (pid {pid}{also})" if pid is not None else f"cgroup {cgroup}"
        usage = max((r["usage_bytes"] for r in rs if r.get("usage_bytes") is not None), default=None)
        sent = " then ".join(dict.fromkeys(r["signal"] for r in rs if r.get("signal")))
        lines.append(f"stopped {who} for memory: using {format_size(usage)}, "
                     f"over its limit of {format_size(first.get('limit_bytes'))}; sent {sent}")
    return lines


def _load_readonly(config: Optional[Path]):
    """The config for commands that only look (status, events): they never run on_action
    or signal anything, so the ownership checks that guard `run` are not needed."""
    from memwatchd.config import load_config
    return load_config(str(config) if config else None, insecure=True)


@app.command(short_help="Show what memwatchd sees: targets, usage, limits, the host.")
def status(
    config: Optional[Path] = typer.Option(None, "--config", "-c", metavar="FILE", help=CONFIG_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the same data as JSON (one object; with --watch one line per refresh)."),
    watch_: bool = typer.Option(False, "--watch", "-w", help="Refresh in place every second, like top (Ctrl-C quits)."),
) -> None:
    """Show what memwatchd sees: every target's usage, limit, headroom and last action, the host.

    With the daemon running, reads its state file ([daemon] state); otherwise samples the
    configured targets once, says the daemon is not running and exits 3 (like systemctl).
    On a terminal the table fits its width; piped, it is full width and never wrapped.

    \b
    Examples:
      sudo memwatchd status
      sudo memwatchd status --watch
      sudo memwatchd status --json | jq '.targets[] | {target, usage_bytes, limit_bytes}'
      sudo memwatchd status -c /etc/memwatchd/other.toml
    """
    import json
    import time

    from memwatchd import status as st
    try:
        cfg = _load_readonly(config)
        view = st.collect(cfg)
    except MemwatchdError as e:
        raise fail(e)
    code = 0 if view.get("running") else EXIT_NOT_RUNNING
    if json_out:
        while True:
            typer.echo(json.dumps(view, sort_keys=True, indent=None if watch_ else 2))
            if not watch_:
                raise typer.Exit(code)
            try:
                time.sleep(1.0)
                view = st.collect(cfg)
            except KeyboardInterrupt:
                return
            except MemwatchdError as e:
                raise fail(e)
    console = st.console()
    if not watch_:
        st.show(console, st.status_renderable(view))
        raise typer.Exit(code)
    from rich.live import Live
    try:
        with Live(st.status_renderable(view), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(1.0)
                live.update(st.status_renderable(st.collect(cfg)), refresh=True)
    except KeyboardInterrupt:
        return
    except MemwatchdError as e:
        raise fail(e)


@app.command(short_help="List what memwatchd did: each decision with its outcome.")
def events(
    since: Optional[str] = typer.Option(None, "--since", "-S", metavar="WHEN",
                                        help="Only events at or after this: 90s, 30m, 1h, 1d (ago), today, "
                                             "yesterday, \"2026-12-01 07:00\", 07:00 (as journalctl reads them)."),
    until: Optional[str] = typer.Option(None, "--until", "-U", metavar="WHEN", help="Only events before this (same forms)."),
    lines: Optional[int] = typer.Option(None, "--lines", "-n", metavar="N", help="Only the last N events."),
    follow: bool = typer.Option(False, "--follow", "-F", help="Keep printing new records as they are written (Ctrl-C quits)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", metavar="NAME",
                                         help="Only this watch's events (its name; \"guard\" for the host guard)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per event (decision with its outcome) per line."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", metavar="FILE", help="Events file to read. Default: [daemon] events of the config."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", metavar="FILE", help=CONFIG_HELP),
) -> None:
    """List what memwatchd did: each decision paired with its outcome.

    When, which target, pid and name (or cgroup), usage against limit, why, what was sent,
    how long the process took to die and how much memory that freed. A torn last line (the
    host died mid-write) is skipped and reported. With --follow, each new record is printed
    as one line when it is written (with --json: the records as written, decisions and
    outcomes apart). Piped, the table is full width and never wrapped.

    \b
    Examples:
      sudo memwatchd events --since 1h
      sudo memwatchd events --since yesterday --until today -n 20
      sudo memwatchd events --since "2026-12-01 07:00" --target simulation
      sudo memwatchd events --follow
      sudo memwatchd events --target simulation --json | jq .outcome.seconds_to_exit
    """
    import json
    import os

    from memwatchd import status as st
    from memwatchd.types import AccessDenied
    if lines is not None and lines < 0:
        raise _usage("events", f"-n {lines}: expected a number of events, 0 or more")
    try:
        start = st.parse_when(since, "--since") if since is not None else None
        end = st.parse_when(until, "--until") if until is not None else None
        path = str(file) if file else _load_readonly(config).daemon.events
        if not path:
            raise _usage("events", "the events file is off in the config ([daemon] events = \"\"); "
                                   "name one with --file")
        if file is not None and not os.path.exists(path):
            raise MemwatchdError(f"cannot read {path}: no such file")
        try:
            found = st.select_events(path, start, target, until=end)
        except PermissionError:
            raise AccessDenied(f"cannot read {path}: permission denied (it is root's: try sudo)")
        except OSError as e:
            raise MemwatchdError(f"cannot read {path}: {e.strerror}")
    except MemwatchdError as e:
        raise fail(e)
    if found.skipped:
        typer.echo(f"memwatchd: skipped {found.skipped} unreadable "
                   f"{'line' if found.skipped == 1 else 'lines'} in {path} "
                   "(a torn write: the host may have stopped mid-write)", err=True)
    shown = found[-lines:] if lines else ([] if lines == 0 else found)
    if json_out:
        for event in shown:
            typer.echo(json.dumps(event, sort_keys=True))
    elif shown:
        st.show(st.console(), st.events_table(shown))
    elif not follow:
        typer.echo(f"no events in {path}" + (f" since {since}" if since else "")
                   + (f" until {until}" if until else "") + (f" for {target}" if target else ""))
    if not follow:
        return
    try:
        for record in st.follow_records(path, found.size, target=target):
            typer.echo(json.dumps(record, sort_keys=True) if json_out else st.record_line(record))
    except KeyboardInterrupt:
        return


def _usage(command: str, message: str) -> "typer.Exit":
    typer.echo(f"memwatchd {command}: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


@app.command("install-units", short_help="Install memwatchd.service and a starting config.")
def install_units(
    config_path: Path = typer.Option(
        Path("/etc/memwatchd/memwatchd.toml"), "--config", metavar="FILE",
        help="The daemon's config: a starting one is written here if there is none, and a "
             "path other than the default goes into ExecStart= as --config PATH."),
    root: Optional[Path] = typer.Option(
        None, "--root", metavar="DIR", help="Install into this image's /etc (like systemctl --root); no daemon-reload."),
    prefix: Optional[Path] = typer.Option(
        None, "--prefix", metavar="DIR", help="Write unit files here instead of /etc/systemd/system (no daemon-reload)."),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing unit or config that differs (the old one is kept as .old)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change, as a diff; write nothing."),
    insecure: bool = typer.Option(
        False, "--insecure", help="Install even if the interpreter or memwatchd's files can be changed by "
                                  "someone other than root (who could then run code as root)."),
) -> None:
    """Install memwatchd.service (ExecStart pointing at this installation) and a starting config.

    Then `systemctl enable --now memwatchd` is all that is left. The unit is the shipped,
    sandboxed one; for an installation (or config) under /home, /root or /tmp the one option
    that would hide it is relaxed, and the output says which. Refuses when the code the unit
    runs as root is writable by anyone but root, and never overwrites without --force.

    \b
    Examples:
      sudo memwatchd install-units && sudo systemctl enable --now memwatchd
      memwatchd install-units --dry-run
      sudo /opt/memwatchd/bin/memwatchd install-units --config /etc/memwatchd/prod.toml
    """
    from memwatchd import install
    try:
        plan = install.plan_install(str(prefix) if prefix else None, str(config_path),
                                    root=str(root) if root else None, force=force, insecure=insecure)
    except MemwatchdError as e:
        raise fail(e)
    for warning in plan.warnings:
        typer.echo(f"memwatchd: WARNING: {warning}", err=True)
    for f in plan.files:
        verb = {"new": "write", "differs": "replace", "unchanged": "keep unchanged"}[f.state]
        typer.echo(f"{'would ' if dry_run else ''}{verb} {f.path} (mode {f.mode:o})"
                   + (f"; the old one {'would be ' if dry_run else ''}kept as {f.path}.old"
                      if f.state == "differs" else ""))
        if dry_run and f.state != "unchanged":
            typer.echo(f.diff(), nl=False)
    for path in plan.kept:
        typer.echo(f"keeping existing {path} (--force replaces it)")
    for note in plan.notes:
        typer.echo(f"note: {note}")
    if dry_run:
        return
    try:
        install.install_units(plan)
    except PermissionError as e:
        typer.echo(f"memwatchd: {e} (run as root, or use --root/--prefix)", err=True)
        raise typer.Exit(4)
    except MemwatchdError as e:
        raise fail(e)
    if plan.reload_systemd:
        typer.echo("systemd reloaded; now: systemctl enable --now memwatchd")
    elif root is None:
        typer.echo("now (on a machine with systemd): systemctl daemon-reload && "
                   "systemctl enable --now memwatchd")
    else:
        typer.echo(f"now: systemctl --root {root} enable memwatchd")


# ------------------------------------------------- record, replay, suggest (issue 14)
# Thin wrappers: the work is in memwatchd/record.py, replay.py and suggest.py.

@app.command(cls=_TakesCommand, context_settings={"allow_interspersed_args": False},
             short_help="Record what the policy sees, acting on nothing.")
def record(
    command: Optional[List[str]] = typer.Argument(
        None, metavar="-- COMMAND", show_default=False,
        help="Start this command and record it (and its children)."),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="Trace file to write (NDJSON; gzip'ed if it ends in .gz)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", metavar="FILE", help="Record the targets of this config file."),
    pid: Optional[List[int]] = typer.Option(None, "--pid", "-p", metavar="PID", help="Record this process (repeatable)."),
    unit: Optional[str] = typer.Option(None, "--unit", "-u", metavar="UNIT", help="Record this systemd unit's cgroup."),
    cgroup: Optional[str] = typer.Option(None, "--cgroup", metavar="PATH", help="Record a cgroup v2 directory (path or glob)."),
    duration: Optional[str] = typer.Option(None, "--duration", "-d", metavar="DURATION", help="Stop recording after this long (30s, 10m, 2h)."),
    limit: str = typer.Option("100%", "--limit", "-l", metavar="SIZE", help="The limit the dry-run policy applies (recorded as its decisions)."),
    warn: Optional[str] = typer.Option(None, "--warn", metavar="SIZE", help="A warn level for the dry-run policy."),
    interval: str = typer.Option("1s", "--interval", metavar="DURATION", help="Slowest sampling period (faster near the limit)."),
    predict: Optional[str] = typer.Option(None, "--predict", metavar="DURATION", help="The dry-run policy's predictive horizon (e.g. 30s); every reading of a target approaching its limit is then written, as the trend needs."),
    name: Optional[str] = typer.Option(None, "--name", metavar="NAME", help="The watch name in the trace (default: the command's name)."),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Sample like the daemon and act on nothing: write what its policy would see to a trace.

    The trace replays with `memwatchd replay` and feeds `memwatchd suggest`. Nothing is
    signalled, no events or state file is written, on_action programs never run.

    \b
    Examples:
      memwatchd record --out build.trace.gz -- make -j8
      sudo memwatchd record --config /etc/memwatchd/memwatchd.toml --duration 1h --out night.trace
    """
    from memwatchd import record as rec
    from memwatchd.config import parse_duration
    command = list(command or [])
    given = (config is not None) + bool(command) + bool(pid) + (unit is not None) + (cgroup is not None)
    if given != 1:
        typer.echo("memwatchd record: give one of --config, -- COMMAND, --pid (repeatable), --unit "
                   "or --cgroup", err=True)
        raise typer.Exit(EXIT_USAGE)
    try:
        seconds = parse_duration(duration, "--duration") if duration else None
        done = rec.record(str(out), config_path=str(config) if config else None, insecure=insecure,
                          pids=pid or (), unit=unit, cgroup=cgroup, command=command, duration=seconds,
                          limit=limit, warn=warn, interval=interval, name=name, predict=predict)
    except MemwatchdError as e:
        raise fail(e, flags=True)
    except OSError as e:
        typer.echo(f"memwatchd record: {out}: {e.strerror}", err=True)
        raise typer.Exit(1)
    from memwatchd.report import count, format_duration, format_size
    typer.echo(f"recorded {count(done.targets, 'target')} for {format_duration(done.seconds)} to {out} "
               f"({format_size(done.size)})", err=True)
    if done.exit_status is not None:
        raise typer.Exit(128 - done.exit_status if done.exit_status < 0 else done.exit_status)


@app.command(short_help="Run a config's policy over a trace: what it would have done.")
def replay(
    trace: Path = typer.Argument(..., metavar="TRACE", help="A trace file (record --out) or the daemon's trace directory."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", metavar="FILE", help="The config to try (default: the one recorded in the trace)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per decision, then a summary."),
    t_from: Optional[str] = typer.Option(None, "--from", metavar="WHEN", help="Start here: seconds into the trace (90s, 5m) or a UTC time (08:40:00)."),
    t_to: Optional[str] = typer.Option(None, "--to", metavar="WHEN", help="Stop here (same forms as --from)."),
) -> None:
    """Run the policy of a config over a trace: every decision it would take, next to what happened.

    The same Policy code as the daemon, on a virtual clock. After an action the trace no longer
    says what would have happened: later decisions on that target are marked as after a
    divergence, a killed target's later readings are ignored, and freed memory is added back to
    the host's figures (an approximation, listed under "note").

    \b
    Examples:
      memwatchd replay build.trace.gz
      memwatchd replay /var/lib/memwatchd/trace --config new.toml --from 08:00:00
    """
    import json
    from memwatchd import replay as rp
    try:
        cfg = _load_readonly(config) if config else None
        result = rp.replay_file(str(trace), cfg, t_from, t_to)
    except MemwatchdError as e:
        raise fail(e)
    for line in result.damage:
        typer.echo(f"memwatchd: damaged trace: {line}", err=True)
    if json_out:
        for obj in rp.to_json(result):
            typer.echo(json.dumps(obj, sort_keys=True))
    else:
        typer.echo(rp.format_text(result))


@app.command(short_help="Suggest a limit and warn level from recorded runs.")
def suggest(
    traces: List[Path] = typer.Argument(..., metavar="TRACE...", help="Trace files or trace directories (all runs are pooled per watch)."),
    events: Optional[Path] = typer.Option(None, "--events", metavar="FILE", help="An events file: runs memwatchd stopped are censored, not complete."),
    percentile: float = typer.Option(95.0, "--percentile", metavar="P", help="Percentile of the complete runs' peaks to cover."),
    margin: float = typer.Option(20.0, "--margin", metavar="PERCENT", help="Headroom above that percentile, in percent."),
    half_life: str = typer.Option("7d", "--half-life", metavar="DURATION", help="A run this much older than the newest counts half (d, h, m, s)."),
    json_out: bool = typer.Option(False, "--json", help="The analysis as one JSON object."),
) -> None:
    """Recommend a limit and warn level per watch from recorded runs, then replay them.

    Per watch: each run's peak; the limit is a high percentile of the peaks of runs that
    finished on their own (weighted by age) plus a margin, and never below the largest of
    those peaks. Runs that were stopped (or still running when the trace ended) only say
    "at least this much": they are listed as censored, never counted as complete.

    \b
    Examples:
      memwatchd suggest /var/lib/memwatchd/trace build-*.trace.gz
      memwatchd suggest night.trace --events /var/lib/memwatchd/events.jsonl --json
    """
    import json
    from memwatchd import suggest as sg
    try:
        report_ = sg.suggest([str(t) for t in traces], str(events) if events else None,
                             percentile=percentile, margin=margin / 100.0,
                             half_life=sg.parse_half_life(half_life))
    except MemwatchdError as e:
        raise fail(e)
    for line in report_.damage:
        typer.echo(f"memwatchd: damaged trace: {line}", err=True)
    typer.echo(json.dumps(report_.to_json(), sort_keys=True, indent=2) if json_out else report_.text())


def main() -> None:
    app()
