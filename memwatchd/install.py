"""`memwatchd install-units`: put the unit file and a starting config in place.

The shipped unit says ExecStart=/usr/local/bin/memwatchd run; here it is rewritten
to this installation's memwatchd (a venv, /usr/local, /opt, ...) and to the config
it is given, so that `systemctl enable --now memwatchd` is all a user types
afterwards. The unit runs that code as root, so before anything is written:

  - visibility: the shipped sandbox hides /home, /root and /run/user
    (ProtectHome=yes) and gives the service its own /tmp and /var/tmp
    (PrivateTmp=yes). An installation or config there gets exactly that option
    relaxed (ProtectHome=read-only, PrivateTmp=no), and the plan says so; one the
    sandbox hides in a way that cannot be relaxed safely (under /dev, /proc,
    /sys) is refused, naming the option.
  - trust: the interpreter, the package's files (for an editable install, its
    source tree) and every directory on sys.path, with the directories above
    them, must be owned by root and not writable by group or others - the same
    rule the daemon applies to its config. Otherwise whoever can write them
    runs code as root: refused, unless --insecure (which says so loudly).
  - nothing is overwritten without --force: an existing config is kept, an
    existing unit that differs is refused (the dry run shows the diff).
"""
from __future__ import annotations

import difflib
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterable, List, Optional, Tuple

from memwatchd.types import InsecureConfigError, MemwatchdError

UNIT_DIR = "/etc/systemd/system"
CONFIG_PATH = "/etc/memwatchd/memwatchd.toml"
UNITS = ("memwatchd.service",)
SHIPPED_EXEC = "/usr/local/bin/memwatchd"

# What the shipped unit hides, and the least relaxation that makes a path visible:
# (path prefixes, option, value as shipped, relaxed value; None = cannot be relaxed).
HIDDEN_BY = (
    (("/home/", "/root/", "/run/user/"), "ProtectHome", "yes", "read-only"),
    (("/tmp/", "/var/tmp/"), "PrivateTmp", "yes", "no"),
    (("/dev/",), "PrivateDevices", "yes", None),
    (("/proc/", "/sys/"), "ProtectKernelTunables", "yes", None),
)


@dataclass
class PlannedFile:
    path: str           # where it is written (under --root, if given)
    content: str
    mode: int
    old: Optional[str]  # the existing file's content, None if there is none
    replace: bool       # write it (new, or differs and --force)

    @property
    def state(self) -> str:
        if self.old is None:
            return "new"
        return "unchanged" if self.old == self.content else "differs"

    def diff(self) -> str:
        return "".join(difflib.unified_diff(
            (self.old or "").splitlines(True), self.content.splitlines(True),
            fromfile=self.path if self.old is not None else "/dev/null", tofile=self.path))


@dataclass
class Plan:
    files: List[PlannedFile] = field(default_factory=list)
    kept: List[str] = field(default_factory=list)        # existing files left alone
    notes: List[str] = field(default_factory=list)       # sandbox changes, said out loud
    warnings: List[str] = field(default_factory=list)    # what --insecure let through
    reload_systemd: bool = False


def memwatchd_command() -> str:
    """How systemd should start this installation: its console script, else python -m."""
    script = os.path.join(os.path.dirname(sys.executable), "memwatchd")
    if os.access(script, os.X_OK):
        return os.path.abspath(script)
    return f"{os.path.abspath(sys.executable)} -m memwatchd"


def installation_paths() -> List[str]:
    """What the unit will run as root: the interpreter (and what it resolves to), the
    package (an editable install's source tree), and every directory on sys.path."""
    import memwatchd
    package = os.path.dirname(os.path.realpath(memwatchd.__file__))
    paths = [os.path.abspath(sys.executable), os.path.realpath(sys.executable), package]
    cwd = os.getcwd()
    for entry in sys.path:
        # '' and the cwd are on sys.path for `python -m`; systemd starts with cwd=/.
        if entry and os.path.isdir(entry) and os.path.abspath(entry) != cwd:
            paths.append(os.path.abspath(entry))
    return list(dict.fromkeys(paths))


def shipped(name: str) -> str:
    return resources.files("memwatchd").joinpath("data", name).read_text()


_SAFE_WORD = re.compile(r"[A-Za-z0-9/._+@:=,-]+")


def systemd_quote(word: str) -> str:
    """One ExecStart= word: as is when plain, else double-quoted with systemd's escapes."""
    if _SAFE_WORD.fullmatch(word):
        return word
    if any(ord(c) < 32 for c in word):
        raise MemwatchdError(f"{word!r}: control characters cannot go into ExecStart=")
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def sandbox_changes(paths: Iterable[str]) -> Tuple[dict, List[str]]:
    """{option: relaxed value} so that every path stays visible, and a note per change.
    Raises MemwatchdError for a path the sandbox hides beyond what may be relaxed."""
    changes, notes = {}, []
    for path in paths:
        probe = os.path.abspath(path).rstrip("/") + "/"
        for prefixes, option, shipped_value, relaxed in HIDDEN_BY:
            hit = next((p for p in prefixes if probe.startswith(p)), None)
            if hit is None:
                continue
            if relaxed is None:
                raise MemwatchdError(
                    f"{path} is under {hit}, which the unit's {option}={shipped_value} hides from "
                    f"the service; install memwatchd elsewhere (e.g. /opt or /usr/local)")
            if option not in changes:
                changes[option] = relaxed
                notes.append(f"{option}={relaxed} instead of {option}={shipped_value}: {path} is "
                             f"under {hit}, which {option}={shipped_value} hides from the service")
    return changes, notes


def render_unit(text: str, command: str, config_path: Optional[str] = None,
                changes: Optional[dict] = None) -> str:
    """The shipped unit with ExecStart at command (and --config), sandbox options relaxed."""
    if changes is None:
        changes, _ = sandbox_changes([command.split()[0]] + ([config_path] if config_path else []))
    exec_words = [systemd_quote(w) for w in command.split()] + ["run"]
    if config_path and config_path != CONFIG_PATH:
        exec_words += ["--config", systemd_quote(config_path)]
    out = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if line.startswith("ExecStart=") and SHIPPED_EXEC in line:
            line = "ExecStart=" + " ".join(exec_words)
        elif key in changes and "=" in line and not line.lstrip().startswith("#"):
            out.append(f"# install-units: memwatchd or its config lives where {line.strip()} "
                       "would hide it.")
            line = f"{key}={changes[key]}"
        out.append(line)
    return "\n".join(out) + "\n"


def code_problems(paths: Iterable[str], owner: int = 0) -> List[str]:
    """Every file or directory among paths (recursively), or above them, that someone
    other than `owner` (root) owns or that group or others may write. Sticky
    directories (/tmp) may be world-writable: others cannot replace what is in them."""
    problems, seen = [], set()

    def check(path: str, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            return                          # a symlink's own mode means nothing; its target is checked
        if st.st_uid != owner:
            problems.append(f"{path}: owned by uid {st.st_uid}, not root")
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not (
                stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            problems.append(f"{path}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        try:
            check(path, os.lstat(path))
        except OSError:
            pass

    for top in paths:
        for start in dict.fromkeys((os.path.abspath(top), os.path.realpath(top))):
            d = os.path.dirname(start)
            while True:
                visit(d)
                if d == "/":
                    break
                d = os.path.dirname(d)
            visit(start)
            if os.path.isdir(start) and not os.path.islink(start):
                for root, dirs, files in os.walk(start):
                    for name in dirs + files:
                        visit(os.path.join(root, name))
    return problems


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        return "<binary>"


def plan_install(prefix: Optional[str] = None, config_path: str = CONFIG_PATH,
                 command: Optional[str] = None, root: Optional[str] = None, force: bool = False,
                 insecure: bool = False, code_paths: Optional[List[str]] = None) -> Plan:
    """What install_units would do; nothing is written. Raises MemwatchdError when the
    unit would not start, or would run code that others can change (InsecureConfigError)."""
    command = command or memwatchd_command()
    code_paths = installation_paths() if code_paths is None else code_paths
    config_path = os.path.abspath(config_path)
    plan = Plan()
    changes, plan.notes = sandbox_changes([command.split()[0]] + code_paths + [config_path])
    problems = code_problems(code_paths + [command.split()[0]])
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        if not insecure:
            raise InsecureConfigError(
                f"refusing to install a unit that runs, as root, code that others can change: {shown}. "
                "Install memwatchd where only root can write (e.g. a venv under /opt created by root), "
                "or pass --insecure (development only)")
        plan.warnings.append(f"INSECURE: the unit runs, as root, code that others can change: {shown}")

    inside = (lambda p: os.path.join(root, p.lstrip("/"))) if root else (lambda p: p)
    unit_dir = prefix or inside(UNIT_DIR)
    for name in UNITS:
        path = os.path.join(unit_dir, name)
        content = render_unit(shipped(name), command, config_path, changes)
        f = PlannedFile(path, content, 0o644, _read(path), replace=False)
        if f.state == "differs" and not force:
            raise MemwatchdError(f"{path} exists and differs from the unit to install; see the "
                                 "difference with --dry-run, replace it with --force")
        f.replace = f.state != "unchanged"
        plan.files.append(f)
    config_file = inside(config_path)
    old = _read(config_file)
    if old is not None and not force:
        plan.kept.append(config_file)
    elif old != shipped("memwatchd.toml"):
        plan.files.append(PlannedFile(config_file, shipped("memwatchd.toml"), 0o600, old, replace=True))
    plan.reload_systemd = prefix is None and root is None and systemd_is_pid1()
    return plan


def systemd_is_pid1() -> bool:
    return os.path.isdir("/run/systemd/system")


def install_units(plan: Plan) -> List[str]:
    """Write the plan (atomically per file; a replaced file is kept as PATH.old), then
    `systemctl daemon-reload` if asked. Returns the backups made."""
    backups = []
    for f in plan.files:
        if not f.replace:
            continue
        directory = os.path.dirname(f.path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if f.old is not None:
            shutil.copy2(f.path, f.path + ".old")
            backups.append(f.path + ".old")
        tmp = f"{f.path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, f.mode)
        try:
            os.write(fd, f.content.encode())
            os.fchmod(fd, f.mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, f.path)
    if plan.reload_systemd:
        systemctl = shutil.which("systemctl") or "/bin/systemctl"
        done = subprocess.run([systemctl, "daemon-reload"], capture_output=True, text=True)
        if done.returncode != 0:
            raise MemwatchdError(f"systemctl daemon-reload failed: {done.stderr.strip()}")
    return backups


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
