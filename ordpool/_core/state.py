"""The lifecycle of a pool, shared by the engine and the faces that report it."""

from __future__ import annotations

import enum

__all__ = ["ENDED", "PoolState"]


class PoolState(enum.Enum):
    """Lifecycle of a pool. Changes only under the engine lock."""

    STARTING = "starting"  # workers are starting and running init
    RUNNING = "running"  # accepting work
    CLOSING = "closing"  # close() was called: in-flight work finishes, no new work
    CLOSED = "closed"  # all work done, workers stopped
    TERMINATED = "terminated"  # terminate(): workers killed, pending work dropped
    BROKEN = "broken"  # workers cannot be (re)started: pending work failed with BrokenPool


ENDED = (PoolState.CLOSED, PoolState.TERMINATED, PoolState.BROKEN)
