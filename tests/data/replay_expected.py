"""What replay decides on every golden trace (tests/data and tests/data/predict), as JSON.

tests/data/replay-expected.json was written by this script running on the full reader
(main at 214d267: ``read_trace`` held every sample in a list, sorted), before the reader
became a stream; tests/test_trace.py checks that today's streaming replay gives the same
output, decision for decision. It only uses APIs both readers have:

    PYTHONPATH=<a checkout> python tests/data/replay_expected.py > tests/data/replay-expected.json

Each trace is replayed with its recorded config, with every limit halved (replay-only
actions: divergence, dropped readings) and, for the predict corpus, with predict on (30 s)
and off.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def golden_traces() -> list:
    out = []
    for sub in ("", "predict"):
        d = os.path.join(HERE, sub)
        out += [os.path.join(sub, f) if sub else f for f in sorted(os.listdir(d)) if f.endswith(".trace.gz")]
    return out


def variants(config) -> dict:
    from memwatchd.config import Size
    mem_total = 1 << 40   # a % limit is resolved against this (only its half matters here)
    half = config._replace(watches=tuple(
        w._replace(limit=Size(bytes=max(1 << 20, w.limit.resolve(mem_total) // 2))) for w in config.watches))
    out = {"recorded": config, "half": half}
    if any(hasattr(w, "predict") for w in config.watches):
        out["predict-30s"] = config._replace(watches=tuple(w._replace(predict=30.0) for w in config.watches))
        out["predict-off"] = config._replace(watches=tuple(w._replace(predict=0.0) for w in config.watches))
    return out


def decision_row(d) -> list:
    return [d.t, list(d.key), d.watch, d.kind, d.reason, d.usage, d.limit, d.signal, d.by_guard,
            d.diverged, None if d.match is None else d.match.t]


def outcome(result) -> dict:
    return {"decisions": [decision_row(d) for d in result.decisions],
            "live": [decision_row(d) for d in result.live],
            "dropped": sorted([list(k), n] for k, n in result.dropped.items()),
            "diverged_at": sorted([list(k), t] for k, t in result.diverged_at.items()),
            "ticks": result.ticks, "readings": result.readings, "start": result.start,
            "end": result.end, "notes": sorted(result.notes), "damage": list(result.damage),
            "targets": len(result.trace.runs)}


def main() -> int:
    from memwatchd.replay import recorded_config, replay
    from memwatchd.trace import read_trace
    expected = {}
    for name in golden_traces():
        trace = read_trace(os.path.join(HERE, name))
        for label, config in variants(recorded_config(trace)).items():
            expected[f"{name} {label}"] = outcome(replay(trace, config))
    json.dump(expected, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
