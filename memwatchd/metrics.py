"""Prometheus metrics: an HTTP endpoint and/or a node_exporter textfile ([metrics]).

Imported only when [metrics] is configured: prometheus_client costs about 8 MiB of
resident memory, which a daemon without metrics never pays.

The loop must never wait for a scraper. So the daemon's thread only counts (plain
ints and lists, no locks) and, once a second, hands the exporter thread a snapshot
(one reference assignment). The exporter thread renders text with prometheus_client
only when someone asks, and serves it from its own small poll() loop with
non-blocking sockets: a bounded number of connections, each with a deadline and a
request size cap, and a bounded accept rate. A client that never reads, or sends
its request a byte at a time, holds one slot until its deadline and nothing else.
(prometheus_client's own server starts a thread per connection and has no timeouts.)
Vanished targets leave the gauges at once: each scrape renders the current targets.
"""
from __future__ import annotations

import bisect
import os
import select
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from prometheus_client import generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from memwatchd import __version__, sampler
from memwatchd.report import ERR, NOTICE, log
from memwatchd.files import write_atomic

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
MAX_CONNECTIONS = 8          # served at once; more wait in the listen backlog
MAX_ACCEPTS_PER_SECOND = 20  # a connection flood cannot keep this thread busy
MAX_REQUEST = 8192           # bytes of request line + headers
DEADLINE = 5.0               # seconds a connection may take, from accept to last byte sent
TEXTFILE_EVERY = 5.0         # seconds between textfile rewrites (node_exporter reads it on scrape)

TICK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
EXIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# name, type, labels, help: the documented list (docs/observability.md shows it; a test checks it).
METRICS: Tuple[Tuple[str, str, Tuple[str, ...], str], ...] = (
    ("memwatchd_info", "gauge", ("version", "sampler"), "Always 1; labels say which memwatchd runs."),
    ("memwatchd_dry_run", "gauge", (), "1 when the daemon only records decisions and sends nothing."),
    ("memwatchd_last_update_timestamp_seconds", "gauge", (),
     "When the daemon's loop last published these values (Unix time); stale means stuck."),
    ("memwatchd_resident_memory_bytes", "gauge", (), "memwatchd's own resident memory."),
    ("memwatchd_targets", "gauge", ("target",), "Processes or cgroups each watch currently matches."),
    ("memwatchd_target_usage_bytes", "gauge", ("target", "id"),
     "Memory a target uses as its watch measures it (id: pid or cgroup path)."),
    ("memwatchd_target_limit_bytes", "gauge", ("target", "id"), "The target's limit, resolved to bytes."),
    ("memwatchd_target_actions_last_hour", "gauge", ("target", "id"),
     "Actions (warn, term, kill, throttle, freeze) on this target in the last hour: "
     "more than one or two means it is acted on again and again."),
    ("memwatchd_target_exhaustion_seconds", "gauge", ("target", "id"),
     "Predicted time until the target reaches its limit at the upper bound of its growth "
     "(watches with predict; absent while it does not grow)."),
    ("memwatchd_target_growth_bytes_per_second", "gauge", ("target", "id", "bound"),
     "The target's growth over the predictive trigger's window (bound: estimate or upper)."),
    ("memwatchd_host_memory_available_bytes", "gauge", (), "MemAvailable of /proc/meminfo."),
    ("memwatchd_host_memory_total_bytes", "gauge", (), "MemTotal of /proc/meminfo."),
    ("memwatchd_host_memory_pressure_ratio", "gauge", ("kind", "window"),
     "Share of time tasks stalled on memory (PSI avg10/avg60 over 100; kind some or full)."),
    ("memwatchd_host_memory_pressure_stalled_seconds_total", "counter", ("kind",),
     "Total time tasks stalled on memory (PSI total; kind some or full)."),
    ("memwatchd_actions_total", "counter", ("target", "action", "reason", "signal"),
     "Decisions recorded (warn, term, kill, throttle, freeze), by watch (or guard), reason "
     "and signal (\"\" when none is sent)."),
    ("memwatchd_tick_duration_seconds", "histogram", (),
     "Time one pass of the loop takes (sampling, deciding, acting)."),
    ("memwatchd_signal_to_exit_seconds", "histogram", (),
     "From the first signal to a stopped target's death."),
)
_HELP = {name: doc for name, _, _, doc in METRICS}


class Histogram:
    """Bucket counts for one histogram, owned by one thread (no locks)."""

    def __init__(self, bounds: Tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def copy(self) -> "Histogram":
        h = Histogram(self.bounds)
        h.counts, h.sum = list(self.counts), self.sum
        return h

    def family(self, name: str) -> HistogramMetricFamily:
        buckets, total = [], 0
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return HistogramMetricFamily(name, _HELP[name], buckets=buckets, sum_value=self.sum)


def families(view: Dict[str, Any], actions: Dict[tuple, int], tick: Histogram,
             exits: Histogram) -> List[Any]:
    """Every metric family from one snapshot (a state.build_view dict and the counters)."""
    def gauge(name, labels=()):
        return GaugeMetricFamily(name, _HELP[name], labels=list(labels))

    out = []
    daemon = view.get("daemon") or {}
    info = gauge("memwatchd_info", ("version", "sampler"))
    info.add_metric([__version__, sampler.IMPLEMENTATION], 1)
    dry = gauge("memwatchd_dry_run")
    dry.add_metric([], 1 if view.get("dry_run") else 0)
    updated = gauge("memwatchd_last_update_timestamp_seconds")
    updated.add_metric([], view.get("written_at_unix", view.get("written_at")))
    out += [info, dry, updated]
    if daemon.get("rss_bytes") is not None:
        rss = gauge("memwatchd_resident_memory_bytes")
        rss.add_metric([], daemon["rss_bytes"])
        out.append(rss)

    count = gauge("memwatchd_targets", ("target",))
    usage = gauge("memwatchd_target_usage_bytes", ("target", "id"))
    limit = gauge("memwatchd_target_limit_bytes", ("target", "id"))
    acted = gauge("memwatchd_target_actions_last_hour", ("target", "id"))
    left = gauge("memwatchd_target_exhaustion_seconds", ("target", "id"))
    growth = gauge("memwatchd_target_growth_bytes_per_second", ("target", "id", "bound"))
    per_watch = {name: 0 for name in view.get("watches", ())}
    for row in view["targets"]:
        per_watch[row["target"]] = per_watch.get(row["target"], 0) + 1
        if row["usage_bytes"] is not None:
            usage.add_metric([row["target"], row["id"]], row["usage_bytes"])
            limit.add_metric([row["target"], row["id"]], row["limit_bytes"])
        acted.add_metric([row["target"], row["id"]], row.get("actions_last_hour") or 0)
        p = row.get("predict")
        if p:
            if p["seconds_left"] is not None:
                left.add_metric([row["target"], row["id"]], p["seconds_left"])
            growth.add_metric([row["target"], row["id"], "estimate"], p["slope_bytes_per_s"])
            growth.add_metric([row["target"], row["id"], "upper"], p["slope_upper_bytes_per_s"])
    for name, n in sorted(per_watch.items()):
        count.add_metric([name], n)
    out += [count, usage, limit, acted, left, growth]

    host = view.get("host")
    if host:
        avail = gauge("memwatchd_host_memory_available_bytes")
        avail.add_metric([], host["mem_available_bytes"])
        total = gauge("memwatchd_host_memory_total_bytes")
        total.add_metric([], host["mem_total_bytes"])
        out += [avail, total]
        psi = host.get("psi")
        if psi:
            ratio = gauge("memwatchd_host_memory_pressure_ratio", ("kind", "window"))
            stalled = CounterMetricFamily("memwatchd_host_memory_pressure_stalled_seconds",
                                          _HELP["memwatchd_host_memory_pressure_stalled_seconds_total"],
                                          labels=["kind"])
            for kind in ("some", "full"):
                for window in ("avg10", "avg60"):
                    ratio.add_metric([kind, window], psi[f"{kind}_{window}"] / 100.0)
                stalled.add_metric([kind], psi[f"{kind}_total_seconds"])
            out += [ratio, stalled]

    counter = CounterMetricFamily("memwatchd_actions", _HELP["memwatchd_actions_total"],
                                  labels=["target", "action", "reason", "signal"])
    for labels, n in sorted(actions.items()):
        counter.add_metric(list(labels), n)
    out.append(counter)
    out.append(tick.family("memwatchd_tick_duration_seconds"))
    out.append(exits.family("memwatchd_signal_to_exit_seconds"))
    return out


class _Snapshot:
    """What the exporter renders: fixed when handed over, never touched by the daemon again.
    Rendered at most once (by the exporter thread, on the first request or textfile write
    that needs it): at 1,000 targets a render takes milliseconds of the GIL the loop needs."""

    def __init__(self, view, actions, tick, exits):
        self.args = (view, actions, tick, exits)
        self.text: Optional[bytes] = None

    def collect(self):
        return families(*self.args)


def render(snapshot: Optional[_Snapshot]) -> bytes:
    if snapshot is None:
        return b""
    if snapshot.text is None:
        snapshot.text = generate_latest(snapshot)
    return snapshot.text


class Metrics:
    """The daemon's side: counts as things happen; publish() hands a copy to the exporter."""

    def __init__(self, config: Any):
        self.actions: Dict[tuple, int] = {}
        self.tick_seconds = Histogram(TICK_BUCKETS)
        self.exit_seconds = Histogram(EXIT_BUCKETS)
        self.exporter = Exporter(config.address, config.textfile)
        self.exporter.start()

    def seed(self, config: Any) -> None:
        """Export each watch's (and the guard's) first-stop counter at 0 from the start.

        Prometheus' increase() sees no increase in a series that first appears at 1, so
        an alert on increase(memwatchd_actions_total[...]) would miss the first stop of
        every target (examples/prometheus/memwatchd.rules.yml relies on these zeros).
        """
        for key in first_stops(config):
            self.actions.setdefault(key, 0)

    def on_record(self, record: Dict[str, Any]) -> None:
        if record.get("type") != "decision":
            return
        key = (str(record.get("target")), str(record.get("action")), str(record.get("reason")),
               record.get("signal") or "")
        self.actions[key] = self.actions.get(key, 0) + 1

    def publish(self, view: Dict[str, Any]) -> None:
        self.exporter.snapshot = _Snapshot(view, dict(self.actions), self.tick_seconds.copy(),
                                           self.exit_seconds.copy())

    def close(self) -> None:
        self.exporter.stop()


def first_stops(config: Any) -> List[tuple]:
    """(target, action, reason, signal) of the first decision that stops a target, per
    watch, and the guard's (memwatchd.policy records exactly these)."""
    from memwatchd import policy
    first = {"term": ("term", "SIGTERM"), "kill": ("kill", "SIGKILL"), "freeze": ("freeze", "")}
    keys = [(w.name, first[w.action][0], policy.REASON_LIMIT, first[w.action][1])
            for w in config.watches if w.action in first]
    if config.guard.enabled:
        keys += [("guard", "term", policy.REASON_GUARD_LOW, "SIGTERM"),
                 ("guard", "kill", policy.REASON_GUARD_CRITICAL, "SIGKILL")]
        g = config.guard
        if g.psi_full > 0:
            keys.append(("guard", "term", policy.REASON_GUARD_PSI, "SIGTERM"))
        if g.psi_some > 0:
            keys.append(("guard", "term", policy.REASON_GUARD_PSI_SOME, "SIGTERM"))
        if g.psi_full_kill > 0:
            keys.append(("guard", "kill", policy.REASON_GUARD_PSI_CRITICAL, "SIGKILL"))
        if g.psi_io_full > 0:
            keys.append(("guard", "term", policy.REASON_GUARD_PSI_IO, "SIGTERM"))
    return keys


class _Conn:
    __slots__ = ("sock", "inbuf", "out", "deadline")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.inbuf, self.out, self.deadline = sock, bytearray(), None, deadline


def bind(address: Tuple[str, int]) -> socket.socket:
    """A non-blocking listening socket on (host, port). Raises OSError."""
    host, port = address
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(16)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Exporter(threading.Thread):
    """The one metrics thread: serves GET /metrics and rewrites the textfile."""

    def __init__(self, address: Optional[Tuple[str, int]], textfile: str = ""):
        super().__init__(name="memwatchd-metrics", daemon=True)
        self.listener = bind(address) if address else None
        self.address = self.listener.getsockname()[:2] if self.listener else None
        self.textfile = textfile
        self.snapshot: Optional[_Snapshot] = None
        self.served = 0
        self._conns: Dict[int, _Conn] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._textfile_at = 0.0
        self._textfile_of = None
        self._textfile_failed = False
        self._accept_window = (0, 0)   # (second, accepts in it)
        if self.listener:
            log(NOTICE, f"metrics on http://{_hostport(self.address)}/metrics")

    def stop(self) -> None:
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self.is_alive():
            self.join(2.0)
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        if self.listener:
            self.listener.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def run(self) -> None:
        while not self._stopping:
            try:
                self._once()
            except Exception as e:  # never let the thread die silently; keep serving
                log(ERR, f"metrics exporter: {type(e).__name__}: {e}")
                time.sleep(1.0)

    def _once(self) -> None:
        now = time.monotonic()
        self._write_textfile(now)
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        second = int(now)
        accepts = self._accept_window[1] if self._accept_window[0] == second else 0
        if self.listener and len(self._conns) < MAX_CONNECTIONS and accepts < MAX_ACCEPTS_PER_SECOND:
            poller.register(self.listener, select.POLLIN)
        for fd, conn in self._conns.items():
            poller.register(fd, select.POLLIN if conn.out is None else select.POLLOUT)
        wake = [c.deadline for c in self._conns.values()]
        wake.append(second + 1.0)
        if self.textfile:
            wake.append(self._textfile_at + TEXTFILE_EVERY)
        timeout = max(0.0, min(wake) - now)
        for fd, events in poller.poll(timeout * 1000.0):
            if fd == self._wake_r:
                try:
                    os.read(self._wake_r, 64)
                except OSError:
                    pass
            elif self.listener is not None and fd == self.listener.fileno():
                self._accept(second)
            elif fd in self._conns:
                self._serve(self._conns[fd], events)
        now = time.monotonic()
        for fd, conn in list(self._conns.items()):
            if now >= conn.deadline:
                self._close(fd)

    def _accept(self, second: int) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:   # EMFILE and the like: back off instead of spinning
            log(ERR, f"metrics endpoint: accept failed: {e.strerror}")
            self._accept_window = (second, MAX_ACCEPTS_PER_SECOND)
            return
        sock.setblocking(False)
        n = self._accept_window[1] if self._accept_window[0] == second else 0
        self._accept_window = (second, n + 1)
        self._conns[sock.fileno()] = _Conn(sock, time.monotonic() + DEADLINE)

    def _serve(self, conn: _Conn, events: int) -> None:
        fd = conn.sock.fileno()
        try:
            if conn.out is None:
                data = conn.sock.recv(4096)
                if not data:
                    self._close(fd)
                    return
                conn.inbuf += data
                end = conn.inbuf.find(b"\r\n\r\n")
                if end < 0:
                    end = conn.inbuf.find(b"\n\n")
                if end < 0:
                    if len(conn.inbuf) > MAX_REQUEST:
                        conn.out = memoryview(_response(431, b"request too large\n"))
                    return
                conn.out = memoryview(self._respond(bytes(conn.inbuf[:end])))
            else:
                sent = conn.sock.send(conn.out)
                conn.out = conn.out[sent:]
                if not conn.out:
                    self.served += 1
                    self._close(fd)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(fd)

    def _respond(self, head: bytes) -> bytes:
        parts = head.split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response(400, b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET\n", extra=b"Allow: GET, HEAD\r\n")
        if target not in (b"/metrics", b"/"):
            return _response(404, b"see /metrics\n")
        body = render(self.snapshot)
        if not body:
            return _response(503, b"no data yet\n", extra=b"Retry-After: 1\r\n")
        return _response(200, body, head_only=method == b"HEAD")

    def _close(self, fd: int) -> None:
        conn = self._conns.pop(fd, None)
        if conn is not None:
            conn.sock.close()

    def _write_textfile(self, now: float) -> None:
        snapshot = self.snapshot
        if not self.textfile or snapshot is None or snapshot is self._textfile_of \
                or now - self._textfile_at < TEXTFILE_EVERY:
            return
        self._textfile_at, self._textfile_of = now, snapshot
        try:
            # 0644: node_exporter runs as its own user, and the unit's UMask is 0077. Its
            # directory is node_exporter's to make (one made here would be root's, 0700).
            write_atomic(self.textfile, render(snapshot), 0o644, make_dirs=False)
            self._textfile_failed = False
        except OSError as e:
            if not self._textfile_failed:
                log(ERR, f"could not write the metrics textfile {self.textfile}: {e}")
            self._textfile_failed = True


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}


def _response(code: int, body: bytes, extra: bytes = b"", head_only: bool = False) -> bytes:
    ctype = CONTENT_TYPE if code == 200 else b"text/plain; charset=utf-8"
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n%s\r\n" % (code, _REASONS[code], ctype, len(body), extra))
    return head if head_only else head + body


def _hostport(address: Tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
