"""The engines of ``ordpool bench --stream``: one way each of feeding a pool at due times and
consuming its results in order, with the pool kept open across runs.

=====================  ========================================================================
key                    producer -> consumer
=====================  ========================================================================
``ordpool``            a :class:`.openloop.Producer` thread calls ``pool.enqueue(i, item)``;
                       the main thread iterates ``pool.results()``
``ordpool-many``       the same with one ``pool.enqueue_many(indices, items)`` per wake-up of
                       the producer (every item due by then, as a broker's ``consume(n)``
                       hands them over)
``ordpool-imap``       ``pool.imap(gen)``: ``gen`` yields each item at its due time
``pool-imap-1``        ``multiprocessing.Pool.imap(stream_work, gen, chunksize=1)``
``pool-imap-100``      the same with ``chunksize=100``
``executor-submit``    a producer thread calls ``ProcessPoolExecutor.submit`` per item; the main
                       thread waits on the futures in submission order
=====================  ========================================================================

Every engine runs :func:`.workloads.stream_work` (module-level: every pool pickles it by
reference) with ``--workers`` workers and ``--start-method``. :meth:`StreamEngine.run` is one
open loop; the runner (:mod:`.stream`) times it.
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import time
from concurrent.futures import Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator

from .. import PoolStats, ProcessOrderedPool, Result
from ._runtime import MAX_DELAY
from .config import StreamCheckError, StreamConfig
from .engines import ordpool_label, ordpool_params
from .openloop import Items, Pacer, Producer, Recorder
from .workloads import stream_work

__all__ = [
    "STREAM_ENGINES",
    "ExecutorSubmitEngine",
    "MpPoolImapEngine",
    "OrdpoolEnqueueEngine",
    "OrdpoolEnqueueManyEngine",
    "OrdpoolImapEngine",
    "StreamEngine",
]


class StreamEngine:
    """One pool fed in an open loop. Subclasses implement :meth:`open`, :meth:`run` and
    :meth:`close`."""

    key = ""  # "ordpool"
    name = ""  # "ordpool enqueue" in the table, with label() adding the parameters

    def __init__(self, workers: int, config: StreamConfig) -> None:
        self.workers = workers
        self.config = config

    def label(self) -> str:
        """Name and parameters, for the table (``"mp.Pool.imap (chunk 100)"``)."""
        return self.name

    def params(self) -> dict[str, Any]:
        """The engine's parameters, for the JSON report."""
        return {}

    def open(self) -> None:
        """Start the pool and its workers."""

    def run(self, pacer: Pacer, recorder: Recorder) -> None:
        """Feed ``pacer``'s items as they come due; pass each result to ``recorder``, in order;
        return once the last result arrived (the caller checks that all did)."""
        raise NotImplementedError

    def pool_stats(self) -> PoolStats | None:
        """``pool.stats()`` for the ordpool engines; ``None`` for the others."""
        return None

    def close(self, abort: bool = False) -> None:
        """Stop the pool (``abort``: kill it, an error is propagating)."""


def _receive_values(results: Iterator[Any], recorder: Recorder) -> None:
    """The consumer of the ``imap`` engines: each result is its item's index."""
    receive = recorder.receive
    for value in results:
        receive(value)


class _OrdpoolEngine(StreamEngine):
    """What both ordpool engines share: the pool, its batch size, its stats."""

    _pool: ProcessOrderedPool | None = None

    def label(self) -> str:
        label = ordpool_label(self.name, self.config.batch_size)
        if self.config.max_delay is not None:
            label = f"{label[:-1]}, max_delay {self.config.max_delay * 1e3:g} ms)"
        return label

    def params(self) -> dict[str, Any]:
        return {
            **ordpool_params(self._pool, self.config.batch_size),
            "max_delay": self.config.max_delay or MAX_DELAY,
        }

    def open(self) -> None:
        self._pool = ProcessOrderedPool(
            stream_work,
            self.workers,
            max_delay=self.config.max_delay or MAX_DELAY,
            batch_size=self.config.batch_size,
            start_method=self.config.start_method,
            init_timeout=120,
        )

    def pool_stats(self) -> PoolStats | None:
        return None if self._pool is None else self._pool.stats()

    def close(self, abort: bool = False) -> None:
        if self._pool is None:
            return
        if abort:
            self._pool.terminate()
        else:
            self._pool.close()
        self._pool.join()


class OrdpoolEnqueueEngine(_OrdpoolEngine):
    """``pool.enqueue(index, item)`` from a producer thread; ``pool.results()`` here.

    One ``results()`` iterator serves every run of the pool (warm-up and timed): each run
    takes exactly its items from it, and the indices go on from one run to the next
    (``enqueue`` wants them increasing).
    """

    key = "ordpool"
    name = "ordpool enqueue"

    def open(self) -> None:
        super().open()
        assert self._pool is not None
        self._results: Iterator[Result] = self._pool.results()
        self._base = 0  # the pool index of the next run's item 0: 6_000

    def run(self, pacer: Pacer, recorder: Recorder) -> None:
        pool = self._pool
        assert pool is not None, "open() first"
        base, total, make = self._base, pacer.schedule.total, pacer.items
        self._base += total

        feed = self.feeder(base, make)

        def consume() -> None:
            receive = recorder.receive
            for result in itertools.islice(self._results, total):
                value = result.get()  # a failed item raises its error here
                if result.index - base != value:
                    raise StreamCheckError(
                        f"{recorder.engine}: the result at index {result.index} is item "
                        f"{value!r}'s (expected item {result.index - base})"
                    )
                receive(value)

        Producer(pacer, feed, on_error=pool.terminate).drive(consume, abort=pool.terminate)

    def feeder(self, base: int, make: Items) -> Callable[[range], None]:
        """The producer's step: feed one batch of due items (``base + i`` in the pool)."""
        pool = self._pool
        assert pool is not None, "open() first"
        enqueue = pool.enqueue

        def feed(batch: range) -> None:
            for i in batch:
                enqueue(base + i, make(i))

        return feed

    def close(self, abort: bool = False) -> None:
        if self._pool is not None and not abort:
            self._pool.close()
            for _ in self._results:  # ends at once: every enqueued item was consumed
                pass
        super().close(abort)


class OrdpoolEnqueueManyEngine(OrdpoolEnqueueEngine):
    """One ``pool.enqueue_many`` per batch of due items from a producer thread;
    ``pool.results()`` here."""

    key = "ordpool-many"
    name = "ordpool enqueue_many"

    def feeder(self, base: int, make: Items) -> Callable[[range], None]:
        pool = self._pool
        assert pool is not None, "open() first"
        enqueue_many = pool.enqueue_many

        def feed(batch: range) -> None:
            enqueue_many(range(base + batch.start, base + batch.stop), list(map(make, batch)))

        return feed


class OrdpoolImapEngine(_OrdpoolEngine):
    """``pool.imap(gen)``, ``gen`` yielding each item at its due time."""

    key = "ordpool-imap"
    name = "ordpool imap"

    def run(self, pacer: Pacer, recorder: Recorder) -> None:
        assert self._pool is not None, "open() first"
        try:
            _receive_values(self._pool.imap(pacer.blocking_items()), recorder)
        finally:
            pacer.stop.set()  # an early exit: the feeder thread leaves the generator


class MpPoolImapEngine(StreamEngine):
    """``multiprocessing.Pool.imap(stream_work, gen, chunksize)``, ``gen`` blocking."""

    name = "mp.Pool.imap"
    chunksize = 1

    def label(self) -> str:
        return f"{self.name} (chunk {self.chunksize})"

    def params(self) -> dict[str, Any]:
        return {"chunksize": self.chunksize}

    def open(self) -> None:
        ctx = multiprocessing.get_context(self.config.start_method)
        self._pool = ctx.Pool(self.workers)

    def run(self, pacer: Pacer, recorder: Recorder) -> None:
        results = self._pool.imap(stream_work, pacer.blocking_items(), chunksize=self.chunksize)
        try:
            _receive_values(results, recorder)
        finally:
            pacer.stop.set()

    def close(self, abort: bool = False) -> None:
        pool = getattr(self, "_pool", None)
        if pool is None:
            return
        if abort:
            pool.terminate()
        else:
            pool.close()
        pool.join()


class MpPoolImap1Engine(MpPoolImapEngine):
    """``multiprocessing.Pool.imap`` with ``chunksize=1``."""

    key = "pool-imap-1"
    chunksize = 1


class MpPoolImap100Engine(MpPoolImapEngine):
    """``multiprocessing.Pool.imap`` with ``chunksize=100``."""

    key = "pool-imap-100"
    chunksize = 100


class ExecutorSubmitEngine(StreamEngine):
    """``ProcessPoolExecutor.submit`` per item from a producer thread; the main thread waits
    on the futures in submission order (a queue of futures, ``None`` when the producer
    failed)."""

    key = "executor-submit"
    name = "ProcessPoolExecutor.submit"
    _ex: ProcessPoolExecutor | None = None

    def open(self) -> None:
        ctx = multiprocessing.get_context(self.config.start_method)
        self._ex = ex = ProcessPoolExecutor(self.workers, mp_context=ctx)
        # The executor starts its processes on first use: overlapping sleeps start all of them.
        wait([ex.submit(time.sleep, 0.05) for _ in range(self.workers)])

    def run(self, pacer: Pacer, recorder: Recorder) -> None:
        ex = self._ex
        assert ex is not None, "open() first"
        futures: queue.SimpleQueue[Future[int] | None] = queue.SimpleQueue()
        total, make = pacer.schedule.total, pacer.items

        def feed(batch: range) -> None:
            submit, put = ex.submit, futures.put
            for i in batch:
                put(submit(stream_work, make(i)))

        def consume() -> None:
            receive, get = recorder.receive, futures.get
            for _ in range(total):
                future = get()
                if future is None:  # the producer failed: drive() raises its error
                    return
                receive(future.result())

        def abort() -> None:
            ex.shutdown(wait=False, cancel_futures=True)

        Producer(pacer, feed, on_error=lambda: futures.put(None)).drive(consume, abort)

    def close(self, abort: bool = False) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=abort)


STREAM_ENGINES: dict[str, type[StreamEngine]] = {
    "ordpool": OrdpoolEnqueueEngine,
    "ordpool-many": OrdpoolEnqueueManyEngine,
    "ordpool-imap": OrdpoolImapEngine,
    "pool-imap-1": MpPoolImap1Engine,
    "pool-imap-100": MpPoolImap100Engine,
    "executor-submit": ExecutorSubmitEngine,
}
