"""`memwatchd record`: sample like the daemon, act on nothing, write a trace.

It is the daemon's own loop (targets, sampler, policy) in dry run, with the events
file, state file, metrics and on_action programs off, and a trace.Recorder on one
file. What it records replays exactly as the daemon's own ring does.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from typing import Optional, Sequence

from memwatchd import report
from memwatchd.config import Config, MetricsConfig, load_config, parse_config
from memwatchd.types import MemwatchdError


def command_name(argv0: str) -> str:
    """A watch name from a command (its basename, cut to what a [[watch]] name allows)."""
    name = re.sub(r"[^A-Za-z0-9_.@:+-]", "_", os.path.basename(argv0))[:64].lstrip("_.@:+-")
    return name or "command"


def flags_config(*, pids: Sequence[int] = (), unit: Optional[str] = None,
                 cgroup: Optional[str] = None, command_pid: Optional[int] = None,
                 name: Optional[str] = None, limit: str = "100%", warn: Optional[str] = None,
                 action: str = "term", scope: Optional[str] = None, interval: str = "1s",
                 guard: bool = True, predict: Optional[str] = None) -> Config:
    """The config `record` uses without --config (validated like a config file)."""
    base = {"limit": limit, "action": action}
    if warn is not None:
        base["warn"] = warn
    if predict is not None:
        base["predict"] = predict
    if command_pid is not None:
        watches = [dict(base, name=name or "command", pid=command_pid, scope=scope or "tree")]
    elif pids:
        watches = [dict(base, name=f"pid-{p}", pid=p, scope=scope or "process") for p in pids]
    else:
        kind, value = ("unit", unit) if unit else ("cgroup", cgroup)
        watches = [dict(base, name=name or kind, **{kind: value})]
        if scope:
            watches[0]["scope"] = scope
    return parse_config({"daemon": {"interval": interval, "min_interval": "10ms"},
                         "guard": {"enabled": guard}, "watch": watches}, "command line")


def recording_config(config: Config) -> Config:
    """The config made harmless: dry run, no events/state/trace ring/metrics, no on_action."""
    daemon = config.daemon._replace(dry_run=True, events="", state="", trace="")
    watches = tuple(w._replace(on_action=()) for w in config.watches)
    return config._replace(daemon=daemon, watches=watches, metrics=MetricsConfig())


class Recording:
    """What `record` did: where, how long, how much."""

    def __init__(self, out: str, seconds: float, size: int, targets: int, exit_status: Optional[int]):
        self.out, self.seconds, self.size, self.targets = out, seconds, size, targets
        self.exit_status = exit_status


def record(out: str, *, config_path: Optional[str] = None, insecure: bool = False,
           pids: Sequence[int] = (), unit: Optional[str] = None, cgroup: Optional[str] = None,
           command: Sequence[str] = (), duration: Optional[float] = None, limit: str = "100%",
           warn: Optional[str] = None, interval: str = "1s", name: Optional[str] = None,
           guard: bool = True, predict: Optional[str] = None) -> Recording:
    """Record until --duration, Ctrl-C, the command's exit, or (for pids, unit, cgroup)
    every target being gone. Raises MemwatchdError (bad config, nothing to watch)."""
    from memwatchd import trace
    from memwatchd.daemon import Daemon, Options

    child = None
    if config_path is not None:
        cfg = load_config(config_path, insecure=insecure)
    elif command:
        try:
            child = subprocess.Popen(list(command))
        except OSError as e:
            raise MemwatchdError(f"cannot start {command[0]!r}: {e.strerror}") from None
        cfg = flags_config(command_pid=child.pid, name=name or command_name(command[0]),
                           limit=limit, warn=warn, interval=interval, guard=guard, predict=predict)
    else:
        cfg = flags_config(pids=pids, unit=unit, cgroup=cgroup, name=name, limit=limit, warn=warn,
                           interval=interval, guard=guard, predict=predict)
    cfg = recording_config(cfg)
    opts = Options(exit_when_idle=config_path is None and child is None, psi_trigger=False,
                   lock_memory=False)
    if child is not None:
        opts.command_pidfd = os.pidfd_open(child.pid)
    started = time.monotonic()
    try:
        daemon = Daemon(cfg, opts)
        recorder = daemon.trace = trace.Recorder(trace.FileSink(out), cfg, daemon)
        old = signal.getsignal(signal.SIGALRM)
        if duration:
            signal.signal(signal.SIGALRM, lambda *_: setattr(daemon, "stopping", True))
            signal.setitimer(signal.ITIMER_REAL, duration)
        try:
            report.set_level(report.NOTICE)
            daemon.run()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    except BaseException:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        raise
    # --duration may end the recording first: the command goes on (it is not ours to stop)
    status = child.poll() if child is not None else None
    try:
        size = os.stat(out).st_size
    except OSError:
        size = 0
    return Recording(out, time.monotonic() - started, size, recorder.next_id - 1, status)
