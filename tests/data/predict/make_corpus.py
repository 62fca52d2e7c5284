"""Regenerate the predictive trigger's corpus (issue 15) from real processes on this machine.

Each workload below is a real Python process that really allocates (pages touched) and
frees (MALLOC_MMAP_THRESHOLD_ fixed, so freed blocks go back to the kernel); each caps
itself (an address-space limit, SIGALRM after at most 120 s). `memwatchd record --predict
30s` records it in dry run (nothing is signalled) inside a private PID namespace, with the
daemon's own adaptive sampling. With --predict, the recorder writes every reading of a
target whose trend is armed (above predict.ARM of its limit), so replay feeds the trend
exactly what the live daemon saw there (below it: the usual on-change readings, which
are true readings at their true times, only fewer).

Classes (``CORPUS``: name -> class, limit, workload arguments):
  leak-N      a running job (50 MiB steady for 3 s) that starts to leak at N MB/s (1 to
              1000), past its limit (to 1.15x), then exits
  fromstart-N a leak from the process's first moment (no history: reported apart)
  plateau-P   grows towards P% of its limit with an exponential approach (levels off), holds
  ramp-P      grows in a straight line at 4 MB/s to P% of its limit and stops there: a
              leak of that rate until it stops (the benchmark reports it apart)
  sawtooth-P  allocates to P% of its limit and frees it, five times
  build       a parent running short children (two at a time), counted as a tree
  pagecache   writes and reads back a 600 MB file (page cache, not RSS)

Run as root: python3 tests/data/predict/make_corpus.py [NAME...]  (about 3 minutes).
Peak memory: the 1000 MB/s leak's 3.5 GB, one workload at a time.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
MB = 10**6

# name: (class, limit, workload argv)
CORPUS = {
    "leak-1": ("leak", "80M", ["leak", 1 * MB, 90 * MB, 3]),
    "leak-10": ("leak", "200M", ["leak", 10 * MB, 230 * MB, 3]),
    "leak-30": ("leak", "400M", ["leak", 30 * MB, 460 * MB, 3]),
    "leak-100": ("leak", "1G", ["leak", 100 * MB, 1180 * MB, 3]),
    "leak-300": ("leak", "2G", ["leak", 300 * MB, 2350 * MB, 3]),
    "leak-1000": ("leak", "3G", ["leak", 1000 * MB, 3500 * MB, 3]),
    "fromstart-1000": ("fromstart", "3G", ["leak", 1000 * MB, 3500 * MB, 0]),
    "plateau-50": ("plateau", "512M", ["plateau", 268 * MB, 1.5, 6]),
    "plateau-70": ("plateau", "512M", ["plateau", 376 * MB, 1.5, 6]),
    "plateau-90": ("plateau", "512M", ["plateau", 483 * MB, 2.0, 6]),
    "ramp-60": ("ramp", "512M", ["ramp", 322 * MB, 4 * MB, 3]),
    "ramp-85": ("ramp", "256M", ["ramp", 228 * MB, 4 * MB, 3]),
    "sawtooth-60": ("sawtooth", "512M", ["sawtooth", 322 * MB, 400 * MB, 5]),
    "sawtooth-85": ("sawtooth", "512M", ["sawtooth", 456 * MB, 400 * MB, 5]),
    "build": ("build", "256M", ["build"]),
    "pagecache": ("pagecache", "256M", ["pagecache", 600 * MB]),
}

WORKLOAD = r'''
import math, os, resource, signal, subprocess, sys, time
signal.alarm(120)
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
CHUNK = 1 << 20
ONES = b"\x01" * (CHUNK // 4096)
held = []

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def grow_to(nbytes):
    while len(held) * CHUNK < nbytes:
        b = bytearray(CHUNK)
        b[::4096] = ONES          # touch every page (at C speed: the fast leaks need it)
        held.append(b)

def follow(target, seconds, until=None):
    """Hold the allocation at target(t) (bytes above the start) for this long (and, with
    until, at least until that much is allocated)."""
    start = time.monotonic()
    while True:
        t = time.monotonic() - start
        if t >= seconds and (until is None or len(held) * CHUNK >= until):
            return
        grow_to(target(t))
        time.sleep(0.005)

mode = sys.argv[1]
base = rss()
if mode == "leak":
    rate, cap, warm = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    grow_to(50 << 20)             # a running job: its working set, steady for `warm` seconds
    time.sleep(warm)
    base = rss()
    top = (50 << 20) + cap - base
    follow(lambda t: min((50 << 20) + rate * t, top), (cap - base) / rate + 0.5,
           until=top)   # a loaded machine may allocate slower than asked: go on to the cap
elif mode == "plateau":
    top, tau, hold = int(sys.argv[2]) - base, float(sys.argv[3]), float(sys.argv[4])
    follow(lambda t: top * (1 - math.exp(-t / tau)), 5 * tau + hold)
elif mode == "ramp":
    top, rate, hold = int(sys.argv[2]) - base, int(sys.argv[3]), float(sys.argv[4])
    follow(lambda t: min(rate * t, top), top / rate + hold)
elif mode == "sawtooth":
    top, rate, cycles = int(sys.argv[2]) - base, int(sys.argv[3]), int(sys.argv[4])
    for _ in range(cycles):
        follow(lambda t: min(rate * t, top), top / rate + 0.2)
        del held[:]
        time.sleep(0.6)
elif mode == "build":
    sizes = [60, 90, 40, 100, 70, 50, 90, 60, 80, 40]
    child = "import sys, time\nb = bytearray(int(sys.argv[1]) << 20)\n" \
            "for i in range(0, len(b), 4096): b[i] = 1\ntime.sleep(0.4)"
    for i in range(0, len(sizes), 2):
        procs = [subprocess.Popen([sys.executable, "-c", child, str(n)]) for n in sizes[i:i + 2]]
        for p in procs:
            p.wait()
        time.sleep(0.1)
elif mode == "pagecache":
    size = int(sys.argv[2])
    path = os.path.join(os.environ["WORKDIR"], "cache.bin")
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
    os.unlink(path)
    time.sleep(0.5)
'''


def inner(names) -> int:
    env = dict(os.environ, PYTHONPATH=ROOT, MALLOC_MMAP_THRESHOLD_="65536")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as work:
        env["WORKDIR"] = work
        prog = os.path.join(work, "workload.py")
        with open(prog, "w") as f:
            f.write(WORKLOAD)
        for name in names:
            _cls, limit, argv = CORPUS[name]
            out = os.path.join(HERE, f"{name}.trace.gz")
            subprocess.run([sys.executable, "-m", "memwatchd", "record", "--out", out,
                            "--limit", limit, "--predict", "30s", "--name", name.split("-")[0],
                            "--", sys.executable, prog, *map(str, argv)], env=env, check=True)
    return 0


if __name__ == "__main__":
    names = sys.argv[1:] or list(CORPUS)
    unknown = [n for n in names if n not in CORPUS]
    if unknown:
        sys.exit(f"unknown: {', '.join(unknown)}; known: {', '.join(CORPUS)}")
    if os.getpid() != 1:
        sys.exit(subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                                 sys.executable, os.path.abspath(__file__), *names]).returncode)
    sys.exit(inner(names))
