"""Like for like: memwatchd's host guard and earlyoom reacting to the same MemAvailable crossing.

reaction.py compares memwatchd's per-process limit with earlyoom's MemAvailable
threshold, which is not the same job. Here both watch the host: inside a private
PID namespace (each watcher can see and signal only this benchmark's processes),
reaction.py's C hog touches anonymous memory at a set rate (500 MB/s, then
2 GB/s), caps itself at 3 GiB and 30 s, and timestamps (CLOCK_MONOTONIC):
  - the moment MemAvailable (/proc/meminfo, checked every MiB near the end) first
    reads at or below the threshold: the trigger both watchers are given;
  - the moment a SIGTERM reaches its handler (then it exits at once).
Before each run the threshold is set afresh to MemAvailable minus 1.5 GiB, the
same absolute number for both:
  - memwatchd: `memwatchd run` with a config holding only
    `[guard] min_available = <threshold bytes>`, kill_available half of it (as
    earlyoom's SIGKILL level is half its -m), count_swap and the PSI triggers as default,
    nothing protected that is ours, no [[watch]], no events or state files;
  - earlyoom (Debian's 1.7): `-m <threshold as % of MemTotal> -s 100 -r 0
    --prefer '^mwd-bench-hog$'`.
The watchers run one at a time, interleaved, REPS runs each per rate; the hog
waits 0..1 s (spread evenly over the runs) before allocating, so the crossing
falls at any point of each watcher's sampling schedule.
Prints per rate and watcher medians [min..max] of trigger -> SIGTERM and
trigger -> death, and memwatchd's median over earlyoom's, then last:
`guard_reaction_ms_median=<x> earlyoom_reaction_ms_median=<y> guard_vs_earlyoom=<ratio>`
(at the highest rate; goal: ratio <= 0.2).

Run: sudo .venv/bin/python benchmarks/guard_reaction.py [--reps N] [--rates 500,2000]
(needs root, unshare(1), cc, earlyoom; ~3 GiB free; about 2 minutes).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import _benchlib
import reaction

GiB = 2**30
MiB = 2**20
DROP = int(1.5 * GiB)      # the threshold: MemAvailable before the run minus this
CAP = 3 * GiB              # the hog never touches more
MAX_SECONDS = 30
WATCHERS = ("memwatchd", "earlyoom")


def hog_argv(hog: str, rate: float, delay: float, threshold: int) -> list:
    # LIMIT (its "cross" report) is set to DROP: where the hog's own RSS would be at
    # the trigger on an idle machine; the trigger itself is the "avail" report.
    return [hog, str(int(rate)), str(DROP), str(CAP), str(MAX_SECONDS), f"{delay:.6f}", str(threshold)]


def threshold_now() -> tuple:
    m = reaction.meminfo()
    return m["MemAvailable"] - DROP, m["MemTotal"]


def run_memwatchd(hog: str, rate: float, delay: float, workdir: str) -> dict:
    threshold, _ = threshold_now()
    config = os.path.join(workdir, "guard.toml")
    with open(config, "w") as f:
        f.write(f'[daemon]\nevents = ""\nstate = ""\n'
                f'[guard]\nmin_available = "{threshold}B"\nkill_available = "{threshold // 2}B"\n')
    os.chmod(config, 0o600)
    return watched(_benchlib.memwatchd_command() + ["run", "--config", config], "memwatchd started",
                   hog_argv(hog, rate, delay, threshold), threshold)


def run_earlyoom(hog: str, rate: float, delay: float, workdir: str) -> dict:
    threshold, total = threshold_now()
    percent = threshold * 100.0 / total
    return watched(["earlyoom", "-m", f"{percent:.6f}", "-s", "100", "-r", "0",
                    "--prefer", f"^{reaction.HOG_NAME}$"], "SIGKILL when",
                   hog_argv(hog, rate, delay, threshold), threshold)


def watched(watcher_argv: list, ready_line: str, hog: list, threshold: int) -> dict:
    """Start the watcher, wait for its ready line, run the hog under it, stop it by PID."""
    watcher = subprocess.Popen(watcher_argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = reaction.Lines(watcher.stdout)
        banner = reaction.wait_for_line(out, ready_line, 20)
        time.sleep(0.3)   # past start-up: mlockall, first ticks
        rec = follow(hog)
        time.sleep(0.05)
        rec["log"] = [line for line in banner + out.read() if line.strip()][-2:]
    finally:
        _benchlib.stop(watcher)
    rec["threshold"] = threshold
    return rec


def follow(argv: list) -> dict:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    try:
        return reaction.follow_hog(reaction.Lines(proc.stdout))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


RUNNERS = {"memwatchd": run_memwatchd, "earlyoom": run_earlyoom}


def summarize(rec: dict) -> dict:
    trigger, term = rec.get("avail"), rec.get("term")
    out = {"missed": "cap" in rec or "timeout" in rec, "untimed": trigger is None or term is None}
    if trigger and term:
        out["signal_ms"] = (term["t"] - trigger["t"]) / 1e6
        out["overshoot"] = (term["rss"] - trigger["rss"]) / MiB
        out["avail_at_signal_mib"] = (term["avail"] - rec["threshold"]) / MiB
    if trigger and "death" in rec:
        out["death_ms"] = (rec["death"] - trigger["t"]) / 1e6
    return out


def inner(args) -> int:
    if os.getpid() != 1:
        print("refusing to run watchers outside a private PID namespace", file=sys.stderr)
        return 2
    if shutil.which("earlyoom") is None:
        print("guard_reaction.py needs earlyoom (apt-get install earlyoom, service start-up blocked)",
              file=sys.stderr)
        return 2
    t_begin = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="memwatchd-bench-") as workdir:
        hog = reaction.build_hog(workdir)
        # Warm-up: have the hypervisor back the memory once.
        warm = subprocess.Popen([hog, str(int(100e9)), str(DROP), str(CAP), "10", "0"],
                                stdout=subprocess.PIPE)
        reaction.follow_hog(reaction.Lines(warm.stdout), kill_after_cross=True)
        warm.wait()
        m = reaction.meminfo()
        print(_benchlib.machine())
        print(f"threshold: MemAvailable before each run minus {DROP / GiB:.1f} GiB (the same bytes "
              f"for both); hog cap {CAP / GiB:.0f} GiB / {MAX_SECONDS} s; {args.reps} runs per watcher "
              f"and rate, interleaved; MemTotal {m['MemTotal'] / GiB:.1f} GiB, MemAvailable "
              f"{m['MemAvailable'] / GiB:.1f} GiB, swap {m.get('SwapTotal', 0) / GiB:.1f} GiB")
        rates = [float(r) * 1e6 for r in args.rates.split(",")]
        phases = reaction.phases(args.reps, 3)
        results = {}
        for rate in rates:
            runs = {w: [] for w in WATCHERS}
            for rep in range(args.reps):
                order = WATCHERS if rep % 2 == 0 else WATCHERS[::-1]
                for w in order:
                    rec = RUNNERS[w](hog, rate, phases[rep], workdir)
                    s = summarize(rec)
                    runs[w].append(s)
                    if args.verbose:
                        print(f"  {rate / 1e6:.0f} MB/s rep {rep} {w}: " + " ".join(
                            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()),
                            rec.get("log", ""), flush=True)
                    time.sleep(0.3)
            results[rate] = runs
            print(f"\nrate {rate / 1e6:.0f} MB/s (set); medians [min..max] over {args.reps} runs")
            print(f"{'watcher':<10} {'signal ms':>22} {'death ms':>22} {'overshoot MiB':>22}"
                  f" {'missed':>6} {'untimed':>7}")
            for w in WATCHERS:
                col = lambda key: [r[key] for r in runs[w] if key in r]
                print(f"{w:<10} {reaction.fmt(col('signal_ms')):>22} {reaction.fmt(col('death_ms')):>22} "
                      f"{reaction.fmt(col('overshoot')):>22} {sum(r['missed'] for r in runs[w]):>6} "
                      f"{sum(r['untimed'] for r in runs[w]):>7}")
            a, b = (statistics.median([r["signal_ms"] for r in runs[w] if "signal_ms" in r] or [float("nan")])
                    for w in WATCHERS)
            print(f"memwatchd guard / earlyoom: signal {a / b:.3f}x")
    print("\nsignal: MemAvailable at or below the threshold (seen by the hog) -> SIGTERM in the "
          "hog's handler; death: -> pidfd readable; overshoot: the hog's RSS at the signal minus "
          "its RSS at the trigger.")
    top = results[max(rates)]
    mine, theirs = (statistics.median([r["signal_ms"] for r in top[w] if "signal_ms" in r] or [float("nan")])
                    for w in WATCHERS)
    ratio = mine / theirs
    print(f"goal at {max(rates) / 1e6:.0f} MB/s: the guard's median at most 1/5 of earlyoom's: "
          f"{'met' if ratio <= 0.2 else 'MISSED'} ({mine:.1f} ms vs {theirs:.1f} ms)")
    print(f"total run time {time.monotonic() - t_begin:.0f} s")
    print(f"guard_reaction_ms_median={mine:.2f} earlyoom_reaction_ms_median={theirs:.2f} "
          f"guard_vs_earlyoom={ratio:.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rates", default="500,2000", help="hog rates in MB/s, comma-separated")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every run")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    return _benchlib.inner_or_namespace(__file__, args, inner)


if __name__ == "__main__":
    sys.exit(main())
