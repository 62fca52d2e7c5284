"""The main loop: wires config -> targets -> sampler -> policy -> actions -> report.

One thread. Each pass: re-resolve targets whose rescan is due, sample the
targets whose time has come (adaptive: near a limit every min_interval, far
from all limits about once per interval), ask the policy, re-check and act,
follow up on signalled processes, ping systemd, then sleep in poll() until the
next target is due, a PSI trigger fires, a signalled process dies, a process
event (an exec or fork, memwatchd.procevents) comes, or a signal (SIGTERM, SIGHUP)
arrives. Nothing here prints; it logs via report.log.
"""
from __future__ import annotations

import collections
import os
import resource
import select
import signal
import time
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional

from memwatchd import actions, offload, report, sampler, state
from memwatchd.config import CGROUP_ROOT, Config, load_config
from memwatchd.policy import REASON_GRACE, Decision, Policy, still_needed
from memwatchd.report import DEBUG, ERR, INFO, NOTICE, WARNING, escape, log
from memwatchd.sampler import parse_stat_start_time
from memwatchd.swapinfo import SwapWatcher
from memwatchd.systemd import Notifier
from memwatchd.targets import (TargetSet, ancestors, exec_mark, read_cgroup, read_cmdline, read_comm,
                               read_small, valid_mark)
from memwatchd.types import Candidate, ConfigError, HostSample, MemwatchdError, TargetGone

ON_ACTION_TIMEOUT = 30.0
GIVE_UP_AFTER = 30.0      # seconds after the last signal: record "did not exit", keep looking
STATUS_EVERY = 1.0
WRITE_AHEAD_WAIT = 0.5    # seconds the loop waits for a decision record to be on disk (fsync)
EVENTS_COALESCE = 0.005   # seconds between reads of process events that concern no watch
CMDLINE_WAIT = 0.25       # seconds the loop waits for a victim's cmdline (its mmap_lock)
REVISIT_EVERY = 2.0       # seconds between looks at throttled / frozen cgroups
STOPPED_KEPT = 32         # decision records kept in stopped_for_memory (`watch`'s summary)
EVENT_IDS_KEPT = 16       # per victim: the decisions its outcome answers
VICTIMS_MAX = 4096        # victims followed at once (each holds pidfds; memory is locked)
FAILED_TICK_PAUSE = 0.1   # seconds the loop sleeps at least after a tick that raised
QUIET_MAX = 60.0          # seconds the quiet wait (_wait_quiet) stays in C at most


class Victim:
    """A target we signalled, followed through its own pidfds until every one has died.

    ``alive`` holds the pidfds not yet seen dead (a dead one is closed and never polled
    again); escalation to SIGKILL after ``grace`` is driven by them, so a tree whose
    root died first still has its survivors killed.
    """

    __slots__ = ("key", "name", "alive", "exited", "usage_before", "limit", "event_ids",
                 "first_signal_at", "last_signal_at", "last_signal", "cgroup_dir", "escalated",
                 "description", "grace", "by_guard", "gave_up", "failed")

    def __init__(self, key: tuple, name: str, pidfds: List[int], usage_before: int,
                 event_ids: List[str], signalled_at: float, cgroup_dir: str = "",
                 description: str = "", sig: int = signal.SIGTERM, limit: int = 0,
                 grace: float = 0.0, by_guard: bool = False) -> None:
        self.key = key
        self.name = name
        self.alive = pidfds
        self.exited = 0
        self.usage_before = usage_before
        self.limit = limit
        self.event_ids = event_ids
        self.first_signal_at = signalled_at
        self.last_signal_at = signalled_at
        self.last_signal = sig
        self.cgroup_dir = cgroup_dir
        self.escalated = False
        self.description = description
        self.grace = grace
        self.by_guard = by_guard
        self.gave_up = False       # "did not exit" recorded; still followed
        self.failed = False        # following it raised once (logged once)


class Options:
    """How the loop is run: by systemd (`run`) or in the foreground (`watch`)."""

    __slots__ = ("config_path", "insecure", "proc_root", "cgroup_root", "exit_when_idle",
                 "command_pidfd", "on_record", "psi_trigger", "lock_memory")

    def __init__(self, config_path: Optional[str] = None, insecure: bool = False,
                 proc_root: str = "/", cgroup_root: str = CGROUP_ROOT,
                 exit_when_idle: bool = False, command_pidfd: int = -1,
                 on_record: Optional[Callable[[dict], None]] = None,
                 psi_trigger: bool = True, lock_memory: bool = True) -> None:
        self.config_path = config_path
        self.insecure = insecure
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root
        self.exit_when_idle = exit_when_idle    # `watch`: stop once every target is gone
        self.command_pidfd = command_pidfd      # `watch -- COMMAND`: stop when it exits; SIGINT/SIGTERM go to it
        self.on_record = on_record              # `watch --json`: every record
        self.psi_trigger = psi_trigger
        self.lock_memory = lock_memory


class Daemon:
    def __init__(self, config: Config, options: Optional[Options] = None,
                 notifier: Optional[Notifier] = None, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.opts = options or Options()
        self.notifier = notifier or Notifier()
        self.clock = clock
        self.never = ancestors(os.getpid(), os.path.join(self.opts.proc_root, "proc"))
        self.targets = TargetSet(config, self.opts.proc_root, self.opts.cgroup_root, self.never)
        self.policy = Policy(config)
        self.events = offload.EventWriter(_open_events(config))
        self.readers = offload.Helpers()   # victims' cmdlines (mmap_lock)
        self.actors = offload.Helpers()    # process_mrelease, memory.high (reclaim)
        self.runner: Optional[actions.OnActionRunner] = None
        self._prepare_on_action(config)
        self.victims: Dict[tuple, Victim] = {}
        self.stopping = False
        self.reload_requested = False
        self.ticks = 0
        self.quiet_wakes = 0   # wake-ups spent in the quiet wait (C), next to ticks (Python)
        self.actions_taken = 0
        self.last_action = ""
        self.seen_target = False
        # decision records of signals sent, the latest STOPPED_KEPT (`watch` sums them up)
        self.stopped_for_memory: collections.deque = collections.deque(maxlen=STOPPED_KEPT)
        self.quarantined: Dict[str, str] = {}   # watch name -> the error that stopped it
        self._errors_logged: Dict[str, int] = {}   # traceback text -> times seen (logged once)
        self._empty_noted: set = set()    # cgroup keys said to be over their limit with no process
        self._held: Dict[tuple, tuple] = {}   # throttled/frozen cgroup key -> (kind, dir, value)
        self._revisit_at = 0.0
        self._tick_failed = False
        self._status_at = 0.0
        self._psi_fd = -1
        self._wake_r = self._wake_w = -1   # a pipe: signal handlers wake poll() through it
        self.host: Optional[HostSample] = None
        self.host_read_at = 0.0
        self.publisher = state.Publisher(config, self.opts.proc_root)   # state file, metrics
        self.swaps = SwapWatcher(self.opts.proc_root, helpers=self.readers)   # zram, for the guard
        self._read_refaults_below(config)
        self.trace = None                  # trace.Recorder when [daemon] trace is set
        self._open_trace(config)

    # ---------------------------------------------------------------- setup

    def _setup(self) -> None:
        # One pidfd per process of a signalled cgroup: allow as many fds as we may.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if self.opts.lock_memory:
            try:
                sampler.mlockall_onfault()
            except OSError as e:
                log(NOTICE, f"mlockall failed ({e.strerror}); memwatchd may be paged out under pressure")
            try:   # before any thread starts: threads and on_action children inherit it
                sampler.set_io_flusher()
            except OSError as e:
                log(NOTICE, f"PR_SET_IO_FLUSHER failed ({e.strerror}); a slow swap device may hold "
                            f"memwatchd up in reclaim")
        if self.opts.psi_trigger and self.config.guard.enabled:
            try:
                self._psi_fd = sampler.open_psi_trigger(self.opts.proc_root)
            except OSError as e:
                log(INFO, f"no PSI trigger ({e.strerror}); the guard relies on sampling alone")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self._old_handlers = {sig: signal.getsignal(sig)
                              for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        if self.opts.command_pidfd >= 0:
            signal.signal(signal.SIGTERM, self._forward)
            signal.signal(signal.SIGINT, self._forward)
        else:
            signal.signal(signal.SIGTERM, self._on_stop)
            signal.signal(signal.SIGINT, self._on_stop)
            signal.signal(signal.SIGHUP, self._on_reload)

    def _on_stop(self, signum, frame) -> None:
        self.stopping = True

    def _forward(self, signum, frame) -> None:
        """`watch -- COMMAND`: Ctrl-C and SIGTERM are for the command; we exit when it does."""
        try:
            signal.pidfd_send_signal(self.opts.command_pidfd, signum)
        except OSError:
            pass

    def _on_reload(self, signum, frame) -> None:
        self.reload_requested = True

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, handler)
        for victim in self.victims.values():
            _close_all(victim.alive)
        self.victims.clear()
        if self.runner is not None:
            self.runner.close()
        self.events.close()   # writes what is queued first (bounded on a stuck disk)
        self.publisher.close()
        if self.trace is not None:
            self.trace.close()
            self.trace = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._psi_fd >= 0:
            os.close(self._psi_fd)
            self._psi_fd = -1
        self.targets.close()

    # ----------------------------------------------------------------- loop

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or, with exit_when_idle, until nothing is left to watch)."""
        self._setup()
        self.publisher.start()
        try:
            log(INFO, f"memwatchd started: {report.count(len(self.config.watches), 'watch', 'watches')}, guard "
                      f"{'on' if self.config.guard.enabled else 'off'}, sampler {sampler.IMPLEMENTATION}"
                      f"{', dry run' if self.config.daemon.dry_run else ''} ({self.config.source})")
            while not self.stopping:
                if self.reload_requested:
                    try:
                        self.reload()
                    except Exception as e:   # a bug: the running config stays, the loop goes on
                        self._log_exception("reload", e)
                        self.notifier.ready(self.status_line())
                started = time.perf_counter()
                try:
                    self.tick()
                    self._tick_failed = False
                except Exception as e:   # a bug outside any one watch: log it once, keep going
                    self._log_exception("the loop", e)
                    self._tick_failed = True   # _sleep waits a little: no busy loop on a bug
                try:
                    self.publisher.after_tick(self, time.perf_counter() - started)
                except Exception as e:
                    self._log_exception("the state file / metrics", e)
                self._notify()
                if self._finished():
                    break
                self._sleep()
            self.follow_victims(self.clock(), final=True)
            self.notifier.stopping()
            log(INFO, "memwatchd stopping")
            return 0
        finally:
            self.close()

    def _finished(self) -> bool:
        """`watch` only: the command exited, or every target is gone (nothing in flight)."""
        if self.victims:
            return False
        if self.opts.command_pidfd >= 0:
            return actions.is_dead(self.opts.command_pidfd)
        if self.opts.exit_when_idle:
            if not self.seen_target:
                if self.targets.busy:  # a cmdline pass may span ticks: not judged yet
                    return False
                off = self.targets.off
                raise TargetGone("nothing to watch: " + "; ".join(
                    f"{w.name} ({w.kind} {w.selector}) "
                    + (f"is off ({off[w.name]})" if w.name in off else "matched nothing")
                    for w in self.config.watches))
            return not self.targets.targets
        return False

    def tick(self) -> None:
        """One pass over everything that is due. Never raises for a vanished target; an
        unexpected error in one watch's work quarantines that watch (logged once) and the
        guard and every other watch keep running."""
        now = self.clock()
        self.ticks += 1
        for target in self.targets.refresh(now):
            self.seen_target = True
            log(INFO, f"watching {target.watch.name}: {self._describe(target.key)}")
        if self.targets.discovery_changed:
            self.targets.discovery_changed = False
            log(INFO, f"new processes are found by {self.targets.discovery}")
        self._log_problems()
        if self.trace is not None and self.targets.in_table:
            self.targets.take_all_back()
        readings, gone = self.targets.sample_due(now)
        for target in gone:
            self.policy.forget(target.key)
            self._held.pop(target.key, None)
            log(INFO, f"{target.watch.name}: {self._describe(target.key, target)} is gone")
        self._quarantine_failed()
        self.host = host = self.targets.host.read()
        self.host_read_at = self.clock()   # the state says how old its host numbers are
        self.policy.zram = self.swaps.update(now, host.swap_total)
        decisions = self.policy.evaluate(now, readings, host)
        self._quarantine_failed()
        candidates: List[Candidate] = []
        try:
            if self.policy.guard_wants_victim(now, host):
                candidates = self.targets.guard_candidates()
            decisions += self.policy.guard_evaluate(now, host, candidates, self.never)
        except Exception as e:   # the guard is never quarantined: retried next tick
            self._log_exception("the host guard", e)
        if self.trace is not None:  # trace hook 1: what the policy consumed and decided
            try:
                self.trace.tick(now, readings, gone, host, candidates, decisions)
            except Exception as e:   # a recording must never stop protection
                self._log_exception("the trace", e)
        for decision in decisions:
            if decision.watch in self.quarantined and not decision.by_guard:
                continue
            try:
                self.execute(decision, candidates)
            except MemwatchdError as e:
                log(ERR, f"{decision.watch}: could not {decision.kind}: {e}")
            except Exception as e:
                if decision.by_guard:
                    self._log_exception("the host guard", e)
                else:
                    self._quarantine(decision.watch, e)
        in_table = self.trace is None   # a trace records every reading the policy sees
        for reading in readings:
            target = self.targets.targets.get(reading.key)
            if target is not None:
                target.interval = self.policy.interval_for(reading)
                target.next_due = now + target.interval
                if in_table and target.watch.scope == "process" and not target.is_cgroup \
                        and reading.watch not in self.quarantined:
                    below = self.policy.quiet_below(reading)
                    if below is not None:   # quiet: the table schedules it until it is loud
                        self.targets.hand_to_table(target, below)
        self.follow_victims(self.clock())
        if now >= self._revisit_at and self._held:
            self._revisit_at = now + REVISIT_EVERY
            self._revisit_held()
        if self.runner is not None:
            for argv0, result in self.runner.poll():
                log(INFO if result == 0 else WARNING, f"on_action {escape(argv0)} ended: {result}")

    # ------------------------------------------------------ containment

    def _log_exception(self, where: str, error: BaseException) -> bool:
        """Log an unexpected error with its traceback the first time it is seen; True then."""
        import traceback  # only when something went wrong (~0.3 MiB)
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        seen = self._errors_logged.get(text, 0)
        if len(self._errors_logged) < 64 or seen:
            self._errors_logged[text] = seen + 1
        if seen:
            return False
        log(ERR, f"unexpected error in {where}: {type(error).__name__}: {error}")
        for line in text.rstrip().splitlines():
            log(ERR, line)
        return True

    def _quarantine(self, name: str, error: BaseException) -> None:
        """Stop one watch whose work raised: its targets are dropped and it is not resolved
        again until a reload (SIGHUP); everything else runs on. Logged once, traceback included."""
        if name in self.quarantined:
            return
        self._log_exception(f"watch {name}", error)
        self.quarantined[name] = f"{type(error).__name__}: {error}"
        self.targets.quarantined.add(name)
        for key, target in list(self.targets.targets.items()):
            if target.watch.name == name:
                self.targets.drop(key)
                self.policy.forget(key)
        log(ERR, f"watch {name} is quarantined until the next reload; the guard and the other "
                 f"watches keep running")

    def _quarantine_failed(self) -> None:
        failed = self.targets.failed + self.policy.failed
        self.targets.failed, self.policy.failed = [], []
        for name, error in failed:
            self._quarantine(name, error)

    def _notify(self) -> None:
        """READY=1 after the first successful tick, then STATUS= looked at once a second
        and sent only when its text changed (Notifier.status), and WATCHDOG=1 at its own
        cadence, from this (the main) thread only: a stuck loop stops the pings."""
        now = self.clock()
        if self.ticks == 1:
            self.notifier.ready(self.status_line())
            self._status_at = now
        elif now - self._status_at >= STATUS_EVERY:
            self._status_at = now
            self.notifier.status(self.status_line())
        self.notifier.watchdog()

    def _sleep(self) -> None:
        now = self.clock()
        due = [self.targets.next_due()]   # no Python step per target the table schedules
        if self.host is not None:
            due.append(now + self.policy.guard_interval(self.host))
        if self.victims or self.targets.busy:   # busy: a cmdline pass resumes (targets)
            due.append(now + self.config.daemon.min_interval)
        due.append(now + self.config.daemon.interval)
        if self.publisher.every:
            due.append(now + self.publisher.every)
        unpinged = min(due) - now   # the quiet wait pings by itself
        ping = self.notifier.ping_interval
        if ping:
            due.append(now + ping)
        timeout = max(FAILED_TICK_PAUSE if self._tick_failed else 0.0, min(due) - now)
        fds = self._wait_fds()
        events_fd = self.targets.events_fd   # an exec or fork: the next tick judges it at once
        start = time.monotonic()
        poller = None
        while True:
            waited = time.monotonic() - start
            events = self._wait_quiet(self.clock(), unpinged - waited, fds)
            if events is None:
                if poller is None:
                    poller = select.poll()
                    for fd, mask in fds:
                        poller.register(fd, mask)
                try:
                    events = poller.poll(max(0.0, timeout - waited) * 1000.0)
                except InterruptedError:
                    return
            if len(events) != 1 or events[0][0] != events_fd or self._events_for_a_watch():
                break
            # only process events, none for any watch (a new thread, an unrelated fork):
            # read and dropped, no tick; the wait goes on
            left = timeout - (time.monotonic() - start)
            if self.targets.events_fd < 0 or left <= 0:
                break
            # a burst (a build forking thousands a second) is read in batches, not one
            # wake-up per fork: a few ms late at worst for the next matching exec
            time.sleep(min(EVENTS_COALESCE, left))
        for fd, _ in events:
            if fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
            elif fd == self._psi_fd:
                log(DEBUG, "PSI trigger fired")
                for target in self.targets.targets.values():
                    target.next_due = 0.0

    def _wait_fds(self) -> List[tuple]:
        """(fd, poll events) the loop's wait wakes on: the signal pipe, `watch`'s command,
        the PSI trigger, the process-events socket, every victim's pidfds."""
        fds = [(self._wake_r, select.POLLIN)]
        if self.opts.command_pidfd >= 0 and not self.victims:  # once dead it stays readable
            fds.append((self.opts.command_pidfd, select.POLLIN))
        if self._psi_fd >= 0:
            fds.append((self._psi_fd, select.POLLPRI))
        if self.targets.events_fd >= 0:   # process events (procevents): new processes
            fds.append((self.targets.events_fd, select.POLLIN))
        for victim in self.victims.values():
            for fd in victim.alive:   # a pidfd seen dead was closed: never polled again
                fds.append((fd, select.POLLIN))
        return fds

    def _wait_quiet(self, now: float, timeout: float, fds: List[tuple]) -> Optional[list]:
        """Issue 18: while nothing but slow looks is due, wait in C (sampler.wait_quiet)
        instead of ticking in Python. It re-reads MemAvailable every interval, as the
        guard would, and the statm of every quiet process target as often as its own
        schedule asks, pings the watchdog, and comes back as soon as anything could need
        Python: MemAvailable nearing what the guard acts on (its SIGTERM floor plus what
        fill_rate takes in one interval; the PSI gate) or moving by a tenth of MemTotal
        (state.quiet_host_move: the state file's own 1% rule would hand every allocation
        elsewhere on a shared host a Python tick; the state says how old its host numbers
        are); a target's RSS reaching its ceiling (its warn level or limit less what
        fill_rate adds in one look, or a move the state file notes) or the target gone;
        an fd; anything else due. The same looks at the same times as the ticks it
        replaces (one C wake-up does the host look, the pings and the targets' looks
        that are due together): reaction is unchanged. Returns the fds that fired, []
        when the loop should tick, None when the ordinary wait applies."""
        d, g, host = self.config.daemon, self.config.guard, self.host
        if (timeout <= 0 or host is None or host.mem_total <= 0
                or host.mem_available < 0 or self.victims or self._held or self._tick_failed
                or self.targets.busy or self.targets.unit_paths or self.trace is not None
                or (self.runner is not None and self.runner.running)):
            return None
        low, high, look = -1, 1 << 62, 2 * QUIET_MAX   # no guard: MemAvailable is not looked at
        if g.enabled:
            if (g.predict > 0 or self.policy.guard.victim is not None or self.policy.guard.pressure
                    or self.policy.guard_interval(host) < d.interval):
                return None
            term_below, _ = g.thresholds(host.mem_total)
            moved = state.quiet_host_move(host.mem_total)   # wide: the guard's band is below
            low = max(term_below + int(d.fill_rate * d.interval),
                      g.psi_available.resolve(host.mem_total), host.mem_available - moved)
            if host.mem_available <= low:
                return None
            high, look = host.mem_available + moved, d.interval
        later = [now + QUIET_MAX]
        done = self.targets.pid_watches_done   # a pid watch resolves once: no rescan to wait for
        later.extend(at for name, at in self.targets.rescan_at.items() if name not in done)
        if self.publisher.every:
            later.append(now + self.publisher.every)
        quiet, step = self._quiet_targets(later)
        if quiet:
            slots, ceilings, steps = zip(*((t.slot, c, s) for t, c, s in quiet))
        until = min(later) - now
        if until < 2 * min(look, step):
            return None
        ping = self.notifier.ping_socket()
        if self.notifier.watchdog_interval and ping is None:
            return None
        why, ready, pings, _avail, ping_ago, wakes = sampler.wait_quiet(
            self.targets.host, fds, until, look, low, high, *(ping or (-1, 0.0, 0.0)),
            *((self.targets.processes, slots, ceilings, step, steps) if quiet else ()))
        self.quiet_wakes += wakes
        self.notifier.pinged(pings, ping_ago)
        if why == 3:
            self.notifier.watchdog()   # the notifier's own send: reconnects, counts, logs
        if why == 4 or why == 0:
            for target, _, _ in quiet:   # looked at in C: the tick reads them again now
                target.next_due = 0.0
        return ready

    def _quiet_targets(self, later: List[float]) -> tuple:
        """([(target, RSS ceiling, its step)], shortest step) for the quiet wait: the
        single-process targets that nothing in the policy is pending on, each looked at
        every its-step seconds; every other target adds its next due time to later."""
        d, policy = self.config.daemon, self.policy
        candidates = []
        for t in self.targets.targets.values():
            if (t.is_cgroup or t.watch.scope != "process" or t.sampled_at <= 0
                    or t.watch.name in policy.predicting or t.watch.name in self.quarantined):
                later.append(t.next_due)
                continue
            s = policy.states.get(t.key)
            if s is not None and (s.stage != "idle" or s.over_since is not None or s.warned):
                later.append(t.next_due)
                continue
            candidates.append(t)
        if not candidates:
            return [], QUIET_MAX
        # Each is looked at again before it can reach its warn level or limit at fill_rate
        # (as its own schedule would) and given back to the loop once its RSS moved by
        # what the state file notes: step leaves room for that move.
        fill, steps, quiet = d.fill_rate, [], []
        for t in candidates:
            level = t.limit if t.warn is None else min(t.limit, t.warn)
            moved = max(state.MOVED_BYTES, t.limit >> 6)
            room = (level - t.usage - moved) / fill
            if room < d.min_interval:
                later.append(t.next_due)
            else:
                steps.append(room)
                quiet.append((t, level, moved))
        if not quiet:
            return [], QUIET_MAX
        # each on its own schedule: one close to its limit does not make the far ones read
        # as often (at a wake-up the C wait reads every slot due before the next one)
        steps = [max(d.min_interval, min(d.interval, room)) for room in steps]
        quiet = [(t, min(level - int(fill * own), t.usage + moved), own)
                 for (t, level, moved), own in zip(quiet, steps)]
        return quiet, min(steps)

    def _events_for_a_watch(self) -> bool:
        """Read the process events that woke the wait; True if one concerns a watch (or
        something went wrong: the tick sorts it out)."""
        try:
            return self.targets.take_events()
        except Exception as e:   # a bug: said once; the tick's refresh meets it again
            self._log_exception("process events", e)
            return True

    # --------------------------------------------------------------- reload

    def reload(self) -> None:
        """SIGHUP: read and validate the config file; a bad one keeps the old one running."""
        self.reload_requested = False
        self.notifier.reloading()
        try:
            config = load_config(self.opts.config_path, insecure=self.opts.insecure, parse_in_child=True)
            self.apply_config(config)
        except ConfigError as e:
            log(ERR, f"reload failed, keeping the running configuration: {e}")
            self.notifier.ready(self.status_line())
            return
        for warning in config.warnings:
            log(WARNING, warning)
        log(INFO, f"reloaded {config.source}: {report.count(len(config.watches), 'watch', 'watches')}")
        self.notifier.ready(self.status_line())

    def apply_config(self, config: Config) -> None:
        """Adopt a new config whole, or not at all: everything it needs that can fail (the
        events file) is opened first; ConfigError then, and the running config stays."""
        events = None
        if (config.daemon.events or None) != self.events.path:
            events = _open_events(config)
        self._prepare_on_action(config)
        self.config = config
        for key in self.targets.reconfigure(config):
            self.policy.forget(key)
            self._held.pop(key, None)
        self.policy.reconfigure(config)
        self.publisher.reconfigure(config)
        self._read_refaults_below(config)
        if self.quarantined:
            log(NOTICE, f"reload: watching again {', '.join(sorted(self.quarantined))}")
        self.quarantined.clear()
        self.targets.quarantined.clear()
        if events is not None:
            self.events.close()
            self.events = offload.EventWriter(events)
        self._open_trace(config)

    def _read_refaults_below(self, config: Config) -> None:
        """The host reader adds /proc/vmstat's refault counters (and the I/O stall total)
        only where the guard's pressure triggers can use them: MemAvailable under
        psi_available."""
        g = config.guard
        on = g.enabled and ((g.psi_refaults > 0 and (g.psi_full > 0 or g.psi_full_kill > 0
                                                     or g.psi_some > 0)) or g.psi_io_full > 0)
        self.targets.host.refaults_below = (g.psi_available.resolve(self.targets.mem_total)
                                            if on else -1)

    def _open_trace(self, config: Config) -> None:
        """Start, move, stop or re-head the trace for this config. memwatchd.trace is
        imported only when [daemon] trace is set: without it, tracing costs nothing."""
        path = config.daemon.trace
        if self.trace is not None and (not path or self.trace.sink.path != path):
            self.trace.close()
            self.trace = None
        if self.trace is not None:
            self.trace.reconfigure(config)
        elif path:
            from memwatchd import trace
            try:
                self.trace = trace.open_ring(config, self)
            except OSError as e:
                log(ERR, f"cannot record a trace in {path}: {e.strerror}; not recording")

    def _prepare_on_action(self, config: Config) -> None:
        """Create the on_action runner once some watch has on_action, at start or reload:
        it imports subprocess (about 1 MiB resident), which must not happen mid-emergency
        and is not worth carrying for a config without on_action."""
        if self.runner is None and any(w.on_action for w in config.watches):
            self.runner = actions.OnActionRunner()

    # -------------------------------------------------------------- actions

    def execute(self, decision: Decision, candidates: List[Candidate]) -> None:
        """Re-check, write the record (fsync, bounded wait), then act. The record comes first."""
        by_guard = decision.by_guard
        target = None if by_guard else self.targets.targets.get(decision.key)
        if target is None and not by_guard:
            return
        fresh_usage = None if by_guard else self.targets.reread(decision.key)
        fresh_host = self.targets.host.read() if by_guard else self.host
        if not by_guard and fresh_usage is None:
            return  # it exited on its own meanwhile
        if not still_needed(decision, fresh_usage, fresh_host, self.config.guard, self.policy.zram):
            self.policy.back_off(decision.key, by_guard)
            log(NOTICE, f"{decision.watch}: {self._describe(decision.key, target)} recovered "
                        f"before {decision.kind}; backing off")
            return
        usage = decision.usage if fresh_usage is None else fresh_usage
        if by_guard:
            victim = next((c for c in candidates if c.key == decision.key), None)
            pid, start = decision.key[1], decision.key[2]
            comm = victim.comm if victim else read_comm(pid, self._proc)
            cgroup = victim.cgroup if victim else read_cgroup(pid, self._proc)
            cmdline = self._fresh_cmdline(pid, start)
            scope = "process"
        elif target.is_cgroup:
            pid, start, comm, cmdline, cgroup = None, None, target.comm, None, target.cgroup
            scope = "cgroup"
            if decision.kind == "signal" and not self._has_processes(target):
                return
        else:
            pid, start = target.pid, target.start_time
            comm, cmdline = self._fresh_names(target)
            cgroup, scope = target.cgroup, target.watch.scope
        action = decision.kind if decision.kind != "signal" else \
            ("kill" if decision.signal == signal.SIGKILL else "term")
        record = report.decision_record(
            target=decision.watch, pid=pid, start_time=start, comm=comm, cmdline=cmdline,
            cgroup=cgroup, usage_bytes=usage, limit_bytes=decision.limit, reason=decision.reason,
            action=action, signal=decision.signal, dry_run=self.config.daemon.dry_run,
            **report.host_fields(fresh_host))
        record["scope"] = scope
        record["container"] = escape(target.container) if getattr(target, "container", "") \
            else None   # a container watch's container name (issue 12)
        # the time-to-exhaustion estimate (issue 15), null without predict
        record["predict"] = self.policy.estimate_host() if by_guard else \
            self.policy.estimate(decision.key)
        what = f"{decision.watch}: {self._describe(decision.key, target)} " + report.decision_text(
            decision.watch, usage, decision.limit, decision.reason,
            warn=getattr(target, "warn", None), host=fresh_host, guard=self.config.guard)
        self._record(record, write_ahead=decision.kind != "warn" and not self.config.daemon.dry_run)
        if decision.kind == "warn":
            log(WARNING, f"{what}: warning")
            return
        if self.config.daemon.dry_run:
            log(WARNING, f"{what}: dry run, would {action}")
            return
        self.actions_taken += 1
        self.last_action = f"{action} {decision.watch} ({decision.reason})"
        cgroup_dir = self.opts.cgroup_root + cgroup if cgroup else ""
        if decision.kind == "throttle":
            # Reclaim runs inside the write: a helper thread does it (on its own dup of the
            # cgroup's directory fd, which the loop may close meanwhile), the loop goes on.
            written: List[bool] = []
            dir_fd = _dup(self.targets.cgroup_fd(decision.key))
            if not self.actors.start(_throttle, (cgroup_dir, decision.limit, what, written, dir_fd)):
                if dir_fd is not None:
                    os.close(dir_fd)
                log(ERR, f"{what}: could not set memory.high: earlier kernel calls are still blocked")
            else:
                log(WARNING, f"{what}: setting memory.high to {_mib(decision.limit)}")
                self._held[decision.key] = ("throttle", cgroup_dir, decision.limit, written)
        elif decision.kind == "freeze":
            actions.set_frozen(cgroup_dir, True, self.targets.cgroup_fd(decision.key))
            log(WARNING, f"{what}: cgroup frozen")
            self._held[decision.key] = ("freeze", cgroup_dir, None, [True])
        else:
            self._signal(decision, record, scope, pid, start, cgroup_dir, usage, target)
        if not by_guard and target.watch.on_action:
            env = actions.victim_env(target=decision.watch, pid=pid or "", comm=comm or "",
                                     cmdline=cmdline or "", cgroup=cgroup or "", usage=usage,
                                     limit=decision.limit, reason=decision.reason, action=action,
                                     event_id=record["id"], container=record["container"] or "")
            try:
                self.runner.start(target.watch.on_action, env, ON_ACTION_TIMEOUT)
            except (OSError, MemwatchdError) as e:
                log(ERR, f"{decision.watch}: on_action failed to start: {e}")

    @property
    def _proc(self) -> str:
        return os.path.join(self.opts.proc_root, "proc")

    def _fresh_cmdline(self, pid: int, start: Optional[int]) -> Optional[str]:
        """The process's cmdline now, read by a helper thread (the read waits on the
        victim's mmap_lock, which a process under memory pressure may hold for long);
        None if it did not come within CMDLINE_WAIT or the PID no longer names it."""
        try:
            done, cmdline = self.readers.call(read_cmdline, (pid, self._proc), CMDLINE_WAIT)
        except Exception:
            return None
        if not done:
            log(DEBUG, f"pid {pid}: cmdline not read within {CMDLINE_WAIT * 1000:.0f} ms")
            return None
        return cmdline if start is None or self._start_time(pid) == start else None

    def _start_time(self, pid: int) -> Optional[int]:
        try:
            return parse_stat_start_time(read_small(f"{self._proc}/{pid}/stat"))
        except (OSError, ValueError):
            return None

    def _fresh_names(self, target) -> tuple:
        """(comm, cmdline) of a process target now, not when it was attached: a wrapper
        (sh -c, env, nice, timeout) may have exec'ed the real program since. comm comes
        from one stat read; the cmdline is read again (by a helper: mmap_lock) only if that
        shows an exec since it was last read, so the usual first SIGTERM waits for no
        thread. The target (logs, status) takes the new names too."""
        mark = exec_mark(target.pid, self._proc)
        if mark is None or mark[0] != target.start_time:
            return target.comm, None if mark is None else target.cmdline   # exiting
        comm = mark[1]
        if mark == target.names_mark:   # names_mark is only ever a valid mark
            return comm, target.cmdline
        cmdline = self._fresh_cmdline(target.pid, target.start_time)
        if cmdline is None and comm == target.comm and target.cmdline:
            cmdline = target.cmdline      # not read in time, but the same program: its cmdline
        elif cmdline and valid_mark(mark) and exec_mark(target.pid, self._proc) == mark:
            target.names_mark = mark      # no exec during the read: these names hold until one
        if comm != target.comm or (cmdline is not None and cmdline != target.cmdline):
            target.comm = comm
            target.cmdline = target.cmdline if cmdline is None else cmdline
            self.publisher.labels.pop(target.key, None)
        return comm, cmdline

    def _has_processes(self, target) -> bool:
        """False (and said once, until a process joins) for a cgroup over its limit with
        no process left in it: page cache, tmpfs and shm stay charged to it, and killing
        nobody on every tick helps nothing. The ladder starts again after the cooldown."""
        populated = actions.cgroup_populated(self.opts.cgroup_root + target.cgroup)
        if populated is not False:
            self._empty_noted.discard(target.key)
            return True
        self.policy.settle(target.key)
        if target.key not in self._empty_noted:
            if len(self._empty_noted) > 1024:
                self._empty_noted.clear()
            self._empty_noted.add(target.key)
            log(NOTICE, f"{target.watch.name}: {self._describe(target.key, target)} is over its "
                        f"limit with no process left in it (page cache, tmpfs or shm stay "
                        f"charged); nothing to stop until a process joins")
        return False

    def _revisit_held(self) -> None:
        """A frozen cgroup an operator thawed, or a throttled one whose memory.high someone
        changed, is watched again: its ladder restarts (after the cooldown). memwatchd
        itself never thaws and never restores memory.high (docs/configuration.md)."""
        for key, (kind, cgroup_dir, value, written) in list(self._held.items()):
            if self.policy.stage(key) not in ("throttled", "freezing"):
                del self._held[key]     # usage fell below the limit: the ladder is idle again
                continue
            if not written:
                continue                # the helper is still writing memory.high (reclaim)
            # What was asked for, not cgroup.events: freezing takes a while to complete.
            control, ours = ("cgroup.freeze", b"1") if kind == "freeze" else \
                ("memory.high", str(value).encode())
            try:
                now_set = read_small(os.path.join(cgroup_dir, control)).strip()
            except OSError:
                continue
            released = now_set != ours
            why = "was thawed" if kind == "freeze" else f"has memory.high {escape(now_set)} now"
            if released:
                del self._held[key]
                self.policy.settle(key)
                log(NOTICE, f"{self._describe(key)} {why}; watching it again")

    def _signal(self, decision: Decision, record: dict, scope: str, pid, start, cgroup_dir: str,
                usage: int, target=None) -> None:
        sig = decision.signal
        proc_root = self.opts.proc_root
        try:
            if scope == "cgroup":  # through the directory held since selection
                pidfds = actions.signal_cgroup(cgroup_dir, sig, self.targets.cgroup_fd(decision.key))
            elif scope == "tree":
                pidfds = actions.signal_tree(pid, start, sig, proc_root)
            else:
                fd = actions.open_process(pid, start, proc_root)
                pidfds = [fd]
                try:
                    actions.send_signal(fd, sig)
                except BaseException:
                    os.close(fd)
                    raise
        except TargetGone:
            self._record(report.outcome_record(event_id=record["id"], exited=True,
                                               seconds_to_exit=0.0, freed_bytes=usage,
                                               escalated=False, detail="already gone"))
            if decision.key[0] == "cgroup":
                self.policy.settle(decision.key)
            else:
                self.policy.forget(decision.key)
            return
        now = self.clock()
        name = signal.Signals(sig).name
        log(WARNING, f"{decision.watch}: sent {name} to {self._describe(decision.key)} "
                     + report.decision_text(decision.watch, usage, decision.limit, decision.reason,
                                            host=self.host, guard=self.config.guard))
        self.stopped_for_memory.append(record)
        victim = self.victims.get(decision.key)   # followed before anything else can fail
        if victim is None:
            grace = self.config.guard.grace if decision.by_guard else \
                (target.watch.grace if target is not None else 0.0)
            if len(self.victims) >= VICTIMS_MAX:
                self._forget_oldest_victim()
            self.victims[decision.key] = Victim(
                decision.key, decision.watch, pidfds, usage, [record["id"]], now, cgroup_dir,
                description=self._describe(decision.key), sig=sig, limit=decision.limit,
                grace=grace, by_guard=decision.by_guard)
        else:
            victim.alive.extend(pidfds)
            victim.event_ids = (victim.event_ids + [record["id"]])[-EVENT_IDS_KEPT:]
            victim.last_signal_at = now
            victim.last_signal = sig
            victim.escalated = True
            victim.gave_up = False
        if sig == signal.SIGKILL:
            self._release(pidfds)

    def _release(self, pidfds: List[int]) -> None:
        """process_mrelease() each killed process from a helper thread: advisory (its errors
        are outcomes, never exceptions) and it may wait on the victim's mmap_lock."""
        for fd in pidfds:
            try:
                dup = os.dup(fd)
            except OSError:
                continue
            if not self.actors.start(actions.release_and_close, (dup,)):
                os.close(dup)    # helpers busy: the exit path frees the memory anyway

    def _kill_survivors(self, victim: Victim, now: float) -> None:
        """SIGKILL, through their own pidfds, the processes of a victim that outlived its
        grace after SIGTERM while its target is gone (a tree whose root died first)."""
        pids = [actions.pidfd_pid(fd) for fd in victim.alive]
        pid = next((p for p in pids if p), None)
        comm = read_comm(pid, self._proc) if pid else None
        record = report.decision_record(
            target=victim.name, pid=pid, start_time=self._start_time(pid) if pid else None,
            comm=comm, cmdline=self._fresh_cmdline(pid, None) if pid else None, cgroup=None,
            usage_bytes=None, limit_bytes=victim.limit, reason=REASON_GRACE, action="kill",
            signal=signal.SIGKILL, dry_run=False,
            **(report.host_fields(self.host) if self.host is not None else {}))
        record["scope"] = "survivors"
        record["pids"] = [p for p in pids if p]
        self._record(record, write_ahead=True)
        for fd in victim.alive:
            try:
                actions.send_signal(fd, signal.SIGKILL)
            except MemwatchdError:
                pass   # one refusing survivor must not spare the rest
        self._release(victim.alive)
        self.actions_taken += 1
        self.last_action = f"kill {victim.name} ({REASON_GRACE})"
        self.stopped_for_memory.append(record)
        victim.event_ids = (victim.event_ids + [record["id"]])[-EVENT_IDS_KEPT:]
        victim.last_signal, victim.last_signal_at, victim.escalated = signal.SIGKILL, now, True
        log(WARNING, f"{victim.name}: sent SIGKILL to {report.count(len(victim.alive), 'process', 'processes')} left of "
                     f"{victim.description} after its grace (pid {', '.join(map(str, record['pids']))}"
                     f"{f' ({escape(comm)})' if comm else ''})")

    def _forget_oldest_victim(self) -> None:
        key = next((k for k, v in self.victims.items() if v.gave_up), next(iter(self.victims)))
        victim = self.victims.pop(key)
        _close_all(victim.alive)
        log(ERR, f"{victim.name}: too many signalled processes to follow; no longer following "
                 f"{victim.description}")

    def follow_victims(self, now: float, final: bool = False) -> None:
        """Follow every signalled target through its pidfds: close the ones that died, SIGKILL
        the survivors of a gone target after its grace, record "did not exit" GIVE_UP_AFTER
        seconds after the last signal (and go on looking: the ladder may act again, a later
        death is recorded too), and write the outcome once all have died. With final, when
        memwatchd stops, every one is recorded: nothing signalled is left unrecorded."""
        for key, victim in list(self.victims.items()):
            try:
                self._follow(key, victim, now, final)
            except Exception as e:
                if not victim.failed:
                    victim.failed = True
                    self._log_exception(f"following {victim.description}", e)
                if final:
                    _close_all(victim.alive)
                    self.victims.pop(key, None)

    def _follow(self, key: tuple, victim: Victim, now: float, final: bool) -> None:
        still = []
        for fd in victim.alive:
            if actions.is_dead(fd):
                os.close(fd)
                victim.exited += 1
            else:
                still.append(fd)
        victim.alive = still
        dead = not still
        if not dead and not final:
            if (victim.last_signal != signal.SIGKILL and not victim.by_guard
                    and key not in self.targets.targets
                    and victim.name in self.policy.watches   # not removed by a reload
                    and victim.name not in self.quarantined
                    and now - victim.last_signal_at >= victim.grace):
                self._kill_survivors(victim, now)
                return
            if victim.gave_up or now - victim.last_signal_at < GIVE_UP_AFTER:
                return
        if not dead and victim.gave_up:   # final, and "did not exit" is already on record
            _close_all(victim.alive)
            del self.victims[key]
            return
        freed = victim.usage_before if dead else None
        if victim.cgroup_dir and dead:
            try:
                with open(os.path.join(victim.cgroup_dir, "memory.current")) as f:
                    freed = max(0, victim.usage_before - int(f.read()))
            except (OSError, ValueError):
                pass
        late = dead and victim.gave_up
        for i, event_id in enumerate(victim.event_ids):
            self._record(report.outcome_record(
                event_id=event_id, exited=dead,
                seconds_to_exit=(now - victim.first_signal_at) if dead else None,
                freed_bytes=freed, escalated=victim.escalated and i == 0,
                detail=("exited, after memwatchd had recorded it as not exiting" if late
                        else "exited") if dead
                else "memwatchd stopped while it was still alive" if final
                else f"still alive {GIVE_UP_AFTER:.0f}s after the last signal "
                     f"({signal.Signals(victim.last_signal).name}); still followed"))
        log(NOTICE if dead else ERR,
            f"{victim.name}: {victim.description} "
            + (f"exited {report.format_duration(now - victim.first_signal_at)} after the first signal"
               if dead else f"did not exit {GIVE_UP_AFTER:.0f}s after "
                            f"{signal.Signals(victim.last_signal).name}"))
        if not dead and not final:
            victim.gave_up = True   # keep its pidfds: a later death is recorded too
            self.policy.settle(key)  # and the ladder may act on it again (after the cooldown)
            return
        if dead:
            self.publisher.victim_exited(now - victim.first_signal_at)
        _close_all(victim.alive)
        del self.victims[key]
        if dead:
            if key[0] == "cgroup":
                self.policy.settle(key)   # the cgroup stays: its cooldown runs on
            else:
                self.policy.forget(key)
                self.targets.drop(key)

    def _record(self, record: dict, write_ahead: bool = False) -> None:
        """Append to the events file through the writer thread. A decision that leads to an
        action waits until its record is on disk (fsync), but at most WRITE_AHEAD_WAIT: a
        congested or failing disk must not stop protection, so past that the action goes
        ahead, said in the journal, and the record follows when the disk lets it."""
        if not self.events.append(record, WRITE_AHEAD_WAIT if write_ahead else 0.0) \
                and write_ahead and self.events.enabled:
            log(ERR, f"event record {record.get('id')} is not on disk in {self.events.path} after "
                     f"{WRITE_AHEAD_WAIT:.1f}s (disk congested or failing); acting anyway")
        self.publisher.on_record(record)
        if self.trace is not None:  # trace hook 2: decisions as recorded, and their outcomes
            self.trace.event(record)
        if self.opts.on_record is not None:
            self.opts.on_record(record)

    # ------------------------------------------------------------- helpers

    def _describe(self, key: tuple, target=None) -> str:
        if key[0] == "cgroup":
            target = target or self.targets.targets.get(key)
            if getattr(target, "container", ""):
                return f"container {escape(target.container)} (cgroup {escape(key[1])})"
            return f"cgroup {escape(key[1])}"
        target = target or self.targets.targets.get(key)
        comm = target.comm if target is not None else read_comm(key[1])
        return f"pid {key[1]} ({escape(comm)})"

    def _log_problems(self) -> None:
        for problem in self.targets.problems:
            log(WARNING, problem)
        self.targets.problems.clear()

    def status_line(self) -> str:
        host = self.host
        avail = f", MemAvailable {_mib(host.mem_available)}" if host else ""
        last = f", last: {self.last_action}" if self.last_action else ""
        return f"watching {report.count(len(self.targets.targets), 'target')}{avail}, " \
               f"{report.count(self.actions_taken, 'action')}{last}"


def _open_events(config: Config) -> report.EventLog:
    """The events file of a config, opened now: ConfigError naming the key and path if it
    cannot be (outside the unit's writable paths, a parent that is a file, ...)."""
    path = config.daemon.events or None
    try:
        return report.EventLog(path)
    except OSError as e:
        raise ConfigError(f"{config.source}: daemon.events = {path!r}: cannot open it: "
                          f"{e.strerror or e}") from None


def _throttle(cgroup_dir: str, limit: int, what: str, written: List[bool],
              dir_fd: Optional[int]) -> None:
    """A helper thread's call: write memory.high (the kernel reclaims inside the write)
    through its own dup of the cgroup's directory fd, then close that; ``written`` gets an
    item once it is done (the loop then looks whether it stays)."""
    try:
        actions.set_memory_high(cgroup_dir, limit, dir_fd)
    except MemwatchdError as e:
        log(ERR, f"{what}: could not set memory.high: {e}")
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    written.append(True)


def _dup(fd: Optional[int]) -> Optional[int]:
    """A private copy of a directory fd for a helper thread (None stays None; a closed
    one, -1, is passed on for set_memory_high to refuse as gone)."""
    if fd is None or fd < 0:
        return fd
    try:
        return os.dup(fd)
    except OSError:
        return -1


def _mib(n: Optional[int]) -> str:
    return "?" if n is None or n < 0 else report.format_size(n)


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def run_from_file(config_path: Optional[str], insecure: bool, dry_run: bool) -> int:
    """`memwatchd run`: load the config and run the loop until SIGTERM.
    Raises MemwatchdError / OSError (the caller prints and exits)."""
    config = load_config(config_path, insecure=insecure, parse_in_child=True)
    if dry_run:
        config = config._replace(daemon=config.daemon._replace(dry_run=True))
    for warning in config.warnings:
        log(WARNING, warning)
    return Daemon(config, Options(config_path=config_path, insecure=insecure)).run()
