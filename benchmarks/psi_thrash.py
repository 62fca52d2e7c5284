"""How much memory pressure does it take before a login is slow? (justifies the guard's PSI defaults)

A memory cgroup with a hard limit (v2 memory.max with memory.swap.max 0, or v1
memory.limit_in_bytes) holds three things: a reader that keeps re-reading a
file (a page-cache working set, like programs running from their binaries), a
hog that grows slowly and keeps touching all of its pages, and a login probe
that every 2 s starts python3, imports a few standard modules and exits.
When the hog leaves the file no room, the kernel evicts the page cache the
reader and the probe need and they fault it back in: the thrash without swap.
Every 0.5 s the script reads /proc/pressure/memory (host-wide: stalls caused
by a cgroup limit count there too) and prints the "some" and "full" stall
share over the last second and the last 5 s next to the last probe's time.

Nothing here kills anything: each process caps its own size and run time and
the script ends them by PID. Run as root on a host that is otherwise quiet
(memory-wise); `python3 benchmarks/psi_thrash.py [--limit-mib 512]`.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

PROBE = "import json, decimal, email.parser, http.client, argparse, logging"
HOG = r"""
import sys, time
limit, rate, deadline = int(sys.argv[1]), float(sys.argv[2]), time.time() + float(sys.argv[3])
chunks, page = [], 4096
while time.time() < deadline:
    if sum(len(c) for c in chunks) < limit:
        chunks.append(bytearray(b"x" * (16 << 20)))
    for c in chunks:            # the whole working set stays hot, like a simulation's arrays
        for i in range(0, len(c), page):
            c[i] = 1
    time.sleep(max(0.0, (16 << 20) / rate - 0.05))
"""
READER = r"""
import sys, time, os
path, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < deadline:
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass
"""


def make_cgroup(limit: int) -> str:
    v2 = "/sys/fs/cgroup/cgroup.controllers"
    if os.path.exists(v2):
        path = "/sys/fs/cgroup/mwd-psi-thrash"
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.max"), "w") as f:
            f.write(str(limit))
        with open(os.path.join(path, "memory.swap.max"), "w") as f:
            f.write("0")
    else:
        path = "/sys/fs/cgroup/memory/mwd-psi-thrash"
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
        with open(os.path.join(path, "memory.swappiness"), "w") as f:
            f.write("0")
    return path


def enter(cgroup: str):
    def pre():
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    return pre


def psi_totals() -> tuple:
    some = full = 0
    with open("/proc/pressure/memory") as f:
        for line in f:
            total = int(line.rsplit("total=", 1)[1])
            if line.startswith("some"):
                some = total
            else:
                full = total
    return some, full


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit-mib", type=int, default=512)
    ap.add_argument("--file-mib", type=int, default=192)
    ap.add_argument("--rate-mib", type=float, default=8.0, help="hog growth, MiB/s")
    ap.add_argument("--seconds", type=float, default=120.0)
    args = ap.parse_args()
    limit = args.limit_mib << 20
    cgroup = make_cgroup(limit)
    data = tempfile.NamedTemporaryFile(dir="/var/tmp", delete=False)
    data.write(os.urandom(1 << 20) * args.file_mib)
    data.close()
    procs = []
    try:
        pre = enter(cgroup)
        procs.append(subprocess.Popen([sys.executable, "-c", READER, data.name, str(args.seconds)],
                                      preexec_fn=pre))
        procs.append(subprocess.Popen([sys.executable, "-c", HOG, str(limit), str(args.rate_mib * 2**20),
                                       str(args.seconds)], preexec_fn=pre))
        start = time.monotonic()
        history = [(start, *psi_totals())]
        probe, probe_started, last_probe = None, 0.0, 0.0
        print("t_s  some_1s%  full_1s%  some_5s%  full_5s%  probe_s")
        worst = []
        while time.monotonic() - start < args.seconds and all(p.poll() is None for p in procs):
            now = time.monotonic()
            if probe is None and now - probe_started >= 2.0:
                probe, probe_started = subprocess.Popen([sys.executable, "-c", PROBE], preexec_fn=pre), now
            if probe is not None and probe.poll() is not None:
                last_probe, probe = now - probe_started, None
            elif probe is not None and now - probe_started > 30:
                last_probe = now - probe_started
            history.append((now, *psi_totals()))

            def share(window):
                old = next(h for h in history if h[0] >= now - window - 1e-3)
                dt = (now - old[0]) * 1e6 or 1
                return 100 * (history[-1][1] - old[1]) / dt, 100 * (history[-1][2] - old[2]) / dt
            s1, f1 = share(1.0)
            s5, f5 = share(5.0)
            worst.append((last_probe, s1, f1, s5, f5))
            print(f"{now - start:5.1f}  {s1:7.1f}  {f1:7.1f}  {s5:7.1f}  {f5:7.1f}  {last_probe:6.2f}", flush=True)
            if last_probe > 20:
                break
            time.sleep(0.5)
        for bound in (1.0, 2.0, 5.0):
            first = next((w for w in worst if w[0] > bound), None)
            if first:
                print(f"first probe over {bound:.0f} s: some_5s={first[3]:.1f}% full_5s={first[4]:.1f}%")
            else:
                print(f"no probe over {bound:.0f} s")
    finally:
        for p in procs + ([probe] if probe is not None else []):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        os.unlink(data.name)
        try:
            os.rmdir(cgroup)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
