"""``OrderedProcessPoolExecutor`` against ``ProcessPoolExecutor``'s contract (CPython 3.11-3.13).

Every behavioural test runs under ``fork``, ``spawn`` and ``forkserver``. Crash cases are a table
(how the worker dies -> ``BrokenProcessPool`` for that future, the pending ones, and later
calls). No timing assertions here: speed is measured by ``bench/executor.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import gc
import itertools
import multiprocessing
import multiprocessing.forkserver
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

import psutil
import pytest
from conftest import wait_until

from ordpool import BrokenPool, WorkerCrashed, worker_local
from ordpool._executor import BrokenProcessPool, OrderedProcessPoolExecutor
from ordpool._transport import wire as _wire

METHODS = ["fork", "spawn", "forkserver"]

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module", autouse=True)
def _forkserver_running() -> None:
    # Started before the first test's leak check, so its descriptors are not counted as a leak.
    multiprocessing.forkserver.ensure_running()


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return request.param


def collect(iterator, into: list) -> None:
    """Append what ``iterator`` yields to ``into`` until it ends or raises."""
    for value in iterator:
        into.append(value)


def make(method: str, workers: int = 2, **kwargs) -> OrderedProcessPoolExecutor:
    return OrderedProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(method), **kwargs
    )


# -- functions run by the workers ----------------------------------------------------------------


def index_into(table: bytes, i: int) -> int:
    return table[i]


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def fail_at(i: int) -> int:
    if i == 5:
        raise ValueError(f"bad item {i}")
    return i


def return_lock() -> threading.Lock:
    return threading.Lock()


def die(how: str) -> None:
    if how == "os._exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)


def die_at(i: int) -> int:
    if i == 3:
        os._exit(3)
    time.sleep(0.05)
    return i


def init_fail() -> None:
    raise ValueError("error in initializer")


def init_local(token: str) -> None:
    worker_local()["token"] = token


def read_local() -> tuple[int, str, int]:
    local = worker_local()
    local["calls"] = local.get("calls", 0) + 1
    return os.getpid(), local["token"], local["calls"]


def worker_pid(_: object = None) -> int:
    return os.getpid()


# -- constructor ---------------------------------------------------------------------------------

BAD_ARGS = [
    ({"max_workers": 0}, ValueError),
    ({"max_workers": -1}, ValueError),
    ({"initializer": 42}, TypeError),
    ({"max_tasks_per_child": "3"}, TypeError),
    ({"max_tasks_per_child": 0}, ValueError),
    ({"max_tasks_per_child": 3, "mp_context": multiprocessing.get_context("fork")}, ValueError),
]


@pytest.mark.parametrize(("kwargs", "error"), BAD_ARGS)
def test_constructor_validation_matches_stdlib(kwargs: dict, error: type) -> None:
    if "max_tasks_per_child" in kwargs and sys.version_info < (3, 11):
        pytest.skip("ProcessPoolExecutor has max_tasks_per_child since Python 3.11")
    with pytest.raises(error) as theirs:
        cf.ProcessPoolExecutor(**kwargs)
    with pytest.raises(error) as ours:
        OrderedProcessPoolExecutor(**kwargs)
    assert str(ours.value) == str(theirs.value)


def test_defaults_match_stdlib() -> None:
    ours, theirs = OrderedProcessPoolExecutor(), cf.ProcessPoolExecutor()
    try:
        assert ours._max_workers == theirs._max_workers
        assert ours._mp_context.get_start_method() == theirs._mp_context.get_start_method()
        assert ours._broken is False
    finally:
        ours.shutdown()
        theirs.shutdown()
    # max_tasks_per_child defaults to spawn, like the stdlib
    executor = OrderedProcessPoolExecutor(1, max_tasks_per_child=2)
    assert executor._mp_context.get_start_method() == "spawn"
    executor.shutdown()


def test_is_an_executor_and_broken_class_is_both() -> None:
    assert issubclass(OrderedProcessPoolExecutor, cf.Executor)
    assert issubclass(BrokenProcessPool, cf.process.BrokenProcessPool)
    assert issubclass(BrokenProcessPool, BrokenPool)
    assert issubclass(BrokenProcessPool, cf.BrokenExecutor)


# -- submit and futures --------------------------------------------------------------------------


def test_submit_result(method: str) -> None:
    with make(method) as executor:
        future = executor.submit(pow, 2, 10)
        assert isinstance(future, cf.Future)
        assert future.result(timeout=30) == 1024
        assert executor.submit(int, "ff", base=16).result(timeout=30) == 255
        futures = [executor.submit(square, i) for i in range(300)]
        assert [f.result(timeout=30) for f in futures] == [i * i for i in range(300)]
        assert "running" in repr(executor)


def test_wait_as_completed_and_callbacks(method: str) -> None:
    with make(method) as executor:
        futures = [executor.submit(square, i) for i in range(20)]
        done, not_done = cf.wait(futures, timeout=30)
        assert len(done) == 20 and not not_done
        futures = [executor.submit(add, i, 1) for i in range(10)]
        assert sorted(f.result() for f in cf.as_completed(futures, timeout=30)) == list(
            range(1, 11)
        )
        seen = []
        called = threading.Event()

        def callback(future: cf.Future) -> None:
            seen.append(future.result())
            called.set()

        executor.submit(square, 7).add_done_callback(callback)
        assert called.wait(30)
        assert seen == [49]


def test_submit_from_a_done_callback(method: str) -> None:
    """A callback that submits (a chain of tasks) must not deadlock the executor's thread."""
    results: list[int] = []
    finished = threading.Event()
    with make(method) as executor:

        def step(future: cf.Future) -> None:
            results.append(future.result())
            if len(results) < 5:
                executor.submit(pow, 2, len(results)).add_done_callback(step)
            else:
                finished.set()

        executor.submit(pow, 2, 0).add_done_callback(step)
        assert finished.wait(30)
    assert results == [1, 2, 4, 8, 16]


def test_asyncio_run_in_executor(method: str) -> None:
    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        with make(method) as executor:
            return await asyncio.gather(
                *(loop.run_in_executor(executor, pow, 2, i) for i in range(8))
            )

    assert asyncio.run(main()) == [2**i for i in range(8)]


def test_cancel_a_pending_future(method: str) -> None:
    with make(method, workers=1) as executor:
        executor.submit(square, 1).result(timeout=30)
        # 2 * workers + 1 calls are with the worker (RUNNING, like the stdlib's call queue);
        # the next ones wait in the executor and can be cancelled.
        running = [executor.submit(time.sleep, 0.2) for _ in range(3)]
        waiting = [executor.submit(square, i) for i in range(3)]
        assert all(f.running() for f in running)
        assert not any(f.cancel() for f in running)
        assert waiting[1].cancel()
        assert waiting[1].cancelled()
        _, not_done = cf.wait([*running, *waiting], timeout=30)
        assert not not_done
    assert [f.result() for f in running] == [None, None, None]
    assert waiting[0].result() == 0 and waiting[2].result() == 4
    assert waiting[1].cancelled()


# -- failures of tasks ---------------------------------------------------------------------------


def test_exception_keeps_type_and_remote_traceback(method: str) -> None:
    with make(method) as executor:
        error = executor.submit(raise_value_error, "boom").exception(timeout=30)
        assert type(error) is ValueError
        assert str(error) == "boom"
        assert type(error.__cause__) is cf.process._RemoteTraceback  # as the stdlib's
        text = str(error.__cause__)
        assert "raise_value_error" in text and "raise ValueError(message)" in text
        with pytest.raises(ValueError, match="boom"):
            executor.submit(raise_value_error, "boom").result(timeout=30)


def test_unpicklable_argument_fails_that_future_only(method: str) -> None:
    with make(method) as executor:
        bad = executor.submit(square, threading.Lock())
        good = executor.submit(square, 3)
        error = bad.exception(timeout=30)
        assert isinstance(error, TypeError)  # as the stdlib: the pickler's own exception
        assert "pickle" in str(error)
        assert good.result(timeout=30) == 9
        assert executor.submit(square, 4).result(timeout=30) == 16


def test_unpicklable_result_fails_that_future_only(method: str) -> None:
    with make(method) as executor:
        error = executor.submit(return_lock).exception(timeout=30)
        assert error is not None and "pickle" in str(error)
        assert executor.submit(square, 5).result(timeout=30) == 25
        assert executor._broken is False


def _refuse_to_load() -> None:
    raise ValueError("refusing to load")


class _LoadsNowhere:
    """Pickles in a worker; unpickling it in the parent raises."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def big_or_unloadable(i: int) -> object:
    """Large results (they travel pickled in short chunks); index 40 cannot be unpickled."""
    return {"odd": _LoadsNowhere(), "pad": "p" * 300} if i == 40 else {"i": i, "pad": "p" * 300}


def test_map_of_large_results_raises_where_one_cannot_be_unpickled(method: str) -> None:
    """The parent unpickles large results a chunk at a time: the chunk holding index 40 fails
    as a whole, so map yields everything before that chunk, in order, then raises; a result
    that cannot be unpickled breaks the executor, as the stdlib's result handler does."""
    with make(method) as executor:
        values = executor.map(big_or_unloadable, range(50))
        seen = [next(values) for _ in range(40 - _wire.CHUNK_MAX + 1)]  # before its chunk
        error = None
        while error is None and len(seen) <= 40:
            try:
                seen.append(next(values))
            except RuntimeError as exc:
                error = exc
        assert seen == [{"i": i, "pad": "p" * 300} for i in range(len(seen))]
        assert len(seen) <= 40
        assert isinstance(error, cf.process.BrokenProcessPool)
        assert "could not unpickle this result" in str(error.__cause__)
        assert isinstance(error.__cause__.__cause__, ValueError)
        assert list(values) == []  # map ends at its first error, as the stdlib's does
        assert executor._broken
        with pytest.raises(BrokenProcessPool):
            executor.submit(big_or_unloadable, 7)


_ARMED = {"index": -1}


def _rebuild_once(i: int) -> int:
    """Runs in the parent while a result unpickles: a KeyboardInterrupt once, at the armed i."""
    if i == _ARMED["index"]:
        _ARMED["index"] = -1
        raise KeyboardInterrupt
    return i * i


class _Rebuilt:
    def __init__(self, i: int) -> None:
        self.i = i

    def __reduce__(self):
        return (_rebuild_once, (self.i,))


@pytest.mark.parametrize("size", ["small", "large"])
def test_ctrl_c_while_map_unpickles_loses_nothing(method: str, size: str) -> None:
    """A KeyboardInterrupt while map's results unpickle reaches the caller; iterating again
    goes on where it stopped, nothing lost or repeated (small results: up to SMALL_CHUNK_MAX
    a chunk; large ones: up to CHUNK_MAX)."""
    fn = _Rebuilt if size == "small" else functools.partial(_rebuilt_large, _Rebuilt)
    n = 3000
    with make(method) as executor:
        _ARMED["index"] = 2000
        values = executor.map(fn, range(n))
        got: list = []
        with pytest.raises(KeyboardInterrupt):
            collect(values, got)
        assert len(got) <= 2000
        collect(values, got)
    expected = [i * i for i in range(n)]
    assert (got if size == "small" else [v[0] for v in got]) == expected


def _rebuilt_large(make_one, i: int) -> tuple:
    return (make_one(i), "p" * 300)


def test_result_types_survive_the_trip() -> None:
    with make("fork") as executor:
        assert type(executor.submit(bytearray, b"ab").result(timeout=30)) is bytearray
        assert [type(v) for v in executor.map(bytearray, [b"a", b"b"])] == [bytearray] * 2


def test_system_exit_in_a_task_is_its_exception(method: str) -> None:
    with make(method) as executor:
        error = executor.submit(sys.exit, 3).exception(timeout=30)
        assert isinstance(error, SystemExit)
        assert error.code == 3
        assert executor.submit(square, 6).result(timeout=30) == 36


@pytest.mark.parametrize("how", ["os._exit", "SIGKILL"])
def test_worker_death_breaks_the_executor(method: str, how: str) -> None:
    executor = make(method)
    try:
        assert executor.submit(square, 2).result(timeout=30) == 4
        crash = executor.submit(die, how)
        pending = [executor.submit(time.sleep, 1) for _ in range(4)]
        with pytest.raises(cf.process.BrokenProcessPool) as info:
            crash.result(timeout=30)
        error = info.value
        assert isinstance(error, BrokenPool)
        assert str(error) == (
            "A process in the process pool was terminated abruptly while the future was "
            "running or pending."
        )
        assert isinstance(error.__cause__, WorkerCrashed)
        for future in pending:
            with pytest.raises(BrokenProcessPool):
                future.result(timeout=30)
        with pytest.raises(BrokenProcessPool, match="A child process terminated abruptly"):
            executor.submit(square, 2)
        with pytest.raises(BrokenProcessPool):
            executor.map(square, [1])
        assert executor._broken
    finally:
        executor.shutdown()


def test_worker_death_in_map_breaks_the_executor(method: str) -> None:
    executor = make(method)
    try:
        with pytest.raises(BrokenProcessPool):
            list(executor.map(die_at, range(10)))
        with pytest.raises(BrokenProcessPool):
            executor.submit(square, 2)
    finally:
        executor.shutdown()


_FAILING_INIT_SCRIPT = """
import logging, logging.handlers, multiprocessing, sys, time
import concurrent.futures as cf
import ordpool

def init_fail(log_queue):
    logger = logging.getLogger("concurrent.futures")
    logger.addHandler(logging.handlers.QueueHandler(log_queue))
    logger.propagate = False
    raise ValueError("error in initializer")

if __name__ == "__main__":
    context = multiprocessing.get_context(sys.argv[1])
    log_queue = context.Queue()
    executor = ordpool.OrderedProcessPoolExecutor(
        2, mp_context=context, initializer=init_fail, initargs=(log_queue,)
    )
    try:
        future = executor.submit(abs, 2)
    except cf.BrokenExecutor:
        pass  # already broken
    else:
        try:
            future.result(timeout=60)
        except cf.process.BrokenProcessPool as exc:
            assert isinstance(exc.__cause__, ordpool.WorkerInitError), repr(exc.__cause__)
        else:
            raise AssertionError("the future did not fail")
    deadline = time.monotonic() + 60
    while not executor._broken and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        executor.submit(abs, 2)
    except cf.process.BrokenProcessPool:
        pass
    else:
        raise AssertionError("submit after the break did not raise")
    executor.shutdown()
    record = log_queue.get(timeout=60)
    print(record.name, record.levelname, repr(record.getMessage()))
"""


def test_initializer_failure_is_logged_in_the_worker_and_breaks(
    method: str, tmp_path: pathlib.Path
) -> None:
    # As the stdlib's worker: the CRITICAL line is logged in the worker, so a handler that the
    # initializer installed there (on a queue passed in initargs) receives it. (A process of
    # its own: a Queue keeps descriptors open for the rest of a process.)
    script = tmp_path / "failing_init.py"
    script.write_text(_FAILING_INIT_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), method], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    name, level, message = proc.stdout.split(" ", 2)
    assert (name, level) == ("concurrent.futures", "CRITICAL")
    assert "Exception in initializer:" in message
    assert "ValueError: error in initializer" in message  # with the worker's traceback


def test_initializer_and_worker_local(method: str) -> None:
    with make(method, initializer=init_local, initargs=("hello",)) as executor:
        results = [executor.submit(read_local).result(timeout=30) for _ in range(6)]
    assert {token for _, token, _ in results} == {"hello"}
    per_worker: dict[int, list[int]] = {}
    for pid, _, calls in results:
        per_worker.setdefault(pid, []).append(calls)
    for calls in per_worker.values():  # the dict lives as long as the worker process
        assert calls == list(range(1, len(calls) + 1))


# -- map -----------------------------------------------------------------------------------------


def test_map_in_order(method: str) -> None:
    with make(method) as executor:
        assert list(executor.map(square, range(1000))) == [i * i for i in range(1000)]
        assert list(executor.map(add, range(10), range(5))) == [2 * i for i in range(5)]
        assert list(executor.map(square, [], chunksize=50)) == []
        assert list(executor.map(square)) == []
        assert list(executor.map(square, range(100), chunksize=7)) == [i * i for i in range(100)]


def test_map_validates_eagerly() -> None:
    executor = OrderedProcessPoolExecutor(1)
    try:
        with pytest.raises(ValueError, match=r"^chunksize must be >= 1\.$"):  # the stdlib's
            executor.map(square, [1], chunksize=0)
        with pytest.raises(TypeError):
            executor.map(square, 5)
        with pytest.raises(ValueError, match="buffersize must be None or > 0"):
            executor.map(square, [1], buffersize=0)
    finally:
        executor.shutdown()


def test_map_is_lazy_on_an_endless_input(method: str) -> None:
    read = itertools.count()

    def numbers():
        for i in itertools.count():
            next(read)
            yield i

    with make(method) as executor:
        assert list(itertools.islice(executor.map(square, numbers(), buffersize=64), 50)) == [
            i * i for i in range(50)
        ]
        # abandoned: the feeder read at most twice the buffer ahead (to finish a batch)
        assert next(read) <= 50 + 2 * 64 + 1
        assert list(itertools.islice(executor.map(square, itertools.count()), 10)) == [
            i * i for i in range(10)
        ]


def test_map_over_a_list_keeps_its_buffersize(method: str) -> None:
    """A list or tuple input is fed by slices (no Python step per item), under the same bound:
    at most twice ``buffersize`` items taken ahead of the results yielded."""
    with make(method) as executor:
        it = executor.map(square, list(range(100_000)), buffersize=64)
        assert [next(it) for _ in range(50)] == [i * i for i in range(50)]
        time.sleep(0.3)  # let the feeder run as far as it may
        assert executor.stats().submitted <= 50 + 2 * 64 + 1
        assert list(executor.map(square, tuple(range(5000)))) == [i * i for i in range(5000)]
        small = executor.map(abs, list(range(-1000, 0)), buffersize=10)
        stopped = executor.map(square, list(range(10**6)), buffersize=100)
        assert next(stopped) == 0
    # shutdown(wait=True) ran all of a live map's list, as the stdlib's map had submitted it
    assert list(small) == list(range(1000, 0, -1))
    assert len(list(stopped)) == 10**6 - 1


def test_shutdown_cancel_futures_stops_a_live_map_over_a_list(method: str) -> None:
    executor = make(method)
    it = executor.map(square, list(range(10**6)), buffersize=100)
    assert next(it) == 0
    executor.shutdown(wait=True, cancel_futures=True)
    seen: list[int] = []
    with pytest.raises(cf.CancelledError):
        collect(it, seen)
    assert len(seen) <= 2 * 100 + 1  # the items already read, then CancelledError


def test_map_with_a_large_callable_goes_through_the_sender_thread(method: str) -> None:
    """A stream's pickled callable travels in every task's header; a large one (over the
    direct-write bound) is written by the worker's sender thread instead, with the same
    results and order."""
    table = bytes(range(256)) * 1024  # 256 KiB travels with the callable
    with make(method) as executor:
        out = list(executor.map(functools.partial(index_into, table), range(3000)))
    assert out == [table[i] for i in range(3000)]


def test_map_timeout(method: str) -> None:
    with make(method) as executor:
        results = []
        with pytest.raises(TimeoutError):
            collect(executor.map(time.sleep, [0, 0, 1.5], timeout=0.75), results)
        assert results == [None, None]


def test_map_raises_at_the_failing_position(method: str) -> None:
    with make(method) as executor:
        results = []
        with pytest.raises(ValueError, match="bad item 5") as info:
            collect(executor.map(fail_at, range(20)), results)
        assert results == [0, 1, 2, 3, 4]
        assert type(info.value.__cause__) is cf.process._RemoteTraceback
        # an unpicklable item fails at its own position too
        it = executor.map(square, [1, 2, threading.Lock(), 4])
        assert next(it) == 1 and next(it) == 4
        with pytest.raises(TypeError):
            next(it)
        assert list(executor.map(square, range(3))) == [0, 1, 4]


def test_map_results_stay_readable_after_shutdown(method: str) -> None:
    """The stdlib's map submits everything: shutdown(wait=True) runs all of it."""
    with make(method) as executor:
        small = executor.map(abs, range(-1000, 0), buffersize=100)
        default = executor.map(abs, range(-20000, 0))  # more than the default window
    assert list(small) == list(range(1000, 0, -1))
    assert list(default) == list(range(20000, 0, -1))


def test_shutdown_cancel_futures_stops_a_live_map(method: str) -> None:
    executor = make(method)
    it = executor.map(square, itertools.count(), buffersize=100)
    assert next(it) == 0
    executor.shutdown(wait=True, cancel_futures=True)
    with pytest.raises(cf.CancelledError):
        for _ in it:
            pass


# -- shutdown and lifetime -----------------------------------------------------------------------


def test_submit_after_shutdown(method: str) -> None:
    executor = make(method)
    assert executor.submit(square, 3).result(timeout=30) == 9
    executor.shutdown()
    with pytest.raises(RuntimeError, match=r"^cannot schedule new futures after shutdown$"):
        executor.submit(square, 3)
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        executor.map(square, [3])
    executor.shutdown()  # again: harmless
    never_started = make(method)
    never_started.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        never_started.submit(square, 3)


def test_shutdown_waits_for_pending_futures(method: str) -> None:
    executor = make(method)
    futures = [executor.submit(time.sleep, 0.05) for _ in range(12)]
    executor.shutdown(wait=True)
    assert all(f.done() and not f.cancelled() for f in futures)


def test_shutdown_without_wait_returns_at_once(method: str) -> None:
    executor = make(method)
    executor.submit(square, 1).result(timeout=30)
    future = executor.submit(time.sleep, 0.5)
    executor.shutdown(wait=False)
    assert not future.done()
    assert future.result(timeout=30) is None


def test_shutdown_cancel_futures(method: str) -> None:
    executor = make(method)
    futures = [executor.submit(time.sleep, 0.1) for _ in range(30)]
    executor.shutdown(cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    assert len(cancelled) > 15
    assert all(f.done() for f in futures)
    assert all(f.result() is None for f in futures if not f.cancelled())
    _, not_done = cf.wait(futures, timeout=5)  # cancelled futures notify their waiters
    assert not not_done


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_max_tasks_per_child(method: str) -> None:
    with make(method, workers=1, max_tasks_per_child=3) as executor:
        pids = {executor.submit(worker_pid).result(timeout=30) for _ in range(3)}
        assert len(pids) == 1
        assert executor.submit(worker_pid).result(timeout=30) not in pids


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_max_tasks_per_child_early_shutdown(method: str) -> None:
    executor = make(method, workers=2, max_tasks_per_child=1)
    futures = [executor.submit(add, i, i) for i in range(6)]
    executor.shutdown()
    assert [f.result() for f in futures] == [2 * i for i in range(6)]
    assert len({f.result() for f in futures}) == 6


def test_garbage_collected_executor_leaves_no_process(method: str) -> None:
    executor = make(method)
    future = executor.submit(worker_pid)
    pid = future.result(timeout=30)
    ref = weakref.ref(executor)
    del executor
    gc.collect()
    assert ref() is None
    assert wait_until(lambda: not psutil.pid_exists(pid), timeout=20)


def test_garbage_collected_executor_finishes_pending_work(method: str) -> None:
    executor = make(method)
    futures = [executor.submit(time.sleep, 0.05) for _ in range(6)]
    del executor
    gc.collect()
    assert all(f.result(timeout=30) is None for f in futures)


def exit_with_live_executors() -> None:
    from ordpool import _executor

    os._exit(1 if _executor._LIVE_CORES else 0)


def test_a_forked_child_forgets_the_parents_executors() -> None:
    """multiprocessing runs the threading exit hooks in its children: a fork child must not
    wait there for its parent's executors (a ``fork`` worker would hang until killed)."""
    with make("fork") as executor:
        assert executor.submit(square, 1).result(timeout=30) == 1
        child = multiprocessing.get_context("fork").Process(target=exit_with_live_executors)
        child.start()
        child.join(30)
        assert child.exitcode == 0


EXIT_SCRIPT = """if 1:
    import atexit, pathlib, sys, time
    @atexit.register
    def run_last():
        try:
            t.submit(id, None)
        except RuntimeError:
            print("runtime-error")
            raise
    from multiprocessing import get_context
    from ordpool._executor import OrderedProcessPoolExecutor
    if __name__ == "__main__":
        t = OrderedProcessPoolExecutor(2, mp_context=get_context(sys.argv[1]))
        t.submit(id, 42).result()
        # fire and forget: pending work still runs at interpreter exit, as with the stdlib
        t.submit(time.sleep, 0.3)
        t.submit(pathlib.Path(sys.argv[2]).touch)
"""


def test_interpreter_exit(method: str, tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "ran"
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, method, str(marker)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.stdout.strip() == "runtime-error", proc.stderr
    assert "RuntimeError: cannot schedule new futures after interpreter shutdown" in proc.stderr
    assert marker.exists()


def _with_lock(lock: object, x: int) -> int:
    return x


def test_map_of_a_function_that_cannot_be_pickled_fails_at_its_first_item() -> None:
    import functools
    import threading

    unpicklable = functools.partial(_with_lock, threading.Lock())
    with make("fork") as executor:
        results = executor.map(unpicklable, [1, 2])
        with pytest.raises(TypeError, match="pickle"):
            next(results)
        assert list(executor.map(square, [3])) == [9]  # the executor goes on


def wait_for_file(path: str, value: int) -> int:
    """Block until ``path`` exists, then return ``value``."""
    while not os.path.exists(path):
        time.sleep(0.005)
    return value


def test_a_queued_submit_job_waits_for_a_free_worker_not_behind_a_busy_one(
    tmp_path: pathlib.Path,
) -> None:
    """As with the stdlib's shared call queue: a job never waits in a busy worker's pipe
    while another worker could run it."""
    gate = tmp_path / "gate"
    with make("fork") as executor:
        try:
            stuck = executor.submit(wait_for_file, str(gate), 1)  # holds one worker
            others = [executor.submit(square, i) for i in range(20)]
            assert [f.result(timeout=20) for f in others] == [i * i for i in range(20)]
            assert not stuck.done()
        finally:
            gate.touch()
        assert stuck.result(timeout=30) == 1


def test_map_keeps_two_batches_per_worker(tmp_path: pathlib.Path) -> None:
    """A map's batches, unlike submit jobs, may be two per worker, so a worker has its next
    batch at hand when it finishes one."""
    gate = tmp_path / "gate"
    with make("fork") as executor:
        try:
            values = executor.map(functools.partial(wait_for_file, str(gate)), range(200))
            engine = executor._core.engine
            assert wait_until(lambda: max(len(s.outstanding) for s in engine.scheduler.slots) == 2)
        finally:
            gate.touch()
        assert list(values) == list(range(200))


def test_a_map_does_not_queue_behind_a_long_submit_job(tmp_path: pathlib.Path) -> None:
    """A map's second batch for a worker goes only behind other map batches: behind a long
    submit job, it (and the ordered map after it) would wait for that job."""
    gate = tmp_path / "gate"
    with make("fork") as executor:
        try:
            stuck = executor.submit(wait_for_file, str(gate), -1)  # holds one worker
            squares = executor.map(square, range(40), timeout=30)
            assert list(squares) == [i * i for i in range(40)]
            assert not stuck.done()
        finally:
            gate.touch()
        assert stuck.result(timeout=30) == -1


def spin(x: int) -> int:
    """About 50 us of CPU."""
    end = time.perf_counter() + 50e-6
    while time.perf_counter() < end:
        pass
    return x


def test_a_submit_during_a_long_map_does_not_wait_for_the_map() -> None:
    """While a map keeps tasks queued for every worker, a lone submit job still goes out
    (after the flusher's delay) and completes long before the map ends."""
    with make("fork") as executor:
        seen: list = []
        map_done = threading.Event()

        def consume() -> None:
            for value in executor.map(spin, iter(range(150_000))):
                seen.append(value)
            map_done.set()

        consumer = threading.Thread(target=consume)
        consumer.start()
        try:
            assert wait_until(lambda: len(seen) > 1000, timeout=30)
            for i in range(15):
                assert executor.submit(add, i, 1).result(timeout=30) == i + 1
            assert not map_done.is_set()  # every job came back while the map ran
        finally:
            consumer.join(60)
        assert seen == list(range(150_000))


# -- terminate_workers() / kill_workers() (3.14's API, on every supported Python) ----------------


def _ignore_sigterm_and_sleep(seconds: float, ready: str) -> str:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pathlib.Path(ready).touch()
    time.sleep(seconds)
    return "finished"


@pytest.mark.parametrize("how", ["terminate_workers", "kill_workers"])
def test_terminate_or_kill_workers_ends_running_calls_and_cancels_pending(
    method: str, how: str
) -> None:
    executor = make(method)
    running = [executor.submit(time.sleep, 60) for _ in range(2)]
    assert wait_until(lambda: all(f.running() for f in running), timeout=30)
    pending = [executor.submit(abs, -i) for i in range(5)]
    pids = executor._core.engine.worker_pids()  # type: ignore[union-attr]
    getattr(executor, how)()
    for future in running:  # the calls died with their workers
        with pytest.raises(BrokenProcessPool):
            future.result(timeout=30)
    for future in pending:  # cancelled, or failed with the pool: never run
        assert future.cancelled() or isinstance(future.exception(timeout=30), BrokenProcessPool)
    with pytest.raises(RuntimeError):
        executor.submit(abs, 1)
    executor.shutdown(wait=True)
    assert not [pid for pid in pids if psutil.pid_exists(pid) and _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill_workers_ends_a_worker_that_ignores_sigterm(
    method: str, tmp_path: pathlib.Path
) -> None:
    executor = make(method, workers=1)
    ready = tmp_path / "ignoring"
    future = executor.submit(_ignore_sigterm_and_sleep, 60, str(ready))
    assert wait_until(ready.exists, timeout=30)
    executor.kill_workers()
    with pytest.raises(BrokenProcessPool):
        future.result(timeout=30)
    executor.shutdown(wait=True)


def test_terminate_workers_on_an_idle_or_unstarted_executor(method: str) -> None:
    unstarted = make(method)
    unstarted.terminate_workers()  # nothing to signal: it only shuts down
    with pytest.raises(RuntimeError):
        unstarted.submit(abs, 1)
    idle = make(method)
    assert idle.submit(abs, -3).result(timeout=30) == 3
    idle.terminate_workers()
    idle.shutdown(wait=True)
    assert idle.stats().busy_workers == 0


# -- objects that must be inherited, in initargs ---------------------------------------------------

_INHERITED_SCRIPT = """
import multiprocessing, os, sys
import ordpool

def log_to(queue, lock, counter):
    with lock:
        counter.value += 1
    queue.put(("started", os.getpid()))

def double(x):
    return x * 2

def double_after_init(state, x):
    return x * 2

if __name__ == "__main__":
    method, face = sys.argv[1], sys.argv[2]
    context = multiprocessing.get_context(method)
    queue, lock, counter = context.Queue(), context.Lock(), context.Value("i", 0)
    args = (queue, lock, counter)
    if face == "executor":
        with ordpool.OrderedProcessPoolExecutor(
            2, mp_context=context, initializer=log_to, initargs=args
        ) as executor:
            assert list(executor.map(double, range(10))) == [x * 2 for x in range(10)]
    elif face == "pool":
        with ordpool.ProcessOrderedPool(
            double_after_init, 2, init=log_to, initargs=args, start_method=method
        ) as pool:
            assert list(pool.imap(range(10))) == [x * 2 for x in range(10)]
    else:
        with ordpool.KeyedPool(
            2, start_method=method, initializer=log_to, initargs=args
        ) as pool:
            assert pool.submit("k", double, 4).result(timeout=30) == 8
    started = [queue.get(timeout=30) for _ in range(2)]
    print(sorted(tag for tag, _ in started), len({pid for _, pid in started}), counter.value)
"""


@pytest.mark.parametrize("face", ["executor", "pool", "keyed"])
def test_multiprocessing_queues_locks_and_values_reach_the_initializer(
    method: str, face: str, tmp_path: pathlib.Path
) -> None:
    """A Queue, a Lock and a Value can only reach a child process through inheritance (or the
    process start): in initargs they work under every start method, as with the stdlib. (In
    a process of its own: those objects keep descriptors open for the rest of a process.)"""
    script = tmp_path / "inherited.py"
    script.write_text(_INHERITED_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), method, face], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    # each worker's initializer ran once, with the objects: a line from each, the count is 2
    assert proc.stdout.split("\n")[0] == "['started', 'started'] 2 2"


# -- failures while pickling and unpickling, as the stdlib's executor reports them --------------


def _exit() -> None:
    sys.exit(1)


def _unpickling_fails() -> None:
    raise pickle.UnpicklingError("cannot rebuild this object")


class ErrorAtUnpickle:
    """Pickles fine; unpickling it raises ``UnpicklingError``."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _unpickling_fails, ()


class ExitAtUnpickle:
    """Pickles fine; unpickling it raises ``SystemExit``."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _exit, ()


class ExitAtPickle:
    """Pickling it raises ``SystemExit``."""

    def __reduce__(self) -> tuple[Any, ...]:
        _exit()
        raise AssertionError("unreachable")


def return_instance(cls: type) -> Any:
    return cls()


class Dropped:
    """A result whose lifetime a test follows with a weak reference."""


@pytest.mark.parametrize("bad", [ErrorAtUnpickle, ExitAtUnpickle])
def test_a_call_its_worker_cannot_unpickle_breaks_the_executor(method: str, bad: type) -> None:
    executor = make(method)
    try:
        future = executor.submit(id, bad())
        with pytest.raises(cf.process.BrokenProcessPool):
            future.result(timeout=60)
        with pytest.raises(BrokenProcessPool):
            executor.submit(abs, 1)
    finally:
        executor.shutdown()


@pytest.mark.parametrize("bad", [ErrorAtUnpickle, ExitAtUnpickle])
def test_a_result_the_parent_cannot_unpickle_breaks_the_executor(method: str, bad: type) -> None:
    executor = make(method)
    try:
        future = executor.submit(return_instance, bad)
        with pytest.raises(cf.process.BrokenProcessPool) as info:
            future.result(timeout=60)
        assert "could not unpickle" in str(info.value.__cause__)
        with pytest.raises(BrokenProcessPool):
            executor.submit(abs, 1)
    finally:
        executor.shutdown()


def test_a_result_whose_pickling_exits_fails_only_its_future(method: str) -> None:
    with make(method) as executor:
        with pytest.raises(SystemExit):
            executor.submit(return_instance, ExitAtPickle).result(timeout=60)
        assert executor.submit(abs, -4).result(timeout=60) == 4  # the pool goes on


def test_shutdown_cancelling_futures_lets_the_first_calls_finish(method: str) -> None:
    # As with the stdlib: the first calls were handed on at once (its call queue) and run,
    # even though the workers were still starting; every later call is cancelled.
    executor = make(method)
    futures = [executor.submit(time.sleep, 0.1) for _ in range(50)]
    executor.shutdown(cancel_futures=True)
    ran = [f for f in futures if not f.cancelled()]
    assert 0 < len(ran) < 30
    assert ran == futures[: len(ran)]
    assert all(f.done() and f.exception() is None for f in ran)


def test_map_lets_go_of_each_result_it_yielded(method: str) -> None:
    with make(method) as executor:
        for obj in executor.map(return_instance, [Dropped] * 10):
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None


def test_the_stdlib_private_processes_and_manager_thread(method: str) -> None:
    # Code written against CPython's executor joins these after a shutdown.
    executor = make(method)
    assert executor._processes == {}
    assert executor._executor_manager_thread is None
    assert executor.submit(abs, -2).result(timeout=60) == 2
    processes = executor._processes
    assert len(processes) == 2
    assert all(p.is_alive() for p in processes.values())
    manager = executor._executor_manager_thread
    assert manager is not None and manager.is_alive()
    executor.shutdown(wait=False)
    manager.join(timeout=60)
    executor._call_queue.join_thread()
    assert not manager.is_alive()
    for p in processes.values():
        p.join(timeout=60)
        assert not p.is_alive()


def init_hang() -> None:
    time.sleep(120)


@pytest.mark.timeout(90)
def test_kill_workers_ends_workers_whose_initializer_hangs(method: str) -> None:
    # The workers never become ready: kill_workers() still finds and ends them.
    executor = make(method, initializer=init_hang)
    future = executor.submit(abs, -1)
    assert len(executor._processes) == 2  # the processes exist while their initializer runs
    executor.kill_workers()
    assert future.cancelled() or isinstance(future.exception(timeout=60), BrokenProcessPool)
    executor.shutdown(wait=True)
