"""The batching window: items in, batches out. Pure data structures, no I/O, no threads.

A :class:`Batch` is a contiguous run of one stream's items, in submission order. Because
``enqueue`` only accepts strictly increasing indices, a batch's position in its stream (``seq``)
orders it exactly as its indices do, so the reorder stage works per batch, never per item.
A :class:`Task` is what one worker runs: the whole batch, or, when keys route items to
different workers, the batch's items for one worker.

The classes here are used under the engine's lock (``Batcher``) or from a single thread
(``BatchSizer``); they do no locking themselves.
"""

from __future__ import annotations

import operator
from collections import deque
from itertools import pairwise
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .streams import Stream

__all__ = ["Batch", "BatchSizer", "Batcher", "Task", "check_run", "compact_indices"]


def compact_indices(indices: list[int]) -> range | list[int]:
    """Return ``indices`` as a ``range`` when it is a contiguous run (the common case).

    A range costs a few bytes whatever its length and iterates in C; gaps (Kafka offsets) keep
    the list.

    >>> compact_indices([5, 6, 7])
    range(5, 8)
    >>> compact_indices([5, 7])
    [5, 7]
    """
    if indices and indices[-1] - indices[0] == len(indices) - 1:
        return range(indices[0], indices[-1] + 1)
    return indices


class Task:
    """What one worker runs: all of a batch, or (keyed streams) the items routed to one worker.

    Attributes:
        batch: the batch the items belong to.
        bid: engine-wide id of this task, written in the wire header (``17``).
        slot: the worker slot the task must run on, or ``None`` for the least-loaded worker.
        positions: positions of the task's items in the batch (``[0, 3, 4]``), or ``None`` for
            all of them in order (the unkeyed case).
        payload: the encoded items (:class:`~.wire.Payload`): the items' own ``bytes``
            objects when they are bytes, so nothing is copied before the wire; ``None`` once
            sent and answered, or when nothing is to be sent.
        failed: items that fail without running, by position in the task: an item that could not
            be pickled, or one whose worker died too often (``{2: WorkerCrashed(...)}``).
        attempts: position in the task -> times it was running when its worker died.
        rerun: the task's worker died after running every item (while sending the results):
            no item was blamed, and the task runs once more, once.
        late_deaths: deaths that blamed only items already failed: counted against the task
            (see ``Supervisor._blame``).
        frame: the pickled results once answered, else ``None``.
        skip: positions at the front of ``frame`` that are not this task's (a view of a
            task's later positions, whose earlier ones were delivered in parts): 0.
    """

    __slots__ = (
        "attempts",
        "batch",
        "bid",
        "failed",
        "frame",
        "late_deaths",
        "n",
        "payload",
        "positions",
        "rerun",
        "skip",
        "slot",
    )

    def __init__(
        self,
        batch: Batch,
        bid: int,
        n: int,
        payload: Any,
        failed: dict[int, BaseException],
        slot: int | None = None,
        positions: list[int] | None = None,
    ) -> None:
        self.batch = batch
        self.bid = bid
        self.n = n  # number of items
        self.payload = payload
        self.failed = failed
        self.slot = slot
        self.positions = positions
        self.attempts: dict[int, int] = {}
        self.rerun = False
        self.skip = 0
        self.late_deaths = 0
        self.frame: Any = None

    def __repr__(self) -> str:
        return f"<Task bid={self.bid} seq={self.batch.seq} n={self.n} slot={self.slot}>"


class Batch:
    """A contiguous run of one stream's items: the unit of ordering.

    Attributes:
        seq: position of the batch in its stream; the reorder heap key (``3``).
        stream: the stream the batch belongs to.
        indices: the user's indices of the items (``range(3000, 4000)`` or ``[5, 9, 12]``).
        tasks: the tasks carrying the items to workers (one, unless keys split the batch).
        unanswered: tasks still running; the batch is delivered when it reaches 0.
        parts: results that arrived while the batch ran, ``(first position in the payload,
            first position to deliver, end, payload)``, until the consumer takes them; ``None``
            for a batch that got none.
        taken: positions ``[0, taken)`` arrived in parts: its RESULT delivers the rest.
    """

    __slots__ = ("indices", "parts", "seq", "stream", "taken", "tasks", "unanswered")

    def __init__(self, seq: int, stream: Stream, indices: range | list[int]) -> None:
        self.seq = seq
        self.stream = stream
        self.indices = indices
        self.tasks: list[Task] = []
        self.unanswered = 0
        self.parts: deque[tuple[int, int, int, Any]] | None = None
        self.taken = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"<Batch seq={self.seq} n={len(self)} tasks={len(self.tasks)}>"


def _not_an_int(index: Any) -> str:
    """The message for an index that is not an int (numpy's integers are not: ``int()``)."""
    convertible = hasattr(index, "__index__") and not isinstance(index, bool)
    hint = " (convert it with int())" if convertible else ""
    return f"index must be an int, not {type(index).__name__}{hint}"


def check_run(indices: list[int]) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``indices`` are ints, strictly increasing (at
    C speed where they are all plain ints).

    >>> check_run([1, 5, 9])
    >>> check_run([1, 5, 5])
    Traceback (most recent call last):
    ...
    ValueError: index 5 is not greater than the previous index 5
    >>> check_run([1, 2.0])
    Traceback (most recent call last):
    ...
    TypeError: index must be an int, not float
    """
    if set(map(type, indices)) - {int}:
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(_not_an_int(index))
    if len(indices) > 1 and any(map(operator.ge, indices[:-1], indices[1:])):
        bad = next(i for i, (a, b) in enumerate(pairwise(indices)) if a >= b)
        raise ValueError(
            f"index {indices[bad + 1]} is not greater than the previous index {indices[bad]}"
        )


class Batcher:
    """Collects ``(index, item)`` pairs of one stream into runs, rejecting non-increasing indices.

    Examples:
        >>> b = Batcher()
        >>> b.add(10, "a"), b.add(12, "b")
        (1, 2)
        >>> b.take()
        ([10, 12], ['a', 'b'], [])
        >>> b.add(11, "c")
        Traceback (most recent call last):
        ...
        ValueError: index 11 is not greater than the previous index 12
    """

    __slots__ = ("indices", "items", "last_index", "slots")

    def __init__(self) -> None:
        self.items: list[Any] = []  # the pending items, in index order
        self.indices: list[int] = []  # their indices, strictly increasing ([10, 12])
        self.slots: list[int] = []  # keyed streams: the worker slot of each item ([3, 0])
        self.last_index: int | None = None  # the last index accepted, ever (12)

    def check(self, index: int) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``index`` may come next."""
        if type(index) is not int:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(_not_an_int(index))
            index = int(index)
        if self.last_index is not None and index <= self.last_index:
            raise ValueError(
                f"index {index} is not greater than the previous index {self.last_index}"
            )

    def add(self, index: int, item: Any, slot: int | None = None) -> int:
        """Append one item (routed to worker ``slot`` if given); returns the pending count."""
        self.check(index)
        self.last_index = index
        self.indices.append(index)
        self.items.append(item)
        if slot is not None:
            self.slots.append(slot)
        return len(self.items)

    def extend(
        self,
        indices: list[int],
        items: list[Any],
        slots: list[int] | None = None,
        *,
        checked: bool = False,
    ) -> int:
        """Append many items at once (their indices strictly increasing, after the last one);
        returns the pending count. Nothing is added when an index is out of order.
        ``checked``: the caller ran :func:`check_run` on them already (only the first is
        checked against the last index then).

        >>> b = Batcher()
        >>> b.extend([3, 7, 9], "abc")
        3
        >>> b.extend([9, 10], "de")
        Traceback (most recent call last):
        ...
        ValueError: index 9 is not greater than the previous index 9
        """
        if not indices:
            return len(self.items)
        if not checked:
            check_run(indices)
        self.check(indices[0])
        self.last_index = indices[-1]
        self.indices += indices
        self.items += items
        if slots is not None:
            self.slots += slots
        return len(self.items)

    def take(self) -> tuple[list[int], list[Any], list[int]]:
        """Remove and return all pending ``(indices, items, slots)``."""
        indices, items, slots = self.indices, self.items, self.slots
        self.indices, self.items, self.slots = [], [], []
        return indices, items, slots

    def __len__(self) -> int:
        return len(self.items)


class BatchSizer:
    """Chooses how many items go in a batch, from the measured per-item cost.

    The aim is batches that take about ``target`` seconds of worker time: long enough that the
    parent's per-batch costs (pipe writes, thread wake-ups and switches, the engine's
    bookkeeping) are small per item, short enough that results flow steadily and memory stays
    low. The default target, 40 ms, was chosen by measuring the parent's CPU per message
    against the batch length (docs/design.md, "Constants and the measurements behind them").
    Pass ``batch_size`` where latency matters more.

    A batch is also kept under ``max_bytes`` (when set) of items in, or of results out, from
    the sizes measured so far (:meth:`observe_bytes`): the transport's shared-memory regions
    hold a payload that size, and a larger one takes the slower way through a pipe.

    Examples:
        >>> s = BatchSizer(target=0.005, initial=16, maximum=4096)
        >>> s.observe(100, 0.001)  # 10 us per item: 500 items take 5 ms
        >>> s.size
        500
        >>> s.max_bytes = 100_000
        >>> s.observe_bytes(100, 1_000_000)  # 10 KB per item: 10 of them fill 100 KB
        >>> s.size
        10
        >>> BatchSizer(fixed=64).size
        64
    """

    __slots__ = ("_bytes", "_cost", "fixed", "max_bytes", "maximum", "minimum", "size", "target")

    def __init__(
        self,
        fixed: int | None = None,
        *,
        target: float = 0.04,
        initial: int = 16,
        minimum: int = 1,
        maximum: int = 4096,
        max_bytes: int | None = None,
    ) -> None:
        self.fixed = fixed
        self.target = target  # seconds of worker time one batch should take
        self.minimum = minimum
        self.maximum = maximum
        self.max_bytes = max_bytes  # bytes of items (or results) one batch may carry
        self._cost: float | None = None  # smoothed seconds per item (8e-6), None until measured
        self._bytes = [0.0, 0.0]  # bytes per item in, and per result out (600.0, 150.0)
        self.size = fixed if fixed is not None else max(minimum, min(initial, maximum))

    def observe(self, n_items: int, seconds: float) -> None:
        """Fold one batch's measured worker time into the estimate."""
        if self.fixed is not None or n_items <= 0:
            return
        cost = max(seconds, 1e-9) / n_items
        if self._cost is None:
            self._cost = cost
        else:
            # Exponential smoothing, with weight growing with the batch size, and one sample
            # counted as at most 4x the estimate: a tiny batch holding one very slow item (or
            # hit by a page fault) must not cut the batch size; a real change shows in several.
            # Items found cheaper than estimated are trusted sooner: a batch of the current
            # size (up to 256) weighs fully, so that after a slow first batch (cold workers)
            # the size leaves its starting 16 within a few batches, not hundreds.
            full = 256 if cost > self._cost else min(self.size, 256)
            weight = min(1.0, n_items / full)
            cost = min(cost, 4 * self._cost)
            self._cost += 0.5 * weight * (cost - self._cost)
        self._resize()

    def observe_bytes(self, n_items: int, nbytes: int, *, results: bool = False) -> None:
        """Fold the size of one batch's items (or, with ``results``, of its results) into the
        byte limit: larger ones count at once, smaller ones bring the estimate down slowly."""
        if self.fixed is not None or n_items <= 0 or self.max_bytes is None:
            return
        per_item = nbytes / n_items
        known = self._bytes[results]
        if per_item >= known:
            self._bytes[results] = per_item
        else:
            self._bytes[results] = known + 0.1 * (per_item - known)
        self._resize()

    def _resize(self) -> None:
        ideal = self.maximum if self._cost is None else self.target / self._cost
        per_item = max(self._bytes)
        if self.max_bytes is not None and per_item > 0:
            ideal = min(ideal, self.max_bytes / per_item)
        if self._cost is None and ideal >= self.size:
            return  # nothing measured of the time yet: keep the initial size
        self.size = int(max(self.minimum, min(self.maximum, round(ideal))))

    def limit(self, maximum: int) -> None:
        """Lower the ceiling (the window must hold a few batches per worker)."""
        self.maximum = max(self.minimum, maximum)
        if self.fixed is None:
            self.size = min(self.size, self.maximum)
