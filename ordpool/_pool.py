"""``ProcessOrderedPool``: the public face of the engine over local worker processes."""

from __future__ import annotations

import multiprocessing
import threading
import warnings
from itertools import chain, repeat
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from ._core.batching import Batch
from ._core.defaults import MAX_DELAY, default_window, usable_cores
from ._core.state import PoolState
from ._core.stats import PoolStats
from ._core.streams import IndexedStream, NumberedStream, Stream
from ._engine import Engine, Feeder
from ._engine.decoding import (
    SKIP,
    batch_values,
    decode,
    decode_retrying,
    lazy_values,
    release,
    retrying,
)
from ._multistream import (
    OrderedStream,
    batch_results,
    checked_bunch,
    decide_keyed,
    enqueue_many,
    take_any,
)
from ._transport.base import TransportEvents, TransportFactory
from ._transport.process import ProcessTransport
from ._transport.worker import process_spec, worker_spec

__all__ = ["OrderedStream", "ProcessOrderedPool", "Result"]

_ERRORS = ("raise", "skip", "return")


class Result(NamedTuple):
    """One item's outcome, as yielded by :meth:`ProcessOrderedPool.results`.

    Attributes:
        index: the index the item was enqueued with.
        value: what ``fn`` returned (``None`` when it failed).
        error: the exception, or ``None``. A worker exception keeps its type, with the worker's
            traceback as ``__cause__``; a dead worker gives :class:`~ordpool.WorkerCrashed`.
    """

    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: the item's index
    value: Any
    error: BaseException | None

    @property
    def ok(self) -> bool:
        """True when the item succeeded."""
        return self.error is None

    def get(self) -> Any:
        """Return the value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value


def _batches(engine: Engine, stream: Stream) -> Iterator[Batch]:
    """The stream's answered batches, in order, until it ends."""
    while True:
        batch = engine.delivery.next_batch(stream)
        if batch is None:
            return
        yield batch


def _imap_batches(
    pool: ProcessOrderedPool, engine: Engine, stream: Stream, errors: str
) -> Iterator[Iterable[Any]]:
    """imap's values, an iterable per batch; a failed item per the ``errors`` policy
    (:func:`~ordpool._engine.decoding.batch_values`: under "raise" the iteration ends at the
    failed item's position).

    ``pool`` is only held, so that ``list(ProcessOrderedPool(f).imap(xs))`` keeps the pool
    alive until the iteration ends. The caller primes the generator (see ``_primed``).
    """

    def on_error(pos: int, err: BaseException) -> Any:
        if errors == "return":
            return err
        if errors == "skip":
            return SKIP
        raise err  # ends the iteration here, through this generator

    try:
        yield []
        for batch in _batches(engine, stream):
            yield from batch_values(batch, on_error)
    finally:
        engine.release_stream(stream)


def _result_batches(
    pool: ProcessOrderedPool, engine: Engine, stream: Stream
) -> Iterator[Iterator[Result]]:
    """results()'s Result objects, an iterator per batch (built in C with map/zip).

    ``pool`` is only held, to keep it alive while its results are iterated. A consumer that
    leaves its loop mid-batch leaves the rest of that batch in ``stream.leftover``: the next
    ``results()`` starts there, so nothing is lost. The caller primes the generator.
    """
    new = tuple.__new__
    current: Iterator[Result] | None = None
    try:
        yield iter(())
        current, stream.leftover = stream.leftover, None
        if current is not None:
            yield current
        for batch in _batches(engine, stream):
            lazy = lazy_values(batch, result=Result)
            if lazy is not None:  # Results built a chunk at a time, errors in their slot
                while True:
                    current = lazy  # a Ctrl-C while a chunk loads: the next results() retries it
                    chunk = yield from retrying(lazy.next_chunk)
                    if chunk is None:
                        break
                    rest = iter(chunk)
                    current = chain(rest, lazy)  # what is left if the consumer leaves
                    yield rest
                continue
            # The consumer gets a Ctrl-C there; iterating again decodes the batch again. If it
            # leaves instead, the next results() starts with this batch.
            current = _LateResults(batch)
            values, errs = yield from decode_retrying(batch)
            if errs is None:
                current = map(new, repeat(Result), zip(batch.indices, values, repeat(None)))
            else:
                get = errs.get
                current = (
                    new(Result, (index, value, get(pos)))
                    for pos, (index, value) in enumerate(zip(batch.indices, values))
                )
            release(batch)  # after `current` holds the values (see _LateResults)
            yield current
    finally:
        stream.leftover = current
        engine.release_consumer(stream)


class _LateResults:
    """The Results of a batch whose decoding a KeyboardInterrupt cut short, for the next
    ``results()`` to start with when the consumer leaves after it (see _result_batches). An
    iterator object: another Ctrl-C while it decodes leaves it to decode again."""

    __slots__ = ("batch", "ready")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.ready: list[Result] | None = None

    def __iter__(self) -> _LateResults:
        return self

    def __next__(self) -> Result:
        if self.ready is None:
            batch = self.batch
            values, errs = decode(batch, interruptible=True)
            get = (errs or {}).get
            ready = [
                tuple.__new__(Result, (index, value, get(pos)))
                for pos, (index, value) in enumerate(zip(batch.indices, values))
            ]
            ready.reverse()
            self.ready = ready
            release(batch)
        if not self.ready:
            raise StopIteration
        return self.ready.pop()


def _primed(batches: Iterator[Any]) -> Iterator[Any]:
    """Run a batch generator to its first ``yield`` (an empty batch), inside its ``try``.

    A generator that never started never runs its ``finally``; primed, it does when dropped, so
    an ``imap()`` or ``results()`` iterator that is never iterated still releases its stream.
    Then hand the items out through ``chain``: Python runs once per batch, C once per item.
    """
    next(batches)
    return chain.from_iterable(batches)


class ProcessOrderedPool:
    """Worker processes that run ``fn`` over a stream and give results back in index order.

    Args:
        fn: called as ``fn(item)``, or ``fn(state, item)`` when ``init`` is given. Shipped to
            the workers with cloudpickle, so lambdas and closures work with every start method.
        workers: number of worker processes; default: the cores this process may use.
        init: called once in each worker as ``init(*initargs)``; its return value is the
            worker's ``state``, passed to every call of ``fn`` in that worker (a decoder, a
            buffer, a connection). Runs again in a replacement worker after a crash.
        initargs: arguments for ``init``.
        window: the most items in flight (sent, running, or waiting in the reorder heap).
            ``enqueue`` blocks and ``imap`` stops reading its input while it is full.
            Default: ``max(16384, 2048 * workers)`` (``12288 * workers`` for Ray).
        batch_size: items per batch; default ``None`` adapts it to the measured cost per item
            (batches of about 40 ms of worker time, and of at most 6 MiB of items or of
            results; a lone item goes at once to an idle worker).
        max_delay: the latency bound, in seconds. A partial batch waits at most this long for
            more items before it is sent; while items keep coming, partial batches for idle
            workers are cut at most once per ``max_delay / 5`` (batches of about 1 ms of
            arrivals by default, instead of a few items each). A worker sends the results
            finished before a slow item at once, instead of with the batch's end, when its
            batch has run 1.5 times its usual time (2 times for a batch longer than
            ``max_delay``; at least ``max_delay / 10``) or the item has
            run ``max_delay``: a slow item holds back only the results after it. Smaller:
            lower latency, more parent CPU per message. Ray actors cannot send early: there a
            result waits for its batch.
        retries: times an item whose worker died is re-run before it fails with
            :class:`~ordpool.WorkerCrashed`. Items of the batch that were not running when the
            worker died are always re-run, and never count as attempts.
        start_method: ``"fork"``, ``"spawn"`` or ``"forkserver"``; default: the platform's.
        init_timeout: seconds to wait for every worker to finish ``init``; ``None`` waits.
        backend: ``"process"`` (local worker processes) or ``"ray"`` (Ray actors, see
            :mod:`ordpool._transport.ray`; needs ``pip install ordpool[ray]``).
        ray_address: Ray cluster to connect to (``"auto"``, ``"ray://host:10001"``); ``None``
            connects to a running local instance or starts one.
        ray_options: extra options for the Ray backend (see
            :func:`ordpool._transport.ray.transport_factory`).

    Raises:
        ValueError: for a non-positive ``workers``, ``window`` or ``batch_size``, a negative
            ``max_delay`` or ``retries``.
        WorkerInitError: ``init`` raised in a worker (the worker's traceback is ``__cause__``).

    Examples:
        >>> import ordpool
        >>> with ordpool.ProcessOrderedPool(abs, workers=2) as pool:
        ...     list(pool.imap([-3, 1, -2]))
        [3, 1, 2]
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        workers: int | None = None,
        *,
        init: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        window: int | None = None,
        batch_size: int | None = None,
        max_delay: float = MAX_DELAY,
        retries: int = 0,
        start_method: str | None = None,
        init_timeout: float | None = None,
        backend: str = "process",
        ray_address: str | None = None,
        ray_options: dict[str, Any] | None = None,
    ) -> None:
        self._engine: Engine | None = None
        workers = usable_cores() if workers is None else workers
        _check_options(fn, init, workers, window, batch_size, max_delay, retries)
        self._stream: IndexedStream | None = None  # the enqueue/results stream, opened on use
        self._stream_lock = threading.Lock()
        factory = self._transport_factory(
            (fn, init, tuple(initargs)), backend, start_method, max_delay, ray_address, ray_options
        )
        self._engine = Engine(
            factory,
            workers=workers,
            window=default_window(workers, ray=backend == "ray") if window is None else window,
            batch_size=batch_size,
            max_delay=max_delay,
            retries=retries,
        )
        self._engine.start(init_timeout)

    def _transport_factory(
        self,
        job: tuple[Callable[..., Any], Callable[..., Any] | None, tuple[Any, ...]],
        backend: str,
        start_method: str | None,
        max_delay: float,
        ray_address: str | None,
        ray_options: dict[str, Any] | None,
    ) -> TransportFactory:
        """The factory of the transport ``backend`` names; sets ``_start_method``."""
        if backend == "process":
            if ray_address is not None or ray_options:
                raise ValueError("ray_address and ray_options apply to backend='ray' only")
            ctx = multiprocessing.get_context(start_method)
            self._start_method = ctx.get_start_method()
            spec, inherited = process_spec(*job)

            def process_factory(events: TransportEvents) -> ProcessTransport:
                return ProcessTransport(
                    ctx, spec, events, early_after=max_delay, inherited=inherited
                )

            return process_factory
        if backend == "ray":
            if start_method is not None:
                raise ValueError("start_method applies to backend='process' only")
            from ._transport.ray import transport_factory  # imports ray: only when asked for

            self._start_method = "ray"
            spec = worker_spec(*job)
            return transport_factory(spec, address=ray_address, options=ray_options or {})
        raise ValueError(f"backend must be 'process' or 'ray', got {backend!r}")

    # -- streaming: enqueue / results ----------------------------------------------------------

    def enqueue(
        self, index: int, item: Any, *, key: Any = None, timeout: float | None = None
    ) -> None:
        """Submit ``item`` at ``index``. Thread-safe; blocks while the window is full.

        Args:
            index: the item's position in the output order: any int greater than the previous
                one (gaps and values above 2**32 are fine, e.g. Kafka offsets).
            item: the argument for ``fn``.
            key: route the item to the worker its key hashes to (``str``, ``bytes`` or ``int``;
                a stable FNV-1a hash), so items of one key run one at a time, in order, in the
                same worker and its state. Either every item of the stream has a key or none.
                Results still come out in global index order. A hot key loads one worker.
            timeout: seconds to wait for room in the window; ``None`` waits as long as needed.

        Raises:
            ValueError: ``index`` is not greater than the previous index, or ``key`` is given
                for some items of the stream and not others.
            TypeError: ``index`` is not an int, or ``key`` is not str, bytes or int.
            TimeoutError: the window stayed full for ``timeout`` seconds.
            PoolClosed: the pool was closed or terminated.
            BrokenPool: the pool is broken.
            RuntimeError: an ``imap`` is running on this pool.
        """
        stream = self._stream
        if key is None and stream is not None and stream.keyed is False:
            # The common case, first: an unkeyed stream already open. Intake.enqueue checks
            # the pool's state under its lock (raising as _live would).
            self._engine.intake.enqueue(stream, index, item, None, timeout)  # type: ignore[union-attr]
            return
        engine = self._live()
        slot = engine.route(key) if key is not None else None  # TypeError: a bad key
        stream = self._enqueue_stream(engine, keyed=key is not None)
        decide_keyed(engine, stream, key is not None)  # results() opened it: it decides
        engine.intake.enqueue(stream, index, item, slot, timeout)

    def enqueue_many(
        self,
        indices: Iterable[int],
        items: Iterable[Any],
        *,
        keys: Iterable[Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Submit many items at once: ``items[i]`` at ``indices[i]``, with ``keys[i]`` for a
        keyed stream. Like :meth:`enqueue` for each item, with one lock round per batch
        instead of per item: the cheap way in for a producer that receives items in bunches
        (a Kafka ``consume(500)``, a socket read). Thread-safe.

        Every index and key is checked before any item is accepted. The items then go in a
        batch's worth at a time: the call waits while the window is full, and may then
        overfill it by up to one batch. If it ends with ``TimeoutError`` or ``PoolClosed``
        meanwhile, the items before that batch were accepted (their results come out), the
        rest were not.

        Args:
            indices: ints, strictly increasing and above the previous index (gaps are fine).
            items: the arguments for ``fn``, one per index.
            keys: one key per item (see :meth:`enqueue`), or ``None`` for an unkeyed stream.
            timeout: seconds to wait for room in the window; ``None`` waits as long as needed.

        Raises:
            ValueError: ``indices``, ``items`` and ``keys`` differ in length, or an index is
                not greater than the one before it (nothing of the call was accepted then),
                or ``keys`` is given for some calls of the stream and not others.
            TypeError: an index is not an int, or a key is not str, bytes or int.
            TimeoutError: the window stayed full for ``timeout`` seconds.
            PoolClosed: the pool was closed or terminated.
            BrokenPool: the pool is broken.
            RuntimeError: an ``imap`` is running on this pool.
        """
        indices, items, keys = checked_bunch(indices, items, keys)
        engine = self._live()
        if not items:
            return
        stream = self._enqueue_stream(engine, keyed=None)  # decided once the keys are checked
        enqueue_many(engine, stream, indices, items, keys, timeout)

    def results(self) -> Iterator[Result]:
        """Yield a :class:`Result` per enqueued item, in ascending index order.

        Runs until :meth:`close` was called and every item was yielded, so it is usually
        iterated in its own consumer thread while another thread enqueues. One consumer at a
        time.

        Raises:
            PoolClosed: the pool was terminated before every item was yielded.
            BrokenPool: the pool broke (items already failed are yielded first).
        """
        engine = self._live_or_closing()
        stream = self._enqueue_stream(engine, keyed=None)
        engine.claim_consumer(stream)
        return _primed(_result_batches(self, engine, stream))

    # -- several ordered streams ---------------------------------------------------------------

    def stream(self, *, keyed: bool | None = None) -> OrderedStream:
        """Open another ordered stream on this pool: an :class:`~ordpool.OrderedStream`.

        A pool may have any number of them open at once, alongside an ``imap`` or the
        ``enqueue``/``results`` stream. Each has its own indices (gaps allowed) and its own
        reorder buffer: a slow item holds back only the later items of its own stream. All
        share the workers and the window. Serve many from one thread with :meth:`take_any`.

        Args:
            keyed: whether its items carry keys (``None``: the first item decides).

        Raises:
            PoolClosed, BrokenPool: the pool takes no new work.
        """
        return OrderedStream(self, self._live(), keyed)

    def take_any(
        self, streams: Iterable[OrderedStream], timeout: float | None = None
    ) -> tuple[OrderedStream, list[Result]] | None:
        """Wait until one of ``streams`` has results ready, and take them.

        Returns:
            ``(stream, results)``: the next results in order of that stream (one batch of
            them), or ``(stream, [])`` when that stream has ended (closed and drained, or
            dropped: leave it out of the next call); ``None`` when ``timeout`` passed first.
            The streams are served in turn, so a busy one does not starve the others.

        Raises:
            PoolClosed, BrokenPool: the pool ended before a stream's items were processed.
        """
        handles = {h._stream: h for h in streams}
        got = take_any(self._live_or_closing(), list(handles), timeout)
        if got is None:
            return None
        stream, batch = got
        return handles[stream], [] if batch is None else batch_results(batch)

    # -- batch processing: imap ----------------------------------------------------------------

    def imap(self, iterable: Iterable[Any], *, errors: str = "raise") -> Iterator[Any]:
        """Apply ``fn`` to every item of ``iterable``; yield the results in input order.

        The input is read lazily by a feeder thread, at most ``window`` items ahead of the
        consumer, so an endless or blocking iterable (a Kafka consumer) works in bounded memory.
        The pool serves many ``imap`` calls, one after another, with the same warm workers; an
        ``imap`` cannot run while an ``enqueue``/``results`` stream is open (``RuntimeError``).

        Args:
            iterable: the items.
            errors: what a failed item does: ``"raise"`` raises its exception at its position
                (ending the iteration), ``"skip"`` leaves it out, ``"return"`` yields the
                exception object in its place. An exception raised by ``iterable`` itself is
                treated the same way, at the position where it happened, and ends the input.

        Raises:
            ValueError: unknown ``errors``.
            RuntimeError: another stream is open on this pool.
            PoolClosed, BrokenPool: as for :meth:`results`.
        """
        return self._start_imap(iterable, errors, keyed=False)

    def imap_keyed(
        self, pairs: Iterable[tuple[Any, Any]], *, errors: str = "raise"
    ) -> Iterator[Any]:
        """Like :meth:`imap` over ``(key, item)`` pairs: each item runs on its key's worker.

        Items with the same key run one at a time, in input order, in the same worker process,
        so per-key state can live in the worker's state (sessions, per-user counters). Results
        come out in input order. A hot key loads one worker: throughput is bounded by the
        busiest key's worker.

        Examples:
            >>> def count(state, event):
            ...     state[event] = state.get(event, 0) + 1
            ...     return state[event]
            >>> import ordpool
            >>> with ordpool.ProcessOrderedPool(count, 2, init=dict) as pool:
            ...     list(pool.imap_keyed([("ann", "ann"), ("bob", "bob"), ("ann", "ann")]))
            [1, 1, 2]
        """
        return self._start_imap(pairs, errors, keyed=True)

    def _start_imap(self, iterable: Iterable[Any], errors: str, *, keyed: bool) -> Iterator[Any]:
        if errors not in _ERRORS:
            raise ValueError(
                f"errors must be one of {', '.join(map(repr, _ERRORS))}, got {errors!r}"
            )
        engine = self._live()
        with self._stream_lock:
            for other in engine.streams[:]:
                if other.named:
                    continue  # streams of stream() may be open alongside
                if other is self._stream:
                    raise RuntimeError(
                        "an enqueue()/results() stream is open on this pool; imap() cannot run "
                        "until it is closed (use a second pool for a second stream)"
                    )
                raise RuntimeError(
                    "another imap() is still running on this pool; finish or close it first"
                )
            stream = engine.open_stream(NumberedStream(keyed=keyed))
        feeder = threading.Thread(
            target=Feeder(engine, stream).run,
            args=(iterable,),
            name="ordpool-imap-feeder",
            daemon=True,
        )
        feeder.start()
        # The Python generator runs once per batch; chain() hands out the items in C.
        return _primed(_imap_batches(self, engine, stream, errors))

    def map(self, iterable: Iterable[Any], *, errors: str = "raise") -> list[Any]:
        """``list(self.imap(iterable, errors=errors))``."""
        return list(self.imap(iterable, errors=errors))

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting work; in-flight items finish and ``results()`` ends after the last.

        Does not wait: use :meth:`join`, or the context manager. Calling it again is harmless.
        """
        if self._engine is not None:
            self._engine.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the workers to stop after :meth:`close`; False if ``timeout`` passed first."""
        if self._engine is None:
            return True
        if self._engine.state in (PoolState.RUNNING, PoolState.STARTING):
            raise ValueError("join() needs close() or terminate() first")
        return self._engine.join(timeout)

    def terminate(self, grace: float = 0.0) -> None:
        """Kill the workers; unfinished items are dropped. Calling it again is harmless.

        Args:
            grace: first ask the running items to stop (``ordpool.cancelled()`` turns true in
                them: a long item can clean up and return early) and wait up to this many
                seconds for them; then kill.
        """
        if self._engine is not None:
            self._engine.terminate(grace)

    def __enter__(self) -> ProcessOrderedPool:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.terminate()
        else:
            self.close()
            self.join()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None and engine.state in (PoolState.RUNNING, PoolState.CLOSING):
            engine.terminate()  # first: the warning may be turned into an exception
            warnings.warn(
                f"{self!r} was garbage-collected while running; call close() or use 'with'",
                ResourceWarning,
                source=self,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        engine = self._engine
        if engine is None:
            return f"<{type(self).__name__} state=uninitialised>"
        return (
            f"<{type(self).__name__} state={engine.state.value} workers={engine.workers} "
            f"in_flight={engine.inflight} start_method={self._start_method}>"
        )

    # -- introspection -------------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """Number of worker processes."""
        return self._live_or_closing().workers

    @property
    def state(self) -> str:
        """``"running"``, ``"closing"``, ``"closed"``, ``"terminated"`` or ``"broken"``."""
        return self._engine.state.value if self._engine is not None else "uninitialised"

    def stats(self) -> PoolStats:
        """A frozen snapshot of the pool's counters and workers (:class:`~ordpool.PoolStats`)."""
        return self._live_or_closing().stats()

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers."""
        return self._live_or_closing().worker_pids()

    def _enqueue_stream(self, engine: Engine, keyed: bool | None) -> IndexedStream:
        """The pool's enqueue/results stream, opened on first use (keyed if its first item is)."""
        stream = self._stream
        if stream is not None:
            return stream
        with self._stream_lock:
            if self._stream is None:
                if any(not s.named for s in engine.streams):
                    raise RuntimeError(
                        "an imap() is running on this pool; enqueue() and results() can be used "
                        "once it has finished"
                    )
                self._stream = engine.open_stream(IndexedStream(keyed=keyed))
            return self._stream

    def _live(self) -> Engine:
        engine = self._live_or_closing()
        engine.check_open()
        return engine

    def _live_or_closing(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("the pool was not initialised")
        return self._engine


def _check_options(
    fn: Any,
    init: Any,
    workers: int,
    window: int | None,
    batch_size: int | None,
    max_delay: float,
    retries: int,
) -> None:
    """Raise ``TypeError``/``ValueError`` for a bad constructor argument."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if init is not None and not callable(init):
        raise TypeError(f"init must be callable, not {type(init).__name__}")
    _positive("workers", workers)
    if window is not None:
        _positive("window", window)
    if batch_size is not None:
        _positive("batch_size", batch_size)
    if max_delay < 0:
        raise ValueError(f"max_delay must be >= 0, got {max_delay!r}")
    if not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
