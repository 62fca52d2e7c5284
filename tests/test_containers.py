"""Issue 12: `container = "glob"` watches, resolved on fake trees laid out like
/var/lib/docker and a cgroup v2 /sys/fs/cgroup (this host runs no Docker and has
cgroup v1 for memory; the real thing is tests/vm/test_vm_containers.py)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from memwatchd import containers, state, targets as targets_mod
from memwatchd.config import ConfigError, parse_config
from memwatchd.targets import TargetSet

IDS = {name: (c * 64) for name, c in (("sim-a", "a"), ("sim-b", "b"), ("web", "c"))}


class Tree:
    """A cgroup v2 root and a Docker root in tmp_path."""

    def __init__(self, tmp_path, monkeypatch):
        self.cg = tmp_path / "cgroup"
        self.docker = tmp_path / "docker"
        self.run = tmp_path / "run"
        self.proc = tmp_path / "proc"
        for d in (self.cg, self.docker / "containers", self.run, self.proc):
            d.mkdir(parents=True)
        (self.cg / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        monkeypatch.setattr(targets_mod, "SYSTEMD_RUNTIME_DIR", str(self.cg), raising=False)
        monkeypatch.setattr(containers, "DOCKER_ROOT", str(self.docker))
        monkeypatch.setattr(containers, "PODMAN_ROOT", str(tmp_path / "no-podman"))
        monkeypatch.setattr(containers, "RUN_ROOT", str(self.run))
        monkeypatch.setattr(containers, "PROC_ROOT", str(self.proc))
        self.dockerd(True)

    def dockerd(self, running):
        pidfile = self.run / "docker.pid"
        if running:
            pidfile.write_text("4242")
            (self.proc / "4242").mkdir(exist_ok=True)
            (self.proc / "4242" / "comm").write_text("dockerd\n")
        elif pidfile.exists():
            pidfile.unlink()

    def start(self, name, cid=None, memory_max="max", place="system.slice/docker-%s.scope",
              meta_name=None):
        cid = cid or IDS[name]
        meta = self.docker / "containers" / cid
        meta.mkdir(exist_ok=True)
        (meta / "config.v2.json").write_text(json.dumps(
            {"ID": cid, "Name": "/" + name if meta_name is None else meta_name,
             "State": {"Running": True}}))
        cg = self.cg / (place % cid)
        cg.mkdir(parents=True, exist_ok=True)
        (cg / "memory.current").write_text("%d\n" % (100 << 20))
        (cg / "memory.max").write_text(memory_max + "\n")
        return "/" + place % cid

    def stop(self, name, cid=None, remove=False, place="system.slice/docker-%s.scope"):
        cid = cid or IDS[name]
        shutil.rmtree(self.cg / (place % cid))
        if remove:
            shutil.rmtree(self.docker / "containers" / cid)

    def targets(self, watches):
        cfg = parse_config({"daemon": {"events": "", "state": ""}, "guard": {"enabled": False},
                            "watch": watches}, "containers-test")
        return TargetSet(cfg, cgroup_root=str(self.cg))


@pytest.fixture
def tree(tmp_path, monkeypatch):
    return Tree(tmp_path, monkeypatch)


def watch(glob="sim-*", limit="300M", **kw):
    return dict(name="sims", container=glob, limit=limit, **kw)


def names(ts):
    return sorted((t.container, t.cgroup) for t in ts.targets.values())


def test_glob_selects_running_containers_by_name_and_maps_to_their_scopes(tree):
    a, b = tree.start("sim-a"), tree.start("sim-b")
    tree.start("web")
    ts = tree.targets([watch()])
    added = ts.refresh(0.0)
    assert sorted(t.container for t in added) == ["sim-a", "sim-b"]
    assert names(ts) == [("sim-a", a), ("sim-b", b)]
    assert all(t.is_cgroup and t.watch.scope == "cgroup" for t in added)
    assert ts.problems == []


def test_started_stopped_and_recreated_containers_are_followed(tree):
    ts = tree.targets([watch()])
    assert ts.refresh(0.0) == []
    a = tree.start("sim-a")
    assert [t.container for t in ts.refresh(targets_mod.RESCAN_INTERVAL)] == ["sim-a"]

    # Docker restarts it (--restart=always): same id, the scope removed and made again.
    # Between rescans it is found with one stat, like a restarted unit.
    (key,) = ts.targets
    tree.stop("sim-a")
    ts.drop(key)                                   # the sampler found it gone
    tree.start("sim-a")
    back = ts.refresh(targets_mod.RESCAN_INTERVAL + 0.1)
    assert [(t.container, t.cgroup) for t in back] == [("sim-a", a)]

    # `docker rm -f sim-a && docker run --name sim-a`: a new id, a new scope.
    tree.stop("sim-a", remove=True)
    new = tree.start("sim-a", cid="d" * 64)
    again = ts.refresh(2 * targets_mod.RESCAN_INTERVAL + 0.2)
    assert [(t.container, t.cgroup) for t in again] == [("sim-a", new)]
    assert names(ts) == [("sim-a", new)]
    assert [t.cgroup for t in ts.vanished] == [a]


def test_a_renamed_container_leaves_or_joins_the_watch(tree):
    tree.start("sim-a")
    ts = tree.targets([watch()])
    ts.refresh(0.0)
    meta = tree.docker / "containers" / IDS["sim-a"] / "config.v2.json"
    data = json.loads(meta.read_text())
    data["Name"] = "/web-2"                          # docker rename sim-a web-2
    meta.write_text(json.dumps(data))
    os.utime(meta, ns=(1, 10**18))                   # mtime changed, whatever the clock says
    assert ts.refresh(targets_mod.RESCAN_INTERVAL) == [] and ts.targets == {}


def test_a_percent_limit_is_of_the_containers_memory_max(tree):
    tree.start("sim-a", memory_max=str(400 << 20))   # docker run --memory=400m
    tree.start("sim-b")                              # no --memory: of MemTotal
    ts = tree.targets([watch(limit="90%")])
    ts.refresh(0.0)
    readings, _ = ts.sample_due(0.0, force=True)
    limits = {ts.targets[r.key].container: r.limit for r in readings}
    assert limits["sim-a"] == int((400 << 20) * 0.9)
    assert limits["sim-b"] == int(ts.mem_total * 0.9)
    ceiling = {ts.targets[r.key].container: r.ceiling for r in readings}
    assert ceiling == {"sim-a": 400 << 20, "sim-b": None}


def test_cgroupfs_driver_and_podman_scopes_resolve_too(tree, tmp_path, monkeypatch):
    fs = tree.start("sim-a", place="docker/%s")
    podman = tmp_path / "podman"
    (podman / "overlay-containers").mkdir(parents=True)
    pid = "e" * 64
    (podman / "overlay-containers" / "containers.json").write_text(
        json.dumps([{"id": pid, "names": ["sim-p"]}, {"id": "f" * 64, "names": ["other"]}]))
    monkeypatch.setattr(containers, "PODMAN_ROOT", str(podman))
    cg = tree.cg / "machine.slice" / ("libpod-%s.scope" % pid)
    cg.mkdir(parents=True)
    (cg / "memory.current").write_text("1\n")
    (cg / "memory.max").write_text("max\n")
    ts = tree.targets([watch()])
    ts.refresh(0.0)
    assert names(ts) == [("sim-a", fs), ("sim-p", "/machine.slice/libpod-%s.scope" % pid)]


def test_no_runtime_or_a_stopped_dockerd_is_said_once_and_the_rest_runs(tree, tmp_path,
                                                                       monkeypatch):
    tree.dockerd(False)
    ts = tree.targets([watch(), dict(name="unit-ish", cgroup="/system.slice/x.service",
                                     limit="1G")])
    (tree.cg / "system.slice" / "x.service").mkdir(parents=True)
    (tree.cg / "system.slice" / "x.service" / "memory.current").write_text("1\n")
    added = ts.refresh(0.0)
    assert [t.cgroup for t in added] == ["/system.slice/x.service"]   # the other watch works
    (problem,) = ts.problems
    assert "watch sims (container sim-*)" in problem and "dockerd is not running" in problem
    ts.problems.clear()
    ts.refresh(targets_mod.RESCAN_INTERVAL)
    assert ts.problems == []                                          # once

    monkeypatch.setattr(containers, "DOCKER_ROOT", str(tmp_path / "nothing"))
    ts2 = tree.targets([watch()])
    ts2.refresh(0.0)
    (problem,) = ts2.problems
    assert "no container runtime here" in problem


def test_hostile_metadata_matches_nothing_and_never_raises(tree):
    tree.start("sim-a")
    big = tree.docker / "containers" / IDS["sim-a"] / "config.v2.json"
    big.write_text('{"Name": "/sim-a", "pad": "%s"}' % ("x" * (containers.METADATA_MAX + 1)))
    tree.start("sim-b", meta_name=["not", "a", "string"])
    cid = "9" * 64
    (tree.docker / "containers" / cid).mkdir()
    os.symlink("/etc/shadow", tree.docker / "containers" / cid / "config.v2.json")
    (tree.cg / "system.slice" / ("docker-%s.scope" % cid)).mkdir()
    (tree.cg / "system.slice" / "docker-NOTHEX.scope").mkdir()
    ts = tree.targets([watch("*a*")])
    assert ts.refresh(0.0) == []
    text = "\n".join(ts.problems)
    assert "longer than" in text and "names no container" in text and "cannot read" in text
    assert "NOTHEX" not in text


def test_container_names_are_escaped_in_views(tree):
    tree.start("sim-a")
    ts = tree.targets([watch()])
    (t,) = ts.refresh(0.0)
    t.container = "sim-\x1b[31mred\n"          # as if Docker allowed it
    view = state.target_view(t, 0.0)
    assert view["container"] == view["id"] == "sim-\\x1b[31mred\\x0a"
    assert state.action_key({"target": "sims", "container": "sim-a", "cgroup": "/x"}) == \
        ("sims", "sim-a")


@pytest.mark.parametrize("value, needle", [
    ("", "container name or glob"),
    ("/sim-a", 'without the "/": "sim-a"'),
    ("sim a", "container name or glob"),
    ("sim;rm -rf /", "container name or glob"),
    (7, "container name or glob"),
    ("*", "every container"),
    ("x" * 129, "at most 128"),
])
def test_bad_container_values_name_file_key_and_value(value, needle):
    with pytest.raises(ConfigError) as e:
        parse_config({"watch": [{"name": "c", "container": value, "limit": "1G"}]}, "/etc/m.toml")
    text = str(e.value)
    assert "/etc/m.toml" in text and "watch[0].container" in text and needle in text


def test_container_watch_needs_scope_cgroup():
    with pytest.raises(ConfigError, match="scope must be cgroup"):
        parse_config({"watch": [{"name": "c", "container": "a", "limit": "1G",
                                 "scope": "tree"}]}, "m.toml")
    cfg = parse_config({"watch": [{"name": "c", "container": "sim-[ab]", "limit": "90%",
                                   "action": "throttle"}]}, "m.toml")
    assert cfg.watches[0].scope == "cgroup" and cfg.watches[0].kind == "container"


def test_daemon_import_path_does_not_load_containers_without_a_container_watch(tmp_path):
    code = ("import sys; from memwatchd import daemon, targets; from memwatchd.config import "
            "parse_config; ts = targets.TargetSet(parse_config({'watch': [{'name': 'u', "
            "'cgroup': '/x', 'limit': '1G'}]}, 't')); ts.refresh(0.0); "
            "print('memwatchd.containers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_status_table_and_events_table_name_the_container():
    from rich.console import Console

    from memwatchd import status

    record = {"type": "decision", "time": "2026-12-01T12:35:38.616Z", "target": "sims",
              "pid": None, "cgroup": "/system.slice/docker-%s.scope" % ("a" * 64),
              "container": "sim-a", "usage_bytes": 303 << 20, "limit_bytes": 300 << 20,
              "reason": "over-limit", "action": "term", "signal": "SIGTERM", "id": "1-0"}
    console = Console(width=200, record=True)
    console.print(status.events_table([record], now=0.0))
    text = console.export_text()
    assert "container sim-a" in text and "docker-aaaa" not in text
    assert str(status._what({"container": "sim-a"}, kind_shown=True)) == "sim-a"
