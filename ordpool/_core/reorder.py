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

    It also measures the *hold*: how long an entry waited for a predecessor, from its
    ``push`` until every earlier seq had arrived (an entry that arrives in order holds for 0).
    Waiting for the consumer afterwards is not hold: it tells a slow item (results held back
    behind it) from a slow consumer.

    Examples:
        >>> r = ReorderBuffer()
        >>> r.push(1, "b", size=10, nbytes=100, now=5.0)
        0.0
        >>> r.pop() is None, r.held_bytes   # seq 0 is still missing: "b" is held
        (True, 100)
        >>> r.push(0, "a", size=5, nbytes=40, now=5.5)  # "b" held 0.5 s: 10 items x 0.5 s
        5.0
        >>> r.held_bytes, r.max_hold, r.items   # nothing held; 15 items wait for the consumer
        (0, 0.5, 15)
        >>> r.pop(), r.pop(), r.pop()
        ('a', 'b', None)
        >>> r.peak_items
        15
    """

    __slots__ = (
        "_heap",
        "_next",
        "_ready_next",
        "_waiting",
        "held_bytes",
        "items",
        "max_hold",
        "peak_items",
    )

    def __init__(self, first_seq: int = 0) -> None:
        self._heap: list[tuple[int, int, int, T]] = []  # (seq, size, nbytes, entry), on seq
        self._next = first_seq  # the seq that must be released next (42)
        self._ready_next = first_seq  # the first seq not arrived yet (45: 42 to 44 are in)
        # seq -> (pushed at, size, nbytes) of the entries waiting for a predecessor
        self._waiting: dict[int, tuple[float, int, int]] = {}
        self.items = 0  # items in the heap right now (sum of sizes), held or not
        self.held_bytes = 0  # bytes of the entries waiting for a predecessor right now
        self.peak_items = 0  # the most items ever held at once
        self.max_hold = 0.0  # the longest an entry waited for a predecessor, in seconds

    def push(self, seq: int, entry: T, size: int = 1, nbytes: int = 0, now: float = 0.0) -> float:
        """Add the entry for ``seq`` (``size`` items, ``nbytes`` bytes, arrived at ``now``).

        Returns the item-seconds of hold that ended with this push: the entries it made
        releasable, each ``size x`` how long it waited. Raises ``ValueError`` for a seq
        already released.
        """
        if seq < self._next:
            raise ValueError(f"seq {seq} was already released (next is {self._next})")
        heapq.heappush(self._heap, (seq, size, nbytes, entry))
        self.items += size
        if self.items > self.peak_items:
            self.peak_items = self.items
        if seq != self._ready_next:
            self._waiting[seq] = (now, size, nbytes)
            self.held_bytes += nbytes
            return 0.0
        self._ready_next += 1
        held = 0.0
        waiting = self._waiting
        while waiting and self._ready_next in waiting:
            pushed_at, n, nbytes = waiting.pop(self._ready_next)
            self._ready_next += 1
            self.held_bytes -= nbytes
            hold = now - pushed_at
            held += hold * n
            if hold > self.max_hold:
                self.max_hold = hold
        return held

    def pop(self) -> T | None:
        """Remove and return the entry for the next seq, or ``None`` if it has not arrived."""
        heap = self._heap
        if heap and heap[0][0] == self._next:
            _, size, _, entry = heapq.heappop(heap)
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
