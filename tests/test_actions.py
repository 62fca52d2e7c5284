"""actions: pidfd identity and signalling, process trees, cgroup writes, on_action programs.

Safety on a shared host: in-process tests signal only children they started and
have not reaped (so their PIDs cannot name anyone else). Anything that signals a
process tree, or PIDs read from a file, runs inside a private PID namespace
(`unshare --pid --fork --mount-proc --kill-child`), where the script is init: when
it exits, the kernel kills everything left in the namespace.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from memwatchd import actions
from memwatchd.sampler import parse_stat_start_time
from memwatchd.types import AccessDenied, MemwatchdError, TargetGone

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNSHARE = shutil.which("unshare")


def _pidns_usable() -> bool:
    if os.geteuid() != 0 or UNSHARE is None:
        return False
    r = subprocess.run([UNSHARE, "--pid", "--fork", "--mount-proc", "true"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


PIDNS = _pidns_usable()
needs_pidns = pytest.mark.skipif(not PIDNS, reason="needs root and unshare --pid")

# Runs first inside the namespace: refuses to go on unless it really is init there.
PRELUDE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    assert os.getpid() == 1, "not in a private PID namespace: refusing to signal anything"
    signal.signal(signal.SIGALRM, lambda *a: os._exit(97))
    signal.alarm(40)
    from memwatchd import actions
    from memwatchd.types import TargetGone
    from memwatchd.sampler import parse_stat_start_time

    def start_time(pid):
        with open(f"/proc/{pid}/stat", "rb") as f:
            return parse_stat_start_time(f.read())

    def ppid(pid):
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rfind(b")") + 2:].split()[1])

    def wait_for(cond, timeout=10.0, what="condition"):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                return f.read().split(b") ")[-1][:1] not in (b"Z", b"X")
        except FileNotFoundError:
            return False
""")


def run_in_pidns(body: str, timeout: float = 60) -> str:
    script = PRELUDE + textwrap.dedent(body) + "\nprint('PASS')\n"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([UNSHARE, "--pid", "--fork", "--mount-proc", "--kill-child",
                        sys.executable, "-c", script],
                       env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "PASS" in r.stdout, f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def start_time_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return parse_stat_start_time(f.read())


def pid_of_pidfd(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise AssertionError("no Pid: in fdinfo")


def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def spawn():
    """Start `sleep` children; teardown kills the still-unreaped ones through Popen."""
    procs = []

    def make(seconds=60):
        p = subprocess.Popen(["sleep", str(seconds)])
        procs.append(p)
        return p
    yield make
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture
def fds():
    opened = []
    yield opened
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


# ------------------------------------------------------------------ one process

def test_pidfd_signal_reaches_the_child(spawn, fds):
    p = spawn()
    fd = actions.open_process(p.pid, start_time_of(p.pid))
    fds.append(fd)
    assert pid_of_pidfd(fd) == p.pid
    assert not actions.is_dead(fd)
    assert actions.send_signal(fd, signal.SIGTERM) is True
    assert p.wait(5) == -signal.SIGTERM
    assert actions.is_dead(fd)
    # The process is reaped now: the pidfd still names it, never a newcomer.
    assert actions.send_signal(fd, signal.SIGKILL) is False


def test_open_process_refuses_a_mismatched_start_time(spawn):
    p = spawn()
    with pytest.raises(TargetGone, match="PID reused"):
        actions.open_process(p.pid, start_time_of(p.pid) + 1)
    assert p.poll() is None


def test_open_process_refuses_a_reaped_pid(spawn):
    p = spawn()
    start = start_time_of(p.pid)
    p.kill()
    p.wait()
    with pytest.raises(TargetGone):
        actions.open_process(p.pid, start)


def test_open_process_does_not_leak_fds_on_refusal(spawn):
    p = spawn()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(TargetGone):
            actions.open_process(p.pid, start_time_of(p.pid) + 1)
    assert len(os.listdir("/proc/self/fd")) == before


def test_is_dead_flips_after_sigkill(spawn, fds):
    p = spawn()
    fd = actions.open_process(p.pid, start_time_of(p.pid))
    fds.append(fd)
    assert actions.is_dead(fd) is False
    actions.send_signal(fd, signal.SIGKILL)
    # Not reaped yet: a zombie already counts as dead.
    assert wait_until(lambda: actions.is_dead(fd))
    p.wait()
    assert actions.is_dead(fd)


def test_is_dead_rejects_a_closed_fd():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(MemwatchdError):
        actions.is_dead(r)


def test_release_memory_outcomes(spawn, fds):
    p = spawn()
    fd = actions.open_process(p.pid, start_time_of(p.pid))
    fds.append(fd)
    assert actions.release_memory(fd) == "not-dying"
    actions.send_signal(fd, signal.SIGKILL)
    assert actions.release_memory(fd) in ("released", "gone")
    p.wait()
    assert actions.release_memory(fd) == "gone"


def test_release_memory_never_raises():
    """Any errno from process_mrelease is an outcome (the kill is done already): here a
    real EBADF from a closed descriptor; EAGAIN/EINTR/EPERM run in test_loop_trust."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert actions.release_memory(r) == "failed: EBADF"


def test_errno_mapping():
    with pytest.raises(TargetGone):
        actions._raise_os(OSError(errno.ESRCH, "x"), "p")
    with pytest.raises(AccessDenied):
        actions._raise_os(OSError(errno.EPERM, "x"), "p")
    with pytest.raises(AccessDenied):
        actions._raise_os(OSError(errno.EACCES, "x"), "p")
    with pytest.raises(MemwatchdError) as info:
        actions._raise_os(OSError(errno.EIO, "io"), "p")
    assert type(info.value) is MemwatchdError


@needs_pidns
def test_pid_reuse_is_detected():
    run_in_pidns("""
        old = subprocess.Popen(["sleep", "60"])
        pid, old_start = old.pid, start_time(old.pid)
        stale_fd = os.pidfd_open(pid)          # a pidfd taken before the PID is reused
        old.kill(); old.wait()
        time.sleep(0.05)                       # > 1 clock tick: the newcomer's start time differs
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        new = subprocess.Popen(["sleep", "60"])
        assert new.pid == pid, (new.pid, pid)
        assert start_time(pid) != old_start
        try:
            actions.open_process(pid, old_start)
        except TargetGone:
            pass
        else:
            raise AssertionError("open_process accepted a reused PID")
        assert actions.send_signal(stale_fd, signal.SIGKILL) is False   # the old process only
        time.sleep(0.1)
        assert new.poll() is None and alive(pid), "the newcomer was signalled"
        fd = actions.open_process(pid, start_time(pid))                  # its own identity works
        assert actions.send_signal(fd, signal.SIGKILL) is True
        assert new.wait(5) == -signal.SIGKILL
    """)


# ------------------------------------------------------------------ process trees

TREE = 'sleep 60 & sh -c "sleep 60 & sleep 60 & wait" & wait'


@needs_pidns
def test_descendants_are_children_first_and_signal_tree_kills_the_tree():
    run_in_pidns(f"""
        bystander = subprocess.Popen(["sleep", "60"])
        root = subprocess.Popen(["sh", "-c", {TREE!r}])
        wait_for(lambda: len(actions.descendants(root.pid)) == 4, what="tree of 4")
        tree = actions.descendants(root.pid)
        pids = [p for p, _ in tree]
        assert len(set(pids)) == 4 and bystander.pid not in pids and root.pid not in pids
        for pid, start in tree:
            assert start == start_time(pid)
            parent = ppid(pid)
            assert parent == root.pid or parent in pids
            if parent != root.pid:       # every child is listed before its parent
                assert pids.index(pid) < pids.index(parent), tree
        depth2 = [p for p in pids if ppid(p) != root.pid]
        assert len(depth2) == 2 and set(pids[:2]) == set(depth2), tree   # deepest level first

        # A wrong identity for the root signals nothing at all.
        try:
            actions.signal_tree(root.pid, start_time(root.pid) + 1, signal.SIGKILL)
        except TargetGone:
            pass
        else:
            raise AssertionError("signal_tree accepted a wrong start time")
        assert all(alive(p) for p in pids) and root.poll() is None

        fds = actions.signal_tree(root.pid, start_time(root.pid), signal.SIGKILL)
        assert len(fds) == 5
        wait_for(lambda: all(actions.is_dead(fd) for fd in fds), what="tree death")
        # The root was stopped before its children died: it could not exit by itself.
        assert root.wait(5) == -signal.SIGKILL
        for pid in pids:
            assert not alive(pid)
        assert bystander.poll() is None and alive(bystander.pid), "bystander was hit"
        for fd in fds:
            os.close(fd)
    """)


@needs_pidns
def test_signal_tree_sigkill_leaves_nothing_of_a_tree_that_keeps_forking():
    # The root forks a child every 5 ms and a respawning sub-shell replaces its sleeps:
    # stopping the tree before killing it means nothing forks in between.
    run_in_pidns("""
        script = ('(while :; do sleep 60 & wait; done) & '
                  'for i in $(seq 400); do sleep 60 & sleep 0.005; done; wait')
        root = subprocess.Popen(["sh", "-c", script])
        wait_for(lambda: len(actions.descendants(root.pid)) > 20, what="a busy tree")
        fds = actions.signal_tree(root.pid, start_time(root.pid), signal.SIGKILL)
        wait_for(lambda: all(actions.is_dead(fd) for fd in fds), what="tree death")
        assert root.wait(5) == -signal.SIGKILL
        time.sleep(0.2)
        left = [int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) != 1 and alive(int(n))]
        assert left == [], f"survivors: {left}"
        assert len(fds) > 20
    """)


@needs_pidns
def test_signal_tree_skips_children_that_vanish():
    run_in_pidns("""
        root = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 0.3 & wait"])
        wait_for(lambda: len(actions.descendants(root.pid)) == 2, what="2 children")
        wait_for(lambda: len(actions.descendants(root.pid)) == 1, what="short child exit")
        fds = actions.signal_tree(root.pid, start_time(root.pid), signal.SIGTERM)
        assert len(fds) == 2
        wait_for(lambda: all(actions.is_dead(fd) for fd in fds), what="tree death")
        root.wait(5)
    """)


def _stat_line(pid, comm, ppid, start):
    after = ["S", str(ppid), str(pid), str(pid), "0", "-1", "4194304"] + ["0"] * 8 + \
        ["20", "0", "1", "0", str(start), "1000", "100"]
    return f"{pid} ({comm}) " + " ".join(after) + "\n"


def _mock_proc(root, procs, children=True, threads=None):
    """procs: {pid: (comm, ppid, start)}; children=True writes task/<tid>/children files."""
    threads = threads or {}
    for pid, (comm, ppid, start) in procs.items():
        d = root / "proc" / str(pid)
        for tid in [pid] + threads.get(pid, []):
            t = d / "task" / str(tid)
            t.mkdir(parents=True)
            (t / "stat").write_text(_stat_line(tid, comm, ppid, start))
            if children:
                kids = [k for k, v in procs.items() if v[1] == pid and (k % 2 == 0) == (tid == pid)] \
                    if threads.get(pid) else [k for k, v in procs.items() if v[1] == pid]
                (t / "children").write_text("".join(f"{k} " for k in kids))
        (d / "stat").write_text(_stat_line(pid, comm, ppid, start))
    (root / "proc" / "self").mkdir(exist_ok=True)


PROCS = {
    100: ("root", 1, 1000),
    200: ("foo) S 1 2 (", 100, 1001),     # hostile comm: fields are counted after the last ')'
    301: ("child)", 200, 1002),
    302: ("x", 200, 1003),
    400: ("unrelated", 1, 5),
}


def test_descendants_from_children_files(tmp_path):
    _mock_proc(tmp_path, PROCS)
    tree = actions.descendants(100, proc_root=str(tmp_path))
    assert sorted(tree[:2]) == [(301, 1002), (302, 1003)]
    assert tree[2:] == [(200, 1001)]


def test_descendants_uses_every_threads_children_file(tmp_path):
    procs = {100: ("root", 1, 1), 201: ("a", 100, 2), 202: ("b", 100, 3)}
    _mock_proc(tmp_path, procs, threads={100: [101]})   # 202 on thread 100, 201 on thread 101
    assert sorted(actions.descendants(100, proc_root=str(tmp_path))) == [(201, 2), (202, 3)]


def test_descendants_falls_back_to_scanning_ppids(tmp_path):
    _mock_proc(tmp_path, PROCS, children=False)
    tree = actions.descendants(100, proc_root=str(tmp_path))
    assert sorted(tree[:2]) == [(301, 1002), (302, 1003)]
    assert tree[2:] == [(200, 1001)]


def test_descendants_drops_a_listed_pid_that_now_has_another_parent(tmp_path):
    _mock_proc(tmp_path, PROCS)
    # 200's children file still lists 999, but 999 is now someone else's (PID reused).
    (tmp_path / "proc/200/task/200/children").write_text("301 302 999 ")
    d = tmp_path / "proc/999"
    d.mkdir()
    (d / "stat").write_text(_stat_line(999, "innocent", 1, 99999))
    tree = actions.descendants(100, proc_root=str(tmp_path))
    assert 999 not in [p for p, _ in tree]


def test_descendants_tolerates_vanished_processes(tmp_path):
    _mock_proc(tmp_path, PROCS)
    shutil.rmtree(tmp_path / "proc/301")
    assert actions.descendants(100, proc_root=str(tmp_path)) == [(302, 1003), (200, 1001)]
    assert actions.descendants(12345, proc_root=str(tmp_path)) == []


def test_descendants_of_a_real_leaf_is_empty(spawn):
    p = spawn()
    assert actions.descendants(p.pid) == []


# ------------------------------------------------------------------ cgroups (mock dirs)

def _mock_cgroup(tmp_path, top_pids, sub_pids, kill_file=False):
    cg = tmp_path / "cg"
    (cg / "sub").mkdir(parents=True)
    (cg / "cgroup.procs").write_text("".join(f"{p}\n" for p in top_pids))
    (cg / "sub" / "cgroup.procs").write_text("".join(f"{p}\n" for p in sub_pids))
    for name in ("memory.high", "cgroup.freeze"):
        (cg / name).write_text("")
    if kill_file:
        (cg / "cgroup.kill").write_text("")
    return cg


def test_cgroup_procs_reads_pids(tmp_path):
    cg = _mock_cgroup(tmp_path, [1, 22, 333], [])
    assert actions.cgroup_procs(str(cg)) == [1, 22, 333]
    assert actions.cgroup_procs(str(cg / "sub")) == []
    with pytest.raises(TargetGone):
        actions.cgroup_procs(str(tmp_path / "removed"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_cgroup_without_cgroup_kill_signals_each_member(tmp_path, spawn, fds, sig):
    a, b, c = spawn(), spawn(), spawn()
    cg = _mock_cgroup(tmp_path, [a.pid, b.pid], [c.pid])
    got = actions.signal_cgroup(str(cg), sig)
    fds.extend(got)
    assert sorted(pid_of_pidfd(fd) for fd in got) == sorted([a.pid, b.pid, c.pid])
    for p in (a, b, c):
        assert p.wait(5) == -sig
    assert wait_until(lambda: all(actions.is_dead(fd) for fd in got))


def test_signal_cgroup_sigkill_writes_cgroup_kill_and_returns_pidfds_opened_before(tmp_path, spawn, fds):
    a, b = spawn(), spawn()
    cg = _mock_cgroup(tmp_path, [a.pid], [b.pid], kill_file=True)
    got = actions.signal_cgroup(str(cg), signal.SIGKILL)
    fds.extend(got)
    assert (cg / "cgroup.kill").read_text() == "1"
    assert sorted(pid_of_pidfd(fd) for fd in got) == sorted([a.pid, b.pid])
    # The mock file kills nothing: no per-process signal was sent on this path.
    time.sleep(0.1)
    assert a.poll() is None and b.poll() is None


def test_signal_cgroup_sigterm_ignores_cgroup_kill(tmp_path, spawn, fds):
    a = spawn()
    cg = _mock_cgroup(tmp_path, [a.pid], [], kill_file=True)
    fds.extend(actions.signal_cgroup(str(cg), signal.SIGTERM))
    assert (cg / "cgroup.kill").read_text() == ""
    assert a.wait(5) == -signal.SIGTERM


def test_signal_cgroup_skips_a_pid_that_left_the_cgroup_before_it_was_opened(tmp_path, spawn, fds,
                                                                            monkeypatch):
    member, outsider = spawn(), spawn()
    cg = _mock_cgroup(tmp_path, [], [])
    # First read lists both; the re-read after pidfd_open lists only the member, as when
    # the listed PID exited and was reused by an outsider in between.
    reads = iter([[member.pid, outsider.pid], [member.pid]])
    monkeypatch.setattr(actions, "_subtree_procs", lambda d, fd: next(reads))
    got = actions.signal_cgroup(str(cg), signal.SIGTERM)
    fds.extend(got)
    assert [pid_of_pidfd(fd) for fd in got] == [member.pid]
    assert member.wait(5) == -signal.SIGTERM
    time.sleep(0.1)
    assert outsider.poll() is None


def test_signal_cgroup_of_a_removed_cgroup_is_target_gone(tmp_path):
    with pytest.raises(TargetGone):
        actions.signal_cgroup(str(tmp_path / "nope"), signal.SIGKILL)


@needs_pidns
def test_signal_cgroup_skips_exited_pids():
    # The stale PID is only safe to list inside a private PID namespace.
    run_in_pidns("""
        import tempfile
        live = subprocess.Popen(["sleep", "60"])
        dead = subprocess.Popen(["true"]); dead.wait()
        d = tempfile.mkdtemp()
        with open(os.path.join(d, "cgroup.procs"), "w") as f:
            f.write(f"{dead.pid}\\n{live.pid}\\n")
        fds = actions.signal_cgroup(d, signal.SIGKILL)
        assert len(fds) == 1
        assert live.wait(5) == -signal.SIGKILL
    """)


def test_set_memory_high_and_frozen(tmp_path):
    cg = _mock_cgroup(tmp_path, [], [])
    actions.set_memory_high(str(cg), 256 << 20)
    assert (cg / "memory.high").read_text() == str(256 << 20)
    actions.set_memory_high(str(cg), None)
    assert (cg / "memory.high").read_text() == "max"
    with pytest.raises(ValueError):
        actions.set_memory_high(str(cg), -1)
    actions.set_frozen(str(cg), True)
    assert (cg / "cgroup.freeze").read_text() == "1"
    actions.set_frozen(str(cg), False)
    assert (cg / "cgroup.freeze").read_text() == "0"
    with pytest.raises(TargetGone):
        actions.set_memory_high(str(tmp_path / "gone"), 1)
    with pytest.raises(TargetGone):
        actions.set_frozen(str(tmp_path / "gone"), True)


# ------------------------------------------------------------------ on_action

def test_victim_env_prefixes_stringifies_and_drops_nul():
    env = actions.victim_env(pid=42, comm="a\0b", cmdline="x y", usage=None, dry_run=False)
    assert env == {"MEMWATCHD_PID": "42", "MEMWATCHD_COMM": "ab", "MEMWATCHD_CMDLINE": "x y",
                   "MEMWATCHD_USAGE": "", "MEMWATCHD_DRY_RUN": "False"}
    assert all(isinstance(v, str) for v in env.values())


def _poll_until(runner, timeout):
    results = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        results.extend(runner.poll())
        if results:
            return results
        time.sleep(0.02)
    return results


def test_on_action_gets_victim_data_literally_without_a_shell(tmp_path, monkeypatch):
    monkeypatch.setenv("DAEMON_SECRET", "must-not-leak")
    out = tmp_path / "env.json"
    pwned = tmp_path / "pwned"
    script = tmp_path / "on-kill"
    script.write_text(f"#!{sys.executable}\n"
                      "import json, os, sys\n"
                      "json.dump(dict(os.environ), open(sys.argv[1], 'w'))\n")
    script.chmod(0o755)
    hostile = f"$(touch {pwned}); rm -rf x `touch {pwned}` ; echo $HOME"
    env = actions.victim_env(pid=1234, comm="foo) Z \n<3>evil", cmdline=hostile,
                             usage=5 << 30, limit=4 << 30, reason="limit", action="kill",
                             target="web")
    runner = actions.OnActionRunner()
    t0 = time.monotonic()
    pid = runner.start((str(script), str(out)), env, timeout=10)
    assert time.monotonic() - t0 < 1.0          # start() does not wait for the program
    assert pid > 0
    assert _poll_until(runner, 10) == [(str(script), 0)]
    got = json.loads(out.read_text())
    got.pop("LC_CTYPE", None)                   # set by the child's own Python (PEP 538)
    assert got == dict(env, PATH=actions.ON_ACTION_PATH)
    assert got["MEMWATCHD_CMDLINE"] == hostile
    assert got["MEMWATCHD_COMM"] == "foo) Z \n<3>evil"
    assert not pwned.exists()
    assert runner.running == 0


def test_on_action_runs_in_its_own_session_with_no_stdio(tmp_path):
    out = tmp_path / "info"
    script = tmp_path / "info.py"
    script.write_text(f"#!{sys.executable}\n"
                      "import os, sys\n"
                      "open(sys.argv[1], 'w').write(f'{os.getpid()} {os.getsid(0)} '\n"
                      "                             f'{os.readlink(\"/proc/self/fd/0\")} '\n"
                      "                             f'{len(os.listdir(\"/proc/self/fd\"))}')\n")
    script.chmod(0o755)
    runner = actions.OnActionRunner()
    pid = runner.start((str(script), str(out)), {}, timeout=10)
    assert _poll_until(runner, 10) == [(str(script), 0)]
    mypid, sid, stdin, nfds = out.read_text().split()
    assert int(mypid) == pid == int(sid)          # session leader: start_new_session
    assert stdin == "/dev/null"
    assert int(nfds) <= 5                         # 0,1,2, the open output file, listdir's own fd


def test_on_action_past_its_timeout_is_killed_with_its_children(tmp_path):
    runner = actions.OnActionRunner()
    pidfile = tmp_path / "grandchild"
    t0 = time.monotonic()
    runner.start(("sh", "-c", f'sleep 60 & echo $! > {pidfile}; wait'), {}, timeout=0.5)
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip())
    grandchild = int(pidfile.read_text())
    gfd = os.pidfd_open(grandchild)   # ours: started by our child, in the group we created
    try:
        def comm():
            with open(f"/proc/{grandchild}/comm") as f:
                return f.read().strip()
        assert wait_until(lambda: comm() == "sleep")   # forked; exec may still be under way
        results = _poll_until(runner, 5)
        elapsed = time.monotonic() - t0
        assert results == [("sh", "timeout")]
        assert 0.45 <= elapsed < 3.0, elapsed
        assert wait_until(lambda: actions.is_dead(gfd)), "grandchild survived the timeout kill"
        assert wait_until(lambda: (runner.poll(), runner.running)[1] == 0)
    finally:
        os.close(gfd)
        runner.close()


def test_on_action_close_kills_outstanding(tmp_path):
    runner = actions.OnActionRunner()
    pid = runner.start(("sleep", "60"), {}, timeout=100)
    fd = os.pidfd_open(pid)
    try:
        runner.close()
        assert actions.is_dead(fd)
        assert runner.running == 0
    finally:
        os.close(fd)


def test_on_action_errors():
    runner = actions.OnActionRunner(max_running=1)
    with pytest.raises(MemwatchdError):
        runner.start(("/nonexistent/memwatchd-on-action",), {}, timeout=1)
    with pytest.raises(ValueError):
        runner.start(("true",), {"LD_PRELOAD": "/tmp/x.so"}, timeout=1)
    with pytest.raises(ValueError):
        runner.start((), {}, timeout=1)
    try:
        runner.start(("sleep", "60"), {}, timeout=100)
        with pytest.raises(MemwatchdError, match="still running"):
            runner.start(("sleep", "60"), {}, timeout=100)
    finally:
        runner.close()


def test_on_action_is_not_oom_protected_like_the_daemon(tmp_path):
    # Run the runner in a child whose oom_score_adj is -500 (as a protected daemon's would be).
    code = textwrap.dedent("""
        import sys
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("-500")
        except PermissionError:
            sys.exit(77)              # no CAP_SYS_RESOURCE here: cannot build the setup
        from memwatchd.actions import OnActionRunner
        r = OnActionRunner()
        pid = r.start(("sleep", "60"), {}, timeout=100)
        with open(f"/proc/{pid}/oom_score_adj") as f:
            print(f.read().strip())
        r.close()
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=30)
    if r.returncode == 77:
        pytest.skip("lowering oom_score_adj needs CAP_SYS_RESOURCE")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_on_action_oom_score_adj_is_reset_before_the_program_runs(tmp_path):
    """The score is written by the child itself before execve, so the program never runs
    one instruction with the daemon's OOM protection (on main the parent wrote it after
    the program had started). strace -f shows the order in the child."""
    trace = tmp_path / "trace"
    code = textwrap.dedent("""
        from memwatchd.actions import OnActionRunner
        r = OnActionRunner()
        r.start(("/bin/true",), {}, timeout=10)
        r.close(wait=5)
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    done = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat,execve", "-o", str(trace),
                           sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lines = trace.read_text().splitlines()
    execs = [line for line in lines if 'execve("/bin/true"' in line]
    assert execs, lines[-20:]
    child = execs[0].split()[0]
    mine = [line for line in lines if line.split()[0] == child]
    opened = next(i for i, line in enumerate(mine) if "/proc/self/oom_score_adj" in line)
    assert opened < mine.index(execs[0]), mine
    assert not any("oom_score_adj" in line for line in lines if line.split()[0] != child)


def test_signal_cgroup_when_pidfds_run_out(tmp_path):
    # In a child (own children only) with RLIMIT_NOFILE just above its open fds.
    code = textwrap.dedent("""
        import os, resource, signal, subprocess, sys
        from memwatchd import actions
        from memwatchd.types import MemwatchdError
        cg = sys.argv[1]
        kids = [subprocess.Popen(["sleep", "60"]) for _ in range(4)]
        try:
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write("".join(f"{k.pid}\\n" for k in kids))
            open(os.path.join(cg, "cgroup.kill"), "w").close()
            def is_open(fd):
                try:
                    os.fstat(fd)
                    return True
                except OSError:
                    return False
            used = {fd for fd in range(4096) if is_open(fd)}
            limit = 0
            # room for 4 more fds: the cgroup directory, two given back, one pidfd kept
            while limit - len([fd for fd in used if fd < limit]) < 4:
                limit += 1
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            fds = actions.signal_cgroup(cg, signal.SIGKILL)       # cgroup.kill needs no pidfds
            assert len(fds) == 1, fds
            assert open(os.path.join(cg, "cgroup.kill")).read() == "1"
            for fd in fds:
                os.close(fd)
            os.unlink(os.path.join(cg, "cgroup.kill"))
            try:
                actions.signal_cgroup(cg, signal.SIGTERM)         # per process: cannot do them all
            except MemwatchdError as e:
                assert "not signalled" in str(e), e
            else:
                raise AssertionError("no error although processes were left unsignalled")
            assert kids[0].wait(5) == -signal.SIGTERM            # the one it could open was signalled
            assert all(k.poll() is None for k in kids[1:])
            print("PASS")
        finally:
            for k in kids:
                if k.poll() is None:
                    k.kill()
                k.wait()
    """)
    cg = tmp_path / "cg"
    cg.mkdir()
    r = subprocess.run([sys.executable, "-c", code, str(cg)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr


def test_never_signals_init_or_itself(tmp_path):
    with pytest.raises(MemwatchdError, match="refusing"):
        actions.signal_tree(os.getpid(), start_time_of(os.getpid()), signal.SIGKILL)
    with pytest.raises(MemwatchdError, match="refusing"):
        actions.signal_tree(1, start_time_of(1), signal.SIGKILL)
    cg = _mock_cgroup(tmp_path, [os.getpid()], [], kill_file=True)
    with pytest.raises(MemwatchdError, match="refusing, it holds init or memwatchd"):
        actions.signal_cgroup(str(cg), signal.SIGKILL)
    assert (cg / "cgroup.kill").read_text() == ""


@pytest.mark.parametrize("who", ["init", "parent", "self-in-a-child-cgroup"])
def test_a_cgroup_holding_init_memwatchd_or_an_ancestor_is_never_touched(tmp_path, who):
    """/init.scope, the slice memwatchd runs in, or any cgroup above them: never signalled,
    frozen or throttled (freezing memwatchd's own cgroup would stop the killer)."""
    pid = {"init": 1, "parent": os.getppid(), "self-in-a-child-cgroup": os.getpid()}[who]
    top, sub = ([pid], []) if who != "self-in-a-child-cgroup" else ([], [pid])
    cg = _mock_cgroup(tmp_path, top, sub, kill_file=True)
    for act in (lambda: actions.signal_cgroup(str(cg), signal.SIGKILL),
                lambda: actions.signal_cgroup(str(cg), signal.SIGTERM),
                lambda: actions.set_frozen(str(cg), True),
                lambda: actions.set_memory_high(str(cg), 1 << 20)):
        with pytest.raises(MemwatchdError, match="refusing"):
            act()
    assert [(cg / f).read_text() for f in ("cgroup.kill", "cgroup.freeze", "memory.high")] \
        == ["", "", ""]


@needs_pidns
def test_signal_tree_skips_memwatchd_when_it_descends_from_the_root():
    run_in_pidns("""
        # memwatchd started from a watched shell would show up in that shell's tree; a
        # process cannot re-parent itself, so the walk is made to report us.
        me = os.getpid()
        root = subprocess.Popen(["sh", "-c", "sleep 60 & wait"])
        wait_for(lambda: len(actions.descendants(root.pid)) == 1, what="child")
        real = actions.descendants
        actions.descendants = lambda pid, proc_root="/": real(pid, proc_root) + [(me, start_time(me))]
        fds = actions.signal_tree(root.pid, start_time(root.pid), signal.SIGKILL)
        assert len(fds) == 2          # the sleep and the root, not us (3 without the filter)
        wait_for(lambda: all(actions.is_dead(fd) for fd in fds), what="tree death")
        root.wait(5)
    """)
