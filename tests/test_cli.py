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
    (["watch", "--limit", "1G"], "say what to watch: -- COMMAND, --pid PID"),
    (["watch", "--limit", "1G", "--pid", "1", "--", "true"], "-- COMMAND and --pid conflict"),
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
    assert "OK (1 watch," in invoke("check-config", str(good)).output   # "1 watch", not "watch(es)"
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
    assert "/usr/local/bin/memwatchd" not in exec_line and exec_line.endswith(f" run --config {config}")
    assert os.path.exists(exec_line.split("=", 1)[1].split()[0])
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert invoke("check-config", str(config)).exit_code == 0
    config.write_text("# mine\n")
    r = invoke("install-units", "--prefix", str(units), "--config", str(config))
    assert "keeping existing" in r.output and config.read_text() == "# mine\n"


# ------------------------------------------------------------------ for real

@needs_pidns
def test_watch_stops_a_hog_with_the_documented_status():
    r = run_scenario("""
records = open(WORK + "/records.jsonl", "w")
p = subprocess.run([sys.executable, "-m", "memwatchd", "watch", "--limit", "100M", "--grace", "1s",
                    "--json-fd", str(records.fileno()), "--", sys.executable, "-c", HOG, "300", "400",
                    "20", "ignore", WORK + "/h.signals", "/x", "hog"], capture_output=True, text=True,
                   timeout=40, pass_fds=(records.fileno(),))
records.close()
result(rc=p.returncode, out=p.stdout, err=p.stderr, signals=hog_signals("h"),
       records=open(WORK + "/records.jsonl").read())
""")
    assert r["rc"] == EXIT_STOPPED_FOR_MEMORY, r["err"]
    assert "memwatchd: stopped" in r["err"] and "over its limit of 100 MiB" in r["err"]
    assert '"type"' not in r["out"]            # the job's stdout is the job's alone
    records = [json.loads(line) for line in r["records"].splitlines()]
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


# ------------------------------------------------------------ first contact (issue 17)

COMMANDS = ("run", "check-config", "watch", "status", "events", "install-units", "record", "replay",
            "suggest")


def test_top_level_help_lists_every_command_whole_and_the_exit_statuses():
    r = invoke("--help")
    assert r.exit_code == 0
    listed = [line.split() for line in r.output.splitlines() if line.startswith("  ") and
              line.split() and line.split()[0] in COMMANDS]
    assert [words[0] for words in listed] == list(COMMANDS)
    assert not [w for w in listed if w[-1].endswith("...")]   # no truncated summary
    assert "--install-completion" not in r.output and "--show-completion" not in r.output
    for status in ("Exit status:", "  0 ", "  2 ", "  3 ", "  4 ", "  5 ", "  120 ", "128+N"):
        assert status in r.output, status
    assert invoke("-V").output == invoke("--version").output and __version__ in invoke("-V").output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_examples_and_plain_metavars(command):
    r = invoke(command, "--help")
    assert r.exit_code == 0 and "Examples:" in r.output
    assert "TEXT" not in r.output and "INTEGER" not in r.output and "PATH " not in r.output.split("Options:")[0]
    if command == "watch":
        for metavar in ("--pid PID", "--limit SIZE", "--grace DURATION", "--sustain DURATION", "[-- COMMAND...]"):
            assert metavar in r.output, metavar
        from memwatchd.config import _WATCH_DEFAULTS
        assert f"Default {_WATCH_DEFAULTS['grace']:g}s" in r.output   # one default, the config's


@pytest.mark.parametrize("args, says", [
    (["--limit", "0", "--", "true"], "--limit: a limit must be above zero, got \"0\""),
    (["--limit", "10", "--", "true"], "--limit: a bare number is ambiguous"),
    (["--limit", "512K", "--", "true"], "--limit: 512KiB is implausibly small"),
    (["--limit", "1G", "--warn", "2G", "--", "true"], "--warn: warn must be below limit"),
    (["--limit", "1G", "--sustain", "5", "--", "true"], "--sustain: a bare number is ambiguous"),
    (["--limit", "1G", "--interval", "0s", "--", "true"], "--interval: the interval must be above zero"),
    (["--limit", "1G", "--cmdline", "(["], "--cmdline: invalid regular expression"),
    (["--limit", "1G", "--pid", "abc"], "--pid 'abc': expected a process ID"),
    (["--limit", "1G", "--pid", "0"], "--pid '0': expected a process ID"),
    (["--limit", "1G", "--unit", "a", "--cgroup", "/b"], "--unit and --cgroup conflict"),
    (["--limit", "1G", "--pidfile", "/run/x.pid", "--cmdline", "x"], "--pidfile and --cmdline conflict"),
    (["--limit", "1G", "--action", "kill", "--grace", "3s", "--", "true"], "--grace conflicts with --action kill"),
    (["--limit", "1G", "--scope", "cgroup", "--pid", "1"], "--scope cgroup conflicts with --pid"),
    (["--limit", "1G", "--scope", "tree", "--unit", "x"], "--scope tree conflicts with --unit"),
    (["--limit", "1G", "--action", "throttle", "--", "true"], "--action throttle conflicts with -- COMMAND"),
    (["--limit", "1G", "--usage", "anon", "--pid", "1"], "--usage anon conflicts with --pid"),
    (["--limit", "1G", "--json", "--", "true"], "--json conflicts with -- COMMAND"),
    (["--limit", "1G", "-q", "-v", "--", "true"], "--quiet and --verbose conflict"),
    (["--limit", "1G", "--json-fd", "987", "--", "true"], "--json-fd 987: not an open file descriptor"),
])
def test_watch_errors_name_the_flags_the_user_typed(args, says):
    r = invoke("watch", *args)
    assert r.exit_code == 2, r.output
    assert says in r.output, r.output
    assert "watch[0]" not in r.output and "command line:" not in r.output and "daemon." not in r.output


def test_check_config_reports_every_error_each_on_its_own_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\ninterval = 5\n[[watch]]\nname = "a"\npid = "10"\nlimit = 5\n'
                   'action = "kill"\ngrace = "2s"\n')
    bad.chmod(0o600)
    r = invoke("check-config", str(bad))
    assert r.exit_code == 2
    lines = r.output.splitlines()
    for key in ("daemon.interval", "watch[0].pid", "watch[0].limit", "watch[0].grace"):
        assert sum(line.startswith(f"memwatchd: {bad}: {key}: ") for line in lines) == 1, (key, lines)
    assert 'got a string "10"' in r.output and "got an integer 5" in r.output


def test_check_config_says_when_it_checked_only_the_defaults(tmp_path, monkeypatch):
    from memwatchd import config
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    r = invoke("check-config")
    assert r.exit_code == 0
    assert f"no config file at {tmp_path / 'absent.toml'}: checked only the built-in defaults" in r.output
    assert "OK" not in r.output


def test_check_config_prints_warnings_and_still_passes(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[protect]\nnames = ["postgres"]\n')
    path.chmod(0o600)
    r = invoke("check-config", str(path))
    assert r.exit_code == 0 and "warning:" in r.output and "drops systemd, systemd-journal, sshd" in r.output


def test_the_shipped_example_passes_check_config_as_installed(tmp_path):
    """Copied where an admin puts it (root-owned, 0600): no --insecure, and its on_action
    program exists on a fresh machine."""
    import shutil
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "examples", "memwatchd.toml")
    target = tmp_path / "memwatchd.toml"
    shutil.copy(example, target)
    target.chmod(0o600)
    r = invoke("check-config", str(target))
    assert r.exit_code == 0, r.output
    assert "OK (6 watches, guard on)" in r.output


def test_watch_pidfile_and_cmdline_selectors(tmp_path):
    import subprocess
    import uuid
    marker = f"cli-probe-{uuid.uuid4().hex[:8]}"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.8)", marker])
    try:
        pidfile = tmp_path / "job.pid"
        pidfile.write_text(f"{child.pid}\n")
        r = invoke("watch", "--limit", "1G", "--pidfile", str(pidfile), "-v")
        assert r.exit_code == 0, r.output
        assert f"pid {child.pid}" in r.output
    finally:
        child.wait()
    r = invoke("watch", "--limit", "1G", "--cmdline", f"{marker}-none$")
    assert r.exit_code == 5 and "matched nothing" in r.output


@needs_pidns
def test_watch_pid_that_stops_its_target_exits_120_with_the_summary():
    r = run_scenario("""
hog = start_hog("pidhog", rate_mib=300, cap_mib=400, seconds=20, on_term="exit")
p = subprocess.run([sys.executable, "-m", "memwatchd", "watch", "--pid", str(hog.pid), "--limit", "100M",
                    "--grace", "1s"], capture_output=True, text=True, timeout=40)
stop(hog)
result(rc=p.returncode, err=p.stderr, out=p.stdout, pid=hog.pid)
""")
    assert r["rc"] == EXIT_STOPPED_FOR_MEMORY, r["err"]
    assert f"memwatchd: stopped pidhog (pid {r['pid']}) for memory: using" in r["err"]
    assert "over its limit of 100 MiB; sent SIGTERM" in r["err"]
    assert "<4>" not in r["err"] and "warning: " in r["err"]     # a pipe is no journal: words


def test_the_stopped_summary_names_each_target_with_its_peak_and_the_signals():
    from memwatchd.cli import stopped_summary
    MiB = 1 << 20
    rec = lambda pid, comm, usage, sig, cgroup=None: {
        "target": "t", "pid": pid, "comm": comm, "cgroup": cgroup, "usage_bytes": usage,
        "limit_bytes": 100 * MiB, "signal": sig}
    lines = stopped_summary([rec(7, "python3", 130 * MiB, "SIGTERM"), rec(7, "python3", 120 * MiB, "SIGKILL"),
                             rec(9, "bash", 101 * MiB, "SIGTERM"),
                             rec(None, None, 2 << 30, "SIGKILL", cgroup="/system.slice/x.service")],
                            started_as="/usr/bin/python3")
    assert lines == [
        "stopped python3 (pid 7) for memory: using 130 MiB, over its limit of 100 MiB; sent SIGTERM then SIGKILL",
        "stopped bash (pid 9, started as /usr/bin/python3) for memory: using 101 MiB, over its limit of 100 MiB; sent SIGTERM",
        "stopped cgroup /system.slice/x.service for memory: using 2 GiB, over its limit of 100 MiB; sent SIGKILL",
    ]


def test_watch_events_file_may_be_relative(tmp_path, monkeypatch):
    """`--events records.jsonl` is the user's path from here; the config underneath wants an
    absolute one, so the flag is resolved (it used to be refused as not absolute)."""
    monkeypatch.chdir(tmp_path)
    r = invoke("watch", "--limit", "1G", "--events", "records.jsonl", "--", sys.executable, "-c", "pass")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "records.jsonl").exists()
