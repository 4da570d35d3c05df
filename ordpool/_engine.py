"""The engine: one ordered pipeline, whatever carries the batches (processes or Ray actors).

Data flow, and which thread does what::

    producer thread(s)     enqueue(stream, index, item) / imap's feeder thread pulling the input
        |  Batcher / feed list: items collect into a run of the stream
        |  taken when full, when a worker sits idle, or by the flusher after max_delay
        v
    encode (pickle before commit: an unpicklable item fails here, at its position)
        |  Batch(seq) carried by Task(bid): one task, or one per worker when keys route items
        v
    _pump: pinned tasks to their slot, others to the least-loaded ready slot, DEPTH per slot
        |  transport.send(slot, bid, failed, payload)    (never waits for a worker)
        v
    worker process / actor: fn over the task's items -> results
        |
    transport's thread -> on_result / on_death / on_ready / on_init_error / on_retire
        |  all tasks of a batch answered -> ordered stream: stream.reorder.push(seq, batch)
        |                                -> callback stream: on_batch(batch) (executor futures)
        v
    consumer thread: next_batch() pops the next seq, decode() unpickles (GC paused)

Everything mutable is guarded by ``_lock``; three conditions share it: ``_space`` (producers
waiting for the window), ``_ready`` (consumers waiting for a batch; start/join waiting for a
state) and ``_flush`` (the flusher). Pickling and unpickling happen outside the lock, so a
producer encoding a large batch never delays the transport's thread. Callbacks of callback
streams run outside the lock too (``_due``), because a future's callbacks run user code, which
may call back into the pool.

Accounting, the invariant behind "nothing lost, nothing duplicated": every item taken into a batch
is answered exactly once, by its batch being delivered: with values from a worker, with local
failures (unpicklable, crashed with no retries left, pool broken), or a mix. A task whose worker
dies is re-queued (its unstarted items never count as attempts) or failed; never both.
"""

from __future__ import annotations

import atexit
import enum
import functools
import multiprocessing.util  # noqa: F401 - import before registering our atexit hook
import os
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Generator, Iterable, TypeVar

import psutil

from . import _wire
from ._batching import Batch, Batcher, BatchSizer, Task, compact_indices
from ._errors import BrokenPool, PoolClosed, WorkerCrashed, WorkerInitError, describe_exit
from ._reorder import ReorderBuffer
from ._stats import PoolStats, WorkerStats, worker_usage

__all__ = [
    "DEPTH",
    "Engine",
    "KeyRouter",
    "PoolState",
    "Stream",
    "chunks_retrying",
    "decode_retrying",
    "fnv1a",
    "retrying",
    "usable_cores",
]

T = TypeVar("T")

# Tasks queued per worker: one running, one waiting in its pipe, so the worker never idles
# while its result travels back and the next task travels out.
DEPTH = 2


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity respected), at least 1."""
    try:
        return max(1, len(psutil.Process().cpu_affinity()))  # type: ignore[arg-type]
    except (AttributeError, NotImplementedError, psutil.Error):
        return max(1, psutil.cpu_count() or os.cpu_count() or 1)


_FNV_OFFSET, _FNV_PRIME, _MASK64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def fnv1a(key: str | bytes | int) -> int:
    """64-bit FNV-1a hash of a key: the same in every process, run and ``PYTHONHASHSEED``.

    ``str`` keys hash their UTF-8 bytes, ``int`` keys their signed 8-byte little-endian form
    (arbitrary precision ints: their minimal two's-complement bytes).

    >>> fnv1a(b"")
    14695981039346656037
    >>> fnv1a("a") == fnv1a(b"a") == 0xAF63DC4C8601EC8C
    True
    """
    if isinstance(key, str):
        data = key.encode("utf-8")
    elif isinstance(key, (bytes, bytearray, memoryview)):
        data = bytes(key)
    elif isinstance(key, int) and not isinstance(key, bool):
        length = max(8, (key.bit_length() + 8) // 8)
        data = key.to_bytes(length, "little", signed=True)
    else:
        raise TypeError(f"keys must be str, bytes or int, not {type(key).__name__}")
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


class KeyRouter:
    """The worker slot of a key, ``fnv1a(key) % workers``, remembered for recent small keys.

    FNV-1a runs a Python step per byte of the key: 1.2 us for an int or a 13-character ``str``,
    3 us for 36 bytes, more than the parent's whole cost per message elsewhere. Stream keys
    repeat (users, devices, sessions), so a dict of the last :attr:`size` keys makes routing a
    lookup. Only exact ``str``, ``bytes`` and ``int`` keys of bounded size are remembered: a
    ``bool`` or a ``float`` equal to a cached ``int`` must still be refused by :func:`fnv1a`,
    and a large key must not be kept alive. Safe from any thread (the GIL makes each dict
    operation atomic, and every answer is the same whoever computes it).

    >>> route = KeyRouter(4)
    >>> route("user-1") == fnv1a("user-1") % 4 == route("user-1")
    True
    """

    __slots__ = ("caches", "size", "workers")

    MAX_KEY_BYTES = 256

    def __init__(self, workers: int, size: int = 1 << 16) -> None:
        self.workers = workers
        self.size = size  # keys remembered, per key type
        # One dict per type: "a" and b"a" hash alike, and comparing them warns under -b.
        self.caches: dict[type, dict[Any, int]] = {str: {}, bytes: {}, int: {}}

    def __call__(self, key: Any) -> int:
        kind = type(key)
        if ((kind is str or kind is bytes) and len(key) <= self.MAX_KEY_BYTES) or (
            kind is int and -_INT_BOUND <= key < _INT_BOUND
        ):
            cache = self.caches[kind]
            slot = cache.get(key)
            if slot is None:
                slot = fnv1a(key) % self.workers
                if len(cache) >= self.size:
                    cache.clear()
                cache[key] = slot
            return slot
        return fnv1a(key) % self.workers


_INT_BOUND = 1 << 63


class PoolState(enum.Enum):
    """Lifecycle of a pool. Changes only under the engine lock."""

    STARTING = "starting"  # workers are starting and running init
    RUNNING = "running"  # accepting work
    CLOSING = "closing"  # close() was called: in-flight work finishes, no new work
    CLOSED = "closed"  # all work done, workers stopped
    TERMINATED = "terminated"  # terminate(): workers killed, pending work dropped
    BROKEN = "broken"  # workers cannot be (re)started: pending work failed with BrokenPool


_ENDED = (PoolState.CLOSED, PoolState.TERMINATED, PoolState.BROKEN)


class Stream:
    """One stream of items through the engine: results come back in order (or to a callback).

    Attributes:
        kind: ``"enqueue"`` (indices given, Batcher) or ``"imap"`` (numbered, feed list).
        keyed: items carry a worker slot (enqueue) or are ``(key, item)`` pairs (imap);
            ``None`` until an enqueue stream's first item says.
        on_batch: ``None`` for an ordered stream; else called as ``on_batch(batch)`` as soon as
            a batch is answered, in any order (the executor completes futures with it).
        on_send: called as ``on_send(task)`` under the engine lock just before a task goes to
            a worker; it may add positions to ``task.failed`` (futures cancelled meanwhile).
        queued_seq: seq of the next batch to queue for the workers. Batches are encoded outside
            the lock, by whichever thread took them, so they can finish encoding out of order;
            they are queued strictly in seq order (``parked`` holds early ones) so that a key's
            items reach its worker in submission order.
        parked: encoded batches waiting for an earlier one to be queued ({9: <Batch>}).
        call: the pickled callable the stream's items run with, instead of the pool's ``fn``
            (an executor's ``map(fn, ...)``), or ``b""``.
        reorder: answered batches waiting for their turn (ordered streams).
        next_seq: seq of the next batch this stream will create (7).
        open_batches: batches taken from the input and not yet answered (3).
        closed: no more batches will be created for this stream.
        complete: every input item was taken into a batch (False when the pool broke or was
            terminated first: the consumer must not mistake that for the end of the input).
        abandoned: the consumer went away: results are dropped as they arrive.
        batcher: pending items of an enqueue stream.
        feed: pending items of an imap stream (appended without the lock by its feeder).
        feed_locked: the feed changes only under the lock (a sequence's feeder adds a slice at a
            time under it), so a take may hand the list itself to the batch, not a copy.
        fed: items of an imap stream taken into batches so far (the next item's index).
        consumer: a consumer is iterating this stream (one at a time).
        leftover: what a consumer that left its loop mid-batch did not take (the next
            ``results()`` starts there).
    """

    __slots__ = (
        "abandoned",
        "batcher",
        "call",
        "closed",
        "complete",
        "consumer",
        "fed",
        "feed",
        "feed_locked",
        "keyed",
        "kind",
        "leftover",
        "next_seq",
        "on_batch",
        "on_send",
        "open_batches",
        "parked",
        "queued_seq",
        "reorder",
    )

    def __init__(
        self,
        kind: str,
        *,
        keyed: bool | None = False,
        on_batch: Callable[[Batch], None] | None = None,
        call: bytes = b"",
    ) -> None:
        self.kind = kind
        self.keyed = keyed
        self.on_batch = on_batch
        self.on_send: Callable[[Task], None] | None = None
        self.call = call
        self.queued_seq = 0
        self.parked: dict[int, Batch] = {}
        self.reorder: ReorderBuffer[Batch] = ReorderBuffer()
        self.next_seq = 0
        self.open_batches = 0
        self.closed = False
        self.complete = False
        self.abandoned = False
        self.batcher = Batcher()
        self.feed: list[Any] = []
        self.feed_locked = False
        self.fed = 0
        self.consumer = False
        self.leftover: Any = None

    def pending(self) -> int:
        """Items waiting to be taken into a batch."""
        return len(self.batcher) if self.kind == "enqueue" else len(self.feed)

    def finished(self) -> bool:
        """Nothing more will come out of this stream."""
        return self.closed and self.open_batches == 0 and not len(self.reorder)


class _Slot:
    """One worker slot; the process (or actor) behind it changes after a crash."""

    __slots__ = ("outstanding", "pending", "pid", "ready", "retiring", "started", "tasks")

    def __init__(self) -> None:
        self.outstanding: deque[Task] = deque()  # sent to the worker, oldest (running) first
        self.pending: deque[Task] = deque()  # keyed tasks waiting for this slot
        self.ready = False  # READY received from the current process
        self.retiring = False  # it said RETIRE: send nothing more, restart it when it exits
        self.pid = 0
        self.started = 0  # processes started for this slot (1, then 2 after a crash...)
        self.tasks = 0  # items completed by this slot


_LIVE_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()
# (slot or None, positions in the batch or None for all, encoded items, failed positions)
_Encoded = tuple[int | None, list[int] | None, _wire.Payload, dict[int, BaseException]]


class PacedSequence:
    """A list or tuple to feed by slices, each slice allowed by ``room(items fed so far)``.

    ``room`` returns how many more items may be read now (it may wait for the consumer, and it
    raises to end the input there). An executor's ``map`` over a list uses it to keep its
    ``buffersize`` bound without a Python step per item.
    """

    __slots__ = ("items", "room")

    def __init__(self, items: list[Any] | tuple[Any, ...], room: Callable[[int], int]) -> None:
        self.items = items
        self.room = room


class Engine:
    """Batching, dispatch, reordering, failure handling and lifecycle for one pool.

    The transport comes from ``transport_factory(engine)``; it starts workers when asked and
    reports back through the ``on_*`` methods, from its own thread.
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
        depth: int = DEPTH,
        stream_depth: int | None = None,
    ) -> None:
        # An RLock, though nothing takes it twice: a Condition re-takes an RLock after a wait
        # without letting a signal in (C code), but a Lock through Lock.acquire(), which a
        # Ctrl-C interrupts. The KeyboardInterrupt then left `with self._lock:` without the
        # lock, and its release raised "RuntimeError: release unlocked lock" in its place
        # (seen once on 3.13, in the Ctrl-C-during-imap test, a consumer waiting for a batch).
        self._lock = threading.RLock()
        self._space = threading.Condition(self._lock)  # producers wait for window room
        self._ready = threading.Condition(self._lock)  # consumers, start() and join() wait
        self._flush = threading.Condition(self._lock)  # the flusher waits for a batch to age
        self.state = PoolState.STARTING
        self.workers = workers
        self.window = window  # most items taken into batches and not yet consumed (16384)
        self.max_delay = max_delay  # seconds a partial batch may wait before it is sent (0.005)
        self.retries = retries  # times a crashed item is re-run before it fails (0)
        self.depth = depth  # tasks a worker may hold at once (2; an executor's submit jobs: 1)
        # ...when they are batches of an imap/map stream: a worker then has the next batch at
        # hand when it finishes one. An executor holds its submit jobs to one per worker (as
        # the stdlib's shared call queue does) but not its map batches.
        self.stream_depth = depth if stream_depth is None else stream_depth
        self.route = KeyRouter(workers)  # key -> worker slot
        self.sizer = BatchSizer(batch_size)
        self.sizer.limit(max(1, window // (workers * (depth + 1))))
        self._slots = [_Slot() for _ in range(workers)]
        self._pending: deque[Task] = deque()  # tasks for any slot, waiting for room
        self._idle = 0  # ready slots holding no task: a new item is sent at once (Nagle-style)
        self._inflight = 0  # items taken into batches, not yet consumed or delivered (4096)
        self._next_bid = 0  # wire id of the next task
        self._streams: list[Stream] = []  # open streams, oldest first
        self._due: list[Batch] = []  # answered batches of callback streams, to hand over
        self._flusher_idle = False  # the flusher sleeps until told: wake it for a new item
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
        # A transport with a high fixed cost per task (a Ray call goes through its object
        # store: ~1.7 ms of driver CPU) asks for longer batches.
        target = getattr(self.transport, "batch_target", None)
        if batch_size is None and target:
            self.sizer.target = target
        # A transport whose payloads travel best under some size (shared-memory regions).
        self.sizer.max_bytes = getattr(self.transport, "max_payload", None)
        max_depth = getattr(self.transport, "max_depth", depth)
        if max(depth, self.stream_depth) > max_depth:
            self.transport.stop(graceful=False)
            raise ValueError(
                f"depth {max(depth, self.stream_depth)} exceeds what the transport supports "
                f"({max_depth})"
            )
        self._flusher = threading.Thread(
            target=self._flush_loop, name="ordpool-flusher", daemon=True
        )
        _LIVE_ENGINES.add(self)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float | None, *, raise_init_error: bool = True) -> None:
        """Start every worker and wait until all are READY.

        Args:
            timeout: seconds to wait for the workers' init; ``None`` waits.
            raise_init_error: raise a failed init (else the engine is left BROKEN with it).

        Raises:
            WorkerInitError: a worker's init raised (its traceback is ``__cause__``), died, or
                did not finish within ``timeout`` seconds.
        """
        try:
            for slot in self._slots:
                slot.started += 1
            start_all = getattr(self.transport, "start_workers", None)
            if start_all is not None:
                start_all(list(range(self.workers)))
            else:
                for slot_index in range(self.workers):
                    self.transport.start_worker(slot_index)
        except BaseException:
            self.terminate()
            raise
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
            with self._lock:
                self.state = PoolState.BROKEN
                self._broken_error = error
            if raise_init_error:
                raise error
            return
        self._flusher.start()

    def close(self) -> None:
        """Stop intake; in-flight work finishes and streams end. Idempotent."""
        works = []
        with self._lock:
            if self.state not in (PoolState.RUNNING, PoolState.STARTING):
                return
            self.state = PoolState.CLOSING
            for stream in self._streams:
                if stream.closed:
                    continue
                if stream.kind == "enqueue":
                    stream.closed = stream.complete = True
                    works.append(self._take_locked(stream))
                else:
                    # An imap still reading its input stops reading it (the input may be
                    # endless): what was taken finishes, then its consumer gets PoolClosed.
                    stream.closed = True
            self._ready.notify_all()
            self._space.notify_all()
            self._flush.notify_all()
        for work in works:
            if work is not None:
                self._encode_dispatch(*work)
        self._maybe_stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the workers have stopped; returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self.state not in _ENDED:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._ready.wait(remaining)
        # Ended; make sure the workers are gone too (a broken pool stops them from the
        # transport's thread: a second stop() waits for that one).
        self.transport.stop(graceful=False)
        return True

    def terminate(self, grace: float = 0.0) -> None:
        """Kill the workers; pending work is dropped and streams end. Idempotent.

        With ``grace``, running items are first asked to stop (``ordpool.cancelled()`` turns
        true in them) and given up to ``grace`` seconds to return.
        """
        if grace > 0 and self.state in (PoolState.RUNNING, PoolState.CLOSING):
            cancel = getattr(self.transport, "cancel", None)
            if cancel is not None:
                cancel(None, -2)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                with self._lock:
                    if not any(s.outstanding for s in self._slots):
                        break
                time.sleep(0.005)
        with self._lock:
            if self.state in _ENDED:
                return
            self.state = PoolState.TERMINATED
            self._ready.notify_all()
            self._space.notify_all()
            self._flush.notify_all()
        self.transport.stop(graceful=False)
        _LIVE_ENGINES.discard(self)

    def _maybe_stop(self) -> None:
        """After close(): stop the workers once nothing is left to run."""
        with self._lock:
            if self.state is not PoolState.CLOSING or self._stopping:
                return
            if any(not s.closed or s.open_batches for s in self._streams):
                return
            if self._pending or any(s.outstanding or s.pending for s in self._slots):
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
        """Raise unless the pool takes new work."""
        state = self.state
        if state is PoolState.RUNNING:
            return
        if state is PoolState.BROKEN:
            raise BrokenPool(f"the pool is broken: {self._broken_error}") from self._broken_error
        raise PoolClosed(f"the pool is {state.value}: it takes no new work")

    # -- streams -------------------------------------------------------------------------------

    def open_stream(
        self,
        kind: str,
        *,
        keyed: bool | None = False,
        on_batch: Callable[[Batch], None] | None = None,
        call: bytes = b"",
    ) -> Stream:
        """Open a new stream (``"enqueue"`` or ``"imap"``); ``call``: see :class:`Stream`."""
        with self._lock:
            self.check_open()
            stream = Stream(kind, keyed=keyed, on_batch=on_batch, call=call)
            self._streams.append(stream)
            return stream

    def streams(self) -> list[Stream]:
        with self._lock:
            return list(self._streams)

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
            if stream in self._streams:
                self._streams.remove(stream)
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

    def enqueue(
        self, stream: Stream, index: int, item: Any, slot: int | None, timeout: float | None
    ) -> None:
        """Add one item to an enqueue stream, waiting while the window is full."""
        deadline = None
        with self._lock:
            self.check_open()
            if stream.closed:
                raise PoolClosed("this stream was closed: it takes no new items")
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
                else:
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
                if stream.closed:
                    raise PoolClosed("this stream was closed: it takes no new items")
                batcher.check(index)
            n = batcher.add(index, item, slot)
            self.submitted += 1
            if n < self.sizer.size and not self._starts_now(stream, slot):
                if n == 1 and self._flusher_idle:
                    self._flush.notify()
                return
            work = self._take_locked(stream)
        self._encode_dispatch(*work)  # type: ignore[misc]

    def feed_iterable(self, stream: Stream, iterable: Iterable[Any] | PacedSequence) -> None:
        """Body of imap's feeder thread: pull the input lazily into ``stream``.

        Items are appended to ``stream.feed`` without the lock (a list append is atomic, only
        this thread appends, and takers remove from the front under the lock), so reading the
        input costs tens of nanoseconds per item. An exception from the iterable becomes the
        error of the position where it happened, and the stream ends there.
        """
        try:
            outcome = self._feed(stream, iterable)
        except BaseException as exc:  # a bug of ours: fail loudly, not silently
            with self._lock:
                if self.state not in _ENDED:
                    self._break_locked(exc)
            self._drain_due()
            self.transport.stop(graceful=False)
            return
        if outcome is False:
            return
        if outcome is not True:  # the input raised: its error takes the next position
            if self._take_feed(stream, until_empty=True):
                self._fail_at_end(stream, outcome)
            self._drain_due()
            self._maybe_stop()
            return
        if not self._take_feed(stream, until_empty=True):
            return
        with self._lock:
            stream.closed = stream.complete = True
            self._ready.notify_all()
        self._maybe_stop()

    def _feed(
        self, stream: Stream, iterable: Iterable[Any] | PacedSequence
    ) -> bool | BaseException:
        """Pull ``iterable`` into the feed: True at its end, False if the stream went away, or
        the exception the input raised. Exceptions of the engine itself propagate."""
        sizer = self.sizer
        size = sizer.size
        if isinstance(iterable, (list, tuple, PacedSequence)):
            # A sequence cannot block: feed it by slices, at C speed, each under the lock (once
            # a batch), so that a take can hand a whole slice to its batch without copying it:
            # each copy touches every item's reference count, in memory long out of the caches.
            room = iterable.room if isinstance(iterable, PacedSequence) else None
            seq = iterable.items if isinstance(iterable, PacedSequence) else iterable
            start, end = 0, len(seq)
            with self._lock:
                stream.feed_locked = True
            while start < end:
                if room is not None:
                    try:
                        size = min(size, room(start))
                    except BaseException as exc:  # the pacer stopped the input: at its position
                        return exc
                chunk = seq[start : start + size]
                with self._lock:
                    if stream.feed:
                        stream.feed.extend(chunk)
                    else:
                        stream.feed = chunk if type(chunk) is list else list(chunk)
                start += size
                if not self._take_feed(stream):
                    return False
                size = sizer.size
            return True
        feed = stream.feed  # appended to without the lock: never swapped (feed_locked)
        append = feed.append
        it = iter(iterable)
        while True:
            # The loop is in its own try so that only the input's exceptions count as the
            # input's: anything raised by _take_feed is ours and must not end the stream
            # looking like data.
            try:
                for item in it:
                    append(item)
                    n = len(feed)
                    if n >= size or (
                        self._idle and self._starts_now(stream, self._slot_of(stream, item))
                    ):
                        break  # (_idle first: no call per item while every worker is busy)
                    if n == 1 and self._flusher_idle:
                        with self._lock:
                            self._flush.notify()
                else:
                    return True
            except BaseException as exc:  # delivered at its position
                return exc
            if not self._take_feed(stream):
                return False
            size = sizer.size

    def _take_feed(self, stream: Stream, *, until_empty: bool = False) -> bool:
        """Move feed items into batches as the window allows; False if the stream is gone."""
        while True:
            with self._lock:
                while True:
                    if stream.abandoned or self.state in (PoolState.TERMINATED, PoolState.BROKEN):
                        return False
                    if (stream.closed and not until_empty) or self._stopping:
                        return False  # close() stopped the intake (or the workers already)
                    room = self.window - self._inflight
                    # Wait for room for a whole batch: taking whatever room there is would
                    # cut the stream into many small batches, each paying per-batch costs.
                    # And cut a batch only when a worker can take it soon (fewer tasks queued
                    # than workers, or a worker idle with no task for any worker queued: keyed
                    # tasks queued for a hot key's worker must not starve the others): the feed
                    # then waits as items, not as batches cut at an old size. Otherwise, before
                    # the first results come back to size them, the input ran ahead into the
                    # whole window of 16-item batches.
                    if (
                        room > 0
                        and room >= min(len(stream.feed), self.sizer.size, self.window)
                        and (
                            self._queued_locked() < self.workers
                            or (self._idle and not self._pending)
                        )
                    ):
                        break
                    self._space.wait()
                work = self._take_locked(stream, limit=room)
                more = len(stream.feed) >= (1 if until_empty else self.sizer.size)
            if work is not None:
                self._encode_dispatch(*work)
            if not more:
                return True

    def _fail_at_end(self, stream: Stream, exc: BaseException) -> None:
        """The input raised: its error takes the next position, and the stream ends."""
        with self._lock:
            if stream.abandoned:
                return
            index = stream.fed
            stream.fed += 1
            self._inflight += 1
            batch = Batch(stream.next_seq, stream, range(index, index + 1))
            stream.next_seq += 1
            stream.open_batches += 1
            task = Task(batch, self._new_bid(), 1, None, {0: exc})
            batch.tasks.append(task)
            batch.unanswered = 1
            stream.closed = stream.complete = True
            self._queue_in_order_locked(batch)

    def _new_bid(self) -> int:
        bid = self._next_bid
        self._next_bid += 1
        return bid

    def _take_locked(
        self, stream: Stream, limit: int | None = None
    ) -> tuple[Batch, list[Any], list[int]] | None:
        """Take the stream's pending items as the next batch (its seq is assigned here)."""
        slots: list[int] = []
        if stream.kind == "enqueue":
            if not len(stream.batcher):
                return None
            indices, items, slots = stream.batcher.take()
            idx: range | list[int] = compact_indices(indices)
        else:
            feed = stream.feed
            n = len(feed) if limit is None else min(len(feed), limit, max(self.sizer.size, 1))
            if n <= 0:
                return None
            if n == len(feed) and stream.feed_locked:
                items = feed
                stream.feed = []
            else:
                items = feed[:n]
                del feed[:n]
            idx = range(stream.fed, stream.fed + n)
            stream.fed += n
            self.submitted += n
        self._inflight += len(items)
        batch = Batch(stream.next_seq, stream, idx)
        stream.next_seq += 1
        stream.open_batches += 1
        return batch, items, slots

    def _encode_dispatch(self, batch: Batch, items: list[Any], slots: list[int]) -> None:
        """Pickle a batch's tasks (outside the lock) and queue them for the workers."""
        stream = batch.stream
        if stream.keyed:
            if stream.kind == "imap":
                # (key, item) pairs: route by the key's stable hash
                slots = list(map(self.route, [key for key, _ in items]))
                items = [item for _, item in items]
            groups: dict[int, list[int]] = {}
            for pos, slot in enumerate(slots):
                groups.setdefault(slot, []).append(pos)
            encoded: list[_Encoded] = []
            for slot, positions in groups.items():
                payload, failed = _wire.encode_items([items[p] for p in positions])
                encoded.append((slot, positions if len(groups) > 1 else None, payload, failed))
        else:
            payload, failed = _wire.encode_items(items)
            encoded = [(None, None, payload, failed)]
        with self._lock:
            self.sizer.observe_bytes(len(items), sum(e[2].nbytes for e in encoded))
            for task_slot, task_positions, task_payload, task_failed in encoded:
                n = len(task_positions) if task_positions is not None else len(items)
                task = Task(
                    batch, self._new_bid(), n, task_payload, task_failed, task_slot, task_positions
                )
                batch.tasks.append(task)
            batch.unanswered = len(batch.tasks)
            self._queue_in_order_locked(batch)
            self._pump_locked()
        self._drain_due()

    def _queue_in_order_locked(self, batch: Batch) -> None:
        """Queue an encoded batch's tasks for the workers, in the stream's seq order."""
        stream = batch.stream
        if batch.seq != stream.queued_seq:
            stream.parked[batch.seq] = batch  # an earlier batch is still being encoded
            return
        while True:
            stream.queued_seq += 1
            for task in batch.tasks:
                if self.state is PoolState.BROKEN:
                    self._fail_task_locked(task, self._broken_error)
                elif self.state is PoolState.TERMINATED:
                    pass  # dropped: terminate() ends every stream
                elif len(task.failed) == task.n:
                    self._answer_locked(task)  # nothing to run: every item failed already
                elif task.slot is None:
                    self._pending.append(task)
                else:
                    self._slots[task.slot].pending.append(task)
            next_batch = stream.parked.pop(stream.queued_seq, None)
            if next_batch is None:
                return
            batch = next_batch

    def _flush_loop(self) -> None:
        """Send partial batches that waited ``max_delay`` (a lone message on a quiet stream).

        The flusher polls rather than being told about every new batch: producers wake it only
        when it sleeps idle (nothing pending anywhere). While items flow it wakes once per
        ``max_delay``, sees that batches were taken meanwhile, and sleeps again; it takes the
        pending items only when none were taken for a whole ``max_delay``. A partial batch thus
        waits between one and two ``max_delay``, and a busy stream pays nothing per batch.
        """
        while True:
            works = []
            with self._lock:
                if self.state in _ENDED:
                    return
                waiting = [
                    (s, s.next_seq)
                    for s in self._streams
                    if not s.abandoned and not s.closed and s.pending()
                ]
                if not waiting:
                    self._flusher_idle = True
                    self._flush.wait()
                    self._flusher_idle = False
                    continue
                self._flush.wait(self.max_delay)
                for stream, taken in waiting:
                    if stream.next_seq != taken or not stream.pending() or stream.abandoned:
                        continue
                    if stream.closed or self._stopping:
                        continue  # close() stopped its intake: nothing more goes out
                    room = self.window - self._inflight
                    if room <= 0:
                        break
                    if (
                        stream.kind == "imap"
                        and self._queued_locked() >= self.workers
                        and not (stream.keyed and self._has_items_for_free_slot(stream))
                    ):
                        # Tasks already wait for every worker: an imap batch cut now would
                        # only wait too, at a size chosen before results came back (its feeder
                        # holds back for the same reason: _take_feed). A lone job of an
                        # enqueue stream (a submit) still goes after max_delay.
                        continue
                    # (enqueue never lets batcher + in-flight exceed the window)
                    work = self._take_locked(stream, limit=room)
                    if work is not None:
                        works.append(work)
            for work in works:
                self._encode_dispatch(*work)

    # -- dispatch ------------------------------------------------------------------------------

    def _queued_locked(self) -> int:
        """Tasks cut into batches and waiting for a worker: for any worker, or for a given one
        (keyed)."""
        return len(self._pending) + sum(len(s.pending) for s in self._slots)

    def _pump_locked(self) -> None:
        """Send queued tasks: a slot's own (keyed) tasks first, then any task, least loaded
        slot first, at most ``depth`` per slot (``stream_depth`` for an imap/map stream's
        batches, and only behind other such batches). A feeder waiting for the queue to shrink
        (``_take_feed``) is woken when it did."""
        depth = self.depth
        sent = False
        for i, s in enumerate(self._slots):
            while s.pending and s.ready and not s.retiring and len(s.outstanding) < depth:
                self._send_locked(i, s.pending.popleft())
                sent = True
        pending = self._pending
        before = len(pending)
        while pending:
            stream_task = pending[0].batch.stream.kind == "imap"
            best, load = -1, self.stream_depth if stream_task else depth
            for i, s in enumerate(self._slots):
                n = len(s.outstanding)
                if n < load and s.ready and not s.retiring:
                    if n and stream_task and _holds_a_job(s):
                        continue  # not behind a job (an executor's submit), which may be long
                    best, load = i, n
                    if n == 0:
                        break
            if best < 0:
                break
            self._send_locked(best, pending.popleft())
        self._idle = sum(1 for s in self._slots if s.ready and not s.retiring and not s.outstanding)
        if sent or len(pending) < before or self._idle:
            self._space.notify_all()  # (a worker left idle may take a new batch: _take_feed)

    def _send_locked(self, slot: int, task: Task) -> None:
        on_send = task.batch.stream.on_send
        if on_send is not None:
            on_send(task)
            if len(task.failed) == task.n:  # every item was cancelled meanwhile
                task.payload = None
                self._answer_locked(task)
                return
        self._slots[slot].outstanding.append(task)
        self.transport.send(
            slot, task.bid, tuple(task.failed), task.payload, task.batch.stream.call
        )

    # -- events from the transport (its thread) ------------------------------------------------

    def on_ready(self, slot: int, pid: int) -> None:
        with self._lock:
            s = self._slots[slot]
            s.ready = True
            s.retiring = False
            s.pid = pid
            self._ready.notify_all()
            self._pump_locked()
        self._drain_due()

    def on_retire(self, slot: int) -> None:
        with self._lock:
            self._slots[slot].retiring = True
            self._idle = sum(
                1 for s in self._slots if s.ready and not s.retiring and not s.outstanding
            )

    def on_init_error(self, slot: int, exc: BaseException) -> None:
        err = WorkerInitError(f"worker init raised {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        with self._lock:
            if self.state is PoolState.STARTING:
                if self._init_error is None:
                    self._init_error = err
                self._ready.notify_all()
                return
            if self.state in _ENDED:
                return
            self._break_locked(err)
        self._drain_due()
        self.transport.stop(graceful=False)

    def _break_locked(self, error: BaseException) -> None:
        """Fail everything pending and refuse new work: workers cannot be (re)started."""
        self.state = PoolState.BROKEN
        self._broken_error = error
        lost = list(self._pending)
        self._pending.clear()
        for s in self._slots:
            lost.extend(s.outstanding)
            lost.extend(s.pending)
            s.outstanding.clear()
            s.pending.clear()
            s.ready = False
        for task in sorted(lost, key=lambda t: t.bid):
            self._fail_task_locked(task, error)
        for stream in self._streams:
            stream.closed = True
            if stream.kind == "enqueue" and len(stream.batcher):
                batch, items, _ = self._take_locked(stream)  # type: ignore[misc]
                task = Task(batch, self._new_bid(), len(items), None, {})
                batch.tasks.append(task)
                batch.unanswered = 1
                self._fail_task_locked(task, error)
        self._ready.notify_all()
        self._space.notify_all()
        self._flush.notify_all()
        _LIVE_ENGINES.discard(self)

    def _fail_task_locked(self, task: Task, error: BaseException | None) -> None:
        broken = BrokenPool(f"the pool is broken: {error}")
        broken.__cause__ = error
        for pos in range(task.n):
            task.failed.setdefault(pos, broken)
        task.payload = None
        self._answer_locked(task)

    def on_result(
        self, slot: int, bid: int, seconds: float, payload: Any, nerrors: int = 0
    ) -> None:
        """A task's results arrived (``nerrors``: items that failed in the worker;
        ``_wire.ALL_FAILED``: all of them)."""
        with self._lock:
            s = self._slots[slot]
            task = s.outstanding.popleft()
            if task.bid != bid:  # pragma: no cover - a protocol bug, never a user error
                raise AssertionError(f"worker {slot} answered task {bid}, expected {task.bid}")
            self.sizer.observe(task.n, seconds)
            self.sizer.observe_bytes(task.n, len(payload), results=True)
            s.tasks += task.n
            task.frame = payload
            task.payload = None
            self._answer_locked(task, nerrors)
            self._pump_locked()
            works = self._take_for_idle_locked()
            closing = self.state is PoolState.CLOSING
        for work in works:
            self._encode_dispatch(*work)
        if self._due:
            self._drain_due()
        if closing:
            self._maybe_stop()

    def _starts_now(self, stream: Stream, slot: int | None = None) -> bool:
        """Whether a partial batch of ``stream`` cut now would start at once on an idle worker.

        A worker is idle and no task waits for any worker. For a keyed ordered stream, also
        the new item's own worker (``slot``) must be free: with a hot key, every item may be
        for the one busy worker while the others idle, and cutting at each item made one-item
        tasks (100,000 items of one key: 11 s against 0.05 s unkeyed). Its items now wait
        while that worker is busy, and go as one batch once it is free; an item for a free
        worker still goes at once. A callback stream (``KeyedPool``'s jobs) is cut as before:
        a batch completes as a whole, so a job for a free worker must not wait in a batch with
        one for a busy worker. A feeder calls this without the lock: a hint, where a stale
        answer costs a batch cut early or late, nothing else.
        """
        if not self._idle or self._pending:
            return False
        if not stream.keyed or stream.on_batch is not None:
            return True
        return slot is None or self._slot_free(slot)

    def _slot_of(self, stream: Stream, pair: Any) -> int | None:
        """The worker slot of a keyed imap item (a ``(key, item)`` pair), ``None`` otherwise or
        if it is malformed (encoding it raises later, at its position)."""
        if not stream.keyed:
            return None
        try:
            return self.route(pair[0])
        except Exception:
            return None

    def _slot_free(self, slot: int) -> bool:
        """The worker of ``slot`` is ready, holds no task, and none waits for it."""
        s = self._slots[slot]
        return s.ready and not s.retiring and not s.outstanding and not s.pending

    def _has_items_for_free_slot(self, stream: Stream) -> bool:
        """Whether a keyed ordered stream's pending items include one for a free worker (their
        slots: known for ``enqueue``, routed here for ``imap_keyed``). Called per answered
        task and per flusher tick, not per item; it scans the pending items (at most about a
        batch: a cached route each, 0.1 us) until one is for a free worker. A malformed pair
        says True: encoding it raises, as it should."""
        free = {i for i in range(self.workers) if self._slot_free(i)}
        if not free:
            return False
        if stream.kind == "enqueue":
            return not free.isdisjoint(stream.batcher.slots)
        route = self.route
        try:
            return any(route(pair[0]) in free for pair in stream.feed)
        except Exception:
            return True

    def _take_for_idle_locked(self) -> list[tuple[Batch, list[Any], list[int]]]:
        """A worker went idle with nothing queued: take the streams' partial batches now.

        The other half of "send at once when a worker is idle" (Nagle's algorithm): items that
        arrived while every worker was busy wait in a partial batch; when a worker frees up
        with nothing queued for it, they go at once instead of waiting for ``max_delay``.
        """
        works: list[tuple[Batch, list[Any], list[int]]] = []
        if not self._idle or self._pending or self.state is not PoolState.RUNNING:
            return works
        for stream in self._streams:
            if stream.abandoned or stream.closed or not stream.pending():
                continue
            if (
                stream.keyed
                and stream.on_batch is None
                and not self._has_items_for_free_slot(stream)
            ):
                continue
            room = self.window - self._inflight
            if room <= 0:
                continue
            work = self._take_locked(stream, limit=room)
            if work is not None:
                works.append(work)
        return works

    def on_death(
        self, slot: int, exitcode: int | None, pid: int, progress: tuple[int, int]
    ) -> None:
        with self._lock:
            s = self._slots[slot]
            lost = list(s.outstanding)
            s.outstanding.clear()
            was_ready, s.ready = s.ready, False
            retired, s.retiring = s.retiring, False
            if self.state not in (PoolState.STARTING, PoolState.RUNNING, PoolState.CLOSING):
                return
            if not was_ready and not retired:
                # It died in init (os._exit, a signal): restarting would loop forever.
                err = WorkerInitError(
                    f"worker process {pid} died during init ({describe_exit(exitcode)})"
                )
                if self.state is PoolState.STARTING:
                    self._init_error = self._init_error or err
                    self._ready.notify_all()
                    return
                self._pending.extendleft(reversed(lost))
                self._break_locked(err)
                broke = True
            else:
                broke = False
                if not retired:
                    self.restarts += 1
                    self._requeue_lost_locked(lost, exitcode, pid, progress)
                else:
                    self._pending.extendleft(reversed(lost))
                s.started += 1
        if broke:
            self._drain_due()
            self.transport.stop(graceful=False)
            return
        try:
            self.transport.start_worker(slot)
        except BaseException as exc:  # a start failure breaks the pool
            with self._lock:
                self._break_locked(exc)
        self._drain_due()

    def _requeue_lost_locked(
        self, lost: list[Task], exitcode: int | None, pid: int, progress: tuple[int, int]
    ) -> None:
        """A worker died holding ``lost``: blame the running item, re-queue the rest."""
        crashed = WorkerCrashed(
            f"worker process {pid} died ({describe_exit(exitcode)}) while running this item",
            exitcode=exitcode,
            pid=pid,
        )
        running_bid, position = progress
        requeue_any: list[Task] = []
        requeue_pinned: list[Task] = []
        for i, task in enumerate(lost):
            if i == 0 and task.bid == running_bid:
                n = task.n
                if position == n and -1 not in task.attempts:
                    # It died after running every item, while sending the results: no item
                    # is to blame (a kill from outside, an OOM). Run the task again, once.
                    task.attempts[-1] = 1
                    blamed: Iterable[int] = ()
                else:
                    # position -1 (unknown, e.g. a lost Ray actor) or n again: all of them
                    blamed = [position] if 0 <= position < n else range(n)
                newly_blamed = False
                for pos in blamed:
                    if pos in task.failed:
                        continue
                    newly_blamed = True
                    tries = task.attempts.get(pos, 0) + 1
                    task.attempts[pos] = tries
                    if tries > self.retries:
                        task.failed[pos] = crashed
                if blamed and not newly_blamed:
                    # Every item it blames has failed already: the death came after them
                    # (while the results were pickled or written, say), and running the task
                    # again may only repeat it. Count it against the task, then fail the rest.
                    tries = task.attempts.get(-2, 0) + 1
                    task.attempts[-2] = tries
                    if tries > self.retries:
                        for pos in range(n):
                            task.failed.setdefault(pos, crashed)
                if len(task.failed) == task.n:
                    task.payload = None
                    self._answer_locked(task)
                    continue
            (requeue_any if task.slot is None else requeue_pinned).append(task)
        # Lost tasks go first: their items come before everything queued after them.
        self._pending.extendleft(reversed(requeue_any))
        for task in reversed(requeue_pinned):
            self._slots[task.slot].pending.appendleft(task)  # type: ignore[index]

    def _answer_locked(self, task: Task, worker_errors: int = 0) -> None:
        """One task is answered; deliver its batch when it was the last."""
        n = task.n
        if worker_errors == _wire.ALL_FAILED:
            failures = n
        else:
            failures = len(task.failed) + worker_errors
        self.failed += failures
        self.completed += n - failures
        batch = task.batch
        batch.unanswered -= 1
        if batch.unanswered:
            return
        stream = batch.stream
        stream.open_batches -= 1
        size = len(batch)
        if stream.abandoned:
            self._inflight -= size
            self._space.notify_all()
            return
        if stream.on_batch is not None:
            self._inflight -= size
            self._due.append(batch)
            self._space.notify_all()
            if stream.closed and not stream.open_batches:
                self._ready.notify_all()
            return
        stream.reorder.push(batch.seq, batch, size)
        if stream.reorder.items > self.peak_heap:
            self.peak_heap = stream.reorder.items
        if batch.seq == stream.reorder.next_seq or stream.closed:
            self._ready.notify_all()

    def _drain_due(self) -> None:
        """Hand answered batches to their streams' callbacks, outside the lock."""
        while self._due:
            with self._lock:
                due, self._due = self._due, []
            for batch in due:
                batch.stream.on_batch(batch)

    # -- consumer side -------------------------------------------------------------------------

    def next_batch(self, stream: Stream, timeout: float | None = None) -> Batch | None:
        """The stream's next batch in order; ``None`` when the stream has ended.

        Raises:
            PoolClosed: the pool was terminated before the stream's input was processed.
            BrokenPool: the pool broke before that.
            TimeoutError: nothing arrived within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
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
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no result within {timeout} seconds")
                self._ready.wait(remaining)

    def _raise_truncated(self) -> None:
        if self.state is PoolState.BROKEN:
            raise BrokenPool(
                f"the pool broke before this stream's input was processed: {self._broken_error}"
            ) from self._broken_error
        if self.state is PoolState.TERMINATED:
            raise PoolClosed("the pool was terminated before this stream's input was processed")
        raise PoolClosed("the pool was closed before this stream's input was fully read")

    @staticmethod
    def lazy_values(
        batch: Batch,
        on_error: Callable[[int, BaseException], Any] | None = None,
        result: type | None = None,
    ) -> _wire.ChunkValues | None:
        """The batch's values unpickled a chunk at a time as they are iterated, or ``None`` when
        the batch cannot go that way (no item gave a result, errors in the batch, a keyed
        batch merged from several tasks): then use :meth:`decode`. Each value of a chunk
        that cannot be unpickled here goes to ``on_error(position, error)``; with ``result``,
        the iterator yields ``result((index, value, error))`` instead (see
        :func:`_wire.iter_values`).
        """
        tasks = batch.tasks
        if len(tasks) != 1:
            return None
        task = tasks[0]
        if task.positions is not None or task.failed or task.frame is None:
            return None
        values = _wire.iter_values(task.frame, on_error, batch.indices, result)
        if values is not None:
            task.frame = _CONSUMED  # the iterator holds the payload now (see decode)
        return values

    @staticmethod
    def decode(
        batch: Batch, *, interruptible: bool = False
    ) -> tuple[list[Any], dict[int, BaseException] | None]:
        """Values and errors (by position in the batch) of an answered batch.

        A result that cannot be unpickled is its items' error. So is a ``KeyboardInterrupt``
        while unpickling, unless ``interruptible`` (a consumer's thread): then it propagates,
        and decoding the batch again retries it; the caller releases the batch with
        :meth:`release` once it holds the values (a Ctrl-C can land anywhere before that).
        Otherwise the batch is released here.
        """
        tasks = batch.tasks
        if len(tasks) == 1 and tasks[0].positions is None:
            decoded = _decode_task(tasks[0], interruptible)
        else:
            values: list[Any] = [None] * len(batch)
            errors: dict[int, BaseException] = {}
            for task in tasks:
                task_values, task_errors = _decode_task(task, interruptible)
                positions = task.positions
                if positions is None:
                    positions = list(range(task.n))
                for pos, value in zip(positions, task_values):
                    values[pos] = value
                if task_errors:
                    for pos, err in task_errors.items():
                        errors[positions[pos]] = err
            decoded = values, errors or None
        if not interruptible:
            Engine.release(batch)
        return decoded

    @staticmethod
    def release(batch: Batch) -> None:
        """Drop a decoded batch's payloads now rather than at the cyclic GC's next pass (a
        batch and its tasks refer to each other): their buffers are then free for the next
        results (``_Worker._copy_out``)."""
        for task in batch.tasks:
            if task.frame is not None:
                task.frame = _CONSUMED

    # -- control and introspection -------------------------------------------------------------

    def cancel_running(self, task: Task, position: int) -> bool:
        """Ask the worker running ``task`` to stop its item at ``position`` (cooperatively)."""
        with self._lock:
            for i, s in enumerate(self._slots):
                if s.outstanding and s.outstanding[0] is task:
                    slot = i
                    break
            else:
                return False
        self.transport.cancel(slot, task.bid, position)
        return True

    def stats(self) -> PoolStats:
        """A :class:`~ordpool.PoolStats` snapshot (per-worker CPU and RSS from psutil)."""
        with self._lock:
            slots = [
                (s.pid if s.ready else None, bool(s.outstanding), s.tasks, s.started)
                for s in self._slots
            ]
            counters = (self.submitted, self.completed, self.failed, self._inflight)
            in_heap = sum(s.reorder.items for s in self._streams)
            busy = sum(1 for s in self._slots if s.outstanding)
            idle = sum(1 for s in self._slots if s.ready and not s.outstanding)
            restarts, peak = self.restarts, self.peak_heap
        workers = tuple(
            WorkerStats(i, pid, is_busy, done, started, *worker_usage(pid))
            for i, (pid, is_busy, done, started) in enumerate(slots)
        )
        return PoolStats(*counters, in_heap, peak, busy, idle, restarts, self.sizer.size, workers)

    def worker_pids(self) -> list[int]:
        return sorted(self.transport.pids().values())

    @property
    def inflight(self) -> int:
        return self._inflight


def _holds_a_job(slot: _Slot) -> bool:
    """Whether a worker holds a task that is not an imap/map batch (a submit job)."""
    return any(t.batch.stream.kind != "imap" for t in slot.outstanding)


_CONSUMED = b"(consumed)"  # Task.frame once the consumer took the payload


def retrying(call: Callable[[], T]) -> Generator[Interrupted, None, T]:
    """``call()`` for a consumer's batch generator (``yield from`` it): a KeyboardInterrupt in
    it is yielded as :class:`Interrupted`, and ``call()`` made again once the consumer iterates
    again. ``call`` must leave things as they were when interrupted (decoding a batch, loading
    a chunk: :meth:`Engine.decode`, ``_wire.ChunkValues.next_chunk``)."""
    while True:
        try:
            return call()
        except KeyboardInterrupt as exc:
            interrupted = Interrupted(exc)
        # Yielded outside the except block: a suspended generator holding the exception (whose
        # traceback holds the generator) would be a reference cycle, and a consumer that leaves
        # would not release its stream until the next GC pass.
        yield interrupted


def chunks_retrying(lazy: _wire.ChunkValues) -> Generator[Any, None, None]:
    """The chunks of a batch's lazily unpickled values, for a consumer's batch generator
    (``yield from`` it), a KeyboardInterrupt while one loads yielded as by :func:`retrying`."""
    while (chunk := (yield from retrying(lazy.next_chunk))) is not None:
        yield chunk


def decode_retrying(
    batch: Batch,
) -> Generator[Interrupted, None, tuple[list[Any], dict[int, BaseException] | None]]:
    """``Engine.decode(batch)`` through :func:`retrying`. Returns the values and errors; the
    caller releases the batch (:meth:`Engine.release`) once it holds them."""
    return retrying(functools.partial(Engine.decode, batch, interruptible=True))


class Interrupted:
    """What a consumer's batch generator yields when a ``KeyboardInterrupt`` hit it while it
    decoded a batch: an iterator that raises the interrupt once, then is empty.

    The generator cannot let the interrupt propagate (that would finish it: the iteration
    would end there, the rest of the stream silently lost). Yielded to
    ``chain.from_iterable``, this object raises it to the consumer instead, and ``chain`` keeps
    it as its current iterator; iterating again finds it empty, resumes the generator, and the
    generator decodes the same batch again.
    """

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc: BaseException | None = exc

    def __iter__(self) -> Interrupted:
        return self

    def __next__(self) -> Any:
        if self.exc is None:
            raise StopIteration
        try:
            raise self.exc  # no local holds it: that frame would make a cycle with it
        finally:
            self.exc = None


def _decode_task(
    task: Task, interruptible: bool = False
) -> tuple[list[Any], dict[int, BaseException] | None]:
    """Values and errors (by position in the task) of an answered task, local failures merged."""
    n = task.n
    frame = task.frame
    if frame is None:
        return [None] * n, dict(task.failed)
    if frame is _CONSUMED:  # pragma: no cover - a bug of ours, never a user error
        raise AssertionError(f"{task!r} was decoded twice")
    try:
        values, errors = _wire.decode_results(frame)
    except BaseException as exc:  # becomes each item's error
        if interruptible and isinstance(exc, KeyboardInterrupt):
            raise  # not the batch's fault: the consumer decodes it again
        err = RuntimeError(f"could not unpickle the results of this batch: {exc!r}")
        err.__cause__ = exc
        return [None] * n, {pos: err for pos in range(n)}
    if errors and -1 in errors:
        every = errors[-1]
        values = [None] * n
        errors = {pos: every for pos in range(n)}
    if task.failed:
        errors = {**(errors or {}), **task.failed}
    return values, errors or None


def _terminate_all() -> None:
    for engine in list(_LIVE_ENGINES):
        try:
            engine.terminate()
        except Exception:  # interpreter exit: nothing to report to
            pass


# Registered after multiprocessing.util's own exit hook, so it runs first (atexit is LIFO):
# our workers are gone before multiprocessing joins its non-daemonic children.
atexit.register(_terminate_all)
