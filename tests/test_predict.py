"""The predictive trigger (issue 15): the estimator, each gate, and its place in the ladder."""
from __future__ import annotations

import math
import os
import signal

import pytest

from memwatchd import predict
from memwatchd.config import ConfigError, parse_config
from memwatchd.policy import (REASON_LIMIT, REASON_PREDICT, REASON_GRACE, Decision, Policy,
                              still_needed)
from memwatchd.predict import ALL_GATES, Fit, Trend, time_left
from memwatchd.types import Reading

MiB = 2**20
LIMIT = 1000 * MiB
DT = 0.05   # 20 samples a second, as the daemon samples a target approaching its limit


def test_fit_of_a_line_is_exact_and_forgets_what_left_the_window():
    fit = Fit(10.0)
    for i in range(400):                      # 20 s at 3 MiB/s ...
        fit.add(i * DT, 100 * MiB + i * DT * 3 * MiB)
    slope, se = fit.slope()
    assert slope == pytest.approx(3 * MiB, rel=1e-9) and se == pytest.approx(0, abs=1.0)
    assert fit.covered() <= 10.0 and len(fit.points) <= 10.0 / DT + 1
    t0, x0 = 400 * DT, 100 * MiB + 400 * DT * 3 * MiB
    for i in range(201):                      # ... then 10 s flat: the old climb is gone
        fit.add(t0 + i * DT, x0)
    assert fit.slope()[0] == pytest.approx(0, abs=1.0)


def test_fit_stays_exact_over_a_long_run_of_large_values():
    """The running sums are re-based on the oldest reading: no cancellation after days."""
    fit = Fit(10.0)
    start = 3 * 86400.0
    for i in range(100000):
        t = start + i * 0.1
        fit.add(t, 50 * 2**30 + int(7 * MiB * (t - start)) + (i % 7) * 4096)
    slope, se = fit.slope()
    pts = list(fit.points)   # the textbook formula over the window, from scratch
    n = len(pts)
    mt, mx = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    b = sum((p[0] - mt) * (p[1] - mx) for p in pts) / sum((p[0] - mt) ** 2 for p in pts)
    assert slope == pytest.approx(b, rel=1e-6)
    assert 0 < se < 0.01 * slope


def test_fit_needs_three_readings_spread_in_time():
    fit = Fit(10.0)
    assert fit.slope() is None
    fit.add(1.0, 5)
    fit.add(1.0, 9)
    fit.add(1.0, 7)
    assert fit.slope() is None   # no spread in time: no slope


@pytest.mark.parametrize("headroom, slope_hi, expected", [
    (100, 10, 10.0), (0, 10, 0.0), (-5, 10, 0.0), (100, 0, math.inf), (100, -3, math.inf)])
def test_time_left(headroom, slope_hi, expected):
    assert time_left(headroom, slope_hi) == expected


def test_the_upper_bound_of_a_noisy_climb_is_steeper_than_its_slope():
    trend = Trend()
    for i in range(100):
        noise = (1 if i % 2 else -1) * 20 * MiB
        trend.update(i * DT, 500 * MiB + int(i * DT * 10 * MiB) + noise, LIMIT, 30.0)
    left, slope, hi = trend.estimate
    assert slope == pytest.approx(10 * MiB, rel=0.5)
    assert hi > slope + 1 * MiB
    assert left == pytest.approx((LIMIT - (500 * MiB + 99 * DT * 10 * MiB + 20 * MiB)) / hi, rel=0.01)


# ------------------------------------------------------------- gates, one by one

def series(rate, start, seconds=12.0, curve=None):
    """(t, bytes) every DT: a straight climb at ``rate`` bytes/s from ``start``, or ``curve(t)``."""
    n = int(seconds / DT)
    return [(i * DT, int(curve(i * DT)) if curve else int(start + rate * i * DT)) for i in range(n)]


def first_fire(points, horizon=30.0, ceiling=None, gates=ALL_GATES, limit=LIMIT):
    trend = Trend()
    for t, x in points:
        if trend.update(t, x, limit, horizon, ceiling, gates):
            return t
    return None


def plateau_curve(top, tau, start=0):
    """Growth that levels off: start + (top - start) (1 - e^(-t / tau))."""
    return lambda t: start + (top - start) * (1 - math.exp(-t / tau))


def sawtooth(low, high, period):
    return lambda t: low + (high - low) * ((t % period) / (period * 0.8) if t % period < period * 0.8
                                           else 0)


LEAK = series(40 * MiB, 520 * MiB)                 # above the floor, 12 s from the limit
CASES = [
    # name,        points,                                 kwargs,                 fires, fires without gate
    ("leak",       LEAK,                                    {},                     True,  None),
    ("horizon",    series(2 * MiB, 600 * MiB),              {},                     False, "horizon"),
    ("floor",      series(40 * MiB, 50 * MiB, seconds=8),   {},                     False, "floor"),
    ("plateau",    series(0, 0, curve=plateau_curve(800 * MiB, 1.5, 400 * MiB)), {}, False, "plateau"),
    ("history",    series(80 * MiB, 520 * MiB, seconds=4.5), {},                   False, "history"),
    ("ceiling",    LEAK,                                    {"ceiling": 900 * MiB}, False, "ceiling"),
    ("no-ceiling", LEAK,                                    {"ceiling": 2 * LIMIT}, True,  None),
    ("shrinking",  series(-20 * MiB, 900 * MiB),            {},                     False, None),
]


@pytest.mark.parametrize("name, points, kwargs, fires, gate", CASES, ids=[c[0] for c in CASES])
def test_each_gate_vetoes_its_case_and_only_its_own_removal_lets_it_through(name, points, kwargs,
                                                                            fires, gate):
    assert (first_fire(points, **kwargs) is not None) == fires
    if gate is not None:
        assert first_fire(points, gates=ALL_GATES - {gate}, **kwargs) is not None
        for other in ALL_GATES - {gate, "persist"}:   # no other gate is what stopped it
            assert first_fire(points, gates=ALL_GATES - {other}, **kwargs) is None


def test_history_vetoes_a_sawtooths_first_climb_and_falls_its_later_ones():
    saw = series(0, 0, curve=sawtooth(350 * MiB, 750 * MiB, 2.0), seconds=11.5)
    assert first_fire(saw) is None
    without_falls = first_fire(saw, gates=ALL_GATES - {"falls"})
    assert without_falls is not None and without_falls >= predict.HISTORY
    without_history = first_fire(saw, gates=ALL_GATES - {"history"})
    assert without_history is not None and without_history < 2.0   # the first climb only
    # a fall is a share of the peak: GC-sized dips (10 %) do not veto a leak
    dips = [(t, x - (x // 10 if int(t * 4) % 4 == 0 else 0)) for t, x in LEAK]
    assert first_fire(dips) is not None


def test_persist_waits_for_consecutive_samples_and_a_minimum_span():
    with_persist = first_fire(LEAK)
    without = first_fire(LEAK, gates=ALL_GATES - {"persist"})
    assert without == pytest.approx(predict.HISTORY, abs=DT + 1e-9)   # no fit counts before
    assert with_persist == pytest.approx(without + (predict.PERSIST - 1) * DT, abs=1e-9)
    # an interruption (a sample out of the floor) starts the count again
    broken = list(LEAK)
    i = int(with_persist / DT) - 1
    broken[i] = (broken[i][0], 100 * MiB)
    later = first_fire(broken, gates=ALL_GATES - {"plateau", "falls"})
    assert later is not None and later > with_persist


def test_a_fired_trend_fires_once_and_rearms_only_when_the_danger_has_passed():
    trend = Trend()
    fired = [t for t, x in LEAK if trend.update(t, x, LIMIT, 30.0)]
    assert len(fired) == 1
    # it levels off far below the floor: re-armed, and a new climb fires again
    t = LEAK[-1][0]
    for i in range(1, 300):
        trend.update(t + i * DT, 300 * MiB, LIMIT, 30.0)
    assert not trend.fired
    again = [u for u, x in series(40 * MiB, 520 * MiB) if trend.update(t + 20 + u, x, LIMIT, 30.0)]
    assert len(again) == 1


def test_trend_arms_the_recorder_below_the_floor():
    trend = Trend()
    trend.update(0.0, int(LIMIT * predict.ARM) - 1, LIMIT, 30.0)
    assert not trend.armed
    trend.update(0.1, int(LIMIT * predict.ARM) + 1, LIMIT, 30.0)
    assert trend.armed and predict.ARM < predict.SOFT_FLOOR


# ------------------------------------------------------------- in the policy

def config(action="term", predict_="30s", **watch):
    w = {"name": "job", "pid": 4242, "limit": "1000M", "action": action, **watch}
    if action in ("throttle", "freeze"):
        w = {"name": "job", "cgroup": "/job", "limit": "1000M", "action": action, **watch}
    if predict_ is not None:
        w["predict"] = predict_
    return parse_config({"daemon": {"cooldown": "5s"}, "watch": [w]}, "test")


KEY = ("process", 4242, 1)


def run(policy, points, limit=LIMIT, stop=False):
    out = []
    for t, x in points:
        for d in policy.evaluate(t, [Reading(KEY, "job", x, limit, None)]):
            out.append((t, d))
        if stop and out:
            break
    return out


@pytest.mark.parametrize("action, kind, sig", [
    ("term", "signal", signal.SIGTERM), ("throttle", "throttle", None),
    ("warn", "warn", None), ("kill", "warn", None), ("freeze", "warn", None)])
def test_prediction_takes_only_the_gentle_rung_of_each_action(action, kind, sig):
    policy = Policy(config(action))
    decisions = run(policy, LEAK, stop=True)
    assert len(decisions) == 1
    t, d = decisions[0]
    assert (d.kind, d.reason, d.signal) == (kind, REASON_PREDICT, sig)
    assert d.usage < d.limit == LIMIT
    assert policy.estimate(KEY)["seconds_left"] < 30


def test_after_a_predicted_sigterm_the_grace_ends_in_sigkill_only_past_the_limit():
    policy = Policy(config("term", grace="2s"))
    (t, d), = run(policy, LEAK, stop=True)
    # it stopped growing below the limit: the grace ends with a back-off, no SIGKILL
    assert run(policy, [(t + 2.5, 800 * MiB)]) == []
    assert policy.states[KEY].stage == "idle"
    policy = Policy(config("term", grace="2s"))
    (t, d), = run(policy, LEAK, stop=True)
    (_, k), = run(policy, [(t + 2.5, LIMIT + MiB)])
    assert (k.signal, k.reason) == (signal.SIGKILL, REASON_GRACE)


def test_a_fast_hog_meets_the_hard_limit_at_the_same_tick_with_or_without_predict():
    hog = [(i * 0.01, int(i * 0.01 * 4 * 2**30)) for i in range(40)]   # 4 GiB/s
    on, off = run(Policy(config("term")), hog), run(Policy(config("term", None)), hog)
    assert [(t, d.reason, d.signal) for t, d in on] == [(t, d.reason, d.signal) for t, d in off]
    assert on[0][1].reason == REASON_LIMIT


def test_a_watch_without_predict_keeps_no_trend_and_records_no_estimate():
    policy = Policy(config("term", None))
    run(policy, LEAK)
    assert policy.trends == {} and policy.estimate(KEY) is None
    assert policy.quiet(Reading(KEY, "job", MiB, LIMIT, None))
    assert not Policy(config("term")).quiet(Reading(KEY, "job", MiB, LIMIT, None))


def test_no_prediction_in_cooldown_or_while_an_action_runs():
    policy = Policy(config("term"))
    (t, _), = run(policy, LEAK, stop=True)
    policy.states[KEY].stage = "idle"
    policy.trends[KEY].fired = False   # would fire again at once: the cooldown holds it
    i = int(round(t / DT))
    assert run(policy, LEAK[i + 1:i + 5]) == []


def test_forget_drops_the_trend():
    policy = Policy(config("term"))
    run(policy, LEAK[:10])
    policy.forget(KEY)
    assert KEY not in policy.trends


def test_a_cgroup_is_predicted_on_anon_plus_shmem_and_its_ceiling_vetoes():
    key = ("cgroup", "/job")

    def predicted(readings):
        policy = Policy(config("throttle"))
        return [d for (t, _), r in zip(LEAK, readings) for d in policy.evaluate(t, [r])
                if d.reason == REASON_PREDICT]

    growth = [600 * MiB + int(t * 30 * MiB) for t, _ in LEAK]   # memory.current climbing
    assert len(predicted([Reading(key, "job", x, LIMIT, None, x, None) for x in growth])) == 1
    # the same climb in page cache, anon + shmem flat: nothing predicted
    assert predicted([Reading(key, "job", x, LIMIT, None, 200 * MiB, None) for x in growth]) == []
    # anon climbing, but memory.max (900M) below the limit: the job cannot reach it
    assert predicted([Reading(key, "job", x, LIMIT, None, x, 900 * MiB) for x in growth]) == []
    assert len(predicted([Reading(key, "job", x, LIMIT, None, x, LIMIT) for x in growth])) == 1


def test_still_needed_for_a_prediction_backs_off_only_if_it_shrank():
    d = Decision("signal", KEY, "job", REASON_PREDICT, 600 * MiB, LIMIT, signal.SIGTERM)
    cfg = config().guard
    assert still_needed(d, 610 * MiB, None, cfg)
    assert still_needed(d, 560 * MiB, None, cfg)
    assert not still_needed(d, 500 * MiB, None, cfg)


@pytest.mark.parametrize("value, problem", [
    ("10ms", "under 1s"), (30, "bare number"), ("soon", "duration"), ("-5s", "negative"),
    (True, "duration")])
def test_predict_is_validated_like_every_key(value, problem):
    with pytest.raises(ConfigError) as e:
        config("term", value)
    assert "watch[0].predict" in str(e.value) or "predict" in str(e.value)
    assert problem in str(e.value)


def test_predict_is_off_by_default_and_parsed_as_a_horizon():
    assert config("term", None).watches[0].predict == 0.0
    assert config("term", "0").watches[0].predict == 0.0
    assert config("term", "1m").watches[0].predict == 60.0


# ------------------------------------------------- replay over the recorded corpus

CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "predict")


def corpus_case(name):
    from memwatchd.replay import recorded_config, replay
    from memwatchd.trace import read_trace
    trace = read_trace(os.path.join(CORPUS_DIR, f"{name}.trace.gz"))
    assert trace.damage == []
    cfg = recorded_config(trace)

    def run_with(horizon):
        c = cfg._replace(watches=tuple(w._replace(predict=horizon) for w in cfg.watches))
        return replay(trace, c).decisions
    return trace, run_with(30.0), run_with(0.0)


@pytest.mark.parametrize("name", ["leak-10", "leak-30", "leak-100", "leak-300", "leak-1000"])
def test_replayed_leaks_are_caught_before_the_threshold_would_fire(name):
    trace, on, off = corpus_case(name)
    hard = next(d.t for d in off if d.reason == REASON_LIMIT)
    predicted = [d for d in on if d.reason == REASON_PREDICT]
    assert predicted and predicted[0].t < hard
    assert predicted[0].usage < predicted[0].limit
    assert predicted[0].kind == "signal" and predicted[0].signal == "SIGTERM"


@pytest.mark.parametrize("name", ["plateau-50", "plateau-70", "plateau-90", "sawtooth-60",
                                  "sawtooth-85", "build", "pagecache", "ramp-60"])
def test_replayed_benign_jobs_get_no_predicted_action(name):
    trace, on, off = corpus_case(name)
    assert [d for d in off if d.reason == REASON_LIMIT] == []   # never reaches its limit
    assert [d for d in on if d.reason == REASON_PREDICT] == []


def test_the_corpus_recorded_its_live_predictions_and_replay_reproduces_them():
    """Recorded with --predict: the live dry-run decisions are in the trace; replaying the
    recorded config gives the same ones (same reason, within one sample)."""
    from memwatchd.replay import replay
    from memwatchd.trace import read_trace
    trace = read_trace(os.path.join(CORPUS_DIR, "leak-30.trace.gz"))
    result = replay(trace)
    live = [d for d in result.live if d.reason == REASON_PREDICT]
    assert live and all(d.match is not None for d in live)


# ------------------------------------------------------------- the host guard

from memwatchd.types import Candidate, HostSample  # noqa: E402

GiB = 2**30
TOTAL = 16 * GiB   # min_available 5 % = 0.8 GiB; the soft floor: headroom under 2.4 GiB


def guard_config(predict_="30s"):
    g = {"min_available": "5%", "kill_available": "2%", "grace": "2s"}
    if predict_ is not None:
        g["predict"] = predict_
    return parse_config({"daemon": {"cooldown": "5s"}, "guard": g}, "test")


CANDIDATES = [Candidate(("process", 77, 1), 77, "leaker", "/", 3 * GiB),
              Candidate(("process", 78, 1), 78, "small", "/", GiB)]


def guard_run(policy, avail):
    """(t, decision) of the guard over MemAvailable readings avail(t), every DT for 12 s."""
    out = []
    for i in range(int(12 / DT)):
        t = i * DT
        host = HostSample(TOTAL, int(avail(t)), 0, 0, None)
        cands = CANDIDATES if policy.guard_wants_victim(t, host) else ()
        out += [(t, d) for d in policy.guard_evaluate(t, host, cands, ())]
    return out


def test_the_host_trend_sigterms_the_largest_process_before_min_available():
    falling = lambda t: 3 * GiB - t * 150 * 2**20   # 150 MiB/s: min_available at ~14.7 s
    (t, d), = guard_run(Policy(guard_config()), falling)
    assert (d.reason, d.signal, d.key, d.by_guard) == (REASON_PREDICT, signal.SIGTERM, ("process", 77, 1), True)
    assert falling(t) > 0.8 * GiB and falling(t) < 2.4 * GiB   # above the threshold, below the floor
    assert guard_run(Policy(guard_config(None)), falling) == []  # off: nothing before min_available
    policy = Policy(guard_config())
    guard_run(policy, falling)
    assert 0 < policy.estimate_host()["seconds_left"] < 30


@pytest.mark.parametrize("avail", [
    lambda t: 2 * GiB,                                   # low but steady
    lambda t: 6 * GiB - t * 150 * 2**20,                 # falling, still above the soft floor
    lambda t: 1.2 * GiB + GiB * math.exp(-t / 1.5),      # falling, levelling off above the floor
], ids=["steady", "above-floor", "levelling-off"])
def test_the_host_trend_leaves_a_host_that_is_not_running_out(avail):
    assert guard_run(Policy(guard_config()), avail) == []


def test_a_predicted_guard_sigterm_is_never_followed_by_a_predicted_sigkill():
    """After the grace, only the real thresholds may SIGKILL; a prediction never does."""
    policy = Policy(guard_config())
    falling = lambda t: 3 * GiB - t * 150 * 2**20 if t < 8 else 1.5 * GiB   # it stopped at 1.5 GiB
    decisions = guard_run(policy, falling)
    assert [(d.reason, d.signal) for _, d in decisions] == [(REASON_PREDICT, signal.SIGTERM)]
    assert policy.guard.victim is None    # released after the grace: the host never fell further


def test_still_needed_for_a_predicted_guard_action():
    d = Decision("signal", ("process", 77, 1), "guard", REASON_PREDICT, 3 * GiB, 0.8 * GiB,
                 signal.SIGTERM, True)
    g = guard_config().guard
    assert still_needed(d, None, HostSample(TOTAL, 2 * GiB, 0, 0, None), g)
    assert not still_needed(d, None, HostSample(TOTAL, 5 * GiB, 0, 0, None), g)


def test_guard_predict_is_validated_and_off_by_default():
    assert guard_config(None).guard.predict == 0.0
    assert guard_config("45s").guard.predict == 45.0
    with pytest.raises(ConfigError, match="guard.predict"):
        guard_config("500ms")


def test_guard_predict_does_nothing_with_the_guard_off():
    cfg = guard_config()
    cfg = cfg._replace(guard=cfg.guard._replace(enabled=False))
    assert guard_run(Policy(cfg), lambda t: 3 * GiB - t * 150 * 2**20) == []


# ------------------------------------------------------------- status and metrics

def test_status_and_metrics_carry_the_estimate():
    from types import SimpleNamespace
    from prometheus_client.parser import text_string_to_metric_families
    from memwatchd import metrics, state
    policy = Policy(config("term"))
    run(policy, LEAK[:120])
    est = policy.estimate(KEY)
    assert set(est) == {"seconds_left", "slope_bytes_per_s", "slope_upper_bytes_per_s"}
    watch = policy.config.watches[0]
    target = SimpleNamespace(key=KEY, watch=watch, is_cgroup=False, pid=4242, comm="job", cgroup="/",
                             usage=700 * MiB, limit=LIMIT, warn=None, sampled_at=1.0, interval=0.05)
    view = state.build_view([target], None, 2.0, policy.config, estimate=policy.estimate)
    assert view["targets"][0]["predict"] == est
    assert view["guard"]["predict"] is None
    assert state.build_view([target], None, 2.0, policy.config)["targets"][0]["predict"] is None
    view.update(written_at=0.0, daemon={})
    text = metrics.render(metrics._Snapshot(view, {}, metrics.Histogram(metrics.TICK_BUCKETS),
                                            metrics.Histogram(metrics.EXIT_BUCKETS))).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    left, = fams["memwatchd_target_exhaustion_seconds"].samples
    assert left.value == pytest.approx(est["seconds_left"]) and left.labels == {"target": "job", "id": "4242"}
    growth = {s.labels["bound"]: s.value for s in fams["memwatchd_target_growth_bytes_per_second"].samples}
    assert growth == {"estimate": est["slope_bytes_per_s"], "upper": est["slope_upper_bytes_per_s"]}


def test_a_reload_that_turns_predict_off_drops_the_trends():
    policy = Policy(config("term"))
    run(policy, LEAK[:20])
    assert policy.estimate(KEY) is not None
    policy.reconfigure(config("term"))            # same horizon: the trend goes on
    assert policy.estimate(KEY) is not None
    policy.reconfigure(config("term", None))
    assert policy.trends == {} and policy.estimate(KEY) is None
    assert [d.reason for _, d in run(policy, LEAK)] == []   # below the limit: nothing, no trend
    assert policy.trends == {}


# ------------------------------------------------- the host guard counts swap (issue 19's headroom)

from memwatchd.policy import REASON_GUARD_LOW, headroom  # noqa: E402
from memwatchd.types import NO_ZRAM, SwapDevices  # noqa: E402

RATE = 150 * 2**20   # the host fills at 150 MiB/s: RAM first, then swap


def swap_guard_config(count_swap=True, predict_="30s"):
    g = {"min_available": "5%", "kill_available": "2%", "grace": "2s", "count_swap": count_swap}
    if predict_ is not None:
        g["predict"] = predict_
    return parse_config({"daemon": {"cooldown": "5s"}, "guard": g}, "test")


def filling(avail0, swap, rate=RATE, ram_floor=300 * 2**20):
    """HostSample at t of a host whose demand grows at ``rate``: MemAvailable falls to
    ``ram_floor`` (the kernel keeps that much), then the rest goes to swap."""
    def host(t):
        demand = t * rate
        avail = max(ram_floor, avail0 - demand)
        overflow = max(0, demand - (avail0 - ram_floor))
        return HostSample(TOTAL, int(avail), swap, int(max(0, swap - overflow)), None)
    return host


def host_run(policy, host_at, seconds=40.0, zram=NO_ZRAM):
    """(t, decision, the sample) of the guard over host_at(t), every DT."""
    policy.zram = zram
    out = []
    for i in range(int(seconds / DT)):
        t = i * DT
        host = host_at(t)
        cands = CANDIDATES if policy.guard_wants_victim(t, host) else ()
        out += [(t, d, host) for d in policy.guard_evaluate(t, host, cands, ())]
    return out


ZRAM_3_TO_1 = SwapDevices(4 * GiB, 4 * GiB, 1 * GiB, GiB // 3)   # 4 GiB of zram, 3:1 so far


@pytest.mark.parametrize("swap,count_swap,zram,first_at", [
    # no swap: MemAvailable alone; the trend fires as RAM runs out (~2.4 GiB -> 0.8 GiB)
    (0, True, NO_ZRAM, (2.0, 14.0)),
    # 6 GiB of disk swap, free: RAM running out is not the end, swap counts in full; the
    # trend fires only once RAM *and* swap near the guard's floor (~ 56-60 s of demand)
    (6 * GiB, True, NO_ZRAM, (40.0, 60.0)),
    # the same swap with count_swap = false: the guard ignores swap, so does the trend
    (6 * GiB, False, NO_ZRAM, (2.0, 14.0)),
    # 4 GiB of zram at 3:1: a page swapped costs a third of a page, so 4 GiB free is worth
    # 2.67 GiB: the trend fires sooner than with disk swap of that size, later than without
    (4 * GiB, True, ZRAM_3_TO_1, (22.0, 40.0)),
], ids=["no-swap", "disk-swap", "count_swap-off", "zram-3to1"])
def test_the_host_trend_counts_swap_as_the_guard_does(swap, count_swap, zram, first_at):
    """A predicted SIGTERM comes before the guard's own min_available trigger, with the
    headroom as the guard measures it (MemAvailable + free swap at its worth) between
    the guard's floor and the soft floor; without predict the first action is the
    guard's threshold (later)."""
    host_at = filling(3 * GiB, swap)
    on = host_run(Policy(swap_guard_config(count_swap)), host_at, 70.0, zram)
    off = host_run(Policy(swap_guard_config(count_swap, None)), host_at, 70.0, zram)
    assert on and off, (on, off)
    (t, d, host), (t_off, d_off, _) = on[0], off[0]
    g = swap_guard_config(count_swap).guard
    term_below = g.thresholds(TOTAL)[0]
    room = headroom(g, host, zram)
    assert (d.reason, d.signal, d.key) == (REASON_PREDICT, signal.SIGTERM, ("process", 77, 1))
    assert first_at[0] <= t <= first_at[1], (t, room / GiB)
    assert term_below < room < predict.HOST_FLOOR * term_below
    assert (d_off.reason, d_off.signal) == (REASON_GUARD_LOW, signal.SIGTERM) and t_off > t


def test_a_swapon_is_a_new_capacity_not_a_growth():
    """Readings are counted from RAM + swap: a swapon (here of zram, worth half of its
    size while empty) moves what is "used" at once; the trend starts afresh instead of
    seeing a climb, so a steady host low on memory gets no predicted action."""
    def host_at(t):
        if t < 10:
            return HostSample(TOTAL, int(1.2 * GiB), 0, 0, None)
        return HostSample(TOTAL, int(1.2 * GiB), 2 * GiB, 2 * GiB, None)   # swapon at 10 s
    empty_zram = SwapDevices(2 * GiB, 2 * GiB, 0, 0)
    policy = Policy(swap_guard_config())
    assert host_run(policy, host_at, 20.0, empty_zram) == []
    assert policy.estimate_host()["slope_bytes_per_s"] == 0   # the fresh trend sees a flat host


def swap_out_burst(rate, seconds, known=True, job_rate=0, start=4.0):
    """A host low on RAM with swap nearly full whose cold pages are pushed out at ``rate``
    for ``seconds`` from ``start``: each page takes a swap slot at once (SwapFree falls)
    and keeps its RAM (in SwapCached, not in MemAvailable) until written and dropped,
    which here happens when the burst ends. A job grows at ``job_rate`` meanwhile, in RAM.
    known=False: a kernel (or an old trace) without SwapCached."""
    swap, avail0, free0 = 4 * GiB, GiB, GiB   # headroom 2 GiB: under the soft floor

    def host(t):
        pushed = rate * min(max(0.0, t - start), seconds)
        in_flight = pushed if t < start + seconds else 0
        avail = avail0 - job_rate * t + (pushed - in_flight)
        return HostSample(TOTAL, int(avail), swap, int(free0 - pushed), None, None, None, None,
                          int(in_flight) if known else None)
    return host


@pytest.mark.parametrize("rate,seconds", [(100 * MiB, 5.0), (70 * MiB, 8.0), (300 * MiB, 2.0)])
def test_a_swap_out_burst_is_not_a_leak_to_the_host_trend(rate, seconds):
    """Pages being written to swap hold a slot and their RAM at once: the headroom the
    guard counts falls as fast as they are pushed out, though nothing allocates. The
    host trend counts SwapCached once (policy.held_twice), so a cold job being swapped
    out gets no predicted SIGTERM; on a kernel without SwapCached it would (the class of
    false positive benign_cold_predict met in the VM)."""
    assert host_run(Policy(swap_guard_config()), swap_out_burst(rate, seconds), 20.0) == []
    blind = host_run(Policy(swap_guard_config()), swap_out_burst(rate, seconds, known=False), 20.0)
    assert [d.reason for _, d, _ in blind] == [REASON_PREDICT]
    # count_swap = false: swap is not counted, so neither is the slot
    assert host_run(Policy(swap_guard_config(False)), swap_out_burst(rate, seconds), 20.0) == []


def test_a_leak_during_a_swap_out_burst_is_still_predicted():
    """held_twice takes out only what is counted twice: a job allocating at 150 MiB/s
    while the kernel pushes pages out is predicted before min_available all the same."""
    on = host_run(Policy(swap_guard_config()), swap_out_burst(100 * MiB, 20.0, job_rate=150 * MiB), 10.0)
    off = host_run(Policy(swap_guard_config(predict_=None)), swap_out_burst(100 * MiB, 20.0, job_rate=150 * MiB), 10.0)
    assert on and on[0][1].reason == REASON_PREDICT
    assert off and off[0][1].reason == REASON_GUARD_LOW and on[0][0] < off[0][0]


@pytest.mark.parametrize("cached,swap_total,swap_free,count_swap,expected", [
    (300 * MiB, 4 * GiB, GiB, True, 300 * MiB),
    (300 * MiB, 4 * GiB, GiB, False, 0),            # swap not counted: nothing twice
    (None, 4 * GiB, GiB, True, 0),                  # not known
    (5 * GiB, 4 * GiB, GiB, True, 3 * GiB),         # never more than the swap used
    (300 * MiB, 0, 0, True, 0),                     # no swap
])
def test_held_twice(cached, swap_total, swap_free, count_swap, expected):
    from memwatchd.policy import held_twice
    host = HostSample(TOTAL, GiB, swap_total, swap_free, None, None, None, None, cached)
    assert held_twice(swap_guard_config(count_swap).guard, host) == expected


def test_still_needed_for_a_predicted_guard_action_counts_swap():
    """The re-check before a predicted guard SIGTERM: backed off when the headroom the
    guard counts (swap included) is back above the soft floor, not MemAvailable alone."""
    d = Decision("signal", ("process", 77, 1), "guard", REASON_PREDICT, 3 * GiB, 0.8 * GiB,
                 signal.SIGTERM, True)
    g = swap_guard_config().guard
    low_ram_swap_free = HostSample(TOTAL, GiB, 4 * GiB, 4 * GiB, None)    # 5 GiB of headroom
    low_ram_swap_full = HostSample(TOTAL, GiB, 4 * GiB, 100 * 2**20, None)
    assert not still_needed(d, None, low_ram_swap_free, g)
    assert still_needed(d, None, low_ram_swap_full, g)
    assert still_needed(d, None, low_ram_swap_free, swap_guard_config(False).guard)
    zram_full_worth = SwapDevices(4 * GiB, 4 * GiB, 3 * GiB, int(2.9 * GiB))   # barely compresses
    assert still_needed(d, None, low_ram_swap_free, g, zram_full_worth)


def _swap_trace(tmp_path) -> str:
    """A hand-written trace (the guard cannot be made to fire on this shared host, which
    has no swap): 8 GiB of RAM and 4 GiB of disk swap; a watched job grows at 150 MiB/s,
    MemAvailable falls to 300 MiB, then swap fills. Live was a dry run with [guard]
    predict; sampled every 0.1 s as the daemon samples a host near its floor."""
    import json
    total, swap, rate = 8 * GiB, 4 * GiB, 150 * MiB
    cfg = {"daemon": {"interval": "1s", "dry_run": True},
           "guard": {"enabled": True, "predict": "30s", "count_swap": True},
           "watch": [{"name": "jobs", "cmdline": "job", "limit": "12G", "scope": "process"}]}
    lines = [{"t": "header", "format": 1, "memwatchd": "0.1.0", "kernel": "6.1", "boot_id": "b",
              "mem_total": total, "swap_total": swap, "m": 10.0, "w": 1.7e9, "continues": False,
              "source": "hand", "config": cfg},
             {"t": "target", "m": 10.0, "id": 1, "key": ["process", 101, 7], "watch": "jobs",
              "kind": "process", "comm": "job", "cmdline": "job", "cgroup": "/"}]
    for i in range(500):
        demand = i * 0.1 * rate
        avail = max(300 * MiB, 3 * GiB - demand)
        swap_free = max(0, swap - max(0, demand - (3 * GiB - 300 * MiB)))
        lines.append({"t": "s", "m": round(10.0 + i * 0.1, 3),
                      "r": [[1, GiB + int(demand), 12 * GiB, None]],
                      "h": [int(avail), int(swap_free), 0.0, 0.0]})
    path = tmp_path / "swap.trace"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_a_replayed_host_filling_its_swap_is_predicted_on_the_guards_headroom(tmp_path):
    """Replay feeds the host trend what the guard counts: with count_swap (the default)
    the predicted SIGTERM waits until RAM *and* swap near the guard's floor; with
    count_swap = false it comes as soon as RAM does (and the guard's own threshold would
    have been later in both)."""
    from memwatchd.replay import recorded_config, replay
    from memwatchd.trace import read_trace
    trace = read_trace(_swap_trace(tmp_path))
    cfg = recorded_config(trace)
    firsts = {}
    for count_swap in (True, False):
        for predict_ in (30.0, 0.0):
            c = cfg._replace(guard=cfg.guard._replace(count_swap=count_swap, predict=predict_))
            guard = [d for d in replay(trace, c).decisions if d.watch == "guard"]
            assert guard, (count_swap, predict_)
            firsts[count_swap, predict_] = (guard[0].t - trace.start, guard[0].reason)
    term_below = 0.05 * 8 * GiB

    def room(t, count_swap):   # the headroom at t, as the guard counts it
        demand = t * 150 * MiB
        avail = max(300 * MiB, 3 * GiB - demand)
        return avail + (max(0, 4 * GiB - max(0, demand - (3 * GiB - 300 * MiB))) if count_swap else 0)
    for count_swap in (True, False):
        t, reason = firsts[count_swap, 30.0]
        t_off, reason_off = firsts[count_swap, 0.0]
        assert reason == REASON_PREDICT and reason_off == REASON_GUARD_LOW and t < t_off, firsts
        assert term_below < room(t, count_swap) < predict.HOST_FLOOR * term_below, (firsts, count_swap)
    assert firsts[True, 30.0][0] > firsts[False, 30.0][0] + 20   # swap bought ~27 s: counted


def test_the_host_trend_never_makes_the_guard_sample_slower():
    """Near its floor the guard samples GUARD_FASTER times as often as min_interval; a
    finite host estimate may only shorten the wait (it resolved the fall at min_interval,
    undoing the faster sampling)."""
    host_at = filling(3 * GiB, 0)
    on, off = Policy(swap_guard_config()), Policy(swap_guard_config(predict_=None))
    waits = []
    for i in range(int(30 / DT)):
        t = i * DT
        host = host_at(t)
        for p in (on, off):
            p.guard_wants_victim(t, host)
        waits.append((on.guard_interval(host), off.guard_interval(host)))
    assert all(w_on <= w_off for w_on, w_off in waits), [w for w in waits if w[0] > w[1]][:3]
    assert any(w_on < w_off for w_on, w_off in waits)         # the estimate did shorten some
    assert min(w_off for _, w_off in waits) < on.config.daemon.min_interval   # near the floor
