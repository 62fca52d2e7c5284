"""How close is memwatchd's sampler to the syscall floor, and how far under psutil?

Spawns N = 1, 100 and 1000 sleeping processes and, in one run and over the
same processes, measures microseconds per target per sample for:
  - the compiled sampler (memwatchd._memread.ProcessTable.sample)
  - its pure-Python twin (memwatchd.procfs.ProcessTable.sample)
  - psutil.Process.memory_info() on kept Process objects
  - a minimal C loop of pread over kept-open statm fds (compiled here with cc):
    the floor any reader of statm pays.
Reports medians of several rounds and the ratios. The last line is
`sampler_vs_floor=<x> sampler_vs_psutil=<y>` for N=1000.

Run: python benchmarks/sampler.py   (needs cc; kills the processes it started, by PID)
"""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

import _benchlib  # benchmarks/, on sys.path when run as a script

from memwatchd import _memread, procfs

ROUNDS = {1: 2001, 100: 201, 1000: 41}

def spawn_sleepers(n: int) -> list:
    """n idle processes; each caps itself at 300 s in case we die before killing them."""
    return [subprocess.Popen(["sleep", "300"]) for _ in range(n)]


def median_us_per_target(fn, n: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / n / 1000.0)
    return statistics.median(samples)


def measure(floor_exe: str, pids: list) -> dict:
    n, rounds = len(pids), ROUNDS[len(pids)]
    results = {}
    for name, module in (("compiled", _memread), ("python", procfs)):
        table = module.ProcessTable(capacity=n)
        for pid in pids:
            table.add(pid)
        assert table.sample() == n, f"{name}: not every sleeper was readable"
        results[name] = median_us_per_target(table.sample, n, rounds)
    procs = [psutil.Process(pid) for pid in pids]
    results["psutil"] = median_us_per_target(lambda: [p.memory_info() for p in procs], n,
                                             max(5, rounds // 4))
    results["c_floor"] = _benchlib.pread_floor_ns(floor_exe, "wall", rounds, pids) / n / 1000.0
    return results


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="memwatchd-bench-") as workdir:
        floor_exe = _benchlib.build_floor(workdir)
        last = None
        print(f"{'N':>5} {'compiled':>10} {'python':>10} {'psutil':>10} {'c_floor':>10}"
              f"   {'vs_floor':>8} {'vs_psutil':>9} {'floor_vs_psutil':>15}"
              "   (us per target per sample, median)")
        for n in (1, 100, 1000):
            sleepers = spawn_sleepers(n)
            try:
                r = measure(floor_exe, [p.pid for p in sleepers])
            finally:
                for p in sleepers:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()
            vs_floor = r["compiled"] / r["c_floor"]
            vs_psutil = r["psutil"] / r["compiled"]
            print(f"{n:>5} {r['compiled']:>10.3f} {r['python']:>10.3f} {r['psutil']:>10.3f} "
                  f"{r['c_floor']:>10.3f}   {vs_floor:>8.2f}x {vs_psutil:>8.1f}x "
                  f"{r['psutil'] / r['c_floor']:>14.1f}x")
            last = (vs_floor, vs_psutil)
    print("goal (N=1000): within 1.25x of the C floor, at least 20x faster than psutil")
    print("floor_vs_psutil bounds vs_psutil: no reader making one pread per target can beat it")
    print(f"sampler_vs_floor={last[0]:.2f} sampler_vs_psutil={last[1]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
