"""Intake: items in, encoded batches queued for the workers, within the window.

Producers add items to an :class:`~ordpool._core.streams.IndexedStream` (``enqueue``); a feeder
thread pulls an input into a :class:`~ordpool._core.streams.NumberedStream`
(:meth:`~ordpool._engine.feeding.Feeder.run`).
Pending items are cut into a batch when there are enough of them (the sizer's size), when an
idle worker could start them now (Nagle-style: a lone item does not wait), or by the flusher
after ``max_delay``. A batch is pickled *before* it counts as queued, outside the lock ("pickle
before commit": an unpicklable item fails at its own position, the pool stays healthy), then
its tasks are queued in the stream's ``seq`` order.

The window: at most ``window`` items are taken into batches and not yet consumed (or handed to
a callback). ``enqueue`` blocks, and a feeder stops reading its input, while it is full.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

from .._core.batching import Batch, Task
from .._core.defaults import Deadline
from .._core.errors import PoolClosed
from .._core.state import PoolState
from .._core.streams import IndexedStream, Stream, Taken
from .._transport import wire as _wire

if TYPE_CHECKING:
    from .coordinator import Engine

__all__ = ["Intake", "PacedSequence"]

# A batch taken from a stream, not yet encoded: (the batch, its items, their slots if keyed).
Work = tuple[Batch, list[Any], list[int]]
# One task's encoding: (slot or None, positions in the batch or None for all, encoded items,
# failed positions).
_Encoded = tuple["int | None", "list[int] | None", _wire.Payload, dict[int, BaseException]]


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


class Intake:
    """The producer side of one engine.

    Attributes:
        window: most items taken into batches and not yet consumed or delivered (16384).
        inflight: items taken into batches and not yet consumed or delivered (4096).
        submitted: items accepted, from the start (indexed streams count at ``enqueue``,
            numbered ones as items are taken from their input).
    """

    __slots__ = ("engine", "inflight", "next_bid", "scheduler", "sizer", "submitted", "window")

    def __init__(self, engine: Engine, window: int) -> None:
        self.engine = engine
        self.scheduler = engine.scheduler
        self.sizer = engine.sizer
        self.window = window
        self.inflight = 0
        self.submitted = 0
        self.next_bid = 0  # wire id of the next task

    def release_locked(self, n: int) -> None:
        """``n`` items left the window (consumed, delivered, or dropped): wake producers."""
        self.inflight -= n
        self.engine.space.notify_all()

    def new_bid(self) -> int:
        bid = self.next_bid
        self.next_bid += 1
        return bid

    # -- indexed streams -----------------------------------------------------------------------

    def enqueue(
        self,
        stream: IndexedStream,
        index: int,
        item: Any,
        slot: int | None,
        timeout: float | None,
    ) -> None:
        """Add one item to an indexed stream, waiting while the window is full.

        Most items of a steady stream cut no batch: they are appended under the engine's
        gate only, not its lock, which the collector, the consumer and the flusher hold for
        longer. Taking that lock once per item made a steady stream's tail latency worse than
        taking it once per bunch of items (``bench/results/2026-12-07-latency-repeat.md``).
        An item takes the locked way when it is the first pending one (it starts the
        flusher's clock), may cut a batch (the batch is full, or a worker is idle and the cut
        is not paced), or when the window is half full, the stream keyed or a callback
        stream's, or the intake closed (to raise). The scheduler's fields are read without
        the lock there: a stale answer only cuts a batch at the next item, result or flusher
        look instead.
        """
        if slot is None and self._appended_at_the_gate(stream, index, item):
            return
        engine = self.engine
        with engine.lock:
            if engine.state is not PoolState.RUNNING or stream.closed:
                self._check_accepts(stream)  # raises
            batcher = stream.batcher
            n = len(batcher.items)
            if self.inflight + n >= self.window:
                self._wait_for_room(stream, index, timeout)
            with engine.gate:  # Batcher.add, inlined: this runs once per item
                last = batcher.last_index
                if type(index) is not int or (last is not None and index <= last):
                    batcher.check(index)  # raises, unless an int subclass in order
                batcher.last_index = index
                batcher.indices.append(index)
                batcher.items.append(item)
                if slot is not None:
                    batcher.slots.append(slot)
                n = len(batcher.items)
            self.submitted += 1
            scheduler = self.scheduler
            if n < self.sizer.size and not (
                # starts_now's cheap refusals first: no idle worker, or an ordered stream's
                # cut still paced (the common answers under a steady stream)
                scheduler.idle
                and (stream.on_batch is not None or scheduler.paced_until <= time.monotonic())
                and scheduler.starts_now(stream, slot)
            ):
                if n == 1:
                    stream.pending_since = time.monotonic()
                    engine.flusher.wake_locked()
                return
            work = self.take_locked(stream)
        assert work is not None  # the item just added is pending
        self.encode_dispatch(*work)

    def _appended_at_the_gate(self, stream: IndexedStream, index: int, item: Any) -> bool:
        """``enqueue``'s path without the engine's lock (see there): True when the item was
        appended, False when it must take the locked way."""
        if type(index) is not int or stream.on_batch is not None:
            return False
        engine, batcher, scheduler = self.engine, stream.batcher, self.scheduler
        with engine.gate:
            n = len(batcher.items)
            last = batcher.last_index
            if not (
                n
                and (last is None or index > last)
                and engine.state is PoolState.RUNNING
                and not stream.closed
                and n + 1 < self.sizer.size
                and 2 * (self.inflight + n + 1) < self.window
                and (not scheduler.idle or scheduler.paced_until > time.monotonic())
            ):
                return False
            batcher.last_index = index
            batcher.indices.append(index)
            batcher.items.append(item)
            stream.unsubmitted += 1
            return True

    def _check_accepts(self, stream: Stream) -> None:
        self.engine.check_open()
        if stream.closed:
            raise PoolClosed("this stream was closed: it takes no new items")

    def _wait_for_room(self, stream: IndexedStream, index: int, timeout: float | None) -> None:
        """Under the lock: send the stream's pending items, then wait until the window has room
        for one more item (``index``, checked again after each wait)."""
        self.wait_for_room_locked(stream, Deadline(timeout), timeout, index)

    def wait_for_room_locked(
        self,
        stream: IndexedStream,
        deadline: Deadline,
        timeout: float | None,
        index: int | None = None,
    ) -> None:
        """Under the lock: send the stream's pending items, then wait until the window has room
        for one more item, until ``deadline`` (``timeout`` seconds from the first call: for
        the message). Raises as ``enqueue`` does when the pool or stream closes meanwhile."""
        engine = self.engine
        batcher = stream.batcher
        while self.inflight + len(batcher) >= self.window:
            if len(batcher):
                work = self.take_locked(stream)
                assert work is not None
                engine.lock.release()
                try:
                    self.encode_dispatch(*work)
                finally:
                    engine.lock.acquire()
            else:
                remaining = deadline.remaining()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"the window stayed full for {timeout} seconds")
                engine.space.wait(remaining)
            if engine.state is not PoolState.RUNNING or stream.closed:
                self._check_accepts(stream)
            if index is not None:
                batcher.check(index)

    def fail_pending_locked(self, stream: Stream, error: BaseException) -> None:
        """The pool broke: answer the stream's accepted, pending items with ``BrokenPool``.
        (A numbered stream's pending items were only read from its input, never accepted.)"""
        if stream.counted_on_take:
            return
        work = self.take_locked(stream)
        if work is None:
            return
        batch, items, _ = work
        task = Task(batch, self.new_bid(), len(items), None, {})
        batch.tasks.append(task)
        batch.unanswered = 1
        self.engine.supervisor.fail_task_locked(task, error)

    # -- cutting and encoding ------------------------------------------------------------------

    def take_locked(self, stream: Stream, limit: int | None = None) -> Work | None:
        """Take the stream's pending items as its next batch (its seq is assigned here)."""
        with self.engine.gate:
            taken: Taken | None = stream.take(limit, self.sizer.size)
            if isinstance(stream, IndexedStream) and stream.unsubmitted:
                self.submitted += stream.unsubmitted
                stream.unsubmitted = 0
        if taken is None:
            return None
        stream.pending_since = 0.0
        scheduler = self.scheduler
        if scheduler.pace:
            scheduler.paced_until = time.monotonic() + scheduler.pace
        indices, items, slots = taken
        if stream.counted_on_take:
            self.submitted += len(items)
        self.inflight += len(items)
        return stream.new_batch(indices), items, slots

    def encode_dispatch(self, batch: Batch, items: list[Any], slots: list[int]) -> None:
        """Pickle a batch's tasks (outside the lock) and queue them for the workers."""
        engine = self.engine
        stream = batch.stream
        if stream.keyed:
            items, slots = stream.split_keys(items, slots, engine.route)
            encoded = _encode_by_slot(items, slots)
        else:
            payload, failed = _wire.encode_items(items)
            encoded = [(None, None, payload, failed)]
        with engine.lock:
            self.sizer.observe_bytes(len(items), sum(e[2].nbytes for e in encoded))
            for task_slot, task_positions, task_payload, task_failed in encoded:
                n = len(task_positions) if task_positions is not None else len(items)
                task = Task(
                    batch, self.new_bid(), n, task_payload, task_failed, task_slot, task_positions
                )
                batch.tasks.append(task)
            batch.unanswered = len(batch.tasks)
            self.queue_in_order_locked(batch)
            self.scheduler.pump_locked()
        engine.delivery.drain_due()

    def queue_in_order_locked(self, batch: Batch) -> None:
        """Queue an encoded batch's tasks for the workers, in the stream's seq order."""
        stream = batch.stream
        if batch.seq != stream.queued_seq:
            stream.parked[batch.seq] = batch  # an earlier batch is still being encoded
            return
        engine = self.engine
        while True:
            stream.queued_seq += 1
            for task in batch.tasks:
                if engine.state is PoolState.BROKEN:
                    engine.supervisor.fail_task_locked(task, engine.supervisor.broken_error)
                elif engine.state is PoolState.TERMINATED:
                    pass  # dropped: terminate() ends every stream
                elif len(task.failed) == task.n:
                    engine.delivery.answer_locked(task)  # nothing to run: every item failed
                else:
                    self.scheduler.queue_locked(task)
            next_batch = stream.parked.pop(stream.queued_seq, None)
            if next_batch is None:
                return
            batch = next_batch

    def take_for_idle_locked(self) -> list[Work]:
        """A worker went idle with nothing queued: take the streams' partial batches now.

        The other half of "send at once when a worker is idle" (Nagle's algorithm): items that
        arrived while every worker was busy wait in a partial batch; when a worker frees up
        with nothing queued for it, they go at once instead of waiting for ``max_delay``; an
        ordered stream's, once the cut pacing allows (:meth:`.Scheduler.paced`).
        """
        works: list[Work] = []
        engine = self.engine
        if not self.scheduler.idle or self.scheduler.pending:
            return works
        if engine.state is not PoolState.RUNNING:
            return works
        paced = self.scheduler.paced()
        for stream in engine.streams:
            if stream.abandoned or stream.closed or not stream.pending():
                continue
            if paced and stream.on_batch is None:
                continue  # cut once the pace allows (the flusher's next look at the latest)
            if (
                stream.keyed
                and stream.on_batch is None
                and not self.scheduler.has_items_for_free_slot(stream)
            ):
                continue
            room = self.window - self.inflight
            if room <= 0:
                continue
            work = self.take_locked(stream, limit=room)
            if work is not None:
                works.append(work)
        return works


def _encode_by_slot(items: list[Any], slots: list[int]) -> list[_Encoded]:
    """A keyed batch's tasks: one per worker slot its items go to, each with the positions of
    its items in the batch (``None`` when the whole batch goes to one slot)."""
    groups: dict[int, list[int]] = {}
    for pos, slot in enumerate(slots):
        groups.setdefault(slot, []).append(pos)
    encoded: list[_Encoded] = []
    for slot, positions in groups.items():
        payload, failed = _wire.encode_items([items[p] for p in positions])
        encoded.append((slot, positions if len(groups) > 1 else None, payload, failed))
    return encoded
