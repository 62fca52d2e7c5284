"""The only user of NOTIFY_SOCKET: readiness, reload, stop, status and watchdog pings.

The datagrams go through sdnotify's SystemdNotifier.notify(), with four things
sdnotify itself does not do, each needed by a watchdog daemon:
  - the send never blocks: the socket is non-blocking. A plain AF_UNIX datagram
    send waits while the receiver's queue is full (net.unix.max_dgram_qlen),
    which would freeze the daemon whenever PID 1 is slow; here it costs one
    dropped message (EAGAIN, counted).
  - errors are counted and the first one is logged (sdnotify, without debug,
    swallows them; with debug=True they reach us).
  - a socket that PID 1 re-created (systemctl daemon-reexec) is reached again:
    sdnotify connect()s once, so a refused send reconnects and retries once.
  - the environment is injectable (tests) and parsed once: NOTIFY_SOCKET path or
    "@abstract" as in sd_notify(3), WATCHDOG_USEC, WATCHDOG_PID.

No threads or timers here: watchdog() is called from the daemon's main loop, so a
stuck loop stops the pings and systemd restarts us - which is the point.
"""
from __future__ import annotations

import errno
import os
import time
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import Callable, Mapping, Optional

from memwatchd import report

__all__ = ["Notifier"]

# errno values after which a fresh connect() may succeed: the socket was re-created
# (ECONNREFUSED, ENOTCONN, ECONNRESET) or is being re-created (ENOENT).
_RECONNECT = (errno.ECONNREFUSED, errno.ENOTCONN, errno.ECONNRESET, errno.ENOENT)


class Notifier:
    """sd_notify(3) for one daemon; every method is a quiet no-op outside systemd.

    Watchdog cadence: systemd kills the service if no WATCHDOG=1 arrives within
    WATCHDOG_USEC. watchdog_interval is half of that (the longest the main loop
    may go between watchdog() calls - cap its sleep to it); watchdog() may be
    called every tick and sends only when watchdog_interval / 2 (a quarter of
    WATCHDOG_USEC) has passed since the last ping, i.e. about four pings per
    WATCHDOG_USEC, so one slow tick (up to watchdog_interval) never costs a restart.
    """

    def __init__(self, environ: Optional[Mapping[str, str]] = None,
                 clock: Callable[[], float] = time.monotonic):
        env = os.environ if environ is None else environ
        self._clock = clock
        self._notifier = None  # a connected sdnotify.SystemdNotifier once a message is sent
        self._address: Optional[str] = None
        self.errors = 0            # failed sends (the first is logged at WARNING)
        self.sent = 0              # datagrams sent
        self._last_ping: Optional[float] = None
        self._status: Optional[str] = None   # the STATUS= text systemd last received

        raw = env.get("NOTIFY_SOCKET", "")
        if raw.startswith("@"):
            self._address = "\0" + raw[1:]
        elif raw.startswith("/"):
            self._address = raw
        elif raw:
            report.log(report.WARNING,
                       f"NOTIFY_SOCKET={report.escape(raw)} is not a path or @abstract socket: ignored")

        self._watchdog_usec = 0
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
        except ValueError:
            usec = 0
        wd_pid = env.get("WATCHDOG_PID", "")
        for_us = True
        if wd_pid:
            try:
                for_us = int(wd_pid) == os.getpid()
            except ValueError:
                for_us = False
        if usec > 0 and for_us and self._address is not None:
            self._watchdog_usec = usec

    # ------------------------------------------------------------ properties

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notify socket."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> Optional[float]:
        """Half of WATCHDOG_USEC in seconds: the main loop must call watchdog() at least
        this often. None when systemd watchdog is off or meant for another PID."""
        return self._watchdog_usec / 2e6 if self._watchdog_usec else None

    @property
    def ping_interval(self) -> Optional[float]:
        """Minimum seconds between two WATCHDOG=1 datagrams (watchdog_interval / 2)."""
        return self._watchdog_usec / 4e6 if self._watchdog_usec else None

    # ------------------------------------------------------------ messages

    def _connect(self):
        """sdnotify's notifier on a socket we open ourselves: its constructor would read
        os.environ, open a blocking socket and swallow the errors."""
        import socket

        import sdnotify
        notifier = sdnotify.SystemdNotifier.__new__(sdnotify.SystemdNotifier)
        notifier.debug = True       # raise, so that errors are counted and logged
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(self._address)
        except OSError:
            sock.close()
            raise
        notifier.socket = sock
        return notifier

    def _send(self, message: str) -> bool:
        if self._address is None:
            return False
        # sdnotify encodes with latin-1; this round trip hands it our UTF-8 bytes as they are.
        state = message.encode("utf-8", "backslashreplace").decode("latin-1")
        for attempt in (1, 2):
            reused = self._notifier is not None
            try:
                if self._notifier is None:
                    self._notifier = self._connect()
                self._notifier.notify(state)
            except OSError as e:
                # A socket re-created by PID 1 refuses the old connection: reconnect, and
                # retry once if it was an old connection. A full queue (EAGAIN) keeps the
                # socket and is not retried: that would only wait for PID 1.
                if e.errno in _RECONNECT:
                    self.close()
                    if attempt == 1 and reused:
                        continue
                self.errors += 1
                if self.errors == 1:
                    report.log(report.WARNING,
                               f"systemd notify socket: {e.strerror or e} (further errors not logged)")
                return False
            self.sent += 1
            return True
        return False

    def ready(self, status: Optional[str] = None) -> None:
        """READY=1 (startup finished, or a reload done), with an optional STATUS= line."""
        if self._send("READY=1" + (self._status_line(status) if status is not None else "")) \
                and status is not None:
            self._status = status

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC (Type=notify-reload, systemd 253+; ignored by 252).
        Call ready() when the reload is complete."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """STOPPING=1: shutdown has begun."""
        self._send("STOPPING=1")

    def status(self, text: str) -> bool:
        """STATUS=<one line> shown by systemctl status; sent only when it differs from
        what systemd last received (an idle daemon sends nothing). True if sent."""
        if text == self._status:
            return False
        if self._send(self._status_line(text).lstrip("\n")):
            self._status = text
            return True
        return False

    @staticmethod
    def _status_line(text: str) -> str:
        return "\nSTATUS=" + report.escape(text)

    def watchdog(self) -> bool:
        """Ping the watchdog if ping_interval has passed since the last ping; True if sent.

        Cheap enough to call on every tick (one clock read when nothing is due).
        """
        if not self._watchdog_usec:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self._watchdog_usec / 4e6:
            return False
        self._last_ping = now
        return self._send("WATCHDOG=1")

    def ping_socket(self) -> Optional[tuple]:
        """(fd, every, first_in) for a wait that pings the watchdog itself (the daemon's
        quiet wait, in C: sampler.wait_quiet): the connected socket, ping_interval, and
        the seconds until the next ping is due. None without a watchdog or before the
        socket is connected (the first message connects it). Report what was sent with
        pinged(): the cadence goes on from there."""
        if not self._watchdog_usec or self._notifier is None:
            return None
        every = self._watchdog_usec / 4e6
        first = 0.0 if self._last_ping is None else max(0.0, self._last_ping + every - self._clock())
        return self._notifier.socket.fileno(), every, first

    def pinged(self, n: int, ago: float = 0.0) -> None:
        """n WATCHDOG=1 datagrams were sent on ping_socket(), the last one ago seconds ago."""
        if n > 0:
            self.sent += n
            self._last_ping = self._clock() - ago

    def close(self) -> None:
        self._status = None   # a new connection may reach a new PID 1: say it again
        if self._notifier is not None:
            self._notifier.socket.close()
            self._notifier = None
