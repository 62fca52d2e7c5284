"""The trace format: ring, reader, damage, bad input, the daemon's hook, the config keys."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memwatchd import trace
from memwatchd.config import parse_config
from memwatchd.replay import replay
from memwatchd.types import ConfigError

from .trace_lib import SyntheticDaemon, config_for

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
GOLDEN = sorted(f for f in os.listdir(DATA) if f.endswith(".trace.gz"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows_of(line: str) -> list:
    """The readings of one trace line, in either form: {"t": "s", "r": [...]} or format 2's
    [m, id, usage, id, usage, ...]."""
    obj = json.loads(line)
    if isinstance(obj, list):
        return [obj[i:i + 2] for i in range(1, len(obj), 2)]
    return obj.get("r", [])


_V2 = []


def golden_lines(name: str) -> list:
    if name == "synthetic-v2":   # format 2 (compact lines), written once by the real Recorder
        if not _V2:
            import tempfile
            with tempfile.TemporaryDirectory() as d:
                synthetic(trace.FileSink(os.path.join(d, "t")), n=3, seconds=60.0, limit="600M").trace.close()
                _V2.extend(open(os.path.join(d, "t"), "rb").read().splitlines(keepends=True))
        return list(_V2)
    with gzip.open(os.path.join(DATA, name), "rb") as f:
        return f.read().splitlines(keepends=True)


def write(path, lines) -> str:
    with open(path, "wb") as f:
        f.write(b"".join(lines))
    return str(path)


def synthetic(sink, n=5, seconds=60.0, **kw):
    config = config_for(n, **kw)
    daemon = SyntheticDaemon(config)
    daemon.trace = trace.Recorder(sink, config, daemon)
    daemon.run(seconds)
    return daemon


# ------------------------------------------------------------------ format

def test_every_golden_trace_reads_without_damage_and_has_header_fields():
    assert len(GOLDEN) >= 6
    for name in GOLDEN:
        t = trace.read_trace(os.path.join(DATA, name))
        assert t.damage == [], name
        h = t.header
        assert h["format"] == 1 and h["memwatchd"] and h["kernel"]   # recorded before format 2
        assert h["mem_total"] > 0 and "swap_total" in h and h["config"]["watch"]
        assert t.clean_end and t.runs and t.samples
        run = next(iter(t.runs.values()))
        assert run.gone is not None and run.peak > 20 << 20, name   # they really allocated


def test_idle_target_is_not_rewritten_and_a_move_of_more_than_1_in_256_is(tmp_path):
    """Record on change: a target whose usage stays within 1/256 writes nothing after its
    first reading; a bigger move is written; the short row form carries no limit."""
    config = config_for(1)
    daemon = SyntheticDaemon(config)
    path = tmp_path / "t.ndjson"
    daemon.trace = trace.Recorder(trace.FileSink(str(path)), config, daemon)
    base = 400 << 20
    daemon.run(30, usage=lambda i, t: base + (4096 if int(t) % 2 else 0))   # jitter: 1 page
    daemon.run(1, usage=lambda i, t: base + (base >> 7))                   # a real move
    daemon.trace.close()
    rows = [r for line in path.read_text().splitlines() for r in rows_of(line)]
    assert len(rows) == 2, rows
    assert len(rows[0]) == 4 and rows[1] == [1, base + (base >> 7)]
    t = trace.read_trace(str(path))
    assert [s.rows[0][1:4] for s in t.samples if s.rows] == [(base, 1 << 30, None),
                                                            (base + (base >> 7), 1 << 30, None)]


def test_a_target_parked_above_warn_is_written_at_its_crossings_and_replays_the_same(tmp_path):
    """Above its warn level (warned, nothing else pending) a steady target writes nothing more;
    the crossing up, the fall below the re-arm level and the next crossing are written, and
    replay reproduces both warnings and the SIGTERM at the limit at the same times."""
    config = parse_config({"daemon": {"dry_run": True}, "guard": {"enabled": False},
                           "watch": [{"name": "job-0", "pid": 1000, "limit": "1G", "warn": "800M",
                                      "sustain": "2s"}]}, "synthetic")
    daemon = SyntheticDaemon(config)
    path = tmp_path / "t.ndjson"
    daemon.trace = trace.Recorder(trace.FileSink(str(path)), config, daemon)
    mib = 1 << 20

    def usage(i, t):
        if t < 5:
            return 500 * mib
        if t < 60:
            return 850 * mib + (4096 if int(t * 10) % 2 else 0)    # parked above warn
        if t < 65:
            return 600 * mib                                      # below warn * 0.9: re-armed
        if t < 70:
            return 850 * mib
        return 1100 * mib                                         # over the limit, sustained
    daemon.run(80, usage=usage)
    daemon.trace.close()
    text = path.read_text().splitlines()
    lines = [json.loads(l) for l in text]
    m = [l[0] if isinstance(l, list) else l["m"] for l in lines]
    t0 = m[0]
    parked = sum(len(rows_of(l)) for l, t in zip(text, m) if t0 + 5.5 < t < t0 + 59.5)
    rearmed = sum(len(rows_of(l)) for l, t in zip(text, m) if t0 + 60.5 < t < t0 + 64.5)
    live = [d for l in lines if isinstance(l, dict) for d in l.get("d", [])]
    assert [(d["kind"], d["reason"]) for d in live] == [
        ("warn", "warn-level"), ("warn", "warn-level"), ("signal", "over-limit")]
    # parked above warn for 54 s the daemon samples ~27 times a second (150 MiB of headroom at
    # the 4G/s fill rate): none of those ~1500 readings is written, nor below the re-arm level
    assert parked == 0 and rearmed == 0, (parked, rearmed)
    result = replay(trace.read_trace(str(path)))
    assert [(d.kind, d.reason) for d in result.decisions] == [(d["kind"], d["reason"]) for d in live]
    # within one sample (times are written to 0.1 ms, so a timer may fire one 10 ms tick apart)
    assert all(d.match is not None and abs(d.match.t - d.t) <= 0.0101 for d in result.decisions)


def test_ring_drops_oldest_segments_keeps_its_cap_and_survives_a_restart(tmp_path):
    ring = tmp_path / "ring"
    d = synthetic(trace.RingSink(str(ring), 2**20), n=30, seconds=900)   # ~1.1 MiB of format 2
    d.trace.close()
    files = trace.segment_files(str(ring))
    sizes = [os.path.getsize(f) for f in files]
    assert 2 <= len(files) <= trace.SEGMENTS + 1
    assert sum(sizes) <= 2**20 + 2**20 // trace.SEGMENTS + 4096
    assert trace._segment_seq(files[0]) > 1            # the first ones were dropped
    first_seq = [trace._segment_seq(f) for f in files]
    t1 = trace.read_trace(str(ring))
    assert t1.damage == [] and len(t1.runs) == 30      # segments continue the same runs
    # a restart: a new segment after the last, what came before is kept
    d2 = SyntheticDaemon(config_for(30), clock_start=d.now + 5)
    d2.trace = trace.Recorder(trace.RingSink(str(ring), 2**20), d2.config, d2)
    d2.run(5)
    d2.trace.close()
    files2 = trace.segment_files(str(ring))
    assert trace._segment_seq(files2[-1]) == first_seq[-1] + 1
    t2 = trace.read_trace(str(ring))
    assert t2.start == t1.start and t2.end >= d.now + 5 and t2.damage == []


def test_each_ring_segment_replays_on_its_own(tmp_path):
    ring = tmp_path / "ring"
    d = synthetic(trace.RingSink(str(ring), 2**20), n=20, seconds=400, limit="600M")
    d.trace.close()
    last = trace.segment_files(str(ring))[-1]
    t = trace.read_trace(last)
    assert t.header["continues"] and t.damage == [] and len(t.runs) == 20
    assert all(run.samples for run in t.runs.values())   # the keyframe gives every target a value


def test_a_disk_that_holds_the_trace_up_never_holds_up_the_loop_and_the_gap_is_marked(tmp_path):
    """The recorder's lines are written by their own thread. With every write held by the
    kernel (a FIFO that nobody reads: write() blocks, as on a congested disk) each tick
    returns at once; past the backlog ticks are dropped, not queued without end. Once the
    writes flow again, a new header names the gap and a keyframe follows: the whole trace
    reads back without damage, and its replay says what it did not see. (When the loop
    wrote the trace itself, it blocked in write(): in the guest it saw nothing for 17 s.)"""
    import threading
    fifo = str(tmp_path / "trace.fifo")
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)   # open, never read: writes block
    config = config_for(30, limit="600M")
    daemon = SyntheticDaemon(config)
    daemon.trace = trace.Recorder(trace.FileSink(fifo), config, daemon)
    daemon.trace.sink.backlog = 128 * 1024   # the pipe takes 64 KiB, then holds every write
    loop = threading.Thread(target=daemon.run, args=(300,), daemon=True)   # ~370 KiB of lines
    loop.start()
    loop.join(60)
    assert not loop.is_alive(), "the loop blocked on the trace's writes"
    held = daemon.trace.dropped
    assert held > 0 and daemon.trace.sink.behind() and not daemon.trace.broken
    queued = daemon.trace.sink.queued - daemon.trace.sink.written
    assert queued < 128 * 1024 + 64 * 1024, queued    # bounded: dropped, not queued

    got = []
    os.set_blocking(reader, True)
    drain = threading.Thread(target=lambda: got.extend(iter(lambda: os.read(reader, 1 << 16), b"")),
                             daemon=True)
    drain.start()
    for _ in range(200):
        if not daemon.trace.sink.behind():
            break
        threading.Event().wait(0.05)
    start_again = daemon.now
    # the drain keeps up now; a wide backlog keeps a busy machine's slower drain thread
    # from making a second gap (this part checks what the caught-up trace reads back)
    daemon.trace.sink.backlog = 64 * 2**20
    daemon.run(30)
    daemon.trace.close()
    drain.join(30)
    os.close(reader)
    path = tmp_path / "trace.ndjson"
    path.write_bytes(b"".join(got))
    t = trace.read_trace(str(path))
    assert t.damage == [] and t.clean_end
    gaps = [h for h in t.headers if "dropped" in h]
    assert len(gaps) == 1 and gaps[0]["dropped"] == held and gaps[0]["continues"]
    assert gaps[0]["dropped_since"] < start_again <= gaps[0]["m"] + 1
    assert len(t.runs) == 30 and all(run.samples for run in t.runs.values())
    notes = replay(t).notes
    assert any("held its trace up: %d ticks" % held in n for n in notes), notes


def test_a_trace_write_error_stops_recording_never_the_loop(tmp_path, capsys):
    """A disk that fails (ENOSPC: /dev/full) fails the writer thread's write; the loop's
    next tick learns of it, logs it once and records nothing more, and goes on."""
    config = config_for(3)
    daemon = SyntheticDaemon(config)
    daemon.trace = trace.Recorder(trace.FileSink("/dev/full"), config, daemon)
    for _ in range(100):
        daemon.run(5)
        if daemon.trace.broken:
            break
        threading_wait(0.02)
    assert daemon.trace.broken
    daemon.run(5)   # and the loop goes on
    daemon.trace.close()
    err = capsys.readouterr().err
    assert err.count("recording stopped") == 1 and "/dev/full" in err, err


def threading_wait(seconds: float) -> None:
    import threading
    threading.Event().wait(seconds)


# --------------------------------------------------------------- bad input

def test_a_newer_format_is_refused_naming_file_and_versions(tmp_path):
    lines = golden_lines("leak.trace.gz")
    header = json.loads(lines[0])
    header["format"] = trace.FORMAT + 1
    path = write(tmp_path / "new.trace", [json.dumps(header).encode() + b"\n"] + lines[1:])
    with pytest.raises(trace.TraceError) as e:
        trace.read_trace(path)
    assert path in str(e.value) and f"format {trace.FORMAT + 1} is newer" in str(e.value)
    assert "upgrade memwatchd" in str(e.value)


@pytest.mark.parametrize("content, message", [
    (b"", "empty or truncated before its header"),
    (b'{"t":"head', "empty or truncated before its header"),
    (b"hello\n", "not a memwatchd trace (line 1 is not JSON)"),
    (b'{"t":"s","m":1}\n', "line 1 is not a header"),
])
def test_files_that_are_not_traces_are_refused_naming_the_file(tmp_path, content, message):
    path = write(tmp_path / "x.trace", [content])
    with pytest.raises(trace.TraceError) as e:
        trace.read_trace(path)
    assert path in str(e.value) and message in str(e.value)


def test_a_torn_last_line_and_a_truncated_gzip_are_reported_not_raised(tmp_path):
    lines = golden_lines("leak.trace.gz")
    torn = write(tmp_path / "torn.trace", lines[:40] + [lines[40][:25]])
    t = trace.read_trace(torn)
    assert any("line 41: truncated line" in d and torn in d for d in t.damage)
    assert len(t.samples) > 10
    raw = open(os.path.join(DATA, "leak.trace.gz"), "rb").read()
    cut = tmp_path / "cut.trace.gz"
    cut.write_bytes(raw[:len(raw) // 2])
    t = trace.read_trace(str(cut))
    assert any("compressed data ends early" in d and str(cut) in d for d in t.damage)
    replay(t)   # what was read still replays


def test_missing_file_and_empty_ring_directory_are_clear_errors(tmp_path):
    with pytest.raises(trace.TraceError, match="nope.trace: cannot read"):
        trace.read_trace(str(tmp_path / "nope.trace"))
    with pytest.raises(trace.TraceError, match="no trace segments"):
        trace.read_trace(str(tmp_path))


def _m(line: bytes):
    try:
        obj = json.loads(line)
        return obj[0] if isinstance(obj, list) else obj["m"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None


DAMAGE = st.lists(st.tuples(st.sampled_from(["cut", "swap", "drop", "garbage", "dup"]),
                            st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(GOLDEN + ["synthetic-v2"]), ops=DAMAGE, cut_at=st.integers(0, 10**6))
def test_replay_never_raises_on_damaged_traces_and_reports_the_damage(tmp_path, name, ops, cut_at):
    lines = golden_lines(name)
    for op, a, b in ops:
        if len(lines) < 3:
            break
        i, j = 1 + a % (len(lines) - 1), 1 + b % (len(lines) - 1)
        if op == "cut":                      # a line torn in the middle
            lines[i] = lines[i][:max(1, len(lines[i]) // 2)]
        elif op == "swap" and i != j:
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "drop":
            del lines[i]
        elif op == "garbage":
            lines.insert(i, b"\x00\xff{not json\n")
        elif op == "dup":
            lines.insert(i, lines[j])
    ms = [_m(line) if line.endswith(b"\n") else None for line in lines]
    detectable = None in ms or any(b < a for a, b in zip(ms, ms[1:]))
    path = write(tmp_path / "damaged.trace", lines)
    try:
        t = trace.read_trace(path)
    except trace.TraceError as e:
        assert path in str(e)
        return
    result = replay(t)
    if detectable:
        assert result.damage, ops
    for d in result.decisions:
        assert d.t >= t.start and d.key[0] in ("process", "cgroup")


# ------------------------------------------------------- config, daemon hook

def test_trace_keys_are_validated_like_every_key():
    ok = parse_config({"daemon": {"trace": "/var/lib/memwatchd/trace", "trace_size": "16M"}}, "f")
    assert ok.daemon.trace == "/var/lib/memwatchd/trace" and ok.daemon.trace_size == 16 << 20
    assert parse_config({}, "f").daemon.trace == ""
    assert parse_config({}, "f").daemon.trace_size == trace.DEFAULT_SIZE
    for table, message in [({"trace": "relative/dir"}, "daemon.trace: expected an absolute path"),
                           ({"trace": 3}, "daemon.trace: expected a path string"),
                           ({"trace_size": "100K"}, "daemon.trace_size: expected an absolute size of at least 1M"),
                           ({"trace_size": "10%"}, "daemon.trace_size: expected an absolute size"),
                           ({"trace_sise": "1G"}, "did you mean 'trace_size'")]:
        with pytest.raises(ConfigError) as e:
            parse_config({"daemon": table}, "f.toml")
        assert message in str(e.value) and "f.toml" in str(e.value)


HOOK_PY = r"""
import sys, json
from memwatchd.config import parse_config
from memwatchd.daemon import Daemon, Options
cfg = parse_config({"daemon": {"events": "", "state": "", "trace": sys.argv[1]},
                    "guard": {"enabled": False}}, "t")
d = Daemon(cfg, Options(lock_memory=False, psi_trigger=False))
loaded = "memwatchd.trace" in sys.modules
d.tick()
d.apply_config(cfg)                                  # a reload: a new header
d.tick()
d.apply_config(cfg._replace(daemon=cfg.daemon._replace(trace="")))   # tracing turned off
off = d.trace is None
d.close()
print(json.dumps({"loaded": loaded, "off": off}))
"""


@pytest.mark.parametrize("traced", [False, True])
def test_the_daemon_imports_trace_only_when_tracing_is_on(tmp_path, traced):
    ring = str(tmp_path / "ring") if traced else ""
    out = subprocess.run([sys.executable, "-c", HOOK_PY, ring], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=True)
    got = json.loads(out.stdout)
    assert got["loaded"] is traced and got["off"]
    if traced:
        t = trace.read_trace(ring)
        assert t.clean_end and t.header["config"]["guard"]["enabled"] is False
        assert len(t.headers) == 2 and not t.headers[1]["continues"]
        assert t.samples and t.samples[0].host is not None   # the host sample of the one tick


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                           | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
                               st.text(max_size=3), inner, max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(GOLDEN + ["synthetic-v2"]), edits=st.lists(st.tuples(
    st.integers(0, 10**6), st.sampled_from(["t", "m", "r", "h", "g", "c", "d", "k", "id", "key",
                                            "watch", "kind", "config", "format", "e"]),
    JSON_VALUES), min_size=1, max_size=4))
def test_replay_never_raises_on_hostile_field_values(tmp_path, name, edits):
    """Any field of any line replaced by any JSON value: a clear TraceError naming the file,
    or a replay (with the damage listed); never another exception."""
    lines = golden_lines(name)
    for i, key, value in edits:
        i %= len(lines)
        obj = json.loads(lines[i])
        if isinstance(obj, list):   # a compact line [m, id, usage, ...]: one of its elements
            obj[sum(map(ord, key)) % len(obj)] = value
        else:
            obj[key] = value
        lines[i] = json.dumps(obj).encode() + b"\n"
    path = write(tmp_path / "hostile.trace", lines)
    try:
        t = trace.read_trace(path)
        replay(t)
    except (trace.TraceError, ConfigError) as e:
        assert path in str(e)


def test_a_recorded_config_from_before_units_were_required_still_loads():
    """Traces written before issue 17 hold bytes as bare numbers and a grace for every
    watch; replay must still read them (tests/data's golden traces are such traces)."""
    from memwatchd.config import parse_config
    from memwatchd.trace import config_dict, loadable_config
    old = {"daemon": {"interval": "1.0s", "min_interval": "0.01s", "fill_rate": 4294967296,
                      "cooldown": "5.0s", "dry_run": True},
           "guard": {"enabled": False, "min_available": "5%", "kill_available": "2%",
                     "psi_full_avg10": 0.0, "grace": "5.0s"},
           "watch": [{"name": "a", "pid": 5, "limit": "104857600", "action": "kill", "grace": "10.0s",
                      "sustain": "0.0s", "scope": "process", "usage": "rss"}]}
    with pytest.raises(ConfigError):
        parse_config(old, "t")                      # today's parser alone refuses it
    c = parse_config(loadable_config(old), "t")
    assert c.daemon.fill_rate == 4 << 30 and c.watches[0].limit.bytes == 100 << 20
    assert old["daemon"]["fill_rate"] == 4294967296 and "grace" in old["watch"][0]   # untouched
    again = parse_config(config_dict(c), "t")        # what is written now needs no help
    assert again.daemon == c.daemon and again.watches == c.watches


def test_the_recorded_config_replays_every_guard_key_as_it_ran():
    """A trace's header config is what its replay runs with by default: every [guard] key
    must come back as set (psi_refaults, psi_io_full and predict were once left out, so a
    replay ran the defaults instead)."""
    from memwatchd.config import GuardConfig, parse_config
    from memwatchd.trace import config_dict, loadable_config
    changed = {"enabled": True, "min_available": "7%", "kill_available": "100M", "count_swap": False,
               "psi_full": 9, "psi_full_kill": 60, "psi_some": 40, "psi_io_full": 35,
               "psi_window": "3s", "psi_available": "30%", "psi_refaults": "2M",
               "grace": "8s", "predict": "30s"}
    assert set(changed) == set(GuardConfig._fields)      # a new key must be added here too
    c = parse_config({"guard": changed}, "t")
    assert all(getattr(c.guard, k) != getattr(GuardConfig(), k) for k in changed if k != "enabled")
    assert parse_config(loadable_config(config_dict(c)), "t").guard == c.guard


# ------------------------------------------------------ the streaming reader

EXPECTED = os.path.join(DATA, "replay-expected.json")


def _golden_cases():
    sys.path.insert(0, DATA)
    try:
        import replay_expected
    finally:
        sys.path.remove(DATA)
    return replay_expected


@pytest.mark.parametrize("name", _golden_cases().golden_traces())
def test_streaming_replay_decides_exactly_as_the_full_reader_did_on_every_golden_trace(name):
    """tests/data/replay-expected.json is what replay decided on each golden trace with the
    old full reader (every sample in a list; main at 214d267, see tests/data/replay_expected.py),
    with the recorded config, every limit halved and predict on/off. Streaming (each sample
    replayed as it is read) must give the same decisions, matches, divergences, ticks and
    notes; and so must today's read_trace (the list) replayed twice."""
    cases = _golden_cases()
    expected = json.load(open(EXPECTED))
    path = os.path.join(DATA, name)
    full = trace.read_trace(path)
    for label, config in cases.variants(replay_recorded(full)).items():
        want = expected[f"{name} {label}"]
        streamed = trace.open_trace(path, stats=False)
        got = cases.outcome(replay(streamed, config))
        assert json.loads(json.dumps(got)) == want, (name, label)
        assert streamed.samples is None and streamed.complete
        assert json.loads(json.dumps(cases.outcome(replay(full, config)))) == want, (name, label)


def replay_recorded(t):
    from memwatchd.replay import recorded_config
    return recorded_config(t)


def test_a_streamed_trace_is_read_once_and_says_so():
    t = trace.open_trace(os.path.join(DATA, "leak.trace.gz"))
    replay(t)
    with pytest.raises(RuntimeError, match="streamed already"):
        replay(t)


def _v2_trace(tmp_path, n=4, seconds=60.0) -> str:
    """A format-2 trace from the real Recorder: compact lines and object lines mixed (job-0
    leaks past its 600M limit at 50 s: a decision line)."""
    path = tmp_path / "v2.trace"
    synthetic(trace.FileSink(str(path)), n=n, seconds=seconds, limit="600M").trace.close()
    return str(path)


def test_the_recorder_writes_format_2_compact_lines_and_both_forms_read_the_same(tmp_path):
    """Format 2's common line is [m, id, usage, ...]; written as the object form it stands for
    ({"t": "s", "m": m, "r": [[id, usage], ...]}, format 1) the same trace reads to the same
    samples and replays to the same decisions."""
    path = _v2_trace(tmp_path)
    lines = open(path).read().splitlines(keepends=True)
    assert json.loads(lines[0])["format"] == trace.FORMAT >= 2
    compact = [l for l in lines if l.startswith("[")]
    assert len(compact) > len(lines) // 2                    # the common line
    as_v1 = []
    for line in lines:
        obj = json.loads(line)
        if isinstance(obj, list):
            obj = {"t": "s", "m": obj[0], "r": [obj[i:i + 2] for i in range(1, len(obj), 2)]}
        elif obj["t"] == "header":
            obj["format"] = 1
        as_v1.append(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    v1 = write(tmp_path / "v1.trace", as_v1)
    assert sum(map(len, as_v1)) > 1.2 * os.path.getsize(path)   # the compact line is smaller
    a, b = trace.read_trace(path), trace.read_trace(v1)
    assert a.damage == [] and b.damage == []
    assert a.samples == b.samples and len(a.samples) > 100
    da, db = replay(a).decisions, replay(b).decisions
    assert da and [(d.t, d.key, d.reason, d.signal) for d in da] == [(d.t, d.key, d.reason, d.signal) for d in db]
    # a compact line in a format-1 file is not a record of that format: reported
    mixed = write(tmp_path / "mixed.trace", as_v1[:5] + [compact[0].encode()] + as_v1[5:])
    t = trace.read_trace(mixed)
    assert any(f"{mixed} line 6: not a trace record" in d for d in t.damage)


def _cuts(line: str):
    """Where a write can tear a line: after every character but the newline."""
    return range(1, len(line) - 1)


def test_a_torn_line_is_reported_with_file_and_line_and_never_merges_with_the_next(tmp_path):
    """A write torn at any byte of a line (then the next line written after it, as after a
    crash and restart) is reported naming the file and the torn line's number, in both line
    forms; the lines around it are read. Per-line parsing: a torn line can never join its
    neighbour into a valid record unnoticed."""
    lines = open(_v2_trace(tmp_path, n=3)).read().splitlines(keepends=True)
    picks = [i for i, l in enumerate(lines) if l.startswith("[")][5:8] + \
        [i for i, l in enumerate(lines) if l.startswith('{"t":"s"') and '"d":' in l]
    assert len(picks) == 4
    expected = len(trace.read_trace(write(tmp_path / "whole.trace", [l.encode() for l in lines])).samples)
    for i in picks:
        for cut in _cuts(lines[i]):
            torn = lines[:i] + [lines[i][:cut] + lines[i + 1]] + lines[i + 2:]
            path = write(tmp_path / "torn.trace", [l.encode() for l in torn])
            t = trace.read_trace(path)
            assert any(d.startswith(f"{path} line {i + 1}: ") for d in t.damage), (i, cut, t.damage)
            # the torn line and the one it swallowed are lost, nothing else
            assert expected - 2 <= len(t.samples) <= expected - 1, (i, cut)
    # garbage, invalid UTF-8 and a hostile compact line: reported by line too
    for bad, what in [(b"\x00\xff{not json\n", "not JSON"), (b'[1.5,"x\xff",3]\n', "not JSON"),
                      (b"[1.5,1]\n", "not a trace record"), (b"[1.5,1,true]\n", "malformed reading"),
                      (b"[1.5,999,5]\n", "for a target whose record was lost")]:
        path = write(tmp_path / "bad.trace", [l.encode() for l in lines[:10]] + [bad]
                     + [l.encode() for l in lines[10:]])
        t = trace.read_trace(path)
        assert any(d.startswith(f"{path} line 11: ") and what in d for d in t.damage), (bad, t.damage)


def test_replay_streams_a_long_trace_in_bounded_memory(tmp_path):
    """An hour of 30 targets (a third of them moving every sample, one leaking past its limit
    at the end), replayed as it is read: the Sample objects alive at any moment (counted by the
    garbage collector, whoever holds them) stay within the reader's reorder window, while the
    trace has 20 times as many; and the replay still sees the end (the leak's decision)."""
    import gc
    mib = 1 << 20
    cfg = config_for(30)
    header = {"t": "header", "format": 2, "memwatchd": "t", "kernel": "t", "boot_id": "b",
              "mem_total": 24 << 30, "swap_total": 0, "m": 0.0, "w": 1.7e9, "continues": False,
              "source": "synthetic", "config": trace.config_dict(cfg)}
    out = [json.dumps(header)]
    out += [json.dumps({"t": "target", "m": 0.0, "id": i + 1, "key": ["process", 1000 + i, 5000 + i],
                        "watch": f"job-{i}", "kind": "process", "comm": "j", "cmdline": "j", "cgroup": "/"})
            for i in range(30)]
    out.append(json.dumps({"t": "s", "m": 0.0, "r": [[i + 1, 100 * mib, 1 << 30, None] for i in range(30)]}))
    window, lines = 256, 0
    for k in range(1, 5000):
        t = k * 0.72
        row = [round(t, 4)]
        for i in range(0, 30, 3):
            row += [i + 1, 100 * mib + (k % 50) * mib + i]
        if k > 4990:
            row += [2, (1 << 30) + k]          # job-1 passes its 1G limit at the very end
        out.append(json.dumps(row))
        lines += 1
    path = tmp_path / "long.trace"
    path.write_text("\n".join(out) + "\n")

    def alive():
        return sum(1 for o in gc.get_objects() if type(o) is trace.Sample)
    streamed = trace.open_trace(str(path), stats=False, window=window)
    inner = streamed.iter_samples()
    peak = [0, 0]

    def counting():
        for s in inner:
            peak[1] += 1
            if peak[1] % 97 == 0:
                peak[0] = max(peak[0], alive())
            yield s
    streamed._stream = counting()
    result = replay(streamed)
    assert peak[1] == lines + 1 and lines > 15 * window
    assert 0 < peak[0] <= window + 3, peak          # the window, the one in hand, a spare
    assert streamed.retained_peak == window + 1
    assert [(d.key[1], d.reason) for d in result.decisions if d.kind == "signal"][:1] == [(1001, "over-limit")]
    assert streamed.damage == []
    # the same trace read whole holds every sample (what the stream avoids)
    full = trace.read_trace(str(path))
    assert alive() >= lines and len(full.samples) == lines + 1


def test_lines_out_of_order_beyond_the_window_are_skipped_and_reported(tmp_path):
    lines = open(_v2_trace(tmp_path, n=3, seconds=30.0)).read().splitlines(keepends=True)
    late = next(i for i, l in enumerate(lines) if l.startswith("[") and i > 20)
    moved = lines[:late] + lines[late + 1:] + [lines[late]]       # one sample moved to the end
    path = write(tmp_path / "late.trace", [l.encode() for l in moved])
    near = trace.read_trace(path)                                 # within the window: reordered
    assert any("out of time order" in d and "replayed in time order" in d for d in near.damage)
    assert [s.t for s in near.samples] == sorted(s.t for s in near.samples)
    far = trace.open_trace(path, window=5)
    samples = list(far.iter_samples())
    assert len(samples) == len(near.samples) - 1
    assert any("1 sample more than 5 samples out of time order, skipped" in d for d in far.damage)
