"""Design probe: workers that fetch their partitions' bytes themselves (not library code).

``ordpool.kafka.OrderedConsumer`` polls Kafka in the parent and ships each message's bytes to
its workers. This script measures the ceiling of the other design on this machine: N worker
processes (fork), each with its own ``confluent_kafka.Consumer`` (no group: ``assign()`` of
explicit partitions from the beginning, no commits), each running the workload on its share
and sending small results back in batches; the parent only merges them into offset order.

Two ways to share the work among ``--workers`` (2) workers:

* 4 partitions: each worker owns whole partitions (worker k: partitions k, k + N, ...);
* 1 partition: every worker reads the whole partition and runs only the offsets with
  ``offset % N == k`` (the others it skips: it still fetches and iterates them).

Each worker sends, per partition, chunks aligned on offset windows (``--chunk`` of its own
records, so a window spans ``chunk * stride`` offsets): ``(partition, first offset, count,
results)``. The parent merges a window when every worker that shares the partition has sent its
chunk of it (``merged[k::N] = chunk_k``, a slice assignment, no per-record Python), checks that
the chunks tile the offsets with no loss or duplicate, and yields ``(partition, offset,
result)`` per record, each partition in offset order. Each worker also checks that the offsets
it reads are contiguous from 0.

Same process, alternating, ``--repeat`` runs each, on a ``--partitions``-partition topic and a
1-partition topic of the ``transform`` workload's messages (the same as ``ordpool bench
--kafka``): the serial confluent-kafka loop, this ``direct`` engine, ``OrderedConsumer``
(fork) for reference, and ``drain``: one consumer that only reads every value (no ``fn``), the
rate at which one process takes the topic in, which bounds a direct worker that must read a
whole partition. Before the timed runs, one untimed ``direct`` run per topic checks every
record: partition ``p``, offset ``o`` must give message id ``o * P + p``, in order.

Timing: as in ``ordpool/bench/kafka.py``, a run is timed from its first record to its last, so
that start-up is left out (the serial loop: its first batch; ``OrderedConsumer``: its group
join and first record; direct: the workers' fork, connect and first fetch, up to the first
merged record; a worker that starts later than the other is inside the timing). Reported per
engine: msgs/s, x serial, the parent's CPU per message (getrusage of the parent process, all
its threads: librdkafka's for serial and ``OrderedConsumer``), the workers' CPU per message
(direct: getrusage in each worker from its first batch to its end; ``OrderedConsumer``: psutil
over the timed window) and the broker's (psutil over the timed window; for serial over the
whole call, start-up included).

Usage, from the repository root (the broker binary is fetched on first use)::

    python bench/kafka_direct.py -n 300000 -r 3 --json direct.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import time
import uuid
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ordpool.bench.kafka import _config, _fill, _partitions, _rate, _serial
from ordpool.bench.kafka_peers import PEERS, process_label, run_peer
from ordpool.bench.workloads import WORKLOADS, make_messages
from ordpool.kafka import OrderedConsumer
from ordpool.kafka.broker import LocalBroker

WORKLOAD = "transform"  # what `ordpool bench --kafka` runs by default (600-byte messages)


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- the worker ----------------------------------------------------------------------------------


def _worker(
    conn: Connection,
    bootstrap: str,
    topic: str,
    ends: dict[int, int],
    index: int,
    stride: int,
    chunk: int,
    fn: Callable[[bytes], Any],
    extra: dict[str, str],
) -> None:
    """Read ``ends``' partitions from offset 0 to their end, run ``fn`` on this worker's share.

    ``stride`` > 1: every worker reads the partitions whole and runs the offsets ``o`` with
    ``o % stride == index``. Sends lists of ``(partition, first offset,
    count, results)`` chunks, then ``("stats", {...})``.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"direct-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            **extra,
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    expect = dict.fromkeys(ends, 0)  # the next offset each partition must deliver
    done = {p for p, end in ends.items() if end == 0}
    buffers: dict[int, list[Any]] = {p: [] for p in ends}
    firsts = dict.fromkeys(ends, 0)  # the first offset of each partition's open chunk
    batch: list[Any] = []
    deadline = time.monotonic() + 60.0
    while not batch:  # the CPU count starts at the first messages
        if time.monotonic() > deadline:
            raise RuntimeError(f"no message from {topic} within 60 s")
        batch = consumer.consume(500, 1.0)
    first_batch_at = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    cpu, consumed, ran, in_consume = _cpu(), 0, 0, 0.0
    dumps, send = pickle.dumps, conn.send_bytes
    while True:
        out = []
        for message in batch:
            if message.error() is not None:
                continue
            p, offset = message.partition(), message.offset()
            if offset != expect[p]:
                raise RuntimeError(f"partition {p}: offset {offset}, expected {expect[p]}")
            expect[p] = offset + 1
            consumed += 1
            if offset % stride == index:
                buf = buffers[p]
                if not buf:
                    firsts[p] = offset
                buf.append(fn(message.value()))
                ran += 1
                if len(buf) == chunk or offset + 1 == ends[p]:
                    out.append((p, firsts[p], len(buf), buf))
                    buffers[p] = []
            elif offset + 1 == ends[p] and buffers[p]:
                buf = buffers[p]
                out.append((p, firsts[p], len(buf), buf))
                buffers[p] = []
            if offset + 1 == ends[p]:
                done.add(p)
        if out:
            send(dumps(out, protocol=5))
        if len(done) == len(ends):
            break
        started = time.perf_counter()
        batch = consumer.consume(500, 1.0)
        in_consume += time.perf_counter() - started
    stats = {
        "cpu_s": _cpu() - cpu,
        "consumed": consumed,
        "ran": ran,
        "consume_s": in_consume,
        "first_batch_at": first_batch_at,
    }
    conn.send(("stats", stats))
    consumer.close()
    conn.close()


# -- the parent ----------------------------------------------------------------------------------


class Direct:
    """Start the workers; iterate: the merged records; :meth:`close`: join, :attr:`stats`."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        ends: dict[int, int],
        workers: int,
        chunk: int,
        fn: Callable[[bytes], Any],
        extra: dict[str, str],
    ) -> None:
        ctx = mp.get_context("fork")
        self.ends = ends
        self.partitions = sorted(ends)
        if len(self.partitions) >= workers:  # whole partitions: worker k owns k, k + N, ...
            shares = [
                ({p: ends[p] for p in self.partitions[k::workers]}, 0, 1) for k in range(workers)
            ]
            self.stride = 1
        else:  # fewer partitions than workers: every worker reads all, runs offset % N == k
            shares = [(dict(ends), k, workers) for k in range(workers)]
            self.stride = workers
        self.chunk = chunk
        self.conns: list[Connection] = []
        self.procs = []
        for share, index, stride in shares:
            mine, theirs = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker,
                args=(theirs, bootstrap, topic, share, index, stride, chunk, fn, extra),
                daemon=True,
            )
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        self.stats: list[dict[str, Any]] = []
        self.yielded = 0
        # (perf_counter, parent CPU, records yielded) when every worker had sent its first chunk
        self.all_started: tuple[float, float, int] | None = None

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        """Yield ``(partition, offset, result)``, each partition in offset order."""
        stride, chunk = self.stride, self.chunk
        window = chunk * stride
        # per partition: the next window's first offset, and each source's chunks by window
        nxt = dict.fromkeys(self.partitions, 0)
        pending: dict[int, dict[int, list[Any]]] = {p: {} for p in self.partitions}
        remaining = sum(self.ends.values())
        open_conns = list(self.conns)
        silent = set(self.conns)  # the workers that have sent nothing yet
        loads = pickle.loads
        while remaining:
            if not open_conns:
                raise RuntimeError(f"the workers ended with {remaining} records missing")
            for conn in wait(open_conns):
                try:
                    data = conn.recv_bytes()  # type: ignore[union-attr]
                except EOFError:
                    open_conns.remove(conn)  # type: ignore[arg-type]
                    continue
                if silent:
                    silent.discard(conn)  # type: ignore[arg-type]
                    if not silent:
                        self.all_started = (time.perf_counter(), _cpu(), self.yielded)
                msg = loads(data)
                if isinstance(msg, tuple):  # ("stats", ...): that worker is done
                    self.stats.append(msg[1])
                    open_conns.remove(conn)  # type: ignore[arg-type]
                    continue
                for p, first, count, results in msg:
                    base = first - first % stride if stride > 1 else first
                    slot = pending[p].setdefault(base, [None] * stride)
                    source = first % stride
                    if slot[source] is not None:
                        raise RuntimeError(f"partition {p}: offset {first} twice")
                    slot[source] = (first, count, results)
                    # merge the windows that are complete, in order; source k has
                    # offsets in a window of `size` offsets iff k < size
                    while True:
                        start = nxt[p]
                        ready = pending[p].get(start)
                        size = min(window, self.ends[p] - start)
                        if ready is None or None in ready[:size]:
                            break
                        del pending[p][start]
                        if stride == 1:
                            first_, count_, merged = ready[0]
                            if first_ != start or count_ != size:
                                raise RuntimeError(f"partition {p}: a chunk does not tile")
                        else:
                            merged = [None] * size
                            for k in range(min(stride, size)):
                                first_, count_, results_ = ready[k]
                                if first_ != start + k or count_ != len(range(k, size, stride)):
                                    raise RuntimeError(f"partition {p}: a chunk does not tile")
                                merged[k::stride] = results_
                        nxt[p] = start + size
                        remaining -= size
                        self.yielded += size
                        yield from zip(itertools.repeat(p), range(start, start + size), merged)
        if any(pending[p] for p in pending) or any(nxt[p] != self.ends[p] for p in nxt):
            raise RuntimeError("records left over or missing")

    def close(self) -> None:
        """Collect the workers' stats, join them."""
        deadline = time.monotonic() + 30.0
        for conn in self.conns:
            # until EOF, or 30 s in all: a worker stuck in consume() is killed below
            while conn.poll(max(0.0, deadline - time.monotonic())):
                try:
                    msg = conn.recv()
                except EOFError:
                    break
                if isinstance(msg, tuple) and msg[0] == "stats":
                    self.stats.append(msg[1])
            conn.close()
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _ends(n: int, partitions: int) -> dict[int, int]:
    """Each partition's record count: ``_fill`` sends message i to partition i % P."""
    return {p: len(range(p, n, partitions)) for p in range(partitions)}


class Probe:
    """CPU seconds of the broker and of this process's other children, at two points."""

    def __init__(self, broker: psutil.Process) -> None:
        self.broker = broker
        self.marks: list[tuple[float, float]] = []

    def mark(self) -> None:
        others = 0.0
        for child in psutil.Process().children(recursive=True):
            if child.pid == self.broker.pid:
                continue
            try:
                t = child.cpu_times()
                others += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        t = self.broker.cpu_times()
        self.marks.append((t.user + t.system, others))

    def per_msg(self, n: int) -> tuple[float, float]:
        """(broker, other children) us/msg between the first two marks."""
        (b0, o0), (b1, o1) = self.marks[:2]
        return (b1 - b0) / n * 1e6, (o1 - o0) / n * 1e6


def _direct(
    bootstrap: str,
    topic: str,
    ends: dict[int, int],
    workers: int,
    chunk: int,
    check: bool,
    extra: dict[str, str],
    probe: Probe | None = None,
) -> dict[str, Any]:
    """One run of the direct engine: rates, CPU split; ``check``: every record's id too."""
    fn = WORKLOADS[WORKLOAD].fn
    n, partitions = sum(ends.values()), len(ends)
    engine = Direct(bootstrap, topic, ends, workers, chunk, fn, extra)
    try:
        records = iter(engine)
        first = next(records)  # the clock starts at the first record, as in _ordpool
        if probe is not None:
            probe.mark()
        started, cpu, got = time.perf_counter(), _cpu(), 1
        if check:
            nxt = dict.fromkeys(ends, 0)
            for p, offset, result in itertools.chain([first], records):
                if offset != nxt[p] or result[0] != offset * partitions + p:
                    raise RuntimeError(f"partition {p} offset {offset}: got id {result[0]}")
                nxt[p] += 1
            got = sum(nxt.values())
            if nxt != ends:
                raise RuntimeError(f"counts {nxt}, expected {ends}")
        else:
            for _ in records:
                got += 1
        ended, cpu_end = time.perf_counter(), _cpu()
        parent = cpu_end - cpu
        seconds = ended - started
        steady_s, steady_cpu, steady_n = engine.all_started or (started, cpu, 1)
        steady_s, steady_cpu = max(steady_s, started), max(steady_cpu, cpu)
        steady_n = max(steady_n, 1)
        if probe is not None:
            probe.mark()  # the workers may have exited: their CPU comes from their stats
    finally:
        engine.close()
    if got != n:
        raise RuntimeError(f"{got} records, expected {n}")
    stats = engine.stats
    firsts = [s["first_batch_at"] for s in stats]
    row = {
        "msgs_per_s": got / seconds,
        "parent_us_per_msg": parent / got * 1e6,
        "workers_us_per_msg": sum(s["cpu_s"] for s in stats) / got * 1e6,
        "seconds": seconds,
        # from the moment every worker had sent its first chunk: start-up stagger left out
        "steady_msgs_per_s": (got - steady_n) / (ended - steady_s),
        "steady_parent_us_per_msg": (cpu_end - steady_cpu) / (got - steady_n) * 1e6,
        "steady_from_record": steady_n,
        "worker_consumed": [s["consumed"] for s in stats],
        "worker_ran": [s["ran"] for s in stats],
        "worker_cpu_s": [round(s["cpu_s"], 3) for s in stats],
        "worker_in_consume_s": [round(s["consume_s"], 3) for s in stats],
        "worker_start_spread_s": max(firsts) - min(firsts),
    }
    if probe is not None:
        row["broker_us_per_msg"] = probe.per_msg(got)[0]
    return row


def _ordpool(
    bootstrap: str, topic: str, n: int, fn: Callable[..., Any], workers: int, probe: Probe
) -> dict[str, Any]:
    """``ordpool/bench/kafka.py``'s ``_ordpool`` (fork, default batch size), with the probe."""
    with OrderedConsumer(
        fn, _config(bootstrap), [topic], workers=workers, init=None, start_method="fork"
    ) as consumer:
        records = iter(consumer)
        next(records)
        probe.mark()
        started, cpu, got = time.perf_counter(), _cpu(), 1
        for _ in records:
            got += 1
            if got >= n:
                break
        rate, parent = _rate(got, started, cpu)
        probe.mark()
    broker, others = probe.per_msg(got)
    return {
        "msgs_per_s": rate,
        "parent_us_per_msg": parent,
        "workers_us_per_msg": others,
        "broker_us_per_msg": broker,
    }


def _drain(bootstrap: str, topic: str, ends: dict[int, int], probe: Probe) -> dict[str, Any]:
    """One consumer, ``assign()``-ed every partition, reading every value and running nothing:
    how fast one process can take the topic in (each direct worker must, on one partition)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    n = sum(ends.values())
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"drain-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    try:
        batch: list[Any] = []
        while not batch:
            batch = consumer.consume(500, 1.0)
        probe.mark()
        started, cpu, got, size = time.perf_counter(), _cpu(), 0, 0
        while True:
            for message in batch:
                if message.error() is None:
                    size += len(message.value())
                    got += 1
            if got >= n:
                break
            batch = consumer.consume(500, 1.0)
        rate, parent = _rate(got, started, cpu)
        probe.mark()
    finally:
        consumer.close()
    return {
        "msgs_per_s": rate,
        "parent_us_per_msg": parent,
        "broker_us_per_msg": probe.per_msg(got)[0],
    }


def _run(
    engine: str,
    bootstrap: str,
    topic: str,
    ends: dict[int, int],
    workers: int,
    chunk: int,
    broker: psutil.Process,
    extra: dict[str, str],
) -> dict[str, Any]:
    """One timed run of ``engine``."""
    n = sum(ends.values())
    probe = Probe(broker)
    if engine == "serial":
        # _serial as is: the broker's CPU over the whole call (its start-up included)
        probe.mark()
        rate, parent = _serial(bootstrap, topic, n, WORKLOADS[WORKLOAD].fn, None)
        probe.mark()
        return {
            "msgs_per_s": rate,
            "parent_us_per_msg": parent,
            "broker_us_per_msg_incl_startup": probe.per_msg(n)[0],
        }
    if engine == "drain":
        return _drain(bootstrap, topic, ends, probe)
    if engine == "ordpool":
        return _ordpool(bootstrap, topic, n, WORKLOADS[WORKLOAD].fn, workers, probe)
    if engine in PEERS:  # its processes' CPU (it has no parent), the broker's from its start
        probe.mark()
        rate, cpu = run_peer(engine, bootstrap, topic, n, workers, {"workload": WORKLOAD})
        probe.mark()
        return {
            "msgs_per_s": rate,
            "all_processes_us_per_msg": cpu,
            "broker_us_per_msg_incl_startup": probe.per_msg(n)[0],
        }
    return _direct(bootstrap, topic, ends, workers, chunk, False, extra, probe)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=300_000, help="messages (default: 300000)")
    parser.add_argument("-r", "--repeat", type=int, default=3, help="runs per engine (3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--partitions", type=int, default=4, help="and a 1-partition topic (4)")
    parser.add_argument("--chunk", type=int, default=500, help="results per chunk (500)")
    parser.add_argument(
        "--engines",
        default="serial,direct,ordpool,drain",
        help="comma-separated, of serial, direct, ordpool, drain, and the installed peers of "
        "ordpool.bench.kafka_peers (bytewax, arroyo) (default: the first four)",
    )
    parser.add_argument(
        "--consumer-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra librdkafka setting for the direct workers' consumers (repeatable)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the report here")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.consumer_config)
    engines = args.engines.split(",")
    messages = make_messages(args.n)
    report: dict[str, Any] = {
        "kind": "kafka-direct",
        "workload": WORKLOAD,
        "messages": args.n,
        "workers": args.workers,
        "repeat": args.repeat,
        "chunk": args.chunk,
        "direct_consumer_config": extra,
        "broker": "local tansu (memory storage)",
        "python": platform.python_version(),
        "commit": _commit(),
        "cpus": os.cpu_count(),
        "rows": [],
        "checks": [],
    }
    with LocalBroker() as broker:
        assert broker.process is not None
        tansu = psutil.Process(broker.process.pid)
        for partitions in dict.fromkeys((args.partitions, 1)):
            topic = _fill(broker.address, messages, partitions)
            if len(_partitions(broker.address, topic)) != partitions:
                raise RuntimeError("the topic has the wrong partition count")
            ends = _ends(args.n, partitions)
            check = _direct(broker.address, topic, ends, args.workers, args.chunk, True, extra)
            report["checks"].append({"partitions": partitions, "ok": True, **check})
            print(f"{partitions} partition(s): direct checked every record", flush=True)
            runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
            for rep in range(args.repeat):
                for engine in engines:
                    row = _run(
                        engine, broker.address, topic, ends, args.workers, args.chunk, tansu, extra
                    )
                    runs[engine].append(row)
                    cpu = row.get("parent_us_per_msg", row.get("all_processes_us_per_msg"))
                    print(
                        f"  run {rep + 1} {engine:<8} {row['msgs_per_s'] / 1e3:7.1f} k msg/s"
                        f"  {'parent' if engine not in PEERS else 'all'} {cpu:5.2f} us/msg",
                        flush=True,
                    )
            serial_runs = runs.get("serial", [])
            serial = statistics.median(r["msgs_per_s"] for r in serial_runs) if serial_runs else 0
            for engine, rows in runs.items():
                rate = statistics.median(r["msgs_per_s"] for r in rows)
                summary: dict[str, Any] = {
                    "engine": engine,
                    "partitions": partitions,
                    "processes": _processes(engine, args.workers),
                    "msgs_per_s": rate,
                    "x_serial": rate / serial if serial else None,
                    "steady_x_serial": None,
                }
                for key in (
                    "parent_us_per_msg",
                    "all_processes_us_per_msg",
                    "workers_us_per_msg",
                    "steady_msgs_per_s",
                    "steady_parent_us_per_msg",
                    "broker_us_per_msg",
                    "broker_us_per_msg_incl_startup",
                ):
                    if all(key in r for r in rows):
                        summary[key] = statistics.median(r[key] for r in rows)
                if serial and "steady_msgs_per_s" in summary:
                    summary["steady_x_serial"] = summary["steady_msgs_per_s"] / serial
                summary["runs"] = rows
                report["rows"].append(summary)
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _processes(engine: str, workers: int) -> str:
    if engine in ("serial", "drain"):
        return "1"
    return process_label(engine, workers) if engine in PEERS else f"1 + {workers}"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip()
    except OSError:
        return ""


def _print(report: dict[str, Any]) -> None:
    print(
        f"kafka_direct: {report['messages']} messages of {report['workload']}, "
        f"{report['workers']} workers, medians of {report['repeat']}"
    )
    print(f"{'engine':<9}{'parts':>6}{'k msg/s':>9}{'x serial':>9}{'steady x':>9}{'parent':>8}"
          f"{'workers':>9}{'broker*':>9}  (us/msg)")  # fmt: skip
    for row in report["rows"]:
        workers, steady = row.get("workers_us_per_msg"), row.get("steady_x_serial")
        parent = row.get("parent_us_per_msg")
        if parent is None:  # a peer: all its processes' CPU, in the workers' column
            workers = row.get("all_processes_us_per_msg")
        broker = row.get("broker_us_per_msg", row.get("broker_us_per_msg_incl_startup"))
        print(
            f"{row['engine']:<9}{row['partitions']:>6}{row['msgs_per_s'] / 1e3:>9.1f}"
            f"{row['x_serial'] or 0:>9.2f}"
            f"{'' if steady is None else f'{steady:.2f}':>9}"
            f"{'-' if parent is None else f'{parent:.2f}':>8}"
            f"{'' if workers is None else f'{workers:.2f}':>9}"
            f"{'' if broker is None else f'{broker:.2f}':>9}"
        )
    print("* broker: its CPU over the timed window; for serial over the whole call (start-up in)")


if __name__ == "__main__":
    raise SystemExit(main())
