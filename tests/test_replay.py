"""replay and suggest over real traces: the golden ones in tests/data/ (recorded from
real processes with `memwatchd record`, see tests/data/make_traces.py) and traces
recorded live here, in a private PID namespace."""
from __future__ import annotations

import json
import os
import signal as signals_mod
import pytest
from typer.testing import CliRunner

from memwatchd import toml_child, trace
from memwatchd.cli import app
from memwatchd.config import Size, parse_config
from memwatchd.replay import recorded_config, replay
from memwatchd.suggest import suggest
from memwatchd.trace import read_trace
from memwatchd.types import Candidate, ConfigError, HostSample, Pressure, SwapDevices

from .pidns import needs_pidns, run_scenario
from .trace_lib import SyntheticDaemon

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
MiB = 1 << 20


def golden(name: str) -> str:
    return os.path.join(DATA, f"{name}.trace.gz")


def with_limit(config, mib: int, **changes):
    return config._replace(watches=tuple(w._replace(limit=Size(bytes=mib * MiB), **changes)
                                         for w in config.watches), source=f"limit {mib}M")


def signals(result):
    return [d for d in result.decisions if d.kind == "signal"]


# ------------------------------------------------------------------ golden

@pytest.mark.parametrize("name", ["leak", "plateau-1", "plateau-2", "plateau-3", "sawtooth", "build"])
def test_golden_trace_replays_its_own_decisions_exactly(name):
    t = read_trace(golden(name))
    result = replay(t)
    assert len(result.decisions) == len(result.live)
    for d in result.decisions:
        assert d.match is not None and d.match.t == d.t and not d.diverged
    if name == "leak":   # the dry-run policy said SIGTERM at 100M, then escalated past 125M
        assert [(d.reason, d.signal) for d in result.decisions] == [
            ("over-limit", "SIGTERM"), ("over-limit-escalated", "SIGKILL")]
        assert result.decisions[0].usage >= 100 * MiB


def test_golden_leak_lower_limit_acts_earlier_higher_limit_never():
    t = read_trace(golden("leak"))
    cfg = recorded_config(t)
    live = replay(t).decisions[0]
    low = replay(t, with_limit(cfg, 50))
    first = signals(low)[0]
    assert first.t < live.t - 0.3 and first.usage >= 50 * MiB and first.match is None
    # after a replay-only action the rest is marked, and the killed target's readings dropped
    assert all(d.diverged for d in low.decisions[1:])
    assert low.dropped and low.diverged_at[first.key] == first.t
    high = replay(t, with_limit(cfg, 400))
    assert high.decisions == [] and len(high.live) == 2
    assert all(l.match is None for l in high.live)   # live decisions the replay did not take


def test_golden_sawtooth_sustain_rides_out_the_peaks_that_a_plain_limit_acts_on():
    t = read_trace(golden("sawtooth"))
    cfg = recorded_config(t)
    assert len(signals(replay(t, with_limit(cfg, 45)))) >= 1
    sustained = with_limit(cfg, 45, sustain=2.0)   # each peak lasts < 1 s
    assert signals(replay(t, sustained)) == []


def test_golden_build_tree_counts_children_together():
    t = read_trace(golden("build"))
    run = next(iter(t.runs.values()))
    assert run.kind == "tree" and run.peak > 60 * MiB   # two children of up to 40 MiB at once
    assert signals(replay(t, with_limit(recorded_config(t), 60)))


def test_a_config_whose_watches_the_trace_never_saw_is_refused_naming_both():
    t = read_trace(golden("leak"))
    other = parse_config({"watch": [{"name": "web", "unit": "nginx", "limit": "1G"}]}, "other.toml")
    with pytest.raises(ConfigError) as e:
        replay(t, other)
    assert "other.toml" in str(e.value) and "web" in str(e.value)
    assert golden("leak") in str(e.value) and "leak" in str(e.value)
    wrong_scope = parse_config({"watch": [{"name": "leak", "pid": 3, "limit": "1G"}]}, "scope.toml")
    with pytest.raises(ConfigError, match="scope.toml: watch\\[0\\] \\(leak\\) has scope process, but .* "
                                          "recorded it with scope tree"):
        replay(t, wrong_scope)


# ----------------------------------------------------------------- suggest

def test_suggest_covers_every_finished_peak_and_replays_to_zero_stops():
    report = suggest([golden("plateau-1"), golden("plateau-2"), golden("plateau-3")])
    w = report.watches["plateau"]
    peaks = [r.peak for r in w.runs]
    assert len(peaks) == 3 and all(r.complete for r in w.runs)
    assert w.limit >= max(peaks) * 1.05 and w.warn < w.limit
    assert w.replayed_runs == 3 and w.stopped_by_replay == []
    text = report.text()
    assert "would have stopped 0 of 3 recorded runs" in text
    snippet = text[text.index("# suggested by"):text.index("replay of the suggested")]
    valid, data = toml_child.parse(snippet)
    assert valid, data
    watch = data["watch"][0]
    assert watch["name"] == "plateau" and parse_config(
        {"watch": [dict(watch, cmdline="plateau")]}, "snippet").watches[0].limit.bytes == w.limit


def test_suggest_with_a_tighter_margin_says_how_many_runs_it_would_stop():
    # the 95th percentile of three runs is the largest; at p50 with no margin the floor
    # (largest finished peak + 5%) still keeps every finished run
    report = suggest([golden("plateau-1"), golden("plateau-2"), golden("plateau-3")],
                     percentile=50, margin=0.0)
    w = report.watches["plateau"]
    assert w.limit >= max(r.peak for r in w.runs) and w.stopped_by_replay == []


def test_suggest_refuses_nonsense_settings():
    with pytest.raises(ConfigError, match="--percentile"):
        suggest([golden("leak")], percentile=0)
    with pytest.raises(ConfigError, match="--margin"):
        suggest([golden("leak")], margin=-0.1)


# --------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_replay_text_and_json():
    out = runner.invoke(app, ["replay", golden("leak"), "--config", write_toml(
        '[[watch]]\nname = "leak"\npid = 3\nscope = "tree"\nlimit = "50M"\n')])
    assert out.exit_code == 0, out.output
    assert "leak: pid 3" in out.output and "not taken live" in out.output
    assert "live decisions the replay did not take:" in out.output
    js = runner.invoke(app, ["replay", golden("leak"), "--json"])
    objs = [json.loads(line) for line in js.output.splitlines()]
    assert objs[-1]["type"] == "summary" and objs[-1]["reproduced"] == 2
    assert [o["action"] for o in objs if o["type"] == "replay"] == ["term", "kill"]


def test_cli_replay_window():
    """--from starts the policy fresh at that time (as if the daemon started then) with the
    values last recorded before it; --to ends it; live decisions outside are not listed."""
    whole = runner.invoke(app, ["replay", golden("leak"), "--json"])
    t_term = [json.loads(l) for l in whole.output.splitlines()][0]["t"]
    late = runner.invoke(app, ["replay", golden("leak"), "--json", "--from", f"{t_term + 0.05:.3f}s"])
    objs = [json.loads(l) for l in late.output.splitlines()]
    replayed = [o for o in objs if o["type"] == "replay"]
    assert replayed and all(o["t"] >= t_term + 0.05 - 1e-6 for o in replayed)
    assert replayed[0]["reason"] == "over-limit" and replayed[0]["live"] is None
    assert all(o["t"] > t_term for o in objs if o["type"] == "live-only")
    early = runner.invoke(app, ["replay", golden("leak"), "--json", "--to", f"{t_term - 0.05:.3f}s"])
    assert [json.loads(l)["type"] for l in early.output.splitlines()] == ["summary"]
    bad = runner.invoke(app, ["replay", golden("leak"), "--from", "yesterday"])
    assert bad.exit_code == 2 and "--from" in bad.output


def test_cli_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.trace"
    bad.write_text("not a trace\n")
    out = runner.invoke(app, ["replay", str(bad)])
    assert out.exit_code == 1 and str(bad) in out.output and "not a memwatchd trace" in out.output
    out = runner.invoke(app, ["suggest", str(tmp_path / "missing.trace")])
    assert out.exit_code == 1 and "missing.trace: cannot read" in out.output


def test_cli_suggest_prints_toml_then_the_replay():
    out = runner.invoke(app, ["suggest", golden("plateau-1"), golden("plateau-2"), golden("build")])
    assert out.exit_code == 0, out.output
    assert out.output.index("[[watch]]") < out.output.index("would have stopped")
    assert 'name = "build"' in out.output and 'name = "plateau"' in out.output


def test_cli_record_refuses_two_sources():
    out = runner.invoke(app, ["record", "--out", "/dev/null", "--pid", "1", "--unit", "x"])
    assert out.exit_code == 2 and "give one of" in out.output


def write_toml(text: str) -> str:
    import tempfile
    fd, path = tempfile.mkstemp(suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


# -------------------------------------------- live, in a private PID namespace

@needs_pidns
@pytest.mark.slow
def test_replaying_a_live_daemon_run_with_its_own_config_reproduces_its_actions():
    """The daemon with [daemon] trace really stops two hogs (one exits on SIGTERM, one needs
    SIGKILL after the grace), is restarted once (the ring keeps the first run), and the
    replay of the ring with the same config takes the same actions on the same targets
    for the same reasons, each within one sample of the live one."""
    r = run_scenario("""
trace_dir = os.path.join(WORK, "trace")
watches = '''
[[watch]]
name = "hogs"
cmdline = "hog-[ab]$"
limit = "150M"
grace = "1s"
'''
daemon = f'trace = "{trace_dir}"\\ntrace_size = "1M"'
d = start_watching(watches, daemon)
# it opens its ring segment before it says it started (a loaded machine can take seconds)
assert wait_for(lambda: "memwatchd started" in daemon_log(), 30), daemon_log()
time.sleep(0.5)
a = start_hog("hog-a", rate_mib=60, cap_mib=400, events=EVENTS)
b = start_hog("hog-b", rate_mib=25, cap_mib=400, on_term="ignore", events=EVENTS)
fate = (exited_by(a, 15), exited_by(b, 15))
wait_for(lambda: sum(e["type"] == "outcome" for e in read_events(EVENTS)) >= 3, 10)
stop(d, signal.SIGTERM)
d = start_watching(watches, daemon)      # a restart: the ring continues
assert wait_for(lambda: "memwatchd started" in daemon_log(), 30), daemon_log()
time.sleep(1.0)
stop(d, signal.SIGTERM)
from memwatchd.replay import replay_file, to_json
from memwatchd.trace import segment_files
res = replay_file(trace_dir)
from memwatchd.suggest import suggest
stopped = suggest([trace_dir]).watches["hogs"]
# the same runs without the trace's own event lines: only --events can tell they were stopped
bare = os.path.join(WORK, "bare.trace")
with open(bare, "w") as out:
    for seg in segment_files(trace_dir):
        out.writelines(l for l in open(seg) if '"t":"event"' not in l)
blind = suggest([bare]).watches["hogs"]
told = suggest([bare], EVENTS).watches["hogs"]
result(suggest=[[r.ended for r in w.runs] + [w.limit, w.why] for w in (stopped, blind, told)],
       fate=fate, replay=to_json(res), segments=len(segment_files(trace_dir)),
       live=[(l.t, l.key, l.reason, l.signal) for l in res.live],
       headers=len(res.trace.headers), events=read_events(EVENTS), log=daemon_log())
""", timeout=90)
    assert r["fate"][0] in (0, -9) and r["fate"][1] == -9, r["log"]
    sent = [e for e in r["events"] if e["type"] == "decision"]
    # each hog got its SIGTERM at the limit; hog-b a SIGKILL (after the grace, or escalated if
    # a loaded machine let it pass 1.25x the limit first); the ladder's exact steps may vary
    assert [e["signal"] for e in sent].count("SIGTERM") == 2 and "SIGKILL" in [e["signal"] for e in sent]
    assert r["segments"] == 2 and r["headers"] == 2
    decisions = [o for o in r["replay"] if o["type"] == "replay"]
    summary = r["replay"][-1]
    assert summary["live_not_taken"] == 0 and summary["new"] == 0, r["replay"]
    assert len(decisions) == len(r["live"]) == len(sent)
    for d in decisions:
        assert d["live"] is not None and abs(d["live"]["delta_s"]) <= 0.05, d
    # suggest: runs memwatchd stopped are censored, never complete; no limit from them alone
    for ended_limit_why in (r["suggest"][0], r["suggest"][2]):
        assert ended_limit_why[:2] == ["stopped", "stopped"] and ended_limit_why[2] is None
        assert "no run finished on its own" in ended_limit_why[3]
    assert r["suggest"][1][:2] == ["finished", "finished"]   # without the records it cannot know
    by_event = {(e["pid"], e["reason"]) for e in sent}
    assert {(d["key"][1], d["reason"]) for d in decisions} == by_event


@needs_pidns
@pytest.mark.slow
def test_record_of_a_hog_then_replay_lower_limit_acts_earlier_higher_never():
    """`memwatchd record -- COMMAND` of a hog that grows to 250 MiB acts on nothing (the hog
    gets no signal); replayed with a 100M limit the SIGTERM comes earlier than with 200M, and
    with 400M there is none. suggest then calls the run complete and covers its peak."""
    r = run_scenario("""
out = os.path.join(WORK, "hog.trace")
hog = [sys.executable, "-c", HOG, "100", "250", "4.5", "exit", os.path.join(WORK, "rec.signals"),
       "/nonexistent", "hog-rec"]
rec = subprocess.run([sys.executable, "-m", "memwatchd", "record", "--out", out, "--interval",
                      "100ms", "--limit", "200M", "--name", "hog", "--"] + hog,
                     capture_output=True, text=True, timeout=30)
from memwatchd.config import Size
from memwatchd.replay import recorded_config, replay
from memwatchd.suggest import suggest
from memwatchd.trace import read_trace
t = read_trace(out)
cfg = recorded_config(t)
def first(mib):
    c = cfg._replace(watches=(cfg.watches[0]._replace(limit=Size(bytes=mib << 20)),))
    s = [d for d in replay(t, c).decisions if d.kind == "signal"]
    return [s[0].t - t.start, s[0].usage, s[0].reason] if s else None
sg = suggest([out]).watches["hog"]
sleeper = subprocess.Popen(["sleep", "30"])
pid_out = os.path.join(WORK, "pid.trace.gz")
by_pid = subprocess.run([sys.executable, "-m", "memwatchd", "record", "--out", pid_out, "--pid",
                         str(sleeper.pid), "--duration", "1s"], capture_output=True, text=True, timeout=30)
sleeper_alive = sleeper.poll() is None
stop(sleeper)
pt = read_trace(pid_out)
by_pid = [by_pid.returncode, by_pid.stderr, sleeper_alive, pt.clean_end,
          [(r.key[1], r.watch, r.gone) for r in pt.runs.values()], sleeper.pid]
result(rc=rec.returncode, stderr=rec.stderr, signals=hog_signals("rec"), low=first(100),
       mid=first(200), high=first(400), peak=sg.runs[0].peak, ended=sg.runs[0].ended,
       limit=sg.limit, stopped=sg.stopped_by_replay, by_pid=by_pid)
""", timeout=60)
    assert r["rc"] == 0, r["stderr"]
    assert r["signals"] == []                         # record acts on nothing
    assert "dry run, would term" in r["stderr"]       # at its own 200M, as a dry run
    assert r["low"] and r["mid"] and r["low"][0] < r["mid"][0] - 0.5
    assert r["low"][1] >= 100 * MiB and r["mid"][1] >= 200 * MiB
    assert r["high"] is None
    assert r["ended"] == "finished" and r["peak"] >= 220 * MiB   # grows to 250 MiB, then holds
    assert r["limit"] >= r["peak"] * 1.05 and r["stopped"] == []
    rc, stderr, alive, clean, runs, pid = r["by_pid"]   # record --pid --duration
    assert rc == 0 and alive and clean, stderr
    assert runs == [[pid, f"pid-{pid}", None]]          # still running when it stopped recording


def test_cgroup_readings_replay_another_usage_and_a_percent_of_memory_max(tmp_path):
    """This host has no cgroup v2 memory controller (the VM tier has), so the trace is written
    by hand, field by field as docs/trace.md gives them: memory.current grows with page cache,
    anon does not pass 300 MiB. Replayed with usage = "anon" and limit = "50%" of memory.max
    (1 GiB) nothing happens; with "current" at 50% the SIGTERM comes when current passes 512 MiB."""
    cfg = {"daemon": {"interval": "1s"}, "guard": {"enabled": False},
           "watch": [{"name": "web", "cgroup": "/web.slice", "limit": "50%", "scope": "cgroup",
                      "usage": "current", "action": "term", "grace": "10.0s", "sustain": "0.0s"}]}
    header = {"t": "header", "format": 1, "memwatchd": "0.1.0", "kernel": "6.1", "boot_id": "b",
              "mem_total": 8 << 30, "swap_total": 0, "m": 100.0, "w": 1.7e9, "continues": False,
              "source": "hand", "config": cfg}
    lines = [header, {"t": "target", "m": 100.0, "id": 1, "key": ["cgroup", "/web.slice"],
                      "watch": "web", "kind": "cgroup", "comm": "web.slice", "cmdline": "",
                      "cgroup": "/web.slice"}]
    for i in range(20):
        current, anon = (200 + 40 * i) * MiB, min(300, 150 + 10 * i) * MiB
        stat = [current, anon, current - anon, (current - anon) // 2, 0, 0, 1 << 30, -1, 0, 0.0, 0.0]
        lines.append({"t": "s", "m": 100.0 + i, "r": [[1, current, 512 * MiB, None, stat]]})
    path = tmp_path / "web.trace"
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    t = read_trace(str(path))
    assert t.damage == []
    as_current = replay(t, parse_config(cfg, "current.toml"))
    first = signals(as_current)[0]
    assert first.usage >= 512 * MiB and first.limit == 512 * MiB
    assert first.t - t.start == pytest.approx(8.0)          # 200 + 40*8 = 520 MiB
    anon_cfg = dict(cfg, watch=[dict(cfg["watch"][0], usage="anon")])
    assert signals(replay(t, parse_config(anon_cfg, "anon.toml"))) == []
    inactive_cfg = dict(cfg, watch=[dict(cfg["watch"][0], usage="current-inactive_file")])
    later = signals(replay(t, parse_config(inactive_cfg, "inactive.toml")))[0]
    assert later.t > first.t and later.usage >= 512 * MiB


def _guard_trace(tmp_path, with_candidates: bool) -> str:
    """A hand-written trace (the guard cannot be made to fire on this shared host): the host
    falls below the guard's 5% floor while two watched processes grow; the live run was a dry
    run; when the guard fired it listed three processes."""
    total = 8 << 30
    cfg = {"daemon": {"interval": "1s", "dry_run": True}, "guard": {"enabled": True},
           "watch": [{"name": "jobs", "cmdline": "job", "limit": "4G", "scope": "process"}]}
    lines = [{"t": "header", "format": 1, "memwatchd": "0.1.0", "kernel": "6.1", "boot_id": "b",
              "mem_total": total, "swap_total": 0, "m": 10.0, "w": 1.7e9, "continues": False,
              "source": "hand", "config": cfg}]
    for tid, pid in ((1, 101), (2, 102)):
        lines.append({"t": "target", "m": 10.0, "id": tid, "key": ["process", pid, 7],
                      "watch": "jobs", "kind": "process", "comm": f"job{tid}", "cmdline": "job",
                      "cgroup": "/"})
    for i in range(15):
        avail = max(300 << 20, (2 << 30) - i * (150 << 20))   # 2 GiB falling 150 MiB/s to 300 MiB
        line = {"t": "s", "m": 10.0 + i, "r": [[1, (1 << 30) + i * (150 << 20), 4 << 30, None],
                                              [2, (512 << 20) + i * (50 << 20), 4 << 30, None]],
                "h": [avail, 0, 0.0, 0.0]}
        if with_candidates and avail < total * 5 // 100:
            line["c"] = [[101, 7, "job1", "/", (1 << 30) + i * (150 << 20)],
                         [102, 7, "job2", "/", (512 << 20) + i * (50 << 20)],
                         [103, 7, "editor", "/", 64 << 20]]
        lines.append(line)
    path = tmp_path / ("guard-c.trace" if with_candidates else "guard.trace")
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    return str(path)


@pytest.mark.parametrize("with_candidates", [True, False])
def test_replayed_guard_stops_the_largest_and_gives_its_memory_back_to_the_host(tmp_path, with_candidates):
    t = read_trace(_guard_trace(tmp_path, with_candidates))
    result = replay(t)
    guard = [d for d in result.decisions if d.watch == "guard"]
    # below 5% of 8 GiB (409.6 MiB) at +11 s: SIGTERM to the largest process, job1; then its
    # 2.6 GiB count as available again, so the guard does nothing more
    assert [(d.key, d.signal, d.reason) for d in guard] == [
        (("process", 101, 7), "SIGTERM", "mem-available-low")]
    assert guard[0].t - t.start == pytest.approx(11.0)
    assert guard[0].match is None and guard[0].usage == (1 << 30) + 11 * (150 << 20)
    assert result.dropped == {("process", 101, 7): 3}   # job1's readings after it was stopped
    assert any("assumed to exit" in n for n in result.notes)
    assert any("added back to MemAvailable" in n for n in result.notes)
    from_watched = any("chose among the watched processes only" in n for n in result.notes)
    assert from_watched is not with_candidates
    # job1 is gone for the replay from then on: its readings after +9 s are not evaluated
    assert ("process", 101, 7) in result.diverged_at


def test_suggest_censors_a_stopped_run_among_complete_ones_and_weighs_old_runs_less(tmp_path):
    import gzip
    paths = []
    for n, age_days in ((1, 30), (2, 0), (3, 0)):
        lines = gzip.open(golden(f"plateau-{n}"), "rb").read().splitlines(keepends=True)
        header = json.loads(lines[0])
        header["w"] -= age_days * 86400          # plateau-1 ran a month earlier
        lines[0] = json.dumps(header).encode() + b"\n"
        if n == 3:   # memwatchd really stopped this run: a (non dry-run) decision record
            run_key = json.loads(next(l for l in lines if b'"target"' in l))["key"]
            m = json.loads(lines[5])["m"]
            lines.insert(6, json.dumps({"t": "event", "m": m, "e": {
                "type": "decision", "id": "x", "target": "plateau", "pid": run_key[1],
                "start_time": run_key[2], "scope": "tree", "action": "term", "dry_run": False,
                "reason": "over-limit", "signal": "SIGTERM"}}).encode() + b"\n")
        path = tmp_path / f"p{n}.trace"
        path.write_bytes(b"".join(lines))
        paths.append(str(path))
    w = suggest(paths, percentile=50, margin=0.0).watches["plateau"]
    assert sorted(r.ended for r in w.runs) == ["finished", "finished", "stopped"]
    complete = sorted(w.complete, key=lambda r: r.peak)
    stopped = w.censored[0]
    assert stopped.peak > max(r.peak for r in complete)       # its peak is not counted
    assert w.limit >= max(r.peak for r in complete) * 1.05 and w.limit < stopped.peak * 1.05
    assert "1 censored run not counted" in w.why
    old, new = complete[0], complete[1]                      # plateau-1 (old) and plateau-2
    assert old.weight == pytest.approx(0.5 ** (30 / 7), rel=0.01) and new.weight == pytest.approx(1.0, abs=1e-4)
    assert w.percentile_peak == new.peak    # p50 of weights 0.05 and 1: the recent run
    equal = suggest(paths, percentile=50, margin=0.0, half_life=float("inf")).watches["plateau"]
    assert equal.percentile_peak == old.peak                 # unweighted p50 of two: the lower


def test_the_guard_is_told_by_structure_not_by_name(tmp_path):
    """Issue 11 item 6 in traces and replays: a decision is the guard's by its by_guard
    field (recorded in the trace), never because its watch is called "guard"."""
    import signal

    from memwatchd.policy import Decision as PolicyDecision
    from memwatchd.trace import decision_dict
    key = ("process", 101, 7)
    watch_named_guard = PolicyDecision("signal", key, "guard", "over-limit", 1, 2, signal.SIGTERM)
    assert "by_guard" not in decision_dict(watch_named_guard)
    assert decision_dict(watch_named_guard._replace(by_guard=True))["by_guard"] is True
    result = replay(read_trace(_guard_trace(tmp_path, True)))
    guard = [d for d in result.decisions if d.by_guard]
    assert [d.key for d in guard] == [key] and result.stopped() == {}
    guard[0].by_guard = False            # the same decision, from a watch that is named "guard"
    assert list(result.stopped()) == [key]


# ------------------------------------------------------------------ the guard's pressure triggers

def _live_pressure_trace(tmp_path, job_faults_per_s: int, seconds: float = 6.0, slow_swap=False):
    """The live guard path, call for call as Daemon.tick makes it (host sample,
    guard_wants_victim, the candidate list, guard_evaluate, the recorder's tick), on a
    virtual clock and written by the real Recorder: MemAvailable at 12% of 4 GiB (under
    psi_available, above the floor), all tasks stalled 30% of the time, pages coming back
    at 5 MiB/s (between psi_refaults and twice it: whose they are decides), 1280 major
    faults a second on the host, of which the job makes job_faults_per_s. The largest
    process is a root sshd (protected: live knows it is root's own binary), then the job.
    slow_swap: a swap device too slow instead: PSI memory 2% full, 0.6 MiB/s coming back,
    every task waiting for I/O 60% of the time. Returns (trace path, the live decisions)."""
    config = parse_config({"daemon": {"dry_run": True}, "guard": {"enabled": True},
                           "protect": {"names": ["sshd"]}}, "pressure.toml")
    total = 4 << 30
    daemon = SyntheticDaemon(config)
    path = tmp_path / f"pressure-{job_faults_per_s}-{slow_swap}.trace"
    full, back = (0.02, 0.6 * MiB) if slow_swap else (0.3, 5 * MiB)
    daemon.host = HostSample(total, total // 2, 0, 0, Pressure())
    daemon.trace = trace.Recorder(trace.FileSink(str(path)), config, daemon)
    policy, live = daemon.policy, []
    start = daemon.now
    for step in range(int(seconds / 0.1)):
        now = daemon.now = start + step * 0.1
        dt = now - start
        daemon.host = host = HostSample(
            total, total * 12 // 100, 0, 0,
            Pressure(some_avg10=35.0, full_avg10=30.0, some_total_us=int(5e9 + 0.35e6 * dt),
                     full_total_us=int(4e9 + full * 1e6 * dt)),
            refaults=int(9e9 + back * dt), major_faults=int(7e6 + 1280 * dt),
            io_full_us=int(3e9 + 0.6e6 * dt) if slow_swap else int(3e9))
        decisions = policy.evaluate(now, [], host)
        candidates = []
        if policy.guard_wants_victim(now, host):
            candidates = [
                Candidate(("process", 301, 11), 301, "sshd", "/system.slice/ssh.service", 2 << 30,
                          0, True, int(1e4)),
                Candidate(("process", 402, 22), 402, "job", "/user.slice", 1536 << 20, 1000,
                          False, int(2e5 + job_faults_per_s * dt)),
                Candidate(("process", 503, 33), 503, "editor", "/user.slice", 100 << 20, 1000,
                          False, int(3e4 + 10 * dt))]
        decisions += policy.guard_evaluate(now, host, candidates, ())
        daemon.trace.tick(now, [], [], host, candidates, decisions)
        live += [(round(now - start, 3), d.key, d.reason, d.signal) for d in decisions]
    daemon.trace.close()
    return str(path), live


def _as_older_format(path, out, fmt, host_fields, candidate_fields=8):
    """The trace at path as an older format wrote it: the fields it did not have cut off
    the host samples and candidate lists; returns out's path."""
    lines = []
    for line in open(path):
        obj = json.loads(line)
        if isinstance(obj, dict) and obj.get("t") == "header":
            obj["format"] = fmt
        if isinstance(obj, dict) and "h" in obj:
            obj["h"] = obj["h"][:host_fields]
        if isinstance(obj, dict) and obj.get("c"):
            obj["c"] = [c[:candidate_fields] for c in obj["c"]]
        lines.append(json.dumps(obj) + "\n")
    out.write_text("".join(lines))
    return str(out)


def _replayed(result, start):
    return [(round(d.t - start, 3), d.key, d.reason, d.signal) for d in result.decisions
            if d.signal is not None]


@pytest.mark.parametrize("job_faults_per_s", [0, 1000])
def test_a_replayed_pressure_trigger_weighs_the_same_faults_the_live_guard_did(tmp_path, job_faults_per_s):
    """Issue 19 in traces: the PSI totals, refaults and major faults the guard's pressure
    triggers take rates of, and each candidate's own faults, uid and whether its binary is
    root's, are recorded (trace format 3), so the replay decides what the live guard did:
    the cold job (its own pages never come back) is spared; the hot one is stopped at the
    same moment for the same reason; the protected sshd, the largest, is never chosen."""
    path, live = _live_pressure_trace(tmp_path, job_faults_per_s)
    t = read_trace(path)
    assert t.damage == [] and t.header["format"] == trace.FORMAT
    got = replay(t)
    if job_faults_per_s:
        assert [(k, r, s) for _, k, r, s in live] == [
            (("process", 402, 22), "psi-full-high", signals_mod.SIGTERM)], live
    else:
        assert live == []
    assert _replayed(got, t.start) == [(at, k, r, signals_mod.Signals(s).name) for at, k, r, s in live]
    assert not any("PSI totals" in n for n in got.notes), got.notes
    # the same trace without what format 3 added (as format 2 wrote it): the replay cannot
    # weigh the stall, and says so
    t2 = read_trace(_as_older_format(path, tmp_path / "format-2.trace", 2, host_fields=4,
                                     candidate_fields=5))
    assert t2.damage == []
    got2 = replay(t2)
    assert _replayed(got2, t2.start) == []
    assert any("no PSI totals" in n for n in got2.notes), got2.notes


@pytest.mark.parametrize("job_faults_per_s", [0, 1000])
def test_a_replayed_io_stall_is_the_live_one(tmp_path, job_faults_per_s):
    """A swap device too slow for the swap-ins: the I/O stall total is recorded (trace
    format 4), so the replay stops the hot job where the live guard did, for the same
    reason, and spares the cold one; the same trace as format 3 wrote it (no I/O total)
    replays no action and says why."""
    path, live = _live_pressure_trace(tmp_path, job_faults_per_s, slow_swap=True)
    t = read_trace(path)
    assert t.damage == [] and t.header["format"] == trace.FORMAT >= 4
    got = replay(t)
    if job_faults_per_s:
        assert [(k, r, s) for _, k, r, s in live] == [
            (("process", 402, 22), "psi-io-full-high", signals_mod.SIGTERM)], live
    else:
        assert live == []
    assert _replayed(got, t.start) == [(at, k, r, signals_mod.Signals(s).name) for at, k, r, s in live]
    assert not any("I/O stall" in n for n in got.notes), got.notes
    t3 = read_trace(_as_older_format(path, tmp_path / "format-3.trace", 3, host_fields=10))
    assert t3.damage == []
    got3 = replay(t3)
    assert _replayed(got3, t3.start) == []
    assert any("no I/O stall totals" in n for n in got3.notes), got3.notes


def _live_burst_trace(tmp_path, known: bool):
    """The live guard path with [guard] predict, written by the real Recorder: 8 GiB of RAM,
    headroom 1.4 GiB (600 MiB available, 800 MiB of 4 GiB swap free), a cold job's pages
    pushed out at 100 MiB/s from 2 s to 7 s, each holding a slot and its RAM until written
    (SwapCached; known=False: a kernel without it). Returns (trace path, live decisions)."""
    config = parse_config({"daemon": {"dry_run": True}, "guard": {"enabled": True, "predict": "30s"}},
                          "burst.toml")
    total, swap, rate = 8 << 30, 4 << 30, 100 * MiB
    daemon = SyntheticDaemon(config)
    path = tmp_path / f"burst-{known}.trace"
    daemon.host = HostSample(total, total // 2, swap, swap, Pressure())
    daemon.trace = trace.Recorder(trace.FileSink(str(path)), config, daemon)
    policy, live = daemon.policy, []
    start = daemon.now
    for step in range(int(12 / 0.1)):
        now = daemon.now = start + step * 0.1
        pushed = rate * min(max(0.0, now - start - 2), 5.0)
        in_flight = pushed if now - start < 7 else 0
        daemon.host = host = HostSample(total, int(600 * MiB + pushed - in_flight), swap,
                                        int(800 * MiB - pushed), Pressure(),
                                        swap_cached=int(in_flight) if known else None)
        decisions = policy.evaluate(now, [], host)
        candidates = [Candidate(("process", 402, 22), 402, "job", "/user.slice", 3 << 30, 1000,
                                False, 0)] if policy.guard_wants_victim(now, host) else []
        decisions += policy.guard_evaluate(now, host, candidates, ())
        daemon.trace.tick(now, [], [], host, candidates, decisions)
        live += [(round(now - start, 3), d.key, d.reason, d.signal) for d in decisions]
    daemon.trace.close()
    return str(path), live


def test_a_replayed_swap_out_burst_counts_the_swap_cache_once_as_the_live_trend_did(tmp_path):
    """The host trend counts SwapCached once, and trace format 5 records it: the burst is
    no leak live, nor in its replay. Where SwapCached is not known, the trend took the
    burst for a leak (a predicted SIGTERM of the cold job) and the replay does the same;
    a trace as format 4 wrote it says the replay counts the swap cache twice."""
    path, live = _live_burst_trace(tmp_path, known=True)
    assert live == []
    t = read_trace(path)
    assert t.damage == [] and t.header["format"] == trace.FORMAT >= 5
    got = replay(t)
    assert _replayed(got, t.start) == [] and not any("SwapCached" in n for n in got.notes)
    blind_path, blind = _live_burst_trace(tmp_path, known=False)
    assert [(k, r, s) for _, k, r, s in blind] == [
        (("process", 402, 22), "predicted-exhaustion", signals_mod.SIGTERM)], blind
    tb = read_trace(blind_path)
    assert _replayed(replay(tb), tb.start) == [(at, k, r, signals_mod.Signals(s).name) for at, k, r, s in blind]
    t4 = read_trace(_as_older_format(path, tmp_path / "format-4.trace", 4, host_fields=11))
    assert t4.damage == []
    assert any("no SwapCached" in n for n in replay(t4).notes)


def test_a_replay_that_looks_where_the_live_guard_did_not_leaves_the_own_faults_rule_out(tmp_path):
    """Started half a second into the hot leak, the replayed guard's pressure history is
    younger than the live one's: it looks for the largest process at moments the live
    guard did not, where the trace has only an older list. That list's fault counts are
    not this moment's (the same count again would read as a cold job), so the replay lets
    pressure and refaults decide there, says so, and still stops the job."""
    path, live = _live_pressure_trace(tmp_path, 1000)
    t = read_trace(path)
    got = replay(t, start=t.start + 0.5)
    taken = _replayed(got, t.start)
    assert [(k, r, s) for _, k, r, s in taken] == [
        (("process", 402, 22), "psi-full-high", signals_mod.SIGTERM.name)], taken
    assert taken[0][0] >= live[0][0], (taken, live)
    assert any("looked where the live one did not" in n for n in got.notes), got.notes


def _recording(path, config, total):
    """A SyntheticDaemon of ``config`` on a host of ``total`` bytes (half of it available),
    its trace written to ``path`` by the real Recorder: (daemon, path)."""
    daemon = SyntheticDaemon(config)
    daemon.host = HostSample(total, total // 2, 0, 0, None)
    daemon.trace = trace.Recorder(trace.FileSink(str(path)), config, daemon)
    return daemon, path


def test_a_whole_days_trace_replays_every_incident_the_live_guard_stopped(tmp_path):
    """Two incidents in one trace (the daemon's ring holds a whole boot): MemAvailable under
    the floor at 1 s (the guard SIGTERMs job A, which exits, and memory comes back), then
    again at 10 s (job B). A replayed decision the live guard took too must not add A's
    memory back to MemAvailable: the trace's figures have it freed already, and counting it
    twice hid every later incident (measured on a race boot's ring: the leak after the fast
    hog was not replayed at all)."""
    config = parse_config({"guard": {"enabled": True, "psi_full": 0}}, "day.toml")
    total = 4 << 30
    daemon, path = _recording(tmp_path / "day.trace", config, total)
    policy, live, start = daemon.policy, [], daemon.now
    a = Candidate(("process", 402, 22), 402, "job-a", "/user.slice", 3 << 30)
    b = Candidate(("process", 503, 33), 503, "job-b", "/user.slice", 2 << 30)
    for step in range(150):
        now = daemon.now = start + step * 0.1
        dt = now - start
        low = 1.0 <= dt < 1.5 or 10.0 <= dt < 10.5
        daemon.host = host = HostSample(total, total * (3 if low else 50) // 100, 0, 0, None)
        decisions = policy.evaluate(now, [], host)
        candidates = []
        if policy.guard_wants_victim(now, host):
            candidates = [b] if dt >= 1.5 else [a, b]
        decisions += policy.guard_evaluate(now, host, candidates, ())
        daemon.trace.tick(now, [], [], host, candidates, decisions)
        live += [(round(dt, 3), d.key, d.reason) for d in decisions if d.signal]
        if dt >= 1.5 and policy.guard.victim is not None and policy.guard.victim.key == a.key:
            policy.forget(a.key)   # A exited on its SIGTERM (the daemon sees it gone)
        if dt >= 10.5 and policy.guard.victim is not None:
            policy.forget(b.key)
    daemon.trace.close()
    assert [k for _, k, _ in live] == [a.key, b.key], live
    t = read_trace(str(path))
    result = replay(t)
    got = [(round(d.t - t.start, 3), d.key, d.reason) for d in result.decisions if d.signal]
    assert got == live, (got, live)
    assert result.diverged_at == {}, result.diverged_at
    assert not any("added back" in n for n in result.notes), result.notes


def test_swap_switched_on_after_the_start_and_zram_replay_as_the_live_guard_counted_them(tmp_path):
    """The daemon starts before swap is on (the header says none: a swapfile or zram set up
    later in boot); then a 1 GiB zram device holds the host up while MemAvailable sits at
    3%, under the 5% floor: the live guard counts the free zram at its worth in RAM (half,
    at 2:1) and acts only once it is used up. The trace's host rows carry the swap's size
    and zram's figures (format 3), so the replay acts at that moment too, not at once (the
    header's no swap) nor later (zram counted as disk swap)."""
    config = parse_config({"daemon": {"dry_run": True}, "guard": {"enabled": True,
                                                                  "psi_full": 0}}, "zram.toml")
    total = 4 << 30
    daemon, path = _recording(tmp_path / "zram.trace", config, total)
    policy, live, start = daemon.policy, [], daemon.now
    for step in range(200):
        now = daemon.now = start + step * 0.1
        used = min(1 << 30, step * (8 << 20))              # zram fills at 80 MiB/s
        stored = used // 2                                 # 2:1
        policy.zram = SwapDevices(1 << 30, (1 << 30) - used, used, stored)
        daemon.host = host = HostSample(total, total * 3 // 100, 1 << 30, (1 << 30) - used, None)
        decisions = policy.evaluate(now, [], host)
        candidates = []
        if policy.guard_wants_victim(now, host):
            candidates = [Candidate(("process", 402, 22), 402, "job", "/user.slice", 3 << 30)]
        decisions += policy.guard_evaluate(now, host, candidates, ())
        daemon.trace.tick(now, [], [], host, candidates, decisions)
        live += [(round(now - start, 3), d.key, d.reason) for d in decisions if d.signal]
    daemon.trace.close()
    t = read_trace(str(path))
    assert t.swap_total == 0 and t.damage == []
    assert live and live[0][0] > 5.0, live      # not at once: the zram held it up
    result = replay(t)
    got = [(round(d.t - t.start, 3), d.key, d.reason) for d in result.decisions if d.signal]
    assert got[:1] == live[:1], (got, live)
    # and it never fired before: the live guard listed processes only when it fired, so a
    # replayed guard firing earlier would have found no list (and said so)
    assert not any("no process list" in n for n in result.notes), result.notes
