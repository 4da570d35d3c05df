"""What the consumer knows of one assigned partition, and the records it hands out.

Plain data under the consumer's lock; no Kafka calls here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

if TYPE_CHECKING:
    from .._core.streams import NamedStream
    from .._multistream import OrderedStream
    from ._fetching import Feed

__all__ = ["ConsumerStats", "Partition", "PartitionStats", "Record", "make_records"]


class Record(NamedTuple):
    """One consumed message, processed.

    Attributes:
        topic, partition, offset: where the message came from.
        key: the message's key (``bytes`` or ``None``).
        result: what ``fn`` returned for the message's value (``None`` when it failed).
        error: the exception ``fn`` raised (with the worker's traceback as ``__cause__``), a
            :class:`~ordpool.WorkerCrashed` for a message whose worker died more than
            ``max_retries`` times, or ``None``.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    result: Any
    error: BaseException | None


def make_records(
    topic: str, number: int, offsets: Sequence[int], keys: list[Any], results: list[Any]
) -> list[Record]:
    """A partition's records, none failed (``tuple.__new__``: no per-record ``__new__``)."""
    new = tuple.__new__
    rows = zip(repeat(topic), repeat(number), offsets, keys, results, repeat(None))
    return list(map(new, repeat(Record), rows))


@dataclass(frozen=True)
class PartitionStats:
    """One assigned partition at one moment.

    Attributes:
        committed: the offset last committed by this consumer (the next offset to read
            after a restart), or ``None`` before its first commit.
        polled: the last offset read from Kafka, or ``None``.
        in_flight: messages fed to the workers and not yet handed to the caller.
        held: of those, results waiting in the partition's reorder buffer.
        lag: the partition's high watermark (as last fetched) minus the committed offset
            (minus the next offset to read, before the first commit); ``None`` if unknown.
        paused: fetching is paused (the partition's in-flight bound was reached).
        dead_letters: messages produced to the dead letter topic and not acknowledged yet.
    """

    committed: int | None
    polled: int | None
    in_flight: int
    held: int
    lag: int | None
    paused: bool
    dead_letters: int


@dataclass(frozen=True)
class ConsumerStats:
    """An :class:`~ordpool.kafka.OrderedConsumer` at one moment.

    Attributes:
        partitions: ``{(topic, partition): PartitionStats}`` of the assigned partitions.
        consumed: messages read from Kafka, from the start.
        delivered: records handed to the caller.
        dead_lettered: messages produced to the dead letter topic (acknowledged).
        commits: offset commits sent (each covers every partition that advanced).
        commit_latency: mean seconds from sending a commit to its acknowledgement.
        max_commit_latency: the longest of them.
        rebalances: partition assignments and revocations handled.
        max_revoke_seconds: the longest a revocation took (dropping the partitions' work in
            flight, waiting for their dead letters, committing), from the callback's start.
        pool: the worker pool's :class:`~ordpool.PoolStats`.
    """

    partitions: dict[tuple[str, int], PartitionStats]
    consumed: int
    delivered: int
    dead_lettered: int
    commits: int
    commit_latency: float
    max_commit_latency: float
    rebalances: int
    max_revoke_seconds: float
    pool: Any


class Partition:
    """One assigned partition: its ordered stream, its messages in flight, its watermark.

    The commit watermark is the offset after the last *contiguously* finished message:
    ``finished`` (records the caller has passed, or acknowledged), capped by the first
    message whose dead letter is not acknowledged yet.
    """

    __slots__ = (
        "acked",
        "committed",
        "dead",
        "delivered",
        "fed",
        "fed_bytes",
        "feed_state",
        "finished",
        "handle",
        "headers",
        "keys",
        "number",
        "offsets",
        "paused",
        "polled",
        "pos",
        "revoked",
        "sent",
        "stream",
        "topic",
        "values",
    )

    def __init__(self, topic: str, number: int, handle: OrderedStream) -> None:
        self.topic = topic
        self.number = number
        self.handle = handle
        self.stream: NamedStream = handle._stream
        # The messages in flight, in offset order, as columns of atoms: holding thousands of
        # Message objects (tracked by the cyclic GC) made the GC's full collections frequent.
        self.keys: list[bytes | None] = []
        self.offsets: list[int] = []
        self.values: list[Any] = []  # kept only for the dead letter topic
        self.headers: list[Any] = []  # likewise
        self.pos = 0  # the columns' [:pos] were handed out already
        self.polled: int | None = None  # the last offset fed
        self.fed = 0  # messages fed, from the assignment
        self.fed_bytes = 0  # their values' bytes
        self.finished: int | None = None  # offset after the last finished record
        self.committed: int | None = None  # acknowledged by the broker
        self.sent: int | None = None  # last commit sent
        self.dead: deque[int] = deque()  # offsets whose dead letter is not acknowledged
        self.delivered: deque[int] = deque()  # manual acks: offsets handed out, not acked
        self.acked: set[int] = set()  # manual acks: acked offsets above the watermark
        self.paused = False
        self.revoked = False
        self.feed_state: Feed | None = None  # fetch="workers": its chunks

    def feed(
        self, offsets: list[int], keys: list[bytes | None], values: list[Any], headers: Any
    ) -> None:
        """Messages fed to the workers (``headers`` is ``None`` without a dead letter
        topic: then the values are not kept either)."""
        self.offsets += offsets
        self.keys += keys
        if headers is not None:
            self.values += values
            self.headers += headers
        self.polled = offsets[-1]
        self.fed += len(offsets)

    def take(self, n: int) -> tuple[int, int]:
        """The column positions ``(start, end)`` of the next ``n`` messages (those of a
        batch of results just taken); read them before the next call."""
        start = self.pos
        if start > 4096 and start * 2 > len(self.offsets):
            for column in (self.offsets, self.keys, self.values, self.headers):
                del column[:start]
            start = 0
        self.pos = start + n
        return start, start + n

    def watermark(self, in_batch: int | None) -> int | None:
        """The offset to commit: after the last contiguously finished record, where
        ``in_batch`` is the offset after the last finished record of the batch the caller is
        in (``None`` when the caller is in no batch of this partition)."""
        mark = self.finished
        if in_batch is not None and (mark is None or in_batch > mark):
            mark = in_batch
        if self.dead and mark is not None and self.dead[0] < mark:
            mark = self.dead[0]
        return mark

    def ack(self, offset: int) -> None:
        """Manual acks: ``offset`` is finished; advance over the contiguous acked run."""
        if not self.delivered or offset < self.delivered[0]:
            return
        self.acked.add(offset)
        delivered, acked = self.delivered, self.acked
        while delivered and delivered[0] in acked:
            done = delivered.popleft()
            acked.discard(done)
            self.finished = done + 1

    def in_flight_bytes(self) -> int:
        """Bytes in flight, estimated from the mean size of the values fed."""
        return self.handle.in_flight * self.fed_bytes // self.fed if self.fed else 0

    def stats(self, high: int | None) -> PartitionStats:
        base = self.committed if self.committed is not None else self.finished
        if base is None and self.polled is not None:
            base = self.polled + 1 - self.handle.in_flight
        lag = None if high is None or high < 0 or base is None else max(0, high - base)
        return PartitionStats(
            self.committed,
            self.polled,
            self.handle.in_flight,
            self.handle.held,
            lag,
            self.paused,
            len(self.dead),
        )
