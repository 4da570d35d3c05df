"""ProcessOrderedPool: per-worker state, arguments, and the pool's lifecycle.

Every test that starts a pool takes the ``start_method`` fixture, so it runs under fork and
spawn; ``conftest.no_leaks`` checks after each test that no process or descriptor is left.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
from conftest import wait_until

import ordpool
from ordpool import PoolClosed, ProcessOrderedPool, WorkerInitError

# -- functions run by the workers (module level: importable under spawn) ------------------------


def _double(x):
    return 2 * x


def _init_record(directory, tag):
    """Append a line to ``init-<pid>``: the file's line count is how often init ran there."""
    pid = os.getpid()
    with open(os.path.join(directory, f"init-{pid}"), "a") as f:
        f.write("init\n")
    return {"pid": pid, "calls": 0, "tag": tag}


def _state_call(state, item):
    state["calls"] += 1
    return state["pid"], state["calls"], state["tag"], item * 2


def _count_calls(x):
    local = ordpool.worker_local()
    local["n"] = local.get("n", 0) + 1
    return os.getpid(), local["n"], x


def _init_fill_local(greeting):
    ordpool.worker_local()["greeting"] = greeting
    return "state"


def _read_local(state, x):
    return state, ordpool.worker_local()["greeting"], x


def _slow_identity(x):
    time.sleep(0.002)  # the workload: keeps the imap busy long enough to be interrupted
    return x


def _wait_for_path(path):
    while not os.path.exists(path):
        time.sleep(0.005)
    return path


def _init_wait_for_path(path):
    _wait_for_path(path)
    return None


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _all_gone(pids) -> bool:
    pids = list(pids)
    return wait_until(lambda: not any(_alive(p) for p in pids), timeout=15)


# -- state ----------------------------------------------------------------------------------------


def test_init_runs_exactly_once_per_worker_and_fn_sees_the_state(start_method, tmp_path):
    with ProcessOrderedPool(
        _state_call,
        workers=2,
        init=_init_record,
        initargs=(str(tmp_path), "T"),
        start_method=start_method,
    ) as pool:
        pids = set(pool.worker_pids())
        assert len(pids) == 2
        first = pool.map(range(3000))
        second = pool.map(range(3000, 4000))
        assert set(pool.worker_pids()) == pids  # no worker was replaced
    out = first + second
    assert [item for *_, item in out] == [2 * i for i in range(4000)]
    assert {tag for _, _, tag, _ in out} == {"T"}
    seen = {pid for pid, *_ in out}
    assert seen <= pids
    # each worker's counter saw every one of its calls once: the state persisted across calls
    # and across the two map() calls
    for pid in seen:
        calls = sorted(c for p, c, _, _ in out if p == pid)
        assert calls == list(range(1, len(calls) + 1))
    # init ran exactly once in each worker, and nowhere else
    files = sorted(os.listdir(tmp_path))
    assert files == sorted(f"init-{pid}" for pid in pids)
    for name in files:
        assert (tmp_path / name).read_text() == "init\n"


def test_lambdas_and_closures_as_fn_and_init(start_method):
    offset, factor = 100, 3

    def make_state(base):  # a closure over a local variable
        return {"base": base + offset}

    with ProcessOrderedPool(
        lambda state, x: state["base"] + x * factor,
        workers=2,
        init=make_state,
        initargs=(5,),
        start_method=start_method,
    ) as pool:
        assert pool.map(range(20)) == [105 + 3 * x for x in range(20)]

    with ProcessOrderedPool(
        lambda state, f: f(state),  # items that are closures too (cloudpickled)
        workers=2,
        init=lambda: 7,
        start_method=start_method,
    ) as pool:
        funcs = [lambda s, k=k: s * k + offset for k in range(5)]
        assert pool.map(funcs) == [7 * k + 100 for k in range(5)]


def test_worker_local_is_private_to_each_worker_and_persists(start_method):
    with ProcessOrderedPool(_count_calls, workers=2, start_method=start_method) as pool:
        pids = set(pool.worker_pids())
        out = pool.map(range(2000)) + pool.map(range(2000, 2500))
    assert [x for *_, x in out] == list(range(2500))
    assert {pid for pid, *_ in out} <= pids
    for pid in {pid for pid, *_ in out}:
        counts = sorted(n for p, n, _ in out if p == pid)
        assert counts == list(range(1, len(counts) + 1))


def test_worker_local_can_be_filled_by_init(start_method):
    with ProcessOrderedPool(
        _read_local,
        workers=2,
        init=_init_fill_local,
        initargs=("hello",),
        start_method=start_method,
    ) as pool:
        assert pool.map(range(5)) == [("state", "hello", x) for x in range(5)]


def test_batches_of_large_items_fit_the_shared_memory_regions(start_method):
    """Cheap work on large items would make batches of thousands (tens of MB): the sizer keeps
    a batch's items under what a shared-memory region holds, so they never take the pipe."""
    from ordpool._transport import process as _process

    item = b"x" * (64 << 10)
    with ProcessOrderedPool(len, workers=2, start_method=start_method) as pool:
        assert pool.map([item] * 1500) == [len(item)] * 1500
        size = pool.stats().batch_size
    assert 16 <= size <= _process.ProcessTransport.max_payload // len(item)


def test_worker_local_outside_a_worker_raises():
    with pytest.raises(RuntimeError, match="only available inside an ordpool worker"):
        ordpool.worker_local()


# -- lifecycle basics ----------------------------------------------------------------------------


def test_repr_and_state_follow_the_lifecycle(start_method):
    pool = ProcessOrderedPool(_double, workers=2, start_method=start_method)
    try:
        text = repr(pool)
        assert text.startswith("<ProcessOrderedPool ")
        assert "state=running" in text
        assert "workers=2" in text
        assert "in_flight=0" in text
        assert f"start_method={start_method}" in text
        assert pool.state == "running"
        assert pool.workers == 2
        assert pool.map([1, 2, 3]) == [2, 4, 6]
        pool.close()
        assert pool.state in ("closing", "closed")
        assert pool.join(30)
        assert pool.state == "closed"
        assert "state=closed" in repr(pool)
    finally:
        pool.terminate()
    assert pool.state == "closed"  # terminate() after a finished close() changes nothing


def test_repr_after_terminate(start_method):
    pool = ProcessOrderedPool(_double, workers=2, start_method=start_method)
    pids = pool.worker_pids()
    pool.terminate()
    pool.terminate()  # harmless twice
    assert pool.state == "terminated"
    assert "state=terminated" in repr(pool)
    assert pool.join(10)
    assert _all_gone(pids)


def test_close_twice_and_join_twice_are_fine(start_method):
    pool = ProcessOrderedPool(_double, workers=2, start_method=start_method)
    pids = pool.worker_pids()
    assert pool.map([5]) == [10]
    pool.close()
    pool.close()
    assert pool.join(30)
    assert pool.join(30)
    pool.close()
    assert pool.state == "closed"
    assert _all_gone(pids)


def test_join_before_close_is_an_error(start_method):
    with (
        ProcessOrderedPool(_double, workers=2, start_method=start_method) as pool,
        pytest.raises(ValueError, match="close"),
    ):
        pool.join(1)


@pytest.mark.parametrize("how", ["close", "terminate"])
def test_use_after_close_raises_pool_closed(start_method, how):
    pool = ProcessOrderedPool(_double, workers=2, start_method=start_method)
    getattr(pool, how)()
    assert pool.join(30)
    with pytest.raises(PoolClosed):
        pool.imap([1])
    with pytest.raises(PoolClosed):
        pool.map([1])
    with pytest.raises(PoolClosed):
        pool.imap_keyed([("k", 1)])
    with pytest.raises(PoolClosed):
        pool.enqueue(0, 1)
    with pytest.raises(PoolClosed):
        pool.results()
    # PoolClosed is a RuntimeError, as for concurrent.futures after shutdown()
    with pytest.raises(RuntimeError):
        pool.map([1])


def test_context_manager_terminates_on_exception(start_method):
    with (  # noqa: PT012 - the exception must leave the pool's with block
        pytest.raises(ZeroDivisionError),
        ProcessOrderedPool(_slow_identity, workers=2, start_method=start_method) as pool,
    ):
        pids = pool.worker_pids()
        it = pool.imap(range(100_000))
        assert next(it) == 0
        1 / 0  # noqa: B018
    assert pool.state == "terminated"
    assert _all_gone(pids)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"workers": 0}, ValueError, "workers"),
        ({"workers": -2}, ValueError, "workers"),
        ({"workers": True}, ValueError, "workers"),
        ({"workers": 1.5}, ValueError, "workers"),
        ({"window": -1}, ValueError, "window"),
        ({"window": 0}, ValueError, "window"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": -5}, ValueError, "batch_size"),
        ({"max_delay": -0.1}, ValueError, "max_delay"),
        ({"retries": -1}, ValueError, "retries"),
        ({"retries": 1.5}, ValueError, "retries"),
        ({"fn": None}, TypeError, "fn must be callable"),
        ({"fn": 42}, TypeError, "fn must be callable"),
        ({"init": "not callable"}, TypeError, "init must be callable"),
        ({"start_method": "bogus"}, ValueError, "bogus"),
        ({"backend": "bogus"}, ValueError, "backend"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, type) else v.__name__,
)
def test_bad_constructor_arguments(kwargs, exc, match):
    kwargs = {"fn": _double, "workers": 2, **kwargs}
    fn = kwargs.pop("fn")
    with pytest.raises(exc, match=match):
        ProcessOrderedPool(fn, **kwargs)
    # nothing was started: conftest.no_leaks checks there is no child process


def test_bad_errors_argument(start_method):
    with ProcessOrderedPool(_double, workers=2, start_method=start_method) as pool:
        for call in (pool.imap, pool.map, pool.imap_keyed):
            with pytest.raises(ValueError, match="errors must be one of"):
                call([1], errors="bogus")
        assert pool.map([1]) == [2]  # the rejected calls left nothing open


@pytest.mark.timeout(60)
def test_init_timeout_gives_worker_init_error(start_method, tmp_path):
    never = tmp_path / "never"
    with pytest.raises(WorkerInitError, match="did not finish init within"):
        ProcessOrderedPool(
            _double,
            workers=2,
            init=_init_wait_for_path,
            initargs=(str(never),),
            init_timeout=0.5,
            start_method=start_method,
        )
    # the workers stuck in init were killed: conftest.no_leaks checks it


# -- terminate, garbage collection, Ctrl-C -------------------------------------------------------


@pytest.mark.timeout(60)
def test_terminate_during_a_long_imap_gives_the_consumer_pool_closed(start_method):
    pool = ProcessOrderedPool(_slow_identity, workers=2, start_method=start_method)
    pids = pool.worker_pids()
    got_some = threading.Event()

    def terminator():
        got_some.wait(30)
        pool.terminate()

    thread = threading.Thread(target=terminator)
    thread.start()
    got = []
    try:
        with pytest.raises(PoolClosed, match="terminated"):  # noqa: PT012
            for x in pool.imap(range(1_000_000)):
                got.append(x)
                got_some.set()
    finally:
        got_some.set()
        thread.join(30)
        pool.terminate()
    assert got == list(range(len(got)))  # what did arrive is a correct prefix
    assert 0 < len(got) < 1_000_000
    assert pool.state == "terminated"
    assert _all_gone(pids)


@pytest.mark.timeout(60)
def test_terminate_unblocks_a_producer_waiting_for_the_window_and_the_consumer(
    start_method, tmp_path
):
    never = str(tmp_path / "never")
    pool = ProcessOrderedPool(_wait_for_path, workers=2, window=4, start_method=start_method)
    pids = pool.worker_pids()
    outcome: dict[str, object] = {}

    def producer():
        try:
            for i in range(100):
                pool.enqueue(i, never)
        except BaseException as exc:
            outcome["producer"] = exc

    def consumer():
        try:
            outcome["results"] = [r.index for r in pool.results()]
        except BaseException as exc:
            outcome["consumer"] = exc

    threads = [threading.Thread(target=producer), threading.Thread(target=consumer)]
    for t in threads:
        t.start()
    try:
        # the window is full: every worker holds items that never finish
        assert wait_until(lambda: pool.stats().in_flight >= 4, timeout=30)
        pool.terminate()
        for t in threads:
            t.join(30)
            assert not t.is_alive()
    finally:
        pool.terminate()
    assert isinstance(outcome.get("producer"), PoolClosed), outcome
    assert isinstance(outcome.get("consumer"), PoolClosed), outcome
    assert _all_gone(pids)


def test_garbage_collecting_a_running_pool_warns_and_kills_the_workers(start_method):
    pool = ProcessOrderedPool(_double, workers=2, start_method=start_method)
    pids = pool.worker_pids()
    assert pool.map([1, 2]) == [2, 4]
    with pytest.warns(ResourceWarning, match="garbage-collected while running"):  # noqa: PT031
        del pool
        gc.collect()
    assert _all_gone(pids)


def _never_ending():
    threading.Event().wait(60)  # no item: the consumer waits for a first batch
    yield 0


@pytest.mark.timeout(30)
def test_ctrl_c_while_the_consumer_retakes_the_engine_lock_raises_keyboard_interrupt():
    """A Ctrl-C that lands while the waiting consumer takes the engine's lock back (another
    thread holds it) must reach the caller as KeyboardInterrupt, the lock released. With a
    plain Lock, the interrupted re-take left ``with`` without the lock, and the release raised
    "RuntimeError: release unlocked lock" instead (seen once on 3.13)."""
    with ProcessOrderedPool(abs, workers=1, start_method="fork") as pool:
        engine = pool._engine
        results = pool.imap(_never_ending())

        errors = []

        def interrupt_while_holding_the_lock():
            # the main thread waits in next_batch (on the engine's _ready condition)
            assert wait_until(lambda: len(engine.ready._waiters) > 0, timeout=10)
            try:
                with engine.lock:
                    engine.ready.notify_all()  # it wakes, and must take the lock back...
                    time.sleep(0.1)
                    os.kill(os.getpid(), signal.SIGINT)  # ...and is interrupted meanwhile
                    time.sleep(0.2)
            except BaseException as exc:  # a Lock has no owner: the consumer released ours
                errors.append(exc)

        helper = threading.Thread(target=interrupt_while_holding_the_lock)
        helper.start()
        with pytest.raises(KeyboardInterrupt):
            next(results)
        helper.join()
        assert errors == []
        assert engine.lock.acquire(blocking=False)  # nobody holds it
        engine.lock.release()
        pool.terminate()


_CTRL_C_SCRIPT = """
import sys, time
import ordpool

def slow(x):
    time.sleep(0.01)
    return x

if __name__ == "__main__":
    with ordpool.ProcessOrderedPool(slow, workers=2, start_method=sys.argv[1]) as pool:
        print("pids", *pool.worker_pids(), flush=True)
        for i, x in enumerate(pool.imap(range(10**6))):
            assert x == i
            if i == 3:
                print("ready", flush=True)
    print("unreachable", flush=True)
"""


@pytest.mark.timeout(90)
def test_ctrl_c_during_imap_gives_one_traceback_and_leaves_no_process(start_method, tmp_path):
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C_SCRIPT)
    # a session of its own: the SIGINT goes to its whole process group, as Ctrl-C in a terminal
    proc = subprocess.Popen(
        [sys.executable, str(script), start_method],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        pids_line = proc.stdout.readline().split()
        assert pids_line[:1] == ["pids"], pids_line
        workers = [int(p) for p in pids_line[1:]]
        assert proc.stdout.readline().strip() == "ready"
        tree = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert set(workers) <= set(tree)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    # an uncaught KeyboardInterrupt: CPython exits by re-raising SIGINT
    assert proc.returncode == -signal.SIGINT, (proc.returncode, err)
    assert "unreachable" not in out
    assert err.count("KeyboardInterrupt") == 1, err
    assert err.count("Traceback (most recent call last)") == 1, err
    assert "worker.py" not in err, err  # no worker printed anything
    assert "Process ordpool-worker" not in err, err
    assert _all_gone([proc.pid, *tree])


_NO_CLOSE_SCRIPT = """
import sys
import ordpool

if __name__ == "__main__":
    pool = ordpool.ProcessOrderedPool(abs, workers=2, start_method=sys.argv[1])
    print(*pool.worker_pids(), flush=True)
    assert pool.map([-1, -2]) == [1, 2]
    print("done", flush=True)
"""


@pytest.mark.timeout(60)
def test_interpreter_exit_without_close_leaves_no_process(start_method, tmp_path):
    script = tmp_path / "no_close.py"
    script.write_text(textwrap.dedent(_NO_CLOSE_SCRIPT))
    out = subprocess.run(
        [sys.executable, str(script), start_method], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    pids_line, done = out.stdout.splitlines()
    assert done == "done"
    assert "Traceback" not in out.stderr, out.stderr
    assert _all_gone(int(p) for p in pids_line.split())
