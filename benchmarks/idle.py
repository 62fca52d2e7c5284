"""What does memwatchd cost while nothing happens, next to earlyoom, in the same run?

Inside a private PID namespace, starts side by side (all at once, so the machine's
load weighs on each alike):
  - earlyoom with its defaults (`earlyoom`, its report every second to /dev/null);
  - `memwatchd run` with the default config (the host guard only; the state file on,
    as by default, in a temp dir);
  - `memwatchd run` with the guard plus 10 `pid` watches (limit 1G, action term) on
    10 sleeping processes.
Both memwatchd daemons get a NOTIFY_SOCKET and WATCHDOG_USEC=10 s as under the unit
(WatchdogSec=10s); the benchmark drains those sockets. After a warm-up it reads each
daemon's CPU time from /proc/PID/task/*/schedstat at the end of every window (default
10 s) for --seconds (default 120): CPU ms per minute per window; the table quotes the
median window (and the range), VmRSS (median of the samples), and the ratio to
earlyoom, the median of the per-window ratios (same window, same load).
Goals (issue 18): guard only <= 1.0x earlyoom; guard + 10 pid watches <= 3x.
It also prints what woke each memwatchd (Python ticks and quiet wake-ups in C per minute,
from its state file's daemon.ticks / daemon.quiet_wakes) and the load average at the end.
The last line is `guard_vs_earlyoom=X ten_vs_earlyoom=X earlyoom_ms_per_min=X`.

Run: python benchmarks/idle.py [--seconds 120] [--window 10]
(as root: needs unshare(1) for the namespace, cc for the sleepers, earlyoom).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import _benchlib

N_WATCHES = 10
WARMUP = 5.0


def write_config(workdir: str, name: str, pids: list) -> str:
    return _benchlib.pid_watch_config(
        os.path.join(workdir, f"{name}.toml"),
        f'[daemon]\nevents = "{workdir}/{name}-events.jsonl"\nstate = "{workdir}/{name}-state.json"\n',
        pids)


def notify_socket(workdir: str, name: str, env: dict) -> socket.socket:
    return _benchlib.notify_socket(os.path.join(workdir, f"{name}-notify.sock"), env)


def drain(sock: socket.socket) -> list:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


def vm_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def loop_counts(workdir: str, name: str):
    """(written_boottime, daemon.ticks, daemon.quiet_wakes) from a daemon's state file
    (as of its last write), None before the first: what wakes it, Python or C."""
    try:
        with open(os.path.join(workdir, f"{name}-state.json")) as f:
            data = json.load(f)
        return (data["written_boottime"], data["daemon"]["ticks"],
                data["daemon"].get("quiet_wakes", 0))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def inner(args) -> int:
    if os.getpid() != 1:
        print("refusing to run outside a private PID namespace", file=sys.stderr)
        return 2
    earlyoom = shutil.which("earlyoom")
    if earlyoom is None:
        print("earlyoom is not installed (apt-get install earlyoom, with service start-up "
              "blocked by policy-rc.d: see .ci/run)", file=sys.stderr)
        return 2
    print(_benchlib.machine())
    with tempfile.TemporaryDirectory(prefix="memwatchd-idle-") as workdir:
        exe = _benchlib.build(workdir)
        sleepers = _benchlib.Sleepers(exe, N_WATCHES, int(args.seconds + 120))
        procs, sockets, notes = {}, {}, {}
        try:
            with open(f"/proc/{sleepers.proc.pid}/task/{sleepers.proc.pid}/children") as f:
                pids = sorted(int(p) for p in f.read().split())
            if len(pids) != N_WATCHES:
                raise RuntimeError(f"found {len(pids)} sleepers, expected {N_WATCHES}")
            rows = [("earlyoom", "earlyoom 1.7, default", [earlyoom], None),
                    ("guard", "memwatchd run, default config (guard only)", None, []),
                    ("ten", f"memwatchd run, guard + {N_WATCHES} pid watches (1G)", None, pids)]
            for key, _label, cmd, watched in rows:
                env = dict(os.environ)
                if cmd is None:
                    sockets[key] = notify_socket(workdir, key, env)
                    cmd = _benchlib.memwatchd_command() + [
                        "run", "--config", write_config(workdir, key, watched)]
                procs[key] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, text=True)
                notes[key] = []
            time.sleep(WARMUP)
            for key, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{key} exited: {proc.stderr.read()}")
            cpu = {key: [_benchlib.cpu_ns(p.pid)] for key, p in procs.items()}
            stamps = [time.monotonic()]
            rss = {key: [] for key in procs}
            passes = {key: [loop_counts(workdir, key)] for key in sockets}
            end = stamps[0] + args.seconds
            while time.monotonic() < end - 0.01:
                window_end = min(end, stamps[-1] + args.window)
                while time.monotonic() < window_end:
                    time.sleep(min(1.0, max(0.0, window_end - time.monotonic())))
                    for key, sock in sockets.items():
                        notes[key] += drain(sock)
                for key, proc in procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{key} exited: {proc.stderr.read()}")
                    cpu[key].append(_benchlib.cpu_ns(proc.pid))
                    rss[key].append(vm_rss_mib(proc.pid))
                    if key in sockets:
                        passes[key].append(loop_counts(workdir, key))
                stamps.append(time.monotonic())
        finally:
            for proc in procs.values():
                _benchlib.stop(proc, 10)
            for sock in sockets.values():
                sock.close()
            sleepers.stop()
    per_min = {key: [(b - a) / 1e6 * 60.0 / (t1 - t0) for a, b, t0, t1
                     in zip(c, c[1:], stamps, stamps[1:])] for key, c in cpu.items()}
    base = per_min["earlyoom"]
    print(f"side by side for {args.seconds:.0f} s after a {WARMUP:.0f} s warm-up, "
          f"{len(base)} windows of {args.window:.0f} s; CPU from schedstat (all threads), "
          f"medians [min..max]; ratio: median of the per-window ratios to earlyoom")
    print(f"| {'daemon':<46} | {'CPU ms per minute':>22} | {'RSS MiB':>7} | {'vs earlyoom':>11} |")
    print(f"|{'-' * 48}|{'-' * 24}|{'-' * 9}|{'-' * 13}|")
    ratios = {}
    for key, label, _cmd, _w in rows:
        v = per_min[key]
        ratios[key] = statistics.median(x / y if y > 0 else float("inf") for x, y in zip(v, base))
        spread = f"{statistics.median(v):.1f} [{min(v):.1f}..{max(v):.1f}]"
        print(f"| {label:<46} | {spread:>22} | {statistics.median(rss[key]):>7.1f} "
              f"| {ratios[key]:>10.2f}x |")
    for key, sock_notes in notes.items():
        kinds = {}
        for note in sock_notes:
            for line in note.decode("utf-8", "replace").splitlines():
                kinds[line.split("=", 1)[0]] = kinds.get(line.split("=", 1)[0], 0) + 1
        print(f"{key}: notify datagrams in {args.seconds:.0f} s: {len(sock_notes)} "
              f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})")
    for key, counts in passes.items():
        counts = [c for c in counts if c is not None]
        if len(counts) >= 2 and counts[-1][0] > counts[0][0]:
            span = (counts[-1][0] - counts[0][0]) / 60.0
            print(f"{key}: per minute, as the state file counts them: Python ticks "
                  f"{(counts[-1][1] - counts[0][1]) / span:.1f}, quiet wakes in C "
                  f"{(counts[-1][2] - counts[0][2]) / span:.1f}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"goals: guard only <= 1.0x earlyoom: {'met' if ratios['guard'] <= 1.0 else 'MISSED'}; "
          f"guard + {N_WATCHES} pid watches <= 3x: {'met' if ratios['ten'] <= 3.0 else 'MISSED'}")
    print(f"guard_vs_earlyoom={ratios['guard']:.2f} ten_vs_earlyoom={ratios['ten']:.2f} "
          f"earlyoom_ms_per_min={statistics.median(base):.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=120.0,
                        help="how long all three run side by side (default 120)")
    parser.add_argument("--window", type=float, default=10.0,
                        help="length of one measuring window (default 10)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    return _benchlib.inner_or_namespace(__file__, parser.parse_args(), inner)


if __name__ == "__main__":
    sys.exit(main())
