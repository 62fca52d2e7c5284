"""The targets stage: what to watch, resolved from the config and kept current.

Each [[watch]] selector (pid, pidfile, unit, cgroup glob, cmdline regex)
resolves to concrete targets: a process (identity: pid + start time, read
through one /proc/<pid> directory fd by the sampler) or a cgroup directory.
Targets that exit are dropped quietly; new matches are picked up on the next
rescan. ``sample_due`` reads only the targets whose time has come and turns
them into ``Reading``s for the policy.
"""
from __future__ import annotations

import collections
import os
import stat
import time
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Set, Tuple

    from memwatchd import cmdmatch, pidfile, procevents
# memwatchd.pidfile, memwatchd.cmdmatch and memwatchd.procevents are imported by the
# first pidfile / cmdline / tree watch: the default config (the guard alone) does not
# carry them.

from memwatchd import sampler
from memwatchd.sampler import parse_stat_start_time
from memwatchd.threadgroup import live_task_dir
from memwatchd.config import CGROUP_ROOT, Config, WatchConfig
from memwatchd.types import (GONE, OK, AccessDenied, Candidate, MemwatchdError, Reading,
                             TargetGone)

RESCAN_INTERVAL = 2.0     # seconds between re-resolving globs, regexes, pidfiles and units
EVENTS_KEPT = 4096        # process events queued past a tick's budget; more: rescan instead
NO_PROC_EVENTS = "MEMWATCHD_NO_PROC_EVENTS"   # set (to 1): rescan only, no connector
SYSTEMCTL_TIMEOUT = 5.0   # a `systemctl show` still running after this is killed
SYSTEMCTL_WAIT = 0.2      # the loop waits this long for it, then looks again on later ticks
SYSTEMD_RUNTIME_DIR = "/run/systemd/system"   # exists iff systemd is PID 1 (sd_booted(3))
_WARNED_MAX = 1024        # distinct problems remembered (and so logged once) per config


# ------------------------------------------------------------ what the host offers

def cgroup_v2_memory(cgroup_root: str = CGROUP_ROOT) -> bool:
    """Is cgroup_root a cgroup v2 hierarchy with the memory controller? Its root's
    cgroup.controllers lists "memory" then; a v1 or hybrid /sys/fs/cgroup (a tmpfs of
    v1 mounts) has no such file, and a v2 tree without the controller does not list it."""
    try:
        return b"memory" in read_small(os.path.join(cgroup_root, "cgroup.controllers")).split()
    except OSError:
        return False


def host_support(cgroup_root: str = CGROUP_ROOT) -> Dict[str, str]:
    """Why "unit" and "cgroup" watches cannot work here ({} when both can): checked once
    at start and on reload, said once, so such watches are off instead of "gone" every
    rescan; process watches and the guard need neither."""
    off: Dict[str, str] = {}
    if not cgroup_v2_memory(cgroup_root):
        off["cgroup"] = off["unit"] = off["container"] = \
            f"{cgroup_root} is not cgroup v2 with the memory controller"
    if not os.path.isdir(SYSTEMD_RUNTIME_DIR):
        off["unit"] = "needs systemd as PID 1"
    return off


# ------------------------------------------------------------ /proc helpers

def read_small(path: str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.read(65536)


def read_comm(pid: int, proc: str = "/proc") -> str:
    """The process's name (attacker-controlled: escape before logging)."""
    try:
        return read_small(f"{proc}/{pid}/comm").rstrip(b"\n").decode("utf-8", "backslashreplace")
    except OSError:
        return ""


def read_cmdline(pid: int, proc: str = "/proc") -> str:
    """Arguments joined by spaces (attacker-controlled: escape before logging). A process
    whose main thread exited reads an empty cmdline: a live thread's is read instead."""
    try:
        raw = read_small(f"{proc}/{pid}/cmdline")
        task = live_task_dir(proc, pid) if not raw else ""
        if task and task != os.path.join(proc, str(int(pid))):   # the leader is a zombie
            raw = read_small(task + "/cmdline")
    except OSError:
        return ""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "backslashreplace")


def exec_mark(pid: int, proc: str = "/proc") -> Optional[tuple]:
    """(start time, comm, arg_start, arg_end) from one read of /proc/<pid>/stat, which
    takes no mmap_lock: an exec changes comm or the argv addresses (a new stack), so an
    unchanged mark means a cmdline read under it is still the program's (valid_mark says
    when it can vouch: not mid-exec, nor a leader whose thread group lives on without it,
    whose argv fields read 0). None if unreadable or too old a kernel (< 3.5)."""
    try:
        data = read_small(f"{proc}/{pid}/stat")
        close = data.rindex(b")")
        rest = data[close + 2:].split()
        comm = data[data.index(b"(") + 1:close].decode("utf-8", "backslashreplace")
        return int(rest[19]), comm, int(rest[45]), int(rest[46])
    except (OSError, ValueError, IndexError):
        return None


def valid_mark(mark: Optional[tuple]) -> bool:
    """Whether an exec_mark shows a program with its argv in place."""
    return mark is not None and mark[2] < mark[3]


def read_names(pid: int, proc: str = "/proc") -> Tuple[str, str, Optional[tuple]]:
    """(comm, cmdline, mark): the mark (exec_mark) is kept only if it was the same before
    and after both reads and the cmdline is not empty, i.e. no exec ran in between (a
    wrapper such as env or nice exec's its program while memwatchd attaches)."""
    before = exec_mark(pid, proc)
    comm, cmdline = read_comm(pid, proc), read_cmdline(pid, proc)
    after = exec_mark(pid, proc)
    return comm, cmdline, before if before == after and valid_mark(before) and cmdline else None


def process_owner(pid: int, proc: str = "/proc") -> Tuple[int, Optional[bool]]:
    """(real uid, whether its executable is a root-owned regular file nobody else may write).

    What the guard needs to trust a protected name. /proc/<pid>/exe is stat'ed through
    the magic link, so an executable replaced by an upgrade (shown "(deleted)") still
    answers for the very file that runs; a kernel thread has none (False: no name
    protects it, and it has no memory of its own anyway). None when the kernel will not
    let us look: exe needs ptrace access, which the hardened unit lacks for a root
    process holding capabilities memwatchd's bounding set does not have.
    """
    task = live_task_dir(proc, pid)   # leader exited: its status and exe are empty
    uid = -1
    try:
        for line in read_small(task + "/status").splitlines():
            if line.startswith(b"Uid:"):
                uid = int(line.split()[1])
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        st = os.stat(task + "/exe")
    except (PermissionError, OSError) as e:
        return uid, None if isinstance(e, PermissionError) else False
    return uid, stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022


def read_cgroup(pid: int, proc: str = "/proc") -> str:
    """The process's cgroup v2 path ("/system.slice/x.service"), "" if unknown."""
    try:
        for line in read_small(f"{proc}/{pid}/cgroup").decode("utf-8", "replace").splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return ""


def read_ppid(pid: int, proc: str = "/proc") -> int:
    try:
        return _stat_fields(read_small(f"{proc}/{pid}/stat"))[0]
    except (OSError, ValueError):
        return 0


def list_pids(proc: str = "/proc") -> List[int]:
    return [int(name) for name in os.listdir(proc) if name.isdigit()]


def _stat_fields(data: bytes) -> Tuple[int, int]:
    """(ppid, start_time) from /proc/<pid>/stat; fields counted after the LAST ')'."""
    close = data.rfind(b")")
    rest = data[close + 2:].split(b" ", 2) if close >= 0 else []
    if len(rest) < 2:
        raise ValueError("malformed stat")
    return int(rest[1]), parse_stat_start_time(data)


def _children_files(proc: str, pid: int) -> Optional[List[int]]:
    """Children of pid from /proc/<pid>/task/*/children; None if the kernel lacks those files."""
    task_dir = os.path.join(proc, str(pid), "task")
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return []  # exited mid-walk
    kids: List[int] = []
    for tid in tids:
        try:
            data = read_small(os.path.join(task_dir, tid, "children"))
        except FileNotFoundError:
            if os.path.exists(os.path.join(task_dir, tid, "stat")):
                return None  # thread is there but has no 'children': CONFIG_PROC_CHILDREN=n
            continue  # the thread exited
        except OSError:
            continue
        kids.extend(int(x) for x in data.split())
    return kids


def _ppid_map(proc: str) -> Dict[int, List[int]]:
    """ppid -> pids from one scan of /proc/*/stat (fallback for kernels without 'children')."""
    out: Dict[int, List[int]] = {}
    try:
        names = os.listdir(proc)
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            ppid, _start = _stat_fields(read_small(os.path.join(proc, name, "stat")))
        except (OSError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(name))
    return out


def descendants(pid: int, proc_root: str = "/") -> List[Tuple[int, int]]:
    """All descendants of pid as (pid, start_time), deepest first (children before parents).

    Each entry's stat is re-read and kept only if its ppid is still the parent we
    found it under: a child that exited and whose PID was reused by an unrelated
    process mid-walk is dropped. Processes that vanish are skipped. Does not
    include pid itself and does not verify pid's identity (signal_tree does).
    """
    proc = os.path.join(proc_root, "proc")
    ppid_map: Optional[Dict[int, List[int]]] = None
    levels: List[List[Tuple[int, int]]] = []
    seen: Set[int] = {int(pid)}
    frontier = [int(pid)]
    while frontier:
        level: List[Tuple[int, int]] = []
        for parent in frontier:
            kids = None if ppid_map is not None else _children_files(proc, parent)
            if kids is None:
                if ppid_map is None:
                    ppid_map = _ppid_map(proc)
                kids = ppid_map.get(parent, [])
            for kid in kids:
                if kid in seen:
                    continue
                try:
                    ppid, start = _stat_fields(read_small(os.path.join(proc, str(kid), "stat")))
                except (OSError, ValueError):
                    continue  # vanished
                if ppid != parent:
                    continue  # re-parented, or the PID now names someone else
                seen.add(kid)
                level.append((kid, start))
        if level:
            levels.append(level)
        frontier = [kid for kid, _ in level]
    return [entry for level in reversed(levels) for entry in level]


def ancestors(pid: int, proc: str = "/proc") -> Set[int]:
    """pid and its ancestors: memwatchd never targets itself or what started it."""
    out = set()
    while pid > 0 and pid not in out:
        out.add(pid)
        pid = read_ppid(pid, proc)
    return out


def start_unit_show(unit: str):
    """Start `systemctl show` for a unit's cgroup properties; a Popen (read it with
    unit_cgroup_of), or None if systemctl cannot be run. Does not wait for it."""
    import subprocess  # only unit watches pay for it (~1 MiB resident)
    try:
        return subprocess.Popen(["systemctl", "show", "-p", "ControlGroup", "-p", "Slice", "-p", "Id",
                                 "--", unit], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, text=True)
    except OSError:
        return None


def unit_cgroup_of(proc, wait: float) -> Optional[str]:
    """The cgroup path a started `systemctl show` reports ("" if it fails or systemd does
    not say), or None if it has not finished within ``wait`` seconds (call again)."""
    import subprocess
    if wait <= 0 and proc.poll() is None:
        return None
    try:   # exited: its output is in the pipe (a short bound in case a child holds it open)
        out, _ = proc.communicate(timeout=max(wait, 0.05))
    except subprocess.TimeoutExpired:
        return None
    return _unit_path(out) if proc.returncode == 0 else ""


def unit_cgroup(unit: str) -> str:
    """The unit's cgroup below the cgroup root: where it runs or, when it is not running,
    where systemd will put it (its slice's cgroup + its name); "" if systemd does not say.
    Waits for systemctl (at most SYSTEMCTL_TIMEOUT): not for the daemon's loop."""
    proc = start_unit_show(unit)
    if proc is None:
        return ""
    path = unit_cgroup_of(proc, SYSTEMCTL_TIMEOUT)
    if path is None:
        proc.kill()
        proc.communicate()
        return ""
    return path


def _unit_path(stdout: str) -> str:
    props = dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
    if props.get("ControlGroup"):
        return props["ControlGroup"]
    slice_name, unit_id = props.get("Slice", ""), props.get("Id", "")
    if not slice_name.endswith(".slice") or not unit_id:
        return ""
    # "a-b.slice" lives at /a.slice/a-b.slice (systemd's cg_slice_to_path); "-.slice" is the root.
    parts = slice_name[:-len(".slice")].split("-") if slice_name != "-.slice" else []
    return "".join("/" + "-".join(parts[:i + 1]) + ".slice" for i in range(len(parts))) \
        + "/" + unit_id


# ------------------------------------------------------------------ targets

class Target:
    """One watched process (or process tree) or cgroup."""

    __slots__ = ("key", "is_cgroup", "watch", "pid", "start_time", "slot", "members", "cgroup",
                 "comm", "cmdline", "_usage", "limit", "warn", "_next_due", "_sampled_at",
                 "_interval", "unreclaimable", "ceiling", "names_mark", "container", "table")

    def __init__(self, key: tuple, watch: WatchConfig, pid: int = 0, start_time: int = 0,
                 slot: int = -1, cgroup: str = "", comm: str = "", cmdline: str = "",
                 next_due: float = 0.0) -> None:
        self.key = key
        self.is_cgroup = key[0] == "cgroup"
        self.watch = watch
        self.pid = pid
        self.start_time = start_time
        self.slot = slot                    # ProcessTable slot (process/tree) or CgroupTable slot
        self.members: Dict[tuple, int] = {}  # tree: (pid, start) -> slot
        self.cgroup = cgroup                # below the cgroup root ("/system.slice/x.service")
        self.comm = comm
        self.cmdline = cmdline
        self.table = None   # the ProcessTable while it keeps this target's schedule
        self._usage = 0
        self.limit = 0
        self.warn: Optional[int] = None
        self._next_due = next_due
        self._sampled_at = 0.0
        self._interval = 0.0
        self.unreclaimable: Optional[int] = None   # cgroup: anon + shmem (the predictive trigger's)
        self.ceiling: Optional[int] = None         # cgroup: memory.max, None = "max"
        self.names_mark: Optional[tuple] = None    # process: exec_mark() its comm/cmdline hold for
        self.container = ""                        # container watch: the container's name

    # While the ProcessTable keeps a quiet process's schedule (TargetSet.hand_to_table,
    # issue 18) the tick does not touch the target: its usage, last sample, interval and
    # next due time are the table's, so `status`, the state file and metrics see what
    # the table last read, and setting next_due (0.0: look now) reaches the table.
    @property
    def usage(self) -> int:
        return self._usage if self.table is None else self.table.rss(self.slot)

    @usage.setter
    def usage(self, value: int) -> None:
        self._usage = value

    @property
    def next_due(self) -> float:
        return self._next_due if self.table is None else self.table.due_at(self.slot)

    @next_due.setter
    def next_due(self, value: float) -> None:
        if self.table is None:
            self._next_due = value
        else:
            self.table.set_due(self.slot, value)

    @property
    def sampled_at(self) -> float:
        return self._sampled_at if self.table is None else self.table.sampled_at(self.slot)

    @sampled_at.setter
    def sampled_at(self, value: float) -> None:
        self._sampled_at = value

    @property
    def interval(self) -> float:
        return self._interval if self.table is None else self.table.interval(self.slot)

    @interval.setter
    def interval(self, value: float) -> None:
        self._interval = value


class TargetSet:
    """All current targets of a config, with the sampler tables that read them."""

    def __init__(self, config: Config, proc_root: str = "/", cgroup_root: str = CGROUP_ROOT,
                 never: Iterable[int] = (), events: bool = True):
        self.proc = os.path.join(proc_root, "proc")
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root
        self.processes = sampler.ProcessTable(root=proc_root)
        self.cgroups = sampler.CgroupTable()
        self.host = sampler.HostReader(root=proc_root)
        self.never = set(never)
        self.targets: Dict[tuple, Target] = {}
        self.by_python: Dict[tuple, Target] = {}   # the targets the tick schedules (not in_table)
        self.in_table: Dict[int, Target] = {}      # slot -> target whose schedule the table keeps
        self.rescan_at: Dict[str, float] = {}
        self.pid_watches_done: Set[str] = set()
        self.unit_paths: Dict[str, str] = {}   # unit watch -> its cgroup when last seen running
        self.unit_shows: Dict[str, tuple] = {}  # unit watch -> (running `systemctl show`, started)
        self.container_index = None             # containers.ContainerIndex, once a watch needs it
        self.container_paths: Dict[str, Dict[str, str]] = {}  # container watch -> {cgroup: name}
        self.config = config
        self.mem_total = self.host.read().mem_total
        self.problems: List[str] = []     # resolution trouble, for the daemon to log
        self.failed: List[tuple] = []     # (watch name, exception): a bug; the daemon quarantines
        self.quarantined: Set[str] = set()   # watch names not resolved until a reload
        self.vanished: List[Target] = []  # dropped by a rescan, reported with the next sample
        self.warned: Set[str] = set()     # problems already logged under this config
        self.scans: Dict[str, cmdmatch.CmdlineScan] = {}   # cmdline watch -> its matching
        self._work_until: Optional[float] = None   # this tick's cmdline budget ends
        self.off: Dict[str, str] = {}     # watch name -> why the host cannot serve it
        self.connector: Optional[procevents.Connector] = None   # new processes at exec/fork
        self.discovery = ""               # how new processes are found (the log, `status`)
        self.discovery_changed = False    # the daemon logs the new mode once
        self._events = collections.deque()   # ("exec", pid) / ("fork", parent, child) to handle
        self._lost = ""                   # why events were lost since the last tick ("": none)
        self.use_events = events          # False: one-shot users (`status`) rescan only
        self._check_host()
        self._update_discovery()

    # ---------------------------------------------------------- resolution

    def reconfigure(self, config: Config) -> List[tuple]:
        """Adopt a new config: targets of removed or changed watches are dropped;
        unchanged watches keep their targets (and a pid watch is not re-attached)."""
        self.take_all_back()   # limits, pace and the policy's ceilings may all change
        new = {w.name: w for w in config.watches}
        old = {w.name: w for w in self.config.watches}
        dropped = [k for k, t in self.targets.items() if new.get(t.watch.name) != t.watch]
        for key in dropped:
            self.drop(key)
        self.pid_watches_done = {n for n in self.pid_watches_done if new.get(n) == old.get(n)}
        self.scans = {n: s for n, s in self.scans.items() if new.get(n) == old.get(n)}
        self.unit_paths = {n: p for n, p in self.unit_paths.items() if new.get(n) == old.get(n)}
        self.container_paths = {n: p for n, p in self.container_paths.items()
                                if new.get(n) == old.get(n)}
        self.config = config
        self.rescan_at.clear()
        self.warned.clear()
        self._check_host()
        self._update_discovery()
        return dropped

    def _check_host(self) -> None:
        """Turn off the unit/cgroup watches this host cannot serve, saying so once."""
        support = host_support(self.cgroup_root)
        self.off = {w.name: support[w.kind] for w in self.config.watches if w.kind in support}
        for name, why in self.off.items():
            watch = next(w for w in self.config.watches if w.name == name)
            self.problems.append(f"watch {name} ({watch.kind} {watch.selector}) is off ({why}); "
                                 f"process watches and the guard keep working")

    def _problem(self, text: str) -> None:
        """Log a resolution problem once per config, not every tick or rescan."""
        if text in self.warned:
            return
        if len(self.warned) >= _WARNED_MAX:
            self.warned.clear()
        self.warned.add(text)
        self.problems.append(text)

    def refresh(self, now: float) -> List[Target]:
        """Resolve every watch whose rescan is due; return the targets added."""
        added: List[Target] = []
        self._work_until = None           # set by the first cmdline watch this tick
        if self.connector is not None:
            added.extend(self._take_events(now))
        for watch in self.config.watches:
            if watch.name in self.off or watch.name in self.quarantined:
                continue
            try:
                if now < self.rescan_at.get(watch.name, 0.0):
                    if watch.name in self.unit_paths:
                        added.extend(self._unit_restarted(watch, now))
                    elif watch.name in self.container_paths:
                        added.extend(self._containers_restarted(watch, now))
                    continue
                self.rescan_at[watch.name] = now + RESCAN_INTERVAL
                added.extend(self._resolve(watch, now))
            except (OSError, MemwatchdError) as e:
                self._problem(f"watch {watch.name}: {e}")
            except Exception as e:   # a bug: this watch only (the daemon quarantines it)
                self.failed.append((watch.name, e))
        return added

    def _resolve(self, watch: WatchConfig, now: float) -> List[Target]:
        have = [t for t in self.targets.values() if t.watch.name == watch.name]
        if watch.kind == "pid":
            # A pid names one process once: after it exits, nothing is re-attached.
            if watch.name in self.pid_watches_done:
                return []
            self.pid_watches_done.add(watch.name)
            # After a restart or reboot the number may name another process: one that
            # started after the config file was written is not the one it meant.
            return self._attach_pids(watch, [int(watch.selector)], now,
                                     not_after=self._config_written, why="the config file")
        if watch.kind == "pidfile":
            from memwatchd import pidfile
            path = str(watch.selector)
            try:
                pid, writer, written = pidfile.read_pidfile(path)
            except FileNotFoundError:
                return []   # not written yet (or removed): nothing to watch, no complaint
            if any(t.pid == pid for t in have):
                return []
            for t in have:  # the pidfile names another process now: follow it
                self.vanished.append(self.drop(t.key))
            return self._attach_pids(watch, [pid], now, not_after=written,
                                     why=f"pidfile {path}", owner=writer)
        if watch.kind == "cmdline":
            # Bounded work (memwatchd.cmdmatch): verdicts cached per command line, a budget
            # per tick shared by all cmdline watches, a deadline per regex search.
            from memwatchd import cmdmatch
            if self._work_until is None:
                self._work_until = time.perf_counter() + cmdmatch.BUDGET
            scan = self._scan(watch)
            slow: List[Tuple[int, int]] = []
            with cmdmatch.Alarm() as alarm:
                matches, complete = scan.step(
                    lambda: list_pids(self.proc), lambda p: read_cmdline(p, self.proc),
                    {t.pid for t in have} | self.never, self._work_until, alarm, slow)
            for pid, length in slow:
                self._problem(f"watch {watch.name}: the cmdline regex took over "
                              f"{cmdmatch.MATCH_DEADLINE * 1000:.0f} ms on pid {pid} (a "
                              f"{length}-character command line): not matched")
            if not complete:
                self.rescan_at[watch.name] = now   # the rest on the next tick
            return self._attach_pids(watch, matches, now)
        if watch.kind == "unit":
            if have:
                return []
            path = self._unit_cgroup(watch, now)
            if not path:
                return []
            self.unit_paths[watch.name] = path  # between rescans, _unit_restarted looks there
            if not os.path.isdir(self.cgroup_root + path):
                return []  # not running
            return self._attach_cgroups(watch, [path], now)
        if watch.kind == "cgroup":
            taken = {t.cgroup for t in have}
            pattern = self.cgroup_root + str(watch.selector)
            import glob   # only cgroup-glob watches use it
            paths = [p[len(self.cgroup_root):] for p in sorted(glob.glob(pattern))
                     if os.path.isdir(p)]
            for t in have:  # removed since: drop now, whatever a kept fd still reads
                if t.cgroup not in paths:
                    self.vanished.append(self.drop(t.key))
            return self._attach_cgroups(watch, [p for p in paths if p not in taken], now)
        if watch.kind == "container":
            return self._resolve_containers(watch, have, now)
        return []

    def _resolve_containers(self, watch: WatchConfig, have: List[Target],
                            now: float) -> List[Target]:
        """Running containers whose name matches (memwatchd.containers: the cgroup tree
        for who runs, the runtime's metadata for names; no socket, no CLI, bounded)."""
        if self.container_index is None:
            from memwatchd import containers
            self.container_index = containers.ContainerIndex(self.cgroup_root)
        index = self.container_index
        found = {c.cgroup: c.name for c in index.matching(str(watch.selector))}
        for problem in index.problems:
            self._problem(f"watch {watch.name}: {problem}")
        index.problems.clear()
        if not found:
            why = index.runtime_problem()
            if why:
                self._problem(f"watch {watch.name} (container {watch.selector}): {why}; "
                              f"the other watches keep running")
        for t in have:   # stopped, removed or renamed away: drop now
            if found.get(t.cgroup) != t.container:
                self.vanished.append(self.drop(t.key))
        # Kept between rescans so a container restarted under the same id (--restart)
        # is watched from its next tick (one stat each), like a restarted unit.
        known = self.container_paths.setdefault(watch.name, {})
        known.update(found)
        while len(known) > 64:
            del known[next(iter(known))]
        return self._attach_containers(watch, found, now)

    def _containers_restarted(self, watch: WatchConfig, now: float) -> List[Target]:
        """Between rescans: a known container cgroup that is back (Docker restarted it)."""
        watched = {t.cgroup for t in self.targets.values() if t.watch.name == watch.name}
        back = {path: name for path, name in self.container_paths[watch.name].items()
                if path not in watched and os.path.isdir(self.cgroup_root + path)}
        return self._attach_containers(watch, back, now) if back else []

    def _attach_containers(self, watch: WatchConfig, found: Dict[str, str],
                           now: float) -> List[Target]:
        added = self._attach_cgroups(watch, sorted(found), now)
        for t in added:
            t.container = found[t.cgroup]
        return added

    def _scan(self, watch: WatchConfig) -> cmdmatch.CmdlineScan:
        """The cmdline watch's matching state (verdicts shared by rescans and events)."""
        from memwatchd import cmdmatch
        scan = self.scans.get(watch.name)
        if scan is None or scan.pattern.pattern != str(watch.selector):
            scan = self.scans[watch.name] = cmdmatch.CmdlineScan(str(watch.selector))
        return scan

    # ------------------------------------------------- event-driven discovery

    def _update_discovery(self) -> None:
        """Listen to process events (memwatchd.procevents) while some watch finds new
        processes: a cmdline watch (a new program) or a tree (a new child). Cgroup and
        unit watches need none: memory.current counts a new process from its first page
        and their actions read cgroup.procs (or use cgroup.kill) when they act. Without
        the connector (or with MEMWATCHD_NO_PROC_EVENTS set) the rescan finds them, as
        it always does besides."""
        wanted = any(w.kind == "cmdline" or w.scope == "tree" for w in self.config.watches)
        before = self.discovery
        if not wanted:
            self._close_connector()
            self.discovery = ""
        elif self.connector is None:
            why = ""
            if not self.use_events:
                why = "not asked for"
            elif os.environ.get(NO_PROC_EVENTS, "") not in ("", "0"):
                why = f"{NO_PROC_EVENTS} is set"
            elif os.path.realpath(self.proc) != "/proc":
                why = f"/proc is read at {self.proc}"
            else:
                from memwatchd import procevents
                try:
                    self.connector = procevents.Connector(self.proc)
                except procevents.Unavailable as e:
                    why = str(e)
            self.discovery = "process events" if self.connector is not None else \
                f"rescan every {RESCAN_INTERVAL:g}s ({why})"
        self.discovery_changed = self.discovery != before and bool(self.discovery)

    def _close_connector(self) -> None:
        if self.connector is not None:
            self.connector.close()
            self.connector = None
        self._events.clear()
        self._lost = ""

    def close(self) -> None:
        self._close_connector()

    @property
    def events_fd(self) -> int:
        """The connector's fd for the loop to wait on; -1 without one, or while events
        are queued (the loop comes back at min_interval for them: see busy)."""
        return self.connector.fileno() if self.connector is not None and not self._events else -1

    def _event_watches(self) -> Tuple[List[WatchConfig], Dict[int, Target], Set[int]]:
        """The cmdline watches in force, tree member pid -> its tree, and the pids of
        cmdline targets (their children share their command line)."""
        watches = [w for w in self.config.watches if w.kind == "cmdline"
                   and w.name not in self.off and w.name not in self.quarantined]
        trees: Dict[int, Target] = {}
        followed: Set[int] = set()
        for t in self.targets.values():
            if t.watch.scope == "tree" and not t.is_cgroup:
                trees.update((pid, t) for pid, _start in t.members)
            if t.watch.kind == "cmdline":
                followed.add(t.pid)
        return watches, trees, followed

    def take_events(self) -> bool:
        """Read one batch from the connector and queue what concerns a watch: every exec
        while a cmdline watch exists, a fork by a tree member or a cmdline target (or by
        a child queued so). True if the loop should tick now (something queued, events
        lost); a new thread or an unrelated fork does not wake the loop's tick."""
        if self.connector is None:
            return False
        try:
            batch = self.connector.read()
        except OSError as e:
            self._close_connector()
            self.discovery = f"rescan every {RESCAN_INTERVAL:g}s (process events failed: " \
                             f"{e.strerror or e})"
            self.discovery_changed = True
            return True
        queued = len(self._events)
        if batch.execs and any(w.kind == "cmdline" for w in self.config.watches):
            self._events.extend(("exec", pid) for pid in batch.execs)
        if batch.forks:
            _watches, trees, parents = self._event_watches()
            parents.update(trees)
            for parent, child in batch.forks:
                if parent in parents:
                    parents.add(child)          # its own children count too
                    self._events.append(("fork", parent, child))
        if batch.lost or len(self._events) > EVENTS_KEPT:
            self._events.clear()
            self._lost = "the process-events socket overflowed" if batch.lost \
                else f"over {EVENTS_KEPT} process events queued"
        return len(self._events) > queued or bool(self._lost)

    def _take_events(self, now: float) -> List[Target]:
        """The queued events, judged within the tick's cmdline budget: an exec is matched
        against the cmdline watches, a fork joins a tree whose member forked (and is
        matched when a cmdline target forked: the child shares its command line). What
        the budget leaves stays queued; lost events rescan everything now."""
        from memwatchd import cmdmatch
        self.take_events()
        if self._lost:
            self._rescan_now(now, self._lost)
            self._lost = ""
            return []
        if not self._events:
            return []
        watches, trees, followed = self._event_watches()
        have = {(t.watch.name, t.pid) for t in self.targets.values() if t.watch.kind == "cmdline"}
        if self._work_until is None:
            self._work_until = time.perf_counter() + cmdmatch.BUDGET
        added: List[Target] = []
        with cmdmatch.Alarm() as alarm:
            while self._events and time.perf_counter() < self._work_until:
                event = self._events.popleft()
                pid = event[-1]
                if pid in self.never or pid == 1:
                    continue
                if event[0] == "fork":
                    tree = trees.get(event[1])
                    if tree is not None and self._join_tree(tree, event[1], pid):
                        trees[pid] = tree
                    if event[1] not in followed:
                        continue
                if watches:
                    found = self._judge_new(watches, pid, have, alarm, now)
                    added.extend(found)
                    followed.update(t.pid for t in found)
                    have.update((t.watch.name, t.pid) for t in found)
        return added

    def _judge_new(self, watches: List[WatchConfig], pid: int, have: Set[tuple], alarm,
                   now: float) -> List[Target]:
        """Match one new process against the cmdline watches (its command line read once);
        attach it to those it matches. An undecided (cut) search is left to the rescan."""
        text = None
        added: List[Target] = []
        for watch in watches:
            if (watch.name, pid) in have:
                continue
            if text is None:
                text = read_cmdline(pid, self.proc)
                if not text:
                    return added          # gone, or a kernel thread
            slow: List[Tuple[int, int]] = []
            if self._scan(watch).judge(pid, text, alarm, slow):
                added.extend(self._attach_pids(watch, [pid], now))
        return added

    def _join_tree(self, tree: Target, parent: int, child: int) -> bool:
        """A tree member forked: the child is a member from now on (its ppid checked
        after its fd is open, so a reused pid is not taken for it)."""
        try:
            slot = self.processes.add(child)
        except (TargetGone, AccessDenied):
            return False
        member = (child, self.processes.start_time(slot))
        if member in tree.members or read_ppid(child, self.proc) != parent:
            self.processes.remove(slot)
            return False
        tree.members[member] = slot
        return True

    def _rescan_now(self, now: float, why: str) -> None:
        """Events were lost: every cmdline watch is resolved and every tree walked at
        once, so what the lost events announced is still found. Said once per config."""
        self._problem(f"{why}: rescanning now (new processes may be found up to one "
                      f"rescan late while this goes on)")
        for watch in self.config.watches:
            if watch.kind == "cmdline":
                self.rescan_at[watch.name] = 0.0
        for t in self.targets.values():
            if t.watch.scope == "tree":
                t.next_due = 0.0

    def _unit_cgroup(self, watch: WatchConfig, now: float) -> Optional[str]:
        """The unit's cgroup path from `systemctl show`, without holding up the loop: the
        loop waits SYSTEMCTL_WAIT for it; if PID 1 is slow, the run is picked up on a later
        tick (None until then) and killed after SYSTEMCTL_TIMEOUT."""
        proc, started = self.unit_shows.pop(watch.name, (None, now))
        if proc is None:
            proc = start_unit_show(str(watch.selector))
            if proc is None:
                return ""
        path = unit_cgroup_of(proc, SYSTEMCTL_WAIT if now == started else 0.0)
        if path is not None:
            return path
        if now - started >= SYSTEMCTL_TIMEOUT:
            proc.kill()
            proc.communicate()
            self._problem(f"watch {watch.name}: `systemctl show {watch.selector}` took "
                         f"longer than {SYSTEMCTL_TIMEOUT:.0f}s; trying again")
            return ""
        self.unit_shows[watch.name] = (proc, started)
        self.rescan_at[watch.name] = now   # look again on the next tick
        return None

    def _unit_restarted(self, watch: WatchConfig, now: float) -> List[Target]:
        """Between rescans, look for a stopped unit in the cgroup it last ran in: one stat
        per tick and no systemctl run, so a restarted unit is watched from its first tick,
        not up to RESCAN_INTERVAL (plus a systemctl run) later, far over its limit by then."""
        if any(t.watch.name == watch.name for t in self.targets.values()):
            return []
        path = self.unit_paths[watch.name]
        if not os.path.isdir(self.cgroup_root + path):
            return []
        return self._attach_cgroups(watch, [path], now)

    @property
    def _config_written(self) -> Optional[float]:
        """The config file's mtime; None for a config from flags (`watch --pid`: just typed)."""
        try:
            return os.stat(self.config.source).st_mtime
        except (OSError, TypeError, ValueError):
            return None

    def _attach_pids(self, watch: WatchConfig, pids: List[int], now: float,
                     not_after: Optional[float] = None, why: str = "",
                     owner: Optional[int] = None) -> List[Target]:
        """Targets for these pids. With not_after, a process that started after that time
        (the file `why` was written) is refused; with owner, one of another user."""
        added = []
        for pid in pids:
            if pid in self.never or pid == 1:
                self._problem(f"watch {watch.name}: refusing to watch init, memwatchd itself "
                              f"or its ancestor (pid {pid})")
                continue
            try:
                slot = self.processes.add(pid)
            except TargetGone:
                continue
            except AccessDenied as e:
                self._problem(f"watch {watch.name}: {e}")
                continue
            start = self.processes.start_time(slot)
            key = ("process", pid, start)
            refused = self._refusal(pid, start, not_after, why, owner)
            if key in self.targets or refused:
                if refused:
                    self._problem(f"watch {watch.name}: {refused}")
                self.processes.remove(slot)
                continue
            comm, cmdline, mark = read_names(pid, self.proc)
            target = Target(key, watch, pid=pid, start_time=start, slot=slot, comm=comm,
                            cmdline=cmdline, cgroup=read_cgroup(pid, self.proc), next_due=now)
            target.names_mark = mark if mark is not None and mark[0] == start else None
            if watch.scope == "tree":
                target.members[(pid, start)] = slot
            self.targets[key] = self.by_python[key] = target
            added.append(target)
        return added

    def _refusal(self, pid: int, start: int, not_after: Optional[float], why: str,
                 owner: Optional[int]) -> str:
        """Why process (pid, start) may not be attached ("" if it may): see memwatchd.pidfile."""
        if not_after is not None:
            from memwatchd.pidfile import started_after
            if started_after(start, not_after):
                return (f"not watching pid {pid}: it started after {why} was written (stale, "
                        f"and the PID now names another process?); rewrite {why} to attach it")
        if owner is not None:
            uid, _ = process_owner(pid, self.proc)
            try:   # the uid was read by path: make sure it was still that very process
                same = _stat_fields(read_small(f"{self.proc}/{pid}/stat"))[1] == start
            except (OSError, ValueError):
                same = False
            if not same or uid != owner:
                return (f"not watching pid {pid}: {why} is owned by uid {owner}, the process "
                        f"by uid {uid}; only a root-written pidfile may name another user's "
                        f"process")
        return ""

    def _vital_cgroups(self) -> Set[str]:
        """The cgroups of init, memwatchd and its ancestors (as /proc/<pid>/cgroup says)."""
        return {read_cgroup(pid, self.proc) for pid in self.never | {1}} - {""}

    def _attach_cgroups(self, watch: WatchConfig, paths: List[str], now: float) -> List[Target]:
        added = []
        vital = self._vital_cgroups() if paths else set()
        for path in paths:
            key = ("cgroup", path)
            if key in self.targets:
                continue
            if any(v == path or v.startswith(path.rstrip("/") + "/") for v in vital):
                # e.g. a glob matching /init.scope or the slice memwatchd runs in:
                # never signalled, frozen or throttled (actions check again at action time)
                self._problem(f"watch {watch.name}: not watching cgroup {path}: it holds init "
                              f"or memwatchd, or is above one that does")
                continue
            try:
                slot = self.cgroups.add(self.cgroup_root + path)
            except (TargetGone, AccessDenied) as e:
                self._problem(f"watch {watch.name}: {e}")   # e.g. no memory.current
                continue
            target = Target(key, watch, slot=slot, cgroup=path, comm=path.rsplit("/", 1)[-1],
                            next_due=now)
            self.targets[key] = self.by_python[key] = target
            added.append(target)
        return added

    @property
    def busy(self) -> bool:
        """A cmdline pass ran out of its tick's budget: come back at min_interval, not at
        the next sample (which may be a second away)."""
        return bool(self._events) or any(scan.busy for scan in self.scans.values())

    def cgroup_fd(self, key: tuple) -> Optional[int]:
        """The directory fd a cgroup target was selected by (-1 once gone); None for a
        process target. Actions go through it, never through the path again."""
        t = self.targets.get(key)
        return self.cgroups.dirfd(t.slot) if t is not None and t.is_cgroup else None

    def drop(self, key: tuple) -> Optional[Target]:
        """Forget a target and close its fds."""
        target = self.targets.pop(key, None)
        if target is None:
            return None
        self.by_python.pop(key, None)
        if target.table is not None:
            self._take_back(target.slot)
        if target.is_cgroup:
            self.cgroups.remove(target.slot)
        else:
            for slot in set(target.members.values()) | {target.slot}:
                self.processes.remove(slot)
        return target

    # ------------------------------------------------------------- sampling

    def _refresh_tree(self, target: Target) -> None:
        """Track the tree's current members (new children join, exited ones leave)."""
        for member in descendants(target.pid, self.proc_root):
            if member in target.members or member[0] in self.never:
                continue
            try:
                slot = self.processes.add(member[0])
            except (TargetGone, AccessDenied):
                continue
            target.members[(member[0], self.processes.start_time(slot))] = slot

    def hand_to_table(self, t: Target, quiet_below: int) -> bool:
        """Let the ProcessTable keep this single process's schedule while its usage
        stays below quiet_below (policy.quiet_below: the policy's ceiling, the only
        decision the table takes); the tick then touches it only once the table hands
        it back (loud, unreadable or gone: sample_due). True if handed."""
        if t.table is not None or t.is_cgroup or t.watch.scope != "process" or t.slot < 0:
            return False
        self.processes.schedule(t.slot, quiet_below, t.limit, t.sampled_at, t.next_due,
                                t.interval)
        t.table = self.processes
        del self.by_python[t.key]
        self.in_table[t.slot] = t
        return True

    def _take_back(self, slot: int) -> Target:
        """The tick schedules this slot's target again, from what the table last read."""
        t = self.in_table.pop(slot)
        t._usage, t._sampled_at, t._interval, t._next_due = t.usage, t.sampled_at, t.interval, \
            t.next_due
        t.table = None
        self.processes.unschedule(slot)
        self.by_python[t.key] = t
        return t

    def next_due(self) -> float:
        """The earliest next_due of all targets (inf when none), without a Python step
        per target the table schedules."""
        due = self.processes.next_due() if self.in_table else float("inf")
        return min(due, min((t.next_due for t in self.by_python.values()), default=due))

    def take_all_back(self) -> None:
        """Every target scheduled by the tick again (a reload, a trace: they see all)."""
        for slot in list(self.in_table):
            self._take_back(slot)

    def sample_due(self, now: float, force: bool = False) -> Tuple[List[Reading], List[Target]]:
        """Read the targets that are due (all with force); return readings and gone targets.
        The quiet processes the table schedules are read there, in C, and come back here
        only when they are loud, unreadable or gone."""
        vanished, self.vanished = self.vanished, []
        if force:
            self.take_all_back()
        due, slots, cgroup_slots = [], [], []
        for t in self.by_python.values():  # one pass: at idle this loop is most of a tick
            if not force and t.next_due > now:
                continue
            due.append(t)
            if t.is_cgroup:
                cgroup_slots.append(t.slot)
            elif t.watch.scope == "tree":
                self._refresh_tree(t)
                slots.extend(t.members.values())
            else:
                slots.append(t.slot)
        if self.in_table:
            d = self.config.daemon
            for slot in self.processes.sample_scheduled(now, d.fill_rate, d.min_interval,
                                                        d.interval):
                due.append(self._take_back(slot))
        if not due:
            return [], vanished
        if slots:
            self.processes.sample_slots(slots)
        if cgroup_slots:
            self.cgroups.sample_slots(cgroup_slots)
        readings, gone = [], []
        for t in due:
            try:
                if not self._read_target(t):
                    gone.append(t)
                    continue
            except Exception as e:   # a bug: this watch only (the daemon quarantines it)
                self.failed.append((t.watch.name, e))
                continue
            t.sampled_at = now
            readings.append(Reading(t.key, t.watch.name, t.usage, t.limit, t.warn,
                                    t.unreclaimable, t.ceiling))
        for t in gone:
            self.drop(t.key)
        return readings, vanished + gone

    def _read_target(self, t: Target) -> bool:
        """Fill usage/limit/warn from the last sample; False if the target is gone."""
        if t.is_cgroup:
            status = self.cgroups.status(t.slot)
            if status == GONE:
                return False
            s = self.cgroups.get(t.slot)
            if t.watch.usage == "anon":
                t.usage = s.anon
            elif t.watch.usage == "current-inactive_file":
                t.usage = s.current - max(s.inactive_file, 0)
            else:
                t.usage = s.current
            base = s.max if s.max > 0 else self.mem_total
            t.ceiling = s.max if s.max > 0 else None
            t.unreclaimable = s.anon + max(s.shmem, 0) if s.anon >= 0 else None
        else:
            if self.processes.status(t.slot) == GONE:
                return False
            if t.watch.scope == "tree":
                total = 0
                for member, slot in list(t.members.items()):
                    if self.processes.status(slot) == GONE and slot != t.slot:
                        self.processes.remove(slot)
                        del t.members[member]
                    else:
                        total += self.processes.rss(slot)
                t.usage = total
            else:
                t.usage = self.processes.rss(t.slot)
            base = self.mem_total
        t.limit = t.watch.limit.resolve(base)
        t.warn = t.watch.warn.resolve(base) if t.watch.warn is not None else None
        return True

    def reread(self, key: tuple) -> Optional[int]:
        """A fresh usage of one target right before acting; None if it is gone."""
        t = self.targets.get(key)
        if t is None:
            return None
        if t.is_cgroup:
            self.cgroups.sample_slots([t.slot])
        else:
            self.processes.sample_slots(list(t.members.values()) or [t.slot])
        return t.usage if self._read_target(t) else None

    # ---------------------------------------------------------------- guard

    def guard_candidates(self) -> list:
        """Every process the host guard could stop, with its rss (a full /proc scan)."""
        out = []
        table = sampler.ProcessTable(root=self.proc_root, capacity=256)
        for pid in list_pids(self.proc):
            if pid in self.never:
                continue
            try:
                slot = table.add(pid)
            except MemwatchdError:
                continue
            table.sample_slots([slot])
            if table.status(slot) == OK and table.rss(slot) > 0:
                comm = read_comm(pid, self.proc)
                # Only a protected name needs its owner checked (policy.is_protected).
                uid, root_exe = process_owner(pid, self.proc) \
                    if comm in self.config.protect.names else (-1, False)
                out.append(Candidate(("process", pid, table.start_time(slot)), pid, comm,
                                     read_cgroup(pid, self.proc), table.rss(slot), uid,
                                     root_exe, table.major_faults(slot)))
            table.remove(slot)
        return out
