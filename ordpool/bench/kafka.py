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
``serial`` that is all the work); for ``serial`` and ordpool, over the same window, the CPU per
message of ordpool's workers and of the broker when it runs on this machine, and the cores all
of them kept busy. Needs the ``kafka`` extra.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import threading
import time
import uuid
from typing import Any, Callable, NamedTuple, Sequence

import psutil

from .kafka_peers import PEERS, installed_peers, process_label, run_peer
from .measure import parent_cpu_seconds, processes_cpu_seconds
from .report import machine_info, write_json
from .workloads import WORKLOADS, load_callable, make_messages, read_input

__all__ = ["add_arguments", "run_command"]

_GROUP = {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500}
_IDLE = 60.0  # seconds without a new message after which an engine's run fails
_FETCH = "ordpool-fetch-workers"  # OrderedConsumer(fetch="workers")
_LOOPBACK = frozenset(("127.0.0.1", "localhost", "::1"))


class Run(NamedTuple):
    """One engine's run (a row of the JSON's ``runs``): messages/s and CPU us per message of
    the parent (a peer: of all its processes), of ordpool's workers and of the broker
    (``None``: not measured)."""

    msgs_per_s: float
    cpu_us: float
    workers_us: float | None = None
    broker_us: float | None = None


class _Meter:
    """The clock and the CPU seconds of this process, of a pool's workers and of the broker,
    from :meth:`start` to :meth:`run`."""

    def __init__(self, broker: psutil.Process | None, worker_pids: Sequence[int] = ()) -> None:
        self.broker = broker
        self.workers = [psutil.Process(pid) for pid in worker_pids] if worker_pids else None
        self.start()

    def start(self) -> None:
        self.began = self._now()

    def _now(self) -> tuple[float, float, float | None, float | None]:
        return (
            time.perf_counter(),
            parent_cpu_seconds(),
            None if self.workers is None else processes_cpu_seconds(self.workers),
            None if self.broker is None else processes_cpu_seconds([self.broker]),
        )

    def run(self, got: int) -> Run:
        """The run of ``got`` messages since :meth:`start`."""
        now, began = self._now(), self.began
        if self.workers is not None and not all(p.is_running() for p in self.workers):
            now = (*now[:2], None, now[3])  # a worker was replaced: its CPU is partly lost

        def per_message(i: int) -> float | None:
            a, b = now[i], began[i]
            return None if a is None or b is None else (a - b) / got * 1e6

        return Run(
            got / (now[0] - began[0]), (now[1] - began[1]) / got * 1e6, *map(per_message, (2, 3))
        )


def broker_process(bootstrap: str) -> psutil.Process | None:
    """The process that listens at ``bootstrap``'s first address when that is on this
    machine's loopback (the bench then measures its CPU); ``None`` otherwise, or when it
    cannot be seen (another user's process)."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    if host.strip("[]") not in _LOOPBACK or not port.isdigit():
        return None
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == int(port) and conn.pid:
                return psutil.Process(conn.pid)
    except psutil.Error:
        pass
    return None


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
    broker = broker_process(bootstrap)
    runs: dict[str, list[Run]] = {"serial": [], "ordpool": [], _FETCH: []}
    runs.update({peer: [] for peer in peers})
    for _ in range(args.repeat):
        runs["serial"].append(_serial(bootstrap, topic, n, fn, init, broker))
        runs["ordpool"].append(_ordpool(bootstrap, topic, n, fn, init, workers, args, broker))
        runs[_FETCH].append(
            _ordpool(bootstrap, topic, n, fn, init, workers, args, broker, "workers")
        )
        for peer in peers:
            runs[peer].append(Run(*run_peer(peer, bootstrap, topic, n, workers, workload)))
    partitions = len(_partitions(bootstrap, topic))
    serial_rate = statistics.median(r.msgs_per_s for r in runs["serial"])
    labels = {"serial": "1", "ordpool": f"1 + {workers}", _FETCH: f"1 + {workers}"}
    rows = []
    for engine, results in runs.items():
        rate = statistics.median(r.msgs_per_s for r in results)
        rows.append(
            {
                "engine": engine,
                "partitions": partitions,
                "processes": labels.get(engine) or process_label(engine, workers),
                "msgs_per_s": rate,
                "x_serial": rate / serial_rate,
                **_cpu_figures(results, engine in labels, pooled=engine not in ("serial", *peers)),
                "runs": results,
            }
        )
    return rows


def _cpu_figures(results: list[Run], ours: bool, pooled: bool) -> dict[str, float | None]:
    """A row's CPU figures, medians over its runs (``ours``: serial or ordpool, whose CPU
    column is the parent's; a peer's is that of all its processes; ``pooled``: ordpool, whose
    workers' CPU counts in the cores busy)."""

    def median(field: str) -> float | None:
        values = [getattr(r, field) for r in results]
        return None if None in values else statistics.median(values)

    cpu, workers, broker = median("cpu_us"), median("workers_us"), median("broker_us")
    # The cores that the parent, the workers and the broker kept busy, per run
    busy = [
        r.msgs_per_s * (r.cpu_us + (r.workers_us or 0.0) + r.broker_us) / 1e6
        for r in results
        if r.broker_us is not None and (r.workers_us is not None or not pooled)
    ]
    return {
        "parent_us_per_msg": cpu if ours else None,
        "all_processes_us_per_msg": None if ours else cpu,
        "workers_us_per_msg": workers,
        "broker_us_per_msg": broker,
        "cores_busy": statistics.median(busy) if ours and len(busy) == len(results) else None,
    }


def _config(bootstrap: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "group.id": f"bench-{uuid.uuid4().hex[:8]}",
        "auto.offset.reset": "earliest",
        **_GROUP,
    }


def _serial(
    bootstrap: str,
    topic: str,
    n: int,
    fn: Callable[..., Any],
    init: Callable[..., Any] | None,
    broker: psutil.Process | None = None,
) -> Run:
    """A plain loop (``broker``: the broker's process, whose CPU is measured too)."""
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
        meter, got = _Meter(broker), 0
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
        return meter.run(got)
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
    broker: psutil.Process | None = None,
    fetch: str = "parent",
) -> Run:
    """The OrderedConsumer (``broker``: the broker's process, whose CPU is measured too)."""
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
        meter = _Meter(broker, consumer.pool.worker_pids())

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
                meter.start()
                got = 1
                for _ in records:
                    got += 1
                    if got >= n:
                        break
        finally:
            done.set()
            watchdog.join()
        if got < n:
            raise _no_message("ordpool", got, n)
        return meter.run(got)


def _stalled(got: int, n: int, engine: str, since: float) -> None:
    """Raise if ``engine`` has taken no message for :data:`_IDLE` seconds since ``since``."""
    if time.monotonic() - since > _IDLE:
        raise _no_message(engine, got, n)


def _no_message(engine: str, got: int, n: int) -> RuntimeError:
    return RuntimeError(
        f"{engine}: no message for {_IDLE:.0f} s, after {got} of {n}: lost, or never sent"
    )


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
    columns = ("parent_us_per_msg", "workers_us_per_msg", "broker_us_per_msg", "cores_busy")
    print(f"{'engine':<22}{'parts':>6}{'processes':>11}{'k msg/s':>9}{'x serial':>9}"
          f"{'parent us/msg':>15}{'workers us/msg':>16}{'broker us/msg':>15}{'cores':>7}",
          file=out)  # fmt: skip
    for row in report["rows"]:
        cells = [row[c] for c in columns]
        print(
            f"{row['engine']:<22}{row['partitions']:>6}{row['processes']!s:>11}"
            f"{row['msgs_per_s'] / 1000:>9.1f}{row['x_serial']:>9.2f}"
            + "".join(
                f"{'-' if cell is None else f'{cell:.2f}':>{width}}"
                for cell, width in zip(cells, (15, 16, 15, 7))
            ),
            file=out,
        )
    if any(row["parent_us_per_msg"] is None for row in report["rows"]):
        print("A peer's parent CPU: '-'; the CPU of all its processes is in the JSON.", file=out)
    if all(row["broker_us_per_msg"] is None for row in report["rows"]):
        print("The broker's CPU: '-', not on this machine's loopback (or not visible).", file=out)
    else:
        print(
            "cores: those the parent, the workers and the broker kept busy (on this machine: "
            f"{psutil.cpu_count()}).",
            file=out,
        )
    missing = [peer for peer in PEERS if peer not in {row["engine"] for row in report["rows"]}]
    if missing:
        print(f"Not installed, not run: {', '.join(missing)}.", file=out)
