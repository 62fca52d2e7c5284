#!/usr/bin/python3
"""Build-time helper for memwatchd(8), run by debian/rules with the built package on PYTHONPATH.

  manpage.py cli ARGS...   the memwatchd CLI with plain (not Rich) help, for help2man
  manpage.py commands      a help2man include: one subsection per command, its --help

Typer 0.7 (Debian 12) draws its help with Rich boxes whenever Rich is installed;
a man page wants the plain Click text, so Rich is switched off here only.
"""
import sys

import click
import typer
import typer.core

typer.core.rich = None          # typer 0.7: the Rich formatter is used iff this is set
typer.core.HAS_RICH = False     # later typers

from memwatchd.cli import app  # noqa: E402  (after the switch above)


def roff(text: str) -> str:
    lines = []
    for line in text.replace("\\", "\\e").splitlines():
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def commands() -> str:
    group = typer.main.get_command(app)
    top = click.Context(group, info_name="memwatchd", terminal_width=78, max_content_width=78)
    out = ["[COMMANDS]",
           "Each command's own help, as printed by \\fBmemwatchd\\fR \\fIcommand\\fR \\fB\\-\\-help\\fR."]
    for name in group.list_commands(top):
        command = group.get_command(top, name)
        ctx = click.Context(command, info_name=name, parent=top,
                            terminal_width=78, max_content_width=78)
        out += [f'.SS "memwatchd {name}"', ".nf", roff(command.get_help(ctx)), ".fi"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["commands"]:
        sys.stdout.write(commands())
    elif sys.argv[1:2] == ["cli"]:
        sys.argv = ["memwatchd"] + sys.argv[2:]
        app(prog_name="memwatchd")
    else:
        sys.exit("usage: manpage.py cli ARGS... | manpage.py commands")
