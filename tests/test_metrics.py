"""Prometheus metrics: the exposition parsed by prometheus_client's own parser, the HTTP
endpoint scraped by urllib, the textfile, hostile scrapers, and a daemon that keeps
stopping a hog on time while scrapers misbehave (in a private PID namespace)."""
from __future__ import annotations

import os
import socket
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memwatchd import metrics, state
from memwatchd.config import parse_config

from .pidns import needs_pidns, run_scenario

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def view(targets, psi=True):
    return {
        "written_at": time.time(), "dry_run": False, "watches": ["web", "jobs", "idle"],
        "daemon": {"rss_bytes": 12 << 20},
        "host": {"mem_total_bytes": 8 << 30, "mem_available_bytes": 5 << 30,
                 "swap_total_bytes": 0, "swap_free_bytes": 0,
                 "psi": {"some_avg10": 1.5, "some_avg60": 0.5, "some_total_seconds": 3.25,
                         "full_avg10": 0.25, "full_avg60": 0.0, "full_total_seconds": 1.0}
                 if psi else None},
        "targets": [{"target": t, "id": i, "usage_bytes": u, "limit_bytes": 1 << 30}
                    for t, i, u in targets],
    }


def counters():
    m = metrics.Histogram(metrics.TICK_BUCKETS)
    for v in (0.00005, 0.0003, 0.002, 0.002, 5.0):
        m.observe(v)
    e = metrics.Histogram(metrics.EXIT_BUCKETS)
    e.observe(0.04)
    actions = {("jobs", "term", "over-limit", "SIGTERM"): 2, ("guard", "warn", "warn-level", ""): 1}
    return actions, m, e


def parse(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_documented_metric_is_exposed_with_its_type_and_labels():
    snapshot = metrics._Snapshot(view([("web", "/system.slice/web.service", 100 << 20),
                                       ("jobs", "4242", 7 << 20)]), *counters())
    fams = parse(metrics.render(snapshot).decode())
    for name, kind, labels, _ in metrics.METRICS:
        base = name[:-len("_total")] if kind == "counter" else name
        fam = fams[base]
        assert fam.type == kind, name
        for sample in fam.samples:
            got = set(sample.labels) - {"le"}
            assert got == set(labels), (name, sample)
    assert set(fams) == {n[:-6] if k == "counter" else n for n, k, _, _ in metrics.METRICS}


def test_values_and_names_follow_conventions():
    snapshot = metrics._Snapshot(view([("web", "/system.slice/web.service", 100 << 20)]),
                                 *counters())
    text = metrics.render(snapshot).decode()
    fams = parse(text)
    usage = {s.labels["id"]: s.value for s in fams["memwatchd_target_usage_bytes"].samples}
    assert usage == {"/system.slice/web.service": 100 << 20}
    assert {s.labels["target"]: s.value for s in fams["memwatchd_targets"].samples} == \
        {"web": 1, "jobs": 0, "idle": 0}
    psi = {(s.labels["kind"], s.labels["window"]): s.value
           for s in fams["memwatchd_host_memory_pressure_ratio"].samples}
    assert psi[("some", "avg10")] == 0.015 and psi[("full", "avg10")] == 0.0025
    acts = {tuple(s.labels[k] for k in ("target", "action", "reason", "signal")): s.value
            for s in fams["memwatchd_actions"].samples if s.name.endswith("_total")}
    assert acts == {("jobs", "term", "over-limit", "SIGTERM"): 2, ("guard", "warn", "warn-level", ""): 1}
    ticks = {s.labels.get("le"): s.value for s in fams["memwatchd_tick_duration_seconds"].samples
             if s.name.endswith("_bucket")}
    assert ticks["0.0001"] == 1 and ticks["0.0025"] == 4 and ticks["1.0"] == 4 and ticks["+Inf"] == 5
    for line in text.splitlines():
        if line.startswith("# TYPE"):
            name, kind = line.split()[2:4]
            assert name.startswith("memwatchd_")
            assert kind != "counter" or name.endswith("_total")


def test_vanished_targets_leave_the_gauges():
    actions, tick, exits = counters()
    first = metrics.render(metrics._Snapshot(view([("jobs", str(p), 1 << 20) for p in range(100, 150)]),
                                             actions, tick, exits)).decode()
    second = metrics.render(metrics._Snapshot(view([("jobs", "149", 1 << 20)]),
                                              actions, tick, exits)).decode()
    assert first.count("memwatchd_target_usage_bytes{") == 50
    assert second.count("memwatchd_target_usage_bytes{") == 1
    assert second.count("memwatchd_target_limit_bytes{") == 1


def test_no_psi_no_pressure_metrics():
    fams = parse(metrics.render(metrics._Snapshot(view([], psi=False), *counters())).decode())
    assert "memwatchd_host_memory_pressure_ratio" not in fams
    assert "memwatchd_host_memory_available_bytes" in fams


def test_docs_list_every_metric():
    with open(os.path.join(ROOT, "docs", "observability.md")) as f:
        doc = f.read()
    for name, kind, labels, _ in metrics.METRICS:
        assert f"`{name}`" in doc, name


# ------------------------------------------------------------------- exporter

@pytest.fixture
def exporter(tmp_path):
    made = []

    def make(body_targets=2, textfile=""):
        e = metrics.Exporter(("127.0.0.1", 0), textfile)
        e.start()
        made.append(e)
        return e
    yield make
    for e in made:
        e.stop()


def url(e, path="/metrics"):
    return f"http://127.0.0.1:{e.address[1]}{path}"


def publish(e, n=2):
    e.snapshot = metrics._Snapshot(view([("jobs", str(1000 + i), i << 20) for i in range(n)]),
                                   *counters())


def test_scraped_by_urllib_and_parsed(exporter):
    e = exporter()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url(e), timeout=5)
    assert err.value.code == 503                        # nothing published yet
    publish(e)
    with urllib.request.urlopen(url(e), timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        fams = parse(r.read().decode())
    assert len(fams["memwatchd_target_usage_bytes"].samples) == 2
    for path, code in (("/nope", 404), ("/metrics/../x", 404)):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url(e, path), timeout=5)
        assert err.value.code == code
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url(e), data=b"x", method="POST"), timeout=5)
    assert err.value.code == 405
    with urllib.request.urlopen(urllib.request.Request(url(e), method="HEAD"), timeout=5) as r:
        assert r.status == 200 and r.read() == b"" and int(r.headers["Content-Length"]) > 100
    with urllib.request.urlopen(url(e, "/metrics?x=1"), timeout=5) as r:
        assert r.status == 200


def test_each_snapshot_is_rendered_once_however_often_it_is_scraped(exporter, monkeypatch):
    """Any local user may scrape 20 times a second; at 1,000 targets a render takes ms of
    the GIL the loop needs. One render per snapshot (the daemon publishes once a second)."""
    renders = []
    real = metrics.families
    monkeypatch.setattr(metrics, "families", lambda *a: renders.append(1) or real(*a))
    e = exporter()
    publish(e, n=1000)
    bodies = set()
    for _ in range(10):
        with urllib.request.urlopen(url(e), timeout=5) as r:
            bodies.add(r.read())
    assert len(renders) == 1 and len(bodies) == 1
    publish(e, n=1000)                                   # a new snapshot: rendered anew
    with urllib.request.urlopen(url(e), timeout=5) as r:
        r.read()
    assert len(renders) == 2


def test_oversized_and_garbage_requests(exporter):
    e = exporter()
    publish(e)
    with socket.create_connection(("127.0.0.1", e.address[1]), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
        assert s.recv(100).startswith(b"HTTP/1.1 431")
    with socket.create_connection(("127.0.0.1", e.address[1]), timeout=5) as s:
        s.sendall(b"\x16\x03\x01 hello\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")


def test_slow_and_silent_clients_do_not_block_a_real_scrape(exporter, monkeypatch):
    """A client that never reads a large response, one that sends its request a byte at a
    time, and one that connects and says nothing: a normal scrape is still served at once,
    and each hostile connection is dropped at its deadline."""
    monkeypatch.setattr(metrics, "DEADLINE", 1.5)
    e = exporter()
    publish(e, n=4000)                                   # ~600 KB: more than socket buffers hold
    port = e.address[1]
    never_reads = socket.socket()
    never_reads.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    never_reads.connect(("127.0.0.1", port))
    never_reads.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    silent = socket.create_connection(("127.0.0.1", port))
    dribble = socket.create_connection(("127.0.0.1", port))
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    dribble.sendall(request[:1])
    time.sleep(0.2)
    t0 = time.monotonic()
    with urllib.request.urlopen(url(e), timeout=5) as r:
        body = r.read()
    assert time.monotonic() - t0 < 1.0 and len(body) > 500_000
    dropped = False
    for byte in request[1:]:                           # still dribbling: slower than the deadline
        try:
            dribble.send(bytes([byte]))
        except OSError:                                # the server gave up on it: good
            dropped = True
            break
        time.sleep(0.2)
    assert dropped
    time.sleep(0.5)
    for s in (never_reads, silent, dribble):           # all three dropped by now
        s.settimeout(2)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            while s.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        s.close()
    assert not e._conns


def test_connection_flood_is_bounded(exporter):
    e = exporter()
    publish(e)
    socks = []
    for _ in range(100):            # non-blocking: once the backlog is full, connect() would wait
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", e.address[1]))
        socks.append(s)
    time.sleep(0.5)
    assert 0 < len(e._conns) <= metrics.MAX_CONNECTIONS
    for s in socks:
        s.close()
    time.sleep(0.2)
    with urllib.request.urlopen(url(e), timeout=10) as r:   # and it recovers
        assert r.status == 200


def test_textfile_written_atomically_world_readable_and_parseable(tmp_path, exporter, monkeypatch):
    monkeypatch.setattr(metrics, "TEXTFILE_EVERY", 0.1)
    path = tmp_path / "textfile" / "memwatchd.prom"
    path.parent.mkdir()
    old = os.umask(0o077)
    try:
        e = metrics.Exporter(None, str(path))
        e.start()
        publish(e)
        deadline = time.time() + 5
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        e.stop()
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
    fams = parse(path.read_text())
    assert "memwatchd_target_usage_bytes" in fams and "memwatchd_actions" in fams
    assert os.listdir(path.parent) == ["memwatchd.prom"]


def test_textfile_in_a_missing_directory_is_logged_once_not_created(tmp_path, monkeypatch, capsys):
    from memwatchd import report
    monkeypatch.setattr(metrics, "TEXTFILE_EVERY", 0.05)
    path = tmp_path / "missing" / "memwatchd.prom"
    report.set_stream(sys.stderr, plain=True)
    try:
        e = metrics.Exporter(None, str(path))
        e.start()
        for _ in range(5):
            publish(e)
            time.sleep(0.15)
        e.stop()
    finally:
        report.set_stream(None)
    assert not path.parent.exists()
    assert capsys.readouterr().err.count("could not write the metrics textfile") == 1


def test_publisher_imports_metrics_only_when_configured_and_survives_a_taken_port(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = parse_config({"daemon": {"state": ""},
                           "metrics": {"listen": f"127.0.0.1:{port}"}}, "t")
    pub = state.Publisher(config)
    pub.start()                                   # logs the error, keeps going
    assert pub.metrics is None
    taken.close()
    pub.reconfigure(parse_config({"daemon": {"state": ""}, "metrics": {"listen": ""}}, "t"))
    assert pub.metrics is None and pub.every is None
    pub.reconfigure(parse_config({"daemon": {"state": ""},
                                  "metrics": {"listen": f"127.0.0.1:{port}"}}, "t"))
    try:
        assert pub.metrics is not None and pub.every == state.STATE_EVERY
    finally:
        pub.close()


# ---------------------------------------------------- the daemon under hostile scrapers

@needs_pidns
@pytest.mark.slow
def test_hostile_scrapers_never_delay_a_kill():
    r = run_scenario("""
import socket, threading, urllib.request
free = socket.socket(); free.bind(("127.0.0.1", 0)); port = free.getsockname()[1]; free.close()
events = WORK + "/events.jsonl"
prom = WORK + "/textfile/memwatchd.prom"
os.mkdir(WORK + "/textfile")
d = start_daemon(f'''
[daemon]
events = "{events}"
state = "{WORK}/state.json"
[guard]
enabled = false
[metrics]
listen = "127.0.0.1:{port}"
textfile = "{prom}"
[[watch]]
name = "hogs"
cmdline = "hog-[a-z]+$"
limit = "200M"
grace = "2s"
''')
url = f"http://127.0.0.1:{port}/metrics"
def scrape():
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()
def up():
    try:
        return "memwatchd_info" in scrape()
    except OSError:
        return False
assert wait_for(up, 10), daemon_log()
stop_flag = []
hostile = []
def never_reads():
    while not stop_flag:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        s.connect(("127.0.0.1", port)); s.sendall(b"GET /metrics HTTP/1.1\\r\\n\\r\\n")
        hostile.append(s); time.sleep(0.3)
def dribbles():
    while not stop_flag:
        s = socket.create_connection(("127.0.0.1", port)); hostile.append(s)
        for b in b"GET /metrics HTTP/1.1\\r\\n\\r\\n":
            if stop_flag: break
            try:
                s.send(bytes([b]))
            except OSError:
                break
            time.sleep(0.25)
def silent():
    while not stop_flag:
        hostile.append(socket.create_connection(("127.0.0.1", port))); time.sleep(0.5)
threads = [threading.Thread(target=f, daemon=True) for f in (never_reads, dribbles, dribbles, silent)]
for t in threads: t.start()
time.sleep(1.5)                              # the exporter's slots are full of hostile clients
h = start_hog("hog-x", rate_mib=300, cap_mib=1024, seconds=20, on_term="ignore", events=events)
fate = exited_by(h, 15)
stop_flag.append(1)
time.sleep(6)                                # hostile connections time out (5 s); a scrape works
body = scrape()
textfile = wait_for(lambda: os.path.exists(prom) and open(prom).read(), 8)
mode = os.stat(prom).st_mode & 0o777
stop(d, signal.SIGTERM)
for s in hostile: s.close()
result(fate=fate, events=read_events(events), body=body, textfile=textfile, mode=mode,
       signals=hog_signals("hog-x"), log=daemon_log())
""", timeout=90)
    assert r["fate"] == -9, r["log"]                     # SIGTERM ignored, SIGKILL after it
    decisions = [e for e in r["events"] if e["type"] == "decision"]
    first = decisions[0]
    assert first["signal"] == "SIGTERM" and first["reason"] == "over-limit"
    # 300 MiB/s: 64 MiB of overshoot is ~200 ms late; the 10 ms loop is far inside that.
    assert first["usage_bytes"] - first["limit_bytes"] < 64 << 20, first
    fams = parse(r["body"])
    ticks = {s.labels["le"]: s.value for s in fams["memwatchd_tick_duration_seconds"].samples
             if s.name.endswith("_bucket")}
    assert ticks["0.25"] == ticks["+Inf"] > 10, ticks    # no pass of the loop took 250 ms
    acts = {(s.labels["action"], s.labels["signal"]): s.value
            for s in fams["memwatchd_actions"].samples if s.name.endswith("_total")}
    assert acts[("term", "SIGTERM")] == 1 and acts[("kill", "SIGKILL")] == 1
    exits = [s for s in fams["memwatchd_signal_to_exit_seconds"].samples if s.name.endswith("_count")]
    assert exits[0].value == 1
    assert not [s for s in fams["memwatchd_target_usage_bytes"].samples]   # the hog is gone
    assert r["mode"] == 0o644 and "memwatchd_actions_total" in r["textfile"]
    parse(r["textfile"])


def test_each_watch_and_the_guard_export_their_first_stop_at_zero_from_the_start(tmp_path):
    """increase() sees nothing in a counter series that first appears at 1: the rules'
    stop alerts need every first-stop series present at 0 before the first stop."""
    def config(*watches, psi=0, io=0):
        return parse_config({"daemon": {"state": ""},
                             "metrics": {"listen": "", "textfile": str(tmp_path / "m.prom")},
                             "guard": {"psi_full": psi, "psi_full_kill": 0, "psi_io_full": io},
                             "watch": [dict(w, limit="1G") for w in watches]}, "t")
    pub = state.Publisher(config({"name": "sim", "cmdline": "sim"},
                                 {"name": "fast", "cmdline": "x", "action": "kill"},
                                 {"name": "note", "cmdline": "y", "action": "warn"},
                                 {"name": "ice", "unit": "ice.service", "action": "freeze"}))
    pub.start()
    try:
        assert pub.metrics.actions == {
            ("sim", "term", "over-limit", "SIGTERM"): 0, ("fast", "kill", "over-limit", "SIGKILL"): 0,
            ("ice", "freeze", "over-limit", ""): 0,
            ("guard", "term", "mem-available-low", "SIGTERM"): 0,
            ("guard", "kill", "mem-available-critical", "SIGKILL"): 0}
        # The key a real decision record counts under is the seeded one.
        pub.metrics.on_record({"type": "decision", "target": "sim", "action": "term",
                               "reason": "over-limit", "signal": "SIGTERM"})
        pub.reconfigure(config({"name": "sim", "cmdline": "sim"}, {"name": "new", "cmdline": "n"},
                               psi=20, io=20))
        acts = pub.metrics.actions
        assert acts[("sim", "term", "over-limit", "SIGTERM")] == 1      # a reload keeps counts
        assert acts[("new", "term", "over-limit", "SIGTERM")] == 0
        assert acts[("guard", "term", "psi-full-high", "SIGTERM")] == 0
        assert acts[("guard", "term", "psi-io-full-high", "SIGTERM")] == 0
        assert ("guard", "kill", "psi-full-critical", "SIGKILL") not in acts     # psi_full_kill 0
        pub.metrics.publish(state.build_view([], None, time.time(), pub.config))
        fams = parse(metrics.render(pub.metrics.exporter.snapshot).decode())
        samples = {(s.labels["target"], s.labels["action"]): s.value
                   for s in fams["memwatchd_actions"].samples}
        assert samples[("new", "term")] == 0 and samples[("sim", "term")] == 1
    finally:
        pub.close()
    off = parse_config({"guard": {"enabled": False}, "watch": [{"name": "w", "cmdline": "w",
                                                                "limit": "1G"}]}, "t")
    assert metrics.first_stops(off) == [("w", "term", "over-limit", "SIGTERM")]
