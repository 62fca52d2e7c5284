"""The `memwatchd` console script.

`memwatchd run` is what systemd keeps resident, and its memory is a goal, so
its plain forms (`run [--config PATH] [--insecure] [--dry-run]`) start the
daemon without importing Typer, Click or Rich (about 18 MiB of RSS). Every
other command, `--help`, and anything unusual go to the Typer app in cli.py.
Imports go one way: entry -> cli -> daemon; nothing imports entry.

Before the daemon starts, the console script's own directory leaves sys.path
(forget_script_dir): Python puts it first, and the finder for it caches every
name in it for the daemon's whole life - /usr/bin's 1,300 names are 0.2 MiB -
though no module the daemon imports is there.
"""
from __future__ import annotations

import sys
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import List, Optional, Tuple

from memwatchd.types import EXIT_CODES, MemwatchdError, exit_code_for

__all__ = ["EXIT_CODES", "exit_code_for", "parse_plain_run", "main"]   # EXIT_CODES: its old home


def parse_plain_run(args: List[str]) -> Optional[Tuple[Optional[str], bool, bool]]:
    """(config, insecure, dry_run) for the plain forms of `run`; None for anything else."""
    config, insecure, dry_run = None, False, False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--config", "-c") and i + 1 < len(args) and not args[i + 1].startswith("-"):
            config = args[i + 1]
            i += 1
        elif arg.startswith("--config=") and len(arg) > len("--config="):
            config = arg[len("--config="):]
        elif arg == "--insecure":
            insecure = True
        elif arg == "--dry-run":
            dry_run = True
        else:
            return None
        i += 1
    return config, insecure, dry_run


def forget_script_dir() -> None:
    """Drop the running script's directory (sys.path[0] for a console script) from the
    import path and its cached listing. memwatchd itself is imported already and its
    submodules are found through memwatchd.__path__; `python -m` and `-c` put the working
    directory there instead, which is left alone."""
    import os
    script = sys.argv[0] if sys.argv else ""
    if not sys.path or not sys.path[0] or script in ("", "-c") or not os.path.isfile(script) \
            or os.path.basename(script) == "__main__.py":
        return
    here = os.path.dirname(os.path.abspath(script))
    if os.path.abspath(sys.path[0]) in (here, os.path.realpath(here)):
        sys.path_importer_cache.pop(sys.path.pop(0), None)


def main() -> None:
    args = sys.argv[1:]
    plain = parse_plain_run(args[1:]) if args[:1] == ["run"] else None
    if plain is None:
        from memwatchd.cli import app
        app()
        return
    forget_script_dir()
    from memwatchd.daemon import run_from_file
    from memwatchd.report import fatal_line
    try:
        code = run_from_file(*plain)
    except (MemwatchdError, OSError) as e:
        # Under systemd this goes to the journal with the error priority ("<3>").
        print(fatal_line(str(e)), file=sys.stderr)
        code = exit_code_for(e)
    sys.exit(code)
