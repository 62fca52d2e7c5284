"""Matching an operator's cmdline regex against command lines users control, in bounded time.

A command line is up to 64 KiB of whatever its owner chose, and a regex as plain
as ``train.*--epochs.*gpu`` backtracks polynomially: 7 s on one crafted 16 KiB
line. The loop that does this also samples and signals every other target, so:

* each command line is matched once: a rescan reads every command line (as
  before) but runs the regex only on a text it has not judged for that PID (a
  verdict is a function of the text alone), so an exec, a setproctitle or a
  reused PID with a new command line is judged anew, and the fork-to-exec moment
  when a child still shows its parent's command line costs nothing later;
* all cmdline work of one tick (reading stat and cmdline, matching) stops when
  the tick's budget is spent (BUDGET) and resumes on the next tick, so a flood of
  new processes delays the loop by at most the budget plus one step;
* a single match is interrupted after MATCH_DEADLINE: Python's regex engine checks
  for signals as it runs, so a one-shot SIGALRM (setitimer) ends it. Such a
  process counts as not matching (its owner could as well have chosen another
  name) and is said once - but only after ATTEMPTS cuts with the CPU ours, one
  per try, tried again later in the pass (on another tick): a cut caused by being
  descheduled proves nothing, and a process that keeps being descheduled is left
  for the next pass. Off the main thread no alarm can be used;
  the budget still bounds the rest.
"""
from __future__ import annotations

import re
import signal
import time
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional, Set, Tuple

BUDGET = 0.004          # seconds of cmdline work per tick, over all cmdline watches
MATCH_DEADLINE = 0.002  # seconds one regex search may take
ATTEMPTS = 3            # a search cut short this often in a row is slow, not unlucky


class _Deadline(Exception):
    pass


CUT = "cut"               # Alarm.search: the deadline passed while the CPU was ours
UNDECIDED = "undecided"   # Alarm.search: it passed while we were descheduled


_armed = False


def _on_alarm(signum, frame) -> None:
    if _armed:
        raise _Deadline()


class Alarm:
    """SIGALRM armed around each search (main thread only); restores the old handler."""

    def __init__(self) -> None:
        self.old = None
        self.usable = False

    def __enter__(self) -> "Alarm":
        try:
            self.old = signal.signal(signal.SIGALRM, _on_alarm)
            self.usable = True
        except ValueError:  # not the main thread
            self.usable = False
        return self

    def __exit__(self, *exc) -> None:
        if self.usable:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)

    def search(self, pattern: "re.Pattern", text: str):
        """True/False; CUT if MATCH_DEADLINE passed first while the CPU was ours (in a VM
        the guest also counts time its vCPU was descheduled: one cut proves little),
        UNDECIDED if it passed while we were descheduled."""
        if not self.usable:
            return pattern.search(text) is not None
        cpu = time.thread_time()
        found = self._search_once(pattern, text)
        if found is not None:
            return found
        return CUT if time.thread_time() - cpu >= MATCH_DEADLINE * 0.75 else UNDECIDED

    def _search_once(self, pattern: "re.Pattern", text: str) -> Optional[bool]:
        global _armed
        signal.setitimer(signal.ITIMER_REAL, MATCH_DEADLINE)
        _armed = True
        try:
            return pattern.search(text) is not None
        except _Deadline:   # also when it fired just as the search returned: harmless
            return None
        finally:
            _armed = False  # first: from here on a late alarm is ignored
            signal.setitimer(signal.ITIMER_REAL, 0)


class CmdlineScan:
    """One cmdline watch: cached verdicts and the rest of an unfinished pass."""

    __slots__ = ("pattern", "verdicts", "todo", "cuts")

    def __init__(self, regex: str) -> None:
        self.pattern = re.compile(regex)
        self.verdicts: Dict[int, Tuple[int, bool]] = {}   # pid -> (hash of cmdline, matched)
        self.todo: List[int] = []
        self.cuts: Dict[int, Tuple[int, int, int]] = {}   # pid -> (hash, cut, undecided)

    @property
    def busy(self) -> bool:
        """A pass is under way (the budget ran out): the loop should come back soon."""
        return bool(self.todo)

    def step(self, pids: Callable[[], List[int]], cmdline: Callable[[int], str],
             skip: Set[int], deadline: float, alarm: Alarm,
             slow: List[Tuple[int, int]]) -> Tuple[List[int], bool]:
        """Go on judging processes until `deadline` (time.perf_counter()); return the
        matching pids not in skip and whether the pass is complete. A new pass starts
        (from pids()) when the last one completed. Searches that ran too long are
        appended to `slow` as (pid, cmdline length)."""
        if not self.todo:
            self.todo = pids()
            alive = set(self.todo)
            self.verdicts = {p: v for p, v in self.verdicts.items() if p in alive}
            self.cuts = {p: c for p, c in self.cuts.items() if p in alive}
            self.todo.reverse()          # pop() from the end: oldest PIDs first
        found: List[int] = []
        while self.todo:
            if time.perf_counter() >= deadline:
                return found, False
            pid = self.todo.pop()
            if pid in skip:
                continue
            verdict = self.judge(pid, cmdline(pid), alarm, slow)
            if verdict is None:
                # Retried later in this pass (most likely on a later tick): slow only after
                # ATTEMPTS cuts; left for the next pass if descheduling keeps interrupting.
                if self.cuts[pid][2] < ATTEMPTS:
                    self.todo.insert(0, pid)
                continue
            if verdict:
                found.append(pid)
        return found, True

    def judge(self, pid: int, text: str, alarm: Alarm,
              slow: List[Tuple[int, int]]) -> Optional[bool]:
        """Does pid's command line `text` match? None if a search was cut short and it is
        not yet judged slow (ATTEMPTS cuts make it False, appended to `slow`). Used by the
        passes above and for one new process at its exec (memwatchd.procevents)."""
        key = hash(text)     # a verdict is a function of the text alone
        known = self.verdicts.get(pid)
        if known is not None and known[0] == key:
            return known[1]
        verdict = alarm.search(self.pattern, text)
        if verdict is CUT or verdict is UNDECIDED:
            before = self.cuts.get(pid)
            cut, undecided = before[1:] if before and before[0] == key else (0, 0)
            cut, undecided = cut + (verdict is CUT), undecided + (verdict is UNDECIDED)
            self.cuts[pid] = (key, cut, undecided)
            if cut < ATTEMPTS:
                return None
            del self.cuts[pid]
            slow.append((pid, len(text)))
            verdict = False
        self.verdicts[pid] = (key, verdict)
        return verdict
