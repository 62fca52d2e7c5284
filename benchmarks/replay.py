"""How fast does `memwatchd replay` go, against the real time a trace covers, and in how much memory?

Writes a trace of 100 targets over --seconds of virtual time (default 3600) with the
real trace.Recorder fed by the daemon's Policy on a virtual clock (tests/trace_lib.py:
most targets idle and creeping, a third sawtooth-like, one in ten leaking past its 1G
limit: a busy host, many samples change), then reads and replays it, each run in a fresh
process (so its peak RSS, ru_maxrss, is the replay's own), the modes taken in turn:

  stream         what `memwatchd replay` does: open_trace, each sample replayed as it is read
  stream 400M    the same with every limit at 400M (busier: more decisions and ticks)
  stream fmt 1   the same trace written in format 1 (no compact line): what format 2 saves
  full           read_trace (every sample in a list), then replay: the reader before streaming
  old            with --old DIR: DIR's memwatchd (e.g. `git archive 214d267`) on the format-1 file

Prints medians of --rounds runs: wall clock and CPU time, each as a multiple of the trace's
span (on a shared machine the wall clock also counts waiting for a CPU), and peak RSS.
Goal: read + replay >= 1000x real time. Last line:
`targets=100 trace_s=<s> stream_x=<wall> stream_cpu_x=<cpu> full_x=<wall> stream_rss_mib=<m> full_rss_mib=<m>`.

Run: python benchmarks/replay.py [--seconds 3600] [--rounds 3] [--old DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL = 1000.0
N = 100


def child(mode: str, path: str, old: str) -> None:
    """One measured run, in this fresh process: prints a JSON line."""
    import resource
    import time
    sys.path.insert(0, old if mode == "old" else ROOT)
    from memwatchd import trace
    from memwatchd.config import Size
    from memwatchd.replay import recorded_config, replay
    w0, c0 = time.perf_counter(), time.process_time()
    split = None
    if mode in ("full", "old"):
        t = trace.read_trace(path)
        split = (time.perf_counter() - w0, time.process_time() - c0)
        result = replay(t)
    else:
        t = trace.open_trace(path, stats=False)
        config = None
        if mode == "stream 400M":
            cfg = recorded_config(t)
            config = cfg._replace(watches=tuple(w._replace(limit=Size(bytes=400 << 20)) for w in cfg.watches))
        result = replay(t, config)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    print(json.dumps({"wall": wall, "cpu": cpu, "read": split, "span": t.end - t.start,
                      "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "decisions": len(result.decisions), "ticks": result.ticks,
                      "samples": len(t.samples) if t.samples is not None else None}))


def write_trace(path: str, seconds: float) -> None:
    sys.path.insert(0, ROOT)
    from memwatchd import trace
    from tests.trace_lib import SyntheticDaemon, config_for
    config = config_for(N)
    daemon = SyntheticDaemon(config)
    daemon.trace = trace.Recorder(trace.FileSink(path), config, daemon)
    daemon.run(seconds)
    daemon.trace.close()


def as_format_1(src: str, dst: str) -> None:
    """The same trace without format 2's compact line (what readers before it read)."""
    with open(src) as f, open(dst, "w") as out:
        for line in f:
            if line.startswith("["):
                obj = json.loads(line)
                line = json.dumps({"t": "s", "m": obj[0], "r": [obj[i:i + 2] for i in range(1, len(obj), 2)]},
                                  separators=(",", ":")) + "\n"
            elif line.startswith('{"t":"header"'):
                obj = json.loads(line)
                obj["format"] = 1
                line = json.dumps(obj, separators=(",", ":")) + "\n"
            out.write(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--old", metavar="DIR", help="a checkout of an older memwatchd to compare with")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "TRACE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.old or "")
        return 0
    with tempfile.TemporaryDirectory() as work:
        v2, v1 = os.path.join(work, "bench.trace"), os.path.join(work, "bench-fmt1.trace")
        write_trace(v2, args.seconds)
        as_format_1(v2, v1)
        modes = {"stream": v2, "stream 400M": v2, "stream fmt 1": v1, "full": v2}
        if args.old:
            modes["old"] = v1
        runs = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode, path in modes.items():
                cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, path]
                if args.old:
                    cmd += ["--old", args.old]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     env=dict(os.environ, MEMWATCHD_NO_EXTENSIONS="1"))
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        sizes = (os.path.getsize(v2), os.path.getsize(v1))
    span = runs["stream"][0]["span"]
    full = runs["full"][0]
    print(f"trace: {N} targets, {span:.0f} s, {full['samples']} sample lines, {sizes[0] / 2**20:.1f} MiB "
          f"({sizes[0] / span / 1024:.1f} KiB/s; {sizes[1] / 2**20:.1f} MiB in format 1)")
    print(f"{'read + replay (median of ' + str(args.rounds) + ')':<28} {'wall s':>7} {'x real':>7} "
          f"{'CPU s':>7} {'x real':>7} {'peak RSS':>9}  decisions, ticks")

    def med(mode, field):
        return statistics.median(r[field] for r in runs[mode])
    for mode in modes:
        w, c, rss = med(mode, "wall"), med(mode, "cpu"), med(mode, "rss_kib") / 1024
        r = runs[mode][0]
        print(f"{mode:<28} {w:>7.2f} {span / w:>7.0f} {c:>7.2f} {span / c:>7.0f} {rss:>6.1f} MiB  "
              f"{r['decisions']}, {r['ticks']}")
        if runs[mode][0]["read"] is not None:
            rw = statistics.median(x["read"][0] for x in runs[mode])
            rc = statistics.median(x["read"][1] for x in runs[mode])
            print(f"{'  of which the read':<28} {rw:>7.2f} {span / rw:>7.0f} {rc:>7.2f} {span / rc:>7.0f}")
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: wall time waits for a CPU)")
    sx, scx = span / med("stream", "wall"), span / med("stream", "cpu")
    print(f"goal: read + replay >= {GOAL:.0f}x real time: {'met' if sx >= GOAL else 'MISSED'} in wall "
          f"time ({sx:.0f}x), {'met' if scx >= GOAL else 'MISSED'} in CPU time ({scx:.0f}x)")
    print(f"targets={N} trace_s={span:.0f} stream_x={sx:.0f} stream_cpu_x={scx:.0f} "
          f"full_x={span / med('full', 'wall'):.0f} stream_rss_mib={med('stream', 'rss_kib') / 1024:.1f} "
          f"full_rss_mib={med('full', 'rss_kib') / 1024:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
