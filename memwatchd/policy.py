"""The policy stage: pure decisions over one tick's readings.

No I/O and no clock of its own: every function takes the time and the
readings as arguments, so the whole ladder (warn, sustain, SIGTERM, grace,
escalation, SIGKILL, cooldown) and the host guard are tested with plain
records. The daemon executes what comes out, after a fresh re-read
(``still_needed``), the way earlyoom re-checks before it kills.
"""
from __future__ import annotations

import signal
from collections import deque, namedtuple
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from memwatchd.config import Config, GuardConfig, WatchConfig
from memwatchd.predict import ALL_GATES, HOST_FLOOR, Trend
from memwatchd.types import NO_ZRAM, Candidate, HostSample, Reading, SwapDevices

ESCALATE_FACTOR = 1.25   # during the grace period, SIGKILL at once past limit * this
WARN_REARM = 0.9         # a warning re-arms once usage falls below warn * this
UNKILLABLE_AFTER = 10.0  # seconds after SIGKILL before the guard gives up on a victim
ZRAM_COST_EMPTY = 0.5    # RAM a page swapped to an empty zram device is assumed to cost (2:1)
PSI_MIN_SPAN = 1.0       # seconds of pressure history needed before pressure can fire
PSI_STEP = 0.05          # pressure history keeps at most one sample per this many seconds
PSI_INTERVAL = 0.25      # sampling period while pressure builds with memory low
GUARD_FASTER = 5         # near its floor the guard samples this many times per min_interval
RESTING_MAX = 4096       # cooldowns kept for forgotten targets (the daemon's memory is locked)
PREDICT_SAMPLES = 50     # a predicted exhaustion is sampled at least this often before it
ANYONE_THRASH = 2        # refaults at this many times psi_refaults are a thrash whoever faults
OWN_SPAN = 0.5           # seconds of the largest process's own major faults to attribute a thrash
OWN_SHARE = 0.5          # ...which must be this fraction of its share of the RSS, or more
IO_REFAULTS = 16         # an I/O stall counts with refaults at psi_refaults / this, or more
SWAP_FILLING = 2**20     # bytes/s of swap newly used: an I/O stall is then whoever fills it

# Reasons recorded with every decision (kept stable: they are in the events file).
REASON_WARN = "warn-level"
REASON_LIMIT = "over-limit"
REASON_ESCALATE = "over-limit-escalated"
REASON_GRACE = "grace-expired"
REASON_GUARD_LOW = "mem-available-low"
REASON_GUARD_CRITICAL = "mem-available-critical"
REASON_GUARD_PSI = "psi-full-high"
REASON_GUARD_PSI_SOME = "psi-some-high"
REASON_GUARD_PSI_CRITICAL = "psi-full-critical"
REASON_GUARD_PSI_IO = "psi-io-full-high"
PSI_REASONS = (REASON_GUARD_PSI, REASON_GUARD_PSI_SOME, REASON_GUARD_PSI_CRITICAL,
               REASON_GUARD_PSI_IO)
REASON_PREDICT = "predicted-exhaustion"


GUARD = "guard"  # the ``watch`` of the host guard's decisions (its records' "target")


class Decision(namedtuple("Decision", "kind key watch reason usage limit signal by_guard",
                          defaults=(None, False))):
    """Something the daemon should do now.

    kind: "warn", "signal", "throttle" or "freeze". For "signal", ``signal`` is
    SIGTERM or SIGKILL. ``key`` is the target's key (for the guard, the key of
    the victim it chose); usage and limit in bytes. ``by_guard`` says that the
    host guard decided it: the guard is known by this field, never by a name,
    since a [[watch]] chooses its own name.
    """

    __slots__ = ()


class TargetState:
    """What the policy remembers about one target between ticks."""

    __slots__ = ("over_since", "warned", "stage", "term_at", "cooldown_until")

    def __init__(self) -> None:
        self.over_since: Optional[float] = None
        self.warned = False
        self.stage = "idle"          # idle | terminating | killed | throttled | freezing | acted
        self.term_at = 0.0
        self.cooldown_until = 0.0


class GuardState:
    """What the policy remembers about the host guard: its current victim and timers,
    and the pressure totals of the last psi_window seconds (emptied at every action,
    so pressure fires again only if it is measured high after the last one)."""

    __slots__ = ("victim", "term_at", "killed", "cooldown_until", "pressure", "suspect",
                 "suspect_next", "judged_at")

    def __init__(self) -> None:
        self.victim: Optional[Candidate] = None
        self.term_at = 0.0
        self.killed = False
        self.cooldown_until = 0.0
        # (time, some_total_us, full_total_us, refaults, io_full_us, swap used)
        self.pressure: deque = deque()
        # (key, time, its major faults, the host's) of the process a pressure trigger would
        # stop, one per OWN_SPAN while pressure is high (refaults or not), the last ones
        # kept: when pages start coming back, its own share of them is known at once
        self.suspect: deque = deque()
        self.suspect_next = 0.0   # no /proc scan for it before this time (one per OWN_SPAN)
        self.judged_at = -1e9     # when its faults last said "not its thrash"


def is_quiet(r: Reading, state: Optional[TargetState]) -> bool:
    """True when _evaluate_one would neither decide nor change anything: usage below
    the warn level (if any) and the limit, with no crossing, warning or action pending.

    The trace recorder and replay rely on it too: a quiet target whose reading does not
    change stays quiet, so neither needs to write or re-evaluate it."""
    if r.usage >= r.limit or (r.warn is not None and r.usage >= r.warn):
        return False
    return state is None or (state.stage == "idle" and state.over_since is None
                             and not state.warned)


def next_interval(headroom: int, fill_rate: int, min_interval: float, max_interval: float) -> float:
    """Time until this headroom could be used up at the worst-case fill rate, clamped.

    Far from a limit that is the slow interval (about once a second); close to
    one it is min_interval (10 ms by default).
    """
    if headroom <= 0:
        return min_interval
    return max(min_interval, min(max_interval, headroom / fill_rate))


def swap_headroom(swap_free: int, zram: SwapDevices = NO_ZRAM) -> int:
    """Free swap at its worth in RAM. Disk swap counts in full; a page swapped to zram
    frees a page but costs its compressed size (mm_stat mem_used_total over
    orig_data_size; 2:1 while the device is empty), so zram counts the difference."""
    on_zram = min(max(0, zram.zram_free), max(0, swap_free))
    cost = zram.zram_ram / zram.zram_orig if zram.zram_orig > 0 else ZRAM_COST_EMPTY
    return max(0, swap_free) - on_zram + int(on_zram * max(0.0, 1.0 - min(cost, 1.0)))


def headroom(guard: GuardConfig, host: HostSample, zram: SwapDevices = NO_ZRAM) -> int:
    """What can still be allocated before the OOM killer: MemAvailable plus, with
    count_swap, free swap at its worth (read from every sample: swapon and swapoff
    at run time count at once)."""
    room = host.mem_available
    if guard.count_swap and host.swap_total > 0 and host.swap_free > 0:
        room += swap_headroom(host.swap_free, zram)
    return room


def held_twice(guard: GuardConfig, host: HostSample) -> int:
    """Bytes headroom() counts as used twice, with count_swap: SwapCached pages hold a
    swap slot (SwapFree fell) and their RAM (not in MemAvailable) at once. A page being
    written to swap is in both until written and dropped, so while a swap-out burst lasts
    (a cold job's pages pushed out at 100 MiB/s) RAM + swap used grows faster than
    anything allocates; the host trend subtracts it (at most the swap used)."""
    if not guard.count_swap or not host.swap_cached or host.swap_total <= 0:
        return 0
    return max(0, min(host.swap_cached, host.swap_total - host.swap_free))


def pressure_gate(guard: GuardConfig, host: HostSample) -> bool:
    """Pressure counts only while MemAvailable is under psi_available: a stall with
    RAM to spare is not the host running out (a cgroup at its own memory.max stalls
    the host's PSI too), and a kill that freed memory closes the gate."""
    return 0 <= host.mem_available < guard.psi_available.resolve(host.mem_total)


def pressure_share(history: Sequence[tuple]) -> Optional[Tuple[float, float, Optional[float],
                                                                Optional[float], Optional[float]]]:
    """(some %, full %, refaults, io full %, swap filling) over the history kept (entries:
    time, some and full totals in µs, refaulted bytes or None, the I/O full total in µs or
    None, swap used in bytes), None while it spans less than PSI_MIN_SPAN (just started,
    or just acted). refaults: bytes/s brought back in over the same span; io full: the
    share of it all tasks waited for I/O; swap filling: bytes/s of swap newly used (0
    while it empties); each None unless both ends have the counter."""
    if len(history) < 2:
        return None
    first, last = history[0], history[-1]
    span = last[0] - first[0]
    if span < PSI_MIN_SPAN:
        return None

    def rate(i, scale):
        a, b = (first[i], last[i]) if len(first) > i and len(last) > i else (None, None)
        return max(0.0, (b - a) / (span * scale)) if a is not None and b is not None else None
    return rate(1, 1e4), rate(2, 1e4), rate(3, 1), rate(4, 1e4), rate(5, 1)


def thrashing(guard: GuardConfig, share: Sequence) -> bool:
    """Pressure is a stall to act on only while what reclaim evicts comes back: swap-ins
    and file refaults at psi_refaults bytes/s or more. Reclaim of cold pages (a job whose
    untouched pages go to swap: 0-600 refaults/s in the guest while PSI full read
    15-65%, the heartbeat never paused 0.5 s) stalls the allocating task, which is all
    "full" needs when it is the only one running, not the host. Without the counter
    (not read, old kernel) or with psi_refaults = 0, pressure alone decides."""
    refaults = share[2] if len(share) > 2 else None
    return guard.psi_refaults <= 0 or refaults is None or refaults >= guard.psi_refaults


def io_stalled(guard: GuardConfig, share: Sequence) -> bool:
    """Every task waited for I/O for psi_io_full of the window while pages came back (at
    psi_refaults / IO_REFAULTS or more): a swap device too slow for the swap-ins.
    The kernel (6.1) counts a swap-in as a memory stall only for a page it knew to be
    in the working set; waiting for the others' is I/O wait. On a slow swap device
    (measured in the guest: swap-outs at 1-3 MiB/s) the host froze for 17 s with PSI
    memory at 2-7% and 0.6 MiB/s coming back, under psi_full and psi_refaults. Reads
    and writes alone (a backup beside a big job) bring nothing back."""
    io = share[3] if len(share) > 3 else None
    refaults = share[2] if len(share) > 2 else None
    return (guard.psi_io_full > 0 and io is not None and io >= guard.psi_io_full
            and (refaults is None or refaults >= guard.psi_refaults / IO_REFAULTS))


def fills_swap(reason: str, share: Sequence) -> bool:
    """An I/O stall while swap fills (SWAP_FILLING or more) is the cause of whoever grows,
    whoever's pages come back: a swap device too slow for the swap-outs. Measured on a
    swap disk at 4 MiB/s: the leak's own pages stayed in RAM (its major faults 0-2/s;
    anonymous pages wait for the disk, so reclaim took the others' clean file pages, which
    came back at 1-4 MiB/s), so own_thrash never named it while the guest froze for 60 s.
    A cold-page job on a fast device fills swap too, but all tasks wait for I/O 1% of the
    time there, not psi_io_full; and a disk busy without swap filling keeps the rule."""
    fill = share[4] if len(share) > 4 else None
    return reason == REASON_GUARD_PSI_IO and fill is not None and fill >= SWAP_FILLING


def own_thrash(guard: GuardConfig, share: Sequence, victim: Candidate, since: Optional[tuple],
               host: HostSample, total_rss: int, now: float) -> Optional[bool]:
    """Whether a pressure trigger may stop ``victim``: True, False, or None (not known
    yet: measure its faults from now, ``since`` = (key, time, its major faults, the
    host's) taken OWN_SPAN earlier).

    A hot leak's own pages come back (it keeps touching what went to swap); a job
    whose cold pages go to swap pushes the *others'* pages out, and theirs come back
    (measured in the guest: 4.4-5.0 MiB/s, the rate a hot leak shows when the guard must
    act, while the cold job had 0% of the host's major faults; a hot leak 56-97%). So below
    ANYONE_THRASH x psi_refaults the largest process is a thrash's cause only if its
    share of the host's major faults is at least OWN_SHARE of its share of the RSS
    (ten equal workers that fault alike each qualify). Above it (a page-cache thrash:
    12-104 MiB/s of file refaults, none of them the hog's), or where the counters are
    unknown (an old kernel, a replayed trace), pressure and refaults decide alone."""
    refaults = share[2] if len(share) > 2 else None
    if (guard.psi_refaults <= 0 or refaults is None
            or refaults >= ANYONE_THRASH * guard.psi_refaults
            or victim.major_faults < 0 or host.major_faults is None):
        return True
    if since is None or since[0] != victim.key or now - since[1] < OWN_SPAN:
        return None
    own, everyone = victim.major_faults - since[2], host.major_faults - since[3]
    if everyone <= 0:
        return False
    return own / everyone >= OWN_SHARE * victim.rss / max(victim.rss, total_rss)


def guard_level(guard: GuardConfig, host: HostSample, zram: SwapDevices = NO_ZRAM,
                share: Optional[Tuple[float, float]] = None) -> Tuple[Optional[str], str]:
    """("term" | "kill" | None, reason) for the host as sampled.

    Headroom (MemAvailable plus free swap at its worth) under kill_available or
    min_available; else, with MemAvailable under psi_available, the stall share
    measured since the last action (``share``, see pressure_share) at psi_full_kill,
    psi_full or psi_some, while evicted pages come back at psi_refaults (see thrashing),
    or the I/O stall share at psi_io_full while some come back (see io_stalled).
    """
    if not guard.enabled or host.mem_total <= 0 or host.mem_available < 0:
        return None, ""
    term_below, kill_below = guard.thresholds(host.mem_total)
    room = headroom(guard, host, zram)
    if room < kill_below:
        return "kill", REASON_GUARD_CRITICAL
    if room < term_below:
        return "term", REASON_GUARD_LOW
    if share is not None and pressure_gate(guard, host):
        some, full = share[0], share[1]
        if thrashing(guard, share):
            if guard.psi_full_kill > 0 and full >= guard.psi_full_kill:
                return "kill", REASON_GUARD_PSI_CRITICAL
            if guard.psi_full > 0 and full >= guard.psi_full:
                return "term", REASON_GUARD_PSI
            if guard.psi_some > 0 and some >= guard.psi_some:
                return "term", REASON_GUARD_PSI_SOME
        if io_stalled(guard, share):
            return "term", REASON_GUARD_PSI_IO
    return None, ""


def is_protected(candidate: Candidate, protect_names: Iterable[str],
                 protect_cgroups: Iterable[str]) -> bool:
    """A process inside (or below) a protected cgroup, or one with a protected comm name
    that its owner could not have forged: a name counts only for a process running as
    root (real uid 0; a setuid program run by a user keeps the user's) from a root-owned
    executable that nobody else may write, or whose executable memwatchd may not
    inspect (exe_root_owned None: uid 0 alone decides then). Any user can name a
    process "sshd"; only root can start such a one."""
    import fnmatch
    if (candidate.comm in protect_names and candidate.uid == 0
            and candidate.exe_root_owned is not False):
        return True
    for pattern in protect_cgroups:
        if (candidate.cgroup == pattern or candidate.cgroup.startswith(pattern.rstrip("/") + "/")
                or fnmatch.fnmatchcase(candidate.cgroup, pattern)):
            return True
    return False


def choose_victim(candidates: Sequence[Candidate], config: Config,
                  never: Iterable[int] = ()) -> Optional[Candidate]:
    """The largest eligible process: not PID 1, not memwatchd or its ancestors
    (``never``), not protected, not a kernel thread (rss 0)."""
    excluded = set(never) | {1}
    eligible = [c for c in candidates
                if c.pid not in excluded and c.rss > 0
                and not is_protected(c, config.protect.names, config.protect.cgroups)]
    return max(eligible, key=lambda c: c.rss, default=None)


class Policy:
    """Keeps per-target state across ticks and turns readings into decisions."""

    def __init__(self, config: Config):
        self.config = config
        self.watches: Dict[str, WatchConfig] = {w.name: w for w in config.watches}
        self.states: Dict[tuple, TargetState] = {}
        self.resting: Dict[tuple, float] = {}   # key -> cooldown_until, kept across forget()
        self.failed: List[tuple] = []   # (watch name, exception) from a bug: the daemon quarantines
        self.guard = GuardState()
        self.zram = NO_ZRAM   # the daemon hands in the latest swapinfo reading
        self.trends: Dict[tuple, Trend] = {}      # key -> Trend, for watches with predict
        self.host_trend = Trend()                 # [guard] predict: the host's used memory
        self.host_capacity = None                 # what host_trend's readings are counted from
        self.guard_predicted = None               # the time the host's trend last fired
        self.predict_gates = ALL_GATES            # the benchmark switches gates off one by one
        self.predicting = {w.name: w.predict for w in config.watches if w.predict > 0}

    def reconfigure(self, config: Config) -> None:
        """A reload keeps each surviving target's state (a pending SIGTERM stays pending)."""
        self.config = config
        self.watches = {w.name: w for w in config.watches}
        predicting = {w.name: w.predict for w in config.watches if w.predict > 0}
        if predicting != self.predicting:   # a horizon changed or went: trends start afresh
            self.trends.clear()
        self.predicting = predicting

    def forget(self, key: tuple) -> None:
        """The target is gone: drop its state (a new match starts fresh), but not its
        cooldown: a cgroup emptied by a kill and re-created, or re-matched, under the same
        key must not be acted on again before the cooldown says so."""
        state = self.states.pop(key, None)
        self.trends.pop(key, None)
        if state is not None and state.cooldown_until > 0:
            self.resting[key] = state.cooldown_until
        if self.guard.victim is not None and self.guard.victim.key == key:
            self.guard.victim = None
            self.guard.killed = False

    def _state(self, key: tuple, now: float) -> TargetState:
        state = self.states[key] = TargetState()
        until = self.resting.pop(key, 0.0)
        if until > now:
            state.cooldown_until = until
        if len(self.resting) > RESTING_MAX:   # bounded: drop what has expired, then the oldest
            self.resting = {k: t for k, t in self.resting.items() if t > now}
            while len(self.resting) > RESTING_MAX:
                del self.resting[next(iter(self.resting))]
        return state

    def back_off(self, key: tuple, by_guard: bool = False) -> None:
        """The re-check before acting found the situation recovered: undo the step
        (of the guard if by_guard, else of the watched target ``key``)."""
        if by_guard:
            self.guard.victim = None
            self.guard.killed = False
            return
        state = self.states.get(key)
        if state is not None:
            state.stage, state.over_since, state.cooldown_until = "idle", None, 0.0

    def settle(self, key: tuple) -> None:
        """What was done to this target is over (its victims died, memwatchd gave up
        waiting, an operator thawed it or reset memory.high, or there was nothing to
        stop): the ladder starts again from idle; the cooldown runs on."""
        state = self.states.get(key)
        if state is not None:
            state.stage, state.over_since = "idle", None

    def stage(self, key: tuple) -> str:
        state = self.states.get(key)
        return "idle" if state is None else state.stage

    # ---------------------------------------------------------------- watches

    def evaluate(self, now: float, readings: Sequence[Reading],
                 host: Optional[HostSample] = None) -> List[Decision]:
        """Decisions for this tick's watched targets."""
        critical = host is not None and guard_level(self.config.guard, host)[0] == "kill"
        decisions: List[Decision] = []
        states = self.states
        predicting = self.predicting
        for reading in readings:
            state = states.get(reading.key)
            if predicting and reading.watch in predicting:   # -- predictive trigger (issue 15)
                try:
                    decision = self._predict(now, reading, state, predicting[reading.watch])
                except Exception as e:   # a bug: contained to this watch, like the ladder's
                    self.failed.append((reading.watch, e))
                    decision = None
                if decision is not None:
                    decisions.append(decision)
                    continue
                state = states.get(reading.key)            # -- end of the predictive trigger
            if is_quiet(reading, state):
                continue  # most targets on most ticks: below every threshold, nothing pending
            watch = self.watches.get(reading.watch)
            if watch is None:
                continue
            if state is None:
                state = self._state(reading.key, now)
            try:
                decisions.extend(self._evaluate_one(now, reading, watch, state, critical))
            except Exception as e:   # a bug: contained to this watch, never the whole tick
                self.failed.append((reading.watch, e))
        return decisions

    def _evaluate_one(self, now: float, r: Reading, watch: WatchConfig, state: TargetState,
                      host_critical: bool) -> List[Decision]:
        out: List[Decision] = []

        def decide(kind, reason, sig=None):
            out.append(Decision(kind, r.key, r.watch, reason, r.usage, r.limit, sig))

        if r.warn is not None:
            if r.usage >= r.warn and not state.warned and r.usage < r.limit:
                state.warned = True
                decide("warn", REASON_WARN)
            elif r.usage < r.warn * WARN_REARM:
                state.warned = False

        if state.stage == "terminating":
            if r.usage >= r.limit * ESCALATE_FACTOR or host_critical:
                state.stage = "killed"
                decide("signal", REASON_ESCALATE, signal.SIGKILL)
            elif now - state.term_at >= watch.grace:
                if r.usage >= r.limit:
                    state.stage = "killed"
                    decide("signal", REASON_GRACE, signal.SIGKILL)
                else:  # it shrank below its limit after SIGTERM: back off (cooldown runs on)
                    state.stage = "idle"
                    state.over_since = None
            return out
        if state.stage in ("killed", "throttled", "freezing"):
            if r.usage < r.limit and state.stage != "killed":
                # memory.high stays, a frozen cgroup stays frozen: a new crossing acts again
                state.stage, state.over_since = "idle", None
            return out

        if r.usage < r.limit:
            state.over_since = None
            if state.stage == "acted":
                state.stage = "idle"
            return out
        if state.over_since is None:
            state.over_since = now
        if now - state.over_since < watch.sustain or now < state.cooldown_until:
            return out
        if state.stage == "acted":
            return out  # "warn" action: once per crossing
        state.cooldown_until = now + self.config.daemon.cooldown
        if watch.action == "warn":
            state.stage = "acted"
            decide("warn", REASON_LIMIT)
        elif watch.action == "term":
            state.stage = "terminating"
            state.term_at = now
            decide("signal", REASON_LIMIT, signal.SIGTERM)
        elif watch.action == "kill":
            state.stage = "killed"
            decide("signal", REASON_LIMIT, signal.SIGKILL)
        elif watch.action == "throttle":
            state.stage = "throttled"
            decide("throttle", REASON_LIMIT)
        elif watch.action == "freeze":
            state.stage = "freezing"
            decide("freeze", REASON_LIMIT)
        return out

    def _predict(self, now: float, r: Reading, state: Optional[TargetState],
                 horizon: float) -> Optional[Decision]:
        """The predictive trigger: feed the target's trend; when its gates say so (see
        memwatchd/predict.py) and nothing else is under way (below the limit: the hard
        path has it above; no action in flight, no cooldown), take the gentle rung of
        the watch's action: SIGTERM for term, memory.high for throttle, a warning for
        warn, kill and freeze."""
        trend = self.trends.get(r.key)
        if trend is None:
            trend = self.trends[r.key] = Trend()
        value = r.usage if r.unreclaimable is None else r.unreclaimable
        if not trend.update(now, value, r.limit, horizon, r.ceiling, self.predict_gates):
            return None
        if r.usage >= r.limit or (state is not None and state.stage != "idle"):
            return None
        if state is None:
            state = self._state(r.key, now)   # (a cooldown kept across forget() applies)
        if now < state.cooldown_until:
            return None
        action = self.watches[r.watch].action
        state.cooldown_until = now + self.config.daemon.cooldown
        if action == "term":
            state.stage, state.term_at = "terminating", now
            return Decision("signal", r.key, r.watch, REASON_PREDICT, r.usage, r.limit, signal.SIGTERM)
        if action == "throttle":
            state.stage = "throttled"
            return Decision("throttle", r.key, r.watch, REASON_PREDICT, r.usage, r.limit)
        return Decision("warn", r.key, r.watch, REASON_PREDICT, r.usage, r.limit)

    def quiet(self, r: Reading) -> bool:
        """is_quiet, and no trend to feed: replay and the recorder may skip this reading."""
        return is_quiet(r, self.states.get(r.key)) and not (self.predicting
                                                            and r.watch in self.predicting)

    def estimate(self, key: tuple) -> Optional[dict]:
        """The target's last time-to-exhaustion estimate for records, status and metrics
        (None without predict or before three readings)."""
        trend = self.trends.get(key)
        return _estimate_dict(trend.estimate) if trend is not None else None

    def quiet_below(self, reading: Reading) -> Optional[int]:
        """The usage this target's readings stay quiet below (is_quiet: no decision, no
        state change) while its next look is interval_for's plain headroom / fill_rate
        schedule; None while the policy must see every reading (a warning, crossing or
        action pending, a trend to feed). Below it the sampler may keep the target's
        schedule itself (ProcessTable.schedule) and hands it back at the first reading
        at or above it: the only decision taken outside the policy, on its ceiling."""
        if not self.quiet(reading) or (self.trends and reading.key in self.trends):
            return None
        return reading.limit if reading.warn is None else min(reading.limit, reading.warn)

    def interval_for(self, reading: Reading) -> float:
        """When this target should next be sampled (seconds from now)."""
        d = self.config.daemon
        state = self.states.get(reading.key)
        if state is not None and state.stage == "terminating":
            return d.min_interval  # watch closely during the grace period
        wait = next_interval(reading.limit - reading.usage, d.fill_rate, d.min_interval, d.interval)
        trend = self.trends.get(reading.key) if self.trends else None
        if trend is not None and trend.estimate is not None:   # predictive trigger: resolve
            wait = max(d.min_interval, min(wait, trend.estimate[0] / PREDICT_SAMPLES))  # its fall
        return wait

    # ------------------------------------------------------------------ guard

    def guard_interval(self, host: HostSample) -> float:
        d, g = self.config.daemon, self.config.guard
        if not g.enabled or host.mem_total <= 0:
            return d.interval
        if self.guard.victim is not None:
            return d.min_interval
        term_below, _ = g.thresholds(host.mem_total)
        # One host read is a pread of /proc/meminfo: near the floor the guard samples
        # GUARD_FASTER times as often as min_interval (only within fill_rate x
        # min_interval of it: 40 MiB with the defaults).
        wait = next_interval(headroom(g, host, self.zram) - term_below, d.fill_rate,
                             max(0.001, d.min_interval / GUARD_FASTER), d.interval)
        share = pressure_share(self.guard.pressure)
        if share is not None and (share[0] > 0 or (share[3] or 0) > 0) and pressure_gate(g, host):
            wait = min(wait, max(d.min_interval, PSI_INTERVAL))  # pressure building: look closer
        e = self.host_trend.estimate if g.predict > 0 else None
        if e is not None:   # predictive trigger: resolve the predicted fall (never slower than
            wait = min(wait, max(d.min_interval, e[0] / PREDICT_SAMPLES))   # without it)
        return wait

    def guard_observe(self, now: float, host: HostSample) -> Optional[Tuple[float, float]]:
        """Add this sample's PSI totals to the pressure history (at most one per
        PSI_STEP, psi_window seconds kept); return the stall share over it. The
        history is kept only while the pressure gate is open (MemAvailable under
        psi_available): stalls with RAM to spare never add up to a kill later."""
        hist, p = self.guard.pressure, host.pressure
        if p is None or not pressure_gate(self.config.guard, host):
            hist.clear()
            self.guard.suspect.clear()
            return None
        if not hist or now - hist[-1][0] >= PSI_STEP:
            hist.append((now, p.some_total_us, p.full_total_us, host.refaults, host.io_full_us,
                         host.swap_total - host.swap_free))
        window = self.config.guard.psi_window
        while len(hist) > 2 and now - hist[1][0] >= window:
            hist.popleft()
        return pressure_share(hist)

    def guard_level_now(self, now: float, host: HostSample) -> Tuple[Optional[str], str]:
        return guard_level(self.config.guard, host, self.zram, self.guard_observe(now, host))

    def guard_wants_victim(self, now: float, host: HostSample) -> bool:
        """True when the guard fires and has no victim in flight: the daemon should
        list candidates and call ``guard_evaluate``."""
        level, reason = self.guard_level_now(now, host)
        if level is None and self.config.guard.enabled and self.config.guard.predict > 0:  # issue 15
            level = self._predict_host(now, host)
        st = self.guard
        if st.victim is not None:
            return False
        if level is None:   # pressure high without pages coming back: keep the suspect's faults
            return (host.major_faults is not None and now >= st.suspect_next
                    and now >= st.cooldown_until and self._pressure_high(host))
        if self._weighs_own_faults(reason):   # one /proc scan per OWN_SPAN until they can tell
            ready = bool(st.suspect) and now - st.suspect[0][1] >= OWN_SPAN
            if (not ready and st.suspect and now < st.suspect_next) or now - st.judged_at < OWN_SPAN:
                return False
        return level == "kill" or now >= st.cooldown_until

    def _weighs_own_faults(self, reason: str) -> bool:
        """A pressure trigger stops the largest process only if its own pages come back
        (own_thrash), except an I/O stall while swap fills (fills_swap)."""
        share = pressure_share(self.guard.pressure) or ()
        return reason in PSI_REASONS and not fills_swap(reason, share)

    def _pressure_high(self, host: HostSample) -> bool:
        """Pressure at a trigger's level whether or not pages come back (the refault rule
        aside): while it lasts the suspect's faults are kept (one scan per OWN_SPAN)."""
        share = pressure_share(self.guard.pressure)
        return share is not None and guard_level(
            self.config.guard._replace(psi_refaults=0), host, self.zram, share)[1] in PSI_REASONS

    def _note_suspect(self, now: float, host: HostSample, victim: Optional[Candidate]) -> None:
        st = self.guard
        if victim is None or victim.major_faults < 0 or host.major_faults is None:
            return
        if st.suspect and st.suspect[-1][0] != victim.key:
            st.suspect.clear()   # another process is the largest now: measure it afresh
        st.suspect.append((victim.key, now, victim.major_faults, host.major_faults))
        while len(st.suspect) > 1 and now - st.suspect[1][1] >= OWN_SPAN:
            st.suspect.popleft()   # the newest OWN_SPAN old or more is all own_thrash needs
        st.suspect_next = now + OWN_SPAN

    def _victim_thrashes(self, now: float, host: HostSample, victim: Candidate,
                         candidates: Sequence[Candidate]) -> bool:
        """own_thrash over the suspect's faults kept since pressure rose: the victim's
        share of the host's major faults since the newest of them OWN_SPAN old or more."""
        st = self.guard
        since = next((b for b in reversed(st.suspect) if now - b[1] >= OWN_SPAN), None)
        own = own_thrash(self.config.guard, pressure_share(st.pressure) or (), victim, since,
                         host, sum(c.rss for c in candidates), now)
        self._note_suspect(now, host, victim)
        if own is False:
            st.judged_at = now
        return own is True

    def _predict_host(self, now: float, host: HostSample) -> Optional[str]:
        """Feed the host's trend with what is used of what the guard counts (RAM, plus
        swap with count_swap), i.e. capacity minus headroom() - the guard's own measure,
        free swap at its worth - towards the level where min_available fires; soft
        floor: headroom under HOST_FLOOR times it. A new capacity (swapon, swapoff,
        count_swap reloaded, memory hot-plugged) starts the trend afresh: its readings
        would jump, not grow. Pages in the swap cache are used once, not twice
        (held_twice): a burst of swap-out would otherwise look like a fast leak. "term"
        when it fires with no victim in flight: guard_evaluate then SIGTERMs the largest eligible process (the gentle rung only;
        never a SIGKILL)."""
        if host.mem_total <= 0 or host.mem_available < 0:
            return None
        g = self.config.guard
        term_below, _ = g.thresholds(host.mem_total)
        capacity = host.mem_total + (max(0, host.swap_total) if g.count_swap else 0)
        if capacity != self.host_capacity:
            self.host_trend, self.host_capacity = Trend(), capacity
        used = capacity - headroom(g, host, self.zram) - held_twice(g, host)
        if self.host_trend.update(now, used, capacity - term_below, g.predict,
                                  None, self.predict_gates, capacity - HOST_FLOOR * term_below) \
                and self.guard.victim is None and now >= self.guard.cooldown_until:
            self.guard_predicted = now
        return "term" if self.guard_predicted == now else None

    def estimate_host(self) -> Optional[dict]:
        """The host's time-to-exhaustion estimate ([guard] predict), as estimate() gives."""
        return _estimate_dict(self.host_trend.estimate) if self.config.guard.predict > 0 else None

    def guard_evaluate(self, now: float, host: HostSample,
                       candidates: Sequence[Candidate] = (), never: Iterable[int] = ()
                       ) -> List[Decision]:
        """The host guard's ladder over one tick.

        With no victim in flight, pick the largest eligible candidate: SIGTERM,
        or SIGKILL at once below kill_available. With one in flight, SIGKILL it
        after the guard's grace, or at once if the host falls to the kill level;
        back off if the host recovered.
        """
        g = self.config.guard
        level, reason = self.guard_level_now(now, host)
        if level is None and self.guard_predicted == now and self.guard.victim is None:
            level, reason = "term", REASON_PREDICT   # the host's trend fired (guard_wants_victim)
        st = self.guard
        term_below, _ = g.thresholds(host.mem_total) if host.mem_total > 0 else (0, 0)
        if st.victim is not None:
            if st.killed:
                if now - st.term_at > g.grace + UNKILLABLE_AFTER:
                    st.victim = None  # SIGKILL did not end it (stuck in D state?): choose again
                return []
            v = st.victim
            if level == "kill" or (level is not None and now - st.term_at >= g.grace):
                st.killed = True
                st.pressure.clear()
                why = reason if level == "kill" else REASON_GRACE
                return [Decision("signal", v.key, GUARD, why, v.rss, term_below, signal.SIGKILL, True)]
            if level is None and now - st.term_at >= g.grace:
                st.victim = None  # the host recovered and the victim lives: leave it be
            return []
        if level is None and candidates and now >= st.cooldown_until:
            self._note_suspect(now, host, choose_victim(candidates, self.config, never))
        if level is None or not (level == "kill" or now >= st.cooldown_until):
            return []
        victim = choose_victim(candidates, self.config, never)
        if victim is None:
            return []
        if (self._weighs_own_faults(reason)
                and not self._victim_thrashes(now, host, victim, candidates)):
            return []
        st.suspect.clear()
        st.victim, st.term_at = victim, now
        st.killed = level == "kill"
        st.pressure.clear()   # pressure must be measured high again, after this action
        st.cooldown_until = now + self.config.daemon.cooldown
        sig = signal.SIGKILL if level == "kill" else signal.SIGTERM
        return [Decision("signal", victim.key, GUARD, reason, victim.rss, term_below, sig, True)]


def _estimate_dict(e) -> Optional[dict]:
    if e is None:
        return None
    return {"seconds_left": None if e[0] == float("inf") else round(e[0], 3),
            "slope_bytes_per_s": int(e[1]), "slope_upper_bytes_per_s": int(e[2])}


def still_needed(decision: Decision, fresh_usage: Optional[int],
                 fresh_host: Optional[HostSample], guard: GuardConfig,
                 zram: SwapDevices = NO_ZRAM) -> bool:
    """Re-check right before acting: False if the situation recovered meanwhile.

    A SIGKILL for an escalation or an expired grace is not re-checked (the
    ladder already re-read usage this tick); a first action backs off if the
    fresh usage is back under the limit, a guard action if the headroom is back
    above its floor (one for pressure if MemAvailable is back above psi_available:
    the stall share needs a window, the fresh read is one instant).
    """
    if decision.kind == "warn" or decision.reason in (REASON_ESCALATE, REASON_GRACE):
        return True
    if decision.reason == REASON_PREDICT:   # below the threshold by design
        if decision.by_guard:                # recovered if the headroom is back above the soft floor
            return fresh_host is None or fresh_host.mem_total <= 0 or \
                headroom(guard, fresh_host, zram) < HOST_FLOOR * guard.thresholds(fresh_host.mem_total)[0]
        return fresh_usage is None or fresh_usage >= decision.usage * WARN_REARM
    if decision.by_guard:
        if fresh_host is None:
            return True
        if decision.reason in PSI_REASONS:
            return pressure_gate(guard, fresh_host)
        return guard_level(guard, fresh_host, zram)[0] is not None
    return fresh_usage is None or fresh_usage >= decision.limit
