"""Ordering and streaming: imap and enqueue/results under threads, gaps, huge indices, slow
items, early exits, blocking inputs and quiet streams.

No test asserts a duration: "a slow item holds back only later items" is checked through what
the consumer has seen while the slow item is still running, and "a lone item is flushed" through
an event set by the consumer before close() is called.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time

import pytest
from conftest import wait_until

from ordpool import PoolClosed, ProcessOrderedPool, WorkerCrashed, fnv1a
from ordpool._transport import wire as _wire

# -- functions run by the workers ----------------------------------------------------------------


def _square(x):
    return x * x


def _uneven(i):
    """Costs vary with i, deterministically but irregularly: a few items are much slower."""
    r = (i * 2654435761) % 1000
    if r < 2:
        time.sleep(0.001)
    elif r < 60:
        sum(range(300))
    return i, (i * i) % 1009


def _pid_and_square(x):
    return os.getpid(), x * x


def _wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.002)


def _slow_at(item):
    """item = (i, directory): index 5 waits for the release file; every item leaves a mark."""
    i, directory = item
    if i == 5:
        _wait_for(os.path.join(directory, "release"))
    with open(os.path.join(directory, f"done-{i}"), "w"):
        pass
    return _square(i)


def _announce(path):
    """Leave ``<path>.started-<pid>``: this worker is busy with a blocker."""
    with open(f"{path}.started-{os.getpid()}", "w"):
        pass


def _busy_workers(path) -> int:
    directory, name = os.path.split(path)
    return sum(n.startswith(f"{name}.started-") for n in os.listdir(directory))


def _block_on_str(x):
    """A str item is a path to wait for (occupies a worker); an int is squared."""
    if isinstance(x, str):
        _announce(x)
        _wait_for(x)
        return -1
    return x * x


def _big(x):
    if x == "big-result":
        return b"r" * (9 << 20)  # larger than a shared-memory region: travels in the pipe
    return len(x)


def _new_counter():
    return {"n": 0}


def _count_and_measure(state, item):
    state["n"] += 1
    return state["n"], len(item)


def _keyed_step(state, item):
    """Blocker items are paths; the others count their execution order in this worker."""
    if isinstance(item, str):
        _announce(item)
        _wait_for(item)
        return None
    state["n"] += 1
    return os.getpid(), state["n"], item


# -- order -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["iterator", "list", "tuple"])
def test_imap_order_with_random_costs_matches_serial(start_method, kind):
    n = 50_000
    expected = [(i, (i * i) % 1009) for i in range(n)]
    source = {
        "iterator": range,
        "list": lambda n: list(range(n)),
        "tuple": lambda n: tuple(range(n)),
    }[kind](n)
    with ProcessOrderedPool(_uneven, workers=2, start_method=start_method) as pool:
        assert list(pool.imap(source)) == expected
    assert list(source) == list(range(n))  # slices of a sequence go to batches, never itself


@pytest.mark.timeout(60)
@pytest.mark.parametrize("batch_size", [None, 7, 1000])
def test_imap_over_a_list_of_bytes_in_batches_of_any_size(start_method, batch_size):
    """Bytes items travel as the batch's own slice of the input (no copy of the list): every
    item once, in order, and the caller's list untouched."""
    messages = [bytes([i % 251]) * (i % 3000) for i in range(20_000)]
    kept = list(messages)
    with ProcessOrderedPool(
        len, workers=2, batch_size=batch_size, start_method=start_method
    ) as pool:
        assert list(pool.imap(messages)) == [len(m) for m in kept]
        assert list(pool.imap(tuple(messages[:5000]))) == [len(m) for m in kept[:5000]]
    assert messages == kept


@pytest.mark.timeout(60)
def test_enqueue_gaps_and_huge_indices_with_producer_and_consumer_threads(start_method):
    indices = sorted(
        {*range(0, 300, 3), *range(2**32 - 5, 2**32 + 300, 7), *range(2**63 - 3, 2**63 + 200, 11)}
        | {2**64 + 1, 2**70, 10**30}
    )
    assert indices[-1] > 2**63 and any(2**32 < i < 2**63 for i in indices)
    pool = ProcessOrderedPool(_square, workers=2, window=64, start_method=start_method)
    got: list = []
    errors: list = []

    def producer():
        try:
            for index in indices:
                pool.enqueue(index, index % 1000)
        except BaseException as exc:
            errors.append(exc)

    def consumer():
        try:
            got.extend(pool.results())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consumer), threading.Thread(target=producer)]
    try:
        for t in threads:
            t.start()
        threads[1].join(60)
        pool.close()
        threads[0].join(60)
        assert pool.join(30)
    finally:
        pool.terminate()
    assert errors == []
    assert [r.index for r in got] == indices
    assert [r.value for r in got] == [(i % 1000) ** 2 for i in indices]
    assert all(r.error is None for r in got)


@pytest.mark.timeout(60)
def test_two_producer_threads_sharing_a_lock_protected_counter(start_method):
    pool = ProcessOrderedPool(_square, workers=2, window=128, start_method=start_method)
    lock = threading.Lock()
    counter = itertools.count(1000, 2)  # gaps
    submitted: dict[int, int] = {}
    errors: list = []

    def producer(tag):
        try:
            for k in range(1500):
                item = tag * 10_000 + k
                with lock:  # taking an index and enqueueing it is one step
                    index = next(counter)
                    pool.enqueue(index, item)
                    submitted[index] = item
        except BaseException as exc:
            errors.append(exc)

    got: list = []
    consumer = threading.Thread(target=lambda: got.extend(pool.results()))
    producers = [threading.Thread(target=producer, args=(tag,)) for tag in (1, 2)]
    try:
        consumer.start()
        for t in producers:
            t.start()
        for t in producers:
            t.join(60)
        pool.close()
        consumer.join(60)
    finally:
        pool.terminate()
    assert errors == []
    assert len(submitted) == 3000
    assert [r.index for r in got] == sorted(submitted)
    assert [r.value for r in got] == [submitted[i] ** 2 for i in sorted(submitted)]


def test_non_increasing_index_raises_at_once_and_the_pool_still_works(start_method):
    with ProcessOrderedPool(_square, workers=2, start_method=start_method) as pool:
        pool.enqueue(5, 5)
        with pytest.raises(ValueError, match="not greater than the previous index 5"):
            pool.enqueue(5, 99)
        with pytest.raises(ValueError, match="not greater"):
            pool.enqueue(3, 99)
        with pytest.raises(TypeError):
            pool.enqueue(True, 99)
        with pytest.raises(TypeError):
            pool.enqueue("6", 99)
        with pytest.raises(TypeError):
            pool.enqueue(6.0, 99)
        pool.enqueue(6, 6)
        pool.enqueue(2**64, 7)
        pool.close()
        assert [(r.index, r.value) for r in pool.results()] == [(5, 25), (6, 36), (2**64, 49)]


def test_keyed_and_unkeyed_items_cannot_mix_in_one_stream(start_method):
    with ProcessOrderedPool(_square, workers=2, start_method=start_method) as pool:
        pool.enqueue(0, 1, key="a")
        with pytest.raises(ValueError, match="key"):
            pool.enqueue(1, 2)
        with pytest.raises(TypeError):
            pool.enqueue(2, 3, key=1.5)
        pool.enqueue(3, 4, key=b"b")
        pool.close()
        assert [(r.index, r.value) for r in pool.results()] == [(0, 1), (3, 16)]


@pytest.mark.timeout(60)
def test_a_slow_item_holds_back_only_the_items_after_it(start_method, tmp_path):
    directory = str(tmp_path)
    n = 20
    with ProcessOrderedPool(_slow_at, workers=2, batch_size=1, start_method=start_method) as pool:
        received: list[int] = []
        done = threading.Event()

        def consume():
            for value in pool.imap([(i, directory) for i in range(n)]):
                received.append(value)
            done.set()

        consumer = threading.Thread(target=consume)
        consumer.start()
        try:
            # While item 5 runs, the other worker gets through the rest, except the items queued
            # behind item 5 in its own worker (depth - 1 of them: a worker holds `depth` tasks).
            behind = pool._engine.scheduler.depth - 1
            assert wait_until(
                lambda: (
                    sum(name.startswith("done-") for name in os.listdir(directory))
                    >= n - 1 - behind
                ),
                timeout=30,
            )
            assert not os.path.exists(os.path.join(directory, "done-5"))
            # everything before item 5 was delivered, nothing after it
            assert wait_until(lambda: len(received) == 5, timeout=30)
            assert received == [_square(i) for i in range(5)]
        finally:
            with open(os.path.join(directory, "release"), "w"):
                pass
            consumer.join(30)
        assert done.is_set()
        assert received == [_square(i) for i in range(n)]


def test_many_imaps_reuse_the_same_worker_processes(start_method):
    with ProcessOrderedPool(_pid_and_square, workers=2, start_method=start_method) as pool:
        pids = set(pool.worker_pids())
        seen = set()
        for round_ in range(30):
            items = range(round_ * 10, round_ * 10 + 50)
            out = list(pool.imap(items))
            assert [sq for _, sq in out] == [x * x for x in items]
            seen.update(pid for pid, _ in out)
        assert set(pool.worker_pids()) == pids
        assert seen <= pids


# -- one stream at a time --------------------------------------------------------------------


def test_imap_while_an_enqueue_stream_is_open_raises(start_method):
    with ProcessOrderedPool(_square, workers=2, start_method=start_method) as pool:
        pool.enqueue(0, 3)
        with pytest.raises(RuntimeError, match="enqueue"):
            pool.imap([1])
        with pytest.raises(RuntimeError):
            pool.map([1])
        pool.enqueue(1, 4)  # the stream is unharmed
        pool.close()
        assert [r.value for r in pool.results()] == [9, 16]


def test_enqueue_and_results_while_an_imap_runs_raise(start_method):
    with ProcessOrderedPool(_square, workers=2, start_method=start_method) as pool:
        it = pool.imap(range(10_000))
        assert next(it) == 0
        with pytest.raises(RuntimeError, match="imap"):
            pool.enqueue(0, 1)
        with pytest.raises(RuntimeError, match="imap"):
            pool.results()
        with pytest.raises(RuntimeError, match="imap"):
            pool.imap([1])
        assert list(it) == [x * x for x in range(1, 10_000)]
        # the imap is over: the enqueue stream may open now
        pool.enqueue(0, 7)
        pool.close()
        assert [r.value for r in pool.results()] == [49]


def test_a_second_concurrent_results_consumer_is_refused(start_method):
    with ProcessOrderedPool(_square, workers=2, start_method=start_method) as pool:
        pool.enqueue(0, 2)
        first = pool.results()
        assert next(first).value == 4
        with pytest.raises(RuntimeError, match="already being iterated"):
            pool.results()
        pool.close()
        assert list(first) == []


@pytest.mark.timeout(60)
def test_breaking_out_of_imap_early_then_imap_again(start_method):
    with ProcessOrderedPool(_square, workers=2, window=256, start_method=start_method) as pool:
        for x in pool.imap(range(100_000)):
            if x >= 100:
                break
        assert pool.map(range(1000)) == [x * x for x in range(1000)]
        # an endless input, left early too
        for i, x in enumerate(pool.imap(itertools.count())):
            assert x == i * i
            if i == 500:
                break
        assert pool.map(range(10)) == [x * x for x in range(10)]
        # the abandoned streams gave their window room back
        assert wait_until(lambda: pool.stats().in_flight == 0, timeout=30)


@pytest.mark.timeout(60)
def test_lone_item_on_a_quiet_stream_is_flushed_without_close(start_method, tmp_path):
    """Both workers are busy when item 2 arrives, so it waits in a partial batch; only the
    max_delay flush can send it. The consumer must see it while the stream is still open."""
    release = str(tmp_path / "release")
    pool = ProcessOrderedPool(_block_on_str, workers=2, start_method=start_method)
    arrived = threading.Event()
    got: list = []

    def consume():
        for result in pool.results():
            got.append(result)
            if result.index == 2:
                arrived.set()

    consumer = threading.Thread(target=consume)
    try:
        consumer.start()
        pool.enqueue(0, release)
        pool.enqueue(1, release)
        assert wait_until(lambda: _busy_workers(release) == 2, timeout=30)  # both workers busy
        pool.enqueue(2, 12)
        with open(release, "w"):
            pass
        assert arrived.wait(30), "the lone item never came out before close()"
        assert pool.state == "running"
        pool.close()
        consumer.join(30)
    finally:
        pool.terminate()
    assert [(r.index, r.value) for r in got] == [(0, -1), (1, -1), (2, 144)]


@pytest.mark.timeout(60)
def test_imap_over_a_blocking_generator_delivers_before_the_input_ends(start_method):
    source: queue.Queue = queue.Queue()
    end = object()

    def generator():
        while (item := source.get()) is not end:
            yield item

    with ProcessOrderedPool(_square, workers=2, start_method=start_method) as pool:
        it = pool.imap(generator())
        try:
            for x in (3, 4, 5):
                source.put(x)
            # the generator is now blocked in source.get(): results must flow anyway
            assert [next(it), next(it), next(it)] == [9, 16, 25]
            source.put(6)
            assert next(it) == 36
        finally:
            source.put(end)
        assert list(it) == []


@pytest.mark.timeout(60)
def test_enqueue_timeout_when_the_window_stays_full(start_method, tmp_path):
    release = str(tmp_path / "release")
    pool = ProcessOrderedPool(_block_on_str, workers=2, window=2, start_method=start_method)
    try:
        pool.enqueue(0, release)
        pool.enqueue(1, release)
        with pytest.raises(TimeoutError):
            pool.enqueue(2, 5, timeout=0.2)
        with open(release, "w"):
            pass
        results = pool.results()
        assert [next(results).value, next(results).value] == [-1, -1]
        pool.enqueue(2, 5, timeout=30)  # the index was not used up by the failed call
        pool.close()
        assert [(r.index, r.value) for r in results] == [(2, 25)]
        assert pool.join(30)
    finally:
        pool.terminate()


@pytest.mark.timeout(60)
def test_items_and_results_larger_than_a_shared_memory_region(start_method):
    big = b"x" * (9 << 20)
    with ProcessOrderedPool(_big, workers=2, start_method=start_method) as pool:
        assert pool.map([big, b"small", big]) == [len(big), 5, len(big)]
        out = pool.map(["ab", "big-result", "abc"])
        assert out[0] == 2 and out[2] == 3
        assert out[1] == b"r" * (9 << 20)


@pytest.mark.timeout(60)
def test_tasks_in_the_pipe_and_in_shared_memory_keep_their_order(start_method):
    """One worker, one item per task: tasks too large for a region (written by the sender
    thread, in the pipe) alternate with small ones (written directly into a region); the
    worker must get them in the order they were sent, whichever way each went."""
    big = b"x" * (9 << 20)
    # the others from 300 B to 6.9 KB: joined, or written part by part, into the region
    items = [big if i % 3 == 0 else bytes(i * 300) for i in range(24)]
    with ProcessOrderedPool(
        _count_and_measure, workers=1, init=_new_counter, batch_size=1, start_method=start_method
    ) as pool:
        # the worker's own count of the calls it made: the order in which tasks reached it
        assert pool.map(items) == [(i + 1, len(item)) for i, item in enumerate(items)]


# -- keyed enqueue: per-key order survives a batch that is slow to pickle ---------------------

_PICKLE_GATE = threading.Event()
_PICKLING = threading.Event()


class _SlowToPickle:
    """Pickles (in the parent) only once the test opens the gate; unpickles as 2."""

    def __reduce__(self):
        _PICKLING.set()
        _PICKLE_GATE.wait(30)
        return (int, (2,))


@pytest.mark.timeout(60)
def test_keyed_items_run_in_order_even_when_an_earlier_batch_is_slow_to_pickle(
    start_method, tmp_path
):
    """Item 2 is taken by the max_delay flusher, which is then stuck pickling it while the
    producer takes and pickles the next batch (3..6) of the same key. The worker of that key
    must still run item 2 first."""
    slot_key: dict[int, str] = {}
    for k in itertools.count():
        slot_key.setdefault(fnv1a(f"key-{k}") % 2, f"key-{k}")
        if len(slot_key) == 2:
            break
    release = str(tmp_path / "release")
    _PICKLE_GATE.clear()
    _PICKLING.clear()
    pool = ProcessOrderedPool(
        _keyed_step, workers=2, init=_new_counter, batch_size=4, start_method=start_method
    )
    try:
        pool.enqueue(0, release, key=slot_key[0])
        pool.enqueue(1, release, key=slot_key[1])
        assert wait_until(lambda: _busy_workers(release) == 2, timeout=30)
        key = slot_key[0]
        pool.enqueue(2, _SlowToPickle(), key=key)
        assert _PICKLING.wait(30)  # the flusher took item 2 and is pickling it
        for i in range(3, 7):
            pool.enqueue(i, i, key=key)  # a full batch: taken and sent by this thread
    finally:
        _PICKLE_GATE.set()
        with open(release, "w"):
            pass
    try:
        pool.close()
        out = list(pool.results())
        assert pool.join(30)
    finally:
        pool.terminate()
    assert [r.index for r in out] == list(range(7))
    keyed = [r.value for r in out[2:]]
    assert [item for _, _, item in keyed] == [2, 3, 4, 5, 6]
    assert len({pid for pid, _, _ in keyed}) == 1  # one key, one worker
    order = [n for _, n, _ in keyed]
    assert order == sorted(order), f"the key's items ran out of order: {order}"


# -- abandoned iterators: known problems ---------------------------------------------------


def test_an_unstarted_dropped_imap_does_not_block_the_next_one(start_method):
    with ProcessOrderedPool(_square, workers=2, start_method=start_method) as pool:
        pool.imap(range(10))  # created, never iterated, dropped
        assert pool.map([2, 3]) == [4, 9]


@pytest.mark.timeout(60)
def test_close_and_join_finish_while_an_unfinished_imap_iterator_is_alive(start_method):
    """close() stops an imap's endless input: join() returns although the iterator was left
    early and is still referenced (as after ``for x in it: ... break`` in a with block)."""
    pool = ProcessOrderedPool(_square, workers=2, window=64, start_method=start_method)
    it = pool.imap(itertools.count())
    try:
        for i, x in enumerate(it):
            assert x == i * i
            if i > 100:
                break
        pool.close()
        assert pool.join(30)
        assert pool.state == "closed"
    finally:
        pool.terminate()
        del it


@pytest.mark.timeout(60)
def test_iterating_an_imap_after_close_ends_with_pool_closed(start_method):
    # The flusher races with close(); it loses most of the time, so a few rounds make the
    # outcome certain either way (a round ends in well under a second when nothing hangs).
    for _ in range(5):
        pool = ProcessOrderedPool(_square, workers=2, window=64, start_method=start_method)
        it = pool.imap(itertools.count())
        outcome: list = []

        def drain(it=it, outcome=outcome):
            try:
                outcome.extend(it)
            except BaseException as exc:
                outcome.append(exc)

        try:
            last = -1
            for i, _ in enumerate(it):
                last = i
                if i > 100:
                    break
            pool.close()
            assert pool.join(30)
            consumer = threading.Thread(target=drain, daemon=True)
            consumer.start()
            consumer.join(2)
            hung = consumer.is_alive()
        finally:
            pool.terminate()
            del it
        # (a hung consumer stays hung: terminate() of a CLOSED pool does nothing)
        assert not hung, "the imap consumer hangs after close()"
        consumer.join(10)
        *rest, end = outcome
        assert isinstance(end, PoolClosed)
        assert rest == [i * i for i in range(last + 1, last + 1 + len(rest))]


def test_an_unstarted_dropped_results_iterator_does_not_block_the_next(start_method):
    with ProcessOrderedPool(_square, workers=2, start_method=start_method) as pool:
        pool.enqueue(0, 3)
        pool.results()  # created, never iterated, dropped
        pool.close()
        assert [r.value for r in pool.results()] == [9]


@pytest.mark.timeout(60)
def test_results_resumed_after_a_break_loses_nothing(start_method, tmp_path):
    release = str(tmp_path / "release")
    # max_delay is large so that batches are exactly what the producer takes: [2..11], [12..21]
    # (the second blocking item is cut after two paces of max_delay / 5)
    pool = ProcessOrderedPool(
        _block_on_str, workers=2, batch_size=10, max_delay=5, start_method=start_method
    )
    try:
        pool.enqueue(0, release)
        pool.enqueue(1, release)
        assert wait_until(lambda: _busy_workers(release) == 2, timeout=30)
        for i in range(2, 22):
            pool.enqueue(i, i)
        with open(release, "w"):
            pass
        pool.close()
        seen = []
        for result in pool.results():
            seen.append(result.index)
            if len(seen) == 5:
                break
        seen.extend(r.index for r in pool.results())
        assert pool.join(30)
    finally:
        pool.terminate()
    assert seen == list(range(22))


def test_results_after_terminate_raise_pool_closed(start_method, tmp_path):
    release = str(tmp_path / "never")
    pool = ProcessOrderedPool(_block_on_str, workers=2, start_method=start_method)
    try:
        pool.enqueue(0, release)
        results = pool.results()
        pool.terminate()
        with pytest.raises(PoolClosed):
            next(results)
    finally:
        pool.terminate()


def _batch_of(x):
    """The id of the batch this item ran in; the first call in each worker is slow (a cold
    worker: imports, page faults)."""
    from ordpool import worker_local
    from ordpool._transport import worker as _worker

    if worker_local().setdefault("warm", False) is False:
        worker_local()["warm"] = True
        time.sleep(0.3)
    # Some work (about 10 us): workers that finish each batch at once sit idle, and the
    # feeder then rightly cuts a batch for them at every item (on a loaded machine, hundreds).
    sum(range(500))
    return _worker._progress[0]


@pytest.mark.timeout(60)
def test_the_input_is_not_cut_into_tiny_batches_while_workers_warm_up(start_method):
    """Batches start small (16 items) until results say what an item costs. The input must not
    run ahead meanwhile, cutting the whole window into 16-item batches: it waits as items, and
    is cut at the measured size once the first results are back."""
    n = 20_000
    with ProcessOrderedPool(_batch_of, workers=2, start_method=start_method) as pool:
        batches = pool.map(range(n))
    assert len(batches) == n
    runs = len(set(batches))
    # the window (16384 items) in 16-item batches would be about a thousand; at the measured
    # size (tens of us per item: hundreds to thousands per batch), a few dozen
    assert runs < 150, runs


def _hot_waits_for_the_cold(item):
    """item = (i, kind, directory, cold_count). The first hot item waits until every cold item
    has run; a cold item leaves a mark, and the last one opens the gate."""
    i, kind, directory, cold_count = item
    gate = os.path.join(directory, "gate")
    if kind == "hot":
        if i == 0:
            _wait_for(gate)
        return i
    with open(os.path.join(directory, f"cold-{i}"), "w"):
        pass
    if len([n for n in os.listdir(directory) if n.startswith("cold-")]) >= cold_count:
        with open(gate, "w"):
            pass
    return i


@pytest.mark.timeout(60)
def test_a_busy_hot_key_does_not_keep_other_keys_from_idle_workers(start_method, tmp_path):
    """Tasks queued for one key's busy worker must not stop the input from being cut into
    batches for the other, idle, workers: here the hot key's first item waits until every
    other key's item has run, which only other workers can do (it hung before the fix)."""
    workers = 4
    hot = next(k for k in range(1000) if fnv1a(k) % workers == 0)
    cold = [k for k in range(1000, 2000) if fnv1a(k) % workers != 0][:30]
    n_hot, n_cold = 200, 120
    pairs = [(hot, (i, "hot", str(tmp_path), n_cold)) for i in range(n_hot)]
    pairs += [(cold[i % 30], (n_hot + i, "cold", str(tmp_path), n_cold)) for i in range(n_cold)]
    with ProcessOrderedPool(
        _hot_waits_for_the_cold, workers=workers, start_method=start_method
    ) as pool:
        assert list(pool.imap_keyed(pairs)) == list(range(n_hot + n_cold))


def _hot_until_cold_ran(item):
    """item = (kind, directory): the hot key's first item waits until a cold item has run."""
    kind, directory = item
    if kind == "hot-first":
        _wait_for(os.path.join(directory, "cold-ran"))
    elif kind == "cold":
        with open(os.path.join(directory, "cold-ran"), "w"):
            pass
    return kind


@pytest.mark.timeout(60)
def test_a_cold_key_item_goes_to_its_idle_worker_while_the_input_pauses(start_method, tmp_path):
    """A hot key's worker is busy with a backlog; then one item of another key arrives, and the
    input pauses until the hot key's first item is done. That item waits for the cold one to
    have run, so the cold item must be sent to its idle worker while the input is quiet (it
    waited for more input, or for the backlog to drain: here, for ever)."""
    workers = 2
    hot = next(k for k in range(1000) if fnv1a(k) % workers == 0)
    cold = next(k for k in range(1000) if fnv1a(k) % workers == 1)
    directory = str(tmp_path)

    def pairs():
        yield hot, ("hot-first", directory)
        for _ in range(40):
            yield hot, ("hot", directory)
        yield cold, ("cold", directory)
        _wait_for(os.path.join(directory, "cold-ran"))  # the input pauses meanwhile
        yield hot, ("hot", directory)

    with ProcessOrderedPool(
        _hot_until_cold_ran, workers=workers, start_method=start_method
    ) as pool:
        out = list(pool.imap_keyed(pairs()))
    assert out == ["hot-first"] + ["hot"] * 40 + ["cold", "hot"]


def _task_id(x):
    """The wire id of the task this item ran in."""
    from ordpool._transport import worker as _worker

    return _worker._progress[0]


@pytest.mark.timeout(60)
def test_a_single_hot_key_is_not_cut_into_one_item_tasks(start_method):
    """Every item of one key goes to one worker while the others idle. An idle worker used to
    make the feeder cut a batch at each item, so a hot key ran as one-item tasks (100,000
    items: 11 s, against 0.05 s unkeyed); its items now wait as a batch while a task waits for
    that worker. Both ways in: imap_keyed over a generator, and keyed enqueue."""
    n = 20_000
    with ProcessOrderedPool(_task_id, workers=2, start_method=start_method) as pool:
        tasks = list(pool.imap_keyed(("hot", i) for i in range(n)))
    assert len(tasks) == n
    assert len(set(tasks)) < n // 20, len(set(tasks))

    n = 10_000  # within the window: the results are read after the last enqueue
    with ProcessOrderedPool(_task_id, workers=2, start_method=start_method) as pool:
        for i in range(n):
            pool.enqueue(i, i, key="hot")
        pool.close()
        tasks = [r.get() for r in pool.results()]
    assert len(tasks) == n
    assert len(set(tasks)) < n // 20, len(set(tasks))


def _large(i):
    return i, "v" * 400  # pickles to more than LARGE_MIN: CHUNK_MAX results a chunk


@pytest.mark.timeout(60)
def test_results_left_mid_chunk_resume_where_they_were_left(start_method):
    """Large results are handed out a chunk at a time; a consumer that leaves in the middle of
    a chunk (or of a batch) leaves the rest to the next results(): every index once, in order."""
    n = 500
    with ProcessOrderedPool(_large, workers=2, batch_size=100, start_method=start_method) as pool:
        for i in range(n):
            pool.enqueue(i, i)
        pool.close()
        seen: list = []
        for stop in (5, 5 + _wire.CHUNK_MAX + 3, 250):  # mid-chunk, across chunks, mid-batch
            for result in pool.results():
                seen.append(result)
                if len(seen) == stop:
                    break
        seen.extend(pool.results())
    assert [r.index for r in seen] == list(range(n))
    assert [r.value for r in seen] == [_large(i) for i in range(n)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["list", "iterator"])
def test_a_fixed_batch_size_larger_than_the_window_does_not_hang(start_method, kind):
    """The feeder waited for room for a whole batch, which a window smaller than the batch
    size never has: it hung for ever. Batches are then as large as the window allows."""
    n = 5000
    source = list(range(n)) if kind == "list" else iter(range(n))
    with ProcessOrderedPool(
        abs, workers=2, batch_size=10**6, window=1000, start_method=start_method
    ) as pool:
        assert list(pool.imap(source)) == list(range(n))


@pytest.mark.timeout(60)
def test_stats_show_the_results_a_slow_item_held_back(start_method):
    """Item 1 finishes at once on the other worker but must wait for item 0 (1 s): the wait
    shows in stats() as hold, which tells a slow item from a slow pool."""
    with ProcessOrderedPool(time.sleep, workers=2, batch_size=1, start_method=start_method) as pool:
        before = pool.stats()
        assert list(pool.imap([1.0, 0.0])) == [None, None]
        after = pool.stats()
    assert before.hold_seconds == before.max_hold_seconds == 0.0
    assert after.max_hold_seconds > 0 and after.hold_seconds > 0
    assert after.held_bytes == 0  # nothing is waiting any more


# -- results sent ahead of a slow item ------------------------------------------------------------


def _ten_then_slow(x: int) -> int:
    if x == 10:
        time.sleep(3)
    return x


def _first_arrivals(values, start: float) -> list[tuple[int, float]]:
    return [(value, time.monotonic() - start) for value in values]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["results", "imap", "executor"])
def test_with_default_settings_a_slow_item_holds_back_only_what_comes_after_it(start_method, api):
    """0 to 9 are instant and 10 sleeps 3 s, on 2 workers with the default batching: 0 to 9
    reach the consumer while 10 still runs, whatever batch it shares with them."""
    import multiprocessing

    from ordpool import OrderedProcessPoolExecutor

    if api == "executor":
        context = multiprocessing.get_context(start_method)
        # (the initializer loads this module in each worker before the clock starts)
        with OrderedProcessPoolExecutor(
            2, mp_context=context, initializer=_ten_then_slow, initargs=(0,)
        ) as executor:
            assert list(executor.map(abs, [-1, -2])) == [1, 2]  # workers started
            start = time.monotonic()
            arrivals = _first_arrivals(executor.map(_ten_then_slow, range(11)), start)
    else:
        with ProcessOrderedPool(_ten_then_slow, workers=2, start_method=start_method) as pool:
            start = time.monotonic()
            if api == "imap":
                arrivals = _first_arrivals(pool.imap(range(11)), start)
            else:
                for i in range(11):
                    pool.enqueue(i, i)
                pool.close()
                arrivals = _first_arrivals((r.value for r in pool.results()), start)
    assert [value for value, _ in arrivals] == list(range(11))
    early = max(seconds for value, seconds in arrivals if value < 10)
    late = arrivals[-1][1]
    # 0 to 9 came while 10 was still sleeping (3 s): not held back by it
    assert early < 1.0 and late >= 3.0, arrivals


def _nine_is_slow(x: int) -> int:
    if x == 9:
        time.sleep(6)
    return x


@pytest.mark.timeout(60)
def test_a_worker_sends_the_results_before_a_slow_item_by_itself(start_method):
    """The worker's own timer finds the slow item (9) long before the parent's watch would
    (``max_delay``: 4 s): 1 to 8, in 9's batch, reach the consumer while 9 still sleeps."""
    with ProcessOrderedPool(
        _nine_is_slow, workers=1, batch_size=10, max_delay=4.0, start_method=start_method
    ) as pool:
        results = pool.results()
        pool.enqueue(0, 0)  # alone, to the idle worker
        assert next(results).value == 0
        start = time.monotonic()
        for i in range(1, 11):  # one batch of 10: 1 to 10
            pool.enqueue(i, i)
        pool.close()
        arrivals = _first_arrivals((r.value for r in results), start)
    assert [value for value, _ in arrivals] == list(range(1, 11))
    early = max(seconds for value, seconds in arrivals if value < 9)
    assert early < 3.0 and arrivals[8][1] >= 6.0, arrivals


def _crash_once_after_19(job: tuple[int, str]) -> int:
    """Item 20 waits until the consumer has received item 19 (so results before it have been
    delivered, from the batch still running), then kills its worker, once (``crash-once``)
    or every time."""
    x, directory = job
    if x == 20:
        got19 = os.path.join(directory, "got-19")
        for _ in range(2000):
            if os.path.exists(got19):
                break
            time.sleep(0.005)
        marker = os.path.join(directory, "crashed")
        if not os.path.exists(marker) or os.path.exists(os.path.join(directory, "always")):
            with open(marker, "w"):
                pass
            os._exit(7)
    with open(os.path.join(directory, f"ran-{x}-{os.getpid()}-{time.monotonic_ns()}"), "w"):
        pass
    return x * 2


@pytest.mark.timeout(90)
@pytest.mark.parametrize("retries", [0, 1])
def test_a_worker_killed_after_it_delivered_part_of_a_batch(start_method, tmp_path, retries):
    """One batch of 50 on one worker: 0 to 19 are delivered early while 20 runs, then 20 kills
    its worker. Nothing is delivered twice or lost, order holds; the rerun runs only 20 on."""
    directory = str(tmp_path)
    if retries == 0:
        open(os.path.join(directory, "always"), "w").close()
    jobs = [(i, directory) for i in range(50)]
    with ProcessOrderedPool(
        _crash_once_after_19, workers=1, batch_size=50, retries=retries, start_method=start_method
    ) as pool:
        results = []
        for result in pool.imap(jobs, errors="return"):
            results.append(result)
            if len(results) == 20:
                open(os.path.join(directory, "got-19"), "w").close()
        restarts = pool.stats().restarts
    assert len(results) == 50  # none lost, none twice
    assert results[:20] == [2 * i for i in range(20)]  # delivered before the crash
    assert results[21:] == [2 * i for i in range(21, 50)]
    if retries:
        assert results[20] == 40
    else:
        assert isinstance(results[20], WorkerCrashed)
        assert results[20].exitcode == 7
    assert restarts == 1
    ran = sorted(int(name.split("-")[1]) for name in os.listdir(directory) if name[:4] == "ran-")
    # every item ran once: 0 to 19 were not run again (their results had been delivered), 20
    # only when its retry succeeded, 21 on only after the crash (20 held them back until then)
    assert ran == [x for x in range(50) if x != 20 or retries]


def _wait_for_the_consumer(job):
    """Item 10 waits (up to 20 s) until the consumer has item 9: it can only have it early, while
    item 10 runs. It says whether it saw that (``saw-9``)."""
    x, directory = job
    if x == 1:
        raise ValueError("one")
    if x == 10:
        for _ in range(4000):
            if os.path.exists(os.path.join(directory, "got-9")):
                open(os.path.join(directory, "saw-9"), "w").close()
                break
            time.sleep(0.005)
    return x


@pytest.mark.timeout(90)
def test_early_results_keep_errors_at_their_positions(start_method, tmp_path):
    """One batch holding an item that cannot be pickled (2), one that raises (1), then a slow
    one (10): the early results carry both failures at their own positions."""
    directory = str(tmp_path)
    jobs: list = [(i, directory) for i in range(12)]
    jobs[2] = (2, threading.Lock())  # cannot be pickled: fails in the parent, at index 2
    with ProcessOrderedPool(
        _wait_for_the_consumer, workers=1, batch_size=12, start_method=start_method
    ) as pool:
        results = []
        for result in pool.imap(jobs, errors="return"):
            results.append(result)
            if len(results) == 10:
                open(os.path.join(directory, "got-9"), "w").close()
    assert os.path.exists(os.path.join(directory, "saw-9"))  # 0 to 9 arrived while 10 ran
    assert results[0] == 0 and results[3:] == list(range(3, 12))
    assert isinstance(results[1], ValueError)
    assert "pickle" in str(results[2]).lower()


def _own_alarm(x: int) -> int:
    """A function with its own SIGALRM timeout, as functions that guard a slow call do."""
    import signal

    def timed_out(signum, frame):
        raise TimeoutError("took too long")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(5)
    try:
        time.sleep(0.02 if x % 10 == 9 else 0)
        return x
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.timeout(60)
def test_a_function_with_its_own_sigalrm_timeout_is_left_alone(start_method):
    """Early results use a signal of their own: a function's alarm() is neither cancelled nor
    fired early by them."""
    with ProcessOrderedPool(_own_alarm, workers=2, start_method=start_method) as pool:
        assert list(pool.imap(range(200))) == list(range(200))


# -- enqueue_many -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_enqueue_many_with_gaps_mixed_with_enqueue_from_a_producer_thread(start_method):
    indices = [*range(0, 600, 3), *range(2**40, 2**40 + 700, 7), 2**64 + 1]
    pool = ProcessOrderedPool(_square, workers=2, window=64, start_method=start_method)
    got: list = []
    errors: list = []

    def producer():
        try:
            pos, size = 0, 1
            while pos < len(indices):
                chunk = indices[pos : pos + size]
                if size == 1:
                    pool.enqueue(chunk[0], chunk[0] % 1000)
                else:  # bunches of 2 to 150, some larger than the window
                    pool.enqueue_many(chunk, [i % 1000 for i in chunk])
                pos += size
                size = size * 7 % 151 or 1
        except BaseException as exc:
            errors.append(exc)

    consumer = threading.Thread(target=lambda: got.extend(pool.results()))
    thread = threading.Thread(target=producer)
    try:
        consumer.start()
        thread.start()
        thread.join(60)
        pool.close()
        consumer.join(60)
        assert pool.join(30)
    finally:
        pool.terminate()
    assert errors == []
    assert [r.index for r in got] == indices
    assert [r.value for r in got] == [(i % 1000) ** 2 for i in indices]


@pytest.mark.timeout(60)
def test_enqueue_many_accepts_nothing_of_a_call_it_rejects():
    with ProcessOrderedPool(_square, workers=2, batch_size=4) as pool:
        pool.enqueue_many([1, 2], [1, 2])
        with pytest.raises(ValueError, match="same length"):
            pool.enqueue_many([3, 4], [3])
        # out of order far past the first batch's worth: still nothing of it accepted
        with pytest.raises(ValueError, match="index 9 is not greater than the previous index 10"):
            pool.enqueue_many([3, 4, 5, 6, 7, 8, 10, 9], [0] * 8)
        with pytest.raises(ValueError, match="not greater than the previous index 2"):
            pool.enqueue_many([2, 30], [0, 0])
        with pytest.raises(TypeError, match="index must be an int, not float"):
            pool.enqueue_many([3, 4, 5, 6, 7, 8.0], [0] * 6)
        with pytest.raises(TypeError, match="not bool"):
            pool.enqueue_many([3, True], [0, 0])
        with pytest.raises(ValueError, match="key for every item"):
            pool.enqueue_many([3, 4], [3, 4], keys=["a", "b"])
        pool.enqueue_many([], [])
        pool.enqueue_many(range(3, 7), [3, 4, 5, 6])
        pool.close()
        with pytest.raises(PoolClosed):
            pool.enqueue_many([7], [7])
        assert [(r.index, r.value) for r in pool.results()] == [(i, i * i) for i in range(1, 7)]


@pytest.mark.timeout(60)
def test_enqueue_many_with_keys_runs_each_key_on_one_worker(start_method):
    with ProcessOrderedPool(_pid_and_square, workers=2, start_method=start_method) as pool:
        keys = [f"user-{i % 5}" for i in range(200)]
        pool.enqueue_many(range(0, 400, 2), range(200), keys=keys)
        with pytest.raises(ValueError, match="key for every item"):
            pool.enqueue(1000, 1)
        pool.close()
        got = list(pool.results())
    assert [r.index for r in got] == list(range(0, 400, 2))
    assert [r.value[1] for r in got] == [i * i for i in range(200)]
    pids: dict[str, set[int]] = {}
    for key, result in zip(keys, got):
        pids.setdefault(key, set()).add(result.value[0])
    assert all(len(p) == 1 for p in pids.values())


@pytest.mark.timeout(60)
def test_only_an_accepted_item_decides_whether_the_stream_is_keyed():
    with ProcessOrderedPool(_square, workers=2) as pool:
        pool.enqueue_many([], [])  # nothing accepted: nothing decided
        with pytest.raises(ValueError, match="not greater"):
            pool.enqueue_many([5, 5], [1, 2], keys=["a", "b"])
        with pytest.raises(TypeError):
            pool.enqueue_many([5, 6], [1, 2], keys=[1.5, 2.5])
        pool.enqueue_many(iter([5, 6]), (x for x in [5, 6]))  # any iterables
        with pytest.raises(ValueError, match="this stream is unkeyed"):
            pool.enqueue_many([7], [7], keys=["a"])
        pool.close()
        assert [(r.index, r.value) for r in pool.results()] == [(5, 25), (6, 36)]


@pytest.mark.timeout(90)
def test_every_item_enqueue_accepted_before_a_racing_close_comes_back_once(start_method):
    """Producer threads enqueue as fast as they can while close() lands: each item whose
    enqueue returned has exactly one result, and none of the others has any."""
    pool = ProcessOrderedPool(_square, workers=2, start_method=start_method)
    index_lock = threading.Lock()
    counter = itertools.count()
    accepted: list[int] = []
    refused: list[BaseException] = []
    errors: list[BaseException] = []

    def producer():
        try:
            while True:
                with index_lock:  # taking an index and enqueueing it is one step
                    index = next(counter)
                    try:
                        pool.enqueue(index, index % 1000)
                    except PoolClosed as exc:
                        refused.append(exc)
                        return
                    accepted.append(index)
        except BaseException as exc:
            errors.append(exc)

    got: list = []
    consumer = threading.Thread(target=lambda: got.extend(pool.results()))
    producers = [threading.Thread(target=producer) for _ in range(3)]
    try:
        consumer.start()
        for t in producers:
            t.start()
        assert wait_until(lambda: len(accepted) > 20_000, timeout=60)
        pool.close()
        for t in producers:
            t.join(60)
        consumer.join(60)
        assert pool.join(30)
    finally:
        pool.terminate()
    assert errors == [] and len(refused) == 3
    assert [r.index for r in got] == accepted
    assert [r.value for r in got] == [(i % 1000) ** 2 for i in accepted]
    assert pool.stats().submitted == len(accepted)
