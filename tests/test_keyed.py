"""Per-key serial execution: KeyedPool, the default pool, keyed streams, stats, cancellation."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError

import pytest
from conftest import wait_until

import ordpool
from ordpool import KeyedPool, QueueFull, WorkerCrashed

pytestmark = pytest.mark.timeout(90)


def record(key: str, seq: int) -> tuple[str, int, int, int, int]:
    """A job that reports where and when it ran (CLOCK_MONOTONIC is shared by processes)."""
    start = time.monotonic_ns()
    total = 0
    for i in range(3000):
        total += i
    return key, seq, os.getpid(), start, time.monotonic_ns()


def test_same_key_serial_in_order_on_one_worker(start_method: str) -> None:
    keys = [f"user-{i}" for i in range(50)]
    counters = {k: itertools.count() for k in keys}
    order_lock = threading.Lock()
    futures = []

    def submitter(seed: int) -> None:
        for n in range(600):
            key = keys[(seed * 7 + n * 13) % len(keys)]
            with order_lock:  # the submission order of a key is its seq order
                seq = next(counters[key])
                futures.append(pool.submit(key, record, key, seq))

    with KeyedPool(2, start_method=start_method) as pool:
        threads = [threading.Thread(target=submitter, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [f.result(timeout=60) for f in futures]

    assert len(results) == 2400
    by_key: dict[str, list[tuple[str, int, int, int, int]]] = {}
    for r in results:
        by_key.setdefault(r[0], []).append(r)
    assert set(by_key) == set(keys)
    for key, runs in by_key.items():
        runs.sort(key=lambda r: r[1])
        assert [r[1] for r in runs] == list(range(len(runs))), key
        assert len({r[2] for r in runs}) == 1, f"{key} ran on several workers"
        for before, after in itertools.pairwise(runs):
            # in submission order, and never overlapping
            assert before[4] <= after[3], (key, before, after)


def handshake(mine: str, other: str, timeout: float = 20.0) -> bool:
    """Create ``mine``, then wait for ``other``: only succeeds if both jobs run at once."""
    open(mine, "w").close()
    return wait_for_file(other, timeout)


def keys_on_distinct_slots(pool: KeyedPool) -> tuple[str, str]:
    first = "key-0"
    for i in itertools.count(1):
        if pool.slot_of(f"key-{i}") != pool.slot_of(first):
            return first, f"key-{i}"
    raise AssertionError("unreachable")


def test_different_keys_run_in_parallel(start_method: str, tmp_path) -> None:
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with KeyedPool(2, start_method=start_method) as pool:
        k1, k2 = keys_on_distinct_slots(pool)
        f1 = pool.submit(k1, handshake, a, b)
        f2 = pool.submit(k2, handshake, b, a)
        assert f1.result(timeout=30) and f2.result(timeout=30)


@pytest.mark.timeout(60)
def test_a_job_for_an_idle_worker_does_not_wait_for_a_busy_keys_queue(
    start_method: str, tmp_path
) -> None:
    """A job queued behind a long job of one key must not hold back a job of another key whose
    worker is idle (a batch completes as a whole: the two must not share one)."""
    gate = str(tmp_path / "gate")
    with KeyedPool(2, start_method=start_method) as pool:
        busy, idle = keys_on_distinct_slots(pool)
        pool.submit(busy, str, 0).result(timeout=30)
        pool.submit(idle, str, 0).result(timeout=30)
        blocked = pool.submit(busy, wait_for_file, gate, 60.0)
        queued = pool.submit(busy, str, 1)  # waits for its worker
        try:
            # the gate opens only after this returns: it cannot wait for `blocked`
            assert pool.submit(idle, str, 2).result(timeout=20) == "2"
            assert not blocked.done() and not queued.done()
        finally:
            open(gate, "w").close()
        assert blocked.result(timeout=30) is True and queued.result(timeout=30) == "1"


def test_slot_is_stable_across_processes_and_hash_seeds() -> None:
    keys = ["alice", "bob", b"\x00\xff", 0, -1, 2**70, "ünïcödé"]
    code = "import ordpool, sys; keys = eval(sys.argv[1]); print([ordpool.fnv1a(k) for k in keys])"
    outputs = set()
    for seed in ("0", "1", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, repr(keys)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        outputs.add(out)
    assert outputs == {str([ordpool.fnv1a(k) for k in keys]) + "\n"}
    assert len({ordpool.fnv1a(k) % 8 for k in keys}) > 1  # it does spread keys


def wait_for_file(path: str, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_full_queue_blocks_then_proceeds(start_method: str, tmp_path) -> None:
    gate = str(tmp_path / "gate")
    with KeyedPool(1, queue_size=2, start_method=start_method) as pool:
        first = pool.submit("k", wait_for_file, gate)
        second = pool.submit("k", wait_for_file, gate)
        with pytest.raises(QueueFull):
            pool.submit("k", wait_for_file, gate, block=False)
        with pytest.raises(QueueFull):
            pool.submit("k", wait_for_file, gate, timeout=0.05)
        submitted = threading.Event()
        third = []

        def blocked_submit() -> None:
            third.append(pool.submit("k", wait_for_file, gate))
            submitted.set()

        thread = threading.Thread(target=blocked_submit)
        thread.start()
        assert not submitted.wait(0.3)  # still blocked: the queue holds two unfinished jobs
        open(gate, "w").close()
        assert submitted.wait(30)
        thread.join()
        assert first.result(30) and second.result(30) and third[0].result(30)


def until_cancelled(limit: float = 60.0) -> str:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if ordpool.cancelled():
            return "stopped early"
        time.sleep(0.005)
    return "ran to the end"


def ignore_cancel(started: str) -> None:
    open(started, "w").close()
    while True:
        time.sleep(0.05)


def test_stop_cancels_cooperatively_then_kills(start_method: str, tmp_path) -> None:
    pool = KeyedPool(2, start_method=start_method, grace=1.0).start()
    k1, k2 = keys_on_distinct_slots(pool)
    polite = pool.submit(k1, until_cancelled)
    started = str(tmp_path / "started")
    stubborn = pool.submit(k2, ignore_cancel, started)
    queued = pool.submit(k2, until_cancelled)  # behind the stubborn one: never starts
    assert wait_until(lambda: polite.running() and os.path.exists(started), timeout=30)
    begin = time.monotonic()
    pool.stop()
    assert time.monotonic() - begin < 10  # the grace period (1 s) bounds it; no hang
    assert polite.result(timeout=5) == "stopped early"
    with pytest.raises(ordpool.PoolClosed):
        stubborn.result(timeout=5)
    assert queued.cancelled()
    pool.stop()  # twice is harmless
    with pytest.raises(ordpool.PoolClosed):
        pool.submit("k", sum, [1])


def test_start_twice_and_submit_before_start() -> None:
    pool = KeyedPool(1)
    with pytest.raises(ordpool.PoolClosed, match="not started"):
        pool.submit("k", sum, [1])
    pool.start()
    pool.start()
    try:
        assert pool.submit("k", sum, [1, 2]).result(timeout=30) == 3
        assert pool.num_workers == 1
    finally:
        pool.stop()


def test_cancel_pending_and_running_jobs(start_method: str, tmp_path) -> None:
    gate = str(tmp_path / "gate")
    with KeyedPool(1, start_method=start_method) as pool:
        running = pool.submit("k", until_cancelled)
        assert wait_until(running.running, timeout=30)
        blocker = pool.submit("k", wait_for_file, gate)
        pending = [pool.submit("k", sum, [n]) for n in range(5)]
        # queued behind a running job, in the parent: cancellable
        cancelled = [f for f in pending[::2] if f.cancel()]
        # the running job is not cancelled, but is asked to stop through the token
        assert running.cancel() is False
        assert running.result(timeout=30) == "stopped early"
        open(gate, "w").close()
        assert blocker.result(timeout=30)
        for f in pending:
            if f in cancelled:
                with pytest.raises(CancelledError):
                    f.result(timeout=30)
            else:
                assert f.result(timeout=30) == sum([pending.index(f)])
        assert cancelled == pending[::2]


def test_default_pool_submit() -> None:
    futures = [ordpool.submit(f"acct-{n % 3}", pow, n, 2) for n in range(20)]
    assert [f.result(timeout=60) for f in futures] == [n * n for n in range(20)]
    assert ordpool.default_pool() is ordpool.default_pool()
    assert ordpool.default_pool().num_workers == min(8, len(os.sched_getaffinity(0)))
    ordpool.default_pool().stop()
    assert ordpool.submit("again", abs, -4).result(timeout=60) == 4  # restarts on demand
    ordpool.default_pool().stop()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="workers"):
        KeyedPool(0)
    with pytest.raises(ValueError, match="queue_size"):
        KeyedPool(1, queue_size=0)
    with pytest.raises(TypeError):
        ordpool.fnv1a(1.5)  # type: ignore[arg-type]


# -- keys in the ordered pool -------------------------------------------------------------------


def count_per_user(state: dict, event: tuple[str, int]) -> tuple[str, int, int, int]:
    user, n = event
    state[user] = state.get(user, 0) + 1
    return user, n, state[user], os.getpid()


def test_imap_keyed_keeps_per_key_state_and_global_order(start_method: str) -> None:
    events = [(f"u{(n * 31) % 97}", n) for n in range(20000)]
    with ordpool.ProcessOrderedPool(
        count_per_user, 2, init=dict, start_method=start_method
    ) as pool:
        out = list(pool.imap_keyed((user, (user, n)) for user, n in events))
    assert [n for _, n, _, _ in out] == list(range(20000))
    seen: dict[str, int] = {}
    pids: dict[str, set[int]] = {}
    for user, _, count, pid in out:
        seen[user] = seen.get(user, 0) + 1
        assert count == seen[user]  # the worker's per-user counter saw every event, in order
        pids.setdefault(user, set()).add(pid)
    assert all(len(p) == 1 for p in pids.values())


def test_enqueue_with_keys_and_gaps(start_method: str) -> None:
    with ordpool.ProcessOrderedPool(
        count_per_user, 2, init=dict, start_method=start_method
    ) as pool:
        offsets = list(range(10, 30000, 3))

        def produce() -> None:
            for off in offsets:
                user = f"u{off % 13}"
                pool.enqueue(off, (user, off), key=user)
            pool.close()

        producer = threading.Thread(target=produce)
        producer.start()
        results = list(pool.results())
        producer.join()
    assert [r.index for r in results] == offsets
    counts: dict[str, int] = {}
    for r in results:
        user, _, count, _ = r.get()
        counts[user] = counts.get(user, 0) + 1
        assert count == counts[user]


def test_enqueue_key_must_be_all_or_nothing() -> None:
    with ordpool.ProcessOrderedPool(abs, 1) as pool:
        pool.enqueue(0, -1, key="a")
        with pytest.raises(ValueError, match="key"):
            pool.enqueue(1, -2)
        pool.close()
        assert [r.value for r in pool.results()] == [1]


# -- stats --------------------------------------------------------------------------------------


def fail_or_stall(x: int) -> int:
    if x % 100 == 7:
        raise KeyError(x)
    if x == 5000:
        time.sleep(0.5)  # gives the test a worker that is busy when it is killed
    return x


def test_stats_add_up_after_failures_and_a_killed_worker(start_method: str) -> None:
    with ordpool.ProcessOrderedPool(
        fail_or_stall, 2, window=512, start_method=start_method
    ) as pool:
        before = pool.stats()
        assert before.submitted == before.completed == before.failed == 0
        assert before.idle_workers == 2 and len(before.workers) == 2
        outs = pool.imap(range(10000), errors="return")
        got = []
        for value in outs:
            got.append(value)
            if len(got) == 4000:
                victim = pool.worker_pids()[0]
                os.kill(victim, signal.SIGKILL)
        stats = pool.stats()
    errors = [v for v in got if isinstance(v, BaseException)]
    crashed = [e for e in errors if isinstance(e, WorkerCrashed)]
    raised = [e for e in errors if isinstance(e, KeyError)]
    assert len(got) == 10000
    assert stats.submitted == 10000
    assert stats.submitted == stats.completed + stats.failed
    assert stats.failed == len(errors) == len(raised) + len(crashed)
    assert 100 - len(crashed) <= len(raised) <= 100  # a crash may hit a failing item
    assert stats.restarts == 1
    assert sum(w.tasks_completed for w in stats.workers) == 10000
    assert stats.in_flight == 0 and stats.in_heap == 0 and stats.peak_heap > 0
    assert sum(w.processes for w in stats.workers) == 3
    assert all(w.rss_bytes and w.rss_bytes > 0 for w in stats.workers)


def test_keyed_sessions_example_checks_itself() -> None:
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "keyed_sessions.py")
    done = subprocess.run(
        [sys.executable, example, "20000"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "20000 events" in done.stdout and "in order: True" in done.stdout


def _crash_on_one(x: int) -> int:
    if x == 1:
        time.sleep(0.3)
        os._exit(3)
    if x == 0:
        time.sleep(0.3)
    return x


@pytest.mark.timeout(60)
def test_jobs_sent_again_after_their_worker_died_complete(start_method: str) -> None:
    """Jobs batched behind one that kills its worker are sent again to the replacement: their
    futures (RUNNING already) must complete, not wedge the pool."""
    with KeyedPool(1, start_method=start_method) as pool:
        first = pool.submit("k", _crash_on_one, 0)
        assert wait_until(first.running, timeout=30)  # the next three wait behind it
        crashing, *rest = [pool.submit("k", _crash_on_one, i) for i in (1, 2, 3)]
        assert first.result(timeout=30) == 0
        with pytest.raises(WorkerCrashed):
            crashing.result(timeout=30)
        assert [f.result(timeout=30) for f in rest] == [2, 3]
