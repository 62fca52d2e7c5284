"""The actions stage: the only code that signals processes or writes cgroup control files.

Every signal goes through a pidfd that was checked against the target's identity
(pid, start time), never through a bare PID: between the sampler seeing a process
and us acting on it, the process may exit and its PID be handed to an innocent
one. A pidfd keeps naming the original process for as long as we hold it.

Nothing here logs or prints; outcomes are return values, failures are the
project's errors (memwatchd.types), mapped from errno in one helper (_raise_os).
"""
from __future__ import annotations

import errno
import os
import select
import signal
import time
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from memwatchd.sampler import parse_stat_start_time, process_mrelease
from memwatchd.targets import ancestors, descendants
from memwatchd.types import (
    DENIED,
    GONE,
    AccessDenied,
    MemwatchdError,
    TargetGone,
    status_for_errno,
)

__all__ = [
    "open_process", "send_signal", "is_dead", "release_memory", "release_and_close", "pidfd_pid",
    "cgroup_populated",
    "descendants", "signal_tree",
    "cgroup_procs", "signal_cgroup", "set_memory_high", "set_frozen",
    "victim_env", "OnActionRunner", "ON_ACTION_PATH",
]

_STAT_MAX = 4096  # /proc/<pid>/stat is < 1 KiB (comm is at most 16 bytes)

subprocess = None  # imported by the first OnActionRunner: ~1 MiB RSS a daemon without on_action saves


def _import_subprocess():
    """Import subprocess once an on_action is configured - at startup, not mid-emergency."""
    global subprocess
    if subprocess is None:
        import subprocess as module
        subprocess = module
    return subprocess


def _raise_os(err: OSError, what: str):
    """The one errno -> exception mapping of this module (via types.status_for_errno)."""
    status = status_for_errno(err.errno or 0)
    if status == GONE:
        raise TargetGone(f"{what}: gone ({err.strerror})") from err
    if status == DENIED:
        raise AccessDenied(f"{what}: permission denied") from err
    raise MemwatchdError(f"{what}: {err.strerror or err}") from err


def _proc(proc_root: str) -> str:
    return os.path.join(proc_root, "proc")


# ------------------------------------------------------------------ one process

def open_process(pid: int, start_time: int, proc_root: str = "/") -> int:
    """Return a pidfd for exactly the process identified by (pid, start_time).

    The pidfd is opened first and the start time re-read afterwards: if the PID
    was reused in between, the re-read sees the newcomer's start time and we
    refuse, so a returned pidfd can never name a different process.
    Raises TargetGone (exited, or PID now names another process) or AccessDenied.
    """
    what = f"process {pid}"
    try:
        pidfd = os.pidfd_open(int(pid))
    except OSError as e:
        _raise_os(e, what)
    try:
        try:
            actual = parse_stat_start_time(
                _read(os.path.join(_proc(proc_root), str(int(pid)), "stat"), _STAT_MAX))
        except OSError as e:
            _raise_os(e, what)
        except ValueError:
            raise MemwatchdError(f"{what}: malformed stat") from None
        if actual != start_time:
            raise TargetGone(f"{what}: PID reused (start time {actual}, expected {start_time})")
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd


def send_signal(pidfd: int, sig: int) -> bool:
    """Signal through a pidfd. True if sent, False if the process had already exited."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    except OSError as e:
        _raise_os(e, f"pidfd {pidfd}: signal {int(sig)}")
    return True


def is_dead(pidfd: int) -> bool:
    """True once the process has exited (a pidfd polls readable then; zombies count as dead)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    for _fd, events in poller.poll(0):
        if events & select.POLLNVAL:
            raise MemwatchdError(f"pidfd {pidfd}: not an open file descriptor")
        return True
    return False


_MRELEASE_OUTCOMES = {
    errno.EINVAL: "not-dying",
    errno.ESRCH: "gone",
    errno.ENOSYS: "unsupported",
}


def release_memory(pidfd: int) -> str:
    """process_mrelease() a killed process so its memory returns now, not after its exit path.

    Advisory: it never raises. Returns "released"; "not-dying" if it is not (yet) dying
    (EINVAL: not killed, or its mm is shared with a live process); "gone" if it has
    already exited (ESRCH); "unsupported" on kernels without the syscall (ENOSYS,
    < 5.15); for anything else (EAGAIN: the reap raced the exit path, EINTR, EPERM from
    a seccomp filter, EBADF) "failed: <errno name>". The kill itself is already done
    whatever this returns. It may block on the victim's mmap_lock: the daemon calls it
    from a helper thread (memwatchd.offload).
    """
    try:
        process_mrelease(pidfd)
    except OSError as e:
        outcome = _MRELEASE_OUTCOMES.get(e.errno)
        if outcome is None:
            return f"failed: {errno.errorcode.get(e.errno or 0, e.errno)}"
        return outcome
    return "released"


def release_and_close(pidfd: int) -> str:
    """release_memory() on a pidfd of our own (a dup), then close it: a helper thread's
    call, so that the loop closing its pidfd meanwhile cannot make this one name another file."""
    try:
        return release_memory(pidfd)
    finally:
        os.close(pidfd)


def pidfd_pid(pidfd: int) -> int:
    """The PID a pidfd names (its fdinfo "Pid:" line, Linux 5.3+); 0 if unknown or exited."""
    try:
        data = _read(f"/proc/self/fdinfo/{int(pidfd)}", 4096)
    except OSError:
        return 0
    for line in data.splitlines():
        if line.startswith(b"Pid:"):
            try:
                return max(0, int(line[4:]))
            except ValueError:
                return 0
    return 0


def cgroup_populated(cgroup_dir: str) -> Optional[bool]:
    """Does any process live in this cgroup subtree (cgroup.events "populated")? None if
    that cannot be read."""
    try:
        data = _read(os.path.join(cgroup_dir, "cgroup.events"), 4096)
    except OSError:
        return None
    for line in data.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == b"populated":
            return fields[1] == b"1"
    return None


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def signal_tree(pid: int, start_time: int, sig: int, proc_root: str = "/") -> List[int]:
    """Signal a process and all its descendants, children first, the root last.

    Returns every pidfd opened (the root's is the last one); the caller polls them
    with is_dead()/release_memory() and closes them. The root's identity is
    checked first (TargetGone / AccessDenied if it fails). Descendants that vanish
    or refuse are skipped; if the root exits during a walk, its PID could be
    reused, so that walk's findings are dropped.

    For SIGKILL the tree is first stopped (SIGSTOP, root first) and re-walked until
    no new process appears, so that nobody forks, respawns or reacts to a child's
    death in between; then everyone gets SIGKILL, children first. Other signals are
    sent in one pass, so a tree forking meanwhile can leave new children behind:
    prefer signal_cgroup (cgroup.kill) where there is a cgroup. Refuses PID 1 and
    memwatchd itself (MemwatchdError), and never signals memwatchd as a descendant.
    """
    me = os.getpid()
    if int(pid) in (1, me):
        raise MemwatchdError(f"process {pid}: refusing to signal init or memwatchd itself")
    root_fd = open_process(pid, start_time, proc_root)
    freeze = sig == signal.SIGKILL
    rounds: List[List[int]] = []        # pidfds found per walk, each deepest first
    opened: Set[int] = set()
    try:
        if freeze:
            send_signal(root_fd, signal.SIGSTOP)
        for _ in range(_FREEZE_WALKS if freeze else 1):
            # We may descend from the root (started from a watched shell): never signal ourselves.
            tree = [(k, s) for k, s in descendants(pid, proc_root) if k not in opened and k != me]
            if is_dead(root_fd) or not tree:
                break
            found = []
            for kid, kid_start in tree:
                try:
                    fd = open_process(kid, kid_start, proc_root)
                except (TargetGone, AccessDenied):
                    continue
                opened.add(kid)
                found.append(fd)
                if freeze:
                    _signal_quietly(fd, signal.SIGSTOP)
            rounds.append(found)
        # A later walk finds children of processes found earlier: list it first.
        fds = [fd for found in reversed(rounds) for fd in found]
        for fd in fds:
            _signal_quietly(fd, sig)  # one refusing descendant must not spare the rest
        fds.append(root_fd)
        send_signal(root_fd, sig)
    except BaseException:
        _close_all([fd for found in rounds for fd in found] + [root_fd])
        raise
    return fds


_FREEZE_WALKS = 5


def _signal_quietly(fd: int, sig: int) -> None:
    try:
        send_signal(fd, sig)
    except MemwatchdError:
        pass


# ------------------------------------------------------------------ cgroups
# Every cgroup function takes the cgroup's path (for messages, and to open it when no
# fd is given) and, from the daemon, dir_fd: the directory the sampler opened when the
# cgroup was selected. Control files are opened relative to it, so a cgroup removed and
# re-created at the same path between the re-read and the action is never hit: the old
# directory's files are gone (TargetGone), as a pidfd names one process.

def _read(path: str, size: int = 65536, dir_fd: Optional[int] = None) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _write(path: str, text: str, dir_fd: Optional[int] = None) -> None:
    """One write(2) of the whole value: cgroup control files act on each write call."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


class _CgroupDir:
    """The cgroup's directory fd for one action: the caller's (held since selection) or,
    given only a path, opened now. Closed on exit only if opened here."""

    __slots__ = ("path", "fd", "owned")

    def __init__(self, path: str, dir_fd: Optional[int]):
        self.path, self.fd, self.owned = path, dir_fd, dir_fd is None
        if dir_fd is not None and dir_fd < 0:
            raise TargetGone(f"cgroup {path}: gone (removed since it was selected)")

    def __enter__(self) -> int:
        if self.owned:
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                _raise_os(e, f"cgroup {self.path}")
        return self.fd

    def __exit__(self, *exc) -> None:
        if self.owned:
            os.close(self.fd)


def cgroup_procs(cgroup_dir: str, dir_fd: Optional[int] = None) -> List[int]:
    """The PIDs listed in cgroup.procs (TargetGone if the cgroup was removed). With
    dir_fd, cgroup_dir is only a name for messages and the file is read relative to it."""
    try:
        data = _read("cgroup.procs" if dir_fd is not None else
                     os.path.join(cgroup_dir, "cgroup.procs"), dir_fd=dir_fd)
    except OSError as e:
        _raise_os(e, f"cgroup {cgroup_dir}")
    return [int(x) for x in data.split()]


def _subtree_procs(cgroup_dir: str, dir_fd: int) -> List[int]:
    """cgroup.procs of the cgroup and every child cgroup below it (children vanish silently),
    all read relative to the directory fd."""
    pids = cgroup_procs(cgroup_dir, dir_fd)
    for _path, dirnames, _files, fd in os.fwalk(".", dir_fd=dir_fd):
        for name in dirnames:
            try:
                pids.extend(int(x) for x in _read(f"{name}/cgroup.procs", dir_fd=fd).split())
            except OSError:
                continue
    return pids


def vital_pids(proc_root: str = "/") -> Set[int]:
    """PID 1, memwatchd and its ancestors: a cgroup holding any of them (anywhere in its
    subtree, i.e. the cgroup is theirs or an ancestor of theirs, /init.scope or a slice
    memwatchd runs in) is never signalled, frozen or throttled."""
    return {1} | ancestors(os.getpid(), _proc(proc_root))


def _refuse_vital(cgroup_dir: str, listed: Iterable[int]) -> None:
    vital = vital_pids() & set(listed)
    if vital:
        raise MemwatchdError(f"cgroup {cgroup_dir}: refusing, it holds init or memwatchd "
                             f"(pid {min(vital)})")


def _open_members(cgroup_dir: str, dir_fd: int, skip: Set[int]) -> Tuple[Dict[int, int], int]:
    """(pid -> pidfd, number not opened for lack of fds) for the subtree's processes.

    A PID read from cgroup.procs may be reused by an outsider before pidfd_open;
    re-reading the lists afterwards and keeping only PIDs still present means each
    pidfd names a member (or a process that has since exited: harmless).
    """
    listed = [p for p in dict.fromkeys(_subtree_procs(cgroup_dir, dir_fd)) if p not in skip]
    _refuse_vital(cgroup_dir, listed)  # cgroup.kill would take init or us with it
    opened: Dict[int, int] = {}
    missed = 0
    for i, pid in enumerate(listed):
        try:
            opened[pid] = os.pidfd_open(pid)
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                continue  # exited (ESRCH) or not ours to open
            # Out of fds: give two back so that the re-read below (a directory and a
            # file at a time) and a write to cgroup.kill can still open their files;
            # the caller decides the rest.
            missed = len(listed) - i
            for _ in range(min(2, len(opened))):
                os.close(opened.pop(next(reversed(list(opened)))))
                missed += 1
            break
    try:
        still = set(_subtree_procs(cgroup_dir, dir_fd))
    except BaseException:
        _close_all(opened.values())
        raise
    for pid in [p for p in opened if p not in still]:
        os.close(opened.pop(pid))
    return opened, missed


def signal_cgroup(cgroup_dir: str, sig: int, dir_fd: Optional[int] = None) -> List[int]:
    """Signal every process of a cgroup subtree; return their pidfds (the caller closes them).

    SIGKILL with a cgroup.kill file (Linux 5.14+): the pidfds are opened first,
    then "1" is written, which kills the whole subtree atomically, forks included.
    Otherwise (other signals, older kernels, or cgroup.kill failing) each member
    is signalled through its pidfd; for SIGKILL the lists are re-read up to three
    times to catch children forked meanwhile. If pidfds run out (RLIMIT_NOFILE;
    the daemon should raise its soft limit), cgroup.kill still kills everyone and
    the returned list is just shorter; the per-process path signals whom it can
    and then raises MemwatchdError, since it cannot signal the rest by PID.
    Refuses (MemwatchdError, nothing signalled) if init, memwatchd or an ancestor
    of memwatchd is in the subtree. With dir_fd (held since selection), a cgroup
    removed meanwhile is TargetGone even if one was re-created at the same path.
    """
    with _CgroupDir(cgroup_dir, dir_fd) as fd:
        return _signal_cgroup(cgroup_dir, fd, sig)


def _signal_cgroup(cgroup_dir: str, dir_fd: int, sig: int) -> List[int]:
    members, missed = _open_members(cgroup_dir, dir_fd, set())
    fds = list(members.values())
    signalled = set(members)
    try:
        if sig == signal.SIGKILL:
            try:
                _write("cgroup.kill", "1", dir_fd=dir_fd)
                return fds
            except FileNotFoundError:
                if _gone(dir_fd):
                    raise TargetGone(f"cgroup {cgroup_dir}: gone") from None
                # no cgroup.kill (Linux < 5.14): per-process signals below
            except OSError as e:
                if status_for_errno(e.errno or 0) == GONE:
                    _raise_os(e, f"cgroup {cgroup_dir}")
                # any other refusal: fall through to per-process signals
        rounds = 3 if sig == signal.SIGKILL else 1
        for round_no in range(rounds):
            for fd in members.values():
                _signal_quietly(fd, sig)
            if missed or round_no + 1 == rounds:
                break
            try:
                members, missed = _open_members(cgroup_dir, dir_fd, signalled)
            except TargetGone:
                break  # the cgroup went away with its last process
            if not members and not missed:
                break
            signalled.update(members)
            fds.extend(members.values())
        if missed:
            raise MemwatchdError(
                f"cgroup {cgroup_dir}: out of file descriptors, {missed} processes not signalled")
    except BaseException:
        _close_all(fds)
        raise
    return fds


def _gone(dir_fd: int) -> bool:
    """Is the cgroup behind dir_fd removed (its cgroup.procs gone too)?"""
    try:
        os.stat("cgroup.procs", dir_fd=dir_fd)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def _write_control(cgroup_dir: str, dir_fd: Optional[int], name: str, value: str) -> None:
    """Write a control file of a cgroup that holds neither init nor memwatchd: freezing or
    throttling one that does would stall the very killer (or the whole system)."""
    with _CgroupDir(cgroup_dir, dir_fd) as fd:
        _refuse_vital(cgroup_dir, _subtree_procs(cgroup_dir, fd))
        try:
            _write(name, value, dir_fd=fd)
        except OSError as e:
            _raise_os(e, f"cgroup {cgroup_dir}: {name}")


def set_memory_high(cgroup_dir: str, limit: Optional[int], dir_fd: Optional[int] = None) -> None:
    """Write memory.high: a byte count throttles the cgroup by reclaim; None writes "max"."""
    if limit is not None and (isinstance(limit, bool) or int(limit) < 0):
        raise ValueError(f"memory.high must be a non-negative byte count or None, not {limit!r}")
    _write_control(cgroup_dir, dir_fd, "memory.high", "max" if limit is None else str(int(limit)))


def set_frozen(cgroup_dir: str, frozen: bool, dir_fd: Optional[int] = None) -> None:
    """Write cgroup.freeze ("1"/"0"): freeze a cgroup to stop it growing while we decide."""
    _write_control(cgroup_dir, dir_fd, "cgroup.freeze", "1" if frozen else "0")


# ------------------------------------------------------------------ on_action programs

ON_ACTION_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_VALUE_MAX = 32768  # well under MAX_ARG_STRLEN (128 KiB): exec never fails with E2BIG


def victim_env(**fields: object) -> Dict[str, str]:
    """MEMWATCHD_<KEY>=str(value) for an on_action program (None -> "", NUL bytes dropped).

    The victim's data reach the program only as environment variables, never as
    argv or through a shell, so a hostile process name cannot become a command.
    """
    env = {}
    for key, value in fields.items():
        text = "" if value is None else str(value)
        env["MEMWATCHD_" + key.upper()] = text.replace("\0", "")[:_ENV_VALUE_MAX]
    return env


class _Running:
    __slots__ = ("proc", "argv0", "deadline", "killed")

    def __init__(self, proc: subprocess.Popen, argv0: str, deadline: float):
        self.proc = proc
        self.argv0 = argv0
        self.deadline = deadline
        self.killed = False


class OnActionRunner:
    """Runs the operator's on_action programs without ever blocking the daemon's loop.

    start() execs argv directly (no shell) in a new session with a minimal
    environment, stdio on /dev/null and no inherited fds; poll(), called every
    tick, reaps finished programs and SIGKILLs the process group of any past its
    timeout (the group is ours: its leader is our unreaped child, so the id
    cannot have been reused). At most max_running programs run at once.
    """

    def __init__(self, max_running: int = 8, oom_score_adj: Optional[int] = 0,
                 clock=time.monotonic):
        _import_subprocess()
        self.max_running = max_running
        self.oom_score_adj = oom_score_adj
        self._clock = clock
        self._running: List[_Running] = []

    def _child_setup(self) -> None:
        """In the forked child, before exec: the daemon is OOM-protected (-1000) and a child
        inherits that; the program must be an ordinary OOM candidate from its first
        instruction, so the score is reset here, not by the parent after the program runs.
        Only os calls (no locks another thread could hold at fork time)."""
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(int(self.oom_score_adj)).encode())
        finally:
            os.close(fd)

    @property
    def running(self) -> int:
        """Programs started and not yet reaped (including killed ones not yet reaped)."""
        return len(self._running)

    def start(self, argv: Sequence[str], env: Mapping[str, str], timeout: float) -> int:
        """Launch argv with PATH plus env (MEMWATCHD_* keys only); return its PID.

        Raises MemwatchdError if the program cannot be executed or too many are
        running, ValueError for a malformed argv/env (a programming error).
        """
        argv = tuple(argv)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"on_action argv must be a non-empty tuple of strings: {argv!r}")
        child_env = {"PATH": ON_ACTION_PATH}
        for key, value in env.items():
            if not (isinstance(key, str) and key.startswith("MEMWATCHD_") and isinstance(value, str)):
                raise ValueError(f"on_action env must be MEMWATCHD_* string pairs: {key!r}")
            child_env[key] = value.replace("\0", "")
        live = sum(1 for r in self._running if not r.killed)
        if live >= self.max_running:
            raise MemwatchdError(f"on_action {argv[0]}: {live} programs still running, not started")
        try:
            proc = subprocess.Popen(
                argv, env=child_env, cwd="/", stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                close_fds=True, start_new_session=True, shell=False,
                preexec_fn=None if self.oom_score_adj is None else self._child_setup)
        except OSError as e:
            raise MemwatchdError(f"on_action {argv[0]}: {e.strerror or e}") from e
        except subprocess.SubprocessError as e:   # the child's setup failed: nothing was exec'ed
            raise MemwatchdError(f"on_action {argv[0]}: {e}") from e
        self._running.append(_Running(proc, argv[0], self._clock() + timeout))
        return proc.pid

    def _kill(self, entry: _Running) -> None:
        if entry.proc.returncode is None:  # not reaped: its PID (= group id) is still ours
            try:
                os.killpg(entry.proc.pid, signal.SIGKILL)  # it and whatever it started
            except (ProcessLookupError, PermissionError):
                pass
            try:
                entry.proc.kill()  # in case it left its process group (Popen won't hit a reaped PID)
            except OSError:
                pass
        entry.killed = True

    def poll(self) -> List[Tuple[str, Union[int, str]]]:
        """Reap finished programs, kill overdue ones; [(argv0, returncode | "timeout")].

        A killed program is reported once, as "timeout", when it is killed, and is
        reaped silently on a later call (a process in D state may take a while).
        """
        done: List[Tuple[str, Union[int, str]]] = []
        now = self._clock()
        keep = []
        for entry in self._running:
            rc = entry.proc.poll()
            if rc is not None:
                if not entry.killed:
                    done.append((entry.argv0, rc))
                continue
            if not entry.killed and now >= entry.deadline:
                self._kill(entry)
                done.append((entry.argv0, "timeout"))
            keep.append(entry)
        self._running = keep
        return done

    def close(self, wait: float = 1.0) -> None:
        """Kill every outstanding program and reap what dies within `wait` seconds."""
        for entry in self._running:
            self._kill(entry)
        deadline = time.monotonic() + wait
        for entry in self._running:
            try:
                entry.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._running = [e for e in self._running if e.proc.returncode is None]
