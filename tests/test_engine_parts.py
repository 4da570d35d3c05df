"""The engine's parts driven through an in-memory transport: no processes, no pipes.

The fake transport records what the engine sends; each test plays the workers' side by hand
(READY, results run through the real batch step, deaths at a chosen item), so intake,
scheduling, blame and retries, and delivery are checked step by step and deterministically.
"""

from __future__ import annotations

import threading
import time
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest

from ordpool import BrokenPool, WorkerCrashed, WorkerInitError
from ordpool._core.batching import Batch
from ordpool._core.errors import RemoteTraceback
from ordpool._core.state import PoolState
from ordpool._core.streams import IndexedStream, NumberedStream
from ordpool._engine import Engine, Feeder, Supervision
from ordpool._engine.decoding import decode
from ordpool._transport import wire
from ordpool._transport.base import Transport, TransportEvents
from ordpool._transport.worker import run_task

pytestmark = pytest.mark.timeout(30)


@dataclass
class Sent:
    slot: int
    bid: int
    failed: tuple[int, ...]
    payload: wire.Payload
    call: bytes


class FakeTransport:
    """A :class:`~ordpool._transport.base.Transport` whose workers are the test itself."""

    batch_target: float | None = None
    max_payload: int | None = None
    max_depth = 2

    def __init__(self, events: TransportEvents) -> None:
        self.events = events
        self.sent: list[Sent] = []
        self.started: list[int] = []
        self.stopped = False
        self.cancelled_all = False

    # -- the Transport protocol ------------------------------------------------------------------

    def start_workers(self, slots: list[int]) -> None:
        for slot in slots:
            self.start_worker(slot)
            self.events.on_ready(slot, 1000 + slot)  # READY at once

    def start_worker(self, slot: int) -> None:
        self.started.append(slot)

    def send(
        self, slot: int, bid: int, failed: tuple[int, ...], payload: wire.Payload, call: bytes
    ) -> None:
        self.sent.append(Sent(slot, bid, failed, payload, call))

    def cancel(self, slot: int, bid: int, position: int) -> None:
        pass

    def cancel_all(self) -> None:
        self.cancelled_all = True

    def kill(self, slot: int) -> None:
        pass

    def stop(self, *, graceful: bool) -> None:
        self.stopped = True

    def pids(self) -> dict[int, int]:
        return {}

    # -- playing the workers ---------------------------------------------------------------------

    def answer(self, sent: Sent, fn: Callable[[Any], Any] = lambda x: x * 10) -> None:
        """Run the task as a worker would (the real batch step) and report its results."""
        progress = array("q", [sent.bid, 0, -1, -1])
        payload, nerrors, _ = run_task(
            fn, memoryview(sent.payload.join()), None, set(sent.failed), progress,
            wire.ChunkWriter(),
        )  # fmt: skip
        assert payload is not None
        self.events.on_result(sent.slot, sent.bid, 0.001, payload, nerrors)


def _typed(transport: FakeTransport) -> Transport:
    return transport  # mypy checks that the fake implements the protocol


@pytest.fixture
def make_engine() -> Iterator[Callable[..., tuple[Engine, FakeTransport]]]:
    engines: list[Engine] = []

    def make(**options: Any) -> tuple[Engine, FakeTransport]:
        transports: list[FakeTransport] = []

        def factory(events: TransportEvents) -> Transport:
            transports.append(FakeTransport(events))
            return _typed(transports[0])

        settings: dict[str, Any] = {
            "workers": 2,
            "window": 1024,
            "batch_size": 2,
            "max_delay": 60.0,  # the flusher never fires: batches are cut by the test alone
            "pace": 0.0,  # no cut pacing: an idle worker takes the pending items at once
            "retries": 0,
        }
        settings.update(options)
        engine = Engine(factory, **settings)
        engine.start(5)
        engines.append(engine)
        return engine, transports[0]

    yield make
    for engine in engines:
        engine.terminate()


def _batches(engine: Engine, stream: Any) -> list[tuple[list[int], list[Any], dict[int, Any]]]:
    """Every batch the stream has ready, in order: (indices, values, errors)."""
    out = []
    while True:
        try:
            batch: Batch | None = engine.delivery.next_batch(stream, timeout=0.05)
        except TimeoutError:
            return out
        if batch is None:
            return out
        values, errors = decode(batch)
        out.append((list(batch.indices), values, errors or {}))


# -- intake and scheduling -------------------------------------------------------------------------


def test_cut_pacing_holds_items_for_an_idle_worker_until_the_pace_allows(make_engine):
    engine, transport = make_engine(pace=60.0, batch_size=100)
    stream = engine.open_stream(IndexedStream())

    def sent() -> list[tuple[int, list[Any]]]:
        return [(s.slot, wire.decode_items(memoryview(s.payload.join()))) for s in transport.sent]

    engine.intake.enqueue(stream, 0, 0, None, None)
    # The first item of a quiet stream goes at once; the next ones wait though worker 1 is
    # idle: a batch was cut less than `pace` ago.
    engine.intake.enqueue(stream, 1, 1, None, None)
    engine.intake.enqueue(stream, 2, 2, None, None)
    assert sent() == [(0, [0])]
    assert engine.scheduler.idle == 1
    engine.scheduler.paced_until = 0.0  # the pace has passed
    engine.intake.enqueue(stream, 3, 3, None, None)
    assert sent() == [(0, [0]), (1, [1, 2, 3])]  # the items that waited, as one batch
    # A result from a worker also cuts the waiting items once the pace allows, not before.
    engine.intake.enqueue(stream, 4, 4, None, None)
    engine.scheduler.paced_until = float("inf")  # a batch was just cut
    transport.answer(transport.sent[0])
    assert sent() == [(0, [0]), (1, [1, 2, 3])]
    engine.scheduler.paced_until = 0.0
    transport.answer(transport.sent[1])
    assert sent() == [(0, [0]), (1, [1, 2, 3]), (0, [4])]
    assert [indices for indices, _, _ in _batches(engine, stream)] == [[0], [1, 2, 3]]


def test_the_flusher_sends_paced_items_to_an_idle_worker_at_the_end_of_the_pace(make_engine):
    engine, transport = make_engine(pace=0.05, batch_size=100)  # max_delay: 60 s
    stream = engine.open_stream(IndexedStream())
    engine.intake.enqueue(stream, 0, 0, None, None)
    engine.intake.enqueue(stream, 1, 1, None, None)  # paced; no item or result comes after it
    deadline = time.monotonic() + 10
    while len(transport.sent) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(s.slot, wire.decode_items(memoryview(s.payload.join()))) for s in transport.sent] == [
        (0, [0]),
        (1, [1]),
    ]


def test_an_executor_job_is_never_paced(make_engine):
    engine, transport = make_engine(pace=60.0)
    futures: list[Any] = []
    stream = engine.open_stream(IndexedStream(on_batch=futures.append))
    engine.intake.enqueue(stream, 0, 0, None, None)
    engine.intake.enqueue(stream, 1, 1, None, None)
    # Jobs (a callback stream's items) go at once to each idle worker, whatever the pace.
    assert [s.slot for s in transport.sent] == [0, 1]


def test_idle_workers_take_items_at_once_then_batches_fill_to_the_size(make_engine):
    engine, transport = make_engine()
    stream = engine.open_stream(IndexedStream())
    for index in (0, 1, 2, 3):
        engine.intake.enqueue(stream, index, index, None, None)
    # 0 and 1 each went at once to an idle worker (no waiting for a full batch); with both
    # busy, 2 and 3 waited for the batch size, then went to the least loaded worker (slot 0).
    assert [(s.slot, wire.decode_items(memoryview(s.payload.join()))) for s in transport.sent] == [
        (0, [0]),
        (1, [1]),
        (0, [2, 3]),
    ]


def test_a_worker_never_holds_more_than_depth_tasks(make_engine):
    engine, transport = make_engine(depth=2)
    stream = engine.open_stream(IndexedStream())
    for index in range(8):
        engine.intake.enqueue(stream, index, index, None, None)
    assert [s.slot for s in transport.sent] == [0, 1, 0, 1]  # 2 + 2: both workers full
    assert engine.scheduler.queued_locked() == 1  # items 6 and 7 wait in the parent
    transport.answer(transport.sent[0])
    assert [s.slot for s in transport.sent] == [0, 1, 0, 1, 0]  # the freed place is refilled


def test_keyed_items_go_to_their_slot_in_order(make_engine):
    engine, transport = make_engine(batch_size=4)
    stream = engine.open_stream(IndexedStream(keyed=True))
    for index, slot in enumerate([1, 1, 1, 0, 1, 1, 1]):
        engine.intake.enqueue(stream, index, index, slot, None)
    by_slot: dict[int, list[Any]] = {0: [], 1: []}
    answered = 0
    while answered < len(transport.sent):  # play both workers until nothing is left to run
        sent = transport.sent[answered]
        by_slot[sent.slot] += wire.decode_items(memoryview(sent.payload.join()))
        transport.answer(sent)
        answered += 1
    assert by_slot == {0: [3], 1: [0, 1, 2, 4, 5, 6]}  # each key's items, in order, on its slot
    values = [v for _, batch_values, _ in _batches(engine, stream) for v in batch_values]
    assert values == [i * 10 for i in range(7)]  # and the results in index order


def test_an_unpicklable_item_fails_at_its_own_index_and_the_rest_run(make_engine):
    engine, transport = make_engine(batch_size=3, workers=1)
    stream = engine.open_stream(NumberedStream())
    Feeder(engine, stream).run([1, threading.Lock(), 3])
    for sent in transport.sent:
        transport.answer(sent)
    ((indices, values, errors),) = _batches(engine, stream)
    assert indices == [0, 1, 2]
    assert values[0] == 10 and values[2] == 30
    assert list(errors) == [1] and "pickle" in str(errors[1])


def test_the_window_bounds_items_in_flight(make_engine):
    engine, transport = make_engine(workers=1, window=2, batch_size=None)
    stream = engine.open_stream(IndexedStream())
    engine.intake.enqueue(stream, 0, 0, None, None)
    engine.intake.enqueue(stream, 1, 1, None, None)
    with pytest.raises(TimeoutError, match="window"):
        engine.intake.enqueue(stream, 2, 2, None, 0.05)
    transport.answer(transport.sent[0])
    with pytest.raises(TimeoutError):  # answered, but not consumed: still in the window
        engine.intake.enqueue(stream, 2, 2, None, 0.05)
    assert _batches(engine, stream)[0][0] == [0]
    engine.intake.enqueue(stream, 2, 2, None, 0.05)  # consumed: room again


# -- delivery --------------------------------------------------------------------------------------


def test_batches_answered_out_of_order_are_delivered_in_order(make_engine):
    engine, transport = make_engine(workers=3)
    stream = engine.open_stream(IndexedStream())
    for index in (10, 20, 35):  # indices with gaps, as Kafka offsets: one to each worker
        engine.intake.enqueue(stream, index, index, None, None)
    first, second, third = transport.sent
    transport.answer(third)
    transport.answer(second)
    assert _batches(engine, stream) == []  # index 10 is not answered: nothing may leave
    assert engine.stats().in_heap == 2
    transport.answer(first)
    assert _batches(engine, stream) == [([10], [100], {}), ([20], [200], {}), ([35], [350], {})]


def test_stats_show_results_held_for_a_predecessor(make_engine):
    engine, transport = make_engine(workers=2)
    stream = engine.open_stream(IndexedStream())
    for index in (0, 1):
        engine.intake.enqueue(stream, index, index, None, None)
    transport.answer(transport.sent[1])  # index 1 must wait for index 0
    held = engine.stats()
    assert held.in_heap == 1 and held.held_bytes > 0
    assert held.hold_seconds == 0.0  # still waiting: counted once it may leave
    transport.answer(transport.sent[0])
    released = engine.stats()
    assert released.hold_seconds > 0 and released.max_hold_seconds > 0
    assert released.in_heap == 2  # both may leave now, and wait for the consumer
    assert [b[0] for b in _batches(engine, stream)] == [[0], [1]]
    after = engine.stats()
    assert after.held_bytes == 0 and after.in_heap == 0
    assert after.hold_seconds == released.hold_seconds  # consuming late adds no hold


def test_results_answered_in_order_are_never_held(make_engine):
    engine, transport = make_engine(workers=2)
    stream = engine.open_stream(IndexedStream())
    for index in range(6):
        engine.intake.enqueue(stream, index, index, None, None)
        transport.answer(transport.sent[-1])
    assert len(_batches(engine, stream)) == 6
    stats = engine.stats()
    assert stats.hold_seconds == 0.0 and stats.max_hold_seconds == 0.0


def test_a_callback_stream_gets_each_batch_as_soon_as_it_is_answered(make_engine):
    engine, transport = make_engine()
    got: list[list[int]] = []
    stream = engine.open_stream(IndexedStream(on_batch=lambda b: got.append(list(b.indices))))
    for index in (0, 1):
        engine.intake.enqueue(stream, index, index, None, None)
    transport.answer(transport.sent[1])
    assert got == [[1]]  # not held back by index 0
    transport.answer(transport.sent[0])
    assert got == [[1], [0]]


def test_a_worker_error_keeps_its_type_and_position(make_engine):
    engine, transport = make_engine(workers=1, batch_size=3)
    stream = engine.open_stream(NumberedStream())
    Feeder(engine, stream).run([1, 0, 2])
    transport.answer(transport.sent[0], fn=lambda x: 6 // x)
    ((_, values, errors),) = _batches(engine, stream)
    assert values[0] == 6 and values[2] == 3
    assert isinstance(errors[1], ZeroDivisionError)
    assert isinstance(errors[1].__cause__, RemoteTraceback)


# -- supervision: blame, retries, breaking ---------------------------------------------------------


def _one_task(engine: Engine, transport: FakeTransport, n: int) -> tuple[NumberedStream, Sent]:
    stream = engine.open_stream(NumberedStream())
    Feeder(engine, stream).run(list(range(n)))
    (sent,) = transport.sent
    return stream, sent


def test_a_death_blames_the_running_item_and_reruns_the_rest(make_engine):
    engine, transport = make_engine(workers=1, batch_size=4, retries=1)
    stream, sent = _one_task(engine, transport, 4)
    engine.on_death(0, -9, 1000, (sent.bid, 2))  # killed while running item 2
    assert transport.started == [0, 0]  # replaced
    engine.on_ready(0, 1001)
    rerun = transport.sent[-1]
    assert rerun.bid == sent.bid and rerun.failed == ()  # one retry left: all run again
    engine.on_death(0, -9, 1001, (sent.bid, 2))  # item 2 again: out of retries
    engine.on_ready(0, 1002)
    last = transport.sent[-1]
    assert last.failed == (2,)  # only the guilty item is skipped
    transport.answer(last)
    ((indices, values, errors),) = _batches(engine, stream)
    assert indices == [0, 1, 2, 3] and values[:2] == [0, 10] and values[3] == 30
    assert list(errors) == [2] and isinstance(errors[2], WorkerCrashed)
    assert errors[2].exitcode == -9 and "signal" in str(errors[2])
    assert engine.stats().restarts == 2


def test_a_death_after_every_item_ran_reruns_the_task_once_then_fails_it(make_engine):
    engine, transport = make_engine(workers=1, batch_size=3, retries=0)
    stream, sent = _one_task(engine, transport, 3)
    engine.on_death(0, 1, 1000, (sent.bid, 3))  # died sending its results: nobody to blame
    engine.on_ready(0, 1001)
    assert transport.sent[-1].failed == ()  # run once more
    engine.on_death(0, 1, 1001, (sent.bid, 3))  # again: every item is blamed now
    ((_, _, errors),) = _batches(engine, stream)
    assert sorted(errors) == [0, 1, 2]
    assert all(isinstance(e, WorkerCrashed) for e in errors.values())


def test_tasks_queued_behind_a_dead_worker_keep_their_order(make_engine):
    engine, transport = make_engine(workers=1, batch_size=2, retries=0)
    stream = engine.open_stream(IndexedStream())
    for index in range(5):
        engine.intake.enqueue(stream, index, index, None, None)
    held = list(transport.sent)  # [0], [1, 2]: depth 2; [3, 4] waits in the parent
    assert [s.bid for s in held] == [0, 1]
    engine.on_death(0, -9, 1000, (held[0].bid, 0))
    engine.on_ready(0, 1001)
    resent = transport.sent[len(held) :]
    assert [s.bid for s in resent] == [1, 2]  # the lost [1, 2] goes before [3, 4]
    for sent in resent:
        transport.answer(sent)
    batches = _batches(engine, stream)
    assert [b[0] for b in batches] == [[0], [1, 2], [3, 4]]
    assert isinstance(batches[0][2][0], WorkerCrashed)


class _Recorder(Supervision):
    def __init__(self) -> None:
        self.deaths: list[WorkerCrashed] = []
        self.broken: list[BaseException] = []

    def worker_died(self, slot: int, crash: WorkerCrashed) -> None:
        self.deaths.append(crash)

    def broke(self, error: BaseException) -> None:
        self.broken.append(error)


def test_the_supervision_policy_hears_of_deaths_and_breaking(make_engine):
    policy = _Recorder()
    engine, transport = make_engine(workers=1, batch_size=3, supervision=policy)
    stream, sent = _one_task(engine, transport, 3)
    engine.on_death(0, -11, 1000, (sent.bid, 1))
    assert [d.exitcode for d in policy.deaths] == [-11]
    engine.on_init_error(0, ValueError("no config"))  # the replacement cannot start
    assert engine.state is PoolState.BROKEN and transport.stopped
    assert [type(e) for e in policy.broken] == [WorkerInitError]
    ((_, _, errors),) = _batches(engine, stream)
    assert isinstance(errors[1], WorkerCrashed)  # the item that crashed it
    assert all(isinstance(errors[p], BrokenPool) for p in (0, 2))  # the rest: broken pool
    with pytest.raises(BrokenPool):
        engine.intake.enqueue(engine.open_stream(IndexedStream()), 0, 0, None, None)
