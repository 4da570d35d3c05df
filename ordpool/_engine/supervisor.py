"""Supervision: the workers' lifecycle events, blame and retries after a crash, breaking.

A worker that dies while holding tasks is replaced, and its tasks are re-queued ahead of
everything else. The item it was running is blamed: it fails with ``WorkerCrashed`` once it has
been running at ``retries + 1`` deaths; the task's other items never count as attempts. A task
is re-queued or failed, never both, so results stay exactly-once while execution is
at-least-once.

The face of the pool plugs its own contract in through a :class:`Supervision` policy: the
default replaces dead workers; an executor (``ProcessPoolExecutor``'s contract) breaks instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from .._core.batching import Task
from .._core.errors import BrokenPool, WorkerCrashed, WorkerInitError, describe_exit
from .._core.state import ENDED, PoolState

if TYPE_CHECKING:
    from .coordinator import Engine

__all__ = ["Supervision", "Supervisor"]


class Supervision:
    """The default policy: replace a dead worker and retry what it held. Subclass to change.

    Each hook runs in the transport's thread, outside the engine's lock, before the engine
    acts on the event (``worker_died``, ``init_failed``) or after it broke (``broke``).
    """

    def worker_died(self, slot: int, crash: WorkerCrashed) -> None:
        """A running pool's worker died (not a retirement); the engine replaces it next,
        unless the hook has terminated the engine."""

    def init_failed(self, slot: int, exc: BaseException) -> None:
        """A worker's init raised ``exc``; the engine breaks (or fails to start) next."""

    def broke(self, error: BaseException) -> None:
        """The running engine broke with ``error``: a worker could not be (re)started, or
        the engine itself failed. (A failed start is not reported here: ``start()`` raises
        it, or leaves the engine BROKEN for its caller to see.)"""


class Supervisor:
    """Worker events and failure accounting for one engine.

    Attributes:
        retries: times an item whose worker died is re-run before it fails (0).
        restarts: worker processes replaced after a crash (2).
        init_error: why start() fails, once a worker's init failed, else ``None``.
        broken_error: why the engine broke, once it did, else ``None``.
    """

    __slots__ = ("broken_error", "engine", "init_error", "policy", "restarts", "retries")

    def __init__(self, engine: Engine, retries: int, policy: Supervision) -> None:
        self.engine = engine
        self.retries = retries
        self.policy = policy
        self.restarts = 0
        self.init_error: BaseException | None = None
        self.broken_error: BaseException | None = None

    # -- events from the transport (its thread) ------------------------------------------------

    def on_ready(self, slot: int, pid: int) -> None:
        engine = self.engine
        with engine.lock:
            s = engine.scheduler.slots[slot]
            s.ready = True
            s.retiring = False
            s.pid = pid
            engine.ready.notify_all()
            engine.scheduler.pump_locked()
        engine.delivery.drain_due()

    def on_retire(self, slot: int) -> None:
        engine = self.engine
        with engine.lock:
            engine.scheduler.slots[slot].retiring = True
            engine.scheduler.count_idle_locked()

    def on_init_error(self, slot: int, exc: BaseException) -> None:
        self.policy.init_failed(slot, exc)
        err = WorkerInitError(f"worker init raised {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        engine = self.engine
        with engine.lock:
            if engine.state is PoolState.STARTING:
                self.init_error = self.init_error or err
                engine.ready.notify_all()
                return
            if engine.state in ENDED:
                return
            self.break_locked(err)
        self._after_break(err)

    def on_death(
        self, slot: int, exitcode: int | None, pid: int, progress: tuple[int, int]
    ) -> None:
        engine = self.engine
        s = engine.scheduler.slots[slot]
        if not s.retiring and engine.state in (PoolState.RUNNING, PoolState.CLOSING):
            crash = WorkerCrashed(
                f"worker process {pid} died ({describe_exit(exitcode)})", exitcode=exitcode, pid=pid
            )
            self.policy.worker_died(slot, crash)
        with engine.lock:
            lost = list(s.outstanding)
            s.outstanding.clear()
            was_ready, s.ready = s.ready, False
            retired, s.retiring = s.retiring, False
            if engine.state not in (PoolState.STARTING, PoolState.RUNNING, PoolState.CLOSING):
                return
            if not was_ready and not retired:
                # It died in init (os._exit, a signal): restarting would loop forever.
                err = WorkerInitError(
                    f"worker process {pid} died during init ({describe_exit(exitcode)})"
                )
                if engine.state is PoolState.STARTING:
                    self.init_error = self.init_error or err
                    engine.ready.notify_all()
                    return
                engine.scheduler.requeue_front_locked(lost)
                self.break_locked(err)
                broke: BaseException | None = err
            else:
                broke = None
                if retired:
                    engine.scheduler.requeue_front_locked(lost)
                else:
                    self.restarts += 1
                    self.requeue_lost_locked(lost, exitcode, pid, progress)
                s.started += 1
        if broke is not None:
            self._after_break(broke)
            return
        self._restart(slot)

    def _restart(self, slot: int) -> None:
        engine = self.engine
        try:
            engine.transport.start_worker(slot)
        except BaseException as exc:  # a start failure breaks the pool
            self.break_now(exc)
        engine.delivery.drain_due()

    def break_now(self, error: BaseException) -> None:
        """Break the engine (unless it has ended), from any thread but under no lock."""
        with self.engine.lock:
            if self.engine.state in ENDED:
                return
            self.break_locked(error)
        self._after_break(error)

    def _after_break(self, error: BaseException) -> None:
        """Outside the lock, once the engine broke: hand over failed batches, stop the workers,
        tell the policy."""
        self.engine.delivery.drain_due()
        self.engine.transport.stop(graceful=False)
        self.policy.broke(error)

    # -- blame and retries ---------------------------------------------------------------------

    def requeue_lost_locked(
        self, lost: list[Task], exitcode: int | None, pid: int, progress: tuple[int, int]
    ) -> None:
        """A worker died holding ``lost``: blame the running item, re-queue the rest."""
        crashed = WorkerCrashed(
            f"worker process {pid} died ({describe_exit(exitcode)}) while running this item",
            exitcode=exitcode,
            pid=pid,
        )
        running_bid, position = progress
        requeue: list[Task] = []
        for i, task in enumerate(lost):
            if i == 0 and task.bid == running_bid:
                self._blame(task, position, crashed)
                if len(task.failed) == task.n:
                    task.payload = None
                    self.engine.delivery.answer_locked(task)
                    continue
            requeue.append(task)
        self.engine.scheduler.requeue_front_locked(requeue)

    def _blame(self, task: Task, position: int, crashed: WorkerCrashed) -> None:
        """Count a death against the item of ``task`` it was running (``position``; the task's
        length: after every item; -1: unknown) and fail what has no retries left."""
        n = task.n
        blamed: Iterable[int]
        if position == n and not task.rerun:
            # It died after running every item, while sending the results: no item is to
            # blame (a kill from outside, an OOM). Run the task again, once.
            task.rerun = True
            blamed = ()
        else:
            # position -1 (unknown, e.g. a lost Ray actor) or n again: all of them
            blamed = [position] if 0 <= position < n else range(n)
        newly_blamed = False
        for pos in blamed:
            if pos in task.failed:
                continue
            newly_blamed = True
            tries = task.attempts.get(pos, 0) + 1
            task.attempts[pos] = tries
            if tries > self.retries:
                task.failed[pos] = crashed
        if blamed and not newly_blamed:
            # Every item it blames has failed already: the death came after them (while the
            # results were pickled or written, say), and running the task again may only
            # repeat it. Count it against the task, then fail the rest.
            task.late_deaths += 1
            if task.late_deaths > self.retries:
                for pos in range(n):
                    task.failed.setdefault(pos, crashed)

    # -- breaking ------------------------------------------------------------------------------

    def break_locked(self, error: BaseException) -> None:
        """Fail everything pending and refuse new work: workers cannot be (re)started."""
        engine = self.engine
        with engine.gate:
            engine.state = PoolState.BROKEN
            for stream in engine.streams:
                stream.closed = True
        self.broken_error = error
        for task in engine.scheduler.drop_all_locked():
            self.fail_task_locked(task, error)
        for stream in engine.streams:
            engine.intake.fail_pending_locked(stream, error)
        engine.wake_all_locked()
        engine.forget()

    def fail_task_locked(self, task: Task, error: BaseException | None) -> None:
        """Answer every item of ``task`` not failed yet with ``BrokenPool`` (cause: ``error``)."""
        broken = BrokenPool(f"the pool is broken: {error}")
        broken.__cause__ = error
        for pos in range(task.n):
            task.failed.setdefault(pos, broken)
        task.payload = None
        self.engine.delivery.answer_locked(task)
