#!/usr/bin/python3
"""Guest side: a memory hog that always caps itself (bytes and seconds).

Allocates STEP MiB every STEP/RATE seconds (anonymous mmap with MAP_POPULATE:
the kernel faults every page in at once, so the memory is really resident,
and under TCG this is 2-3x faster than touching the pages from Python), logs each step to --log as "tag monotonic
allocated_bytes cgroup_memory.current MemAvailable_kB", holds what it has
once it reaches --max-mb, and exits 0 after --max-seconds in any case.
--hold-mb allocates that much at once and then just sleeps (a bystander or
a big protected service).
--comm renames the process (prctl PR_SET_NAME), e.g. to "sshd".
--leader-exits runs all of that in a second thread once the main thread has
called pthread_exit() (its /proc/<pid>/statm then reads zeros); --delay waits
that long before growing; --label is free text for a cmdline watch to match.
Standard library only; runs on the guest's /usr/bin/python3.
"""
import argparse
import ctypes
import mmap
import os
import signal
import threading
import time


def cgroup_current_path():
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return "/sys/fs/cgroup" + line[3:].strip() + "/memory.current"
    except OSError:
        pass
    return None


def read_int(path):
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError, TypeError):
        return -1


def mem_available_kb():
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def populated(size):
    """size bytes of private anonymous memory, every page resident."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rate-mb", type=float, default=200.0, help="MiB per second")
    p.add_argument("--step-mb", type=float, default=4.0)
    p.add_argument("--max-mb", type=float, default=1200.0, help="cap: never more than this")
    p.add_argument("--max-seconds", type=float, default=30.0, help="cap: exit 0 after this")
    p.add_argument("--hold-mb", type=float, default=0.0, help="allocate this at once, then sleep")
    p.add_argument("--log", default="")
    p.add_argument("--comm", default="")
    p.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM (tests escalation)")
    p.add_argument("--leader-exits", action="store_true",
                   help="grow in a thread after the main thread has exited")
    p.add_argument("--delay", type=float, default=0.0, help="seconds to wait before growing")
    p.add_argument("--label", default="", help="free text (for a cmdline watch to match)")
    args = p.parse_args()
    if args.leader_exits:
        def worker():
            while leader_state() != "Z":
                time.sleep(0.01)
            os._exit(run(args))
        threading.Thread(target=worker).start()
        ctypes.CDLL(None).pthread_exit(None)
    return run(args)


def leader_state():
    with open("/proc/%d/stat" % os.getpid()) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def run(args):
    if args.comm:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, args.comm.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log_fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644) \
        if args.log else -1
    current = cgroup_current_path()
    time.sleep(args.delay)
    mib = 1 << 20
    chunks = []
    total = 0
    started = time.monotonic()
    deadline = started + args.max_seconds

    def note(tag="step"):
        if log_fd >= 0:
            os.write(log_fd, ("%s %.6f %d %d %d\n" % (tag, time.monotonic(), total,
                                                     read_int(current), mem_available_kb())
                              ).encode())

    note("start")
    if args.hold_mb:
        chunks.append(populated(int(args.hold_mb * mib)))
        total = len(chunks[0])
        note("held")
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return 0
    step = int(args.step_mb * mib)
    cap = int(args.max_mb * mib)
    period = args.step_mb / args.rate_mb
    n = 0
    while time.monotonic() < deadline:
        if total + step <= cap:
            chunks.append(populated(step))
            total += step
            note()
        elif total < cap:
            chunks.append(populated(cap - total))
            total = cap
            note("cap")
        n += 1
        time.sleep(max(0.0, started + n * period - time.monotonic()))
    note("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
