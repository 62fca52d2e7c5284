"""report: escaping of hostile names, one-line log output, the durable JSON event log."""
from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memwatchd import report
from memwatchd.report import escape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOSTILE = [
    "foo) Z \n<3>evil",
    "a\r\nb",
    "\x1b[31mred\x1b[0m",
    "\x9b2J",                       # C1 CSI: clears some terminals
    "name\u202egnp.exe",           # bidi override
    "line\u2028sep",
    "back\\slash\\x0a",            # looks like one of our escapes: must stay distinct
    "\x00\x7f",
    "\ud800lone",                  # lone surrogate (cannot even be UTF-8 encoded)
]


def unescape(text: str, from_bytes: bool = False):
    """Invert escape() (for inputs short enough not to be truncated)."""
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
        elif text[i + 1] == "\\":
            out.append("\\")
            i += 2
        elif text[i + 1] == "x":
            cp = int(text[i + 2:i + 4], 16)
            assert cp < 0x80 or from_bytes, "\\x80-\\xff only stand for invalid bytes"
            out.append(chr(0xDC00 + cp) if cp >= 0x80 else chr(cp))
            i += 4
        elif text[i + 1] == "u":
            out.append(chr(int(text[i + 2:i + 6], 16)))
            i += 6
        else:
            raise AssertionError(f"unknown escape at {i}: {text!r}")
    result = "".join(out)
    return result.encode("utf-8", "surrogateescape") if from_bytes else result


def assert_safe(text: str):
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text), repr(text)
    assert not any(0xD800 <= ord(c) < 0xE000 for c in text), repr(text)
    assert "\u2028" not in text and "\u2029" not in text and "\u202e" not in text
    text.encode("utf-8")  # always encodable
    json.dumps(text, ensure_ascii=False).encode("utf-8")


# ------------------------------------------------------------------ escape

@pytest.mark.parametrize("name", HOSTILE)
def test_escape_hostile_names(name):
    out = escape(name)
    assert_safe(out)
    assert unescape(out) == name


def test_escape_examples():
    assert escape("foo) Z \n<3>evil") == "foo) Z \\x0a<3>evil"
    assert escape("a\\b") == "a\\\\b"
    assert escape("plain name ü 日本") == "plain name ü 日本"
    assert escape(b"ok\xff\xc3(") == "ok\\xff\\xc3("        # as backslashreplace renders them
    assert escape(b"caf\xc3\xa9") == "café"
    assert escape("\x9b") == "\\u009b" and escape(b"\xc2\x9b") == "\\u009b"
    assert escape(b"\x9b") == "\\x9b"                        # an invalid byte: distinct


def test_escape_truncates_with_a_marker():
    out = escape("x" * 10_000)
    assert len(out) == report.ESCAPE_MAX and out.endswith(report.TRUNCATED)
    out = escape("\n" * 10_000, max_len=100)
    assert len(out) <= 100 and out.endswith(report.TRUNCATED)
    assert re.fullmatch(r"(\\x0a)*" + re.escape(report.TRUNCATED), out)   # no escape cut in half
    out = escape(b"\xff" * 10_000, max_len=64)
    assert len(out) <= 64 and out.endswith(report.TRUNCATED)
    assert escape("x" * 512) == "x" * 512          # exactly max_len: untouched
    assert escape("x" * 513).endswith(report.TRUNCATED)


@settings(max_examples=500)
@given(st.text(alphabet=st.characters(blacklist_categories=()), max_size=200))
def test_escape_output_is_always_safe(text):
    out = escape(text)
    assert_safe(out)
    assert len(out) <= report.ESCAPE_MAX


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_escape_bytes_output_is_always_safe(data):
    out = escape(data)
    assert_safe(out)
    assert len(out) <= report.ESCAPE_MAX


@settings(max_examples=500)
@given(st.text(alphabet=st.characters(blacklist_categories=()), max_size=80))
def test_escape_is_injective_on_short_strings(text):
    # 80 chars * at most 6 output chars each < 512: never truncated, so it must round-trip.
    assert unescape(escape(text)) == text


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_escape_bytes_is_injective_on_short_input(data):
    assert unescape(escape(data), from_bytes=True) == data


@given(st.text(alphabet=st.characters(blacklist_categories=()), max_size=40),
       st.text(alphabet=st.characters(blacklist_categories=()), max_size=40))
def test_distinct_short_strings_stay_distinct(a, b):
    if a != b:
        assert escape(a) != escape(b)


def test_format_cmdline():
    assert report.format_cmdline(b"python3\0-c\0print(1)\0") == "python3 -c print(1)"
    assert report.format_cmdline(["rm", "-rf", "a\nb"]) == "rm -rf a\\x0ab"
    assert report.format_cmdline(b"x\xff\0") == "x\\xff"
    assert len(report.format_cmdline(b"a\0" * 5000)) == report.ESCAPE_MAX


# ------------------------------------------------------------------ log

@pytest.fixture
def logbuf():
    buf = io.StringIO()
    report.set_stream(buf, plain=False)
    report.set_level(report.DEBUG)
    yield buf
    report.set_stream(None)
    report.set_level(report.INFO)


def test_log_prefixes_and_keeps_one_line(logbuf):
    report.log(report.ERR, "boom")
    report.log(report.WARNING, "killed foo) Z \n<3>evil\r\n<0>emerg")
    report.log(report.NOTICE, "n")
    report.log(report.INFO, "i")
    report.log(report.DEBUG, "d")
    lines = logbuf.getvalue().split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert lines == ["<3>boom", "<4>killed foo) Z \\x0a<3>evil\\x0d\\x0a<0>emerg",
                     "<5>n", "<6>i", "<7>d"]


def test_log_level_filter(logbuf):
    report.set_level(report.INFO)
    report.log(report.DEBUG, "hidden")
    report.log(report.INFO, "shown")
    assert logbuf.getvalue() == "<6>shown\n"


def journal_of(f) -> str:
    st = os.fstat(f.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def test_prefixes_only_when_journal_stream_names_the_stream(monkeypatch, tmp_path):
    """systemd.exec(5): $JOURNAL_STREAM is "dev:ino" of the journal stream; only a stream
    that is that very file gets "<N>"; a pipe, a file, a StringIO or a TTY gets words."""
    journal = open(tmp_path / "journal", "w")
    other = open(tmp_path / "job.log", "w")
    monkeypatch.setenv("JOURNAL_STREAM", journal_of(journal))
    try:
        for stream, expected in ((journal, "<4>w\n"), (other, "warning: w\n")):
            report.set_stream(stream)
            report.log(report.WARNING, "w")
            stream.flush()
            assert open(stream.name).read() == expected
        buf = io.StringIO()                          # no fd at all: words
        report.set_stream(buf)
        report.log(report.ERR, "e")
        assert buf.getvalue() == "error: e\n"
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not report.is_journal(journal)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not report.is_journal(journal)        # no variable: not the journal
        monkeypatch.setenv("JOURNAL_STREAM", journal_of(journal))
        monkeypatch.setenv("MEMWATCHD_LOG_PLAIN", "1")   # forces words even in the journal
        report.set_stream(journal)
        report.log(report.NOTICE, "n")
        journal.flush()
        assert open(journal.name).read() == "<4>w\nnotice: n\n"
    finally:
        report.set_stream(None)
        journal.close()
        other.close()


def run_with_stderr_to(tmp_path, argv, journal: bool):
    """Run argv with stderr on a file; with journal, $JOURNAL_STREAM names that file."""
    path = tmp_path / "stderr"
    with open(path, "w") as err:
        env = dict(os.environ, PYTHONPATH=REPO)
        env.pop("MEMWATCHD_LOG_PLAIN", None)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            env["JOURNAL_STREAM"] = journal_of(err)
        rc = subprocess.run(argv, stderr=err, stdout=subprocess.DEVNULL, env=env, timeout=30).returncode
    return rc, path.read_text()


def test_log_goes_to_stderr_with_words_unless_it_is_the_journal(tmp_path):
    code = "from memwatchd import report; report.log(report.NOTICE, 'hello\\nworld')"
    assert run_with_stderr_to(tmp_path, [sys.executable, "-c", code], journal=False) == \
        (0, "notice: hello\\x0aworld\n")
    assert run_with_stderr_to(tmp_path, [sys.executable, "-c", code], journal=True) == \
        (0, "<5>hello\\x0aworld\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO, JOURNAL_STREAM="1:1"), timeout=30)
    assert r.stderr == "notice: hello\\x0aworld\n"      # a pipe (cron, | tee, CI): words


def test_a_fatal_start_up_error_of_run_has_the_error_priority_in_the_journal(tmp_path):
    argv = [sys.executable, "-m", "memwatchd", "run", "--config", str(tmp_path / "absent.toml")]
    rc, err = run_with_stderr_to(tmp_path, argv, journal=True)
    assert rc == 2 and err.startswith("<3>") and "absent.toml" in err, err
    rc, err = run_with_stderr_to(tmp_path, argv, journal=False)
    assert rc == 2 and err.startswith("memwatchd: ") and "absent.toml" in err and "<" not in err, err


def test_log_never_raises_on_a_broken_stream():
    class Broken(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "EPIPE")
    report.set_stream(Broken(), plain=False)
    try:
        report.log(report.ERR, "x")
    finally:
        report.set_stream(None)


# ------------------------------------------------------------------ event log

def test_append_is_on_disk_and_fsynced_before_returning(tmp_path, monkeypatch):
    path = tmp_path / "state" / "deep" / "events.jsonl"
    calls = []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, data: (calls.append(("write", fd)),
                                                       real_write(fd, data))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", fd)), real_fsync(fd))[1])
    log = report.EventLog(str(path))
    calls.clear()
    log.append({"type": "decision", "id": "1-2", "comm": "x"})
    assert [c[0] for c in calls] == ["write", "fsync"] and calls[0][1] == calls[1][1]
    with open(path, "rb") as f:                    # a separate open sees the whole line
        assert f.read() == b'{"comm":"x","id":"1-2","type":"decision"}\n'
    log.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path.parent.parent).st_mode) == 0o700


def test_event_log_fd_is_cloexec_and_append_only(tmp_path):
    import fcntl
    log = report.EventLog(str(tmp_path / "e.jsonl"))
    flags = fcntl.fcntl(log._fd, fcntl.F_GETFL)
    assert flags & os.O_APPEND
    assert fcntl.fcntl(log._fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    log.close()


def test_none_path_is_a_no_op():
    log = report.EventLog(None)
    assert not log.enabled
    log.append({"x": 1})
    log.close()


def test_json_line_format_is_canonical_ascii(tmp_path):
    path = tmp_path / "e.jsonl"
    with report.EventLog(str(path)) as log:
        log.append({"b": "日本\n", "a": [1, 2]})
    assert path.read_bytes() == b'{"a":[1,2],"b":"\\u65e5\\u672c\\n"}\n'


def test_append_raises_when_the_disk_is_full():
    log = report.EventLog("/dev/full")
    with pytest.raises(OSError) as info:
        log.append({"x": 1})
    assert info.value.errno == 28
    log.close()


def test_append_raises_for_a_record_json_cannot_encode(tmp_path):
    with report.EventLog(str(tmp_path / "e")) as log:
        with pytest.raises(ValueError):
            log.append({"x": float("nan")})
        with pytest.raises(TypeError):
            log.append({"x": object()})
    assert (tmp_path / "e").read_bytes() == b""


def test_log_rotation_and_removed_directory_are_survived(tmp_path):
    d = tmp_path / "var"
    path = d / "events.jsonl"
    log = report.EventLog(str(path))
    log.append({"n": 1})
    os.rename(path, tmp_path / "events.jsonl.1")   # logrotate
    log.append({"n": 2})
    assert report.read_events(str(path)) == [{"n": 2}]
    os.unlink(path)
    os.rmdir(d)                                    # someone cleaned up the whole directory
    log.append({"n": 3})
    assert report.read_events(str(path)) == [{"n": 3}]
    log.close()


def test_read_events_skips_a_torn_last_line_and_the_next_append_repairs_it(tmp_path):
    path = tmp_path / "e.jsonl"
    with report.EventLog(str(path)) as log:
        log.append({"n": 1})
        log.append({"n": 2})
    with open(path, "ab") as f:
        f.write(b'{"type":"decision","id":"17')   # the host died mid-write
    events = report.read_events(str(path))
    assert events == [{"n": 1}, {"n": 2}] and events.skipped == 1
    with report.EventLog(str(path)) as log:        # daemon restarted
        log.append({"n": 3})
    events = report.read_events(str(path))
    assert events == [{"n": 1}, {"n": 2}, {"n": 3}] and events.skipped == 1


def test_read_events_skips_garbage_anywhere_and_missing_file_is_empty(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"n":1}\n\xff\xfe\n[1,2]\n\n{"n":2}\nnot json\n')
    events = report.read_events(str(path))
    assert events == [{"n": 1}, {"n": 2}] and events.skipped == 3
    counter = [0]
    assert list(report.iter_events(str(path), counter)) == [{"n": 1}, {"n": 2}]
    assert counter == [3]
    missing = report.read_events(str(tmp_path / "nope"))
    assert missing == [] and missing.skipped == 0


WRITER = textwrap.dedent("""
    import sys
    from memwatchd.report import EventLog
    path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    log = EventLog(path)
    for i in range(n):
        # Sizes up to ~9 KiB: larger than PIPE_BUF and a page, to catch split writes.
        log.append({"w": tag, "i": i, "pad": tag * ((i * 397) % 9000)})
    log.close()
""")


def test_concurrent_appends_from_two_processes_never_interleave(tmp_path):
    path = str(tmp_path / "e.jsonl")
    env = dict(os.environ, PYTHONPATH=REPO)
    n = 300
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, tag, str(n)], env=env)
             for tag in ("a", "b")]
    for p in procs:
        assert p.wait(120) == 0
    events = report.read_events(path)
    assert events.skipped == 0
    assert len(events) == 2 * n
    for tag in ("a", "b"):
        mine = [e for e in events if e["w"] == tag]
        assert [e["i"] for e in mine] == list(range(n))          # in order, none lost
        assert all(e["pad"] == tag * ((e["i"] * 397) % 9000) for e in mine)
    # Every line is one whole record. A lone "\n" may appear: a writer opening the file
    # while the other is mid-write sees an unfinished last line and starts on a fresh one
    # (the torn-line guard); readers skip blank lines, and nothing is lost (checked above).
    with open(path, "rb") as f:
        assert all(line.endswith(b"}\n") or line == b"\n" for line in f)


# ------------------------------------------------------------------ records

ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def test_decision_record_shape_and_escaping():
    from memwatchd.types import HostSample, Pressure
    host = HostSample(mem_total=8 << 30, mem_available=1 << 30, swap_total=0, swap_free=0,
                      pressure=Pressure(some_avg10=12.5, full_avg10=3.25))
    rec = report.decision_record(
        target="web", pid=4242, start_time=99, comm="foo) Z \n<3>evil",
        cmdline=b"python3\0-c\0$(rm -rf /)\n\0", cgroup="/sys/fs/cgroup/web.service",
        usage_bytes=5 << 30, limit_bytes=4 << 30, reason="usage above limit", action="kill",
        signal=9, dry_run=False, **report.host_fields(host), time_ns=1_700_000_000_123_456_789)
    assert set(rec) == {"format", "type", "id", "time", "target", "pid", "start_time", "comm", "cmdline",
                        "cgroup", "usage_bytes", "limit_bytes", "reason", "action", "signal",
                        "dry_run", "host"}
    assert rec["type"] == "decision" and rec["format"] == report.EVENT_FORMAT == 2
    assert rec["id"] == "1700000000123456789-4242"
    assert rec["time"] == "2023-11-14T22:13:20.123Z"
    assert rec["comm"] == "foo) Z \\x0a<3>evil"
    assert rec["cmdline"] == "python3 -c $(rm -rf /)\\x0a"
    assert rec["signal"] == "SIGKILL"
    assert rec["host"] == {"mem_available_bytes": 1 << 30, "mem_total_bytes": 8 << 30,
                           "psi_some_avg10": 12.5, "psi_full_avg10": 3.25}
    line = json.dumps(rec, ensure_ascii=True)
    assert "\n" not in line and json.loads(line) == rec


def test_decision_record_without_psi_or_signal():
    from memwatchd.types import HostSample
    host = HostSample(mem_total=1, mem_available=1, swap_total=0, swap_free=0, pressure=None)
    rec = report.decision_record(target="t", pid=None, start_time=None, comm=None, cmdline=None,
                                 cgroup="/sys/fs/cgroup/t", usage_bytes=1, limit_bytes=1,
                                 reason="r", action="memory.high", signal=None, dry_run=True,
                                 **report.host_fields(host))
    assert rec["signal"] is None and rec["dry_run"] is True
    assert rec["host"]["psi_some_avg10"] is None and ISO.fullmatch(rec["time"])
    a = report.decision_record(target="t", pid=1, start_time=1, comm="c", cmdline="c",
                               cgroup=None, usage_bytes=1, limit_bytes=1, reason="r",
                               action="kill", signal=15, dry_run=False)
    b = report.decision_record(target="t", pid=1, start_time=1, comm="c", cmdline="c",
                               cgroup=None, usage_bytes=1, limit_bytes=1, reason="r",
                               action="kill", signal=15, dry_run=False)
    assert a["id"] != b["id"]                                    # time_ns differs


def test_outcome_record_shape():
    rec = report.outcome_record(event_id="1-2", exited=True, seconds_to_exit=0.0123456789,
                                freed_bytes=1 << 30, escalated=False, detail="exited\nok",
                                time_ns=0)
    assert rec == {"format": 2, "type": "outcome", "id": "1-2", "time": "1970-01-01T00:00:00.000Z",
                   "exited": True, "seconds_to_exit": 0.012346, "freed_bytes": 1 << 30,
                   "escalated": False, "detail": "exited\\x0aok"}
    rec = report.outcome_record(event_id="1-2", exited=False, seconds_to_exit=None,
                                freed_bytes=None, escalated=True)
    assert rec["seconds_to_exit"] is None and rec["detail"] == "" and ISO.fullmatch(rec["time"])


def test_old_event_records_are_read_with_the_current_field_names():
    """Format 1 (no "format" key) named the host's bytes mem_available/mem_total."""
    old = {"type": "decision", "id": "1-2", "time": "2023-11-14T22:13:20.123Z", "target": "t",
           "host": {"mem_available": 5, "mem_total": 9, "psi_some_avg10": None, "psi_full_avg10": None}}
    new = report.upgrade_record(old)
    assert new["format"] == 2 and new["host"]["mem_available_bytes"] == 5 and new["host"]["mem_total_bytes"] == 9
    assert "mem_available" not in new["host"] and old["host"]["mem_available"] == 5   # input untouched
    current = report.outcome_record(event_id="1-2", exited=True, seconds_to_exit=0.1, freed_bytes=1,
                                    escalated=False)
    assert report.upgrade_record(current) is current and current["format"] == 2


@pytest.mark.parametrize("n, text", [(None, "-"), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                     (48 << 20, "48 MiB"), (766 << 20, "766 MiB"),
                                     (int(1.5 * 2**30), "1.5 GiB"), (3 << 40, "3 TiB")])
def test_one_way_to_print_sizes(n, text):
    assert report.format_size(n) == text


@pytest.mark.parametrize("s, text", [(None, "-"), (0.0384, "38 ms"), (0.999, "999 ms"), (1, "1 s"),
                                     (2.94, "2.9 s"), (300, "5 min"), (9000, "2.5 h")])
def test_one_way_to_print_durations(s, text):
    assert report.format_duration(s) == text


def test_guard_lines_say_what_the_guard_measured():
    from memwatchd.config import GuardConfig, Size
    from memwatchd.types import HostSample, Pressure
    guard = GuardConfig(min_available=Size(bytes=48 << 20), kill_available=Size(bytes=16 << 20),
                        psi_full=20.0)
    host = HostSample(mem_total=1 << 30, mem_available=40 << 20, swap_total=0, swap_free=0,
                      pressure=Pressure(full_avg10=31.5))
    low = report.decision_text("guard", 766 << 20, 48 << 20, "mem-available-low", host=host, guard=guard)
    assert low == ("at 766 MiB, the largest it may stop: MemAvailable 40 MiB is below the floor "
                   "48 MiB (mem-available-low)")
    assert "limit" not in low
    crit = report.decision_text("guard", 766 << 20, 48 << 20, "mem-available-critical",
                                host=host._replace(mem_available=10 << 20), guard=guard)
    assert "MemAvailable 10 MiB is below the kill floor 16 MiB" in crit
    psi = report.decision_text("guard", 766 << 20, 48 << 20, "psi-full-high", host=host, guard=guard)
    assert psi.startswith("at 766 MiB, the largest it may stop: all tasks stalled on memory 20% or "
                          "more of the last 2 s (full avg10 31.5%), MemAvailable 40 MiB")
    counted = report.decision_text("guard", 766 << 20, 48 << 20, "psi-full-high", guard=guard,
                                   host=host._replace(refaults=1, major_faults=1))
    assert counted.endswith(
        "with evicted pages coming back at 4 MiB/s or more (its own among them, or 8 MiB/s in "
        "all), MemAvailable 40 MiB (psi-full-high)"), counted
    io = report.decision_text("guard", 766 << 20, 48 << 20, "psi-io-full-high", guard=guard,
                              host=host._replace(refaults=1, major_faults=1, io_full_us=5))
    assert io == ("at 766 MiB, the largest it may stop: all tasks waited for I/O 20% or more of "
                  "the last 2 s while evicted pages came back at 256 KiB/s or more (a swap device "
                  "too slow for the swap-ins), MemAvailable 40 MiB (psi-io-full-high)"), io
    swapped = report.decision_text("guard", 766 << 20, 48 << 20, "mem-available-low", guard=guard,
                                   host=host._replace(swap_total=1 << 30, swap_free=4 << 20))
    assert "MemAvailable 40 MiB plus free swap (SwapFree 4 MiB, zram at its worth) is below" in swapped
    watch = report.decision_text("sim", 302 << 20, 300 << 20, "over-limit")
    assert watch == "using 302 MiB, over its limit 300 MiB (over-limit)"
    warn = report.decision_text("sim", 260 << 20, 300 << 20, "warn-level", warn=250 << 20)
    assert warn == "using 260 MiB, above its warn level 250 MiB (limit 300 MiB)"
