"""How far past its limit does a hog get that starts AFTER the daemon and is matched by `cmdline`?

With event-driven discovery (memwatchd.procevents) the daemon hears the hog's exec and
watches it from then on; with rescan only (MEMWATCHD_NO_PROC_EVENTS=1, as inside a
private pid namespace or without the connector) it is found at the next rescan (every
2 s), hundreds of MiB too late at 1 GB/s.

Where: the kernel's connector works only in the initial pid namespace, where a daemon
with real signals could reach the host's processes. So this runs in the qemu guest of
the VM tier (its own kernel; nothing there but this benchmark), never on the host.

Each run (in the guest, as root): start `memwatchd run` (guard off, one [[watch]]
`cmdline = "mwd-disc-hog"`, limit 200M, warn 150M) and wait for its "new processes
are found by ..." line; wait a delay spread evenly over [0, 2 s) across the runs (the
rescan's phase); start the hog (Python: touches 1 MiB blocks of a MADV_HUGEPAGE mapping paced at
RATE, default 1.5 GB/s, caps itself at 1.25 GiB and 15 s; a warm-up run first, unwatched,
so the host has backed the guest's RAM). The hog's SIGTERM handler reports its
RSS (/proc/self/statm) when the signal landed and exits; a hog that never gets one
reports "none". It also reports its own rate (RSS / time since its start, which includes
Python's start-up before the first touch: a lower bound). Overshoot = RSS at SIGTERM - 200 MiB. 7 runs per mode, interleaved.

With --host-dry-run it runs on this machine instead, in its initial pid namespace (the
connector works there), with `dry_run = true` and the guard off, so nothing is ever
signalled by memwatchd; the overshoot is then the usage on the first SIGTERM decision's
record (re-read right before acting), and the benchmark ends each hog itself, by pid.

Prints per mode the overshoots, median [min..max], then the last line
`cmdline_overshoot_mib_median=X rescan_only_overshoot_mib_median=Y ratio=X/Y rate_mb_s=R`.

Run: sudo .venv/bin/python benchmarks/discovery.py [--reps 7] [--rate 1500]
(needs qemu and the VM tier's image, tests/vm/README.md; about 3 minutes with KVM).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
LIMIT_MIB = 200
CAP_MIB = 1280
TAG = "mwd-disc-hog"
MODES = ("events", "rescan")

HOG = r"""
import mmap, os, signal, sys, time
rate, cap, report = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
signal.alarm(15)                                 # hard time cap
page = os.sysconf("SC_PAGE_SIZE")
chunk, held = 4 << 20, []
flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0x8000)
start = time.monotonic()

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

def landed(sig, frame):
    now, used = time.monotonic(), rss()
    with open(report, "w") as f:
        f.write("%d %d %.6f\n" % (sig, used, now - start))
    os._exit(0)

signal.signal(signal.SIGTERM, landed)
while len(held) * chunk < cap:
    held.append(mmap.mmap(-1, chunk, flags=flags))   # populated: in RSS at once
    ahead = len(held) * chunk / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
with open(report, "w") as f:
    f.write("none %d %.6f\n" % (rss(), time.monotonic() - start))
time.sleep(15)
"""


def run_once(mode: str, delay: float, rate: float, work: Path, dry_run: bool = False):
    """One daemon + one hog in this machine: (MiB over the limit when SIGTERM landed, or
    with dry_run at the decision, the usage re-read right before acting; the hog's rate)."""
    config = work / "memwatchd.toml"
    events = work / "events.jsonl"
    events.unlink(missing_ok=True)
    config.write_text(f'[daemon]\nevents = "{events}"\nstate = ""\n'
                      f'dry_run = {"true" if dry_run else "false"}\n'
                      f'[guard]\nenabled = false\n'
                      f'[[watch]]\nname = "late"\ncmdline = "{TAG}"\nlimit = "{LIMIT_MIB}M"\n'
                      f'warn = "150M"\n')
    config.chmod(0o600)
    env = dict(os.environ)
    env.pop("MEMWATCHD_NO_PROC_EVENTS", None)
    if mode == "rescan":
        env["MEMWATCHD_NO_PROC_EVENTS"] = "1"
    log_path = work / f"daemon-{mode}.log"
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "memwatchd", "run", "--config",
                                   str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
    report = work / "hog.report"
    report.unlink(missing_ok=True)
    hog = None
    try:
        end = time.monotonic() + 30
        while "new processes are found by" not in log_path.read_text():
            if time.monotonic() > end or daemon.poll() is not None:
                raise RuntimeError("the daemon did not start:\n" + log_path.read_text())
            time.sleep(0.02)
        want = "process events" if mode == "events" else "rescan every"
        if f"new processes are found by {want}" not in log_path.read_text():
            raise RuntimeError(f"mode {mode} not in use:\n" + log_path.read_text())
        time.sleep(delay)
        hog = subprocess.Popen([sys.executable, "-c", HOG, str(rate), str(CAP_MIB * MiB),
                                str(report), TAG])
        if dry_run:
            decided = wait_decision(events, hog)
            hog.terminate()    # ours, by pid (Popen): it reports its RSS and time, so its rate
            try:
                hog.wait(10)
            except subprocess.TimeoutExpired:
                hog.kill()
                hog.wait()
            rate_seen = 0.0
            if report.exists():
                text = report.read_text().split()
                rate_seen = int(text[1]) / float(text[2]) / 1e6 if float(text[2]) > 0 else 0.0
            return (decided / MiB - LIMIT_MIB if decided is not None else float("inf")), rate_seen
        hog.wait(30)
        text = report.read_text().split() if report.exists() else ["none", "0", "1"]
    finally:
        if hog is not None and hog.poll() is None:
            hog.kill()
            hog.wait()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)
    rate_seen = int(text[1]) / float(text[2]) / 1e6 if float(text[2]) > 0 else 0.0
    if text[0] == "none":
        return float("inf"), rate_seen
    return int(text[1]) / MiB - LIMIT_MIB, rate_seen


def wait_decision(events: Path, hog: subprocess.Popen):
    """dry run: usage_bytes of the first SIGTERM decision on record, None if the hog
    reached its cap (or its time) first."""
    import json
    end = time.monotonic() + 20
    while time.monotonic() < end:
        try:
            for line in events.read_text().splitlines():
                record = json.loads(line)
                if record.get("action") == "term":
                    return record["usage_bytes"]
        except (OSError, ValueError):
            pass
        if hog.poll() is not None:
            return None
        time.sleep(0.01)
    return None


def guest_main(args) -> int:
    """In the guest: every run, then the summary lines."""
    results = {mode: [] for mode in MODES}
    rates = []
    with tempfile.TemporaryDirectory(prefix="mwd-disc-") as tmp:
        warm = subprocess.Popen([sys.executable, "-c", HOG, str(args.rate * 1e6),
                                 str(CAP_MIB * MiB), os.path.join(tmp, "warm"), "warm-up"])
        while warm.poll() is None and not os.path.exists(os.path.join(tmp, "warm")):
            time.sleep(0.05)     # the host backs the guest's RAM once, unwatched
        warm.kill()
        warm.wait()
        for rep in range(args.reps):
            delay = 2.0 * (rep + 0.5) / args.reps
            for mode in (MODES if rep % 2 == 0 else MODES[::-1]):
                over, rate_seen = run_once(mode, delay, args.rate * 1e6, Path(tmp),
                                           dry_run=args.host_dry_run)
                results[mode].append(over)
                rates.append(rate_seen)
                print(f"run {rep + 1} {mode}: start phase {delay:.2f}s, overshoot "
                      f"{over:.1f} MiB, hog grew at {rate_seen:.0f} MB/s", flush=True)
    where = "host, dry run (at the decision)" if args.host_dry_run else "guest"
    print(f"\n{where}: Linux {os.uname().release}, {os.cpu_count()} CPUs, hog paced at "
          f"{args.rate:.0f} MB/s (reached: median {statistics.median(rates):.0f} MB/s, from its "
          f"start to the signal), limit {LIMIT_MIB}M, {args.reps} runs per mode")
    medians = {}
    for mode in MODES:
        values = results[mode]
        medians[mode] = statistics.median(values)
        print(f"{mode:7s} overshoot MiB: median {medians[mode]:.1f} "
              f"[{min(values):.1f}..{max(values):.1f}]  {[round(v, 1) for v in values]}")
    ratio = medians["events"] / medians["rescan"] if medians["rescan"] else float("nan")
    print(f"cmdline_overshoot_mib_median={medians['events']:.1f} "
          f"rescan_only_overshoot_mib_median={medians['rescan']:.1f} ratio={ratio:.3f} "
          f"rate_mb_s={statistics.median(rates):.0f}")
    return 0


def host_main(args) -> int:
    """On the host: build the wheels, boot the guest, run this file there."""
    sys.path.insert(0, str(ROOT / "tests" / "vm"))
    import harness
    image = harness.ensure_image()
    with tempfile.TemporaryDirectory(prefix="mwd-disc-wheels-") as wheels:
        harness.build_wheels(ROOT, wheels)
        script = ("#!/bin/sh\nexport MEMWATCHD_DISCOVERY_GUEST=1\n"
                  f"exec python3 \"$VM_SHARE/discovery.py\" --guest --reps {args.reps} "
                  f"--rate {args.rate}\n")
        result = harness.run_guest(script, wheels_dir=wheels, image=image, mem_mb=3072,
                                   timeout=args.timeout,
                                   extra_files={"discovery.py": Path(__file__).resolve()})
    sys.stdout.write(result.stdout)
    if not result.ok:
        sys.stderr.write(result.describe())
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rate", type=float, default=1500, help="hog MB/s (>= 1000)")
    p.add_argument("--timeout", type=float, default=900, help="seconds for the guest run")
    p.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--host-dry-run", action="store_true",
                   help="on this machine, in its initial pid namespace, with dry_run = true and "
                        "the guard off (nothing is signalled; the hog is killed by its pid): "
                        "overshoot at the decision")
    args = p.parse_args()
    if args.host_dry_run:
        return guest_main(args)
    if args.guest:
        if os.environ.get("MEMWATCHD_DISCOVERY_GUEST") != "1":
            print("--guest is for the qemu guest only: this kills processes", file=sys.stderr)
            return 2
        return guest_main(args)
    return host_main(args)


if __name__ == "__main__":
    sys.exit(main())
