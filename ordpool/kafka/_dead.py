"""The dead letter topic: failed messages produced there, counted finished once acknowledged."""

from __future__ import annotations

import logging
import threading
import traceback
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

if TYPE_CHECKING:
    from ._partition import Partition

__all__ = ["DeadLetters", "producer_config"]

LOGGER = logging.getLogger("ordpool.kafka")

# The ``ordpool.error`` header keeps at most the last this many characters of the traceback
# so that a long one does not push the dead letter over the producer's ``message.max.bytes``.
MAX_ERROR_TEXT = 16384

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
    until its produce is acknowledged; a produce that fails on the broker is retried. One the
    producer refuses at once (a value over ``message.max.bytes``, a topic name it rejects)
    is not sent: :meth:`send` returns False and the caller gets the record with ``.error``.
    """

    def __init__(self, topic: str, config: dict[str, Any], lock: threading.RLock) -> None:
        self.topic = topic
        self.producer = Producer(config)
        self.lock = lock  # the consumer's: acknowledgements change partitions' state
        self.produced = 0  # acknowledged
        self.failures = 0  # produce attempts that failed (and were retried)

    def send(self, part: Partition, at: int, error: BaseException) -> bool:
        """Produce the failed message at column position ``at`` of ``part`` (the consumer's
        lock held); False if the producer refused it at once (nothing is waiting then)."""
        offset = part.offsets[at]
        text = "".join(traceback.format_exception(error))[-MAX_ERROR_TEXT:]
        headers = list(part.headers[at] or [])
        headers += [
            ("ordpool.error", text.encode("utf-8", "replace")),
            ("ordpool.error.type", type(error).__name__.encode()),
            ("ordpool.source.topic", part.topic.encode()),
            ("ordpool.source.partition", str(part.number).encode()),
            ("ordpool.source.offset", str(offset).encode()),
        ]
        part.dead.append(offset)
        if self._produce(part, part.keys[at], part.values[at], headers):
            return True
        part.dead.remove(offset)
        return False

    def _produce(self, part: Partition, key: Any, value: Any, headers: list[Any]) -> bool:
        """Hand one dead letter to the producer; False if it refused it at once."""

        def delivered(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self.failures += 1
                if not self._produce(part, key, value, headers):  # at least once: try again
                    # refused at once this time: it holds the partition's commits until
                    # the consumer restarts (and runs that message again)
                    LOGGER.error(
                        "partition %s[%d] commits no further until the consumer restarts",
                        part.topic, part.number,
                    )  # fmt: skip
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
                return True
            except BufferError:  # the producer's queue is full: serve it, then retry
                self.producer.poll(0.1)
            except KafkaException as exc:
                source = dict(headers).get("ordpool.source.offset", b"?").decode()
                LOGGER.error(
                    "dead letter topic %r refused the message at %s[%d] offset %s: %s",
                    self.topic, part.topic, part.number, source, exc.args[0] if exc.args else exc,
                )  # fmt: skip
                return False

    def serve(self, timeout: float = 0.0) -> None:
        """Run acknowledgement callbacks (the poller thread, without the consumer's lock)."""
        self.producer.poll(timeout)

    def flush(self, timeout: float) -> int:
        """Wait for every produce to be acknowledged; returns how many are still waiting."""
        return self.producer.flush(timeout)
