"""`memwatchd status` and `memwatchd events`: in-process with CliRunner, and against a real
daemon in a private PID namespace."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
from rich.console import Console
from typer.testing import CliRunner

from memwatchd import report, state, status
from memwatchd.cli import app

from .pidns import needs_pidns, run_scenario

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def invoke_apart(*args):
    """stdout and stderr kept apart also with click < 8.2 (Python 3.9), which mixes them."""
    try:
        separate = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 has no mix_stderr: it always keeps them apart
        separate = CliRunner()
    return separate.invoke(app, list(args))


@pytest.fixture
def sleeper():
    """A sleeping process with a unique marker in its command line."""
    marker = f"status-probe-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    time.sleep(0.2)
    yield proc, marker
    proc.kill()
    proc.wait()


def write_config(tmp_path, marker, state_path=None, events=""):
    path = tmp_path / "memwatchd.toml"
    path.write_text(f"""
[daemon]
events = "{events}"
state = "{state_path if state_path is not None else tmp_path / 'state.json'}"
[[watch]]
name = "probe"
cmdline = "{marker}$"
limit = "1G"
warn = "900M"
[[watch]]
name = "absent"
cmdline = "no-such-process-{marker}$"
limit = "1G"
""")
    path.chmod(0o600)
    return path


def test_help_has_examples():
    for command in ("status", "events"):
        r = invoke(command, "--help")
        assert r.exit_code == 0 and "Example" in r.output


def test_status_without_a_daemon_samples_once_and_says_so(tmp_path, sleeper):
    proc, marker = sleeper
    config = write_config(tmp_path, marker)
    r = invoke("status", "--config", str(config), "--json")
    assert r.exit_code == 3, r.output          # not running, like systemctl status
    view = json.loads(r.output)
    assert view["running"] is False and view["source"] == "sample"
    assert "not running" in view["message"] and "sampled once" in view["message"]
    row, = view["targets"]
    assert row["target"] == "probe" and row["pid"] == proc.pid
    assert 1 << 20 < row["usage_bytes"] < 200 << 20 and row["limit_bytes"] == 1 << 30
    assert view["watches"] == ["probe", "absent"] and view["daemon"] is None

    r = invoke("status", "--config", str(config))
    assert r.exit_code == 3
    assert "not running" in r.output and "probe" in r.output and str(proc.pid) in r.output
    assert "MemAvailable" in r.output


def test_status_with_a_dead_daemons_state_is_not_running(tmp_path, sleeper):
    proc, marker = sleeper
    config = write_config(tmp_path, marker)
    child = subprocess.Popen(["true"])
    child.wait()
    old = {"format": state.FORMAT, "written_boottime": state.boottime(), "written_at": time.time(),
           "daemon": {"pid": child.pid, "start_time": 1}, "targets": [], "recent_actions": []}
    state.write_atomic(str(tmp_path / "state.json"), json.dumps(old).encode())
    view = json.loads(invoke("status", "-c", str(config), "--json").output)
    assert view["running"] is False and f"pid {child.pid}, which is gone" in view["message"]
    assert view["targets"][0]["pid"] == proc.pid          # sampled itself instead


def test_status_with_the_state_file_off_samples_and_says_why(tmp_path, sleeper):
    proc, marker = sleeper
    config = write_config(tmp_path, marker, state_path="")
    view = json.loads(invoke("status", "-c", str(config), "--json").output)
    assert view["running"] is False and "state file is off" in view["message"]
    assert view["targets"][0]["pid"] == proc.pid and view["state_file"] is None


def test_status_unreadable_state_exits_4(tmp_path, sleeper, monkeypatch):
    """Not root: the 0600 state file cannot be read; say so (exit 4) instead of guessing."""
    proc, marker = sleeper
    config = write_config(tmp_path, marker)

    def denied(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(state, "read_state", denied)
    r = invoke("status", "-c", str(config))
    assert r.exit_code == 4 and "permission denied" in r.output and "sudo" in r.output


def test_hostile_names_are_shown_not_interpreted():
    """A comm like "[bold red]x" reaches Rich as text: printed literally, no markup."""
    view = {"running": False, "message": "m", "host": None, "guard": {}, "watches": ["w"],
            "targets": [{"target": "w", "kind": "cmdline", "pid": 7, "comm": "[blink]evil[/]",
                         "cgroup": "/", "usage_bytes": 1, "limit_bytes": 2, "warn_bytes": None,
                         "headroom_bytes": 1, "sample_age_seconds": 0.1, "last_action": None}],
            "recent_actions": [{"time": "2024-01-01T00:00:00.000Z", "target": "w", "pid": 7,
                                "comm": "[red]x", "signal": "SIGTERM", "usage_bytes": 3,
                                "limit_bytes": 2, "reason": "over-limit", "outcome": None}]}
    console = Console(record=True, width=200)
    console.print(status.status_renderable(view))
    text = console.export_text()
    assert "[blink]evil[/]" in text and "[red]x" in text


def test_old_host_numbers_say_how_old_they_are():
    """An idle daemon writes MemAvailable down only when it moved by a tenth of MemTotal or
    at the heartbeat (issue 18): the text view says how old the host line is once it is
    seconds old, and says nothing for a fresh one."""
    host = {"mem_total_bytes": 8 << 30, "mem_available_bytes": 6 << 30, "psi": None}
    for age, shown in ((25.0, "sampled 25 s ago"), (0.2, None)):
        view = {"running": False, "message": "m", "guard": {}, "watches": [], "targets": [],
                "host": dict(host, sample_age_seconds=age)}
        console = Console(record=True, width=200)
        console.print(status.status_renderable(view))
        text = console.export_text()
        assert "MemAvailable 6 GiB of 8 GiB" in text
        assert (shown in text) if shown else ("sampled" not in text), text


def test_a_target_acted_on_again_and_again_says_how_often():
    last = {"time": "2024-01-01T00:00:00.000Z", "action": "kill", "signal": "SIGKILL",
            "reason": "over-limit"}
    row = {"target": "jobs", "kind": "cgroup", "pid": None, "cgroup": "/jobs/a", "usage_bytes": 3,
           "limit_bytes": 2, "warn_bytes": None, "headroom_bytes": -1, "sample_age_seconds": 0.1,
           "last_action": last, "actions_last_hour": 12}
    view = {"running": False, "message": "m", "host": None, "guard": {}, "watches": ["jobs"],
            "targets": [row, dict(row, cgroup="/jobs/b", actions_last_hour=1)]}
    console = Console(record=True, width=250)
    console.print(status.status_renderable(view))
    text = console.export_text()
    assert text.count("in the last hour") == 1 and "12 in the last hour" in text


# ---------------------------------------------------------------------- events

T0 = 1_700_000_000 * 10**9


def decision(event_id, target, pid, action, sig, reason, usage, at, comm="job"):
    return report.decision_record(target=target, pid=pid, start_time=1, comm=comm, cmdline=comm,
                                  cgroup="/", usage_bytes=usage, limit_bytes=200 << 20,
                                  reason=reason, action=action, signal=sig, dry_run=False,
                                  time_ns=at, event_id=event_id)


@pytest.fixture
def events_file(tmp_path):
    now = time.time_ns()
    hour = 3600 * 10**9
    records = [
        decision("old", "guard", 40, "term", 15, "mem-available-low", 900 << 20, now - 2 * hour),
        decision("a", "sim", 41, "term", 15, "over-limit", 210 << 20, now - 60 * 10**9),
        report.outcome_record(event_id="a", exited=True, seconds_to_exit=0.031,
                              freed_bytes=210 << 20, escalated=False, time_ns=now - 59 * 10**9),
        decision("w", "sim", 42, "warn", None, "warn-level", 150 << 20, now - 30 * 10**9),
        decision("k", "sim", 43, "kill", 9, "over-limit", 250 << 20, now - 10 * 10**9,
                 comm="[red]x\nfake"),
    ]
    path = tmp_path / "events.jsonl"
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(json.dumps(report.outcome_record(
            event_id="k", exited=True, seconds_to_exit=0.002, freed_bytes=1,
            escalated=False))[:37])        # the host died mid-write: no newline, half a record
    return path


def test_events_pairs_and_survives_a_truncated_last_line(events_file):
    r = invoke_apart("events", "--file", str(events_file), "--json")
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["id"] for e in lines] == ["old", "a", "w", "k"]
    a = lines[1]
    assert a["outcome"]["exited"] and a["outcome"]["seconds_to_exit"] == 0.031
    assert lines[2]["outcome"] is None and lines[3]["outcome"] is None   # torn outcome skipped
    assert "skipped 1 unreadable line" in r.stderr

    r = invoke("events", "--file", str(events_file))
    assert r.exit_code == 0
    out = r.stdout
    for needle in ("sim", "guard", "41 job", "210 MiB/200 MiB", "over-limit", "SIGTERM", "31 ms",
                   "warn", "no outcome", "SIGKILL"):
        assert needle in out, needle
    assert "[red]x\\x0" in out              # escaped by the record, shown literally (no markup)


def test_events_since_and_target(events_file):
    ids = lambda *a: [json.loads(x)["id"] for x in invoke_apart("events", "--file", str(events_file),
                                                                "--json", *a).stdout.splitlines()]
    assert ids("--since", "1h") == ["a", "w", "k"]
    assert ids("--since", "20s") == ["k"]
    assert ids("--target", "guard") == ["old"]
    assert ids("--target", "sim", "--since", "45s") == ["w", "k"]
    r = invoke("events", "--file", str(events_file), "--target", "nobody")
    assert r.exit_code == 0 and "no events" in r.output


def test_events_errors(tmp_path):
    r = invoke("events", "--file", str(tmp_path / "missing.jsonl"))
    assert r.exit_code == 1 and "missing.jsonl: no such file" in r.output   # a typo is not "no events"
    config = tmp_path / "none.toml"
    config.write_text(f'[daemon]\nevents = "{tmp_path / "not-yet.jsonl"}"\n')
    r = invoke("events", "--config", str(config))      # the daemon's own file: none written yet
    assert r.exit_code == 0 and "no events" in r.output
    r = invoke("events", "--file", str(tmp_path / "x"), "--since", "soon")
    assert r.exit_code == 2 and "--since" in r.output
    config = tmp_path / "c.toml"
    config.write_text('[daemon]\nevents = ""\n')
    r = invoke("events", "--config", str(config))
    assert r.exit_code == 2 and "--file" in r.output


def test_pair_events_ignores_orphans_and_junk():
    records = [{"type": "outcome", "id": "x"}, {"type": "decision", "id": 5},
               {"type": "decision", "id": "d"}, {"type": "outcome", "id": "d", "exited": True}]
    paired = status.pair_events(records)
    assert [e["id"] for e in paired] == ["d"] and paired[0]["outcome"]["exited"]


# ------------------------------------------------------------ a running daemon

@needs_pidns
@pytest.mark.slow
def test_status_json_against_a_running_daemon():
    r = run_scenario("""
events = WORK + "/events.jsonl"
statef = WORK + "/state.json"
cfg = f'''
[daemon]
events = "{events}"
state = "{statef}"
[guard]
enabled = false
[[watch]]
name = "big"
cmdline = "hog-big$"
limit = "900M"
[[watch]]
name = "small"
cmdline = "hog-small$"
limit = "500M"
'''
big = start_hog("hog-big", rate_mib=400, cap_mib=160, seconds=30, events=events)
small = start_hog("hog-small", rate_mib=400, cap_mib=40, seconds=30, events=events)
time.sleep(1.0)
d = start_daemon(cfg)
wait_for(lambda: os.path.exists(statef), 10)
time.sleep(1.5)
path = write_config(cfg)
out = subprocess.run([sys.executable, "-m", "memwatchd", "status", "--config", path, "--json"],
                     capture_output=True, text=True)
text = subprocess.run([sys.executable, "-m", "memwatchd", "status", "--config", path],
                      capture_output=True, text=True, env=dict(os.environ, COLUMNS="120"))
mode = os.stat(statef).st_mode & 0o777
stop(d, signal.SIGTERM)
after = subprocess.run([sys.executable, "-m", "memwatchd", "status", "--config", path, "--json"],
                       capture_output=True, text=True)
stop(big); stop(small)
result(view=json.loads(out.stdout), text=text.stdout, rc=out.returncode, err=out.stderr,
       after=json.loads(after.stdout), mode=mode, daemon_pid=d.pid,
       big=big.pid, small=small.pid, log=daemon_log())
""")
    view = r["view"]
    assert r["rc"] == 0, r["err"]
    assert view["running"] is True and view["source"] == "state", view["message"]
    assert view["daemon"]["pid"] == r["daemon_pid"] and view["daemon"]["rss_bytes"] > 4 << 20
    assert r["mode"] == 0o600
    rows = {row["target"]: row for row in view["targets"]}
    assert set(rows) == {"big", "small"}
    assert rows["big"]["pid"] == r["big"] and rows["small"]["pid"] == r["small"]
    assert 160 << 20 <= rows["big"]["usage_bytes"] < 230 << 20, rows["big"]
    assert 40 << 20 <= rows["small"]["usage_bytes"] < 110 << 20, rows["small"]
    assert rows["big"]["limit_bytes"] == 900 << 20 and rows["small"]["limit_bytes"] == 500 << 20
    assert rows["big"]["headroom_bytes"] == (900 << 20) - rows["big"]["usage_bytes"]
    # Written on change (issue 18): the numbers are as old as the state, plus at most the
    # sampling interval they were taken at; the state itself within its heartbeat.
    assert rows["big"]["interval_seconds"] > 0
    assert rows["big"]["sample_age_seconds"] <= view["age_seconds"] + rows["big"]["interval_seconds"] + 0.5
    assert view["age_seconds"] < state.fresh_for(view)
    assert view["daemon"]["state_heartbeat_seconds"] == state.STATE_HEARTBEAT
    # the host numbers say how old they are too, as of now: the tick that wrote them read them
    assert view["age_seconds"] <= view["host"]["sample_age_seconds"] <= view["age_seconds"] + 1.0
    assert "running" in r["text"] and "hog-big" in r["text"] and "RSS" in r["text"]
    after = r["after"]
    assert after["running"] is False and "not running" in after["message"]
    assert {row["target"] for row in after["targets"]} == {"big", "small"}


# ------------------------------------------------------------ first contact (issue 17)

import datetime  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

from memwatchd.types import ConfigError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("text, expected", [
    ("1d", lambda now, midnight: now - 86400),
    ("90s", lambda now, midnight: now - 90),
    ("-1h", lambda now, midnight: now - 3600),
    ("1h ago", lambda now, midnight: now - 3600),
    ("2 days ago", lambda now, midnight: now - 2 * 86400),
    ("1 h 30 min ago", lambda now, midnight: now - 5400),
    ("+30m", lambda now, midnight: now + 1800),
    ("now", lambda now, midnight: now),
    ("today", lambda now, midnight: midnight),
    ("yesterday", lambda now, midnight: midnight - 86400),
    ("tomorrow", lambda now, midnight: midnight + 86400),
    ("07:00", lambda now, midnight: midnight + 7 * 3600),
    ("07:00:30", lambda now, midnight: midnight + 7 * 3600 + 30),
    ("2026-12-01", lambda now, midnight: datetime.datetime(2026, 12, 1).timestamp()),
    ("2026-12-01 07:00", lambda now, midnight: datetime.datetime(2026, 12, 1, 7).timestamp()),
    ("2026-12-01 07:00:05", lambda now, midnight: datetime.datetime(2026, 12, 1, 7, 0, 5).timestamp()),
    ("@1764572400", lambda now, midnight: 1764572400.0),
])
def test_since_and_until_read_what_journalctl_reads(text, expected):
    now = datetime.datetime(2026, 12, 1, 9, 30).timestamp()     # local time, like journalctl
    midnight = datetime.datetime(2026, 12, 1).timestamp()
    assert status.parse_when(text, "--since", now) == pytest.approx(expected(now, midnight))


@pytest.mark.parametrize("text", ["5", "soon", "1 fortnight", "2026-13-01", "25:00", ""])
def test_a_time_journalctl_would_refuse_names_the_flag_and_value(text):
    with pytest.raises(ConfigError) as e:
        status.parse_when(text, "--until")
    assert str(e.value).startswith("--until: expected a time") and repr(text) in str(e.value)


def test_events_until_and_last_n(events_file):
    ids = lambda *a: [json.loads(x)["id"] for x in invoke_apart("events", "--file", str(events_file),
                                                                "--json", *a).stdout.splitlines()]
    assert ids("--until", "45s") == ["old", "a"]
    assert ids("--since", "1h", "--until", "20s") == ["a", "w"]
    assert ids("-n", "2") == ["w", "k"]
    assert ids("--lines", "1", "--target", "sim") == ["k"]
    assert ids("-n", "0") == []
    r = invoke("events", "--file", str(events_file), "-n", "-1")
    assert r.exit_code == 2 and "-n -1" in r.output


def _spawn_events(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("COLUMNS", None)
    return subprocess.Popen([sys.executable, "-m", "memwatchd", "events", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _read_line(proc, timeout=15.0):
    """The next line of proc's stdout within timeout (a thread reads: select() on a buffered
    pipe would miss a second line already in the buffer)."""
    import queue
    import threading
    if not hasattr(proc, "lines"):
        proc.lines = queue.Queue()
        threading.Thread(target=lambda: [proc.lines.put(line) for line in proc.stdout],
                         daemon=True).start()
    try:
        return proc.lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError("no line from events --follow in time") from None


def test_events_follow_prints_new_records_as_they_are_written_and_survives_rotation(tmp_path):
    path = tmp_path / "events.jsonl"
    now = time.time_ns()
    path.write_text(json.dumps(decision("before", "sim", 1, "term", 15, "over-limit", 300 << 20, now)) + "\n")
    proc = _spawn_events("--file", str(path), "--follow", "--json")
    try:
        assert json.loads(_read_line(proc))["id"] == "before"          # what was there
        with open(path, "a") as f:
            f.write(json.dumps(decision("new", "sim", 2, "kill", 9, "over-limit", 310 << 20, now)) + "\n")
            f.write('{"type": "outcome", "id": "new", "exi')            # half a line: wait for it
            f.flush()
            time.sleep(0.8)
            f.write('ted": true, "seconds_to_exit": 0.01}\n')
        first, second = json.loads(_read_line(proc)), json.loads(_read_line(proc))
        assert (first["id"], first["type"]) == ("new", "decision")
        assert (second["id"], second["type"], second["exited"]) == ("new", "outcome", True)
        os.rename(path, tmp_path / "events.jsonl.1")                       # logrotate
        path.write_text(json.dumps(decision("rotated", "guard", 3, "term", 15, "mem-available-low",
                                            400 << 20, now)) + "\n")
        assert json.loads(_read_line(proc))["id"] == "rotated"
    finally:
        proc.kill()
        proc.wait()


def test_events_follow_as_text_is_one_line_per_record(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("")
    proc = _spawn_events("--file", str(path), "--follow", "--target", "sim")
    try:
        time.sleep(3.0)                     # generous: it must be following before we write
        now = time.time_ns()
        with open(path, "a") as f:
            for record in (decision("g", "guard", 5, "term", 15, "mem-available-low", 1 << 30, now),
                           decision("s", "sim", 6, "term", 15, "over-limit", 300 << 20, now),
                           report.outcome_record(event_id="g", exited=True, seconds_to_exit=0.5,
                                                 freed_bytes=1, escalated=False),
                           report.outcome_record(event_id="s", exited=True, seconds_to_exit=0.04,
                                                 freed_bytes=300 << 20, escalated=False)):
                f.write(json.dumps(record) + "\n")
        line1, line2 = _read_line(proc), _read_line(proc)
        assert "sim SIGTERM pid 6 job 300 MiB/200 MiB over-limit [s]" in line1
        assert "outcome of s: exited after 40 ms, freed 300 MiB" in line2
    finally:
        proc.kill()
        proc.wait()


LONG = "/system.slice/" + "very-long-container-name-" * 6 + "end.scope"


@pytest.fixture
def wide_events(tmp_path):
    path = tmp_path / "events.jsonl"
    now = time.time_ns()
    with open(path, "w") as f:
        for i in range(3):
            record = report.decision_record(
                target=f"containers-{i}", pid=None, start_time=None, comm=None, cmdline=None,
                cgroup=LONG, usage_bytes=900 << 20, limit_bytes=800 << 20, reason="over-limit",
                action="kill", signal=9, dry_run=False, time_ns=now - i, event_id=f"c{i}")
            f.write(json.dumps(record) + "\n")
    return path


def test_tables_piped_are_full_width_and_never_wrapped(wide_events):
    """`events | grep` and `status | cat` get whole lines, like systemctl and journalctl."""
    proc = _spawn_events("--file", str(wide_events))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    rows = [line for line in out.splitlines() if "containers-" in line]
    assert len(rows) == 3 and all(LONG in row for row in rows)   # one line each, cgroup whole
    assert "\x1b[" not in out                                      # no colour into a pipe
    assert len({row.index("over-limit") for row in rows}) == 1     # still aligned
    assert not [line for line in out.splitlines() if line != line.rstrip()]   # no trailing blanks


def test_tables_on_a_terminal_fit_its_width_one_line_per_row(wide_events):
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    env = dict(os.environ, PYTHONPATH=REPO, TERM="xterm")
    env.pop("COLUMNS", None)
    proc = subprocess.Popen([sys.executable, "-m", "memwatchd", "events", "--file", str(wide_events)],
                            stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:          # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(30)
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode()).replace("\r", "")
    lines = [line for line in text.split("\n") if line.strip()]
    rows = [line for line in lines if "containers-" in line]
    assert len(rows) == 3, text                                    # truncated, not wrapped
    assert all(len(line) <= 100 for line in lines), [len(x) for x in lines]
    assert all("…" in row for row in rows) and LONG not in text
    assert all("SIGKILL" in row and "900 MiB/800 MiB" in row for row in rows)


FORMATS = open(os.path.join(REPO, "docs", "formats.md")).read()


def _keys(data, prefix=""):
    """Every field name in a JSON object, nested ones too (as "a" and "a.b")."""
    out = set()
    items = data.items() if isinstance(data, dict) else ()
    for key, value in items:
        out.add(key)
        if isinstance(value, dict):
            out |= _keys(value, key + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            out |= _keys(value[0], key + ".")
    return out


def test_every_json_field_is_documented(tmp_path, sleeper):
    """docs/formats.md has a row for every field of the events records, the state file and
    `status --json`; a new field without documentation fails here."""
    import types as pytypes

    from memwatchd.config import load_config
    proc, marker = sleeper
    cfg = load_config(str(write_config(tmp_path, marker)), insecure=True)
    view = json.loads(invoke("status", "-c", str(write_config(tmp_path, marker)), "--json").output)
    fake = pytypes.SimpleNamespace(ticks=1, actions_taken=0, victims={}, host=None, clock=time.monotonic,
                                   targets=pytypes.SimpleNamespace(targets={}))
    daemon_view = state.Publisher(cfg).view(fake, time.monotonic())
    rec = decision("d", "sim", 1, "term", 15, "over-limit", 1, time.time_ns())
    rec["scope"] = "process"
    out = report.outcome_record(event_id="d", exited=True, seconds_to_exit=0.1, freed_bytes=1,
                                escalated=False)
    view["recent_actions"] = [dict(state.action_summary(rec), outcome={"exited": True})]
    undocumented = sorted(k.rsplit(".", 1)[-1] for k in _keys(rec) | _keys(out) | _keys(view) | _keys(daemon_view)
                          if f"`{k.rsplit('.', 1)[-1]}`" not in FORMATS and f".{k.rsplit('.', 1)[-1]}`" not in FORMATS)
    assert not undocumented, f"docs/formats.md does not document: {undocumented}"
    assert rec["format"] == out["format"] == report.EVENT_FORMAT and view["format"] == state.FORMAT


def test_events_follow_picks_up_a_record_that_was_half_written_when_it_started(tmp_path):
    """The listing counts the half line as unreadable, but following goes on from the last
    whole line, so the record is printed once its writer finishes it."""
    path = tmp_path / "events.jsonl"
    now = time.time_ns()
    whole = json.dumps(decision("one", "sim", 1, "term", 15, "over-limit", 300 << 20, now)) + "\n"
    late = json.dumps(decision("two", "sim", 2, "term", 15, "over-limit", 300 << 20, now)) + "\n"
    path.write_text(whole + late[:20])
    proc = _spawn_events("--file", str(path), "--follow", "--json")
    try:
        assert json.loads(_read_line(proc))["id"] == "one"
        time.sleep(1.0)
        with open(path, "a") as f:
            f.write(late[20:])
        assert json.loads(_read_line(proc))["id"] == "two"
    finally:
        proc.kill()
        proc.wait()
