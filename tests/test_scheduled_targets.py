"""Issue 18: the ProcessTable keeps the schedule of quiet single-process targets.

The daemon hands a target to the table once the policy calls its reading quiet
(Policy.quiet_below gives the ceiling); the tick then builds no reading for it
until the table hands it back, loud (at or above the ceiling), unreadable or gone,
in the very tick whose due time read it. A real Daemon over real processes, on a
fake clock; action "warn" and the guard off, so nothing is ever signalled. Runs
against the compiled table and (MEMWATCHD_NO_EXTENSIONS=1) its Python twin.
"""
from __future__ import annotations

import psutil
import pytest

from memwatchd.config import parse_config
from memwatchd.daemon import Daemon, Options
from memwatchd.policy import REASON_WARN
from memwatchd.state import target_view

from .conftest import Hog

MiB = 1 << 20


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def hogs():
    made = []

    def make(step):
        made.append(Hog(step, cap=1 << 30))
        return made[-1]
    yield make
    for hog in made:
        hog.kill()


def daemon_for(watches, clock):
    config = parse_config({"daemon": {"events": "", "state": "", "fill_rate": "1G"},
                           "guard": {"enabled": False}, "watch": watches}, "test")
    return Daemon(config, Options(psi_trigger=False, lock_memory=False), clock=clock)


def watching(daemon):
    """Record what the policy is shown and decides, tick by tick."""
    seen = []
    evaluate = daemon.policy.evaluate

    def spy(now, readings, host=None):
        decisions = evaluate(now, readings, host)
        seen.append(([r.key for r in readings], [(d.kind, d.key, d.reason) for d in decisions]))
        return decisions
    daemon.policy.evaluate = spy
    return seen


def test_a_quiet_target_is_scheduled_by_the_table_and_handed_back_the_tick_it_crosses(hogs):
    grower, calm = hogs(160 * MiB), hogs(64 * MiB)
    clock = FakeClock()
    d = daemon_for([{"name": "grower", "pid": grower.pid, "limit": "600M", "warn": "150M",
                     "action": "warn"},
                    {"name": "calm", "pid": calm.pid, "limit": "2G", "action": "warn"}], clock)
    try:
        seen = watching(d)
        d.tick()                                     # attaches both, reads them in Python
        ts = d.targets
        g = next(t for t in ts.targets.values() if t.pid == grower.pid)
        c = next(t for t in ts.targets.values() if t.pid == calm.pid)
        assert sorted(seen[-1][0]) == sorted([g.key, c.key])
        assert g.table is not None and c.table is not None, "quiet: handed to the table"
        assert set(ts.in_table.values()) == {g, c} and not ts.by_python

        for _ in range(4):                           # quiet ticks: the policy sees nothing
            first = g if g.next_due <= c.next_due else c
            clock.now = first.next_due
            d.tick()
            assert seen[-1] == ([], []) and first.sampled_at == clock.now
        # status / state / metrics show what the table last read, and when
        view = target_view(c, clock.now)
        assert abs(view["usage_bytes"] - psutil.Process(calm.pid).memory_info().rss) < 4 * MiB
        assert view["sample_age_seconds"] == pytest.approx(clock.now - c.sampled_at)
        assert view["interval_seconds"] == pytest.approx(c.interval, abs=1e-6) and c.interval > 0
        assert c.next_due == pytest.approx(c.sampled_at + c.interval)

        grower.grow()                                # ~170 MiB: past its 150M warn level
        due = g.next_due
        clock.now = min(due, c.next_due) - 1e-6      # not due yet: not looked at, as before
        d.tick()
        assert g.key not in seen[-1][0] and g.table is not None
        clock.now = due                              # due: read in C, loud, handed back now
        d.tick()
        keys, decisions = seen[-1]
        assert keys == [g.key]
        assert decisions == [("warn", g.key, REASON_WARN)]
        assert g.table is None and c.table is not None
        assert g.usage >= 150 * MiB and g.sampled_at == clock.now
        clock.now = g.next_due                       # warned: the policy sees every reading
        d.tick()
        assert g.key in seen[-1][0] and g.table is None

        calm.kill()                                  # gone while the table schedules it
        clock.now = c.next_due
        d.tick()
        assert c.key not in ts.targets and not ts.in_table
        assert c.key not in d.policy.states
    finally:
        d.close()


def test_look_now_a_reload_and_force_reach_the_targets_the_table_schedules(hogs):
    """next_due = 0.0 (the PSI trigger, the quiet wait) makes a table-scheduled target
    due at the next tick; a reload and a forced sample hand every target back."""
    hog = hogs(32 * MiB)
    clock = FakeClock()
    watch = [{"name": "w", "pid": hog.pid, "limit": "2G", "action": "warn"}]
    d = daemon_for(watch, clock)
    try:
        seen = watching(d)
        d.tick()
        (t,) = d.targets.targets.values()
        assert t.table is not None
        clock.now += 0.001
        d.tick()
        assert t.sampled_at == 1000.0                # not due: not read
        t.next_due = 0.0
        d.tick()
        assert t.sampled_at == clock.now and t.table is not None and seen[-1] == ([], [])
        readings, _ = d.targets.sample_due(clock.now, force=True)
        assert [r.key for r in readings] == [t.key] and t.table is None
        clock.now = t.next_due
        d.tick()                                     # read in Python, quiet: back to the table
        assert t.table is not None
        d.apply_config(parse_config({"daemon": {"events": "", "state": "", "fill_rate": "1G"},
                                     "guard": {"enabled": False}, "watch": watch}, "test"))
        assert t.table is None and d.targets.by_python == {t.key: t}
        assert t.usage > 0 and t.sampled_at == clock.now
    finally:
        d.close()


def test_the_earliest_due_time_counts_the_tables_targets_and_the_ticks(hogs):
    """TargetSet.next_due (what the loop may sleep until) is the minimum of every
    target's next_due, wherever it is scheduled."""
    a, b = hogs(32 * MiB), hogs(32 * MiB)
    clock = FakeClock()
    d = daemon_for([{"name": "a", "pid": a.pid, "limit": "2G", "action": "warn"},
                    {"name": "b", "pid": b.pid, "limit": "2G", "warn": "1M", "action": "warn"}],
                   clock)
    try:
        d.tick()
        ts = d.targets
        ta, tb = (next(t for t in ts.targets.values() if t.pid == p.pid) for p in (a, b))
        assert ta.table is not None and tb.table is None   # b is over its warn level: Python
        assert ts.next_due() == min(t.next_due for t in ts.targets.values())
        ta.next_due = 1.0
        assert ts.next_due() == 1.0
        tb.next_due = 0.5
        assert ts.next_due() == 0.5
    finally:
        d.close()
