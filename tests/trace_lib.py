"""Synthetic traces written by the real Recorder, for the ring tests and benchmarks/replay.py.

``SyntheticDaemon`` stands in for the daemon around a trace.Recorder: the daemon's
Policy, a loop that samples each target when Policy.interval_for says it is due,
and usage from a function of time. Everything the recorder writes goes through its
real code; only /proc is replaced (by the usage function). Nothing is signalled.
"""
from __future__ import annotations

import math

from memwatchd.config import parse_config
from memwatchd.policy import Policy
from memwatchd.types import HostSample, Reading

MiB = 1 << 20
GiB = 1 << 30


class _Watch:
    def __init__(self, name, scope="process"):
        self.name, self.scope = name, scope


class _Target:
    def __init__(self, key, name):
        self.key, self.watch, self.is_cgroup = key, _Watch(name), False
        self.comm, self.cmdline, self.cgroup, self.slot = f"job{key[1]}", f"job{key[1]} --run", "/", 0


class _Host:
    def __init__(self, owner):
        self.owner = owner

    def read(self):
        return self.owner.host


class _Targets:
    def __init__(self, owner):
        self.host = _Host(owner)
        self.targets = {}
        self.proc = "/nonexistent/proc"
        self.cgroup_root = "/nonexistent/cgroup"


def config_for(n: int, limit: str = "1G", action: str = "term", dry_run: bool = True):
    return parse_config({"daemon": {"dry_run": dry_run}, "guard": {"enabled": False},
                         "watch": [{"name": f"job-{i}", "pid": 1000 + i, "limit": limit,
                                    "action": action} for i in range(n)]}, "synthetic")


def usage_of(i: int, t: float) -> int:
    """Target i's usage at time t: most idle, some sawtooth, one in ten leaking past 1 GiB."""
    if i % 10 == 0:
        return int(100 * MiB + 10 * MiB * t)                   # leaks 10 MiB/s
    if i % 3 == 0:
        return int(300 * MiB + 200 * MiB * abs(math.sin(t / 7.0 + i)))   # sawtooth-like
    return 200 * MiB + (i * 4096) + (int(t) // 60) * MiB      # idle, creeping 1 MiB a minute


class SyntheticDaemon:
    def __init__(self, config, clock_start: float = 1000.0):
        self.config = config
        self.now = clock_start
        self.policy = Policy(config)
        self.targets = _Targets(self)
        self.host = HostSample(24 * GiB, 20 * GiB, 0, 0, None)
        self.trace = None
        self.keys = []
        for i, w in enumerate(config.watches):
            key = ("process", w.selector, 5000 + i)
            self.targets.targets[key] = _Target(key, w.name)
            self.keys.append((key, w))

    def clock(self):
        return self.now

    def run(self, seconds: float, usage=usage_of) -> None:
        """The daemon's loop on a virtual clock: sample what is due, decide, record."""
        start = self.now
        due = {key: start for key, _ in self.keys}
        killed = set()
        while self.now < start + seconds:
            t = self.now
            readings = []
            for i, (key, w) in enumerate(self.keys):
                if key in killed or due[key] > t:
                    continue
                u = usage(i, t - start)
                limit = w.limit.resolve(self.host.mem_total)
                warn = w.warn.resolve(self.host.mem_total) if w.warn is not None else None
                readings.append(Reading(key, w.name, u, limit, warn))
            decisions = self.policy.evaluate(t, readings, self.host)
            self.trace.tick(t, readings, [], self.host, [], decisions)
            for r in readings:
                due[r.key] = t + self.policy.interval_for(r)
            self.now = min(v for k, v in due.items() if k not in killed) if len(killed) < len(due) \
                else t + 1.0
            self.now = max(self.now, t + self.config.daemon.min_interval)
