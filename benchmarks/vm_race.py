"""Issue 19's race: the same scenarios in the same Debian 12 guest under each guardian.

One boot per guardian (none; earlyoom with Debian's shipped config; systemd-oomd
configured as its man pages recommend, see tests/vm/scenario/race.py
OOMD_DROPINS; memwatchd as installed, guard only), each running every scenario of
tests/vm/scenario/race.py: fast hog without swap; a leak (25 MB/s) with its whole
working set hot, on a swapfile of half the RAM and on zram of half the RAM (on request,
leak_slowswap: on a swap disk of half the RAM that qemu throttles to 4 MiB/s,
MEMWATCHD_VM_SLOW_SWAP_BPS);
page-cache thrash without swap (a reader of a file of 40% of RAM, a slow hog);
the benign controls (85% of MemAvailable held; cold pages to a swapfile at
30 MB/s). Heartbeat every 100 ms, a bystander, a login probe every 2 s.

Prints one row per scenario and guardian (longest heartbeat pause, worst login
probe, stall = first pause over 0.5 s to the last, who was killed, wrong kills,
kernel OOM kills, bystander alive), then the last line:
memwatchd_worst_pause_s=X earlyoom_worst_pause_s=X oomd_worst_pause_s=X none_worst_pause_s=X
memwatchd_worst_login_s=X none_worst_login_s=X memwatchd_wrong_kills=N memwatchd_benign_kills=N scenarios=N
(worst = the longest over the stall scenarios).

memwatchd's boot also runs its variants (tests/vm/scenario/race.py VARIANTS; by default
leak_swap_predict: leak_swap with `[guard] predict = "30s"`, issue 15) and prints the
comparison with and without predict: longest pause, when memwatchd first acted, why, the
victim's size, then predict_on_pause_s=X predict_off_pause_s=X predict_on_acted_s=X
predict_off_acted_s=X predict_on_reasons=... wrong_kills=N runs=N+N (medians). For
medians: --guardians memwatchd --scenarios leak_swap,leak_swap_predict,leak_swap#2,
leak_swap_predict#2,... ("name#N" runs a scenario again); leak_swap_nopsi and
leak_swap_predict_nopsi (pressure off) on request.

Run: sudo .venv/bin/python benchmarks/vm_race.py [--guardians none,memwatchd] [--scenarios a,b]
(qemu, the VM tier's image; about 6 minutes per guardian under TCG, memwatchd's ~2.5 more).
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "vm"))
import harness  # noqa: E402
import race_lib  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--guardians", default=",".join(race_lib.GUARDIANS))
    p.add_argument("--scenarios", default="")
    p.add_argument("--keep", default="", help="directory for each guardian's race JSON")
    args = p.parse_args()
    image = harness.ensure_image()
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    races = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="memwatchd-race-") as tmp:
        wheels = Path(tmp) / "wheels"
        harness.build_wheels(race_lib.REPO, wheels)
        for guardian in args.guardians.split(","):
            result, race = race_lib.boot(guardian, image, wheels, Path(tmp) / guardian, scenarios)
            races[guardian] = race
            print("%s: boot %.0f s, %s, errors %s" % (guardian, race["boot_seconds"], race.get("accel"),
                                                      race.get("errors") or "none"), flush=True)
            if args.keep:
                Path(args.keep).mkdir(parents=True, exist_ok=True)
                (Path(args.keep) / ("%s.json" % guardian)).write_text(json.dumps(race, indent=1))
                for ring in result.share_dir.glob("trace-*"):   # a traced variant's ring
                    shutil.copytree(ring, Path(args.keep) / ("%s-%s" % (guardian, ring.name)),
                                    dirs_exist_ok=True)
    facts = next(iter(races.values())).get("facts", {}) if races else {}
    print("\nguest: Debian 12, kernel %s, %d MiB, 2 vCPUs, %s; %s; total %.0f s" % (
        facts.get("kernel"), (facts.get("mem_total") or 0) >> 20,
        next(iter(races.values())).get("accel") if races else "?",
        time.strftime("%Y-%m-%d"), time.monotonic() - t0))
    print(race_lib.table(races))
    mw = races.get("memwatchd", {})
    if race_lib.runs_of(mw, "leak_swap_predict"):   # issue 15: memwatchd with [guard] predict
        print("\nmemwatchd with [guard] predict = \"30s\" vs without (first action: from its events file)")
        print(race_lib.predict_rows(mw))
        print(race_lib.predict_line(mw))
    print(race_lib.last_line(races))
    return 0


if __name__ == "__main__":
    sys.exit(main())
