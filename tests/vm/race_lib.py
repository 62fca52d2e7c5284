"""Host side of issue 19's race: boot one guest per guardian, run scenario/race.py, tabulate.

Used by benchmarks/vm_race.py (every guardian) and test_vm_race.py (memwatchd's
column, the CI proof). Standard library only, like harness.py.
"""
import os
import statistics
from pathlib import Path

import harness

REPO = Path(__file__).resolve().parents[2]
SCENARIO = Path(__file__).resolve().parent / "scenario"
GUARDIANS = ("none", "earlyoom", "oomd", "memwatchd")
STALL_SCENARIOS = ("fast_hog", "leak_swap", "leak_zram", "cache_thrash")
BENIGN_SCENARIOS = ("benign_steady", "benign_cold")
MEM_MB = 1024
# leak_slowswap's swap device: a second disk of half the RAM, throttled by qemu to this many
# bytes/s, reads and writes together (a thin or network disk, a nested VM's); the race's own
# swap file is on the root disk, unthrottled
SLOW_SWAP_BPS = int(os.environ.get("MEMWATCHD_VM_SLOW_SWAP_BPS", 4 << 20))

SCRIPT = """#!/bin/bash
set -u
systemctl daemon-reload
exec /usr/bin/python3 /usr/local/lib/mwtest/race.py {guardian} "$VM_SHARE/race.json" {scenarios}
"""


def guest_files():
    files = {"/usr/local/lib/mwtest/%s" % name: SCENARIO / name
             for name in ("race.py", "driver.py", "work.py", "hog.py", "heartbeat.py")}
    for unit in ("heartbeat.service", "bystander.service"):
        files["/etc/systemd/system/" + unit] = SCENARIO / "units" / unit
    return files


def boot(guardian, image, wheels, run_dir, scenarios=(), timeout=1500):
    """One boot under one guardian; (harness result, the race's results dict)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    slow = run_dir / "slow-swap.img"   # sparse: the host's disk pays only for what is written
    with open(slow, "wb") as f:
        f.truncate((MEM_MB // 2) << 20)
    result = harness.run_guest(
        SCRIPT.format(guardian=guardian, scenarios=",".join(scenarios)),
        wheels_dir=wheels if guardian == "memwatchd" else None, extra_files=guest_files(),
        image=image, run_dir=run_dir, mem_mb=MEM_MB, timeout=timeout,
        drives=["file=%s,if=virtio,format=raw,throttling.bps-total=%d"
                % (harness._qemu_path(slow), SLOW_SWAP_BPS)])
    slow.unlink()
    try:
        race = result.read_json("race.json")
    except (OSError, ValueError):
        race = {"guardian": guardian, "scenarios": {}, "errors": ["no race.json: " + result.describe()]}
    race["boot_seconds"] = round(result.duration, 1)
    race["accel"] = "kvm" if "kvm" in " ".join(harness.accel_args()) else "tcg"
    race["slow_swap_bps"] = SLOW_SWAP_BPS
    return result, race


def row(name, guardian, s):
    hb = s.get("heartbeat") or {}
    return ("%-14s %-9s %9s %9s %9s %8s %-22s %-10s %4s %9s" % (
        name, guardian, _f(hb.get("max_gap_s")), _f(s.get("login_worst_s")), _f(s.get("login_idle_s")),
        _f(hb.get("stall_s")),
        ",".join(s.get("killed") or []) or "-", ",".join(s.get("wrong_kills") or []) or "-",
        s.get("oom_kills", "-"), "yes" if s.get("bystander_alive") else "NO"))


HEADER = "%-14s %-9s %9s %9s %9s %8s %-22s %-10s %4s %9s" % (
    "scenario", "guardian", "pause s", "login s", "idle lgn", "stall s", "killed", "wrong", "oom",
    "bystander")


def _f(v):
    return "-" if v is None else "%.2f" % v


def worst(race, key):
    vals = []
    for name in STALL_SCENARIOS:
        s = race.get("scenarios", {}).get(name)
        if not s:
            continue
        v = (s.get("heartbeat") or {}).get("max_gap_s") if key == "pause" else s.get("login_worst_s")
        if v is not None:
            vals.append(v)
    return max(vals) if vals else float("nan")


def wrong_kills(race):
    return sum(len(race["scenarios"][n].get("wrong_kills") or []) for n in STALL_SCENARIOS
               if n in race.get("scenarios", {}))


def benign_kills(race):
    return sum(len(set(race["scenarios"][n].get("killed") or []) | set(race["scenarios"][n].get("wrong_kills") or []))
               for n in BENIGN_SCENARIOS if n in race.get("scenarios", {}))


def table(races):
    lines = [HEADER]
    names = []
    for race in races.values():
        names += [n for n in race.get("scenarios", {}) if n not in names]
    for name in names:
        for guardian, race in races.items():
            s = race.get("scenarios", {}).get(name)
            if s:
                lines.append(row(name, guardian, s))
    return "\n".join(lines)


def last_line(races):
    def w(g, key):
        return "%.2f" % worst(races[g], key) if g in races else "nan"
    scenarios = len(set().union(*(r.get("scenarios", {}).keys() for r in races.values()))) if races else 0
    mw = races.get("memwatchd", {"scenarios": {}})
    return ("memwatchd_worst_pause_s=%s earlyoom_worst_pause_s=%s oomd_worst_pause_s=%s "
            "none_worst_pause_s=%s memwatchd_worst_login_s=%s none_worst_login_s=%s "
            "memwatchd_wrong_kills=%d memwatchd_benign_kills=%d scenarios=%d" % (
                w("memwatchd", "pause"), w("earlyoom", "pause"), w("oomd", "pause"), w("none", "pause"),
                w("memwatchd", "login"), w("none", "login"), wrong_kills(mw), benign_kills(mw), scenarios))


def median(values):
    return statistics.median(values) if values else float("nan")


def env_scenarios():
    """MEMWATCHD_VM_RACE_SCENARIOS=a,b limits a run to some scenarios."""
    raw = os.environ.get("MEMWATCHD_VM_RACE_SCENARIOS", "")
    return tuple(s for s in raw.split(",") if s)


# ------------------------------------------------ issue 15: memwatchd with and without predict

# variant (scenario/race.py VARIANTS) -> the plain scenario it repeats with [guard] predict
PREDICT_PAIRS = {"leak_swap_predict": "leak_swap", "leak_swap_predict_nopsi": "leak_swap_nopsi",
                 "leak_swap_predict_noswap": "leak_swap_noswap", "benign_cold_predict": "benign_cold",
                 "benign_cold_predict_noswap": "benign_cold"}


def runs_of(race, name):
    """The results of ``name`` and of its repeats (name#2, ...), in run order."""
    return [s for n, s in race.get("scenarios", {}).items() if n.split("#", 1)[0] == name]


def first_action(s):
    """memwatchd's first decision record in a scenario (or None): after_s, reason, usage_mib..."""
    acts = [a for a in s.get("memwatchd_actions") or [] if a.get("action") != "warn"]
    return acts[0] if acts else None


def pause(s):
    return (s.get("heartbeat") or {}).get("max_gap_s")


def predict_rows(race):
    """One line per run of each predict pair: pause, first action (when, why, at what size)."""
    lines = ["%-24s %9s %9s %-22s %9s %9s %-10s" % ("scenario", "pause s", "acted s", "first action",
                                                    "usage MiB", "avail MiB", "wrong")]
    names = []
    for on, off in PREDICT_PAIRS.items():
        names += [n for n in (off, on) if n not in names]
    for name in names:
        for s in runs_of(race, name):
            a = first_action(s) or {}
            lines.append("%-24s %9s %9s %-22s %9s %9s %-10s" % (
                name, _f(pause(s)), _f(a.get("after_s")),
                ("%s %s" % (a.get("action"), a.get("reason"))) if a else "-",
                a.get("usage_mib", "-"), a.get("mem_available_mib", "-"),
                ",".join(s.get("wrong_kills") or []) or "-"))
    return "\n".join(lines)


def predict_line(race, on="leak_swap_predict", off="leak_swap"):
    """The last line of the predict comparison (medians over the repeats)."""
    def med(name, f):
        return median([v for v in (f(s) for s in runs_of(race, name)) if v is not None])

    def acted(s):
        a = first_action(s)
        return a["after_s"] if a else None
    on_runs = runs_of(race, on)
    reasons = sorted({(first_action(s) or {}).get("reason") or "-" for s in on_runs})
    wrong = sum(len(s.get("wrong_kills") or []) for s in on_runs + runs_of(race, off))
    return ("predict_on_pause_s=%.2f predict_off_pause_s=%.2f predict_on_acted_s=%.2f "
            "predict_off_acted_s=%.2f predict_on_reasons=%s wrong_kills=%d runs=%d+%d" % (
                med(on, pause), med(off, pause), med(on, acted), med(off, acted), ",".join(reasons),
                wrong, len(on_runs), len(runs_of(race, off))))
