"""The Kafka side of :class:`~ordpool.kafka.OrderedConsumer`: the poller thread (consume, feed,
pause and resume), the commit watermarks and the rebalance callbacks."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from itertools import groupby
from operator import length_hint
from typing import Any, Callable, Iterable, Iterator, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from .._engine import Engine
from .._pool import ProcessOrderedPool
from ._dead import LOGGER, DeadLetters
from ._partition import Partition, Record

__all__ = ["KafkaSide", "topic_partition", "without_events"]

T = TypeVar("T")


class KafkaSide:
    """The consumer's state, and everything that talks to Kafka (see the module docstring of
    :mod:`ordpool.kafka._consumer` for the threads)."""

    pool: ProcessOrderedPool
    _engine: Engine
    _consumer: Consumer
    _dead: DeadLetters | None
    _poller: threading.Thread
    _tp_of: Callable[[Message], Any]

    def _init_state(self, topics: list[str], limits: tuple[int, int, int, int]) -> None:
        self._topics = topics
        self._limits = limits
        self._lock = threading.RLock()
        self._parts: dict[tuple[str, int], Partition] = {}
        self._by_stream: dict[Any, Partition] = {}
        self._streams: list[Any] = []  # the partitions' NamedStreams, for take_any
        self._cur: Partition | None = None  # the partition of the batch the caller is in
        self._records: list[Record] = []
        self._it: Iterator[Record] = iter(())
        self._cur_end = 0  # offset after the batch the caller is in
        self._closing = self._closed = False
        self._clean = False  # closing: whether the record in hand counts as finished
        self._error: BaseException | None = None
        self._counts = {"consumed": 0, "delivered": 0, "commits": 0, "rebalances": 0}
        self._latency = [0.0, 0.0, 0]  # total, max, acknowledged commits
        self._sent_at: list[float] = []
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._manual = False
        self._paused = 0  # partitions paused now
        self._full = False  # the in-flight bounds are reached: take no more messages
        self._revoke_seconds = 0.0  # the longest revocation handled
        self._room = threading.Event()  # set by the caller when it took results
        self._keyed = False
        self._waiting: Any = None  # an async caller's poll still running (an asyncio future)
        self._commit_interval = 0.5
        self._poll_timeout = 0.05
        self._on_rebalance: Callable[[str, list[tuple[str, int]]], None] | None = None

    _fetch = False  # fetch="workers" (FetchSide)

    def _feed_assigned(self, part: Partition) -> None:
        """fetch="workers": a partition was assigned (lock held)."""

    def _feed_revoked(self, part: Partition) -> None:
        """fetch="workers": a partition was revoked (lock held)."""

    def _failed(
        self,
        part: Partition,
        records: list[Record],
        start: int,
        errors: dict[int, BaseException],
    ) -> list[Record]:
        """Failed messages: records with ``.error``, or dead letters (left out)."""
        dead = self._dead
        for pos in sorted(errors, reverse=True):
            if dead is not None and dead.send(part, start + pos, errors[pos]):
                del records[pos]
            else:  # no dead letter topic, or its producer refused this one at once
                records[pos] = records[pos]._replace(error=errors[pos])
        if dead is not None:
            part.dead = type(part.dead)(sorted(part.dead))
        return records

    # -- commits -------------------------------------------------------------------------------

    def _in_batch(self, part: Partition, in_hand: bool) -> int | None:
        """The offset after the last finished record of the caller's batch, if it is in one
        of ``part``: those before the record in hand (``in_hand``: that one too)."""
        if self._cur is not part or self._manual:
            return None
        records = self._records
        done = len(records) - length_hint(self._it) - (0 if in_hand else 1)
        if done <= 0:
            return None
        if done == len(records):  # all of it: dead letters after its last record too
            return self._cur_end
        return records[done - 1].offset + 1

    def _marks(
        self, parts: Iterable[Partition], in_hand: bool, sync: bool = False
    ) -> list[TopicPartition]:
        """The partitions whose watermark is past the last commit sent (lock held); with
        ``sync``, past the last commit acknowledged (one sent but not yet acknowledged is sent
        again, synchronously)."""
        out = []
        for part in parts:
            mark = part.watermark(self._in_batch(part, in_hand))
            if mark is not None and mark != (part.committed if sync else part.sent):
                part.sent = mark
                out.append(TopicPartition(part.topic, part.number, mark))
        return out

    def _commit_sync(self, marks: list[TopicPartition]) -> None:
        if not marks:
            return
        started = time.monotonic()
        try:
            result = self._on_poller(
                lambda: self._consumer.commit(offsets=marks, asynchronous=False)
            )
        except BaseException:
            with self._lock:  # not committed: the cadence's next commit sends them again
                for tp in marks:
                    part = self._parts.get((tp.topic, tp.partition))
                    if part is not None and part.sent == tp.offset:
                        part.sent = part.committed
            raise
        self._note_latency(time.monotonic() - started)
        self._counts["commits"] += 1
        self._committed(None, result or marks, sync=True)

    def _commit_async(self) -> None:
        with self._lock:
            marks = self._marks(list(self._parts.values()), in_hand=False)
        if marks:
            self._sent_at.append(time.monotonic())
            self._counts["commits"] += 1
            self._consumer.commit(offsets=marks, asynchronous=True)

    def _committed(
        self, err: KafkaError | None, partitions: list[TopicPartition], sync: bool = False
    ) -> None:
        """A commit was acknowledged (``on_commit``, or a synchronous commit's result)."""
        if not sync and self._sent_at:
            self._note_latency(time.monotonic() - self._sent_at.pop(0))
        with self._lock:
            for tp in partitions:
                part = self._parts.get((tp.topic, tp.partition))
                if part is None:
                    continue
                if tp.error is not None or err is not None:
                    part.sent = None  # send it again with the next commit
                    continue
                if part.committed is None or tp.offset > part.committed:
                    part.committed = tp.offset

    def _note_latency(self, seconds: float) -> None:
        latency = self._latency
        latency[0] += seconds
        latency[1] = max(latency[1], seconds)
        latency[2] += 1

    # -- the poller's side ---------------------------------------------------------------------

    def _poll_loop(self) -> None:
        next_commit = time.monotonic() + self._commit_interval
        try:
            while not self._closing:
                self._poll_once()
                while not self._calls.empty():
                    self._calls.get()()
                if self._dead is not None:
                    self._dead.serve()
                if time.monotonic() >= next_commit:
                    self._commit_async()
                    next_commit = time.monotonic() + self._commit_interval
        except BaseException as exc:  # handed to the caller's thread
            self._error = exc
            with self._engine.lock:
                self._engine.ready.notify_all()

    def _poll_once(self) -> None:
        """Read what is ready, feed it to the workers, pause and resume partitions."""
        messages = self._consume()
        if messages:
            self._feed(messages)
        self._flow()

    def _consume(self) -> list[Message]:
        """The messages ready now, else wait for one (``poll_timeout``). While the consumer
        is full (``max_in_flight``), it leaves the messages in librdkafka's queue and takes one
        per ``poll_timeout`` or per batch the caller takes (``_room``): the callbacks still run
        and the group membership never lapses, and nothing is paused (a resumed partition
        waits for a fetch round trip)."""
        consumer = self._consumer
        if self._full:
            self._room.wait(self._poll_timeout)
            self._room.clear()
            return consumer.consume(1, 0)
        messages = consumer.consume(1024, 0)
        if messages:
            return messages
        # some partitions paused: come back soon to resume them
        messages = consumer.consume(1, 0.005 if self._paused else self._poll_timeout)
        if messages:
            messages += consumer.consume(1023, 0)
        return messages

    def _on_poller(self, call: Callable[[], T]) -> T:
        """Run ``call`` on the poller's thread and return its result (a Consumer serves one
        thread at a time: a call from another would wait on the poller's next ``consume``)."""
        poller = self._poller
        if poller is threading.current_thread() or not poller.is_alive():
            return call()
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

        self._calls.put(run)
        while True:
            try:
                return future.result(0.1)
            except FutureTimeout:
                if not poller.is_alive():  # it ended without serving the call: serve it here
                    while not self._calls.empty():
                        self._calls.get()()

    def _feed(self, messages: list[Message]) -> None:
        """Each partition's run of messages into its ordered stream."""
        if any(map(Message.error, messages)):
            messages = without_events(messages)
        self._counts["consumed"] += len(messages)
        tp_of = self._tp_of
        for key, run in groupby(messages, tp_of):
            part = self._parts.get(key if type(key) is tuple else (self._topics[0], key))
            if part is None or part.revoked:
                continue  # fetched before a revocation
            batch = list(run)
            offsets: list[int] = list(map(Message.offset, batch))  # type: ignore[arg-type]
            polled = part.polled
            if polled is not None and offsets[0] <= polled:  # seen already
                keep = [i for i, o in enumerate(offsets) if o > polled]
                batch, offsets = [batch[i] for i in keep], [offsets[i] for i in keep]
                if not batch:
                    continue
            values = list(map(Message.value, batch))
            keys = list(map(Message.key, batch))
            headers = None if self._dead is None else list(map(Message.headers, batch))
            with self._lock:
                part.feed(offsets, keys, values, headers)
                part.fed_bytes += _size(values)
            if self._keyed:
                keys = [k if k is not None else o for k, o in zip(keys, offsets)]  # type: ignore[misc]
            try:
                part.handle.enqueue_many(offsets, values, keys=keys if self._keyed else None)
            except Exception:
                if not part.revoked:
                    raise

    def _flow(self) -> None:
        """Full at the total bounds; pause partitions over their own bounds, or all of them
        at 1.25 times the total bounds; resume them back under half of those."""
        total, per_part, total_bytes, part_bytes = self._limits
        parts = list(self._parts.values())
        in_flight = sum(p.handle.in_flight for p in parts)
        flight_bytes = sum(p.in_flight_bytes() for p in parts)
        self._full = in_flight >= total or flight_bytes >= total_bytes
        over = in_flight >= total + total // 4 or flight_bytes >= total_bytes + total_bytes // 4
        under = in_flight <= total // 2 and flight_bytes <= total_bytes // 2
        pause, resume = [], []
        for p in parts:
            n, b = p.handle.in_flight, p.in_flight_bytes()
            if not p.paused and (over or n >= per_part or b >= part_bytes):
                p.paused = True
                pause.append(TopicPartition(p.topic, p.number))
            elif p.paused and under and n <= per_part // 2 and b <= part_bytes // 2:
                p.paused = False
                resume.append(TopicPartition(p.topic, p.number))
        if pause:
            self._consumer.pause(pause)
        if resume:
            self._consumer.resume(resume)
        self._paused += len(pause) - len(resume)

    # -- rebalances (run in the thread that polls, or closes) ----------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            self._counts["rebalances"] += 1
            for tp in partitions:
                key = (tp.topic, tp.partition)
                if key in self._parts:
                    continue
                stream = self.pool.stream(keyed=self._keyed or self._fetch)
                part = Partition(tp.topic, tp.partition, stream)
                self._parts[key] = part
                self._by_stream[part.stream] = part
                if self._fetch:
                    self._feed_assigned(part)
                with self._engine.lock:
                    self._streams.append(part.stream)
                    self._engine.ready.notify_all()
        if self._on_rebalance is not None:
            self._on_rebalance("assign", [(tp.topic, tp.partition) for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoke(partitions, commit=True)
        if self._on_rebalance is not None:
            self._on_rebalance("revoke", [(tp.topic, tp.partition) for tp in partitions])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoke(partitions, commit=False)
        if self._on_rebalance is not None:
            self._on_rebalance("lost", [(tp.topic, tp.partition) for tp in partitions])

    def _revoke(self, partitions: list[TopicPartition], commit: bool) -> None:
        """Stop feeding, drop what was not handed out (the rest of the caller's batch too),
        commit the watermark, forget them."""
        started = time.monotonic()
        with self._lock:
            self._counts["rebalances"] += 1
            parts = [self._parts.get((tp.topic, tp.partition)) for tp in partitions]
            gone = [p for p in parts if p is not None]
            paused = [TopicPartition(p.topic, p.number) for p in gone if p.paused or p.feed_state]
            if paused:  # librdkafka keeps a partition paused across a reassignment
                try:
                    self._consumer.resume(paused)
                except KafkaException:
                    pass
            for part in gone:
                part.revoked = True
                self._paused -= part.paused
                self._feed_revoked(part)
                part.handle.drop()
                if part is self._cur:
                    mark = self._in_batch(part, self._clean)
                    if mark is not None and (part.finished is None or mark > part.finished):
                        part.finished = mark
                    self._records.clear()  # the caller's iterator stops: nothing more of it
                    self._cur = None
        if commit and self._dead is not None and any(p.dead for p in gone):
            self._dead.flush(10.0)
        with self._lock:
            marks = self._marks(gone, in_hand=self._clean, sync=True) if commit else []
            for part in gone:
                del self._parts[(part.topic, part.number)]
                self._by_stream.pop(part.stream, None)
        if marks:
            try:
                self._commit_sync(marks)
            except KafkaException:
                pass  # the group moved on (the partition is already someone else's)
        if gone:
            seconds = time.monotonic() - started
            self._revoke_seconds = max(self._revoke_seconds, seconds)


def topic_partition(message: Message) -> tuple[str | None, int | None]:
    return message.topic(), message.partition()


def _size(values: list[Any]) -> int:
    try:
        return sum(map(len, values))
    except TypeError:  # tombstones (None values)
        return sum(len(v) for v in values if v is not None)


# Errors that do not end the consumer: a subscribed topic or partition that does not exist
# (yet): librdkafka goes on, and picks it up once it is created.
_GOING_ON = frozenset(
    (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION)
)


def without_events(messages: list[Message]) -> list[Message]:
    """The messages that are not events. End-of-partition events are dropped; an unknown
    topic or partition is logged as a warning (each text at most once a minute) and
    dropped; any other error (authorization, ``auto.offset.reset=error``...) is raised."""
    out = []
    for message in messages:
        error = message.error()
        if error is None:
            out.append(message)
        elif error.code() in _GOING_ON and not error.fatal():
            _warn(error)
        elif error.code() != KafkaError._PARTITION_EOF:
            raise KafkaException(error)
    return out


_WARNED: dict[str, float] = {}  # an error's text -> when it was last logged


def _warn(error: KafkaError) -> None:
    text, now = error.str(), time.monotonic()
    if now - _WARNED.get(text, -60.0) >= 60.0:
        if len(_WARNED) > 1000:  # texts that name offsets or hosts: keep it bounded
            _WARNED.clear()
        _WARNED[text] = now
        LOGGER.warning("Kafka consumer error (going on): %s", text)
