"""The command line: the only module that imports Typer, prints, or exits.

Every command is a thin shell over the core; one table (EXIT_CODES) maps the
core's errors to exit codes.
"""
from __future__ import annotations

from typing import Optional

import typer

from memwatchd import __version__

app = typer.Typer(
    name="memwatchd",
    help="Stop a runaway process, systemd unit or cgroup before it stalls the machine.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


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
    """memwatchd watches the memory of what you name and stops an offender before the host stalls."""


def main() -> None:
    app()
