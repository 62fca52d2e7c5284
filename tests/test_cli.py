"""The command line: in-process with CliRunner (exit codes, help, bad input), and for real
(`memwatchd watch -- COMMAND` in a private PID namespace)."""
from __future__ import annotations

import json
import os
import sys

import pytest
from typer.testing import CliRunner

from memwatchd import __version__
from memwatchd.cli import EXIT_STOPPED_FOR_MEMORY, app

from .pidns import needs_pidns, run_scenario

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_version_and_help():
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.output
    r = invoke("--help")
    assert r.exit_code == 0
    for command in ("run", "watch", "check-config", "install-units"):
        assert command in r.output
    r = invoke("watch", "--help")
    assert r.exit_code == 0 and "Examples" in r.output and str(EXIT_STOPPED_FOR_MEMORY) in r.output


@pytest.mark.parametrize("args,needle", [
    (["watch", "--limit", "2X", "--", "true"], "--limit"),
    (["watch", "--limit", "1G", "--warn", "lots", "--", "true"], "--warn"),
    (["watch", "--limit", "1G", "--grace", "5", "--", "true"], "--grace"),
    (["watch", "--limit", "1G"], "either -- COMMAND"),
    (["watch", "--limit", "1G", "--pid", "1", "--", "true"], "either -- COMMAND"),
    (["watch", "--limit", "1G", "--action", "explode", "--", "true"], "action"),
    (["watch", "--limit", "1G", "--scope", "cgroup", "--", "true"], "scope"),
    (["watch", "--limit", "1G", "--no-such-flag", "--", "true"], "No such option"),
])
def test_bad_flags_exit_2_and_say_why(args, needle):
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.output


def test_bad_size_message_names_the_value():
    r = invoke("watch", "--limit", "12 parsecs", "--", "true")
    assert r.exit_code == 2 and "12 parsecs" in r.output


def test_check_config(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[[watch]]\nname = "a"\npid = 10\nlimit = "1G"\n')
    good.chmod(0o600)
    r = invoke("check-config", str(good))
    assert r.exit_code == 0 and "OK (1 watch" in r.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[[watch]]\nname = "a"\npid = 10\nlimit = "1 elephant"\n')
    bad.chmod(0o600)
    r = invoke("check-config", str(bad))
    assert r.exit_code == 2
    assert str(bad) in r.output and "watch[0].limit" in r.output and "1 elephant" in r.output
    good.chmod(0o666)
    r = invoke("check-config", str(good))
    assert r.exit_code == 3 and "writable" in r.output
    assert invoke("check-config", str(good), "--insecure").exit_code == 0
    r = invoke("check-config", str(tmp_path / "missing.toml"))
    assert r.exit_code == 2 and "missing.toml" in r.output


def test_watch_command_exit_status_passes_through():
    r = invoke("watch", "--limit", "1G", "--", sys.executable, "-c", "raise SystemExit(3)")
    assert r.exit_code == 3
    r = invoke("watch", "--limit", "1G", "--", sys.executable, "-c", "pass")
    assert r.exit_code == 0
    r = invoke("watch", "--limit", "1G", "--", "/nonexistent/cmd")
    assert r.exit_code == 127 and "cannot start" in r.output


def test_watch_pid_that_does_not_exist_exits_5():
    unused = next(p for p in range(4_194_000, 4_194_300) if not os.path.exists(f"/proc/{p}"))
    r = invoke("watch", "--limit", "1G", "--pid", str(unused))
    assert r.exit_code == 5 and "matched nothing" in r.output


def test_watch_unit_or_cgroup_says_what_the_host_lacks(monkeypatch, tmp_path):
    """Not "nothing matched": a host without systemd as PID 1, or whose /sys/fs/cgroup is
    not cgroup v2 with the memory controller, is named as the reason."""
    from memwatchd import targets as targets_mod
    monkeypatch.setattr(targets_mod, "SYSTEMD_RUNTIME_DIR", str(tmp_path / "none"), raising=False)
    r = invoke("watch", "--limit", "1G", "--unit", "sshd")
    assert r.exit_code == 5 and "--unit needs systemd as PID 1" in r.output, r.output
    monkeypatch.setattr(targets_mod, "cgroup_v2_memory", lambda root="": False, raising=False)
    r = invoke("watch", "--limit", "1G", "--cgroup", "/machine.slice/*")
    assert r.exit_code == 5, r.output
    assert "/sys/fs/cgroup is not cgroup v2 with the memory controller" in r.output
    assert "matched nothing" not in r.output


def test_watch_pid_exits_when_the_process_is_gone():
    import subprocess
    child = subprocess.Popen(["sleep", "0.5"])
    try:
        r = invoke("watch", "--limit", "1G", "--pid", str(child.pid))
    finally:
        child.wait()
    assert r.exit_code == 0, r.output


def test_install_units_dry_run_and_real(tmp_path):
    units, config = tmp_path / "units", tmp_path / "etc" / "memwatchd.toml"
    r = invoke("install-units", "--prefix", str(units), "--config", str(config), "--dry-run")
    assert r.exit_code == 0 and "would write" in r.output and "ExecStart=" in r.output
    assert not units.exists() and not config.exists()
    r = invoke("install-units", "--prefix", str(units), "--config", str(config))
    assert r.exit_code == 0, r.output
    unit = (units / "memwatchd.service").read_text()
    exec_line = next(l for l in unit.splitlines() if l.startswith("ExecStart="))
    assert "/usr/local/bin/memwatchd" not in exec_line and exec_line.endswith(" run")
    assert os.path.exists(exec_line.split("=", 1)[1].split()[0])
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert invoke("check-config", str(config)).exit_code == 0
    config.write_text("# mine\n")
    r = invoke("install-units", "--prefix", str(units), "--config", str(config))
    assert "keeping existing" in r.output and config.read_text() == "# mine\n"


def test_install_units_relaxes_protecthome_for_a_home_install():
    from memwatchd.install import render_unit, shipped
    unit = render_unit(shipped("memwatchd.service"), "/root/venv/bin/memwatchd")
    assert "ProtectHome=read-only" in unit and "ProtectHome=yes" not in unit
    assert "ExecStart=/root/venv/bin/memwatchd run" in unit
    unit = render_unit(shipped("memwatchd.service"), "/usr/bin/memwatchd")
    assert "ProtectHome=yes" in unit


# ------------------------------------------------------------------ for real

@needs_pidns
def test_watch_stops_a_hog_with_the_documented_status():
    r = run_scenario("""
p = subprocess.run([sys.executable, "-m", "memwatchd", "watch", "--limit", "100M", "--grace", "1s",
                    "--json", "--", sys.executable, "-c", HOG, "300", "400", "20", "ignore",
                    WORK + "/h.signals", "/x", "hog"], capture_output=True, text=True, timeout=40)
result(rc=p.returncode, out=p.stdout, err=p.stderr, signals=hog_signals("h"))
""")
    assert r["rc"] == EXIT_STOPPED_FOR_MEMORY, r["err"]
    assert "memwatchd: stopped" in r["err"] and "over its limit of 100 MiB" in r["err"]
    records = [json.loads(line) for line in r["out"].splitlines()]
    assert records[0]["type"] == "decision" and records[0]["signal"] == "SIGTERM"
    assert any(rec["type"] == "outcome" and rec["exited"] for rec in records)


@needs_pidns
def test_watch_leaves_a_well_behaved_command_alone():
    r = run_scenario("""
p = subprocess.run([sys.executable, "-m", "memwatchd", "watch", "--limit", "300M", "--",
                    sys.executable, "-c", HOG, "300", "60", "1.5", "exit", WORK + "/w.signals",
                    "/x", "calm"], capture_output=True, text=True, timeout=40)
result(rc=p.returncode, err=p.stderr, signals=hog_signals("w"))
""")
    assert r["rc"] == 0, r["err"]
    assert r["signals"] == [] and "stopped" not in r["err"]


@needs_pidns
def test_sigint_to_watch_reaches_the_command():
    r = run_scenario("""
code = "import signal, sys, time\\n" \\
       "signal.signal(signal.SIGINT, lambda *a: sys.exit(7))\\n" \\
       "print('ready', flush=True)\\n" \\
       "time.sleep(20)"
p = subprocess.Popen([sys.executable, "-m", "memwatchd", "watch", "--limit", "1G", "--",
                      sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
assert p.stdout.readline().strip() == "ready"
time.sleep(0.3)
os.kill(p.pid, signal.SIGINT)
rc = p.wait(10)
result(rc=rc)
""")
    assert r["rc"] == 7
