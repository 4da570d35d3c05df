"""Failures: the crash table, the ``errors=`` policies, init failures, retries, external kills.

The crash table reads "where the fault happens x how -> the error at the poisoned index". Every
row runs the same 20 items with a fault at index 7 and checks: the poisoned index carries exactly
the expected error, every other index its correct value (nothing lost, nothing duplicated), a
crashed worker was replaced by a new process that ran ``init`` again, and the pool goes on
with a following ``imap``.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import signal
import sys
import threading
import time
from typing import Any

import psutil
import pytest
from conftest import wait_until

from ordpool import (
    BrokenPool,
    PoolClosed,
    ProcessOrderedPool,
    RemoteTraceback,
    WorkerCrashed,
    WorkerInitError,
)
from ordpool._transport import wire as _wire

N = 20
POISON = 7


def _value(i: int) -> int:
    return i * 10 + 1


# -- functions run by the workers ----------------------------------------------------------------


def _init_record(directory):
    """Count init runs: one file per worker process."""
    with open(os.path.join(directory, f"init-{os.getpid()}"), "w") as f:
        f.write("init")
    return directory


def _init_count(directory) -> int:
    return sum(1 for name in os.listdir(directory) if name.startswith("init-"))


def _faulty(directory, item):
    """Run item ``(i, how)``: index POISON does ``how``; every other index returns its value."""
    i, how = item
    if i == POISON:
        if how == "raise":
            raise ValueError(f"poison {i}")
        if how == "sys.exit":
            sys.exit(2)
        if how == "os._exit":
            os._exit(3)
        if how == "SIGKILL":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "SIGSEGV":
            faulthandler.disable()  # a fork inherits pytest's handler: keep the log quiet
            os.kill(os.getpid(), signal.SIGSEGV)
        if how == "unpicklable-result":
            return threading.Lock()
    return _value(i)


def _items(how):
    return [(i, how) for i in range(N)]


def _raising_input(how):
    for i in range(N):
        if i == POISON:
            raise LookupError("the input broke")
        yield (i, how)


def _crash_once(directory, i):
    """Crash (SIGKILL) at POISON on the first attempt only: a transient fault."""
    marker = os.path.join(directory, "crashed-once")
    if i == POISON and not os.path.exists(marker):
        with open(marker, "w"):
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    return _value(i)


def _crash_always(directory, i):
    """Crash (os._exit(3)) at POISON on every attempt, logging each one."""
    if i == POISON:
        with open(os.path.join(directory, "attempts"), "a") as f:
            f.write("attempt\n")
        os._exit(3)
    return _value(i)


def _announce_then_wait(directory, i):
    """Say which process runs item i (atomically), then wait for the test's release file."""
    tmp = os.path.join(directory, f".started-{i}")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.rename(tmp, os.path.join(directory, f"started-{i}"))
    while not os.path.exists(os.path.join(directory, "release")):
        time.sleep(0.002)
    return _value(i)


def _bad_init(message):
    raise KeyError(message)


def _init_exits(code):
    os._exit(code)


class _TwoArgError(Exception):
    """An exception whose __init__ takes two arguments: pickles, but does not unpickle."""

    def __init__(self, a, b):
        super().__init__(f"{a}-{b}")


def _raise_two_arg(i):
    if i == 1000:
        raise _TwoArgError("a", "b")
    return _value(i)


def _refuse(message):
    raise ValueError(f"refusing to unpickle: {message}")


class _Unloadable:
    """Pickles in the worker; unpickling it (in the parent) raises."""

    def __reduce__(self):
        return (_refuse, ("result",))


def _unloadable_result(i):
    return _Unloadable() if i in (POISON, 1000) else _value(i)


def _refuse_in_other_process(parent_pid):
    if os.getpid() != parent_pid:
        raise ValueError("this item cannot be rebuilt in a worker")
    return "rebuilt"


class _UnloadableInWorker:
    """Pickles in the parent; unpickling it in a worker raises."""

    def __reduce__(self):
        return (_refuse_in_other_process, (os.getpid(),))


def _identity_value(x):
    return x if isinstance(x, str) else _value(x)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _check_values(results, *, skip=()):
    for i, value in enumerate(results):
        if i not in skip:
            assert value == _value(i), (i, value)


# -- the crash table -----------------------------------------------------------------------------

SIGKILL, SIGSEGV = int(signal.SIGKILL), int(signal.SIGSEGV)

CRASH_TABLE = [
    # where the fault happens x how              -> error at index 7    crash exit code, text
    pytest.param("fn", "raise", ValueError, None, "poison 7", id="fn-raises"),
    pytest.param("fn", "sys.exit", SystemExit, None, None, id="fn-sys.exit(2)-is-an-item-error"),
    pytest.param("fn", "os._exit", WorkerCrashed, 3, "exit code 3", id="fn-os._exit(3)"),
    pytest.param("fn", "SIGKILL", WorkerCrashed, -SIGKILL, "signal SIGKILL", id="fn-SIGKILL"),
    pytest.param("fn", "SIGSEGV", WorkerCrashed, -SIGSEGV, "signal SIGSEGV", id="fn-SIGSEGV"),
    pytest.param(
        "item", "unpicklable", pickle.PicklingError, None, "lock", id="item-unpicklable-Lock"
    ),
    pytest.param(
        "result",
        "unpicklable-result",
        pickle.PicklingError,
        None,
        "lock",
        id="result-unpicklable-Lock",
    ),
    pytest.param(
        "input", "raises", LookupError, None, "the input broke", id="input-iterable-raises"
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("where", "how", "expected", "exitcode", "text"), CRASH_TABLE)
def test_crash_table(start_method, tmp_path, where, how, expected, exitcode, text):
    directory = str(tmp_path)
    with ProcessOrderedPool(
        _faulty, workers=2, init=_init_record, initargs=(directory,), start_method=start_method
    ) as pool:
        pids_before = set(pool.worker_pids())
        if where == "item":
            items = _items(how)
            items[POISON] = threading.Lock()
        elif where == "input":
            items = _raising_input(how)
        else:
            items = _items(how)
        results = pool.map(items, errors="return")

        # nothing lost, nothing duplicated: one result per index, in order
        assert len(results) == (POISON + 1 if where == "input" else N)
        _check_values(results, skip={POISON})
        err = results[POISON]
        assert type(err) is expected, repr(err)
        if text is not None:
            assert text in str(err).lower() or text in str(err), repr(err)

        if where in ("fn", "result") and expected is not WorkerCrashed:
            # a worker-side exception: its traceback travels as __cause__
            assert isinstance(err.__cause__, RemoteTraceback)
            assert expected.__name__ in str(err.__cause__)
            if where == "fn":  # raised by fn: the worker's stack, down to the raising line
                assert "Traceback (most recent call last)" in str(err.__cause__)
                assert "_faulty" in str(err.__cause__)
        if how == "sys.exit":
            assert err.code == 2

        if expected is WorkerCrashed:
            assert err.exitcode == exitcode
            assert err.pid in pids_before
            # the dead worker was replaced by a new process, which ran init again
            assert wait_until(lambda: len(pool.worker_pids()) == 2, timeout=30)
            pids_after = set(pool.worker_pids())
            assert err.pid not in pids_after
            assert len(pids_after - pids_before) == 1
            assert wait_until(lambda: _init_count(directory) == 3, timeout=30)
            (new_pid,) = pids_after - pids_before
            assert os.path.exists(os.path.join(directory, f"init-{new_pid}"))
        else:
            # an ordinary item error: no worker died
            assert set(pool.worker_pids()) == pids_before
            assert _init_count(directory) == 2

        # the pool goes on
        assert pool.map(_items("none")) == [_value(i) for i in range(N)]
        assert pool.map(_items(how), errors="skip") == [
            _value(i) for i in range(N) if i != POISON or where in ("item", "input")
        ]


# -- the errors= policies --------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("how", "expected"), [("raise", ValueError), ("SIGKILL", WorkerCrashed)], ids=["raise", "kill"]
)
def test_errors_raise_stops_at_the_poisoned_index(start_method, tmp_path, how, expected):
    with ProcessOrderedPool(
        _faulty, workers=2, init=_init_record, initargs=(str(tmp_path),), start_method=start_method
    ) as pool:
        got = []
        with pytest.raises(expected) as info:  # noqa: PT012 - the loop runs until it raises
            for value in pool.imap(_items(how)):
                got.append(value)
        assert got == [_value(i) for i in range(POISON)]  # everything before it, in order
        if expected is ValueError:
            assert isinstance(info.value.__cause__, RemoteTraceback)
            assert 'raise ValueError(f"poison {i}")' in str(info.value.__cause__)
        # the abandoned imap released the pool
        assert pool.map(_items("none"), errors="raise") == [_value(i) for i in range(N)]


@pytest.mark.parametrize("how", ["raise", "os._exit"])
def test_errors_skip_leaves_out_only_the_failed_index(start_method, tmp_path, how):
    with ProcessOrderedPool(
        _faulty, workers=2, init=_init_record, initargs=(str(tmp_path),), start_method=start_method
    ) as pool:
        assert pool.map(_items(how), errors="skip") == [_value(i) for i in range(N) if i != POISON]


def test_input_iterable_exception_is_raised_at_its_position(start_method):
    raised = []

    def source():
        yield from range(5)
        exc = LookupError("input gone")
        raised.append(exc)
        raise exc

    with ProcessOrderedPool(_identity_value, workers=2, start_method=start_method) as pool:
        got = []
        with pytest.raises(LookupError) as info:  # noqa: PT012
            for value in pool.imap(source()):
                got.append(value)
        assert got == [_value(i) for i in range(5)]
        assert info.value is raised[0]  # the very exception, not a copy
        assert pool.map(source(), errors="skip") == [_value(i) for i in range(5)]
        out = pool.map(source(), errors="return")
        assert out[:5] == [_value(i) for i in range(5)]
        assert out[5] is raised[-1]
        assert len(out) == 6


def test_results_stream_carries_errors_at_their_index(start_method, tmp_path):
    with ProcessOrderedPool(
        _faulty, workers=2, init=_init_record, initargs=(str(tmp_path),), start_method=start_method
    ) as pool:
        indices = [3, 10, 2**40, 2**64 + 1]
        for index, i in zip(indices, [1, POISON, 2, POISON]):
            pool.enqueue(index, (i, "raise"))
        pool.close()
        out = list(pool.results())
    assert [r.index for r in out] == indices
    assert [r.ok for r in out] == [True, False, True, False]
    assert out[0].get() == _value(1)
    assert out[2].get() == _value(2)
    assert out[0].error is None
    assert out[1].value is None
    for bad in (out[1], out[3]):
        with pytest.raises(ValueError, match="poison 7"):
            bad.get()
        assert isinstance(bad.error.__cause__, RemoteTraceback)


# -- results and exceptions that cannot be unpickled in the parent ---------------------------


def test_result_that_cannot_be_unpickled_fails_its_chunk(start_method):
    """Small results travel in chunks of up to SMALL_CHUNK_MAX: one whose unpickling raises in
    the parent fails every item of its chunk (the worker cannot know), with a RuntimeError whose
    __cause__ is the unpickling error. The items of other chunks are unaffected, and the pool
    goes on."""
    n = 3000
    with ProcessOrderedPool(
        _unloadable_result, workers=2, batch_size=500, start_method=start_method
    ) as pool:  # (batches of 500: the two poisoned indices are never in one chunk)
        results = pool.map(list(range(n)), errors="return")
        assert len(results) == n
        err = results[POISON]
        assert isinstance(err, RuntimeError)
        assert "could not unpickle this result" in str(err)
        assert isinstance(err.__cause__, ValueError)
        assert "refusing to unpickle" in str(err.__cause__)
        failed = [i for i, v in enumerate(results) if v != _value(i)]
        _runs_around(failed, POISON, 1000, most=_wire.SMALL_CHUNK_MAX)
        for i in failed:
            assert isinstance(results[i], RuntimeError)
        assert pool.map(range(POISON)) == [_value(i) for i in range(POISON)]


def _big(i):
    """A result large enough to travel at most CHUNK_MAX to a chunk (wire.LARGE_MIN)."""
    return {"i": i, "pad": "p" * 300}


def _unloadable_big_result(i):
    return {"odd": _Unloadable(), "pad": "p" * 300} if i in (POISON, 1000) else _big(i)


def _runs_around(failed, *poisoned, most=_wire.CHUNK_MAX):
    """Check that ``failed`` is one chunk around each poisoned index (a contiguous run of at most
    ``most`` positions) and nothing else: a chunk is counted from its batch's start, which the
    pool chooses."""
    runs = []
    for i in sorted(failed):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    assert len(runs) == len(poisoned), runs
    for run, i in zip(runs, poisoned):
        assert i in run and len(run) <= most, (i, run)


@pytest.mark.timeout(60)
def test_large_result_that_cannot_be_unpickled_fails_its_chunk_under_every_policy(start_method):
    """Large results are unpickled a chunk at a time as the consumer reaches them: one that
    cannot be unpickled fails its chunk (a few neighbours) and nothing else, under each
    ``errors=`` policy and in results()."""
    n = 3000
    expected = [_big(i) for i in range(n)]
    with ProcessOrderedPool(_unloadable_big_result, workers=2, start_method=start_method) as pool:
        returned = pool.map(range(n), errors="return")
        bad = [i for i, v in enumerate(returned) if v != expected[i]]
        _runs_around(bad, POISON, 1000)
        assert all(isinstance(returned[i], RuntimeError) for i in bad)
        err = returned[POISON]
        assert "could not unpickle this result" in str(err)
        assert "refusing to unpickle" in str(err.__cause__)

        skipped = pool.map(range(n), errors="skip")
        kept = [v["i"] for v in skipped]
        assert skipped == [expected[i] for i in kept]  # in order, each once
        _runs_around(set(range(n)) - set(kept), POISON, 1000)

        values = pool.imap(range(n))
        seen = []
        with pytest.raises(RuntimeError, match="could not unpickle this result"):  # noqa: PT012
            while True:
                seen.append(next(values))
        assert seen == expected[: len(seen)]  # everything before the chunk, in order
        assert POISON - _wire.CHUNK_MAX < len(seen) <= POISON
        assert list(values) == []  # "raise" ends the iteration

        for i in range(n):
            pool.enqueue(i * 3, i)
        pool.close()
        results = list(pool.results())
    assert [r.index for r in results] == [i * 3 for i in range(n)]
    bad = [i for i, r in enumerate(results) if r.error is not None]
    _runs_around(bad, POISON, 1000)
    assert all(r.value == expected[i] for i, r in enumerate(results) if r.error is None)
    assert results[POISON].value is None
    assert isinstance(results[POISON].error, RuntimeError)


_ARMED = {"index": -1, "raise": KeyboardInterrupt}  # the parent's side of _Rebuilds


def _rebuild(i, small=False):
    """Runs in the parent, while a result is unpickled: raises at the armed index (``times``
    times, once by default); else gives back ``_value(i)`` when small, ``_big(i)`` when not."""
    if i == _ARMED["index"]:
        _ARMED["times"] = _ARMED.get("times", 1) - 1
        if _ARMED["times"] <= 0:
            _ARMED["index"] = -1
        raise _ARMED["raise"]()
    return _value(i) if small else _big(i)


class _Rebuilds:
    def __init__(self, i, small=False):
        self.i, self.small = i, small

    def __reduce__(self):
        return (_rebuild, (self.i, self.small))


def _rebuilt_in_the_parent(i):
    return (_Rebuilds(i), "p" * 300)  # large: unpickled a chunk at a time, as the consumer goes


def _next_through_one_interrupt(values, got):
    """Append ``next(values)`` to ``got`` until the first KeyboardInterrupt; returns whether
    one came."""
    while True:
        try:
            got.append(next(values))
        except KeyboardInterrupt:
            return True
        except StopIteration:
            return False


@pytest.mark.timeout(60)
def test_ctrl_c_while_a_large_result_unpickles_loses_nothing(start_method):
    """A KeyboardInterrupt while the consumer unpickles a chunk of large results reaches the
    consumer; iterating again retries that chunk, and every index still comes once, in order."""
    n = 60
    expected = [(_big(i), "p" * 300) for i in range(n)]
    with ProcessOrderedPool(_rebuilt_in_the_parent, workers=2, start_method=start_method) as pool:
        _ARMED["raise"] = KeyboardInterrupt
        _ARMED["index"] = 25
        values = pool.imap(range(n))
        got: list = []
        assert _next_through_one_interrupt(values, got)
        assert 25 - _wire.CHUNK_MAX < len(got) <= 25  # the values before that chunk
        got.extend(values)
        assert got == expected

        _ARMED["index"] = 37
        for i in range(n):
            pool.enqueue(i, i)
        pool.close()
        got_results: list = []
        assert _next_through_one_interrupt(pool.results(), got_results)
        assert 37 - _wire.CHUNK_MAX < len(got_results) <= 37
        # the results() iterator is left, as a Ctrl-C handler might; a new one resumes there
        got_results.extend(pool.results())
    assert [r.index for r in got_results] == list(range(n))
    assert [r.value for r in got_results] == expected
    assert all(r.error is None for r in got_results)


def _results_through_one_interrupt(pool, n):
    """Enqueue ``n`` items, close, and take results() until a KeyboardInterrupt; then leave
    that iterator, as a Ctrl-C handler might, and take the rest from a new results()."""
    for i in range(n):
        pool.enqueue(i, i)
    pool.close()
    got: list = []
    assert _next_through_one_interrupt(pool.results(), got)
    got.extend(pool.results())
    return got


def _every_value_once_in_order(results, n):
    assert [r.index for r in results] == list(range(n))
    assert [r.value for r in results] == [_value(i) for i in range(n)]
    assert all(r.error is None for r in results)


def _small_rebuilt_in_the_parent(i):
    return _Rebuilds(i, small=True)  # small: up to SMALL_CHUNK_MAX results a chunk


@pytest.mark.timeout(60)
@pytest.mark.parametrize("errors", ["raise", "return", "skip"])
def test_ctrl_c_while_a_chunk_of_small_results_unpickles_loses_nothing(start_method, errors):
    """A KeyboardInterrupt while the consumer unpickles a chunk of small results is not that
    chunk's error (it used to fail the whole batch, or vanish under "skip"): it reaches the
    consumer, iterating again unpickles the chunk again, and every index comes once, in
    order."""
    n = 3000
    with ProcessOrderedPool(
        _small_rebuilt_in_the_parent, workers=2, start_method=start_method
    ) as pool:
        _ARMED["raise"] = KeyboardInterrupt
        _ARMED["index"] = 2500
        values = pool.imap(range(n), errors=errors)
        got: list = []
        assert _next_through_one_interrupt(values, got)
        assert len(got) <= 2500
        got.extend(values)
        assert got == [_value(i) for i in range(n)]

        _ARMED["index"] = 1700
        got_results = _results_through_one_interrupt(pool, n)
    _every_value_once_in_order(got_results, n)


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_while_a_left_chunk_loads_reaches_the_next_consumer(start_method):
    """A consumer leaves results() after a Ctrl-C cut a chunk's unpickling short; the next
    results() starts with that chunk, and a second Ctrl-C there reaches that consumer too
    instead of becoming the chunk's errors. A third results() gets everything."""
    n = 3000
    with ProcessOrderedPool(
        _small_rebuilt_in_the_parent, workers=2, start_method=start_method
    ) as pool:
        _ARMED["raise"] = KeyboardInterrupt
        _ARMED["index"], _ARMED["times"] = 1700, 2
        for i in range(n):
            pool.enqueue(i, i)
        pool.close()
        got: list = []
        assert _next_through_one_interrupt(pool.results(), got)
        assert _next_through_one_interrupt(pool.results(), got)  # the left batch, again
        got.extend(pool.results())
    _every_value_once_in_order(got, n)


def _small_rebuilt_or_failed(i):
    """Small results, and an error every tenth item: each batch then holds an error and is
    decoded whole (decoding.decode), not a chunk at a time."""
    if i % 10 == 9:
        raise ValueError(f"no value for {i}")
    return _small_rebuilt_in_the_parent(i)


def _expected_or_failed(got, n):
    assert len(got) == n
    for i, v in enumerate(got):
        if i % 10 == 9:
            assert type(v) is ValueError and str(v) == f"no value for {i}", (i, v)
        else:
            assert v == _value(i), (i, v)


def _expected_or_failed_results(results, n):
    assert [r.index for r in results] == list(range(n))
    _expected_or_failed([r.error or r.value for r in results], n)


@pytest.mark.timeout(60)
def test_ctrl_c_while_a_batch_with_errors_decodes_loses_nothing(start_method):
    """A batch that holds an error is decoded whole: a KeyboardInterrupt meanwhile reaches the
    consumer, iterating again decodes the batch again, and every index comes once, in order."""
    n = 3000
    with ProcessOrderedPool(_small_rebuilt_or_failed, workers=2, start_method=start_method) as pool:
        _ARMED["raise"] = KeyboardInterrupt
        _ARMED["index"] = 2500
        values = pool.imap(range(n), errors="return")
        got: list = []
        assert _next_through_one_interrupt(values, got)
        assert len(got) <= 2500
        got.extend(values)
        _expected_or_failed(got, n)

        _ARMED["index"] = 1700
        results = _results_through_one_interrupt(pool, n)
    _expected_or_failed_results(results, n)


@pytest.mark.timeout(60)
def test_ctrl_c_just_after_a_batch_is_decoded_loses_nothing(monkeypatch):
    """A Ctrl-C can land anywhere, also after the values are decoded but before the consumer
    took them: decoding again must work (the payload is released only after)."""
    from ordpool._engine import decoding

    real = decoding.decode
    armed = [True]

    def decode_then_interrupted(batch, *, interruptible=False):
        decoded = real(batch, interruptible=interruptible)
        # Not the first batch: any later one (a fixed index may fall inside the first
        # batch big enough to hold it, whose size depends on the machine's load).
        if interruptible and armed[0] and batch.indices[0] > 0:
            armed[0] = False
            raise KeyboardInterrupt
        return decoded

    monkeypatch.setattr(decoding, "decode", decode_then_interrupted)
    n = 3000
    with ProcessOrderedPool(_small_rebuilt_or_failed, workers=2, start_method="fork") as pool:
        values = pool.imap(range(n), errors="return")  # (an error in each batch: decoded whole)
        got: list = []
        assert _next_through_one_interrupt(values, got)
        got.extend(values)
        _expected_or_failed(got, n)
        armed[0] = True
        results = _results_through_one_interrupt(pool, n)
    _expected_or_failed_results(results, n)


def test_system_exit_while_a_large_result_unpickles_is_its_chunks_error(start_method):
    n = 60
    with ProcessOrderedPool(_rebuilt_in_the_parent, workers=2, start_method=start_method) as pool:
        _ARMED["raise"] = SystemExit
        _ARMED["index"] = 20
        out = pool.map(range(n), errors="return")
    _ARMED["raise"] = KeyboardInterrupt
    bad = [i for i, v in enumerate(out) if isinstance(v, BaseException)]
    _runs_around(bad, 20)
    assert isinstance(out[20], RuntimeError)
    assert isinstance(out[20].__cause__, SystemExit)
    assert [v for i, v in enumerate(out) if i not in bad] == [
        (_big(i), "p" * 300) for i in range(n) if i not in bad
    ]


def test_exception_with_a_custom_init_fails_only_its_index(start_method):
    with ProcessOrderedPool(_raise_two_arg, workers=2, start_method=start_method) as pool:
        results = pool.map(list(range(2000)), errors="return")
    assert [i for i, v in enumerate(results) if v != _value(i)] == [1000]
    err = results[1000]
    assert isinstance(err, Exception)
    assert "_TwoArgError" in type(err).__name__ + str(err)


def test_item_that_cannot_be_unpickled_in_the_worker_fails_its_batch(start_method):
    """Documents the current behaviour: an item that pickles in the parent but whose
    unpickling raises in the worker fails every item of its batch with that exception (its
    worker traceback as __cause__); other batches are unaffected and the pool goes on."""
    items = list(range(N))
    items[POISON] = _UnloadableInWorker()
    with ProcessOrderedPool(_identity_value, workers=2, start_method=start_method) as pool:
        results = pool.map(items, errors="return")
        assert len(results) == N
        err = results[POISON]
        assert type(err) is ValueError
        assert "cannot be rebuilt in a worker" in str(err)
        assert isinstance(err.__cause__, RemoteTraceback)
        failed = [i for i, v in enumerate(results) if v != _value(i)]
        assert failed == list(range(failed[0], failed[-1] + 1))
        assert all(type(results[i]) is ValueError for i in failed)
        assert pool.map(range(5)) == [_value(i) for i in range(5)]


# -- init failures ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_init_raising_gives_worker_init_error_with_the_remote_traceback(start_method):
    with pytest.raises(WorkerInitError) as info:
        ProcessOrderedPool(
            _faulty, workers=2, init=_bad_init, initargs=("no config",), start_method=start_method
        )
    err = info.value
    assert isinstance(err, BrokenPool)
    assert "KeyError" in str(err)
    cause = err.__cause__
    assert type(cause) is KeyError
    assert cause.args == ("no config",)
    assert isinstance(cause.__cause__, RemoteTraceback)
    text = str(cause.__cause__)
    assert "Traceback (most recent call last)" in text
    assert "_bad_init" in text
    assert "raise KeyError(message)" in text
    # no worker is left behind: conftest.no_leaks


@pytest.mark.timeout(30)
def test_init_calling_os_exit_gives_worker_init_error(start_method):
    with pytest.raises(WorkerInitError, match=r"died during init \(exit code 7\)"):
        ProcessOrderedPool(
            _faulty, workers=2, init=_init_exits, initargs=(7,), start_method=start_method
        )


def _init_fails_on_restart(directory):
    """init works in the first two workers and raises in any replacement."""
    earlier = _init_count(directory)
    _init_record(directory)
    if earlier >= 2:
        raise RuntimeError("init refuses to run in a replacement")
    return directory


def _kill_at_poison(directory, i):
    if i == POISON:
        os.kill(os.getpid(), signal.SIGKILL)
    return _value(i)


@pytest.mark.timeout(60)
def test_init_failing_in_a_replacement_breaks_the_pool(start_method, tmp_path):
    pool = ProcessOrderedPool(
        _kill_at_poison,
        workers=2,
        init=_init_fails_on_restart,
        initargs=(str(tmp_path),),
        start_method=start_method,
    )
    try:
        results = []
        try:
            for value in pool.imap(range(200), errors="return"):
                results.append(value)
        except BrokenPool:
            pass  # the input was cut short: allowed, after the items already answered
        assert isinstance(results[POISON], WorkerCrashed)
        for i, value in enumerate(results):
            if i != POISON:
                assert value == _value(i) or isinstance(value, BrokenPool), (i, value)
        assert wait_until(lambda: pool.state == "broken", timeout=30)
        with pytest.raises(BrokenPool, match="init refuses") as info:
            pool.map([1])
        assert isinstance(info.value.__cause__, WorkerInitError)
        with pytest.raises(BrokenPool):
            pool.enqueue(0, 1)
    finally:
        pool.close()
        pool.join(30)
        pool.terminate()


def _init_slow_to_stop_fails_on_restart(directory):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # takes the parent's SIGKILL to stop
    return _init_fails_on_restart(directory)


@pytest.mark.timeout(60)
def test_join_of_a_broken_pool_waits_for_its_workers(start_method, tmp_path):
    pool = ProcessOrderedPool(
        _kill_at_poison,
        workers=2,
        init=_init_slow_to_stop_fails_on_restart,
        initargs=(str(tmp_path),),
        start_method=start_method,
    )
    pids = pool.worker_pids()
    try:
        try:
            pool.map(range(N), errors="return")
        except BrokenPool:
            pass  # the break may cut the map short
        assert wait_until(lambda: pool.state == "broken", timeout=30)
        pool.close()
        assert pool.join(30)
        # join() returned: nothing of the pool may be running any more
        survivor = [p for p in pids if _alive(p)]
    finally:
        pool.terminate()
        wait_until(lambda: not any(_alive(p) for p in pids), timeout=15)
    assert survivor == []


# -- retries -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_retries_hide_a_transient_crash(start_method, tmp_path):
    directory = str(tmp_path)
    with ProcessOrderedPool(
        _crash_once,
        workers=2,
        init=_init_record,
        initargs=(directory,),
        retries=1,
        start_method=start_method,
    ) as pool:
        pids_before = set(pool.worker_pids())
        assert pool.map(range(N), errors="raise") == [_value(i) for i in range(N)]
        assert os.path.exists(os.path.join(directory, "crashed-once"))  # it did crash
        assert wait_until(lambda: _init_count(directory) == 3, timeout=30)
        assert len(set(pool.worker_pids()) - pids_before) == 1


class _ExitWhenPickled:
    """A result that kills its worker as it is pickled (after its item has run)."""

    def __reduce__(self):
        os._exit(5)


def _result_kills_when_pickled(i):
    value = {"i": i, "pad": "x" * 300}  # large results: pickled in chunks after their items
    if i == 3:
        value["bomb"] = _ExitWhenPickled()
    return value


@pytest.mark.timeout(60)
@pytest.mark.parametrize("retries", [0, 1])
def test_a_death_that_blames_only_failed_items_does_not_requeue_forever(start_method, retries):
    """The worker dies while pickling a chunk of results: the item it blames (the chunk's last
    run) fails, and the task runs again without it; the death repeats, blaming the same,
    already failed, item. The task then counts the deaths against itself and fails after the
    retries, instead of being re-queued for ever (a hang, and a fork per death)."""
    with ProcessOrderedPool(
        _result_kills_when_pickled, workers=1, retries=retries, start_method=start_method
    ) as pool:
        results = pool.map(list(range(8)), errors="return")  # one batch, one chunk
        assert len(results) == 8
        assert all(isinstance(r, WorkerCrashed) and r.exitcode == 5 for r in results)
        assert pool.stats().restarts == 2 * (retries + 1)
        assert pool.map(range(4, 6)) == [_result_kills_when_pickled(i) for i in (4, 5)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("retries", [0, 2])
def test_a_permanent_poison_item_fails_after_retries_plus_one_attempts(
    start_method, tmp_path, retries
):
    directory = str(tmp_path)
    with ProcessOrderedPool(
        _crash_always,
        workers=2,
        init=_init_record,
        initargs=(directory,),
        retries=retries,
        start_method=start_method,
    ) as pool:
        results = pool.map(range(N), errors="return")
        assert len(results) == N
        _check_values(results, skip={POISON})
        err = results[POISON]
        assert isinstance(err, WorkerCrashed)
        assert err.exitcode == 3
        with open(os.path.join(directory, "attempts")) as f:
            assert f.read().count("attempt") == retries + 1
        # each attempt killed a worker, and each replacement ran init
        assert wait_until(lambda: _init_count(directory) == 2 + retries + 1, timeout=30)
        assert pool.map(range(POISON)) == [_value(i) for i in range(POISON)]


# -- a kill from outside ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigkill_from_outside_mid_batch_loses_and_duplicates_nothing(start_method, tmp_path):
    directory = str(tmp_path)
    count = 40
    with ProcessOrderedPool(
        _announce_then_wait,
        workers=2,
        init=_init_record,
        initargs=(directory,),
        batch_size=4,
        start_method=start_method,
    ) as pool:
        pids_before = set(pool.worker_pids())
        out: dict[str, object] = {}

        def consume():
            try:
                out["results"] = pool.map(range(count), errors="return")
            except BaseException as exc:
                out["error"] = exc

        consumer = threading.Thread(target=consume)
        consumer.start()
        try:
            # a worker is inside an item (waiting for the release file): kill it there
            assert wait_until(
                lambda: any(n.startswith("started-") for n in os.listdir(directory)), timeout=30
            )
            started = sorted(n for n in os.listdir(directory) if n.startswith("started-"))[0]
            victim_index = int(started.split("-")[1])
            with open(os.path.join(directory, started)) as f:
                victim = int(f.read())
            assert victim in pids_before
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: not _alive(victim), timeout=30)
        finally:
            with open(os.path.join(directory, "release"), "w"):
                pass
            consumer.join(30)
        assert not consumer.is_alive()
        assert "error" not in out, out
        results = out["results"]
        assert len(results) == count
        _check_values(results, skip={victim_index})
        err = results[victim_index]
        assert isinstance(err, WorkerCrashed), err
        assert err.exitcode == -SIGKILL
        assert err.pid == victim
        assert "signal SIGKILL" in str(err)
        assert victim not in pool.worker_pids()
        assert wait_until(lambda: _init_count(directory) == 3, timeout=30)
        assert pool.map(range(8)) == [_value(i) for i in range(8)]


@pytest.mark.timeout(60)
def test_kill_of_an_idle_worker_is_repaired(start_method, tmp_path):
    directory = str(tmp_path)
    with ProcessOrderedPool(
        _crash_once, workers=2, init=_init_record, initargs=(directory,), start_method=start_method
    ) as pool:
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(
            lambda: victim not in pool.worker_pids() and len(pool.worker_pids()) == 2, timeout=30
        )
        assert wait_until(lambda: _init_count(directory) == 3, timeout=30)
        with open(os.path.join(directory, "crashed-once"), "w"):
            pass  # no item crashes
        assert pool.map(range(N)) == [_value(i) for i in range(N)]


def _sender_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("ordpool-sender-")}


@pytest.mark.timeout(60)
def test_close_right_after_a_worker_died_leaks_nothing(start_method):
    threads_before = _sender_threads()
    pool = ProcessOrderedPool(_identity_value, workers=2, start_method=start_method)
    try:
        assert pool.map(range(10)) == [_value(i) for i in range(10)]
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        # the pool has buried the victim and is about to start its replacement: close now
        assert wait_until(lambda: victim not in pool.worker_pids(), timeout=30, interval=0)
        pool.close()
        assert pool.join(30)
        wait_until(lambda: not (_sender_threads() - threads_before), timeout=1)
        leaked = _sender_threads() - threads_before
    finally:
        pool.terminate()
        # undo the leak, so that conftest.no_leaks judges only what this test is about
        for thread in _sender_threads() - threads_before:
            worker = thread._target.__self__  # type: ignore[attr-defined]
            worker.queue.put(None)
            thread.join(10)
            worker.close()
            worker.process.close()
    assert leaked == set()


# -- the exception classes ------------------------------------------------------------------


def test_worker_crashed_pickles_with_its_attributes():
    err = WorkerCrashed("worker process 12 died (signal SIGKILL)", exitcode=-9, pid=12)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is WorkerCrashed
    assert (str(copy), copy.exitcode, copy.pid) == (str(err), -9, 12)


def test_pool_errors_hierarchy():
    from concurrent.futures import BrokenExecutor

    assert issubclass(WorkerInitError, BrokenPool)
    assert issubclass(BrokenPool, BrokenExecutor)
    assert issubclass(PoolClosed, RuntimeError)
    assert str(RemoteTraceback("tb text")) == "tb text"


# -- a worker that cannot be started ---------------------------------------------------------


def _shm_names():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_start_raises_its_error_and_leaves_nothing(monkeypatch):
    """fork() failing (EAGAIN: too many processes) reaches the caller as itself, and the
    shared memory and pipes made for that worker are released."""
    import multiprocessing.process

    def refuse(self):
        raise BlockingIOError(11, "fork failed (test)")

    before = _shm_names()
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    with pytest.raises(BlockingIOError, match="fork failed"):
        ProcessOrderedPool(_value, workers=2, start_method="fork")
    assert _shm_names() - before == set()


@pytest.mark.timeout(60)
def test_shared_memory_that_cannot_be_made_raises_and_leaves_nothing(monkeypatch):
    from multiprocessing import shared_memory

    made = []
    real = shared_memory.SharedMemory

    def third_fails(*args, **kwargs):
        if kwargs.get("create") and len(made) == 2:
            raise OSError(28, "No space left on device (test)")
        shm = real(*args, **kwargs)
        made.append(shm.name)
        return shm

    before = _shm_names()
    monkeypatch.setattr(shared_memory, "SharedMemory", third_fails)
    with pytest.raises(OSError, match="No space left"):
        ProcessOrderedPool(_value, workers=2, start_method="fork")
    assert len(made) == 2
    assert _shm_names() - before == set()


# -- /dev/shm with no room left (Docker's 64 MiB default) ---------------------------------------


def _enospc_above(limit):
    """A stand-in for os.posix_fallocate on a tmpfs with ``limit`` bytes left per region."""

    def fallocate(fd, offset, length):
        if offset + length > limit:
            raise OSError(28, "No space left on device")

    return fallocate


def _doc_of(raw):
    return {"n": len(raw), "head": raw[:300].decode()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("limit", [64, 1 << 20], ids=["no-room", "1MiB-room"])
def test_payloads_that_find_no_room_in_dev_shm_travel_in_the_pipe(monkeypatch, limit):
    """Writing into a shared-memory page that tmpfs has no room for would kill the writer with
    SIGBUS; the pages are allocated first, and a payload they cannot be allocated for goes in
    the pipe instead, in both directions (fork: the workers inherit the stand-in)."""
    from ordpool._transport import worker as _worker

    monkeypatch.setattr(_worker, "_fallocate", _enospc_above(limit))
    items = [bytes([65 + i % 26]) * (300 + (i * 7919) % 5000) for i in range(6000)]
    expected = [_doc_of(x) for x in items]
    with ProcessOrderedPool(_doc_of, workers=2, start_method="fork") as pool:
        assert pool.map(items) == expected  # batches of a few MB: over 1 MiB both ways
        assert pool.map(items[:10]) == expected[:10]  # small ones fit the 1 MiB room


@pytest.mark.timeout(60)
def test_a_full_dev_shm_fails_the_pool_at_start_with_a_clear_error(monkeypatch):
    from ordpool._transport import worker as _worker

    before = _shm_names()
    monkeypatch.setattr(_worker, "_fallocate", _enospc_above(0))
    with pytest.raises(OSError, match="no room left in /dev/shm"):
        ProcessOrderedPool(_value, workers=2, start_method="fork")
    assert _shm_names() - before == set()


def test_a_reservation_grows_ahead_and_falls_back_to_the_exact_size(monkeypatch):
    from ordpool._transport import worker as _worker

    calls = []

    def fallocate(fd, offset, length):
        calls.append(length)
        if length > 3000:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(_worker, "_fallocate", fallocate)
    r = _worker.Reservation(fd=5, capacity=10_000)
    assert r.fits(100) and calls == [10_000, 100]  # 256 KiB ahead (capped) refused, then exact
    assert r.fits(100) and r.fits(50) and len(calls) == 2  # no call within what is held
    assert r.fits(3000) and calls[2:] == [10_000, 3000]
    assert not r.fits(3001) and calls[4:] == [10_000, 3001]
    calls.clear()
    for _ in range(_worker.Reservation.RETRY_AFTER):
        assert not r.fits(5000)  # refused lately: the pipe, without asking again
    assert calls == []
    assert not r.fits(5000) and calls == [10_000, 5000]  # then it asks again
    assert r.fits(2000) and len(calls) == 2  # held already
    assert not r.fits(20_000)  # over the capacity: never
    monkeypatch.setattr(
        _worker, "_fallocate", lambda fd, o, n: (_ for _ in ()).throw(OSError(95, "unsupported"))
    )
    r = _worker.Reservation(fd=5, capacity=10_000)
    assert r.fits(9000) and r.reserved == 10_000  # unsupported: written as before
    assert _worker.Reservation(fd=None, capacity=10).fits(10)
    calls.clear()
    monkeypatch.setattr(_worker, "_fallocate", lambda fd, o, n: calls.append(n))
    r = _worker.Reservation(fd=5, capacity=64 << 20)
    for size in (1000, 200_000, 300_000, 600_000, 5_000_000, 4_000_000):
        assert r.fits(size)
    assert calls == [256 << 10, 375_000, 750_000, 6_250_000]  # a quarter ahead, 256 KiB at least


def _fail_at_4000(x):
    if x == 4000:
        raise ValueError("4000")
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["imap", "executor"])
def test_leaving_before_a_failed_item_leaves_no_cycle(api):
    """A consumer that stops before a failure it was about to get: the batch, its values and
    the exception are freed at once, not kept as a cycle until the cyclic GC runs."""
    import gc
    import multiprocessing

    from ordpool import OrderedProcessPoolExecutor

    if api == "imap":
        pool: Any = ProcessOrderedPool(_fail_at_4000, workers=1, start_method="fork")
        it = pool.imap(range(5000))
    else:
        pool = OrderedProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
        it = pool.map(_fail_at_4000, range(5000))
    try:
        for value in it:
            if value == 3999:
                break
        gc.collect()
        gc.disable()
        try:
            del it
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            cyclic = [o for o in gc.garbage if isinstance(o, ValueError)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert cyclic == []
    finally:
        if api == "imap":
            pool.terminate()
        else:
            pool.shutdown(wait=True, cancel_futures=True)
