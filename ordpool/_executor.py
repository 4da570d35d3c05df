r"""``OrderedProcessPoolExecutor``: ``concurrent.futures.ProcessPoolExecutor`` over ordpool.

A drop-in replacement: same constructor, ``submit``/``map``/``shutdown``, real
``concurrent.futures.Future`` objects and the standard library's failure contract (CPython 3.11 to
3.13 is the specification). Underneath, one :class:`~ordpool._engine.Engine` carries two kinds of
stream to the same worker processes::

    submit(fn, *args, **kwargs)                         map(fn, *iterables)
        |  Future (PENDING) + item (fn, args, kwargs)       |  items: x, or args tuples; fn goes
        v                                                   |  once per task (stream callable)
    _queue: PENDING, still cancellable                      v
        |  _pump: at most 2 * workers + 1 items         _MapFeed.items(): at most `buffersize`
        |  in the engine, like the stdlib's call queue      items ahead of the consumer (lazy)
        |  set_running_or_notify_cancel()                   |  Feeder.run, in a feeder thread
        v                                                   v
    intake.enqueue(IndexedStream, index, item)          a NumberedStream (ordered, batched)
        \________ engine: batches -> worker processes: invoke(item) -> results ________/
        |                                                   |
    on_batch (engine's thread): futures by index        delivery.next_batch(), consumer thread:
        |  set_result / set_exception                       |  a list per chunk, in order
        v                                                   v
    Future callbacks, wait(), as_completed()            itertools.chain: no Future per item

``submit`` mirrors the stdlib's two stages: a future is PENDING (cancellable) while it waits in
``_queue``, and becomes RUNNING when its item is handed to the engine, at most ``2 * workers + 1``
at a time (the stdlib's running calls plus its call queue of ``workers + 1``). ``map`` creates no
future at all: its items go through the engine's ordered stream in batches, whatever
``chunksize`` says, and its input is read lazily, at most ``window`` items ahead of the consumer
(like 3.14's ``buffersize``).

Failure contract, as ``ProcessPoolExecutor``: a task's exception keeps its type with the remote
traceback as ``__cause__``; an argument or result that cannot be pickled fails that future only;
a worker that dies (signal, ``os._exit``) or whose initializer fails breaks the executor: every
pending future fails with :class:`BrokenProcessPool` and later calls raise it. The engine would
replace a dead worker; ``_ExecutorSupervision`` plugs into the engine to break the executor
at the moment a worker dies instead.

Threads: the caller's (submit, map's consumer), the engine's transport threads (futures are
completed there, outside every lock), one feeder per ``map``, and a short-lived starter: workers
start on the first ``submit``/``map``, in the background, so ``submit`` never waits for them.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError
from concurrent.futures import process as _stdlib_process
from concurrent.futures import wait as _wait_futures
from typing import Any, Callable, Iterable, Iterator

from ._core.batching import Batch, Task
from ._core.defaults import MAX_DELAY, Deadline, default_window
from ._core.errors import (
    BrokenPool,
    PoolClosed,
    RemoteTraceback,
    WorkerCrashed,
    WorkerInitError,
)
from ._core.state import ENDED, PoolState
from ._core.stats import PoolStats
from ._core.streams import IndexedStream, NumberedStream
from ._engine import Engine, Feeder, PacedSequence, Supervision
from ._engine.decoding import batch_values, decode
from ._engine.futures import JobFuture, bind_futures, complete_futures
from ._transport import wire as _wire
from ._transport.base import TransportEvents
from ._transport.process import ProcessTransport
from ._transport.worker import (
    invoke,
    invoke_after_init,
    process_spec,
    run_logged_initializer,
    star,
)

__all__ = ["BrokenProcessPool", "OrderedProcessPoolExecutor"]

# The logger the stdlib's executors report to (concurrent.futures._base.LOGGER).
LOGGER = logging.getLogger("concurrent.futures")

# The stdlib's texts (concurrent/futures/process.py), so that code matching on them still works.
_BROKEN = "A child process terminated abruptly, the process pool is not usable anymore"
_BROKEN_FUTURE = (
    "A process in the process pool was terminated abruptly while the future was running or pending."
)
_AFTER_SHUTDOWN = "cannot schedule new futures after shutdown"
_AFTER_EXIT = "cannot schedule new futures after interpreter shutdown"

# The engine's window bounds items in flight across all its streams; submit is bounded by
# _Core.cap and each map by its own _MapFeed, so the engine's own window must never be reached:
# submit() must not block (a future's callback may submit from the engine's thread).
_UNBOUNDED = 1 << 62


class BrokenProcessPool(BrokenPool, _stdlib_process.BrokenProcessPool):
    """Raised when a worker process of an :class:`OrderedProcessPoolExecutor` terminated
    abruptly (or its initializer failed) while a future was running or pending.

    Both ``concurrent.futures.process.BrokenProcessPool`` and :class:`ordpool.BrokenPool`, so
    ``except`` clauses written for either catch it. ``__cause__`` says what happened
    (:class:`~ordpool.WorkerCrashed` with the exit code or signal, or
    :class:`~ordpool.WorkerInitError` with the initializer's remote traceback).
    """


# -- what the workers run ------------------------------------------------------------------------


# -- interpreter exit ----------------------------------------------------------------------------

_global_shutdown = False
_LIVE_CORES: weakref.WeakSet[_Core] = weakref.WeakSet()


def _python_exit() -> None:
    """At interpreter exit: refuse new work and let pending futures finish, like the stdlib.

    Registered with ``threading._register_atexit`` (as ``concurrent.futures.process`` does), so it
    runs before non-daemon threads are joined and before ``atexit`` handlers, among them the
    engine's, which kills whatever is still running. Lazily read ``map`` inputs stop where they
    are: their results can no longer be consumed.
    """
    global _global_shutdown
    _global_shutdown = True
    cores = list(_LIVE_CORES)
    for core in cores:
        core.shutdown(wait=False, cancel_futures=False, stop_maps=True)
    for core in cores:
        core.wait()


def _forget_after_fork() -> None:
    """A forked child (a ``fork`` worker among others) runs none of its parent's executors: it
    must not wait for them at its exit (``multiprocessing`` runs the threading exit hooks in
    its children, where those executors' threads do not exist)."""
    _LIVE_CORES.clear()


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]  # private, untyped
os.register_at_fork(after_in_child=_forget_after_fork)


# -- futures completed outside locks -------------------------------------------------------------

# Batches answered while this thread is inside a section that holds _Core._lock are queued here
# and completed once the section is left. The engine hands an answered batch to its callback from
# whichever thread next leaves an engine call (often the transport's thread, sometimes a caller of
# enqueue()); completing a future runs user callbacks, which must never run under our lock: one
# that waits for another thread's submit() would deadlock.
_tls = threading.local()


def _hold() -> list[Any] | None:
    """Start queueing answered batches in this thread; returns the queue if this call owns it."""
    if getattr(_tls, "held", None) is not None:
        return None
    held: list[Any] = []
    _tls.held = held
    return held


def _release(held: list[Any] | None) -> None:
    """Complete the batches queued since :func:`_hold` (only by the call that owns the queue)."""
    if held is None:
        return
    try:
        while held:
            core, batch = held.pop()
            core._complete(batch)
    finally:
        _tls.held = None


def _is_pool_failure(error: BaseException) -> bool:
    """The engine's own crash/broken report (not an exception raised by a task)."""
    return isinstance(error, (WorkerCrashed, BrokenPool)) and not isinstance(
        error.__cause__, RemoteTraceback
    )


def _failure_cause(error: BaseException) -> BaseException:
    """What broke the pool: the engine's ``BrokenPool`` chains it as its cause."""
    if isinstance(error, BrokenPool) and error.__cause__ is not None:
        return error.__cause__
    return error


def _caller_error(error: BaseException) -> BaseException:
    """The exception a future gets for a failed item.

    The engine reports an argument it could not pickle as ``PicklingError`` chained to the
    pickler's exception; the stdlib gives the future the pickler's exception itself
    (``TypeError: cannot pickle '_thread.lock' object``), so that one is unwrapped.
    """
    cause = error.__cause__
    if (
        type(error) is pickle.PicklingError
        and cause is not None
        and not isinstance(cause, RemoteTraceback)
    ):
        return cause
    if type(cause) is RemoteTraceback:
        # The worker's traceback as the stdlib chains it: code may test for that type.
        error.__cause__ = _stdlib_process._RemoteTraceback(cause.tb)  # type: ignore[arg-type]
    return error


class _ExecutorSupervision(Supervision):
    """The executor's contract on top of the engine's supervision.

    The engine would replace a worker that died; ``ProcessPoolExecutor`` instead breaks: so a
    death that is not a retirement (``max_tasks_per_child``) breaks the executor *before* the
    engine acts on it (the engine then finds itself terminated and restarts nothing). An
    initializer that raised was logged in its worker (:func:`run_logged_initializer`).
    """

    def __init__(self, core: _Core) -> None:
        self._core = core

    def worker_died(self, slot: int, crash: WorkerCrashed) -> None:
        self._core._break(crash)

    def broke(self, error: BaseException) -> None:
        self._core._break(error)


class _MapFeed:
    """The input side of one ``map`` call: keeps its feeder at most ``limit`` items ahead.

    The engine's feeder thread iterates :meth:`items` (or calls :meth:`room` per slice of a
    list); the consumer calls :meth:`consumed` once it has yielded a whole batch. ``allowed`` is
    how many items the feeder may have read in total: consumed + limit (``buffersize``), ``inf``
    once ``shutdown(wait=True)`` needs the whole input run, -1 once stopped. The feeder keeps its
    own copy and re-reads it under the lock only when it reaches it, so pacing costs a compare
    per item.
    """

    __slots__ = ("allowed", "cond", "limit", "stop")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.allowed: float = limit
        self.cond = threading.Condition(threading.Lock())
        self.stop: BaseException | None = None  # raised in the feeder: CancelledError, _Abandoned

    def items(self, source: Iterable[Any], untaken: list[Any]) -> Iterator[Any]:
        """The input, paced; raises ``stop`` once stopped (the engine ends the stream there).

        ``untaken`` is the stream's feed list: items read but not yet taken into a batch. Over
        its limit, the feeder still reads until the engine has taken the batch being filled,
        and waits then, between batches: paused mid-batch, it would leave a partial batch that
        the engine's flusher sends after ``max_delay``, many small batches instead of a few
        full ones. It never reads more than ``limit`` items over the limit.
        """
        limit = self.limit
        allowed = self.allowed
        for fed, item in enumerate(source):  # fed: items read before this one
            if fed >= allowed and (not untaken or fed >= allowed + limit or self.stop):
                allowed = self._room(fed)
            yield item

    def room(self, fed: int) -> int:
        """For a list input (:class:`~ordpool._engine.PacedSequence`): how many items the
        feeder, having read ``fed``, may read now, waiting for the consumer if it must. Once
        under the limit, it may read up to ``limit`` items past it (the engine takes at most a
        batch of them at a time): within the same 2 x ``limit`` bound as :meth:`items`."""
        allowed = self.allowed
        if fed >= allowed or self.stop is not None:
            allowed = self._room(fed)
        return max(1, int(min(allowed + self.limit - fed, 1 << 62)))

    def _room(self, fed: int) -> float:
        """Wait until the feeder, having read ``fed`` items, may read more; the new limit."""
        with self.cond:
            while self.stop is None and fed >= self.allowed:
                self.cond.wait()
            if self.stop is not None:
                raise self.stop
            return self.allowed

    def consumed(self, n: int) -> None:
        """The consumer took ``n`` items: the feeder may read ``n`` more."""
        with self.cond:
            if self.stop is None:
                self.allowed += n
                self.cond.notify()

    def unbound(self) -> None:
        """Let the feeder read the whole input (shutdown(wait=True) runs every item)."""
        with self.cond:
            if self.stop is None:
                self.allowed = math.inf
                self.cond.notify()

    def halt(self, exc: BaseException) -> None:
        """Read no more input: the feeder raises ``exc`` when it next checks its limit (the
        engine ends the stream there; closing or abandoning the stream stops it sooner)."""
        with self.cond:
            if self.stop is None:
                self.stop = exc
                self.allowed = -1
                self.cond.notify()


class _Abandoned(Exception):
    """Stops the feeder of a ``map`` whose consumer went away (never seen by the user)."""


class _Core:
    """Everything an executor runs, with no reference back to the executor object.

    The engine's threads hold the core (through ``_ExecutorSupervision`` and the stream's
    callback), never the executor, so the executor can be garbage-collected while work is in
    flight; its finalizer then shuts the core down and the workers exit, as the stdlib's do.
    """

    def __init__(
        self,
        workers: int,
        ctx: Any,
        initializer: Callable[..., Any] | None,
        initargs: tuple[Any, ...],
        max_tasks: int | None,
    ) -> None:
        # One lock for the state below (the stdlib's _shutdown_lock). Reentrant: a future's
        # callback may call submit() in a thread that is completing futures.
        self._lock = threading.RLock()
        self.workers = workers
        self._ctx = ctx
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._max_tasks = max_tasks
        self.cap = 2 * workers + 1  # submit items in the engine at most (5)
        self.window = default_window(workers)  # a map's items in flight by default (16384)
        self.engine: Engine | None = None  # created on the first submit/map
        self._stream: IndexedStream | None = None  # the submit stream, once workers are READY
        self._starter: threading.Thread | None = None  # starts the workers in the background
        self._started = threading.Event()  # the starter is done (running or broken)
        self._running = False  # the submit stream is open: items may go to the engine
        self._closed = False  # engine.close() was called (or is about to be)
        self.shut = False  # shutdown() was called, or the pool broke
        self.broken: str | None = None  # the stdlib's _broken message once broken
        self._broken_cause: BaseException | None = None  # WorkerCrashed, WorkerInitError...
        self._broken_error: BrokenProcessPool | None = None  # what pending futures got
        self._queue: deque[tuple[int, Future[Any], tuple[Any, ...]]] = deque()  # PENDING
        # RUNNING futures whose items wait for the workers to start: the stdlib's executor
        # moves the first calls to its call queue at once, so shutdown(cancel_futures=True)
        # cancels only the calls after them (1: (17, (fn, args, kwargs))).
        self._starting: deque[tuple[int, tuple[Any, ...]]] = deque()
        self._futures: dict[int, Future[Any]] = {}  # index -> RUNNING future ({17: <Future>})
        self._next_index = 0  # index of the next submit (the engine wants them increasing)
        self._maps: set[_MapFeed] = set()  # the feeds of live map() calls
        # Feeds still reading their input. engine.close() stops an imap's intake, so the engine
        # is closed only once these are done: after shutdown, a live map still runs all of its
        # input, as the stdlib's map, which had submitted all of it.
        self._feeding: set[_MapFeed] = set()

    # -- submit --------------------------------------------------------------------------------

    def check_open(self) -> None:
        """Raise as the stdlib's submit does when no new work is taken (under the lock)."""
        if self.broken is not None:
            raise BrokenProcessPool(self.broken) from self._broken_cause
        if _global_shutdown:
            raise RuntimeError(_AFTER_EXIT)
        if self.shut:
            raise RuntimeError(_AFTER_SHUTDOWN)

    def submit(self, item: tuple[Any, ...]) -> Future[Any]:
        held = _hold()
        try:
            with self._lock:
                self.check_open()
                if self.engine is None:
                    self._start()
                future: Future[Any] = JobFuture(self._engine_now)
                index = self._next_index
                self._next_index = index + 1
                if not self._queue and len(self._futures) < self.cap:
                    future.set_running_or_notify_cancel()
                    self._futures[index] = future
                    if not self._running or self._starting:  # (in index order, after those)
                        self._starting.append((index, item))  # _pump hands it over
                        return future
                    try:
                        self._enqueue(index, item)
                    except (BrokenPool, PoolClosed):
                        pass  # it broke meanwhile: _break() fails the future
                else:
                    self._queue.append((index, future, item))
            return future
        finally:
            _release(held)

    def _pump(self) -> None:
        """Hand queued items to the engine while fewer than ``cap`` are in it; close the engine
        once shut down and nothing is queued."""
        close = False
        held = _hold()
        try:
            with self._lock:
                if not self._running:
                    return
                queue, futures, cap = self._queue, self._futures, self.cap
                try:
                    while self._starting:
                        self._enqueue(*self._starting.popleft())
                except (BrokenPool, PoolClosed):
                    return  # it broke meanwhile: _break() fails the futures
                while queue and len(futures) < cap:
                    index, future, item = queue.popleft()
                    if not future.set_running_or_notify_cancel():
                        continue  # cancelled while it waited: drop it, as the stdlib does
                    futures[index] = future
                    try:
                        self._enqueue(index, item)
                    except (BrokenPool, PoolClosed):
                        break  # it broke meanwhile: _break() fails the futures
                close = self._close_due_locked()
        finally:
            _release(held)
        if close:
            self._close_engine()  # outside the lock: it may join threads

    def _enqueue(self, index: int, item: tuple[Any, ...]) -> None:
        """Hand a RUNNING future's item to the engine (lock held; the stream is open)."""
        assert self.engine is not None and self._stream is not None
        self.engine.intake.enqueue(self._stream, index, item, None, None)

    def _engine_now(self) -> Engine | None:
        return self.engine

    def _close_due_locked(self) -> bool:
        """Whether to close the engine now: shut down, and nothing left to hand to it."""
        if self.shut and self._running and not self._closed and not self._queue:
            if self._starting:
                return False  # _pump hands these over first
            if self._feeding:
                return False
            self._closed = True
            return True
        return False

    def _close_engine(self) -> None:
        engine = self.engine
        assert engine is not None  # closing is due only once it runs
        engine.close()

    def _maybe_close(self) -> None:
        with self._lock:
            close = self._close_due_locked()
        if close:
            self._close_engine()

    def _on_batch(self, batch: Batch) -> None:
        """The engine's callback for an answered submit batch (any thread, no engine lock)."""
        held = getattr(_tls, "held", None)
        if held is not None:
            held.append((self, batch))  # this thread is inside a section: complete it after
            return
        _tls.held = held = [(self, batch)]
        _release(held)

    def _on_send(self, task: Task) -> None:
        """A submit task goes to a worker (engine lock held): remember where each future runs,
        for the cooperative cancellation of a running call."""
        bind_futures(task, self._futures, start=False)

    def _complete(self, batch: Batch) -> None:
        """Complete the futures of an answered batch (never under a lock)."""
        # Items a worker could not unpickle, results that cannot be unpickled here: the
        # stdlib's executor breaks on these (its queues are then in an unknown state).
        causes: list[BaseException] = []
        values, errors = decode(batch, failures=causes)
        undecoded = {id(cause) for cause in causes}
        with self._lock:
            pop = self._futures.pop
            futures = [pop(index, None) for index in batch.indices]

        def error_for(error: BaseException) -> BaseException | None:
            if id(error) in undecoded:
                return None  # failed with the pool's error, below
            if _is_pool_failure(error):
                causes.append(_failure_cause(error))
                return None
            return _caller_error(error)

        lost = complete_futures(futures, values, errors, error_for)
        if causes:
            self._break(causes[-1], lost)
            return
        if self._queue or (self.shut and not self._closed):
            self._pump()

    # -- map -----------------------------------------------------------------------------------

    def map(
        self, source: Iterable[Any], end_time: float | None, limit: int | None, call: bytes = b""
    ) -> Iterator[Any]:
        with self._lock:
            self.check_open()
            if self.engine is None:
                self._start()
        self._started.wait()
        feed = _MapFeed(limit or self.window)
        engine = self.engine
        assert engine is not None
        with self._lock:
            if self.broken is not None:
                return _fail_later(self._new_broken_error())
            try:
                stream = engine.open_stream(NumberedStream(call=call))
            except (BrokenPool, PoolClosed):
                if self.broken is not None:
                    return _fail_later(self._new_broken_error())
                raise RuntimeError(_AFTER_SHUTDOWN) from None
            self._maps.add(feed)
            self._feeding.add(feed)
        return _MapCall(self, engine, stream, feed, end_time).start(source)

    # -- lifecycle -----------------------------------------------------------------------------

    def _start(self) -> None:
        """Create the engine and start its workers in the background (under the lock)."""
        if self._initializer is None:
            spec, inherited = process_spec(invoke, None, (), self._max_tasks)
        else:
            # (the initializer's arguments one by one: a multiprocessing.Queue among them
            # travels with the worker's process arguments, see process_spec)
            spec, inherited = process_spec(
                invoke_after_init,
                run_logged_initializer,
                (self._initializer, *self._initargs),
                self._max_tasks,
            )
        ctx = self._ctx

        def transport(events: TransportEvents) -> ProcessTransport:
            return ProcessTransport(ctx, spec, events, early_after=MAX_DELAY, inherited=inherited)

        exact = self._max_tasks is not None  # count tasks per worker exactly: one item a task
        engine = Engine(
            transport,
            workers=self.workers,
            window=_UNBOUNDED,
            batch_size=1 if exact else None,
            max_delay=MAX_DELAY,
            retries=0,
            # One submit job per worker: a queued job goes to whichever worker frees up first,
            # as with the stdlib's shared call queue (a second job in a worker's pipe would
            # wait behind a long one while another worker idles). A map's batches may be two
            # per worker, so that a worker has the next at hand when it finishes one (with
            # one, a map over `transform` ran at 0.86x `imap`'s throughput side by side).
            depth=1,
            stream_depth=2,
            supervision=_ExecutorSupervision(self),
            # Batches of a map hold a few per worker within its window; the first batch is one
            # item, so a burst of long tasks is not bundled before their cost is measured.
            first_batch=1,
            max_batch=max(1, self.window // (2 * self.workers)),
        )
        self.engine = engine
        _LIVE_CORES.add(self)
        self._starter = threading.Thread(
            target=self._run_start, name="ordpool-executor-start", daemon=True
        )
        self._starter.start()

    def _run_start(self) -> None:
        engine = self.engine
        assert engine is not None
        try:
            engine.start(None, raise_init_error=False)
            if engine.state is PoolState.BROKEN:
                cause = engine.broken_error or WorkerInitError("the workers could not start")
                self._break(cause)
                return
            try:
                stream = engine.open_stream(IndexedStream(on_batch=self._on_batch))
            except (BrokenPool, PoolClosed) as exc:
                self._break(_failure_cause(exc))
                return
            stream.on_send = self._on_send
            with self._lock:
                self._stream = stream
                self._running = self.broken is None
            self._started.set()  # before _pump: a callback run there may call map()
            self._pump()
        except BaseException as exc:  # a start failure breaks the executor
            self._break(exc)
        finally:
            self._started.set()

    def _new_broken_error(self) -> BrokenProcessPool:
        error = BrokenProcessPool(_BROKEN_FUTURE)
        error.__cause__ = self._broken_cause
        return error

    def _break(self, cause: BaseException, lost: Iterable[Future[Any]] = ()) -> None:
        """A worker died (or could not start): fail every pending future, refuse new work and
        stop the workers, as the stdlib's ``terminate_broken`` does. Idempotent."""
        with self._lock:
            futures = list(lost)
            maps: list[_MapFeed] = []
            if self.broken is None:
                self.broken = _BROKEN
                self._broken_cause = cause
                self._broken_error = self._new_broken_error()
                self.shut = True
                self._running = False
                futures.extend(self._futures.values())
                futures.extend(future for _, future, _ in self._queue)
                self._futures.clear()
                self._queue.clear()
                self._starting.clear()
                maps = list(self._maps)
            error = self._broken_error
        for feed in maps:
            feed.halt(_Abandoned())
        if self.engine is not None:
            self.engine.terminate()
        for future in futures:
            try:
                future.set_exception(error)
            except InvalidStateError:
                pass  # cancelled meanwhile

    def force_shutdown(self, sig: int) -> None:
        """``terminate_workers()`` / ``kill_workers()``: shut down without waiting, pending
        futures cancelled, then send ``sig`` to every live worker. A future whose call was
        running then fails with ``BrokenProcessPool``, as with the stdlib (3.14)."""
        engine = self.engine
        if engine is not None:
            self._wait_spawned(engine)  # workers still starting are signalled too
        pids = engine.worker_pids() if engine is not None else []
        self.shutdown(wait=False, cancel_futures=True)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass  # it had exited already

    def _wait_spawned(self, engine: Engine, timeout: float = 10.0) -> None:
        """Wait until every worker process exists (not until its initializer has run: that
        may hang), or the start ended, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while not self._started.is_set() and time.monotonic() < deadline:
            if len(engine.worker_pids()) >= self.workers:
                return
            self._started.wait(0.01)

    def shutdown(self, wait: bool, cancel_futures: bool, *, stop_maps: bool = False) -> None:
        """The stdlib's shutdown; ``stop_maps`` (interpreter exit) stops lazily read inputs."""
        with self._lock:
            self.shut = True
            cancelled: list[Future[Any]] = []
            if cancel_futures:
                cancelled = [future for _, future, _ in self._queue]
                self._queue.clear()
            maps = list(self._maps)
            if cancel_futures or stop_maps:
                self._feeding.clear()  # their inputs stop: close() ends their intake
            close = self._close_due_locked()
        for future in cancelled:
            if future.cancel():
                future.set_running_or_notify_cancel()  # wake wait()/as_completed() on it
        for feed in maps:
            if cancel_futures or stop_maps:
                feed.halt(CancelledError())
            elif wait:
                # The stdlib's map submitted its whole input, and shutdown waits for all of it:
                # run the rest of the input now; its results wait for the consumer.
                feed.unbound()
        if close:
            self._close_engine()
        if wait:
            self.wait()

    def wait(self) -> None:
        """Wait until every pending future is done and the workers have exited."""
        if threading.current_thread().name.startswith("ordpool-") or getattr(_tls, "held", None):
            # Called from a future's callback, in one of our threads or in a thread completing
            # futures: waiting would wait for this very thread (the stdlib's manager thread,
            # where its callbacks run, would fail to join itself).
            return
        with self._lock:
            pending = [*self._futures.values(), *(future for _, future, _ in self._queue)]
        starter, engine = self._starter, self.engine
        if starter is not None:
            starter.join()
        if engine is None:
            return
        engine.join()
        if engine.state is not PoolState.CLOSED and self.broken is None:
            self._break(PoolClosed("the workers were terminated"))
        _wait_futures(pending)

    def state(self) -> str:
        if self.broken is not None:
            return "broken"
        if self.engine is None:
            return "shutdown" if self.shut else "idle"
        if self.shut:
            return "shutdown" if self.engine.state is PoolState.CLOSED else "shutting down"
        return self.engine.state.value


class _MapCall:
    """One ``map`` call of an executor: its stream, its feeder thread and its results."""

    def __init__(
        self,
        core: _Core,
        engine: Engine,
        stream: NumberedStream,
        feed: _MapFeed,
        end_time: float | None,
    ) -> None:
        self.core = core
        self.engine = engine
        self.stream = stream
        self.feed = feed
        self.end_time = end_time  # time.monotonic() by which the map must end, or None

    def start(self, source: Iterable[Any]) -> Iterator[Any]:
        """Start the feeder over ``source``; the map's iterator."""
        feeder = threading.Thread(
            target=self._feed, args=(source,), name="ordpool-executor-map-feeder", daemon=True
        )
        feeder.start()
        results = self._results()
        next(results)  # started: dropping the iterator now runs its finally (releases the stream)
        return itertools.chain.from_iterable(map(_handed_out, results))

    def _feed(self, source: Iterable[Any]) -> None:
        """Body of the map's feeder thread."""
        core, engine, stream, feed = self.core, self.engine, self.stream, self.feed
        paced: Iterable[Any] | PacedSequence
        if isinstance(source, (list, tuple)):
            paced = PacedSequence(source, feed.room)  # by slices, in C
        else:
            paced = feed.items(source, stream.feed)
        try:
            Feeder(engine, stream).run(paced)
        finally:
            with core._lock:
                core._feeding.discard(feed)
            core._maybe_close()

    def _results(self) -> Iterator[Iterable[Any]]:
        """The map's values, an iterable per batch, in order; ``[]`` first (see :meth:`start`)."""
        core, engine, stream, feed = self.core, self.engine, self.stream, self.feed
        try:
            yield []
            taken = 0  # items of the batch handed out last
            while True:
                if taken:
                    # Resumed: the previous batch has been yielded in full, so the feeder may
                    # read that many more (buffersize counts results yielded, as the stdlib's).
                    feed.consumed(taken)
                    taken = 0
                batch = self._next_batch()
                if batch is None:
                    return
                taken = len(batch)
                # map ends at its first error, as the stdlib's does (a chunk that cannot be
                # unpickled raises at its first position: its good values are not yielded)
                yield from batch_values(batch, self._error)
        finally:
            feed.halt(_Abandoned())
            with core._lock:
                core._maps.discard(feed)
                core._feeding.discard(feed)
            engine.release_stream(stream)
            core._maybe_close()

    def _next_batch(self) -> Batch | None:
        """The map's next batch; its end, the pool's failures and shutdown as the stdlib's."""
        core, end_time = self.core, self.end_time
        timeout = None if end_time is None else end_time - time.monotonic()
        try:
            return self.engine.delivery.next_batch(self.stream, timeout)
        except (BrokenPool, PoolClosed) as exc:
            if isinstance(exc, BrokenPool):
                core._break(_failure_cause(exc))
            if core.broken is not None:
                raise core._new_broken_error() from None
            if isinstance(self.feed.stop, CancelledError):
                raise CancelledError() from None  # shutdown(cancel_futures=True)
            raise

    def _error(self, pos: int, error: BaseException) -> Any:
        """An item failed: the map raises there (a pool failure, or a result that cannot be
        unpickled here, breaks the executor)."""
        if isinstance(error, _wire.UnpicklingResultError):
            self.core._break(error)
            raise self.core._new_broken_error()
        if _is_pool_failure(error):
            self.core._break(_failure_cause(error))
            raise self.core._new_broken_error()
        raise _caller_error(error)


class _ProcessView:
    """A worker's ``multiprocessing.Process`` as ``_processes`` lists it: joining or signalling
    it once the pool has reaped and closed it is a no-op instead of a ``ValueError``."""

    def __init__(self, process: Any) -> None:
        self._process = process
        self.pid: int = process.pid

    def join(self, timeout: float | None = None) -> None:
        try:
            self._process.join(timeout)
        except ValueError:
            pass  # closed: the pool joined it already

    def is_alive(self) -> bool:
        try:
            return bool(self._process.is_alive())
        except ValueError:
            return False

    @property
    def exitcode(self) -> int | None:
        try:
            code: int | None = self._process.exitcode
        except ValueError:
            return None
        return code

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.is_alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class _Finish:
    """Waits for an executor's engine to end (its workers exited, its threads done): what
    joining the stdlib's private manager thread or call queue waits for. Holds the core, not
    the executor, so that the executor can still be collected."""

    def __init__(self, core: _Core) -> None:
        self._core = core

    def join(self, timeout: float | None = None) -> None:
        core = self._core
        deadline = Deadline(timeout)
        if core._starter is not None:
            core._starter.join(deadline.remaining())
        if core.engine is not None:
            core.engine.join(deadline.remaining())

    def join_thread(self) -> None:
        self.join()

    def is_alive(self) -> bool:
        engine = self._core.engine
        return engine is not None and engine.state not in ENDED


def _handed_out(values: Iterable[Any]) -> Iterable[Any]:
    """A list of a map's values as an iterator that lets go of each value as it yields it,
    so that a value the caller dropped is freed at once, as with the stdlib's ``map``
    (whose iterator pops each future). Runs in C: ``list.pop`` on the reversed list (about
    20 ns a value more than iterating the list)."""
    if type(values) is not list:
        return values  # an Interrupted (a KeyboardInterrupt to raise), or empty
    values.reverse()
    return map(values.pop, itertools.repeat(-1, len(values)))


def _fail_later(error: BaseException) -> Iterator[Any]:
    """An iterator that raises ``error`` when iterated (a future that failed, for map)."""
    raise error
    yield  # pragma: no cover - makes this a generator


def _collected(core: _Core) -> None:
    """weakref.finalize callback of an executor: shut its core down, off this thread.

    A finalizer can run in any thread, in the middle of any code (the cyclic GC), possibly while
    that thread holds the engine's lock; shutting down from a fresh thread never deadlocks.
    """
    try:
        threading.Thread(
            target=core.shutdown, args=(False, False), name="ordpool-executor-gc", daemon=True
        ).start()
    except RuntimeError:  # interpreter shutdown: threads can no longer start
        core.shutdown(False, False)


class OrderedProcessPoolExecutor(Executor):
    """A ``concurrent.futures.ProcessPoolExecutor`` that batches over the ordpool engine.

    Drop-in: the same constructor, methods, futures and failures as the standard library's
    ``ProcessPoolExecutor`` (Python 3.11 to 3.13), with a faster ``map``: it never creates a
    future per item, batches items whatever ``chunksize`` says, and reads its input lazily
    (at most ``buffersize`` items in flight), so an endless iterable works.

    Args:
        max_workers: The maximum number of processes that can be used to execute the given
            calls. If None or not given then as many worker processes will be created as the
            machine has processors.
        mp_context: A multiprocessing context to launch the workers created using the
            multiprocessing.get_context('start method') API. When not given: the default
            context, or 'spawn' when ``max_tasks_per_child`` is given.
        initializer: A callable used to initialize worker processes. It may fill
            :func:`ordpool.worker_local`, which every task run by that worker can read.
        initargs: A tuple of arguments to pass to the initializer.
        max_tasks_per_child: The maximum number of tasks a worker process can complete before
            it will exit and be replaced with a fresh worker process. The default of None means
            worker process will live as long as the executor. Requires a non-'fork' mp_context
            start method.

    Raises:
        ValueError: ``max_workers`` <= 0, ``max_tasks_per_child`` < 1, or
            ``max_tasks_per_child`` with the 'fork' start method.
        TypeError: ``initializer`` is not callable or ``max_tasks_per_child`` is not an int.

    Examples:
        >>> from ordpool._executor import OrderedProcessPoolExecutor
        >>> with OrderedProcessPoolExecutor(max_workers=2) as executor:
        ...     future = executor.submit(pow, 2, 10)
        ...     squares = list(executor.map(abs, [-1, 2, -3]))
        >>> future.result(), squares
        (1024, [1, 2, 3])
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
    ) -> None:
        check_limits = getattr(_stdlib_process, "_check_system_limits", None)
        if check_limits is not None:
            check_limits()
        if max_workers is None:
            cpu_count = getattr(os, "process_cpu_count", os.cpu_count)  # 3.13: affinity-aware
            self._max_workers = cpu_count() or 1
        else:
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            self._max_workers = max_workers
        if mp_context is None:
            if max_tasks_per_child is not None:
                mp_context = mp.get_context("spawn")
            else:
                mp_context = mp.get_context()
        self._mp_context = mp_context
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._initializer = initializer
        self._initargs = initargs
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            elif max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
            if self._mp_context.get_start_method(allow_none=False) == "fork":
                raise ValueError(
                    "max_tasks_per_child is incompatible with"
                    " the 'fork' multiprocessing start method;"
                    " supply a different mp_context."
                )
        self._max_tasks_per_child = max_tasks_per_child
        self._core = _Core(
            self._max_workers, mp_context, initializer, initargs, max_tasks_per_child
        )
        # Workers exit when the executor is garbage-collected (pending futures still finish).
        self._finalizer = weakref.finalize(self, _collected, self._core)
        self._finalizer.atexit = False  # at exit, _python_exit does it

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Submits a callable to be executed with the given arguments.

        Schedules the callable to be executed as fn(*args, **kwargs) and returns
        a Future instance representing the execution of the callable.

        The call waits in the executor (the future is PENDING and can be cancelled) until fewer
        than ``2 * max_workers + 1`` calls are with the workers, as with the stdlib. It never
        blocks: the workers are started in the background by the first call.

        Returns:
            A Future representing the given call.

        Raises:
            BrokenProcessPool: a worker died or an initializer failed.
            RuntimeError: after :meth:`shutdown`, or at interpreter exit.
        """
        return self._core.submit((fn, args, kwargs))

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[Any]:
        """Returns an iterator equivalent to map(fn, iter).

        Unlike the stdlib's, no future is created per call: the calls travel to the workers in
        batches sized by their measured cost, and come back in order. The input is read lazily
        by a background thread, at most ``buffersize`` items ahead of the results consumed (plus
        up to ``buffersize`` more, to finish the batch it is filling), so an endless iterable
        works.

        Args:
            fn: A callable that will take as many arguments as there are
                passed iterables.
            timeout: The maximum number of seconds to wait. If None, then there
                is no limit on the wait time. Measured from the call to map.
            chunksize: Accepted for compatibility (must be >= 1); batching is automatic.
            buffersize: How many items may be read from the input ahead of the results
                yielded (3.14's argument; at most twice that, to finish a batch); None:
                ``max(16384, 2048 * max_workers)``.

        Returns:
            An iterator equivalent to: map(func, *iterables) but the calls may
            be evaluated out-of-order.

        Raises:
            TimeoutError: If the entire result iterator could not be generated
                before the given timeout.
            Exception: If fn(*args) raises for any values (when its position is reached; the
                rest of the input is abandoned).
            BrokenProcessPool: a worker died or an initializer failed.
            RuntimeError: after :meth:`shutdown`, or at interpreter exit.
            ValueError: ``chunksize`` < 1 or ``buffersize`` < 1.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None:
            if not isinstance(buffersize, int):
                raise TypeError("buffersize must be an integer or None")
            if buffersize < 1:
                raise ValueError("buffersize must be None or > 0")
        end_time = None if timeout is None else timeout + time.monotonic()
        source: Iterable[Any]
        # The function travels once per task in the task's header (the stream's callable,
        # cached by the workers) and the items alone go over the wire: bytes items keep the
        # zero-copy path and nothing is pickled per item for the function's sake.
        try:
            call = _wire.dumps(fn if len(iterables) == 1 else functools.partial(star, fn))
        except Exception:
            call = b""  # fn cannot be pickled: each item fails with that error, as in the stdlib
        if call:
            if len(iterables) != 1:
                source = zip(*iterables)
            elif isinstance(iterables[0], (list, tuple)):
                source = iterables[0]  # fed by slices
            else:
                source = iter(iterables[0])
        else:  # (fn, args, None) jobs: each fails with the pickling error, at its position
            source = zip(itertools.repeat(fn), zip(*iterables), itertools.repeat(None))
        return self._core.map(source, end_time, buffersize, call)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Clean-up the resources associated with the Executor.

        It is safe to call this method several times. Otherwise, no other
        methods can be called after this one.

        Args:
            wait: If True then shutdown will not return until all running
                futures have finished executing and the resources used by the
                executor have been reclaimed. A ``map`` iterator that is still alive then
                runs the rest of its input (its results stay readable), as the stdlib's map
                had submitted all of it.
            cancel_futures: If True then shutdown will cancel all pending
                futures. Futures that are completed or running will not be
                cancelled. A live ``map`` stops reading its input and raises
                ``CancelledError`` after the results of the items already read.
        """
        self._core.shutdown(wait, cancel_futures)

    def terminate_workers(self) -> None:
        """Attempts to terminate all living worker processes immediately by calling
        ``Process.terminate()`` on each of them. Internally, it will also call
        :meth:`shutdown` to ensure that all other resources associated with the executor are
        freed. After calling this method the caller should no longer submit tasks to the
        executor.

        As in Python 3.14 (on every supported Python here): pending futures are cancelled, and
        a future whose call was running fails with :class:`BrokenProcessPool`.
        """
        self._core.force_shutdown(signal.SIGTERM)

    def kill_workers(self) -> None:
        """Attempts to kill all living worker processes immediately by calling
        ``Process.kill()`` on each of them. Internally, it will also call :meth:`shutdown` to
        ensure that all other resources associated with the executor are freed. After calling
        this method the caller should no longer submit tasks to the executor.

        As :meth:`terminate_workers`, with ``SIGKILL``: a worker cannot ignore it.
        """
        self._core.force_shutdown(signal.SIGKILL)

    def stats(self) -> PoolStats:
        """A frozen snapshot of the executor's engine (see :class:`~ordpool.PoolStats`); all
        zeros before the workers start (on the first ``submit`` or ``map``)."""
        engine = self._core.engine
        if engine is None:
            return PoolStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ())
        return engine.stats()

    # -- CPython's private attributes that code and tests written against it use -----------

    @property
    def _processes(self) -> dict[int, Any]:
        """The live worker processes, ``{pid: multiprocessing.Process}``, once started (the
        stdlib's private attribute of that name; empty before the first ``submit``/``map``)."""
        core = self._core
        if core.engine is None:
            return {}
        core._wait_spawned(core.engine)
        transport = core.engine.transport
        if not isinstance(transport, ProcessTransport):
            return {}
        return {pid: _ProcessView(p) for pid, p in transport.processes().items()}

    @property
    def _executor_manager_thread(self) -> _Finish | None:
        """Joins once the workers have exited after a shutdown, as the stdlib's manager thread
        of that name does; ``None`` before the first ``submit``/``map``."""
        return None if self._core.engine is None else _Finish(self._core)

    @property
    def _call_queue(self) -> _Finish:
        """The stdlib's private call queue, for code that waits on it: ``join_thread()``
        returns once the workers have exited after a shutdown."""
        return _Finish(self._core)

    @property
    def _broken(self) -> str | bool:
        """The stdlib's private flag: False, or the message of the failure."""
        return self._core.broken or False

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} state={self._core.state()} max_workers={self._max_workers}"
            f" start_method={self._mp_context.get_start_method(allow_none=False)}>"
        )
