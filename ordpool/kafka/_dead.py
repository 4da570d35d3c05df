"""The dead letter topic: failed messages produced there, counted finished once acknowledged."""

from __future__ import annotations

import threading
import traceback
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, Message, Producer

if TYPE_CHECKING:
    from ._partition import Partition

__all__ = ["DeadLetters", "producer_config"]

# Consumer-only properties, left out of the dead letter producer's configuration.
_CONSUMER_ONLY = (
    "group.id",
    "group.instance.id",
    "group.protocol",
    "group.remote.assignor",
    "auto.offset.reset",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.commit.interval.ms",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "partition.assignment.strategy",
    "isolation.level",
    "fetch.min.bytes",
    "fetch.max.bytes",
    "fetch.wait.max.ms",
    "max.partition.fetch.bytes",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "enable.partition.eof",
    "check.crcs",
    "on_commit",
)


def producer_config(config: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    """The dead letter producer's configuration: the consumer's connection settings, with
    ``extra`` on top (``enable.idempotence`` on unless ``extra`` says otherwise)."""
    out = {k: v for k, v in config.items() if k not in _CONSUMER_ONLY}
    out.setdefault("enable.idempotence", True)
    out.update(extra or {})
    return out


class DeadLetters:
    """Produces failed messages to ``topic``: the original key, value and headers, plus
    headers ``ordpool.error`` (the exception and its worker traceback), ``ordpool.error.type``
    and ``ordpool.source.topic`` / ``.partition`` / ``.offset``.

    A message stays in its partition's ``dead`` (holding the commit watermark below it)
    until its produce is acknowledged; a failed produce is retried.
    """

    def __init__(self, topic: str, config: dict[str, Any], lock: threading.RLock) -> None:
        self.topic = topic
        self.producer = Producer(config)
        self.lock = lock  # the consumer's: acknowledgements change partitions' state
        self.produced = 0  # acknowledged
        self.failures = 0  # produce attempts that failed (and were retried)

    def send(self, part: Partition, at: int, error: BaseException) -> None:
        """Produce the failed message at column position ``at`` of ``part`` (the consumer's
        lock held)."""
        offset = part.offsets[at]
        text = "".join(traceback.format_exception(error))
        headers = list(part.headers[at] or [])
        headers += [
            ("ordpool.error", text.encode("utf-8", "replace")),
            ("ordpool.error.type", type(error).__name__.encode()),
            ("ordpool.source.topic", part.topic.encode()),
            ("ordpool.source.partition", str(part.number).encode()),
            ("ordpool.source.offset", str(offset).encode()),
        ]
        part.dead.append(offset)
        self._produce(part, part.keys[at], part.values[at], headers)

    def _produce(self, part: Partition, key: Any, value: Any, headers: list[Any]) -> None:
        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self.failures += 1
                self._produce(part, key, value, headers)  # at least once: try again
                return
            with self.lock:
                self.produced += 1
                offset = int(dict(headers)["ordpool.source.offset"])
                try:
                    part.dead.remove(offset)
                except ValueError:  # pragma: no cover - acknowledged twice
                    pass

        while True:
            try:
                self.producer.produce(
                    self.topic, value, key, headers=headers, on_delivery=delivered
                )
                return
            except BufferError:  # the producer's queue is full: serve it, then retry
                self.producer.poll(0.1)

    def serve(self, timeout: float = 0.0) -> None:
        """Run acknowledgement callbacks (the poller thread, without the consumer's lock)."""
        self.producer.poll(timeout)

    def flush(self, timeout: float) -> int:
        """Wait for every produce to be acknowledged; returns how many are still waiting."""
        return self.producer.flush(timeout)
