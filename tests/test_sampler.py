"""The sampler, compiled and pure-Python, against real processes and fixture trees."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memwatchd import procfs, sampler, types
from memwatchd.types import DENIED, FAILED, GONE, OK, UNKNOWN, UNLIMITED, TargetGone

from .conftest import NO_EXTENSIONS, start_leader_exits
from .pidns import needs_pidns, run_scenario

MiB = 1 << 20


# ------------------------------------------------------------ which implementation

def test_compiled_module_is_live_unless_disabled():
    """No silent fallback: a build that lost the extension must fail here, not run slowly."""
    if NO_EXTENSIONS:
        assert sampler.IMPLEMENTATION == "python"
    else:
        assert sampler.IMPLEMENTATION == "c", "memwatchd._memread was not built or failed to import"


def test_errno_table_is_the_single_mapping():
    assert types.status_for_errno(errno.ESRCH) == GONE
    assert types.status_for_errno(errno.ENOENT) == GONE
    assert types.status_for_errno(errno.ENODEV) == GONE
    assert types.status_for_errno(errno.EACCES) == DENIED
    assert types.status_for_errno(errno.EIO) == FAILED


# ------------------------------------------------------------ live processes

def test_own_process_reads_like_psutil(impl):
    table = impl.ProcessTable()
    slot = table.add(os.getpid())
    assert table.sample() == 1
    assert table.status(slot) == OK
    rss = psutil.Process().memory_info().rss
    assert abs(table.rss(slot) - rss) < 8 * MiB
    assert table.vms(slot) >= table.rss(slot)
    assert table.pid(slot) == os.getpid()


def test_start_time_is_field_22(impl):
    """(pid, start time) identifies a process; check start time against psutil's create_time."""
    table = impl.ProcessTable()
    slot = table.add(os.getpid())
    ticks = os.sysconf("SC_CLK_TCK")
    created = psutil.boot_time() + table.start_time(slot) / ticks
    assert abs(created - psutil.Process().create_time()) < 1.5


def _stat_majflt(pid):
    with open("/proc/%d/stat" % pid, "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[9])


def test_major_faults_are_field_12(impl, tmp_path):
    """A slot keeps the process's major faults as of its add (what the guard weighs a
    candidate's own part of a thrash by): make some (a file's pages dropped from the
    page cache, then read through a mapping) and read them back."""
    import mmap
    path = tmp_path / "pages"
    path.write_bytes(os.urandom(4 * MiB))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        before = _stat_majflt(os.getpid())
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))
    faulted = _stat_majflt(os.getpid())
    if faulted == before:
        pytest.skip("this filesystem kept the pages (tmpfs?): no major fault to count")
    table = impl.ProcessTable()
    slot = table.add(os.getpid())
    assert before < faulted <= table.major_faults(slot) <= _stat_majflt(os.getpid())


def test_readings_follow_a_growing_process(impl, hog_factory):
    hog = hog_factory(64 * MiB)
    table = impl.ProcessTable()
    slot = table.add(hog.pid)
    table.sample()
    base = table.rss(slot)
    for _ in range(3):
        hog.grow()
        table.sample()
        assert table.status(slot) == OK
        assert table.rss(slot) >= base + hog.allocated - 4 * MiB
    assert table.rss(slot) >= 3 * 64 * MiB


def test_hostile_process_name(impl):
    """A process may call itself 'a) b (c' or put a newline in its name; stat must still parse."""
    for name in ("a) b (c", "x) 1 2 3 (", "new\nline)", ") ) )"):
        child = subprocess.Popen(
            [sys.executable, "-c",
             "import sys,time;open('/proc/self/comm','w').write(sys.argv[1]);"
             "print(flush=True);time.sleep(30)", name],
            stdout=subprocess.PIPE)
        try:
            child.stdout.readline()
            with open(f"/proc/{child.pid}/comm") as f:
                assert f.read().rstrip("\n")[:3] == name[:3]
            table = impl.ProcessTable()
            slot = table.add(child.pid)
            expected = psutil.Process(child.pid).create_time()
            got = psutil.boot_time() + table.start_time(slot) / os.sysconf("SC_CLK_TCK")
            assert abs(got - expected) < 1.5
            assert table.sample() == 1
        finally:
            child.kill()
            child.wait()


def test_exit_zombie_and_reap_are_gone_never_raise(impl):
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    table = impl.ProcessTable()
    slot = table.add(child.pid)
    assert table.sample() == 1
    child.stdin.close()  # it exits; we have not reaped it yet: a zombie
    deadline = time.time() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline
        time.sleep(0.01)
    assert table.sample() == 0
    assert table.status(slot) == GONE
    child.wait()
    assert table.sample() == 0
    assert table.status(slot) == GONE


def test_leader_thread_exited_is_read_through_a_live_thread(impl):
    """pthread_exit() in main: statm of the pid reads zeros, but the process lives and holds
    memory. It stays OK with its real rss, and is GONE only once the whole group exits."""
    child = start_leader_exits(96 * MiB, seconds=30)
    try:
        with open(f"/proc/{child.pid}/statm") as f:
            assert f.read().split()[:2] == ["0", "0"]   # the kernel state this test is about
        table = impl.ProcessTable()
        slot = table.add(child.pid)
        for _ in range(3):          # the first pass moves to a thread; later ones stay there
            assert table.sample() == 1
            assert table.status(slot) == OK
            assert table.rss(slot) >= 96 * MiB
        assert table.sample_slots([slot]) == 1 and table.rss(slot) >= 96 * MiB
        child.kill()
        child.wait()
        assert table.sample() == 0
        assert table.status(slot) == GONE
    finally:
        child.kill()
        child.wait()


def test_reaped_pid_is_gone_even_if_reused(impl):
    """A kept fd names the process, not the number: after reaping, reads fail with ESRCH."""
    child = subprocess.Popen(["sleep", "30"])
    table = impl.ProcessTable()
    slot = table.add(child.pid)
    child.kill()
    child.wait()
    assert table.sample() == 0
    assert table.status(slot) == GONE


def test_add_missing_pid_raises_target_gone(impl):
    with pytest.raises(TargetGone):
        impl.ProcessTable().add(2 ** 22 + 7)  # above pid_max's ceiling: never exists


# ------------------------------------------------ the table's own schedule (issue 18)

FILL, MIN_INTERVAL, MAX_INTERVAL = 1 << 30, 0.01, 1.0


def test_the_table_reads_scheduled_slots_when_due_and_hands_back_only_loud_or_gone_ones(
        impl, hog_factory):
    """A scheduled slot is read only once due; a quiet one gets its next due time and
    stays; one at or above its ceiling leaves the schedule and is returned in the pass
    that read it; so is one whose process is gone. Unscheduled slots are never read."""
    grower, quiet = hog_factory(64 * MiB), hog_factory(64 * MiB)
    plain = hog_factory(64 * MiB)
    table = impl.ProcessTable()
    slot, calm, other = table.add(grower.pid), table.add(quiet.pid), table.add(plain.pid)
    table.sample()
    base, plain_base = table.rss(slot), table.rss(other)
    table.schedule(slot, base + 32 * MiB, base + (4 << 30), 100.0, 101.0, 1.0)
    table.schedule(calm, 1 << 50, table.rss(calm) + (4 << 30), 100.0, 100.5, 1.0)
    assert table.scheduled(slot) and table.scheduled(calm) and not table.scheduled(other)
    assert table.next_due() == 100.5
    grower.grow()
    plain.grow()
    assert table.sample_scheduled(100.4, FILL, MIN_INTERVAL, MAX_INTERVAL) == []  # none due
    assert table.rss(slot) == base and table.sampled_at(slot) == 100.0
    assert table.sample_scheduled(100.6, FILL, MIN_INTERVAL, MAX_INTERVAL) == []  # calm: quiet
    assert table.sampled_at(calm) == 100.6
    assert table.due_at(calm) == pytest.approx(101.6)   # 4 GiB at 1 GiB/s, clamped to 1 s
    assert table.interval(calm) == MAX_INTERVAL
    assert table.rss(slot) == base                      # not due yet: not read
    assert table.sample_scheduled(101.0, FILL, MIN_INTERVAL, MAX_INTERVAL) == [slot]
    assert not table.scheduled(slot) and table.scheduled(calm)
    assert table.rss(slot) >= base + 60 * MiB
    assert table.rss(other) == plain_base               # never scheduled: never read by it
    assert table.sample_scheduled(200.0, FILL, MIN_INTERVAL, MAX_INTERVAL) == []  # calm again
    assert table.next_due() == pytest.approx(201.0)
    quiet.kill()
    table.set_due(calm, 0.0)                            # "look now"
    assert table.sample_scheduled(200.1, FILL, MIN_INTERVAL, MAX_INTERVAL) == [calm]
    assert table.status(calm) == GONE and not table.scheduled(calm)
    assert table.next_due() == float("inf")
    table.schedule(other, 1 << 50, 1 << 40, 0.0, 0.0, 0.0)
    table.remove(other)                                  # a removed slot leaves the schedule
    again = table.add(plain.pid)
    assert again == other and not table.scheduled(again)


def test_the_tables_schedule_is_the_policys_interval(impl):
    """The table's next due time for a quiet slot is Policy.interval_for's, for every
    headroom (none or negative, below the fastest look, in between, above the slowest)."""
    from memwatchd.config import parse_config
    from memwatchd.policy import Policy
    from memwatchd.types import Reading
    config = parse_config({"daemon": {"events": "", "state": "", "fill_rate": "1G",
                                      "min_interval": "10ms", "interval": "1s"},
                           "guard": {"enabled": False},
                           "watch": [{"name": "w", "pid": 1, "limit": "1G"}]}, "test")
    policy, d = Policy(config), config.daemon
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        table = impl.ProcessTable()
        slot = table.add(sleeper.pid)
        for headroom in (-MiB, 0, 1, MiB, 10 * MiB, 100 * MiB, 512 * MiB, 1 << 30, 8 << 30):
            table.sample_slots([slot])
            limit = table.rss(slot) + headroom
            table.schedule(slot, 1 << 50, limit, 0.0, 5.0, 0.0)
            assert table.sample_scheduled(5.0, d.fill_rate, d.min_interval, d.interval) == []
            want = policy.interval_for(Reading(("process", sleeper.pid, 0), "w",
                                               table.rss(slot), limit, None, None, None))
            assert table.interval(slot) == pytest.approx(want, rel=1e-12), headroom
            assert table.due_at(slot) == pytest.approx(5.0 + want, rel=1e-12), headroom
            table.unschedule(slot)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_add_remove_reuses_slots_and_leaks_no_fd(impl):
    table = impl.ProcessTable()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(500):
        slot = table.add(os.getpid())
        assert table.sample() == 1
        table.remove(slot)
    assert len(table) == 0
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(IndexError):
        table.rss(10_000)


def test_access_denied_is_reported(impl, tmp_path):
    """An unprivileged reader that may not open a process directory gets AccessDenied."""
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "stat").write_bytes(b"4242 (x) S" + b" 1" * 30 + b"\n")
    (proc / "4242" / "statm").write_bytes(b"10 5 0 0 0 0 0\n")
    os.chmod(proc / "4242", 0o700)
    os.chmod(tmp_path, 0o755)
    code = (
        "import os, sys\n"
        f"from memwatchd import {impl.__name__.split('.')[-1]} as impl\n"
        "from memwatchd.types import AccessDenied\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        f"    impl.ProcessTable(root={str(tmp_path)!r}).add(4242)\n"
        "except AccessDenied:\n"
        "    sys.exit(7)\n"
    )
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 7


# ------------------------------------------------------------ fixture trees

def test_fake_proc_tree(impl, tmp_path):
    pid_dir = tmp_path / "proc" / "77"
    pid_dir.mkdir(parents=True)
    (pid_dir / "stat").write_bytes(b"77 (evil) 3 4 (x) R" + b" 0" * 18 + b" 123456 99 7\n")
    (pid_dir / "statm").write_bytes(b"300 200 1 1 0 50 0\n")
    table = impl.ProcessTable(root=str(tmp_path))
    slot = table.add(77)
    assert table.start_time(slot) == 123456
    assert table.major_faults(slot) == 0
    assert table.sample() == 1
    page = os.sysconf("SC_PAGESIZE")
    assert (table.rss(slot), table.vms(slot)) == (200 * page, 300 * page)
    (pid_dir / "statm").write_bytes(b"0 0 0 0 0 0 0\n")  # what a zombie reads
    assert table.sample() == 0 and table.status(slot) == GONE


def test_fake_host_without_psi(impl, tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_bytes(
        b"MemTotal:       16000 kB\nMemFree:  100 kB\nMemAvailable:    8000 kB\n"
        b"SwapCached:     1234 kB\nSwapTotal:        0 kB\nSwapFree:         0 kB\n")
    host = impl.HostReader(root=str(tmp_path))
    assert not host.has_psi
    sample = host.read()
    assert (sample.mem_total, sample.mem_available) == (16000 * 1024, 8000 * 1024)
    assert sample.swap_total == 0 and sample.pressure is None
    assert sample.swap_cached == 1234 * 1024


def test_fake_host_missing_key_is_unknown(impl, tmp_path):
    (tmp_path / "proc" / "pressure").mkdir(parents=True)
    (tmp_path / "proc" / "meminfo").write_bytes(b"MemTotal: 16000 kB\n")
    (tmp_path / "proc" / "pressure" / "memory").write_bytes(
        b"some avg10=12.50 avg60=1.00 avg300=0.10 total=999\n"
        b"full avg10=3.25 avg60=0.00 avg300=0.00 total=77\n")
    sample = impl.HostReader(root=str(tmp_path)).read()
    assert sample.mem_available == UNKNOWN and sample.swap_cached is None
    assert sample.pressure.some_avg10 == 12.5 and sample.pressure.full_avg10 == 3.25
    assert sample.pressure.full_total_us == 77


def test_real_host(impl):
    sample = impl.HostReader().read()
    assert 0 < sample.mem_available <= sample.mem_total == psutil.virtual_memory().total
    assert sample.swap_cached is not None and 0 <= sample.swap_cached


def _vmstat_refaults():
    with open("/proc/vmstat") as f:
        v = dict(line.split() for line in f)
    return (int(v["pswpin"]) + int(v.get("workingset_refault_file", v.get("workingset_refault", 0)))) \
        * os.sysconf("SC_PAGESIZE")


def test_real_host_refaults_are_read_only_under_the_gate(impl):
    """/proc/vmstat is read only while MemAvailable is under refaults_below (the guard's
    pressure gate): it is 4 KiB of text the loop does not need otherwise."""
    host = impl.HostReader()
    assert host.read().refaults is None                  # off by default (-1)
    host.refaults_below = 1 << 62                        # every MemAvailable is under it
    before = _vmstat_refaults()
    got = host.read().refaults
    assert before <= got <= _vmstat_refaults()
    host.refaults_below = host.read().mem_available // 2
    assert host.read().refaults is None


@pytest.mark.parametrize("vmstat, expected_pages", [
    (b"nr_free_pages 1\nworkingset_refault_anon 500\nworkingset_refault_file 70\npswpin 30\n", 100),
    (b"workingset_refault 70\npswpout 9\npswpin 30\n", 100),      # before Linux 5.9
    (b"pswpin 30\nworkingset_refault_file_x 70\n", None),          # no file refaults: unknown
    (b"workingset_refault_file 70\n", None),                        # no pswpin: unknown
    (b"", None),
])
def test_fake_host_refault_counters(impl, tmp_path, vmstat, expected_pages):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_bytes(b"MemTotal: 16000 kB\nMemAvailable: 800 kB\n")
    (tmp_path / "proc" / "vmstat").write_bytes(vmstat)
    host = impl.HostReader(root=str(tmp_path))
    host.refaults_below = 1000 * 1024
    page = os.sysconf("SC_PAGESIZE")
    assert host.read().refaults == (None if expected_pages is None else expected_pages * page)
    assert host.read().major_faults is None              # no pgmajfault line in these
    (tmp_path / "proc" / "vmstat").write_bytes(vmstat + b"pgmajfault 321\n")
    assert host.read().major_faults == (None if expected_pages is None else 321)
    host.refaults_below = 800 * 1024                     # MemAvailable not under it
    assert host.read().refaults is None and host.read().major_faults is None


@pytest.mark.parametrize("stat, majflt", [
    (b"9 (a) b) S 1 1 1 0 -1 0 5 6 4242 8 1 1 0 0 20 0 1 0 777 0 0\n", 4242),  # ')' in comm
    (b"9 (x) S 1 1 1 0 -1 0 5 6 x42 8 1 1 0 0 20 0 1 0 777 0 0\n", -1),      # not a number
])
def test_fake_major_faults(impl, tmp_path, stat, majflt):
    """Field 12 counted after the last ')' (a user names the process), -1 if unreadable:
    the guard then treats the candidate's part in a thrash as unknown (pressure decides)."""
    pid_dir = tmp_path / "proc" / "9"
    pid_dir.mkdir(parents=True)
    (pid_dir / "stat").write_bytes(stat)
    (pid_dir / "statm").write_bytes(b"300 200 1 1 0 50 0\n")
    table = impl.ProcessTable(root=str(tmp_path))
    slot = table.add(9)
    assert (table.major_faults(slot), table.start_time(slot)) == (majflt, 777)


def test_real_host_major_faults_beside_refaults(impl):
    """pgmajfault is read with the refault counters, under the same gate."""
    host = impl.HostReader()
    assert host.read().major_faults is None
    host.refaults_below = 1 << 62
    with open("/proc/vmstat") as f:
        before = int(dict(line.split() for line in f)["pgmajfault"])
    got = host.read().major_faults
    with open("/proc/vmstat") as f:
        assert before <= got <= int(dict(line.split() for line in f)["pgmajfault"])


def _io_full_total():
    with open("/proc/pressure/io") as f:
        return int(f.read().split("full ", 1)[1].rsplit("total=", 1)[1])


@pytest.mark.skipif(not os.path.exists("/proc/pressure/io"), reason="kernel without PSI")
def test_real_host_io_stall_is_read_with_the_refaults(impl):
    """/proc/pressure/io's "full" total is read under the same gate as the refault
    counters (nothing more to read while memory is plentiful)."""
    host = impl.HostReader()
    assert host.read().io_full_us is None
    host.refaults_below = 1 << 62
    before = _io_full_total()
    got = host.read().io_full_us
    assert before <= got <= _io_full_total()
    host.refaults_below = host.read().mem_available // 2
    assert host.read().io_full_us is None


@pytest.mark.parametrize("io, expected", [
    (b"some avg10=1.00 avg60=0.00 avg300=0.00 total=500\nfull avg10=0.50 avg60=0.00 avg300=0.00 total=321\n",
     321),
    (b"some avg10=1.00 avg60=0.00 avg300=0.00 total=500\n", 0),      # no "full" line: none counted
    (b"some avg10=x\n", None),                                       # malformed: unknown
    (None, None),                                                    # no file (old kernel)
])
def test_fake_host_io_stall(impl, tmp_path, io, expected):
    (tmp_path / "proc" / "pressure").mkdir(parents=True)
    (tmp_path / "proc" / "meminfo").write_bytes(b"MemTotal: 16000 kB\nMemAvailable: 800 kB\n")
    (tmp_path / "proc" / "vmstat").write_bytes(b"pswpin 1\nworkingset_refault_file 2\n")
    if io is not None:
        (tmp_path / "proc" / "pressure" / "io").write_bytes(io)
    host = impl.HostReader(root=str(tmp_path))
    assert host.read().io_full_us is None                # gate closed by default
    host.refaults_below = 1000 * 1024
    sample = host.read()
    assert sample.io_full_us == expected and sample.refaults is not None
    host.refaults_below = 800 * 1024
    assert host.read().io_full_us is None


def test_fake_host_without_vmstat(impl, tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_bytes(b"MemTotal: 16000 kB\nMemAvailable: 800 kB\n")
    host = impl.HostReader(root=str(tmp_path))
    host.refaults_below = 1 << 40
    assert host.read().refaults is None and host.read().mem_available == 800 * 1024


def _fake_cgroup(path, **files):
    path.mkdir(parents=True)
    defaults = {
        "memory.current": b"1048576\n",
        "memory.max": b"max\n",
        "memory.high": b"2097152\n",
        "memory.events": b"low 0\nhigh 3\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n",
        "memory.stat": b"anon 4096\nfile 8192\nkernel 5\ninactive_file 1024\nshmem 0\n",
        "memory.pressure": b"some avg10=0.00 avg60=0.00 avg300=0.00 total=10\n"
                           b"full avg10=0.50 avg60=0.00 avg300=0.00 total=5\n",
    }
    defaults.update(files)
    for name, content in defaults.items():
        if content is not None:
            (path / name).write_bytes(content)
    return path


def test_fake_cgroup(impl, tmp_path):
    cg = _fake_cgroup(tmp_path / "system.slice" / "x.service")
    table = impl.CgroupTable()
    slot = table.add(str(cg))
    assert table.sample() == 1
    s = table.get(slot)
    assert (s.current, s.max, s.high, s.swap_current) == (1048576, UNLIMITED, 2097152, UNKNOWN)
    assert (s.events_high, s.events_max, s.events_oom, s.events_oom_kill) == (3, 2, 1, 1)
    assert (s.anon, s.file, s.inactive_file, s.shmem) == (4096, 8192, 1024, 0)
    assert s.pressure.full_avg10 == 0.5 and s.pressure.some_total_us == 10
    assert table.current(slot) == 1048576 and table.path(slot) == str(cg)


def test_cgroup_sample_slots_reads_only_those_slots(impl, tmp_path):
    """The daemon re-reads only the cgroups that are due (hundreds of containers)."""
    a = _fake_cgroup(tmp_path / "a")
    b = _fake_cgroup(tmp_path / "b")
    table = impl.CgroupTable()
    sa, sb = table.add(str(a)), table.add(str(b))
    assert table.sample() == 2
    (a / "memory.current").write_bytes(b"5000\n")
    (b / "memory.current").write_bytes(b"7000\n")
    assert table.sample_slots([sb]) == 1
    assert (table.current(sa), table.current(sb)) == (1048576, 7000)
    assert table.sample_slots([sa, sb]) == 2
    assert (table.current(sa), table.current(sb)) == (5000, 7000)
    (b / "memory.current").write_bytes(b"9000\n")
    with pytest.raises(IndexError):
        table.sample_slots([sb, sb + 5])      # every slot checked before any is read
    assert table.current(sb) == 7000
    table.remove(sa)
    assert table.sample_slots([sa]) == 0 and table.status(sa) == GONE


def test_fake_cgroup_without_optional_files(impl, tmp_path):
    cg = _fake_cgroup(tmp_path / "c", **{"memory.pressure": None, "memory.stat": None,
                                         "memory.events": None, "memory.high": None})
    table = impl.CgroupTable()
    slot = table.add(str(cg))
    table.sample()
    s = table.get(slot)
    assert s.current == 1048576 and s.high == UNKNOWN and s.pressure is None
    assert s.anon == UNKNOWN and s.events_oom_kill == UNKNOWN


@needs_pidns
def test_a_failing_optional_cgroup_file_neither_blinds_nor_drops_the_cgroup():
    """memory.pressure of a real cgroup v2 fails with ENODEV after cgroup.pressure=0, and
    memory.stat fails with EISDIR: the cgroup stays OK with its memory.current, the
    failing files read UNKNOWN, and the compiled sampler and the twin agree."""
    r = run_scenario("""
from memwatchd import procfs
modules = [procfs]
if os.environ.get("MEMWATCHD_NO_EXTENSIONS", "") in ("", "0"):
    from memwatchd import _memread
    modules.append(_memread)
with cgroup2_sandbox() as cg:
    fake = os.path.join(WORK, "fake.slice")
    os.mkdir(fake)
    for name, text in (("memory.current", "104857600\\n"), ("memory.max", "max\\n"),
                       ("memory.events", "high 0\\nmax 3\\noom 0\\noom_kill 1\\n")):
        with open(os.path.join(fake, name), "w") as f:
            f.write(text)
    os.mkdir(os.path.join(fake, "memory.stat"))                         # EISDIR on read
    os.symlink(os.path.join(cg, "memory.pressure"), os.path.join(fake, "memory.pressure"))
    tables = [(m, m.CgroupTable()) for m in modules]
    slots = [t.add(fake) for m, t in tables]
    before = [(t.sample(), t.get(s).pressure is not None) for (m, t), s in zip(tables, slots)]
    with open(os.path.join(cg, "cgroup.pressure"), "w") as f:
        f.write("0")                                                    # ENODEV from now on
    after = []
    for (m, t), s in zip(tables, slots):
        live = t.sample()
        after.append((m.IMPLEMENTATION, live, t.status(s), list(t.get(s))))
result(before=before, after=after)
""")
    assert all(live == 1 and has_psi for live, has_psi in r["before"]), r
    for impl_name, live, status, sample in r["after"]:
        assert (live, status) == (1, OK), (impl_name, sample)
        assert sample[0] == 100 * MiB and sample[1] == UNLIMITED and sample[5] == 3
        assert sample[9] == UNKNOWN and sample[-1] is None     # memory.stat, memory.pressure
    assert len({json.dumps(sample) for _, _, _, sample in r["after"]}) == 1   # they agree


def test_cgroup_without_memory_controller_is_gone(impl, tmp_path):
    cg = _fake_cgroup(tmp_path / "c", **{"memory.current": None})
    with pytest.raises(TargetGone):
        impl.CgroupTable().add(str(cg))
    with pytest.raises(TargetGone):
        impl.CgroupTable().add(str(tmp_path / "missing"))


# ------------------------------------------------------------ parsers agree

@pytest.mark.skipif(NO_EXTENSIONS, reason="compares the compiled parsers with the twin")
class TestBothParseTheSame:
    from memwatchd import procfs as py

    @staticmethod
    def c():
        from memwatchd import _memread
        return _memread

    @staticmethod
    def same(fn_name, *args):
        results = []
        for module in (TestBothParseTheSame.c(), procfs):
            try:
                results.append(("ok", getattr(module, fn_name)(*args)))
            except ValueError:
                results.append(("ValueError", None))
        assert results[0] == results[1], (fn_name, args, results)

    numbers = st.integers(min_value=0, max_value=2 ** 60)
    junk = st.binary(max_size=80)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(numbers, min_size=0, max_size=8), junk)
    def test_statm(self, values, junk):
        self.same("parse_statm", " ".join(map(str, values)).encode() + junk)
        self.same("parse_statm", junk)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=30), st.lists(numbers, min_size=15, max_size=45))
    def test_stat(self, comm, fields):
        text = b"123 (" + comm + b") R " + " ".join(map(str, fields)).encode() + b"\n"
        self.same("parse_stat_start_time", text)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["anon", "file", "MemTotal:", "x", "oom", ""]),
                              st.one_of(numbers.map(str), st.just("max"), st.just("")),
                              st.sampled_from(["", " kB", "kB", " k"])), max_size=10),
           junk)
    def test_keyed(self, lines, junk):
        text = "".join(f"{k} {v}{unit}\n" for k, v, unit in lines).encode() + junk
        for scale in (1, 1024):
            self.same("parse_keyed", text, [b"anon", b"file", b"MemTotal", b"oom"], scale)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["some", "full", "other"]),
                              st.lists(st.tuples(numbers.map(lambda n: n % 100000),
                                                 st.text("0123456789", max_size=4)),
                                       min_size=3, max_size=3),
                              numbers), max_size=3), junk)
    def test_psi(self, lines, junk):
        text = "".join(
            f"{kind} avg10={a[0][0]}.{a[0][1]} avg60={a[1][0]}.{a[1][1]} "
            f"avg300={a[2][0]}.{a[2][1]} total={total}\n"
            for kind, a, total in lines).encode()
        self.same("parse_psi", text)
        self.same("parse_psi", text + junk)

    @settings(max_examples=200, deadline=None)
    @given(junk)
    def test_max(self, data):
        self.same("parse_max", data)
        self.same("parse_max", b"max" + data)


# ------------------------------------------------------------ syscalls

def test_process_mrelease_on_live_process_is_einval_then_works_after_sigkill(impl):
    child = subprocess.Popen(["sleep", "30"])
    pidfd = os.pidfd_open(child.pid)
    try:
        with pytest.raises(OSError) as live:
            impl.process_mrelease(pidfd)
        assert live.value.errno == errno.EINVAL
        os.kill(child.pid, signal.SIGKILL)
        try:
            impl.process_mrelease(pidfd)  # dying: the kernel reaps its memory now
        except OSError as e:  # or it already finished exiting
            assert e.errno in (errno.ESRCH, errno.EINVAL)
    finally:
        os.close(pidfd)
        child.kill()
        child.wait()


def test_mlockall_onfault_in_a_child(impl):
    """Locks its own memory (as the daemon will); done in a child to leave pytest unlocked."""
    module = impl.__name__
    code = (f"import {module} as m\nm.mlockall_onfault()\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmLck')][0])")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if os.geteuid() != 0 and out.returncode != 0:
        pytest.skip("mlockall needs CAP_IPC_LOCK or a large RLIMIT_MEMLOCK")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("VmLck:")


def _has_cap(bit):
    with open("/proc/self/status") as f:
        eff = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(eff.split()[1], 16) >> bit & 1)


def test_set_io_flusher_in_a_child(impl):
    """PR_SET_IO_FLUSHER (the daemon sets it at start: its reclaim then never waits on a
    slow swap device): set where the process has CAP_SYS_RESOURCE (PR_GET_IO_FLUSHER
    reads 1), EPERM where it does not (this host's sandbox; the VM tier checks the unit)."""
    code = (f"import ctypes, {impl.__name__} as m\n"
            "try:\n    m.set_io_flusher()\nexcept PermissionError:\n    print('EPERM')\n"
            "else:\n    print(ctypes.CDLL(None).prctl(58, 0, 0, 0, 0))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("1" if _has_cap(24) else "EPERM"), out.stdout   # CAP_SYS_RESOURCE


def test_sample_slots_reads_only_those(impl, hog_factory):
    hog = hog_factory(32 * MiB)
    table = impl.ProcessTable()
    mine = table.add(os.getpid())
    theirs = table.add(hog.pid)
    table.sample()
    before = table.rss(theirs)
    hog.grow()
    assert table.sample_slots([mine]) == 1
    assert table.rss(theirs) == before  # not re-read
    assert table.sample_slots([theirs]) == 1
    assert table.rss(theirs) >= before + 30 * MiB
    with pytest.raises(IndexError):
        table.sample_slots([99])


# ------------------------------------------------------------ the quiet wait (issue 18)

def _meminfo(tmp_path, avail_kb):
    path = tmp_path / "proc" / "meminfo"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"MemTotal:       16000000 kB\nMemFree:  100 kB\n"
                     b"MemAvailable:    %d kB\nSwapTotal:        0 kB\nSwapFree:         0 kB\n"
                     % avail_kb)
    return path


def test_wait_quiet_times_out_while_memavailable_stays_in_its_band(impl):
    host = impl.HostReader()
    avail = host.read().mem_available
    r, w = os.pipe()
    try:
        t0 = time.monotonic()
        why, ready, pings, seen, ago, _ = impl.wait_quiet(host, [(r, select_POLLIN)], 0.35, 0.1,
                                                       0, avail + (64 << 30))
        took = time.monotonic() - t0
        assert (why, ready, pings, ago) == (0, [], 0, 0.0)
        assert 0.34 <= took < 3.0
        assert abs(seen - avail) < (4 << 30)      # it read the real MemAvailable meanwhile
    finally:
        os.close(r)
        os.close(w)


def test_wait_quiet_returns_at_once_when_an_fd_fires(impl):
    host = impl.HostReader()
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        t0 = time.monotonic()
        why, ready, _pings, _seen, _ago, _ = impl.wait_quiet(host, [(r, select_POLLIN)], 30.0, 1.0,
                                                          0, 1 << 62)
        assert why == 1 and ready == [(r, select_POLLIN)]
        assert time.monotonic() - t0 < 1.0
    finally:
        os.close(r)
        os.close(w)


def test_wait_quiet_comes_back_when_memavailable_leaves_the_band(impl, tmp_path):
    """A fixture meminfo (a host falling towards the guard's floor cannot be produced on
    demand without GiBs): the wait ends at the first look after MemAvailable fell under
    low, or rose above high; a meminfo without MemAvailable ends it too."""
    path = _meminfo(tmp_path, 8_000_000)
    host = impl.HostReader(root=str(tmp_path))
    low, high = 7_000_000 * 1024, 9_000_000 * 1024
    r, w = os.pipe()
    try:
        why, _, _, seen, _, _ = impl.wait_quiet(host, [(r, select_POLLIN)], 0.25, 0.05, low, high)
        assert why == 0 and seen == 8_000_000 * 1024
        for avail_kb in (6_999_999, 9_000_001):
            _meminfo(tmp_path, avail_kb)
            t0 = time.monotonic()
            why, _, _, seen, _, _ = impl.wait_quiet(host, [(r, select_POLLIN)], 30.0, 0.05, low, high)
            assert why == 2 and seen == avail_kb * 1024
            assert time.monotonic() - t0 < 2.0
        path.write_bytes(b"MemTotal:       16000000 kB\n")
        why, _, _, seen, _, _ = impl.wait_quiet(host, [(r, select_POLLIN)], 30.0, 0.05, low, high)
        assert why == 2 and seen == -1
    finally:
        os.close(r)
        os.close(w)


def test_wait_quiet_pings_a_real_notify_socket_at_its_cadence(impl, tmp_path):
    import socket
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    sender.connect(str(tmp_path / "notify.sock"))
    host = impl.HostReader()
    r, w = os.pipe()
    try:
        why, _, pings, _, ago, _ = impl.wait_quiet(host, [(r, select_POLLIN)], 1.0, 0.5, 0, 1 << 62,
                                                sender.fileno(), 0.2, 0.05)
        assert why == 0
        got = []
        listener.setblocking(False)
        while True:
            try:
                got.append(listener.recv(64))
            except BlockingIOError:
                break
        assert got == [b"WATCHDOG=1"] * pings and 4 <= pings <= 5, (pings, got)
        assert 0.0 <= ago <= 0.2 + 0.1
        listener.close()                          # systemd went away: the wait says so
        why, _, pings, _, _, _ = impl.wait_quiet(host, [(r, select_POLLIN)], 5.0, 1.0, 0, 1 << 62,
                                              sender.fileno(), 0.2, 0.0)
        assert why == 3 and pings == 0
    finally:
        sender.close()
        os.close(r)
        os.close(w)



def test_wait_quiet_merges_the_host_look_and_the_pings_into_the_targets_wake_ups(impl, tmp_path):
    """One wake-up does every look due within half the shortest period: targets every
    0.1 s, the host every 0.4 s, a ping every 0.8 s over 2 s is about 20 wake-ups, not
    the 20 + 5 + 2.5 of one wake-up each; every look still happens (the host was read,
    the pings were sent, the target was sampled: its RSS is known)."""
    import socket
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    sender.connect(str(tmp_path / "notify.sock"))
    host = impl.HostReader()
    table = impl.ProcessTable(capacity=1)
    slot = table.add(os.getpid())
    r, w = os.pipe()
    try:
        t0 = time.monotonic()
        why, _, pings, seen, _, wakes = impl.wait_quiet(
            host, [(r, select_POLLIN)], 2.0, 0.4, 0, 1 << 62, sender.fileno(), 0.8, 0.8,
            table, [slot], [1 << 50], 0.1)
        took = time.monotonic() - t0
        assert why == 0 and seen > 0 and 2 <= pings <= 3 and table.rss(slot) > 0
        assert wakes <= round(took / 0.1) + 2, (wakes, took)
    finally:
        listener.close()
        sender.close()
        os.close(r)
        os.close(w)


def test_wait_quiet_reads_each_slot_on_its_own_schedule(impl):
    """Per-slot steps: a slot far from its limit (every 1.5 s) is not read as often as
    a close one (every 0.1 s), nor later than its own step. Seen through a process that
    dies at 0.2 s in the slow slot: the wait ends (why 4) at that slot's first look,
    about 1.5 s, not at the fast slot's next look."""
    import subprocess
    host = impl.HostReader()
    table = impl.ProcessTable(capacity=2)
    doomed = subprocess.Popen(["sleep", "30"])
    fast, slow = table.add(os.getpid()), table.add(doomed.pid)
    r, w = os.pipe()
    try:
        t0 = time.monotonic()
        threading.Timer(0.2, lambda: (doomed.kill(), doomed.wait())).start()
        why, _, _, _, _, wakes = impl.wait_quiet(
            host, [(r, select_POLLIN)], 10.0, 1.0, 0, 1 << 62, -1, 0.0, 0.0,
            table, [fast, slow], [1 << 50, 1 << 50], 0.1, [0.1, 1.5])
        took = time.monotonic() - t0
        assert why == 4 and table.status(slow) != 0, (why, table.status(slow))
        assert 1.35 <= took <= 1.5 + 1.0, took
        assert wakes >= 10     # the fast slot's looks went on meanwhile
        with pytest.raises(ValueError):
            impl.wait_quiet(host, [], 0.1, 1.0, 0, 1 << 62, -1, 0.0, 0.0,
                            table, [fast, slow], [1, 1], 0.1, [0.1])
    finally:
        doomed.kill()
        doomed.wait()
        os.close(r)
        os.close(w)

select_POLLIN = 1
