"""The coordinator: wires the engine's parts, owns its lock, lifecycle and stream registry.

See the package docstring (:mod:`ordpool._engine`) for the data flow and the threading model.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 - import before registering our atexit hook
import threading
import time
import weakref
from typing import Sized, TypeVar

from .._core.batching import BatchSizer, Task
from .._core.defaults import DEPTH, PACE, Deadline
from .._core.errors import BrokenPool, PoolClosed, WorkerInitError
from .._core.reorder import ReorderBuffer
from .._core.routing import KeyRouter
from .._core.state import ENDED, PoolState
from .._core.stats import PoolStats, WorkerStats, worker_usage
from .._core.streams import IndexedStream, Stream
from .._transport.base import TransportFactory
from .delivery import Delivery
from .flusher import Flusher
from .intake import Intake
from .scheduler import Scheduler
from .supervisor import Supervision, Supervisor

__all__ = ["Engine"]

S = TypeVar("S", bound=Stream)

_LIVE_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


class Engine:
    """One ordered pipeline over one transport: the parts, wired.

    Args:
        transport_factory: called once as ``transport_factory(engine)``; the engine is the
            transport's :class:`~ordpool._transport.base.TransportEvents`.
        workers: worker slots.
        window: most items in flight (see :class:`~ordpool._engine.intake.Intake`).
        batch_size: items per batch, or ``None`` to size batches from the measured cost.
        max_delay: seconds a partial batch waits before it is sent anyway.
        pace: the shortest time between two partial batches of ordered streams cut for idle
            workers (:meth:`.Scheduler.paced`); default ``max_delay * PACE``; 0: no pacing.
        retries: times an item whose worker died is re-run before it fails.
        depth: tasks a worker may hold at once.
        stream_depth: the same for the batches of bulk streams (default: ``depth``).
        supervision: the policy for worker deaths (default: replace and retry).
        first_batch: the size of the first batches, before any is measured (default 16).
        max_batch: the most items per batch (default: a few batches per worker fit the
            window, at most 4096).

    Raises:
        ValueError: ``depth`` or ``stream_depth`` is more than the transport supports.
    """

    def __init__(
        self,
        transport_factory: TransportFactory,
        *,
        workers: int,
        window: int,
        batch_size: int | None,
        max_delay: float,
        retries: int,
        depth: int = DEPTH,
        stream_depth: int | None = None,
        supervision: Supervision | None = None,
        first_batch: int | None = None,
        max_batch: int | None = None,
        pace: float | None = None,
    ) -> None:
        # An RLock, though nothing takes it twice: a Condition re-takes an RLock after a wait
        # without letting a signal in (C code), but a Lock through Lock.acquire(), which a
        # Ctrl-C interrupts. The KeyboardInterrupt would then leave `with lock:` without the
        # lock, and the release raise "RuntimeError: release unlocked lock" in its place.
        self.lock = threading.RLock()
        # The gate: held for a few steps at a time, by enqueue's path for an item that cuts no
        # batch (without the lock above: see Intake.enqueue), and, under the lock, by
        # whatever changes an indexed stream's pending items or ends the intake (a take, a
        # close, a break). Never taken before the lock, nor held while waiting.
        self.gate = threading.Lock()
        self.space = threading.Condition(self.lock)  # producers and feeders wait for room
        self.ready = threading.Condition(self.lock)  # consumers, start() and join() wait
        self.state = PoolState.STARTING
        self.workers = workers
        self.streams: list[Stream] = []  # open streams, oldest first
        self.stopping = False  # close() found nothing left to run: the workers are stopping
        self.route = KeyRouter(workers)  # key -> worker slot
        self.sizer = BatchSizer(batch_size)
        self.sizer.limit(max(1, window // (workers * (depth + 1))))
        if max_batch is not None:
            self.sizer.limit(max_batch)
        if first_batch is not None and batch_size is None:
            self.sizer.size = first_batch
        stream_depth = depth if stream_depth is None else stream_depth
        self.scheduler = Scheduler(
            self, workers, depth, stream_depth, max_delay * PACE if pace is None else pace
        )
        self.delivery = Delivery(self)
        self.intake = Intake(self, window)
        self.flusher = Flusher(self, max_delay)
        self.supervisor = Supervisor(self, retries, supervision or Supervision())
        self.transport = transport_factory(self)
        self._fit_transport(batch_size, max(depth, stream_depth))
        _LIVE_ENGINES.add(self)

    def _fit_transport(self, batch_size: int | None, depth: int) -> None:
        """Adopt what the transport asks for: longer batches (a high fixed cost per task, as a
        Ray call's), a payload limit (shared-memory regions); refuse a depth it cannot hold."""
        transport = self.transport
        if batch_size is None and transport.batch_target:
            self.sizer.target = transport.batch_target
        self.sizer.max_bytes = transport.max_payload
        if depth > transport.max_depth:
            transport.stop(graceful=False)
            raise ValueError(
                f"depth {depth} exceeds what the transport supports ({transport.max_depth})"
            )

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float | None, *, raise_init_error: bool = True) -> None:
        """Start every worker and wait until all are READY.

        Args:
            timeout: seconds to wait for the workers' init; ``None`` waits.
            raise_init_error: raise a failed init (else the engine is left BROKEN with it).

        Raises:
            WorkerInitError: a worker's init raised (its traceback is ``__cause__``), died, or
                did not finish within ``timeout`` seconds.
        """
        try:
            for slot in self.scheduler.slots:
                slot.started += 1
            self.transport.start_workers(list(range(self.workers)))
        except BaseException:
            self.terminate()
            raise
        error = self._wait_until_ready(timeout)
        if error is None:
            self.flusher.start()
            return
        self.terminate()
        with self.lock, self.gate:
            self.state = PoolState.BROKEN
            self.supervisor.broken_error = error
        if raise_init_error:
            raise error

    def _wait_until_ready(self, timeout: float | None) -> BaseException | None:
        """Wait for every worker's READY; RUNNING then, else the error that stops the start."""
        supervisor, slots = self.supervisor, self.scheduler.slots
        deadline = Deadline(timeout)
        with self.lock:
            while supervisor.init_error is None and not all(s.ready for s in slots):
                remaining = deadline.remaining()
                if remaining is not None and remaining <= 0:
                    supervisor.init_error = WorkerInitError(
                        f"workers did not finish init within {timeout} seconds"
                    )
                    break
                self.ready.wait(remaining)
            if supervisor.init_error is None:
                self.state = PoolState.RUNNING
            return supervisor.init_error

    def close(self) -> None:
        """Stop intake; in-flight work finishes and streams end. Idempotent."""
        works = []
        with self.lock:
            if self.state not in (PoolState.RUNNING, PoolState.STARTING):
                return
            with self.gate:
                self.state = PoolState.CLOSING
                closing = [s for s in self.streams if not s.closed and s.close_intake()]
            for stream in closing:
                works.append(self.intake.take_locked(stream))
            self.wake_all_locked()
        for work in works:
            if work is not None:
                self.intake.encode_dispatch(*work)
        self.maybe_stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the workers have stopped; returns False on timeout."""
        deadline = Deadline(timeout)
        with self.lock:
            while self.state not in ENDED:
                remaining = deadline.remaining()
                if remaining is not None and remaining <= 0:
                    return False
                self.ready.wait(remaining)
        # Ended; make sure the workers are gone too (a broken pool stops them from the
        # transport's thread: a second stop() waits for that one).
        self.transport.stop(graceful=False)
        return True

    def terminate(self, grace: float = 0.0) -> None:
        """Kill the workers; pending work is dropped and streams end. Idempotent.

        With ``grace``, running items are first asked to stop (``ordpool.cancelled()`` turns
        true in them) and given up to ``grace`` seconds to return.
        """
        if grace > 0 and self.state in (PoolState.RUNNING, PoolState.CLOSING):
            self.transport.cancel_all()
            deadline = Deadline(grace)
            while not deadline.expired():
                with self.lock:
                    if not any(s.outstanding for s in self.scheduler.slots):
                        break
                time.sleep(0.005)
        with self.lock:
            if self.state in ENDED:
                return
            with self.gate:
                self.state = PoolState.TERMINATED
            self.wake_all_locked()
        self.transport.stop(graceful=False)
        self.forget()

    def maybe_stop(self) -> None:
        """After close(): stop the workers once nothing is left to run."""
        with self.lock:
            if self.state is not PoolState.CLOSING or self.stopping:
                return
            if any(not s.closed or s.open_batches for s in self.streams):
                return
            scheduler = self.scheduler
            if scheduler.pending or any(s.outstanding or s.pending for s in scheduler.slots):
                return
            self.stopping = True
        # CLOSED only once the workers are gone, so that join() means "nothing left running".
        self.transport.stop(graceful=True)
        with self.lock:
            if self.state is PoolState.CLOSING:
                self.state = PoolState.CLOSED
            self.ready.notify_all()
            self.flusher.cond.notify_all()
        self.forget()

    def check_open(self) -> None:
        """Raise unless the pool takes new work."""
        state = self.state
        if state is PoolState.RUNNING:
            return
        if state is PoolState.BROKEN:
            error = self.supervisor.broken_error
            raise BrokenPool(f"the pool is broken: {error}") from error
        raise PoolClosed(f"the pool is {state.value}: it takes no new work")

    @property
    def broken_error(self) -> BaseException | None:
        """Why the engine broke (``WorkerCrashed``, ``WorkerInitError``...), else ``None``."""
        return self.supervisor.broken_error

    def wake_all_locked(self) -> None:
        """The state changed: wake every thread waiting on one of the engine's conditions."""
        self.ready.notify_all()
        self.space.notify_all()
        self.flusher.cond.notify_all()

    def forget(self) -> None:
        """The engine has ended: interpreter exit need not terminate it."""
        _LIVE_ENGINES.discard(self)

    # -- streams -------------------------------------------------------------------------------

    def open_stream(self, stream: S) -> S:
        """Register a new stream (an :class:`~ordpool._core.streams.IndexedStream` or a
        :class:`~ordpool._core.streams.NumberedStream`); it then takes items."""
        with self.lock:
            self.check_open()
            self.streams.append(stream)
            return stream

    def release_stream(self, stream: Stream) -> None:
        """The consumer of ``stream`` is done (finished, or gave up early)."""
        with self.lock:
            stream.consumer = False
            if not stream.finished():
                # Results already waiting are dropped now, those still running as they land
                # (Delivery.answer_locked), and the feeder stops at its next take.
                with self.gate:
                    stream.abandoned = True
                    stream.closed = True
                    if isinstance(stream, IndexedStream):  # accepted, whatever comes of them
                        self.intake.submitted += stream.unsubmitted
                        stream.unsubmitted = 0
                self.intake.release_locked(stream.reorder.items)
                stream.reorder = ReorderBuffer()
            if stream in self.streams:
                self.streams.remove(stream)
        self.maybe_stop()

    def claim_consumer(self, stream: Stream) -> None:
        with self.lock:
            if stream.consumer:
                raise RuntimeError("results() is already being iterated by another consumer")
            stream.consumer = True

    def release_consumer(self, stream: Stream) -> None:
        with self.lock:
            stream.consumer = False

    # -- transport events (TransportEvents): the supervisor's, and the results ------------------

    def on_ready(self, slot: int, pid: int) -> None:
        self.supervisor.on_ready(slot, pid)

    def on_retire(self, slot: int) -> None:
        self.supervisor.on_retire(slot)

    def on_init_error(self, slot: int, exc: BaseException) -> None:
        self.supervisor.on_init_error(slot, exc)

    def on_death(
        self, slot: int, exitcode: int | None, pid: int, progress: tuple[int, int]
    ) -> None:
        self.supervisor.on_death(slot, exitcode, pid, progress)

    def on_part(self, slot: int, bid: int, lo: int, hi: int, payload: Sized) -> None:
        """Early results of the task a worker is running (see :meth:`Delivery.part_locked`)."""
        with self.lock:
            outstanding = self.scheduler.slots[slot].outstanding
            if outstanding and outstanding[0].bid == bid:
                self.delivery.part_locked(outstanding[0], lo, hi, payload)

    def on_result(
        self, slot: int, bid: int, seconds: float, payload: Sized, nerrors: int = 0
    ) -> None:
        """A task's results arrived: account them, refill the worker, deliver."""
        intake, scheduler, delivery = self.intake, self.scheduler, self.delivery
        with self.lock:
            s = scheduler.slots[slot]
            task = s.outstanding.popleft()
            if task.bid != bid:  # pragma: no cover - a protocol bug, never a user error
                raise AssertionError(f"worker {slot} answered task {bid}, expected {task.bid}")
            self.sizer.observe(task.n, seconds)
            self.sizer.observe_bytes(task.n, len(payload), results=True)
            s.tasks += task.n
            task.frame = payload
            task.payload = None
            delivery.answer_locked(task, nerrors)
            scheduler.pump_locked()
            works = intake.take_for_idle_locked()
            closing = self.state is PoolState.CLOSING
        for work in works:
            intake.encode_dispatch(*work)
        if delivery.due:
            delivery.drain_due()
        if closing:
            self.maybe_stop()

    # -- control and introspection -------------------------------------------------------------

    def cancel_running(self, task: Task, position: int) -> bool:
        """Ask the worker running ``task`` to stop its item at ``position`` (cooperatively)."""
        with self.lock:
            slot = self.scheduler.running_slot(task)
        if slot is None:
            return False
        self.transport.cancel(slot, task.bid, position)
        return True

    def stats(self) -> PoolStats:
        """A :class:`~ordpool.PoolStats` snapshot (per-worker CPU and RSS from psutil)."""
        with self.lock:
            slots = self.scheduler.snapshot_locked()
            delivery = self.delivery
            counters = (
                self.intake.submitted
                + sum(s.unsubmitted for s in self.streams if isinstance(s, IndexedStream)),
                delivery.completed,
                delivery.failed,
                self.intake.inflight,
            )
            in_heap = sum(s.reorder.items for s in self.streams)
            held_bytes = sum(s.reorder.held_bytes for s in self.streams)
            hold = (held_bytes, delivery.hold_seconds, delivery.max_hold)
            busy = sum(1 for s in self.scheduler.slots if s.outstanding)
            idle = sum(1 for s in self.scheduler.slots if s.ready and not s.outstanding)
            restarts, peak = self.supervisor.restarts, delivery.peak_heap
        workers = tuple(
            WorkerStats(i, pid, is_busy, done, started, *worker_usage(pid))
            for i, (pid, is_busy, done, started) in enumerate(slots)
        )
        return PoolStats(
            *counters, in_heap, peak, busy, idle, restarts, self.sizer.size, workers, *hold
        )

    def worker_pids(self) -> list[int]:
        return sorted(self.transport.pids().values())

    @property
    def inflight(self) -> int:
        return self.intake.inflight


def _terminate_all() -> None:
    for engine in list(_LIVE_ENGINES):
        try:
            engine.terminate()
        except Exception:  # interpreter exit: nothing to report to
            pass


# Registered after multiprocessing.util's own exit hook, so it runs first (atexit is LIFO):
# our workers are gone before multiprocessing joins its non-daemonic children.
atexit.register(_terminate_all)
