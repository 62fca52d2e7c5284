"""Targets that appear and vanish for 10,000 cycles: no crash, no exception out of a
tick, no fd leak. Limits are far out of reach and the guard is off: nothing is signalled."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from memwatchd.config import parse_config
from memwatchd.daemon import Daemon, Options

pytestmark = pytest.mark.slow


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_cgroup(path):
    path.mkdir()
    (path / "memory.current").write_text("4096\n")
    (path / "memory.max").write_text("max\n")


def test_ten_thousand_cycles_of_targets_coming_and_going(tmp_path):
    cgroups = tmp_path / "cgroup"
    cgroups.mkdir()
    (cgroups / "cgroup.controllers").write_text("memory pids\n")   # a v2 root with memory
    pidfile = tmp_path / "job.pid"
    config = parse_config({
        "daemon": {"events": "", "state": ""},
        "guard": {"enabled": False},
        "watch": [
            {"name": "containers", "cgroup": "/job-*", "limit": "100G"},
            {"name": "job", "pidfile": str(pidfile), "limit": "100G"},
        ],
    }, "churn-test")
    daemon = Daemon(config, Options(cgroup_root=str(cgroups), psi_trigger=False,
                                    lock_memory=False))
    before = fd_count()
    seen = 0
    for cycle in range(10_000):
        name = cgroups / f"job-{cycle % 7}"
        if name.exists():
            shutil.rmtree(name)
        else:
            make_cgroup(name)
        if cycle % 20 == 0:  # a real process behind the pidfile, exiting at once
            child = subprocess.Popen(["true"])
            pidfile.write_text(f"{child.pid}\n")
            if cycle % 40 == 0:
                child.wait()   # sometimes reaped before the tick, sometimes after
        daemon.targets.rescan_at.clear()
        daemon.tick()
        seen = max(seen, len(daemon.targets.targets))
        if cycle % 20 == 0:
            child.wait()
    for leftover in cgroups.iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover)
    pidfile.unlink()
    for _ in range(3):
        daemon.targets.rescan_at.clear()
        for target in daemon.targets.targets.values():
            target.next_due = 0.0   # sample now, not a second from now
        daemon.tick()
    assert seen >= 4                          # targets really were picked up
    assert daemon.targets.targets == {}       # and dropped once gone
    assert daemon.actions_taken == 0 and daemon.victims == {}
    assert fd_count() <= before
    daemon.close()
