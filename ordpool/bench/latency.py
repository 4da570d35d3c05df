"""The arithmetic of ``ordpool bench --stream``: the due-time schedule, percentiles, and the
latency summary of one open-loop run. Pure functions and records: no clock, no thread.

An open loop at ``rate`` items per second over ``duration`` seconds::

    item i is due at   start + i / rate            (i = 0 .. total - 1, total = duration * rate)
    its latency is     received[i] - due(i)        (the consumer's clock, in input order)

Measuring from the due time, not from when the pool accepted the item, avoids *coordinated
omission*: a pool that falls behind makes the producer late, and a closed loop (or a
latency measured from the moment of submission) would not count the time the item waited to
be submitted. Here the backlog shows up as latency, as it does for a consumer of a Kafka
partition that is produced at a steady rate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "BEFORE_SLOW",
    "LatencySummary",
    "Schedule",
    "is_slow",
    "percentile",
    "summarize_latencies",
]

# Items just before each slow item whose latency is reported apart: the ones a slow item can
# hold back when results wait for the rest of their batch (or chunk) before they are sent.
BEFORE_SLOW = 5


@dataclass(frozen=True)
class Schedule:
    """When each item of an open loop is due.

    Attributes:
        rate: items per second (``60_000.0``).
        total: items in the run (``300_000``).
        start: ``time.perf_counter()`` value at which item 0 is due.

    Example:
        >>> s = Schedule(rate=1000.0, total=5, start=10.0)
        >>> s.due(0), s.due(4)
        (10.0, 10.004)
        >>> s.due_count(10.0025)  # items 0, 1 and 2 are due
        3
    """

    rate: float
    total: int
    start: float = 0.0

    @classmethod
    def for_duration(cls, rate: float, duration: float, start: float = 0.0) -> Schedule:
        """The items due in ``duration`` seconds at ``rate``: ``int(rate * duration)``, at least 1.

        >>> Schedule.for_duration(2000, 1.5).total
        3000
        """
        return cls(rate, max(1, int(rate * duration)), start)

    def due(self, i: int) -> float:
        """When item ``i`` is due: ``start + i / rate``."""
        return self.start + i / self.rate

    def due_count(self, now: float) -> int:
        """How many items are due at ``now`` (items ``0 .. n - 1``), at most ``total``.

        >>> s = Schedule(rate=100.0, total=3, start=5.0)
        >>> [s.due_count(t) for t in (4.99, 5.0, 5.015, 6.0)]
        [0, 1, 2, 3]
        """
        if now < self.start:
            return 0
        # The float product can land just under an integer: the due() of the count it gives
        # must not be later than now, nor the next one earlier.
        n = math.floor((now - self.start) * self.rate) + 1
        while n < self.total and self.due(n) <= now:
            n += 1
        while n > 0 and self.due(n - 1) > now:
            n -= 1
        return min(n, self.total)

    def latencies(self, received: Sequence[float]) -> list[float]:
        """Each item's latency in seconds: ``received[i] - due(i)``."""
        start, rate = self.start, self.rate
        return [t - (start + i / rate) for i, t in enumerate(received)]


def is_slow(i: int, slow_every: int | None) -> bool:
    """Whether item ``i`` is a slow one: every ``slow_every``-th (``i % N == N - 1``).

    >>> [i for i in range(10) if is_slow(i, 4)]
    [3, 7]
    >>> is_slow(3, None)
    False
    """
    return slow_every is not None and slow_every > 0 and i % slow_every == slow_every - 1


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 < q <= 100) of ``ordered`` (sorted ascending), nearest rank.

    The nearest-rank value is one that was observed: the p99.9 of 2,000 latencies is the
    second largest, not a blend of two.

    Raises:
        ValueError: ``ordered`` is empty or ``q`` is out of range.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 100)
    (2.0, 4.0)
    >>> percentile(list(range(1, 2001)), 99.9)
    1998
    """
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 < q <= 100:
        raise ValueError(f"q must be in (0, 100], got {q}")
    rank = math.ceil(q / 100 * len(ordered) - 1e-9)  # 1-based; the epsilon absorbs float noise
    return ordered[max(rank, 1) - 1]


def _median_ms(values: list[float]) -> float | None:
    return percentile(sorted(values), 50) * 1e3 if values else None


@dataclass(frozen=True)
class LatencySummary:
    """Latency percentiles of one run, in milliseconds.

    Attributes:
        p50_ms, p99_ms, p999_ms, max_ms: over every item.
        mean_ms: the mean over every item.
        slow_items: items that slept (``--slow-every``); 0 without it.
        slow_p50_ms: median of the slow items themselves (``None`` without them).
        before_slow_p50_ms: median of the :data:`BEFORE_SLOW` items just before each slow
            item (``None`` without slow items).
        other_p50_ms: median of every other item: neither slow nor just before one (``None``
            without slow items).
    """

    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    slow_items: int = 0
    slow_p50_ms: float | None = None
    before_slow_p50_ms: float | None = None
    other_p50_ms: float | None = None


def summarize_latencies(latencies: Sequence[float], slow_every: int | None) -> LatencySummary:
    """Percentiles of ``latencies`` (seconds, item ``i`` at position ``i``), split around the
    slow items when ``slow_every`` is set.

    >>> s = summarize_latencies([0.001] * 9 + [0.010], slow_every=None)
    >>> s.p50_ms, s.max_ms, s.before_slow_p50_ms
    (1.0, 10.0, None)
    >>> lat = [0.001, 0.001, 0.005, 0.005, 0.005, 0.005, 0.005, 0.020]  # item 7 is slow
    >>> s = summarize_latencies(lat, slow_every=8)
    >>> s.slow_items, s.slow_p50_ms, s.before_slow_p50_ms, s.other_p50_ms
    (1, 20.0, 5.0, 1.0)
    """
    ordered = sorted(latencies)
    mean_ms = sum(ordered) / len(ordered) * 1e3
    base = LatencySummary(
        p50_ms=percentile(ordered, 50) * 1e3,
        p99_ms=percentile(ordered, 99) * 1e3,
        p999_ms=percentile(ordered, 99.9) * 1e3,
        max_ms=ordered[-1] * 1e3,
        mean_ms=mean_ms,
    )
    if not slow_every:
        return base
    n = len(latencies)
    slow: list[float] = []
    before: list[float] = []
    other: list[float] = []
    for i, latency in enumerate(latencies):
        to_slow = slow_every - 1 - i % slow_every  # items until the next slow one: 0 if slow
        if to_slow == 0:
            slow.append(latency)
        elif to_slow <= BEFORE_SLOW and i + to_slow < n:  # a slow item follows in the run
            before.append(latency)
        else:
            other.append(latency)
    return dataclasses.replace(
        base,
        slow_items=len(slow),
        slow_p50_ms=_median_ms(slow),
        before_slow_p50_ms=_median_ms(before),
        other_p50_ms=_median_ms(other),
    )
