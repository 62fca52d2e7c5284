#!/usr/bin/python3
"""Guest side: issue 19's race, under one guardian per boot.

    race.py GUARDIAN RESULTS.json [SCENARIO,...]

GUARDIAN is none, earlyoom (Debian's package, its shipped /etc/default/earlyoom),
oomd (systemd-oomd, configured as systemd-oomd.service(8) and
systemd.resource-control(5) recommend, see OOMD_DROPINS) or memwatchd (installed
by `memwatchd install-units`, its shipped config: the host guard alone).

Every scenario runs with heartbeat.service (a stamp every 100 ms), an unrelated
bystander.service, and a login probe run by this driver: every 2 s a fresh
python3 that imports a few standard modules and exits, timed. The workloads
(work.py, hog.py) are transient units (systemd-run --remain-after-exit, so how
each ended stays readable), all capped in bytes and in seconds. Recorded per
scenario: the longest heartbeat pause, the worst login probe, the stall (first
pause over 0.5 s to the last one), how every unit ended (killed by a signal, or
ran out its time), kernel OOM kills, the bystander alive; under memwatchd also its
decision records (when, why, the victim's size). Then, under memwatchd, its variants
(VARIANTS: a scenario again with [guard] keys added, e.g. predict). Standard library only.

"trace_all" in the scenario list (on request, memwatchd only): the daemon traces the whole
boot ([daemon] trace set once, before the first scenario, so the plain runs run on one
daemon as they do without it), and every scenario is replayed from its span, the ring
kept beside RESULTS.json: to see tick by tick what the guard saw in a full boot.
"""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from driver import meminfo, vmstat_oom_kills as oom_kills   # the same directory in the guest

LIB = "/usr/local/lib/mwtest"
RUN = "/run/mwtest"
HEARTBEAT_LOG = RUN + "/heartbeat.log"
MIB = 1 << 20
PROBE = "import json, decimal, email.parser, http.client, argparse, logging, csv, sqlite3"
SWAPFILE = "/swapfile"
SLOW_SWAP = "/dev/vdb"   # the host's race_lib attaches it: half the RAM, throttled by qemu
DATA_FILE = "/var/tmp/race-working-set"

# systemd-oomd as its man pages recommend: ManagedOOMSwap=kill on the root slice
# (oomd then kills the largest swap user when swap use passes SwapUsedLimit, 90%),
# ManagedOOMMemoryPressure=kill on the slice the services run in (oomd kills the
# descendant cgroup with the most reclaim when its pressure stays over
# DefaultMemoryPressureLimit, 60%, for DefaultMemoryPressureDurationSec, 30 s).
# oomd.conf is left at Debian's defaults.
OOMD_DROPINS = {
    "/etc/systemd/system/-.slice.d/oomd.conf": "[Slice]\nManagedOOMSwap=kill\n",
    "/etc/systemd/system/system.slice.d/oomd.conf": "[Slice]\nManagedOOMMemoryPressure=kill\n",
}


MEMWATCHD_TRACE = "/var/lib/memwatchd/trace"   # a variant's trace ring ([daemon] trace)
ON_REQUEST = ("leak_slowswap",)   # scenarios run only when named (MEMWATCHD_VM_RACE_SCENARIOS)
TRACE_ALL = "trace_all"


# memwatchd variants (issue 15): a scenario run again, under memwatchd only, with keys
# added to the [guard] table (or the table named third) of its installed config for that
# run (restored after): name -> (the scenario it repeats, the TOML lines[, table]). Run
# after every plain scenario, so those run exactly as before. A name "scenario#N" (for
# MEMWATCHD_VM_RACE_SCENARIOS or --scenarios) runs a scenario or a variant once more, for
# medians.
VARIANTS = {
    "leak_swap_predict": ("leak_swap", 'predict = "30s"'),
    # on request only (not in DEFAULT_VARIANTS): the headroom trigger alone, without and
    # with predict, pressure off: what prediction adds where the stall share is not measured
    "leak_swap_nopsi": ("leak_swap", "psi_full = 0"),
    "leak_swap_predict_nopsi": ("leak_swap", 'predict = "30s"\npsi_full = 0'),
    # on request: the guard (and so the trend) counting MemAvailable only, without and with
    # predict: what the host trend did before it counted swap
    "leak_swap_noswap": ("leak_swap", "count_swap = false"),
    "leak_swap_predict_noswap": ("leak_swap", 'predict = "30s"\ncount_swap = false'),
    # the benign control with predict: cold pages going to swap (still free) are not a leak
    "benign_cold_predict": ("benign_cold", 'predict = "30s"'),
    # on request: the same counting MemAvailable only (what the host trend did before)
    "benign_cold_predict_noswap": ("benign_cold", 'predict = "30s"\ncount_swap = false'),
    # on request: the cold-page control with the pressure trigger off (the whole run's
    # stall and page rates, which a kill on pressure cuts short)
    "benign_cold_nopsi": ("benign_cold", "psi_full = 0"),
    # issue 19 in traces: the hot leak with the daemon's trace on, then `memwatchd replay`
    # of the scenario's span with the config it ran: the replayed guard must take the
    # decisions the live one took (its pressure triggers weigh PSI totals and page faults,
    # which the trace must hold, and swap switched on after the daemon started); the
    # cold-page control and the zram leak the same way on request
    "leak_swap_traced": ("leak_swap", 'trace = "%s"' % MEMWATCHD_TRACE, "daemon"),
    "benign_cold_traced": ("benign_cold", 'trace = "%s"' % MEMWATCHD_TRACE, "daemon"),
    "leak_zram_traced": ("leak_zram", 'trace = "%s"' % MEMWATCHD_TRACE, "daemon"),
}
DEFAULT_VARIANTS = ("leak_swap_predict", "benign_cold_predict",   # in every memwatchd boot
                    "leak_swap_traced")                            # (CI too)
MEMWATCHD_CONFIG = "/etc/memwatchd/memwatchd.toml"
MEMWATCHD_EVENTS = "/var/lib/memwatchd/events.jsonl"


def mono():
    return time.monotonic()


def run(*args, timeout=120):
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def show(unit, *props):
    out = run("systemctl", "show", unit, *("-p" + p for p in props)).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {p: values.get(p, "") for p in props}


# ------------------------------------------------------------------ swap

def swap_off():
    run("swapoff", "-a")
    if os.path.exists("/sys/block/zram0"):
        run("zramctl", "--reset", "/dev/zram0")


def swap_file(size):
    """The swap file, written in full once per boot and kept: its blocks are real data on
    the guest's disk before any scenario swaps to them. A fallocated file's blocks are
    unwritten, and their first writes go through the qemu snapshot overlay's cluster
    allocation on the host (measured: swap-outs fell to 1-3 MiB/s, and the guest froze
    with PSI memory at 2-7%, in the first swap scenario of every boot only)."""
    if not os.path.exists(SWAPFILE) or os.path.getsize(SWAPFILE) != size // MIB * MIB:
        run("dd", "if=/dev/zero", "of=" + SWAPFILE, "bs=1M", "count=%d" % (size // MIB),
            "conv=fsync", timeout=300)
    os.chmod(SWAPFILE, 0o600)
    run("mkswap", SWAPFILE)
    return run("swapon", SWAPFILE).returncode == 0


def swap_slow():
    """The whole second disk as swap: qemu throttles it (race_lib.SLOW_SWAP_BPS), as a thin
    or network disk, or a nested VM's, is slow. Not written first: its blocks are the
    host's sparse file, outside the snapshot overlay."""
    if not os.path.exists(SLOW_SWAP):
        return False
    run("mkswap", SLOW_SWAP)
    return run("swapon", SLOW_SWAP).returncode == 0


def swap_zram(size):
    run("modprobe", "zram")
    dev = run("zramctl", "--find", "--size", str(size), "--algorithm", "lz4").stdout.strip() \
        or run("zramctl", "--find", "--size", str(size)).stdout.strip()
    if not dev:
        return False
    run("mkswap", dev)
    return run("swapon", "-p", "100", dev).returncode == 0


# ------------------------------------------------------------ guardians

def start_guardian(name):
    if name == "earlyoom":
        return run("systemctl", "start", "earlyoom.service").returncode == 0
    if name == "oomd":
        for path, text in OOMD_DROPINS.items():
            write(path, text)
        run("systemctl", "daemon-reload")
        return run("systemctl", "start", "systemd-oomd.service").returncode == 0
    if name == "memwatchd":
        if run("memwatchd", "install-units", timeout=300).returncode != 0:
            return False
        return run("systemctl", "enable", "--now", "memwatchd", timeout=300).returncode == 0
    return name == "none"


def guardian_log(name, since):
    unit = {"earlyoom": "earlyoom.service", "oomd": "systemd-oomd.service",
            "memwatchd": "memwatchd.service"}.get(name)
    if unit is None:
        return []
    out = run("journalctl", "-b", "--no-pager", "-o", "short-monotonic", "-u", unit).stdout
    lines = []
    for line in out.splitlines():
        try:
            t = float(line[1:line.index("]")])
        except ValueError:
            continue
        if t >= since:
            lines.append(line[:300])
    return lines[-30:]


def memwatchd_config_keys(lines, table="guard"):
    """Add ``lines`` to memwatchd's [guard] table, or ``table`` (none: restore the installed
    config) and restart it (Type=notify: back when it says READY)."""
    saved = getattr(memwatchd_config_keys, "saved", None)
    if saved is None:
        with open(MEMWATCHD_CONFIG) as f:
            saved = memwatchd_config_keys.saved = f.read()
    head = "[%s]\n" % table
    text = saved.replace(head, head + lines + "\n", 1) if lines else saved
    if lines and text == saved:
        raise RuntimeError("no %s table in %s" % (head.strip(), MEMWATCHD_CONFIG))
    write(MEMWATCHD_CONFIG, text)
    r = run("systemctl", "restart", "memwatchd.service", timeout=300)
    if r.returncode != 0 or show("memwatchd.service", "ActiveState")["ActiveState"] != "active":
        raise RuntimeError("memwatchd did not restart with %r: %s" % (lines, r.stderr.strip()))


def memwatchd_replay(span, keep):
    """`memwatchd replay` of the daemon's own trace over a scenario's span (UTC, a second
    either side), with the config it ran: its summary and its decisions. The ring is
    copied to ``keep`` (the host keeps it with --keep)."""
    shutil.copytree(MEMWATCHD_TRACE, keep, dirs_exist_ok=True)
    def iso(wall):
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + ".%03d" % (wall % 1 * 1000)
    r = run("memwatchd", "replay", MEMWATCHD_TRACE, "--json", "--config", MEMWATCHD_CONFIG,
            "--from", iso(span[0] - 1), "--to", iso(span[1] + 1), timeout=600)
    out = {"rc": r.returncode, "stderr": r.stderr[-2000:], "summary": None, "decisions": []}
    for line in r.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("type") == "summary":
            out["summary"] = {k: record.get(k) for k in (
                "decisions", "reproduced", "live_not_taken", "new", "notes", "damage", "seconds")}
        elif record.get("type") == "replay":
            out["decisions"].append({k: record.get(k) for k in (
                "t", "watch", "target", "reason", "signal", "live", "diverged")})
    return out


def events_size():
    try:
        return os.path.getsize(MEMWATCHD_EVENTS)
    except OSError:
        return 0


def memwatchd_actions(offset, start_wall):
    """memwatchd's decision records written since ``offset``: when (s after the scenario
    started), what, why, the victim's usage, MemAvailable and the predict estimate."""
    import calendar
    out = []
    try:
        with open(MEMWATCHD_EVENTS, "rb") as f:
            f.seek(offset)
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            r = json.loads(line)
            if r.get("type") != "decision":
                continue
            stamp = r["time"]
            wall = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + float(stamp[19:-1] or 0)
        except (ValueError, KeyError, TypeError):
            continue
        host = r.get("host") or {}
        out.append({"after_s": round(wall - start_wall, 2), "action": r.get("action"),
                    "reason": r.get("reason"), "comm": r.get("comm"), "target": r.get("target"),
                    "usage_mib": (r.get("usage_bytes") or 0) >> 20,
                    "mem_available_mib": (host.get("mem_available_bytes") or 0) >> 20,
                    "predict": r.get("predict")})
    return out


# ------------------------------------------------------------- probes

class LoginProbe(threading.Thread):
    """Every 2 s: exec python3, import a few modules, exit; the wall time of each."""

    def __init__(self):
        super().__init__(daemon=True)
        self.times = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            t = mono()
            try:
                subprocess.run(["/usr/bin/python3", "-c", PROBE], timeout=120,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                pass
            self.times.append((t, mono() - t))
            self.stop.wait(max(0.0, t + 2.0 - mono()))


VMSTAT_KEYS = ("pswpin", "pswpout", "pgmajfault", "pgsteal_kswapd", "pgsteal_direct",
               "workingset_refault_anon", "workingset_refault_file", "workingset_activate_anon",
               "workingset_activate_file", "workingset_restore_anon", "workingset_restore_file")
RACE_UNITS = ("race-hog", "race-job", "race-reader")
UNIT_KEYS = ("pgmajfault", "workingset_refault_anon", "workingset_refault_file", "anon")
VMSTAT_KEYS += tuple(u + "." + k for u in RACE_UNITS for k in UNIT_KEYS + ("swap",))
# whose tasks stall: each unit's memory.pressure totals (µs; a rate of 1e4/s is 1%), the
# victim's beside the bystanders' (the heartbeat, the login probe's vm-runner)
PSI_UNITS = RACE_UNITS + ("heartbeat", "bystander", "vm-runner", "memwatchd")
VMSTAT_KEYS += tuple(u + "." + k for u in PSI_UNITS for k in ("psi_some", "psi_full"))
# the host's I/O pressure (/proc/pressure/io, µs): a swap-in of a page the kernel did not
# know to be in the working set is waited for as I/O, not as a memory stall (kernel 6.1)
VMSTAT_KEYS += ("io.psi_some", "io.psi_full")


def unit_cgroup(unit):
    return "/sys/fs/cgroup/system.slice/%s.service/" % unit


def vmstat():
    """The /proc/vmstat counters of VMSTAT_KEYS (pages, cumulative; 0 where missing), and
    the race units' own (memory.stat of their cgroups, "race-hog.pgmajfault"; "anon" and
    "swap", memory.swap.current, in bytes: whether the hog grows in RAM or into swap)."""
    out = dict.fromkeys(VMSTAT_KEYS, 0)
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key in out:
                    out[key] = int(value)
    except (OSError, ValueError):
        pass
    for unit in RACE_UNITS:   # whose pages come back: each race unit's own faults
        cgroup = unit_cgroup(unit)
        try:
            with open(cgroup + "memory.stat") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if unit + "." + key in out:
                        out[unit + "." + key] = int(value)
        except (OSError, ValueError):
            pass
        try:
            with open(cgroup + "memory.swap.current") as f:
                out[unit + ".swap"] = int(f.read())
        except (OSError, ValueError):
            pass
    for unit, path in [(u, unit_cgroup(u) + "memory.pressure") for u in PSI_UNITS] + \
            [("io", "/proc/pressure/io")]:
        try:
            with open(path) as f:
                for line in f:
                    kind = line.split(" ", 1)[0]
                    out[unit + ".psi_" + kind] = int(line.rsplit("total=", 1)[1])
        except (OSError, ValueError, IndexError):
            pass
    return [out[k] for k in VMSTAT_KEYS]


class PressureLog(threading.Thread):
    """/proc/pressure/memory totals and the reclaim/refault counters of /proc/vmstat
    every 0.25 s: the stall share over 2 s windows (what the guard's psi_window
    measures by default) and the page rates beside it, for choosing its defaults."""

    def __init__(self):
        super().__init__(daemon=True)
        self.rows = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with open("/proc/pressure/memory") as f:
                    totals = [int(line.rsplit("total=", 1)[1]) for line in f]
            except (OSError, ValueError, IndexError):
                return
            self.rows.append((mono(), totals[0], totals[1] if len(totals) > 1 else 0, vmstat()))
            self.stop.wait(0.25)

    def shares(self, window=2.0):
        """[(t, some %, full %)] over the window ending at each row."""
        return [row[:3] for row in self.windows(window)]

    def windows(self, window=2.0):
        """[(t, some %, full %, {vmstat key: pages/s})] over the window ending at each row
        (longer where the logger itself was held up: the rates then span the gap)."""
        out, j = [], 0
        for t, some, full, vm in self.rows:
            while self.rows[j + 1][0] <= t - window:
                j += 1
            t0, some0, full0, vm0 = self.rows[j]
            if t - t0 >= window * 0.9:
                out.append((round(t, 2), round((some - some0) / (t - t0) / 1e4, 1),
                            round((full - full0) / (t - t0) / 1e4, 1),
                            {k: round((b - a) / (t - t0)) for k, a, b in zip(VMSTAT_KEYS, vm0, vm)}))
        return out


def heartbeat(start, end):
    try:
        with open(HEARTBEAT_LOG) as f:
            rows = [line.split() for line in f]
    except FileNotFoundError:
        return {"max_gap_s": None}
    ticks = [(float(r[0]), float(r[1])) for r in rows if len(r) == 3]
    ticks = [t for t in ticks if start <= t[0] <= end + 2.0]
    if not ticks:
        return {"max_gap_s": None}
    long = [t for t in ticks if t[1] > 0.5]
    return {"max_gap_s": round(max(t[1] for t in ticks), 3),
            "pauses_over_0_5": len(long),
            # from the start of the first pause over 0.5 s to the end of the last one
            "stall_s": round(long[-1][0] - (long[0][0] - long[0][1]), 2) if long else 0.0}


# ------------------------------------------------------------ scenarios

def scenarios(mem_total, avail):
    """name -> (swap kind, [(unit, argv)], the unit that is the right victim or None)."""
    py, work, hog = "/usr/bin/python3", LIB + "/work.py", LIB + "/hog.py"
    ram_mb = mem_total // MIB
    big = int(ram_mb * 1.3)   # every hog heads well past RAM (+ swap), but caps
    return {
        "fast_hog": ("none", [("race-hog", [py, hog, "--rate-mb", "200", "--max-mb", str(big),
                                            "--max-seconds", "40"])], "race-hog"),
        "leak_swap": ("file", [("race-hog", [py, work, "leak", "--rate-mb", "25", "--max-mb",
                                             str(big), "--max-seconds", "75"])], "race-hog"),
        "leak_zram": ("zram", [("race-hog", [py, work, "leak", "--rate-mb", "25", "--max-mb",
                                             str(big), "--max-seconds", "75"])], "race-hog"),
        # the same leak on a swap device that is slow (a second disk, throttled by qemu):
        # the host freezes while PSI memory stays low (waiting for a swap-in of a page the
        # kernel did not know to be in the working set is I/O wait) and free swap remains.
        # On request (ON_REQUEST): no guardian stops it in time yet
        "leak_slowswap": ("slow", [("race-hog", [py, work, "leak", "--rate-mb", "25", "--max-mb",
                                                 str(big), "--max-seconds", "75"])], "race-hog"),
        "cache_thrash": ("none", [
            ("race-reader", [py, work, "reread", "--file", DATA_FILE, "--max-seconds", "80"]),
            ("race-hog", [py, hog, "--rate-mb", "15", "--step-mb", "2", "--max-mb", str(big),
                          "--max-seconds", "75"])], "race-hog"),
        "benign_steady": ("none", [("race-job", [py, work, "hold", "--mb",
                                                 str(int(avail * 0.85 / MIB)), "--max-seconds", "25"])],
                          None),
        # 0.9 of RAM: past what is available, so the cold pages go to swap, with swap still
        # free. At 1.1 of RAM (measured) this TCG guest stalls as badly as a leak: full PSI
        # 30-80% for 25 s, a 2.7 s heartbeat pause and 20 s logins with no guardian at all.
        "benign_cold": ("file", [("race-job", [py, work, "cold", "--rate-mb", "30", "--max-mb",
                                               str(int(ram_mb * 0.9)), "--max-seconds", "45"])],
                        None),
    }


def run_scenario(name, spec, guardian):
    swap, units, right = spec
    swap_off()
    if swap == "file":
        ok = swap_file(meminfo()["MemTotal"] // 2)
    elif swap == "zram":
        ok = swap_zram(meminfo()["MemTotal"] // 2)
    elif swap == "slow":
        ok = swap_slow()
    else:
        ok = True
    if name == "cache_thrash" and not os.path.exists(DATA_FILE):
        # the reader's working set: 40% of RAM, from /dev/urandom (no zero-page tricks)
        run("dd", "if=/dev/urandom", "of=" + DATA_FILE, "bs=1M",
            "count=%d" % (meminfo()["MemTotal"] * 4 // 10 // MIB), timeout=300)
    run("sync")
    write("/proc/sys/vm/drop_caches", "3")
    time.sleep(2)
    out = {"swap": swap, "swap_ok": ok, "swap_total": meminfo()["SwapTotal"]}
    oom_before = oom_kills()
    idle = []
    for _ in range(2):   # what a login costs here before the scenario (TCG: seconds)
        t = mono()
        run("/usr/bin/python3", "-c", PROBE)
        idle.append(mono() - t)
    out["login_idle_s"] = round(min(idle), 2)
    probe, pressure = LoginProbe(), PressureLog()
    events_at = events_size() if guardian == "memwatchd" else 0
    probe.start()
    pressure.start()
    start, start_wall = mono(), time.time()
    for unit, argv in units:
        run("systemctl", "reset-failed", unit + ".service")
        # no --collect: it unloads a unit that *failed*, and a SIGKILL is a failure (a
        # SIGTERM is a clean exit for systemd), so a SIGKILLed hog read back as "not killed"
        # (measured: psi-full-critical kills); the unit is stopped and reset below
        r = run("systemd-run", "--unit", unit, "--remain-after-exit",
                "-p", "MemorySwapMax=infinity", *argv)
        out.setdefault("start_errors", []).append(r.stderr.strip()) if r.returncode else None
    cap = max(float(a[a.index("--max-seconds") + 1]) for _, a in units) + 15
    deadline = start + cap

    def running(unit):
        return show(unit + ".service", "SubState")["SubState"] == "running"
    while mono() < deadline and any(running(u) for u, _ in units):
        time.sleep(0.5)
    end = mono()
    probe.stop.set()
    pressure.stop.set()
    probe.join(130)
    shares = pressure.shares()
    out["psi_max_some_2s"] = max((x[1] for x in shares), default=None)
    out["psi_max_full_2s"] = max((x[2] for x in shares), default=None)
    # the stall shares at each login probe's start, to see which share a slow login comes with
    out["probes"] = [(round(t - start, 1), round(d, 2),
                      next(((x[1], x[2]) for x in shares if x[0] >= t + d), None)) for t, d in probe.times]
    out["psi_2s"] = [(round(t - start, 1), some, full) for t, some, full in shares[::4]]
    # page rates (pages/s over 2 s) beside the stall share, every 0.5 s: what tells a
    # thrash (refaults, swap-ins) from reclaim of cold pages (swap-outs, steals)
    out["vmstat_2s"] = [(round(t - start, 1), some, full, vm)
                        for t, some, full, vm in pressure.windows()[::2]]
    out["seconds"] = round(end - start, 1)
    out["heartbeat"] = heartbeat(start, end)
    out["login_worst_s"] = round(max((t for _, t in probe.times), default=0.0), 2)
    out["login_median_s"] = round(sorted(t for _, t in probe.times)[len(probe.times) // 2], 2) \
        if probe.times else None
    out["oom_kills"] = oom_kills() - oom_before
    ends = {}
    for unit, _ in units:
        props = show(unit + ".service", "Result", "ExecMainCode", "ExecMainStatus",
                     "ExecMainStartTimestampMonotonic", "ExecMainExitTimestampMonotonic")
        killed = props["ExecMainCode"] == "2" or props["Result"] in ("oom-kill", "signal")
        ends[unit] = {"killed": killed, "result": props["Result"], "signal": props["ExecMainStatus"]
                      if props["ExecMainCode"] == "2" else "", "code": props["ExecMainCode"]}
        try:   # when it ended, in seconds after the scenario started (0: still running)
            exited = int(props["ExecMainExitTimestampMonotonic"])
            ends[unit]["ended_after_s"] = round(exited / 1e6 - start, 2) if exited > 0 else None
        except ValueError:
            pass
        run("systemctl", "stop", unit + ".service")
        run("systemctl", "reset-failed", unit + ".service")
    out["units"] = ends
    for svc in ("heartbeat.service", "bystander.service"):
        out[svc.split(".")[0] + "_alive"] = show(svc, "ActiveState")["ActiveState"] == "active"
    killed = [u for u, e in ends.items() if e["killed"]]
    out["killed"] = killed
    out["right_kill"] = right in killed if right else None
    out["wrong_kills"] = [u for u in killed if u != right] + \
        [s for s in ("heartbeat", "bystander") if not out[s + "_alive"]]
    out["guardian_log"] = guardian_log(guardian, start)
    out["wall_span"] = [start_wall, start_wall + (mono() - start)]
    if guardian == "memwatchd":
        out["memwatchd_actions"] = memwatchd_actions(events_at, start_wall)
    swap_off()
    return out


def main():
    guardian, results_path = sys.argv[1], sys.argv[2]
    wanted = sys.argv[3].split(",") if len(sys.argv) > 3 and sys.argv[3] else None
    os.makedirs(RUN, exist_ok=True)
    results = {"guardian": guardian, "scenarios": {}, "errors": []}
    m = meminfo()
    results["facts"] = {"mem_total": m["MemTotal"], "kernel": os.uname().release,
                        "psi": os.path.exists("/proc/pressure/memory")}
    results["guardian_started"] = start_guardian(guardian)
    run("systemctl", "start", "heartbeat.service", "bystander.service")
    time.sleep(3)
    specs = scenarios(m["MemTotal"], meminfo()["MemAvailable"])
    runs = [(name, spec, ("", "guard")) for name, spec in specs.items()
            if (name in wanted if wanted else name not in ON_REQUEST)]
    for name in (wanted or (DEFAULT_VARIANTS if guardian == "memwatchd" else ())):
        base = name.split("#", 1)[0]
        if base in VARIANTS and guardian == "memwatchd":
            runs.append((name, specs[VARIANTS[base][0]], (VARIANTS[base] + ("guard",))[1:3]))
        elif base in specs and base != name:
            runs.append((name, specs[base], ("", "guard")))
    trace_all = guardian == "memwatchd" and TRACE_ALL in (wanted or ())
    if trace_all:   # the installed config with the trace on is what variants restore
        memwatchd_config_keys('trace = "%s"' % MEMWATCHD_TRACE, "daemon")
        with open(MEMWATCHD_CONFIG) as f:
            memwatchd_config_keys.saved = f.read()
    for name, spec, (keys, table) in runs:
        print("[%8.1f] %s under %s" % (mono(), name, guardian), flush=True)
        if trace_all and MEMWATCHD_TRACE in keys:
            keys = ""   # a traced variant: the daemon traces already
        try:
            if keys:
                memwatchd_config_keys(keys, table)
            try:
                s = results["scenarios"][name] = run_scenario(name.split("#", 1)[0], spec, guardian)
                if keys:
                    s[table + "_keys"] = keys
                if trace_all or (table == "daemon" and MEMWATCHD_TRACE in keys):
                    s["replay"] = memwatchd_replay(s["wall_span"], os.path.join(
                        os.path.dirname(results_path), "trace-" + name.replace("#", "-")))
            finally:
                if keys:
                    memwatchd_config_keys("")
        except Exception as e:   # recorded; the host side reports it
            import traceback
            results["errors"].append("%s: %s" % (name, traceback.format_exc()))
        print(json.dumps(results["scenarios"].get(name, {}))[:600], flush=True)
        for svc in ("heartbeat.service", "bystander.service"):   # back for the next one
            if show(svc, "ActiveState")["ActiveState"] != "active":
                run("systemctl", "restart", svc)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
