"""The only user of NOTIFY_SOCKET: readiness, reload, stop, status and watchdog pings.

Datagrams are sent with a direct AF_UNIX/SOCK_DGRAM sendto() per message rather
than through the sdnotify package: sdnotify reads os.environ itself (we want an
injectable environment for tests), connect()s once (a socket systemd re-created
after daemon-reexec would then be unreachable), and swallows every error
silently (we count them and log the first). Sends never block (MSG_DONTWAIT): a
plain AF_UNIX datagram send waits while the receiver's queue is full
(net.unix.max_dgram_qlen), which would freeze the daemon whenever PID 1 is slow.
Path and abstract ("@name") sockets are both supported, as in sd_notify(3).

No threads or timers here: watchdog() is called from the daemon's main loop, so a
stuck loop stops the pings and systemd restarts us - which is the point.
"""
from __future__ import annotations

import os
import time
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    import socket
    from typing import Callable, Mapping, Optional

from memwatchd import report

__all__ = ["Notifier"]


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
        self._sock = None  # an _socket.socket once the first message is sent
        self._address: Optional[str] = None
        self.errors = 0            # failed sends (the first is logged at WARNING)
        self.sent = 0              # datagrams sent
        self._last_ping: Optional[float] = None

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

    def _send(self, message: str) -> bool:
        if self._address is None:
            return False
        # The C module, not socket.py: under systemd the daemon stays ~1.4 MiB smaller.
        import _socket as socket
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # Never block the main loop: a busy PID 1 with a full queue costs one
            # dropped message (EAGAIN, counted), not a stalled watchdog daemon.
            self._sock.sendto(message.encode("utf-8", "backslashreplace"),
                              socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self._address)
        except OSError as e:
            self.errors += 1
            if self.errors == 1:
                report.log(report.WARNING,
                           f"systemd notify socket: {e.strerror or e} (further errors not logged)")
            return False
        self.sent += 1
        return True

    def ready(self, status: Optional[str] = None) -> None:
        """READY=1 (startup finished, or a reload done), with an optional STATUS= line."""
        self._send("READY=1" + (self._status_line(status) if status is not None else ""))

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC (Type=notify-reload, systemd 253+; ignored by 252).
        Call ready() when the reload is complete."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """STOPPING=1: shutdown has begun."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """STATUS=<one line> shown by systemctl status."""
        self._send(self._status_line(text).lstrip("\n"))

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

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
