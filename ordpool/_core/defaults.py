"""Defaults shared by every face of the library, and the one deadline helper.

Each constant is used from here only: the pool, the executor, the keyed pool and the engine
read the same numbers.
"""

from __future__ import annotations

import os
import time

import psutil

__all__ = [
    "DEPTH",
    "MAX_DELAY",
    "PACE",
    "Deadline",
    "default_window",
    "usable_cores",
]

# Tasks queued per worker: one running, one waiting in its pipe, so the worker never idles
# while its result travels back and the next task travels out.
DEPTH = 2

# Seconds a partial batch waits for more items before it is sent anyway.
MAX_DELAY = 0.005

# Cut pacing, as a fraction of max_delay: an ordered stream's partial batch is cut for an idle
# worker at most once per max_delay * PACE (1 ms by default), so that a steady stream makes
# batches of 1 ms of arrivals, not of the few items that came since the last result
# (Scheduler.paced; the figures are in docs/performance.md, "Latency").
PACE = 0.2


def default_window(workers: int, *, ray: bool = False) -> int:
    """Items in flight by default: room for a few batches per worker. Ray batches are longer
    (its transport asks for 50 ms of work each, against 40 ms), so they get more room.

    >>> default_window(2), default_window(16), default_window(2, ray=True)
    (16384, 32768, 24576)
    """
    return max(16384, (12288 if ray else 2048) * workers)


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity respected), at least 1."""
    try:
        return max(1, len(psutil.Process().cpu_affinity()))
    except (AttributeError, NotImplementedError, psutil.Error):
        return max(1, psutil.cpu_count() or os.cpu_count() or 1)


class Deadline:
    """A point in time ``timeout`` seconds from now, or none (``timeout=None``: wait forever).

    >>> Deadline(None).remaining() is None
    True
    >>> 0 < Deadline(5.0).remaining() <= 5.0
    True
    >>> Deadline(0).expired()
    True
    """

    __slots__ = ("at",)

    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left (may be <= 0), or ``None`` for no deadline."""
        return None if self.at is None else self.at - time.monotonic()

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0
