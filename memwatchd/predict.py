"""Time to exhaustion: act on where memory is going, not only where it is (issue 15).

Pure, like the policy that calls it: every function takes the time and the value, no
I/O, no clock. Per target a ``Trend`` keeps a least-squares line over the last
WINDOW seconds of the memory that cannot simply be reclaimed (a process's RSS, a
cgroup's anon + shmem) with running sums, so one reading costs O(1) however fast the
target is sampled. The time left is measured at the *upper* confidence bound of the
slope (slope + Z standard errors): a noisy climb counts as a fast one.

Gates against false alarms, each switchable for the benchmark (``ALL_GATES``):

  horizon  the time left at the upper bound is under the watch's ``predict`` horizon
  floor    the memory is already above SOFT_FLOOR of the limit (the hard threshold)
  persist  both held for PERSIST samples in a row over at least MIN_SPAN seconds
  history  the window covers at least HISTORY seconds: the first climb of a job (a
           sawtooth's first cycle, a build's first children) is not yet a trend
  falls    veto: the memory fell by FALL of its peak within the last WINDOW seconds (a
           sawtooth, a build's children exiting): what is freed again is not a leak
  plateau  veto: a parabola through the window (negative curvature) tops out below
           the limit, or no longer climbs (growth levelling off)
  ceiling  veto: a cgroup whose memory.max is below the limit cannot reach it (the
           kernel reclaims or OOM-kills inside it first)

Prediction only drives the gentle rungs (warn, SIGTERM, throttle); the hard limit stays
the backstop, evaluated exactly as before.
"""
from __future__ import annotations

from collections import deque

WINDOW = 10.0         # seconds of readings the slope is fitted over
Z = 2.0               # upper bound of the slope: slope + Z standard errors (~97.5 %)
SOFT_FLOOR = 0.5      # predict only with the memory above this share of the limit
HOST_FLOOR = 3        # the host: only with headroom under this many times the guard's floor
ARM = 0.375           # from here on the trace recorder writes every reading (SOFT_FLOOR * 0.75)
PERSIST = 3           # consecutive samples the condition must hold
MIN_SPAN = 0.5        # seconds of readings in the window before any prediction counts
HISTORY = 5.0         # seconds of the target's readings before a prediction may act
FALL = 0.25           # a drop of this share from the last peak: memory that was freed
MIN_POINTS = 4
REARM = 2.0           # a fired prediction re-arms once the time left exceeds horizon * this

ALL_GATES = frozenset(("horizon", "floor", "persist", "history", "falls", "plateau", "ceiling"))
INF = float("inf")


class Fit:
    """Least squares of x over t for the readings of the last ``span`` seconds.

    Running sums of (t - t0) and (x - x0), with an origin moved to the oldest reading
    every len(points) evictions (so the sums never cancel out catastrophically), make
    add() amortised O(1)."""

    __slots__ = ("span", "points", "t0", "x0", "n", "st", "sx", "stt", "stx", "sxx",
                 "s3", "s4", "sttx", "evicted")

    def __init__(self, span: float) -> None:
        self.span = span
        self.points: deque = deque()
        self.t0 = self.x0 = 0.0
        self.evicted = 0
        self._zero()

    def _zero(self) -> None:
        self.n = 0
        self.st = self.sx = self.stt = self.stx = self.sxx = self.s3 = self.s4 = self.sttx = 0.0

    def _sum(self, t: float, x: float, sign: int) -> None:
        dt, dx = t - self.t0, x - self.x0
        dt2 = dt * dt
        self.n += sign
        self.st += sign * dt
        self.sx += sign * dx
        self.stt += sign * dt2
        self.stx += sign * dt * dx
        self.sxx += sign * dx * dx
        self.s3 += sign * dt2 * dt
        self.s4 += sign * dt2 * dt2
        self.sttx += sign * dt2 * dx

    def add(self, t: float, x: float) -> None:
        points = self.points
        if not points:
            self.t0, self.x0 = t, x
        points.append((t, x))
        self._sum(t, x, 1)
        while t - points[0][0] > self.span:
            old = points.popleft()
            self._sum(old[0], old[1], -1)
            self.evicted += 1
        if self.evicted > len(points):   # re-origin: exact sums again, amortised O(1)
            self.evicted = 0
            self.t0, self.x0 = points[0]
            self._zero()
            for p in points:
                self._sum(p[0], p[1], 1)

    def covered(self) -> float:
        """Seconds between the oldest and newest reading held."""
        return self.points[-1][0] - self.points[0][0] if self.points else 0.0

    def slope(self):
        """(slope, standard error) in x per second; None with under three readings
        or no spread in time."""
        n = self.n
        if n < 3:
            return None
        tt = self.stt - self.st * self.st / n
        if tt <= 1e-12:
            return None
        tx = self.stx - self.st * self.sx / n
        xx = self.sxx - self.sx * self.sx / n
        b = tx / tt
        resid = max(0.0, xx - b * tx) / (n - 2)
        return b, (resid / tt) ** 0.5

    def peak(self):
        """Where a parabola through the window levels off: (slope at the newest reading,
        the parabola's highest value, or inf if it curves up). None with under four
        readings. From the central moments, so the sums stay well conditioned."""
        n = self.n
        if n < 4:
            return None
        m = self.st / n
        suu = self.stt - n * m * m
        suv = self.s3 - 3 * m * self.stt + 3 * m * m * self.st - n * m ** 3
        svv = self.s4 - 4 * m * self.s3 + 6 * m * m * self.stt - 4 * m ** 3 * self.st + n * m ** 4 \
            - suu * suu / n
        sux = self.stx - m * self.sx
        svx = self.sttx - 2 * m * self.stx + m * m * self.sx - suu / n * self.sx
        det = suu * svv - suv * suv
        if suu <= 1e-12 or det <= 1e-12 * suu * svv:
            return None
        b = (sux * svv - svx * suv) / det
        c = (suu * svx - suv * sux) / det
        u_now = self.points[-1][0] - self.t0 - m
        slope_now = b + 2 * c * u_now
        if c >= 0:
            return slope_now, INF
        u_top = -b / (2 * c)
        return slope_now, self.x0 + self.sx / n + b * u_top + c * (u_top * u_top - suu / n)


def time_left(headroom: float, slope_hi: float) -> float:
    """Seconds until ``headroom`` is used up at ``slope_hi`` (inf when not growing)."""
    if headroom <= 0:
        return 0.0
    return headroom / slope_hi if slope_hi > 0 else INF


class Trend:
    """One target's fit, the gates' memory (streak, fired) and its last estimate."""

    __slots__ = ("fit", "streak", "fired", "armed", "estimate", "peak", "fell_at")

    def __init__(self) -> None:
        self.fit = Fit(WINDOW)
        self.peak = 0             # the highest reading since the last fall
        self.fell_at = -INF       # when the memory last fell by FALL of its peak
        self.streak = 0
        self.fired = False
        self.armed = False
        self.estimate = None   # (seconds_left, slope, slope_hi) in s and bytes/s, or None

    def update(self, now: float, value: int, limit: int, horizon: float,
               ceiling=None, gates=ALL_GATES, floor=None) -> bool:
        """Add one reading; True when the gates say: act now (once per crossing).
        ``floor``: the soft floor (default SOFT_FLOOR of the limit; the host guard
        passes its own, a multiple of its threshold)."""
        if floor is None:
            floor = limit * SOFT_FLOOR
        self.fit.add(now, value)
        if value < self.peak * (1 - FALL):
            self.fell_at, self.peak = now, value
        elif value > self.peak:
            self.peak = value
        self.armed = value >= floor * (ARM / SOFT_FLOOR)
        fit = self.fit.slope()
        if fit is None:
            self.estimate = None
            self.streak = 0
            return False
        slope, se = fit
        slope_hi = slope + Z * se
        left = time_left(limit - value, slope_hi)
        self.estimate = (left, slope, slope_hi)
        if self.fired:
            if left > horizon * REARM or value < floor * 0.9:
                self.fired = False
            return False
        ok = ("horizon" not in gates or left < horizon) and \
             ("floor" not in gates or value >= floor) and \
             not ("ceiling" in gates and ceiling is not None and 0 < ceiling < limit) and \
             not ("falls" in gates and now - self.fell_at < WINDOW) and \
             not ("plateau" in gates and self.levelling_off(slope, limit))
        covered = self.fit.covered()
        if not ok or covered < MIN_SPAN or self.fit.n < MIN_POINTS or \
                ("history" in gates and covered < HISTORY):
            self.streak = 0
            return False
        self.streak += 1
        if "persist" in gates and self.streak < PERSIST:
            return False
        self.fired = True
        self.streak = 0
        return True

    def levelling_off(self, slope: float, limit: int) -> bool:
        """Growth that flattens before the limit: the window's straight line is not
        climbing, or a parabola through it is no longer climbing now, or curves down to
        a top below the limit (negative curvature: the line overstates the climb)."""
        if slope <= 0:
            return True
        p = self.fit.peak()
        if p is None:
            return False
        slope_now, top = p
        return slope_now <= 0 or top < limit
