"""Load and validate memwatchd's TOML configuration.

Strict on purpose: an unknown key, a wrong type or an impossible combination is a
ConfigError, because a typo must never silently turn protection off. Every message
names the file, the dotted key (``watch[2].limit``, 0-based like the TOML array)
and the offending value. Stdlib only: the daemon's resident memory is a goal.
"""
from __future__ import annotations

import os
import re
import stat
from collections import namedtuple
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import Any, Dict, Iterable, Optional, Tuple, Union

from memwatchd import toml_child
from memwatchd.types import ConfigError, InsecureConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH", "CGROUP_ROOT", "Size", "DaemonConfig", "GuardConfig",
    "ProtectConfig", "MetricsConfig", "WatchConfig", "Config", "parse_size",
    "parse_duration", "parse_config", "load_config", "default_config",
    "check_secure_file",
]

DEFAULT_CONFIG_PATH = "/etc/memwatchd/memwatchd.toml"
CGROUP_ROOT = "/sys/fs/cgroup"
BUILTIN_SOURCE = "<built-in default>"

SELECTOR_KINDS = ("pid", "pidfile", "unit", "cgroup", "cmdline", "container")
CGROUP_KINDS = ("unit", "cgroup", "container")   # measured as a whole cgroup
ACTIONS = ("warn", "term", "kill", "throttle", "freeze")
SCOPES = ("process", "tree", "cgroup")
CGROUP_USAGES = ("current", "anon", "current-inactive_file")
PROCESS_USAGES = ("rss",)
COMM_LEN = 15            # the kernel truncates comm (TASK_COMM_LEN - 1) to this many bytes
PID_MAX = 4194304        # PID_MAX_LIMIT on 64-bit Linux
MAX_SIZE = 2**63 - 1     # the sampler keeps sizes in int64 arrays
MAX_DURATION = 30 * 86400.0

# Allowed keys per table. Parsing rejects anything else; the example-file test
# checks that examples/memwatchd.toml shows every one of them.
KEYS: Dict[str, Tuple[str, ...]] = {
    "": ("daemon", "guard", "protect", "metrics", "watch"),
    "daemon": ("interval", "min_interval", "fill_rate", "cooldown", "dry_run", "events", "state",
               "trace", "trace_size"),
    "guard": ("enabled", "min_available", "kill_available", "count_swap", "psi_full", "psi_full_kill",
              "psi_some", "psi_io_full", "psi_window", "psi_available", "psi_refaults", "grace",
              "predict"),
    "protect": ("names", "cgroups"),
    "metrics": ("listen", "textfile"),
    "watch": ("name",) + SELECTOR_KINDS + (
        "limit", "warn", "sustain", "action", "grace", "scope", "usage", "on_action", "predict"),
}

DEFAULT_PROTECT_NAMES = ("systemd", "systemd-journal", "sshd")
DEFAULT_PROTECT_CGROUPS = ("/init.scope", "/system.slice/ssh.service", "/system.slice/sshd.service")
DEFAULT_METRICS_LISTEN = "127.0.0.1:9577"


# --------------------------------------------------------------- records
# Named tuples rather than dataclasses: see memwatchd/types.py. Each table's
# defaults are a dict, so every field keeps its comment next to its default.


class Size(namedtuple("Size", "bytes percent")):
    """An amount of memory: absolute bytes, or a percentage of a base known only at run time.

    The base is MemTotal for the guard and for process/tree watches, and the cgroup's
    memory.max for cgroup watches (MemTotal when the cgroup has no memory.max);
    whoever resolves the target passes the base in.
    """

    __slots__ = ()

    def __new__(cls, bytes: Optional[int] = None, percent: Optional[float] = None) -> "Size":
        if (bytes is None) == (percent is None):
            raise ValueError("Size needs exactly one of bytes or percent")
        return super().__new__(cls, bytes, percent)

    def resolve(self, base: int) -> int:
        """Bytes for this size, given the base a percentage refers to."""
        if self.bytes is not None:
            return self.bytes
        return int(base * self.percent / 100)

    def __str__(self) -> str:
        if self.percent is not None:
            return f"{self.percent:g}%"
        for unit, mult in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if self.bytes >= mult and self.bytes % mult == 0:
                return f"{self.bytes // mult}{unit}"
        return f"{self.bytes}B"


_DAEMON_DEFAULTS = {
    "interval": 1.0,                 # slowest sampling period, seconds
    "min_interval": 0.01,            # fastest sampling period, seconds
    "fill_rate": 4 * 2**30,          # assumed worst-case growth, bytes per second
    "cooldown": 5.0,
    "dry_run": False,
    "events": "/var/lib/memwatchd/events.jsonl",
    "state": "/run/memwatchd/state.json",
    "trace": "",                     # a directory for the trace ring (memwatchd/trace.py); "" = off
    "trace_size": 64 * 2**20,        # the ring's cap in bytes, oldest segment dropped first
}


class DaemonConfig(namedtuple("DaemonConfig", _DAEMON_DEFAULTS, defaults=_DAEMON_DEFAULTS.values())):
    """The main loop: sampling periods, back-off after acting, where records go ("" = off)."""

    __slots__ = ()


_GUARD_DEFAULTS = {
    "enabled": True,
    "min_available": Size(percent=5.0),
    "kill_available": Size(percent=2.0),
    "count_swap": True,              # headroom = MemAvailable + free swap (zram at its net worth)
    "psi_full": 5.0,                 # % of psi_window all tasks stalled: SIGTERM (0 = off)
    "psi_full_kill": 50.0,           # ... SIGKILL at once (0 = off)
    "psi_some": 0.0,                 # % of psi_window some task stalled: SIGTERM (0 = off)
    "psi_io_full": 20.0,             # % of psi_window all tasks waited for I/O: SIGTERM (0 = off)
    "psi_window": 2.0,               # seconds of pressure history, measured since the last action
    "psi_available": Size(percent=20.0),  # pressure counts only with MemAvailable below this
    "psi_refaults": 4 * 2**20,       # ...and while evicted pages come back at this many bytes/s
    "grace": 5.0,
    "predict": 0.0,                  # horizon of the host's predictive trigger; 0 = off
}
PSI_FULL_AVG10 = "psi_full_avg10"    # the older name of psi_full, still accepted


class GuardConfig(namedtuple("GuardConfig", _GUARD_DEFAULTS, defaults=_GUARD_DEFAULTS.values())):
    """The host guard: keeps MemAvailable above a floor by stopping the largest eligible process."""

    __slots__ = ()

    def thresholds(self, mem_total: int) -> Tuple[int, int]:
        """(term_below, kill_below) in bytes; kill never above term, even when mixing % and bytes."""
        term = self.min_available.resolve(mem_total)
        return term, min(self.kill_available.resolve(mem_total), term)


class ProtectConfig(namedtuple("ProtectConfig", "names cgroups",
                               defaults=(DEFAULT_PROTECT_NAMES, DEFAULT_PROTECT_CGROUPS))):
    """What the host guard never signals: comm names (<= 15 bytes) and cgroup subtrees."""

    __slots__ = ()


_METRICS_DEFAULTS = {
    "listen": "",                    # "host:port" or "[v6]:port"; "" = no HTTP endpoint
    "textfile": "",                  # node_exporter textfile path; "" = none
}


class MetricsConfig(namedtuple("MetricsConfig", _METRICS_DEFAULTS, defaults=_METRICS_DEFAULTS.values())):
    """Prometheus exposition; off unless the [metrics] table exists."""

    __slots__ = ()

    @property
    def address(self) -> Optional[Tuple[str, int]]:
        """(host, port) to bind, brackets stripped from IPv6; None when off."""
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


_WATCH_DEFAULTS = {
    "warn": None,                    # a Size, or None: no warning
    "sustain": 0.0,
    "action": "term",
    "grace": 10.0,
    "scope": "process",
    "usage": "rss",                  # "rss" for process/tree, one of CGROUP_USAGES for cgroup
    "on_action": (),
    "predict": 0.0,                  # horizon of the predictive trigger (memwatchd/predict.py); 0 = off
}


class WatchConfig(namedtuple("WatchConfig", ("name", "kind", "selector", "limit", *_WATCH_DEFAULTS),
                             defaults=_WATCH_DEFAULTS.values())):
    """One watched target: kind is one of SELECTOR_KINDS; ``selector`` is an int for
    kind "pid", a str otherwise; limit is a Size."""

    __slots__ = ()


class Config(namedtuple("Config", "daemon guard protect metrics watches source warnings",
                        defaults=((),))):
    """The whole validated configuration; ``watches`` is a tuple of WatchConfig,
    ``source`` the file it came from, ``warnings`` what is valid but probably not
    meant (check-config prints them, the daemon logs them)."""

    __slots__ = ()


def default_config() -> Config:
    """What runs with no config file: the host guard alone."""
    return Config(DaemonConfig(), GuardConfig(), ProtectConfig(), MetricsConfig(), (), BUILTIN_SOURCE)


# ------------------------------------------------------- sizes, durations


def _toml_type(value: Any) -> str:
    """The TOML name of a parsed value's type, with its article: "a string", "an integer"."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time" if type(value).__module__ == "datetime" else "a value"


def _toml_text(value: Any) -> str:
    """A value as TOML writes it: "text" in double quotes, true/false, [..]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        out = value.replace("\\", "\\\\").replace('"', '\\"')
        return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in out) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_text(v) for v in value[:8]) + (", ..." if len(value) > 8 else "") + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_text(v)}" for k, v in list(value.items())[:8]) + "}"
    return str(value)


def show_value(value: Any) -> str:
    """A bad value with its TOML type, cut short so a fuzzed megabyte string stays
    readable: 'a string "1234"', 'an integer 5', 'a boolean true'."""
    if value is None:
        return "nothing"
    text = _toml_text(value[:200] if isinstance(value, str) else value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{_toml_type(value)} {text}"


_show = show_value


def _fail(where: str, problem: str, value: Any) -> ConfigError:
    return ConfigError(f"{where}: {problem}, got {_show(value)}")


_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SIZE_RE = re.compile(_NUMBER + r"\s*([A-Za-z]*)")
_PERCENT_RE = re.compile(_NUMBER + r"\s*%")
_SIZE_UNITS = {
    "": 1, "b": 1,           # "" only for 0: a bare number is refused above
    "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20,
    "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40,
}
_SIZE_HELP = "expected a number with a unit: B, K, M, G or T (1024-based; KiB, MiB etc. too), or a percentage like 80%"
MIN_LIMIT = 2**20        # a limit or warn level under 1 MiB cannot be meant: no process fits in it


def _bare_size(where: str, number: str, value: Any) -> ConfigError:
    """A size without a unit: bytes, or did they mean M or G? Ask, like a bare duration,
    and show what was probably meant."""
    if number.isdigit() and int(number) >= MIN_LIMIT:
        n = int(number)
        human = f" (= {n / 2**30:.3g} GiB)" if n >= 2**30 else f" (= {n / 2**20:.3g} MiB)"
        meant = f"{n}B for bytes{human}" if n <= MAX_SIZE else "a number with a unit"
    else:
        meant = f"{number}M or {number}G, or {number}B for bytes"
    return _fail(where, f"a bare number is ambiguous (bytes? MiB?); write the unit: {meant}", value)


def parse_size(value: Any, where: str) -> Size:
    """Parse ``512M``, ``1.5G``, ``6GiB``, ``100k``, ``4096B``, ``80%`` (or 0).

    Units are binary (M = MiB); KB/MB/GB/TB are refused as ambiguous, and so is a
    number without a unit (``limit = 5`` would otherwise mean 5 bytes and kill at
    once): bytes need an explicit ``B``. ``where`` prefixes errors: "file: key"
    from a config file, or a flag such as "--limit".
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _fail(where, _SIZE_HELP, value)
    if isinstance(value, int):
        if value == 0:
            return Size(bytes=0)
        if value < 0:
            raise _fail(where, "a size cannot be negative", value)
        raise _bare_size(where, str(value) if value < 10**30 else "N", value)
    text = value.strip()
    if text.startswith("-"):
        raise _fail(where, "a size cannot be negative", value)
    m = _PERCENT_RE.fullmatch(text)
    if m:
        percent = float(m.group(1))
        if percent > 100:
            raise _fail(where, "a percentage must be between 0% and 100%", value)
        return Size(percent=percent)
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise _fail(where, _SIZE_HELP, value)
    number, unit = m.group(1), m.group(2).lower()
    if unit == "" and number.strip("0.") != "":
        raise _bare_size(where, number if len(number) <= 30 else "N", value)
    if unit in ("kb", "mb", "gb", "tb"):
        raise _fail(where, f"{m.group(2)} is ambiguous (1000- or 1024-based); write {unit[0].upper()} or {unit[0].upper()}iB (1024-based)", value)
    if unit not in _SIZE_UNITS:
        raise _fail(where, f"unknown size unit {m.group(2)!r}; {_SIZE_HELP}", value)
    if len(number) > 30:  # int() refuses very long digit strings; this is far too large anyway
        raise _fail(where, "size too large", value)
    whole, _, frac = number.partition(".")
    mult = _SIZE_UNITS[unit]
    if frac.strip("0") and mult == 1:
        raise _fail(where, "a size in bytes must be a whole number", value)
    # Exact integer arithmetic: 1.5G is 1610612736, not a float approximation.
    nbytes = (int(whole or "0") * 10**len(frac) + int(frac or "0")) * mult // 10**len(frac)
    if nbytes > MAX_SIZE:
        raise _fail(where, "size too large", value)
    return Size(bytes=nbytes)


_DURATION_RE = re.compile(_NUMBER + r"\s*(ms|s|min|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_DURATION_HELP = "expected a duration with a unit: ms, s, m or h (e.g. 10ms, 1.5s, 2m)"


def parse_duration(value: Any, where: str) -> float:
    """Parse ``10ms``, ``1.5s``, ``2m``, ``1h`` into seconds.

    A bare number is refused (seconds? milliseconds?) except 0, which is 0 in any unit.
    """
    if isinstance(value, str) and value.strip() == "0":
        return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value == 0:
            return 0.0
        raise _fail(where, "a bare number is ambiguous; " + _DURATION_HELP, value)
    if not isinstance(value, str):
        raise _fail(where, _DURATION_HELP, value)
    text = value.strip()
    if text.startswith("-"):
        raise _fail(where, "a duration cannot be negative", value)
    m = _DURATION_RE.fullmatch(text)
    if not m:
        if re.fullmatch(_NUMBER, text):
            raise _fail(where, "a bare number is ambiguous; " + _DURATION_HELP, value)
        raise _fail(where, _DURATION_HELP, value)
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds > MAX_DURATION:
        raise _fail(where, "a duration can be at most 30 days (720h)", value)
    return seconds


# ------------------------------------------------------------ table reader


class _Table:
    """One TOML table being read: rejects unknown keys at once, names the dotted key in errors."""

    def __init__(self, data: Any, source: str, path: str, allowed: Iterable[str],
                 errors: Optional[list] = None):
        self.source, self.path = source, path
        self.errors = [] if errors is None else errors   # shared: check-config shows them all
        if not isinstance(data, dict):
            raise _fail(f"{source}: {path or '(top level)'}", "expected a table", data)
        allowed = tuple(allowed)
        unknown = [key for key in data if key not in allowed]
        for key in unknown:
            hint = _did_you_mean(key, allowed)
            self.errors.append(ConfigError(
                f"{self.where(str(key))}: unknown key{hint} (known keys: {', '.join(allowed)})"))
        self.data = {k: v for k, v in data.items() if k not in unknown}

    def attempt(self, parse: Any, *args: Any, fallback: Any = None) -> Any:
        """parse(*args), or (on a ConfigError, which is kept) fallback: one bad key must
        not hide the next one's error."""
        try:
            return parse(*args)
        except ConfigError as e:
            self.errors.append(e)
            return fallback

    def where(self, key: str) -> str:
        return f"{self.source}: {self.path}.{key}" if self.path else f"{self.source}: {key}"

    def has(self, key: str) -> bool:
        return key in self.data

    def fail(self, key: str, problem: str) -> ConfigError:
        return _fail(self.where(key), problem, self.data.get(key))

    def get(self, key: str, default: Any, kind: Any, what: str) -> Any:
        """The value if it is of ``kind`` (a type or tuple; bool only when asked for)."""
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise self.fail(key, f"expected {what}")
        return value

    def required(self, key: str) -> Any:
        if key not in self.data:
            raise ConfigError(f"{self.where(key)}: required key is missing")
        return self.data[key]

    def size(self, key: str, default: Optional[Size]) -> Optional[Size]:
        return parse_size(self.data[key], self.where(key)) if key in self.data else default

    def duration(self, key: str, default: float) -> float:
        return parse_duration(self.data[key], self.where(key)) if key in self.data else default

    def choice(self, key: str, default: str, choices: Tuple[str, ...]) -> str:
        value = self.get(key, default, str, "a string")
        if value not in choices:
            raise self.fail(key, f"expected one of {', '.join(choices)}")
        return value

    def abspath(self, key: str, default: str, optional: bool) -> str:
        """An absolute path; "" is allowed (meaning off) when ``optional``."""
        value = self.get(key, default, str, "a path string")
        if value == "" and optional:
            return value
        if not value.startswith("/") or "\0" in value:
            raise self.fail(key, "expected an absolute path" + (' or "" for off' if optional else ""))
        return value

    def strings(self, key: str, default: Tuple[str, ...]) -> Tuple[str, ...]:
        value = self.get(key, default, (list, tuple), "a list of strings")
        for item in value:
            if not isinstance(item, str) or not item or "\0" in item:
                raise self.fail(key, "expected a list of non-empty strings")
        return tuple(value)


def _did_you_mean(key: Any, allowed: Tuple[str, ...]) -> str:
    if not isinstance(key, str):
        return ""
    import difflib  # only on this error path

    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------- parsing


def _cgroup_path(value: Any, where: str) -> str:
    """Normalise to a path below the cgroup v2 root, starting with "/".

    "/sys/fs/cgroup/system.slice/x.service" and "/system.slice/x.service/" both
    become "/system.slice/x.service"; "//" and "." collapse, ".." is refused.
    Shell-style globs (* ? [..]) pass through for the resolver to expand.
    """
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _fail(where, f'expected an absolute cgroup path, like "/system.slice/x.service" or "{CGROUP_ROOT}/system.slice/x.service"', value)
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _fail(where, '".." is not allowed in a cgroup path', value)
    if parts[:3] == ["sys", "fs", "cgroup"]:
        parts = parts[3:]
    if not parts:
        raise _fail(where, "the root cgroup cannot be named here", value)
    return "/" + "/".join(parts)


_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]{1,255}")
_UNIT_WITH_CGROUP = ("service", "scope", "slice", "socket", "mount", "swap")
_UNIT_WITHOUT_CGROUP = ("target", "timer", "path", "device", "automount")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@:+-]{0,63}")


def _parse_selector(t: _Table, kind: str) -> Union[int, str]:
    where, value = t.where(kind), t.data[kind]
    if kind == "pid":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= PID_MAX:
            raise _fail(where, f"expected a process ID between 1 and {PID_MAX}", value)
        return value
    if kind == "pidfile":
        return t.abspath(kind, "", optional=False)
    if kind == "cgroup":
        return _cgroup_path(value, where)
    if kind == "container":
        return _container_glob(value, where)
    if not isinstance(value, str) or not value:
        raise _fail(where, "expected a non-empty string", value)
    if kind == "cmdline":
        try:
            re.compile(value)
        except (re.error, OverflowError, RecursionError, ValueError) as e:
            raise _fail(where, f"invalid regular expression ({e})", value) from None
        return value
    # unit: like systemctl, a name without a known type gets ".service".
    if not _UNIT_RE.fullmatch(value):
        raise _fail(where, "expected a systemd unit name like simulation.service", value)
    suffix = value.rpartition(".")[2] if "." in value else ""
    if suffix in _UNIT_WITHOUT_CGROUP:
        raise _fail(where, f"a .{suffix} unit has no processes to watch", value)
    if suffix not in _UNIT_WITH_CGROUP:
        value += ".service"
    if "@." in value:
        raise _fail(where, "a template unit needs an instance name (foo@bar.service)", t.data[kind])
    return value


# A Docker/Podman container name ([a-zA-Z0-9][a-zA-Z0-9_.-]*) with shell-style glob characters.
_CONTAINER_RE = re.compile(r"[A-Za-z0-9_.*?\[\]!-]{1,128}")


def _container_glob(value: Any, where: str) -> str:
    """A container name or glob, as `docker ps` shows names: "sim-a", "sim-*"."""
    if isinstance(value, str) and value.startswith("/") and _CONTAINER_RE.fullmatch(value[1:]):
        raise _fail(where, f'write the name as `docker ps` shows it, without the "/": '
                           f'"{value[1:]}"', value)
    if not isinstance(value, str) or not _CONTAINER_RE.fullmatch(value):
        raise _fail(where, 'expected a container name or glob of letters, digits, _.- and '
                           '* ? [ ] (at most 128), like "sim-*"', value)
    if value.strip("*?") == "":
        raise _fail(where, "a glob matching every container is almost surely not meant; "
                           'name them, like "sim-*"', value)
    return value


GRACE_ACTIONS = ("term",)   # the only action with a SIGTERM to wait after


def _parse_watch(data: Any, source: str, errors: list, index: int) -> Optional[WatchConfig]:
    """One [[watch]]; None when it has errors (all of them appended to ``errors``)."""
    before = len(errors)
    t = _Table(data, source, f"watch[{index}]", KEYS["watch"], errors)
    name = t.attempt(t.required, "name")
    if name is not None and (not isinstance(name, str) or not _NAME_RE.fullmatch(name)):
        t.errors.append(t.fail("name", "expected a name of letters, digits and _.@:+- (at most 64, no spaces)"))

    kinds = [k for k in SELECTOR_KINDS if t.has(k)]
    kind = selector = None
    if len(kinds) != 1:
        got = " and ".join(kinds) if kinds else "none"
        t.errors.append(ConfigError(f"{source}: watch[{index}]: needs exactly one selector of "
                                    f"{', '.join(SELECTOR_KINDS)}; got {got}"))
    else:
        kind = kinds[0]
        selector = t.attempt(_parse_selector, t, kind)

    limit = t.attempt(lambda: t.size("limit", None) if t.required("limit") is not None else None)
    if limit is not None:
        if limit.bytes == 0 or limit.percent == 0:
            t.errors.append(t.fail("limit", "a limit must be above zero"))
            limit = None
        elif limit.bytes is not None and limit.bytes < MIN_LIMIT:
            t.errors.append(t.fail("limit", f"{limit} is implausibly small for a limit (under 1 MiB); "
                                   "did you mean M or G?"))
            limit = None
    warn = t.attempt(t.size, "warn", None)
    if warn is not None and warn.bytes is not None and warn.bytes < MIN_LIMIT:
        t.errors.append(t.fail("warn", f"{warn} is implausibly small for a warn level (under 1 MiB); "
                               "did you mean M or G?"))
    elif warn is not None and limit is not None and _compare(warn, limit) in (0, 1):
        t.errors.append(t.fail("warn", f"warn must be below limit ({limit})"))

    cgroup_kind = kind in CGROUP_KINDS
    default_scope = "cgroup" if cgroup_kind else "process"
    scope = t.attempt(t.choice, "scope", default_scope, SCOPES, fallback=default_scope)
    if kind is not None and cgroup_kind and scope != "cgroup":
        t.errors.append(t.fail("scope", f"a {kind} watch measures its whole cgroup; scope must be cgroup"))
    if kind is not None and not cgroup_kind and scope == "cgroup":
        t.errors.append(t.fail("scope", f"scope cgroup needs a unit, cgroup or container selector, not {kind}"))
    action = t.attempt(t.choice, "action", "term", ACTIONS, fallback="term")
    if action in ("throttle", "freeze") and scope != "cgroup":
        t.errors.append(t.fail("action", f"{action} works on a cgroup; it needs scope cgroup "
                                         "(a unit or cgroup selector)"))
    usages = CGROUP_USAGES if scope == "cgroup" else PROCESS_USAGES
    usage = t.attempt(t.choice, "usage", usages[0], usages, fallback=usages[0])

    on_action = t.attempt(t.strings, "on_action", (), fallback=())
    if t.has("on_action") and on_action is not None and (not on_action or not on_action[0].startswith("/")):
        t.errors.append(t.fail("on_action", "expected a command as a list whose first item is an absolute path"))
    sustain = t.attempt(t.duration, "sustain", 0.0)
    grace = t.attempt(t.duration, "grace", _WATCH_DEFAULTS["grace"])
    if t.has("grace") and action not in GRACE_ACTIONS:
        t.errors.append(t.fail("grace", f"grace applies only to action term (SIGTERM, then SIGKILL "
                                        f"after grace); action {action} has no grace: remove it"))
    predict = t.attempt(_predict_horizon, t, fallback=0.0)
    if len(errors) > before:
        return None
    return WatchConfig(
        name=name, kind=kind, selector=selector, limit=limit, warn=warn,
        sustain=sustain, action=action, grace=grace,
        scope=scope, usage=usage, on_action=on_action, predict=predict,
    )


def _predict_horizon(t: "_Table") -> float:
    """``predict``: the predictive trigger's horizon (memwatchd/predict.py), 0 = off."""
    predict = t.duration("predict", 0.0)
    if 0 < predict < 1.0:
        raise t.fail("predict", "a horizon under 1s leaves the trend no time to act before "
                                "the threshold does; use at least 1s, or 0 for off")
    return predict


def _compare(a: Size, b: Size) -> Optional[int]:
    """-1, 0 or 1 as a <, =, > b; None when mixing bytes and % (comparable only once the base is known)."""
    if a.bytes is not None and b.bytes is not None:
        x, y = a.bytes, b.bytes
    elif a.percent is not None and b.percent is not None:
        x, y = a.percent, b.percent
    else:
        return None
    return (x > y) - (x < y)


def _escape_path(path: str) -> str:
    """A path as one file-name component, like systemd-escape --path: "/etc/x/a-b.toml"
    -> "etc-x-a\\x2db.toml"."""
    out = []
    for ch in path.strip("/"):
        if ch == "/":
            out.append("-")
        elif ch.isalnum() and ch.isascii() or ch in "_." and out:
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


def default_paths(source: str) -> Tuple[str, str]:
    """(events, state) for a config that names neither: the shared defaults for the
    default config file, and files of their own for any other (`run -c other.toml`),
    so that two daemons never overwrite each other's state or mix their events."""
    d = DaemonConfig()
    if not source.startswith("/") or source == DEFAULT_CONFIG_PATH:
        return d.events, d.state
    tag = _escape_path(os.path.abspath(source))
    events_dir, state_dir = os.path.dirname(d.events), os.path.dirname(d.state)
    return f"{events_dir}/events@{tag}.jsonl", f"{state_dir}/state@{tag}.json"


def _parse_daemon(data: Any, source: str, errors: list) -> DaemonConfig:
    t = _Table(data, source, "daemon", KEYS["daemon"], errors)
    d = DaemonConfig()
    events, state = default_paths(source)
    interval = t.attempt(t.duration, "interval", d.interval, fallback=d.interval)
    min_interval = t.attempt(t.duration, "min_interval", d.min_interval, fallback=d.min_interval)
    if interval <= 0:
        t.errors.append(t.fail("interval", "the interval must be above zero"))
    elif min_interval < 0.001:
        t.errors.append(t.fail("min_interval", "min_interval must be at least 1ms"))
    elif min_interval > interval:
        t.errors.append(t.fail("min_interval", f"min_interval must not exceed interval ({interval:g}s)"))
    fill_rate = t.attempt(t.size, "fill_rate", Size(bytes=d.fill_rate), fallback=Size(bytes=d.fill_rate))
    if fill_rate.bytes is None or fill_rate.bytes == 0:
        t.errors.append(t.fail("fill_rate", "expected an absolute size per second above zero, like 4G"))
    return DaemonConfig(
        interval=interval, min_interval=min_interval, fill_rate=fill_rate.bytes,
        cooldown=t.attempt(t.duration, "cooldown", d.cooldown),
        dry_run=t.attempt(t.get, "dry_run", d.dry_run, bool, "true or false"),
        events=t.attempt(t.abspath, "events", events, True),
        state=t.attempt(t.abspath, "state", state, True),
        trace=t.attempt(t.abspath, "trace", d.trace, True),
        trace_size=t.attempt(_trace_size, t, d.trace_size, fallback=d.trace_size),
    )


def _trace_size(t: _Table, default: int) -> int:
    size = t.size("trace_size", Size(bytes=default))
    if size.bytes is None or size.bytes < 2**20:
        raise t.fail("trace_size", "expected an absolute size of at least 1M, like 64M")
    return size.bytes


def _parse_guard(data: Any, source: str, errors: list) -> GuardConfig:
    t = _Table(data, source, "guard", KEYS["guard"] + (PSI_FULL_AVG10,), errors)
    g = GuardConfig()
    min_available = t.attempt(t.size, "min_available", g.min_available)
    kill_available = t.attempt(t.size, "kill_available", g.kill_available)
    if min_available and kill_available and _compare(kill_available, min_available) == 1:
        t.errors.append(t.fail("kill_available",
                               f"kill_available must not exceed min_available ({min_available})"))

    def percent(key: str, default: float) -> float:
        value = t.attempt(t.get, key, default, (int, float), "a number from 0 to 100", fallback=default)
        if not 0 <= value <= 100:  # also refuses nan
            t.errors.append(t.fail(key, "expected a number from 0 to 100 (0 = off)"))
            return default
        return float(value)

    if t.has(PSI_FULL_AVG10) and t.has("psi_full"):
        t.errors.append(t.fail(PSI_FULL_AVG10, "is the older name of psi_full: set only psi_full"))
    psi_full = percent(PSI_FULL_AVG10 if t.has(PSI_FULL_AVG10) else "psi_full", g.psi_full)
    psi_full_kill = percent("psi_full_kill", g.psi_full_kill)
    if psi_full_kill and psi_full and psi_full_kill < psi_full:
        if t.has("psi_full_kill"):
            t.errors.append(t.fail("psi_full_kill",
                                   f"psi_full_kill must not be below psi_full ({psi_full:g})"))
        psi_full_kill = psi_full   # a psi_full above the default kill level raises it
    psi_window = t.attempt(t.duration, "psi_window", g.psi_window, fallback=g.psi_window)
    if not 1.0 <= psi_window <= 60.0:
        t.errors.append(t.fail("psi_window", "expected a duration from 1s to 60s"))
    psi_available = t.attempt(t.size, "psi_available", g.psi_available, fallback=g.psi_available)
    psi_refaults = t.attempt(t.size, "psi_refaults", Size(bytes=g.psi_refaults),
                             fallback=Size(bytes=g.psi_refaults))
    if psi_refaults.bytes is None:
        t.errors.append(t.fail("psi_refaults", "expected an absolute size per second, like 4M (0 = off)"))
        psi_refaults = Size(bytes=g.psi_refaults)
    return GuardConfig(
        enabled=t.attempt(t.get, "enabled", g.enabled, bool, "true or false"),
        min_available=min_available, kill_available=kill_available,
        count_swap=t.attempt(t.get, "count_swap", g.count_swap, bool, "true or false"),
        psi_full=psi_full, psi_full_kill=psi_full_kill, psi_some=percent("psi_some", g.psi_some),
        psi_io_full=percent("psi_io_full", g.psi_io_full),
        psi_window=psi_window, psi_available=psi_available, psi_refaults=psi_refaults.bytes,
        grace=t.attempt(t.duration, "grace", g.grace),
        predict=t.attempt(_predict_horizon, t, fallback=0.0),
    )


def _parse_protect(data: Any, source: str, errors: list, warnings: list) -> ProtectConfig:
    t = _Table(data, source, "protect", KEYS["protect"], errors)
    # comm is at most 15 bytes, so "systemd-journald" must be matched as "systemd-journal".
    names = tuple(n.encode()[:COMM_LEN].decode("utf-8", "ignore")
                  for n in t.attempt(t.strings, "names", DEFAULT_PROTECT_NAMES, fallback=()))
    dropped = [n for n in DEFAULT_PROTECT_NAMES if n not in names]
    if t.has("names") and dropped:
        warnings.append(f"{t.where('names')}: replaces the default list and drops "
                        f"{', '.join(dropped)}: the guard may now stop them; add them to keep "
                        "them protected")
    cgroups = t.attempt(t.get, "cgroups", DEFAULT_PROTECT_CGROUPS, (list, tuple), "a list of cgroup paths",
                        fallback=())
    cgroups = tuple(t.attempt(_cgroup_path, c, f"{t.where('cgroups')}[{i}]", fallback="/")
                    for i, c in enumerate(cgroups))
    return ProtectConfig(names=names, cgroups=cgroups)


_LISTEN_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


def _parse_metrics(data: Any, source: str, errors: list) -> MetricsConfig:
    t = _Table(data, source, "metrics", KEYS["metrics"], errors)
    listen = t.attempt(t.get, "listen", DEFAULT_METRICS_LISTEN, str, "a host:port string", fallback="")
    if listen:
        m = _LISTEN_RE.fullmatch(listen)
        if not m or not 1 <= int(m.group(2)) <= 65535:
            t.errors.append(t.fail("listen", 'expected host:port such as 127.0.0.1:9577 or [::1]:9577 ("" = off; '
                                             "all interfaces must be explicit: 0.0.0.0:9577)"))
    textfile = t.attempt(t.abspath, "textfile", "", True, fallback="")
    if textfile and not textfile.endswith(".prom"):
        t.errors.append(t.fail("textfile", "node_exporter reads only files ending in .prom"))
    return MetricsConfig(listen=listen, textfile=textfile)


def _section(parse: Any, data: Any, source: str, errors: list, *extra: Any) -> Any:
    """A whole table, or None if it is not a table (the error kept)."""
    try:
        return parse(data, source, errors, *extra)
    except ConfigError as e:
        errors.append(e)
        return None


def raise_all(errors: list) -> None:
    """Raise the one error, or one ConfigError carrying all of them (``.errors``; its
    message joins them with "; " so the daemon's log line still names each file, key
    and value)."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        insecure = any(isinstance(e, InsecureConfigError) for e in errors)
        error = (InsecureConfigError if insecure else ConfigError)("; ".join(str(e) for e in errors))
        error.errors = tuple(str(e) for e in errors)
        raise error


def parse_config(data: Any, source: str) -> Config:
    """Validate already-parsed TOML into a Config. Pure: touches no files.

    Every error is found, not only the first: a ConfigError with several has them
    in ``.errors`` (see raise_all)."""
    errors: list = []
    warnings: list = []
    top = _Table(data, source, "", KEYS[""], errors)
    watch_list = []
    if isinstance(top.data.get("watch"), dict):
        errors.append(top.fail("watch", "write each watch as [[watch]], not [watch]"))
    else:
        watch_list = top.attempt(top.get, "watch", [], list, "an array of tables ([[watch]])", fallback=[])
    watches = []
    for i, w in enumerate(watch_list):
        watches.append(_section(_parse_watch, w, source, errors, i))
    seen: Dict[str, int] = {}
    for i, w in enumerate(watches):
        if w is None:
            continue
        if w.name in seen:
            errors.append(ConfigError(f"{source}: watch[{i}].name: the name is already used by "
                                      f"watch[{seen[w.name]}], got {_show(w.name)}"))
        seen[w.name] = i
    config = Config(
        daemon=_section(_parse_daemon, top.data.get("daemon", {}), source, errors),
        guard=_section(_parse_guard, top.data.get("guard", {}), source, errors),
        protect=_section(_parse_protect, top.data.get("protect", {}), source, errors, warnings),
        metrics=_section(_parse_metrics, top.data["metrics"], source, errors) if top.has("metrics")
        else MetricsConfig(),
        watches=tuple(watches),
        source=source,
        warnings=tuple(warnings),
    )
    raise_all(errors)
    return config


# --------------------------------------------------------------- security


def check_secure_file(path: str, where: Optional[str] = None) -> None:
    """Refuse a file that anyone but root (or our own euid) could change, like sshd's StrictModes.

    Checks the file (after symlinks) and every directory above both the given and the
    resolved path: owner must be root or the daemon's euid, and none may be writable by
    group or others. A sticky directory such as /tmp is allowed to be world-writable,
    since others cannot replace entries they do not own. Raises InsecureConfigError;
    a missing or unreadable file is a plain ConfigError.
    """
    prefix = f"{where}: " if where else ""
    path = os.fspath(path)
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{prefix}{path}: cannot read: {getattr(e, 'strerror', e)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{prefix}{path}: not a regular file")
    _check_owner_mode(real, st, prefix)
    dirs = []
    for p in (os.path.abspath(path), real):
        d = os.path.dirname(p)
        while d not in dirs:
            dirs.append(d)
            d = os.path.dirname(d)
    for d in dirs:
        try:
            _check_owner_mode(d, os.stat(d), prefix)
        except OSError as e:
            raise ConfigError(f"{prefix}{d}: cannot check: {e.strerror}") from None


def _check_owner_mode(path: str, st: os.stat_result, prefix: str) -> None:
    owners = {0, os.geteuid()}
    hint = "; refusing it (development only: --insecure)"
    if st.st_uid not in owners:
        who = "root" if owners == {0} else f"root or uid {os.geteuid()}"
        raise InsecureConfigError(f"{prefix}{path}: owned by uid {st.st_uid}, must be owned by {who}{hint}")
    sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
        raise InsecureConfigError(f"{prefix}{path}: writable by group or others (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}; chmod go-w){hint}")


# ----------------------------------------------------------------- loading


def load_config(path: Optional[str] = None, *, insecure: bool = False,
                parse_in_child: bool = False) -> Config:
    """Read, check and parse a config file.

    With ``path`` None the default path is used, and a missing default file means
    default_config() (the host guard alone); an explicit path must exist. Unless
    ``insecure``, the file and every on_action program must pass check_secure_file.
    The daemon sets ``parse_in_child`` so the TOML parser never stays resident in it
    (see memwatchd/toml_child.py); the result is the same either way.
    """
    if path is None:
        path = DEFAULT_CONFIG_PATH
        if not os.path.lexists(path):
            return default_config()
    path = os.fspath(path)
    if not insecure:
        check_secure_file(path)
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
    valid, data = (toml_child.parse_in_child if parse_in_child else toml_child.parse)(text)
    if not valid:
        raise ConfigError(f"{path}: {data}")
    config = parse_config(data, path)
    if not insecure:
        for i, w in enumerate(config.watches):
            if w.on_action:
                where = f"{path}: watch[{i}].on_action"
                check_secure_file(w.on_action[0], where)
                if not os.access(w.on_action[0], os.X_OK):
                    raise ConfigError(f"{where}: {w.on_action[0]}: not executable")
                for j, arg in enumerate(w.on_action[1:], 1):
                    if _names_a_file(arg):   # a script for an interpreter, a config it reads
                        check_secure_file(os.path.join("/", arg), f"{where}[{j}]")
    return config


def _names_a_file(arg: str) -> bool:
    """Does an on_action argument name an existing file? Its program runs with cwd "/",
    so a relative one counts from there. An option with a path inside (--conf=/x) is
    not parsed: give files as separate arguments to have them checked."""
    try:
        return not arg.startswith("-") and os.path.isfile(os.path.join("/", arg))
    except ValueError:   # an embedded NUL
        return False
