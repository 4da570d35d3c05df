"""Statistics: a frozen snapshot of a pool, cheap enough to poll from a monitoring thread."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

__all__ = ["PoolStats", "WorkerStats", "worker_usage"]


@dataclass(frozen=True)
class WorkerStats:
    """One worker slot.

    Attributes:
        slot: the slot number (0 .. workers-1); a replacement process takes the same slot.
        pid: the current process id (``None`` while the slot is being restarted).
        busy: the worker holds at least one task.
        tasks_completed: items this slot has answered, across its processes.
        processes: processes started for this slot (1, plus one per restart).
        cpu_seconds: user + system CPU time of the current process (``None`` if unknown,
            e.g. a Ray actor on another node).
        rss_bytes: resident memory of the current process (``None`` if unknown).
    """

    slot: int
    pid: int | None
    busy: bool
    tasks_completed: int
    processes: int
    cpu_seconds: float | None
    rss_bytes: int | None


@dataclass(frozen=True)
class PoolStats:
    """A pool at one moment. Counters count items (jobs), from the pool's start.

    Attributes:
        submitted: items accepted into batches (``enqueue``/``submit`` count at the call,
            ``imap`` as it reads its input).
        completed: items answered with a value.
        failed: items answered with an error (their own exception, an unpicklable item or
            result, a crash with no retries left, a cancelled future, a broken pool).
        in_flight: items taken and not yet handed to the consumer (bounded by the window).
        in_heap: answered items waiting in the reorder heaps for an earlier item.
        peak_heap: the most items ever waiting in a reorder heap.
        busy_workers: workers holding at least one task.
        idle_workers: ready workers holding none.
        restarts: worker processes replaced after a crash.
        batch_size: items per batch now (fixed, or the adaptive choice).
        workers: one :class:`WorkerStats` per slot.
        held_bytes: bytes of the results waiting for an earlier item now (results in order
            that only wait for the consumer do not count; ``in_heap`` counts both).
        hold_seconds: item-seconds results have waited in a reorder heap for an earlier
            item, from the start: a batch of 100 items held 0.02 s adds 2.0. Divided by the
            items of the pool's ordered streams (all of them but an executor's ``submit``
            and a keyed pool's jobs), the mean wait an item's order cost it. Time a result
            then waits for the consumer to ask for it does not count.
        max_hold_seconds: the longest a result waited for an earlier item. High while
            ``busy_workers`` is low: a slow item holds the ones after it back; low while
            results queue anyway: the pool (or the consumer) is the bottleneck.

    Once everything submitted was answered, ``submitted == completed + failed``.
    """

    submitted: int
    completed: int
    failed: int
    in_flight: int
    in_heap: int
    peak_heap: int
    busy_workers: int
    idle_workers: int
    restarts: int
    batch_size: int
    workers: tuple[WorkerStats, ...]
    held_bytes: int = 0
    hold_seconds: float = 0.0
    max_hold_seconds: float = 0.0


def worker_usage(pid: int | None) -> tuple[float | None, int | None]:
    """``(cpu seconds, rss bytes)`` of a process, or ``(None, None)`` if it cannot be read."""
    if not pid:
        return None, None
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            times = proc.cpu_times()
            return times.user + times.system, proc.memory_info().rss
    except psutil.Error:
        return None, None
