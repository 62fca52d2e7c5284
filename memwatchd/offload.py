"""Kernel calls that can block, run off the loop so they never hold up other targets.

Reading a victim's /proc/<pid>/cmdline waits on its mmap_lock, process_mrelease()
can too, writing memory.high reclaims synchronously, and fsync() waits on a
congested disk. The loop is one thread that must sample and signal every target
on time, so these calls run in helper threads and the loop waits for them at most
a bounded time:

- ``Helpers.call(fn, args, wait)``: one short-lived thread per call, at most
  MAX_HELPERS alive at once, the loop waiting up to ``wait`` seconds for the result.
  A call the kernel keeps blocked keeps only its own thread; with every helper
  stuck, further calls are refused at once (the caller records "unavailable").
- ``EventWriter``: one thread, started with the first record, that appends and
  fsyncs the events file in order. ``append(record, wait)`` returns once the record
  is on disk, or after ``wait`` seconds if the disk is congested (the caller acts
  anyway and says so: a stuck disk must not stop protection). While a record it
  gave up waiting for is still not written, later ones are not waited for at all,
  so a congested disk costs the loop ``wait`` once, not once per action.

- ``TraceWriter``: the same for the trace (``[daemon] trace``, ``record --out``): one
  thread writes the recorder's lines in order and the loop never waits for it. Past
  TRACE_BACKLOG bytes waiting, the recorder drops lines and starts a new segment once the
  disk has caught up (trace.Recorder): under a swap storm the guest's disk wrote 1-3 MiB/s
  and the loop, writing its trace itself, saw nothing for 17 s.

Raw ``_thread`` locks and a deque, not threading/queue: the daemon's resident memory is a
goal (threading costs about 0.25 MiB, _queue 32 KiB; a helper thread about 16 KiB while
it lives).
"""
from __future__ import annotations

import _thread
import collections
import time
TYPE_CHECKING = False  # typing costs the daemon 0.5 MiB; annotations are never evaluated
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Optional, Tuple

from memwatchd import report
from memwatchd.report import ERR, NOTICE, log

MAX_HELPERS = 4       # helper threads alive at once (each blocked one holds ~16 KiB)
QUEUE_MAX = 1024      # records waiting for the disk; beyond that they go to the journal only

TRACE_BACKLOG = 2 << 20   # trace bytes waiting for the disk before the recorder drops lines

__all__ = ["Helpers", "EventWriter", "TraceWriter", "MAX_HELPERS", "QUEUE_MAX", "TRACE_BACKLOG"]


class _Call:
    __slots__ = ("done", "result", "error")

    def __init__(self) -> None:
        self.done = _thread.allocate_lock()
        self.done.acquire()
        self.result: Any = None
        self.error: Optional[BaseException] = None

    def finished(self, wait: float = 0.0) -> bool:
        """True once the call has returned (waiting up to ``wait`` seconds for it)."""
        if self.done.acquire(True, wait) if wait > 0 else self.done.acquire(False):
            self.done.release()
            return True
        return False


class Helpers:
    """Short-lived helper threads for calls that may block in the kernel."""

    def __init__(self, limit: int = MAX_HELPERS):
        self.limit = limit
        self.alive = 0
        self._count = _thread.allocate_lock()

    def _run(self, call: _Call, fn: Callable, args: tuple) -> None:
        try:
            call.result = fn(*args)
        except BaseException as e:   # handed to the caller, never raised in this thread
            call.error = e
        finally:
            with self._count:
                self.alive -= 1
            call.done.release()

    def _spawn(self, fn: Callable, args: tuple) -> Optional[_Call]:
        with self._count:
            if self.alive >= self.limit:
                return None
            self.alive += 1
        call = _Call()
        try:
            _thread.start_new_thread(self._run, (call, fn, args))
        except RuntimeError:   # the kernel refused a thread (RLIMIT_NPROC, memory)
            with self._count:
                self.alive -= 1
            return None
        return call

    def start(self, fn: Callable, args: tuple = ()) -> bool:
        """Run fn(*args) in a helper thread and do not wait (fn reports its own errors).
        False if every helper is busy: nothing was started."""
        return self._spawn(fn, args) is not None

    def begin(self, fn: Callable, args: tuple = ()) -> Optional[_Call]:
        """Run fn(*args) in a helper thread; the call, to look at later with
        ``finished()`` (None if every helper is busy: nothing was started)."""
        return self._spawn(fn, args)

    def call(self, fn: Callable, args: tuple = (), wait: float = 0.0) -> Tuple[bool, Any]:
        """(True, result) if fn(*args) returned within ``wait`` seconds; (False, None) if
        it is still running (it finishes on its own, its result dropped) or every helper
        is busy. An exception from fn is re-raised here when it arrives in time."""
        call = self._spawn(fn, args)
        if call is None or not call.done.acquire(True, wait):
            return False, None
        if call.error is not None:
            raise call.error
        return True, call.result


def _hand_over(queue: collections.deque, wake, item) -> None:
    """Queue item for a writer thread that waits on ``wake`` (held while the queue is empty;
    the loop is the only producer)."""
    queue.append(item)
    if wake.locked():
        try:
            wake.release()
        except RuntimeError:   # the writer took it meanwhile: it sees the item anyway
            pass


class EventWriter:
    """The events file, appended and fsync'ed by one writer thread in submission order.

    Wraps report.EventLog (rotation, torn lines, directory creation stay there). The
    loop's thread never touches the file after opening it; a record the loop stopped
    waiting for is still written, and a late or failed write is logged by the writer.
    """

    def __init__(self, log_file: report.EventLog):
        self.log_file = log_file
        self.path = log_file.path
        self._queue: collections.deque = collections.deque()   # (record, call, queued at)
        self._wake = _thread.allocate_lock()   # held while the queue is empty
        self._wake.acquire()
        self._started = False
        self._stopped = _thread.allocate_lock()
        self._dropped = 0
        self._stuck: Optional[_Call] = None   # the last record the loop stopped waiting for

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _run(self) -> None:
        try:
            while True:
                while not self._queue:
                    self._wake.acquire()   # released by _put (the loop is the only producer)
                item = self._queue.popleft()
                if item is None:
                    return
                record, call, queued_at = item
                try:
                    self.log_file.append(record)
                except (OSError, ValueError, TypeError) as e:
                    call.error = e
                    log(ERR, f"could not write the event record to {self.path}: {e}")
                finally:
                    late = call.result == "abandoned"
                    call.result = "written"
                    call.done.release()
                if late and call.error is None:
                    log(NOTICE, f"event record {record.get('id')} reached {self.path} "
                                f"{time.monotonic() - queued_at:.1f}s after it was decided")
        finally:
            self._stopped.release()

    def _put(self, item: Optional[tuple]) -> None:
        _hand_over(self._queue, self._wake, item)

    def append(self, record: Dict[str, Any], wait: float) -> bool:
        """Queue record; True once it is on disk (fsync'ed), False if that took longer than
        ``wait`` seconds (it stays queued), or it could not be written (logged)."""
        if self.path is None:
            return True
        if not self._started:
            self._stopped.acquire()
            _thread.start_new_thread(self._run, ())
            self._started = True
        if len(self._queue) >= QUEUE_MAX:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 100 == 0:
                log(ERR, f"{self.path}: {QUEUE_MAX} records are waiting for the disk; "
                         f"{self._dropped} dropped (the journal has each action)")
            return False
        call = _Call()
        self._put((record, call, time.monotonic()))
        stuck = self._stuck
        if wait <= 0 or (stuck is not None and stuck.result != "written"):
            return False   # the disk already kept the loop waiting once: never twice in a row
        if not call.done.acquire(True, wait):
            call.result = "abandoned"   # the writer logs when it lands
            self._stuck = call
            return False
        self._stuck = None
        return call.error is None

    def close(self, wait: float = 5.0) -> None:
        """Write what is queued (up to ``wait`` seconds on a stuck disk), then close."""
        if self._started:
            self._put(None)
            if self._stopped.acquire(True, wait):
                self._stopped.release()
                self._started = False
            else:
                log(ERR, f"{self.path}: {len(self._queue)} records not yet written after {wait:.0f}s; "
                         "giving up on them")
                return   # the writer still owns the fd
        self.log_file.close()


_ROTATE = object()   # TraceWriter's queue: start the sink's next segment here


class TraceWriter:
    """A trace sink (trace.RingSink or trace.FileSink) written by one thread, in order.

    The loop's write() only queues the bytes. ``behind()`` says the disk holds more than
    ``backlog`` bytes up: the recorder then stops writing until it has caught up. A write
    error in the thread stops the writing; the loop's next call raises it, and the recorder
    stops recording and says so (as it did when it wrote itself). The byte counts are each
    changed by one thread only (``queued`` by the loop, ``written`` by the writer)."""

    def __init__(self, sink, backlog: int = TRACE_BACKLOG):
        self.sink = sink
        self.path = sink.path
        self.backlog = backlog
        self.segment_size = getattr(sink, "segment_size", 0)
        self.queued = 0          # bytes handed in (the loop's thread)
        self.written = 0         # bytes the sink took or that were dropped after an error (the writer's)
        self._segment = 0        # bytes handed in since the last rotate
        self.error: Optional[OSError] = None
        self._queue: collections.deque = collections.deque()
        self._wake = _thread.allocate_lock()   # held while the queue is empty
        self._wake.acquire()
        self._stopped = _thread.allocate_lock()
        self._started = False

    def behind(self) -> bool:
        return self.queued - self.written > self.backlog

    def full(self) -> bool:
        """The ring's current segment has its share (RingSink.full, counted as handed in)."""
        return 0 < self.segment_size <= self._segment

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.queued += len(data)
        self._segment += len(data)
        self._put(data)

    def rotate(self) -> None:
        self._segment = 0
        self._put(_ROTATE)

    def _put(self, item) -> None:
        if not self._started:
            self._stopped.acquire()
            _thread.start_new_thread(self._run, ())
            self._started = True
        _hand_over(self._queue, self._wake, item)

    def _run(self) -> None:
        try:
            while True:
                while not self._queue:
                    self._wake.acquire()
                item = self._queue.popleft()
                if item is None:
                    return
                if self.error is not None:   # stopped by an error: count what is dropped
                    self.written += len(item) if item is not _ROTATE else 0
                    continue
                try:
                    if item is _ROTATE:
                        self.sink.rotate()
                        continue
                    chunks = [item]   # everything queued up to the next rotate, in one write
                    while self._queue and type(self._queue[0]) is bytes:
                        chunks.append(self._queue.popleft())
                    data = b"".join(chunks)
                    self.sink.write(data)
                    self.written += len(data)
                except OSError as e:
                    self.error = e
        finally:
            self._stopped.release()

    def close(self, wait: float = 5.0) -> None:
        """Write what is queued (up to ``wait`` seconds on a stuck disk), then close the sink."""
        if self._started:
            self._put(None)
            if not self._stopped.acquire(True, wait):
                log(ERR, f"trace {self.path}: {self.queued - self.written} bytes not yet written "
                         f"after {wait:.0f}s; giving up on them")
                return   # the writer still owns the sink
            self._stopped.release()
            self._started = False
        self.sink.close()
