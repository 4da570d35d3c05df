"""The consumer's side of a batch: its values unpickled, at once or a chunk at a time, and the
shared loop that hands them out in order, a KeyboardInterrupt included.

Runs in the consumer's thread (or, for callback streams, the thread completing futures), never
under the engine's lock: unpickling is the consumer's cost, not the transport thread's.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Generator, TypeVar

from .._core.batching import Batch, Task
from .._transport import wire as _wire

__all__ = [
    "SKIP",
    "Interrupted",
    "batch_values",
    "chunks_retrying",
    "decode",
    "decode_retrying",
    "lazy_values",
    "release",
    "retrying",
]

T = TypeVar("T")
SKIP = _wire.SKIP  # on_error's answer for "leave this value out"

_CONSUMED = b"(consumed)"  # Task.frame once the consumer took the payload


def lazy_values(
    batch: Batch,
    on_error: Callable[[int, BaseException], Any] | None = None,
    result: type | None = None,
) -> _wire.ChunkValues | None:
    """The batch's values unpickled a chunk at a time as they are iterated, or ``None`` when
    the batch cannot go that way (no item gave a result, errors in the batch, a keyed
    batch merged from several tasks): then use :func:`decode`. Each value of a chunk
    that cannot be unpickled here goes to ``on_error(position, error)``; with ``result``,
    the iterator yields ``result((index, value, error))`` instead (see
    :func:`_wire.iter_values`).
    """
    tasks = batch.tasks
    if len(tasks) != 1:
        return None
    task = tasks[0]
    if task.positions is not None or task.failed or task.frame is None or task.skip:
        return None
    values = _wire.iter_values(task.frame, on_error, batch.indices, result)
    if values is not None:
        task.frame = _CONSUMED  # the iterator holds the payload now (see :func:`decode`)
    return values


def decode(
    batch: Batch,
    *,
    interruptible: bool = False,
    failures: list[BaseException] | None = None,
) -> tuple[list[Any], dict[int, BaseException] | None]:
    """Values and errors (by position in the batch) of an answered batch.

    A result that cannot be unpickled is its items' error. So is a ``KeyboardInterrupt``
    while unpickling, unless ``interruptible`` (a consumer's thread): then it propagates,
    and decoding the batch again retries it; the caller releases the batch with
    :meth:`release` once it holds the values (a Ctrl-C can land anywhere before that).
    Otherwise the batch is released here.

    With ``failures``, the errors that are not an item's own are also appended there: results
    that could not be unpickled here, and items that the worker could not unpickle (the
    executor breaks on those, as the standard library's does).
    """
    tasks = batch.tasks
    if len(tasks) == 1 and tasks[0].positions is None:
        decoded = _decode_task(tasks[0], interruptible, failures)
    else:
        values: list[Any] = [None] * len(batch)
        errors: dict[int, BaseException] = {}
        for task in tasks:
            task_values, task_errors = _decode_task(task, interruptible, failures)
            positions = task.positions
            if positions is None:
                positions = list(range(task.n))
            for pos, value in zip(positions, task_values):
                values[pos] = value
            if task_errors:
                for pos, err in task_errors.items():
                    errors[positions[pos]] = err
        decoded = values, errors or None
    if not interruptible:
        release(batch)
    return decoded


def release(batch: Batch) -> None:
    """Drop a decoded batch's payloads now rather than at the cyclic GC's next pass (a
    batch and its tasks refer to each other): their buffers are then free for the next
    results (``_Worker._copy_out``)."""
    for task in batch.tasks:
        if task.frame is not None:
            task.frame = _CONSUMED


def retrying(call: Callable[[], T]) -> Generator[Interrupted, None, T]:
    """``call()`` for a consumer's batch generator (``yield from`` it): a KeyboardInterrupt in
    it is yielded as :class:`Interrupted`, and ``call()`` made again once the consumer iterates
    again. ``call`` must leave things as they were when interrupted (decoding a batch, loading
    a chunk: :func:`decode`, ``wire.ChunkValues.next_chunk``)."""
    while True:
        try:
            return call()
        except KeyboardInterrupt as exc:
            interrupted = Interrupted(exc)
        # Yielded outside the except block: a suspended generator holding the exception (whose
        # traceback holds the generator) would be a reference cycle, and a consumer that leaves
        # would not release its stream until the next GC pass.
        yield interrupted


def chunks_retrying(lazy: _wire.ChunkValues) -> Generator[Any, None, None]:
    """The chunks of a batch's lazily unpickled values, for a consumer's batch generator
    (``yield from`` it), a KeyboardInterrupt while one loads yielded as by :func:`retrying`."""
    while (chunk := (yield from retrying(lazy.next_chunk))) is not None:
        yield chunk


def decode_retrying(
    batch: Batch,
) -> Generator[Interrupted, None, tuple[list[Any], dict[int, BaseException] | None]]:
    """``decode(batch)`` through :func:`retrying`. Returns the values and errors; the
    caller releases the batch (:func:`release`) once it holds them."""
    return retrying(functools.partial(decode, batch, interruptible=True))


class Interrupted:
    """What a consumer's batch generator yields when a ``KeyboardInterrupt`` hit it while it
    decoded a batch: an iterator that raises the interrupt once, then is empty.

    The generator cannot let the interrupt propagate (that would finish it: the iteration
    would end there, the rest of the stream silently lost). Yielded to
    ``chain.from_iterable``, this object raises it to the consumer instead, and ``chain`` keeps
    it as its current iterator; iterating again finds it empty, resumes the generator, and the
    generator decodes the same batch again.
    """

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc: BaseException | None = exc

    def __iter__(self) -> Interrupted:
        return self

    def __next__(self) -> Any:
        if self.exc is None:
            raise StopIteration
        try:
            raise self.exc  # no local holds it: that frame would make a cycle with it
        finally:
            self.exc = None


def _decode_task(
    task: Task, interruptible: bool = False, failures: list[BaseException] | None = None
) -> tuple[list[Any], dict[int, BaseException] | None]:
    """Values and errors (by position in the task) of an answered task, local failures merged."""
    n = task.n
    frame = task.frame
    if frame is None:
        return [None] * n, dict(task.failed)
    if frame is _CONSUMED:  # pragma: no cover - a bug of ours, never a user error
        raise AssertionError(f"{task!r} was decoded twice")
    try:
        values, errors = _wire.decode_results(frame)
    except BaseException as exc:  # becomes each item's error
        if interruptible and isinstance(exc, KeyboardInterrupt):
            raise  # not the batch's fault: the consumer decodes it again
        err = _wire.UnpicklingResultError(f"could not unpickle the results of this batch: {exc!r}")
        err.__cause__ = exc
        if failures is not None:
            failures.append(err)
        return [None] * n, {pos: err for pos in range(n)}
    if errors and _wire.WHOLE_TASK in errors:
        every = errors[_wire.WHOLE_TASK]
        if failures is not None:
            failures.append(every)
        values = [None] * n
        errors = {pos: every for pos in range(n)}
    elif task.skip or len(values) != n:  # a view of later positions (see Delivery)
        skip = task.skip
        values = values[skip : skip + n]
        if errors:
            errors = {pos - skip: err for pos, err in errors.items() if skip <= pos < skip + n}
    if failures is not None and errors:
        failures.extend(e for e in errors.values() if isinstance(e, _wire.UnpicklingResultError))
    if task.failed:
        errors = {**(errors or {}), **task.failed}
    return values, errors or None


def batch_values(
    batch: Batch, on_error: Callable[[int, BaseException], Any]
) -> Generator[Any, None, None]:
    """A consumer's values of one answered batch, for its batch generator (``yield from`` it):
    iterables of values, in order, to hand out through ``chain.from_iterable``.

    A failed item (a value that cannot be unpickled included) goes to
    ``on_error(position, error)``, which returns the value to hand out in its place, returns
    :data:`SKIP` to leave it out, or raises: then the values before it are handed out first,
    and the exception ends the iteration at the item's position. Results come a chunk at a
    time where the batch allows (:func:`lazy_values`), else the batch is decoded whole; a
    KeyboardInterrupt while either happens reaches the consumer without ending the iteration
    (:func:`retrying`).
    """
    lazy = lazy_values(batch, on_error)
    if lazy is not None:
        yield from chunks_retrying(lazy)
        return
    # the consumer gets a Ctrl-C there; iterating again decodes the batch again
    values, errors = yield from decode_retrying(batch)
    release(batch)
    if errors is None:
        yield values
        return
    out: list[Any] = []
    start = 0
    for pos in sorted(errors):
        out += values[start:pos]
        start = pos + 1
        try:
            value = on_error(pos, errors[pos])
        except BaseException as exc:
            # Without its traceback, which holds this very frame: suspended at the yield
            # below, the generator would otherwise keep itself, the exception and the batch's
            # values alive as a cycle until the cyclic GC's next pass.
            stop: BaseException | None = exc.with_traceback(None)
        else:
            stop = None
            if value is not SKIP:
                out.append(value)
        if stop is not None:
            yield out  # the values before the failed item, then the failure
            try:
                raise stop
            finally:
                stop = None
    out += values[start:]
    yield out
