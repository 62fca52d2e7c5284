"""Issue 19, memwatchd's column of the race (the proof CI runs): one boot, memwatchd as
installed (guard only), every scenario of scenario/race.py.

The stall scenarios (fast hog without swap, a leak with a hot working set on a
swapfile and on zram, page-cache thrash without swap) must end with the hog
stopped, nothing else killed, the bystander alive; the benign controls (85% of
MemAvailable held steady, cold pages going to swap) with nobody killed. Bounds
on the heartbeat and the login probe are generous (TCG on a loaded runner);
benchmarks/vm_race.py prints the measured numbers next to the peers'.
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


@pytest.mark.parametrize("name", race_lib.BENIGN_SCENARIOS)
def test_benign_control_nobody_killed(race, name):
    if race_lib.env_scenarios() and name not in race_lib.env_scenarios():
        pytest.skip("not selected by MEMWATCHD_VM_RACE_SCENARIOS")
    s = race["scenarios"][name]
    detail = json.dumps(s, indent=1)[:3000]
    assert s["swap_ok"], detail
    assert not s["killed"] and not s["wrong_kills"], detail
    assert s["oom_kills"] == 0, detail
