"""Fixtures for the VM tier: host tools, the cached guest image.

Skips only when qemu/debootstrap are missing and install-deps.sh cannot
install them (CI installs them beforehand, and there a skip is a failure).
"""
import os
import sys
from pathlib import Path

import pytest

# Make `import harness` work whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def _ensure_host_tools():
    """Install missing tools once (root + apt only; MEMWATCHD_VM_NO_INSTALL=1 disables)."""
    image = harness._load_image(harness.cache_root() / harness.recipe_hash())
    missing = harness.missing_tools(build=image is None)
    if not missing:
        return
    why = "missing %s" % ", ".join(missing)
    if os.environ.get("MEMWATCHD_VM_NO_INSTALL") == "1":
        pytest.skip("%s and MEMWATCHD_VM_NO_INSTALL=1 forbids installing them" % why)
    if os.geteuid() != 0:
        pytest.skip("%s; installing them needs root (run tests/vm/install-deps.sh)" % why)
    proc = harness.install_deps()
    still = harness.missing_tools(build=image is None)
    if still:
        pytest.skip("missing %s and tests/vm/install-deps.sh could not install them "
                    "(rc %d): %s" % (", ".join(still), proc.returncode,
                                      (proc.stdout + proc.stderr)[-800:]))


@pytest.fixture(scope="session")
def vm_image():
    """The cached guest image, built on first use (about 1-2 minutes cold)."""
    _ensure_host_tools()
    try:
        return harness.ensure_image()
    except harness.HarnessUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def vm_image_for():
    """vm_image_for(suite): the cached image of that Debian suite (harness.SUITES)."""
    _ensure_host_tools()
    images = {}

    def get(suite):
        if suite not in images:
            try:
                images[suite] = harness.ensure_image(suite=suite)
            except harness.HarnessUnavailable as exc:
                pytest.skip(str(exc))
        return images[suite]
    return get


def pytest_collection_modifyitems(items):
    """Boot the smoke test before the scenarios: if the guest itself is broken, say so first."""
    items.sort(key=lambda item: ("tests/vm/" in item.nodeid, "test_vm_smoke" not in item.nodeid))
