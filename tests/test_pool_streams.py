"""Several ordered streams on one pool (``ProcessOrderedPool.stream()``): order per stream,
gaps, one stream's slow item never holding another, dropping a stream, ``take_any``.

No test asserts a duration: "a slow item holds back only its own stream" is checked through
what the consumer has received while the slow item is still blocked on a file.
"""

from __future__ import annotations

import multiprocessing.forkserver
import os
import time

import pytest

from ordpool import OrderedStream, PoolClosed, ProcessOrderedPool

METHODS = ["fork", "spawn", "forkserver"]


@pytest.fixture(scope="module", autouse=True)
def _forkserver() -> None:
    # started before the first test's leak check: its descriptors are not a test's leak
    multiprocessing.forkserver.ensure_running()


def _tag(item):
    return item


def _blocked(item):
    """item = (stream, i, path): waits for ``path`` when it is not None."""
    _, _, path = item
    if path is not None:
        while not os.path.exists(path):
            time.sleep(0.002)
    return item[:2]


def _drain(pool: ProcessOrderedPool, streams: list[OrderedStream]) -> dict[int, list]:
    out: dict[int, list] = {id(s): [] for s in streams}
    live = list(streams)
    while live:
        got = pool.take_any(live, timeout=30)
        assert got is not None, "no stream had results within 30 s"
        stream, results = got
        if not results:
            live.remove(stream)
            continue
        out[id(stream)] += [(r.index, r.value) for r in results]
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_each_stream_in_its_own_order_with_gaps(method: str) -> None:
    with ProcessOrderedPool(_tag, 2, start_method=method, batch_size=7) as pool:
        streams = [pool.stream() for _ in range(4)]
        expected: dict[int, list] = {id(s): [] for s in streams}
        for round_ in range(50):
            for k, stream in enumerate(streams):
                index = round_ * (k + 1) * 3 + 2**33  # gaps, and above 2**32
                stream.enqueue(index, (k, index))
                expected[id(stream)].append((index, (k, index)))
        for stream in streams:
            stream.close()
        assert _drain(pool, streams) == expected
        assert all(s.ended and s.in_flight == 0 for s in streams)


@pytest.mark.timeout(60)
def test_enqueue_many_keys_and_results() -> None:
    with ProcessOrderedPool(_tag, 2, batch_size=5) as pool:
        a = pool.stream()
        a.enqueue_many(range(0, 60, 2), [f"x{i}" for i in range(30)], keys=list(range(30)))
        a.enqueue(100, "last", key=7)
        with pytest.raises(ValueError, match="not greater"):
            a.enqueue_many([101, 101], ["y", "z"], keys=[1, 2])
        with pytest.raises(ValueError, match="key for every item"):
            a.enqueue(200, "nokey")
        with pytest.raises(ValueError, match="same length"):
            a.enqueue_many([300], [])
        a.close()
        with pytest.raises(PoolClosed):
            a.enqueue(400, "late", key=1)
        got = list(a.results())
        assert [r.index for r in got] == [*range(0, 60, 2), 100]
        assert [r.value for r in got] == [*(f"x{i}" for i in range(30)), "last"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_a_slow_item_holds_back_only_its_own_stream(method: str, tmp_path) -> None:
    release = str(tmp_path / "release")
    with ProcessOrderedPool(_blocked, 2, start_method=method, batch_size=1) as pool:
        slow, fast = pool.stream(), pool.stream()
        slow.enqueue(0, ("slow", 0, release))
        for i in range(1, 20):
            slow.enqueue(i, ("slow", i, None))
        for i in range(40):
            fast.enqueue(i, ("fast", i, None))
        fast.close()
        slow.close()
        received = []
        while (results := fast.take(timeout=30)) is not None:
            received += [r.value for r in results]
        # every result of the fast stream came while the slow one's first item is blocked
        assert received == [("fast", i) for i in range(40)]
        assert slow.take(timeout=0) == []  # nothing of the slow stream passes its item 0
        open(release, "w").close()
        assert [r.value for r in slow.results()] == [("slow", i) for i in range(20)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_a_dropped_stream_delivers_nothing_more(method: str, tmp_path) -> None:
    release = str(tmp_path / "release")
    with ProcessOrderedPool(_blocked, 2, start_method=method, batch_size=1) as pool:
        dropped, kept = pool.stream(), pool.stream()
        dropped.enqueue(0, ("d", 0, release))
        for i in range(1, 30):
            dropped.enqueue(i, ("d", i, None))
        kept.enqueue(0, ("k", 0, None))
        assert kept.take(timeout=30) == [(0, ("k", 0), None)]
        dropped.drop()
        assert dropped.ended and dropped.in_flight == 0
        assert dropped.take(timeout=0) is None
        with pytest.raises(PoolClosed):
            dropped.enqueue(50, ("d", 50, None))
        assert pool.take_any([dropped], timeout=0) == (dropped, [])
        open(release, "w").close()  # the blocked item finishes: its result is dropped
        for i in range(1, 10):
            kept.enqueue(i, ("k", i, None))
        kept.close()
        assert [r.value for r in kept.results()] == [("k", i) for i in range(1, 10)]
        assert dropped.take(timeout=0) is None
    assert pool.state == "closed"


@pytest.mark.timeout(60)
def test_streams_alongside_imap_and_results() -> None:
    with ProcessOrderedPool(_tag, 2) as pool:
        side = pool.stream(keyed=False)
        side.enqueue(5, "side")
        assert pool.map(range(100)) == list(range(100))
        pool.enqueue(1, "main")
        pool.close()
        assert [r.value for r in pool.results()] == ["main"]
        assert side.take(timeout=30) == [(5, "side", None)]
        side.close()
        assert side.take(timeout=30) is None


@pytest.mark.timeout(60)
def test_take_any_times_out_and_a_closed_pool_refuses_streams() -> None:
    pool = ProcessOrderedPool(_tag, 1)
    with pool:
        quiet = pool.stream()
        assert pool.take_any([quiet], timeout=0.05) is None
        assert quiet.take(timeout=0.01) == []
        assert "in_flight=0" in repr(quiet)
        quiet.close()
    with pytest.raises(PoolClosed):
        pool.stream()


@pytest.mark.timeout(60)
def test_enqueue_waits_for_room_in_the_shared_window(tmp_path) -> None:
    release = str(tmp_path / "release")
    with ProcessOrderedPool(_blocked, 1, window=2, batch_size=1) as pool:
        a, b = pool.stream(), pool.stream()
        a.enqueue(0, ("a", 0, release))
        a.enqueue(1, ("a", 1, None))
        with pytest.raises(TimeoutError, match="window stayed full"):
            b.enqueue_many([0, 1], [("b", 0, None), ("b", 1, None)], timeout=0.2)
        open(release, "w").close()
        a.close()
        assert [r.value for r in a.results()] == [("a", 0), ("a", 1)]
        b.enqueue_many([0, 1], [("b", 0, None), ("b", 1, None)], timeout=30)
        b.close()
        assert [r.value for r in b.results()] == [("b", 0), ("b", 1)]
