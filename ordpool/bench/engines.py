"""The engines: one way each of running a workload over the messages, with its pool kept open.

======================  =====================================================================
key                     what runs
======================  =====================================================================
``serial``              the same function in this process (the reference)
``ordpool``             ``ordpool.ProcessOrderedPool(...).imap(messages)``
``pool``                ``multiprocessing.Pool.imap(fn, messages, chunksize)``
``executor``            ``concurrent.futures.ProcessPoolExecutor.map(fn, messages, chunksize=...)``
``mpire``               ``mpire.WorkerPool(keep_alive=True).imap(fn, messages, chunk_size=...)``
``joblib``              ``joblib.Parallel(backend="loky", return_as="generator")``
======================  =====================================================================

The chunked pools (every one but serial and ordpool) are slow at their default chunk size
(``ProcessPoolExecutor.map`` at chunksize 1 runs at 0.09x serial), so each gets the best of a
few candidates, measured on a calibration slice (:meth:`ChunkedEngine.prepare`). mpire and
joblib are optional (the ``bench`` extra): :func:`installed` says whether one can run.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator, Sequence

from .. import ProcessOrderedPool
from .config import BenchConfig
from .measure import descendants
from .workloads import Workload, call_with_lazy_state, call_with_state, stdlib_init

__all__ = [
    "ENGINES",
    "PEERS",
    "BenchEngine",
    "ChunkedEngine",
    "ExecutorEngine",
    "JoblibEngine",
    "MpPoolEngine",
    "MpireEngine",
    "OrdpoolEngine",
    "SerialEngine",
    "installed",
]


class BenchEngine:
    """One way of running the workload, with its pool opened once per worker count.

    Subclasses set ``key``/``name`` and implement :meth:`open`, :meth:`imap`, :meth:`close`;
    :meth:`prepare` warms the pool (and may calibrate). Worker pids default to the processes
    that appeared while :meth:`open` ran (psutil), which suits any pool that starts its
    workers eagerly.
    """

    key = ""  # "ordpool"
    name = ""  # "ordpool" in the table, with params() appended

    def __init__(self, workload: Workload, workers: int, config: BenchConfig) -> None:
        self.workload = workload
        self.workers = workers
        self.config = config
        self._pids: list[int] = []  # the workers, when the pool does not say: [4711, 4712]

    def label(self) -> str:
        """Name and parameters, for the table (``"mp.Pool.imap (chunk 1000)"``)."""
        return self.name

    def params(self) -> dict[str, Any]:
        """The engine's parameters, for the JSON report."""
        return {}

    def open(self) -> None:
        """Start the pool and its workers."""

    def prepare(self, messages: Sequence[Any]) -> None:
        """Warm the pool with a small untimed run (and calibrate, for the chunked pools)."""
        collections.deque(self.imap(messages[: warm_count(len(messages))]), maxlen=0)

    def imap(self, messages: Sequence[Any]) -> Iterator[Any]:
        """The results, lazily, in input order."""
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        """The worker processes' pids (empty for serial)."""
        return list(self._pids)

    def close(self, abort: bool = False) -> None:
        """Stop the pool (``abort``: kill it, an error is propagating).

        This default fits pools with ``close``/``terminate``/``join`` in ``self._pool``
        (ordpool, ``multiprocessing.Pool``); others override it.
        """
        pool = getattr(self, "_pool", None)
        if pool is None:
            return
        if abort:
            pool.terminate()
        else:
            pool.close()
        pool.join()

    def _track_workers(self, start: Callable[[], None]) -> None:
        """Run ``start``; the processes that appeared meanwhile are (more of) the workers.

        A pool that starts its workers on first use wraps its warm-up in this too.
        """
        before = descendants()
        start()
        self._pids = sorted(set(self._pids) | (descendants() - before))


def warm_count(n: int) -> int:
    """Messages in the untimed warm-up run: a tenth, at most 2,000."""
    return max(1, min(2000, n // 10))


class SerialEngine(BenchEngine):
    """The same function in this process: the reference for speedup and ``--check``."""

    key = name = "serial"

    def open(self) -> None:
        self.call = self.workload.serial_callable()

    def imap(self, messages: Sequence[Any]) -> Iterator[Any]:
        return map(self.call, messages)


def ordpool_label(name: str, batch_size: int | None) -> str:
    """The table label of an engine that runs a ``ProcessOrderedPool``."""
    return f"{name} (batch {'auto' if batch_size is None else batch_size})"


def ordpool_params(pool: ProcessOrderedPool | None, batch_size: int | None) -> dict[str, Any]:
    """The JSON params of an engine that runs a ``ProcessOrderedPool``: its batch size, and
    what "auto" settled on while the pool runs."""
    params: dict[str, Any] = {"batch_size": batch_size or "auto"}
    if pool is not None and pool.state == "running":
        params["batch_size_now"] = pool.stats().batch_size
    return params


class OrdpoolEngine(BenchEngine):
    """``ordpool.ProcessOrderedPool(...).imap(messages)``."""

    key = name = "ordpool"
    _pool: ProcessOrderedPool | None = None

    def label(self) -> str:
        return ordpool_label(self.name, self.config.batch_size)

    def params(self) -> dict[str, Any]:
        return ordpool_params(self._pool, self.config.batch_size)

    def open(self) -> None:
        self._pool = ProcessOrderedPool(
            self.workload.fn,
            self.workers,
            init=self.workload.init,
            initargs=self.workload.initargs,
            batch_size=self.config.batch_size,
            start_method=self.config.start_method,
            init_timeout=120,
        )

    def imap(self, messages: Sequence[Any]) -> Iterator[Any]:
        assert self._pool is not None, "open() first"
        return self._pool.imap(messages)

    def worker_pids(self) -> list[int]:
        return [] if self._pool is None else self._pool.worker_pids()


class ChunkedEngine(BenchEngine):
    """A pool with a chunk size: the best of a few candidates is found by :meth:`prepare`."""

    def __init__(self, workload: Workload, workers: int, config: BenchConfig) -> None:
        super().__init__(workload, workers, config)
        self.candidates = config.chunksizes or workload.chunksizes  # (100, 1000, 5000)
        self.chunksize = self.candidates[0]  # the one timed runs use: 1000
        self.sweep: dict[int, float] = {}  # chunksize -> calibration seconds: {100: 0.21}
        self.calibration_messages = 0  # the slice the sweep ran on: 40_000

    def label(self) -> str:
        return f"{self.name} (chunk {self.chunksize})"

    def sweep_text(self) -> str:
        """How the chunksize was chosen, for the report."""
        if not self.sweep:
            return f"chunksize {self.chunksize} (fixed)"
        if len(self.sweep) == 1:
            return (
                f"chunksize {self.chunksize}: the only candidate small enough for "
                f"{self.calibration_messages:,} messages"
            )
        tried = ", ".join(
            f"{c}: {self.calibration_messages / t / 1e3:.1f}k/s" for c, t in self.sweep.items()
        )
        return (
            f"chunksize {self.chunksize}: the fastest on a "
            f"{self.calibration_messages:,}-message slice ({tried})"
        )

    def params(self) -> dict[str, Any]:
        return {
            "chunksize": self.chunksize,
            "chunksize_sweep_s": {str(k): round(v, 6) for k, v in self.sweep.items()},
            "calibration_messages": self.calibration_messages,
            "chunksize_choice": self.sweep_text(),
        }

    def fn(self) -> Callable[[Any], Any]:
        """The picklable callable for the pool: ``fn``, or the state wrapper around it."""
        if self.workload.init is None:
            return self.workload.fn
        return functools.partial(call_with_state, self.workload.fn)

    def initializer(self) -> tuple[Callable[..., Any] | None, tuple[Any, ...]]:
        """``(initializer, initargs)`` for the pool."""
        if self.workload.init is None:
            return None, ()
        return stdlib_init, (self.workload.init, self.workload.initargs)

    def map_chunked(self, messages: Sequence[Any], chunksize: int) -> Iterator[Any]:
        """The pool's map with this chunksize."""
        raise NotImplementedError

    def imap(self, messages: Sequence[Any]) -> Iterator[Any]:
        return self.map_chunked(messages, self.chunksize)

    def prepare(self, messages: Sequence[Any]) -> None:
        n = len(messages)
        warm = messages[: warm_count(n)]
        collections.deque(self.map_chunked(warm, max(1, len(warm) // (4 * self.workers))), 0)
        if len(self.candidates) == 1:
            return
        # A fifth of the messages (at least 2,000); candidates too large to give each worker
        # two chunks of the slice are left out (the smallest always runs).
        sample = messages[: min(n, max(n // 5, 2000))]
        fits = [c for c in self.candidates if c * 2 * self.workers <= len(sample)]
        for chunksize in fits or self.candidates[:1]:
            start = time.perf_counter()
            collections.deque(self.map_chunked(sample, chunksize), maxlen=0)
            self.sweep[chunksize] = time.perf_counter() - start
        self.chunksize = min(self.sweep, key=self.sweep.__getitem__)
        self.calibration_messages = len(sample)


class MpPoolEngine(ChunkedEngine):
    """``multiprocessing.Pool.imap(fn, messages, chunksize)``."""

    key = "pool"
    name = "mp.Pool.imap"

    def open(self) -> None:
        ctx = multiprocessing.get_context(self.config.start_method)
        initializer, initargs = self.initializer()

        def start() -> None:
            self._pool = ctx.Pool(self.workers, initializer=initializer, initargs=initargs)

        self._track_workers(start)

    def map_chunked(self, messages: Sequence[Any], chunksize: int) -> Iterator[Any]:
        return self._pool.imap(self.fn(), messages, chunksize=chunksize)


class ExecutorEngine(ChunkedEngine):
    """``concurrent.futures.ProcessPoolExecutor.map(fn, messages, chunksize=...)``."""

    key = "executor"
    name = "ProcessPoolExecutor.map"
    _ex: ProcessPoolExecutor | None = None

    def open(self) -> None:
        ctx = multiprocessing.get_context(self.config.start_method)
        initializer, initargs = self.initializer()

        def start() -> None:
            self._ex = ex = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=initializer, initargs=initargs
            )
            # The executor starts its processes on first use (one per submit under fork):
            # overlapping sleeps make it start all of them now.
            wait([ex.submit(time.sleep, 0.05) for _ in range(self.workers)])

        self._track_workers(start)

    def map_chunked(self, messages: Sequence[Any], chunksize: int) -> Iterator[Any]:
        assert self._ex is not None, "open() first"
        return self._ex.map(self.fn(), messages, chunksize=chunksize)

    def close(self, abort: bool = False) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True, cancel_futures=abort)


# -- peers (the bench extra) ---------------------------------------------------------------------

PEERS = {"mpire": "mpire", "joblib": "joblib"}  # engine key -> the module it needs


def installed(key: str) -> bool:
    """Whether engine ``key`` can run: always, unless it is a peer whose module is missing."""
    module = PEERS.get(key)
    return module is None or importlib.util.find_spec(module) is not None


class MpireEngine(ChunkedEngine):
    """``mpire.WorkerPool(n_jobs, keep_alive=True).imap(fn, messages, chunk_size=...)``."""

    key = "mpire"
    name = "mpire imap"

    def open(self) -> None:
        from mpire.pool import WorkerPool

        self._pool = WorkerPool(
            n_jobs=self.workers, start_method=self.config.start_method, keep_alive=True
        )
        # Made once: mpire restarts its workers when the function or worker_init changes.
        self._fn = self.fn()
        self._worker_init: Callable[[], None] | None = None
        if self.workload.init is not None:
            self._worker_init = functools.partial(
                stdlib_init, self.workload.init, self.workload.initargs
            )

    def prepare(self, messages: Sequence[Any]) -> None:
        # mpire starts its workers on the first map: they are the processes the warm-up starts.
        self._track_workers(lambda: ChunkedEngine.prepare(self, messages))

    def map_chunked(self, messages: Sequence[Any], chunksize: int) -> Iterator[Any]:
        results: Iterator[Any] = self._pool.imap(
            self._fn,
            messages,
            chunk_size=chunksize,
            worker_init=self._worker_init,
            iterable_len=len(messages),
        )
        return results

    def close(self, abort: bool = False) -> None:
        pool = getattr(self, "_pool", None)
        if pool is None:
            return
        if abort:
            pool.terminate()
        else:
            pool.stop_and_join()


class JoblibEngine(ChunkedEngine):
    """``joblib.Parallel(n_jobs, backend="loky", batch_size=..., return_as="generator")``.

    loky starts its workers its own way (``--start-method`` does not apply) and has no
    initializer: with ``--init``, each worker builds its state on its first message.
    """

    key = "joblib"
    name = "joblib loky"
    _joblib: Any = None  # the module, once open() imported it

    def open(self) -> None:
        import joblib

        self._joblib = joblib
        if self.workload.init is None:
            self._fn = self.workload.fn
        else:
            self._fn = functools.partial(
                call_with_lazy_state, self.workload.init, self.workload.initargs, self.workload.fn
            )

    def prepare(self, messages: Sequence[Any]) -> None:
        # loky starts its workers (a reusable executor) on first use.
        self._track_workers(lambda: ChunkedEngine.prepare(self, messages))

    def map_chunked(self, messages: Sequence[Any], chunksize: int) -> Iterator[Any]:
        delayed = self._joblib.delayed(self._fn)
        parallel = self._joblib.Parallel(
            n_jobs=self.workers, backend="loky", batch_size=chunksize, return_as="generator"
        )
        results: Iterator[Any] = parallel(delayed(m) for m in messages)
        return results

    def close(self, abort: bool = False) -> None:
        if self._joblib is None:
            return
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True, kill_workers=abort)


ENGINES: dict[str, type[BenchEngine]] = {
    "ordpool": OrdpoolEngine,
    "pool": MpPoolEngine,
    "executor": ExecutorEngine,
    "mpire": MpireEngine,
    "joblib": JoblibEngine,
}
