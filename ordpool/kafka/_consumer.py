"""``OrderedConsumer``: a Kafka consumer whose messages run in worker processes, handed back in
each partition's offset order, with commits that never pass an unfinished message.

Threads: the caller's (iterating, ``poll``) takes results and builds records; the poller
(``ordpool-kafka-poller``) calls ``consume`` (so the group membership never lapses, however
slow the caller), feeds each partition's messages into its own ordered stream of the pool,
pauses and resumes partitions, commits on a cadence and runs the rebalance callbacks. One
lock (``_lock``) guards the partition table and the batch the caller is in; the engine's lock
is taken inside it, never the other way round.
"""

from __future__ import annotations

import asyncio
import threading
from itertools import chain
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from .._core.defaults import Deadline
from .._engine.decoding import decode
from .._multistream import take_any
from .._pool import ProcessOrderedPool
from ._dead import DeadLetters, producer_config
from ._fetching import FetchSide
from ._kafka_side import topic_partition
from ._partition import ConsumerStats, Partition, Record, make_records

__all__ = ["OrderedConsumer"]

T = TypeVar("T")

_WAIT = 0.1  # seconds the caller's thread waits at a time (it then checks for close/errors)


class OrderedConsumer(FetchSide):
    """Consume Kafka topics, run ``fn`` over each message's value in worker processes, and
    yield the results as :class:`~ordpool.kafka.Record` objects, each partition in offset
    order (a slow message holds back only its own partition).

    Commits: a record is *finished* when the caller comes back for the next one (or, with
    ``manual_ack=True``, when the caller passes it to :meth:`ack`). Per partition the consumer
    commits the offset after the last *contiguously* finished record: asynchronously every
    ``commit_interval`` seconds, synchronously on :meth:`commit`, :meth:`close` and partition
    revocation. Leaving the ``with`` block normally counts every yielded record as finished;
    leaving it by an exception does not count the record in hand. After a crash a restart
    resumes at the last commit: nothing is lost, and only messages after it come again.

    Rebalances: a revoked partition stops being fed, its results not yet handed out are
    dropped, its watermark is committed before the revocation returns, and nothing of it is
    delivered afterwards. An assigned partition starts at its committed offset.

    Args:
        fn: called in a worker as ``fn(value)`` (``fn(state, value)`` with ``init``) for each
            message's value (``bytes`` or ``None``).
        config: the confluent-kafka consumer configuration (``bootstrap.servers``,
            ``group.id``...). ``enable.auto.commit`` is forced off: the consumer commits.
        topics: topics (or ``^regex`` patterns) to subscribe to.
        workers: worker processes, as for :class:`~ordpool.ProcessOrderedPool`.
        init: builds each worker's state, as for :class:`~ordpool.ProcessOrderedPool`.
        initargs: arguments for ``init``.
        start_method: ``"fork"``, ``"spawn"`` or ``"forkserver"``.
        batch_size: items per batch (default: adaptive, as for the pool).
        max_delay: seconds a partial batch waits for more messages before it is sent.
        keyed: run the messages of one key one at a time, in order, in the same worker
            (keyless messages go by offset).
        dead_letter_topic: produce messages whose ``fn`` raised there instead of yielding
            them (see :class:`~ordpool.kafka._dead.DeadLetters` for the headers); such a
            message is finished once the produce is acknowledged. Default: yield the record
            with ``.error`` set, in order.
        dead_letter_config: extra producer settings for the dead letter topic.
        max_retries: times a message whose worker crashed (segfault, OOM kill) is run again
            before it fails with :class:`~ordpool.WorkerCrashed`.
        max_in_flight: messages read and not yet handed to the caller. At the bound the
            poller stops taking messages from librdkafka's prefetch queue (bounded by
            ``queued.max.messages.kbytes``) but keeps polling, so rebalance callbacks run and
            the membership never lapses however slow the caller; at 1.25 times the bound
            (messages trickle in meanwhile) it pauses every partition, and resumes them under
            half the bound.
        max_bytes_in_flight: the same bound in bytes of message values.
        max_in_flight_per_partition: a partition that reaches this many messages in flight
            is paused, and resumed under half of it (default: no bound of its own).
        max_bytes_per_partition: the same in bytes of message values.
        commit_interval: seconds between asynchronous commits.
        manual_ack: records are finished only when passed to :meth:`ack`.
        poll_timeout: seconds one ``consume`` call of the poller waits for messages.
        on_rebalance: called as ``on_rebalance(event, [(topic, partition), ...])``, where
            ``event`` is ``"assign"``, ``"revoke"`` or ``"lost"``, after the consumer handled
            it (a revoked partition's watermark is committed by then), in the poller's thread.
            It must return promptly: records wait for it, and so does :meth:`close`.
        fetch: who reads the messages from Kafka. ``"parent"`` (default): the consumer reads
            them and sends each to the workers, so that one partition runs in all of them.
            ``"workers"``: each partition is read by one worker itself (its own consumer,
            without a group, from the offsets the group committed) and run there in chunks of
            ``batch_size`` (default 1,000) messages, so the parent handles only the results:
            for topics with at least as many partitions as workers. The commit contract,
            rebalances, dead letters and ``max_retries`` are the same (a crashed chunk is read
            and run again; the deaths count against the message that was running, which fails
            past ``max_retries`` while the others run on). ``keyed`` has no effect: a
            partition runs in one worker, in order. A chunk is handed out when it is full, when
            its partition's end is reached, after ``max_delay`` seconds, or as soon as its
            worker has another partition's messages to run; in :meth:`stats`, ``in_flight``
            and ``held`` count chunks, and ``polled`` is the last offset taken.

    Raises:
        TypeError: ``topics`` is a string (a list of names is needed).
        ValueError: a bad option (the message names it).
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        config: dict[str, Any],
        topics: Iterable[str],
        *,
        workers: int | None = None,
        init: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        keyed: bool = False,
        dead_letter_topic: str | None = None,
        dead_letter_config: dict[str, Any] | None = None,
        max_retries: int = 0,
        max_in_flight: int = 16384,
        max_in_flight_per_partition: int | None = None,
        max_bytes_in_flight: int = 256 << 20,
        max_bytes_per_partition: int | None = None,
        commit_interval: float = 0.5,
        manual_ack: bool = False,
        start_method: str | None = None,
        batch_size: int | None = None,
        max_delay: float = 0.05,
        poll_timeout: float = 0.05,
        on_rebalance: Callable[[str, list[tuple[str, int]]], None] | None = None,
        fetch: str = "parent",
    ) -> None:
        _check_options(locals())
        topics = _check_topics(topics)
        # No bound of their own by default: pausing is the last resort (see _flow)
        per_part = max_in_flight_per_partition or 2 * max_in_flight
        part_bytes = max_bytes_per_partition or 2 * max_bytes_in_flight
        self._init_state(topics, (max_in_flight, per_part, max_bytes_in_flight, part_bytes))
        self._keyed, self._manual = keyed, manual_ack
        self._commit_interval, self._poll_timeout = commit_interval, poll_timeout
        self._on_rebalance = on_rebalance
        if fetch == "workers":
            options = {"workers": workers, "start_method": start_method}
            self._start_fetch_pool(fn, init, tuple(initargs), config, options)
            self._init_fetch(batch_size or 1000, max_delay, max_retries, config)
        else:
            self.pool = ProcessOrderedPool(
                fn,
                workers,
                init=init,
                initargs=initargs,
                window=2 * max_in_flight + 4096,
                batch_size=batch_size,
                max_delay=max_delay,
                retries=max_retries,
                start_method=start_method,
            )
            self._engine = self.pool._live()
            if batch_size is None:  # at least 8 batches per worker in flight: no bubbles
                self._engine.sizer.limit(max(64, max_in_flight // (8 * self._engine.workers)))
        try:
            self._start_kafka(config, dead_letter_topic, dead_letter_config)
        except BaseException:
            self.pool.terminate()
            self._close_fetch()
            raise

    def _start_kafka(
        self, config: dict[str, Any], dead_topic: str | None, dead_config: dict[str, Any] | None
    ) -> None:
        user_on_commit = config.get("on_commit")

        def on_commit(err: KafkaError | None, partitions: list[TopicPartition]) -> None:
            self._committed(err, partitions)
            if user_on_commit is not None:
                user_on_commit(err, partitions)

        conf = {**config, "enable.auto.commit": False, "on_commit": on_commit}
        self._dead = None
        if dead_topic is not None:
            self._dead = DeadLetters(dead_topic, producer_config(config, dead_config), self._lock)
        self._consumer = Consumer(conf)
        self._consumer.subscribe(
            self._topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        multi = len(self._topics) > 1 or any(t.startswith("^") for t in self._topics)
        self._tp_of: Callable[[Message], Any] = topic_partition if multi else Message.partition
        self._poller = threading.Thread(target=self._poll_loop, name="ordpool-kafka-poller")
        self._poller.daemon = True
        self._poller.start()

    # -- the caller's side ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[Record]:
        """Records as they are ready, each partition in offset order; ends after :meth:`close`.

        Raises:
            KafkaException: the consumer failed (the poller's error, raised here).
            BrokenPool: the worker pool broke.
        """
        return chain.from_iterable(self._batches())

    def _batches(self) -> Iterator[Iterator[Record]]:
        # First what a loop that broke out left of the caller's batch: those records are not
        # finished until they have been handed out.
        yield self._it
        while True:
            self._pass_batch()
            if self._next_batch(_WAIT):
                yield self._it
            elif self._closed or self._closing:
                self._check()
                return
            self._check()

    def poll(self, timeout: float | None = None) -> Record | None:
        """The next record, or ``None`` when none is ready within ``timeout`` seconds
        (``None`` waits until one is, or the consumer is closed)."""
        deadline = Deadline(timeout)
        while True:
            record = next(self._it, None)
            if record is not None:
                return record
            self._pass_batch()
            remaining = deadline.remaining()
            wait = _WAIT if remaining is None else max(0.0, min(remaining, _WAIT))
            if not self._next_batch(wait):
                self._check()
                if self._closed or self._closing:
                    return None
                if remaining is not None and remaining <= 0:
                    return None

    def __aiter__(self) -> AsyncIterator[Record]:
        """``async for record in consumer``: as iterating, without blocking the event loop
        (a wait for records runs in the loop's default executor)."""
        return self._records_async()

    async def _records_async(self) -> AsyncIterator[Record]:
        loop = asyncio.get_running_loop()
        while True:
            waiting = self._waiting
            if waiting is None:
                record = self.poll(0)
                if record is not None:
                    yield record
                    continue
                waiting = self._waiting = loop.run_in_executor(None, self.poll, _WAIT)
            # Shielded: when the caller is cancelled, the poll goes on, and the record it
            # takes is handed out first the next time, instead of lost.
            record = await asyncio.shield(waiting)
            self._waiting = None
            if record is not None:
                yield record
            elif self._closed or self._closing:
                return

    def ack(self, *records: Record) -> None:
        """With ``manual_ack=True``: these records are finished (in any order)."""
        with self._lock:
            for record in records:
                part = self._parts.get((record.topic, record.partition))
                if part is not None:
                    part.ack(record.offset)

    def _check(self) -> None:
        """Raise the poller's error, every time it is asked (the poller is gone: waiting for
        records would wait forever)."""
        error = self._error
        if error is None and not self._poller.is_alive() and not (self._closed or self._closing):
            error = self._error = RuntimeError("the consumer's poller thread has ended")
        if error is not None:
            raise error

    def _pass_batch(self) -> None:
        """The caller came back after the last record of its batch: all of it is finished."""
        part = self._cur
        if part is None:
            return
        with self._lock:
            if not self._manual and not part.revoked:
                part.finished = self._cur_end
            self._cur = None
            self._records = []
            self._it = iter(())

    def _next_batch(self, timeout: float) -> bool:
        """Take the next ready batch of any partition and make it the caller's; False when
        none came within ``timeout``."""
        got = take_any(self._engine, self._streams, timeout)
        if got is None:
            return False
        if self._full or self._paused:
            self._room.set()  # the poller may take messages again
        stream, batch = got
        if batch is None:  # a dropped partition's stream
            with self._engine.lock:
                if stream in self._streams:
                    self._streams.remove(stream)
            return False
        values, errors = decode(batch)
        indices = batch.indices
        with self._lock:
            part = self._by_stream.get(stream)
            if part is None or part.revoked:
                return False
            if part.feed_state is not None:
                return self._take_chunk(part, values[0], errors.get(0) if errors else None)
            start, end = part.take(len(indices))
            if part.offsets[start] != indices[0]:  # pragma: no cover - a bug of ours
                raise AssertionError(f"partition {part.number}: messages out of step")
            keys = part.keys[start:end]
            records = make_records(part.topic, part.number, indices, keys, values)
            if errors:
                records = self._failed(part, records, start, errors)
            self._hand_out(part, records, indices[-1] + 1)
        return True

    def _take_chunk(self, part: Partition, chunk: Any, error: BaseException | None) -> bool:
        """fetch="workers": make a chunk of results the caller's batch (lock held)."""
        records = self._chunk_records(part, chunk, error)
        if records is None:
            return False
        self._hand_out(part, records, chunk.next)
        return True

    def _hand_out(self, part: Partition, records: list[Record], end: int) -> None:
        """Make ``records`` the caller's batch; ``end``: the offset after it (lock held)."""
        if self._manual:
            part.delivered.extend([r.offset for r in records])
        self._cur, self._records, self._it = part, records, iter(records)
        self._cur_end = end
        self._counts["delivered"] += len(records)

    def commit(self) -> None:
        """Commit every partition's watermark now, synchronously (the record in hand is not
        finished yet: it counts once the caller comes back for the next one).

        Raises:
            KafkaException: the commit failed.
        """
        with self._lock:
            marks = self._marks(list(self._parts.values()), in_hand=False, sync=True)
        self._commit_sync(marks)

    # -- lifecycle and introspection ------------------------------------------------------------

    def close(self, *, finished: bool = False) -> None:
        """Commit, leave the group, stop the workers. Idempotent.

        Args:
            finished: count the record in hand as finished (a clean exit of ``with`` does).
        """
        with self._lock:
            if self._closing:
                return
            if self._waiting is not None:
                # An async caller's wait still runs (it was cancelled): the record it takes
                # is never handed out, so the record in hand is not counted (__aexit__ waits
                # for it first and knows better).
                finished = False
            self._clean = finished
            self._closing = True
        if self._poller is not threading.current_thread():
            self._poller.join(10.0)
            if self._poller.is_alive():  # blocked on the pool's window: free it
                self.pool.terminate()
                self._poller.join(10.0)
        try:
            try:
                if self._dead is not None:
                    self._dead.flush(30.0)
                with self._lock:
                    marks = self._marks(list(self._parts.values()), in_hand=finished, sync=True)
                self._commit_sync(marks)
            finally:
                self._consumer.close()  # revokes (commits again only what moved since)
        finally:
            self._closed = True
            self.pool.terminate()
            self._close_fetch()
            with self._engine.lock:
                self._engine.ready.notify_all()

    def __enter__(self) -> OrderedConsumer:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(finished=exc_type is None)

    async def __aenter__(self) -> OrderedConsumer:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        loop = asyncio.get_running_loop()
        finished = exc_type is None
        waiting, self._waiting = self._waiting, None
        if waiting is not None:  # a cancelled ``async for``'s wait: it ends within _WAIT
            try:
                taken = await waiting
            except asyncio.CancelledError:  # cancelled again: close all the same, in a thread
                loop.run_in_executor(None, lambda: self.close(finished=False))
                raise
            except Exception:
                taken = None
            if taken is not None:  # taken, never handed out: not finished
                finished = False
        await loop.run_in_executor(None, lambda: self.close(finished=finished))

    def assignment(self) -> list[tuple[str, int]]:
        """The partitions assigned now, as ``(topic, partition)``."""
        with self._lock:
            return sorted(self._parts)

    def stats(self) -> ConsumerStats:
        """A snapshot: per partition the committed and last polled offsets, in flight, held,
        lag; the commit count and latency; the pool's stats."""
        with self._lock:
            parts = list(self._parts.items())
            counts = dict(self._counts)
            total, worst, acked = self._latency
        highs: dict[tuple[str, int], int | None]
        if self._fetch:  # the parent's consumer fetches nothing: the workers' figures
            highs = {key: p.feed_state.high for key, p in parts if p.feed_state}
        else:
            highs = self._on_poller(lambda: self._high_watermarks([key for key, _ in parts]))
        per = {key: part.stats(highs.get(key)) for key, part in parts}
        dead = self._dead.produced if self._dead is not None else 0
        return ConsumerStats(
            per,
            counts["consumed"],
            counts["delivered"],
            dead,
            counts["commits"],
            total / acked if acked else 0.0,
            worst,
            counts["rebalances"],
            self._revoke_seconds,
            self.pool.stats(),
        )

    def _high_watermarks(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
        """The partitions' high watermarks as last fetched (the poller's thread)."""
        highs: dict[tuple[str, int], int | None] = {}
        for key in keys:
            try:
                _, high = self._consumer.get_watermark_offsets(
                    TopicPartition(*key), timeout=0.5, cached=True
                )
            except (KafkaException, RuntimeError):
                continue
            highs[key] = high
        return highs

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<OrderedConsumer {state} topics={self._topics} partitions={len(self._parts)}>"


def _check_topics(topics: Iterable[str]) -> list[str]:
    """The topics as a list; a plain string (which would subscribe to each of its letters)
    or an empty list is refused."""
    if isinstance(topics, (str, bytes)):
        raise TypeError(f"topics must be a list of topic names, not a string: [{topics!r}]")
    out = list(topics)
    if not out or not all(isinstance(t, str) and t for t in out):
        raise ValueError(f"topics must be a non-empty list of non-empty strings, got {out!r}")
    return out


def _check_options(options: dict[str, Any]) -> None:
    """Refuse (naming the option) a bound or ``batch_size`` that is not a positive int (a
    per-partition bound and ``batch_size`` may be ``None``), a period that is not a positive
    number of seconds, a negative ``max_delay`` or ``max_retries``; ``options``: the
    constructor's arguments."""
    for name in (*_BOUNDS, "batch_size"):
        value = options[name]
        if value is None and (name.endswith("partition") or name == "batch_size"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name in ("commit_interval", "poll_timeout"):
        period = options[name]
        if isinstance(period, bool) or not isinstance(period, (int, float)) or not period > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {period!r}")
    delay = options["max_delay"]
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not delay >= 0:
        raise ValueError(f"max_delay must be a number of seconds >= 0, got {delay!r}")
    if options["fetch"] not in ("parent", "workers"):
        raise ValueError(f"fetch must be 'parent' or 'workers', got {options['fetch']!r}")
    retries = options["max_retries"]
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {retries!r}")


_BOUNDS = (
    "max_in_flight",
    "max_bytes_in_flight",
    "max_in_flight_per_partition",
    "max_bytes_per_partition",
)
