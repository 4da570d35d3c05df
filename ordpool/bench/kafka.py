"""``ordpool bench --kafka``: end to end from a Kafka topic, side by side in one run.

It starts a local broker (tansu, :mod:`ordpool.kafka.broker`) unless ``--bootstrap`` names
one, fills a topic with the workload's messages (or ``--input``'s), and drains it with:

* ``serial``: a plain confluent-kafka loop, ``consume`` then ``fn`` per message, in one
  process;
* ``ordpool``: :class:`ordpool.kafka.OrderedConsumer` with ``--workers`` workers, the parent
  reading the messages and sending them to the workers;
* ``ordpool-fetch-workers``: the same with ``fetch="workers"``: each worker reads its
  partitions' messages itself, and the parent only takes the results;
* where installed, the peers of :mod:`ordpool.bench.kafka_peers` (Bytewax and Arroyo) with as
  many processes as ordpool has workers.

Each engine runs ``--repeat`` times, alternating, on a topic with ``--partitions`` partitions
and on one with a single partition; each run reads the whole topic in a fresh consumer group,
timed from its first message to its last (the group join is left out). Reported: the medians
of messages/s and of the parent's CPU per message (all its threads, librdkafka's included; for
``serial`` that is all the work). Needs the ``kafka`` extra.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import threading
import time
import uuid
from typing import Any, Callable, Sequence

from .kafka_peers import PEERS, installed_peers, process_label, run_peer
from .measure import parent_cpu_seconds
from .report import machine_info, write_json
from .workloads import WORKLOADS, load_callable, make_messages, read_input

__all__ = ["add_arguments", "run_command"]

_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}
_IDLE = 60.0  # seconds without a new message after which an engine's run fails
_FETCH = "ordpool-fetch-workers"  # OrderedConsumer(fetch="workers")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--kafka`` options."""
    parser.add_argument(
        "--kafka",
        action="store_true",
        help="end to end from a Kafka topic: a confluent-kafka loop vs ordpool.kafka's "
        "OrderedConsumer (starts a local broker unless --bootstrap)",
    )
    parser.add_argument(
        "--bootstrap", metavar="HOST:PORT", help="with --kafka: use this broker instead"
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=4,
        metavar="P",
        help="with --kafka: partitions of the topic (default: 4; a 1-partition topic too)",
    )


def run_command(args: argparse.Namespace) -> int:
    """Run the comparison, print it, write ``--json``; the exit status."""
    workload = WORKLOADS[args.workload]
    fn, init = workload.fn, workload.init
    if args.fn:
        fn = load_callable(args.fn, "--fn")
        init = load_callable(args.init, "--init") if args.init else None
    n = args.messages or 300_000
    messages = read_input(args.input, n) if args.input else make_messages(n, args.message_size)
    workers = (args.workers or [2])[0]
    from ..kafka.broker import LocalBroker

    broker = None if args.bootstrap else LocalBroker().start()
    bootstrap = args.bootstrap or (broker.address if broker else "")
    try:
        rows = []
        for partitions in dict.fromkeys((args.partitions, 1)):
            topic = _fill(bootstrap, messages, partitions)
            rows += _compare(bootstrap, topic, len(messages), fn, init, workers, args)
    finally:
        if broker is not None:
            broker.stop()
    report = {
        "kind": "kafka",
        "workload": args.fn or args.workload,
        "messages": len(messages),
        "workers": workers,
        "repeat": args.repeat,
        "broker": args.bootstrap or "local tansu (memory storage)",
        "machine": machine_info(getattr(args, "command_line", "")),
        "versions": _versions(),
        "rows": rows,
    }
    _print(report)
    if args.json:
        write_json(report, args.json)
    return 0


def _versions() -> dict[str, str | None]:
    """The Kafka client's and the peers' versions, for the JSON report (None: absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for package in ("confluent-kafka", "bytewax", "sentry-arroyo"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _fill(bootstrap: str, messages: Sequence[bytes], partitions: int) -> str:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic  # what confluent_kafka.admin re-exports

    topic = f"ordpool-bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(30)
    conf = {"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10000}
    producer = Producer({**conf, "queue.buffering.max.messages": 1_000_000})
    for i, message in enumerate(messages):
        producer.produce(topic, message, partition=i % partitions)
        if i % 10_000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("the broker did not take every message")
    return topic


def _compare(
    bootstrap: str,
    topic: str,
    n: int,
    fn: Callable[..., Any],
    init: Callable[..., Any] | None,
    workers: int,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Every engine, ``args.repeat`` runs each, round-robin; a row per engine (medians).

    A peer's CPU column is that of all its processes, its parent's included where it has one.
    """
    peers = installed_peers()
    workload = {"fn": args.fn, "init": args.init} if args.fn else {"workload": args.workload}
    runs: dict[str, list[tuple[float, float]]] = {"serial": [], "ordpool": [], _FETCH: []}
    runs.update({peer: [] for peer in peers})
    for _ in range(args.repeat):
        runs["serial"].append(_serial(bootstrap, topic, n, fn, init))
        runs["ordpool"].append(_ordpool(bootstrap, topic, n, fn, init, workers, args))
        runs[_FETCH].append(_ordpool(bootstrap, topic, n, fn, init, workers, args, "workers"))
        for peer in peers:
            runs[peer].append(run_peer(peer, bootstrap, topic, n, workers, workload))
    partitions = len(_partitions(bootstrap, topic))
    serial_rate = statistics.median(r[0] for r in runs["serial"])
    labels = {"serial": "1", "ordpool": f"1 + {workers}", _FETCH: f"1 + {workers}"}
    rows = []
    for engine, results in runs.items():
        rate = statistics.median(r[0] for r in results)
        cpu = statistics.median(r[1] for r in results)
        rows.append(
            {
                "engine": engine,
                "partitions": partitions,
                "processes": labels.get(engine) or process_label(engine, workers),
                "msgs_per_s": rate,
                "x_serial": rate / serial_rate,
                "parent_us_per_msg": cpu if engine in labels else None,
                "all_processes_us_per_msg": None if engine in labels else cpu,
                "runs": results,
            }
        )
    return rows


def _config(bootstrap: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": f"bench-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        **_GROUP,
    }


def _serial(
    bootstrap: str, topic: str, n: int, fn: Callable[..., Any], init: Callable[..., Any] | None
) -> tuple[float, float]:
    """A plain loop: (messages/s, parent CPU us/msg)."""
    from confluent_kafka import Consumer

    call = fn if init is None else functools.partial(fn, init())
    consumer = Consumer({**_config(bootstrap), "enable.auto.commit": False})
    consumer.subscribe([topic])
    try:
        batch: list[Any] = []
        since = time.monotonic()
        while not batch:
            _stalled(0, n, "serial", since)
            batch = consumer.consume(1000, 1.0)
        started, cpu, got = time.perf_counter(), parent_cpu_seconds(), 0
        while True:
            for message in batch:
                if message.error() is None:
                    call(message.value())
                    got += 1
            if got >= n:
                break
            batch = consumer.consume(1000, 1.0)
            since = since if not batch else time.monotonic()
            _stalled(got, n, "serial", since)
        return _rate(got, started, cpu)
    finally:
        consumer.close()


def _ordpool(
    bootstrap: str,
    topic: str,
    n: int,
    fn: Callable[..., Any],
    init: Callable[..., Any] | None,
    workers: int,
    args: argparse.Namespace,
    fetch: str = "parent",
) -> tuple[float, float]:
    """The OrderedConsumer: (messages/s, parent CPU us/msg)."""
    from ..kafka import OrderedConsumer

    with OrderedConsumer(
        fn,
        _config(bootstrap),
        [topic],
        workers=workers,
        init=init,
        start_method=args.start_method,
        batch_size=args.batch_size,
        fetch=fetch,
    ) as consumer:
        got, done = 0, threading.Event()

        def watch() -> None:  # no new record for _IDLE seconds: end the loop below
            seen = -1
            while not done.wait(_IDLE):
                if got == seen:
                    consumer.close()
                    return
                seen = got

        watchdog = threading.Thread(target=watch, name="ordpool-bench-watchdog", daemon=True)
        watchdog.start()
        try:
            records = iter(consumer)
            if next(records, None) is not None:
                started, cpu, got = time.perf_counter(), parent_cpu_seconds(), 1
                for _ in records:
                    got += 1
                    if got >= n:
                        break
        finally:
            done.set()
            watchdog.join()
        if got < n:
            raise _no_message("ordpool", got, n)
        return _rate(got, started, cpu)


def _stalled(got: int, n: int, engine: str, since: float) -> None:
    """Raise if ``engine`` has taken no message for :data:`_IDLE` seconds since ``since``."""
    if time.monotonic() - since > _IDLE:
        raise _no_message(engine, got, n)


def _no_message(engine: str, got: int, n: int) -> RuntimeError:
    return RuntimeError(
        f"{engine}: no message for {_IDLE:.0f} s, after {got} of {n}: lost, or never sent"
    )


def _rate(got: int, started: float, cpu: float) -> tuple[float, float]:
    seconds = time.perf_counter() - started
    return got / seconds, (parent_cpu_seconds() - cpu) / got * 1e6


def _partitions(bootstrap: str, topic: str) -> list[int]:
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    return sorted(metadata.topics[topic].partitions)


def _print(report: dict[str, Any]) -> None:
    out = sys.stdout
    print(
        f"ordpool bench --kafka: {report['messages']} messages of {report['workload']}, "
        f"{report['broker']}; medians of {report['repeat']}",
        file=out,
    )
    print(f"{'engine':<22}{'parts':>6}{'processes':>11}{'k msg/s':>9}{'x serial':>9}"
          f"{'parent us/msg':>15}", file=out)  # fmt: skip
    for row in report["rows"]:
        cpu = row["parent_us_per_msg"]
        print(
            f"{row['engine']:<22}{row['partitions']:>6}{row['processes']!s:>11}"
            f"{row['msgs_per_s'] / 1000:>9.1f}{row['x_serial']:>9.2f}"
            + (f"{cpu:>15.2f}" if cpu is not None else f"{'-':>15}"),
            file=out,
        )
    if any(row["parent_us_per_msg"] is None for row in report["rows"]):
        print("A peer's parent CPU: '-'; the CPU of all its processes is in the JSON.", file=out)
    missing = [peer for peer in PEERS if peer not in {row["engine"] for row in report["rows"]}]
    if missing:
        print(f"Not installed, not run: {', '.join(missing)}.", file=out)
