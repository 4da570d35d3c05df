"""``KeyedPool``: per-key serial jobs on worker processes, and the library-wide default pool.

    submit(key, fn, *args) --FNV-1a(key) % workers--> that slot's queue (bounded, blocking)
        -> engine keyed callback stream: the job is an item pinned to the key's slot; the
           engine batches jobs of busy workers and queues each stream's batches in order
        -> worker: invoke((fn, args, kwargs)) one job at a time, in order
        -> on_batch (engine thread): complete each job's Future

Same key: one worker, one job at a time, submission order (a worker runs its tasks in the
order they were queued, and the engine queues them in submission order). Different keys: any
two keys on different slots run in parallel. A job's Future turns RUNNING when its batch is
handed to the worker; until then ``cancel()`` succeeds and the job is skipped. Cancelling a
running job sets its cooperative token (``ordpool.cancelled()``) and returns False.
"""

from __future__ import annotations

import atexit
import enum
import multiprocessing
import threading
from concurrent.futures import Future
from typing import Any, Callable

from ._core.batching import Batch, Task
from ._core.defaults import MAX_DELAY, Deadline, usable_cores
from ._core.errors import OrdpoolError, PoolClosed
from ._core.routing import KeyRouter
from ._core.stats import PoolStats
from ._core.streams import IndexedStream
from ._engine import Engine
from ._engine.decoding import decode
from ._engine.futures import JobFuture, bind_futures, complete_futures
from ._transport.base import TransportEvents
from ._transport.process import ProcessTransport
from ._transport.worker import invoke, invoke_after_init, process_spec, run_initializer

__all__ = ["KeyedPool", "QueueFull", "default_pool", "submit"]


class QueueFull(OrdpoolError):
    """``submit(..., block=False)`` (or with a ``timeout``) found the key's worker queue full."""


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class KeyedPool:
    """Worker processes that run jobs one at a time per key, in submission order.

    Jobs with the same key always run on the same worker process (so they see that worker's
    ``ordpool.worker_local()`` state), one at a time, in the order they were submitted. Jobs
    with different keys may run in parallel. Keys (``str``, ``bytes``, ``int``) are routed by a
    stable FNV-1a hash: the same key goes to the same slot in every process and run.

    Args:
        workers: number of worker processes; default: the cores this process may use.
        queue_size: jobs a worker may have queued or running; ``submit`` blocks beyond that.
        grace: seconds ``stop()`` waits for running jobs (after asking them to stop) before it
            kills their workers.
        start_method: ``"fork"``, ``"spawn"`` or ``"forkserver"``; default: the platform's.
        initializer: called once in each worker as ``initializer(*initargs)``, e.g. to fill
            ``ordpool.worker_local()``.
        initargs: arguments for ``initializer``.
        max_delay: seconds a job waits to be batched with others while every worker is busy.

    Examples:
        >>> import ordpool
        >>> with ordpool.KeyedPool(2) as pool:
        ...     futures = [pool.submit("user-1", pow, 2, n) for n in range(4)]
        ...     [f.result() for f in futures]
        [1, 2, 4, 8]
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        queue_size: int = 100,
        grace: float = 5.0,
        start_method: str | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_delay: float = MAX_DELAY,
    ) -> None:
        workers = usable_cores() if workers is None else workers
        for name, value in (("workers", workers), ("queue_size", queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if grace < 0:
            raise ValueError(f"grace must be >= 0, got {grace!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._workers = workers
        self._queue_size = queue_size
        self._grace = grace
        self._ctx = multiprocessing.get_context(start_method)
        if initializer is None:
            self._spec, self._inherited = process_spec(invoke)
        else:
            self._spec, self._inherited = process_spec(
                invoke_after_init, run_initializer, (initializer, *initargs)
            )
        self._max_delay = max_delay
        self._lock = threading.Lock()  # guards _state, _queued and _futures
        self._space = threading.Condition(self._lock)  # submitters wait for room in a queue
        self._submit_lock = threading.Lock()  # keeps indices in submission order
        self._state = _State.NEW
        self._route = KeyRouter(workers)
        self._queued = [0] * workers  # jobs per slot submitted and not yet answered ([3, 100])
        self._futures: dict[int, JobFuture] = {}  # index -> future of a job not yet answered
        self._next_index = 0
        self._engine: Engine | None = None
        self._stream: IndexedStream | None = None

    @property
    def num_workers(self) -> int:
        """Number of worker processes."""
        return self._workers

    def slot_of(self, key: str | bytes | int) -> int:
        """The worker slot ``key`` is routed to (``fnv1a(key) % num_workers``)."""
        return self._route(key)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> KeyedPool:
        """Start the workers. Calling it again is harmless; after ``stop()`` it raises.

        Raises:
            WorkerInitError: ``initializer`` raised in a worker.
            PoolClosed: the pool was stopped.
        """
        with self._lock:
            if self._state is _State.RUNNING:
                return self
            if self._state is not _State.NEW:
                raise PoolClosed("this KeyedPool was stopped; create a new one")
            ctx, spec, inherited = self._ctx, self._spec, self._inherited

            def transport(events: TransportEvents) -> ProcessTransport:
                return ProcessTransport(ctx, spec, events, inherited=inherited)

            engine = Engine(
                transport,
                workers=self._workers,
                window=max(16384, 2 * self._queue_size * self._workers),
                batch_size=None,
                max_delay=self._max_delay,
                retries=0,
                # One task per worker at a time: queued jobs stay in the parent, where they
                # can still be cancelled, and are batched together while the worker is busy.
                depth=1,
            )
            engine.start(None)
            stream = engine.open_stream(IndexedStream(keyed=True, on_batch=self._on_batch))
            stream.on_send = self._on_send
            self._engine, self._stream = engine, stream
            self._state = _State.RUNNING
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop: refuse new jobs, cancel queued ones, ask running ones to stop, wait up to
        ``grace`` seconds (default: the pool's), then kill what is left. Idempotent.

        Futures of queued jobs end cancelled; a running job that returns in time completes its
        future normally; one that is killed fails with :class:`~ordpool.PoolClosed`.
        """
        grace = self._grace if grace is None else grace
        with self._lock:
            if self._state is not _State.RUNNING:
                if self._state is _State.NEW:
                    self._state = _State.STOPPED
                return
            self._state = _State.STOPPING
            self._space.notify_all()
            futures = list(self._futures.values())
        engine = self._engine
        assert engine is not None
        for future in futures:
            Future.cancel(future)  # succeeds for jobs not yet handed to a worker
        engine.transport.cancel_all()  # running jobs: ordpool.cancelled() is now True
        engine.close()
        if not engine.join(grace):
            engine.terminate()
        with self._lock:
            self._state = _State.STOPPED
            left = list(self._futures.values())
            self._futures.clear()
        for future in left:
            if not future.done():
                future.set_exception(PoolClosed("the pool was stopped before this job finished"))

    def __enter__(self) -> KeyedPool:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<KeyedPool state={self._state.value} workers={self._workers}>"

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None and getattr(self, "_state", None) is _State.RUNNING:
            engine.terminate()

    # -- jobs ----------------------------------------------------------------------------------

    def submit(
        self,
        key: str | bytes | int,
        fn: Callable[..., Any],
        /,
        *args: Any,
        block: bool = True,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Future[Any]:
        """Schedule ``fn(*args, **kwargs)`` on the worker of ``key``; returns its Future.

        ``block`` and ``timeout`` are this method's own keywords (wrap ``fn`` with
        ``functools.partial`` to pass arguments of those names).

        Args:
            key: the job's key (``str``, ``bytes`` or ``int``).
            fn: a picklable callable (cloudpickle: lambdas and closures work).
            block: wait while the key's worker queue is full; ``False`` raises ``QueueFull``.
            timeout: with ``block``, seconds to wait before raising ``QueueFull``.

        Raises:
            QueueFull: the queue stayed full (``block=False``, or ``timeout`` passed).
            PoolClosed: the pool is not running (call ``start()`` or use ``with``).
            TypeError: ``key`` is not str, bytes or int.
        """
        slot = self._route(key)
        deadline = Deadline(timeout)
        with self._space:
            self._check_running()
            while self._queued[slot] >= self._queue_size:
                if not block:
                    raise QueueFull(f"the queue of worker {slot} (key {key!r}) is full")
                remaining = deadline.remaining()
                if remaining is not None and remaining <= 0:
                    raise QueueFull(f"the queue of worker {slot} stayed full for {timeout} s")
                self._space.wait(remaining)
                self._check_running()
            self._queued[slot] += 1
        future = JobFuture(self._engine_now, slot)
        engine, stream = self._engine, self._stream
        assert engine is not None and stream is not None
        try:
            with self._submit_lock:
                index = self._next_index
                self._next_index += 1
                self._futures[index] = future
                engine.intake.enqueue(stream, index, (fn, args, kwargs), slot, None)
        except BaseException:
            with self._space:
                self._queued[slot] -= 1
                self._futures.pop(index, None)
                self._space.notify_all()
            raise
        return future

    def stats(self) -> PoolStats:
        """A frozen snapshot of the pool (see :class:`~ordpool.PoolStats`)."""
        if self._engine is None:
            raise RuntimeError("the pool was not started")
        return self._engine.stats()

    # -- engine callbacks ----------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._state is not _State.RUNNING:
            raise PoolClosed(
                "cannot submit: the pool is "
                + (
                    "not started (call start() or use 'with')"
                    if self._state is _State.NEW
                    else self._state.value
                )
            )

    def _on_send(self, task: Task) -> None:
        # Engine lock held: only the futures' own locks are taken here.
        bind_futures(task, self._futures, start=True)

    def _on_batch(self, batch: Batch) -> None:
        values, errors = decode(batch)
        with self._space:
            done = [self._futures.pop(index, None) for index in batch.indices]
            for future in done:
                if future is not None and future.slot is not None:
                    self._queued[future.slot] -= 1
            self._space.notify_all()
        # (a job cancelled before it was sent is answered too, by its CancelledError: its future
        # is done already)
        complete_futures([None if f is None or f.done() else f for f in done], values, errors)

    def _engine_now(self) -> Engine | None:
        return self._engine


_default: KeyedPool | None = None
_default_lock = threading.Lock()


def default_pool() -> KeyedPool:
    """The library-wide KeyedPool, started on first use with ``min(8, cores)`` workers and
    stopped at interpreter exit."""
    global _default
    with _default_lock:
        if _default is None or _default._state is not _State.RUNNING:
            first = _default is None
            _default = KeyedPool(min(8, usable_cores())).start()
            if first:
                atexit.register(_stop_default)
        return _default


def _stop_default() -> None:
    pool = _default
    if pool is not None:
        pool.stop(grace=1.0)


def submit(
    key: str | bytes | int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
) -> Future[Any]:
    """``default_pool().submit(key, fn, *args, **kwargs)``: per-key serial jobs, no set-up.

    Examples:
        >>> import ordpool
        >>> ordpool.submit("account-42", sum, [1, 2, 3]).result()
        6
    """
    return default_pool().submit(key, fn, *args, **kwargs)
