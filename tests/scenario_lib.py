"""Helpers for code that runs inside a private PID namespace (see tests/pidns.py).

Everything here starts real processes: the daemon (`python -m memwatchd run`),
and hogs that really allocate, cap themselves in bytes and time, and write
down every signal they receive.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

WORK = tempfile.mkdtemp(prefix="memwatchd-scenario-")
MiB = 1 << 20

HOG = textwrap.dedent("""
    import os, signal, sys, time, json
    rate_mib, cap_mib, seconds, on_term, report, events, name = sys.argv[1:8]
    with open("/proc/self/comm", "w") as f:
        f.write(name[:15])                               # so `ps` and the guard see its name
    rate, cap, seconds = int(rate_mib) << 20, int(cap_mib) << 20, float(seconds)
    signal.alarm(int(seconds) + 1)                   # hard time cap

    def note(sig, frame):
        line = {"signal": sig, "time": time.time(), "mine_in_events": False}
        try:  # write-ahead: our decision record must be on disk before the signal
            with open(events) as f:
                line["mine_in_events"] = any(json.loads(l).get("pid") == os.getpid()
                                             for l in f if l.strip())
        except (OSError, ValueError):
            pass
        with open(report, "a") as f:
            f.write(json.dumps(line) + "\\n")
        if sig == signal.SIGTERM and on_term == "exit":
            os._exit(0)

    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGUSR1, note)
    chunks, total, start = [], 0, time.time()
    step = 4 << 20
    while time.time() - start < seconds:
        if total + step <= cap and total < rate * (time.time() - start):
            chunks.append(bytearray(step))
            for i in range(0, step, 4096):
                chunks[-1][i] = 1              # touch: counts in RSS
            total += step
        else:
            time.sleep(0.002)
""")


# A process whose main thread calls pthread_exit() while a worker thread holds memory:
# the leader is a zombie (statm reads zeros) but the process lives. The worker prints
# "ready" once its memory is touched and the leader has exited, then sleeps (capped).
LEADER_EXITS = textwrap.dedent("""
    import ctypes, os, sys, threading, time
    size, seconds = int(sys.argv[1]), float(sys.argv[2])
    def worker():
        while open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)                  # wait until the leader is a zombie
        block = bytearray(size)               # only then grow: all of it after the exit
        for i in range(0, size, 4096):
            block[i] = 1
        print("ready", flush=True)
        time.sleep(seconds)
        os._exit(0)
    threading.Thread(target=worker).start()
    ctypes.CDLL(None).pthread_exit(None)
""")




def start_hog(name: str, rate_mib: int = 200, cap_mib: int = 1024, seconds: float = 20,
              on_term: str = "exit", events: str = "") -> subprocess.Popen:
    """A hog growing at rate_mib MiB/s up to cap_mib; its signals go to WORK/<name>.signals.
    on_term="exit" exits on SIGTERM, "ignore" keeps growing. Its last argument and its
    comm are the name."""
    report = os.path.join(WORK, f"{name}.signals")
    return subprocess.Popen([sys.executable, "-c", HOG, str(rate_mib), str(cap_mib),
                             str(seconds), on_term, report, events or "/nonexistent", name])


def hog_signals(name: str) -> list:
    try:
        with open(os.path.join(WORK, f"{name}.signals")) as f:
            return [json.loads(line) for line in f]
    except FileNotFoundError:
        return []


def write_config(text: str) -> str:
    path = os.path.join(WORK, "memwatchd.toml")
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    os.chmod(path, 0o600)
    return path


def start_daemon(config_text: str, env: dict = None, extra_args=()) -> subprocess.Popen:
    """`python -m memwatchd run --config ...` with stderr to WORK/daemon.log."""
    path = write_config(config_text)
    log = open(os.path.join(WORK, "daemon.log"), "w")
    return subprocess.Popen([sys.executable, "-m", "memwatchd", "run", "--config", path,
                             *extra_args], stderr=log, stdout=log,
                            env=dict(os.environ, **(env or {})))


EVENTS = os.path.join(WORK, "events.jsonl")


def start_watching(watches: str, daemon: str = "", env: dict = None,
                   events: str = EVENTS) -> subprocess.Popen:
    """The daemon with the guard off, events in EVENTS (or ``events``), no state file, plus
    these [[watch]] tables (and extra [daemon] keys): only the watched hogs can be signalled."""
    return start_daemon(f'''
[daemon]
events = "{events}"
state = ""
{textwrap.dedent(daemon)}
[guard]
enabled = false
{textwrap.dedent(watches)}
''', env=env)


def start_patched_daemon(code: str, watches: str, argv=()) -> subprocess.Popen:
    """Like start_watching, but `memwatchd run` is started by ``python -c code *argv run
    --config ...``; code changes something first (a seccomp filter, a constant, a fault)
    and ends by calling memwatchd.entry.main()."""
    path = write_config(f'''
[daemon]
events = "{EVENTS}"
state = ""
[guard]
enabled = false
{textwrap.dedent(watches)}
''')
    log = open(os.path.join(WORK, "daemon.log"), "w")
    return subprocess.Popen([sys.executable, "-c", code, *argv, "run", "--config", path],
                            stderr=log, stdout=log)


def guard_config(events: str, protect_names, extra: str = "") -> str:
    """A config whose guard fires at once (its MemAvailable floor 300 MiB above what is
    available now), with a 1 s grace and these protected names (no protected cgroups).
    Needs psutil (the test environment has it)."""
    import psutil
    floor = psutil.virtual_memory().available + (300 << 20)
    return f'''
[daemon]
events = "{events}"
state = ""
cooldown = "30s"
[guard]
min_available = "{floor}B"
kill_available = "1M"
grace = "1s"
[protect]
names = {json.dumps(list(protect_names))}
cgroups = []
{extra}'''


def state_ticks(path: str):
    """daemon.ticks (the loop's Python passes) from a state file; None before one is written."""
    try:
        with open(path) as f:
            return json.load(f)["daemon"]["ticks"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def daemon_log() -> str:
    with open(os.path.join(WORK, "daemon.log")) as f:
        return f.read()


def wait_for(predicate, timeout: float = 15, step: float = 0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def read_events(path: str) -> list:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def stop(proc: subprocess.Popen, sig=signal.SIGKILL) -> int:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
    return proc.wait(timeout=10)


def exited_by(proc: subprocess.Popen, timeout: float = 15):
    """The hog's fate: -signal if killed by a signal, its exit code, or None if still running."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def result(**fields) -> None:
    print(json.dumps(fields), flush=True)


@contextlib.contextmanager
def cgroup2_sandbox():
    """A fresh child cgroup of the real cgroup v2 hierarchy, mounted in this scenario's
    private mount namespace (run_scenario makes one): real kernfs behaviour (ENODEV
    after removal or cgroup.pressure=0, cgroup.kill, cgroup.procs) on hosts whose
    /sys/fs/cgroup is v1 or lacks the memory controller. Yields its path; on exit its
    processes are killed and the cgroup (and any child cgroup) removed."""
    mnt = tempfile.mkdtemp(prefix="memwatchd-cg2-")
    subprocess.run(["mount", "-t", "cgroup2", "none", mnt], check=True)
    path = os.path.join(mnt, "memwatchd-test-" + uuid.uuid4().hex[:12])
    os.mkdir(path)
    try:
        yield path
    finally:
        for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                with open(os.path.join(dirpath, "cgroup.kill"), "w") as f:
                    f.write("1")
            deadline = time.time() + 10
            while time.time() < deadline:
                try:
                    os.rmdir(dirpath)
                    break
                except OSError:
                    time.sleep(0.02)
        subprocess.run(["umount", mnt])
