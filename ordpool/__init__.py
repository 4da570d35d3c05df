"""ordpool: ordered, CPU-parallel pipelines over worker processes.

Public API (everything else is private)::

    ProcessOrderedPool   worker processes; results in index order (imap, enqueue/results)
    OrderedProcessPoolExecutor  a drop-in concurrent.futures.ProcessPoolExecutor on the same engine
    OrderedStream        one of several ordered streams of a pool (ProcessOrderedPool.stream())
    Result               one item's outcome: index, value, error, get()
    KeyedPool, submit    per-key serial jobs returning futures (and a library-wide default pool)
    PoolStats, WorkerStats   frozen snapshots returned by every pool's stats()
    worker_local         a dict private to the current worker process
    cancelled            cooperative cancellation flag for long jobs
    OrdpoolError, BrokenPool, WorkerCrashed, WorkerInitError, PoolClosed, QueueFull,
    RemoteTraceback      the error model
"""

from ._core.errors import (
    BrokenPool,
    OrdpoolError,
    PoolClosed,
    RemoteTraceback,
    WorkerCrashed,
    WorkerInitError,
)
from ._core.routing import fnv1a
from ._core.stats import PoolStats, WorkerStats
from ._executor import BrokenProcessPool, OrderedProcessPoolExecutor
from ._keyed import KeyedPool, QueueFull, default_pool, submit
from ._pool import OrderedStream, ProcessOrderedPool, Result
from ._transport.worker import cancelled, worker_local

__version__ = "0.1.0"

__all__ = [
    "BrokenPool",
    "BrokenProcessPool",
    "KeyedPool",
    "OrderedProcessPoolExecutor",
    "OrderedStream",
    "OrdpoolError",
    "PoolClosed",
    "PoolStats",
    "ProcessOrderedPool",
    "QueueFull",
    "RemoteTraceback",
    "Result",
    "WorkerCrashed",
    "WorkerInitError",
    "WorkerStats",
    "__version__",
    "cancelled",
    "default_pool",
    "fnv1a",
    "submit",
    "worker_local",
]
