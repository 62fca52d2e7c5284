"""`memwatchd install-units`: put the unit file and a starting config in place.

The shipped unit says ExecStart=/usr/local/bin/memwatchd; here it is rewritten
to this installation's memwatchd (a venv, /usr/local, ...), so that
`systemctl enable --now memwatchd` is all a user types afterwards. An existing
config is never overwritten. Returns a plan of what it wrote (or would write).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import List, Optional

from memwatchd.types import MemwatchdError

UNIT_DIR = "/etc/systemd/system"
CONFIG_PATH = "/etc/memwatchd/memwatchd.toml"
UNITS = ("memwatchd.service",)
SHIPPED_EXEC = "/usr/local/bin/memwatchd"
# ProtectHome=yes hides /root and /home: an installation there could not start.
HOME_DIRS = ("/root/", "/home/", "/run/user/")


@dataclass
class Plan:
    files: List[tuple] = field(default_factory=list)     # (path, content, mode)
    kept: List[str] = field(default_factory=list)        # existing files left alone
    notes: List[str] = field(default_factory=list)
    reload_systemd: bool = False


def memwatchd_command() -> str:
    """How systemd should start this installation: its console script, else python -m."""
    script = os.path.join(os.path.dirname(sys.executable), "memwatchd")
    if os.access(script, os.X_OK):
        return os.path.abspath(script)
    return f"{os.path.abspath(sys.executable)} -m memwatchd"


def shipped(name: str) -> str:
    return resources.files("memwatchd").joinpath("data", name).read_text()


def render_unit(text: str, command: str) -> str:
    """The shipped unit with ExecStart pointing at command (and ProtectHome relaxed if needed)."""
    out = []
    for line in text.splitlines():
        if line.startswith("ExecStart=") and SHIPPED_EXEC in line:
            line = line.replace(SHIPPED_EXEC, command, 1)
        elif line.strip() == "ProtectHome=yes" and command.startswith(HOME_DIRS):
            out.append("# memwatchd is installed below a home directory: it must stay readable.")
            line = "ProtectHome=read-only"
        out.append(line)
    return "\n".join(out) + "\n"


def plan_install(prefix: Optional[str] = None, config_path: str = CONFIG_PATH,
                 command: Optional[str] = None) -> Plan:
    """What install_units would do; nothing is written."""
    command = command or memwatchd_command()
    plan = Plan()
    unit_dir = prefix or UNIT_DIR
    for name in UNITS:
        plan.files.append((os.path.join(unit_dir, name), render_unit(shipped(name), command), 0o644))
    if os.path.exists(config_path):
        plan.kept.append(config_path)
    else:
        plan.files.append((config_path, shipped("memwatchd.toml"), 0o600))
    if command.startswith(HOME_DIRS):
        plan.notes.append(f"{command} is below a home directory: the unit uses "
                          "ProtectHome=read-only instead of ProtectHome=yes")
    plan.reload_systemd = prefix is None and systemd_is_pid1()
    return plan


def systemd_is_pid1() -> bool:
    return os.path.isdir("/run/systemd/system")


def install_units(plan: Plan) -> None:
    """Write the plan (atomically per file), then `systemctl daemon-reload` if asked."""
    for path, content, mode in plan.files:
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.write(fd, content.encode())
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    if plan.reload_systemd:
        systemctl = shutil.which("systemctl") or "/bin/systemctl"
        done = subprocess.run([systemctl, "daemon-reload"], capture_output=True, text=True)
        if done.returncode != 0:
            raise MemwatchdError(f"systemctl daemon-reload failed: {done.stderr.strip()}")


# ------------------------------------------------------------------ check-config

_UNIT_DIRECTORIES = {"StateDirectory": "/var/lib", "RuntimeDirectory": "/run",
                     "LogsDirectory": "/var/log", "CacheDirectory": "/var/cache"}


def unit_writable_paths(text: str) -> Optional[List[str]]:
    """The directories a unit with ProtectSystem=strict may write (ReadWritePaths=, its
    State/Runtime/Logs/CacheDirectory=, /tmp and /var/tmp with PrivateTmp=); None if the
    unit does not make the file system read-only (then any path may be written)."""
    strict, paths = False, []
    for raw in text.splitlines():
        line = raw.strip()
        if "=" not in line or line.startswith(("#", ";")):
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if key == "ProtectSystem":
            strict = value == "strict"
        elif key == "ReadWritePaths":
            paths += [p.lstrip("-+") for p in value.split()]
        elif key in _UNIT_DIRECTORIES:
            paths += [os.path.join(_UNIT_DIRECTORIES[key], p) for p in value.split()]
        elif key == "PrivateTmp" and value in ("yes", "true", "1", "on"):
            paths += ["/tmp", "/var/tmp"]
    return paths if strict else None


def installed_unit_text() -> str:
    """The unit systemd would run: the installed one and its drop-ins, else the shipped one."""
    path = os.path.join(UNIT_DIR, UNITS[0])
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return shipped(UNITS[0])
    dropins = path + ".d"
    try:
        names = sorted(n for n in os.listdir(dropins) if n.endswith(".conf"))
    except OSError:
        names = []
    for name in names:
        try:
            with open(os.path.join(dropins, name)) as f:
                text += "\n" + f.read()
        except OSError:
            pass
    return text


def events_path_problem(path: str, unit_text: Optional[str] = None) -> str:
    """Why the daemon could not open this events file ("" if it could, as far as can be
    told without creating it): a parent that is not a directory, a path that is not a
    regular file, or a path outside what the memwatchd unit may write."""
    if not path:
        return ""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    if os.path.lexists(path) and not os.path.isfile(path):
        return "not a regular file"
    writable = unit_writable_paths(installed_unit_text() if unit_text is None else unit_text)
    if writable is not None and not any(
            os.path.abspath(path).startswith(os.path.abspath(w).rstrip("/") + "/") for w in writable):
        return ("outside the paths the memwatchd unit may write (ProtectSystem=strict; "
                f"{', '.join(writable)}): under systemd it cannot be opened; use a path below "
                "/var/lib/memwatchd, or add ReadWritePaths= in a drop-in")
    return ""
