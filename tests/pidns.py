"""Run a scenario inside a private PID namespace, where memwatchd can see and
signal only the processes the scenario started.

``run_scenario(code)`` executes Python ``code`` as PID 1 of a fresh namespace
(`unshare --pid --fork --mount-proc`); when it exits the kernel kills everything
left in the namespace. The code prints one JSON object as its last stdout line,
which is returned. Helpers for the code live in tests/scenario_lib.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def can_unshare() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True)
    return probe.returncode == 0


needs_pidns = pytest.mark.skipif(not can_unshare(),
                                 reason="needs root and unshare(1) for a private PID namespace")


def run_scenario(code: str, timeout: float = 60, env: dict = None) -> dict:
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + sys.path))
    full_env.update(env or {})
    proc = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
         sys.executable, "-c", "from tests.scenario_lib import *\n" + code],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"scenario failed ({proc.returncode}):\n" \
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads(lines[-1])
    result["_stderr"] = proc.stderr
    return result
