"""Unit tests of the pure building blocks: no worker process is started here.

ReorderBuffer (the reorder heap), Batcher/BatchSizer/compact_indices (batching), fnv1a (key
routing) and the wire encoding of items and results.
"""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import threading

import pytest

from ordpool import Result
from ordpool._core.batching import Batcher, BatchSizer, compact_indices
from ordpool._core.reorder import ReorderBuffer
from ordpool._core.routing import KeyRouter, fnv1a
from ordpool._transport import wire as _wire
from ordpool._transport import worker as _worker

# -- ReorderBuffer ------------------------------------------------------------------------------


def test_reorder_releases_out_of_order_pushes_in_order():
    rnd = random.Random(1234)
    seqs = list(range(200))
    rnd.shuffle(seqs)
    buf: ReorderBuffer[str] = ReorderBuffer()
    released: list[str] = []
    for seq in seqs:
        buf.push(seq, f"e{seq}", size=1)
        while (entry := buf.pop()) is not None:
            released.append(entry)
    assert released == [f"e{i}" for i in range(200)]
    assert len(buf) == 0
    assert buf.items == 0
    assert buf.next_seq == 200


def test_reorder_holds_everything_until_the_missing_seq_arrives():
    buf: ReorderBuffer[str] = ReorderBuffer()
    for seq in (3, 1, 2):
        buf.push(seq, f"e{seq}", size=10)
        assert buf.pop() is None  # seq 0 is missing: nothing may come out
    assert len(buf) == 3
    assert buf.items == 30
    buf.push(0, "e0", size=5)
    assert [buf.pop() for _ in range(5)] == ["e0", "e1", "e2", "e3", None]


def test_reorder_peak_items_tracks_the_most_items_held():
    buf: ReorderBuffer[int] = ReorderBuffer()
    buf.push(1, 1, size=7)
    buf.push(2, 2, size=3)
    assert buf.peak_items == 10
    buf.push(0, 0, size=5)
    assert buf.peak_items == 15
    assert buf.pop() == 0
    assert buf.pop() == 1
    assert buf.items == 3
    buf.push(3, 3, size=1)
    assert buf.peak_items == 15  # the peak never goes down
    assert buf.items == 4


def test_reorder_rejects_an_already_released_seq():
    buf: ReorderBuffer[str] = ReorderBuffer()
    buf.push(0, "a")
    buf.push(1, "b")
    assert buf.pop() == "a"
    assert buf.pop() == "b"
    with pytest.raises(ValueError, match="already released"):
        buf.push(1, "again")
    with pytest.raises(ValueError, match="already released"):
        buf.push(0, "again")
    buf.push(2, "c")  # the buffer still works
    assert buf.pop() == "c"


def test_reorder_first_seq():
    buf: ReorderBuffer[str] = ReorderBuffer(first_seq=10)
    buf.push(11, "b")
    assert buf.pop() is None
    buf.push(10, "a")
    assert (buf.pop(), buf.pop()) == ("a", "b")
    with pytest.raises(ValueError, match="already released"):
        buf.push(9, "old")


def test_reorder_measures_how_long_each_entry_waited_for_a_predecessor():
    buf: ReorderBuffer[str] = ReorderBuffer()
    assert buf.push(0, "a", size=4, nbytes=10, now=1.0) == 0.0  # in order: no hold
    assert buf.push(3, "d", size=2, nbytes=30, now=2.0) == 0.0  # waits for 1 and 2
    assert buf.push(2, "c", size=5, nbytes=20, now=3.0) == 0.0  # waits for 1
    assert buf.held_bytes == 50  # 3 and 2 wait for 1; 0 only for the consumer
    # 1 arrives at 7.0: it releases 2 (held 4 s, 5 items) and 3 (held 5 s, 2 items)
    assert buf.push(1, "b", size=1, nbytes=5, now=7.0) == pytest.approx(5 * 4.0 + 2 * 5.0)
    assert buf.max_hold == pytest.approx(5.0)
    assert [buf.pop() for _ in range(4)] == ["a", "b", "c", "d"]
    assert buf.held_bytes == 0 and buf.items == 0
    # the consumer coming late is not hold: an entry in order never counts, however long
    assert buf.push(4, "e", size=3, nbytes=1, now=100.0) == 0.0
    assert buf.max_hold == pytest.approx(5.0)


def test_reorder_hold_with_random_arrivals_adds_up():
    rnd = random.Random(7)
    seqs = list(range(300))
    rnd.shuffle(seqs)
    buf: ReorderBuffer[int] = ReorderBuffer()
    arrived = {}
    total = 0.0
    for now, seq in enumerate(seqs):
        arrived[seq] = float(now)
        total += buf.push(seq, seq, size=1, now=float(now))
    # each entry's hold is the time the last of its predecessors (and itself) arrived, minus
    # its own arrival
    latest = 0.0
    expected = 0.0
    for seq in range(300):
        latest = max(latest, arrived[seq])
        expected += latest - arrived[seq]
    assert total == pytest.approx(expected)
    assert buf.max_hold == max(
        max(arrived[s] for s in range(seq + 1)) - arrived[seq] for seq in range(300)
    )


# -- Batcher --------------------------------------------------------------------------------------


def test_batcher_accepts_gaps_and_returns_pending_counts():
    b = Batcher()
    assert b.add(0, "a") == 1
    assert b.add(7, "b") == 2
    assert b.add(1000, "c") == 3
    assert len(b) == 3
    assert b.take() == ([0, 7, 1000], ["a", "b", "c"], [])
    assert len(b) == 0
    # take() empties the run, but the ordering constraint remembers the last index ever
    with pytest.raises(ValueError, match="not greater"):
        b.add(1000, "d")
    assert b.add(1001, "d") == 1


def test_batcher_keeps_slots_of_keyed_items():
    b = Batcher()
    b.add(1, "x", slot=1)
    b.add(2, "y", slot=0)
    assert b.take() == ([1, 2], ["x", "y"], [1, 0])


@pytest.mark.parametrize("bad", [5, 4, -1])
def test_batcher_rejects_non_increasing_index(bad):
    b = Batcher()
    b.add(5, "a")
    with pytest.raises(ValueError, match=f"index {bad} is not greater than the previous index 5"):
        b.add(bad, "x")
    # the rejected index changed nothing
    assert b.last_index == 5
    assert len(b) == 1
    assert b.add(6, "b") == 2


@pytest.mark.parametrize("bad", [True, False, "3", 3.0, None, b"1"])
def test_batcher_rejects_non_int_index(bad):
    b = Batcher()
    with pytest.raises(TypeError, match="index must be an int"):
        b.add(bad, "x")
    with pytest.raises(TypeError):
        b.check(bad)
    assert len(b) == 0
    assert b.last_index is None


def test_batcher_accepts_huge_ints():
    b = Batcher()
    huge = [2**32 + 1, 2**63 - 1, 2**63, 2**63 + 5, 2**64 + 1, 10**30]
    for i, index in enumerate(huge, 1):
        assert b.add(index, index) == i
    indices, items, _ = b.take()
    assert indices == huge
    assert items == huge
    with pytest.raises(ValueError, match="not greater"):
        b.add(2**63, "x")


def test_batcher_accepts_int_subclasses():
    import enum

    class Offset(enum.IntEnum):
        A = 3
        B = 4

    b = Batcher()
    b.add(Offset.A, "a")
    with pytest.raises(ValueError, match="not greater"):
        b.add(Offset.A, "again")
    b.add(Offset.B, "b")
    assert b.take()[0] == [3, 4]


# -- BatchSizer -----------------------------------------------------------------------------------


def test_batch_sizer_adapts_to_the_measured_cost():
    s = BatchSizer(target=0.005, initial=16, maximum=4096)
    assert s.size == 16
    s.observe(256, 256 * 10e-6)  # 10 us per item -> 500 items per 5 ms
    assert s.size == 500
    for _ in range(50):
        s.observe(500, 500 * 100e-6)  # the items became 10x costlier
    assert s.size == 50
    for _ in range(50):
        s.observe(50, 50 * 1e-7)  # and then very cheap: capped at the maximum
    assert s.size == 4096


def test_batch_sizer_clamps_to_minimum():
    s = BatchSizer(target=0.005, minimum=2, maximum=100)
    s.observe(256, 256.0)  # one second per item
    assert s.size == 2


def test_batch_sizer_a_tiny_outlier_batch_barely_moves_the_size():
    s = BatchSizer(target=0.005, maximum=100_000)
    s.observe(256, 256 * 10e-6)
    assert s.size == 500
    s.observe(1, 0.001)  # one item hit a 1 ms page fault: 100x the usual cost
    assert 250 < s.size < 500  # moved, but not even halved


def test_batch_sizer_recovers_fast_from_a_slow_first_batch():
    """Cold workers make the first batch slow (page faults, imports); the next batches, at the
    small starting size, must bring the size up within a few batches, not hundreds."""
    s = BatchSizer(target=0.02, initial=16)
    s.observe(16, 16 * 1e-3)  # 1 ms per item, the first time only
    assert s.size == 20
    for _ in range(12):
        s.observe(s.size, s.size * 10e-6)  # really 10 us per item: 2000 per 20 ms
    assert s.size > 1000


def test_batch_sizer_one_slow_item_in_a_small_batch_barely_moves_the_size():
    s = BatchSizer(target=0.02, initial=16)
    s.observe(16, 16 * 1e-3)
    assert s.size == 20
    s.observe(20, 0.1 + 19 * 1e-3)  # one item of 100 ms: costlier items are trusted slowly
    assert s.size >= 17


def test_batch_sizer_keeps_a_batch_under_max_bytes_of_items_and_of_results():
    s = BatchSizer(target=0.02, maximum=100_000, max_bytes=1_000_000)
    s.observe(100, 100 * 1e-6)  # 1 us per item: 20,000 per 20 ms
    assert s.size == 20_000
    s.observe_bytes(100, 100 * 1000)  # items of 1 KB: 1,000 fill a batch
    assert s.size == 1000
    s.observe_bytes(100, 100 * 4000, results=True)  # results of 4 KB: the larger counts
    assert s.size == 250
    s.observe(250, 250 * 1e-6)  # the time does not lift the byte limit
    assert s.size == 250
    for _ in range(10):  # smaller results bring it down slowly (the items still count)
        s.observe_bytes(250, 250 * 100, results=True)
    assert 250 < s.size <= 1000
    for _ in range(60):
        s.observe_bytes(250, 250 * 100, results=True)
    assert s.size == 1000


def test_batch_sizer_byte_limit_before_any_time_and_never_for_a_fixed_size():
    s = BatchSizer(initial=16, max_bytes=64_000)
    s.observe_bytes(4, 4 * 1000)  # room for 64: the initial size stays until timed
    assert s.size == 16
    s.observe_bytes(4, 4 * 16_000)  # room for 4 only
    assert s.size == 4
    fixed = BatchSizer(fixed=500, max_bytes=1000)
    fixed.observe_bytes(10, 10 * 1000)
    assert fixed.size == 500
    unlimited = BatchSizer(target=0.02, maximum=100_000)  # no max_bytes: bytes are ignored
    unlimited.observe(100, 100 * 1e-6)
    unlimited.observe_bytes(100, 100 * 1_000_000)
    assert unlimited.size == 20_000


def test_batch_sizer_ignores_empty_batches():
    s = BatchSizer(initial=16)
    s.observe(0, 1.0)
    assert s.size == 16


def test_batch_sizer_fixed_ignores_measurements():
    s = BatchSizer(fixed=64)
    assert s.size == 64
    s.observe(256, 256 * 1e-7)
    s.observe(256, 256.0)
    assert s.size == 64


def test_batch_sizer_limit_lowers_the_ceiling():
    s = BatchSizer(target=0.005, initial=16, maximum=4096)
    s.observe(256, 256 * 1e-6)  # would be 5000, capped at 4096
    assert s.size == 4096
    s.limit(100)
    assert s.size == 100
    assert s.maximum == 100
    s.observe(256, 256 * 1e-6)
    assert s.size == 100  # stays under the new ceiling
    s.limit(0)
    assert s.maximum == s.minimum == 1
    assert s.size == 1


def test_batch_sizer_limit_keeps_a_fixed_size():
    s = BatchSizer(fixed=64)
    s.limit(10)
    assert s.size == 64  # a fixed size is the user's choice; the engine bounds it by the window


# -- compact_indices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("indices", "expected"),
    [
        ([5, 6, 7], range(5, 8)),
        ([0], range(0, 1)),
        ([2**63, 2**63 + 1], range(2**63, 2**63 + 2)),
        ([5, 7], [5, 7]),
        ([0, 1, 2, 10], [0, 1, 2, 10]),
        ([], []),
    ],
)
def test_compact_indices(indices, expected):
    out = compact_indices(list(indices))
    assert type(out) is type(expected)
    assert out == expected
    assert list(out) == indices


# -- fnv1a ----------------------------------------------------------------------------------------

_VECTORS = [("", 0xCBF29CE484222325), ("a", 0xAF63DC4C8601EC8C), ("foobar", 0x85944171F73967E8)]


@pytest.mark.parametrize(("key", "expected"), _VECTORS)
def test_fnv1a_known_vectors(key, expected):
    assert fnv1a(key) == expected
    assert fnv1a(key.encode()) == expected
    assert fnv1a(bytearray(key.encode())) == expected
    assert fnv1a(memoryview(key.encode())) == expected


def test_fnv1a_ints_hash_their_signed_little_endian_bytes():
    assert fnv1a(0) == fnv1a(bytes(8))
    assert fnv1a(1) == fnv1a((1).to_bytes(8, "little", signed=True))
    assert fnv1a(-1) == fnv1a(b"\xff" * 8)
    assert fnv1a(2**63) == fnv1a((2**63).to_bytes(9, "little", signed=True))
    assert len({fnv1a(i) for i in range(-1000, 1000)}) == 2000
    assert fnv1a("é") == fnv1a("é".encode())


@pytest.mark.parametrize("bad", [1.5, None, True, ("a",)])
def test_fnv1a_rejects_other_types(bad):
    with pytest.raises(TypeError, match="keys must be str, bytes or int"):
        fnv1a(bad)


def test_key_router_gives_fnv1a_slots_and_remembers_only_small_exact_keys():
    route = KeyRouter(5, size=64)
    keys = ["", "a", "user-42", b"user-42", 0, 1, -7, 2**62, 2**70, "x" * 1000, b"y" * 300]
    keys += [f"k{i}" for i in range(200)]  # more than the cache holds: it is emptied and refilled
    for _ in range(2):
        assert [route(k) for k in keys] == [fnv1a(k) % 5 for k in keys]
    assert all(len(cache) <= 64 for cache in route.caches.values())
    assert all(type(k) is kind for kind, cache in route.caches.items() for k in cache)
    assert "x" * 1000 not in route.caches[str] and 2**70 not in route.caches[int]  # computed
    # 1 is cached; True and 1.0 are equal to it as dict keys, and must still be refused
    route(1)
    for bad in (True, 1.0, None):
        with pytest.raises(TypeError, match="keys must be str, bytes or int"):
            route(bad)
    assert route(bytearray(b"ab")) == fnv1a(b"ab") % 5  # buffers route, uncached


def test_fnv1a_is_identical_in_a_process_with_another_hash_seed():
    keys = ["", "a", "foobar", "user-42", "ключ", 0, -7, 2**70]
    code = (
        "import sys; from ordpool._core.routing import KeyRouter, fnv1a; "
        f"keys = {keys!r}; "
        "print(hash('foobar')); print(*[fnv1a(k) for k in keys])"
    )
    results = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        str_hash, fnvs = out.stdout.splitlines()
        results.append((int(str_hash), [int(v) for v in fnvs.split()]))
    (hash1, fnv_1), (hash2, fnv_2) = results
    assert hash1 != hash2  # the seeds really changed hash()...
    assert fnv_1 == fnv_2 == [fnv1a(k) for k in keys]  # ...and not fnv1a


# -- wire -----------------------------------------------------------------------------------------


def _roundtrip(items):
    payload, failed = _wire.encode_items(items)
    joined = payload.join()
    assert len(joined) == payload.nbytes
    return _wire.decode_items(memoryview(joined)), payload, failed


def test_wire_bytes_items_round_trip_without_pickle():
    items = [b"", b"x", b"\x00" * 1000, b"hello\nworld", bytes(range(256))]
    decoded, payload, failed = _roundtrip(items)
    assert decoded == items
    assert all(type(d) is bytes for d in decoded)
    assert failed == {}
    assert payload.head[:1] == b"B"  # the bytes fast path
    # the items themselves are the payload: nothing copied before the wire
    assert payload.body is items


def test_wire_bytes_items_sliced_straight_from_a_region_mapping():
    """The worker slices bytes items out of its region's mmap; same items, exactly bytes."""
    import mmap

    items = [b"", b"x", b"\x00" * 5000, b"hello\nworld", bytes(range(256))]
    payload = _wire.encode_items(items)[0].join()
    region = mmap.mmap(-1, 1 << 16)
    region[: len(payload)] = payload
    view = memoryview(region)[: len(payload)]
    try:
        decoded = _wire.decode_items(view, region)
        assert decoded == items
        assert all(type(d) is bytes for d in decoded)
        # pickled items ignore the mapping
        pickled = _wire.encode_items([1, "a"])[0].join()
        region[: len(pickled)] = pickled
        assert _wire.decode_items(memoryview(region)[: len(pickled)], region) == [1, "a"]
    finally:
        view.release()
        region.close()


def test_wire_mixed_items_round_trip():
    items = [1, "a", b"x", None, (1, 2), {"k": [1.5, None]}, bytearray(b"ba"), 2**100]
    decoded, payload, failed = _roundtrip(items)
    assert decoded == items
    assert [type(d) for d in decoded] == [type(i) for i in items]
    assert failed == {}
    assert payload.head == b"P"


def test_wire_lambda_item_goes_through_cloudpickle():
    k = 3
    decoded, _, failed = _roundtrip([1, lambda x: x * k, 2])
    assert failed == {}
    assert decoded[0] == 1
    assert decoded[1](5) == 15
    assert decoded[2] == 2


def test_wire_empty_batch():
    decoded, _, failed = _roundtrip([])
    assert decoded == []
    assert failed == {}


def test_wire_unpicklable_item_fails_only_at_its_position():
    items = [0, 1, threading.Lock(), 3, b"raw"]
    decoded, _, failed = _roundtrip(items)
    assert list(failed) == [2]
    assert isinstance(failed[2], pickle.PicklingError)
    assert "lock" in str(failed[2]).lower()
    assert failed[2].__cause__ is not None
    assert decoded == [0, 1, None, 3, b"raw"]


def test_wire_results_round_trip_and_unpicklable_result():
    values = [1, "two", threading.Lock(), [4]]
    payload = _wire.encode_results(values, None)
    out_values, errors = _wire.decode_results(payload)
    assert out_values == [1, "two", None, [4]]
    assert list(errors) == [2]
    assert isinstance(errors[2], pickle.PicklingError)
    assert "cannot pickle the result" in str(errors[2])
    # the traceback came along, as for any worker exception
    assert "PicklingError" in str(errors[2].__cause__)


# -- results pickled in chunks ------------------------------------------------------------


def _doc(i):
    """A result large enough to travel at most CHUNK_MAX to a chunk (see _wire.LARGE_MIN)."""
    return {"i": i, "text": "x" * _wire.LARGE_MIN, "values": [i, float(i), (i, "t")]}


def _run(fn, items, failed=()):
    progress = memoryview(bytearray(32)).cast("q")
    payload, nerrors = _worker.run_batch(fn, items, set(failed), progress)
    assert progress[1] == len(items)
    return payload, nerrors


def _k(value):
    """Values per chunk when the first result of a batch is ``value``."""
    return _wire.chunk_length(len(pickle.dumps(value, _wire.PROTOCOL)))


def _chunks_head(payload):
    """(values, values per chunk) of a ``b"C"`` payload."""
    kind, n, k, _ = _wire._CHUNKS_HEAD.unpack_from(payload)
    assert kind == b"C"[0]
    return n, k


def test_results_travel_in_chunks_as_long_as_the_first_result_says():
    """Small results go up to SMALL_CHUNK_MAX to a chunk (about CHUNK_BYTES), large ones up to
    CHUNK_MAX; both decode whole or a chunk at a time to the values made."""
    small_fn = lambda i: (i, "t")  # noqa: E731
    small, _ = _run(small_fn, list(range(3000)))
    large, _ = _run(_doc, list(range(100)))
    n, k = _chunks_head(small)
    assert n == 3000 and k == _k(small_fn(0))
    assert _wire.CHUNK_MAX < k <= _wire.SMALL_CHUNK_MAX < n  # several chunks, the last one short
    n, k = _chunks_head(large)
    assert n == 100 and k == _k(_doc(0))
    assert 1 < k <= _wire.CHUNK_MAX < n
    for payload, fn, count in ((small, small_fn, 3000), (large, _doc, 100)):
        values, errors = _wire.decode_results(payload)
        assert errors is None
        assert values == [fn(i) for i in range(count)]
        assert type(values[0]) is type(fn(0))
        assert list(_wire.iter_values(payload, _fail_on_error)) == values
    # a chunk's values share one pickle memo: their common keys are one object in the parent
    values, _ = _wire.decode_results(large)
    key = [next(iter(v)) for v in values]
    assert key[0] is key[1] and key[0] == "i"


def test_results_only_cloudpickle_can_pickle_are_cloudpickled_once_a_chunk(monkeypatch):
    """A local class: plain pickle refuses it (as it refuses a class of ``__main__`` under
    spawn). Each chunk is cloudpickled once, not each value alone first; and large ones still go
    at most CHUNK_MAX to a chunk."""

    class Local:
        def __init__(self, i, pad=""):
            self.i, self.pad = i, pad

        def __eq__(self, other):
            return (self.i, self.pad) == (other.i, other.pad)

    calls = []
    real = _wire.cloudpickle.dumps
    monkeypatch.setattr(
        _wire.cloudpickle, "dumps", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    for pad, n in (("", 3000), ("x" * _wire.LARGE_MIN, 100)):
        calls.clear()
        payload, nerrors = _run(lambda i, pad=pad: Local(i, pad), list(range(n)))
        assert nerrors == 0
        count, k = _chunks_head(payload)
        assert count == n
        assert k <= (_wire.SMALL_CHUNK_MAX if not pad else _wire.CHUNK_MAX)
        chunks = -(-n // k)
        assert chunks > 1
        assert len(calls) <= chunks + 1, (len(calls), chunks)  # + the first result's size
        values, errors = _wire.decode_results(payload)
        assert errors is None
        assert values == [Local(i, pad) for i in range(n)]


def _always_fails(i):
    raise ValueError(f"no result for {i}")


def test_a_batch_in_which_no_item_gave_a_result_travels_as_one_pickle():
    payload, nerrors = _run(_always_fails, list(range(5)), failed=[1])
    assert payload[:1] == b"P" and nerrors == 4  # position 1 was not run (failed already)
    assert _wire.iter_values(payload, _fail_on_error) is None  # the caller decodes it whole
    values, errors = _wire.decode_results(payload)
    assert values == [None] * 5
    assert sorted(errors) == [0, 2, 3, 4]
    assert str(errors[3]) == "no result for 3"


def _fail_on_error(pos, err):
    raise AssertionError(f"unexpected error at {pos}: {err!r}")


def _doc_or_fault(i):
    if i in (0, 1):
        raise KeyError("first")  # before the first result: decided by the next one
    if i == 3:
        raise ValueError("three")
    if i == 5:
        return {"lock": threading.Lock(), "pad": "x" * _wire.LARGE_MIN}
    if i == 6:
        return lambda: "made in the worker"  # needs cloudpickle
    return _doc(i)


@pytest.mark.parametrize("n", [9, 60])
def test_chunked_results_keep_every_failure_at_its_position(n, monkeypatch):
    # chunks of 2: positions before the first result fill whole chunks; a failure in one chunk
    # leaves its neighbour alone
    monkeypatch.setattr(_wire, "CHUNK_MAX", 2)
    payload, nerrors = _run(_doc_or_fault, list(range(n)), failed={7})
    assert payload[:1] == b"C"
    values, errors = _wire.decode_results(payload)
    assert sorted(errors) == [0, 1, 3, 5]
    assert nerrors == 4
    assert isinstance(errors[0], KeyError)
    assert isinstance(errors[3], ValueError)
    assert isinstance(errors[5], pickle.PicklingError)
    assert "cannot pickle the result of type dict" in str(errors[5])
    assert values[6]() == "made in the worker"
    assert values[7] is None  # the parent already holds position 7's error
    good = [i for i in range(n) if i not in (0, 1, 3, 5, 6, 7)]
    assert [values[i] for i in good] == [_doc(i) for i in good]
    # a batch with errors is not decoded lazily: the caller merges the errors first
    assert _wire.iter_values(payload, _fail_on_error) is None


def _run_into(fn, items, out, view, fits=None, failed=()):
    """run_batch with results written by ``out`` into ``view``: the payload, and whether it
    was left in the region."""
    progress = memoryview(bytearray(32)).cast("q")
    out.target(view, fits)
    payload, nerrors = _worker.run_batch(fn, items, set(failed), progress, out)
    if payload is None:
        return bytes(view[: out.size]), nerrors, True
    return payload, nerrors, False


@pytest.mark.parametrize(
    ("room", "limit", "in_region"),
    [(1 << 20, None, True), (3000, None, False), (1 << 20, 2000, False), (0, None, False)],
    ids=["fits", "outgrows-the-region", "tmpfs-refuses", "no-region"],
)
def test_chunked_results_written_into_the_region_or_spilled(room, limit, in_region, monkeypatch):
    """The worker's ChunkWriter writes the chunks straight into the result region; results
    that outgrow it (or that tmpfs has no room for) go on in memory, and arrive the same."""
    monkeypatch.setattr(_wire, "CHUNK_MAX", 2)
    out = _wire.ChunkWriter()
    region = memoryview(bytearray(room))
    fits = None if limit is None else (lambda nbytes: nbytes <= limit)
    n = 60
    for _ in range(2):  # the same writer (and pickler) serves batch after batch
        payload, nerrors, left = _run_into(_doc_or_fault, list(range(n)), out, region, fits)
        assert left is in_region
        assert payload[:1] == b"C" and nerrors == 4
        values, errors = _wire.decode_results(payload)
        assert sorted(errors) == [0, 1, 3, 5]
        good = [i for i in range(n) if i not in (0, 1, 3, 5, 6)]
        assert [values[i] for i in good] == [_doc(i) for i in good]
        assert values[6]() == "made in the worker"


class _WatchedRegion:
    """A region that records the bytes read or written, and a ``fits`` that allows the first
    ``limit`` bytes (as ``Reservation.fits`` allows the pages it has allocated)."""

    def __init__(self, size, limit):
        self.data = bytearray(size)
        self.limit = limit
        self.allowed = 0  # the most fits() has allowed
        self.touched = 0  # the end of the furthest byte read or written

    def fits(self, nbytes):
        if nbytes <= self.limit:
            self.allowed = max(self.allowed, nbytes)
            return True
        return False

    def __len__(self):
        return len(self.data)

    def _touch(self, key):
        assert isinstance(key, slice) and key.step is None
        self.touched = max(self.touched, key.indices(len(self.data))[1])

    def __getitem__(self, key):
        self._touch(key)
        return memoryview(self.data)[key]

    def __setitem__(self, key, value):
        self._touch(key)
        self.data[key] = value


def _growing_doc(i):
    """Results that grow: the first one's size underestimates the batch."""
    return {"i": i, "pad": "x" * (_wire.LARGE_MIN + 10 * i)}


@pytest.mark.parametrize(
    ("limit", "in_region"),
    [(1 << 20, True), (200_000, False), (0, False)],
    ids=["fits", "outgrows-what-fits-midway", "refused-from-the-start"],
)
def test_the_writer_touches_only_region_bytes_that_fits_allowed(limit, in_region):
    """A full tmpfs kills a process that touches (even reads) a page it has not allocated:
    the writer reads and writes only bytes that fits() allowed, whether the payload stays in
    the region or goes on in memory."""
    region = _WatchedRegion(1 << 20, limit)
    out = _wire.ChunkWriter()
    payload, nerrors, left = _run_into(_growing_doc, list(range(300)), out, region, region.fits)
    assert left is in_region and nerrors == 0
    assert region.touched <= region.allowed
    assert (region.allowed > 0) is (limit > 0)  # midway: it was in the region at first
    values, errors = _wire.decode_results(payload)
    assert errors is None and values == [_growing_doc(i) for i in range(300)]


def test_a_payload_larger_than_the_region_never_enters_it():
    """The estimate (the first result's size times the batch) keeps a payload that cannot fit
    out of the region from the start: it would take the region's pages only to travel in the
    pipe."""
    region = _WatchedRegion(50_000, 50_000)
    out = _wire.ChunkWriter()
    payload, _, left = _run_into(_doc, list(range(500)), out, region, region.fits)
    assert not left and region.touched == 0 and region.allowed == 0
    assert list(_wire.iter_values(payload, _fail_on_error)) == [_doc(i) for i in range(500)]


def _with_buffers(i):
    from array import array

    return {
        "i": i,
        "raw": pickle.PickleBuffer(bytearray(bytes([i]) * (70 << 10))),  # over a pickle frame
        "doubles": pickle.PickleBuffer(array("d", [float(i)] * 10_000)),  # 80 KB, typed
    }


def test_large_pickle_buffers_are_written_without_the_fallback(monkeypatch):
    """The pickler hands a large in-band PickleBuffer (what numpy arrays reduce to) to the
    file as it is: its raw bytes are written, and the chunk is not pickled a second time."""
    from array import array

    def no_fallback(values, base, errors):
        raise AssertionError("the chunk went to dump_chunk")

    monkeypatch.setattr(_wire, "dump_chunk", no_fallback)
    out = _wire.ChunkWriter()
    payload, nerrors, left = _run_into(
        _with_buffers, list(range(6)), out, memoryview(bytearray(4 << 20))
    )
    assert left and nerrors == 0
    values = list(_wire.iter_values(payload, _fail_on_error))
    assert [v["raw"] for v in values] == [bytearray(bytes([i]) * (70 << 10)) for i in range(6)]
    doubles = [array("d", bytes(v["doubles"])) for v in values]
    assert doubles == [array("d", [float(i)] * 10_000) for i in range(6)]


_SHARED_KEY = "shared key " + "k" * 40  # one str object in every result of every batch


def _doc_with_shared_key(i):
    return {_SHARED_KEY: i, "pad": "x" * _wire.LARGE_MIN}


def test_each_chunk_unpickles_alone_across_batches():
    """The writer's pickler forgets what it pickled after each chunk: a chunk that refers to
    an object pickled in an earlier chunk (or batch) cannot be unpickled on its own."""
    out = _wire.ChunkWriter()
    region = memoryview(bytearray(1 << 20))
    first, _, _ = _run_into(_doc_with_shared_key, list(range(40)), out, region)
    second, _, _ = _run_into(_doc_with_shared_key, list(range(40, 80)), out, region)
    for payload, base in ((first, 0), (second, 40)):
        assert list(_wire.iter_values(payload, _fail_on_error)) == [
            _doc_with_shared_key(base + i) for i in range(40)
        ]


def _big_then_unpicklable(i):
    if i == 2:  # its big bytes are written before the lock fails the pickle
        return {"big": b"b" * (200 << 10), "lock": threading.Lock()}
    return {"i": i, "big": b"a" * (40 << 10)}  # over CHUNK_BYTES: a chunk per value


@pytest.mark.parametrize("room", [1 << 20, 0], ids=["region", "memory"])
def test_a_chunk_that_fails_midway_leaves_no_bytes_behind(room):
    """Pickling writes a large chunk in frames as it goes; one that then fails is undone
    before the chunk is written again with its value's error."""
    out = _wire.ChunkWriter()
    payload, nerrors, _ = _run_into(
        _big_then_unpicklable, list(range(5)), out, memoryview(bytearray(room))
    )
    assert nerrors == 1
    values, errors = _wire.decode_results(payload)
    assert list(errors) == [2] and isinstance(errors[2], pickle.PicklingError)
    assert values == [_big_then_unpicklable(i) if i != 2 else None for i in range(5)]


class _RefusesToLoad:
    def __reduce__(self):
        return (_refuse_to_load, ())


def _refuse_to_load():
    raise ValueError("refusing to load")


def _doc_or_unloadable(i):
    return {"odd": _RefusesToLoad(), "pad": "x" * _wire.LARGE_MIN} if i == 20 else _doc(i)


def test_a_value_that_cannot_be_unpickled_fails_its_chunk_only():
    n = 50
    k = _k(_doc(0))
    payload, nerrors = _run(_doc_or_unloadable, list(range(n)))
    assert nerrors == 0  # the worker cannot know
    first = 20 - 20 % k
    bad = list(range(first, min(first + k, n)))
    assert 20 in bad and len(bad) < n
    values, errors = _wire.decode_results(payload)
    assert sorted(errors) == bad
    assert isinstance(errors[20], RuntimeError)
    assert isinstance(errors[20].__cause__, ValueError)
    good = [i for i in range(n) if i not in bad]
    assert [values[i] for i in good] == [_doc(i) for i in good]
    seen = []

    def stand_in(pos, err):
        seen.append((pos, type(err)))
        return "stand-in"

    lazy = list(_wire.iter_values(payload, stand_in))
    assert lazy == ["stand-in" if i in bad else _doc(i) for i in range(n)]
    assert seen == [(pos, _wire.UnpicklingResultError) for pos in bad]
    skipped = list(_wire.iter_values(payload, lambda pos, err: _wire.SKIP))
    assert skipped == [_doc(i) for i in good]
    # a raising on_error ends the iteration after the values before the chunk
    lazy = _wire.iter_values(payload, lambda pos, err: (_ for _ in ()).throw(err))
    assert [next(lazy) for _ in range(first)] == [_doc(i) for i in range(first)]
    with pytest.raises(RuntimeError, match="could not unpickle"):
        next(lazy)
    assert list(lazy) == []


def test_region_writers_copy_parts_in_place():
    """A task's parts go into its region one after another, through the region's mmap or,
    where a Python keeps none, through the memoryview fallback."""
    from multiprocessing import shared_memory

    from ordpool._transport.process import _BufferFile, _mapping

    parts = [b"head", b"", b"x" * 5000, memoryview(b"tail")]
    joined = b"".join(parts)
    shm = shared_memory.SharedMemory(create=True, size=1 << 16)
    try:
        for writer in (_mapping(shm), _BufferFile(shm.buf)):
            shm.buf[: len(joined)] = b"\0" * len(joined)
            writer.seek(0)
            assert sum(map(writer.write, parts)) == len(joined)
            assert bytes(shm.buf[: len(joined)]) == joined
            del writer
    finally:
        shm.close()
        shm.unlink()


def test_result_payload_buffers_are_reused_only_once_nothing_refers_to_them():
    """The collector copies a large result payload into the buffer of an earlier one, but only
    when no memoryview of that buffer is alive (its batch was consumed)."""
    import types

    from ordpool._transport import process as _process

    worker = types.SimpleNamespace(spare=[])
    copy_out = _process._Worker._copy_out
    a, b, c = (bytes([i]) * (300 << 10) for i in (1, 2, 3))
    first = copy_out(worker, memoryview(a))
    assert first == a and isinstance(first, memoryview)
    held = id(first.obj)  # (the spare list keeps it alive: the id stays its own)
    second = copy_out(worker, memoryview(b))  # `first` is alive: a new buffer
    assert id(second.obj) != held and second == b and first == a
    del first
    third = copy_out(worker, memoryview(c))  # nothing refers to the first buffer any more
    assert id(third.obj) == held and third == c and second == b
    assert len(worker.spare) == 2
    part = second[10:20]  # a slice keeps the buffer in use too
    del second
    fourth = copy_out(worker, memoryview(a))
    assert id(fourth.obj) not in (id(third.obj), id(part.obj)) and part == b[10:20]
    small = copy_out(worker, memoryview(b"x" * 100))
    assert small == b"x" * 100 and type(small) is bytes  # small payloads: plain bytes


def _fault_then_unloadable(i):
    if i == 3:
        raise KeyError("a real error at 3")
    return {"odd": _RefusesToLoad(), "pad": "x" * _wire.LARGE_MIN} if i == 5 else _doc(i)


def test_an_unloadable_chunk_keeps_the_errors_the_worker_reported_in_it():
    payload, nerrors = _run(_fault_then_unloadable, list(range(20)))
    assert nerrors == 1
    _, errors = _wire.decode_results(payload)
    assert isinstance(errors[3], KeyError)  # not replaced by the chunk's unpickling error
    assert isinstance(errors[5], RuntimeError) and "could not unpickle" in str(errors[5])


def test_a_chunk_that_pickles_value_by_value_but_not_whole_fails_its_values(monkeypatch):
    """The last resort of dump_chunk: each value pickles alone (cloudpickle), the chunk does
    not; its values fail, the worker goes on."""
    real = _wire.dumps

    def no_lists(obj):
        if isinstance(obj, list):
            raise pickle.PicklingError("not together (test)")
        return real(obj)

    monkeypatch.setattr(_wire, "dumps", no_lists)
    errors: dict = {}
    chunk = [lambda: 1, None, _doc(2)]  # the lambda makes pickle fail, then cloudpickle
    data = _wire.dump_chunk(chunk, 10, errors)
    assert pickle.loads(data) == [None, None, None]
    assert sorted(errors) == [10, 12]
    err = pickle.loads(pickle.dumps(errors[10]))  # as it reaches the parent
    assert isinstance(err, pickle.PicklingError) and "not together" in str(err)


class _IndicesInterruptedOnce(list):
    armed = True

    def __getitem__(self, key):
        if type(self).armed:
            type(self).armed = False
            raise KeyboardInterrupt
        return super().__getitem__(key)


def test_ctrl_c_while_a_chunk_becomes_results_loses_none_of_it():
    """Interrupted after its values are unpickled but before they are handed over, a chunk
    is loaded again on the next call: nothing skipped."""
    n = 40
    payload, _ = _run(_doc, list(range(n)))
    indices = _IndicesInterruptedOnce(range(100, 100 + n))
    lazy = _wire.iter_values(payload, None, indices, Result)
    with pytest.raises(KeyboardInterrupt):
        next(lazy)
    got = list(lazy)
    assert [r.index for r in got] == list(range(100, 100 + n))
    assert [r.value for r in got] == [_doc(i) for i in range(n)]
