"""How fast does `memwatchd replay` go, against the real time a trace covers?

Writes a trace of 100 targets over --seconds of virtual time (default 3600) with the
real trace.Recorder fed by the daemon's Policy on a virtual clock (tests/trace_lib.py:
most targets idle and creeping, a third sawtooth-like, one in ten leaking past its 1G
limit: a busy host, many samples change), then reads and replays it with the recorded
config and with a lower limit. Prints, side by side, the trace's span, the time to read
it, the time to replay it, and the ratios (wall clock, and CPU time: on a shared machine the
wall clock also counts waiting for a CPU). Goal: replay >= 1000x real time.
Last line: `targets=100 trace_s=<x> read_x=<r> replay_x=<p> total_x=<t> cpu_total_x=<c>`.

Run: python benchmarks/replay.py [--seconds 3600]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from memwatchd import trace  # noqa: E402
from memwatchd.config import Size  # noqa: E402
from memwatchd.replay import recorded_config, replay  # noqa: E402
from tests.trace_lib import SyntheticDaemon, config_for  # noqa: E402

GOAL = 1000.0
N = 100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "bench.trace")
        config = config_for(N)
        daemon = SyntheticDaemon(config)
        daemon.trace = trace.Recorder(trace.FileSink(path), config, daemon)
        daemon.run(args.seconds)
        daemon.trace.close()
        size = os.path.getsize(path)
        reads, replays, lowers, cpu = [], [], [], []
        for _ in range(args.rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            tr = trace.read_trace(path)
            t1, c1 = time.perf_counter(), time.process_time()
            result = replay(tr)
            t2, c2 = time.perf_counter(), time.process_time()
            cfg = recorded_config(tr)
            lower = cfg._replace(watches=tuple(w._replace(limit=Size(bytes=400 << 20))
                                               for w in cfg.watches))
            low = replay(tr, lower)
            t3 = time.perf_counter()
            reads.append(t1 - t0)
            replays.append(t2 - t1)
            lowers.append(t3 - t2)
            cpu.append((c1 - c0, c2 - c1))
    span = tr.end - tr.start
    r, p, q = statistics.median(reads), statistics.median(replays), statistics.median(lowers)
    print(f"trace: {N} targets, {span:.0f} s, {len(tr.samples)} sample lines, "
          f"{sum(run.samples for run in tr.runs.values())} readings, {size / 2**20:.1f} MiB "
          f"({size / span / 1024:.1f} KiB/s)")
    print(f"{'step':<34} {'median s':>9} {'x real time':>12}")
    print(f"{'read (parse NDJSON)':<34} {r:>9.3f} {span / r:>12.0f}")
    print(f"{'replay, recorded config':<34} {p:>9.3f} {span / p:>12.0f}   "
          f"({len(result.decisions)} decisions, {result.ticks} ticks)")
    print(f"{'replay, limit 400M (busier)':<34} {q:>9.3f} {span / q:>12.0f}   "
          f"({len(low.decisions)} decisions, {low.ticks} ticks)")
    print(f"{'read + replay':<34} {r + p:>9.3f} {span / (r + p):>12.0f}")
    cr, cp = statistics.median(c[0] for c in cpu), statistics.median(c[1] for c in cpu)
    print(f"{'  the same in CPU time: read':<34} {cr:>9.3f} {span / cr:>12.0f}")
    print(f"{'  replay':<34} {cp:>9.3f} {span / cp:>12.0f}")
    print(f"{'  read + replay':<34} {cr + cp:>9.3f} {span / (cr + cp):>12.0f}"
          f"   (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: wall time waits for a CPU)")
    print(f"goal: replay >= {GOAL:.0f}x real time: {'met' if span / p >= GOAL else 'MISSED'} "
          f"(read + replay {'met' if span / (r + p) >= GOAL else 'missed'})")
    print(f"targets={N} trace_s={span:.0f} read_x={span / r:.0f} replay_x={span / p:.0f} "
          f"total_x={span / (r + p):.0f} cpu_total_x={span / (cr + cp):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
