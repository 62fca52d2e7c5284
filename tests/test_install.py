"""`memwatchd install-units`: a unit that starts from wherever memwatchd is installed,
never over someone's files without --force, and never running code others can change."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memwatchd import install
from memwatchd.cli import app
from memwatchd.types import InsecureConfigError, MemwatchdError

from .test_units import parse_unit, verify_problems

runner = CliRunner()
SHIPPED = install.shipped("memwatchd.service")


def service(text: str) -> dict:
    return parse_unit(text)["Service"]


def changed_lines(text: str) -> set:
    """The lines of a rendered unit that are not in the shipped one."""
    return set(text.splitlines()) - set(SHIPPED.splitlines())


@pytest.fixture
def trusted(tmp_path):
    """A root-owned installation tree, writable only by root (like a venv under /opt)."""
    root = tmp_path / "inst"
    (root / "bin").mkdir(parents=True)
    (root / "lib" / "memwatchd").mkdir(parents=True)
    (root / "bin" / "memwatchd").write_text("#!/bin/sh\n")
    (root / "bin" / "memwatchd").chmod(0o755)
    (root / "lib" / "memwatchd" / "__init__.py").write_text("")
    for d in (tmp_path, root, root / "bin", root / "lib", root / "lib" / "memwatchd"):
        d.chmod(0o755)
    return root


def plan(tmp_path, trusted, **kw):
    kw.setdefault("prefix", str(tmp_path / "units"))
    kw.setdefault("config_path", str(tmp_path / "etc" / "memwatchd.toml"))
    kw.setdefault("command", str(trusted / "bin" / "memwatchd"))
    kw.setdefault("code_paths", [str(trusted)])
    return install.plan_install(**kw)


# ------------------------------------------------------------- visibility

@pytest.mark.parametrize("command,option,value", [
    ("/root/venv/bin/memwatchd", "ProtectHome", "read-only"),
    ("/home/ann/.local/bin/memwatchd", "ProtectHome", "read-only"),
    ("/run/user/1000/venv/bin/memwatchd", "ProtectHome", "read-only"),
    ("/tmp/venv/bin/memwatchd", "PrivateTmp", "no"),
    ("/var/tmp/venv/bin/memwatchd", "PrivateTmp", "no"),
])
def test_an_install_the_sandbox_hides_gets_exactly_that_option_relaxed(command, option, value, tmp_path):
    changes, notes = install.sandbox_changes([command])
    assert changes == {option: value}
    assert len(notes) == 1 and option in notes[0] and command in notes[0]
    unit = install.render_unit(SHIPPED, command, changes=changes)
    svc = service(unit)
    assert svc[option] == [value]
    assert svc["ExecStart"] == [f"{command} run"]
    # Nothing else moved: only ExecStart, the relaxed option and its comment differ.
    assert {line.split("=")[0] for line in changed_lines(unit) if not line.startswith("#")} == {
        "ExecStart", option}
    assert verify_problems(unit, "memwatchd.service", tmp_path) == ""


@pytest.mark.parametrize("command", ["/opt/memwatchd/bin/memwatchd", "/usr/local/bin/memwatchd",
                                     "/usr/bin/python3 -m memwatchd"])
def test_an_install_the_sandbox_does_not_hide_keeps_the_shipped_sandbox(command):
    changes, notes = install.sandbox_changes([command.split()[0]])
    assert changes == {} and notes == []
    unit = install.render_unit(SHIPPED, command)
    assert {line.split("=")[0] for line in changed_lines(unit)} <= {"ExecStart"}
    assert service(unit)["ProtectHome"] == ["yes"] and service(unit)["PrivateTmp"] == ["yes"]


def test_a_config_under_root_relaxes_protecthome_too(tmp_path, trusted):
    p = plan(tmp_path, trusted, config_path="/root/memwatchd.toml")
    unit = p.files[0].content
    assert service(unit)["ProtectHome"] == ["read-only"]
    assert service(unit)["ExecStart"] == [f"{trusted}/bin/memwatchd run --config /root/memwatchd.toml"]


@pytest.mark.parametrize("path,option", [("/dev/shm/venv/bin/memwatchd", "PrivateDevices="),
                                         ("/proc/1/root/venv/bin/memwatchd", "ProtectKernelTunables=")])
def test_an_install_hidden_beyond_repair_is_refused_naming_the_option(path, option):
    with pytest.raises(MemwatchdError, match=option):
        install.sandbox_changes([path])


# ------------------------------------------------------------- ExecStart

def test_config_goes_into_execstart_quoted_for_systemd(tmp_path, trusted):
    default = plan(tmp_path, trusted, config_path=install.CONFIG_PATH, root=str(tmp_path / "img"),
                   prefix=None)
    assert service(default.files[0].content)["ExecStart"] == [f"{trusted}/bin/memwatchd run"]
    odd = "/etc/memwatchd/prod 100%$HOME.toml"
    p = plan(tmp_path, trusted, config_path=odd, root=str(tmp_path / "img"), prefix=None)
    exec_start = service(p.files[0].content)["ExecStart"][0]
    assert exec_start == f'{trusted}/bin/memwatchd run --config "/etc/memwatchd/prod 100%%$$HOME.toml"'
    assert verify_problems(p.files[0].content, "memwatchd.service", tmp_path) == ""
    with pytest.raises(MemwatchdError, match="control characters"):
        install.systemd_quote("/etc/a\nb")


# ------------------------------------------------------------- --root, --force, diff

def test_root_installs_into_an_image_and_nothing_is_overwritten_without_force(tmp_path, trusted):
    img = tmp_path / "img"
    p = plan(tmp_path, trusted, prefix=None, root=str(img), config_path=install.CONFIG_PATH)
    assert not p.reload_systemd
    install.install_units(p)
    unit = img / "etc/systemd/system/memwatchd.service"
    config = img / "etc/memwatchd/memwatchd.toml"
    assert unit.read_text() == p.files[0].content and oct(unit.stat().st_mode & 0o777) == "0o644"
    assert config.read_text() == install.shipped("memwatchd.toml")
    assert oct(config.stat().st_mode & 0o777) == "0o600"

    # The same again: nothing to do.
    again = plan(tmp_path, trusted, prefix=None, root=str(img), config_path=install.CONFIG_PATH)
    assert [f.state for f in again.files] == ["unchanged"] and again.kept == [str(config)]

    # Someone's edits: the unit is refused, the config kept, both untouched.
    unit.write_text(unit.read_text().replace("WatchdogSec=30s", "WatchdogSec=45s"))
    config.write_text("# mine\n")
    with pytest.raises(MemwatchdError, match="--force"):
        plan(tmp_path, trusted, prefix=None, root=str(img), config_path=install.CONFIG_PATH)
    assert "WatchdogSec=45s" in unit.read_text() and config.read_text() == "# mine\n"

    # --force replaces both and keeps the old ones beside them.
    forced = plan(tmp_path, trusted, prefix=None, root=str(img), config_path=install.CONFIG_PATH,
                  force=True)
    assert [f.state for f in forced.files] == ["differs", "differs"]
    assert "-WatchdogSec=45s" in forced.files[0].diff() and "+WatchdogSec=30s" in forced.files[0].diff()
    backups = install.install_units(forced)
    assert sorted(backups) == sorted([str(unit) + ".old", str(config) + ".old"])
    assert "WatchdogSec=30s" in unit.read_text()
    assert "WatchdogSec=45s" in Path(str(unit) + ".old").read_text()
    assert Path(str(config) + ".old").read_text() == "# mine\n"


def test_cli_dry_run_shows_a_diff_and_writes_nothing(tmp_path, trusted, monkeypatch):
    monkeypatch.setattr(install, "installation_paths", lambda: [str(trusted)])
    monkeypatch.setattr(install, "memwatchd_command", lambda: str(trusted / "bin" / "memwatchd"))
    img = tmp_path / "img"
    r = runner.invoke(app, ["install-units", "--root", str(img), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "would write" in r.output and f"+ExecStart={trusted}/bin/memwatchd run" in r.output
    assert not img.exists()
    assert runner.invoke(app, ["install-units", "--root", str(img)]).exit_code == 0
    unit = img / "etc/systemd/system/memwatchd.service"
    unit.write_text(unit.read_text().replace("RestartSec=2s", "RestartSec=9s"))
    r = runner.invoke(app, ["install-units", "--root", str(img)])
    assert r.exit_code == 1 and "--force" in r.output and "RestartSec=9s" in unit.read_text()
    r = runner.invoke(app, ["install-units", "--root", str(img), "--dry-run", "--force"])
    assert r.exit_code == 0 and "-RestartSec=9s" in r.output and "+RestartSec=2s" in r.output
    assert "keeping existing" not in r.output and "RestartSec=9s" in unit.read_text()
    r = runner.invoke(app, ["install-units", "--root", str(img)])
    assert r.exit_code == 1          # the dry run changed nothing


# ------------------------------------------------------------- who may change the code

@pytest.mark.parametrize("spoil", ["file-world-writable", "dir-group-writable", "file-not-root",
                                   "parent-world-writable"])
def test_code_that_others_can_change_is_refused(tmp_path, trusted, spoil):
    target = {"file-world-writable": trusted / "lib" / "memwatchd" / "__init__.py",
              "dir-group-writable": trusted / "lib" / "memwatchd",
              "file-not-root": trusted / "bin" / "memwatchd",
              "parent-world-writable": trusted}[spoil]
    if spoil == "file-not-root":
        os.chown(target, 65534, 65534)
    else:
        target.chmod(target.stat().st_mode | (0o002 if "world" in spoil else 0o020))
    with pytest.raises(InsecureConfigError, match=str(target)):
        plan(tmp_path, trusted)
    assert not (tmp_path / "units").exists()
    p = plan(tmp_path, trusted, insecure=True)
    assert p.warnings and str(target) in p.warnings[0] and "INSECURE" in p.warnings[0]


def test_a_sticky_world_writable_directory_above_is_fine(tmp_path, trusted):
    tmp_path.chmod(0o1777)            # like /tmp
    assert install.code_problems([str(trusted)]) == []


def test_cli_refuses_insecure_code_and_insecure_says_so_loudly(tmp_path, trusted, monkeypatch):
    monkeypatch.setattr(install, "installation_paths", lambda: [str(trusted)])
    monkeypatch.setattr(install, "memwatchd_command", lambda: str(trusted / "bin" / "memwatchd"))
    (trusted / "lib" / "memwatchd" / "__init__.py").chmod(0o666)
    img = tmp_path / "img"
    r = runner.invoke(app, ["install-units", "--root", str(img)])
    assert r.exit_code == 3 and "__init__.py" in r.output and "--insecure" in r.output
    assert not img.exists()
    r = runner.invoke(app, ["install-units", "--root", str(img), "--insecure"])
    assert r.exit_code == 0 and "WARNING: INSECURE" in r.output
    assert (img / "etc/systemd/system/memwatchd.service").exists()


def test_this_installation_is_checked_for_real():
    """The paths the CLI checks by default are the interpreter and memwatchd's own files."""
    import sys

    import memwatchd
    paths = install.installation_paths()
    assert os.path.realpath(sys.executable) in paths
    assert os.path.dirname(os.path.realpath(memwatchd.__file__)) in paths
