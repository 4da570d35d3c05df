"""The engine: one ordered pipeline, whatever carries the batches (processes or Ray actors).

Data flow, and which thread does what::

    producer thread(s)         enqueue(index, item) / imap's feeder thread pulling the iterable
        |  Batcher / feed list: items collect into a run   (flusher thread: max_delay timeout)
        v
    encode (pickle before commit: an unpicklable item fails here, at its index)
        |  Batch(bid, seq) -> _pending deque
        v
    _pump: least-loaded ready worker slot (or the key's slot), at most DEPTH batches per slot
        |  transport.send(slot, frame)           (never blocks: a sender thread per worker)
        v
    worker process / actor: fn over the batch -> RESULT frame
        |
    transport's collector thread -> on_result / on_death / on_ready / on_init_error
        |  stream.reorder.push(seq, batch)       (min-heap on seq: per batch, not per item)
        v
    consumer thread: results() / imap: pop the next seq, unpickle (GC paused), yield in order

Everything mutable below is guarded by ``_lock``; three conditions share it:
``_space`` (producers waiting for the window), ``_ready`` (consumers waiting for the next batch)
and ``_flush`` (the flusher waiting for a partial batch to age). Encoding and decoding happen
outside the lock so a producer pickling a large batch never delays the collector.

Failure accounting, in order: every item taken into a batch is answered exactly once, by its
batch being pushed to its stream's reorder buffer: with values from a worker, with local
failures (unpicklable, crashed with no retries left, pool broken), or a mix of both.
"""

from __future__ import annotations

import atexit
import enum
import multiprocessing.util  # noqa: F401 - import before registering our atexit hook
import os
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Iterable

import psutil

from . import _wire
from ._batching import Batch, Batcher, BatchSizer, compact_indices
from ._errors import BrokenPool, PoolClosed, WorkerCrashed, WorkerInitError, describe_exit
from ._reorder import ReorderBuffer

__all__ = ["DEPTH", "Engine", "PoolState", "Stream", "usable_cores"]

# Batches queued per worker: one running, one waiting in its pipe so the worker never idles
# while its result travels back and the next batch travels out.
DEPTH = 2


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity respected), at least 1."""
    try:
        return max(1, len(psutil.Process().cpu_affinity()))  # type: ignore[arg-type]
    except (AttributeError, NotImplementedError, psutil.Error):
        return max(1, psutil.cpu_count() or os.cpu_count() or 1)


class PoolState(enum.Enum):
    """Lifecycle of a pool. Changes only under the engine lock."""

    STARTING = "starting"  # workers are starting and running init
    RUNNING = "running"  # accepting work
    CLOSING = "closing"  # close() was called: in-flight work finishes, no new work
    CLOSED = "closed"  # all work done, workers stopped
    TERMINATED = "terminated"  # terminate(): workers killed, pending work dropped
    BROKEN = "broken"  # a replacement worker failed to start: pending work failed


class Stream:
    """One ordered stream: the enqueue/results stream, or one ``imap`` call.

    Attributes:
        kind: ``"enqueue"`` or ``"imap"``.
        reorder: result batches waiting for their turn.
        next_seq: seq of the next batch this stream will create (7).
        open_batches: batches taken from the input and not yet in ``reorder`` (3).
        closed: no more batches will be created for this stream.
        complete: every input item was taken into a batch (False when the pool broke or was
            terminated first: the consumer must not mistake that for the end of the input).
        abandoned: the consumer went away: results are dropped as they arrive.
        batcher: pending items of an enqueue stream.
        feed: pending items of an imap stream (appended without the lock by its feeder).
        fed: items of an imap stream already taken into batches (its next index).
        consumer: whether a consumer is iterating this stream (one at a time).
    """

    __slots__ = (
        "abandoned",
        "batcher",
        "closed",
        "complete",
        "consumer",
        "fed",
        "feed",
        "kind",
        "next_seq",
        "open_batches",
        "reorder",
    )

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.reorder: ReorderBuffer[Batch] = ReorderBuffer()
        self.next_seq = 0
        self.open_batches = 0
        self.closed = False
        self.complete = False
        self.abandoned = False
        self.batcher = Batcher()
        self.feed: list[Any] = []
        self.fed = 0
        self.consumer = False

    def pending(self) -> int:
        return len(self.batcher) if self.kind == "enqueue" else len(self.feed)

    def finished(self) -> bool:
        return self.closed and self.open_batches == 0 and not len(self.reorder)


class _SlotState:
    """One worker slot; the process behind it changes after a crash."""

    __slots__ = ("outstanding", "pid", "ready", "started", "tasks")

    def __init__(self) -> None:
        self.outstanding: deque[Batch] = deque()  # batches sent, oldest first (being run)
        self.ready = False  # READY received from the current process
        self.pid = 0
        self.started = 0  # processes started for this slot (1, then 2 after a crash...)
        self.tasks = 0  # items completed by this slot


_LIVE_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


class Engine:
    """Batching, dispatch, reordering, failure handling and lifecycle for one pool.

    The transport is created by ``transport_factory(events)``; it starts workers on request and
    reports results and deaths back through the ``on_*`` methods below.
    """

    def __init__(
        self,
        transport_factory: Callable[[Engine], Any],
        *,
        workers: int,
        window: int,
        batch_size: int | None,
        max_delay: float,
        retries: int,
    ) -> None:
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)  # producers wait for window room
        self._ready = threading.Condition(self._lock)  # consumers wait for their next batch
        self._flush = threading.Condition(self._lock)  # the flusher waits for a batch to age
        self.state = PoolState.STARTING
        self.workers = workers
        self.window = window  # most items taken into batches and not yet consumed (8192)
        self.max_delay = max_delay  # seconds a partial batch may wait before it is sent (0.005)
        self.retries = retries  # times a crashed item is re-run before it fails (0)
        self.sizer = BatchSizer(batch_size)
        self.sizer.limit(max(1, window // (workers * (DEPTH + 1))))
        self._slots = [_SlotState() for _ in range(workers)]
        self._pending: deque[Batch] = deque()  # encoded batches waiting for a free slot
        self._inflight = 0  # items taken into batches, not yet handed to a consumer (4096)
        self._next_bid = 0  # wire id of the next batch
        self._stream: Stream | None = None  # the open stream (only one at a time)
        self._flusher_idle = False  # the flusher sleeps until told: wake it for a new batch
        self._stopping = False  # close() found nothing left to run: the workers are stopping
        self._init_error: BaseException | None = None
        self._broken_error: BaseException | None = None
        # counters for stats()
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.restarts = 0
        self.peak_heap = 0
        self.transport = transport_factory(self)
        self._flusher = threading.Thread(target=self._flush_loop, name="ordpool-flusher", daemon=True)
        _LIVE_ENGINES.add(self)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float | None) -> None:
        """Start every worker and wait until all are READY.

        Raises:
            WorkerInitError: a worker's init raised (its traceback is ``__cause__``), or did not
                finish within ``timeout`` seconds.
        """
        for slot in range(self.workers):
            self._slots[slot].started += 1
            self.transport.start_worker(slot)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._init_error is None and not all(s.ready for s in self._slots):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._init_error = WorkerInitError(
                        f"workers did not finish init within {timeout} seconds"
                    )
                    break
                self._ready.wait(remaining)
            error = self._init_error
            if error is None:
                self.state = PoolState.RUNNING
        if error is not None:
            self.terminate()
            if isinstance(error, WorkerInitError):
                raise error
            raise WorkerInitError(f"worker init failed: {error!r}") from error
        self._flusher.start()

    def close(self) -> None:
        """Stop intake; in-flight work finishes and open streams end. Idempotent."""
        with self._lock:
            if self.state not in (PoolState.RUNNING, PoolState.STARTING):
                return
            self.state = PoolState.CLOSING
            stream = self._stream
            if stream is not None and stream.kind == "enqueue":
                stream.closed = stream.complete = True
                work = self._take_locked(stream)
            else:
                work = None
            self._ready.notify_all()
            self._space.notify_all()
            self._flush.notify_all()
        if work is not None:
            self._encode_dispatch(*work)
        self._maybe_stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the workers have stopped; returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self.state not in (PoolState.CLOSED, PoolState.TERMINATED, PoolState.BROKEN):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._ready.wait(remaining)
        return True

    def terminate(self) -> None:
        """Kill the workers now; pending work is dropped and streams end. Idempotent."""
        with self._lock:
            if self.state in (PoolState.TERMINATED, PoolState.CLOSED):
                return
            was_broken = self.state is PoolState.BROKEN
            self.state = PoolState.TERMINATED
            self._ready.notify_all()
            self._space.notify_all()
            self._flush.notify_all()
        if not was_broken:
            self.transport.stop(graceful=False)
        _LIVE_ENGINES.discard(self)

    def _maybe_stop(self) -> None:
        """After close(): stop the workers once nothing is left to run."""
        with self._lock:
            if self.state is not PoolState.CLOSING:
                return
            stream = self._stream
            if stream is not None and not stream.closed:
                return
            if self._pending or any(s.outstanding for s in self._slots):
                return
            if stream is not None and stream.open_batches:
                return
            if self._stopping:
                return
            self._stopping = True
        # CLOSED only once the workers are gone, so that join() means "nothing left running".
        self.transport.stop(graceful=True)
        with self._lock:
            if self.state is PoolState.CLOSING:
                self.state = PoolState.CLOSED
            self._ready.notify_all()
            self._flush.notify_all()
        _LIVE_ENGINES.discard(self)

    def check_open(self) -> None:
        state = self.state
        if state is PoolState.RUNNING:
            return
        if state is PoolState.BROKEN:
            raise BrokenPool("the pool is broken: a replacement worker failed to start") from (
                self._broken_error
            )
        raise PoolClosed(f"the pool is {state.value}: it takes no new work")

    # -- streams -------------------------------------------------------------------------------

    def open_stream(self, kind: str) -> Stream:
        with self._lock:
            self.check_open()
            current = self._stream
            if current is not None:
                if current.kind == "enqueue":
                    raise RuntimeError(
                        "an enqueue()/results() stream is open on this pool; imap() cannot run "
                        "until it is closed (use a second pool for a second stream)"
                    )
                raise RuntimeError(
                    "another imap() is still running on this pool; finish or close it first"
                )
            stream = Stream(kind)
            self._stream = stream
            return stream

    def enqueue_stream(self) -> Stream:
        """The pool's enqueue/results stream, opened on first use."""
        stream = self._stream
        if stream is not None and stream.kind == "enqueue":
            return stream
        with self._lock:
            stream = self._stream
            if stream is not None and stream.kind == "enqueue":
                return stream
        return self.open_stream("enqueue")

    def release_stream(self, stream: Stream) -> None:
        """The consumer of ``stream`` is done (finished, or gave up early)."""
        with self._lock:
            stream.consumer = False
            if not stream.finished():
                # Results already waiting are dropped now, those still running as they land
                # (_deliver_locked), and the feeder stops at its next take.
                stream.abandoned = True
                stream.closed = True
                self._inflight -= stream.reorder.items
                stream.reorder = ReorderBuffer()
                self._space.notify_all()
            if self._stream is stream:
                self._stream = None
        self._maybe_stop()

    def claim_consumer(self, stream: Stream) -> None:
        with self._lock:
            if stream.consumer:
                raise RuntimeError("results() is already being iterated by another consumer")
            stream.consumer = True

    def release_consumer(self, stream: Stream) -> None:
        with self._lock:
            stream.consumer = False

    # -- producer side -------------------------------------------------------------------------

    def enqueue(self, index: int, item: Any, timeout: float | None) -> None:
        """Add one item to the enqueue stream, waiting while the window is full."""
        stream = self.enqueue_stream()
        deadline = None
        with self._lock:
            self.check_open()
            if self._stream is not stream:
                raise RuntimeError("the enqueue stream was closed")
            batcher = stream.batcher
            batcher.check(index)
            while self._inflight + len(batcher) >= self.window:
                if len(batcher):
                    work = self._take_locked(stream)
                    self._lock.release()
                    try:
                        self._encode_dispatch(*work)  # type: ignore[misc]
                    finally:
                        self._lock.acquire()
                    self.check_open()
                    continue
                if timeout is not None:
                    if deadline is None:
                        deadline = time.monotonic() + timeout
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"the window stayed full for {timeout} seconds")
                    self._space.wait(remaining)
                else:
                    self._space.wait()
                self.check_open()
                batcher.check(index)
            n = batcher.add(index, item)
            self.submitted += 1
            if n == 1 and self._flusher_idle:
                self._flush.notify()
            if n < self.sizer.size:
                return
            work = self._take_locked(stream)
        self._encode_dispatch(*work)  # type: ignore[misc]

    def feed_iterable(self, stream: Stream, iterable: Iterable[Any]) -> None:
        """Body of imap's feeder thread: pull the input lazily into ``stream``.

        Items are appended to ``stream.feed`` without the lock (a list append is atomic, and only
        this thread appends; takers remove from the front under the lock), so reading the input
        costs a few tens of nanoseconds per item. An exception from the iterable becomes the
        error of the position where it happened, and the stream ends there.
        """
        feed = stream.feed
        append = feed.append
        sizer = self.sizer
        size = sizer.size
        try:
            if isinstance(iterable, (list, tuple)):
                # A sequence cannot block: feed it by slices, at C speed.
                start, end = 0, len(iterable)
                while start < end:
                    feed.extend(iterable[start : start + size])
                    start += size
                    if not self._take_feed(stream, block=True):
                        return
                    size = sizer.size
                iterable = ()
            for item in iterable:
                append(item)
                n = len(feed)
                if n >= size:
                    if not self._take_feed(stream, block=True):
                        return
                    size = sizer.size
                elif n == 1 and self._flusher_idle:
                    with self._lock:
                        self._flush.notify()
        except BaseException as exc:  # noqa: BLE001 - it is delivered at its index
            if self._take_feed(stream, block=True, until_empty=True):
                self._fail_at_end(stream, exc)
            self._maybe_stop()
            return
        if not self._take_feed(stream, block=True, until_empty=True):
            return
        with self._lock:
            stream.closed = stream.complete = True
            self._ready.notify_all()
        self._maybe_stop()

    def _take_feed(self, stream: Stream, *, block: bool, until_empty: bool = False) -> bool:
        """Move feed items into batches (as the window allows); False if the stream is gone."""
        while True:
            with self._lock:
                while True:
                    if stream.abandoned or self.state in (PoolState.TERMINATED, PoolState.BROKEN):
                        return False
                    room = self.window - self._inflight
                    if room > 0:
                        break
                    if not block:
                        return True
                    self._space.wait()
                work = self._take_locked(stream, limit=room)
                more = len(stream.feed) >= (1 if until_empty else self.sizer.size)
            if work is not None:
                self._encode_dispatch(*work)
            if not more:
                return True

    def _fail_at_end(self, stream: Stream, exc: BaseException) -> None:
        with self._lock:
            if stream.abandoned:
                return
            index = stream.fed
            stream.fed += 1
            self._inflight += 1
            batch = Batch(self._next_bid, stream.next_seq, stream, range(index, index + 1), [])
            self._next_bid += 1
            stream.next_seq += 1
            stream.open_batches += 1
            batch.failed[0] = exc
            stream.closed = stream.complete = True
            self._deliver_locked(batch)

    def _take_locked(
        self, stream: Stream, limit: int | None = None
    ) -> tuple[Stream, int, int, range | list[int], list[Any]] | None:
        """Take the stream's pending items as one batch (seq assigned here, in order)."""
        if stream.kind == "enqueue":
            if not len(stream.batcher):
                return None
            indices, items = stream.batcher.take()
            idx: range | list[int] = compact_indices(indices)
        else:
            feed = stream.feed
            n = len(feed) if limit is None else min(len(feed), limit, max(self.sizer.size, 1))
            if n <= 0:
                return None
            items = feed[:n]
            del feed[:n]
            idx = range(stream.fed, stream.fed + n)
            stream.fed += n
            self.submitted += n
        self._inflight += len(items)
        seq = stream.next_seq
        stream.next_seq += 1
        stream.open_batches += 1
        bid = self._next_bid
        self._next_bid += 1
        return stream, bid, seq, idx, items

    def _encode_dispatch(
        self, stream: Stream, bid: int, seq: int, indices: range | list[int], items: list[Any]
    ) -> None:
        """Pickle a batch (outside the lock) and hand it to a worker."""
        parts, failed = _wire.encode_items(items)
        batch = Batch(bid, seq, stream, indices, parts, failed)
        with self._lock:
            if len(failed) == len(batch):
                self._deliver_locked(batch)  # nothing to run: every item failed to pickle
                return
            if self.state in (PoolState.TERMINATED, PoolState.BROKEN):
                if self.state is PoolState.BROKEN:
                    self._fail_batch_locked(batch, self._broken_error)
                return
            self._pending.append(batch)
            self._pump_locked()

    def _flush_loop(self) -> None:
        """Send partial batches that waited ``max_delay`` (a lone message on a quiet stream).

        The flusher polls rather than being told about every new batch: producers wake it only
        when it sleeps idle (no stream, or nothing pending). While items flow it wakes once per
        ``max_delay``, sees that batches were taken meanwhile, and sleeps again; it takes the
        pending items only when none were taken for a whole ``max_delay``. A partial batch thus
        waits between one and two ``max_delay``, and a busy stream pays nothing per batch.
        """
        lock = self._lock
        while True:
            work = None
            with lock:
                if self.state in (PoolState.CLOSED, PoolState.TERMINATED, PoolState.BROKEN):
                    return
                stream = self._stream
                if stream is None or stream.abandoned or not stream.pending():
                    self._flusher_idle = True
                    self._flush.wait()
                    self._flusher_idle = False
                    continue
                taken = stream.next_seq
                self._flush.wait(self.max_delay)
                if self._stream is not stream or stream.next_seq != taken or not stream.pending():
                    continue
                room = self.window - self._inflight
                if room > 0:
                    # (enqueue never lets batcher + in-flight exceed the window)
                    work = self._take_locked(stream, limit=room)
            if work is not None:
                self._encode_dispatch(*work)

    # -- dispatch ------------------------------------------------------------------------------

    def _pump_locked(self) -> None:
        """Send pending batches to ready slots with room, least loaded first."""
        pending = self._pending
        while pending:
            slot = self._pick()
            if slot < 0:
                return
            self._send_locked(slot, pending.popleft())

    def _pick(self) -> int:
        best, load = -1, DEPTH
        for i, s in enumerate(self._slots):
            n = len(s.outstanding)
            if s.ready and n < load:
                best, load = i, n
                if n == 0:
                    break
        return best

    def _send_locked(self, slot: int, batch: Batch) -> None:
        self._slots[slot].outstanding.append(batch)
        self.transport.send(slot, batch.bid, tuple(batch.failed), batch.parts)

    # -- events from the transport (collector thread) ------------------------------------------

    def on_ready(self, slot: int, pid: int) -> None:
        with self._lock:
            s = self._slots[slot]
            s.ready = True
            s.pid = pid
            self._ready.notify_all()
            self._pump_locked()

    def on_init_error(self, slot: int, exc: BaseException) -> None:
        with self._lock:
            if self.state is PoolState.STARTING:
                if self._init_error is None:
                    err = WorkerInitError(f"worker init raised {type(exc).__name__}: {exc}")
                    err.__cause__ = exc
                    self._init_error = err
                self._ready.notify_all()
                return
            if self.state in (PoolState.TERMINATED, PoolState.CLOSED, PoolState.BROKEN):
                return
            err = WorkerInitError(
                f"a replacement worker's init raised {type(exc).__name__}: {exc}"
            )
            err.__cause__ = exc
            self._break_locked(err)
        self.transport.stop(graceful=False)

    def _break_locked(self, error: BaseException) -> None:
        """Fail everything pending and refuse new work (the pool cannot run tasks any more)."""
        self.state = PoolState.BROKEN
        self._broken_error = error
        broken = BrokenPool(f"the pool is broken: {error}")
        broken.__cause__ = error
        lost = list(self._pending)
        self._pending.clear()
        for s in self._slots:
            lost.extend(s.outstanding)
            s.outstanding.clear()
            s.ready = False
        for batch in sorted(lost, key=lambda b: b.bid):
            self._fail_batch_locked(batch, broken)
        stream = self._stream
        if stream is not None:
            stream.closed = True
            if stream.kind == "enqueue" and len(stream.batcher):
                work = self._take_locked(stream)
                if work is not None:
                    _, bid, seq, idx, _items = work
                    b = Batch(bid, seq, stream, idx, [])
                    self._fail_batch_locked(b, broken)
        self._ready.notify_all()
        self._space.notify_all()
        self._flush.notify_all()

    def _fail_batch_locked(self, batch: Batch, error: BaseException | None) -> None:
        for pos in range(len(batch)):
            batch.failed.setdefault(pos, error or BrokenPool("the pool is broken"))
        batch.parts = []
        self._deliver_locked(batch)

    def on_result(self, slot: int, bid: int, seconds: float, payload: Any) -> None:
        with self._lock:
            s = self._slots[slot]
            batch = s.outstanding.popleft()
            if batch.bid != bid:  # pragma: no cover - a protocol bug, never a user error
                raise AssertionError(f"worker {slot} answered batch {bid}, expected {batch.bid}")
            self.sizer.observe(len(batch), seconds)
            s.tasks += len(batch)
            batch.frame = payload
            batch.parts = []
            self._deliver_locked(batch)
            if self._pending:
                self._pump_locked()
            stopping = self.state is PoolState.CLOSING
        if stopping:
            self._maybe_stop()

    def on_death(self, slot: int, exitcode: int | None, pid: int, progress: tuple[int, int]) -> None:
        with self._lock:
            s = self._slots[slot]
            lost = list(s.outstanding)
            s.outstanding.clear()
            was_ready, s.ready = s.ready, False
            if not was_ready and self.state in (PoolState.STARTING, PoolState.RUNNING, PoolState.CLOSING):
                # It died in init (os._exit, a signal): restarting it would loop forever.
                err = WorkerInitError(f"worker process {pid} died during init ({describe_exit(exitcode)})")
                if self.state is PoolState.STARTING:
                    self._init_error = self._init_error or err
                    self._ready.notify_all()
                    return
                self._pending.extendleft(reversed(lost))
                self._break_locked(err)
                broke = True
            else:
                broke = False
            if broke or self.state not in (PoolState.RUNNING, PoolState.CLOSING):
                return
            self.restarts += 1
            crashed = WorkerCrashed(
                f"worker process {pid} died ({describe_exit(exitcode)}) while running this item",
                exitcode=exitcode,
                pid=pid,
            )
            running_bid, position = progress
            requeue = []
            for i, batch in enumerate(lost):
                if i == 0 and batch.bid == running_bid:
                    n = len(batch)
                    blamed = [position] if 0 <= position < n else range(n)
                    for pos in blamed:
                        if pos in batch.failed:
                            continue
                        tries = batch.attempts.get(pos, 0) + 1
                        batch.attempts[pos] = tries
                        if tries > self.retries:
                            batch.failed[pos] = crashed
                    if len(batch.failed) == n:
                        batch.parts = []
                        self._deliver_locked(batch)
                        continue
                requeue.append(batch)
            # Lost batches go first: later batches are queued behind them in the reorder heap.
            self._pending.extendleft(reversed(requeue))
            s.started += 1
        try:
            self.transport.start_worker(slot)
        except BaseException as exc:  # noqa: BLE001 - a start failure breaks the pool
            with self._lock:
                self._break_locked(exc)
            return
        with self._lock:
            self._pump_locked()

    def _deliver_locked(self, batch: Batch) -> None:
        """The batch is answered: put it in its stream's reorder buffer (or drop it)."""
        stream = batch.stream
        stream.open_batches -= 1
        n = len(batch)
        failures = len(batch.failed)
        self.failed += failures
        self.completed += n - failures
        if stream.abandoned:
            self._inflight -= n
            self._space.notify_all()
            return
        stream.reorder.push(batch.seq, batch, n)
        if stream.reorder.items > self.peak_heap:
            self.peak_heap = stream.reorder.items
        if batch.seq == stream.reorder.next_seq or stream.finished() or stream.closed:
            self._ready.notify_all()

    # -- consumer side -------------------------------------------------------------------------

    def next_batch(self, stream: Stream, timeout: float | None = None) -> Batch | None:
        """The stream's next batch in order; ``None`` when the stream has ended."""
        with self._lock:
            while True:
                batch = stream.reorder.pop()
                if batch is not None:
                    self._inflight -= len(batch)
                    self._space.notify_all()
                    return batch
                if stream.finished() or stream.abandoned:
                    if not stream.complete and not stream.abandoned:
                        self._raise_truncated()
                    return None
                if self.state is PoolState.TERMINATED:
                    self._raise_truncated()
                if not self._ready.wait(timeout):
                    raise TimeoutError(f"no result within {timeout} seconds")

    def _raise_truncated(self) -> None:
        if self.state is PoolState.BROKEN:
            raise BrokenPool("the pool broke before this stream's input was fully processed") from (
                self._broken_error
            )
        raise PoolClosed("the pool was terminated before this stream's input was fully processed")

    @staticmethod
    def decode(batch: Batch) -> tuple[list[Any], dict[int, BaseException] | None]:
        """Values and errors of an answered batch, local failures merged in."""
        n = len(batch)
        if batch.frame is None:
            return [None] * n, dict(batch.failed)
        try:
            values, errors = _wire.decode_results(batch.frame)
        except BaseException as exc:  # noqa: BLE001 - becomes each item's error
            err = RuntimeError(f"could not unpickle the results of this batch: {exc!r}")
            err.__cause__ = exc
            return [None] * n, {pos: err for pos in range(n)}
        if errors:
            if -1 in errors:
                every = errors[-1]
                errors = {pos: every for pos in range(n)}
        if batch.failed:
            errors = {**(errors or {}), **batch.failed}
        return values, errors or None

    # -- introspection -------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        return sorted(self.transport.pids().values())

    @property
    def inflight(self) -> int:
        return self._inflight


def _terminate_all() -> None:
    for engine in list(_LIVE_ENGINES):
        try:
            engine.terminate()
        except Exception:  # noqa: BLE001, S110 - interpreter exit: nothing to report to
            pass


# Registered after multiprocessing.util's own exit hook, so it runs first (atexit is LIFO):
# our workers are gone before multiprocessing joins its non-daemonic children.
atexit.register(_terminate_all)
