"""Which swap is zram, and what it costs in RAM (/proc/swaps, /sys/block/zram*/mm_stat).

MemAvailable and SwapFree come with every host sample (/proc/meminfo). What
they do not say is that swap on a zram device lives in RAM: a page swapped
there frees 4 KiB but costs its compressed size. The guard therefore counts
zram swap at its net worth (policy.swap_headroom), from these few small files,
re-read at most once a second and at once when SwapTotal changes (swapon or
swapoff at run time).

The read runs in a helper thread when the daemon gives SwapWatcher its helpers:
opening /proc/swaps waits on the kernel's swapon mutex, which a swapon on a
starved host holds for seconds (seen in the guest: the loop blocked there until
systemd's watchdog killed it). The loop waits READ_WAIT for it, then keeps the
last reading and looks again on its next tick; never two reads at once.
"""
from __future__ import annotations

import os

from memwatchd.types import NO_ZRAM, SwapDevices

REREAD_EVERY = 1.0   # seconds: the compression ratio drifts slowly
READ_WAIT = 0.02     # seconds the loop waits for a read it started


def read_swap_devices(proc_root: str = "/", sys_root: str = "/") -> SwapDevices:
    """The zram devices among the active swap areas; NO_ZRAM when there are none."""
    try:
        with open(os.path.join(proc_root, "proc", "swaps"), "rb") as f:
            lines = f.read(65536).splitlines()[1:]
    except OSError:
        return NO_ZRAM
    total = free = orig = ram = 0
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or not fields[0].startswith(b"/dev/zram"):
            continue
        try:
            size, used = int(fields[2]) * 1024, int(fields[3]) * 1024
        except ValueError:
            continue
        total += size
        free += max(0, size - used)
        name = os.fsdecode(fields[0][5:])
        try:
            with open(os.path.join(sys_root, "sys", "block", name, "mm_stat"), "rb") as f:
                stat = f.read(4096).split()
            orig += int(stat[0])
            ram += int(stat[2])
        except (OSError, ValueError, IndexError):
            pass
    if total == 0:
        return NO_ZRAM
    return SwapDevices(total, free, orig, ram)


class SwapWatcher:
    """Keeps the zram reading fresh: at once when SwapTotal changed, else once a second.

    With ``helpers`` (offload.Helpers) the files are read off the loop; a read the
    kernel holds up leaves the last reading in use until it returns."""

    __slots__ = ("proc_root", "sys_root", "devices", "_swap_total", "_read_at", "_helpers",
                 "_pending")

    def __init__(self, proc_root: str = "/", sys_root: str = "/", helpers=None) -> None:
        self.proc_root, self.sys_root = proc_root, sys_root
        self.devices = NO_ZRAM
        self._swap_total = 0
        self._read_at = -REREAD_EVERY
        self._helpers = helpers
        self._pending = None   # the helper's read still running (offload._Call)

    @property
    def stuck(self) -> bool:
        """A read started earlier has not returned yet (the last reading is in use)."""
        return self._pending is not None and not self._pending.finished()

    def _read(self):
        """A fresh SwapDevices, or None while the read has not returned (or no helper
        was free): the caller keeps what it had."""
        if self._helpers is None:
            return read_swap_devices(self.proc_root, self.sys_root)
        call, wait = self._pending, 0.0
        if call is None:
            call = self._helpers.begin(read_swap_devices, (self.proc_root, self.sys_root))
            if call is None:
                return None
            wait = READ_WAIT
        if not call.finished(wait):
            self._pending = call
            return None
        self._pending = None
        return call.result if call.error is None else NO_ZRAM

    def update(self, now: float, swap_total: int) -> SwapDevices:
        if swap_total <= 0:
            self.devices, self._swap_total = NO_ZRAM, swap_total
            return self.devices
        if (swap_total != self._swap_total or now - self._read_at >= REREAD_EVERY
                or self._pending is not None):
            devices = self._read()
            if devices is not None:
                self.devices = devices
                self._swap_total, self._read_at = swap_total, now
        return self.devices
