"""Peers for ``ordpool bench --kafka``, run where they are installed.

* ``bytewax``: a Bytewax dataflow (``KafkaSource`` → ``map(fn)`` → a counting sink) in as
  many processes as ordpool has workers, clustered by ``bytewax.run``. Each process reads the
  partitions Bytewax gives it with its own consumers (no consumer group, no commits to Kafka),
  so one partition runs in one process.
* ``arroyo``: Sentry Arroyo's ``StreamProcessor`` with ``RunTaskWithMultiprocessing`` (batches
  of 1,000 messages or 1 s through shared memory) over a pool of as many processes as ordpool
  has workers, then a counting step (no commits). Its parent consumes in a consumer group, like
  ordpool's.

A peer runs in child processes that import this module: each child takes the run's settings
from the ``ORDPOOL_BENCH_PEER`` environment variable, notes when it ran ``fn`` on its first
message and its CPU then, and at the end writes its count, that time, its last time and its CPU
(every thread, librdkafka's included; a process that got no message, such as Bytewax's
second on a 1-partition topic, counts its CPU from the flow's start) to a JSON file. The run
is timed from the first message of any process to the last of any process, like the other
engines.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["PEERS", "arroyo_main", "bytewax_flow", "installed_peers", "process_label", "run_peer"]

PEERS = ("bytewax", "arroyo")
_ENV = "ORDPOOL_BENCH_PEER"
_TIMEOUT = 600.0


def process_label(name: str, workers: int) -> str:
    """How the report shows a peer's processes: Arroyo has a parent besides its pool."""
    return f"1 + {workers}" if name == "arroyo" else str(workers)


def installed_peers() -> list[str]:
    """The peers importable here, in :data:`PEERS` order."""
    return [name for name in PEERS if importlib.util.find_spec(name) is not None]


def run_peer(
    name: str, bootstrap: str, topic: str, n: int, processes: int, workload: dict[str, Any]
) -> tuple[float, float]:
    """Run peer ``name`` over the whole topic: (messages/s, CPU us/msg of all its processes).

    ``workload`` holds ``workload`` (a bundled workload's name) or ``fn`` and ``init``
    (``"module:callable"`` specs), so that each child builds the same function.

    Raises:
        RuntimeError: a child failed, or the peer processed other than ``n`` messages.
    """
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    with (
        tempfile.TemporaryDirectory(prefix="ordpool-peer-") as out,
        open(Path(out, "stderr.log"), "wb") as log,
    ):
        settings = {"bootstrap": bootstrap, "topic": topic, "out": out, **workload}
        env = {**os.environ, _ENV: json.dumps(settings)}
        if name == "arroyo":
            main = f"from {__name__} import arroyo_main; arroyo_main({processes}, {n})"
            commands = [[sys.executable, "-c", main]]
        else:
            addresses = ";".join(f"127.0.0.1:{port}" for port in _free_ports(processes))
            flow = [sys.executable, "-m", "bytewax.run", f"{__name__}:bytewax_flow"]
            commands = [
                flow + (["-i", str(i), "-a", addresses] if processes > 1 else [])
                for i in range(processes)
            ]
        children: list[subprocess.Popen[bytes]] = []
        try:
            for command in commands:
                children.append(subprocess.Popen(command, env=env, stderr=log))
        except BaseException:
            _kill_all(children)
            raise
        _wait_all(children, Path(log.name))
        reports = [json.loads(path.read_text()) for path in sorted(Path(out).glob("*.json"))]
    got = sum(report["count"] for report in reports)
    if got != n:
        raise RuntimeError(f"{name} processed {got} messages of {n}")
    started = min(report["first"] for report in reports if report["count"])
    ended = max(report["last"] for report in reports if report["count"])
    cpu = sum(report["cpu"] for report in reports)
    return got / (ended - started), cpu / got * 1e6


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_all(children: list[subprocess.Popen[bytes]], log: Path) -> None:
    """Wait for every child; the first that fails (or the time limit) raises with the tail
    of their stderr, where Bytewax also prints its cluster's connection retries. The others
    are then killed: a Bytewax process would wait for its failed peer without end."""
    deadline = time.monotonic() + _TIMEOUT
    try:
        while True:
            codes = [child.poll() for child in children]
            failed = [code for code in codes if code not in (None, 0)]
            if failed or time.monotonic() > deadline:
                tail = log.read_bytes()[-2000:].decode(errors="replace")
                why = f"exited with status {failed[0]}" if failed else f"ran {_TIMEOUT:.0f} s"
                raise RuntimeError(f"a peer process {why}:\n{tail}")
            if all(code == 0 for code in codes):
                return
            time.sleep(0.05)
    finally:
        _kill_all(children)


def _kill_all(children: list[subprocess.Popen[bytes]]) -> None:
    """Kill each child and what it started (Arroyo's pool), then reap the child. They stay
    in our process group, so a caller that kills that group ends them too."""
    import psutil

    for child in children:
        if child.poll() is None:
            try:
                below = psutil.Process(child.pid).children(recursive=True)
            except psutil.Error:
                below = []
            for process in [*below, psutil.Process(child.pid)]:
                with contextlib.suppress(psutil.Error):
                    process.kill()
        child.wait()


class _Tally:
    """One child's count, first and last wall time, and CPU since its first message."""

    def __init__(self, call: Callable[[bytes], Any]) -> None:
        self.call = call
        self.count = 0
        self.first = self.last = 0.0
        self.cpu = 0.0
        self.started_cpu = _cpu_seconds()  # an idle process counts from here instead

    def run(self, value: bytes) -> Any:
        if not self.count:
            self.first, self.cpu = time.time(), _cpu_seconds()
        self.count += 1
        return self.call(value)

    def run_message(self, message: Any) -> Any:
        """``run`` on a Bytewax ``KafkaSourceMessage``."""
        return self.run(message.value)

    def write(self, out: str) -> None:
        cpu = _cpu_seconds() - (self.cpu if self.count else self.started_cpu)
        report = {"count": self.count, "first": self.first, "last": self.last, "cpu": cpu}
        Path(out, f"{os.getpid()}.json").write_text(json.dumps(report))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _workload_call(settings: dict[str, Any]) -> Callable[[bytes], Any]:
    from .workloads import WORKLOADS, load_callable

    if settings.get("fn"):
        fn = load_callable(settings["fn"], "--fn")
        init = load_callable(settings["init"], "--init") if settings.get("init") else None
    else:
        fn, init = WORKLOADS[settings["workload"]].fn, WORKLOADS[settings["workload"]].init
    return fn if init is None else functools.partial(fn, init())


def bytewax_flow() -> Any:
    """The Bytewax dataflow a child runs (``python -m bytewax.run``); settings from the env."""
    import bytewax.operators as op
    from bytewax.connectors.kafka import KafkaSource
    from bytewax.dataflow import Dataflow
    from bytewax.outputs import DynamicSink, StatelessSinkPartition

    settings = json.loads(os.environ[_ENV])
    tally = _Tally(_workload_call(settings))

    class _Counted(StatelessSinkPartition[Any]):
        def write_batch(self, items: list[Any]) -> None:
            tally.last = time.time()

        def close(self) -> None:
            tally.write(settings["out"])

    class _Sink(DynamicSink[Any]):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> _Counted:
            return _Counted()

    flow = Dataflow("ordpool-bench-peer")
    source = KafkaSource([settings["bootstrap"]], [settings["topic"]], tail=False)
    messages = op.input("kafka", flow, source)
    results = op.map("fn", messages, tally.run_message)
    op.output("count", results, _Sink())
    return flow


_CALL: list[Callable[[bytes], Any]] = []  # the workload's function, built once per process


def _arroyo_task(message: Any) -> Any:
    """What Arroyo's pool runs per message (a module function: it is pickled by name)."""
    if not _CALL:
        _CALL.append(_workload_call(json.loads(os.environ[_ENV])))
    return _CALL[0](message.payload.value)


def arroyo_main(processes: int, n: int) -> None:
    """One Arroyo consumer (a child of :func:`run_peer`) until it has ``n`` results; settings
    from the env. Its CPU counts its pool's processes too, from its first result on."""
    import psutil
    from arroyo.backends.kafka import KafkaConsumer, build_kafka_consumer_configuration
    from arroyo.processing import StreamProcessor
    from arroyo.processing.strategies import (
        ProcessingStrategy,
        ProcessingStrategyFactory,
        RunTaskWithMultiprocessing,
    )
    from arroyo.processing.strategies.run_task_with_multiprocessing import MultiprocessingPool
    from arroyo.types import Topic

    settings = json.loads(os.environ[_ENV])
    tally = _Tally(lambda value: value)
    me = psutil.Process()

    def all_cpu() -> float:
        processes = [me, *me.children(recursive=True)]
        return sum(sum(p.cpu_times()[:2]) for p in processes if p.is_running())

    class _Count(ProcessingStrategy[Any]):
        def submit(self, message: Any) -> None:
            if not tally.count:
                tally.first, tally.cpu = time.time(), all_cpu()
            tally.count += 1
            if tally.count >= n:
                tally.last, tally.cpu = time.time(), all_cpu() - tally.cpu
                processor.signal_shutdown()

        def poll(self) -> None: ...
        def join(self, timeout: float | None = None) -> None: ...
        def close(self) -> None: ...
        def terminate(self) -> None: ...

    class _Factory(ProcessingStrategyFactory[Any]):
        def create_with_partitions(self, commit: Any, partitions: Any) -> Any:
            return RunTaskWithMultiprocessing(
                function=_arroyo_task,
                next_step=_Count(),
                max_batch_size=1000,
                max_batch_time=1.0,
                pool=pool,
            )

    config = build_kafka_consumer_configuration(
        {"session.timeout.ms": 2000, "heartbeat.interval.ms": 500},
        f"bench-{os.getpid()}",
        "earliest",
        bootstrap_servers=[settings["bootstrap"]],
    )
    pool = MultiprocessingPool(processes)
    processor = StreamProcessor(KafkaConsumer(config), Topic(settings["topic"]), _Factory())
    try:
        processor.run()
    finally:
        pool.close()
    report = {"count": tally.count, "first": tally.first, "last": tally.last, "cpu": tally.cpu}
    Path(settings["out"], f"{os.getpid()}.json").write_text(json.dumps(report))
