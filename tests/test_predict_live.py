"""The predictive trigger in the real daemon (issue 15), inside a private PID namespace."""
from __future__ import annotations

import signal

import pytest

from .pidns import needs_pidns, run_scenario

pytestmark = [needs_pidns, pytest.mark.slow]


def test_a_leak_gets_its_sigterm_before_its_limit_with_predict_and_at_it_without():
    """Two hogs leaking at the same rate under the same limit; only one watch predicts."""
    r = run_scenario("""
events = EVENTS
d = start_watching('''
[[watch]]
name = "predicted"
cmdline = "leak-p$"
limit = "400M"
grace = "5s"
predict = "30s"

[[watch]]
name = "plain"
cmdline = "leak-q$"
limit = "400M"
grace = "5s"
''')
time.sleep(1.0)
p = start_hog("leak-p", rate_mib=40, cap_mib=600, seconds=30, events=events)
q = start_hog("leak-q", rate_mib=40, cap_mib=600, seconds=30, events=events)
fate_p, fate_q = exited_by(p, 28), exited_by(q, 28)
wait_for(lambda: sum(e["type"] == "outcome" for e in read_events(events)) >= 2, 5)
stop(d, signal.SIGTERM)
result(p=hog_signals("leak-p"), q=hog_signals("leak-q"), events=read_events(events),
       log=daemon_log(), fate_p=fate_p, fate_q=fate_q)
""", timeout=90)
    decisions = {e["target"]: e for e in r["events"] if e["type"] == "decision"}
    assert set(decisions) == {"predicted", "plain"}, r["log"]
    early, plain = decisions["predicted"], decisions["plain"]
    assert (early["reason"], early["signal"]) == ("predicted-exhaustion", "SIGTERM")
    assert early["usage_bytes"] < early["limit_bytes"]
    assert early["usage_bytes"] >= early["limit_bytes"] // 2            # the soft floor
    est = early["predict"]
    assert 0 < est["seconds_left"] < 30 and 0 < est["slope_bytes_per_s"] <= est["slope_upper_bytes_per_s"]
    assert (plain["reason"], plain["signal"], plain["predict"]) == ("over-limit", "SIGTERM", None)
    assert plain["usage_bytes"] >= plain["limit_bytes"]
    assert [s["signal"] for s in r["p"]] == [signal.SIGTERM] and r["p"][0]["mine_in_events"]
    assert [s["signal"] for s in r["q"]] == [signal.SIGTERM]
    assert r["fate_p"] == 0 and r["fate_q"] == 0
