"""ordpool.kafka: consume Kafka topics in parallel worker processes, each partition in offset
order, committing only what is finished. Needs ``pip install ordpool[kafka]``
(confluent-kafka).

    from ordpool.kafka import OrderedConsumer

    config = {"bootstrap.servers": "localhost:9092", "group.id": "visits"}
    with OrderedConsumer(decode, config, ["visits"], workers=8) as consumer:
        for record in consumer:        # each partition in offset order
            sink.write(record.result)  # record.topic .partition .offset .key .result .error

See :class:`OrderedConsumer` for the commit contract, rebalances, backpressure and dead letters,
and :mod:`ordpool.kafka.broker` for a throwaway local broker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._consumer import OrderedConsumer
    from ._partition import ConsumerStats, PartitionStats, Record

__all__ = ["ConsumerStats", "OrderedConsumer", "PartitionStats", "Record"]


def __getattr__(name: str) -> Any:
    # Imported on first use: ordpool.kafka.broker works without confluent-kafka.
    if name == "OrderedConsumer":
        from ._consumer import OrderedConsumer

        return OrderedConsumer
    if name in ("ConsumerStats", "PartitionStats", "Record"):
        from . import _partition

        return getattr(_partition, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
