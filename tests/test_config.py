"""The configuration stage: sizes, durations, validation messages, file security, fuzzing."""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

from memwatchd import config
from memwatchd.config import (
    Config, GuardConfig, Size, check_secure_file, default_config, load_config, parse_config,
    parse_duration, parse_size,
)
from memwatchd.types import ConfigError, InsecureConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "memwatchd.toml"
SRC = "/etc/memwatchd/test.toml"
KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown files")


# ------------------------------------------------------------ sizes, durations

@pytest.mark.parametrize("text, expected", [
    ("512M", Size(bytes=512 * MiB)),
    ("6G", Size(bytes=6 * GiB)),
    ("6GiB", Size(bytes=6 * GiB)),
    ("6gib", Size(bytes=6 * GiB)),
    ("1.5G", Size(bytes=1536 * MiB)),
    ("100k", Size(bytes=100 * KiB)),
    ("100K", Size(bytes=100 * KiB)),
    ("100KiB", Size(bytes=100 * KiB)),
    ("2T", Size(bytes=2 * TiB)),
    (" 7 G ", Size(bytes=7 * GiB)),
    ("0.5k", Size(bytes=512)),
    (".5M", Size(bytes=512 * KiB)),
    ("4096B", Size(bytes=4096)),
    ("4096 b", Size(bytes=4096)),
    (0, Size(bytes=0)),
    ("0", Size(bytes=0)),
    ("80%", Size(percent=80.0)),
    ("2.5%", Size(percent=2.5)),
    ("100%", Size(percent=100.0)),
    ("0%", Size(percent=0.0)),
])
def test_parse_size_valid(text, expected):
    assert parse_size(text, "--limit") == expected


@pytest.mark.parametrize("value, problem", [
    ("-5G", "negative"),
    (-1, "negative"),
    ("6GB", "ambiguous"),
    ("100kb", "ambiguous"),
    ("5X", "unknown size unit"),
    ("1.5", "bare number is ambiguous"),
    ("4096", "bare number is ambiguous"),
    (4096, "bare number is ambiguous"),
    (10, "write the unit: 10M or 10G, or 10B for bytes"),
    ("10", "write the unit: 10M or 10G, or 10B for bytes"),
    ("1.5B", "whole number"),
    ("101%", "between 0% and 100%"),
    ("-5%", "negative"),
    ("", "expected a number with a unit"),
    ("G", "expected a number with a unit"),
    ("1e9", "expected a number with a unit"),
    ("1,5G", "expected a number with a unit"),
    ("١G", "expected a number with a unit"),        # a non-ASCII digit
    ("9" * 40 + "G", "too large"),
    ("9" * 5000 + "G", "too large"),
    ("9" * 5000 + "%", "between 0% and 100%"),
    ("9999999T", "too large"),
    (2**63, "bare number is ambiguous"),
    (True, "expected a number with a unit"),
    (1.5, "expected a number with a unit"),
    (None, "expected a number with a unit"),
    (["1G"], "expected a number with a unit"),
])
def test_parse_size_invalid_names_flag_and_value(value, problem):
    with pytest.raises(ConfigError) as e:
        parse_size(value, "--limit")
    msg = str(e.value)
    assert msg.startswith("--limit: ") and problem in msg
    assert config.show_value(value)[:60] in msg


@pytest.mark.parametrize("text, seconds", [
    ("10ms", 0.01), ("1s", 1.0), ("1.5s", 1.5), ("2m", 120.0), ("2min", 120.0),
    ("1h", 3600.0), (" 5 s ", 5.0), ("0", 0.0), (0, 0.0), (0.0, 0.0), ("0s", 0.0), ("720h", 2592000.0),
])
def test_parse_duration_valid(text, seconds):
    assert parse_duration(text, "--sustain") == pytest.approx(seconds)


@pytest.mark.parametrize("value, problem", [
    (1, "bare number is ambiguous"),
    (1.5, "bare number is ambiguous"),
    ("5", "bare number is ambiguous"),
    ("-1s", "negative"),
    (-1, "bare number is ambiguous"),
    ("1d", "expected a duration"),
    ("s", "expected a duration"),
    ("1 sec", "expected a duration"),
    ("", "expected a duration"),
    ("721h", "at most 30 days"),
    ("9" * 40 + "s", "at most 30 days"),
    ("9" * 5000 + "h", "at most 30 days"),
    (True, "expected a duration"),
    (None, "expected a duration"),
    (float("nan"), "bare number is ambiguous"),
])
def test_parse_duration_invalid(value, problem):
    with pytest.raises(ConfigError) as e:
        parse_duration(value, "--sustain")
    msg = str(e.value)
    assert msg.startswith("--sustain: ") and problem in msg
    assert config.show_value(value)[:60] in msg


def test_size_resolve_and_str():
    assert Size(bytes=5).resolve(10**12) == 5
    assert Size(percent=25.0).resolve(8 * GiB) == 2 * GiB
    assert Size(percent=2.5).resolve(1000) == 25
    assert [str(parse_size(s, "x")) for s in ("6G", "1.5G", "100k", "1000B", "80%")] == \
        ["6GiB", "1536MiB", "100KiB", "1000B", "80%"]
    with pytest.raises(ValueError):
        Size()
    with pytest.raises(ValueError):
        Size(bytes=1, percent=1.0)


def test_guard_thresholds_keep_kill_below_term_when_mixing_units():
    g = GuardConfig(min_available=Size(bytes=1 * GiB), kill_available=Size(percent=50.0))
    assert g.thresholds(8 * GiB) == (1 * GiB, 1 * GiB)     # 50% of 8G clamped to the term floor
    assert GuardConfig().thresholds(100 * GiB) == (5 * GiB, 2 * GiB)


# ------------------------------------------------------------ valid configs

def watch(**kw):
    """A minimal valid [[watch]] table; a key set to None is removed."""
    w = {"name": "w", "unit": "w.service", "limit": "1G"}
    w.update(kw)
    return {k: v for k, v in w.items() if v is not None}


def test_default_config_is_the_guard_alone():
    c = default_config()
    assert isinstance(c, Config) and c.watches == () and c.guard.enabled
    assert c.guard.min_available == Size(percent=5.0) and c.guard.kill_available == Size(percent=2.0)
    assert "sshd" in c.protect.names and "/init.scope" in c.protect.cgroups
    assert c.metrics.listen == "" and c.metrics.address is None
    assert parse_config({}, config.DEFAULT_CONFIG_PATH) == \
        Config(c.daemon, c.guard, c.protect, c.metrics, (), config.DEFAULT_CONFIG_PATH)


def test_load_config_without_a_file_uses_default_but_explicit_path_must_exist(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    assert load_config() == default_config()
    with pytest.raises(ConfigError, match="absent.toml: cannot read"):
        load_config(str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="absent.toml: cannot read"):
        load_config(tmp_path / "absent.toml", insecure=True)


def test_watch_defaults_depend_on_the_selector():
    c = parse_config({"watch": [watch(), watch(name="p", unit=None, pid=42)]}, SRC)
    unit, pid = c.watches
    assert (unit.kind, unit.selector, unit.scope, unit.usage) == ("unit", "w.service", "cgroup", "current")
    assert (pid.kind, pid.selector, pid.scope, pid.usage) == ("pid", 42, "process", "rss")
    assert (unit.warn, unit.sustain, unit.action, unit.grace, unit.on_action) == (None, 0.0, "term", 10.0, ())


@pytest.mark.parametrize("given_path, stored", [
    ("/sys/fs/cgroup/system.slice/docker-*.scope", "/system.slice/docker-*.scope"),
    ("/system.slice/x.service/", "/system.slice/x.service"),
    ("//system.slice/./x.service", "/system.slice/x.service"),
    ("/sys/fs/cgroup/user.slice", "/user.slice"),
])
def test_cgroup_paths_are_normalised_below_the_root(given_path, stored):
    c = parse_config({"watch": [watch(unit=None, cgroup=given_path)],
                      "protect": {"cgroups": [given_path]}}, SRC)
    assert c.watches[0].selector == stored and c.protect.cgroups == (stored,)


@pytest.mark.parametrize("given_unit, stored", [
    ("simulation", "simulation.service"), ("x.scope", "x.scope"), ("user.slice", "user.slice"),
    ("a.b", "a.b.service"), ("getty@tty1.service", "getty@tty1.service"),
])
def test_unit_names_get_service_suffix_like_systemctl(given_unit, stored):
    assert parse_config({"watch": [watch(unit=given_unit)]}, SRC).watches[0].selector == stored


def test_guard_pressure_and_swap_keys():
    g = parse_config({"guard": {"count_swap": False, "psi_full": 0, "psi_full_kill": 0,
                                "psi_some": 35, "psi_window": "5s", "psi_available": "2G"}}, SRC).guard
    assert (g.count_swap, g.psi_full, g.psi_full_kill, g.psi_some, g.psi_window) == (False, 0, 0, 35, 5)
    assert g.psi_available == Size(bytes=2 * 2**30)
    # the older name still works; a psi_full above the default kill level raises it
    g = parse_config({"guard": {"psi_full_avg10": 70}}, SRC).guard
    assert g.psi_full == 70 and g.psi_full_kill == 70
    d = parse_config({}, SRC).guard
    assert (d.count_swap, d.psi_full, d.psi_full_kill, d.psi_some, d.psi_window) == (True, 5, 50, 0, 2)
    assert d.psi_refaults == 4 * 2**20
    assert parse_config({"guard": {"psi_refaults": "16M"}}, SRC).guard.psi_refaults == 16 * 2**20
    assert parse_config({"guard": {"psi_refaults": 0}}, SRC).guard.psi_refaults == 0   # off


def test_accepted_edge_values():
    c = parse_config({
        "guard": {"min_available": "1G", "kill_available": "1G", "psi_full_avg10": 12.5},
        "protect": {"names": ["systemd-journald", "kworker/0:1"], "cgroups": []},
        "metrics": {},
        "watch": [watch(limit="50%", warn="4G"),                 # mixed units: checked at run time
                  watch(name="t", unit=None, cmdline="x", scope="tree", on_action=["/bin/true"])],
    }, SRC)
    assert c.guard.kill_available == c.guard.min_available and c.guard.psi_full == 12.5
    assert c.protect.names == ("systemd-journal", "kworker/0:1")   # comm keeps 15 bytes
    assert c.metrics.listen == "127.0.0.1:9577"                     # [metrics] present: loopback
    assert c.watches[1].scope == "tree" and c.watches[1].on_action == ("/bin/true",)
    assert parse_config({"metrics": {"listen": "[::1]:9100"}}, SRC).metrics.address == ("::1", 9100)
    assert parse_config({"metrics": {"listen": ""}}, SRC).metrics.address is None


# ------------------------------------------------- every error names file, key, value

BAD = [
    # (config dict, dotted key, bad value or None when the message shows something else)
    ({"watch": [watch(), watch(name="b"), watch(name="c", limit="-5G")]}, "watch[2].limit", "-5G"),
    ({"watch": [watch(limit="6GB")]}, "watch[0].limit", "6GB"),
    ({"watch": [watch(limit=True)]}, "watch[0].limit", True),
    ({"watch": [watch(limit=0)]}, "watch[0].limit", 0),
    ({"watch": [watch(limit="0%")]}, "watch[0].limit", "0%"),
    ({"watch": [watch(limit=None)]}, "watch[0].limit", None),
    ({"watch": [watch(limit="6G", warn="6G")]}, "watch[0].warn", "6G"),
    ({"watch": [watch(limit="6G", warn="7G")]}, "watch[0].warn", "7G"),
    ({"watch": [watch(limit="90%", warn="95%")]}, "watch[0].warn", "95%"),
    ({"watch": [watch(), watch()]}, "watch[1].name", "w"),
    ({"watch": [watch(unit=None)]}, "watch[0]", None),
    ({"watch": [watch(pid=5)]}, "watch[0]", None),
    ({"watch": [watch(unit=None, cmdline="([")]}, "watch[0].cmdline", "(["),
    ({"watch": [watch(unit=None, cmdline="a{99999999999}")]}, "watch[0].cmdline", "a{99999999999}"),
    ({"watch": [watch(unit=None, cmdline="")]}, "watch[0].cmdline", ""),
    ({"watch": [watch(unit=None, pidfile="run/x.pid")]}, "watch[0].pidfile", "run/x.pid"),
    ({"watch": [watch(unit=None, pid=0)]}, "watch[0].pid", 0),
    ({"watch": [watch(unit=None, pid=-3)]}, "watch[0].pid", -3),
    ({"watch": [watch(unit=None, pid="123")]}, "watch[0].pid", "123"),
    ({"watch": [watch(unit=None, pid=True)]}, "watch[0].pid", True),
    ({"watch": [watch(unit="foo.timer")]}, "watch[0].unit", "foo.timer"),
    ({"watch": [watch(unit="bad name")]}, "watch[0].unit", "bad name"),
    ({"watch": [watch(unit="foo@.service")]}, "watch[0].unit", "foo@.service"),
    ({"watch": [watch(unit=5)]}, "watch[0].unit", 5),
    ({"watch": [watch(unit=None, cgroup="system.slice/x")]}, "watch[0].cgroup", "system.slice/x"),
    ({"watch": [watch(unit=None, cgroup="/sys/fs/cgroup/../../etc")]}, "watch[0].cgroup", "/sys/fs/cgroup/../../etc"),
    ({"watch": [watch(unit=None, cgroup="/sys/fs/cgroup/")]}, "watch[0].cgroup", "/sys/fs/cgroup/"),
    ({"watch": [watch(scope="process")]}, "watch[0].scope", "process"),
    ({"watch": [watch(unit=None, pid=1, scope="cgroup")]}, "watch[0].scope", "cgroup"),
    ({"watch": [watch(scope="all")]}, "watch[0].scope", "all"),
    ({"watch": [watch(unit=None, pid=1, action="throttle")]}, "watch[0].action", "throttle"),
    ({"watch": [watch(unit=None, cmdline="x", action="freeze")]}, "watch[0].action", "freeze"),
    ({"watch": [watch(action="stop")]}, "watch[0].action", "stop"),
    ({"watch": [watch(unit=None, pid=1, usage="anon")]}, "watch[0].usage", "anon"),
    ({"watch": [watch(usage="rss")]}, "watch[0].usage", "rss"),
    ({"watch": [watch(on_action="/bin/x")]}, "watch[0].on_action", "/bin/x"),
    ({"watch": [watch(on_action=[])]}, "watch[0].on_action", []),
    ({"watch": [watch(on_action=["page-oncall"])]}, "watch[0].on_action", ["page-oncall"]),
    ({"watch": [watch(on_action=["/bin/x", 1])]}, "watch[0].on_action", ["/bin/x", 1]),
    ({"watch": [watch(name=None)]}, "watch[0].name", None),
    ({"watch": [watch(name="")]}, "watch[0].name", ""),
    ({"watch": [watch(name="has space")]}, "watch[0].name", "has space"),
    ({"watch": [watch(name=5)]}, "watch[0].name", 5),
    ({"watch": [watch(sustain=5)]}, "watch[0].sustain", 5),
    ({"watch": [watch(sustain="-1s")]}, "watch[0].sustain", "-1s"),
    ({"watch": [watch(grace="1d")]}, "watch[0].grace", "1d"),
    ({"watch": [5]}, "watch[0]", 5),
    ({"watch": {"name": "w"}}, "watch", {"name": "w"}),
    ({"watch": "w"}, "watch", "w"),
    ({"daemon": {"interval": "0s"}}, "daemon.interval", "0s"),
    ({"daemon": {"interval": 1}}, "daemon.interval", 1),
    ({"daemon": {"min_interval": "0.5ms"}}, "daemon.min_interval", "0.5ms"),
    ({"daemon": {"interval": "1s", "min_interval": "2s"}}, "daemon.min_interval", "2s"),
    ({"daemon": {"fill_rate": "50%"}}, "daemon.fill_rate", "50%"),
    ({"daemon": {"fill_rate": 0}}, "daemon.fill_rate", 0),
    ({"daemon": {"cooldown": "soon"}}, "daemon.cooldown", "soon"),
    ({"daemon": {"dry_run": "no"}}, "daemon.dry_run", "no"),
    ({"daemon": {"dry_run": 0}}, "daemon.dry_run", 0),
    ({"daemon": {"events": "events.jsonl"}}, "daemon.events", "events.jsonl"),
    ({"daemon": {"state": 5}}, "daemon.state", 5),
    ({"daemon": 5}, "daemon", 5),
    ({"guard": {"kill_available": "10%", "min_available": "5%"}}, "guard.kill_available", "10%"),
    ({"guard": {"kill_available": "2G", "min_available": "1G"}}, "guard.kill_available", "2G"),
    ({"guard": {"kill_available": "6%"}}, "guard.kill_available", "6%"),        # vs default 5%
    ({"guard": {"min_available": "lots"}}, "guard.min_available", "lots"),
    ({"guard": {"psi_full_avg10": 101}}, "guard.psi_full_avg10", 101),
    ({"guard": {"psi_full_avg10": -1}}, "guard.psi_full_avg10", -1),
    ({"guard": {"psi_full_avg10": "10"}}, "guard.psi_full_avg10", "10"),
    ({"guard": {"psi_full_avg10": float("nan")}}, "guard.psi_full_avg10", float("nan")),
    ({"guard": {"psi_full_avg10": True}}, "guard.psi_full_avg10", True),
    ({"guard": {"psi_full": 100.5}}, "guard.psi_full", 100.5),
    ({"guard": {"psi_full": "20%"}}, "guard.psi_full", "20%"),
    ({"guard": {"psi_full": 20, "psi_full_avg10": 20}}, "guard.psi_full_avg10", 20),
    ({"guard": {"psi_full_kill": -3}}, "guard.psi_full_kill", -3),
    ({"guard": {"psi_full": 30, "psi_full_kill": 25}}, "guard.psi_full_kill", 25),
    ({"guard": {"psi_some": float("inf")}}, "guard.psi_some", float("inf")),
    ({"guard": {"psi_io_full": 150}}, "guard.psi_io_full", 150),
    ({"guard": {"psi_io_full": "20%"}}, "guard.psi_io_full", "20%"),
    ({"guard": {"psi_window": "0.5s"}}, "guard.psi_window", "0.5s"),
    ({"guard": {"psi_window": "2m"}}, "guard.psi_window", "2m"),
    ({"guard": {"psi_available": "lots"}}, "guard.psi_available", "lots"),
    ({"guard": {"psi_refaults": "5%"}}, "guard.psi_refaults", "5%"),
    ({"guard": {"psi_refaults": "fast"}}, "guard.psi_refaults", "fast"),
    ({"guard": {"psi_refaults": -1}}, "guard.psi_refaults", -1),
    ({"guard": {"count_swap": "yes"}}, "guard.count_swap", "yes"),
    ({"guard": {"enabled": "yes"}}, "guard.enabled", "yes"),
    ({"guard": {"grace": "1x"}}, "guard.grace", "1x"),
    ({"protect": {"names": "sshd"}}, "protect.names", "sshd"),
    ({"protect": {"names": [""]}}, "protect.names", [""]),
    ({"protect": {"cgroups": ["init.scope"]}}, "protect.cgroups[0]", "init.scope"),
    ({"protect": {"cgroups": ["/a", "/"]}}, "protect.cgroups[1]", "/"),
    ({"protect": {"cgroups": [5]}}, "protect.cgroups[0]", 5),
    ({"protect": {"cgroups": "/init.scope"}}, "protect.cgroups", "/init.scope"),
    ({"metrics": {"listen": ":9577"}}, "metrics.listen", ":9577"),
    ({"metrics": {"listen": "localhost"}}, "metrics.listen", "localhost"),
    ({"metrics": {"listen": "127.0.0.1:70000"}}, "metrics.listen", "127.0.0.1:70000"),
    ({"metrics": {"listen": 9577}}, "metrics.listen", 9577),
    ({"metrics": {"textfile": "/var/lib/x.txt"}}, "metrics.textfile", "/var/lib/x.txt"),
    ({"metrics": {"textfile": "x.prom"}}, "metrics.textfile", "x.prom"),
]


@pytest.mark.parametrize("data, key, value", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_validation_error_names_file_key_and_value(data, key, value):
    with pytest.raises(ConfigError) as e:
        parse_config(data, SRC)
    msg = str(e.value)
    assert not isinstance(e.value, InsecureConfigError)
    assert msg.startswith(f"{SRC}: {key}:"), msg
    if value is not None:
        assert f"got {config.show_value(value)}" in msg, msg


def test_selector_errors_say_what_was_found():
    with pytest.raises(ConfigError, match=r"watch\[0\]: needs exactly one selector .*; got none"):
        parse_config({"watch": [watch(unit=None)]}, SRC)
    with pytest.raises(ConfigError, match=r"got pid and unit"):
        parse_config({"watch": [watch(pid=5)]}, SRC)
    with pytest.raises(ConfigError, match=r"required key is missing"):
        parse_config({"watch": [watch(limit=None)]}, SRC)


@pytest.mark.parametrize("section", sorted(config.KEYS))
def test_unknown_keys_are_rejected_at_every_level(section):
    data = {"watch": [watch()]}
    if section == "":
        data["bogus"] = 1
        key = "bogus"
    elif section == "watch":
        data["watch"] = [watch(), watch(name="v", lmit="1G")]
        key = "watch[1].lmit"
    else:
        data[section] = {"bogus": 1}
        key = f"{section}.bogus"
    with pytest.raises(ConfigError) as e:
        parse_config(data, SRC)
    assert str(e.value).startswith(f"{SRC}: {key}: unknown key")


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown key \(did you mean 'min_available'\?\)"):
        parse_config({"guard": {"min_availabel": "5%"}}, SRC)


# ------------------------------------------------------------ the example file

def test_example_file_loads_and_shows_every_key():
    c = load_config(str(EXAMPLE), insecure=True)
    raw = tomllib.loads(EXAMPLE.read_text())
    assert set(raw) == set(config.KEYS[""])
    for section in ("daemon", "guard", "protect", "metrics"):
        assert set(raw[section]) == set(config.KEYS[section]), section
    assert set().union(*raw["watch"]) == set(config.KEYS["watch"])
    # every selector kind and every scope appears at least once
    assert {w.kind for w in c.watches} == set(config.SELECTOR_KINDS)
    assert {w.scope for w in c.watches} == set(config.SCOPES)
    assert c.source == str(EXAMPLE)
    sim = c.watches[0]
    assert (sim.name, sim.limit, sim.warn, sim.on_action[0]) == \
        ("simulation", Size(bytes=6 * GiB), Size(bytes=5 * GiB), "/usr/bin/logger")


def test_example_defaults_match_the_built_in_ones():
    """The example documents the defaults; a drift between file and code fails here."""
    c, d = load_config(str(EXAMPLE), insecure=True), default_config()
    assert c.daemon == d.daemon and c.guard == d.guard and c.protect == d.protect


# ------------------------------------------------------------ reading the file

def write(path: Path, text: str, mode: int = 0o644) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path / "c.toml", "[guard]\nenabled = true\nmin_available = \n")
    with pytest.raises(ConfigError, match=r"c\.toml: invalid TOML: .*line 3"):
        load_config(p)


def test_non_utf8_and_directory_are_config_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_bytes(b"# \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(str(tmp_path))


def test_load_config_reports_the_file_in_validation_errors(tmp_path):
    p = write(tmp_path / "c.toml", '[[watch]]\nname = "x"\nunit = "x"\nlimit = "-5G"\n')
    with pytest.raises(ConfigError, match=rf'^{p}: watch\[0\]\.limit: .*got a string "-5G"'):
        load_config(p)


# ------------------------------------------------------------ security (StrictModes)

def test_world_writable_config_is_refused(tmp_path):
    p = write(tmp_path / "c.toml", "", 0o666)
    with pytest.raises(InsecureConfigError, match=r"writable by group or others \(mode 0666"):
        load_config(p)
    assert load_config(p, insecure=True).watches == ()


def test_group_writable_config_is_refused(tmp_path):
    p = write(tmp_path / "c.toml", "", 0o620)
    with pytest.raises(InsecureConfigError):
        load_config(p)


@as_root
def test_root_owned_0644_config_is_accepted(tmp_path):
    p = write(tmp_path / "c.toml", "[daemon]\ndry_run = true\n", 0o644)
    assert os.stat(p).st_uid == 0
    assert load_config(p).daemon.dry_run is True


@as_root
def test_config_owned_by_another_user_is_refused(tmp_path):
    p = write(tmp_path / "c.toml", "", 0o644)
    os.chown(p, 65534, 65534)
    with pytest.raises(InsecureConfigError, match="owned by uid 65534"):
        load_config(p)
    assert load_config(p, insecure=True) is not None


def test_writable_parent_directory_is_refused(tmp_path):
    d = tmp_path / "etc"
    d.mkdir()
    p = write(d / "c.toml", "")
    os.chmod(d, 0o777)
    with pytest.raises(InsecureConfigError, match=f"{d}: writable by group or others"):
        load_config(p)
    os.chmod(d, 0o1777)  # sticky, like /tmp: others cannot replace our file
    load_config(p)


def test_symlink_to_an_insecure_file_or_directory_is_refused(tmp_path):
    target = write(tmp_path / "real.toml", "", 0o666)
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    with pytest.raises(InsecureConfigError, match="real.toml: writable"):
        check_secure_file(str(link))
    # a safe file, but in a directory anyone may rename entries in
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    link.unlink()
    link.symlink_to(write(shared / "real.toml", ""))
    with pytest.raises(InsecureConfigError, match="shared: writable"):
        check_secure_file(str(link))
    # a safe file, but the link to it sits where anyone can replace the link
    shared_link = shared / "link.toml"
    shared_link.symlink_to(write(tmp_path / "safe.toml", ""))
    check_secure_file(str(tmp_path / "safe.toml"))
    with pytest.raises(InsecureConfigError, match="shared: writable"):
        check_secure_file(str(shared_link))


def on_action_config(tmp_path: Path, program: Path) -> str:
    return write(tmp_path / "c.toml",
                 f'[[watch]]\nname = "x"\nunit = "x"\nlimit = "1G"\non_action = ["{program}", "--now"]\n')


def test_on_action_program_is_checked(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    prog = Path(write(bindir / "page", "#!/bin/sh\n", 0o755))
    p = on_action_config(tmp_path, prog)
    assert load_config(p).watches[0].on_action == (str(prog), "--now")

    os.chmod(prog, 0o757)
    with pytest.raises(InsecureConfigError, match=r"watch\[0\]\.on_action: .*page: writable by group or others"):
        load_config(p)
    assert load_config(p, insecure=True).watches[0].on_action[0] == str(prog)

    os.chmod(prog, 0o755)
    os.chmod(bindir, 0o775)
    with pytest.raises(InsecureConfigError, match=r"bin: writable by group or others"):
        load_config(p)
    os.chmod(bindir, 0o755)

    os.chmod(prog, 0o644)
    with pytest.raises(ConfigError, match="not executable"):
        load_config(p)

    prog.unlink()
    with pytest.raises(ConfigError, match=r"watch\[0\]\.on_action: .*page: cannot read"):
        load_config(p)


@as_root
def test_on_action_program_owned_by_another_user_is_refused(tmp_path):
    prog = Path(write(tmp_path / "page", "#!/bin/sh\n", 0o755))
    os.chown(prog, 65534, 65534)
    with pytest.raises(InsecureConfigError, match="owned by uid 65534"):
        load_config(on_action_config(tmp_path, prog))


@as_root
def test_every_file_argument_of_on_action_is_checked(tmp_path):
    """An interpreter (root's /bin/sh) running a script anyone could edit is as unsafe as
    an unsafe program: every argument naming a file is checked like argv[0]."""
    script = Path(write(tmp_path / "page.sh", "echo paged\n", 0o644))
    p = write(tmp_path / "c.toml", '[[watch]]\nname = "x"\nunit = "x"\nlimit = "1G"\n'
              f'on_action = ["/bin/sh", "{script}", "--now", "not-a-file"]\n')
    assert load_config(p).watches[0].on_action[1] == str(script)
    os.chown(script, 65534, 65534)
    with pytest.raises(InsecureConfigError, match=r"watch\[0\]\.on_action\[1\]: .*page.sh: owned by uid 65534"):
        load_config(p)
    os.chown(script, 0, 0)
    os.chmod(script, 0o666)
    with pytest.raises(InsecureConfigError, match=r"on_action\[1\]: .*page.sh: writable by group or others"):
        load_config(p)
    assert load_config(p, insecure=True).watches[0].on_action[1] == str(script)


# ------------------------------------------------------------ fuzzing

SCALARS = st.one_of(
    st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.datetimes(), st.dates(), st.times(),
    st.sampled_from([
        "1G", "6GiB", "1.5G", "5%", "100%", "0", "0%", "10ms", "1s", "2m", "-1G", "150%", "", "x",
        "/x", "/run/x.pid", "/sys/fs/cgroup/a", "/a/*", "/", "a.service", "a.timer", "a@.service",
        "term", "kill", "warn", "throttle", "freeze", "cgroup", "process", "tree", "current", "anon",
        "current-inactive_file", "rss", "127.0.0.1:9577", "[::1]:1", ":1", "/t.prom", "([", ".*",
    ]),
)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


VALID = tomllib.loads(EXAMPLE.read_text())


@st.composite
def table(draw, section):
    """A valid table from the example (or an empty one) with up to 3 keys changed or removed."""
    choices = VALID["watch"] if section == "watch" else [VALID[section]]
    t = dict(draw(st.sampled_from(choices + [{}])))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(config.KEYS[section] + ("bogus",)))
        if draw(st.booleans()):
            t[key] = draw(VALUES)
        else:
            t.pop(key, None)
    return t


CONFIG_DICTS = st.fixed_dictionaries({}, optional={
    "daemon": table("daemon") | VALUES,
    "guard": table("guard"),
    "protect": table("protect"),
    "metrics": table("metrics"),
    "watch": st.lists(table("watch"), max_size=3) | VALUES,
}) | VALUES


def check_invariants(c: Config) -> None:
    """What a successfully parsed config guarantees to the daemon."""
    assert 0.001 <= c.daemon.min_interval <= c.daemon.interval and c.daemon.fill_rate > 0
    assert len({w.name for w in c.watches}) == len(c.watches)
    for w in c.watches:
        assert w.kind in config.SELECTOR_KINDS and w.action in config.ACTIONS
        assert (w.scope == "cgroup") == (w.kind in config.CGROUP_KINDS)
        assert w.usage in (config.CGROUP_USAGES if w.scope == "cgroup" else config.PROCESS_USAGES)
        assert w.limit.bytes != 0 and w.limit.percent != 0
        if w.warn is not None and (w.warn.bytes is None) == (w.limit.bytes is None):
            assert w.warn.resolve(100) < w.limit.resolve(100)


@settings(max_examples=300, deadline=None)
@given(CONFIG_DICTS)
def test_fuzz_parse_config_raises_only_config_error(data):
    before = copy.deepcopy(data)
    try:
        c = parse_config(data, SRC)
    except ConfigError as e:
        assert str(e).startswith(SRC + ": ")
    else:
        check_invariants(c)
    assert data == before or data != data  # pure: the input is not modified (nan != nan)


@settings(max_examples=300, deadline=None)
@given(st.one_of(SCALARS, st.text(max_size=30), st.lists(st.integers(), max_size=2)))
def test_fuzz_sizes_and_durations_raise_only_config_error(value):
    for parse in (parse_size, parse_duration):
        try:
            result = parse(value, "--x")
        except ConfigError as e:
            assert str(e).startswith("--x: ")
        else:
            if parse is parse_duration:
                assert 0 <= result <= config.MAX_DURATION and math.isfinite(result)
            else:
                assert (result.bytes or 0) >= 0 and 0 <= (result.percent or 0) <= 100


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


TOML_LITERALS = st.one_of(
    st.integers().map(str), st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["true", "false", "[]", "{}", "nan", "inf", "1979-05-27", '[""]', '["/bin/x"]']),
    st.one_of(st.text(max_size=10), SCALARS.filter(lambda v: isinstance(v, str))).map(json.dumps),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzz_load_config_on_mutated_example_raises_only_config_error(fuzz_dir, data):
    """The example with a few values replaced by other TOML values, or raw text spliced in."""
    lines = EXAMPLE.read_text().splitlines()
    settings_lines = [i for i, line in enumerate(lines) if "=" in line and not line.startswith("#")]
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            i = data.draw(st.sampled_from(settings_lines))
            lines[i] = lines[i].partition("=")[0] + "= " + data.draw(TOML_LITERALS)
        else:
            i = data.draw(st.integers(0, len(lines) - 1))
            at, cut = data.draw(st.integers(0, len(lines[i]))), data.draw(st.integers(0, 12))
            insert = data.draw(st.text(st.sampled_from(list('[]{}"=.,#\n -%0159GMkmsx_a\\\'')) | st.characters(),
                                       max_size=8))
            lines[i] = lines[i][:at] + insert + lines[i][at + cut:]
    text = "\n".join(lines)
    path = fuzz_dir / "c.toml"
    path.write_text(text, errors="surrogatepass")
    try:
        c = load_config(str(path), insecure=True)
    except ConfigError as e:
        assert str(e).startswith(str(path) + ": ")
    else:
        check_invariants(c)


# ------------------------------------------------------------ first contact (issue 17)

@pytest.mark.parametrize("value, shown", [
    ("1234", 'a string "1234"'), (1234, "an integer 1234"), (1.5, "a float 1.5"),
    (True, "a boolean true"), (["a", 1], 'an array ["a", 1]'), ({"k": "v"}, 'a table {k = "v"}'),
    ('say "hi"\n', 'a string "say \\"hi\\"\\u000a"'),
])
def test_errors_name_the_toml_type_of_the_bad_value(value, shown):
    assert config.show_value(value) == shown


def test_a_type_error_says_expected_and_got_with_toml_types():
    with pytest.raises(ConfigError) as e:
        parse_config({"watch": [watch(unit=None, pid="1234")]}, SRC)
    assert 'expected a process ID between 1 and 4194304, got a string "1234"' in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"guard": {"enabled": 1}}, SRC)
    assert str(e.value) == f"{SRC}: guard.enabled: expected true or false, got an integer 1"


@pytest.mark.parametrize("value, meant", [
    (5, "write the unit: 5M or 5G, or 5B for bytes"),
    ("10", "write the unit: 10M or 10G, or 10B for bytes"),
    ("2.5", "2.5M or 2.5G"),
    (536870912, "536870912B for bytes (= 512 MiB)"),
    ("6442450944", "6442450944B for bytes (= 6 GiB)"),
])
def test_a_bare_number_as_a_size_is_refused_with_what_was_probably_meant(value, meant):
    for data in ({"watch": [watch(limit=value)]}, {"guard": {"min_available": value}},
                 {"daemon": {"fill_rate": value}}):
        with pytest.raises(ConfigError) as e:
            parse_config(data, SRC)
        assert "bare number is ambiguous" in str(e.value) and meant in str(e.value), str(e.value)
    assert parse_config({"watch": [watch(limit="2147483648B")]}, SRC).watches[0].limit == Size(bytes=2 * GiB)


@pytest.mark.parametrize("key, value", [("limit", "10B"), ("limit", "512K"), ("limit", "1023KiB"),
                                        ("warn", "100K")])
def test_implausibly_small_limits_are_refused(key, value):
    data = {"limit": "1G", key: value} if key == "warn" else {key: value}
    with pytest.raises(ConfigError) as e:
        parse_config({"watch": [watch(**data)]}, SRC)
    assert f"watch[0].{key}:" in str(e.value) and "implausibly small" in str(e.value)
    assert "did you mean M or G" in str(e.value)
    assert parse_config({"watch": [watch(limit="1M")]}, SRC).watches[0].limit == Size(bytes=MiB)


@pytest.mark.parametrize("action", ["kill", "warn"])
def test_a_grace_without_sigterm_is_refused(action):
    with pytest.raises(ConfigError) as e:
        parse_config({"watch": [watch(unit=None, pid=5, action=action, grace="3s")]}, SRC)
    assert "watch[0].grace:" in str(e.value) and f"action {action} has no grace" in str(e.value)
    assert parse_config({"watch": [watch(unit=None, pid=5, action=action)]}, SRC).watches[0].action == action
    assert parse_config({"watch": [watch(grace="3s")]}, SRC).watches[0].grace == 3.0


def test_every_error_is_reported_not_only_the_first():
    data = {"daemon": {"interval": 5, "bogus": 1},
            "guard": {"enabled": "yes"},
            "watch": [watch(limit="lots", action="explode"), watch(name="b", unit=None, pid="x")]}
    with pytest.raises(ConfigError) as e:
        parse_config(data, SRC)
    keys = ["daemon.bogus", "daemon.interval", "guard.enabled", "watch[0].limit", "watch[0].action",
            "watch[1].pid"]
    errors = e.value.errors
    assert len(errors) == len(keys), errors
    for key in keys:
        assert sum(line.startswith(f"{SRC}: {key}:") for line in errors) == 1, (key, errors)
    # One line for the daemon's log, still naming file, key and value of each.
    assert "\n" not in str(e.value) and str(e.value) == "; ".join(errors)


def test_protect_names_that_drop_the_defaults_warn():
    c = parse_config({"protect": {"names": ["postgres"]}}, SRC)
    assert c.protect.names == ("postgres",)
    assert len(c.warnings) == 1
    w = c.warnings[0]
    assert w.startswith(f"{SRC}: protect.names:") and "systemd, systemd-journal, sshd" in w
    c = parse_config({"protect": {"names": ["postgres", "sshd", "systemd", "systemd-journald"]}}, SRC)
    assert c.warnings == ()
    assert parse_config({}, SRC).warnings == ()


def test_each_config_file_gets_its_own_default_state_and_events_file():
    default = parse_config({}, config.DEFAULT_CONFIG_PATH).daemon
    assert (default.events, default.state) == ("/var/lib/memwatchd/events.jsonl", "/run/memwatchd/state.json")
    a = parse_config({}, "/etc/memwatchd/other.toml").daemon
    b = parse_config({}, "/srv/other.toml").daemon
    c = parse_config({}, "/etc/memwatchd/other-2.toml").daemon
    states = {default.state, a.state, b.state, c.state}
    assert len(states) == 4 and len({default.events, a.events, b.events, c.events}) == 4
    assert a.state == "/run/memwatchd/state@etc-memwatchd-other.toml.json"
    assert a.events == "/var/lib/memwatchd/events@etc-memwatchd-other.toml.jsonl"
    assert all(os.path.dirname(p) == "/run/memwatchd" and "/" not in os.path.basename(p) for p in states)
    named = parse_config({"daemon": {"state": "/run/x.json", "events": ""}}, "/srv/other.toml").daemon
    assert (named.state, named.events) == ("/run/x.json", "")
