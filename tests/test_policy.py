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
from memwatchd.types import Candidate, HostSample, Pressure, Reading

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
    psi = g._replace(psi_full_avg10=20.0)
    assert P.guard_level(psi, host(4, full_avg10=25)) == ("term", P.REASON_GUARD_PSI)
    assert P.guard_level(psi, host(4, full_avg10=5)) == (None, "")
    assert P.guard_level(g._replace(enabled=False), host(0.1)) == (None, "")


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
