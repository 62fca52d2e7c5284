"""The predictive trigger (issue 15) measured by replay over the recorded corpus.

Each trace in tests/data/predict/ (a real workload recorded with `memwatchd record
--predict 30s`, see make_corpus.py) is replayed by the daemon's own Policy twice: with
the watch's predict horizon and without it (the plain threshold). Per trace:

  leak     lead: seconds between the first predicted-exhaustion decision and the first
           over-limit decision of the plain threshold (positive: caught early)
  benign   false actions: predicted-exhaustion decisions on a job that never reaches
           its limit (the plain threshold takes none on these)
  fromstart  a leak from the process's first moment: the history gate holds it for
           HISTORY seconds, so it is caught early only if it needs longer than that to
           reach its limit. Reported apart.
  ramp     a straight climb that stops short of the limit: a leak of its rate until it
           stops, so no trend can tell it apart in advance; it is predicted iff
           (1 - P) * limit / rate < horizon. Reported apart, not counted as benign.

Then the same with each gate removed in turn (predict.ALL_GATES), to show which gates
earn their keep. Last line (issue 15's format; leaks counted are those of 10 MB/s or
faster):

  leaks=N caught_early=N lead_s_median=X benign=M false_actions=N

Usage: python3 benchmarks/predict.py [--horizon 30s] [--corpus DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memwatchd import policy as policy_module  # noqa: E402
from memwatchd.config import parse_duration  # noqa: E402
from memwatchd.policy import REASON_LIMIT, REASON_PREDICT  # noqa: E402
from memwatchd.predict import ALL_GATES  # noqa: E402
from memwatchd.replay import recorded_config, replay  # noqa: E402
from memwatchd.trace import read_trace  # noqa: E402

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "tests", "data", "predict")
FAST_LEAK = 10   # MB/s: leaks at least this fast count in the last line


def traces(directory):
    sys.path.insert(0, directory)
    from make_corpus import CORPUS as KNOWN   # name -> (class, limit, argv)
    out = []
    for name, (cls, _limit, _argv) in KNOWN.items():
        path = os.path.join(directory, f"{name}.trace.gz")
        if os.path.exists(path):
            out.append((name, cls, read_trace(path)))
    return out


def with_predict(trace, horizon):
    cfg = recorded_config(trace)
    return cfg._replace(watches=tuple(w._replace(predict=horizon) for w in cfg.watches))


def measured_rate(trace, at_time):
    """MB/s over the 2 s before ``at_time`` (the threshold): what the machine really
    allocated at (the fast leaks ask for more than a loaded 2-core VM may give)."""
    points = [(s.t, row[1]) for s in trace.samples for row in s.rows
              if at_time - 2.0 <= s.t <= at_time]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0]) / 1e6


def first(result, reason):
    return next((d.t for d in result.decisions if d.reason == reason), None)


def measure(name, cls, trace, horizon, gates=ALL_GATES):
    """(lead seconds or None, predicted decisions) for one trace."""
    saved = policy_module.ALL_GATES
    policy_module.ALL_GATES = gates    # Policy() takes its gates from here
    try:
        on = replay(trace, with_predict(trace, horizon))
    finally:
        policy_module.ALL_GATES = saved
    off = replay(trace, with_predict(trace, 0.0))
    hard = first(off, REASON_LIMIT)
    predicted = [d for d in on.decisions if d.reason == REASON_PREDICT]
    if hard is not None and predicted and predicted[0].t > hard:
        predicted = []   # after the threshold: not early, and the threshold acted anyway
    lead = None if hard is None or not predicted else hard - predicted[0].t
    return hard, lead, predicted


def summarise(corpus, horizon, gates=ALL_GATES, verbose=True):
    leaks, benign, ramps, starts, rows = [], [], [], [], []
    for name, cls, trace in corpus:
        hard, lead, predicted = measure(name, cls, trace, horizon, gates)
        if cls in ("leak", "fromstart") and hard is None:
            rows.append(f"  {name:<14} {cls:<9} never reached its limit: left out (re-record it)")
            continue
        if cls in ("leak", "fromstart"):
            rate = int(name.split("-")[1])
            if cls == "leak":
                leaks.append((name, rate, lead))
            else:
                starts.append(lead)
            real = measured_rate(trace, hard)
            rows.append(f"  {name:<14} {cls:<9} {real or 0:4.0f} MB/s measured, threshold at "
                        f"{hard - trace.start:6.2f} s, "
                        + (f"predicted {lead:6.2f} s earlier" if lead is not None else "not caught early"))
        else:
            if hard is not None:
                rows.append(f"  {name:<14} {cls:<9} (reaches its limit: not benign, left out)")
                continue
            if cls == "ramp":   # a leak until it stops: predicted iff (1 - P) L / rate < horizon
                ramps.append(len(predicted))
                rows.append(f"  {name:<14} {cls:<9} predicted {len(predicted)} (not counted as benign)")
                continue
            benign.append((name, cls, len(predicted)))
            rows.append(f"  {name:<14} {cls:<9} false actions {len(predicted)}")
    if verbose:
        print("\n".join(rows))
    fast = [(n, r, lead) for n, r, lead in leaks if r >= FAST_LEAK]
    leads = [lead for _, _, lead in fast if lead is not None]
    return {"leaks": len(fast), "caught_early": len(leads),
            "lead_s_median": statistics.median(leads) if leads else 0.0,
            "benign": len(benign), "false_actions": sum(n for _, _, n in benign),
            "ramps": len(ramps), "ramps_predicted": sum(1 for n in ramps if n),
            "fromstart": len(starts), "fromstart_caught": sum(1 for lead in starts if lead is not None),
            "slow_leaks_caught": sum(1 for _, r, lead in leaks if r < FAST_LEAK and lead is not None),
            "slow_leaks": sum(1 for _, r, _ in leaks if r < FAST_LEAK)}


def cost_per_reading(n_targets=100, ticks=2000):
    """CPU µs per reading of Policy.evaluate for quiet targets, with and without predict:
    the price a watch pays for its trend (O(1): running sums)."""
    import time
    from memwatchd.config import parse_config
    from memwatchd.policy import Policy
    from memwatchd.types import Reading
    out = {}
    for horizon in ("0", "30s"):
        cfg = parse_config({"watch": [{"name": "w", "cmdline": "x", "limit": "1G",
                                       "predict": horizon}]}, "bench")
        policy = Policy(cfg)
        keys = [("process", i, 1) for i in range(n_targets)]
        start = time.process_time()
        for tick in range(ticks):
            policy.evaluate(tick * 0.01, [Reading(k, "w", (300 << 20) + tick * 4096 + i, 1 << 30, None)
                                          for i, k in enumerate(keys)])
        out[horizon] = (time.process_time() - start) / (ticks * n_targets) * 1e6
    return out["0"], out["30s"]


def line(s):
    return (f"leaks={s['leaks']} caught_early={s['caught_early']} "
            f"lead_s_median={s['lead_s_median']:.2f} benign={s['benign']} "
            f"false_actions={s['false_actions']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--horizon", default="30s")
    ap.add_argument("--corpus", default=CORPUS)
    args = ap.parse_args()
    horizon = parse_duration(args.horizon, "--horizon")
    corpus = traces(args.corpus)
    if not corpus:
        sys.exit(f"no traces in {args.corpus}: run tests/data/predict/make_corpus.py")
    print(f"predictive trigger, horizon {horizon:g} s, {len(corpus)} traces from {args.corpus}")
    print("with every gate:")
    full = summarise(corpus, horizon)
    print(f"  slow leaks (< {FAST_LEAK} MB/s) caught early: {full['slow_leaks_caught']} of {full['slow_leaks']}")
    print(f"  ramps predicted: {full['ramps_predicted']} of {full['ramps']}")
    print(f"  leaks from the first moment caught early: {full['fromstart_caught']} of {full['fromstart']}")
    print("each gate removed in turn:")
    for gate in sorted(ALL_GATES):
        s = summarise(corpus, horizon, ALL_GATES - {gate}, verbose=False)
        print(f"  without {gate:<8} {line(s)} ramps_predicted={s['ramps_predicted']}")
    off, on = cost_per_reading()
    print(f"cost: Policy.evaluate {off:.2f} us per quiet reading without predict, {on:.2f} us with it")
    print(line(full))


if __name__ == "__main__":
    main()
