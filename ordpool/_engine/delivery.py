"""Delivery: answer accounting, and handing answered batches on, in order or to a callback.

Every item taken into a batch is answered exactly once, by its batch being delivered: with
values from a worker, with local failures (unpicklable, crashed with no retries left, pool
broken), or a mix. A batch is delivered when its last task is answered:

* an ordered stream's batch goes into the stream's reorder buffer, and the consumer thread
  takes batches out of it in ``seq`` order (:meth:`Delivery.next_batch`);
* a callback stream's batch (an executor's futures) is queued in ``due`` and handed to the
  stream's ``on_batch`` outside the lock (:meth:`Delivery.drain_due`), because a future's
  callbacks run user code, which may call back into the pool.
"""

from __future__ import annotations

import time
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


class Delivery:
    """Answer accounting and delivery for one engine. Everything here runs under the engine's
    lock except :meth:`drain_due` (which takes it briefly) and the callbacks it runs."""

    __slots__ = ("completed", "due", "engine", "failed", "hold_seconds", "max_hold", "peak_heap")

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.due: list[Batch] = []  # answered batches of callback streams, to hand over
        self.completed = 0  # items answered with a value, since the start
        self.failed = 0  # items answered with an error
        self.peak_heap = 0  # the most items ever waiting in one reorder buffer
        self.hold_seconds = 0.0  # item-seconds results waited for a predecessor (12.5)
        self.max_hold = 0.0  # the longest one batch waited for a predecessor, seconds (0.02)

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
                batch = stream.reorder.pop()
                if batch is not None:
                    engine.intake.release_locked(len(batch))
                    return batch
                if stream.finished() or stream.abandoned:
                    if not stream.complete and not stream.abandoned:
                        self._raise_truncated()
                    return None
                if engine.state is PoolState.TERMINATED:
                    self._raise_truncated()
                remaining = deadline.remaining()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no result within {timeout} seconds")
                engine.ready.wait(remaining)

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
