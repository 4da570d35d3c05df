"""Kafka soak runs against a local broker: a slow caller, and poison messages under load.

``slow-caller``: a caller that takes 1 ms per record for ``--seconds`` (60), with
``max.poll.interval.ms`` far shorter (10 s). It must stay in the group (no rebalance after
the first assignment), get every partition in offset order, and keep the parent's memory flat.

``poison``: ``--messages`` small JSON messages, of which 1 in 1,000 is not JSON (``fn``
raises) and 1 in 10,000 kills its worker every time it runs; ``dead_letter_topic`` and
``max_retries=1``. Every other message must come in offset order; the poison ones must be in
the dead letter topic with their origin in the headers; the report gives the longest gap
between two records the caller got (a stall).

``idle``: a consumer that has caught up (it took every message of a topic) waits for
``--seconds`` with nothing to read; the report gives the CPU its parent and its workers spent
meanwhile, as a share of one core, and the tasks the workers ran.

Usage, from the repository root (the broker binary is fetched on first use)::

    python bench/kafka_soak.py slow-caller --seconds 60 --json slow.json
    python bench/kafka_soak.py poison --messages 100000 --json poison.json
    python bench/kafka_soak.py idle --seconds 10 --json idle.json

``--fetch workers`` runs the consumer with ``fetch="workers"`` (default: ``parent``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ordpool.kafka import OrderedConsumer
from ordpool.kafka.broker import LocalBroker

PARTITIONS = 4


def _topic(bootstrap: str, partitions: int) -> str:
    name = f"soak-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        future.result(30)
    return name


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i, value in enumerate(values):
        while True:
            try:
                producer.produce(topic, value, key=str(i).encode(), partition=i % PARTITIONS)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(60)


def _config(bootstrap: str, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": f"soak-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 2000,
        **extra,
    }


def parse(value: bytes) -> int:
    """The workers' function: a message's ``n``; a crash message kills its worker."""
    message = json.loads(value)
    if message.get("crash"):
        os._exit(9)
    return int(message["n"])


def slow_caller(bootstrap: str, seconds: float, fetch: str) -> dict[str, Any]:
    n = int(seconds * 1000 * 1.5)  # more than a 1 ms caller takes in `seconds`
    topic = _topic(bootstrap, PARTITIONS)
    _produce(bootstrap, topic, [json.dumps({"n": i}).encode() for i in range(n)])
    me = psutil.Process()
    config = _config(bootstrap, **{"max.poll.interval.ms": 10000})
    last: dict[int, int] = {}
    rss: list[tuple[float, float]] = []
    records = 0
    in_order = True
    with OrderedConsumer(parse, config, [topic], workers=2, fetch=fetch) as consumer:
        start = next_sample = time.monotonic()
        for record in consumer:
            if record.offset <= last.get(record.partition, -1):
                in_order = False
            last[record.partition] = record.offset
            records += 1
            time.sleep(0.001)
            now = time.monotonic()
            if now >= next_sample:
                rss.append((round(now - start, 1), me.memory_info().rss / 2**20))
                next_sample = now + 5
            if now - start >= seconds:
                break
        rebalances = consumer.stats().rebalances
    return {
        "records": records,
        "in_order": in_order,
        "rebalances": rebalances,
        "rss_mib": rss,
        "max_poll_interval_ms": 10000,
    }


def poison(bootstrap: str, messages: int, fetch: str) -> dict[str, Any]:
    topic, dlq = _topic(bootstrap, PARTITIONS), _topic(bootstrap, 1)
    values, bad = [], set()
    for i in range(messages):
        if i % 10000 == 4999:
            values.append(json.dumps({"n": i, "crash": True}).encode())
            bad.add(i)
        elif i % 1000 == 999:
            values.append(b"{not json")
            bad.add(i)
        else:
            values.append(json.dumps({"n": i}).encode())
    _produce(bootstrap, topic, values)
    expected = messages - len(bad)
    last: dict[int, int] = {}
    in_order, got, gap = True, 0, 0.0
    with OrderedConsumer(
        parse,
        _config(bootstrap),
        [topic],
        workers=2,
        dead_letter_topic=dlq,
        max_retries=1,
        fetch=fetch,
    ) as consumer:
        start = before = time.monotonic()
        for record in consumer:
            now = time.monotonic()
            gap = max(gap, now - before) if got else gap
            before = now
            if record.error is not None or record.result in bad:
                in_order = False
            if record.offset <= last.get(record.partition, -1):
                in_order = False
            last[record.partition] = record.offset
            got += 1
            if got == expected:
                break
        seconds = time.monotonic() - start
    dead = _read_dead_letters(bootstrap, dlq, len(bad))
    origins = {(h.get("ordpool.source.topic"), h.get("ordpool.source.offset")) for h in dead}
    return {
        "messages": messages,
        "poison": len(bad),
        "delivered": got,
        "in_order": in_order,
        "seconds": round(seconds, 2),
        "longest_gap_s": round(gap, 3),
        "dead_letters": len(dead),
        "dead_letters_with_origin": sum(1 for t, o in origins if t == topic and o is not None),
        "dead_letter_error_types": sorted({h.get("ordpool.error.type", "") for h in dead}),
    }


def idle(bootstrap: str, seconds: float, fetch: str) -> dict[str, Any]:
    topic = _topic(bootstrap, PARTITIONS)
    _produce(bootstrap, topic, [json.dumps({"n": i}).encode() for i in range(1000)])
    with OrderedConsumer(parse, _config(bootstrap), [topic], workers=2, fetch=fetch) as consumer:
        got = sum(1 for _ in zip(range(1000), consumer))
        workers = [psutil.Process(w.pid) for w in consumer.stats().pool.workers]
        processes = [psutil.Process(), *workers]

        def cpu() -> list[float]:
            return [sum(p.cpu_times()[:2]) for p in processes]

        tasks_before = sum(w.tasks_completed for w in consumer.stats().pool.workers)
        before, start = cpu(), time.monotonic()
        polls = 0
        while time.monotonic() - start < seconds:
            if consumer.poll(0.1) is not None:
                raise RuntimeError("a record came to a consumer that had taken them all")
            polls += 1
        after, elapsed = cpu(), time.monotonic() - start
        tasks = sum(w.tasks_completed for w in consumer.stats().pool.workers) - tasks_before
    spent = [b - a for a, b in zip(before, after)]
    return {
        "records_before": got,
        "idle_seconds": round(elapsed, 2),
        "polls": polls,
        "parent_core_share": round(spent[0] / elapsed, 4),
        "workers_core_share": round(sum(spent[1:]) / elapsed, 4),
        "worker_tasks_per_s": round(tasks / elapsed, 1),
    }


def _read_dead_letters(bootstrap: str, topic: str, count: int) -> list[dict[str, str]]:
    consumer = Consumer(_config(bootstrap))
    consumer.subscribe([topic])
    out: list[dict[str, str]] = []
    deadline = time.monotonic() + 60
    while len(out) < count and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        raw = message.headers() or []
        headers: list[tuple[str, Any]] = list(raw.items() if isinstance(raw, dict) else raw)
        out.append({h[0]: h[1].decode() if isinstance(h[1], bytes) else str(h[1]) for h in headers})
    consumer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("slow-caller", "poison", "idle"))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--fetch", choices=("parent", "workers"), default="parent")
    args = parser.parse_args(argv)
    with LocalBroker() as broker:
        if args.mode == "slow-caller":
            result = slow_caller(broker.address, args.seconds, args.fetch)
        elif args.mode == "idle":
            result = idle(broker.address, args.seconds, args.fetch)
        else:
            result = poison(broker.address, args.messages, args.fetch)
    report = {
        "mode": args.mode,
        "command_line": " ".join(["python", "bench/kafka_soak.py", *(argv or sys.argv[1:])]),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "fetch": args.fetch,
        **result,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
