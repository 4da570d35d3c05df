"""The parent's side of ``fetch="workers"`` (see :mod:`ordpool.kafka._fetch` for the
workers'): the parent's consumer keeps the group membership and commits but reads no message
(its partitions stay paused); each partition's chunks are tasks of its own ordered stream,
routed to one worker, at most :data:`DEPTH` of them outstanding at a time.

A partition's first task reads from its committed offset (or where ``auto.offset.reset``
says); the next ones go on where the last ended, in the same worker. A worker that dies leaves
the offset it was running in the partition's slot of the shared progress array: the
partition then goes one explicit task at a time from the last chunk taken, and a message that
was running at more than ``max_retries`` deaths is read without running ``fn`` and handed out
(or dead-lettered) with :class:`~ordpool.WorkerCrashed`. A chunk that comes back empty is
not replaced at once: the partition is asked again when its other task comes back, or, with
none outstanding, after a pause that doubles up to ``poll_timeout``.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, TopicPartition

from .._core.errors import WorkerCrashed
from .._core.routing import fnv1a
from .._pool import ProcessOrderedPool
from ._dead import LOGGER
from ._fetch import Chunk, Fetcher, FetchTask, Progress, run_fetch, worker_config
from ._kafka_side import KafkaSide, without_events
from ._partition import Partition, Record, make_records

__all__ = ["DEPTH", "Feed", "FetchSide"]

DEPTH = 2  # chunks asked of a partition and not yet handed to the caller
SLOTS = 1 << 14  # partitions assigned at once, at most
_FIRST_PAUSE = 0.001  # seconds before asking again a partition that ran dry
_EARLIEST = frozenset(("smallest", "earliest", "beginning"))
_LATEST = frozenset(("largest", "latest", "end"))


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
        self.crashes: dict[int, BaseException] = {}  # offset -> why it is read unrun
        self.blind = 0  # crashes in a row with no message to blame
        self.tries: dict[int, int] = {}  # offset -> deaths of workers running it
        self.retry_at = 0.0  # ran dry: when to ask again (0: not waiting)
        self.pause = _FIRST_PAUSE
        self.started = False  # paused in the parent's consumer, start offset known
        self.high: int | None = None  # the high watermark, as a worker last saw it


class FetchSide(KafkaSide):
    """What ``fetch="workers"`` adds to the consumer (see the module docstring)."""

    _progress: Progress | None = None  # fetch="workers": the blame slots

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

    def _init_fetch(self, chunk: int, wait: float, retries: int, config: dict[str, Any]) -> None:
        self._fetch = True
        self._reset = str(config.get("auto.offset.reset", "latest")).lower()
        self._chunk, self._wait, self._retries = chunk, wait, retries
        self._free = deque(range(SLOTS))  # first in, first out: a slot rests before reuse
        self._owned: frozenset[tuple[str, int]] = frozenset()
        workers = self._engine.workers
        self._routes = _route_keys(workers)
        self._load = [0] * workers
        self._worker_of: dict[tuple[str, int], int] = {}  # partitions seen: their worker

    # -- assignment and revocation (lock held) -------------------------------------------------

    def _feed_assigned(self, part: Partition) -> None:
        if not self._free:
            raise RuntimeError(f"fetch='workers' handles at most {SLOTS} partitions at once")
        # The worker that read it before, if any (its consumer still holds the partition);
        # else the one with the fewest partitions.
        key = (part.topic, part.number)
        worker = self._worker_of.get(key)
        if worker is None:
            worker = self._worker_of[key] = min(range(len(self._load)), key=self._load.__getitem__)
        self._load[worker] += 1
        part.feed_state = Feed(self._free.popleft(), self._routes[worker])
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
        """Pause the newly assigned partitions in the parent's consumer, find where each
        starts, send their first tasks (a failed lookup is tried again on the next poll)."""
        with self._lock:
            new = [p for p in self._parts.values() if p.feed_state and not p.feed_state.started]
        if not new:
            return
        tps = [TopicPartition(p.topic, p.number) for p in new]
        self._consumer.pause(tps)
        try:
            committed = self._consumer.committed(tps, timeout=10.0)
        except KafkaException as exc:
            LOGGER.warning("committed offsets not read yet (trying again): %s", exc)
            return
        starts: list[int | None] = []
        for tp in committed:
            if tp.error is not None:  # asked again on the next poll
                starts.append(None)
            else:  # no commit: where auto.offset.reset says
                starts.append(tp.offset if tp.offset >= 0 else self._reset_offset(tp))
        with self._lock:
            for part, start in zip(new, starts):
                feed = part.feed_state
                if part.revoked or feed is None or start is None:
                    continue
                feed.started = True
                feed.next = start
                self._top_up(part)

    def _reset_offset(self, tp: TopicPartition) -> int:
        """Where a partition with no commit starts, by ``auto.offset.reset``, resolved here so
        that reading it again after a crash starts at the same offset (``OFFSET_INVALID``:
        let the worker's consumer apply the policy, e.g. ``error``)."""
        policy = self._reset
        if policy not in _EARLIEST and policy not in _LATEST:
            return OFFSET_INVALID
        try:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=10.0)
        except KafkaException:
            return OFFSET_INVALID
        offset = low if policy in _EARLIEST else high
        return offset if offset >= 0 else OFFSET_INVALID

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
        """Send the partition's next tasks, up to :data:`DEPTH` outstanding. After a crash
        or a resync, or while a crashed message waits to be read unrun, one task at a time,
        each from the offset after the last chunk taken (see :meth:`_careful_task`)."""
        feed = part.feed_state
        if part.revoked or feed is None or not feed.started or feed.retry_at:
            return
        while feed.outstanding < DEPTH:
            if feed.explicit or feed.crashes:
                if feed.outstanding:  # tasks that "go on" come back first, as resyncs
                    return
                task = self._careful_task(feed, part)
            else:
                task = self._task(feed, part, None)
            part.handle.enqueue(feed.index, task, key=feed.route)
            feed.index += 1
            feed.outstanding += 1
            feed.sent.append(task)

    def _careful_task(self, feed: Feed, part: Partition) -> FetchTask:
        """From ``feed.next``: the crashed message there, read unrun; or the messages up to
        the next crashed one; or, with none left, a chunk after which tasks "go on"."""
        start = feed.next
        ahead = [c for c in feed.crashes if start < 0 or c >= start]
        poison = min(ahead) if ahead else None
        if poison is not None and poison == start:
            return self._task(feed, part, start, raw=True)
        task = self._task(feed, part, start, end=poison)
        if poison is None:
            feed.explicit = False
        elif start >= 0:  # all of the messages before it: at most poison - start of them
            task = task._replace(limit=max(task.limit, poison - start), max_bytes=1 << 62)
        return task

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
        top_up = True
        try:
            if error is not None:
                feed.explicit = True  # read again from the last chunk taken
                if not isinstance(error, WorkerCrashed):
                    raise error  # the worker could not read Kafka: the caller gets it
                self._blame(part, feed, error)
                return None
            if chunk.resync:
                feed.explicit = True
                return None
            if chunk.high is not None:
                feed.high = chunk.high
            if not chunk.offsets:
                if chunk.next is not None and not task.raw:
                    feed.next = chunk.next
                # Not replaced at once, or a drained partition's tasks never rest: it is asked
                # again when its other task comes back, or, with none outstanding, after a pause
                top_up = False
                if not feed.outstanding and not feed.retry_at:
                    feed.retry_at = time.monotonic() + feed.pause
                    feed.pause = min(2 * feed.pause, self._poll_timeout)
                return None
            feed.pause, feed.retry_at = _FIRST_PAUSE, 0.0
            feed.blind = 0
            if task.raw:
                return self._unrun(part, feed, task, chunk)
            feed.next = chunk.next
            if feed.tries:  # messages that killed a worker once, and ran since
                feed.tries = {o: n for o, n in feed.tries.items() if o >= feed.next}
            return self._records_of(part, chunk, chunk.errors)
        finally:
            if top_up:
                self._top_up(part)

    def _unrun(
        self, part: Partition, feed: Feed, task: FetchTask, chunk: Chunk
    ) -> list[Record] | None:
        """A crashed message, read unrun: its record fails with the crash."""
        offset = chunk.offsets[0]
        error = feed.crashes.pop(task.start, None)  # type: ignore[arg-type]
        feed.explicit = True
        if offset != task.start or error is None:  # gone (retention): run what is there
            feed.next = offset
            return None
        feed.next = offset + 1
        return self._records_of(part, chunk, {0: error})

    def _records_of(
        self, part: Partition, chunk: Chunk, errors: dict[int, Any] | None
    ) -> list[Record]:
        offsets = chunk.offsets
        records = make_records(part.topic, part.number, offsets, chunk.keys, chunk.results)
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
        """A worker died on a chunk of ``part`` (the pool retries nothing here: the deaths are
        counted per message). The chunk is read again from the last chunk taken; a message
        that was running at more than ``max_retries`` deaths is then read unrun, and fails
        with ``error`` (see :meth:`_careful_task`)."""
        assert self._progress is not None
        offset = self._progress[feed.slot]
        if offset < 0 or (feed.next >= 0 and offset < feed.next):
            # it died reading, or between two messages: no message to blame
            feed.blind += 1
            if feed.blind > self._retries + 1:
                raise KafkaException(
                    f"workers reading {part.topic}[{part.number}] died "
                    f"{feed.blind} times in a row, running no message: {error}"
                )
            return
        tries = feed.tries[offset] = feed.tries.get(offset, 0) + 1
        if tries > self._retries:
            del feed.tries[offset]
            feed.crashes[offset] = error

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
