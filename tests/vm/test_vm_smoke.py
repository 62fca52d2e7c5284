"""Smoke test of the VM harness: one boot checks everything later tiers rely on.

In the guest: cgroup v2 with the memory controller, systemd reaching
running/degraded, a pip-installed wheel importing from the venv, and a
transient unit getting its own memory cgroup.

Wheel source (MEMWATCHD_VM_SMOKE_WHEEL):
  auto     (default) memwatchd built from this checkout; if `pip wheel` fails
           (e.g. mid-edit), a tiny generated wheel, with a warning
  project  memwatchd built from this checkout, failing the test if it cannot
  tiny     only the tiny generated wheel (no build, no network)
  <dir>    any project dir; module to import from MEMWATCHD_VM_SMOKE_IMPORT
"""
import os
import warnings
from pathlib import Path

import pytest

import harness

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""#!/bin/bash
# Each check writes its raw result under $VM_SHARE/smoke for the host to assert on.
set -u
out="$VM_SHARE/smoke"
mkdir -p "$out"
cat /sys/fs/cgroup/cgroup.controllers > "$out/controllers"
timeout 120 systemctl is-system-running --wait > "$out/system_state" 2>&1
systemctl --failed --no-legend --plain > "$out/failed_units" 2>&1
python -c 'import sys, {module} as m; print(m.__file__); print(sys.prefix)' \
    > "$out/import" 2>&1
echo $? > "$out/import_rc"
systemd-run --unit=probe -p MemoryMax=100M sleep 30 > "$out/systemd_run" 2>&1
cg=/sys/fs/cgroup/system.slice/probe.service
for _ in $(seq 100); do [ -e "$cg/memory.current" ] && break; sleep 0.1; done
cat "$cg/memory.current" > "$out/memory_current"
cat "$cg/memory.max" > "$out/memory_max"
systemctl stop probe
echo smoke done
"""


@pytest.fixture(scope="session")
def smoke_wheels(tmp_path_factory):
    """(wheels_dir, module to import) per MEMWATCHD_VM_SMOKE_WHEEL."""
    source = os.environ.get("MEMWATCHD_VM_SMOKE_WHEEL", "auto")
    out = tmp_path_factory.mktemp("wheels")
    if source == "tiny":
        harness.make_test_wheel(out)
        return out, "vmsmoke_probe"
    project = REPO if source in ("auto", "project") else Path(source)
    module = os.environ.get("MEMWATCHD_VM_SMOKE_IMPORT", "memwatchd")
    try:
        harness.build_wheels(project, out)
    except harness.WheelBuildError as exc:
        if source != "auto":
            raise
        warnings.warn("memwatchd wheel did not build, smoke test uses a tiny wheel: %s"
                      % str(exc)[-500:])
        for stale in out.glob("*.whl"):
            stale.unlink()
        harness.make_test_wheel(out)
        return out, "vmsmoke_probe"
    return out, module


def test_guest_has_systemd_cgroup2_memory_and_wheels(vm_image, smoke_wheels, tmp_path):
    wheels_dir, module = smoke_wheels
    assert module.isidentifier() or all(p.isidentifier() for p in module.split("."))
    result = harness.run_guest(SCRIPT.format(module=module), wheels_dir=wheels_dir,
                               image=vm_image, run_dir=tmp_path / "run", timeout=300)
    report = result.describe()
    assert not result.timed_out, report
    assert result.runner_status == "ok", report
    assert result.exit_code == 0, report

    smoke = lambda name: result.read_text("smoke/" + name).strip()  # noqa: E731
    assert "memory" in smoke("controllers").split(), report
    assert smoke("system_state") in ("running", "degraded"), (
        smoke("system_state"), smoke("failed_units"))
    assert smoke("import_rc") == "0", smoke("import") + "\n" + result.pip_log
    imported_from, prefix = smoke("import").splitlines()[-2:]
    assert prefix == harness.GUEST_VENV and imported_from.startswith(prefix), smoke("import")
    assert int(smoke("memory_current")) > 0, smoke("systemd_run")
    assert smoke("memory_max") == str(100 * 1024 * 1024)
