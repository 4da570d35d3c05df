"""Delivery: answer accounting, and handing answered batches on, in order or to a callback.

Every item taken into a batch is answered exactly once, by its batch being delivered: with
values from a worker, with local failures (unpicklable, crashed with no retries left, pool
broken), or a mix. A batch is delivered when its last task is answered:

* an ordered stream's batch goes into the stream's reorder buffer, and the consumer thread
  takes batches out of it in ``seq`` order (:meth:`Delivery.next_batch`);
* a callback stream's batch (an executor's futures) is queued in ``due`` and handed to the
  stream's ``on_batch`` outside the lock (:meth:`Delivery.drain_due`), because a future's
  callbacks run user code, which may call back into the pool.

Early results: a worker whose item runs longer than ``max_delay`` sends the results finished
before it at once (a PART). They wait in their batch (``Batch.parts``) and reach the consumer as
soon as every earlier batch has, as a view of the batch's first positions
(:meth:`Delivery.next_batch`); the batch's answer then delivers only the positions after them.
Positions delivered early are not run again if the worker dies: the task is sent again with
them marked as not to run, and only the item that was running is blamed.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from .._core.batching import Batch, Task
from .._core.defaults import Deadline
from .._core.errors import BrokenPool, PoolClosed
from .._core.state import PoolState
from .._core.streams import Stream
from .._transport import wire as _wire

if TYPE_CHECKING:
    from .coordinator import Engine

__all__ = ["Delivery"]

_ENDED = object()  # _pop_locked's answer for a stream that has ended


class Delivery:
    """Answer accounting and delivery for one engine. Everything here runs under the engine's
    lock except :meth:`drain_due` (which takes it briefly) and the callbacks it runs."""

    __slots__ = (
        "completed",
        "due",
        "engine",
        "failed",
        "hold_seconds",
        "max_hold",
        "peak_heap",
        "rotor",
    )

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.due: list[Batch] = []  # answered batches of callback streams, to hand over
        self.completed = 0  # items answered with a value, since the start
        self.failed = 0  # items answered with an error
        self.peak_heap = 0  # the most items ever waiting in one reorder buffer
        self.hold_seconds = 0.0  # item-seconds results waited for a predecessor (12.5)
        self.max_hold = 0.0  # the longest one batch waited for a predecessor, seconds (0.02)
        self.rotor = 0  # where next_batch_any's last scan started

    def answer_locked(self, task: Task, worker_errors: int = 0) -> None:
        """One task is answered; deliver its batch when it was the last. ``worker_errors``:
        items that failed in the worker (``wire.ALL_FAILED``: all of them)."""
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
        engine = self.engine
        if stream.abandoned:
            engine.intake.release_locked(len(batch))
            return
        if stream.on_batch is not None:
            engine.intake.release_locked(len(batch))
            self.due.append(batch)
            if stream.closed and not stream.open_batches:
                engine.ready.notify_all()
            return
        reorder = stream.reorder
        self.hold_seconds += reorder.push(
            batch.seq, batch, len(batch), _payload_bytes(batch), time.monotonic()
        )
        if reorder.max_hold > self.max_hold:
            self.max_hold = reorder.max_hold
        if reorder.items > self.peak_heap:
            self.peak_heap = reorder.items
        if batch.seq == stream.reorder.next_seq or stream.closed:
            engine.ready.notify_all()

    def part_locked(self, task: Task, lo: int, hi: int, payload: object) -> None:
        """Results of positions ``lo`` to ``hi`` of a running task arrived early. They wait in
        their batch's ``parts`` until the consumer reaches them, ahead of the rest of the batch.
        Only an ordered stream's single-task batch takes them (a keyed batch split over
        workers, and a callback stream's, wait for their whole answer)."""
        batch = task.batch
        stream = batch.stream
        if stream.on_batch is not None or stream.abandoned or task.positions is not None:
            return
        first = max(lo, batch.taken)  # after a crash, the task's rerun starts over at 0
        if hi <= first:
            return
        if batch.parts is None:
            batch.parts = deque()
            stream.partial[batch.seq] = batch
        batch.parts.append((lo, first, hi, payload))
        batch.taken = hi
        if batch.seq == stream.reorder.next_seq:
            self.engine.ready.notify_all()

    def drain_due(self) -> None:
        """Hand answered batches to their streams' callbacks, outside the lock."""
        while self.due:
            with self.engine.lock:
                due, self.due = self.due, []
            for batch in due:
                on_batch = batch.stream.on_batch
                assert on_batch is not None  # only callback streams' batches are due
                on_batch(batch)

    def next_batch(self, stream: Stream, timeout: float | None = None) -> Batch | None:
        """The stream's next batch in order; ``None`` when the stream has ended.

        Raises:
            PoolClosed: the pool was terminated before the stream's input was processed.
            BrokenPool: the pool broke before that.
            TimeoutError: nothing arrived within ``timeout`` seconds.
        """
        engine = self.engine
        deadline = Deadline(timeout)
        with engine.lock:
            while True:
                got = self._pop_locked(stream)
                if got is not None:
                    return got if isinstance(got, Batch) else None
                remaining = deadline.remaining()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no result within {timeout} seconds")
                engine.ready.wait(remaining)

    def next_batch_any(
        self, streams: list[Stream], timeout: float | None = None
    ) -> tuple[Stream, Batch | None] | None:
        """The next batch in order of whichever of ``streams`` has one first: ``(stream,
        batch)``, ``(stream, None)`` for a stream that has ended (or was dropped), ``None``
        when ``timeout`` passed first. One wait for many ordered streams, with no thread per
        stream; the streams are scanned from a rotating start, so none is starved. The list
        is read again after every wake-up: a caller may change it meanwhile (under the lock)
        and wake the waiter with ``engine.ready.notify_all()``.

        Raises:
            PoolClosed, BrokenPool: as :meth:`next_batch`, for the first stream scanned that
                the pool's end cut short.
        """
        engine = self.engine
        deadline = Deadline(timeout)
        with engine.lock:
            while True:
                n = len(streams)
                if n:
                    self.rotor = start = (self.rotor + 1) % n
                    for i in range(n):
                        stream = streams[(start + i) % n]
                        got = self._pop_locked(stream)
                        if got is not None:
                            return stream, got if isinstance(got, Batch) else None
                remaining = deadline.remaining()
                if remaining is not None and remaining <= 0:
                    return None
                engine.ready.wait(remaining)

    def _pop_locked(self, stream: Stream) -> Batch | object | None:
        """The stream's next batch in order, :data:`_ENDED` when it has ended, ``None`` when
        its next batch has not arrived yet.

        Raises:
            PoolClosed, BrokenPool: the pool's end cut the stream short.
        """
        engine = self.engine
        while True:
            if stream.partial:
                view = self._next_view_locked(stream)
                if view is not None:
                    return view
            batch = stream.reorder.pop()
            if batch is not None:
                engine.intake.release_locked(len(batch))
                if batch.parts is None:
                    return batch
                stream.partial.pop(batch.seq, None)
                rest = _view(batch, 0, batch.taken, len(batch), batch.tasks[0].frame)
                batch.tasks[0].frame = None  # the view holds it now
                if rest is not None:
                    return rest
                continue  # every result came early
            if stream.finished() or stream.abandoned:
                if not stream.complete and not stream.abandoned:
                    self._raise_truncated()
                return _ENDED
            if engine.state is PoolState.TERMINATED:
                self._raise_truncated()
            return None

    def _next_view_locked(self, stream: Stream) -> Batch | None:
        """The next results that came early, if they are next in order."""
        head = stream.partial.get(stream.reorder.next_seq)
        if head is None or not head.parts:
            return None
        lo, first, hi, payload = head.parts.popleft()
        return _view(head, lo, first, hi, payload)

    def _raise_truncated(self) -> None:
        engine = self.engine
        if engine.state is PoolState.BROKEN:
            error = engine.supervisor.broken_error
            raise BrokenPool(
                f"the pool broke before this stream's input was processed: {error}"
            ) from error
        if engine.state is PoolState.TERMINATED:
            raise PoolClosed("the pool was terminated before this stream's input was processed")
        raise PoolClosed("the pool was closed before this stream's input was fully read")


def _payload_bytes(batch: Batch) -> int:
    """Bytes of a batch's pickled results (0 for results failed before they ran)."""
    total = 0
    for task in batch.tasks:
        frame = task.frame
        if frame is not None:
            total += len(frame)
    return total


def _view(batch: Batch, lo: int, first: int, hi: int, payload: object) -> Batch | None:
    """A batch of positions ``first`` to ``hi`` of ``batch``, whose results are ``payload``
    (the results of positions ``lo`` on); ``None`` when it is empty. The consumer decodes and
    releases it as any batch. The window counts the whole batch until its last view is taken.
    """
    if first >= hi:
        return None
    view = Batch(batch.seq, batch.stream, batch.indices[first:hi])
    failed = batch.tasks[0].failed
    local = {pos - first: err for pos, err in failed.items() if first <= pos < hi}
    task = Task(view, batch.tasks[0].bid, hi - first, None, local)
    task.frame = payload
    task.skip = first - lo
    view.tasks.append(task)
    return view
