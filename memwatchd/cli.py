"""The command line: the only module that imports Typer, prints, or exits.

Every command is a thin shell over the core; EXIT_CODES is the one table that
maps the core's errors to exit codes.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from memwatchd import __version__
from memwatchd.types import AccessDenied, ConfigError, InsecureConfigError, MemwatchdError, TargetGone

# The core raises; the CLI exits. Most specific first.
EXIT_CODES = (
    (InsecureConfigError, 3),
    (ConfigError, 2),
    (AccessDenied, 4),
    (TargetGone, 5),
    (MemwatchdError, 1),
)
EXIT_USAGE = 2

app = typer.Typer(
    name="memwatchd",
    help="Stop a runaway process, systemd unit or cgroup before it stalls the machine.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def fail(error: MemwatchdError) -> "typer.Exit":
    """Print the error on stderr and give the exit code for its class."""
    typer.echo(f"memwatchd: {error}", err=True)
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return typer.Exit(code)
    return typer.Exit(1)


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
    from dataclasses import replace

    from memwatchd.daemon import Daemon, Options
    try:
        cfg = _load(config, insecure)
        if dry_run:
            cfg = replace(cfg, daemon=replace(cfg.daemon, dry_run=True))
        daemon = Daemon(cfg, Options(config_path=str(config) if config else None, insecure=insecure))
    except MemwatchdError as e:
        raise fail(e)
    except OSError as e:
        typer.echo(f"memwatchd: {e}", err=True)
        raise typer.Exit(1)
    raise typer.Exit(daemon.run())


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


def main() -> None:
    app()
