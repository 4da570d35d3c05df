"""The feeder: one thread per numbered stream (``imap``, an executor's ``map``) that pulls its
input lazily into the stream, within the window.

Items are appended to ``stream.feed`` without the lock (a list append is atomic, only the
feeder appends, and takers remove from the front under the lock), so reading the input costs
tens of nanoseconds per item. A list or tuple is fed by slices instead, at C speed. An
exception from the input becomes the error of the position where it happened, and the stream
ends there.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterable

from .._core.batching import Task
from .._core.routing import KeyRouter
from .._core.state import PoolState
from .._core.streams import NumberedStream
from .intake import Intake, PacedSequence

if TYPE_CHECKING:
    from .coordinator import Engine

__all__ = ["Feeder"]


class Feeder:
    """Feeds one numbered stream from its input; :meth:`run` is the feeder thread's body."""

    __slots__ = ("engine", "intake", "stream")

    def __init__(self, engine: Engine, stream: NumberedStream) -> None:
        self.engine = engine
        self.intake: Intake = engine.intake
        self.stream = stream

    def run(self, iterable: Iterable[Any] | PacedSequence) -> None:
        """Pull ``iterable`` into the stream until it ends, fails, or the stream goes away."""
        engine = self.engine
        try:
            outcome = self._feed(iterable)
        except BaseException as exc:  # a bug of ours: fail loudly, not silently
            engine.supervisor.break_now(exc)
            return
        if outcome is False:
            return
        if outcome is not True:  # the input raised: its error takes the next position
            if self.take_feed(until_empty=True):
                self._fail_at_end(outcome)
            engine.delivery.drain_due()
            engine.maybe_stop()
            return
        if not self.take_feed(until_empty=True):
            return
        with engine.lock:
            self.stream.closed = self.stream.complete = True
            engine.ready.notify_all()
        engine.maybe_stop()

    def _feed(self, iterable: Iterable[Any] | PacedSequence) -> bool | BaseException:
        """Pull ``iterable`` into the feed: True at its end, False if the stream went away, or
        the exception the input raised. Exceptions of the engine itself propagate."""
        if isinstance(iterable, (list, tuple, PacedSequence)):
            return self._feed_sequence(iterable)
        return self._feed_iterator(iterable)

    def _feed_sequence(
        self, iterable: list[Any] | tuple[Any, ...] | PacedSequence
    ) -> bool | BaseException:
        # A sequence cannot block: feed it by slices, at C speed, each under the lock (once a
        # batch), so that a take can hand a whole slice to its batch without copying it: each
        # copy touches every item's reference count, in memory long out of the caches.
        stream, sizer, lock = self.stream, self.intake.sizer, self.engine.lock
        size = sizer.size
        room = iterable.room if isinstance(iterable, PacedSequence) else None
        seq = iterable.items if isinstance(iterable, PacedSequence) else iterable
        start, end = 0, len(seq)
        with lock:
            stream.feed_locked = True
        while start < end:
            if room is not None:
                try:
                    size = min(size, room(start))
                except BaseException as exc:  # the pacer stopped the input: at its position
                    return exc
            chunk = seq[start : start + size]
            with lock:
                if stream.feed:
                    stream.feed.extend(chunk)
                else:
                    stream.feed = chunk if type(chunk) is list else list(chunk)
            start += size
            if not self.take_feed():
                return False
            size = sizer.size
        return True

    def _feed_iterator(self, iterable: Iterable[Any]) -> bool | BaseException:
        stream, sizer, engine = self.stream, self.intake.sizer, self.engine
        scheduler, flusher, route = engine.scheduler, engine.flusher, engine.route
        keyed = stream.keyed
        monotonic = time.monotonic
        size = sizer.size
        feed = stream.feed  # appended to without the lock: never swapped (not feed_locked)
        append = feed.append
        it = iter(iterable)
        while True:
            # The loop is in its own try so that only the input's exceptions count as the
            # input's: anything raised by take_feed is ours and must not end the stream
            # looking like data.
            try:
                for item in it:
                    append(item)
                    n = len(feed)
                    if n >= size or (
                        scheduler.idle
                        and scheduler.starts_now(stream, _slot_of(route, item) if keyed else None)
                    ):
                        break  # (idle first: no call per item while every worker is busy)
                    if n == 1:
                        stream.pending_since = monotonic()
                        if flusher.idle:
                            with engine.lock:
                                flusher.wake_locked()
                else:
                    return True
            except BaseException as exc:  # delivered at its position
                return exc
            if not self.take_feed():
                return False
            size = sizer.size

    def take_feed(self, *, until_empty: bool = False) -> bool:
        """Move feed items into batches as the window allows; False if the stream is gone."""
        intake, stream = self.intake, self.stream
        while True:
            with self.engine.lock:
                room = self._wait_for_room(until_empty)
                if room is None:
                    return False
                work = intake.take_locked(stream, limit=room)
                more = len(stream.feed) >= (1 if until_empty else intake.sizer.size)
            if work is not None:
                intake.encode_dispatch(*work)
            if not more:
                return True

    def _wait_for_room(self, until_empty: bool) -> int | None:
        """Under the lock: wait until a batch may be cut; the room in the window, or ``None``
        when the stream is gone (abandoned, closed, the pool ended)."""
        engine, intake, stream = self.engine, self.intake, self.stream
        scheduler = engine.scheduler
        while True:
            if stream.abandoned or engine.state in (PoolState.TERMINATED, PoolState.BROKEN):
                return None
            if (stream.closed and not until_empty) or engine.stopping:
                return None  # close() stopped the intake (or the workers already)
            room = intake.window - intake.inflight
            # Wait for room for a whole batch: taking whatever room there is would cut the
            # stream into many small batches, each paying per-batch costs. And cut a batch
            # only when a worker can take it soon (fewer tasks queued than workers, or a worker
            # idle with no task for any worker queued: keyed tasks queued for a hot key's
            # worker must not starve the others): the feed then waits as items, not as batches
            # cut at an old size. Otherwise, before the first results come back to size them,
            # the input would run ahead into the whole window of 16-item batches.
            if (
                room > 0
                and room >= min(len(stream.feed), intake.sizer.size, intake.window)
                and (
                    scheduler.queued_locked() < engine.workers
                    or (scheduler.idle and not scheduler.pending)
                )
            ):
                return room
            engine.space.wait()

    def _fail_at_end(self, exc: BaseException) -> None:
        """The input raised: its error takes the next position, and the stream ends."""
        intake, stream = self.intake, self.stream
        with self.engine.lock:
            if stream.abandoned:
                return
            index = stream.fed
            stream.fed += 1
            intake.inflight += 1
            batch = stream.new_batch(range(index, index + 1))
            task = Task(batch, intake.new_bid(), 1, None, {0: exc})
            batch.tasks.append(task)
            batch.unanswered = 1
            stream.closed = stream.complete = True
            intake.queue_in_order_locked(batch)


def _slot_of(route: KeyRouter, pair: Any) -> int | None:
    """The worker slot of a keyed item (a ``(key, item)`` pair), ``None`` if it is malformed
    (encoding it raises later, at its position)."""
    try:
        return route(pair[0])
    except Exception:
        return None
