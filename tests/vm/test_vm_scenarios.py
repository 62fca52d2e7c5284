"""Issue 6: memwatchd saves a real systemd guest (Debian 12, cgroup v2, no swap).

One boot (about 2 minutes under TCG) runs every scenario in order, driven from
inside the guest by scenario/driver.py; each test below asserts one
scenario's checks from the results file the driver writes to the share:

  hardened_unit  `memwatchd install-units` + `systemctl enable --now`: the shipped
                 unit, unchanged but for ExecStart; `systemd-analyze verify` is silent
  host_guard     the installed default config (guard only): a hog in its own unit
                 heads for all of the guest's memory and is stopped; a bigger
                 process named sshd and the ssh.service cgroup are spared
  unit_budget    a 300M budget for hog.service; the hog (200 MB/s) is stopped by
                 memwatchd, never by the kernel OOM killer
  reload         a broken config is refused (old one still enforced); a valid one
                 with a lower limit applies
  watchdog       SIGSTOP memwatchd: systemd's watchdog restarts it; the new
                 instance is ready and stops the next hog (with SIGKILL escalation)
  adversarial    issue 11: nobody runs a forged sshd (the largest process), a 64 KiB
                 command line that makes the cmdline regex backtrack and a FIFO as a
                 watched pidfile; nobody's hog whose main thread exited is stopped at
                 its limit, the guard stops the forged sshd, the watchdog never fires
  global         a bystander survives, the heartbeat (every 100 ms) never pauses
                 over 1 s, no OOM kill anywhere

A second boot without memwatchd (the "before" column of the README) runs only
with MEMWATCHD_VM_BASELINE=1. Set MEMWATCHD_VM_RESULTS=DIR to keep the
results JSON (also always in the run's share dir).
"""
import json
import os
import shutil
from pathlib import Path

import pytest

import harness

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).resolve().parent / "scenario"
MIB = 1 << 20

# Bounds asserted on the measurements (generous: TCG on a loaded 2-core CI runner).
MAX_HEARTBEAT_GAP_S = 1.0      # while a hog runs (the bound)
MAX_HEARTBEAT_GAP_RUN_S = 2.0  # anywhere in the run (memwatchd restarts, reloads, ...)
MAX_CROSS_TO_EXIT_S = 3.0      # budget crossed -> hog gone (includes the unit rescan)
MAX_DECISION_TO_EXIT_S = 1.0   # SIGTERM sent -> hog gone (a Python hog dies at once)


def guest_files():
    files = {"/usr/local/lib/mwtest/%s" % name: SCENARIO / name
             for name in ("driver.py", "hog.py", "heartbeat.py")}
    for unit in sorted((SCENARIO / "units").glob("*.service")):
        files["/etc/systemd/system/" + unit.name] = unit
    return files


SCRIPT = """#!/bin/bash
set -u
{reload}
exec /usr/bin/python3 /usr/local/lib/mwtest/driver.py {mode} "$VM_SHARE/results.json"
"""


def boot(mode, image, wheels, run_dir, timeout):
    result = harness.run_guest(
        SCRIPT.format(mode=mode, reload="" if mode == "protected" else "systemctl daemon-reload"),
        wheels_dir=wheels if mode == "protected" else None, extra_files=guest_files(), image=image, run_dir=run_dir,
        mem_mb=1024, timeout=timeout)
    return result, finished_results(result, "%s.json" % mode)


def finished_results(result, keep_as):
    """The driver's results.json of a boot that must have run to the end, with its boot
    time; a copy kept as keep_as in $MEMWATCHD_VM_RESULTS when that is set."""
    assert not result.timed_out, result.describe()
    assert result.exit_code == 0, result.describe()
    results = result.read_json("results.json")
    results["boot_seconds"] = round(result.duration, 1)
    keep = os.environ.get("MEMWATCHD_VM_RESULTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(result.share_dir / "results.json", Path(keep) / keep_as)
    return results


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenario-wheels")
    harness.build_wheels(REPO, out)
    return out


@pytest.fixture(scope="module")
def protected(vm_image, wheels, tmp_path_factory):
    return boot("protected", vm_image, wheels, tmp_path_factory.mktemp("scenarios") / "run", 600)


def assert_checks(results, scenario):
    checks = [c for c in results["checks"] if c["scenario"] == scenario]
    assert checks, "scenario %s recorded no checks: %s" % (scenario, results["errors"])
    failed = ["%s: %s" % (c["name"], c["detail"][:1500]) for c in checks if not c["ok"]]
    assert not failed, "\n".join(failed)


def fmt(value, unit="s", scale=1.0):
    return "-" if value is None else "%.2f %s" % (value / scale, unit)


def hog_line(name, hog):
    return ("%-26s %-7s sig %-2s %4s MB/s peak %10s at decision %10s  watched after %7s  "
            "cross->decision %7s  decision->exit %7s  cross->exit %7s  start->exit %7s" % (
                name, hog.get("result"), hog.get("exit_signal") or "-",
                "%.0f" % hog["alloc_rate_mb_s"] if hog.get("alloc_rate_mb_s") else "-",
                fmt(hog.get("peak_cgroup_current"), "MiB", MIB),
                fmt(hog.get("usage_at_decision"), "MiB", MIB), fmt(hog.get("watch_attach_s")),
                fmt(hog.get("cross_to_decision_s")), fmt(hog.get("seconds_to_exit")),
                fmt(hog.get("cross_to_exit_s")), fmt(hog.get("start_to_exit_s"))))


def summary(results):
    s = results["scenarios"]
    lines = ["memwatchd VM scenarios (%s, MemTotal %s, boot %s s, driver %s s)" % (
        results["facts"].get("kernel"), fmt(results["facts"].get("mem_total"), "MiB", MIB),
        results.get("boot_seconds"), results["facts"].get("driver_seconds"))]
    for name, key in (("host_guard", "hog"), ("unit_budget", "hog"),
                      ("reload", "hog_old_limit"), ("reload", "hog_under_old_limit"),
                      ("reload", "hog_new_limit"), ("watchdog", "hog"),
                      ("adversarial", "leader_hog"),
                      ("baseline", "hog")):
        hog = s.get(name, {}).get(key)
        if hog:
            lines.append(hog_line("%s/%s" % (name, hog["label"]), hog)
                         + "  heartbeat max gap %s" % fmt((hog.get("heartbeat") or {}).get("max_gap_s")))
    for name, data in s.items():
        hb = data.get("heartbeat") or {}
        lines.append("%-22s %6s s   heartbeat max gap %s" % (
            name, data.get("seconds"), fmt(hb.get("max_gap_s"))))
    unit = s.get("hardened_unit", {})
    if unit:
        lines.append("hardened unit: verify %r, %s, memwatchd VmRSS %s VmLck %s" % (
            (unit.get("verify", {}).get("stdout", "") + unit.get("verify", {}).get("stderr", "")).strip(),
            unit.get("security_exposure"), unit.get("process", {}).get("VmRSS"),
            unit.get("process", {}).get("VmLck")))
    wd = s.get("watchdog", {})
    if wd:
        lines.append("watchdog: SIGSTOP -> timeout %s, timeout -> started %s, SIGSTOP -> running %s"
                     % (fmt(wd.get("sigstop_to_watchdog_timeout_s")),
                        fmt(wd.get("watchdog_timeout_to_ready_s")),
                        fmt(wd.get("sigstop_to_running_s"))))
    failed = [c["name"] for c in results["checks"] if not c["ok"]]
    lines.append("checks: %d passed, %d failed %s" % (
        len(results["checks"]) - len(failed), len(failed), failed or ""))
    return "\n".join(lines)


def test_summary(protected, capsys):
    result, results = protected
    (result.share_dir / "summary.txt").write_text(summary(results) + "\n")
    with capsys.disabled():
        print("\n" + summary(results))
    assert not results["errors"], "\n".join(results["errors"])


def test_hardened_unit_installed_unchanged(protected):
    """Scenario 5: the unit that ran is the shipped one, only ExecStart rewritten."""
    result, results = protected
    assert_checks(results, "hardened_unit")
    assert_checks(results, "hardened_unit_journal")
    shipped = (REPO / "systemd" / "memwatchd.service").read_text().splitlines()
    installed = result.read_text("installed-memwatchd.service").splitlines()
    diff = [(a, b) for a, b in zip(shipped, installed) if a != b]
    assert len(shipped) == len(installed), (shipped, installed)
    assert diff == [("ExecStart=/usr/local/bin/memwatchd run",
                     "ExecStart=%s/bin/memwatchd run" % harness.GUEST_VENV)], diff


def test_host_guard_default_config(protected):
    """Scenario 2."""
    _, results = protected
    assert_checks(results, "host_guard")
    hog = results["scenarios"]["host_guard"]["hog"]
    assert hog["seconds_to_exit"] is not None and hog["seconds_to_exit"] <= MAX_DECISION_TO_EXIT_S


def assert_fast(hog):
    assert hog.get("cross_to_exit_s") is not None, hog
    # Seen at its limit, not far past it (SIGKILL escalation starts at 1.25x).
    assert hog["usage_at_decision"] < 1.25 * hog["limit"], hog_line("hog", hog)
    assert hog["cross_to_exit_s"] <= MAX_CROSS_TO_EXIT_S, hog_line("hog", hog)
    assert hog["seconds_to_exit"] <= MAX_DECISION_TO_EXIT_S, hog_line("hog", hog)


def test_unit_budget(protected):
    """Scenario 1."""
    _, results = protected
    assert_checks(results, "unit_budget")
    assert_fast(results["scenarios"]["unit_budget"]["hog"])


def test_reload(protected):
    """Scenario 4."""
    _, results = protected
    assert_checks(results, "reload")
    assert_fast(results["scenarios"]["reload"]["hog_old_limit"])
    assert_fast(results["scenarios"]["reload"]["hog_new_limit"])


def test_watchdog_restart(protected):
    """Scenario 3."""
    _, results = protected
    assert_checks(results, "watchdog")


def test_adversarial_user_neither_blinds_steers_nor_stalls(protected):
    """Issue 11, in the same boot."""
    _, results = protected
    assert_checks(results, "adversarial")
    hog = results["scenarios"]["adversarial"]["leader_hog"]
    assert_fast(hog)
    assert results["scenarios"]["adversarial"]["seconds"] < 60, results["scenarios"]["adversarial"]


def test_no_stall_no_oom_bystander_survives(protected):
    """Scenarios 1-4 together: heartbeat bound, no OOM kill, the bystander lives."""
    _, results = protected
    assert_checks(results, "global")
    heartbeat = results["scenarios"]["global"]["heartbeat_run"]
    assert heartbeat["max_gap_during_hogs_s"] <= MAX_HEARTBEAT_GAP_S, heartbeat
    assert heartbeat["max_gap_s"] <= MAX_HEARTBEAT_GAP_RUN_S, heartbeat


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEMWATCHD_VM_BASELINE") != "1",
                    reason="baseline without memwatchd: set MEMWATCHD_VM_BASELINE=1")
def test_baseline_without_memwatchd(vm_image, wheels, tmp_path, capsys):
    """Scenario 6: the same hog, no memwatchd. Reported, not judged: the kernel
    OOM killer is expected to end it, after a stall."""
    result, results = boot("baseline", vm_image, wheels, tmp_path / "run", 600)
    base = results["scenarios"]["baseline"]
    text = summary(results) + "\noom kills: %s\nkernel: %s" % (
        base.get("oom_kills"), json.dumps(base.get("kernel_oom_lines", [])[:6], indent=1))
    (result.share_dir / "summary.txt").write_text(text + "\n")
    with capsys.disabled():
        print("\n" + text)
    assert base.get("hog", {}).get("ended"), results
