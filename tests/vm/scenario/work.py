#!/usr/bin/python3
"""Guest side: the race's workloads, each capped in bytes and in seconds.

    work.py leak  --rate-mb R --max-mb M --max-seconds S
        grows by R MiB/s up to M MiB and, all the time, touches every page of what
        it holds (a simulation iterating over its arrays): its whole working set
        is hot, so what goes to swap comes straight back.
    work.py cold  --rate-mb R --max-mb M --max-seconds S [--hot-mb H]
        appends pages at R MiB/s up to M MiB and never touches them again, while
        it works in H MiB (default 32) it keeps touching: the cold pages are what
        swap is for (the benign case).
    work.py reread --file PATH --max-seconds S
        reads PATH over and over (a service running from a file working set).
    work.py hold --mb M --max-seconds S
        takes M MiB at once and holds it (the steady benign job).

Each logs nothing; it exits 0 after --max-seconds in any case. Standard library
only (the guest's /usr/bin/python3).
"""
import argparse
import mmap
import os
import time

MIB = 1 << 20
PAGE = mmap.PAGESIZE
STEP_MB = 4


def populated(size):
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)


def touch(chunk, ones):
    chunk[::PAGE] = ones   # one write per page, in C


def grow(args, hot_all):
    deadline = time.monotonic() + args.max_seconds
    started = time.monotonic()
    step = STEP_MB * MIB
    ones = b"\1" * (step // PAGE)
    chunks = []
    hot = [populated(args.hot_mb * MIB)] if not hot_all and args.hot_mb else []
    hot_ones = b"\1" * (args.hot_mb * MIB // PAGE) if hot else b""
    while time.monotonic() < deadline:
        due = min(args.max_mb, (time.monotonic() - started) * args.rate_mb)
        while len(chunks) * STEP_MB + STEP_MB <= due:
            chunks.append(populated(step))
        for c in (chunks if hot_all else []):
            touch(c, ones)
            if time.monotonic() >= deadline:
                break
        for c in hot:
            touch(c, hot_ones)
        time.sleep(0.01)


def reread(args):
    deadline = time.monotonic() + args.max_seconds
    while time.monotonic() < deadline:
        with open(args.file, "rb", buffering=0) as f:
            while f.read(MIB) and time.monotonic() < deadline:
                pass


def hold(args):
    chunk = populated(int(args.mb * MIB))
    deadline = time.monotonic() + args.max_seconds
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    chunk.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=("leak", "cold", "reread", "hold"))
    p.add_argument("--rate-mb", type=float, default=20.0)
    p.add_argument("--max-mb", type=float, default=512.0)
    p.add_argument("--hot-mb", type=int, default=32)
    p.add_argument("--mb", type=float, default=0.0)
    p.add_argument("--file", default="")
    p.add_argument("--max-seconds", type=float, default=60.0)
    args = p.parse_args()
    if args.kind == "leak":
        grow(args, hot_all=True)
    elif args.kind == "cold":
        grow(args, hot_all=False)
    elif args.kind == "reread":
        reread(args)
    else:
        hold(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
