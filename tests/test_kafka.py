"""ordpool.kafka against a real Kafka-protocol broker (tansu, started on a free loopback port
for this module; see tests/kafka_broker.py): order per partition, commits that never pass an
unfinished record, a consumer SIGKILLed and restarted, a second consumer joining and leaving,
poison messages and the dead letter topic, poll(), async for, backpressure.

``ORDPOOL_KAFKA_KILLS`` sets the kill-and-restart rounds (default 5; the issue's stress run is 20).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import wait_until
from kafka_broker import (
    committed,
    consumer_config,
    new_topic,
    produce,
    read_all,
)

from ordpool import WorkerCrashed
from ordpool.bench.kafka_peers import PEERS, _wait_all, installed_peers, run_peer
from ordpool.kafka import OrderedConsumer
from ordpool.kafka.broker import LocalBroker

REPO = Path(__file__).resolve().parents[1]
KILLS = int(os.environ.get("ORDPOOL_KAFKA_KILLS", "5"))


@pytest.fixture(scope="module")
def broker():
    # Fails (never skips) when the broker cannot be fetched or started.
    with LocalBroker() as running:
        yield running.address


def _group() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


# -- functions run by the workers ----------------------------------------------------------------


def _double(value: bytes) -> int:
    i = int(value)
    if i % 97 == 0:
        time.sleep(0.002)  # a few slow ones: results arrive out of order
    return 2 * i


def _poison(value: bytes) -> int:
    i = int(value)
    if i % 50 == 7:
        raise ValueError(f"poison {i}")
    return i


def _crash_once(state: dict, value: bytes) -> int:
    """Kill the worker the first time value 11 runs (a marker file remembers it), and every
    time value 23 runs."""
    i = int(value)
    if i == 11 and not os.path.exists(state["marker"]):
        Path(state["marker"]).touch()
        os._exit(1)
    if i == 23:
        os._exit(1)
    return i


def _state(marker: str) -> dict:
    return {"marker": marker}


def _take(consumer: OrderedConsumer, n: int) -> list:
    """The consumer's next ``n`` records (the loop leaves after the last: it is in hand)."""
    return list(itertools.islice(consumer, n))


def _by_partition(records) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r in records:
        out.setdefault(r.partition, []).append(r.offset)
    return out


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"topics": "visits"}, TypeError, "not a string: \\['visits'\\]"),
        ({"topics": []}, ValueError, "non-empty list"),
        ({"topics": ["a", ""]}, ValueError, "non-empty strings"),
        ({"max_in_flight_per_partition": -1}, ValueError, "max_in_flight_per_partition must"),
        ({"max_bytes_in_flight": 0}, ValueError, "max_bytes_in_flight must be a positive int"),
        ({"max_in_flight": 4.5}, ValueError, "max_in_flight must be a positive int, got 4.5"),
        ({"poll_timeout": None}, ValueError, "poll_timeout must be a positive number"),
        ({"commit_interval": 0}, ValueError, "commit_interval must be"),
        ({"max_retries": -1}, ValueError, "max_retries must be an int >= 0"),
        ({"fetch": "broker"}, ValueError, "fetch must be 'parent' or 'workers', got 'broker'"),
        ({"max_delay": -0.01, "fetch": "workers"}, ValueError, "max_delay must be a number"),
        ({"max_delay": None}, ValueError, "max_delay must be a number of seconds >= 0"),
        ({"batch_size": 0, "fetch": "workers"}, ValueError, "batch_size must be a positive"),
    ],
)
def test_bad_options_are_refused_by_name(options: dict, error: type, match: str) -> None:
    topics = options.pop("topics", ["t"])
    config = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g"}
    with pytest.raises(error, match=match):
        OrderedConsumer(_double, config, topics, **options)


# -- order, commits ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("fetch", ["parent", "workers"])
def test_each_partition_in_order_nothing_lost(broker: str, method: str, fetch: str) -> None:
    topic, group, n = new_topic(broker, 3), _group(), 3000
    produce(broker, topic, n, 3)
    got = []
    config = consumer_config(broker, group)
    with OrderedConsumer(
        _double, config, [topic], workers=2, start_method=method, fetch=fetch
    ) as consumer:
        for record in consumer:
            assert record.error is None and record.topic == topic
            assert record.key == f"k{int(record.result) // 2 % 7}".encode()
            got.append(record)
            if len(got) == n:
                break
        stats = consumer.stats()
    assert sorted(r.result // 2 for r in got) == list(range(n))
    for offsets in _by_partition(got).values():
        assert offsets == list(range(n // 3))
    assert set(stats.partitions) == {(topic, p) for p in range(3)}
    assert stats.delivered == n
    # the pool's tasks: messages, or with fetch="workers" chunks of them (one per partition
    # at least)
    assert stats.pool.completed >= (n if fetch == "parent" else 3)
    # a clean exit counts every yielded record: everything is committed
    assert committed(broker, group, topic, 3) == {p: n // 3 for p in range(3)}


@pytest.mark.timeout(60)
def test_a_subscribed_topic_that_does_not_exist_is_a_warning_not_the_end(
    broker: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic, group, n = new_topic(broker, 2), _group(), 100
    produce(broker, topic, n, 2)
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    config = consumer_config(broker, group)
    with OrderedConsumer(_double, config, [topic, missing], workers=2) as consumer:
        got = _take(consumer, n)
        assert wait_until(lambda: "Subscribed topic not available" in caplog.text, timeout=15)
    assert sorted(r.result for r in got) == [2 * i for i in range(n)]
    assert missing in caplog.text and "going on" in caplog.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fetch", ["parent", "workers"])
def test_commits_never_pass_an_unfinished_record(broker: str, fetch: str) -> None:
    topic, group, n = new_topic(broker, 2), _group(), 2000
    produce(broker, topic, n, 2)
    config = consumer_config(broker, group)
    seen: list = []

    def fail_at_700() -> None:
        with OrderedConsumer(
            _double, config, [topic], workers=2, commit_interval=0.01, fetch=fetch
        ) as c:
            for record in c:
                seen.append(record)
                if len(seen) == 700:
                    time.sleep(0.1)  # async commits run meanwhile
                    raise RuntimeError("sink failed")  # the record in hand is not finished

    with pytest.raises(RuntimeError, match="sink failed"):
        fail_at_700()
    in_hand = seen[-1]
    marks = committed(broker, group, topic, 2)
    for p, offsets in _by_partition(seen).items():
        finished = [o for o in offsets if (p, o) != (in_hand.partition, in_hand.offset)]
        expected = finished[-1] + 1 if finished else -1001
        assert marks[p] == expected, (p, marks, in_hand)
    # a restart resumes exactly there; then a clean break commits through the record in hand
    again: list = []
    with OrderedConsumer(_double, config, [topic], workers=2, fetch=fetch) as consumer:
        for record in consumer:
            again.append(record)
            if len(again) == 300:
                break
    for p, offsets in _by_partition(again).items():
        assert offsets[0] == max(marks[p], 0)
        assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    last = {p: offsets[-1] + 1 for p, offsets in _by_partition(again).items()}
    assert {p: o for p, o in committed(broker, group, topic, 2).items() if p in last} == last


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fetch", ["parent", "workers"])
def test_a_loop_that_breaks_and_iterates_again_misses_nothing(broker: str, fetch: str) -> None:
    # A sink that writes in chunks: break every 7 records, then iterate the consumer again.
    topic, group, n = new_topic(broker, 2), _group(), 1000
    produce(broker, topic, n, 2)
    got: list = []
    config = consumer_config(broker, group)
    with OrderedConsumer(_double, config, [topic], workers=2, fetch=fetch) as c:
        while len(got) < n:
            chunk = []
            for record in c:
                chunk.append(record)
                if len(chunk) == 7 or len(got) + len(chunk) == n:
                    break
            got += chunk
    for offsets in _by_partition(got).values():
        assert offsets == list(range(n // 2))
    assert committed(broker, group, topic, 2) == {0: n // 2, 1: n // 2}


@pytest.mark.timeout(60)
def test_a_cancelled_async_wait_loses_no_record(broker: str) -> None:
    topic, group, n = new_topic(broker, 1), _group(), 200

    async def main() -> list:
        got: list = []
        config = consumer_config(broker, group)
        async with OrderedConsumer(_double, config, [topic], workers=2) as consumer:
            records = aiter(consumer)
            with pytest.raises(asyncio.TimeoutError):  # nothing produced yet: the wait is cut
                await asyncio.wait_for(anext(records), 1.0)
            produce(broker, topic, n, 1)
            async for record in consumer:  # a new loop: gets the record the cut wait took
                got.append(record)
                if len(got) == n:
                    break
        return got

    got = asyncio.run(main())
    assert [r.offset for r in got] == list(range(n))


@pytest.mark.timeout(60)
def test_a_record_a_cancelled_wait_took_is_not_committed_on_a_clean_exit(broker: str) -> None:
    """``async with`` left cleanly while a cancelled ``async for``'s wait has taken a record
    it never handed out: that record is not finished, so the commit stops before it."""
    topic, group, n = new_topic(broker, 1), _group(), 50
    produce(broker, topic, n, 1)

    async def main() -> list:
        got: list = []
        config = consumer_config(broker, group)
        async with OrderedConsumer(_double, config, [topic], workers=2) as consumer:
            async for record in consumer:
                got.append(record)
                if len(got) == 10:
                    break
            # what a cancelled wait leaves behind: a poll in the executor that took the
            # next record (offset 10), which the caller never got
            loop = asyncio.get_running_loop()
            consumer._waiting = loop.run_in_executor(None, consumer.poll, 10.0)
        return got

    got = asyncio.run(main())
    assert [r.offset for r in got] == list(range(10))
    assert committed(broker, group, topic, 1) == {0: 10}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("method", "fetch"), [("fork", "parent"), ("spawn", "workers")])
def test_commit_and_manual_acks(broker: str, method: str, fetch: str) -> None:
    topic, group = new_topic(broker, 1), _group()
    produce(broker, topic, 100, 1)
    config = consumer_config(broker, group)
    with OrderedConsumer(
        _double, config, [topic], workers=2, manual_ack=True, start_method=method, fetch=fetch
    ) as consumer:
        records = [consumer.poll(30) for _ in range(10)]
        assert [r.offset for r in records] == list(range(10))
        consumer.ack(records[0], records[1], records[3])  # 2 is not acked: 0 and 1 are finished
        consumer.commit()
        assert committed(broker, group, topic, 1) == {0: 2}
        consumer.ack(records[2])
        consumer.commit()
        assert committed(broker, group, topic, 1) == {0: 4}
        assert consumer.stats().partitions[(topic, 0)].committed == 4
    assert committed(broker, group, topic, 1) == {0: 4}  # manual acks: exit adds nothing


def _pid(value: bytes) -> int:
    return os.getpid()


@pytest.mark.timeout(60)
def test_keyed_messages_run_in_their_key_worker(broker: str) -> None:
    topic, group, n = new_topic(broker, 2), _group(), 700
    produce(broker, topic, n, 2)  # keys k0..k6
    got = []
    config = consumer_config(broker, group)
    with OrderedConsumer(_pid, config, [topic], workers=2, keyed=True) as consumer:
        got += _take(consumer, n)
    for offsets in _by_partition(got).values():
        assert offsets == list(range(n // 2))
    pids: dict[bytes, set[int]] = {}
    for r in got:
        pids.setdefault(r.key, set()).add(r.result)
    assert len(pids) == 7 and all(len(p) == 1 for p in pids.values())
    assert len(set().union(*pids.values())) == 2


# -- a consumer killed with SIGKILL, restarted ---------------------------------------------------


def _log_lines(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [tuple(map(int, line.split())) for line in lines if line and line != "started"]


@pytest.mark.timeout(60 + 10 * KILLS)
def test_sigkill_and_restart_loses_nothing(broker: str, tmp_path: Path) -> None:
    parts, n = 3, 600 * (KILLS + 1)
    topic, group = new_topic(broker, parts), _group()
    produce(broker, topic, n, parts)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    rng = random.Random(21)
    script = str(REPO / "tests" / "kafka_broker.py")
    processed: set[tuple[int, int]] = set()
    for run in range(KILLS + 1):
        before = committed(broker, group, topic, parts)
        log = tmp_path / f"run{run}.log"
        method = ("fork", "spawn")[run % 2]  # the runs alternate the start methods
        fetch = ("parent", "workers")[run // 2 % 2]  # and who reads Kafka, every two runs
        proc = subprocess.Popen(
            [sys.executable, script, broker, topic, group, str(log), method, fetch], env=env
        )
        try:
            final = run == KILLS or len(processed) == n
            _wait_for_records(proc, log, final, rng, processed, n)
        finally:
            proc.kill()
            proc.wait()
        lines = _log_lines(log)
        marks = committed(broker, group, topic, parts)
        for p in range(parts):
            mine = [o for q, o in lines if q == p]
            if mine:  # re-delivered only after the last commit: it starts exactly there
                assert mine[0] == max(before[p], 0), (run, p, before, mine[:3])
                assert mine == list(range(mine[0], mine[0] + len(mine)))
            done = processed | set(lines)
            # never committed past a record that was not finished (logged)
            assert all((p, o) in done for o in range(max(marks[p], 0))), (run, p, marks)
        processed |= set(lines)
    assert processed == {(p, o) for p in range(parts) for o in range(n // parts)}


def _wait_for_records(proc, log: Path, final: bool, rng, done: set, n: int) -> None:
    """Let the consumer run: to a random point (then it is killed), or (final) until every
    offset has been processed, in this run or an earlier one (``done``)."""
    target = n if final else rng.randint(50, 500)
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        lines = _log_lines(log)
        if final and len(done | set(lines)) >= n:
            time.sleep(0.3)  # its async commits (every 50 ms) land
            return
        if not final and len(lines) >= target:
            return
        assert proc.poll() is None, f"the consumer exited with {proc.returncode}"
        time.sleep(0.005)
    raise AssertionError("the consumer made no progress")


# -- rebalances ----------------------------------------------------------------------------------


class _Watch:
    """Tracks a consumer's assignment from its on_rebalance hook, and checks each record
    against it: a record of a partition revoked before the call that returned it (and not
    assigned again since) is a violation."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.assigned: set[tuple[str, int]] = set()
        self.events: list[tuple[str, list]] = []
        self.violations: list = []

    def hook(self, event: str, partitions: list) -> None:
        with self.lock:
            self.events.append((event, partitions))
            if event == "assign":
                self.assigned |= set(partitions)
            else:
                self.assigned -= set(partitions)

    def check(self, consumer: OrderedConsumer, out: list, stop: threading.Event, n: int) -> None:
        it = iter(consumer)
        while not stop.is_set():
            with self.lock:
                before = set(self.assigned)
            record = next(it, None)
            if record is None:  # closed
                return
            tp = (record.topic, record.partition)
            with self.lock:
                if tp not in before and tp not in self.assigned:
                    self.violations.append(record)
            out.append(record)
            time.sleep(0.001)  # slow enough that the second consumer finds work left
            if len(out) >= n:
                return


def _segments(records) -> dict[int, list[list[int]]]:
    """Per partition, the runs of offsets between rewinds (a new assignment restarts at
    the last commit)."""
    out: dict[int, list[list[int]]] = {}
    for r in records:
        runs = out.setdefault(r.partition, [])
        if runs and r.offset == runs[-1][-1] + 1:
            runs[-1].append(r.offset)
        else:
            runs.append([r.offset])
    return out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
@pytest.mark.parametrize("fetch", ["parent", "workers"])
def test_a_second_consumer_joins_then_leaves(broker: str, strategy: str, fetch: str) -> None:
    parts, n = 4, 4000
    topic, group = new_topic(broker, parts), _group()
    produce(broker, topic, n, parts)
    config = consumer_config(broker, group, **{"partition.assignment.strategy": strategy})
    first, second = _Watch(), _Watch()
    got_a: list = []
    got_b: list = []
    stop_b = threading.Event()
    options = {"workers": 1, "fetch": fetch, "batch_size": 50 if fetch == "workers" else None}
    with OrderedConsumer(_double, config, [topic], on_rebalance=first.hook, **options) as a:
        a_thread = threading.Thread(target=first.check, args=(a, got_a, threading.Event(), n))
        a_thread.start()
        while len(got_a) < 300:
            time.sleep(0.01)
        with OrderedConsumer(_double, config, [topic], on_rebalance=second.hook, **options) as b:
            b_thread = threading.Thread(target=second.check, args=(b, got_b, stop_b, n))
            b_thread.start()
            deadline = time.monotonic() + 20
            while len(got_b) < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            stop_b.set()
            b_thread.join(10)
        # b left; a takes its partitions back and reads to the end
        deadline = time.monotonic() + 40
        while _distinct(got_a + got_b) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        a.close()
        a_thread.join(10)
    assert _distinct(got_a + got_b) == n  # nothing lost
    assert got_b, "the second consumer got no partition"
    assert not first.violations and not second.violations
    for got in (got_a, got_b):
        for runs in _segments(got).values():  # in order within each assignment
            assert all(run == sorted(run) for run in runs)
    assert any(e == "revoke" or e == "lost" for e, _ in first.events)


def _distinct(records) -> int:
    return len({(r.partition, r.offset) for r in records})


# -- poison messages -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("method", "fetch"), [("fork", "parent"), ("spawn", "parent"), ("fork", "workers")]
)
def test_poison_messages_arrive_in_order_with_their_error(
    broker: str, method: str, fetch: str
) -> None:
    topic, group, n = new_topic(broker, 2), _group(), 400
    produce(broker, topic, n, 2)
    config = consumer_config(broker, group)
    got = []
    with OrderedConsumer(
        _poison, config, [topic], workers=2, start_method=method, fetch=fetch
    ) as consumer:
        got += _take(consumer, n)
    for offsets in _by_partition(got).values():
        assert offsets == list(range(n // 2))
    bad = [r for r in got if r.error is not None]
    assert len(bad) == 8 and all(isinstance(r.error, ValueError) for r in bad)
    assert all(r.result is None for r in bad)
    assert committed(broker, group, topic, 2) == {0: n // 2, 1: n // 2}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("fetch", ["parent", "workers"])
def test_dead_letter_topic_and_crash_retries(
    broker: str, method: str, fetch: str, tmp_path: Path
) -> None:
    topic, dlq, group, n = new_topic(broker, 2), new_topic(broker, 1), _group(), 200
    produce(broker, topic, n, 2)
    config = consumer_config(broker, group)
    got = []
    with OrderedConsumer(
        _crash_once,
        config,
        [topic],
        workers=2,
        init=_state,
        initargs=(str(tmp_path / "crashed"),),
        dead_letter_topic=dlq,
        max_retries=1,
        start_method=method,
        fetch=fetch,
    ) as consumer:
        got += _take(consumer, n - 1)
        # 23's produce is acknowledged (meanwhile the records after it may be handed out)
        assert wait_until(lambda: consumer.stats().dead_lettered == 1, timeout=30)
    # 11 crashed once and was retried; 23 crashes every time: dead-lettered, not yielded
    values = sorted(r.result for r in got)
    assert values == [i for i in range(n) if i != 23]
    for offsets in _by_partition(got).values():
        assert offsets == sorted(offsets)
    dead = read_all(broker, dlq, 1)
    assert len(dead) == 1
    headers = dict(dead[0].headers())
    assert dead[0].value() == b"23" and dead[0].key() == b"k2"
    assert headers["ordpool.source.topic"] == topic.encode()
    assert headers["ordpool.source.partition"] == b"1"
    assert headers["ordpool.source.offset"] == b"11"
    assert headers["ordpool.error.type"] == WorkerCrashed.__name__.encode()
    assert committed(broker, group, topic, 2) == {0: n // 2, 1: n // 2}


@pytest.mark.timeout(60)
def test_a_fetching_worker_reads_a_partition_it_paused_once_given_it_again(broker: str) -> None:
    # The worker's side of fetch="workers", in this process: a worker pauses a partition whose
    # messages pile up while it reads another; given that partition again from another
    # offset, it must read it (librdkafka keeps a pause across a reassignment).
    from confluent_kafka import TopicPartition

    from ordpool.kafka import _fetch

    topic = new_topic(broker, 2)
    produce(broker, topic, 400, 2)
    progress = _fetch.Progress(4)
    config = _fetch.worker_config(consumer_config(broker, _group()))
    fetcher = _fetch.Fetcher(_double, None, (), config, progress.name)
    try:
        owned = frozenset({(topic, 0), (topic, 1)})
        task = _fetch.FetchTask(topic, 1, 0, None, 50, 1 << 30, 10.0, owned, 1)
        first = fetcher.run(task)
        assert first.offsets == list(range(50))
        assert first.results == [4 * i + 2 for i in range(50)]  # values 1, 3, 5... doubled
        fetcher.consumer.pause([TopicPartition(topic, 1)])  # as _sort does at its limit
        fetcher.paused.add((topic, 1))
        again = fetcher.run(task._replace(start=120, wait=10.0))
        assert again.offsets == list(range(120, 170))
        assert (topic, 1) not in fetcher.paused
    finally:
        fetcher.consumer.close()
        fetcher.progress.close()
        progress.close(unlink=True)


def _crash_on_rerun(state: dict, value: bytes) -> int:
    """Value 9 kills its worker every time, and leaves a marker; value 5 kills its worker
    once the marker exists (so it dies while the messages before 9 are run again)."""
    i = int(value)
    if i == 9:
        Path(state["marker"]).touch()
        os._exit(1)
    if i == 5 and os.path.exists(state["marker"]):
        os._exit(1)
    return i


@pytest.mark.timeout(60)
def test_workers_fetch_a_crash_while_a_crash_is_handled_loses_nothing(
    broker: str, tmp_path: Path
) -> None:
    topic, group, n = new_topic(broker, 1), _group(), 30
    produce(broker, topic, n, 1)
    with OrderedConsumer(
        _crash_on_rerun,
        consumer_config(broker, group),
        [topic],
        workers=2,
        init=_state,
        initargs=(str(tmp_path / "crashed"),),
        fetch="workers",
    ) as consumer:
        got = _take(consumer, n)
    assert [r.offset for r in got] == list(range(n))  # each once, in order
    assert [r.offset for r in got if r.error is not None] == [5, 9]
    assert all(isinstance(r.error, WorkerCrashed) for r in got if r.error is not None)
    assert [r.result for r in got if r.error is None] == [i for i in range(n) if i not in (5, 9)]
    assert committed(broker, group, topic, 1) == {0: n}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fetch", ["parent", "workers"])
def test_a_dead_letter_after_the_last_record_is_committed(broker: str, fetch: str) -> None:
    topic, dlq, group = new_topic(broker, 1), new_topic(broker, 1), _group()
    produce(broker, topic, 58, 1)  # values 7 and 57 are poison; 57 is the last one
    config = consumer_config(broker, group)
    got = []
    with OrderedConsumer(
        _poison, config, [topic], workers=1, batch_size=100, dead_letter_topic=dlq, fetch=fetch
    ) as consumer:
        for record in consumer:
            got.append(record.offset)
            if len(got) == 56:
                break  # in the batch still: the dead letter after it is finished once acked
    assert got == [o for o in range(58) if o != 7 and o != 57]
    assert committed(broker, group, topic, 1) == {0: 58}
    assert [m.offset() for m in read_all(broker, dlq, 2)] == [0, 1]


@pytest.mark.timeout(60)
def test_a_dead_letter_the_producer_refuses_arrives_as_an_error_record(
    broker: str, caplog: pytest.LogCaptureFixture
) -> None:
    topic, dlq, group = new_topic(broker, 1), new_topic(broker, 1), _group()
    # value 5: 10 kB of "x", poison and over the dead letter producer's message.max.bytes
    produce(broker, topic, 20, 1, value=lambda i: b"x" * 10_000 if i == 5 else str(i).encode())
    got = []
    with OrderedConsumer(
        _poison,
        consumer_config(broker, group),
        [topic],
        workers=2,
        dead_letter_topic=dlq,
        dead_letter_config={"message.max.bytes": 6000},
    ) as consumer:
        got += _take(consumer, 19)
        assert wait_until(lambda: consumer.stats().dead_lettered == 1, timeout=30)
    assert [r.offset for r in got] == [o for o in range(20) if o != 7]  # 7: dead-lettered
    assert isinstance(got[5].error, ValueError) and got[5].result is None
    assert all(r.error is None for r in got if r.offset != 5)
    assert "refused the message" in caplog.text and "offset 5" in caplog.text
    assert [m.value() for m in read_all(broker, dlq, 1)] == [b"7"]
    assert committed(broker, group, topic, 1) == {0: 20}


# -- poll, async for, backpressure ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fetch", ["parent", "workers"])
def test_poll_returns_none_when_drained(broker: str, fetch: str) -> None:
    topic, group = new_topic(broker, 2), _group()
    produce(broker, topic, 50, 2)
    config = consumer_config(broker, group)
    with OrderedConsumer(_double, config, [topic], workers=2, fetch=fetch) as c:
        got = [c.poll(30) for _ in range(50)]
        assert all(r is not None for r in got)
        assert c.poll(0.3) is None
        assert sorted(r.result for r in got) == [2 * i for i in range(50)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fetch", ["parent", "workers"])
def test_async_for(broker: str, fetch: str) -> None:
    topic, group, n = new_topic(broker, 2), _group(), 300
    produce(broker, topic, n, 2)

    async def main() -> tuple[list, int]:
        ticks = 0
        got: list = []

        async def ticker() -> None:  # the loop keeps running while records are awaited
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        config = consumer_config(broker, group)
        async with OrderedConsumer(_double, config, [topic], workers=2, fetch=fetch) as consumer:
            async for record in consumer:
                got.append(record)
                if len(got) == n:
                    break
        task.cancel()
        return got, ticks

    got, ticks = asyncio.run(main())
    assert ticks > 10
    for offsets in _by_partition(got).values():
        assert offsets == list(range(n // 2))
    assert committed(broker, group, topic, 2) == {0: n // 2, 1: n // 2}


@pytest.mark.timeout(60)
def test_a_slow_caller_pauses_partitions_and_stays_in_the_group(broker: str) -> None:
    topic, group = new_topic(broker, 2), _group()
    produce(broker, topic, 3000, 2)
    config = consumer_config(broker, group, **{"max.poll.interval.ms": 2500})
    with OrderedConsumer(
        _double, config, [topic], workers=2, max_in_flight=400, max_in_flight_per_partition=100
    ) as consumer:
        first = consumer.poll(30)
        assert first is not None
        time.sleep(4)  # longer than max.poll.interval.ms: the poller keeps the membership
        stats = consumer.stats()
        assert all(p.in_flight <= 100 + 1024 for p in stats.partitions.values())
        # full at 400: one message per poll trickles in while the caller is away
        assert sum(p.in_flight for p in stats.partitions.values()) <= 400 + 1024 + 100
        assert any(p.paused for p in stats.partitions.values())
        assert stats.rebalances == 1  # the first assignment only
        rest = [consumer.poll(30) for _ in range(2999)]
        assert all(r is not None for r in rest)
        assert consumer.stats().rebalances == 1


@pytest.mark.timeout(60)
def test_workers_fetch_a_slow_caller_stays_in_the_group_with_bounded_chunks(broker: str) -> None:
    topic, group = new_topic(broker, 2), _group()
    produce(broker, topic, 3000, 2)
    config = consumer_config(broker, group, **{"max.poll.interval.ms": 2500})
    with OrderedConsumer(
        _double, config, [topic], workers=2, fetch="workers", batch_size=100
    ) as consumer:
        first = consumer.poll(30)
        assert first is not None
        time.sleep(4)  # longer than max.poll.interval.ms: the poller keeps the membership
        stats = consumer.stats()
        # no more than 2 chunks of 100 asked of a partition and not handed out
        assert all(p.in_flight <= 2 for p in stats.partitions.values())
        assert stats.consumed <= 100  # only the caller's chunk has been taken
        assert any(p.lag for p in stats.partitions.values())  # the workers' watermarks
        assert stats.rebalances == 1  # the first assignment only
        rest = [consumer.poll(30) for _ in range(2999)]
        assert all(r is not None for r in rest)
        assert consumer.stats().rebalances == 1
    for offsets in _by_partition([first, *rest]).values():
        assert offsets == list(range(1500))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fetch", ["parent", "workers"])
def test_messages_produced_while_the_consumer_waits_arrive(broker: str, fetch: str) -> None:
    topic, group = new_topic(broker, 2), _group()
    config = consumer_config(broker, group)
    with OrderedConsumer(_double, config, [topic], workers=2, fetch=fetch) as consumer:
        assert consumer.poll(2.0) is None  # nothing yet: the partitions run dry
        for burst in range(3):  # then bursts, with pauses longer than the consumer's waits
            produce(broker, topic, 50, 2)
            got = [consumer.poll(30) for _ in range(50)]
            assert all(r is not None for r in got)
            for offsets in _by_partition(got).values():
                assert offsets == list(range(25 * burst, 25 * (burst + 1)))
            time.sleep(0.3)
    assert committed(broker, group, topic, 2) == {0: 75, 1: 75}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("fetch", "max_delay"), [("parent", 0.05), ("workers", 0.05), ("workers", 0.0)]
)
def test_a_drained_consumer_leaves_its_workers_idle(
    broker: str, fetch: str, max_delay: float
) -> None:
    topic, group = new_topic(broker, 4), _group()
    produce(broker, topic, 200, 4)
    config = consumer_config(broker, group)
    with OrderedConsumer(
        _double, config, [topic], workers=2, fetch=fetch, max_delay=max_delay
    ) as consumer:
        assert len(_take(consumer, 200)) == 200

        def tasks() -> int:
            return sum(w.tasks_completed for w in consumer.stats().pool.workers)

        before, end = tasks(), time.monotonic() + 1.0
        while time.monotonic() < end:
            assert consumer.poll(0.1) is None
        # A chunk that found no message waits up to max_delay in its worker, and its
        # partition is asked again after a pause, not at once: tens of tasks a second, where
        # asking at once ran thousands (with max_delay=0, the pause alone bounds them).
        assert tasks() - before < 400


# -- the example ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fetch", ["parent", "workers"])
def test_the_example_runs_against_the_broker(broker: str, fetch: str) -> None:
    example = str(REPO / "examples" / "kafka_consumer.py")
    out = subprocess.run(
        [sys.executable, example, broker, "--messages", "5000", "--fetch", fetch],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = out.stdout.splitlines()[-1]
    assert summary.startswith("OK: 4995 records from 4 partitions, each in offset order, 5 ")


@pytest.mark.timeout(240)
def test_bench_kafka_runs_against_the_broker(broker: str, tmp_path: Path) -> None:
    out = tmp_path / "kafka.json"
    args = ["--kafka", "--bootstrap", broker, "-n", "3000", "-r", "1", "--workers", "2"]
    args += ["--start-method", "fork", "--partitions", "2", "--json", str(out)]
    proc = subprocess.Popen(  # its own process group: on a timeout, the peers go with it
        [sys.executable, "-m", "ordpool", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=200)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["engine"], r["partitions"]): r for r in report["rows"]}
    assert report["machine"]["command_line"].startswith("ordpool bench --kafka")
    assert report["versions"]["confluent-kafka"]
    peers = installed_peers()  # Bytewax where installed: each runs, or the output says not
    engines = ("serial", "ordpool", "ordpool-fetch-workers", *peers)
    assert set(rows) == {(e, p) for e in engines for p in (2, 1)}
    assert all(r["msgs_per_s"] > 0 for r in rows.values())
    for (engine, _), row in rows.items():
        cpu = row["all_processes_us_per_msg" if engine in peers else "parent_us_per_msg"]
        assert cpu > 0, row
        assert all(len(run) == 4 for run in row["runs"])
        if engine in peers:  # timed in their own processes: no broker or workers column
            assert row["broker_us_per_msg"] is row["cores_busy"] is None, row
            continue
        # The broker listens on this machine's loopback: its CPU is measured beside ours (it
        # can be 0: a run this short can find every message fetched before its clock starts)
        assert row["broker_us_per_msg"] >= 0 and row["cores_busy"] > 0, row
        assert (row["workers_us_per_msg"] is None) == (engine == "serial"), row
        if engine != "serial":
            assert row["workers_us_per_msg"] > 0, row
    assert "x serial" in stdout and "broker us/msg" in stdout
    missing = [peer for peer in PEERS if peer not in peers]
    assert ("Not installed, not run: " + ", ".join(missing) in stdout) == bool(missing)


@pytest.mark.timeout(30)
def test_bench_kafka_finds_the_broker_process_only_on_loopback(broker: str) -> None:
    from ordpool.bench.kafka import broker_process
    from ordpool.kafka.broker import free_port

    found = broker_process(broker)
    assert found is not None and "tansu" in found.name()
    port = broker.rpartition(":")[2]
    assert broker_process(f"localhost:{port},other:9092").pid == found.pid
    assert broker_process(f"example.invalid:{port}") is None  # another machine's
    assert broker_process(f"127.0.0.1:{free_port()}") is None  # nothing listens there
    assert broker_process("127.0.0.1") is None


@pytest.mark.timeout(30)
def test_bench_kafka_drops_the_workers_cpu_when_a_worker_was_replaced() -> None:
    from ordpool.bench.kafka import _Meter

    burn = "import time\nend = time.process_time() + 0.2\nwhile time.process_time() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", burn + "\ntime.sleep(30)"])
    try:
        meter = _Meter(None, [child.pid])
        assert wait_until(lambda: sum(psutil.Process(child.pid).cpu_times()[:2]) >= 0.2, timeout=20)
        run = meter.run(1000)
        assert run.workers_us is not None and run.workers_us > 0 and run.broker_us is None
        child.kill()
        child.wait()
        assert meter.run(1000).workers_us is None  # gone: not counted as 0
    finally:
        child.kill()
        child.wait()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("engine", ["serial", "ordpool"])
def test_bench_kafka_fails_when_messages_stop_coming(
    broker: str, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that gets fewer messages than the topic should hold (lost, or never produced)
    fails after ``_IDLE`` seconds without one, instead of waiting for ever."""
    from ordpool.bench import kafka as bench_kafka

    monkeypatch.setattr(bench_kafka, "_IDLE", 3.0)
    topic = new_topic(broker, 2)
    produce(broker, topic, 100, 2)
    args = argparse.Namespace(start_method="fork", batch_size=None)
    run = {
        "serial": lambda: bench_kafka._serial(broker, topic, 150, _double, None),
        "ordpool": lambda: bench_kafka._ordpool(broker, topic, 150, _double, None, 2, args),
    }[engine]
    with pytest.raises(RuntimeError, match=f"{engine}: no message for 3 s, after 100 of 150"):
        run()


@pytest.mark.timeout(30)
def test_a_failed_peer_process_raises_with_its_stderr_and_stops_the_others(
    tmp_path: Path,
) -> None:
    log = tmp_path / "stderr.log"
    with log.open("wb") as err:
        failing = [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"]
        # the one waited for first runs on, and has started a process of its own
        starts = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
        starts += "'import time; time.sleep(60)']); time.sleep(60)"
        children = [subprocess.Popen([sys.executable, "-c", starts])]
        parent = psutil.Process(children[0].pid)
        assert wait_until(lambda: len(parent.children()) == 1, timeout=20)
        grandchild = parent.children()[0]
        children.append(subprocess.Popen(failing, stderr=err))
        with pytest.raises(RuntimeError, match="exited with status 3:\nboom"):
            _wait_all(children, log)
    assert children[0].poll() is not None  # killed and reaped, not left behind
    assert wait_until(lambda: _gone(grandchild), timeout=10)  # killed too


def _gone(process: psutil.Process) -> bool:
    """Ended: no such process, or a zombie left for init to reap."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    with pytest.raises(ValueError, match="unknown peer 'flink'"):
        run_peer("flink", "127.0.0.1:1", "topic", 1, 2, {"workload": "transform"})
