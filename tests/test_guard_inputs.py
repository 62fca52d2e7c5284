"""What the daemon hands the guard: the refault counters under the pressure gate, and a
zram reading that a stuck /proc/swaps cannot hold up. A temp tree laid out like /proc
stands in for a host at 10% MemAvailable under pressure (a real one costs GiBs)."""
from __future__ import annotations

import os
import time

from memwatchd.config import parse_config
from memwatchd.daemon import Daemon, Options

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGESIZE")
# dry_run: the guard runs for real but can signal nothing (and the fake tree has no pids)
DAEMON = {"events": "", "state": "", "dry_run": True}


def lay_out(root, avail_kb, full_us=0, refault_pages=0, swap_kb=0, io_full_us=0):
    proc = root / "proc"
    (proc / "pressure").mkdir(parents=True, exist_ok=True)
    (proc / "meminfo").write_text(f"MemTotal: 1000000 kB\nMemAvailable: {avail_kb} kB\n"
                                  f"SwapTotal: {swap_kb} kB\nSwapFree: {swap_kb} kB\n")
    (proc / "pressure" / "memory").write_text(
        f"some avg10=0.00 avg60=0.00 avg300=0.00 total={full_us}\n"
        f"full avg10=0.00 avg60=0.00 avg300=0.00 total={full_us}\n")
    (proc / "vmstat").write_text(f"workingset_refault_anon 0\nworkingset_refault_file {refault_pages}\n"
                                 f"pswpin 0\n")
    (proc / "pressure" / "io").write_text(
        f"some avg10=0.00 avg60=0.00 avg300=0.00 total={io_full_us}\n"
        f"full avg10=0.00 avg60=0.00 avg300=0.00 total={io_full_us}\n")


def daemon(root, guard=None):
    config = parse_config({"daemon": DAEMON, "guard": guard or {}}, "t")
    return Daemon(config, Options(proc_root=str(root), psi_trigger=False, lock_memory=False))


def test_the_guard_gets_refaults_only_under_its_pressure_gate_and_reload_follows(tmp_path):
    lay_out(tmp_path, avail_kb=500_000, refault_pages=1000)     # 50%: above psi_available (20%)
    d = daemon(tmp_path)
    assert d.targets.host.refaults_below == 200_000 * 1024
    d.tick()
    assert d.host.refaults is None and d.host.io_full_us is None   # gate closed: not read
    lay_out(tmp_path, avail_kb=100_000, full_us=0, refault_pages=1000, io_full_us=5000)
    d.tick()
    assert d.host.refaults == 1000 * PAGE and d.host.io_full_us == 5000
    lay_out(tmp_path, avail_kb=100_000, full_us=600_000, refault_pages=1000 + 2 * MiB // PAGE,
            io_full_us=90_000)
    time.sleep(0.06)
    d.tick()
    assert d.host.refaults == 1000 * PAGE + 2 * MiB
    assert [entry[3:5] for entry in d.policy.guard.pressure] == [(1000 * PAGE, 5000),
                                                                (1000 * PAGE + 2 * MiB, 90_000)]
    d.apply_config(parse_config({"daemon": DAEMON,
                                 "guard": {"psi_refaults": 0}}, "t"))
    assert d.targets.host.refaults_below == 200_000 * 1024      # the I/O trigger still reads them
    d.apply_config(parse_config({"daemon": DAEMON,
                                 "guard": {"psi_refaults": 0, "psi_io_full": 0}}, "t"))
    assert d.targets.host.refaults_below == -1
    d.tick()
    assert d.host.refaults is None                              # off: pressure alone decides
    d.apply_config(parse_config({"daemon": DAEMON,
                                 "guard": {"psi_available": "50M"}}, "t"))
    assert d.targets.host.refaults_below == 50 * MiB
    d.apply_config(parse_config({"daemon": DAEMON,
                                 "guard": {"psi_full": 0, "psi_some": 0}}, "t"))
    assert d.targets.host.refaults_below == 200_000 * 1024      # psi_full_kill alone is gated too
    d.apply_config(parse_config({"daemon": DAEMON,
                                 "guard": {"psi_full": 0, "psi_full_kill": 0, "psi_some": 0}}, "t"))
    assert d.targets.host.refaults_below == 200_000 * 1024      # psi_io_full alone is gated too
    d.apply_config(parse_config({"daemon": DAEMON, "guard": {
        "psi_full": 0, "psi_full_kill": 0, "psi_some": 0, "psi_io_full": 0}}, "t"))
    assert d.targets.host.refaults_below == -1                  # no pressure trigger: no need


def test_a_stuck_proc_swaps_does_not_hold_up_the_tick(tmp_path):
    """The guest's loop once blocked opening /proc/swaps during a swapon until systemd's
    watchdog killed it; a FIFO's open blocks the same way, in the kernel."""
    lay_out(tmp_path, avail_kb=100_000, swap_kb=500_000)
    os.mkfifo(tmp_path / "proc" / "swaps")
    d = daemon(tmp_path)
    try:
        started = time.monotonic()
        for _ in range(5):
            d.tick()
        assert time.monotonic() - started < 1.0
        assert d.swaps.stuck and d.readers.alive == 1           # one read, kept waiting
    finally:
        with open(tmp_path / "proc" / "swaps", "w") as f:   # lets the reader's open return
            f.write("Filename Type Size Used Priority\n/swapfile file 500000 0 -2\n")
        deadline = time.monotonic() + 5
        while d.readers.alive and time.monotonic() < deadline:
            time.sleep(0.01)
    d.tick()
    assert not d.swaps.stuck and d.readers.alive == 0


def test_guard_candidates_carry_their_own_major_faults(tmp_path):
    """The guard weighs the largest process's own major faults against the host's
    (policy.own_thrash): each candidate carries its stat field 12 as the scan read it.
    A child faults a dropped file's pages back in through a mapping; the real /proc
    is only read here (guard_candidates lists, it never signals)."""
    import subprocess
    import sys
    from memwatchd.targets import TargetSet
    path = tmp_path / "pages"
    path.write_bytes(os.urandom(8 * MiB))
    child = subprocess.Popen([sys.executable, "-c", (
        "import mmap, os, sys\n"
        "f = open(sys.argv[1], 'rb'); os.fsync(f.fileno())\n"
        "os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)\n"
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))\n"
        "print('ready', flush=True); sys.stdin.read()\n"), str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with open(f"/proc/{child.pid}/stat", "rb") as f:
            majflt = int(f.read().rsplit(b")", 1)[1].split()[9])
        found = [c for c in TargetSet(parse_config({}, "t"), never={os.getpid()}).guard_candidates()
                 if c.pid == child.pid]
        assert len(found) == 1 and found[0].major_faults == majflt
        if majflt == 0:
            import pytest
            pytest.skip("this filesystem kept the pages (tmpfs?): no major fault to count")
    finally:
        child.kill()
        child.wait()
