"""The policy over plain records: the ladder, hysteresis, sustain, guard, re-check, intervals."""
from __future__ import annotations

import signal
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memwatchd import policy as P
from memwatchd.config import (Config, DaemonConfig, GuardConfig, MetricsConfig, ProtectConfig, Size,
                              WatchConfig, default_config)
from memwatchd.types import NO_ZRAM, Candidate, HostSample, Pressure, Reading, SwapDevices

MiB = 1 << 20
GiB = 1 << 30
KEY = ("process", 100, 5555)


def make_config(**watch_fields) -> Config:
    fields = dict(name="job", kind="pid", selector=100, limit=Size(bytes=200 * MiB),
                  warn=Size(bytes=150 * MiB), action="term", grace=2.0)
    fields.update(watch_fields)
    return Config(DaemonConfig(cooldown=5.0), GuardConfig(), ProtectConfig(), MetricsConfig(),
                  (WatchConfig(**fields),), "test")


def reading(usage_mib: float, limit_mib=200, warn_mib=150, key=KEY) -> Reading:
    return Reading(key, "job", int(usage_mib * MiB), limit_mib * MiB,
                   None if warn_mib is None else warn_mib * MiB)


def host(avail_gib: float, total_gib: float = 16, full_avg10: float = 0.0) -> HostSample:
    return HostSample(int(total_gib * GiB), int(avail_gib * GiB), 0, 0,
                      Pressure(full_avg10=full_avg10))


def kinds(decisions):
    return [(d.kind, d.signal, d.reason) for d in decisions]


# ------------------------------------------------------------------ the ladder

def test_ladder_table():
    """One target through a whole episode, tick by tick: (time, usage MiB) -> decisions."""
    pol = P.Policy(make_config())
    table = [
        (0.0, 100, []),
        (0.1, 160, [("warn", None, P.REASON_WARN)]),
        (0.2, 170, []),                                    # warned once per crossing
        (0.3, 210, [("signal", signal.SIGTERM, P.REASON_LIMIT)]),
        (0.4, 230, []),                                    # grace: waiting
        (2.2, 220, []),                                    # 1.9 s into a 2 s grace
        (2.4, 220, [("signal", signal.SIGKILL, P.REASON_GRACE)]),
        (2.5, 240, []),                                    # killed: nothing more
    ]
    for now, usage, expected in table:
        assert kinds(pol.evaluate(now, [reading(usage)])) == expected, (now, usage)


def test_escalates_at_once_past_125_percent():
    pol = P.Policy(make_config())
    assert kinds(pol.evaluate(0, [reading(210)])) == [("signal", signal.SIGTERM, P.REASON_LIMIT)]
    assert kinds(pol.evaluate(0.05, [reading(249)])) == []
    assert kinds(pol.evaluate(0.1, [reading(251)])) == [("signal", signal.SIGKILL, P.REASON_ESCALATE)]


def test_escalates_when_host_critical_during_grace():
    pol = P.Policy(make_config())
    pol.evaluate(0, [reading(210)], host(8))
    assert kinds(pol.evaluate(0.1, [reading(210)], host(0.1))) == \
        [("signal", signal.SIGKILL, P.REASON_ESCALATE)]


def test_backs_off_if_it_shrank_during_grace_and_acts_again_after_cooldown():
    pol = P.Policy(make_config())
    pol.evaluate(0, [reading(210)])
    assert pol.evaluate(2.5, [reading(120)]) == []          # grace over, but below the limit
    assert pol.evaluate(3.0, [reading(210)]) == []          # within cooldown (5 s from 0)
    assert kinds(pol.evaluate(5.1, [reading(210)])) == [("signal", signal.SIGTERM, P.REASON_LIMIT)]


def test_warn_hysteresis_rearms_below_90_percent_of_warn():
    pol = P.Policy(make_config())
    assert len(pol.evaluate(0, [reading(151)])) == 1
    assert pol.evaluate(1, [reading(140)]) == []            # 140 > 135: still armed off
    assert pol.evaluate(2, [reading(151)]) == []
    assert pol.evaluate(3, [reading(130)]) == []            # below 135: re-armed
    assert kinds(pol.evaluate(4, [reading(151)])) == [("warn", None, P.REASON_WARN)]


def test_sustain_requires_continuous_excess():
    pol = P.Policy(make_config(sustain=1.0))
    assert pol.evaluate(0, [reading(210, warn_mib=None)]) == []
    assert pol.evaluate(0.9, [reading(210, warn_mib=None)]) == []
    assert pol.evaluate(0.95, [reading(190, warn_mib=None)]) == []   # dipped: clock restarts
    assert pol.evaluate(1.5, [reading(210, warn_mib=None)]) == []
    assert pol.evaluate(2.4, [reading(210, warn_mib=None)]) == []
    assert kinds(pol.evaluate(2.5, [reading(210, warn_mib=None)])) == \
        [("signal", signal.SIGTERM, P.REASON_LIMIT)]


@pytest.mark.parametrize("action,expected", [
    ("kill", [("signal", signal.SIGKILL, P.REASON_LIMIT)]),
    ("warn", [("warn", None, P.REASON_LIMIT)]),
    ("throttle", [("throttle", None, P.REASON_LIMIT)]),
    ("freeze", [("freeze", None, P.REASON_LIMIT)]),
])
def test_other_actions_fire_once(action, expected):
    pol = P.Policy(make_config(action=action))
    assert kinds(pol.evaluate(0, [reading(210, warn_mib=None)])) == expected
    assert pol.evaluate(10, [reading(215, warn_mib=None)]) == []


def test_unknown_watch_and_forget():
    pol = P.Policy(make_config())
    other = Reading(KEY, "not-configured", 999 * MiB, 1, None)
    assert pol.evaluate(0, [other]) == []
    pol.evaluate(0, [reading(210)])
    pol.forget(KEY)  # it exited; a new process with a new key starts fresh
    new = ("process", 101, 6666)
    assert kinds(pol.evaluate(0.1, [reading(210, key=new)])) == [("signal", signal.SIGTERM, P.REASON_LIMIT)]


def test_forget_keeps_the_cooldown_of_the_same_key():
    """A cgroup killed, forgotten and seen again under the same key (its usage stays over
    the limit: page cache, tmpfs) is not acted on again before the cooldown (5 s) ends."""
    cg = ("cgroup", "/jobs/a")
    pol = P.Policy(make_config(action="kill"))
    assert kinds(pol.evaluate(0, [reading(210, key=cg)])) == [("signal", signal.SIGKILL, P.REASON_LIMIT)]
    pol.forget(cg)
    assert pol.evaluate(0.1, [reading(210, key=cg)]) == []
    assert pol.evaluate(4.9, [reading(210, key=cg)]) == []
    assert kinds(pol.evaluate(5.1, [reading(210, key=cg)])) == [("signal", signal.SIGKILL, P.REASON_LIMIT)]


def test_settle_restarts_the_ladder_but_keeps_the_cooldown():
    cg = ("cgroup", "/jobs/a")
    pol = P.Policy(make_config(action="kill"))
    pol.evaluate(0, [reading(210, key=cg)])
    pol.settle(cg)          # the victims died; the cgroup stays over its limit
    assert pol.stage(cg) == "idle"
    assert pol.evaluate(1, [reading(210, key=cg)]) == []
    assert kinds(pol.evaluate(5.5, [reading(210, key=cg)])) == [("signal", signal.SIGKILL, P.REASON_LIMIT)]


@pytest.mark.parametrize("action", ["throttle", "freeze"])
def test_throttled_or_frozen_target_is_revisited_once_usage_falls(action):
    pol = P.Policy(make_config(action=action))
    assert pol.evaluate(0, [reading(210, warn_mib=None)])
    assert pol.evaluate(1, [reading(150, warn_mib=None)]) == []     # fell under its limit
    assert pol.stage(KEY) == "idle"
    assert kinds(pol.evaluate(6, [reading(220, warn_mib=None)])) == [(action, None, P.REASON_LIMIT)]


def test_a_watch_named_guard_is_not_the_guard():
    """The guard is known by Decision.by_guard: a watch's decisions never carry it, whatever
    its name, so back_off and the re-check treat them as the watch's."""
    pol = P.Policy(make_config(name="guard"))
    [d] = pol.evaluate(0, [Reading(KEY, "guard", 210 * MiB, 200 * MiB, None)])
    assert d.watch == "guard" and not d.by_guard
    assert not P.still_needed(d, 190 * MiB, host(4), pol.config.guard)   # its own usage decides
    assert P.still_needed(d, 205 * MiB, host(4), pol.config.guard)


def test_back_off_undoes_a_step():
    pol = P.Policy(make_config())
    pol.evaluate(0, [reading(210)])
    pol.back_off(KEY)
    assert kinds(pol.evaluate(0.1, [reading(210)])) == [("signal", signal.SIGTERM, P.REASON_LIMIT)]


# ------------------------------------------------------------------ re-check

def test_still_needed_rechecks_first_actions_only():
    cfg = make_config()
    term = P.Decision("signal", KEY, "job", P.REASON_LIMIT, 210 * MiB, 200 * MiB, signal.SIGTERM)
    assert P.still_needed(term, 205 * MiB, None, cfg.guard)
    assert not P.still_needed(term, 190 * MiB, None, cfg.guard)
    grace = term._replace(reason=P.REASON_GRACE, signal=signal.SIGKILL)
    assert P.still_needed(grace, 10 * MiB, None, cfg.guard)
    guard = P.Decision("signal", KEY, "guard", P.REASON_GUARD_LOW, 1, 1, signal.SIGTERM, True)
    assert P.still_needed(guard, None, host(0.5), cfg.guard)      # 0.5 GiB < 5% of 16
    assert not P.still_needed(guard, None, host(4), cfg.guard)    # recovered


# ------------------------------------------------------------------ intervals

@pytest.mark.parametrize("headroom,expected", [
    (8 * GiB, 1.0),          # far: the slow interval
    (2 * GiB, 0.5),          # 2 GiB at 4 GiB/s
    (40 * MiB, 40 / 4096),   # just under 10 ms
    (1 * MiB, 0.01),         # clamped to min_interval
    (0, 0.01),
    (-5, 0.01),
])
def test_next_interval(headroom, expected):
    got = P.next_interval(headroom, 4 * GiB, 0.01, 1.0)
    assert got == pytest.approx(max(0.01, expected))


def test_interval_for_reading_and_during_grace():
    pol = P.Policy(make_config(limit=Size(bytes=8 * GiB), warn=None))
    far = Reading(KEY, "job", 0, 8 * GiB, None)
    assert pol.interval_for(far) == 1.0
    near = Reading(KEY, "job", 8 * GiB - 4 * MiB, 8 * GiB, None)
    assert pol.interval_for(near) == 0.01
    pol.evaluate(0, [Reading(KEY, "job", 9 * GiB, 8 * GiB, None)])   # SIGTERM sent
    assert pol.interval_for(far) == 0.01                               # watched closely in grace


# ------------------------------------------------------------------ guard

def cand(pid, rss_mib, comm="job", cgroup="/user.slice", uid=0, root_exe=True):
    return Candidate(("process", pid, 1000 + pid), pid, comm, cgroup, rss_mib * MiB, uid,
                     root_exe)


def test_guard_levels():
    g = GuardConfig()   # 5% / 2% of 16 GiB = 0.8 / 0.32 GiB
    assert P.guard_level(g, host(4)) == (None, "")
    assert P.guard_level(g, host(0.5)) == ("term", P.REASON_GUARD_LOW)
    assert P.guard_level(g, host(0.2)) == ("kill", P.REASON_GUARD_CRITICAL)
    assert P.guard_level(g._replace(enabled=False), host(0.1)) == (None, "")


def swapped(avail_gib, swap_total_gib, swap_free_gib, total_gib=16, pressure=None):
    return HostSample(int(total_gib * GiB), int(avail_gib * GiB), int(swap_total_gib * GiB),
                      int(swap_free_gib * GiB), pressure or Pressure())


ZRAM_3TO1 = SwapDevices(zram_total=8 * GiB, zram_free=6 * GiB, zram_orig=2 * GiB, zram_ram=GiB * 2 // 3)


@pytest.mark.parametrize("sample, zram, count_swap, expected", [
    # no swap: MemAvailable alone (5% / 2% of 16 GiB = 0.8 / 0.32 GiB)
    (swapped(0.5, 0, 0), NO_ZRAM, True, ("term", P.REASON_GUARD_LOW)),
    # RAM full, disk swap free: the cold pages have somewhere to go; not a stall
    (swapped(0.1, 8, 6), NO_ZRAM, True, (None, "")),
    # ...unless told to look at MemAvailable alone (the old behaviour)
    (swapped(0.1, 8, 6), NO_ZRAM, False, ("kill", P.REASON_GUARD_CRITICAL)),
    # swap almost used up as well: 0.3 + 0.4 GiB < 0.8
    (swapped(0.3, 8, 0.4), NO_ZRAM, True, ("term", P.REASON_GUARD_LOW)),
    (swapped(0.05, 8, 0.2), NO_ZRAM, True, ("kill", P.REASON_GUARD_CRITICAL)),
    # swap removed at run time (swapoff): SwapTotal 0 from this sample on
    (swapped(0.5, 0, 0), NO_ZRAM, True, ("term", P.REASON_GUARD_LOW)),
    # zram at 3:1: 1 GiB free on it is worth 2/3 GiB of RAM: 0.1 + 0.67 < 0.8
    (swapped(0.1, 8, 1), ZRAM_3TO1._replace(zram_free=GiB), True, ("term", P.REASON_GUARD_LOW)),
    # ...while 1 GiB of disk swap is worth 1 GiB
    (swapped(0.1, 8, 1), NO_ZRAM, True, (None, "")),
    # an empty zram device is assumed to compress 2:1: 1.2 GiB free on it is worth 0.6
    (swapped(0.1, 8, 1.2), SwapDevices(8 * GiB, int(1.2 * GiB), 0, 0), True, ("term", P.REASON_GUARD_LOW)),
    (swapped(0.1, 8, 3), SwapDevices(8 * GiB, 3 * GiB, 0, 0), True, (None, "")),
    # zram and a disk swapfile together: 0.5 GiB disk + 1 GiB zram at 3:1
    (swapped(0.1, 9, 1.5), ZRAM_3TO1._replace(zram_free=GiB), True, (None, "")),
])
def test_guard_headroom_counts_swap_at_its_worth(sample, zram, count_swap, expected):
    g = GuardConfig()._replace(count_swap=count_swap)
    assert P.guard_level(g, sample, zram) == expected


def test_swap_headroom_values():
    assert P.swap_headroom(GiB) == GiB
    assert abs(P.swap_headroom(3 * GiB, ZRAM_3TO1) - 2 * GiB) <= 2
    assert P.swap_headroom(2 * GiB, SwapDevices(4 * GiB, GiB, 0, 0)) == GiB + GiB // 2
    # a device that does not compress at all (cost >= 1) is worth nothing
    assert P.swap_headroom(GiB, SwapDevices(4 * GiB, GiB, GiB, 2 * GiB)) == 0
    assert P.swap_headroom(-5) == 0


def stalls(some_s, full_s):
    return Pressure(some_total_us=int(some_s * 1e6), full_total_us=int(full_s * 1e6))


@pytest.mark.parametrize("avail_gib, share, expected", [
    (1.0, (90.0, 60.0), ("kill", P.REASON_GUARD_PSI_CRITICAL)),  # >= psi_full_kill 50
    (1.0, (40.0, 6.0), ("term", P.REASON_GUARD_PSI)),            # >= psi_full 5
    (1.0, (40.0, 4.0), (None, "")),                              # some alone: off by default
    (5.0, (90.0, 60.0), (None, "")),   # MemAvailable above psi_available (20% = 3.2 GiB)
    (1.0, None, (None, "")),           # not enough history (just started, or just acted)
])
def test_guard_pressure_levels(avail_gib, share, expected):
    assert P.guard_level(GuardConfig(), host(avail_gib), share=share) == expected


def test_guard_pressure_some_and_off():
    g = GuardConfig()._replace(psi_some=30.0)
    assert P.guard_level(g, host(1), share=(40.0, 4.0)) == ("term", P.REASON_GUARD_PSI_SOME)
    off = GuardConfig()._replace(psi_full=0.0, psi_full_kill=0.0)
    assert P.guard_level(off, host(1), share=(99.0, 99.0)) == (None, "")


def test_pressure_share_from_totals():
    assert P.pressure_share([(0.0, 0, 0)]) is None
    assert P.pressure_share([(0.0, 0, 0), (0.5, 400_000, 0)]) is None     # < PSI_MIN_SPAN
    assert P.pressure_share([(0.0, 0, 0), (1.0, 300_000, 0), (2.0, 1_000_000, 500_000)]) == \
        (50.0, 25.0, None, None, None)
    # refaulted bytes beside the totals: their rate over the same span, when both ends have them
    assert P.pressure_share([(0.0, 0, 0, 10 * MiB), (2.0, 1_000_000, 500_000, 18 * MiB)]) == \
        (50.0, 25.0, 4 * MiB, None, None)
    assert P.pressure_share([(0.0, 0, 0, None), (2.0, 1_000_000, 500_000, 18 * MiB)])[2] is None
    # the I/O full total: its share of the same span; swap used: its growth per second
    assert P.pressure_share([(0.0, 0, 0, 0, 5_000_000, 100 * MiB), (2.0, 0, 0, 0, 6_200_000, 106 * MiB)]) == \
        (0.0, 0.0, 0.0, 60.0, 3 * MiB)
    assert P.pressure_share([(0.0, 0, 0, 0, None, 9 * MiB), (2.0, 0, 0, 0, 6_200_000, 1 * MiB)])[3:] == (None, 0.0)


@pytest.mark.parametrize("share, refaults_per_s, expected", [
    # reclaim of cold pages: PSI full well over psi_full, few pages coming back -> not a stall
    ((40.0, 30.0), 600 * 4096, (None, "")),
    ((40.0, 30.0), 0, (None, "")),
    # the same stall with pages coming back (swap-ins, file refaults) -> a thrash
    ((40.0, 30.0), 4 * MiB, ("term", P.REASON_GUARD_PSI)),
    ((40.0, 12.0), 50 * MiB, ("term", P.REASON_GUARD_PSI)),
    ((40.0, 4.0), 50 * MiB, (None, "")),                    # refaults alone are no stall
    # "full" at 65% while cold pages go to swap (measured: the allocating job alone stalls)
    ((90.0, 65.0), 0, (None, "")),
    ((90.0, 60.0), 8 * MiB, ("kill", P.REASON_GUARD_PSI_CRITICAL)),
    # the counter unknown (not read, kernel without it): pressure alone decides
    ((40.0, 30.0), None, ("term", P.REASON_GUARD_PSI)),
])
def test_guard_pressure_counts_only_while_pages_come_back(share, refaults_per_s, expected):
    assert P.guard_level(GuardConfig(), host(1), share=share + (refaults_per_s,)) == expected
    off = GuardConfig()._replace(psi_refaults=0)   # psi_refaults = 0: pressure alone decides
    if expected[0] is None and share[1] >= off.psi_full:
        assert P.guard_level(off, host(1), share=share + (refaults_per_s,)) == (
            ("kill", P.REASON_GUARD_PSI_CRITICAL) if share[1] >= off.psi_full_kill
            else ("term", P.REASON_GUARD_PSI))
    some = GuardConfig()._replace(psi_full=0.0, psi_some=30.0)
    assert P.guard_level(some, host(1), share=(40.0, 0.0, 0)) == (None, "")
    assert P.guard_level(some, host(1), share=(40.0, 0.0, 8 * MiB)) == ("term", P.REASON_GUARD_PSI_SOME)


@pytest.mark.parametrize("why, avail_gib, share, guard, expected", [
    # the slow swap device as measured (swap-outs 1-3 MiB/s): the host froze with PSI memory
    # at 7% some / 2.2% full and 0.6 MiB/s coming back, every task waiting for I/O
    ("slow swap freeze", 1, (7.0, 2.2, 0.6 * MiB, 60.0), {}, ("term", P.REASON_GUARD_PSI_IO)),
    ("at psi_io_full", 1, (7.0, 2.2, 0.6 * MiB, 20.0), {}, ("term", P.REASON_GUARD_PSI_IO)),
    ("under psi_io_full", 1, (7.0, 2.2, 0.6 * MiB, 19.0), {}, (None, "")),
    # reads and writes alone (a backup beside a big job): nothing comes back
    ("I/O but nothing comes back", 1, (0.0, 0.0, 0.0, 90.0), {}, (None, "")),
    ("a trickle coming back", 1, (0.0, 0.0, 200 * 1024, 90.0), {}, (None, "")),
    ("I/O counter unknown", 1, (7.0, 2.2, 0.6 * MiB, None), {}, (None, "")),
    ("refault counter unknown: I/O decides", 1, (7.0, 2.2, None, 60.0), {},
     ("term", P.REASON_GUARD_PSI_IO)),
    # RAM to spare (above psi_available): a busy disk is not the host running out
    ("MemAvailable above psi_available", 10, (7.0, 2.2, 0.6 * MiB, 90.0), {}, (None, "")),
    ("psi_io_full = 0", 1, (7.0, 2.2, 0.6 * MiB, 90.0), {"psi_io_full": 0.0}, (None, "")),
    ("psi_refaults = 0: I/O alone", 1, (0.0, 0.0, 0.0, 60.0), {"psi_refaults": 0},
     ("term", P.REASON_GUARD_PSI_IO)),
    # a memory stall at its own levels comes first (SIGKILL at psi_full_kill)
    ("memory stall too", 1, (90.0, 60.0, 8 * MiB, 90.0), {}, ("kill", P.REASON_GUARD_PSI_CRITICAL)),
    ("memory stall, no I/O", 1, (40.0, 30.0, 8 * MiB, 0.0), {}, ("term", P.REASON_GUARD_PSI)),
])
def test_guard_io_stall_table(why, avail_gib, share, guard, expected):
    g = GuardConfig()._replace(**guard)
    assert P.guard_level(g, host(avail_gib), share=share) == expected, why


def _slow_swap(pol, cands_at, seconds, own_rate_at, io_rate=0.6, fill=0, step=0.05):
    """The slow swap device through the Policy, samples as the reader makes them: PSI
    memory 2% full, 0.6 MiB/s coming back, every task waiting for I/O io_rate of the
    time, swap filling at ``fill`` bytes/s, the host faulting 100 times a second, the
    largest candidate own_rate_at(now) of them; returns the first decision's time and
    reason, or None."""
    refaults = host_faults = 0
    own = 1000.0
    for i in range(int(seconds / step)):
        now = i * step
        refaults += int(0.6 * MiB * step)
        host_faults += int(100 * step)
        own += own_rate_at(now) * step
        sample = host(1)._replace(pressure=stalls(now * 0.07, now * 0.02), refaults=refaults,
                                  major_faults=host_faults, io_full_us=int(now * io_rate * 1e6),
                                  swap_total=1 << 30, swap_free=(1 << 30) - int(now * fill))
        if pol.guard_wants_victim(now, sample):
            got = pol.guard_evaluate(now, sample, cands_at(int(own)))
            if got:
                return now, kinds(got)
    return None


def test_slow_swap_stops_the_hot_leak_and_spares_the_cold_job():
    """Every task waiting for I/O 60% of the time with pages coming back: the hot leak
    (90 of the host's 100 faults/s its own) is SIGTERMed once the window and its
    attribution span have passed; a cold-page job (2 of 100) never is (the others'
    pages come back, not its own); at 10% I/O wait nothing fires."""
    own_cands = lambda own: [cand(60, 150), faulting(cand(61, 700), own)]  # noqa: E731
    got = _slow_swap(P.Policy(default_config()), own_cands, 6.0, lambda now: 90)
    assert got is not None and got[1] == [("signal", signal.SIGTERM, P.REASON_GUARD_PSI_IO)], got
    assert got[0] <= P.PSI_MIN_SPAN + P.OWN_SPAN + 0.2, got
    assert _slow_swap(P.Policy(default_config()), own_cands, 12.0, lambda now: 2) is None
    assert _slow_swap(P.Policy(default_config()), own_cands, 12.0, lambda now: 90, io_rate=0.1) is None


def test_slow_swap_filling_stops_the_largest_whoever_faults():
    """The same I/O stall while swap fills at 3 MiB/s (a swap device too slow for the
    swap-outs, as measured: the leak's own pages stayed in RAM, the others' came back): the
    largest process is stopped although its own pages are not among those coming back,
    without waiting for its faults; under SWAP_FILLING, or with I/O wait at 10%, the rule
    on whose pages holds and nothing fires."""
    own_cands = lambda own: [cand(60, 150), faulting(cand(61, 700), own)]  # noqa: E731
    got = _slow_swap(P.Policy(default_config()), own_cands, 6.0, lambda now: 0, fill=3 * MiB)
    assert got is not None and got[1] == [("signal", signal.SIGTERM, P.REASON_GUARD_PSI_IO)], got
    assert got[0] <= P.PSI_MIN_SPAN + 0.1, got
    assert _slow_swap(P.Policy(default_config()), own_cands, 12.0, lambda now: 0,
                      fill=P.SWAP_FILLING // 2) is None
    assert _slow_swap(P.Policy(default_config()), own_cands, 12.0, lambda now: 0, io_rate=0.1,
                      fill=3 * MiB) is None


@pytest.mark.parametrize("reason, share, expected", [
    (P.REASON_GUARD_PSI_IO, (0, 0, 0, 60.0, 2 * MiB), True),
    (P.REASON_GUARD_PSI_IO, (0, 0, 0, 60.0, 0.5 * MiB), False),
    (P.REASON_GUARD_PSI_IO, (0, 0, 0, 60.0, None), False),     # swap not known
    (P.REASON_GUARD_PSI_IO, (0, 0, 0, 60.0), False),
    (P.REASON_GUARD_PSI, (40.0, 30.0, 5 * MiB, 0, 9 * MiB), False),   # memory stalls keep the rule
])
def test_fills_swap(reason, share, expected):
    assert P.fills_swap(reason, share) is expected


def test_cold_reclaim_then_thrash_episode():
    """Through the Policy, from HostSamples as the reader makes them: 10 s of PSI full
    at 30% while a job's cold pages go to swap (refaults 1 MiB/s) fire nothing; when the
    evicted pages start coming back (20 MiB/s) the same stall is a thrash within the
    window; a sample without the counter keeps pressure deciding alone."""
    pol = P.Policy(default_config())
    cands = [cand(60, 500), cand(61, 900)]
    fired_at = None
    refaults = 0
    for step in range(0, 160):
        now = step * 0.1
        rate = MiB if now < 10.0 else 20 * MiB
        refaults += int(rate * 0.1)
        sample = host(1)._replace(pressure=stalls(now * 0.4, now * 0.3), refaults=refaults)
        if pol.guard_wants_victim(now, sample):
            got = pol.guard_evaluate(now, sample, cands)
            assert kinds(got) == [("signal", signal.SIGTERM, P.REASON_GUARD_PSI)]
            fired_at = now
            break
    assert fired_at is not None and 10.0 < fired_at <= 10.0 + GuardConfig().psi_window + 0.3, fired_at
    pol = P.Policy(default_config())
    for step in range(0, 20):   # no counter in the samples (None): pressure alone, as before
        now = step * 0.1
        sample = host(1)._replace(pressure=stalls(now * 0.4, now * 0.3))
        if pol.guard_wants_victim(now, sample):
            break
    assert now <= 1.1


def faulting(c, major_faults):
    return c._replace(major_faults=major_faults)


@pytest.mark.parametrize("why, refaults_mib, victim_mib, total_mib, own, everyone, span, expected", [
    # a hot leak: most of the RSS, most of the host's major faults (the guest: 86-96%)
    ("hot leak", 5, 700, 900, 90, 100, 0.5, True),
    # a job whose cold pages go to swap: the others' pages come back, not its own
    ("cold job", 5, 700, 900, 2, 100, 0.5, False),
    # one of ten equal workers faulting alike: a tenth of the RSS, a tenth of the faults
    ("ten workers", 5, 100, 1000, 10, 100, 0.5, True),
    ("ten workers, this one idle", 5, 100, 1000, 4, 100, 0.5, False),
    ("nobody faulted", 5, 700, 900, 0, 0, 0.5, False),
    # at ANYONE_THRASH x psi_refaults (a page-cache thrash: the hog faults nothing) whoever's
    ("page-cache thrash", 8, 700, 900, 0, 100, 0.5, True),
    ("not measured long enough", 5, 700, 900, 90, 100, 0.2, None),
])
def test_own_thrash_table(why, refaults_mib, victim_mib, total_mib, own, everyone, span, expected):
    g = GuardConfig()   # psi_refaults 4 MiB/s: 8 MiB/s is a thrash whoever faults
    victim = faulting(cand(61, victim_mib), 1000 + own)
    since = (victim.key, 10.0, 1000, 50000)
    sample = host(0.5)._replace(refaults=1, major_faults=50000 + everyone)
    share = (40.0, 30.0, refaults_mib * MiB)
    assert P.own_thrash(g, share, victim, since, sample, total_mib * MiB, 10.0 + span) is expected, why


def test_own_thrash_unknown_counters_leave_pressure_to_decide():
    """An old kernel (no pgmajfault), a candidate whose stat could not be read, a replayed
    trace (no counters), psi_refaults = 0: the rule cannot attribute, so it does not veto."""
    g = GuardConfig()
    c = faulting(cand(61, 700), 1000)
    since = (c.key, 0.0, 1000, 50000)
    share = (40.0, 30.0, 5 * MiB)
    sample = host(0.5)._replace(major_faults=50100)
    assert P.own_thrash(g, share, c, since, sample, 900 * MiB, 1.0) is False
    assert P.own_thrash(g, share, c, since, sample._replace(major_faults=None), 900 * MiB, 1.0) is True
    assert P.own_thrash(g, share, cand(61, 700), since, sample, 900 * MiB, 1.0) is True   # -1
    assert P.own_thrash(g, (40.0, 30.0, None), c, since, sample, 900 * MiB, 1.0) is True
    assert P.own_thrash(g._replace(psi_refaults=0), share, c, since, sample, 900 * MiB, 1.0) is True
    assert P.own_thrash(g, share, c, None, sample, 900 * MiB, 1.0) is None   # not measured yet
    other = (("process", 99, 5), 0.0, 1000, 50000)
    assert P.own_thrash(g, share, c, other, sample, 900 * MiB, 1.0) is None  # another process's


def _cold_then_hot(pol, cands_at, seconds, own_rate_at, refault_rate=5 * MiB, step=0.05):
    """Drive the Policy with HostSamples as the reader makes them: PSI full 30% with
    refaults at refault_rate (bytes/s, or a function of the time), the host faulting 100
    times a second, the largest candidate own_rate_at(now) of them; returns (first
    decision time or None, scans)."""
    refaults = host_faults = 0
    own = 1000.0
    scans = 0
    rate_at = refault_rate if callable(refault_rate) else (lambda now: refault_rate)
    for i in range(int(seconds / step)):
        now = i * step
        refaults += int(rate_at(now) * step)
        host_faults += int(100 * step)
        own += own_rate_at(now) * step
        sample = host(1)._replace(pressure=stalls(now * 0.4, now * 0.3), refaults=refaults,
                                  major_faults=host_faults)
        if pol.guard_wants_victim(now, sample):
            scans += 1
            got = pol.guard_evaluate(now, sample, cands_at(int(own)))
            if got:
                assert kinds(got) == [("signal", signal.SIGTERM, P.REASON_GUARD_PSI)]
                return now, scans
    return None, scans


def test_cold_job_is_spared_until_its_own_pages_come_back():
    """The benign cold-page job: a thrash by the host's counters (PSI full 30%, 5 MiB/s of
    refaults, the rate a hot leak shows when the guard must act) but the largest process
    faults 2 of the host's 100 times a second: nothing for 10 s, and the /proc scans that
    weigh it come at most once per OWN_SPAN (not every tick). When its own pages start
    coming back (90 of 100) it is stopped within the attribution span."""
    pol = P.Policy(default_config())
    cands_at = lambda own: [cand(60, 150), faulting(cand(61, 700), own)]   # noqa: E731
    fired, scans = _cold_then_hot(pol, cands_at, 16.0, lambda now: 2 if now < 10.0 else 90)
    assert fired is not None and 10.0 < fired <= 10.0 + 2 * P.OWN_SPAN + 0.1, fired
    assert scans <= 10.0 / P.OWN_SPAN + 5, scans


def test_hot_leak_waits_only_the_attribution_span():
    """A hot leak (90 of the host's 100 faults/s its own) is stopped OWN_SPAN after
    pressure would first have stopped it; a page-cache thrash (20 MiB/s of refaults,
    the hog faulting nothing) at once, as without the rule."""
    plain, _ = _cold_then_hot(P.Policy(default_config()), lambda own: [cand(61, 700)], 6.0,
                              lambda now: 0)               # no counters on the candidate: -1
    own_cands = lambda own: [cand(60, 150), faulting(cand(61, 700), own)]  # noqa: E731
    hot, _ = _cold_then_hot(P.Policy(default_config()), own_cands, 6.0, lambda now: 90)
    assert plain is not None and plain < hot <= plain + P.OWN_SPAN + 0.1, (plain, hot)
    cache, _ = _cold_then_hot(P.Policy(default_config()), own_cands, 6.0, lambda now: 0,
                              refault_rate=20 * MiB)
    assert cache == plain
    # pressure first, pages coming back 3 s later (the leak as measured: reclaim, then
    # swap-ins): its faults were kept while pressure rose, so no wait at all
    late = lambda now: 5 * MiB if now >= 3.0 else 0   # noqa: E731
    plain_late, _ = _cold_then_hot(P.Policy(default_config()), lambda own: [cand(61, 700)], 8.0,
                                   lambda now: 0, refault_rate=late)
    hot_late, scans = _cold_then_hot(P.Policy(default_config()), own_cands, 8.0, lambda now: 90,
                                     refault_rate=late)
    assert 3.0 < plain_late and hot_late <= plain_late + 0.1, (plain_late, hot_late)
    assert scans <= hot_late / P.OWN_SPAN + 2, scans   # one scan per OWN_SPAN while it rose


def test_guard_pressure_table():
    """Pressure after a kill: the history restarts at every action, and a second kill
    needs the pressure measured high again after it, with MemAvailable still low (the
    same cause); pressure that lingers (the kernel's avg10 decays over ~10 s, the
    survivors fault their pages back in) once the kill freed memory fires nothing."""
    cfg = default_config()._replace(guard=GuardConfig()._replace(grace=1.0, psi_window=2.0, psi_full=20.0))
    pol = P.Policy(cfg)
    cands = [cand(60, 500), cand(61, 900)]
    some = full = prev = 0.0
    table = [
        # time, MemAvailable GiB, full stall share of the step, decisions
        (0.0, 1.0, 0.0, []),
        (0.5, 1.0, 0.3, []),           # 0.5 s of history: too short to judge
        (1.0, 1.0, 0.3, [("signal", signal.SIGTERM, P.REASON_GUARD_PSI)]),  # 30% over 1 s
        (1.5, 1.0, 0.3, []),           # victim in flight, history restarted
        (2.2, 8.0, 0.6, []),           # 61 died, memory freed; stalls go on (faulting back)
        (6.5, 8.0, 0.6, []),           # cooldown over, stalls high, but RAM is free again
        (7.0, 1.0, 0.0, []),           # memory low again: history starts afresh
        (8.0, 1.0, 0.0, []),
        (9.0, 1.0, 0.3, []),           # 15% over the 2 s window: under psi_full (20 here)
        (9.5, 1.0, 0.3, []),           # 20% over 2.5 s... window trimmed to the last 2 s
        (10.0, 1.0, 0.3, [("signal", signal.SIGTERM, P.REASON_GUARD_PSI)]),  # same cause again
    ]
    for now, avail, share, expected in table:
        some += min(1.0, share * 1.5) * (now - prev)
        full += share * (now - prev)
        prev = now
        sample = host(avail)._replace(pressure=stalls(some, full))
        got = []
        if pol.guard_wants_victim(now, sample):
            got = pol.guard_evaluate(now, sample, cands)
        elif pol.guard.victim is not None:
            got = pol.guard_evaluate(now, sample)
        assert kinds(got) == expected, (now, avail, share, got)
        if now == 2.2:
            pol.forget(("process", 61, 1061))
            cands = [cand(60, 500)]
    assert pol.guard.victim.pid == 60


def test_guard_pressure_kill_level_goes_straight_to_sigkill():
    pol = P.Policy(default_config())
    pol.guard_observe(0.0, host(1)._replace(pressure=stalls(0, 0)))
    hot = host(1)._replace(pressure=stalls(1.0, 0.8))
    assert pol.guard_wants_victim(1.0, hot)
    assert kinds(pol.guard_evaluate(1.0, hot, [cand(60, 500)])) == [
        ("signal", signal.SIGKILL, P.REASON_GUARD_PSI_CRITICAL)]


def test_benign_swap_use_is_not_a_stall():
    """Cold pages going to swap while the job works in RAM: RAM is full, swap is free
    and nothing stalls: the guard does nothing, tick after tick."""
    pol = P.Policy(default_config())
    for i in range(40):
        now = i * 0.25
        sample = swapped(0.05, 4, 4 - i * 0.05, pressure=stalls(i * 0.01, i * 0.001))
        assert not pol.guard_wants_victim(now, sample), now


def test_pressure_needs_no_psi_and_forgets_history_without_it():
    pol = P.Policy(default_config())
    pol.guard_observe(0.0, host(1)._replace(pressure=stalls(0, 0)))
    assert pol.guard_observe(1.0, HostSample(16 * GiB, GiB, 0, 0, None)) is None
    assert not pol.guard.pressure


def test_recheck_of_a_pressure_decision_looks_at_memory_only():
    g = GuardConfig()
    d = P.Decision("signal", KEY, "guard", P.REASON_GUARD_PSI, 1, 1, signal.SIGTERM, True)
    assert P.still_needed(d, None, host(1), g)          # MemAvailable still under 3.2 GiB
    assert not P.still_needed(d, None, host(8), g)      # the memory came back: back off
    low = P.Decision("signal", KEY, "guard", P.REASON_GUARD_LOW, 1, 1, signal.SIGTERM, True)
    assert not P.still_needed(low, None, swapped(0.1, 8, 6), g)   # swap was added meanwhile


def test_guard_interval_looks_closer_while_pressure_builds():
    pol = P.Policy(default_config())
    assert pol.guard_interval(host(8)) == 1.0
    pol.guard_observe(0.0, host(2)._replace(pressure=stalls(0, 0)))
    pol.guard_observe(1.0, host(2)._replace(pressure=stalls(0.05, 0)))
    assert pol.guard_interval(host(2)) == P.PSI_INTERVAL
    assert pol.guard_interval(host(8)) == 1.0           # RAM to spare: pressure is not ours


def test_choose_victim_skips_protected_pid1_self_and_kernel_threads():
    cfg = default_config()
    cands = [cand(1, 900), cand(50, 800, comm="sshd"), cand(51, 700, cgroup="/init.scope"),
             cand(52, 600, cgroup="/system.slice/ssh.service/sub"), cand(60, 500),
             cand(61, 400), cand(62, 0, comm="kthreadd")]
    assert P.choose_victim(cands, cfg).pid == 60
    assert P.choose_victim(cands, cfg, never={60}).pid == 61
    assert P.choose_victim([cand(1, 5), cand(62, 0)], cfg) is None


def test_a_protected_name_protects_only_what_its_owner_cannot_forge():
    """Any user can call a process "sshd": the name counts only for a root process running
    a root-owned executable nobody else may write. Protected cgroups protect anyone."""
    cfg = default_config()
    real = cand(50, 900, comm="sshd")
    by_user = cand(51, 800, comm="sshd", uid=1000, root_exe=True)       # prctl/exec -a sshd
    own_exe = cand(52, 700, comm="sshd", uid=0, root_exe=False)        # root runs a writable file
    unknown = Candidate(("process", 53, 1), 53, "sshd", "/user.slice", 600 * MiB)
    hidden_exe = cand(55, 650, comm="sshd", uid=0, root_exe=None)      # no ptrace access
    hidden_user = cand(56, 640, comm="sshd", uid=1000, root_exe=None)
    in_cgroup = cand(54, 950, comm="x", cgroup="/system.slice/ssh.service", uid=1000,
                     root_exe=False)
    assert P.choose_victim([real, by_user], cfg).pid == 51
    assert P.choose_victim([real, own_exe], cfg).pid == 52
    assert P.choose_victim([real, unknown], cfg).pid == 53     # unchecked: not trusted
    assert P.choose_victim([real, hidden_exe], cfg) is None    # uid 0 decides then
    assert P.choose_victim([real, hidden_exe, hidden_user], cfg).pid == 56
    assert P.choose_victim([real, in_cgroup], cfg) is None


def test_guard_ladder_term_then_kill_after_grace():
    cfg = default_config()._replace(guard=GuardConfig()._replace(grace=1.0))
    pol = P.Policy(cfg)
    assert not pol.guard_wants_victim(0, host(4))
    assert pol.guard_wants_victim(0, host(0.5))
    d = pol.guard_evaluate(0, host(0.5), [cand(60, 500), cand(61, 900)])
    assert kinds(d) == [("signal", signal.SIGTERM, P.REASON_GUARD_LOW)] and d[0].key[1] == 61
    assert not pol.guard_wants_victim(0.1, host(0.5))          # victim in flight
    assert pol.guard_evaluate(0.5, host(0.5)) == []
    assert kinds(pol.guard_evaluate(1.1, host(0.5))) == [("signal", signal.SIGKILL, P.REASON_GRACE)]
    assert pol.guard_evaluate(1.2, host(0.5)) == []
    pol.forget(d[0].key)                                       # it died
    assert not pol.guard_wants_victim(2.0, host(0.5))          # cooldown (5 s from 0)
    assert pol.guard_wants_victim(2.0, host(0.2))              # ...unless critical
    assert pol.guard_wants_victim(5.1, host(0.5))


def test_guard_kills_at_once_when_critical_and_backs_off_when_recovered():
    pol = P.Policy(default_config())
    d = pol.guard_evaluate(0, host(0.2), [cand(60, 500)])
    assert kinds(d) == [("signal", signal.SIGKILL, P.REASON_GUARD_CRITICAL)]
    pol2 = P.Policy(default_config())
    pol2.guard_evaluate(0, host(0.5), [cand(60, 500)])
    assert pol2.guard_evaluate(6, host(4)) == []               # recovered, grace over: let it be
    assert pol2.guard.victim is None


def test_guard_gives_up_on_an_unkillable_victim():
    pol = P.Policy(default_config())
    pol.guard_evaluate(0, host(0.2), [cand(60, 500)])
    pol.guard_evaluate(1, host(0.2))
    assert pol.guard.victim is not None
    pol.guard_evaluate(5 + P.UNKILLABLE_AFTER + 0.1, host(0.2))
    assert pol.guard.victim is None


# ------------------------------------------------------- the quiet fast path


@settings(max_examples=300, deadline=None)
@given(action=st.sampled_from(["warn", "term", "kill", "throttle", "freeze"]),
       sustain=st.sampled_from([0.0, 0.3]),
       warn_mib=st.sampled_from([None, 150]),
       steps=st.lists(st.tuples(st.floats(0.0, 1.5), st.integers(0, 300), st.booleans()),
                      min_size=1, max_size=40))
def test_skipping_quiet_targets_changes_nothing(action, sustain, warn_mib, steps):
    """evaluate() skips readings below every threshold with nothing pending, without
    creating state. Against a policy that evaluates every reading in full, over random
    episodes (usage in MiB, time steps, a back_off now and then), the decisions and the
    next intervals must be identical."""
    config = make_config(action=action, sustain=sustain, warn=None if warn_mib is None else
                         Size(bytes=warn_mib * MiB))
    fast, full = P.Policy(config), P.Policy(config)
    now = 0.0
    for dt, usage, backs_off in steps:
        now += dt
        r = reading(usage, warn_mib=warn_mib)
        got = fast.evaluate(now, [r])
        with mock.patch.object(P, "is_quiet", lambda reading, state: False):
            want = full.evaluate(now, [r])
        assert got == want, (now, usage)
        assert fast.interval_for(r) == full.interval_for(r)
        if backs_off and got:
            fast.back_off(KEY)
            full.back_off(KEY)
