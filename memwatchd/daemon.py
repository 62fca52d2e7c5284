"""The main loop: wires config -> targets -> sampler -> policy -> actions -> report.

One thread. Each pass: re-resolve targets whose rescan is due, sample the
targets whose time has come (adaptive: near a limit every min_interval, far
from all limits about once per interval), ask the policy, re-check and act,
follow up on signalled processes, ping systemd, then sleep in poll() until the
next target is due, a PSI trigger fires, a signalled process dies, or a
signal (SIGTERM, SIGHUP) arrives. Nothing here prints; it logs via report.log.
"""
from __future__ import annotations

import os
import resource
import select
import signal
import time
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional

from memwatchd import actions, report, sampler, state
from memwatchd.config import CGROUP_ROOT, Config, load_config
from memwatchd.policy import Decision, Policy, still_needed
from memwatchd.report import DEBUG, ERR, INFO, NOTICE, WARNING, escape, log
from memwatchd.systemd import Notifier
from memwatchd.targets import TargetSet, ancestors, read_cgroup, read_cmdline, read_comm
from memwatchd.types import Candidate, ConfigError, HostSample, MemwatchdError, TargetGone

ON_ACTION_TIMEOUT = 30.0
GIVE_UP_AFTER = 30.0      # seconds after the last signal: record "did not exit" and stop waiting
STATUS_EVERY = 1.0


class Victim:
    """A target we signalled, until it dies (or we stop waiting)."""

    __slots__ = ("key", "name", "pidfds", "usage_before", "event_ids", "first_signal_at",
                 "last_signal_at", "cgroup_dir", "escalated", "description")

    def __init__(self, key: tuple, name: str, pidfds: List[int], usage_before: int,
                 event_ids: List[str], signalled_at: float, cgroup_dir: str = "",
                 description: str = "") -> None:
        self.key = key
        self.name = name
        self.pidfds = pidfds
        self.usage_before = usage_before
        self.event_ids = event_ids
        self.first_signal_at = signalled_at
        self.last_signal_at = signalled_at
        self.cgroup_dir = cgroup_dir
        self.escalated = False
        self.description = description


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
        self.events = report.EventLog(config.daemon.events or None)
        self.runner: Optional[actions.OnActionRunner] = None
        self._prepare_on_action(config)
        self.victims: Dict[tuple, Victim] = {}
        self.stopping = False
        self.reload_requested = False
        self.ticks = 0
        self.actions_taken = 0
        self.last_action = ""
        self.seen_target = False
        self.stopped_for_memory: List[dict] = []   # decision records of signals sent
        self._status_at = 0.0
        self._psi_fd = -1
        self._wake_r = self._wake_w = -1   # a pipe: signal handlers wake poll() through it
        self.host: Optional[HostSample] = None
        self.publisher = state.Publisher(config, self.opts.proc_root)   # state file, metrics
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
            _close_all(victim.pidfds)
        self.victims.clear()
        if self.runner is not None:
            self.runner.close()
        self.events.close()
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

    # ----------------------------------------------------------------- loop

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or, with exit_when_idle, until nothing is left to watch)."""
        self._setup()
        self.publisher.start()
        try:
            log(INFO, f"memwatchd started: {len(self.config.watches)} watch(es), guard "
                      f"{'on' if self.config.guard.enabled else 'off'}, sampler {sampler.IMPLEMENTATION}"
                      f"{', dry run' if self.config.daemon.dry_run else ''} ({self.config.source})")
            while not self.stopping:
                if self.reload_requested:
                    self.reload()
                started = time.perf_counter()
                self.tick()
                self.publisher.after_tick(self, time.perf_counter() - started)
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
        """One pass over everything that is due. Never raises for a vanished target."""
        now = self.clock()
        self.ticks += 1
        for target in self.targets.refresh(now):
            self.seen_target = True
            log(INFO, f"watching {target.watch.name}: {self._describe(target.key)}")
        self._log_problems()
        readings, gone = self.targets.sample_due(now)
        for target in gone:
            self.policy.forget(target.key)
            log(INFO, f"{target.watch.name}: {self._describe(target.key, target)} is gone")
        self.host = host = self.targets.host.read()
        decisions = self.policy.evaluate(now, readings, host)
        candidates: List[Candidate] = []
        if self.policy.guard_wants_victim(now, host):
            candidates = self.targets.guard_candidates()
        decisions += self.policy.guard_evaluate(now, host, candidates, self.never)
        if self.trace is not None:  # trace hook 1: what the policy consumed and decided
            self.trace.tick(now, readings, gone, host, candidates, decisions)
        for decision in decisions:
            try:
                self.execute(decision, candidates)
            except MemwatchdError as e:
                log(ERR, f"{decision.watch}: could not {decision.kind}: {e}")
        for reading in readings:
            target = self.targets.targets.get(reading.key)
            if target is not None:
                target.interval = self.policy.interval_for(reading)
                target.next_due = now + target.interval
        self.follow_victims(self.clock())
        if self.runner is not None:
            for argv0, result in self.runner.poll():
                log(INFO if result == 0 else WARNING, f"on_action {escape(argv0)} ended: {result}")

    def _notify(self) -> None:
        """READY=1 after the first successful tick, then STATUS= once a second and
        WATCHDOG=1 from this (the main) thread only: a stuck loop stops the pings."""
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
        due = [t.next_due for t in self.targets.targets.values()]
        if self.host is not None:
            due.append(now + self.policy.guard_interval(self.host))
        if self.victims or self.targets.busy:   # busy: a cmdline pass resumes (targets)
            due.append(now + self.config.daemon.min_interval)
        due.append(now + self.config.daemon.interval)
        if self.publisher.every:
            due.append(now + self.publisher.every)
        ping = self.notifier.ping_interval
        if ping:
            due.append(now + ping)
        timeout = max(0.0, min(due) - now)
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        if self.opts.command_pidfd >= 0 and not self.victims:  # once dead it stays readable
            poller.register(self.opts.command_pidfd, select.POLLIN)
        if self._psi_fd >= 0:
            poller.register(self._psi_fd, select.POLLPRI)
        for victim in self.victims.values():
            for fd in victim.pidfds:
                poller.register(fd, select.POLLIN)
        try:
            events = poller.poll(timeout * 1000.0)
        except InterruptedError:
            return
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

    # --------------------------------------------------------------- reload

    def reload(self) -> None:
        """SIGHUP: read and validate the config file; a bad one keeps the old one running."""
        self.reload_requested = False
        self.notifier.reloading()
        try:
            config = load_config(self.opts.config_path, insecure=self.opts.insecure, parse_in_child=True)
        except ConfigError as e:
            log(ERR, f"reload failed, keeping the running configuration: {e}")
            self.notifier.ready(self.status_line())
            return
        self.apply_config(config)
        log(INFO, f"reloaded {config.source}: {len(config.watches)} watch(es)")
        self.notifier.ready(self.status_line())

    def apply_config(self, config: Config) -> None:
        self._prepare_on_action(config)
        self.config = config
        for key in self.targets.reconfigure(config):
            self.policy.forget(key)
        self.policy.reconfigure(config)
        self.publisher.reconfigure(config)
        if (config.daemon.events or None) != self.events.path:
            self.events.close()
            self.events = report.EventLog(config.daemon.events or None)
        self._open_trace(config)

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
        """Re-check, write the record (fsync), then act. The record always comes first."""
        is_guard = decision.watch == "guard"
        target = None if is_guard else self.targets.targets.get(decision.key)
        if target is None and not is_guard:
            return
        fresh_usage = None if is_guard else self.targets.reread(decision.key)
        fresh_host = self.targets.host.read() if is_guard else self.host
        if not is_guard and fresh_usage is None:
            return  # it exited on its own meanwhile
        if not still_needed(decision, fresh_usage, fresh_host, self.config.guard):
            self.policy.back_off(decision.key, decision.watch)
            log(NOTICE, f"{decision.watch}: {self._describe(decision.key, target)} recovered "
                        f"before {decision.kind}; backing off")
            return
        usage = decision.usage if fresh_usage is None else fresh_usage
        if is_guard:
            victim = next((c for c in candidates if c.key == decision.key), None)
            pid, start = decision.key[1], decision.key[2]
            comm = victim.comm if victim else read_comm(pid)
            cgroup = victim.cgroup if victim else read_cgroup(pid)
            cmdline = read_cmdline(pid, os.path.join(self.opts.proc_root, "proc"))
            scope = "process"
        elif target.is_cgroup:
            pid, start, comm, cmdline, cgroup = None, None, target.comm, None, target.cgroup
            scope = "cgroup"
        else:
            pid, start, comm = target.pid, target.start_time, target.comm
            cmdline, cgroup, scope = target.cmdline, target.cgroup, target.watch.scope
        action = decision.kind if decision.kind != "signal" else \
            ("kill" if decision.signal == signal.SIGKILL else "term")
        record = report.decision_record(
            target=decision.watch, pid=pid, start_time=start, comm=comm, cmdline=cmdline,
            cgroup=cgroup, usage_bytes=usage, limit_bytes=decision.limit, reason=decision.reason,
            action=action, signal=decision.signal, dry_run=self.config.daemon.dry_run,
            **report.host_fields(fresh_host))
        record["scope"] = scope
        # the time-to-exhaustion estimate (issue 15), null without predict
        record["predict"] = self.policy.estimate_host() if is_guard else \
            self.policy.estimate(decision.key)
        self._record(record)
        what = f"{decision.watch}: {self._describe(decision.key, target)} at " \
               f"{_mib(usage)} (limit {_mib(decision.limit)}, {decision.reason})"
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
            actions.set_memory_high(cgroup_dir, decision.limit, self.targets.cgroup_fd(decision.key))
            log(WARNING, f"{what}: memory.high set to {_mib(decision.limit)}")
        elif decision.kind == "freeze":
            actions.set_frozen(cgroup_dir, True, self.targets.cgroup_fd(decision.key))
            log(WARNING, f"{what}: cgroup frozen")
        else:
            self._signal(decision, record, scope, pid, start, cgroup_dir, usage)
        if not is_guard and target.watch.on_action:
            env = actions.victim_env(target=decision.watch, pid=pid or "", comm=comm or "",
                                     cmdline=cmdline or "", cgroup=cgroup or "", usage=usage,
                                     limit=decision.limit, reason=decision.reason, action=action,
                                     event_id=record["id"])
            try:
                self.runner.start(target.watch.on_action, env, ON_ACTION_TIMEOUT)
            except (OSError, MemwatchdError) as e:
                log(ERR, f"{decision.watch}: on_action failed to start: {e}")

    def _signal(self, decision: Decision, record: dict, scope: str, pid, start, cgroup_dir: str,
                usage: int) -> None:
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
                actions.send_signal(fd, sig)
        except TargetGone:
            self._record(report.outcome_record(event_id=record["id"], exited=True,
                                               seconds_to_exit=0.0, freed_bytes=usage,
                                               escalated=False, detail="already gone"))
            self.policy.forget(decision.key)
            return
        now = self.clock()
        name = signal.Signals(sig).name
        log(WARNING, f"{decision.watch}: sent {name} to {self._describe(decision.key)} at "
                     f"{_mib(usage)} (limit {_mib(decision.limit)}, {decision.reason})")
        self.stopped_for_memory.append(record)
        if sig == signal.SIGKILL:
            for fd in pidfds:
                actions.release_memory(fd)
        victim = self.victims.get(decision.key)
        if victim is None:
            self.victims[decision.key] = Victim(decision.key, decision.watch, pidfds, usage,
                                                [record["id"]], now, cgroup_dir,
                                                description=self._describe(decision.key))
        else:
            victim.pidfds.extend(pidfds)
            victim.event_ids.append(record["id"])
            victim.last_signal_at = now
            victim.escalated = True

    def follow_victims(self, now: float, final: bool = False) -> None:
        """Write the outcome of every signalled target that died (or that we gave up on;
        with final, when memwatchd stops, every one: nothing signalled is left unrecorded)."""
        for key, victim in list(self.victims.items()):
            dead = all(actions.is_dead(fd) for fd in victim.pidfds)
            if not dead and not final and now - victim.last_signal_at < GIVE_UP_AFTER:
                continue
            freed = victim.usage_before if dead else None
            if victim.cgroup_dir and dead:
                try:
                    with open(os.path.join(victim.cgroup_dir, "memory.current")) as f:
                        freed = max(0, victim.usage_before - int(f.read()))
                except (OSError, ValueError):
                    pass
            for i, event_id in enumerate(victim.event_ids):
                self._record(report.outcome_record(
                    event_id=event_id, exited=dead,
                    seconds_to_exit=(now - victim.first_signal_at) if dead else None,
                    freed_bytes=freed, escalated=victim.escalated and i == 0,
                    detail="exited" if dead else "memwatchd stopped while it was still alive" if final
                    else f"still alive {GIVE_UP_AFTER:.0f}s after the last signal"))
            log(NOTICE if dead else ERR,
                f"{victim.name}: {victim.description} "
                + (f"exited {now - victim.first_signal_at:.3f}s after the first signal"
                   if dead else "did not exit"))
            if dead:
                self.publisher.victim_exited(now - victim.first_signal_at)
            _close_all(victim.pidfds)
            del self.victims[key]
            if dead:
                self.policy.forget(key)
                if not key[0] == "cgroup":
                    self.targets.drop(key)

    def _record(self, record: dict) -> None:
        """Append to the events file (fsync'ed). A failing disk must not stop protection:
        the error is logged and the action still happens."""
        try:
            self.events.append(record)
        except (OSError, ValueError, TypeError) as e:
            log(ERR, f"could not write the event record to {self.events.path}: {e}")
        self.publisher.on_record(record)
        if self.trace is not None:  # trace hook 2: decisions as recorded, and their outcomes
            self.trace.event(record)
        if self.opts.on_record is not None:
            self.opts.on_record(record)

    # ------------------------------------------------------------- helpers

    def _describe(self, key: tuple, target=None) -> str:
        if key[0] == "cgroup":
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
        return f"watching {len(self.targets.targets)} target(s){avail}, " \
               f"{self.actions_taken} action(s){last}"


def _mib(n: Optional[int]) -> str:
    return "?" if n is None or n < 0 else f"{n / 2**20:.1f} MiB"


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
