"""Several ordered streams on one pool: :class:`OrderedStream`, opened by
:meth:`ProcessOrderedPool.stream() <ordpool.ProcessOrderedPool.stream>`.

Each stream has its own indices, its own reorder buffer and its own end; all of them share the
pool's workers and its window. A slow item holds back only the later items of its own stream.
A consumer can serve many streams from one thread: :func:`take_any` waits until any of them
has results ready (one wait on the engine's condition, no thread per stream).
"""

from __future__ import annotations

import time
from itertools import repeat
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ._core.batching import Batch, check_run
from ._core.defaults import Deadline
from ._core.state import PoolState
from ._core.streams import IndexedStream, NamedStream
from ._engine.decoding import decode

if TYPE_CHECKING:
    from ._engine import Engine
    from ._pool import ProcessOrderedPool, Result

__all__ = [
    "OrderedStream",
    "batch_results",
    "checked_bunch",
    "decide_keyed",
    "enqueue_many",
    "take_any",
]


class OrderedStream:
    """One ordered stream of a :class:`~ordpool.ProcessOrderedPool`, from ``pool.stream()``.

    Items go in with :meth:`enqueue` (strictly increasing indices, gaps allowed: Kafka
    offsets); results come out in index order with :meth:`take`, :meth:`results` or, for many
    streams at once, :meth:`ProcessOrderedPool.take_any`. A pool may have any number of these
    streams open at once, alongside its ``imap`` or ``enqueue``/``results`` stream: each has
    its own reorder buffer, so a slow item in one never holds back another. The pool's window
    bounds the items in flight of all of them together.

    Methods are thread-safe; one consumer at a time per stream.

    Example:
        >>> import ordpool
        >>> with ordpool.ProcessOrderedPool(abs, workers=2) as pool:
        ...     a, b = pool.stream(), pool.stream()
        ...     a.enqueue(10, -1); b.enqueue(0, -2); a.enqueue(12, -3)
        ...     a.close(); b.close()
        ...     [r.value for r in a.results()], [r.index for r in b.results()]
        ([1, 3], [0])
    """

    __slots__ = ("__weakref__", "_engine", "_pool", "_stream")

    def __init__(self, pool: ProcessOrderedPool, engine: Engine, keyed: bool | None) -> None:
        self._pool = pool  # held: the pool stays alive while a stream of it is used
        self._engine = engine
        self._stream = engine.open_stream(NamedStream(keyed=keyed))
        self._stream.owner = self

    def enqueue(
        self, index: int, item: Any, *, key: Any = None, timeout: float | None = None
    ) -> None:
        """Submit ``item`` at ``index`` (see :meth:`ProcessOrderedPool.enqueue`).

        Raises:
            ValueError: ``index`` is not greater than the stream's previous index, or ``key``
                is given for some items of the stream and not others.
            TypeError: ``index`` is not an int, or ``key`` is not str, bytes or int.
            TimeoutError: the pool's window stayed full for ``timeout`` seconds.
            PoolClosed: the stream or the pool was closed (or the stream dropped).
            BrokenPool: the pool is broken.
        """
        self.enqueue_many([index], [item], keys=None if key is None else [key], timeout=timeout)

    def enqueue_many(
        self,
        indices: Iterable[int],
        items: Iterable[Any],
        *,
        keys: Iterable[Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Submit many items at once: ``items[i]`` at ``indices[i]`` (see
        :meth:`ProcessOrderedPool.enqueue_many`).

        Raises:
            ValueError: ``indices``, ``items`` and ``keys`` differ in length, or an index is
                not greater than the one before it; nothing of the call was accepted then.
            TypeError: an index is not an int, or a key is not str, bytes or int.
            TimeoutError: the pool's window stayed full for ``timeout`` seconds.
            PoolClosed: the stream or the pool was closed (or the stream dropped).
            BrokenPool: the pool is broken.
        """
        indices, items, keys = checked_bunch(indices, items, keys)
        enqueue_many(self._engine, self._stream, indices, items, keys, timeout)

    def take(self, timeout: float | None = 0.0) -> list[Result] | None:
        """The results that are next in order and ready now, as a list (one batch of them).

        Args:
            timeout: seconds to wait for one; ``0`` does not wait, ``None`` waits as needed.

        Returns:
            The results (``[]`` when none came within ``timeout``), or ``None`` once the stream
            has ended: closed and every result taken, or dropped.

        Raises:
            PoolClosed, BrokenPool: the pool ended before the stream's items were processed.
        """
        got = take_any(self._engine, [self._stream], timeout)
        if got is None:
            return []
        return None if got[1] is None else batch_results(got[1])

    def results(self) -> Iterator[Result]:
        """Yield every result, in index order, until the stream is closed and drained (or
        dropped)."""
        while (results := self.take(None)) is not None:
            yield from results

    def close(self) -> None:
        """No more items: :meth:`results` ends after the last one. Idempotent."""
        engine = self._engine
        stream = self._stream
        work = None
        with engine.lock:
            if not stream.closed:
                with engine.gate:
                    stream.close_intake()
                work = engine.intake.take_locked(stream)
                engine.ready.notify_all()
        if work is not None:
            engine.intake.encode_dispatch(*work)
        engine.maybe_stop()

    def drop(self) -> None:
        """Drop the stream: its items not yet cut into a batch are discarded, its results not
        yet taken are dropped now, and those of batches already cut (queued for a worker, or
        running) as they land: those batches still run. It takes no more items and
        :meth:`take` returns ``None`` from now on. For a consumer that lost interest (a Kafka
        partition revoked). Idempotent."""
        engine = self._engine
        stream = self._stream
        with engine.lock:
            if not stream.abandoned:
                with engine.gate:
                    stream.batcher.take()
                stream.received = stream.enqueued
            engine.ready.notify_all()
        engine.release_stream(stream)

    @property
    def in_flight(self) -> int:
        """Items enqueued and not yet taken by the consumer (running, or waiting in order)."""
        stream = self._stream
        return stream.enqueued - stream.received

    @property
    def held(self) -> int:
        """Items answered and waiting in the stream's reorder buffer (for an earlier item, or
        for the consumer)."""
        return self._stream.reorder.items

    @property
    def ended(self) -> bool:
        """Closed and drained, or dropped: nothing more will come out."""
        stream = self._stream
        return stream.abandoned or stream.finished()

    def __repr__(self) -> str:
        return f"<OrderedStream in_flight={self.in_flight} ended={self.ended}>"


def checked_bunch(
    indices: Iterable[int], items: Iterable[Any], keys: Iterable[Any] | None
) -> tuple[list[int], list[Any], list[Any] | None]:
    """``enqueue_many``'s arguments as lists, checked whole before anything is accepted:
    lengths, index types and order (keys are checked as they are routed).

    Raises:
        ValueError: the lengths differ, or an index is not greater than the one before it.
        TypeError: an index is not an int.
    """
    indices, items = list(indices), list(items)
    keys = None if keys is None else list(keys)
    if len(indices) != len(items) or (keys is not None and len(keys) != len(items)):
        raise ValueError("indices, items and keys must have the same length")
    check_run(indices)
    return indices, items, keys


def decide_keyed(engine: Engine, stream: IndexedStream, keyed: bool) -> None:
    """Whether the stream's items carry keys: its first item decides (under the engine's lock,
    whichever method adds it); raise if this call disagrees.

    Raises:
        ValueError: the stream's items are keyed and this call's are not, or the reverse.
    """
    if stream.keyed is None:
        with engine.lock:
            if stream.keyed is None:
                stream.keyed = keyed
    if stream.keyed != keyed:
        raise ValueError(
            "give a key for every item of the stream or for none "
            f"(this stream is {'keyed' if stream.keyed else 'unkeyed'})"
        )


def enqueue_many(
    engine: Engine,
    stream: IndexedStream,
    indices: list[int],
    items: list[Any],
    keys: list[Any] | None,
    timeout: float | None,
) -> None:
    """Add items to an indexed stream a batch at a time (see
    :meth:`OrderedStream.enqueue_many` and :meth:`ProcessOrderedPool.enqueue_many`); the
    arguments come from :func:`checked_bunch`."""
    if not items:
        return
    slots = None if keys is None else list(map(engine.route, keys))  # TypeError: a bad key
    decide_keyed(engine, stream, keys is not None)
    intake, total, pos = engine.intake, len(items), 0
    deadline = Deadline(timeout)
    while pos < total:
        with engine.lock:
            if engine.state is not PoolState.RUNNING or stream.closed:
                intake._check_accepts(stream)  # raises
            batcher = stream.batcher
            if intake.inflight + len(batcher) >= intake.window:
                engine.intake.wait_for_room_locked(stream, deadline, timeout)
            size = max(1, intake.sizer.size)
            end = min(total, pos + max(1, size - len(batcher)))
            with engine.gate:  # (ValueError if another thread added a greater index meanwhile)
                n = batcher.extend(
                    indices[pos:end],
                    items[pos:end],
                    None if slots is None else slots[pos:end],
                    checked=True,
                )
            intake.submitted += end - pos
            if isinstance(stream, NamedStream):
                stream.enqueued += end - pos
            pos = end
            scheduler = engine.scheduler
            if n < size and not (pos == total and scheduler.starts_now(stream, None)):
                if not stream.pending_since:
                    stream.pending_since = time.monotonic()
                    engine.flusher.wake_locked()
                continue
            work = intake.take_locked(stream)
        assert work is not None
        intake.encode_dispatch(*work)


def take_any(
    engine: Engine, streams: list[NamedStream], timeout: float | None
) -> tuple[NamedStream, Batch | None] | None:
    """The next batch in order of whichever of ``streams`` has one first (see
    :meth:`~ordpool._engine.delivery.Delivery.next_batch_any`), counted as received."""
    got = engine.delivery.next_batch_any(streams, timeout)  # type: ignore[arg-type]
    if got is not None and got[1] is not None:
        stream = got[0]
        stream.received += len(got[1])  # type: ignore[attr-defined]
    return got  # type: ignore[return-value]


def batch_results(batch: Batch) -> list[Result]:
    """A taken batch's :class:`~ordpool.Result` objects, in order (decoded here)."""
    from ._pool import Result

    values, errors = decode(batch)
    new = tuple.__new__
    results = list(map(new, repeat(Result), zip(batch.indices, values, repeat(None))))
    if errors:
        indices = batch.indices
        for pos, err in errors.items():
            results[pos] = new(Result, (indices[pos], None, err))
    return results
