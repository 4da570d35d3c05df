"""ordpool: ordered, CPU-parallel pipelines over worker processes.

Public API (everything else is private)::

    ProcessOrderedPool   worker processes; results in index order (imap, enqueue/results)
    Result               one item's outcome: index, value, error, get()
    worker_local         a dict private to the current worker process
    cancelled            cooperative cancellation flag for long jobs
    OrdpoolError, BrokenPool, WorkerCrashed, WorkerInitError, PoolClosed, RemoteTraceback
"""

from ._errors import (
    BrokenPool,
    OrdpoolError,
    PoolClosed,
    RemoteTraceback,
    WorkerCrashed,
    WorkerInitError,
)
from ._pool import ProcessOrderedPool, Result
from ._worker import cancelled, worker_local

__version__ = "0.1.0"

__all__ = [
    "BrokenPool",
    "OrdpoolError",
    "PoolClosed",
    "ProcessOrderedPool",
    "RemoteTraceback",
    "Result",
    "WorkerCrashed",
    "WorkerInitError",
    "__version__",
    "cancelled",
    "worker_local",
]
