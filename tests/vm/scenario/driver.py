#!/usr/bin/python3
"""Guest side: run issue 6's scenarios against memwatchd under real systemd.

Runs as root inside the VM (from the harness script), on the guest's
/usr/bin/python3, standard library only. Usage:

    driver.py protected RESULTS.json    memwatchd installed by install-units:
                                        hardened unit, host guard, unit budget,
                                        reload, watchdog, adversarial (issue 11)
    driver.py baseline RESULTS.json     no memwatchd: the same hog, for comparison

Every check is recorded as {"name", "ok", "detail"} in the results file and
the numbers measured along the way next to it; the host-side test asserts on
them. The driver itself only fails (exit 1) when it cannot write results.

Clocks: hog logs, heartbeat log, journal (__MONOTONIC_TIMESTAMP) and systemd's
Exec*TimestampMonotonic all use CLOCK_MONOTONIC; memwatchd's event records
carry wall-clock time, mapped onto it with one offset taken at start (the
guest runs no time synchronisation, so the offset does not move).
"""
import calendar
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback

LIB = "/usr/local/lib/mwtest"
RUN = "/run/mwtest"
EVENTS = "/var/lib/memwatchd/events.jsonl"
CONFIG = "/etc/memwatchd/memwatchd.toml"
UNIT_PATH = "/etc/systemd/system/memwatchd.service"
HEARTBEAT_LOG = RUN + "/heartbeat.log"
MIB = 1 << 20
# How long a hog may run at most (each also caps itself in time).
HOG_TIMEOUT = 45.0

CONFIG_WATCH = """\
# memwatchd VM test: a budget for hog.service ({limit}).
[daemon]
events = "{events}"
state = "/run/memwatchd/state.json"

[[watch]]
name = "hog"
unit = "hog.service"
limit = "{limit}"
action = "term"
grace = "2s"
"""

# A syntax error (unclosed table header): reload must refuse it.
CONFIG_BROKEN = """\
[daemon]
events = "/var/lib/memwatchd/events.jsonl"

[[watch]
name = "hog"
unit = "hog.service"
limit = "100M"
"""

# Issue 11: a cmdline watch for the hog whose main thread exits, and a pidfile watch on a
# FIFO an unprivileged user made (it must name nothing and hang nothing).
CONFIG_ADVERSARIAL = """\
[daemon]
events = "{events}"
state = "/run/memwatchd/state.json"

[[watch]]
name = "train"
cmdline = "train.*--epochs.*gpu"
limit = "{limit}"
action = "term"
grace = "2s"

[[watch]]
name = "fifo"
pidfile = "{fifo}"
limit = "1M"
action = "kill"
"""

OFFSET = time.time() - time.monotonic()   # wall - monotonic, for event records
T0 = time.monotonic()


def mono():
    return time.monotonic()


def run(*args, timeout=60, check=False):
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError("%s failed (rc %d): %s" % (" ".join(args), proc.returncode,
                                                     (proc.stdout + proc.stderr).strip()))
    return proc


def show(unit, *props):
    out = run("systemctl", "show", unit, *("-p" + p for p in props), check=True).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {p: values.get(p, "") for p in props}


def wait_for(pred, timeout, interval=0.1):
    """Poll pred() until it returns something truthy; that value, or None on timeout."""
    deadline = mono() + timeout
    while True:
        value = pred()
        if value or mono() >= deadline:
            return value or None
        time.sleep(interval)


def write_file(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    return out


def vmstat_oom_kills():
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return -1


def wall_to_mono(stamp):
    """Event time "2026-11-27T08:25:18.123Z" -> guest CLOCK_MONOTONIC seconds."""
    seconds = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    return seconds + int(stamp[20:23]) / 1000.0 - OFFSET


def read_events():
    try:
        with open(EVENTS) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def journal(unit=None, kernel=False, since=0.0):
    """[(monotonic_s, priority, message)] of this boot, oldest first."""
    args = ["journalctl", "-b", "--no-pager", "-o", "json"]
    if unit:
        args += ["-u", unit]
    if kernel:
        args += ["-k"]
    out = []
    for line in run(*args).stdout.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message = entry.get("MESSAGE", "")
        if isinstance(message, list):  # binary: a list of byte values
            message = bytes(message).decode("utf-8", "replace")
        t = int(entry.get("__MONOTONIC_TIMESTAMP", 0)) / 1e6
        if t >= since:
            out.append((t, int(entry.get("PRIORITY", 6)), message))
    return out


def journal_wait(unit, needle, since, timeout=20.0):
    """The first journal entry of unit containing needle, logged after since."""
    def find():
        for entry in journal(unit, since=since):
            if needle in entry[2]:
                return entry
        return None
    return wait_for(find, timeout, interval=0.3)


class Heartbeat:
    """Reads heartbeat.log: the largest gap in a window of monotonic time."""

    @staticmethod
    def ticks():
        try:
            with open(HEARTBEAT_LOG) as f:
                rows = [line.split() for line in f]
        except FileNotFoundError:
            return []
        return [(float(r[0]), float(r[1]), int(r[2]) * 1024) for r in rows if len(r) == 3]

    @classmethod
    def window(cls, start, end):
        ticks = [t for t in cls.ticks() if start <= t[0] <= end + 1.0]
        if not ticks:
            return {"ticks": 0, "max_gap_s": None, "min_mem_available": None}
        worst = max(ticks, key=lambda t: t[1])
        return {"ticks": len(ticks), "max_gap_s": round(worst[1], 3),
                "max_gap_at": round(worst[0], 3),
                "min_mem_available": min(t[2] for t in ticks)}


class Driver:
    def __init__(self, results_path, mode):
        self.results_path = results_path
        self.results = {"mode": mode, "checks": [], "scenarios": {}, "facts": {},
                        "errors": [], "timeline": []}
        self.mem_total = meminfo()["MemTotal"]
        self.current = ""

    # ------------------------------------------------------------ bookkeeping

    def check(self, name, ok, detail=""):
        self.results["checks"].append({"scenario": self.current, "name": name, "ok": bool(ok),
                                       "detail": detail})
        print("%s %s %s" % ("PASS" if ok else "FAIL", name, detail), flush=True)
        return ok

    def mark(self, what):
        self.results["timeline"].append([round(mono(), 3), what])
        print("[%8.3f] %s" % (mono(), what), flush=True)

    def save(self):
        self.results["facts"]["driver_seconds"] = round(mono() - T0, 1)
        write_file(self.results_path, json.dumps(self.results, indent=2, sort_keys=True) + "\n")

    def scenario(self, name, fn):
        started = mono()
        self.current = name
        self.mark("scenario %s" % name)
        out = self.results["scenarios"].setdefault(name, {})
        try:
            fn(out)
        except Exception:
            self.results["errors"].append("%s: %s" % (name, traceback.format_exc()))
            self.check("%s: ran to the end" % name, False, traceback.format_exc()[-1500:])
        out["seconds"] = round(mono() - started, 1)
        out["window"] = [round(started, 3), round(mono(), 3)]
        out["heartbeat"] = Heartbeat.window(started, mono())
        self.save()

    # ------------------------------------------------------------ services

    def start_services(self, *units):
        os.makedirs(RUN, exist_ok=True)
        run("systemctl", "start", *units, check=True, timeout=120)
        pids = {}
        for unit in units:
            pids[unit] = wait_for(lambda: show(unit, "MainPID")["MainPID"] not in ("", "0")
                                  and show(unit, "MainPID")["MainPID"], 30)
        return pids

    def service_alive(self, unit, pid):
        props = show(unit, "ActiveState", "SubState", "MainPID", "NRestarts")
        return props["ActiveState"] == "active" and props["MainPID"] == pid, props

    def hog(self, label, args, limit=None, timeout=HOG_TIMEOUT):
        """Start hog.service with args, wait until it ends, measure. limit: the watch's
        limit in bytes (crossing time = first step whose cgroup usage is at or above it);
        None for the host guard (crossing = first step below the guard's MemAvailable floor)."""
        log = "%s/hog-%s.log" % (RUN, label)
        write_file(RUN + "/hog.env", 'HOG_ARGS="--log %s %s"\n' % (log, args))
        n_events = len(read_events())
        run("systemctl", "reset-failed", "hog.service")
        if os.path.exists(RUN + "/hog.exit"):
            os.unlink(RUN + "/hog.exit")
        started = mono()
        run("systemctl", "start", "hog.service", check=True)
        done = wait_for(lambda: show("hog.service", "ActiveState")["ActiveState"]
                        in ("inactive", "failed"), timeout, interval=0.2)
        ended = mono()
        if not done:
            run("systemctl", "kill", "-s", "SIGKILL", "hog.service")
            run("systemctl", "stop", "hog.service")
        # Written by the unit's ExecStopPost (a cleanly ended unit is unloaded at once).
        props = dict.fromkeys(("ExecMainStartTimestampMonotonic", "ExecMainExitTimestampMonotonic",
                               "ExecMainCode", "ExecMainStatus", "Result", "ExecMainPID"), "")
        if wait_for(lambda: os.path.exists(RUN + "/hog.exit"), 10):
            with open(RUN + "/hog.exit") as f:
                props.update(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        # memwatchd writes the outcome once it sees the exit: give it a moment.
        def settled():
            new = read_events()[n_events:]
            decided = {e["id"] for e in new if e["type"] == "decision" and e["action"] != "warn"}
            closed = {e["id"] for e in new if e["type"] == "outcome"}
            return (new,) if decided <= closed else None   # a tuple: truthy even when empty
        settled_events = wait_for(settled, 10, interval=0.3)
        new_events = settled_events[0] if settled_events else read_events()[n_events:]
        steps = []
        try:
            with open(log) as f:
                for line in f:
                    tag, t, total, current, avail = line.split()
                    steps.append((tag, float(t), int(total), int(current), int(avail) * 1024))
        except (FileNotFoundError, ValueError):
            pass
        start_mono = int(props["ExecMainStartTimestampMonotonic"] or 0) / 1e6
        exit_mono = int(props["ExecMainExitTimestampMonotonic"] or 0) / 1e6
        killed = props["ExecMainCode"] == "2"   # CLD_KILLED (3 = CLD_DUMPED)
        out = {
            "label": label, "args": args, "ended": bool(done), "started_mono": round(started, 3),
            "result": props["Result"], "exec_main_code": props["ExecMainCode"],
            "exit_signal": int(props["ExecMainStatus"] or 0) if killed else None,
            "exit_status": int(props["ExecMainStatus"] or 0) if not killed else None,
            "killed": killed, "pid": int(props["ExecMainPID"] or 0),
            "start_to_exit_s": round(exit_mono - start_mono, 3) if exit_mono else None,
            "peak_allocated": max((s[2] for s in steps), default=0),
            "peak_cgroup_current": max((s[3] for s in steps), default=0),
            "min_mem_available": min((s[4] for s in steps if s[4] > 0), default=None),
            "steps": len(steps),
            "alloc_rate_mb_s": round((steps[-1][2] - steps[0][2]) / MIB / (steps[-1][1] - steps[0][1]), 1)
            if len(steps) > 2 and steps[-1][1] > steps[0][1] else None,
            "events": new_events,
            "wall_s": round(ended - started, 1),
            "heartbeat": Heartbeat.window(started, ended),
        }
        if limit is not None:
            crossed = next((s for s in steps if s[3] >= limit), None)
            out["limit"] = limit
        else:
            floor, _ = self.guard_floor()
            crossed = next((s for s in steps if 0 < s[4] < floor), None)
            out["guard_floor"] = floor
        decisions = [e for e in new_events if e["type"] == "decision"]
        outcomes = {e["id"]: e for e in new_events if e["type"] == "outcome"}
        if decisions:
            first = decisions[0]
            out["decision_mono"] = round(wall_to_mono(first["time"]), 3)
            out["first_signal"] = first["signal"]
            out["first_reason"] = first["reason"]
            out["usage_at_decision"] = first["usage_bytes"]
            outcome = outcomes.get(first["id"])
            if outcome:
                out["seconds_to_exit"] = outcome["seconds_to_exit"]
                out["freed_bytes"] = outcome["freed_bytes"]
                out["escalated"] = outcome["escalated"]
        if crossed is None and steps and [e for e in new_events if e["type"] == "decision"]:
            # Stopped before its log showed the crossing: it crossed during the step after
            # the last one logged; taking that step's time overstates the reaction by <= 1 step.
            crossed = steps[-1]
            out["cross_estimated"] = True
        if crossed:
            out["crossed_mono"] = round(crossed[1], 3)
            if exit_mono:
                out["cross_to_exit_s"] = round(exit_mono - crossed[1], 3)
            if "decision_mono" in out:
                out["cross_to_decision_s"] = round(out["decision_mono"] - crossed[1], 3)
        if limit is not None:
            # When did memwatchd start watching the hog's cgroup (from the unit's start)?
            seen = next((e for e in journal("memwatchd.service", since=started)
                         if e[2].startswith("watching hog:")), None)
            if seen and start_mono:
                out["watch_attach_s"] = round(seen[0] - start_mono, 3)
        run("systemctl", "reset-failed", "hog.service")
        self.mark("hog %s: %s, signal %s, peak %.0f MiB, cross->exit %s s" % (
            label, props["Result"], out["exit_signal"], out["peak_cgroup_current"] / MIB,
            out.get("cross_to_exit_s")))
        return out

    def guard_floor(self):
        """The default guard's (term, kill) MemAvailable floors: 5% and 2% of MemTotal."""
        return self.mem_total * 5 // 100, self.mem_total * 2 // 100

    # ------------------------------------------------------------ memwatchd

    def memwatchd(self, *props):
        return show("memwatchd.service", *props)

    def install(self, out):
        """Scenario 5, part 1: install-units + enable --now, then the unit is verified."""
        t = mono()
        proc = run("memwatchd", "install-units", timeout=120)
        out["install_units"] = {"rc": proc.returncode, "output": (proc.stdout + proc.stderr)[-2000:],
                                "seconds": round(mono() - t, 1)}
        self.check("install-units succeeds", proc.returncode == 0, out["install_units"]["output"])
        shutil.copy(UNIT_PATH, os.path.join(os.path.dirname(self.results_path),
                                            "installed-memwatchd.service"))
        with open(CONFIG) as f:
            out["installed_config"] = f.read()
        st = os.stat(CONFIG)
        self.check("the installed config is root-owned and private",
                   st.st_uid == 0 and not st.st_mode & 0o022, oct(st.st_mode))
        proc = run("systemd-analyze", "verify", UNIT_PATH, timeout=120)
        out["verify"] = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
        self.check("systemd-analyze verify prints nothing",
                   proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(),
                   (proc.stdout + proc.stderr).strip())
        proc = run("systemd-analyze", "security", "--no-pager", "memwatchd.service", timeout=120)
        out["security_exposure"] = (proc.stdout.strip().splitlines() or [""])[-1].lstrip("→ ")
        t = mono()
        proc = run("systemctl", "enable", "--now", "memwatchd", timeout=120)
        out["enable_now_seconds"] = round(mono() - t, 1)
        props = self.memwatchd("ActiveState", "SubState", "MainPID", "Type", "WatchdogUSec",
                               "ExecMainStartTimestampMonotonic", "FragmentPath")
        out["after_enable"] = props
        self.check("enable --now: memwatchd active/running (Type=notify, READY=1 sent)",
                   proc.returncode == 0 and props["ActiveState"] == "active"
                   and props["SubState"] == "running", "%s %s" % (props, proc.stderr.strip()))
        self.check("the unit that runs is the installed one",
                   props["FragmentPath"] == UNIT_PATH, props["FragmentPath"])
        pid = props["MainPID"]
        status = {}
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                key, _, value = line.partition(":")
                status[key] = value.strip()
        fds = []
        for fd in os.listdir("/proc/%s/fd" % pid):
            try:
                fds.append(os.readlink("/proc/%s/fd/%s" % (pid, fd)))
            except OSError:
                pass
        out["process"] = {k: status.get(k) for k in ("VmRSS", "VmLck", "Seccomp", "NoNewPrivs",
                                                     "CapEff", "CapBnd")}
        out["process"]["fds"] = sorted(fds)
        self.check("memwatchd runs sandboxed (seccomp filter, no_new_privs)",
                   status.get("Seccomp") == "2" and status.get("NoNewPrivs") == "1",
                   json.dumps(out["process"]))
        self.check("mlockall worked under the unit (VmLck > 0)",
                   int(status.get("VmLck", "0 kB").split()[0]) > 0, status.get("VmLck"))
        # Two fds on /proc/pressure/memory: the reader and the PSI trigger.
        self.check("PSI trigger registered under the unit",
                   fds.count("/proc/pressure/memory") >= 2, json.dumps(fds))

    def memwatchd_journal_problems(self, out):
        """Scenario 5, part 2: nothing in memwatchd's journal says the sandbox got in the way."""
        lines = journal("memwatchd.service")
        out["journal_lines"] = len(lines)
        bad_words = ("mlockall failed", "PR_SET_IO_FLUSHER failed", "no PSI trigger", "notify socket", "Traceback",
                     "Operation not permitted", "Permission denied", "Read-only file system",
                     "could not write the event record", "could not ")
        problems = [m for _, prio, m in lines
                    if any(w in m for w in bad_words)
                    or (prio <= 3 and "reload failed, keeping the running configuration" not in m
                        and "(disk congested or failing); acting anyway" not in m   # a slow disk
                        and "Failed with result 'watchdog'" not in m
                        and "Watchdog timeout" not in m and "dumped core" not in m
                        and "Main process exited, code=" not in m)]
        # The watchdog scenario kills memwatchd on purpose: faulthandler prints its stack.
        kill_at = self.results["scenarios"].get("watchdog", {}).get("sigstop_mono")
        if kill_at:
            problems = [m for t, prio, m in lines
                        if m in problems and not (kill_at <= t <= kill_at + 30)]
        out["journal_problems"] = problems
        self.check("memwatchd's journal has no sandbox or runtime errors", not problems,
                   json.dumps(problems[:20]))

    # ------------------------------------------------------------ scenarios

    def scenario_guard(self, out):
        """Scenario 2: the built-in default config (guard only) stops a hog in its own unit
        that grows toward all of the guest's memory; big protected services survive."""
        with open(CONFIG) as f:
            text = f.read()
        self.check("guard scenario runs with the default config (no [[watch]])",
                   "[[watch]]" not in [l.strip() for l in text.splitlines()], text)
        pids = self.start_services("ssh.service")
        avail = meminfo()["MemAvailable"]
        floor, kill_floor = self.guard_floor()
        # fake sshd: more than half of what is left above the guard floor, so it is
        # larger than the hog will ever get before the guard fires.
        hold = int((avail - floor) * 0.55 / MIB)
        write_file(RUN + "/fake-sshd.env", 'HOLD_ARGS="--hold-mb %d"\n' % hold)
        pids.update(self.start_services("fake-sshd.service"))
        time.sleep(1.5)  # let it fill its memory
        with open("/proc/%s/comm" % pids["fake-sshd.service"]) as f:
            comm = f.read().strip()
        self.check("the fake sshd's comm is sshd", comm == "sshd", comm)
        out["protected"] = {"fake-sshd.service": {"pid": pids["fake-sshd.service"], "hold_mb": hold},
                            "ssh.service": {"pid": pids["ssh.service"], "hold_mb": 60}}
        out["mem_available_before"] = meminfo()["MemAvailable"]
        out["guard_floor"], out["guard_kill_floor"] = floor, kill_floor
        oom_before = vmstat_oom_kills()
        hog = self.hog("guard", "--rate-mb 200 --max-mb 1400 --max-seconds 30")
        out["hog"] = hog
        decisions = [e for e in hog["events"] if e["type"] == "decision"]
        self.check("guard: the hog was stopped by a signal",
                   hog["killed"] and hog["exit_signal"] in (9, 15), json.dumps(
                       {k: hog[k] for k in ("result", "exit_signal", "exit_status")}))
        self.check("guard: memwatchd's guard decided it (events file)",
                   decisions and all(d["target"] == "guard" and d["pid"] == hog["pid"]
                                     for d in decisions)
                   and decisions[0]["reason"] in ("mem-available-low", "mem-available-critical"),
                   json.dumps(decisions)[:1500])
        with open("/proc/%s/status" % pids["fake-sshd.service"]) as f:
            sshd_rss = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
        out["sshd_rss"] = sshd_rss
        self.check("guard: the protected sshd was larger than the hog it spared",
                   sshd_rss > (decisions[0]["usage_bytes"] if decisions else 0),
                   "sshd %d vs hog %s" % (sshd_rss, decisions[0]["usage_bytes"] if decisions else None))
        for unit, pid in pids.items():
            alive, props = self.service_alive(unit, pid)
            self.check("guard: protected %s survived" % unit, alive, json.dumps(props))
        self.check("guard: no decision against a protected process",
                   not [e for e in read_events() if e["type"] == "decision"
                        and str(e["pid"]) in pids.values()], "")
        out["oom_kills"] = vmstat_oom_kills() - oom_before
        journal_line = journal_wait("memwatchd.service", "guard: sent SIG",
                                    since=hog["started_mono"], timeout=10)
        self.check("guard: the journal says so", journal_line is not None, str(journal_line))
        run("systemctl", "stop", "fake-sshd.service", "ssh.service", timeout=60)

    def use_config(self, text, name):
        write_file(CONFIG, text, mode=0o600)
        since = mono()
        pid = self.memwatchd("MainPID")["MainPID"]
        proc = run("systemctl", "reload", "memwatchd", timeout=60)
        entry = wait_for(lambda: next((e for e in journal("memwatchd.service", since=since)
                                       if e[2].startswith(("reloaded ", "reload failed"))), None),
                         30, interval=0.3)
        props = self.memwatchd("ActiveState", "SubState", "MainPID", "NRestarts")
        return {"name": name, "reload_rc": proc.returncode, "journal": entry and list(entry),
                "seconds": round(mono() - since, 1), "after": props,
                "same_pid": props["MainPID"] == pid}

    def scenario_unit_budget(self, out):
        """Scenario 1: a 300M budget for hog.service; the hog heads for more than the
        guest has at 200 MB/s; memwatchd stops it, not the kernel OOM killer."""
        reload = self.use_config(CONFIG_WATCH.format(limit="300M", events=EVENTS), "300M")
        out["reload"] = reload
        self.check("unit budget: config with the hog.service watch loaded",
                   reload["journal"] and "reloaded" in reload["journal"][2], json.dumps(reload))
        oom_before = vmstat_oom_kills()
        hog = self.hog("budget", "--rate-mb 200 --max-mb 1400 --max-seconds 30", limit=300 * MIB)
        out["hog"] = hog
        self.expect_stopped("unit budget", hog, 300 * MIB)
        out["oom_kills"] = vmstat_oom_kills() - oom_before

    def expect_stopped(self, what, hog, limit, signals=(15,)):
        decisions = [e for e in hog["events"] if e["type"] == "decision"]
        self.check("%s: the hog was stopped by memwatchd's signal" % what,
                   hog["killed"] and hog["exit_signal"] in signals, json.dumps(
                       {k: hog[k] for k in ("result", "exit_signal", "exit_status", "wall_s")}))
        self.check("%s: decision recorded for the hog.service cgroup at the limit" % what,
                   decisions and decisions[0]["target"] == "hog"
                   and decisions[0]["cgroup"] == "/system.slice/hog.service"
                   and decisions[0]["limit_bytes"] == limit
                   and decisions[0]["usage_bytes"] >= limit
                   and decisions[0]["reason"] == "over-limit", json.dumps(decisions)[:1500])
        line = journal_wait("memwatchd.service", "hog: sent SIG", since=hog["started_mono"],
                            timeout=10)
        self.check("%s: the journal says so" % what, line is not None, str(line))
        outcome = [e for e in hog["events"] if e["type"] == "outcome"]
        self.check("%s: outcome recorded (exited)" % what,
                   outcome and outcome[0]["exited"], json.dumps(outcome)[:800])
        self.check("%s: the hog stopped well before the guest's memory ran out" % what,
                   hog["peak_cgroup_current"] < self.mem_total * 0.75,
                   "peak %d of %d" % (hog["peak_cgroup_current"], self.mem_total))
        self.check("%s: not the kernel OOM killer" % what, hog["result"] != "oom-kill",
                   hog["result"])

    def scenario_reload(self, out):
        """Scenario 4: a broken config is refused and the old one keeps working;
        a valid new one applies its new limit."""
        restarts = self.memwatchd("NRestarts")["NRestarts"]
        write_file(RUN + "/broken.toml", CONFIG_BROKEN, mode=0o600)
        cc = run("memwatchd", "check-config", RUN + "/broken.toml")
        out["check_config_broken"] = {"rc": cc.returncode, "stderr": cc.stderr.strip()}
        self.check("reload: check-config rejects the broken file", cc.returncode == 2,
                   json.dumps(out["check_config_broken"]))
        broken = self.use_config(CONFIG_BROKEN, "broken")
        out["broken"] = broken
        entry = broken["journal"]
        self.check("reload: broken config logged at priority err and refused",
                   entry and entry[1] == 3
                   and "reload failed, keeping the running configuration" in entry[2],
                   json.dumps(entry))
        self.check("reload: still running, same process, no restart",
                   broken["after"]["ActiveState"] == "active" and broken["same_pid"]
                   and broken["after"]["NRestarts"] == restarts, json.dumps(broken["after"]))
        hog = self.hog("old-limit", "--rate-mb 200 --max-mb 450 --max-seconds 20", limit=300 * MIB)
        out["hog_old_limit"] = hog
        self.expect_stopped("reload (old 300M limit still enforced)", hog, 300 * MIB)
        control = self.hog("under-old-limit", "--rate-mb 200 --max-mb 220 --max-seconds 4")
        out["hog_under_old_limit"] = control
        self.check("reload: a 220M hog is left alone under the old 300M limit",
                   not control["killed"] and control["exit_status"] == 0
                   and not [e for e in control["events"] if e["type"] == "decision"],
                   json.dumps({k: control[k] for k in ("result", "exit_status", "events")}))
        good = self.use_config(CONFIG_WATCH.format(limit="150M", events=EVENTS), "150M")
        out["valid"] = good
        self.check("reload: valid config applied (journal), same process",
                   good["journal"] and "reloaded" in good["journal"][2] and good["same_pid"],
                   json.dumps(good))
        hog = self.hog("new-limit", "--rate-mb 200 --max-mb 220 --max-seconds 20", limit=150 * MIB)
        out["hog_new_limit"] = hog
        self.expect_stopped("reload (new 150M limit)", hog, 150 * MIB)

    def scenario_watchdog(self, out):
        """Scenario 3: a stopped (hung) memwatchd is killed by systemd's watchdog and
        restarted; the new instance is ready and protecting."""
        before = self.memwatchd("MainPID", "NRestarts", "WatchdogUSec")
        out["before"] = before
        old_pid = before["MainPID"]
        os.kill(int(old_pid), signal.SIGSTOP)
        stopped_at = mono()
        out["sigstop_mono"] = round(stopped_at, 3)
        self.mark("SIGSTOP memwatchd pid %s" % old_pid)

        def back():
            p = self.memwatchd("MainPID", "NRestarts", "ActiveState", "SubState")
            if (p["MainPID"] not in ("0", old_pid) and int(p["NRestarts"]) > int(before["NRestarts"])
                    and p["ActiveState"] == "active" and p["SubState"] == "running"):
                return p
            return None
        after = wait_for(back, 150, interval=0.5)   # WatchdogSec=30s, then a restart under TCG
        out["after"] = after
        out["sigstop_to_running_s"] = round(mono() - stopped_at, 1)
        self.check("watchdog: restarted, active/running again with a new pid",
                   after is not None, json.dumps(after or self.memwatchd(
                       "MainPID", "NRestarts", "ActiveState", "SubState", "Result")))
        lines = journal("memwatchd.service", since=stopped_at)
        timeout = next((l for l in lines if "Watchdog timeout" in l[2]), None)
        started = next((l for l in lines if "Started memwatchd" in l[2]), None)
        out["journal"] = [list(l) for l in lines[:40]]
        self.check("watchdog: systemd reports the watchdog timeout", timeout is not None,
                   json.dumps(out["journal"])[:1500])
        if timeout:
            out["sigstop_to_watchdog_timeout_s"] = round(timeout[0] - stopped_at, 2)
        if timeout and started:
            out["watchdog_timeout_to_ready_s"] = round(started[0] - timeout[0], 2)
        out["faulthandler_traceback"] = any("Current thread" in l[2] or "File \"" in l[2]
                                            for l in lines)
        if after is None:
            return
        # The new instance protects: this hog ignores SIGTERM, so it also shows the
        # escalation to SIGKILL (at 1.25x the limit, or when the 2 s grace ends).
        time.sleep(1.0)
        hog = self.hog("after-restart", "--rate-mb 200 --max-mb 600 --max-seconds 20 --ignore-term",
                       limit=150 * MIB)
        out["hog"] = hog
        self.expect_stopped("watchdog (new instance, SIGTERM ignored)", hog, 150 * MIB,
                            signals=(9,))
        signals = [e["signal"] for e in hog["events"] if e["type"] == "decision"]
        self.check("watchdog: escalated SIGTERM -> SIGKILL", signals[:2] == ["SIGTERM", "SIGKILL"],
                   json.dumps(signals))

    def scenario_adversarial(self, out):
        """Issue 11: while the unprivileged user nobody runs a forged "sshd" (the largest
        process), a 64 KiB command line on which the cmdline regex backtracks, and a FIFO
        where a watched pidfile should be, memwatchd stops nobody's hog whose main thread
        exited in its usual time, the guard stops the forged sshd (not protected: its name
        is all it has), and the watchdog never fires."""
        before = self.memwatchd("MainPID", "NRestarts")
        since = mono()
        home = RUN + "/nobody"
        os.makedirs(home, exist_ok=True)
        os.chmod(home, 0o777)
        for path in (LIB, LIB + "/hog.py"):
            os.chmod(path, 0o755)
        fifo = home + "/fifo.pid"
        if not os.path.exists(fifo):
            os.mkfifo(fifo)
        os.chown(fifo, 65534, 65534)
        limit = 150 * MIB
        reload = self.use_config(CONFIG_ADVERSARIAL.format(events=EVENTS, fifo=fifo,
                                                           limit="150M"), "adversarial")
        out["reload"] = reload
        self.check("adversarial: config loaded", reload["journal"] and "reloaded" in
                   reload["journal"][2], json.dumps(reload))

        def as_nobody():
            os.setgid(65534)
            os.setuid(65534)
        crafted = ("train --epochs " * 4400)[:65536]   # backtracks: no "gpu" anywhere
        long_cmdline = subprocess.Popen(["/bin/sh", "-c", "sleep 120; :", "x", crafted],
                                        preexec_fn=as_nobody)
        n_events = len(read_events())
        log = home + "/leader.log"
        leader = subprocess.Popen(
            ["/usr/bin/python3", LIB + "/hog.py", "--leader-exits", "--delay", "3",
             "--rate-mb", "200", "--max-mb", "500", "--max-seconds", "20", "--log", log,
             "--label", "train --epochs 3 --gpu"], preexec_fn=as_nobody)
        try:
            rc = leader.wait(timeout=40)
        except subprocess.TimeoutExpired:
            leader.kill()
            rc = leader.wait()
        exited_mono = mono()
        time.sleep(1.0)   # the outcome record follows the exit
        events = read_events()[n_events:]
        steps = []
        with open(log) as f:
            for line in f:
                tag, t, total = line.split()[:3]
                steps.append((tag, float(t), int(total)))
        decisions = [e for e in events if e["type"] == "decision" and e["pid"] == leader.pid]
        grown = [s for s in steps if s[0] == "step"]
        crossed = next((s for s in grown if s[2] >= limit), grown[-1] if grown else None)
        hog = {"label": "leader-exited", "pid": leader.pid, "rc": rc, "limit": limit,
               "steps": len(grown), "peak_allocated": max((s[2] for s in grown), default=0),
               "events": events, "heartbeat": Heartbeat.window(since, exited_mono)}
        if decisions and crossed:
            first = decisions[0]
            hog["usage_at_decision"] = first["usage_bytes"]
            hog["cross_to_decision_s"] = round(wall_to_mono(first["time"]) - crossed[1], 3)
            hog["cross_to_exit_s"] = round(exited_mono - crossed[1], 3)
            outcome = next((e for e in events if e["type"] == "outcome"
                            and e["id"] == first["id"]), None)
            hog["seconds_to_exit"] = outcome and outcome["seconds_to_exit"]
        out["leader_hog"] = hog
        self.check("adversarial: the hog whose main thread exited was stopped by SIGTERM",
                   rc == -signal.SIGTERM, "rc %s" % rc)
        self.check("adversarial: by the cmdline watch, at its limit",
                   decisions and decisions[0]["target"] == "train"
                   and decisions[0]["usage_bytes"] >= limit
                   and decisions[0]["cmdline"].endswith("train --epochs 3 --gpu"),
                   json.dumps(decisions)[:1500])
        self.check("adversarial: the 64 KiB command line matched nothing and lives",
                   long_cmdline.poll() is None
                   and not [e for e in events if e.get("pid") == long_cmdline.pid], "")

        # The guard: nobody's "sshd" is the largest process when MemAvailable runs low.
        floor, _ = self.guard_floor()
        avail = meminfo()["MemAvailable"]
        hold = int((avail - floor) * 0.65 / MIB)
        forged = subprocess.Popen(["/usr/bin/python3", LIB + "/hog.py", "--comm", "sshd",
                                   "--hold-mb", str(hold), "--max-seconds", "60"],
                                  preexec_fn=as_nobody)

        def rss(pid):
            with open("/proc/%d/status" % pid) as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
        wait_for(lambda: rss(forged.pid) > hold * MIB * 0.95, 20)
        out["forged_sshd"] = {"pid": forged.pid, "hold_mb": hold, "rss": rss(forged.pid)}
        # hog.service grows until MemAvailable crosses the guard's floor (and fits once the
        # forged sshd is gone); it is stopped as soon as the guard has acted.
        cap = int((avail - floor) / MIB) - hold + 30
        write_file(RUN + "/hog.env", 'HOG_ARGS="--rate-mb 200 --max-mb %d --max-seconds 40"\n'
                   % cap)
        run("systemctl", "reset-failed", "hog.service")
        guard_started = mono()
        run("systemctl", "start", "hog.service", check=True)
        hog_pid = int(wait_for(lambda: show("hog.service", "MainPID")["MainPID"] not in ("", "0")
                               and show("hog.service", "MainPID")["MainPID"], 10) or 0)
        try:
            forged_rc = forged.wait(timeout=40)
        except subprocess.TimeoutExpired:
            forged_rc = None
        guard_acted = mono()
        time.sleep(0.5)
        hog_state = show("hog.service", "ActiveState", "MainPID")
        run("systemctl", "stop", "hog.service")
        guard = [e for e in read_events()[n_events:] if e["type"] == "decision"
                 and e["target"] == "guard"]
        out["guard"] = {"decisions": guard, "forged_rc": forged_rc, "hog_pid": hog_pid,
                        "hog_after": hog_state, "cap_mb": cap,
                        "seconds": round(guard_acted - guard_started, 1),
                        "heartbeat": Heartbeat.window(guard_started, guard_acted)}
        self.check("adversarial: the guard stopped the forged sshd (the largest, unprotected)",
                   guard and guard[0]["pid"] == forged.pid and guard[0]["comm"] == "sshd"
                   and forged_rc in (-signal.SIGTERM, -signal.SIGKILL),
                   "rc %s, %s" % (forged_rc, json.dumps(guard)[:1200]))
        self.check("adversarial: and left the hog.service hog alone",
                   hog_state["ActiveState"] == "active" and hog_state["MainPID"] == str(hog_pid)
                   and not [d for d in guard if d["pid"] == hog_pid], json.dumps(hog_state))
        for p in (long_cmdline, forged):
            if p.poll() is None:
                p.kill()
            p.wait()

        after = self.memwatchd("MainPID", "NRestarts", "ActiveState")
        lines = journal("memwatchd.service", since=since)
        out["journal"] = [list(l) for l in lines[:60]]
        self.check("adversarial: memwatchd never restarted, the watchdog never fired",
                   after["MainPID"] == before["MainPID"] and after["NRestarts"] == before["NRestarts"]
                   and not [l for l in lines if "Watchdog timeout" in l[2]],
                   json.dumps(after))
        said = [l[2] for l in lines if "fifo.pid" in l[2]]
        self.check("adversarial: the FIFO pidfile is refused, said once",
                   len(said) == 1 and "not a regular file" in said[0], json.dumps(said))
        slow = [l[2] for l in lines if "cmdline regex took over" in l[2]]
        self.check("adversarial: the backtracking line is said once, not matched",
                   len(slow) == 1 and "65536-character" in slow[0], json.dumps(slow))

    # ------------------------------------------------------------ the whole run

    def global_checks(self, out, bystanders, oom_before):
        for unit, pid in bystanders.items():
            alive, props = self.service_alive(unit, pid)
            self.check("%s survived every scenario" % unit, alive, json.dumps(props))
        kernel = journal(kernel=True)
        oom_lines = [m for _, _, m in kernel
                     if any(w in m.lower() for w in ("out of memory", "oom-kill", "oom_reaper",
                                                     "invoked oom-killer"))]
        out["kernel_oom_lines"] = oom_lines
        out["oom_kills"] = vmstat_oom_kills() - oom_before
        self.check("the kernel OOM killer never fired (vmstat oom_kill, kernel log)",
                   out["oom_kills"] == 0 and not oom_lines, json.dumps(oom_lines[:5]))
        ticks = Heartbeat.ticks()
        gaps = sorted((t[1] for t in ticks), reverse=True)
        out["heartbeat_run"] = {"ticks": len(ticks), "max_gap_s": round(gaps[0], 3) if gaps else None,
                            "gaps_over_0.5s": sum(1 for g in gaps if g > 0.5)}
        hogs = [h for sc in self.results["scenarios"].values() for h in sc.values()
                if isinstance(h, dict) and "label" in h]
        out["heartbeat_run"]["max_gap_during_hogs_s"] = max(
            (h["heartbeat"]["max_gap_s"] or 0 for h in hogs), default=None)
        self.check("heartbeat never paused over 1 s while a hog ran",
                   hogs and out["heartbeat_run"]["max_gap_during_hogs_s"] <= 1.0,
                   json.dumps({h["label"]: h["heartbeat"] for h in hogs}))
        self.check("heartbeat never paused over 2 s in the whole run", gaps and gaps[0] <= 2.0,
                   json.dumps(out["heartbeat_run"]))

    def protected(self):
        facts = self.results["facts"]
        facts["mem_total"] = self.mem_total
        facts["kernel"] = os.uname().release
        facts["systemd"] = run("systemctl", "--version").stdout.splitlines()[0]
        oom_before = vmstat_oom_kills()
        os.makedirs(RUN, exist_ok=True)
        self.scenario("hardened_unit", self.install)
        bystanders = self.start_services("heartbeat.service", "bystander.service")
        time.sleep(1.0)
        facts["mem_available_idle"] = meminfo()["MemAvailable"]
        self.scenario("host_guard", self.scenario_guard)
        self.scenario("unit_budget", self.scenario_unit_budget)
        self.scenario("reload", self.scenario_reload)
        self.scenario("watchdog", self.scenario_watchdog)
        self.scenario("adversarial", self.scenario_adversarial)
        self.scenario("hardened_unit_journal",
                      self.memwatchd_journal_problems)
        self.scenario("global", lambda out: self.global_checks(out, bystanders, oom_before))

    def baseline(self):
        """Scenario 6: no memwatchd. The same hog; how long does the guest stall, how does
        it end? (The kernel OOM killer is expected to end it, late.)"""
        facts = self.results["facts"]
        facts["mem_total"] = self.mem_total
        facts["kernel"] = os.uname().release
        os.makedirs(RUN, exist_ok=True)
        bystanders = self.start_services("heartbeat.service", "bystander.service")
        time.sleep(1.0)
        facts["mem_available_idle"] = meminfo()["MemAvailable"]

        def go(out):
            oom_before = vmstat_oom_kills()
            out["hog"] = self.hog("baseline", "--rate-mb 200 --max-mb 1400 --max-seconds 150",
                                  timeout=240)
            out["oom_kills"] = vmstat_oom_kills() - oom_before
            out["kernel_oom_lines"] = [m for _, _, m in journal(kernel=True)
                                       if "oom" in m.lower() or "out of memory" in m.lower()][:20]
            for unit, pid in bystanders.items():
                out["%s_survived" % unit] = self.service_alive(unit, pid)[0]
        self.scenario("baseline", go)


def main(driver_class=None):
    """driver.py MODE RESULTS.json; driver_class: a Driver subclass (containers.py's)."""
    mode, results_path = sys.argv[1], sys.argv[2]
    driver = (driver_class or Driver)(results_path, mode)
    try:
        getattr(driver, mode)()
    except Exception:
        driver.results["errors"].append(traceback.format_exc())
        print(traceback.format_exc(), file=sys.stderr)
    driver.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
