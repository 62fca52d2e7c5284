"""A unit watch finds a restarted unit at once, in the cgroup it last ran in.

Found by the VM tier: a unit watch re-ran `systemctl show -P ControlGroup`
only every RESCAN_INTERVAL (2 s), and that property is empty while the unit
is not running, so a unit that started (or started again) was watched
0.8-1.9 s after it started under TCG - a hog at 200 MB/s was already past a
150M limit by then. Now the unit's cgroup path is known even while it is
stopped (from its Slice), and checked with one stat per tick in between.
"""
from __future__ import annotations

import os
import shutil

from memwatchd import targets as targets_mod
from memwatchd.config import parse_config
from memwatchd.targets import TargetSet

UNIT_CGROUP = "/system.slice/job.service"


def v2_root(root, monkeypatch):
    """A fake cgroup v2 root with the memory controller, on a host with systemd as PID 1."""
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    monkeypatch.setattr(targets_mod, "SYSTEMD_RUNTIME_DIR", str(root), raising=False)
    return str(root)


def make_cgroup(root, rel):
    path = root / rel.lstrip("/")
    path.mkdir(parents=True)
    (path / "memory.current").write_text("4096\n")
    (path / "memory.max").write_text("max\n")
    return path


def config(limit="1G"):
    return parse_config({
        "daemon": {"events": "", "state": ""},
        "guard": {"enabled": False},
        "watch": [{"name": "job", "unit": "job.service", "limit": limit}],
    }, "unit-watch-test")


def test_restarted_unit_is_found_between_rescans_without_systemctl(tmp_path, monkeypatch):
    calls = []

    def fake_unit_cgroup(self, watch, now):
        calls.append(watch.selector)
        return UNIT_CGROUP   # running or not, systemd says where it goes

    monkeypatch.setattr(TargetSet, "_unit_cgroup", fake_unit_cgroup)
    ts = TargetSet(config(), cgroup_root=v2_root(tmp_path, monkeypatch))

    assert ts.refresh(0.0) == [] and calls == ["job.service"]     # not running yet
    assert ts.problems == []                                        # and that is no problem
    assert ts.refresh(0.1) == [] and len(calls) == 1                # a stat, no systemctl
    path = make_cgroup(tmp_path, UNIT_CGROUP)                       # it starts
    added = ts.refresh(0.2)
    assert [t.cgroup for t in added] == [UNIT_CGROUP] and len(calls) == 1
    assert ts.refresh(targets_mod.RESCAN_INTERVAL) == [] and len(calls) == 1  # watched: no rescan

    # The unit stops: its cgroup goes, the target with it.
    shutil.rmtree(path)
    ts.drop(added[0].key)
    assert ts.refresh(2.1) == [] and len(calls) == 1               # a stat, no systemctl

    # It starts again well before the next rescan: watched on the next tick.
    make_cgroup(tmp_path, UNIT_CGROUP)
    again = ts.refresh(2.2)
    assert [t.cgroup for t in again] == [UNIT_CGROUP] and len(calls) == 1
    assert ts.refresh(2.3) == []                                    # not attached twice


def test_reconfigured_unit_watch_forgets_the_old_path(tmp_path, monkeypatch):
    monkeypatch.setattr(TargetSet, "_unit_cgroup", lambda self, watch, now: UNIT_CGROUP)
    make_cgroup(tmp_path, UNIT_CGROUP)
    ts = TargetSet(config(), cgroup_root=v2_root(tmp_path, monkeypatch))
    ts.refresh(0.0)
    assert ts.unit_paths == {"job": UNIT_CGROUP}
    ts.reconfigure(config())            # unchanged watch: kept
    assert ts.unit_paths == {"job": UNIT_CGROUP}
    ts.reconfigure(config(limit="2G"))  # changed watch: re-resolved from scratch
    assert ts.unit_paths == {}


def test_unit_cgroup_without_memory_current_is_said_once(tmp_path, monkeypatch):
    """A unit running where the memory controller is not enabled for it: one warning,
    not one per tick (the stopped-unit check looks every tick)."""
    monkeypatch.setattr(TargetSet, "_unit_cgroup", lambda self, watch, now: UNIT_CGROUP)
    ts = TargetSet(config(), cgroup_root=v2_root(tmp_path, monkeypatch))
    (tmp_path / UNIT_CGROUP.lstrip("/")).mkdir(parents=True)        # no memory.current
    said = []
    for tick in range(50):
        ts.refresh(tick * 0.1)
        said += ts.problems
        ts.problems.clear()
    assert len(said) == 1 and "memory.current" in said[0], said


def test_no_cgroup_v2_or_no_systemd_turns_those_watches_off_once(tmp_path, monkeypatch):
    """A v1/hybrid host (or one without systemd as PID 1): unit and cgroup watches are off,
    said once at start and once per reload, never "gone" every rescan; a process watch
    of the same config works."""
    calls = []
    monkeypatch.setattr(TargetSet, "_unit_cgroup",
                        lambda self, watch, now: calls.append(watch.selector) or UNIT_CGROUP)
    make_cgroup(tmp_path, UNIT_CGROUP)                   # v1-like: no cgroup.controllers at root
    monkeypatch.setattr(targets_mod, "SYSTEMD_RUNTIME_DIR", str(tmp_path / "no-systemd"),
                        raising=False)
    cfg = parse_config({
        "daemon": {"events": "", "state": ""}, "guard": {"enabled": False},
        "watch": [{"name": "job", "unit": "job.service", "limit": "1G"},
                  {"name": "box", "cgroup": "/system.slice/*", "limit": "1G"},
                  {"name": "me", "pid": os.getpid(), "limit": "100G"}]}, "v1-test")
    ts = TargetSet(cfg, cgroup_root=str(tmp_path))
    said = []
    added = []
    for tick in range(30):
        added += ts.refresh(tick * 0.5)
        said += ts.problems
        ts.problems.clear()
    assert [t.pid for t in added] == [os.getpid()] and calls == []
    assert len(said) == 2, said
    assert "job (unit job.service) is off (needs systemd as PID 1)" in said[0]
    assert f"{tmp_path} is not cgroup v2 with the memory controller" in said[1]
    ts.reconfigure(cfg)
    assert len(ts.problems) == 2                           # said again on reload
    assert set(ts.off) == {"job", "box"}


def test_unit_cgroup_of_a_stopped_unit_comes_from_its_slice(monkeypatch):
    import subprocess

    def fake_start(unit):
        out = {"hog.service": "ControlGroup=\nSlice=system.slice\nId=hog.service\n",
               "job.service": "ControlGroup=\nSlice=batch-big.slice\nId=job.service\n",
               "top.service": "ControlGroup=\nSlice=-.slice\nId=top.service\n",
               "run.service": "ControlGroup=/system.slice/run.service\nSlice=system.slice\n"
                              "Id=run.service\n",
               "gone.service": "ControlGroup=\nSlice=\nId=gone.service\n"}[unit]
        return subprocess.Popen(["printf", "%s", out], stdout=subprocess.PIPE, text=True)

    monkeypatch.setattr(targets_mod, "start_unit_show", fake_start)
    assert targets_mod.unit_cgroup("hog.service") == "/system.slice/hog.service"
    assert targets_mod.unit_cgroup("job.service") == "/batch.slice/batch-big.slice/job.service"
    assert targets_mod.unit_cgroup("top.service") == "/top.service"
    assert targets_mod.unit_cgroup("run.service") == "/system.slice/run.service"
    assert targets_mod.unit_cgroup("gone.service") == ""


def test_a_slow_systemctl_never_holds_up_the_loop(tmp_path, monkeypatch):
    """`systemctl show` waits on PID 1; a slow one (here 2 s) must not stall the tick that
    resolves the unit watch: the run is picked up on a later tick, and a hung one is killed."""
    import time
    fake = tmp_path / "bin" / "systemctl"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\nsleep 2\necho ControlGroup={UNIT_CGROUP}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    make_cgroup(tmp_path, UNIT_CGROUP)
    ts = TargetSet(config(), cgroup_root=v2_root(tmp_path, monkeypatch))
    started = time.monotonic()
    assert ts.refresh(0.0) == []
    assert time.monotonic() - started < 1.0          # waited SYSTEMCTL_WAIT, not 2 s
    assert ts.refresh(0.5) == []                     # still running: no wait at all
    assert time.monotonic() - started < 1.2
    time.sleep(2.5)
    added = ts.refresh(1.0)                          # a later tick takes its answer
    assert [t.cgroup for t in added] == [UNIT_CGROUP]

    fake.write_text("#!/bin/sh\nexec sleep 60\n")    # hung: killed after SYSTEMCTL_TIMEOUT
    ts2 = TargetSet(config(), cgroup_root=v2_root(tmp_path, monkeypatch))
    assert ts2.refresh(0.0) == []
    proc, _ = ts2.unit_shows["job"]
    assert ts2.refresh(targets_mod.SYSTEMCTL_TIMEOUT + 0.1) == []
    assert proc.poll() is not None and "took longer" in ts2.problems[-1]
