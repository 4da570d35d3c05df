"""Futures over a callback stream: the pieces the executor and the keyed pool share.

A job is one item of an :class:`~ordpool._core.streams.IndexedStream` whose answered batches
go to a callback; its ``concurrent.futures.Future`` is found by the item's index.
"""

from __future__ import annotations

from concurrent.futures import CancelledError, Future
from typing import Any, Callable, Mapping, Sequence

from .._core.batching import Task
from .coordinator import Engine

__all__ = ["JobFuture", "bind_futures", "complete_futures"]


class JobFuture(Future[Any]):
    """A ``concurrent.futures.Future`` whose ``cancel()`` also reaches a running job.

    As with the stdlib, a running job cannot be cancelled (``cancel()`` returns False), but
    its cooperative token is set: a long job that checks ``ordpool.cancelled()`` can stop
    early.

    Args:
        engine: returns the engine that runs the job (``None`` before it exists).
        slot: the worker slot a keyed job is routed to, or ``None``.
    """

    def __init__(self, engine: Callable[[], Engine | None], slot: int | None = None) -> None:
        super().__init__()
        self._engine = engine
        self._slot = slot
        self._where: tuple[Task, int] | None = None  # (task, position) once sent to a worker

    @property
    def slot(self) -> int | None:
        """The worker slot the job is routed to (``None``: any)."""
        return self._slot

    def cancel(self) -> bool:
        if super().cancel():
            return True
        where, engine = self._where, self._engine()
        if where is not None and engine is not None and self.running():
            engine.cancel_running(*where)
        return False


def bind_futures(task: Task, futures: Mapping[int, Future[Any]], *, start: bool) -> None:
    """A callback stream's ``on_send`` (engine lock held): remember where each job runs, for
    :meth:`JobFuture.cancel`. With ``start``, each PENDING future turns RUNNING now, and a job
    whose future was cancelled meanwhile fails its position with ``CancelledError`` (it is not
    run). A future RUNNING already is a task sent again after its worker died: it runs again.
    """
    indices, positions = task.batch.indices, task.positions
    for pos in range(task.n):
        if pos in task.failed:
            continue
        future = futures.get(indices[positions[pos] if positions is not None else pos])
        if start and (
            future is None or not (future.running() or future.set_running_or_notify_cancel())
        ):
            task.failed[pos] = CancelledError()
        elif isinstance(future, JobFuture):
            future._where = (task, pos)


def complete_futures(
    futures: Sequence[Future[Any] | None],
    values: list[Any],
    errors: dict[int, BaseException] | None,
    error_for: Callable[[BaseException], BaseException | None] | None = None,
) -> list[Future[Any]]:
    """Set each future's result or exception from a decoded batch (never under a lock: a
    future's callbacks run user code). ``error_for`` maps an item's error to the future's
    exception, or to ``None`` to leave that future pending for the caller: those futures are
    returned (the executor fails them all at once when the pool broke).
    """
    held: list[Future[Any]] = []
    for pos, future in enumerate(futures):
        if future is None:
            continue
        error = errors.get(pos) if errors else None
        if error is None:
            future.set_result(values[pos])
            continue
        exception = error if error_for is None else error_for(error)
        if exception is None:
            held.append(future)
        else:
            future.set_exception(exception)
    return held
