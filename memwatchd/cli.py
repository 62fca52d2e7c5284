"""The command line: the only module that imports Typer, prints, or exits.

Every command is a thin shell over the core; entry.EXIT_CODES is the one table that
maps the core's errors to exit codes.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from memwatchd import __version__
from memwatchd.entry import exit_code_for, run_daemon
from memwatchd.types import MemwatchdError, TargetGone

EXIT_USAGE = 2
# `watch -- COMMAND` exits with the command's own status, or with this one when memwatchd
# had to stop the command for memory (like timeout(1)'s 124). 120 is not a signal death
# (those are 128+N) and not one of the shells' 126/127.
EXIT_STOPPED_FOR_MEMORY = 120

app = typer.Typer(
    name="memwatchd",
    help="Stop a runaway process, systemd unit or cgroup before it stalls the machine.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def fail(error: MemwatchdError) -> "typer.Exit":
    """Print the error on stderr and give the exit code for its class (entry.EXIT_CODES)."""
    typer.echo(f"memwatchd: {error}", err=True)
    return typer.Exit(exit_code_for(error))


def _version(value: bool) -> None:
    if value:
        from memwatchd.sampler import IMPLEMENTATION
        typer.echo(f"memwatchd {__version__} (sampler: {IMPLEMENTATION})")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """memwatchd watches the memory of what you name and stops an offender before the host stalls.

    Start with `memwatchd watch --limit 2G -- COMMAND` for one job, or install the daemon with
    `memwatchd install-units` and `systemctl enable --now memwatchd`.
    """


CONFIG_HELP = "Config file (TOML). Default: /etc/memwatchd/memwatchd.toml; without it, the host guard alone."
INSECURE_HELP = ("Accept a config file (and on_action programs) not owned by root or writable by "
                 "others. For development only: whoever can edit the config decides what root kills.")


def _load(config: Optional[Path], insecure: bool):
    from memwatchd.config import load_config
    return load_config(str(config) if config else None, insecure=insecure)


@app.command()
def run(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Log every decision, send no signal."),
) -> None:
    """Run the daemon in the foreground (this is what systemd starts).

    Reads the config, watches its targets and the host, and acts: warn, SIGTERM, grace, SIGKILL.
    SIGHUP reloads the config (an invalid one is logged and the old one keeps running);
    SIGTERM stops. Records every action in the events file before sending anything.

    Example: memwatchd run --config /etc/memwatchd/memwatchd.toml
    """
    try:
        code = run_daemon(str(config) if config else None, insecure, dry_run)
    except MemwatchdError as e:
        raise fail(e)
    except OSError as e:
        typer.echo(f"memwatchd: {e}", err=True)
        raise typer.Exit(1)
    raise typer.Exit(code)


@app.command("check-config")
def check_config(
    path: Optional[Path] = typer.Argument(None, help="Config file to check (default: /etc/memwatchd/memwatchd.toml)."),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Validate a config file: exit 0 if the daemon would accept it, else name the file, key and value.

    Example: memwatchd check-config /etc/memwatchd/memwatchd.toml
    """
    try:
        cfg = _load(path, insecure)
    except MemwatchdError as e:
        raise fail(e)
    typer.echo(f"{cfg.source}: OK ({len(cfg.watches)} watch(es), guard "
               f"{'on' if cfg.guard.enabled else 'off'})")


WATCH_EPILOG = (
    "Exit status: with -- COMMAND, the command's own (128+N if a signal N ended it), or "
    f"{EXIT_STOPPED_FOR_MEMORY} if memwatchd stopped it for memory; otherwise 0 once every "
    "target is gone; 2 for bad options, 5 if nothing matched.")


@app.command(epilog=WATCH_EPILOG, context_settings={"allow_interspersed_args": False})
def watch(
    command: Optional[List[str]] = typer.Argument(
        None, metavar="[-- COMMAND [ARGS...]]", help="Start this command and watch it (and its children)."),
    pid: Optional[List[int]] = typer.Option(None, "--pid", "-p", help="Watch this process (repeatable)."),
    unit: Optional[str] = typer.Option(None, "--unit", "-u", help="Watch this systemd unit's cgroup."),
    cgroup: Optional[str] = typer.Option(None, "--cgroup", help="Watch a cgroup v2 directory (path or glob)."),
    limit: str = typer.Option(..., "--limit", "-l", help="Memory limit: 2G, 512M, 80% (of RAM, or of the cgroup's memory.max)."),
    warn: Optional[str] = typer.Option(None, "--warn", help="Log a warning at this usage (below --limit)."),
    action: str = typer.Option("term", "--action", help="term (SIGTERM, grace, SIGKILL), kill, warn, throttle or freeze (cgroups)."),
    grace: str = typer.Option("5s", "--grace", help="After SIGTERM, how long before SIGKILL."),
    scope: Optional[str] = typer.Option(None, "--scope", help="process, tree or cgroup. Default: tree for a command, process for --pid, cgroup for --unit/--cgroup."),
    interval: str = typer.Option("1s", "--interval", help="Slowest sampling period (sampling speeds up near the limit)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Decide and report, but send nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print every record (the daemon's event format) as one JSON line on stdout."),
    events: Optional[Path] = typer.Option(None, "--events", help="Also append records to this events file."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also log what is watched and when targets come and go."),
) -> None:
    """Watch one command, processes, a unit or a cgroup in the foreground; no config file needed.

    Examples:

      memwatchd watch --limit 2G -- make -j8

      memwatchd watch --pid 1234 --pid 5678 --limit 500M --action kill

      memwatchd watch --unit simulation.service --limit 80% --warn 70%
    """
    import json
    import os
    import subprocess

    from memwatchd import report
    from memwatchd.config import parse_config, parse_duration, parse_size
    from memwatchd.daemon import Daemon, Options

    report.set_level(report.INFO if verbose else report.NOTICE)

    command = list(command or [])
    selectors = bool(pid) + (unit is not None) + (cgroup is not None)
    if bool(command) == bool(selectors) or (unit and cgroup):
        typer.echo("memwatchd watch: give either -- COMMAND, or --pid (repeatable), or --unit, "
                   "or --cgroup", err=True)
        raise typer.Exit(EXIT_USAGE)
    base = {"limit": limit, "action": action, "grace": grace}
    if warn is not None:
        base["warn"] = warn
    try:
        parse_size(limit, "--limit")
        if warn is not None:
            parse_size(warn, "--warn")
        parse_duration(grace, "--grace")
        parse_duration(interval, "--interval")
        if command:
            watches = [dict(base, name="command", pid=1, scope=scope or "tree")]
        elif pid:
            watches = [dict(base, name=f"pid-{p}", pid=p, scope=scope or "process") for p in pid]
        else:
            kind, value = ("unit", unit) if unit else ("cgroup", cgroup)
            from memwatchd.targets import host_support
            why = host_support().get(kind)
            if why:  # said plainly, not "matched nothing"
                typer.echo(f"memwatchd watch: --{kind}{' ' if why.startswith('needs') else ': '}{why}",
                           err=True)
                raise typer.Exit(exit_code_for(TargetGone("")))
            watches = [dict(base, name=kind, **{kind: value})]
            if scope:
                watches[0]["scope"] = scope
        cfg = parse_config({"daemon": {"interval": interval, "min_interval": "10ms",
                                       "events": str(events) if events else "", "state": "",
                                       "dry_run": dry_run},
                            "guard": {"enabled": False}, "watch": watches}, "command line")
    except MemwatchdError as e:
        raise fail(e)

    def show(record: dict) -> None:
        typer.echo(json.dumps(record, sort_keys=True))

    opts = Options(exit_when_idle=True, on_record=show if json_out else None,
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
    if child is None:
        raise typer.Exit(0)
    status = child.wait()
    stopped = [r for r in daemon.stopped_for_memory if not r["dry_run"]]
    if stopped:
        first, last = stopped[0], stopped[-1]
        sent = " then ".join(dict.fromkeys(r["signal"] for r in stopped))
        typer.echo(f"memwatchd: stopped {command[0]} (pid {child.pid}) for memory: using "
                   f"{last['usage_bytes'] / 2**20:.0f} MiB, over its limit of "
                   f"{first['limit_bytes'] / 2**20:.0f} MiB; sent {sent}", err=True)
        raise typer.Exit(EXIT_STOPPED_FOR_MEMORY)
    raise typer.Exit(128 - status if status < 0 else status)


def _load_readonly(config: Optional[Path]):
    """The config for commands that only look (status, events): they never run on_action
    or signal anything, so the ownership checks that guard `run` are not needed."""
    from memwatchd.config import load_config
    return load_config(str(config) if config else None, insecure=True)


@app.command()
def status(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the same data as JSON (one object; with --watch one line per refresh)."),
    watch_: bool = typer.Option(False, "--watch", "-w", help="Refresh in place every second, like top (Ctrl-C quits)."),
) -> None:
    """Show what memwatchd sees: every target's usage, limit, headroom and last action, the host.

    With the daemon running, reads its state file ([daemon] state); otherwise samples the
    configured targets once and says the daemon is not running.

    Examples:

      sudo memwatchd status

      sudo memwatchd status --watch

      sudo memwatchd status --json | jq '.targets[] | {target, usage_bytes, limit_bytes}'
    """
    import json
    import time

    from memwatchd import status as st
    try:
        cfg = _load_readonly(config)
        view = st.collect(cfg)
    except MemwatchdError as e:
        raise fail(e)
    if json_out:
        while True:
            typer.echo(json.dumps(view, sort_keys=True, indent=None if watch_ else 2))
            if not watch_:
                return
            try:
                time.sleep(1.0)
                view = st.collect(cfg)
            except KeyboardInterrupt:
                return
            except MemwatchdError as e:
                raise fail(e)
    console = st.console()
    if not watch_:
        console.print(st.status_renderable(view))
        return
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


@app.command()
def events(
    since: Optional[str] = typer.Option(None, "--since", help="Only events newer than this: 90s, 30m, 1h, 24h."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Only this watch's events (its name; \"guard\" for the host guard)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per event (decision with its outcome) per line."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Events file to read. Default: [daemon] events of the config."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
) -> None:
    """List what memwatchd did: each decision paired with its outcome.

    When, which target, pid and name (or cgroup), usage against limit, why, what was sent,
    how long the process took to die and how much memory that freed. A torn last line (the
    host died mid-write) is skipped and reported.

    Examples:

      sudo memwatchd events --since 1h

      sudo memwatchd events --target simulation --json | jq .outcome.seconds_to_exit
    """
    import json

    from memwatchd import status as st
    from memwatchd.config import parse_duration
    from memwatchd.types import AccessDenied
    try:
        seconds = parse_duration(since, "--since") if since is not None else None
        path = str(file) if file else _load_readonly(config).daemon.events
        if not path:
            typer.echo("memwatchd: the events file is off in the config ([daemon] events = \"\"); "
                       "name one with --file", err=True)
            raise typer.Exit(EXIT_USAGE)
        try:
            found = st.select_events(path, seconds, target)
        except PermissionError:
            raise AccessDenied(f"cannot read {path}: permission denied (it is root's: try sudo)")
        except OSError as e:
            raise MemwatchdError(f"cannot read {path}: {e.strerror}")
    except MemwatchdError as e:
        raise fail(e)
    if found.skipped:
        typer.echo(f"memwatchd: skipped {found.skipped} unreadable line(s) in {path} "
                   "(a torn write: the host may have stopped mid-write)", err=True)
    if json_out:
        for event in found:
            typer.echo(json.dumps(event, sort_keys=True))
        return
    if not found:
        typer.echo(f"no events in {path}" + (f" in the last {since}" if since else "")
                   + (f" for {target}" if target else ""))
        return
    st.console().print(st.events_table(found))


@app.command("install-units")
def install_units(
    prefix: Optional[Path] = typer.Option(
        None, "--prefix", help="Write unit files here instead of /etc/systemd/system (no daemon-reload)."),
    config_path: Path = typer.Option(
        Path("/etc/memwatchd/memwatchd.toml"), "--config", help="Where the starting config goes (never overwritten)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be written; write nothing."),
) -> None:
    """Install memwatchd.service (ExecStart pointing at this installation) and a starting config.

    Then `systemctl enable --now memwatchd` is all that is left. An existing config is kept.

    Example: sudo memwatchd install-units && sudo systemctl enable --now memwatchd
    """
    from memwatchd import install
    plan = install.plan_install(str(prefix) if prefix else None, str(config_path))
    for path, content, mode in plan.files:
        typer.echo(f"{'would write' if dry_run else 'writing'} {path} (mode {mode:o})")
        if dry_run:
            typer.echo("".join(f"    {line}\n" for line in content.splitlines()), nl=False)
    for path in plan.kept:
        typer.echo(f"keeping existing {path}")
    for note in plan.notes:
        typer.echo(f"note: {note}")
    if dry_run:
        return
    try:
        install.install_units(plan)
    except PermissionError as e:
        typer.echo(f"memwatchd: {e} (run as root, or use --prefix)", err=True)
        raise typer.Exit(4)
    except MemwatchdError as e:
        raise fail(e)
    if plan.reload_systemd:
        typer.echo("systemd reloaded; now: systemctl enable --now memwatchd")
    else:
        typer.echo("now (on a machine with systemd): systemctl daemon-reload && "
                   "systemctl enable --now memwatchd")


# ------------------------------------------------- record, replay, suggest (issue 14)
# Thin wrappers: the work is in memwatchd/record.py, replay.py and suggest.py.

@app.command(context_settings={"allow_interspersed_args": False})
def record(
    command: Optional[List[str]] = typer.Argument(
        None, metavar="[-- COMMAND [ARGS...]]", help="Start this command and record it (and its children)."),
    out: Path = typer.Option(..., "--out", "-o", help="Trace file to write (NDJSON; gzip'ed if it ends in .gz)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Record the targets of this config file."),
    pid: Optional[List[int]] = typer.Option(None, "--pid", "-p", help="Record this process (repeatable)."),
    unit: Optional[str] = typer.Option(None, "--unit", "-u", help="Record this systemd unit's cgroup."),
    cgroup: Optional[str] = typer.Option(None, "--cgroup", help="Record a cgroup v2 directory (path or glob)."),
    duration: Optional[str] = typer.Option(None, "--duration", "-d", help="Stop recording after this long (30s, 10m, 2h)."),
    limit: str = typer.Option("100%", "--limit", "-l", help="The limit the dry-run policy applies (recorded as its decisions)."),
    warn: Optional[str] = typer.Option(None, "--warn", help="A warn level for the dry-run policy."),
    interval: str = typer.Option("1s", "--interval", help="Slowest sampling period (faster near the limit)."),
    predict: Optional[str] = typer.Option(None, "--predict", help="The dry-run policy's predictive horizon (e.g. 30s); every reading of a target approaching its limit is then written, as the trend needs."),
    name: Optional[str] = typer.Option(None, "--name", help="The watch name in the trace (default: the command's name)."),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Sample like the daemon and act on nothing: write what its policy would see to a trace.

    The trace replays with `memwatchd replay` and feeds `memwatchd suggest`. Nothing is
    signalled, no events or state file is written, on_action programs never run.

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
        raise fail(e)
    except OSError as e:
        typer.echo(f"memwatchd record: {out}: {e.strerror}", err=True)
        raise typer.Exit(1)
    typer.echo(f"recorded {done.targets} target(s) for {done.seconds:.1f} s to {out} "
               f"({done.size / 1024:.1f} KiB)", err=True)
    if done.exit_status is not None:
        raise typer.Exit(128 - done.exit_status if done.exit_status < 0 else done.exit_status)


@app.command()
def replay(
    trace: Path = typer.Argument(..., help="A trace file (record --out) or the daemon's trace directory."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The config to try (default: the one recorded in the trace)."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per decision, then a summary."),
    t_from: Optional[str] = typer.Option(None, "--from", help="Start here: seconds into the trace (90s, 5m) or a UTC time (08:40:00)."),
    t_to: Optional[str] = typer.Option(None, "--to", help="Stop here (same forms as --from)."),
) -> None:
    """Run the policy of a config over a trace: every decision it would take, next to what happened.

    The same Policy code as the daemon, on a virtual clock. After an action the trace no longer
    says what would have happened: later decisions on that target are marked as after a
    divergence, a killed target's later readings are ignored, and freed memory is added back to
    the host's figures (an approximation, listed under "note").

    Example: memwatchd replay /var/lib/memwatchd/trace --config new.toml --from 08:00:00
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


@app.command()
def suggest(
    traces: List[Path] = typer.Argument(..., help="Trace files or trace directories (all runs are pooled per watch)."),
    events: Optional[Path] = typer.Option(None, "--events", help="An events file: runs memwatchd stopped are censored, not complete."),
    percentile: float = typer.Option(95.0, "--percentile", help="Percentile of the complete runs' peaks to cover."),
    margin: float = typer.Option(20.0, "--margin", help="Headroom above that percentile, in percent."),
    half_life: str = typer.Option("7d", "--half-life", help="A run this much older than the newest counts half (d, h, m, s)."),
    json_out: bool = typer.Option(False, "--json", help="The analysis as one JSON object."),
) -> None:
    """Recommend a limit and warn level per watch from recorded runs, then replay them.

    Per watch: each run's peak; the limit is a high percentile of the peaks of runs that
    finished on their own (weighted by age) plus a margin, and never below the largest of
    those peaks. Runs that were stopped (or still running when the trace ended) only say
    "at least this much": they are listed as censored, never counted as complete.

    Example: memwatchd suggest /var/lib/memwatchd/trace build-*.trace.gz
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
