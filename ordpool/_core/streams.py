"""Streams: one ordered (or callback) run of items through the engine, by how items arrive.

Two types, by who numbers the items:

* :class:`IndexedStream`: the caller gives each item its index (``enqueue``, an executor's
  ``submit``); pending items collect in a :class:`~ordpool._core.batching.Batcher`.
* :class:`NumberedStream`: the engine reads items from an input and numbers them 0, 1, 2...
  (``imap``, an executor's ``map``); pending items wait in a plain list, the feed.

Plain data with behaviour, no locking: every method is called under the engine's lock, except
where a docstring says otherwise.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from .batching import Batch, Batcher, Task, compact_indices
from .reorder import ReorderBuffer

__all__ = ["IndexedStream", "NamedStream", "NumberedStream", "Stream", "Taken"]

# What a take hands to encoding: (the batch's indices, its items, the worker slot of each item
# for a keyed IndexedStream or [] otherwise).
Taken = tuple["range | list[int]", list[Any], list[int]]


class Stream:
    """What every stream has: ordering, delivery and lifecycle state.

    Attributes:
        keyed: items carry a worker slot (indexed) or are ``(key, item)`` pairs (numbered);
            ``None`` until an indexed stream's first item says.
        on_batch: ``None`` for an ordered stream; else called as ``on_batch(batch)`` as soon as
            a batch is answered, in any order (the executor completes futures with it).
        on_send: called as ``on_send(task)`` under the engine lock just before a task goes to
            a worker; it may add positions to ``task.failed`` (futures cancelled meanwhile).
        call: the pickled callable the stream's items run with, instead of the pool's ``fn``
            (an executor's ``map(fn, ...)``), or ``b""``.
        queued_seq: seq of the next batch to queue for the workers. Batches are encoded outside
            the lock, by whichever thread took them, so they can finish encoding out of order;
            they are queued strictly in seq order (``parked`` holds early ones) so that a key's
            items reach its worker in submission order.
        parked: encoded batches waiting for an earlier one to be queued ({9: <Batch>}).
        reorder: answered batches waiting for their turn (ordered streams).
        next_seq: seq of the next batch this stream will create (7).
        open_batches: batches taken from the input and not yet answered (3).
        closed: no more batches will be created for this stream.
        complete: every input item was taken into a batch (False when the pool broke or was
            terminated first: the consumer must not mistake that for the end of the input).
        abandoned: the consumer went away: results are dropped as they arrive.
        consumer: a consumer is iterating this stream (one at a time).
        leftover: what a consumer that left its loop mid-batch did not take (the next
            ``results()`` starts there).
        partial: batches still running whose first results arrived early (``Batch.parts``),
            by seq ({4: <Batch>}).
        pending_since: when the oldest pending item arrived (``time.monotonic()``), or 0.0
            when none is pending or its time is not known yet (the flusher then starts the
            clock). A hint written without the lock by a feeder.

    Class attributes, the behaviour that differs by type:
        bulk: batches of a bulk stream (``imap``, ``map``) may be ``stream_depth`` per worker,
            never queue behind a single job, and are not cut while tasks already wait for
            every worker (their feed waits as items instead, to be cut at a measured size).
        counted_on_take: items count as submitted when taken into a batch (read from an
            input), not when added.
        named: a stream of ``ProcessOrderedPool.stream()``: it may be open alongside others.
    """

    bulk: ClassVar[bool] = False
    counted_on_take: ClassVar[bool] = False
    named: ClassVar[bool] = False

    __slots__ = (
        "abandoned",
        "call",
        "closed",
        "complete",
        "consumer",
        "keyed",
        "leftover",
        "next_seq",
        "on_batch",
        "on_send",
        "open_batches",
        "parked",
        "partial",
        "pending_since",
        "queued_seq",
        "reorder",
    )

    def __init__(
        self,
        *,
        keyed: bool | None = False,
        on_batch: Callable[[Batch], None] | None = None,
        call: bytes = b"",
    ) -> None:
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
        self.consumer = False
        self.leftover: Any = None
        self.partial: dict[int, Batch] = {}
        self.pending_since = 0.0

    def pending(self) -> int:
        """Items waiting to be taken into a batch."""
        raise NotImplementedError

    def take(self, limit: int | None, size: int) -> Taken | None:
        """Remove pending items for the next batch: all of them, or (numbered streams) at most
        ``min(limit, size)``; ``None`` when none are pending."""
        raise NotImplementedError

    def close_intake(self) -> bool:
        """``close()`` of the pool: no new items. True when the pending items must still be
        sent (they were accepted); False when the input simply stops being read."""
        raise NotImplementedError

    def split_keys(
        self, items: list[Any], slots: list[int], route: Callable[[Any], int]
    ) -> tuple[list[Any], list[int]]:
        """A keyed batch's items and the worker slot of each (outside the lock)."""
        return items, slots

    def has_item_for(self, free: set[int], route: Callable[[Any], int]) -> bool:
        """Whether a pending item of this keyed stream is for one of the ``free`` slots."""
        raise NotImplementedError

    def new_batch(self, indices: range | list[int]) -> Batch:
        """The next batch of this stream (its seq assigned here), counted as open."""
        batch = Batch(self.next_seq, self, indices)
        self.next_seq += 1
        self.open_batches += 1
        return batch

    def finished(self) -> bool:
        """Nothing more will come out of this stream."""
        return self.closed and self.open_batches == 0 and not len(self.reorder)


class IndexedStream(Stream):
    """Items added one at a time with the caller's indices (``enqueue``, ``submit``).

    Attributes:
        batcher: the pending items, their indices and (keyed) slots.
        unsubmitted: pending items added by ``enqueue``'s path without the engine's lock, not
            yet counted in ``Intake.submitted`` (counted when they are taken).
    """

    __slots__ = ("batcher", "unsubmitted")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.batcher = Batcher()
        self.unsubmitted = 0

    def pending(self) -> int:
        return len(self.batcher)

    def take(self, limit: int | None, size: int) -> Taken | None:
        if not len(self.batcher):
            return None
        indices, items, slots = self.batcher.take()
        return compact_indices(indices), items, slots

    def close_intake(self) -> bool:
        self.closed = self.complete = True
        return True

    def has_item_for(self, free: set[int], route: Callable[[Any], int]) -> bool:
        return not free.isdisjoint(self.batcher.slots)


class NamedStream(IndexedStream):
    """An indexed stream opened by ``ProcessOrderedPool.stream()``: one of any number of
    ordered streams of a pool, alongside its ``imap`` and ``enqueue``/``results`` streams.

    Attributes:
        enqueued: items added so far.
        received: items handed to its consumer (or dropped) so far.
        owner: the public handle (an ``OrderedStream``).
    """

    named = True

    __slots__ = ("enqueued", "owner", "received")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.enqueued = 0
        self.received = 0
        self.owner: Any = None


class NumberedStream(Stream):
    """Items read from an input by a feeder thread and numbered from 0 (``imap``, ``map``).

    Attributes:
        feed: pending items (``(key, item)`` pairs when keyed), appended without the lock by
            the stream's one feeder; takers remove from the front under the lock.
        feed_locked: the feed changes only under the lock (a sequence's feeder adds a slice at
            a time under it), so a take may hand the list itself to the batch, not a copy.
        fed: items taken into batches so far (the next item's index).
    """

    bulk = True
    counted_on_take = True

    __slots__ = ("fed", "feed", "feed_locked")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.feed: list[Any] = []
        self.feed_locked = False
        self.fed = 0

    def pending(self) -> int:
        return len(self.feed)

    def take(self, limit: int | None, size: int) -> Taken | None:
        feed = self.feed
        n = len(feed) if limit is None else min(len(feed), limit, max(size, 1))
        if n <= 0:
            return None
        if n == len(feed) and self.feed_locked:
            items = feed
            self.feed = []
        else:
            items = feed[:n]
            del feed[:n]
        indices = range(self.fed, self.fed + n)
        self.fed += n
        return indices, items, []

    def close_intake(self) -> bool:
        # An input still being read stops being read (it may be endless): what was taken
        # finishes, then the consumer learns that the pool was closed.
        self.closed = True
        return False

    def split_keys(
        self, items: list[Any], slots: list[int], route: Callable[[Any], int]
    ) -> tuple[list[Any], list[int]]:
        # (key, item) pairs: route by the key's stable hash
        return [item for _, item in items], list(map(route, [key for key, _ in items]))

    def has_item_for(self, free: set[int], route: Callable[[Any], int]) -> bool:
        try:
            return any(route(pair[0]) in free for pair in self.feed)
        except Exception:
            return True  # a malformed pair: encoding it raises, as it should
