"""Host-side checks of the shipped systemd units (systemd/*.service).

Needs `systemd-analyze` (package `systemd`, 252 or later) and earlyoom's unit
(package `earlyoom`) on the host; no running systemd is needed. Whether the
sandbox lets the daemon actually work is proven by the VM tier, not here.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = sorted(UNIT_DIR.glob("*.service"))
MAIN_UNIT = UNIT_DIR / "memwatchd.service"
README = UNIT_DIR / "README.md"
EARLYOOM_UNITS = [Path("/lib/systemd/system/earlyoom.service"),
                  Path("/usr/lib/systemd/system/earlyoom.service")]

# Each capability is justified in systemd/README.md; anything else is a regression.
ALLOWED_CAPS = {
    "CAP_KILL",          # signal processes of any user (pidfd_send_signal)
    "CAP_IPC_LOCK",      # mlockall() beyond RLIMIT_MEMLOCK
    "CAP_SYS_RESOURCE",  # PSI triggers (open /proc/pressure/* for writing), PR_SET_IO_FLUSHER
    "CAP_DAC_OVERRIDE",  # write cgroup.kill / memory.high / cgroup.freeze in delegated subtrees
    "CAP_NET_ADMIN",     # LISTEN to the process-events connector (before Linux 6.6)
}
# System calls the daemon (and Python under it) cannot work without.
REQUIRED_SYSCALLS = {
    "pidfd_open", "pidfd_send_signal", "process_mrelease", "mlockall",
    "kill", "poll", "ppoll", "pread64", "openat", "execve", "clone", "clone3", "wait4",
    "socket", "connect", "bind", "listen", "accept4", "prlimit64", "sigaltstack",
}
# Absolute ceiling, so a lost hardening line shows up even while we still beat earlyoom.
MAX_EXPOSURE = 3.0


# ------------------------------------------------------------------ helpers

def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Parse unit-file text into {section: {key: [value, ...]}}, keeping repeated keys
    (like configparser with strict=False, but nothing is overwritten)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: keep unit lines unwrapped"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"line {number}: not key=value: {raw!r}"
        key, value = line.split("=", 1)
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def words(values: list[str]) -> list[str]:
    """All whitespace-separated words of every occurrence of a key."""
    return [word for value in values for word in value.split()]


def one(unit: dict, section: str, key: str) -> str:
    """The value of a key that must be set exactly once."""
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times, expected once"
    return values[0]


def systemd_analyze(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze not found: apt-get install systemd")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SYSTEMD_COLORS": "0",
                               "SYSTEMD_PAGER": "cat", "LC_ALL": "C.UTF-8"})


def verify_problems(unit_text: str, name: str, tmp_path: Path) -> str:
    """Run `systemd-analyze verify` on a copy of the unit; return every complaint ("" if none).

    systemd 252's verify exits 0 on parse errors (it only logs "ignoring" warnings),
    so any output on stderr counts as a failure. ExecStart= is pointed at a stub
    because verify fails when the binary does not exist on this host.
    """
    stub = tmp_path / "memwatchd-stub"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text, count = re.subn(r"^ExecStart=(\S+)", f"ExecStart={stub}", unit_text, flags=re.M)
    assert count == 1, f"{name}: expected exactly one ExecStart= line"
    copy = tmp_path / name
    copy.write_text(text)
    proc = systemd_analyze("verify", str(copy))
    problems = proc.stderr.strip()
    if proc.returncode != 0:
        problems = f"exit status {proc.returncode}\n{problems}"
    return problems


def exposure(unit_path: Path) -> float:
    """The "Overall exposure level" of `systemd-analyze security --offline=true`."""
    proc = systemd_analyze("security", "--offline=true", str(unit_path))
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, f"no exposure line for {unit_path}:\n{proc.stdout}\n{proc.stderr}"
    return float(match.group(1))


def expand_syscalls(names: list[str], seen: set[str] | None = None) -> set[str]:
    """Expand @groups (recursively, via systemd-analyze) into plain syscall names."""
    seen = set() if seen is None else seen
    result: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            result.add(name)
            continue
        if name in seen:
            continue
        seen.add(name)
        proc = systemd_analyze("syscall-filter", name)
        assert proc.returncode == 0, f"unknown syscall group {name}: {proc.stderr}"
        members = [line.strip() for line in proc.stdout.splitlines()[1:]
                   if line.strip() and not line.strip().startswith("#")]
        result |= expand_syscalls(members, seen)
    return result


@pytest.fixture(scope="module")
def unit() -> dict:
    return parse_unit(MAIN_UNIT.read_text())


@pytest.fixture(scope="module")
def service(unit) -> dict:
    return unit["Service"]


# ------------------------------------------------- systemd-analyze verify

def test_units_are_shipped():
    assert MAIN_UNIT in UNITS


@pytest.mark.parametrize("unit_path", UNITS, ids=lambda p: p.name)
def test_verify_is_clean(unit_path, tmp_path):
    problems = verify_problems(unit_path.read_text(), unit_path.name, tmp_path)
    assert problems == "", f"systemd-analyze verify complained about {unit_path.name}:\n{problems}"


@pytest.mark.parametrize("good, bad", [
    ("WatchdogSec=30s", "WatchdogSecs=30s"),                      # typo'd key
    ("OOMScoreAdjust=-1000", "OOMScoreAdjust=-10000"),            # value out of range
    ("@system-service process_mrelease", "@system-service process_mreleas"),  # unknown syscall
])
def test_verify_check_catches_broken_unit(tmp_path, good, bad):
    text = MAIN_UNIT.read_text()
    assert good in text
    problems = verify_problems(text.replace(good, bad, 1), MAIN_UNIT.name, tmp_path)
    assert problems, f"the verify check did not notice {bad!r}"


# ------------------------------------------------ systemd-analyze security

def test_exposure_is_lower_than_earlyoom(tmp_path):
    earlyoom = next((p for p in EARLYOOM_UNITS if p.exists()), None)
    if earlyoom is None:
        pytest.fail("earlyoom's unit file is missing; install it with: apt-get install earlyoom "
                    "(it is only read, never started)")
    theirs = exposure(earlyoom)
    ours = exposure(MAIN_UNIT)
    # With DefaultDependencies=no the analyzer skips ProtectSystem=, ProtectHome=,
    # PrivateTmp= and RootDirectory= ("special boot phase"); score a copy with default
    # dependencies too, so we don't win by that rule.
    copy = tmp_path / MAIN_UNIT.name
    copy.write_text(MAIN_UNIT.read_text().replace("DefaultDependencies=no", "DefaultDependencies=yes"))
    ours_default_deps = exposure(copy)
    print(f"exposure: memwatchd {ours} (with default dependencies {ours_default_deps}), "
          f"earlyoom {theirs}")
    assert ours < theirs, f"memwatchd {ours} is not below earlyoom {theirs}"
    assert ours_default_deps < theirs, f"memwatchd {ours_default_deps} is not below earlyoom {theirs}"
    assert max(ours, ours_default_deps) <= MAX_EXPOSURE


# ------------------------------------------------------------- invariants

def test_lifecycle(unit, service):
    assert one(unit, "Service", "Type") == "notify"  # 252 has no notify-reload
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "ExecStart") == "/usr/local/bin/memwatchd run"
    assert re.fullmatch(r"/bin/kill -HUP \$MAINPID", one(unit, "Service", "ExecReload"))
    assert one(unit, "Service", "Restart") == "always"
    assert re.fullmatch(r"[1-9]\d*s", one(unit, "Service", "RestartSec"))
    # Never give up restarting: a failed watchdog leaves the host unprotected (issue 11).
    assert one(unit, "Unit", "StartLimitIntervalSec") == "0"
    assert re.fullmatch(r"[1-9]\d*s", one(unit, "Service", "TimeoutStopSec"))
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_watchdog_in_seconds_and_not_too_tight(unit):
    match = re.fullmatch(r"(\d+)s", one(unit, "Service", "WatchdogSec"))
    assert match, "WatchdogSec= must be written in seconds, e.g. 10s"
    assert 5 <= int(match.group(1)) <= 60


def test_survives_memory_pressure(unit, service):
    assert one(unit, "Service", "OOMScoreAdjust") == "-1000"
    assert re.fullmatch(r"\d+M", one(unit, "Service", "MemoryMin"))
    assert int(one(unit, "Service", "MemoryMin")[:-1]) >= 32
    # A memory limit on the watchdog's own cgroup would let it be throttled or OOM-killed.
    for key in ("MemoryMax", "MemoryHigh", "MemorySwapMax"):
        assert key not in service


def test_capabilities_are_minimal(unit, service):
    caps = words(service["CapabilityBoundingSet"])
    assert not any(cap.startswith("~") for cap in caps), "use an allow list, not ~"
    assert {"CAP_KILL", "CAP_IPC_LOCK"} <= set(caps)
    assert set(caps) <= ALLOWED_CAPS, f"not allowed: {set(caps) - ALLOWED_CAPS}"
    assert "AmbientCapabilities" not in service  # root: the bounding set is the effective set
    assert one(unit, "Service", "NoNewPrivileges") == "yes"


def test_file_system_sandbox(unit, service):
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert "/sys/fs/cgroup" in words(service["ReadWritePaths"])  # cgroup.kill, memory.high
    assert "ProtectControlGroups" not in service  # would make /sys/fs/cgroup read-only
    assert one(unit, "Service", "ProtectHome") == "yes"
    assert one(unit, "Service", "PrivateTmp") == "yes"
    assert one(unit, "Service", "PrivateDevices") == "yes"
    assert one(unit, "Service", "ProtectKernelTunables") == "yes"
    # The daemon must see every process and /proc/meminfo, /proc/pressure.
    assert one(unit, "Service", "ProtectProc") == "default"
    assert one(unit, "Service", "ProcSubset") == "all"
    assert one(unit, "Service", "UMask") == "0077"
    assert one(unit, "Service", "StateDirectory") == "memwatchd"
    assert one(unit, "Service", "RuntimeDirectory") == "memwatchd"
    assert one(unit, "Service", "RuntimeDirectoryMode") == "0700"


def test_network_sandbox(unit, service):
    assert set(words(service["RestrictAddressFamilies"])) == {"AF_UNIX", "AF_INET", "AF_INET6",
                                                              "AF_NETLINK"}   # procevents
    assert service.get("PrivateNetwork", ["no"]) == ["no"]  # metrics on 127.0.0.1
    assert service.get("PrivateUsers", ["no"]) == ["no"]    # CAP_KILL must act on the host


def test_syscall_filter_admits_what_the_daemon_needs(unit, service):
    assert one(unit, "Service", "SystemCallArchitectures") == "native"
    assert one(unit, "Service", "SystemCallErrorNumber") == "EPERM"
    lines = service["SystemCallFilter"]
    assert not lines[0].startswith("~"), "the first SystemCallFilter= line must be an allow list"
    assert all(line.startswith("~") for line in lines[1:])
    allowed = expand_syscalls(words(lines[:1]))
    denied = expand_syscalls([w.lstrip("~") for w in words(lines[1:])])
    missing = REQUIRED_SYSCALLS - (allowed - denied)
    assert not missing, f"SystemCallFilter blocks {sorted(missing)}"
    # Fork and exec stay allowed: on_action runs a program.
    assert "@process" not in " ".join(lines[1:])


def test_readme_explains_every_setting(service):
    readme = README.read_text()
    unexplained = [key for key in service if f"`{key}=" not in readme]
    assert not unexplained, f"systemd/README.md does not explain: {unexplained}"
