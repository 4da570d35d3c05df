"""The workers' side of ``fetch="workers"``: each worker reads its partitions' messages from
Kafka itself and runs ``fn`` on them, so the parent handles chunks of results, not messages.

The parent owns the group membership and the commits; a worker's consumer has no group of its
own (a random ``group.id``, no commits) and reads the partitions it is told to, by
``assign()``. One :class:`FetchTask` asks for the next chunk of one partition: from an explicit
offset, or (``start=None``) from where this worker's last chunk of that partition ended. The
parent sends a partition's chunks to one worker (by routing key), so the worker's prefetch
serves them in turn; a worker process that replaced a crashed one has no such place and
answers ``resync`` until the parent sends an explicit offset again.

Before each ``fn`` call the worker writes the message's offset into the partition's slot of a
shared array (:class:`Progress`): after a crash, the parent reads which message was running.
"""

from __future__ import annotations

import struct
import time
import uuid
from collections import deque
from typing import Any, Callable, NamedTuple

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from .._core.errors import wrap_exception
from ._kafka_side import without_events

__all__ = [
    "Chunk",
    "FetchTask",
    "Fetcher",
    "Progress",
    "run_fetch",
    "worker_config",
]

# Messages read ahead for one of a worker's other partitions before it pauses that partition
_STASH_LIMIT = 8192
_WAIT_STEP = 0.005  # seconds one consume() waits while a chunk has nothing yet

# Settings of the user's consumer that belong to the parent's group member only.
_GROUP_ONLY = frozenset(
    (
        "group.id",
        "group.instance.id",
        "group.protocol",
        "group.remote.assignor",
        "partition.assignment.strategy",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "enable.auto.commit",
        "auto.commit.interval.ms",
        "enable.auto.offset.store",
        "enable.partition.eof",
    )
)


def worker_config(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration of a worker's consumer: the user's, less the group's settings and
    the callbacks (which cannot travel to a worker), reading without a group."""
    out = {k: v for k, v in config.items() if k not in _GROUP_ONLY and not callable(v)}
    out.setdefault("queued.max.messages.kbytes", 16384)  # prefetch per worker, not 64 MB
    # Once the prefetch is full, fetch again soon after it has room, not a second later
    out.setdefault("fetch.queue.backoff.ms", 10)
    out.update(
        {
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
        }
    )
    return out


class FetchTask(NamedTuple):
    """The next chunk of one partition, for a worker.

    Attributes:
        topic, partition: which partition.
        start: the offset to read from (``OFFSET_INVALID``: the ``auto.offset.reset``
            policy), or ``None``: where this worker's last chunk of the partition ended.
        end: read no message at or past this offset (``None``: no such bound).
        limit: the most messages in the chunk.
        max_bytes: stop adding messages once their values reach this many bytes.
        wait: seconds a short chunk waits for more messages, while the worker has no messages
            of another partition to run.
        owned: the partitions the parent holds now: the worker lets go of the others.
        slot: the partition's slot in the :class:`Progress` array.
        raw: read the message at ``start`` only, and return it without running ``fn`` (a
            message that crashed its worker).
        dead: return the value and headers of each message whose ``fn`` raised.
    """

    topic: str
    partition: int
    start: int | None
    end: int | None
    limit: int
    max_bytes: int
    wait: float
    owned: frozenset[tuple[str, int]]
    slot: int
    raw: bool = False
    dead: bool = False


class Chunk(NamedTuple):
    """A worker's answer to a :class:`FetchTask`.

    Attributes:
        next: the offset after the last message read (``None``: nothing read yet from a
            ``start`` of ``OFFSET_INVALID``).
        offsets, keys, results: one entry per message read, in offset order (``results``:
            ``None`` where ``fn`` raised).
        errors: ``{position: exception}`` of the messages whose ``fn`` raised, or ``None``.
        raws: ``{position: (value, headers)}`` of those (``dead`` tasks), or of the message of
            a ``raw`` task; else ``None``.
        eof: the chunk reached the partition's end.
        resync: nothing was read: the task said "go on" and this worker has no place in the
            partition (it replaced a crashed one, or let go of the partition).
        high: the partition's high watermark as this worker's consumer last fetched it
            (``None``: not known yet).
    """

    next: int | None
    offsets: list[int]
    keys: list[Any]
    results: list[Any]
    errors: dict[int, Any] | None = None
    raws: dict[int, tuple[Any, Any]] | None = None
    eof: bool = False
    resync: bool = False
    high: int | None = None


class Progress:
    """A shared array of int64, one slot per partition, holding the offset whose ``fn`` runs
    (-1: none yet in its chunk). The parent creates it (``name=None``) and unlinks it; each
    worker attaches to it by name. Read and written with ``struct``, so that no view of the
    memory outlives a call (a lasting one would keep the region from closing at exit)."""

    def __init__(self, slots: int, name: str | None = None) -> None:
        from multiprocessing import shared_memory

        if name is None:
            self.shm = shared_memory.SharedMemory(create=True, size=8 * slots)
        else:
            from .._transport.worker import attach_regions

            self.shm = attach_regions((name,))[0]
        self.name = self.shm.name
        self.buf: Any = self.shm.buf

    def __getitem__(self, slot: int) -> int:
        return int(_SLOT.unpack_from(self.buf, 8 * slot)[0])

    def __setitem__(self, slot: int, offset: int) -> None:
        _SLOT.pack_into(self.buf, 8 * slot, offset)

    def close(self, unlink: bool = False) -> None:
        self.buf = None
        self.shm.close()
        if unlink:
            self.shm.unlink()


_SLOT = struct.Struct("q")


class Fetcher:
    """One worker's state: the user's ``fn`` (bound to its ``init`` state), its consumer, and
    per partition the next offset it will read and the messages it read ahead."""

    def __init__(
        self,
        fn: Callable[..., Any],
        init: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
        config: dict[str, Any],
        progress: str,
    ) -> None:
        if init is not None:
            state = init(*initargs)
            self.call: Callable[[Any], Any] = lambda value: fn(state, value)
        else:
            self.call = fn
        self.progress = Progress(0, progress)
        # Made now, so that it connects while the parent joins its group
        self.consumer = Consumer({**config, "group.id": f"ordpool-fetch-{uuid.uuid4().hex}"})
        self.next: dict[tuple[str, int], int | None] = {}  # assigned: the next offset read
        self.stash: dict[tuple[str, int], deque[Message]] = {}
        self.paused: set[tuple[str, int]] = set()
        self.eof: set[tuple[str, int]] = set()

    def _assign(self, key: tuple[str, int], start: int) -> None:
        consumer = self.consumer
        if key in self.paused:  # librdkafka keeps a pause across a reassignment
            consumer.resume([TopicPartition(*key)])
        if key in self.next:
            consumer.incremental_unassign([TopicPartition(*key)])
        consumer.incremental_assign([TopicPartition(key[0], key[1], start)])
        self.next[key] = start if start >= 0 else None
        self.stash[key] = deque()
        self.paused.discard(key)
        self.eof.discard(key)

    def _release(self, owned: frozenset[tuple[str, int]]) -> None:
        stale = [key for key in self.next if key not in owned]
        if stale:
            paused = [TopicPartition(*key) for key in stale if key in self.paused]
            if paused:  # librdkafka keeps a pause across a reassignment
                self.consumer.resume(paused)
            self.consumer.incremental_unassign([TopicPartition(*key) for key in stale])
            for key in stale:
                del self.next[key], self.stash[key]
                self.paused.discard(key)
                self.eof.discard(key)

    def run(self, task: FetchTask) -> Chunk:
        key = (task.topic, task.partition)
        if task.start is None and key not in self.next:
            return Chunk(None, [], [], [], resync=True)  # (the slot keeps a crash's blame)
        self.progress[task.slot] = -1  # a death from here to the first message: no blame
        self._release(task.owned)
        if task.start is not None and (task.start < 0 or self.next.get(key, -1) != task.start):
            self._assign(key, task.start)
        elif key not in self.next:  # let go of just now: the parent no longer holds it
            return Chunk(None, [], [], [], resync=True)
        if key in self.paused:
            self.consumer.resume([TopicPartition(*key)])
            self.paused.discard(key)
        messages = self._read(key, task)
        if messages:
            self.next[key] = messages[-1].offset() + 1  # type: ignore[operator]
        stash = self.stash[key]
        if task.end is not None and stash and stash[0].offset() >= task.end:  # type: ignore[operator]
            self.next[key] = stash[0].offset()  # past the bound: the next offset there is
        elif self.next[key] is None:  # the start offset was logical: where it resolved
            position = self.consumer.position([TopicPartition(*key)])[0].offset
            if position >= 0:
                self.next[key] = position
        if task.raw:
            return self._raw(key, messages)
        return self._run(key, task, messages)

    def _read(self, key: tuple[str, int], task: FetchTask) -> list[Message]:
        """Up to ``task.limit`` messages of ``key``: those read ahead first, then from the
        consumer, until none is ready (waiting up to ``task.wait`` for more while the worker
        has nothing else to run)."""
        limit = 1 if task.raw else task.limit
        out: list[Message] = []
        stash = self.stash[key]
        size = 0
        while stash and len(out) < limit and size < task.max_bytes:
            if task.end is not None and stash[0].offset() >= task.end:  # type: ignore[operator]
                return out
            out.append(stash.popleft())
            size += len(out[-1].value() or b"")
        deadline = time.monotonic() + task.wait
        consumer = self.consumer
        while len(out) < limit and size < task.max_bytes:
            # Wait for more while the chunk is short, up to ``task.wait``, but only while
            # this worker has nothing else to run, and not once the partition's end is
            # reached with messages in hand: there a record waits for no other.
            idle = not (out and key in self.eof) and not self._ready_elsewhere(key)
            wait = min(_WAIT_STEP, task.wait) if idle else 0.0
            batch = consumer.consume(min(limit - len(out), 1024), wait)
            had = len(out)
            ended = self._sort(key, batch, out, task.end)
            size += sum(len(m.value() or b"") for m in out[had:])
            if ended or time.monotonic() >= deadline:
                break
            if len(out) == had and not (idle and not batch):
                break  # none came at once, or the wait was cut short: the chunk is cut here
        return out

    def _ready_elsewhere(self, key: tuple[str, int]) -> bool:
        """Whether another of this worker's partitions has messages read ahead."""
        return any(stash for other, stash in self.stash.items() if other != key)

    def _sort(
        self, key: tuple[str, int], batch: list[Message], out: list[Message], end: int | None
    ) -> bool:
        """Messages of ``key`` to ``out`` (True once one at or past ``end`` came: it and
        those after it wait in the stash), the other partitions' to their stashes."""
        ended = False
        for message in batch:
            error = message.error()
            tp = (message.topic(), message.partition())
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    if tp in self.next:
                        self.eof.add(tp)
                    continue
                without_events([message])  # an unknown topic or partition: a warning
                continue
            if tp == key:
                self.eof.discard(key)
                if ended or (end is not None and message.offset() >= end):  # type: ignore[operator]
                    ended = True
                    self.stash[key].append(message)
                else:
                    out.append(message)
            elif tp in self.next:
                self.eof.discard(tp)
                stash = self.stash[tp]
                stash.append(message)
                if len(stash) >= _STASH_LIMIT and tp not in self.paused:
                    self.consumer.pause([TopicPartition(*tp)])
                    self.paused.add(tp)
        return ended

    def _run(self, key: tuple[str, int], task: FetchTask, messages: list[Message]) -> Chunk:
        call, progress, slot = self.call, self.progress, task.slot
        results: list[Any] = []
        errors: dict[int, Any] = {}
        offsets: list[int] = [m.offset() for m in messages]  # type: ignore[misc]
        for pos, message in enumerate(messages):
            progress[slot] = offsets[pos]
            try:
                results.append(call(message.value()))
            except Exception as exc:
                errors[pos] = wrap_exception(exc)
                results.append(None)
        progress[slot] = -1  # a death from here on blames no message
        raws = None
        if errors and task.dead:
            raws = {pos: (messages[pos].value(), messages[pos].headers()) for pos in errors}
        return Chunk(
            self.next[key],
            offsets,
            [m.key() for m in messages],
            results,
            errors or None,
            raws,
            key in self.eof,
            high=self._high(key),
        )

    def _high(self, key: tuple[str, int]) -> int | None:
        try:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(*key), cached=True)
        except KafkaException:
            return None
        return high if high >= 0 else None

    def _raw(self, key: tuple[str, int], messages: list[Message]) -> Chunk:
        if not messages:
            return Chunk(self.next[key], [], [], [], eof=key in self.eof)
        message = messages[0]
        return Chunk(
            self.next[key],
            [message.offset()],  # type: ignore[list-item]
            [message.key()],
            [None],
            None,
            {0: (message.value(), message.headers())},
        )


def run_fetch(fetcher: Fetcher, task: FetchTask) -> Chunk:
    """The pool's ``fn`` for ``fetch="workers"``."""
    return fetcher.run(task)
