"""The parent's side of ``fetch="workers"`` (see :mod:`ordpool.kafka._fetch` for the
workers'): the parent's consumer keeps the group membership and commits but reads no message
(its partitions stay paused); each partition's chunks are tasks of its own ordered stream,
routed to one worker, at most :data:`DEPTH` of them outstanding at a time.

A partition's first task reads from its committed offset; the next ones go on where the last
ended, in the same worker. A worker that crashed leaves a blame in the progress array: the
chunk is read again up to that message, the message is read without running ``fn`` and
handed out (or dead-lettered) with :class:`~ordpool.WorkerCrashed`, and the partition goes on
after it. A partition that ran dry is asked again after a pause that doubles up to
``poll_timeout``.
"""

from __future__ import annotations

import time
from collections import deque
from itertools import repeat
from typing import Any, Callable

from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, TopicPartition

from .._core.errors import WorkerCrashed
from .._core.routing import fnv1a
from .._pool import ProcessOrderedPool
from ._fetch import Chunk, Fetcher, FetchTask, Progress, run_fetch, worker_config
from ._kafka_side import KafkaSide, without_events
from ._partition import Partition, Record

__all__ = ["DEPTH", "Feed", "FetchSide"]

DEPTH = 2  # chunks asked of a partition and not yet handed to the caller
SLOTS = 1 << 14  # partitions assigned at once, at most
_FIRST_PAUSE = 0.001  # seconds before asking again a partition that ran dry


class Feed:
    """A partition's chunks (``fetch="workers"``), under the consumer's lock."""

    __slots__ = (
        "blind",
        "crashes",
        "explicit",
        "high",
        "index",
        "next",
        "outstanding",
        "pause",
        "plan",
        "retry_at",
        "route",
        "sent",
        "slot",
        "started",
        "tries",
    )

    def __init__(self, slot: int, route: int) -> None:
        self.slot = slot
        self.route = route  # the routing key: the worker that reads this partition
        self.next = OFFSET_INVALID  # where an explicit task starts: the committed offset, then
        # the offset after the last chunk taken
        self.index = 0  # the stream index of the next task
        self.outstanding = 0  # tasks sent and not taken
        self.sent: deque[FetchTask] = deque()  # those tasks, in order
        self.explicit = True  # the next task gives its start offset
        self.plan: deque[FetchTask] = deque()  # explicit tasks to send first (after a crash)
        self.crashes: dict[int, BaseException] = {}  # offset -> why it is read unrun
        self.blind = 0  # crashes in a row with no message to blame
        self.tries: dict[int, int] = {}  # offset -> deaths of workers running it
        self.retry_at = 0.0  # ran dry: when to ask again (0: not waiting)
        self.pause = _FIRST_PAUSE
        self.started = False  # paused in the parent's consumer, start offset known
        self.high: int | None = None  # the high watermark, as a worker last saw it


class FetchSide(KafkaSide):
    """What ``fetch="workers"`` adds to the consumer (see the module docstring)."""

    _progress: Progress | None = None
    _fetch = False
    _chunk = 1000
    _wait = 0.05
    _retries = 0

    def _start_fetch_pool(
        self,
        fn: Callable[..., Any],
        init: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
        config: dict[str, Any],
        options: dict[str, Any],
    ) -> None:
        """The pool whose workers read Kafka (``options``: the pool's ``workers`` and
        ``start_method``)."""
        self._progress = Progress(SLOTS)
        spec = (fn, init, initargs, worker_config(config), self._progress.name)
        try:
            self.pool = ProcessOrderedPool(
                run_fetch,
                init=Fetcher,
                initargs=spec,
                window=1 << 16,
                batch_size=1,
                retries=0,  # counted per message instead (see _blame)
                **options,
            )
        except BaseException:
            self._close_fetch()
            raise
        self._engine = self.pool._live()

    def _init_fetch(self, chunk: int, wait: float, retries: int) -> None:
        self._fetch = True
        self._chunk, self._wait, self._retries = chunk, wait, retries
        self._free = list(range(SLOTS - 1, -1, -1))
        self._owned: frozenset[tuple[str, int]] = frozenset()
        workers = self._engine.workers
        self._routes = _route_keys(workers)
        self._load = [0] * workers

    # -- assignment and revocation (lock held) -------------------------------------------------

    def _feed_assigned(self, part: Partition) -> None:
        if not self._free:
            raise RuntimeError(f"fetch='workers' handles at most {SLOTS} partitions at once")
        worker = min(range(len(self._load)), key=self._load.__getitem__)
        self._load[worker] += 1
        part.feed_state = Feed(self._free.pop(), self._routes[worker])
        self._owned = frozenset(self._parts)

    def _feed_revoked(self, part: Partition) -> None:
        feed = part.feed_state
        if feed is None:
            return
        self._free.append(feed.slot)
        self._load[self._routes.index(feed.route)] -= 1
        self._owned = frozenset(k for k, p in self._parts.items() if not p.revoked)

    # -- the poller's side ---------------------------------------------------------------------

    def _poll_once(self) -> None:
        if self._fetch:
            self._fetch_poll()
        else:
            super()._poll_once()

    def _fetch_poll(self) -> None:
        """Serve the group (no message is read here: stray ones fetched before a partition
        was paused are dropped), start new partitions, ask again those that ran dry."""
        due = [p.feed_state.retry_at for p in self._parts.values() if p.feed_state]
        due = [t for t in due if t]
        wait = self._poll_timeout
        if due:
            wait = max(0.0, min(wait, min(due) - time.monotonic()))
        for message in self._consumer.consume(1024, wait):
            error = message.error()
            if error is not None and error.code() != KafkaError._PARTITION_EOF:
                without_events([message])  # warns, or raises
        self._start_new()
        now = time.monotonic()
        with self._lock:
            for part in list(self._parts.values()):
                feed = part.feed_state
                if feed is not None and feed.retry_at and feed.retry_at <= now:
                    feed.retry_at = 0.0
                    self._top_up(part)

    def _start_new(self) -> None:
        """Pause the newly assigned partitions in the parent's consumer, read their committed
        offsets, send their first tasks."""
        with self._lock:
            new = [p for p in self._parts.values() if p.feed_state and not p.feed_state.started]
        if not new:
            return
        tps = [TopicPartition(p.topic, p.number) for p in new]
        self._consumer.pause(tps)
        committed = self._consumer.committed(tps, timeout=30.0)
        with self._lock:
            for part, tp in zip(new, committed):
                feed = part.feed_state
                if part.revoked or feed is None:
                    continue
                feed.started = True
                if tp.error is None and tp.offset >= 0:
                    feed.next = tp.offset
                self._top_up(part)

    # -- tasks (lock held) ---------------------------------------------------------------------

    def _task(self, feed: Feed, part: Partition, start: int | None, **kw: Any) -> FetchTask:
        parts = max(1, len(self._parts))
        total, per_part, total_bytes, part_bytes = self._limits
        limit = max(1, min(self._chunk, per_part // DEPTH, total // (DEPTH * parts)))
        size = max(1, min(part_bytes // DEPTH, total_bytes // (DEPTH * parts)))
        return FetchTask(
            part.topic,
            part.number,
            start,
            kw.get("end"),
            limit,
            size,
            self._wait,
            self._owned,
            feed.slot,
            raw=kw.get("raw", False),
            dead=self._dead is not None,
        )

    def _top_up(self, part: Partition) -> None:
        """Send the partition's next tasks, up to :data:`DEPTH` outstanding."""
        feed = part.feed_state
        if part.revoked or feed is None or not feed.started or feed.retry_at:
            return
        while feed.outstanding < DEPTH:
            if feed.plan or feed.explicit:
                if feed.outstanding:  # tasks that "go on" come back first, as resyncs
                    return
                if feed.plan:
                    task = feed.plan.popleft()
                else:
                    task = self._task(feed, part, feed.next)
                    feed.explicit = False
            else:
                task = self._task(feed, part, None)
            part.handle.enqueue(feed.index, task, key=feed.route)
            feed.index += 1
            feed.outstanding += 1
            feed.sent.append(task)

    # -- the caller's side (lock held) ---------------------------------------------------------

    def _chunk_records(
        self, part: Partition, chunk: Any, error: BaseException | None
    ) -> list[Record] | None:
        """The records of a chunk just taken (``None``: none to hand out), and the partition's
        next tasks."""
        feed = part.feed_state
        assert feed is not None
        feed.outstanding -= 1
        task = feed.sent.popleft()
        try:
            if error is not None:
                if not isinstance(error, WorkerCrashed):
                    raise error  # the worker could not read Kafka: the consumer fails
                self._blame(part, feed, error)
                return None
            if chunk.resync:
                feed.explicit = True
                return None
            if chunk.next is not None:
                feed.next = chunk.next
            if chunk.high is not None:
                feed.high = chunk.high
            if task.raw and not chunk.offsets:  # not read yet: again, first
                feed.plan.appendleft(task)
            elif task.end is not None and (chunk.next is None or chunk.next < task.end):
                feed.plan.appendleft(task._replace(start=feed.next))  # the rest of it, first
            if not chunk.offsets:
                if not feed.outstanding:  # ran dry: ask again after a pause
                    feed.retry_at = time.monotonic() + feed.pause
                    feed.pause = min(2 * feed.pause, self._poll_timeout)
                return None
            feed.pause = _FIRST_PAUSE
            feed.blind = 0
            return self._records_of(part, feed, chunk)
        finally:
            self._top_up(part)

    def _records_of(self, part: Partition, feed: Feed, chunk: Chunk) -> list[Record]:
        offsets = chunk.offsets
        new = tuple.__new__
        records = list(
            map(
                new,
                repeat(Record),
                zip(
                    repeat(part.topic),
                    repeat(part.number),
                    offsets,
                    chunk.keys,
                    chunk.results,
                    repeat(None),
                ),
            )
        )
        errors = chunk.errors
        if chunk.errors is None and chunk.raws is not None and offsets[0] in feed.crashes:
            errors = {0: feed.crashes.pop(offsets[0])}
        part.polled = offsets[-1]
        part.fed += len(offsets)
        self._counts["consumed"] += len(offsets)
        if errors:
            raws = chunk.raws or {}
            part.offsets, part.keys = offsets, chunk.keys
            part.values = [raws.get(i, (None, None))[0] for i in range(len(offsets))]
            part.headers = [raws.get(i, (None, None))[1] for i in range(len(offsets))]
            records = self._failed(part, records, 0, errors)
            part.offsets, part.keys, part.values, part.headers = [], [], [], []
        return records

    def _blame(self, part: Partition, feed: Feed, error: WorkerCrashed) -> None:
        """A worker died on a chunk of ``part`` (the pool retries nothing here: the count is
        kept per message). Below ``max_retries`` deaths on the message it was running, read
        again from the last chunk taken; at more, read up to that message, then the message
        unrun (it fails with ``error``), then go on after it."""
        assert self._progress is not None
        offset = self._progress[feed.slot]
        feed.explicit = True
        if offset < 0:  # it died reading, before any message ran: read the chunk again
            feed.blind += 1
            if feed.blind > self._retries + 1:
                raise KafkaException(
                    f"workers reading {part.topic}[{part.number}] died "
                    f"{feed.blind} times in a row before running a message: {error}"
                )
            return
        tries = feed.tries[offset] = feed.tries.get(offset, 0) + 1
        if tries <= self._retries:
            return
        del feed.tries[offset]
        feed.crashes[offset] = error
        if feed.next != offset:  # (the messages before it: at most offset - next of them)
            before = self._task(feed, part, feed.next, end=offset)
            if feed.next >= 0:
                before = before._replace(limit=max(before.limit, offset - feed.next))
            feed.plan.append(before._replace(max_bytes=1 << 62))
        feed.plan.append(self._task(feed, part, offset, raw=True))
        feed.explicit = False  # the tasks after the plan go on from the unrun message

    def _close_fetch(self) -> None:
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.close(unlink=True)


def _route_keys(workers: int) -> list[int]:
    """For each worker slot, an int routing key that the pool sends to that slot."""
    keys: dict[int, int] = {}
    k = 0
    while len(keys) < workers:
        keys.setdefault(fnv1a(k) % workers, k)
        k += 1
    return [keys[w] for w in range(workers)]
