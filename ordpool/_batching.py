"""The batching window: items in, batches out. Pure data structures, no I/O, no threads.

A :class:`Batch` is a contiguous run of one stream's items, in submission order. Because
``enqueue`` only accepts strictly increasing indices, a batch's position in its stream (``seq``)
orders it exactly as its indices do, so the reorder stage works per batch, never per item.

The classes here are used under the engine's lock (``Batcher``) or from a single thread
(``BatchSizer``); they do no locking themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Batch", "BatchSizer", "Batcher", "compact_indices"]


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


@dataclass(eq=False)
class Batch:
    """One batch of a stream, from the moment it is encoded until its results are consumed.

    Attributes:
        bid: engine-wide batch id, written in the wire header (``17``).
        seq: position of the batch in its stream; the reorder heap key (``3``).
        stream: the stream the batch belongs to.
        indices: the user's indices of the items (``range(3000, 4000)`` or ``[5, 9, 12]``).
        parts: the encoded items as a list of buffers (see :mod:`ordpool._wire`): the items'
            own ``bytes`` objects when they are bytes, so nothing is copied before the wire.
        failed: items that fail without running: position in batch -> exception (an item that
            could not be pickled, or one whose worker crashed and has no retries left).
        attempts: position -> times the item was running when its worker died.
        slot: the worker slot a keyed batch must run on, or ``None`` for any worker.
        frame: the pickled results once answered, else ``None``.
    """

    bid: int
    seq: int
    stream: Any
    indices: range | list[int]
    parts: list[Any]
    failed: dict[int, BaseException] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    slot: int | None = None
    frame: Any = None

    def __len__(self) -> int:
        return len(self.indices)


class Batcher:
    """Collects ``(index, item)`` pairs of one stream into runs, rejecting non-increasing indices.

    Example:
        >>> b = Batcher()
        >>> b.add(10, "a"), b.add(12, "b")
        (1, 2)
        >>> b.take()
        ([10, 12], ['a', 'b'])
        >>> b.add(11, "c")
        Traceback (most recent call last):
        ...
        ValueError: index 11 is not greater than the previous index 12
    """

    __slots__ = ("indices", "items", "last_index")

    def __init__(self) -> None:
        self.items: list[Any] = []  # the pending items, in index order
        self.indices: list[int] = []  # their indices, strictly increasing ([10, 12])
        self.last_index: int | None = None  # the last index accepted, ever (12)

    def check(self, index: int) -> None:
        """Raise ``TypeError``/``ValueError`` unless ``index`` may come next."""
        if type(index) is not int:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(f"index must be an int, not {type(index).__name__}")
            index = int(index)
        if self.last_index is not None and index <= self.last_index:
            raise ValueError(
                f"index {index} is not greater than the previous index {self.last_index}"
            )

    def add(self, index: int, item: Any) -> int:
        """Append one item; returns the number of pending items."""
        self.check(index)
        self.last_index = index
        self.indices.append(index)
        self.items.append(item)
        return len(self.items)

    def take(self) -> tuple[list[int], list[Any]]:
        """Remove and return all pending ``(indices, items)``."""
        indices, items = self.indices, self.items
        self.indices, self.items = [], []
        return indices, items

    def __len__(self) -> int:
        return len(self.items)


class BatchSizer:
    """Chooses how many items go in a batch, from the measured per-item cost.

    The aim is batches that take about ``target`` seconds of worker time: long enough that the
    parent's per-batch overhead (a few tens of microseconds: a pipe write, a thread wake-up, a
    heap push) is small per item, short enough that results flow steadily and memory stays low.

    Example:
        >>> s = BatchSizer(target=0.005, initial=16, maximum=4096)
        >>> s.observe(100, 0.001)  # 10 us per item -> 500 items take 5 ms
        >>> s.size
        500
        >>> BatchSizer(fixed=64).size
        64
    """

    __slots__ = ("_cost", "fixed", "maximum", "minimum", "size", "target")

    def __init__(
        self,
        fixed: int | None = None,
        *,
        target: float = 0.02,
        initial: int = 16,
        minimum: int = 1,
        maximum: int = 4096,
    ) -> None:
        self.fixed = fixed
        self.target = target  # seconds of worker time one batch should take
        self.minimum = minimum
        self.maximum = maximum
        self._cost: float | None = None  # smoothed seconds per item (8e-6), None until measured
        self.size = fixed if fixed is not None else max(minimum, min(initial, maximum))

    def observe(self, n_items: int, seconds: float) -> None:
        """Fold one batch's measured worker time into the estimate."""
        if self.fixed is not None or n_items <= 0:
            return
        cost = max(seconds, 1e-9) / n_items
        # Exponential smoothing, with weight growing with the batch size: one tiny batch that
        # hit a page fault must not halve the batch size.
        weight = min(1.0, n_items / 256)
        self._cost = cost if self._cost is None else self._cost + 0.5 * weight * (cost - self._cost)
        ideal = self.target / self._cost
        self.size = int(max(self.minimum, min(self.maximum, math.floor(ideal))))

    def limit(self, maximum: int) -> None:
        """Lower the ceiling (the window must hold a few batches per worker)."""
        self.maximum = max(self.minimum, maximum)
        if self.fixed is None:
            self.size = min(self.size, self.maximum)

