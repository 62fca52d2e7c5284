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

SELECTOR_KINDS = ("pid", "pidfile", "unit", "cgroup", "cmdline")
CGROUP_KINDS = ("unit", "cgroup")          # measured as a whole cgroup
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
    "guard": ("enabled", "min_available", "kill_available", "psi_full_avg10", "grace", "predict"),
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
        return str(self.bytes)


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
    "psi_full_avg10": 0.0,           # 0 = off
    "grace": 5.0,
    "predict": 0.0,                  # horizon of the host's predictive trigger; 0 = off
}


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


class Config(namedtuple("Config", "daemon guard protect metrics watches source")):
    """The whole validated configuration; ``watches`` is a tuple of WatchConfig and
    ``source`` the file it came from."""

    __slots__ = ()


def default_config() -> Config:
    """What runs with no config file: the host guard alone."""
    return Config(DaemonConfig(), GuardConfig(), ProtectConfig(), MetricsConfig(), (), BUILTIN_SOURCE)


# ------------------------------------------------------- sizes, durations


def _show(value: Any) -> str:
    """repr() of a bad value, cut short so a fuzzed megabyte string stays readable."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(where: str, problem: str, value: Any) -> ConfigError:
    return ConfigError(f"{where}: {problem}, got {_show(value)}")


_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_SIZE_RE = re.compile(_NUMBER + r"\s*([A-Za-z]*)")
_PERCENT_RE = re.compile(_NUMBER + r"\s*%")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20,
    "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40,
}
_SIZE_HELP = "expected bytes (an integer) or a number with K, M, G or T (1024-based; MiB etc. too), or a percentage like 80%"


def parse_size(value: Any, where: str) -> Size:
    """Parse ``512M``, ``1.5G``, ``6GiB``, ``100k``, ``80%`` or integer bytes.

    Units are binary (M = MiB); KB/MB/GB/TB are refused as ambiguous. ``where``
    prefixes errors: "file: key" from a config file, or a flag such as "--limit".
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _fail(where, _SIZE_HELP, value)
    if isinstance(value, int):
        if value < 0:
            raise _fail(where, "a size cannot be negative", value)
        if value > MAX_SIZE:
            raise _fail(where, "size too large", value)
        return Size(bytes=value)
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

    def __init__(self, data: Any, source: str, path: str, allowed: Iterable[str]):
        self.source, self.path = source, path
        if not isinstance(data, dict):
            raise _fail(f"{source}: {path or '(top level)'}", "expected a table", data)
        allowed = tuple(allowed)
        for key in data:
            if key not in allowed:
                hint = _did_you_mean(key, allowed)
                raise ConfigError(
                    f"{self.where(str(key))}: unknown key{hint} (known keys: {', '.join(allowed)})")
        self.data = data

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


def _parse_watch(data: Any, source: str, index: int) -> WatchConfig:
    t = _Table(data, source, f"watch[{index}]", KEYS["watch"])
    name = t.required("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise t.fail("name", "expected a name of letters, digits and _.@:+- (at most 64, no spaces)")

    kinds = [k for k in SELECTOR_KINDS if t.has(k)]
    if len(kinds) != 1:
        got = " and ".join(kinds) if kinds else "none"
        raise ConfigError(f"{source}: watch[{index}]: needs exactly one selector of "
                          f"{', '.join(SELECTOR_KINDS)}; got {got}")
    kind = kinds[0]
    selector = _parse_selector(t, kind)

    t.required("limit")
    limit = t.size("limit", None)
    if limit.bytes == 0 or limit.percent == 0:
        raise t.fail("limit", "a limit must be above zero")
    warn = t.size("warn", None)
    if warn is not None and _compare(warn, limit) in (0, 1):
        raise t.fail("warn", f"warn must be below limit ({limit})")

    default_scope = "cgroup" if kind in CGROUP_KINDS else "process"
    scope = t.choice("scope", default_scope, SCOPES)
    if kind in CGROUP_KINDS and scope != "cgroup":
        raise t.fail("scope", f"a {kind} watch measures its whole cgroup; scope must be cgroup")
    if kind not in CGROUP_KINDS and scope == "cgroup":
        raise t.fail("scope", f"scope cgroup needs a unit or cgroup selector, not {kind}")
    action = t.choice("action", "term", ACTIONS)
    if action in ("throttle", "freeze") and scope != "cgroup":
        raise t.fail("action", f"{action} works on a cgroup; it needs scope cgroup (a unit or cgroup selector)")
    if scope == "cgroup":
        usage = t.choice("usage", "current", CGROUP_USAGES)
    else:
        usage = t.choice("usage", "rss", PROCESS_USAGES)

    on_action = t.strings("on_action", ())
    if t.has("on_action") and (not on_action or not on_action[0].startswith("/")):
        raise t.fail("on_action", "expected a command as a list whose first item is an absolute path")

    predict = _predict_horizon(t)
    return WatchConfig(
        name=name, kind=kind, selector=selector, limit=limit, warn=warn,
        sustain=t.duration("sustain", 0.0), action=action, grace=t.duration("grace", 10.0),
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


def _parse_daemon(data: Any, source: str) -> DaemonConfig:
    t = _Table(data, source, "daemon", KEYS["daemon"])
    d = DaemonConfig()
    interval = t.duration("interval", d.interval)
    min_interval = t.duration("min_interval", d.min_interval)
    if interval <= 0:
        raise t.fail("interval", "the interval must be above zero")
    if min_interval < 0.001:
        raise t.fail("min_interval", "min_interval must be at least 1ms")
    if min_interval > interval:
        raise t.fail("min_interval", f"min_interval must not exceed interval ({interval:g}s)")
    fill_rate = t.size("fill_rate", Size(bytes=d.fill_rate))
    if fill_rate.bytes is None or fill_rate.bytes == 0:
        raise t.fail("fill_rate", "expected an absolute size per second above zero, like 4G")
    return DaemonConfig(
        interval=interval, min_interval=min_interval, fill_rate=fill_rate.bytes,
        cooldown=t.duration("cooldown", d.cooldown),
        dry_run=t.get("dry_run", d.dry_run, bool, "true or false"),
        events=t.abspath("events", d.events, optional=True),
        state=t.abspath("state", d.state, optional=True),
        trace=t.abspath("trace", d.trace, optional=True),
        trace_size=_trace_size(t, d.trace_size),
    )


def _trace_size(t: _Table, default: int) -> int:
    size = t.size("trace_size", Size(bytes=default))
    if size.bytes is None or size.bytes < 2**20:
        raise t.fail("trace_size", "expected an absolute size of at least 1M, like 64M")
    return size.bytes


def _parse_guard(data: Any, source: str) -> GuardConfig:
    t = _Table(data, source, "guard", KEYS["guard"])
    g = GuardConfig()
    min_available = t.size("min_available", g.min_available)
    kill_available = t.size("kill_available", g.kill_available)
    if _compare(kill_available, min_available) == 1:
        raise t.fail("kill_available", f"kill_available must not exceed min_available ({min_available})")
    psi = t.get("psi_full_avg10", g.psi_full_avg10, (int, float), "a number from 0 to 100")
    if not 0 <= psi <= 100:  # also refuses nan
        raise t.fail("psi_full_avg10", "expected a number from 0 to 100 (0 = off)")
    return GuardConfig(
        enabled=t.get("enabled", g.enabled, bool, "true or false"),
        min_available=min_available, kill_available=kill_available,
        psi_full_avg10=float(psi), grace=t.duration("grace", g.grace),
        predict=_predict_horizon(t),
    )


def _parse_protect(data: Any, source: str) -> ProtectConfig:
    t = _Table(data, source, "protect", KEYS["protect"])
    # comm is at most 15 bytes, so "systemd-journald" must be matched as "systemd-journal".
    names = tuple(n.encode()[:COMM_LEN].decode("utf-8", "ignore")
                  for n in t.strings("names", DEFAULT_PROTECT_NAMES))
    cgroups = t.get("cgroups", DEFAULT_PROTECT_CGROUPS, (list, tuple), "a list of cgroup paths")
    cgroups = tuple(_cgroup_path(c, f"{t.where('cgroups')}[{i}]") for i, c in enumerate(cgroups))
    return ProtectConfig(names=names, cgroups=cgroups)


_LISTEN_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


def _parse_metrics(data: Any, source: str) -> MetricsConfig:
    t = _Table(data, source, "metrics", KEYS["metrics"])
    listen = t.get("listen", DEFAULT_METRICS_LISTEN, str, "a host:port string")
    if listen:
        m = _LISTEN_RE.fullmatch(listen)
        if not m or not 1 <= int(m.group(2)) <= 65535:
            raise t.fail("listen", 'expected host:port such as 127.0.0.1:9577 or [::1]:9577 ("" = off; '
                                   "all interfaces must be explicit: 0.0.0.0:9577)")
    textfile = t.abspath("textfile", "", optional=True)
    if textfile and not textfile.endswith(".prom"):
        raise t.fail("textfile", "node_exporter reads only files ending in .prom")
    return MetricsConfig(listen=listen, textfile=textfile)


def parse_config(data: Any, source: str) -> Config:
    """Validate already-parsed TOML into a Config. Pure: touches no files."""
    top = _Table(data, source, "", KEYS[""])
    if isinstance(top.data.get("watch"), dict):
        raise top.fail("watch", "write each watch as [[watch]], not [watch]")
    watch_list = top.get("watch", [], list, "an array of tables ([[watch]])")
    watches = tuple(_parse_watch(w, source, i) for i, w in enumerate(watch_list))
    seen: Dict[str, int] = {}
    for i, w in enumerate(watches):
        if w.name in seen:
            raise ConfigError(f"{source}: watch[{i}].name: the name is already used by "
                              f"watch[{seen[w.name]}], got {_show(w.name)}")
        seen[w.name] = i
    return Config(
        daemon=_parse_daemon(top.data.get("daemon", {}), source),
        guard=_parse_guard(top.data.get("guard", {}), source),
        protect=_parse_protect(top.data.get("protect", {}), source),
        metrics=_parse_metrics(top.data["metrics"], source) if top.has("metrics") else MetricsConfig(),
        watches=watches,
        source=source,
    )


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
    return config
