"""The kernel's process-events connector: a new process is seen at its exec or fork.

Without it a process that starts after the daemon and matches a ``cmdline`` watch,
or a new child of a ``scope = "tree"`` target, is found at the next rescan (up to
RESCAN_INTERVAL later, hundreds of MiB over its limit at 1 GB/s). With it, the
kernel multicasts a PROC_EVENT_EXEC / PROC_EVENT_FORK for every exec and fork on
a NETLINK_CONNECTOR socket (group CN_IDX_PROC); the loop polls that socket's fd,
so a new process is judged within milliseconds. The rescan stays as it is: it is
the fallback, and the safety net for anything an event could miss.

The connector is used only where its pids mean what /proc says:

* before Linux 6.6 it needs CAP_NET_ADMIN (the unit grants it; without, the
  kernel's answer to LISTEN is EPERM); 6.6 lets anyone listen;
* the kernel reports pids of the initial pid namespace and ignores a LISTEN from
  any other pid or user namespace (tests run memwatchd in `unshare --pid`): there
  a pid from an event would name another process than /proc/<pid>, so the
  connector is never opened outside the initial namespaces (initial_namespaces:
  the namespace files' inode numbers) and the daemon says "rescan" instead;
* its socket can overflow (ENOBUFS) under a flood of forks: events were dropped,
  so the caller rescans everything at once; a dropped event never loses a target.

Events are read in bounded batches (MAX_EVENTS per call): a fork bomb or a user
exec'ing in a loop costs the loop one batch per wake-up, never a stall; what is
left waits in the socket (or overflows it, which means a full rescan).
"""
from __future__ import annotations

import errno
import os
import socket
import struct
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Tuple

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
NLMSG_DONE = 3
NLMSG_ERROR = 2

PROC_EVENT_NONE = 0x0          # the kernel's answer to LISTEN (its err in the first field)
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2

NLMSGHDR = struct.Struct("=IHHII")          # len, type, flags, seq, pid
CN_MSG = struct.Struct("=IIIIHH")           # idx, val, seq, ack, len, flags
EVENT_HEAD = struct.Struct("=IIQ")          # what, cpu, timestamp_ns
FORK = struct.Struct("=IIII")               # parent pid, parent tgid, child pid, child tgid
EXEC = struct.Struct("=II")                 # pid, tgid
HEADERS = NLMSGHDR.size + CN_MSG.size + EVENT_HEAD.size

MAX_EVENTS = 512          # events taken per call: a flood waits (or overflows into a rescan)
RCVBUF = 1 << 20          # socket buffer asked for; a full one drops events (ENOBUFS)
ACK_WAIT = 0.5            # seconds to wait for the kernel's answer to LISTEN

PID_NS_INIT_INO = 0xEFFFFFFC    # the kernel's fixed inode numbers of the initial
USER_NS_INIT_INO = 0xEFFFFFFD   # pid and user namespaces (PROC_*_INIT_INO)


def initial_namespaces(proc: str = "/proc") -> str:
    """"" if this process is in the initial pid and user namespaces (the only place the
    connector's pids are /proc's pids), else why not. The namespace files' inode
    numbers say it (NSpid cannot: a /proc mounted inside the namespace shows one level)."""
    for kind, initial in (("pid", PID_NS_INIT_INO), ("user", USER_NS_INIT_INO)):
        try:
            inode = os.stat(f"{proc}/self/ns/{kind}").st_ino
        except OSError as e:
            return f"cannot tell the {kind} namespace ({e.strerror})"
        if inode != initial:
            return (f"not in the initial {kind} namespace (the kernel reports the host's "
                    f"pids and ignores listeners here)")
    return ""


class Unavailable(Exception):
    """The connector cannot be used here; its text says why (for the log and `status`)."""


class Batch:
    """What one read of the socket brought: exec'd pids, new processes (parent, child),
    and whether events were lost (the caller must rescan everything)."""

    __slots__ = ("execs", "exec_ns", "forks", "lost", "more")

    def __init__(self) -> None:
        self.execs: List[int] = []
        self.exec_ns: List[int] = []   # when each exec happened (CLOCK_MONOTONIC ns)
        self.forks: List[Tuple[int, int]] = []
        self.lost = False
        self.more = False      # MAX_EVENTS reached: the socket may hold more


class Connector:
    """A listening process-events socket (non-blocking). Raises Unavailable if the
    kernel, the namespaces or the capabilities do not allow it."""

    def __init__(self, proc: str = "/proc", rcvbuf: int = RCVBUF) -> None:
        why = initial_namespaces(proc)
        if why:
            raise Unavailable(why)
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 NETLINK_CONNECTOR)
        except (OSError, AttributeError) as e:
            raise Unavailable(f"no netlink connector socket ({_why(e)})") from None
        self.sock = sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((0, CN_IDX_PROC))
            self._listen()
            sock.setblocking(False)
        except Unavailable:
            sock.close()
            raise
        except OSError as e:
            sock.close()
            raise Unavailable(f"cannot listen to process events ({_why(e)})") from None

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            try:
                self._control(PROC_CN_MCAST_IGNORE)   # the kernel counts listeners
            except OSError:
                pass
            self.sock.close()

    def _listen(self) -> None:
        """LISTEN (answered with the kernel's verdict), then narrow it to forks and execs:
        Linux >= 6.6 then drops the other events (exits, comm and uid changes) in the
        kernel, fewer wake-ups; an older kernel ignores that second, longer request.
        (Asked the other way round, the answer itself would be filtered out.)"""
        self._await_ack(self._control(PROC_CN_MCAST_LISTEN), ACK_WAIT)
        self._control(PROC_CN_MCAST_LISTEN, PROC_EVENT_FORK | PROC_EVENT_EXEC)

    def _control(self, op: int, event_types: int = 0) -> int:
        """Send LISTEN or IGNORE (with event_types: the filtered form, struct proc_input);
        returns the ack number its answer will carry (ours + 1: the kernel does not keep
        our sequence number)."""
        ack = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        payload = struct.pack("=II", op, event_types) if event_types else struct.pack("=I", op)
        cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, ack, len(payload), 0)
        head = NLMSGHDR.pack(NLMSGHDR.size + len(cn) + len(payload), NLMSG_DONE, 0, 0, 0)
        self.sock.send(head + cn + payload)
        return ack + 1

    def _await_ack(self, ack: int, wait: float) -> None:
        """The kernel answers LISTEN with a PROC_EVENT_NONE carrying our ack number + 1
        and its error (EPERM where a kernel wants CAP_NET_ADMIN); it does not answer one
        from a namespace it ignores. Another listener's answer (the same multicast group)
        carries another number and does not count."""
        self.sock.settimeout(wait)
        while True:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                raise Unavailable("the kernel did not answer LISTEN (a namespace it ignores, "
                                  "or a kernel without process events)") from None
            for what, body, _seq, cn_ack, _stamp in _events(data):
                if what == PROC_EVENT_NONE and cn_ack == ack:
                    err = struct.unpack_from("=I", body)[0] if len(body) >= 4 else 0
                    if err:
                        raise Unavailable("the kernel refused LISTEN ("
                                          f"{_why(OSError(err, os.strerror(err)))})")
                    return

    def read(self, limit: int = MAX_EVENTS) -> Batch:
        """Up to ``limit`` fork/exec events; never blocks. ENOBUFS (events dropped)
        sets ``lost``: rescan."""
        batch = Batch()
        taken = 0
        while taken < limit:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return batch
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    batch.lost = True
                    continue     # the buffer is reset: go on reading what came since
                raise
            for what, body, _seq, _ack, stamp in _events(data):
                taken += 1
                if what == PROC_EVENT_FORK and len(body) >= FORK.size:
                    _ppid, parent, child_pid, child = FORK.unpack_from(body)
                    if child_pid == child:       # a new process, not a new thread
                        batch.forks.append((parent, child))
                elif what == PROC_EVENT_EXEC and len(body) >= EXEC.size:
                    batch.execs.append(EXEC.unpack_from(body)[1])
                    batch.exec_ns.append(stamp)
        batch.more = True
        return batch


def _events(data: bytes):
    """(what, event body, cn seq, cn ack, timestamp ns) of each proc_event in one datagram (several netlink messages
    may share it); malformed ones are skipped."""
    offset = 0
    while offset + HEADERS <= len(data):
        length, kind = NLMSGHDR.unpack_from(data, offset)[:2]
        if length < NLMSGHDR.size or offset + length > len(data):
            return
        if kind != NLMSG_ERROR:
            idx, val, seq, ack = CN_MSG.unpack_from(data, offset + NLMSGHDR.size)[:4]
            if idx == CN_IDX_PROC and val == CN_VAL_PROC and length >= HEADERS:
                what, _cpu, stamp = EVENT_HEAD.unpack_from(data, offset + NLMSGHDR.size + CN_MSG.size)
                yield what, data[offset + HEADERS:offset + length], seq, ack, stamp
        offset += (length + 3) & ~3


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in (errno.EPERM, errno.EACCES):
        return f"{e.strerror}: needs CAP_NET_ADMIN"
    return getattr(e, "strerror", None) or str(e)
