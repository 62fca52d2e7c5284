"""Which swap is zram and what it costs: /proc/swaps and mm_stat, in a temp tree laid out
like /proc and /sys (zram cannot be set up on demand on every test host)."""
from __future__ import annotations

from memwatchd import policy
from memwatchd.config import GuardConfig
from memwatchd.swapinfo import SwapWatcher, read_swap_devices
from memwatchd.types import NO_ZRAM, HostSample, SwapDevices

GiB = 1 << 30
HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"


def lay_out(tmp_path, swaps, mm_stats):
    (tmp_path / "proc").mkdir(exist_ok=True)
    (tmp_path / "proc" / "swaps").write_text(HEADER + "".join(swaps))
    for name, line in mm_stats.items():
        d = tmp_path / "sys" / "block" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "mm_stat").write_text(line)
    return str(tmp_path)


def test_disk_swap_only_is_no_zram(tmp_path):
    root = lay_out(tmp_path, ["/swapfile                               file\t\t4194300\t\t1024\t\t-2\n"], {})
    assert read_swap_devices(root, root) == NO_ZRAM


def test_zram_devices_add_up_and_disk_swap_is_left_out(tmp_path):
    root = lay_out(tmp_path, [
        "/dev/zram0                              partition\t2097148\t\t1048576\t\t100\n",
        "/dev/zram1                              partition\t1048572\t\t0\t\t100\n",
        "/swapfile                               file\t\t4194300\t\t0\t\t-2\n",
    ], {"zram0": "1073741824 268435456 300000000 0 300000000 100 0 0 0\n",
        "zram1": "0 0 0 0 0 0 0 0 0\n"})
    dev = read_swap_devices(root, root)
    assert dev == SwapDevices((2097148 + 1048572) * 1024, (2097148 - 1048576 + 1048572) * 1024,
                              1073741824, 300000000)


def test_watcher_rereads_when_swap_total_changes(tmp_path):
    root = lay_out(tmp_path, [], {})
    w = SwapWatcher(root, root)
    assert w.update(0.0, 0) == NO_ZRAM
    lay_out(tmp_path, ["/dev/zram0 partition 2097148 0 100\n"], {"zram0": "0 0 0 0 0 0 0 0\n"})
    assert w.update(0.1, 2097148 * 1024).zram_total == 2097148 * 1024   # swapon: at once
    lay_out(tmp_path, [], {})
    assert w.update(0.2, 2097148 * 1024).zram_total > 0                # unchanged total: cached
    assert w.update(1.3, 2097148 * 1024) == NO_ZRAM                    # once a second: re-read
    assert w.update(1.4, 0) == NO_ZRAM                                  # swapoff


def test_guard_counts_real_zram_reading(tmp_path):
    """The path the daemon takes: read the devices, hand them to the guard's headroom."""
    root = lay_out(tmp_path, ["/dev/zram0 partition 4194300 3145728 100\n"],
                   {"zram0": f"{3 * GiB} {GiB} {GiB} 0 {GiB} 0 0 0\n"})
    dev = read_swap_devices(root, root)
    host = HostSample(16 * GiB, GiB // 10, 4194300 * 1024, GiB, None)
    # 1 GiB free on a 3:1 device is worth 2/3 GiB: 0.1 + 0.67 GiB < 5% of 16 GiB (0.8)
    assert policy.guard_level(GuardConfig(), host, dev) == ("term", policy.REASON_GUARD_LOW)
    assert policy.guard_level(GuardConfig(), host) == (None, "")   # counted as disk swap: enough


def test_a_read_the_kernel_holds_up_does_not_hold_up_the_loop(tmp_path):
    """/proc/swaps waits on the swapon mutex; here a FIFO stands in for it (its open
    blocks until a writer comes, in the kernel, as that open does). The watcher keeps
    the last reading, answers within its READ_WAIT, never starts a second read, and
    takes the new reading once the first returns."""
    import os
    import threading
    import time

    from memwatchd import offload, swapinfo
    root = lay_out(tmp_path, [], {})
    fifo = tmp_path / "proc" / "swaps"
    fifo.unlink()
    os.mkfifo(fifo)
    helpers = offload.Helpers()
    w = SwapWatcher(root, root, helpers=helpers)
    t0 = time.monotonic()
    assert w.update(0.0, 2097148 * 1024) == NO_ZRAM     # the read is stuck: last reading kept
    assert w.update(0.5, 2097148 * 1024) == NO_ZRAM
    assert w.update(2.0, 2097148 * 1024) == NO_ZRAM     # due again: still the one read
    assert time.monotonic() - t0 < 1.0
    assert w.stuck and helpers.alive == 1
    (tmp_path / "sys" / "block" / "zram0").mkdir(parents=True)
    (tmp_path / "sys" / "block" / "zram0" / "mm_stat").write_text(f"{GiB} {GiB // 4} {GiB // 4} 0 0\n")

    def writer():
        with open(fifo, "w") as f:   # unblocks the reader's open
            f.write(HEADER + "/dev/zram0 partition 2097148 1048576 100\n")
    threading.Thread(target=writer).start()
    deadline = time.monotonic() + 5
    while w.stuck and time.monotonic() < deadline:
        time.sleep(0.01)
    dev = w.update(2.1, 2097148 * 1024)
    assert dev.zram_total == 2097148 * 1024 and dev.zram_orig == GiB
    assert not w.stuck and helpers.alive == 0
    assert swapinfo.READ_WAIT < 0.1
