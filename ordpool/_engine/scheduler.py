"""Scheduling: which worker slot runs which task, and when it is sent.

Tasks wait in one queue for any slot (``pending``) or, for keyed streams, in the queue of the
slot their key hashes to (``Slot.pending``). :meth:`Scheduler.pump_locked` sends them: a slot's
own tasks first, then any task to the least loaded ready slot, at most ``depth`` tasks per slot
(``stream_depth`` for the batches of a bulk stream, which never queue behind a single job).
Everything here runs under the engine's lock.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .._core.batching import Task
from .._core.streams import Stream

if TYPE_CHECKING:
    from .coordinator import Engine

__all__ = ["Scheduler", "Slot"]


class Slot:
    """One worker slot; the process (or actor) behind it changes after a crash."""

    __slots__ = ("outstanding", "pending", "pid", "ready", "retiring", "started", "tasks")

    def __init__(self) -> None:
        self.outstanding: deque[Task] = deque()  # sent to the worker, oldest (running) first
        self.pending: deque[Task] = deque()  # keyed tasks waiting for this slot
        self.ready = False  # READY received from the current process
        self.retiring = False  # it said RETIRE: send nothing more, restart it when it exits
        self.pid = 0
        self.started = 0  # processes started for this slot (1, then 2 after a crash...)
        self.tasks = 0  # items completed by this slot

    def takes_work(self) -> bool:
        return self.ready and not self.retiring

    def free(self) -> bool:
        """Ready, holding no task, and none waits for it."""
        return self.ready and not self.retiring and not self.outstanding and not self.pending

    def holds_a_job(self) -> bool:
        """Whether it holds a task that is not a bulk stream's batch (a submit job)."""
        return any(not t.batch.stream.bulk for t in self.outstanding)


class Scheduler:
    """Slots and queued tasks of one engine."""

    __slots__ = (
        "depth",
        "engine",
        "idle",
        "pace",
        "paced_until",
        "pending",
        "slots",
        "stream_depth",
    )

    def __init__(
        self, engine: Engine, workers: int, depth: int, stream_depth: int, pace: float = 0.0
    ) -> None:
        self.engine = engine
        self.depth = depth  # tasks a worker may hold at once (2; an executor's submit jobs: 1)
        # ...when they are batches of a bulk stream: a worker then has the next batch at
        # hand when it finishes one. An executor holds its submit jobs to one per worker (as
        # the stdlib's shared call queue does) but not its map batches.
        self.stream_depth = stream_depth
        self.slots = [Slot() for _ in range(workers)]
        self.pending: deque[Task] = deque()  # tasks for any slot, waiting for room
        self.idle = 0  # ready slots holding no task: a new item is sent at once (Nagle-style)
        # Cut pacing: an ordered stream's partial batch is cut for an idle worker at most once
        # per `pace` seconds (see `paced`); `paced_until` is the last cut's time plus `pace`.
        self.pace = pace
        self.paced_until = 0.0

    # -- queueing ------------------------------------------------------------------------------

    def queue_locked(self, task: Task) -> None:
        """Queue a task for its slot, or for any slot."""
        if task.slot is None:
            self.pending.append(task)
        else:
            self.slots[task.slot].pending.append(task)

    def requeue_front_locked(self, tasks: list[Task]) -> None:
        """Put lost tasks back first: their items come before everything queued after them."""
        self.pending.extendleft(reversed([t for t in tasks if t.slot is None]))
        for task in reversed(tasks):
            if task.slot is not None:
                self.slots[task.slot].pending.appendleft(task)

    def queued_locked(self) -> int:
        """Tasks cut into batches and waiting for a worker: for any worker, or for a given one
        (keyed)."""
        return len(self.pending) + sum(len(s.pending) for s in self.slots)

    def drop_all_locked(self) -> list[Task]:
        """Empty every queue and slot (the pool broke): the tasks they held, in bid order."""
        lost = list(self.pending)
        self.pending.clear()
        for s in self.slots:
            lost.extend(s.outstanding)
            lost.extend(s.pending)
            s.outstanding.clear()
            s.pending.clear()
            s.ready = False
        return sorted(lost, key=lambda t: t.bid)

    # -- sending -------------------------------------------------------------------------------

    def pump_locked(self) -> None:
        """Send queued tasks: a slot's own (keyed) tasks first, then any task, least loaded
        slot first. A feeder waiting for the queue to shrink (``Feeder.take_feed``) is woken
        when it did."""
        depth = self.depth
        sent = False
        for i, s in enumerate(self.slots):
            while s.pending and s.takes_work() and len(s.outstanding) < depth:
                self._send_locked(i, s.pending.popleft())
                sent = True
        pending = self.pending
        before = len(pending)
        while pending:
            best = self._best_slot(pending[0].batch.stream.bulk)
            if best < 0:
                break
            self._send_locked(best, pending.popleft())
        self.count_idle_locked()
        if sent or len(pending) < before or self.idle:
            self.engine.space.notify_all()  # (a worker left idle may take a new batch)

    def _best_slot(self, bulk: bool) -> int:
        """The least loaded slot with room for one more task (-1: none). A bulk stream's batch
        may be ``stream_depth`` per slot, and never queues behind a job (an executor's submit),
        which may be long."""
        best, load = -1, self.stream_depth if bulk else self.depth
        for i, s in enumerate(self.slots):
            n = len(s.outstanding)
            if n < load and s.takes_work():
                if n and bulk and s.holds_a_job():
                    continue
                best, load = i, n
                if n == 0:
                    break
        return best

    def _send_locked(self, slot: int, task: Task) -> None:
        on_send = task.batch.stream.on_send
        if on_send is not None:
            on_send(task)
            if len(task.failed) == task.n:  # every item was cancelled meanwhile
                task.payload = None
                self.engine.delivery.answer_locked(task)
                return
        self.slots[slot].outstanding.append(task)
        assert task.payload is not None  # encoded before it was queued
        failed = tuple(task.failed)
        taken = task.batch.taken
        if taken:  # sent again after a crash: the results that came early are not run again
            failed = tuple(set(failed).union(range(taken)))
        self.engine.transport.send(slot, task.bid, failed, task.payload, task.batch.stream.call)

    def count_idle_locked(self) -> None:
        self.idle = sum(1 for s in self.slots if s.takes_work() and not s.outstanding)

    # -- placement questions -------------------------------------------------------------------

    def starts_now(self, stream: Stream, slot: int | None = None) -> bool:
        """Whether a partial batch of ``stream`` cut now would start at once on an idle worker.

        A worker is idle and no task waits for any worker. For a keyed ordered stream, also
        the new item's own worker (``slot``) must be free: with a hot key, every item may be
        for the one busy worker while the others idle, and cutting at each item would make
        one-item tasks. Its items wait while that worker is busy, and go as one batch once it
        is free; an item for a free worker still goes at once. A callback stream (a keyed
        pool's jobs) is cut at once: a batch completes as a whole, so a job for a free worker
        must not wait in a batch with one for a busy worker. An ordered stream's batch also
        waits while the cut is paced (:meth:`paced`). A feeder calls this without the lock: a
        hint, where a stale answer costs a batch cut early or late, nothing else.
        """
        if not self.idle or self.pending:
            return False
        if stream.on_batch is not None:
            return True
        if self.paced():
            return False
        return not stream.keyed or slot is None or self.slots[slot].free()

    def paced(self) -> bool:
        """Whether an ordered stream's partial batch must still wait before it is cut for an
        idle worker: the last batch was cut less than ``pace`` seconds ago.

        Each batch costs the parent about the same CPU whatever its length (a pipe write, a
        result frame, thread wake-ups). Under a steady stream that a pool keeps up with, a
        worker is idle most of the time, and cutting at every idle worker makes batches of a
        few items, whose per-batch cost then takes the parent more CPU than the items take the
        workers. Pacing bounds the parent's batch rate, so that an item waits at most ``pace``
        for its batch to be cut instead of contending for the parent's CPU with every other
        batch. Callback streams (an executor's jobs) are never paced: a job for an idle
        worker goes at once.
        """
        return self.pace > 0 and time.monotonic() < self.paced_until

    def has_items_for_free_slot(self, stream: Stream) -> bool:
        """Whether a keyed ordered stream's pending items include one for a free worker. Called
        per answered task and per flusher tick, not per item."""
        free = {i for i, s in enumerate(self.slots) if s.free()}
        return bool(free) and stream.has_item_for(free, self.engine.route)

    def running_slot(self, task: Task) -> int | None:
        """The slot whose worker is running ``task`` now, if any."""
        for i, s in enumerate(self.slots):
            if s.outstanding and s.outstanding[0] is task:
                return i
        return None

    def snapshot_locked(self) -> list[tuple[Any, ...]]:
        """``(pid or None, busy, items done, processes started)`` per slot, for stats."""
        return [
            (s.pid if s.ready else None, bool(s.outstanding), s.tasks, s.started)
            for s in self.slots
        ]
