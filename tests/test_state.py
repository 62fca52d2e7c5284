"""The live state file: atomic replacement, permissions, the liveness test, the Publisher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from memwatchd import state
from memwatchd.config import parse_config
from memwatchd.daemon import Daemon, Options

# A reader in another process: parse the file as fast as it can until told to stop;
# print how many reads it made and how many were not a whole JSON document.
READER = textwrap.dedent("""
    import json, os, sys
    path, stop = sys.argv[1], sys.argv[2]
    reads = bad = 0
    while not os.path.exists(stop):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue
        reads += 1
        try:
            doc = json.loads(data)
            if doc["pad"] != "x" * doc["n"]:
                bad += 1
        except (ValueError, KeyError, TypeError):
            bad += 1
    print(reads, bad)
""")


def hammer(tmp_path, write, rounds=3000):
    """Rewrite a file `rounds` times (1 KiB to 256 KiB) while a reader process parses it."""
    path, stop = str(tmp_path / "state.json"), str(tmp_path / "stop")
    write(path, json.dumps({"n": 1, "pad": "x"}).encode())
    reader = subprocess.Popen([sys.executable, "-c", READER, path, stop], stdout=subprocess.PIPE,
                              text=True)
    try:
        for i in range(rounds):
            n = 1024 if i % 2 else 256 * 1024
            write(path, json.dumps({"n": n, "pad": "x" * n}).encode())
    finally:
        open(stop, "w").close()
        out = reader.communicate(timeout=30)[0]
    reads, bad = map(int, out.split())
    return reads, bad


def plain_write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def test_reader_never_sees_half_a_file(tmp_path):
    reads, bad = hammer(tmp_path, lambda p, d: state.write_atomic(p, d))
    assert reads > 1000, reads
    assert bad == 0
    assert sorted(os.listdir(tmp_path)) == ["state.json", "stop"]   # no temp file left behind


def test_the_reader_would_catch_a_torn_file(tmp_path):
    """Control: the same reader against a plain open/write/close does see partial files,
    so the test above would fail for a non-atomic writer."""
    reads, bad = hammer(tmp_path, plain_write)
    assert reads > 100 and bad > 0


@pytest.mark.parametrize("mode,umask", [(0o600, 0o000), (0o644, 0o077)])
def test_mode_is_exactly_as_asked_whatever_the_umask(tmp_path, mode, umask):
    old = os.umask(umask)
    try:
        state.write_atomic(str(tmp_path / "f"), b"{}", mode)
        state.write_atomic(str(tmp_path / "f"), b"{}", mode)   # replacing keeps it too
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f").st_mode & 0o777 == mode


def test_a_planted_temp_link_is_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "state.json"
    tmp = tmp_path / f".state.json.{os.getpid()}.tmp"
    os.symlink(victim, tmp)
    state.write_atomic(str(target), b"{}")
    assert victim.read_text() == "precious" and target.read_bytes() == b"{}"
    os.link(victim, tmp)                       # a hard link is unlinked, not truncated
    state.write_atomic(str(target), b"[]")
    assert victim.read_text() == "precious" and target.read_bytes() == b"[]"


def test_missing_directory_is_created_private(tmp_path):
    path = tmp_path / "run" / "memwatchd" / "state.json"
    state.write_atomic(str(path), b"{}")
    assert os.stat(path.parent).st_mode & 0o777 == 0o700


# -------------------------------------------------------------------- liveness

def me(**extra):
    doc = {"format": state.FORMAT, "written_boottime": state.boottime(),
           "daemon": {"pid": os.getpid(), "start_time": state.proc_start_time(os.getpid())}}
    doc.update(extra)
    return doc


def test_liveness():
    assert state.liveness(None) == "none"
    assert state.liveness(me()) == "running"
    assert state.liveness(me(written_boottime=state.boottime() - 60)) == "stale"
    assert state.liveness(me(written_boottime=state.boottime() + 60)) == "stale"  # not from the future
    recycled = me()
    recycled["daemon"]["start_time"] -= 1          # same pid, another process
    assert state.liveness(recycled) == "dead"
    child = subprocess.Popen(["true"])
    child.wait()
    gone = me()
    gone["daemon"]["pid"] = child.pid
    assert state.liveness(gone) == "dead"
    assert state.liveness(me(daemon=None)) == "dead"


def test_read_state(tmp_path):
    path = str(tmp_path / "s.json")
    assert state.read_state(path) is None
    state.write_atomic(path, json.dumps(me()).encode())
    assert state.read_state(path)["format"] == state.FORMAT
    state.write_atomic(path, b'{"something": "else"}')
    with pytest.raises(ValueError):
        state.read_state(path)


# ------------------------------------------------------------------- publisher

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_daemon(tmp_path, child_pid, clock):
    config = parse_config({
        "daemon": {"events": "", "state": str(tmp_path / "state.json")},
        "guard": {"enabled": False},
        "watch": [{"name": "kid", "pid": child_pid, "limit": "1G", "warn": "900M"}],
    }, "test")
    return Daemon(config, Options(psi_trigger=False, lock_memory=False), clock=clock)


GROWER = ("import sys\nblocks = []\nfor line in sys.stdin:\n"
          "    blocks.append(bytearray(int(line)))\n    print('ok', flush=True)\n")


def test_publisher_writes_on_change_at_most_once_a_second_and_a_heartbeat_when_idle(tmp_path):
    """Issue 18: an unchanged state is not rewritten every second (only every
    STATE_HEARTBEAT); a target whose usage moves is written on the next tick after a
    second has passed, never twice in one second; `status` still calls it running
    between heartbeats and stale once a heartbeat is missed."""
    child = subprocess.Popen([sys.executable, "-c", GROWER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    clock = FakeClock()
    daemon = make_daemon(tmp_path, child.pid, clock)
    path = tmp_path / "state.json"
    writes = []

    def run(seconds):
        for _ in range(int(round(seconds * 10))):   # 100 ms ticks of fake time
            daemon.tick()
            daemon.publisher.after_tick(daemon, 0.001)
            st = os.stat(path)
            if not writes or writes[-1][0] != st.st_ino:   # each write is a new inode (rename)
                host = json.loads(path.read_text())["host"]
                moved = writes and abs(host["mem_available_bytes"] - writes[-1][2]) >= max(
                    state.HOST_MOVED, host["mem_total_bytes"] // 100)
                if moved:   # the shared machine's MemAvailable moved: a change, rightly written
                    writes[-1] = (st.st_ino, writes[-1][1], host["mem_available_bytes"])
                else:
                    writes.append((st.st_ino, clock.now, host["mem_available_bytes"]))
            clock.now += 0.1

    try:
        run(10.0)                                  # idle: the first write only
        assert len(writes) == 1, writes
        view = json.loads(path.read_text())
        assert view["daemon"]["state_heartbeat_seconds"] == state.STATE_HEARTBEAT
        # 10 s after that write, by the real boot clock: still "running" (heartbeat 30 s)
        assert state.liveness(view, now_boot=view["written_boottime"] + 10.0) == "running"
        assert state.liveness(view, now_boot=view["written_boottime"]
                              + state.STATE_HEARTBEAT + state.FRESH_FOR + 1) == "stale"
        usage_before = view["targets"][0]["usage_bytes"]
        child.stdin.write(f"{64 << 20}\n")         # the target really grows by 64 MiB
        child.stdin.flush()
        assert child.stdout.readline().strip() == "ok"
        grew_at = clock.now
        run(3.0)
        assert len(writes) == 2, writes            # written once for the change, not again
        assert writes[1][1] - grew_at <= 1.1       # within a second of fake time
        view = json.loads(path.read_text())
        assert view["targets"][0]["usage_bytes"] >= usage_before + (60 << 20)
        run(state.STATE_HEARTBEAT + 1.0)           # idle again: one heartbeat write
        assert len(writes) == 3, writes
        assert writes[2][1] - writes[1][1] == pytest.approx(state.STATE_HEARTBEAT, abs=0.15)
        gaps = [b[1] - a[1] for a, b in zip(writes, writes[1:])]
        assert min(gaps) >= 1.0 - 1e-6             # never more than once a second
        view = json.loads(path.read_text())
        assert os.stat(path).st_mode & 0o777 == 0o600
        row, = view["targets"]
        assert row["target"] == "kid" and row["pid"] == child.pid and row["kind"] == "pid"
        assert 0 < row["usage_bytes"] < 200 << 20 and row["limit_bytes"] == 1 << 30
        assert row["headroom_bytes"] == row["limit_bytes"] - row["usage_bytes"]
        assert row["warn_bytes"] == 900 << 20 and row["interval_seconds"] > 0
        assert 0 <= row["sample_age_seconds"] <= 1.0
        assert view["daemon"]["pid"] == os.getpid() and view["daemon"]["rss_bytes"] > 1 << 20
        assert view["host"]["mem_total_bytes"] > 0
        assert state.liveness(view) == "running"
    finally:
        daemon.close()
        child.kill()
        child.wait()


def test_a_record_or_a_reload_is_written_on_the_next_tick(tmp_path):
    child = subprocess.Popen(["sleep", "30"])
    clock = FakeClock()
    daemon = make_daemon(tmp_path, child.pid, clock)
    path = tmp_path / "state.json"
    try:
        daemon.tick()
        daemon.publisher.after_tick(daemon, 0.001)
        first = os.stat(path).st_ino
        clock.now += 1.5
        daemon.tick()
        daemon.publisher.after_tick(daemon, 0.001)
        assert os.stat(path).st_ino == first       # nothing changed: not rewritten
        daemon.publisher.on_record({"type": "decision", "id": "1-9", "target": "kid",
                                    "pid": child.pid, "action": "warn"})
        daemon.tick()
        daemon.publisher.after_tick(daemon, 0.001)
        second = os.stat(path).st_ino
        assert second != first
        assert json.loads(path.read_text())["recent_actions"][0]["id"] == "1-9"
        clock.now += 1.5
        daemon.publisher.reconfigure(daemon.config)
        daemon.tick()
        daemon.publisher.after_tick(daemon, 0.001)
        assert os.stat(path).st_ino != second
    finally:
        daemon.close()
        child.kill()
        child.wait()


def test_liveness_follows_the_heartbeat_the_state_names():
    """A state from a daemon before issue 18 (no heartbeat field) is stale after
    FRESH_FOR; one that names its heartbeat, after heartbeat + FRESH_FOR; a bogus
    heartbeat counts as none."""
    base = me()
    now = state.boottime()
    old = dict(base, written_boottime=now - (state.FRESH_FOR + 1))
    assert state.liveness(old, now_boot=now) == "stale"
    beat = dict(base, daemon=dict(base["daemon"], state_heartbeat_seconds=30.0))
    assert state.liveness(dict(beat, written_boottime=now - 20), now_boot=now) == "running"
    assert state.liveness(dict(beat, written_boottime=now - 36), now_boot=now) == "stale"
    for bogus in (True, "30", -1, 1e9):
        bad = dict(base, daemon=dict(base["daemon"], state_heartbeat_seconds=bogus),
                   written_boottime=now - 20)
        assert state.liveness(bad, now_boot=now) == "stale", bogus


def test_publisher_pairs_outcomes_with_their_decision_and_remembers_per_target(tmp_path):
    child = subprocess.Popen(["sleep", "30"])
    daemon = make_daemon(tmp_path, child.pid, FakeClock())
    try:
        daemon.tick()
        pub = daemon.publisher
        pub.on_record({"type": "decision", "id": "1-9", "target": "kid", "pid": child.pid,
                       "comm": "sleep", "cgroup": "/", "action": "term", "signal": "SIGTERM",
                       "reason": "over-limit", "usage_bytes": 5, "limit_bytes": 4,
                       "time": "2024-01-01T00:00:00.000Z", "dry_run": False})
        pub.on_record({"type": "outcome", "id": "1-9", "exited": True, "seconds_to_exit": 0.25,
                       "freed_bytes": 5, "escalated": False})
        view = pub.view(daemon, daemon.clock())
        assert view["recent_actions"][0]["outcome"]["seconds_to_exit"] == 0.25
        assert view["targets"][0]["last_action"]["signal"] == "SIGTERM"
        for i in range(100):   # other processes of the same watch: bounded memory
            pub.on_record({"type": "decision", "id": f"x-{i}", "target": "kid", "pid": 10_000 + i,
                           "action": "warn"})
        assert len(pub.recent) == state.RECENT and len(pub.last_by_target) <= 4 * state.RECENT
    finally:
        daemon.close()
        child.kill()
        child.wait()


def test_unwritable_state_is_logged_once_and_the_loop_goes_on(tmp_path, capsys):
    from memwatchd import report
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = parse_config({"daemon": {"events": "", "state": str(blocker / "state.json")},
                           "guard": {"enabled": False}}, "test")
    clock = FakeClock()
    daemon = Daemon(config, Options(psi_trigger=False, lock_memory=False), clock=clock)
    report.set_stream(sys.stderr, plain=True)
    try:
        for _ in range(5):
            daemon.tick()
            daemon.publisher.after_tick(daemon, 0.001)
            clock.now += 1.5
    finally:
        report.set_stream(None)
        daemon.close()
    assert capsys.readouterr().err.count("could not write the state file") == 1


def test_without_metrics_prometheus_client_is_never_imported(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from memwatchd.config import parse_config
        from memwatchd.daemon import Daemon, Options
        config = parse_config({{"daemon": {{"events": "", "state": "{tmp_path}/s.json"}},
                                "guard": {{"enabled": False}}}}, "t")
        d = Daemon(config, Options(psi_trigger=False, lock_memory=False))
        d.publisher.start()
        d.tick()
        d.publisher.after_tick(d, 0.001)
        d.close()
        print(sorted(m for m in sys.modules if m.startswith(("prometheus", "rich", "typer"))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "s.json").exists()


def test_a_state_write_the_kernel_holds_up_does_not_hold_up_the_loop(tmp_path, monkeypatch):
    """Writing state.json on /run allocates pages, which under a thrash reclaims for
    seconds (the guest's loop blocked in that open() until systemd's watchdog killed
    memwatchd). A reclaim stall cannot be made on demand here, so an open() that waits
    on a gate stands in for it. The writer waits its 50 ms once, takes newer content
    meanwhile without waiting, and writes the newest once the kernel lets it."""
    import os
    import threading
    import time

    from memwatchd import files
    results = []
    writer = files.BackgroundWriter(lambda path, error: results.append((path, error)))
    path = tmp_path / "state.json"
    assert writer.submit(str(path), b"one\n") and path.read_bytes() == b"one\n"
    assert results == [(str(path), None)]
    gate, real_open = threading.Event(), os.open

    def held_open(name, *args, **kwargs):
        if os.path.dirname(str(name)) == str(tmp_path):
            gate.wait(10)
        return real_open(name, *args, **kwargs)
    monkeypatch.setattr(files.os, "open", held_open)
    started = time.monotonic()
    assert not writer.submit(str(path), b"two\n")
    assert time.monotonic() - started < 0.5 and writer.busy
    started = time.monotonic()
    assert not writer.submit(str(path), b"three\n")     # held up already: no wait at all
    assert time.monotonic() - started < 0.02
    gate.set()
    assert writer.flush(5) and not writer.busy
    assert path.read_bytes() == b"three\n"               # the newest content, last
    assert [e for _, e in results] == [None, None, None]  # "two" was in flight: it finished
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
    monkeypatch.setattr(files.os, "open", real_open)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "state.json").mkdir()             # cannot be replaced by a file
    assert writer.submit(str(tmp_path / "ro" / "state.json"), b"x\n")
    assert results[-1][0].endswith("ro/state.json") and isinstance(results[-1][1], OSError)
