"""The fleet rules (examples/prometheus/memwatchd.rules.yml) against Prometheus' own tools
and a real Prometheus server: `promtool check rules`, `promtool test rules` (every alert,
firing and not), `promtool check metrics` on a real scrape, and a server that scrapes
`memwatchd run` in a private PID namespace while it stops a hog, then loses it.

Debian's `prometheus` package provides both binaries (.ci/run installs it)."""
from __future__ import annotations

import subprocess

import pytest

from .pidns import needs_pidns, run_scenario
from .prometheus_lib import PROMETHEUS, PROMTOOL, RULE_TESTS, RULES

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus not installed (Debian: apt-get install prometheus)")

ALERTS = ("MemwatchdDown", "MemwatchdMetricsStale", "MemwatchdTargetStopped",
          "MemwatchdTargetRestartStorm", "MemwatchdGuardActing", "MemwatchdTargetNearLimit",
          "MemwatchdHostMemoryPressureHigh", "MemwatchdHostMemoryLow", "MemwatchdDryRunLeftOn")


def promtool(*args, stdin=None):
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=120)


@needs_promtool
def test_rules_are_valid_and_every_alert_has_unit_tests():
    check = promtool("check", "rules", RULES)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 15 rules found" in check.stdout
    with open(RULES) as f:
        rules = f.read()
    with open(RULE_TESTS) as f:
        tests = f.read()
    for name in ALERTS:                       # each alert is defined and has a firing test
        assert f"- alert: {name}\n" in rules, name
        assert f"alertname: {name}\n" in tests, name
    assert rules.count("- alert: ") == len(ALERTS)
    run = promtool("test", "rules", RULE_TESTS)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


@needs_promtool
def test_a_broken_expectation_fails_the_unit_tests(tmp_path):
    """The suite can fail: the same tests against rules whose restart-storm threshold
    is one lower report that alert (and only that one) as wrong."""
    with open(RULES) as f:
        rules = f.read()
    assert rules.count(">= 5") == 1
    (tmp_path / "memwatchd.rules.yml").write_text(rules.replace(">= 5", ">= 4"))
    with open(RULE_TESTS) as f:
        (tmp_path / "t.yml").write_text(f.read())
    run = promtool("test", "rules", str(tmp_path / "t.yml"))
    assert run.returncode == 1
    failed = {line.split(",")[0].split()[-1] for line in (run.stdout + run.stderr).splitlines()
              if line.strip().startswith("alertname:")}
    assert failed == {"MemwatchdTargetRestartStorm"}, run.stdout + run.stderr


@needs_pidns
@needs_prometheus
@pytest.mark.slow
def test_a_real_prometheus_sees_a_stop_and_then_the_daemon_down():
    r = run_scenario("""
from tests.prometheus_lib import *
mport = free_port()
events = WORK + "/events.jsonl"
prom = WORK + "/memwatchd.prom"
d = start_daemon(f'''
[daemon]
events = "{events}"
state = ""
[guard]
enabled = false
[metrics]
listen = "127.0.0.1:{mport}"
textfile = "{prom}"
[[watch]]
name = "hogs"
cmdline = "hog-[a-z]+$"
limit = "200M"
grace = "1s"
''')
t0 = time.monotonic()
rules = rules_with_short_for(WORK + "/rules.yml", "3s")
p, port = start_prometheus(WORK, f"127.0.0.1:{mport}", rules, labels={"vm": "test-vm"})
try:
    def memwatchd_up():
        v = api(port, "query", query='up{job="memwatchd"} == 1')
        return v and v["result"]
    up = wait_for(memwatchd_up, 30, step=0.25)
    t_up = time.monotonic() - t0
    # Two evaluations after the first good scrape: all rules evaluated, none firing.
    def evaluated():
        groups = (api(port, "rules") or {}).get("groups", [])
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == 15 and all(r.get("lastEvaluation", "0001").startswith("20")
                                        and r.get("evaluationTime", 0) > 0 for r in rules) and rules
    time.sleep(2.5)
    before = wait_for(evaluated, 15, step=0.25) or []
    active_before = (api(port, "alerts") or {}).get("alerts")
    seeded = api(port, "query", query='memwatchd_actions_total{target="hogs"}')

    # 50 MiB/s: in a PID namespace new processes are found by a rescan every 2 s, and a
    # faster hog can be first seen past 1.25x its limit (an escalated SIGKILL, not this test)
    h = start_hog("hog-x", rate_mib=50, cap_mib=600, seconds=20, on_term="exit", events=events)
    t_hog = time.monotonic()
    fate = exited_by(h, 15)
    stopped = wait_for(lambda: alerts(port, "MemwatchdTargetStopped"), 30, step=0.25)
    t_stopped = time.monotonic() - t_hog
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as resp:
        scrape = resp.read().decode()
    def textfile_after_the_stop():   # rewritten every 5 s
        text = os.path.exists(prom) and open(prom).read()
        return text and "memwatchd_signal_to_exit_seconds_count 1.0" in text and text
    textfile = wait_for(textfile_after_the_stop, 15, step=0.25)
    not_firing = {name: alerts(port, name) + alerts(port, name, "pending")
                  for name in ("MemwatchdDown", "MemwatchdMetricsStale", "MemwatchdGuardActing",
                               "MemwatchdTargetRestartStorm", "MemwatchdDryRunLeftOn")}

    stop(d, signal.SIGTERM)
    t_stop = time.monotonic()
    pending = wait_for(lambda: alerts(port, "MemwatchdDown", "pending"), 20, step=0.25)
    down = wait_for(lambda: alerts(port, "MemwatchdDown"), 30, step=0.25)
    t_down = time.monotonic() - t_stop
    rules_after = [r for g in (api(port, "rules") or {}).get("groups", []) for r in g["rules"]]
finally:
    stop_prometheus(p)
result(up=up, t_up=t_up, before=before, active_before=active_before, seeded=seeded, fate=fate,
       stopped=stopped, t_stopped=t_stopped, scrape=scrape, textfile=textfile,
       not_firing=not_firing, pending=pending, down=down, t_down=t_down,
       rules_after=rules_after, prometheus_rc=p.returncode, events=read_events(events),
       log=daemon_log(), prometheus_log=open(WORK + "/prometheus.log").read()[-3000:],
       mport=mport)
""", timeout=150)
    where = f"{r['log']}\n--- prometheus:\n{r['prometheus_log']}"
    instance = f"127.0.0.1:{r['mport']}"
    assert r["up"], where
    # Every rule evaluates without error on a real server, and nothing about memwatchd or its
    # targets is active before the hog (the host-memory alerts depend on this shared machine).
    assert len(r["before"]) == 15 and all(rule["health"] == "ok" for rule in r["before"]), r["before"]
    assert [a for a in r["active_before"]
            if not a["labels"]["alertname"].startswith("MemwatchdHostMemory")] == [], r["active_before"]

    assert r["fate"] == 0, where                     # the hog exited on SIGTERM
    decisions = [e for e in r["events"] if e["type"] == "decision"]
    assert [(e["action"], e["reason"]) for e in decisions] == [("term", "over-limit")], decisions
    assert r["stopped"], where
    [alert] = r["stopped"]
    assert alert["labels"] == {"alertname": "MemwatchdTargetStopped", "job": "memwatchd",
                               "instance": instance, "vm": "test-vm", "target": "hogs",
                               "severity": "warning"}, alert
    assert alert["annotations"]["summary"] == \
        f"memwatchd stopped 1 hogs target(s) on {instance} in 15 minutes"
    assert "memwatchd events --target hogs --since 1h" in alert["annotations"]["description"]
    assert r["not_firing"] == {name: [] for name in r["not_firing"]}, r["not_firing"]
    # The first stop's counter is there, at 0, before the stop: without it
    # increase() would miss this first stop and no alert would fire.
    assert [s["value"][1] for s in r["seeded"]["result"]] == ["0"], r["seeded"]

    assert r["pending"], where                       # `for:` held it back first
    [down] = r["down"]
    assert down["labels"] == {"alertname": "MemwatchdDown", "job": "memwatchd",
                              "instance": instance, "vm": "test-vm", "severity": "warning"}
    assert all(rule["health"] == "ok" for rule in r["rules_after"]), r["rules_after"]
    assert r["prometheus_rc"] == 0, r["prometheus_log"]
    # Generous bounds for a loaded machine; typical: ~1-2 s and ~5 s.
    print(f"prometheus saw memwatchd up {r['t_up']:.1f} s after start; MemwatchdTargetStopped "
          f"firing {r['t_stopped']:.1f} s after the hog started; MemwatchdDown firing "
          f"{r['t_down']:.1f} s after the daemon stopped")
    assert r["t_stopped"] < 30 and r["t_down"] < 40, (r["t_stopped"], r["t_down"])

    # A real scrape, and the textfile, by Prometheus' naming conventions.
    for text in (r["scrape"], r["textfile"]):
        lint = promtool("check", "metrics", stdin=text)
        assert lint.returncode == 0 and lint.stdout + lint.stderr == "", lint.stdout + lint.stderr
        assert 'memwatchd_actions_total{action="term",reason="over-limit",signal="SIGTERM",' \
               'target="hogs"} 1.0' in text
