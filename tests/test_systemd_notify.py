"""systemd.Notifier against real AF_UNIX datagram sockets (path and abstract namespace)."""
from __future__ import annotations

import io
import os
import socket
import time
import uuid

import pytest

from memwatchd import report
from memwatchd.systemd import Notifier


class Listener:
    """A bound SOCK_DGRAM socket standing in for systemd's notify socket."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.address = address

    @property
    def env_value(self) -> str:
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def recv(self, timeout=1.0):
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode()
        except socket.timeout:
            return None

    def available(self):
        """Every datagram already queued, without waiting."""
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096, socket.MSG_DONTWAIT).decode())
            except BlockingIOError:
                return out

    def drain(self):
        out = []
        while True:
            msg = self.recv(0.05)
            if msg is None:
                return out
            out.append(msg)

    def close(self):
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    if request.param == "path":
        addr = str(tmp_path / "notify.sock")
    else:
        addr = "\0memwatchd-test-" + uuid.uuid4().hex
    lst = Listener(addr)
    yield lst
    lst.close()


def env_for(listener, **extra):
    env = {"NOTIFY_SOCKET": listener.env_value}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def fields(msg: str) -> dict:
    return dict(line.split("=", 1) for line in msg.split("\n"))


def test_ready_with_status_arrives(listener):
    n = Notifier(env_for(listener))
    assert n.enabled
    n.ready("watching 3 targets")
    assert fields(listener.recv()) == {"READY=1".split("=")[0]: "1", "STATUS": "watching 3 targets"}
    n.ready()
    assert listener.recv() == "READY=1"
    n.close()


def test_status_is_one_line(listener):
    n = Notifier(env_for(listener))
    n.status("killed foo) Z \n<3>evil\nREADY=1")
    msg = listener.recv()
    assert "\n" not in msg and msg.startswith("STATUS=")
    assert fields(msg) == {"STATUS": "killed foo) Z \\x0a<3>evil\\x0aREADY=1"}


def test_status_is_sent_only_when_it_changes(listener):
    """Issue 18: an idle daemon calls status() every second with the same text; systemd
    gets it once. READY=1's STATUS counts as sent; after a reconnect it is sent again."""
    n = Notifier(env_for(listener))
    assert n.status("watching 3 targets") is True
    assert n.status("watching 3 targets") is False
    assert n.status("watching 4 targets") is True
    n.ready("watching 5 targets")
    assert n.status("watching 5 targets") is False
    n.close()                               # as after a refused send: a fresh connection
    assert n.status("watching 5 targets") is True
    assert [fields(m).get("STATUS") for m in listener.drain()] == [
        "watching 3 targets", "watching 4 targets", "watching 5 targets", "watching 5 targets"]


def test_a_status_that_could_not_be_sent_is_sent_again(tmp_path):
    path = str(tmp_path / "gone.sock")
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.status("watching 1 target") is False     # nobody listens yet
    lst = Listener(path)
    try:
        assert n.status("watching 1 target") is True
        assert fields(lst.recv()) == {"STATUS": "watching 1 target"}
    finally:
        lst.close()
        n.close()


def test_stopping(listener):
    n = Notifier(env_for(listener))
    n.stopping()
    assert listener.recv() == "STOPPING=1"


def test_reloading_sends_monotonic_usec(listener):
    n = Notifier(env_for(listener))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    f = fields(listener.recv())
    assert f["RELOADING"] == "1"
    assert before <= int(f["MONOTONIC_USEC"]) <= after


def test_watchdog_cadence_from_a_fast_loop(listener):
    usec = 200_000
    seen = []                               # the notifier's own clock readings

    def clock():
        seen.append(time.monotonic())
        return seen[-1]

    n = Notifier(env_for(listener, WATCHDOG_USEC=usec), clock=clock)
    assert n.watchdog_interval == pytest.approx(0.1)
    assert n.ping_interval == pytest.approx(0.05)
    stamps, got, calls = [], [], []
    end = time.monotonic() + 1.0
    while time.monotonic() < end:           # a main loop ticking every 5 ms
        calls.append(time.monotonic())
        del seen[:]
        if n.watchdog():
            stamps.append(seen[0])          # when the notifier decided to ping
        got.extend(listener.available())    # systemd reads as they come
        time.sleep(0.005)
    got.extend(listener.drain())
    assert got == ["WATCHDOG=1"] * len(got)
    assert len(got) == len(stamps)
    # At least one ping per watchdog_interval (2 per WATCHDOG_USEC), at most one per ping_interval.
    low = int(1.0 / n.watchdog_interval)        # 10
    high = int(1.0 / n.ping_interval) + 1       # 21
    assert low <= len(got) <= high, len(got)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert min(gaps) >= n.ping_interval          # rate limit holds
    # A ping goes out at the first call after ping_interval: at most one loop tick late.
    # With ticks shorter than ping_interval (a healthy loop; a loaded test machine may
    # stretch a 5 ms sleep) systemd never sees a silent half-period (usec / 2).
    longest_tick = max(b - a for a, b in zip(calls, calls[1:]))
    assert max(gaps) <= n.ping_interval + longest_tick + 0.001, (max(gaps), longest_tick)
    if longest_tick < n.ping_interval:
        assert max(gaps) < usec / 1e6 / 2


def test_a_stuck_loop_sends_nothing(listener):
    n = Notifier(env_for(listener, WATCHDOG_USEC=200_000))
    assert n.watchdog() is True
    assert listener.recv() == "WATCHDOG=1"
    time.sleep(0.5)                             # the loop is stuck: watchdog() is not called
    assert listener.drain() == []
    assert n.watchdog() is True                 # it recovers: the next tick pings at once
    assert listener.recv() == "WATCHDOG=1"


def test_a_full_notify_queue_never_blocks_the_caller(listener):
    # Nobody reads (PID 1 busy): the kernel queue fills after net.unix.max_dgram_qlen datagrams.
    n = Notifier(env_for(listener))
    t0 = time.monotonic()
    n.status("s0")
    sock = n._notifier.socket
    for i in range(1, 200):
        n.status(f"s{i}")
    assert time.monotonic() - t0 < 2.0
    assert n.errors > 0 and n.sent + n.errors == 200
    assert n._notifier.socket is sock           # a full queue is no reason to reconnect
    received = listener.drain()
    assert received == [f"STATUS=s{i}" for i in range(len(received))]   # in order, then dropped


def test_watchdog_pid_mismatch_disables_the_watchdog(listener):
    n = Notifier(env_for(listener, WATCHDOG_USEC=200_000, WATCHDOG_PID=os.getpid() + 1))
    assert n.enabled and n.watchdog_interval is None
    assert n.watchdog() is False
    n.ready()
    assert listener.drain() == ["READY=1"]      # notifications still work


def test_watchdog_pid_match_enables_it(listener):
    n = Notifier(env_for(listener, WATCHDOG_USEC=200_000, WATCHDOG_PID=os.getpid()))
    assert n.watchdog() is True
    assert listener.recv() == "WATCHDOG=1"


@pytest.mark.parametrize("env", [{}, {"WATCHDOG_USEC": "100000"}, {"NOTIFY_SOCKET": ""},
                                 {"NOTIFY_SOCKET": "relative/path", "WATCHDOG_USEC": "x"}])
def test_outside_systemd_everything_is_a_quiet_no_op(env):
    buf = io.StringIO()
    report.set_stream(buf, plain=False)
    try:
        n = Notifier(env)
        assert not n.enabled and n.watchdog_interval is None
        n.ready("x")
        n.reloading()
        n.status("y")
        n.stopping()
        assert n.watchdog() is False
        assert n.errors == 0 and n.sent == 0
        n.close()
    finally:
        report.set_stream(None)
    if env.get("NOTIFY_SOCKET") == "relative/path":
        assert buf.getvalue().startswith("<4>NOTIFY_SOCKET=")
    else:
        assert buf.getvalue() == ""


def test_uses_os_environ_by_default(listener, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", listener.env_value)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    Notifier().stopping()
    assert listener.recv() == "STOPPING=1"


def test_send_errors_are_counted_and_logged_once(tmp_path):
    buf = io.StringIO()
    report.set_stream(buf, plain=False)
    try:
        n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "1000"})
        n.ready("x")
        n.status("y")
        time.sleep(0.001)
        n.watchdog()
        assert n.errors == 3 and n.sent == 0
    finally:
        report.set_stream(None)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("<4>systemd notify socket:")


def test_socket_recreated_by_systemd_is_reached_again(tmp_path):
    path = str(tmp_path / "notify.sock")
    first = Listener(path)
    n = Notifier({"NOTIFY_SOCKET": path})
    n.status("one")
    assert first.recv() == "STATUS=one"
    first.close()
    os.unlink(path)
    second = Listener(path)                     # e.g. after systemctl daemon-reexec
    try:
        n.status("two")
        assert second.recv() == "STATUS=two"
    finally:
        second.close()


def test_no_threads_are_started(listener):
    import threading
    before = threading.active_count()
    n = Notifier(env_for(listener, WATCHDOG_USEC=200_000))
    n.ready()
    n.watchdog()
    assert threading.active_count() == before
