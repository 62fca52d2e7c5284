"""Regenerate the golden traces in tests/data/ from real processes on this machine.

Each workload is a small Python program that really allocates and frees (and caps
itself: at most 160 MiB and 10 s); `memwatchd record` records it in dry run (nothing
is signalled) inside a private PID namespace, sampling every 100 ms:

  leak.trace.gz        grows 4 MiB every 50 ms to 120 MiB (limit 100M: a dry-run SIGTERM)
  plateau-N.trace.gz   climbs to 40/48/56 MiB, holds for 2 s, exits (three runs, for suggest)
  sawtooth.trace.gz    allocates 48 MiB and frees it, three times
  build.trace.gz       a parent that runs eight short children (two at a time) of 16-40 MiB

Run as root: python3 tests/data/make_traces.py  (about 30 s)
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

PRELUDE = """
import os, resource, signal, sys, time
signal.alarm(10)
resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))
MiB = 1 << 20
def block(n):
    b = bytearray(n)
    for i in range(0, n, 4096):
        b[i] = 1
    return b
"""

WORKLOADS = {
    "leak": ("100M", """
keep = []
while len(keep) < 30:
    keep.append(block(4 * MiB)); time.sleep(0.05)
time.sleep(0.5)
"""),
    "plateau-1": ("100M", "x = [block(4 * MiB) for _ in range(10)]; time.sleep(2)"),
    "plateau-2": ("100M", "x = [block(4 * MiB) for _ in range(12)]; time.sleep(2)"),
    "plateau-3": ("100M", "x = [block(4 * MiB) for _ in range(14)]; time.sleep(2)"),
    "sawtooth": ("100M", """
for _ in range(3):
    x = []
    for _ in range(12):
        x.append(block(4 * MiB)); time.sleep(0.04)
    time.sleep(0.3)
    del x
    time.sleep(0.5)
"""),
    "build": ("200M", """
import subprocess
sizes = [16, 24, 40, 16, 32, 24, 40, 16]
child = "import time\\n" + %r + "\\nx = block(int(sys.argv[1]) * MiB); time.sleep(0.4)"
for i in range(0, len(sizes), 2):
    procs = [subprocess.Popen([sys.executable, "-c", child, str(n)]) for n in sizes[i:i + 2]]
    for p in procs:
        p.wait()
""" % PRELUDE),
}


def inner() -> int:
    env = dict(os.environ, PYTHONPATH=ROOT)
    with tempfile.TemporaryDirectory() as work:
        for name, (limit, body) in WORKLOADS.items():
            prog = os.path.join(work, f"{name.split('-')[0]}.py")
            with open(prog, "w") as f:
                f.write(PRELUDE + body)
            out = os.path.join(HERE, f"{name}.trace.gz")
            subprocess.run([sys.executable, "-m", "memwatchd", "record", "--out", out,
                            "--interval", "100ms", "--limit", limit, "--name", name.split("-")[0],
                            "--", sys.executable, prog], env=env, check=True)
    return 0


if __name__ == "__main__":
    if os.getpid() != 1:
        sys.exit(subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                                 sys.executable, os.path.abspath(__file__)]).returncode)
    sys.exit(inner())
