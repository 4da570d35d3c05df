"""The Ray backend: the same contract as the process pool, with Ray actors as workers.

Every test marked ``ray`` shares one local Ray instance for the module (``num_cpus=2``, its temp
dir under ``build/ray``), started by the ``ray_instance`` fixture on first use and shut down
after the module; they are skipped when Ray is not installed. Two tests run before that
instance exists: one needs no Ray (with ``ray`` hidden, asking for the backend must name the
extra to install), the other checks that a pool starts, shares and stops its own Ray.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from ordpool import ProcessOrderedPool, RemoteTraceback, WorkerCrashed, WorkerInitError

_BUILD = Path(__file__).resolve().parents[1] / "build"
# A Unix socket path holds at most 107 bytes; Ray's longest under its temp dir is
# "session_<date>_<time>_<usec>_<pid>/sockets/plasma_store" (about 65 bytes).
_SOCKET_ROOM = 70


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'ordpool\[ray\]'"):
        ProcessOrderedPool(abs, 2, backend="ray")


def _ray_temp_dir() -> str:
    temp_dir = _BUILD / "ray"
    if len(str(temp_dir)) + _SOCKET_ROOM > 107:  # a deep checkout: sockets would not fit
        temp_dir = Path(tempfile.gettempdir()) / f"ordpool-ray-{os.getuid()}"
    temp_dir.mkdir(parents=True, exist_ok=True)
    return str(temp_dir)


@pytest.mark.ray
@pytest.mark.timeout(90)
def test_a_pool_starts_ray_and_the_last_pool_stops_it() -> None:
    """No Ray running: the first pool starts one (ray_options go to ray.init), a second pool
    shares it, and it is shut down when the last of them stops, not before. Runs before the
    module's shared instance exists."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # see ray_instance
    options = {
        "num_cpus": 2,
        "_temp_dir": _ray_temp_dir(),
        "include_dashboard": False,
        "actor_options": {"num_cpus": 0.5},  # 4 actors on 2 CPUs
    }
    first = ProcessOrderedPool(square, 2, backend="ray", ray_options=options)
    try:
        assert ray.is_initialized()
        assert ray.cluster_resources()["CPU"] == 2
        second = ProcessOrderedPool(square, 2, backend="ray", ray_options=options)
    except BaseException:
        first.terminate()
        raise
    try:
        with first:
            assert first.map(range(100)) == [x * x for x in range(100)]
        assert ray.is_initialized()  # the second pool still uses it
        # Close with work outstanding: the last answer stops the actors, and Ray, from the
        # transport's collector thread.
        results = second.results()
        for i in range(500):
            second.enqueue(i, i)
        second.close()
        assert [r.value for r in results] == [x * x for x in range(500)]
        assert second.join(30)
    finally:
        second.terminate()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def ray_instance() -> Any:
    """One local Ray for the module: 2 CPUs, no dashboard, temp dir in the build folder."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, _temp_dir=_ray_temp_dir(), include_dashboard=False)
    # The actors cannot import this test module (tests/ is not on their path): ship its
    # functions by value.
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        yield ray
    finally:
        cloudpickle.unregister_pickle_by_value(module)
        ray.shutdown()


# -- functions the actors run --------------------------------------------------------------------


def square(x: int) -> int:
    if x % 97 == 0:
        time.sleep(0.002)  # uneven batch times: answers arrive out of order
    return x * x


_INITS = 0  # init() calls in this actor process


def make_state(tag: str) -> dict[str, Any]:
    global _INITS
    _INITS += 1
    return {"tag": tag, "pid": os.getpid(), "inits": _INITS, "seen": 0}


def stateful(state: dict[str, Any], x: int) -> tuple[str, int, int, int]:
    state["seen"] += 1
    return state["tag"], state["pid"], state["inits"], x + 1


def fail_on_37(x: int) -> int:
    if x == 37:
        raise ValueError(f"bad item {x}")
    return -x


def broken_init() -> None:
    raise KeyError("no config")


def stall_once(marker: str, x: int) -> int:
    """Item 250 hangs the first time it runs (the test kills its actor); the re-run returns."""
    if x == 250:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return x * 10  # the re-run, in a replacement actor
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(60)
    return x * 10


def square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_enqueue_with_gaps_comes_back_in_order(ray_instance: Any) -> None:
    indices = [i * 7 + (1 << 33) for i in range(3_000)]  # gapped, above 2**32 (Kafka offsets)
    with ProcessOrderedPool(square, 2, batch_size=16, backend="ray") as pool:
        got: list[Any] = []
        consumer = threading.Thread(target=lambda: got.extend(pool.results()))
        consumer.start()
        for n, index in enumerate(indices):
            pool.enqueue(index, n)
        pool.close()
        consumer.join(30)
        assert not consumer.is_alive()
    assert [r.index for r in got] == indices
    assert [r.value for r in got] == [n * n for n in range(len(indices))]
    assert all(r.error is None for r in got)


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_state_is_built_once_per_actor(ray_instance: Any) -> None:
    with ProcessOrderedPool(
        stateful, 2, init=make_state, initargs=("t",), batch_size=8, backend="ray"
    ) as pool:
        pids = set(pool.worker_pids())
        out = pool.map(range(2_000))
    assert [v[3] for v in out] == list(range(1, 2_001))
    assert {v[0] for v in out} == {"t"}
    assert {v[2] for v in out} == {1}  # init ran exactly once in each actor process
    assert {v[1] for v in out} <= pids
    assert len(pids) == 2


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_exception_arrives_at_its_index(ray_instance: Any) -> None:
    with ProcessOrderedPool(fail_on_37, 2, batch_size=10, backend="ray") as pool:
        out = pool.map(range(100), errors="return")
        it = pool.imap(range(100))
        assert [next(it) for _ in range(37)] == [-x for x in range(37)]
        with pytest.raises(ValueError, match="bad item 37"):
            next(it)
    err = out[37]
    assert isinstance(err, ValueError)
    assert isinstance(err.__cause__, RemoteTraceback)
    assert "fail_on_37" in str(err.__cause__)
    assert [v for i, v in enumerate(out) if i != 37] == [-x for x in range(100) if x != 37]


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_init_error_keeps_its_type_and_traceback(ray_instance: Any) -> None:
    with pytest.raises(WorkerInitError) as info:
        ProcessOrderedPool(abs, 2, init=broken_init, backend="ray")
    cause = info.value.__cause__
    assert isinstance(cause, KeyError)
    assert isinstance(cause.__cause__, RemoteTraceback)
    assert "broken_init" in str(cause.__cause__)


@pytest.mark.ray
@pytest.mark.timeout(90)
@pytest.mark.parametrize("retries", [0, 1])
def test_actor_killed_mid_batch(ray_instance: Any, tmp_path: Path, retries: int) -> None:
    """ray.kill the actor running item 250: nothing is lost, nothing hangs.

    imap over a list with a fixed batch size cuts batches at multiples of it, so the task that
    was running is items 250..299. Ray cannot say which item was running: with retries=0 the
    whole task fails with WorkerCrashed (and only it); with retries=1 it runs again.
    """
    marker = str(tmp_path / "running")
    size, n = 50, 1_000
    with ProcessOrderedPool(
        stall_once,
        2,
        init=str,  # the state is the marker's path
        initargs=(marker,),
        batch_size=size,
        retries=retries,
        backend="ray",
    ) as pool:
        old_pids = set(pool.worker_pids())
        transport = pool._engine.transport  # type: ignore[union-attr]

        def kill_when_stalled() -> None:
            deadline = time.monotonic() + 30
            while not os.path.exists(marker) or not Path(marker).read_text():
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)
            pid = int(Path(marker).read_text())
            slot = next(s for s, p in transport.pids().items() if p == pid)
            transport.kill(slot)

        killer = threading.Thread(target=kill_when_stalled)
        killer.start()
        out = pool.map(list(range(n)), errors="return")
        killer.join(5)
        deadline = time.monotonic() + 30  # the replacement may still be starting
        while len(pool.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        new_pids = set(pool.worker_pids())
        restarts = pool._engine.supervisor.restarts  # type: ignore[union-attr]
    assert restarts == 1
    assert len(new_pids) == 2 and new_pids != old_pids
    running = range(250, 300)
    for x, value in enumerate(out):
        if retries == 0 and x in running:
            assert isinstance(value, WorkerCrashed), (x, value)
        else:
            assert value == x * 10, (x, value)


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_in_flight_stays_within_the_window(ray_instance: Any) -> None:
    window = 64
    with ProcessOrderedPool(square, 2, window=window, batch_size=8, backend="ray") as pool:
        engine = pool._engine
        assert engine is not None
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, engine.inflight)
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        got = []
        try:
            for value in pool.imap(iter(range(2_000))):
                got.append(value)
                if len(got) % 100 == 0:
                    time.sleep(0.01)  # a slow consumer: the producer must wait, not pile up
                peak = max(peak, engine.inflight)
        finally:
            stop.set()
            sampler.join()
    assert got == [x * x for x in range(2_000)]
    assert 0 < peak <= window
    assert engine.delivery.peak_heap <= window


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_actor_killed_while_idle_is_replaced(ray_instance: Any) -> None:
    with ProcessOrderedPool(square, 2, backend="ray") as pool:
        engine = pool._engine
        assert engine is not None
        old = engine.transport.pids()
        engine.transport.kill(0)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = engine.transport.pids()
            if len(pids) == 2 and pids[0] != old[0]:
                break
            time.sleep(0.01)
        assert engine.supervisor.restarts == 1
        assert engine.transport.pids()[1] == old[1]
        assert pool.map(range(500)) == [x * x for x in range(500)]  # nothing blamed


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_actor_that_cannot_be_placed_fails_the_start(ray_instance: Any) -> None:
    options = {"actor_options": {"num_cpus": 2}, "start_timeout": 2}  # room for one actor only
    with pytest.raises(WorkerInitError, match="not ready within 2 seconds"):
        ProcessOrderedPool(square, 2, backend="ray", ray_options=options)


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_fixed_actor_options_are_refused(ray_instance: Any) -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        ProcessOrderedPool(
            square, 2, backend="ray", ray_options={"actor_options": {"max_concurrency": 4}}
        )


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_actor_retires_after_max_tasks(ray_instance: Any) -> None:
    """max_tasks (the spec's max_tasks_per_child): the actor answers, retires, is replaced."""
    from ordpool._core.streams import NumberedStream
    from ordpool._engine import Engine, Feeder
    from ordpool._engine.decoding import decode
    from ordpool._transport.ray import transport_factory
    from ordpool._transport.worker import worker_spec

    spec = worker_spec(square_and_pid, max_tasks=30)
    engine = Engine(
        transport_factory(spec),
        workers=2,
        window=1024,
        batch_size=10,
        max_delay=0.005,
        retries=0,
    )
    engine.start(30)
    try:
        stream = engine.open_stream(NumberedStream())
        Feeder(engine, stream).run(list(range(300)))
        values: list[Any] = []
        while (batch := engine.delivery.next_batch(stream, timeout=30)) is not None:
            batch_values, errors = decode(batch)
            assert errors is None
            values.extend(batch_values)
        engine.release_stream(stream)
    finally:
        engine.close()
        assert engine.join(30)
    assert [v for v, _ in values] == [x * x for x in range(300)]
    assert len({pid for _, pid in values}) >= 300 // 30  # each actor ran at most 30 items
    assert engine.supervisor.restarts == 0  # retiring is not a crash


def count_per_key(state: dict[str, int], event: tuple[str, int]) -> tuple[str, int, int]:
    key, _ = event
    state[key] = state.get(key, 0) + 1
    return key, state[key], os.getpid()


@pytest.mark.ray
@pytest.mark.timeout(60)
def test_keyed_items_keep_their_actor_and_order(ray_instance: Any) -> None:
    events = [(f"k{(n * 7) % 11}", n) for n in range(3000)]
    with ProcessOrderedPool(count_per_key, 2, init=dict, batch_size=64, backend="ray") as pool:
        out = list(pool.imap_keyed((key, (key, n)) for key, n in events))
    seen: dict[str, int] = {}
    actors: dict[str, set[int]] = {}
    for (key, count, pid), (expected_key, _) in zip(out, events):
        assert key == expected_key  # global order
        seen[key] = seen.get(key, 0) + 1
        assert count == seen[key]  # the actor's per-key counter saw every event, in order
        actors.setdefault(key, set()).add(pid)
    assert all(len(pids) == 1 for pids in actors.values())
