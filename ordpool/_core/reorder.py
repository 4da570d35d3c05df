"""The reorder stage: a min-heap that releases result batches in ascending order.

Pure data structure: no I/O, no threads, no locking (the engine calls it under its lock).

Batches of one stream are numbered ``seq = 0, 1, 2, ...`` in submission order, and a batch is a
contiguous run of that stream's indices, so releasing batches in ascending ``seq`` releases items
in ascending ``index``, gaps included. Heap work is per batch (``O(log b)`` for ``b`` batches
waiting), never per item.
"""

from __future__ import annotations

import heapq
from typing import Generic, TypeVar

__all__ = ["ReorderBuffer"]

T = TypeVar("T")


class ReorderBuffer(Generic[T]):
    """Holds out-of-order entries until every earlier ``seq`` has arrived.

    Example:
        >>> r = ReorderBuffer()
        >>> r.push(1, "b", size=10)
        >>> r.pop() is None          # seq 0 is still missing
        True
        >>> r.push(0, "a", size=5)
        >>> r.pop(), r.pop(), r.pop()
        ('a', 'b', None)
        >>> r.peak_items
        15
    """

    __slots__ = ("_heap", "_next", "items", "peak_items")

    def __init__(self, first_seq: int = 0) -> None:
        self._heap: list[tuple[int, int, T]] = []  # (seq, size, entry), min-heap on seq
        self._next = first_seq  # the seq that must be released next (42)
        self.items = 0  # items held in the heap right now (sum of sizes)
        self.peak_items = 0  # the most items ever held at once

    def push(self, seq: int, entry: T, size: int = 1) -> None:
        """Add the entry for ``seq``. Raises ``ValueError`` for a seq already released."""
        if seq < self._next:
            raise ValueError(f"seq {seq} was already released (next is {self._next})")
        heapq.heappush(self._heap, (seq, size, entry))
        self.items += size
        if self.items > self.peak_items:
            self.peak_items = self.items

    def pop(self) -> T | None:
        """Remove and return the entry for the next seq, or ``None`` if it has not arrived."""
        heap = self._heap
        if heap and heap[0][0] == self._next:
            _, size, entry = heapq.heappop(heap)
            self._next += 1
            self.items -= size
            return entry
        return None

    @property
    def next_seq(self) -> int:
        """The seq the buffer is waiting for."""
        return self._next

    def __len__(self) -> int:
        """Number of entries (batches) waiting."""
        return len(self._heap)
