"""How much memory and CPU does the resident daemon cost at idle, next to a bare Python?

Inside a private PID namespace, starts `memwatchd run` (as systemd would: the console
script, else `python -m memwatchd`) with a NOTIFY_SOCKET and WATCHDOG_USEC as under the
unit, and, side by side, a bare `python3 -c "import time; time.sleep(...)"` from the
same interpreter.
Samples both every 0.5 s for --seconds (default 60) and reports the steady-state VmRSS
(median of the second half; RssAnon / RssFile split) and memwatchd's CPU time per
minute at idle (schedstat, after a 5 s warm-up).

Python's bytecode cache matters here: without .pyc files every module is compiled at
start-up and the compiler's arenas inflate RSS. The modes:
  - "guard": the default config (the host guard only, the state file on: events and
    state in a temp dir), the .pyc cache warmed by a first start: the unit as installed,
    and the goal's yardstick (issue 18);
  - "cached": 10 [[watch]] entries, one per idle `sleep` process (limit 1G, action term)
    plus the guard, no state file; PYTHONDONTWRITEBYTECODE unset,
    PYTHONPYCACHEPREFIX=<temp dir> warmed by a first start: what a normal installation
    (pip writes .pyc files) does;
  - "no-pyc": PYTHONDONTWRITEBYTECODE=1 with an empty PYTHONPYCACHEPREFIX: nothing is
    cached, every module (stdlib too) is compiled at start; the upper bound of what an
    environment with PYTHONDONTWRITEBYTECODE=1 sees.
  - "traced": as "cached", with `[daemon] trace` set (the trace ring, issue 14): its
    RSS and CPU next to "cached" are what recording costs at idle; it also prints how
    many bytes per minute the ring grew.
  - "predict": as "cached", with the predictive trigger on (issue 15): `[guard] predict`
    and `predict` on PREDICTING of the watches (write_predict_config); next to "cached"
    it is what the trends cost at idle.
  - "packaged": as "guard", but on Debian's /usr/bin/python3 with this tree on
    PYTHONPATH, started by debian/memwatchd.script (the .deb's /usr/bin/memwatchd),
    next to that bare python:
    the .deb as installed. The dev venv's interpreter carries what its site.py loads
    (the editable install's finder imports pathlib, re, ipaddress, urllib: about 2 MiB
    in every Python started from it, bare python too); a packaged install has none of
    that. Skipped unless /usr/bin/python3 is the same major.minor as this Python (the
    extension's ABI).
Then, for the run path (memwatchd.entry -> config -> daemon), the RSS after each import
and the packages it loads, so a regression names its culprit.
Goal: steady-state VmRSS of the guard-only `memwatchd run` at most 12 MiB. The last line
is `rss_mib=<x> bare_python_rss_mib=<y> idle_cpu_ms_per_min=<z>` for "guard" (for the
first mode run if "guard" is not among them), then `watches_rss_mib=` ("cached"),
`packaged_rss_mib=` and `packaged_bare_python_rss_mib=`, and the traced figures.

Run: python benchmarks/footprint.py [--seconds 60]
     [--modes guard,cached,no-pyc,traced,predict,packaged]
(as root: needs unshare(1) for the namespace). About 6.5 minutes with the defaults.
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

import _benchlib

GOAL_MIB = 12.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TARGETS = 10

IMPORTS_PY = r"""
import importlib, sys
steps = sys.argv[1:]
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon"):
                out[k] = int(v.split()[0]) / 1024
    return out
last = status()
print("%-28s %7.1f %7.1f" % ("(interpreter)", last["VmRSS"], last["RssAnon"]))
for step in steps:
    before = set(sys.modules)
    for name in step.split("+"):
        importlib.import_module(name)
    new = sorted(m for m in set(sys.modules) - before if not m.startswith("_"))
    s = status()
    print("%-28s %7.1f %7.1f %+7.1f %4d  %s" % (step, s["VmRSS"], s["RssAnon"], s["VmRSS"] - last["VmRSS"],
          len(set(sys.modules) - before), " ".join(new)[:70]))
    last = s
"""
LIST_PY = r"""
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""
RUN_PATH = ["memwatchd.entry", "memwatchd.config", "memwatchd.daemon"]
# Standard-library groups worth naming, imported first (each only if the run path loads it),
# so that what a memwatchd module adds is its own code.
STDLIB_STEPS = ["re", "collections", "typing", "ast", "dis", "tokenize", "inspect", "dataclasses", "json",
                "datetime", "tomllib", "signal+select+resource", "subprocess", "socket", "pathlib"]


def status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def write_config(workdir: str, pids: list, trace: str = "") -> str:
    return _benchlib.pid_watch_config(
        os.path.join(workdir, "memwatchd-traced.toml" if trace else "memwatchd.toml"),
        f'[daemon]\nevents = "{workdir}/events.jsonl"\nstate = ""\ntrace = "{trace}"\n', pids)


def write_guard_config(workdir: str) -> str:
    """The default config as the unit reads it (the shipped memwatchd.toml: the guard,
    protect rules), with events and the state file (on, as by default) in workdir."""
    with open(os.path.join(ROOT, "memwatchd", "data", "memwatchd.toml")) as f:
        shipped = f.read()    # what debian/ and install-units install as /etc/memwatchd/memwatchd.toml
    path = os.path.join(workdir, "memwatchd-guard.toml")
    text = shipped.replace('"/var/lib/memwatchd/events.jsonl"', f'"{workdir}/events.jsonl"') \
        .replace('"/run/memwatchd/state.json"', f'"{workdir}/state.json"')
    if f'"{workdir}/state.json"' not in text or f'"{workdir}/events.jsonl"' not in text:
        raise RuntimeError("the default config's events/state paths changed: update write_guard_config")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def packaged_python() -> str:
    """Debian's python3 when it can load this tree's extension (same major.minor), else ''."""
    deb = "/usr/bin/python3"
    if not os.path.exists(deb):
        return ""
    out = subprocess.run([deb, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True)
    return deb if out.stdout.strip() == "%d.%d" % sys.version_info[:2] else ""



def write_predict_config(workdir: str, pids: list) -> str:
    """The "predict" mode's config (issue 15): the guard and PREDICTING of the watches
    with a 30 s horizon, so the daemon keeps a trend for the host and for each of them."""
    path = os.path.join(workdir, "memwatchd-predict.toml")
    lines = [f'[daemon]\nevents = "{workdir}/events.jsonl"\nstate = ""\n\n[guard]\npredict = "30s"\n']
    for i, pid in enumerate(pids):
        lines.append(f'[[watch]]\nname = "job-{i}"\npid = {pid}\nlimit = "1G"\n'
                     + ('predict = "30s"\n' if i < PREDICTING else ""))
    with open(path, "w") as f:
        f.write("\n".join(lines))
    os.chmod(path, 0o600)
    return path


PREDICTING = 3


def mode_env(mode: str, cache_dir: str) -> dict:
    env = dict(os.environ, PYTHONPYCACHEPREFIX=cache_dir)
    if mode == "packaged":
        env["PYTHONPATH"] = ROOT
    if mode != "no-pyc":
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def notify_listener(workdir: str, env: dict):
    """A datagram socket standing in for systemd's: the daemon sends READY=1, STATUS=
    and WATCHDOG=1 to it as under the unit (WatchdogSec=10s), so its notify client's
    memory is counted. Returns the socket; the sampling loop drains it."""
    return _benchlib.notify_socket(os.path.join(workdir, f"notify-{len(os.listdir(workdir))}.sock"), env)


def drain(sock) -> int:
    n = 0
    while True:
        try:
            sock.recv(4096)
            n += 1
        except BlockingIOError:
            return n


def measure(mode: str, config: str, seconds: float, workdir: str) -> dict:
    cache_dir = tempfile.mkdtemp(prefix=f"pycache-{mode}-", dir=workdir)
    env = mode_env(mode, cache_dir)
    notify = notify_listener(workdir, env)
    python = packaged_python() if mode == "packaged" else sys.executable
    if mode == "packaged":   # as debian/memwatchd.script starts it
        daemon_cmd = [python, os.path.join(ROOT, "debian", "memwatchd.script"), "run", "--config", config]
    else:
        daemon_cmd = _benchlib.memwatchd_command() + ["run", "--config", config]
    bare_cmd = [python, "-c", f"import time; time.sleep({seconds + 30})"]
    if mode != "no-pyc":  # warm the cache: one start of each, then stop
        warm = subprocess.Popen(daemon_cmd, env=env, stderr=subprocess.DEVNULL)
        subprocess.run([python, "-c", "pass"], env=env, check=True)
        time.sleep(3.0)
        warm.send_signal(signal.SIGTERM)
        warm.wait(10)
    daemon = subprocess.Popen(daemon_cmd, env=env, stderr=subprocess.PIPE, text=True)
    bare = subprocess.Popen(bare_cmd, env=env)
    samples, notified = [], 0
    try:
        t0 = time.monotonic()
        cpu_at = None
        while time.monotonic() - t0 < seconds:
            time.sleep(0.5)
            if daemon.poll() is not None:
                raise RuntimeError(f"memwatchd run exited: {daemon.stderr.read()}")
            if cpu_at is None and time.monotonic() - t0 >= min(5.0, seconds / 4):
                cpu_at = (_benchlib.cpu_ns(daemon.pid), time.monotonic())
            samples.append((time.monotonic() - t0, status(daemon.pid), status(bare.pid)))
            notified += drain(notify)
        if not notified:
            raise RuntimeError("memwatchd run sent nothing to NOTIFY_SOCKET")
        cpu_end = (_benchlib.cpu_ns(daemon.pid), time.monotonic())
        trace_bytes = (_dir_size(os.path.join(workdir, "trace")), time.monotonic() - t0)
    finally:
        for proc in (daemon, bare):
            _benchlib.stop(proc, 10)
        notify.close()
    steady = samples[len(samples) // 2:]
    med = lambda i, key: statistics.median(s[i][key] for s in steady)
    return {
        "rss": med(1, "VmRSS"), "anon": med(1, "RssAnon"), "file": med(1, "RssFile"),
        "hwm": samples[-1][1]["VmHWM"],
        "rss_min": min(s[1]["VmRSS"] for s in steady), "rss_max": max(s[1]["VmRSS"] for s in steady),
        "bare": med(2, "VmRSS"), "bare_anon": med(2, "RssAnon"), "bare_file": med(2, "RssFile"),
        "cpu_ms_per_min": (cpu_end[0] - cpu_at[0]) / 1e6 * 60.0 / (cpu_end[1] - cpu_at[1]),
        "env": env, "trace_kib_per_min": trace_bytes[0] / 1024 * 60.0 / trace_bytes[1],
    }


def _dir_size(path: str) -> int:
    try:
        return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
    except OSError:
        return 0


def import_breakdown(env: dict) -> None:
    """VmRSS after each import on the `run` path: stdlib groups first, then memwatchd's own."""
    import json
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", LIST_PY] + RUN_PATH, env=env,
                                           capture_output=True, text=True, check=True).stdout))
    steps = [s for s in STDLIB_STEPS if all(m in loaded for m in s.split("+"))]
    ours = sorted(m for m in loaded if m.startswith("memwatchd.") and not m.endswith("_memread"))
    order = ["memwatchd.types", "memwatchd.entry", "memwatchd.config", "memwatchd.sampler",
             "memwatchd.report", "memwatchd.systemd", "memwatchd.targets", "memwatchd.policy",
             "memwatchd.actions", "memwatchd.state"]
    steps += [m for m in order if m in ours] + [m for m in ours if m not in order]
    out = subprocess.run([sys.executable, "-c", IMPORTS_PY] + steps, env=env,
                         capture_output=True, text=True)
    print(f"{'then importing':<28} {'VmRSS':>7} {'anon':>7} {'+MiB':>7} {'mods':>4}  new modules")
    print(out.stdout.rstrip() or out.stderr.rstrip())


def inner(args) -> int:
    if os.getpid() != 1:
        print("refusing to run outside a private PID namespace", file=sys.stderr)
        return 2
    t_begin = time.monotonic()
    modes = args.modes.split(",")
    if "packaged" in modes and not packaged_python():
        print("packaged: skipped (no /usr/bin/python3 of this Python's major.minor)")
        modes.remove("packaged")
    sleepers = [subprocess.Popen(["sleep", str(int(args.seconds * len(modes) + 120))])
                for _ in range(N_TARGETS)]
    results = {}
    try:
        with tempfile.TemporaryDirectory(prefix="memwatchd-bench-") as workdir:
            config = write_config(workdir, [p.pid for p in sleepers])
            traced = write_config(workdir, [p.pid for p in sleepers], os.path.join(workdir, "trace"))
            guard = write_guard_config(workdir)
            configs = {"traced": traced, "predict": write_predict_config(workdir, [p.pid for p in sleepers]),
                       "guard": guard, "packaged": guard}
            print(_benchlib.machine())
            print(f"`{' '.join(os.path.basename(c) for c in _benchlib.memwatchd_command())} run` with "
                  f"the default config (guard, packaged) or {N_TARGETS} pid watches + the host guard (the "
                  f"others), next to `{os.path.basename(sys.executable)} -c 'import time; time.sleep()'` "
                  f"(packaged: {packaged_python() or '-'}); {args.seconds:.0f} s per mode, VmRSS median of "
                  f"the second half (MiB)")
            print(f"{'mode':<8} {'memwatchd VmRSS':>22} {'anon':>6} {'file':>6} {'peak':>6}"
                  f" {'bare python':>12} {'anon':>6} {'file':>6} {'ratio':>6} {'CPU ms/min':>11}")
            for mode in modes:
                r = measure(mode, configs.get(mode, config), args.seconds, workdir)
                results[mode] = r
                print(f"{mode:<8} {r['rss']:>8.1f} [{r['rss_min']:.1f}..{r['rss_max']:.1f}]"
                      f" {r['anon']:>6.1f} {r['file']:>6.1f} {r['hwm']:>6.1f} {r['bare']:>12.1f}"
                      f" {r['bare_anon']:>6.1f} {r['bare_file']:>6.1f} {r['rss'] / r['bare']:>5.2f}x"
                      f" {r['cpu_ms_per_min']:>11.1f}"
                      + (f"  trace {r['trace_kib_per_min']:.1f} KiB/min" if mode == "traced" else ""),
                      flush=True)
            head_mode = "guard" if "guard" in results else modes[0]
            head = results[head_mode]
            print(f"\nimports on the `run` path ({head_mode}; MiB):")
            import_breakdown(head["env"])
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
    print(f"\ngoal: `memwatchd run` steady-state VmRSS <= {GOAL_MIB:.0f} MiB: "
          + ", ".join(f"{m} {'met' if r['rss'] <= GOAL_MIB else 'MISSED'} ({r['rss']:.1f} MiB)"
                      for m, r in results.items())
          + " (DESIGN.md: nohang 17.2 MiB, bare python3.11 8.5 MiB, earlyoom 1.7 MiB)")
    if "predict" in results and "cached" in results:   # issue 15: what the trends add
        print(f"predict (guard + {PREDICTING} of {N_TARGETS} watches, 30 s horizon): "
              f"predict_rss_mib={results['predict']['rss']:.1f} (cached {results['cached']['rss']:.1f}, "
              f"{results['predict']['rss'] - results['cached']['rss']:+.1f}) predict_idle_cpu_ms_per_min="
              f"{results['predict']['cpu_ms_per_min']:.1f}")
    print(f"total run time {time.monotonic() - t_begin:.0f} s")
    print(f"rss_mib={head['rss']:.1f} bare_python_rss_mib={head['bare']:.1f} "
          f"idle_cpu_ms_per_min={head['cpu_ms_per_min']:.1f}"
          + (f" watches_rss_mib={results['cached']['rss']:.1f}" if "cached" in results and head_mode != "cached" else "")
          + (f" packaged_rss_mib={results['packaged']['rss']:.1f} packaged_bare_python_rss_mib="
             f"{results['packaged']['bare']:.1f}" if "packaged" in results else "")
          + (f" traced_rss_mib={results['traced']['rss']:.1f} traced_idle_cpu_ms_per_min="
             f"{results['traced']['cpu_ms_per_min']:.1f} trace_kib_per_min="
             f"{results['traced']['trace_kib_per_min']:.1f}" if "traced" in results else ""))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="sampling time per mode")
    parser.add_argument("--modes", default="guard,cached,no-pyc,traced,predict,packaged")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    return _benchlib.inner_or_namespace(__file__, parser.parse_args(), inner)


if __name__ == "__main__":
    sys.exit(main())
