"""Chaos: a million messages through imap while a thread SIGKILLs a random worker every
50,000 results. Every index must come back exactly once, in order, as its value or (without
retries) as WorkerCrashed; with ``retries=1`` no error at all.

Runs under the fork start method only (not the ``start_method`` fixture): twenty restarts under
spawn would take most of the time budget and test nothing more about ordering and accounting,
which the crash tests of test_pool_errors.py cover under both start methods.

The killer only picks workers that have finished ``init`` (``stats().workers[i].pid`` is set
once a worker is READY): killing a replacement while it is still in ``init`` breaks the pool by
design (a worker dying in init would otherwise be restarted forever).
"""

from __future__ import annotations

import os
import queue
import random
import signal
import threading

import pytest
from conftest import wait_until

from ordpool import ProcessOrderedPool, WorkerCrashed

N = 1_000_000
EVERY = 50_000


def _mix(i: int) -> int:
    return (i * 2654435761) & 0xFFFFFFFF


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("retries", [0, 1])
def test_random_sigkills_lose_and_duplicate_nothing(retries):
    rnd = random.Random(20240601 + retries)
    kills: list[int] = []
    requests: queue.Queue = queue.Queue()
    killer_errors: list[BaseException] = []

    with ProcessOrderedPool(_mix, workers=2, retries=retries, start_method="fork") as pool:

        def ready_pids() -> list[int]:
            return [w.pid for w in pool.stats().workers if w.pid is not None]

        def killer():
            try:
                while requests.get() is not None:
                    assert wait_until(ready_pids, timeout=30)
                    victim = rnd.choice(ready_pids())
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)
                    # wait for the replacement to be READY: the next kill then cannot hit a
                    # dead (unreaped) pid, nor a worker in init; and close() never races with
                    # a restart (see test_close_right_after_a_worker_died_leaks_nothing)
                    assert wait_until(
                        lambda victim=victim: (
                            (pids := [w.pid for w in pool.stats().workers]).count(None) == 0
                            and victim not in pids
                        ),
                        timeout=30,
                    )
            except BaseException as exc:
                killer_errors.append(exc)

        thread = threading.Thread(target=killer, name="chaos-killer")
        thread.start()
        errors: dict[int, BaseException] = {}
        count = 0
        try:
            for i, value in enumerate(pool.imap(range(N), errors="return")):
                if isinstance(value, BaseException):
                    errors[i] = value
                elif value != _mix(i):
                    raise AssertionError(f"index {i}: {value!r} != {_mix(i)!r}")
                count += 1
                if count % EVERY == 0 and count < N:
                    requests.put(count)
        finally:
            requests.put(None)
            thread.join(60)
        restarts = pool.stats().restarts

    assert killer_errors == []
    # enumerate() numbered the results: exactly N of them means every index came back once,
    # in order (each value is checked against its index above)
    assert count == N
    assert len(kills) >= (N // EVERY - 1) * 3 // 4, kills  # the chaos did happen
    assert restarts == len(kills)  # and every kill was noticed and repaired
    for i, err in errors.items():
        assert isinstance(err, WorkerCrashed), (i, err)
        assert err.exitcode == -signal.SIGKILL
        assert err.pid in kills
    if retries:
        assert errors == {}
    else:
        # a kill blames at most the one item its worker was running
        assert len(errors) <= len(kills)
