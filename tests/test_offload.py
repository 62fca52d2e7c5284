"""The helpers that keep blocking kernel calls off the loop (memwatchd/offload.py)."""
from __future__ import annotations

import os
import time

from memwatchd import offload, report


def test_the_writer_keeps_order_and_writes_everything_queued_before_close(tmp_path):
    path = tmp_path / "events.jsonl"
    w = offload.EventWriter(report.EventLog(str(path)))
    assert w.append({"type": "decision", "id": "0"}, wait=5.0) is True   # on disk (fsync'ed)
    for i in range(1, 200):
        w.append({"type": "outcome", "id": str(i)}, wait=0.0)            # fire and forget
    w.close()
    assert [r["id"] for r in report.read_events(str(path))] == [str(i) for i in range(200)]


def test_a_stuck_disk_costs_the_loop_one_wait_not_one_per_record(tmp_path):
    """A FIFO stands in for a file that blocks every write (a frozen or congested disk;
    test_loop_trust freezes a real file system)."""
    fifo = tmp_path / "events.jsonl"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)   # so that opening it for writing works
    log = report.EventLog(None)
    log.path, log._fd, log._ino = str(fifo), os.open(fifo, os.O_WRONLY), None
    log._current = lambda: True
    big = {"type": "decision", "pad": "x" * (1 << 20)}      # more than a pipe holds: write blocks
    w = offload.EventWriter(log)
    try:
        started = time.monotonic()
        assert w.append(big, wait=0.3) is False
        assert 0.25 <= time.monotonic() - started < 1.0
        started = time.monotonic()
        for _ in range(20):
            assert w.append({"type": "decision"}, wait=0.3) is False
        assert time.monotonic() - started < 0.2             # no second wait while stuck
    finally:
        os.close(reader)                                     # the blocked write fails: EPIPE
        w.close(wait=5)


def test_helpers_are_bounded_and_return_in_time():
    import _thread
    h = offload.Helpers(limit=2)
    assert h.call(lambda x: x + 1, (41,), wait=1.0) == (True, 42)
    gate = _thread.allocate_lock()
    gate.acquire()
    assert h.call(gate.acquire, (), wait=0.05) == (False, None)   # blocked: given up on
    assert h.start(gate.acquire) is True
    assert h.alive == 2
    started = time.monotonic()
    assert h.call(lambda: 1, (), wait=1.0) == (False, None)       # all busy: refused at once
    assert h.start(lambda: 1) is False
    assert time.monotonic() - started < 0.05
    deadline = time.monotonic() + 5
    while h.alive and time.monotonic() < deadline:
        if gate.locked():
            gate.release()
        time.sleep(0.01)
    assert h.alive == 0
