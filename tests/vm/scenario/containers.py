#!/usr/bin/python3
"""Guest side of tests/vm/test_vm_containers.py (issue 12): Docker containers, one boot.

    containers.py protected RESULTS.json   memwatchd (install-units) with container watches
    containers.py baseline RESULTS.json    the same containers, no memwatchd

Setup: Debian's docker.io (disabled at boot in the image) started with a daemon.json for
a guest without network (no bridge, no iptables, vfs storage); an image imported
offline from a tarball (busybox-static as /bin, the guest's /usr bind-mounted read-only
for python3 and hog.py). AppArmor is enabled in Debian's kernel but the image has no
apparmor_parser, so containers run with apparmor=unconfined (a real host has the profile).

  runaway  sim-a (a hog heading for 1.4 GiB, PID 1 of its container: SIGTERM from outside
           is ignored, so only the cgroup kill stops it) and sim-b (steady, 48 MiB), both
           --restart=always, watched by container = "sim-*", limit 300M: sim-a is stopped
           again and again (a restart storm, counted per container name), sim-b, the
           bystander service and the heartbeat are untouched, no OOM kill anywhere
  capped   cap-a with --memory=400m and --init, watched with limit = "90%": SIGTERM at
           360 MiB, before the kernel's OOM killer inside it (memory.events oom_kill 0)

Reuses driver.py's helpers (journal, heartbeat, checks). Standard library only.
"""
import json
import os
import re
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import driver  # noqa: E402
from driver import (CONFIG, EVENTS, LIB, MIB, RUN, Heartbeat, journal, meminfo, mono,  # noqa: E402
                    read_events, run, vmstat_oom_kills, wait_for, wall_to_mono, write_file)

IMAGE = "mwtest:1"
TEXTFILE = "/var/lib/node_exporter/textfile/memwatchd.prom"
LOGS = RUN + "/containers"
DAEMON_JSON = {"bridge": "none", "iptables": False, "ip6tables": False,
               "storage-driver": "vfs", "log-driver": "none"}
COMMON = ["--network=none", "--security-opt", "apparmor=unconfined",
          "-v", "/usr:/usr:ro", "-v", LIB + ":/scenario:ro", "-v", LOGS + ":/log"]
# The runaway: a child (busybox sleep) and the hog exec'd as the container's PID 1.
# Its time cap: 40 s with memwatchd (stopped at 300M long before), 150 s without it, so
# that the kernel, not the cap, ends it in the baseline even on a slow TCG guest.
SIM_A = ["/bin/sh", "-c", "sleep 1000 & exec /usr/bin/python3 /scenario/hog.py --rate-mb 100 "
         "--max-mb 1400 --max-seconds %d --delay 1 --log /log/sim-a.log"]
SIM_B = ["/usr/bin/python3", "/scenario/hog.py", "--hold-mb", "48", "--max-seconds", "900"]
CAP_A = ["/usr/bin/python3", "/scenario/hog.py", "--rate-mb", "50", "--max-mb", "600",
         "--max-seconds", "40", "--delay", "1", "--log", "/log/cap-a.log"]
STOPS_WANTED = 3          # sim-a's signals recorded (a storm), with 2 restarts by Docker

CONFIG_CONTAINERS = """\
[daemon]
events = "{events}"

[metrics]
textfile = "{textfile}"

[[watch]]
name = "sims"
container = "sim-*"
limit = "300M"
grace = "2s"

[[watch]]
name = "capped"
container = "cap-*"
limit = "90%"
grace = "5s"
"""


def docker(*args, timeout=120, check=False):
    return run("docker", *args, timeout=timeout, check=check)


def docker_meta(cid):
    """Docker's own record of a container (the file memwatchd reads its name from): polling
    it costs nothing, where each `docker inspect` is a Go program started under TCG."""
    try:
        with open("/var/lib/docker/containers/%s/config.v2.json" % cid) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def scope_of(cid):
    return "/system.slice/docker-%s.scope" % cid


def oom_kill_count(cgroup):
    text = read_text("/sys/fs/cgroup%s/memory.events" % cgroup)
    if text is None:
        return None
    return dict(line.split() for line in text.splitlines()).get("oom_kill")


def kernel_oom_lines(since):
    return [m for _, _, m in journal(kernel=True, since=since)
            if "out of memory" in m.lower() or "oom-kill" in m.lower() or "Killed process" in m]


class Containers(driver.Driver):

    # ---------------------------------------------------------------- setup

    def setup(self):
        facts = self.results["facts"]
        facts["kernel"] = os.uname().release
        facts["mem_total"] = self.mem_total
        os.makedirs(LOGS, exist_ok=True)
        write_file("/etc/docker/daemon.json", json.dumps(DAEMON_JSON) + "\n")
        t = mono()
        run("systemctl", "start", "docker.service", timeout=180, check=True)
        facts["dockerd_start_s"] = round(mono() - t, 1)
        facts["docker_version"] = docker("version", "-f", "{{.Server.Version}}").stdout.strip()
        root = RUN + "/rootfs"
        for d in ("bin", "usr", "tmp", "proc", "sys", "dev", "etc", "scenario", "log"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        shutil.copy("/bin/busybox", root + "/bin/busybox")
        for tool in ("sh", "sleep"):
            os.symlink("busybox", os.path.join(root, "bin", tool))
        for link in ("lib", "lib64"):
            os.symlink("usr/" + link, os.path.join(root, link))
        t = mono()
        proc = run("sh", "-c", "tar -C %s -c . | docker import - %s" % (root, IMAGE), timeout=120)
        facts["image_import_s"] = round(mono() - t, 1)
        self.check("the test image imports offline", proc.returncode == 0,
                   (proc.stdout + proc.stderr)[-500:])
        facts["mem_available_docker_idle"] = meminfo()["MemAvailable"]
        self.units = self.start_services("heartbeat.service", "bystander.service")

    def start_memwatchd(self):
        write_file(CONFIG, CONFIG_CONTAINERS.format(events=EVENTS, textfile=TEXTFILE), 0o600)
        os.makedirs(os.path.dirname(TEXTFILE), exist_ok=True)
        proc = run("memwatchd", "install-units", timeout=120)
        self.check("install-units succeeds (the container config kept)", proc.returncode == 0,
                   (proc.stdout + proc.stderr)[-1500:])
        t = mono()
        proc = run("systemctl", "enable", "--now", "memwatchd", timeout=120)
        self.results["facts"]["memwatchd_start_s"] = round(mono() - t, 1)
        self.check("memwatchd runs", proc.returncode == 0 and
                   driver.show("memwatchd.service", "SubState")["SubState"] == "running",
                   proc.stderr[-500:])

    def run_container(self, name, extra, argv):
        proc = docker("run", "-d", "--name", name, *extra, *COMMON, IMAGE, *argv)
        ok = self.check("docker run %s" % name, proc.returncode == 0,
                        (proc.stdout + proc.stderr)[-800:])
        return proc.stdout.strip() if ok else ""

    def decisions(self, container):
        return [r for r in read_events() if r.get("type") == "decision"
                and r.get("container") == container and r.get("action") != "warn"]

    def outcomes(self):
        return {r["id"]: r for r in read_events() if r.get("type") == "outcome"}

    # ------------------------------------------------------------- scenario 1

    def runaway(self, out, protected):
        oom_before, started = vmstat_oom_kills(), mono()
        sim_b = self.run_container("sim-b", ["--restart=always"], SIM_B)
        wait_for(lambda: docker_meta(sim_b).get("State", {}).get("Running"), 30)
        b_before = docker_meta(sim_b).get("State", {})
        sim_a = self.run_container("sim-a", ["--restart=always"],
                                   SIM_A[:2] + [SIM_A[2] % (40 if protected else 150)])
        out["sim_a_id"], out["sim_b_id"] = sim_a, sim_b
        t_run = mono()
        seen_pids = {}        # pid -> start time (field 22), every process sim-a ever had
        runs, peak, last_restart = [], 0, 0
        deadline = mono() + (150 if protected else 200)
        while mono() < deadline:
            procs = read_text("/sys/fs/cgroup%s/cgroup.procs" % scope_of(sim_a)) or ""
            for pid in procs.split():
                stat = read_text("/proc/%s/stat" % pid)
                if stat:
                    seen_pids[int(pid)] = stat.rsplit(")", 1)[1].split()[19]
            current = read_text("/sys/fs/cgroup%s/memory.current" % scope_of(sim_a))
            if current:
                peak = max(peak, int(current))
            meta = docker_meta(sim_a)
            state, restarts = meta.get("State", {}), meta.get("RestartCount", 0)
            if restarts != last_restart:
                runs.append(round(mono() - t_run, 2))
                last_restart = restarts
            if protected and len(self.decisions("sim-a")) >= STOPS_WANTED and restarts >= 2 \
                    and state.get("Running"):
                break
            if not protected and restarts >= 1:      # its first run ended, whoever ended it
                out["first_run_ended_after_s"] = round(mono() - t_run, 2)
                out["first_run_exit"] = {k: state.get(k) for k in ("ExitCode", "OOMKilled")}
                break
            time.sleep(0.2)
        t_end = mono()
        out["seconds_watched"] = round(t_end - t_run, 1)
        # While sim-a runs away and is stopped (the bound), apart from what the
        # checks below cost: each `memwatchd status`/`events` is a Python CLI under TCG.
        out["heartbeat_max_gap_runaway_s"] = Heartbeat.window(t_run, t_end)["max_gap_s"]
        out["sim_a_restart_count"] = docker_meta(sim_a).get("RestartCount")
        out["sim_a_restarts_at_s"] = runs
        out["sim_a_peak_current"] = peak
        out["sim_a_pids_seen"] = len(seen_pids)
        if protected:
            self.check_runaway_protected(out, sim_a, seen_pids, t_run)
        docker("update", "--restart=no", "sim-a")
        docker("kill", "sim-a")
        wait_for(lambda: not docker_meta(sim_a).get("State", {}).get("Running"), 30)
        b_after = docker_meta(sim_b).get("State", {})
        out["oom_kills"] = vmstat_oom_kills() - oom_before
        out["kernel_oom_lines"] = kernel_oom_lines(started)[:12]
        beat = Heartbeat.window(t_run, mono())
        out["heartbeat_max_gap_s"] = beat["max_gap_s"]
        out["heartbeat_max_gap_after_start_s"] = round(beat["max_gap_at"] - t_run, 2) \
            if beat.get("max_gap_at") else None
        out["sim_b_untouched"] = (b_after.get("Running") and b_after.get("Pid") == b_before.get("Pid")
                                  and docker_meta(sim_b).get("RestartCount") == 0)
        out["bystander_untouched"] = self.service_alive("bystander.service",
                                                        self.units["bystander.service"])[0]
        if protected:
            self.check("sim-b untouched (same pid, no restart)", out["sim_b_untouched"],
                       json.dumps(b_after)[:400])
            self.check("the bystander service untouched", out["bystander_untouched"])
            self.check("heartbeat never paused over 1 s while sim-a ran away and was stopped",
                       out["heartbeat_max_gap_runaway_s"] is not None
                       and out["heartbeat_max_gap_runaway_s"] <= 1.0,
                       str(out["heartbeat_max_gap_runaway_s"]))
            self.check("heartbeat never paused over 2 s in the whole scenario (CLI checks, "
                       "docker kill/rm included)", out["heartbeat_max_gap_s"] is not None
                       and out["heartbeat_max_gap_s"] <= 2.0, str(out["heartbeat_max_gap_s"]))
            self.check("no kernel OOM kill anywhere (vmstat, kernel log)",
                       out["oom_kills"] == 0 and not out["kernel_oom_lines"],
                       json.dumps(out["kernel_oom_lines"][:4]))
        docker("rm", "-f", "sim-a", "sim-b")

    def check_runaway_protected(self, out, sim_a, seen_pids, t_run):
        decisions = self.decisions("sim-a")
        outcomes = self.outcomes()
        first_term = decisions[0] if decisions else {}
        out["decisions"] = [{k: d.get(k) for k in ("time", "action", "signal", "reason", "usage_bytes",
                                                    "cgroup", "container")} for d in decisions]
        out["first_stop_after_start_s"] = round(wall_to_mono(first_term["time"]) - t_run, 2) \
            if first_term else None
        self.check("sim-a stopped %d times, each record naming container sim-a and its scope"
                   % STOPS_WANTED,
                   len(decisions) >= STOPS_WANTED and all(
                       d["cgroup"] == scope_of(sim_a) for d in decisions),
                   json.dumps(out["decisions"])[:1500])
        others = [r for r in read_events() if r.get("type") == "decision"
                  and r.get("container") != "sim-a" and r.get("action") != "warn"]
        self.check("nothing else was acted on", not others, json.dumps(others)[:800])
        exits = [outcomes.get(d["id"], {}) for d in decisions]
        out["outcomes"] = [{k: o.get(k) for k in ("exited", "seconds_to_exit", "escalated", "detail")}
                           for o in exits]
        self.check("each run stopped: all of sim-a's processes exited (outcome exited)",
                   sum(1 for o in exits if o.get("exited")) >= 2, json.dumps(out["outcomes"]))
        kills = [d for d in decisions if d.get("signal") == "SIGKILL"]
        self.check("sim-a's PID 1 ignores SIGTERM: the cgroup kill ends it",
                   bool(kills), json.dumps(out["decisions"])[:600])
        # Every process of an earlier run (not in the running container now) is gone:
        # the same pid with the same start time would be a survivor.
        now_in = set((read_text("/sys/fs/cgroup%s/cgroup.procs" % scope_of(sim_a)) or "").split())
        earlier = {p: st for p, st in seen_pids.items() if str(p) not in now_in}
        alive = [p for p, st in earlier.items()
                 if ((read_text("/proc/%d/stat" % p) or ")").rsplit(")", 1)[1].split()[19:20]
                     == [st])]
        self.check("no process of sim-a's stopped runs outlived its stop (%d seen, 2 per run)"
                   % len(earlier), len(earlier) >= 4 and not alive, "alive: %s" % alive)
        self.check("Docker restarted sim-a after each stop (RestartCount)",
                   (out["sim_a_restart_count"] or 0) >= 2, str(out["sim_a_restart_count"]))
        # The storm is visible where a sysadmin looks: status, metrics, events, journal.
        row = wait_for(lambda: next((r for r in self.state_rows() if r.get("container") == "sim-a"
                                     and (r.get("actions_last_hour") or 0) >= STOPS_WANTED - 1),
                                    None), 15, interval=0.5)
        out["status_row"] = row
        self.check("status: the sim-a row counts its stops across restarts", row is not None,
                   json.dumps(self.state_rows())[:800])
        # sim-a has a row only while it runs (between a stop and Docker's restart it has none)
        shown = []

        def status_row():
            shown[:] = [run("memwatchd", "status", timeout=120).stdout]
            return re.search(r"sims +container +sim-a .* in the last hour", shown[0])
        row_text = wait_for(status_row, 40, interval=0.5)
        out["status_text"] = shown[0][-2000:] if shown else ""
        self.check("`memwatchd status` shows container sim-a and its stops in the last hour",
                   row_text is not None, out["status_text"][-800:])
        metric = wait_for(lambda: re.search(
            r'memwatchd_target_actions_last_hour\{id="sim-a",target="sims"\} ([0-9.]+)',
            read_text(TEXTFILE) or ""), 15, interval=0.5)
        out["metric_actions_last_hour"] = float(metric.group(1)) if metric else None
        self.check("metrics: memwatchd_target_actions_last_hour{id=\"sim-a\"} >= 2",
                   metric is not None and float(metric.group(1)) >= STOPS_WANTED - 1,
                   (read_text(TEXTFILE) or "")[-1200:])
        events = run("memwatchd", "events").stdout
        out["events_text"] = events[-1500:]
        self.check("`memwatchd events` names container sim-a", "container sim-a" in events,
                   events[-600:])
        logged = [m for _, _, m in journal("memwatchd.service") if "container sim-a" in m]
        out["journal_lines"] = logged[:6]
        self.check("the journal names container sim-a", bool(logged))

    def state_rows(self):
        """The targets of the state file (what `status --json` prints), read directly."""
        try:
            return json.loads(read_text("/run/memwatchd/state.json") or "").get("targets") or []
        except ValueError:
            return []

    # ------------------------------------------------------------- scenario 2

    def capped(self, out, protected):
        oom_before, started = vmstat_oom_kills(), mono()
        cid = self.run_container("cap-a", ["--memory=400m", "--init"], CAP_A)
        t_run, last_oom, peak = mono(), None, 0
        cg = scope_of(cid)
        out["memory_max"] = read_text("/sys/fs/cgroup%s/memory.max" % cg)
        deadline = mono() + 90
        while mono() < deadline:
            count = oom_kill_count(cg)
            if count is not None:
                last_oom = count
            current = read_text("/sys/fs/cgroup%s/memory.current" % cg)
            if current:
                peak = max(peak, int(current))
            if not docker_meta(cid).get("State", {}).get("Running") and mono() - t_run > 5:
                break
            time.sleep(0.05)
        state = docker_meta(cid).get("State", {})
        out["ended_after_s"] = round(mono() - t_run, 2)
        out["oom_kill_in_container"] = last_oom
        out["docker_oom_killed"] = state.get("OOMKilled")
        out["exit_code"] = state.get("ExitCode")
        out["peak_current"] = peak
        out["oom_kills"] = vmstat_oom_kills() - oom_before
        out["kernel_oom_lines"] = kernel_oom_lines(started)[:12]
        out["heartbeat_max_gap_s"] = Heartbeat.window(t_run, mono())["max_gap_s"]
        if protected:
            decisions = self.decisions("cap-a")
            out["decisions"] = [{k: d.get(k) for k in ("time", "signal", "reason", "usage_bytes",
                                                        "limit_bytes")} for d in decisions]
            first = decisions[0] if decisions else {}
            self.check("memory.max is 400m", (out["memory_max"] or "").strip() == str(400 * MIB),
                       str(out["memory_max"]))
            self.check("SIGTERM at 90% of the container's memory.max (360 MiB)",
                       first.get("signal") == "SIGTERM"
                       and first.get("limit_bytes") == int(400 * MIB * 0.9)
                       and first.get("container") == "cap-a", json.dumps(out["decisions"]))
            self.check("before the kernel's OOM killer: memory.events oom_kill stays 0",
                       last_oom == "0" and not out["docker_oom_killed"] and out["oom_kills"] == 0,
                       "oom_kill %s, OOMKilled %s, vmstat %s" % (last_oom, out["docker_oom_killed"],
                                                                 out["oom_kills"]))
            self.check("the SIGTERM ended it (tini forwards it: exit 143)",
                       out["exit_code"] == 143, str(out["exit_code"]))
        docker("rm", "-f", "cap-a")

    # ---------------------------------------------------------------- modes

    def protected(self):
        self.setup()
        self.start_memwatchd()
        self.scenario("runaway", lambda out: self.runaway(out, True))
        self.scenario("capped", lambda out: self.capped(out, True))
        self.scenario("no_runtime_noise", self.journal_checks)

    def baseline(self):
        self.setup()
        self.scenario("runaway", lambda out: self.runaway(out, False))
        self.scenario("capped", lambda out: self.capped(out, False))

    def journal_checks(self, out):
        lines = [m for _, _, m in journal("memwatchd.service")]
        out["memwatchd_warnings"] = [m for _, p, m in journal("memwatchd.service") if p <= 4][:10]
        self.check("memwatchd said nothing about a missing runtime",
                   not any("no container runtime" in m or "not running" in m for m in lines),
                   json.dumps(out["memwatchd_warnings"]))
        self.check("memwatchd still running, never restarted",
                   driver.show("memwatchd.service", "NRestarts")["NRestarts"] == "0")


if __name__ == "__main__":
    sys.exit(driver.main(Containers))
