"""Shared fixtures: both sampler implementations, and processes that really allocate."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from memwatchd import procfs

from .scenario_lib import LEADER_EXITS

NO_EXTENSIONS = os.environ.get("MEMWATCHD_NO_EXTENSIONS", "") not in ("", "0")


def _implementations():
    if NO_EXTENSIONS:
        return [pytest.param(procfs, id="python")]
    from memwatchd import _memread  # must be built: no silent fallback in CI
    return [pytest.param(_memread, id="compiled"), pytest.param(procfs, id="python")]


@pytest.fixture(params=_implementations())
def impl(request):
    """Each sampler test runs against the compiled module and its pure-Python twin."""
    return request.param


# A hog that allocates in steps on command and caps itself in bytes and time.
# Protocol: it prints "ready <bytes>" after each step; a line on stdin asks for the next step.
HOG = textwrap.dedent("""
    import os, signal, sys, time
    step, cap, deadline = int(sys.argv[1]), int(sys.argv[2]), time.time() + float(sys.argv[3])
    signal.signal(signal.SIGALRM, lambda *a: os._exit(3))
    signal.alarm(int(float(sys.argv[3])) + 1)
    chunks, total = [], 0
    print("ready", total, flush=True)
    for line in sys.stdin:
        if total + step > cap or time.time() > deadline:
            break
        chunks.append(bytearray(b"x" * step))  # touched: counts in RSS
        total += step
        print("ready", total, flush=True)
""")


class Hog:
    """A child Python process that grows by `step` bytes each time grow() is called."""

    def __init__(self, step: int, cap: int = 512 << 20, seconds: float = 60):
        self.proc = subprocess.Popen([sys.executable, "-c", HOG, str(step), str(cap), str(seconds)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.allocated = self._ack()

    def _ack(self) -> int:
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "ready", line
        return int(line[1])

    def grow(self) -> int:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.allocated = self._ack()
        return self.allocated

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def hog_factory():
    hogs = []

    def make(step, **kw):
        hog = Hog(step, **kw)
        hogs.append(hog)
        return hog
    yield make
    for hog in hogs:
        hog.kill()


def start_leader_exits(size: int, seconds: float = 30) -> subprocess.Popen:
    """Start LEADER_EXITS and return once its leader has exited and `size` bytes are held."""
    proc = subprocess.Popen([sys.executable, "-c", LEADER_EXITS, str(size), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc
