#!/usr/bin/python3
"""Guest side: stamp the time every 100 ms, as a user-facing service would.

Each tick appends "monotonic gap_seconds MemAvailable_kB" to the log (on /run,
a tmpfs: no disk latency in the measurement). A gap well over 0.1 s means this
process did not get to run: the guest stalled. Standard library only.
"""
import os
import sys
import time

PERIOD = 0.1


def mem_available_kb(fd):
    data = os.pread(fd, 4096, 0)
    for line in data.split(b"\n"):
        if line.startswith(b"MemAvailable:"):
            return int(line.split()[1])
    return -1


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "/run/mwtest/heartbeat.log"
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    meminfo = os.open("/proc/meminfo", os.O_RDONLY)
    last = time.monotonic()
    while True:
        time.sleep(max(0.0, last + PERIOD - time.monotonic()))
        now = time.monotonic()
        os.write(out, b"%.4f %.4f %d\n" % (now, now - last, mem_available_kb(meminfo)))
        last = now


if __name__ == "__main__":
    main()
