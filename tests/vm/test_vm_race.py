"""Issue 19, memwatchd's column of the race (the proof CI runs): one boot, memwatchd as
installed (guard only), every scenario of scenario/race.py.

The stall scenarios (fast hog without swap, a leak with a hot working set on a
swapfile and on zram, page-cache thrash without swap) must end with the hog
stopped, nothing else killed, the bystander alive; the benign controls (85% of
MemAvailable held steady, cold pages going to swap) with nobody killed. Bounds
on the heartbeat and the login probe are generous (TCG on a loaded runner);
benchmarks/vm_race.py prints the measured numbers next to the peers'. Then leak_swap
once more with `[guard] predict` (issue 15, the last test).
"""
import json
import os

import pytest

import harness
import race_lib

pytestmark = pytest.mark.vm

MAX_PAUSE_S = 3.0    # the goal is 1.0 s under TCG: the benchmark reports it
# goal 2 s, but an idle login takes 1-4 s in the TCG guest and its worst is CPU noise on a
# loaded host (15.6 s in the benign steady control, PSI "full" 1.6%); without a guardian it
# took 30-78 s in the stall scenarios
MAX_LOGIN_S = 30.0


@pytest.fixture(scope="module")
def race(vm_image, tmp_path_factory):
    wheels = tmp_path_factory.mktemp("race-wheels")
    harness.build_wheels(race_lib.REPO, wheels)
    result, race = race_lib.boot("memwatchd", vm_image, wheels,
                                 tmp_path_factory.mktemp("race") / "run",
                                 scenarios=race_lib.env_scenarios())
    print("\n" + race_lib.table({"memwatchd": race}) + "\n" + race_lib.last_line({"memwatchd": race}))
    if race_lib.runs_of(race, "leak_swap_predict"):
        print(race_lib.predict_rows(race) + "\n" + race_lib.predict_line(race))
    assert not result.timed_out, result.describe()
    assert race.get("guardian_started"), result.describe()
    assert not race["errors"], "\n".join(race["errors"])
    return race


@pytest.mark.parametrize("name", race_lib.STALL_SCENARIOS)
def test_stall_scenario_hog_stopped_nothing_else(race, name):
    if race_lib.env_scenarios() and name not in race_lib.env_scenarios():
        pytest.skip("not selected by MEMWATCHD_VM_RACE_SCENARIOS")
    s = race["scenarios"][name]
    detail = json.dumps(s, indent=1)[:3000]
    assert s["swap_ok"], detail
    assert s["right_kill"], detail
    assert not s["wrong_kills"], detail
    assert s["oom_kills"] == 0, detail
    assert s["bystander_alive"], detail
    assert s["heartbeat"]["max_gap_s"] is not None and s["heartbeat"]["max_gap_s"] <= MAX_PAUSE_S, detail
    assert s["login_worst_s"] <= MAX_LOGIN_S, detail


# The cold-page control (a job appending cold pages at 30 MB/s to 0.9x RAM while it works
# in 32 MiB, a swapfile of half the RAM) keeps PSI "full" at 15-65% by itself, and near the
# end of its growth the *other* services' pages come back at up to 4.4-5 MiB/s, what a hot
# leak shows when the guard must act. The guard stops the largest process on pressure only
# when its own pages are among those coming back (policy.own_thrash: its major faults; the
# cold job's share of the host's was 0% whenever refaults reached 4 MiB/s, a hot leak's
# 56-97%) or at 8 MiB/s whoever's. Measured in session 6: 0 kills in 8 runs under memwatchd;
# in 2 runs (one under no guardian) refaults alone would have fired. The near miss: once the
# job's own share read 75%, at 3.6 MiB/s, under psi_refaults. Required like the others.
@pytest.mark.parametrize("name", race_lib.BENIGN_SCENARIOS)
def test_benign_control_nobody_killed(race, name):
    if race_lib.env_scenarios() and name not in race_lib.env_scenarios():
        pytest.skip("not selected by MEMWATCHD_VM_RACE_SCENARIOS")
    s = race["scenarios"][name]
    detail = json.dumps(s, indent=1)[:3000]
    assert s["swap_ok"], detail
    assert not s["killed"] and not s["wrong_kills"], detail
    assert s["oom_kills"] == 0, detail


# issue 15: leak_swap and benign_cold again with `[guard] predict = "30s"` (scenario/race.py
# VARIANTS, run after the plain scenarios in the same boot: ~2.5 min more under TCG).
# In this guest the pressure trigger fires first with or without predict (psi-full-high at
# ~755-770 MiB, while RAM + swap still leave ~3x the predictor's soft floor), so what CI can
# assert is that predict changes nothing for the worse: same victim, no bystander, acting no
# later and no longer a pause than without it (within the heartbeat's CPU noise), with the
# host's estimate in the decision record; and that it leaves the cold-page job alone.
# benchmarks/vm_race.py prints the figures (docs/predict.md, "In the guest").
PAUSE_NOISE_S = 2.0     # measured: 1.70 s with predict vs 0.98 s without, the same trigger at
                        # the same size, three TCG guests on two host cores (15 vs 5 pauses > 0.5 s)
USAGE_NOISE_MIB = 64    # where the same trigger fires, run to run (763-773 MiB, 754-770 MiB)


def test_predict_acts_no_later_and_stops_only_the_leak(race):
    selected = race_lib.env_scenarios()
    if selected and not {"leak_swap", "leak_swap_predict"} <= set(selected):
        pytest.skip("leak_swap and leak_swap_predict not selected by MEMWATCHD_VM_RACE_SCENARIOS")
    on, off = race["scenarios"]["leak_swap_predict"], race["scenarios"]["leak_swap"]
    detail = json.dumps({"on": on, "off": off}, indent=1)[:6000]
    assert on["guard_keys"] == 'predict = "30s"' and on["swap_ok"], detail
    assert on["right_kill"] and not on["wrong_kills"] and on["bystander_alive"], detail
    assert on["oom_kills"] == 0, detail
    first_on, first_off = race_lib.first_action(on), race_lib.first_action(off)
    assert first_on and first_off and first_on["comm"] == first_off["comm"], detail
    # the host's estimate is in the records with predict (not always the first: a daemon the
    # watchdog restarted under a starved guest may act before its trend has three readings)
    assert any(a["predict"] is not None for a in on["memwatchd_actions"]), detail
    assert all(a["predict"] is None for a in off["memwatchd_actions"]), detail
    assert first_on["usage_mib"] <= first_off["usage_mib"] + USAGE_NOISE_MIB, detail
    assert race_lib.pause(on) <= min(MAX_PAUSE_S, race_lib.pause(off) + PAUSE_NOISE_S), detail


def test_predict_leaves_the_cold_page_job_alone(race):
    """Cold pages going to a swapfile that still has room: RAM fills, the headroom the guard
    counts (swap included) does not run out, so the host trend must not act (counting
    MemAvailable alone, it would), and no trigger may stop the job: it is the benign
    control with predict on, held to the plain control's standard (a rule tried in session
    8 SIGTERMed this run on pressure, and no test said so)."""
    selected = race_lib.env_scenarios()
    if selected and "benign_cold_predict" not in selected:
        pytest.skip("benign_cold_predict not selected by MEMWATCHD_VM_RACE_SCENARIOS")
    s = race["scenarios"]["benign_cold_predict"]
    detail = json.dumps(s, indent=1)[:4000]
    assert s["guard_keys"] == 'predict = "30s"' and s["swap_ok"], detail
    assert s["heartbeat_alive"] and s["bystander_alive"] and s["oom_kills"] == 0, detail
    assert not [a for a in s["memwatchd_actions"] if a["reason"] == "predicted-exhaustion"], detail
    assert not s["killed"] and not s["wrong_kills"] and not s["memwatchd_actions"], detail


# scenario/race.py VARIANTS with `[daemon] trace` on: whether the hog is the one to stop.
# CI runs leak_swap_traced (DEFAULT_VARIANTS); the others on request
TRACED = {"leak_swap_traced": True, "leak_zram_traced": True, "benign_cold_traced": False}


@pytest.mark.parametrize("name", sorted(TRACED))
def test_a_replay_of_a_traced_scenario_takes_the_live_guards_decisions(race, name):
    """Issue 19 in traces: a scenario once more with `[daemon] trace` on, then `memwatchd
    replay` of the daemon's own ring over the scenario's span, with the config it ran. The
    guard's pressure triggers take rates of PSI totals, refaults and the largest process's
    own major faults, and its headroom counts swap that was switched on after the daemon
    started (the variant restarts it before the scenario makes its swap), so a trace without
    them replays other decisions (measured: a SIGKILL where live sent SIGTERM, a SIGTERM in
    the cold-page control); with them the replay takes every decision the live guard took,
    at the same sample, and none it did not. Tracing on, the outcome is the plain
    scenario's: the hog stopped and nothing else, or in the control nobody."""
    selected = race_lib.env_scenarios()
    if (selected and name not in selected) or (not selected and name != "leak_swap_traced"):
        pytest.skip("%s not selected by MEMWATCHD_VM_RACE_SCENARIOS" % name)
    s = race["scenarios"][name]
    detail = json.dumps(s, indent=1)[:6000]
    assert s["daemon_keys"].startswith("trace = ") and s["swap_ok"], detail
    if TRACED[name]:
        assert s["right_kill"] and not s["wrong_kills"], detail
    else:
        assert not s["killed"] and not s["wrong_kills"], detail
    assert s["bystander_alive"] and s["oom_kills"] == 0, detail
    replayed = s["replay"]
    summary = replayed["summary"]
    assert replayed["rc"] == 0 and summary is not None, detail
    assert summary["damage"] == [], detail
    assert not any("no PSI totals" in n or "no process list" in n for n in summary["notes"]), detail
    live = [a for a in s["memwatchd_actions"] if a["action"] != "warn"]
    assert bool(live) == TRACED[name], detail
    assert summary["reproduced"] >= len(live), detail
    assert summary["live_not_taken"] == 0 and summary["new"] == 0, detail
    guard = [d for d in replayed["decisions"] if d["watch"] == "guard" and d["signal"]]
    assert [d["reason"] for d in guard][:1] == [a["reason"] for a in live][:1], detail
    assert all(d["live"] is not None for d in guard), detail
