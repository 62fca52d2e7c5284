"""What a busy scraper costs the daemon: /metrics at 1,000 targets, one render per snapshot
next to a render per request (what the exporter did before issue 11).

Starts the real exporter thread on 127.0.0.1 (an ephemeral port), hands it one snapshot of
1,000 targets, and scrapes it 50 times with urllib, twice side by side: as shipped (the
snapshot is rendered once, every later request is served from that text) and with the
cache defeated before each request (a render per request). Reports the median and p90
of a scrape and the process CPU per scrape (exporter thread + client), and, for the loop
that shares the GIL with the exporter, the median and p99 of a 1 ms busy step measured
in the main thread while a second thread scrapes 20 times a second (the accept limit).
No root, no signals. Last line: `scrape_ms_cached= scrape_ms_uncached= ratio= loop_p99_ms_cached= loop_p99_ms_uncached=`.

Run: python benchmarks/metrics.py   (about 10 s)
"""
from __future__ import annotations

import resource
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memwatchd import metrics  # noqa: E402

N_TARGETS = 1000
SCRAPES = 50


def view(n: int) -> dict:
    return {"written_at": time.time(), "dry_run": False, "watches": ["jobs"],
            "daemon": {"rss_bytes": 12 << 20},
            "host": {"mem_total_bytes": 8 << 30, "mem_available_bytes": 5 << 30,
                     "swap_total_bytes": 0, "swap_free_bytes": 0, "psi": None},
            "targets": [{"target": "jobs", "id": str(1000 + i), "usage_bytes": i << 20,
                         "limit_bytes": 1 << 30, "actions_last_hour": 0} for i in range(n)]}


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def scrape_times(exporter, url: str, cached: bool) -> tuple:
    times = []
    before = cpu()
    for _ in range(SCRAPES):
        if not cached:
            exporter.snapshot.text = None   # what every request cost before: a fresh render
        start = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()
        times.append(time.perf_counter() - start)
    return times, (cpu() - before) / SCRAPES


def loop_steps(exporter, url: str, cached: bool, seconds: float = 2.0) -> list:
    """The main thread does 1 ms of work in a loop while a scraper hits /metrics at 20/s."""
    stop = threading.Event()

    def scraper():
        while not stop.is_set():
            if not cached:
                exporter.snapshot.text = None
            with urllib.request.urlopen(url, timeout=10) as r:
                r.read()
            stop.wait(0.05)

    t = threading.Thread(target=scraper)
    t.start()
    steps = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        while time.perf_counter() - start < 0.001:
            pass
        steps.append(time.perf_counter() - start)
    stop.set()
    t.join()
    return steps


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


def main() -> None:
    exporter = metrics.Exporter(("127.0.0.1", 0), "")
    exporter.start()
    try:
        m, e = metrics.Histogram(metrics.TICK_BUCKETS), metrics.Histogram(metrics.EXIT_BUCKETS)
        exporter.snapshot = metrics._Snapshot(view(N_TARGETS), {}, m, e)
        url = f"http://127.0.0.1:{exporter.address[1]}/metrics"
        urllib.request.urlopen(url, timeout=10).read()   # warm-up (imports, first render)
        rows = {}
        for cached in (True, False):
            times, cpu_each = scrape_times(exporter, url, cached)
            steps = sorted(loop_steps(exporter, url, cached))
            rows[cached] = (statistics.median(times), sorted(times)[int(len(times) * 0.9)], cpu_each,
                            statistics.median(steps), steps[int(len(steps) * 0.99)])
        print(f"/metrics with {N_TARGETS} targets, {SCRAPES} scrapes each:")
        print(f"{'':28} {'scrape median':>14} {'p90':>8} {'CPU/scrape':>11} {'1ms step med':>13} {'p99':>8}")
        for cached, label in ((True, "one render per snapshot"), (False, "a render per request")):
            med, p90, c, smed, sp99 = rows[cached]
            print(f"{label:28} {ms(med):>11} ms {ms(p90):>5} ms {ms(c):>8} ms {ms(smed):>10} ms {ms(sp99):>5} ms")
        ratio = rows[False][0] / rows[True][0]
        print(f"scrape_ms_cached={ms(rows[True][0])} scrape_ms_uncached={ms(rows[False][0])} "
              f"ratio={ratio:.1f} loop_p99_ms_cached={ms(rows[True][4])} "
              f"loop_p99_ms_uncached={ms(rows[False][4])}")
    finally:
        exporter.stop()


if __name__ == "__main__":
    main()
