"""The `memwatchd` console script.

`memwatchd run` is what systemd keeps resident, and its memory is a goal, so
its plain forms (`run [--config PATH] [--insecure] [--dry-run]`) start the
daemon without importing Typer, Click or Rich (about 18 MiB of RSS). Every
other command, `--help`, and anything unusual go to the Typer app in cli.py.
"""
from __future__ import annotations

import sys
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import List, Optional, Tuple

from memwatchd.types import AccessDenied, ConfigError, InsecureConfigError, MemwatchdError, TargetGone

# The core raises; the CLI exits. Most specific first. cli.py uses the same table.
EXIT_CODES = (
    (InsecureConfigError, 3),
    (ConfigError, 2),
    (AccessDenied, 4),
    (TargetGone, 5),
    (MemwatchdError, 1),
)


def exit_code_for(error: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return 1


def run_daemon(config_path: Optional[str], insecure: bool, dry_run: bool) -> int:
    """Load the config and run the loop until SIGTERM. Raises MemwatchdError / OSError."""
    from memwatchd.config import load_config
    from memwatchd.daemon import Daemon, Options
    config = load_config(config_path, insecure=insecure, parse_in_child=True)
    if dry_run:
        config = config._replace(daemon=config.daemon._replace(dry_run=True))
    return Daemon(config, Options(config_path=config_path, insecure=insecure)).run()


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


def main() -> None:
    args = sys.argv[1:]
    plain = parse_plain_run(args[1:]) if args[:1] == ["run"] else None
    if plain is None:
        from memwatchd.cli import app
        app()
        return
    try:
        code = run_daemon(*plain)
    except (MemwatchdError, OSError) as e:
        print(f"memwatchd: {e}", file=sys.stderr)
        code = exit_code_for(e)
    sys.exit(code)
